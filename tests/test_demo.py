"""``photolens demo`` end to end (all model stages), then the notebooks executed against the demo's tables."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

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
    lake = Lake(str(workdir / "lake"))
    photos = {r["uri"].rsplit("/", 1)[-1]: r for r in lake.read("photos").to_pylist()}
    assert len(photos) == 14
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


@pytest.mark.parametrize("name", ["analyst.ipynb", "run_report.ipynb"])
def test_notebooks_run_on_the_demo_tables(demo: tuple[Path, str], name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    workdir, _ = demo
    monkeypatch.setenv("PHOTOLENS_LAKE", str(workdir / "lake"))
    monkeypatch.setenv("PHOTOLENS_FIGURES", str(workdir / "figures"))
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}).execute()
    assert all(c.execution_count for c in nb.cells if c.cell_type == "code")
    assert not [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
