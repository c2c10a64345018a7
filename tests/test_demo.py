"""``photolens demo`` end to end (all model stages, then the face journey: templates, index, forget, suggestions),
then the notebooks executed against the demo's tables."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from photolens.jobs.demo import summary_of
from photolens.lake.delta import Lake
from photolens.lake.seaweed import LocalS3
from photolens.lake.storage import reset_s3_settings

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
pytestmark = pytest.mark.slow


LAKE = "s3://lake/demo"
READY = "object store still running at "


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """The demo as `make demo` runs it, on its embedded SeaweedFS; ``--keep`` leaves the store up (the demo
    waits for Ctrl-C) so the tests read the same tables, and the store ends with the module."""
    workdir = tmp_path_factory.mktemp("demo")
    # A subprocess: the demo starts its own object store and Ray, and must not disturb the session's.
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    with (workdir / "stderr.log").open("w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "photolens.cli", "demo", "--workdir", str(workdir), "--keep"],
                                env=env, stdout=subprocess.PIPE, stderr=err, text=True)
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith(READY):
                ready.set()
        ready.set()  # the demo ended (a failure: with --keep it only ends on Ctrl-C)

    threading.Thread(target=read, daemon=True).start()
    patch = pytest.MonkeyPatch()
    try:
        ready.wait(timeout=850)
        stdout = "".join(lines)
        assert proc.poll() is None and READY in stdout, (stdout[-2000:], (workdir / "stderr.log").read_text()[-3000:])
        endpoint = stdout.split(READY, 1)[1].split(";", 1)[0]
        for k, v in {**LocalS3(workdir / "seaweedfs").env(), "AWS_ENDPOINT_URL": endpoint,
                     "PHOTOLENS_S3_ENDPOINT": endpoint}.items():
            patch.setenv(k, v)
        reset_s3_settings()
        yield workdir, stdout.split(f"\n{READY}", 1)[0]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        patch.undo()
        reset_s3_settings()


def test_demo_prints_a_report_with_real_tags(demo: tuple[Path, str]) -> None:
    _, stdout = demo
    assert "committed (attempt 1)" in stdout
    assert "errors by code:" in stdout
    for code in ("EMPTY_FILE", "DECOMPRESSION_BOMB", "TRUNCATED"):
        assert code in stdout
    assert "top interests of ada" in stdout
    # A short readable report: Ray's own lines go to a log file, not into it.
    assert len(stdout.splitlines()) < 120
    assert "WARNING" not in stdout
    lake = Lake(LAKE)
    photos = {r["uri"].rsplit("/", 1)[-1]: r for r in lake.read("photos").to_pylist()}
    # 20 files on night 1 + the group photo on night 2, less joe's two profile photos (forgotten)
    assert len(photos) == 19
    assert photos["chelsea.png"]["status"] == "ok"
    detections = lake.read("detections").to_pylist()
    cats = {r["category"] for r in detections if r["photo_id"] == photos["chelsea.png"]["photo_id"]}
    assert "cat" in cats
    motorbikes = {r["photo_id"] for r in detections if r["category"] == "motorcycle"}
    assert photos["motorcycle.png"]["photo_id"] in motorbikes
    # Faces make a photo private; the astronaut's portrait has one, the coffee cup none.
    assert photos["astronaut.png"]["is_private"] is True
    assert photos["coffee.png"]["is_private"] is False
    faces = lake.read("faces").to_pylist()
    assert faces
    assert all(len(f["embedding"]) == 128 for f in faces if f["embedding"] is not None)


def test_suggestions_on_the_group_photo_name_the_right_friend(demo: tuple[Path, str]) -> None:
    lake = Lake(LAKE)
    group = next(r for r in lake.read("photos").to_pylist() if r["uri"].endswith("/group_photo.jpg"))
    assert group["n_faces"] == 2
    suggestions = lake.read("suggestions").to_pylist()
    assert suggestions
    boxes = {f["face_id"]: f["box"] for f in lake.read("faces").to_pylist()}
    left, right = sorted((r for r in suggestions if r["photo_id"] == group["photo_id"]),
                         key=lambda r: boxes[r["face_id"]][0])
    # barack's face (obama3.jpg, a photo none of his profile photos is): he comes first and is verified.
    assert left["uploader_id"] == "ada"
    assert left["candidates"][0] == "barack"
    assert left["verified"] and left["verified_user_id"] == "barack"
    assert left["verify_distance"] < left["threshold"]
    # joe's face, after joe was forgotten: he is no candidate, and nobody else is verified in his place.
    assert "joe" not in right["candidates"] and right["candidates"]
    assert not right["verified"] and right["verified_user_id"] is None
    assert right["verify_distance"] > right["threshold"]


def test_forget_receipt_is_complete(demo: tuple[Path, str]) -> None:
    workdir, stdout = demo
    lake = Lake(LAKE)
    receipt = summary_of(workdir)["receipt"]
    assert receipt == lake.get_json(receipt["receipt_uri"])  # the stored receipt is the one reported
    assert receipt["user_id"] == "joe" and receipt["complete"] is True and receipt["pending"] == []
    assert receipt["tombstone"]["appended"] is True
    for table in ("photos", "faces", "templates", "friends", "detections"):
        assert receipt["tables"][table]["rows_deleted"] >= 1, table
    assert receipt["index"]["versions_with_user"] == 1
    assert receipt["index"]["removed_vectors_from_current"] == 2  # joe's two template vectors
    assert "vectors" not in json.dumps(receipt["tables"])  # a receipt holds no biometric data
    for table, column in (("photos", "user_id"), ("faces", "user_id"), ("templates", "user_id"),
                          ("friends", "user_id"), ("friends", "friend_id")):
        assert "joe" not in lake.read(table, [column]).column(column).to_pylist(), table
    assert [r["user_id"] for r in lake.read("tombstones").to_pylist()] == ["joe"]
    assert f"forget joe: receipt {receipt['receipt_uri']}" in stdout


@pytest.mark.parametrize("name", ["analyst.ipynb", "run_report.ipynb"])
def test_notebooks_run_on_the_demo_tables(demo: tuple[Path, str], name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    workdir, _ = demo
    monkeypatch.setenv("PHOTOLENS_LAKE", LAKE)
    monkeypatch.setenv("PHOTOLENS_STORAGE_OPTIONS", json.dumps(Lake(LAKE).storage_options()))
    monkeypatch.setenv("PHOTOLENS_FIGURES", str(workdir / "figures"))
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}).execute()
    assert all(c.execution_count for c in nb.cells if c.cell_type == "code")
    assert not [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
