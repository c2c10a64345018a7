"""The analyst notebooks run headless against a hand-built lake, and their own assertions bite."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import nbformat
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from deltalake import DeltaTable, write_deltalake
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from photolens.jobs.preferences import run_preferences, table_uri

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def _fixtures() -> ModuleType:
    # The hand-built lake lives in test_preferences.py; load it by path so this works with or without
    # tests/__init__.py.
    path = Path(__file__).with_name("test_preferences.py")
    spec = importlib.util.spec_from_file_location("_photolens_prefs_fixtures", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


FIX = _fixtures()


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = FIX.hand_built_lake(tmp_path_factory.mktemp("notebooks") / "lake")
    run_preferences(root, FIX.PREV_AS_OF)
    run_preferences(root, FIX.AS_OF)
    return root


def _execute(name: str, lake: str, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> nbformat.NotebookNode:
    monkeypatch.setenv("PHOTOLENS_LAKE", lake)
    monkeypatch.setenv("PHOTOLENS_FIGURES", str(workdir / "figures"))
    for var in ("PHOTOLENS_STORAGE_OPTIONS", "PHOTOLENS_AS_OF", "PHOTOLENS_PREV_AS_OF", "PHOTOLENS_USER"):
        monkeypatch.delenv(var, raising=False)
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    # kernel "python3" resolves to this interpreter: the venv's kernelspec, or ipykernel's built-in one.
    client = NotebookClient(nb, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(workdir)}})
    client.execute()
    return nb


def _outputs(nb: nbformat.NotebookNode) -> tuple[str, int]:
    text, images = [], 0
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        assert cell.execution_count is not None
        for out in cell.outputs:
            if out.output_type == "stream":
                text.append(out.text)
            elif "data" in out:
                images += "image/png" in out.data
                text.append(out.data.get("text/plain", ""))
    return "\n".join(text), images


def test_notebooks_are_stored_without_outputs() -> None:
    for name in ("analyst.ipynb", "run_report.ipynb"):
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        nbformat.validate(nb)
        assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), name


def test_analyst_notebook(lake: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nb = _execute("analyst.ipynb", lake, tmp_path, monkeypatch)
    text, images = _outputs(nb)
    assert images == 4
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == [
        "coverage.png", "forest_vs_beach.png", "top_interests.png", "week_over_week.png"]
    assert f"as_of: {FIX.AS_OF}" in text
    # The user with the most public photos, and the forest/beach answer, recounted here by plain loops.
    photos, dets = FIX.hand_built_tables()
    expected, users = FIX.expected_preferences(photos, dets, FIX.AS_OF)
    top_user = max(sorted(users), key=lambda u: users[u][0])
    assert f"user: {top_user}" in text
    with_scenes = {u for (u, s, c) in expected if s == "scene" and c in ("forest", "beach")}
    forest = {u for u in with_scenes
              if expected.get((u, "scene", "forest"), {}).get("score", 0) > expected.get((u, "scene", "beach"), {})
              .get("score", 0)}
    assert f"{len(forest)} of {len(with_scenes)} users with forest or beach photos prefer forest" in text
    assert f"{FIX.PREV_AS_OF} -> {FIX.AS_OF}" in text
    n_users = len({u for u, _, _ in expected})
    assert f"users with preferences / users with ok photos: {n_users / len(users):.1%}" in text


def test_run_report_notebook(lake: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nb = _execute("run_report.ipynb", lake, tmp_path, monkeypatch)
    text, images = _outputs(nb)
    assert images == 3
    runs = FIX.runs_table().to_pylist()
    stages = [s for r in runs for s in json.loads(r["stages"])]
    slowest: dict[str, list[float]] = {}
    for s in stages:
        slowest.setdefault(s["stage"], [0, 0.0])
        slowest[s["stage"]][0] += s["rows"]
        slowest[s["stage"]][1] += s["seconds"]
    stage, (rows, seconds) = min(slowest.items(), key=lambda kv: kv[1][0] / kv[1][1])
    assert f"slowest stage: {stage} {rows / seconds:.1f} rows/s" in text
    assert "UNREADABLE" in text


def _tamper(lake: str, as_of: str, fn: Any) -> None:
    uri = table_uri(lake, "preferences")
    snap = DeltaTable(uri).to_pyarrow_dataset().to_table(filter=pc.field("as_of") == as_of)
    write_deltalake(uri, fn(snap), mode="overwrite", predicate=f"as_of = '{as_of}'", partition_by=["as_of"])


def test_analyst_notebook_catches_counts_that_do_not_recount(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    root = FIX.hand_built_lake(tmp_path / "lake")
    run_preferences(root, FIX.AS_OF)

    def inflate(snap: pa.Table) -> pa.Table:
        # One more animal photo for alice, share and roll-up kept consistent: only the recount can tell.
        hit = pc.and_(pc.equal(snap["user_id"], "alice"), pc.equal(snap["category"], "animal"))
        count = pc.if_else(hit, pc.add(snap["photo_count"], 1), snap["photo_count"])
        share = pc.divide(count.cast(pa.float64()), snap["n_photos"].cast(pa.float64()))
        snap = snap.set_column(snap.schema.get_field_index("photo_count"), "photo_count", count)
        return snap.set_column(snap.schema.get_field_index("share"), "share", share)

    _tamper(root, FIX.AS_OF, inflate)
    with pytest.raises(CellExecutionError, match="photo counts differ from the recount"):
        _execute("analyst.ipynb", root, tmp_path, monkeypatch)
