"""``photolens demo`` end to end (all model stages, then the face journey: templates, index, forget, suggestions),
then the notebooks executed against the demo's tables."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from photolens.jobs.demo import summary_of
from photolens.lake.delta import Lake

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    # A subprocess: the demo starts its own object store and Ray, and must not disturb the session's.
    workdir = tmp_path_factory.mktemp("demo")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    out = subprocess.run([sys.executable, "-m", "photolens.cli", "demo", "--workdir", str(workdir), "--folder"],
                         env=env, capture_output=True, text=True, timeout=1200, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return workdir, out.stdout


def test_demo_prints_a_report_with_real_tags(demo: tuple[Path, str]) -> None:
    workdir, stdout = demo
    assert "committed (attempt 1)" in stdout
    assert "errors by code:" in stdout
    for code in ("EMPTY_FILE", "DECOMPRESSION_BOMB", "TRUNCATED"):
        assert code in stdout
    assert "top interests of ada" in stdout
    # A short readable report: Ray's own lines go to a log file, not into it.
    assert len(stdout.splitlines()) < 120
    assert "WARNING" not in stdout
    lake = Lake(str(workdir / "lake"))
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
    workdir, _ = demo
    lake = Lake(str(workdir / "lake"))
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
    lake = Lake(str(workdir / "lake"))
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
    monkeypatch.setenv("PHOTOLENS_LAKE", str(workdir / "lake"))
    monkeypatch.setenv("PHOTOLENS_FIGURES", str(workdir / "figures"))
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}).execute()
    assert all(c.execution_count for c in nb.cells if c.cell_type == "code")
    assert not [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
