"""Output file sizes of the tagging job, and the maintenance jobs: ``optimize`` and ``vacuum``.

* one staged file per table per write batch, and a write batch is ``--rows-per-file`` photos, not
  ``--batch-size``: 40 photos in batches of 4 become one ``photos`` file, not ten;
* ``vacuum`` deletes what a crashed run staged (face embeddings in the restricted root among it) and its staging
  folder, once its lease has expired, and never a file that a commit references;
* ``optimize`` compacts files and keeps every row, and a later reprocessing commit still replaces rows in the
  compacted files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from photolens.jobs.maintenance import OptimizeConfig, VacuumConfig, optimize, vacuum
from photolens.jobs.tag import TagConfig, run_tag
from photolens.lake.delta import Lake, Replacement
from photolens.lake.storage import filesystem_for

PHOTOS = ["dog.jpg", "horses.jpg", "kite.jpg", "fruits.jpg", "eagle.jpg", "giraffe.jpg", "person.jpg", "apple.jpg"]
FACES = ["img1.jpg", "img2.jpg", "img13.jpg", "couple.jpg"]


def _store(root: Path, shared: Path, names: list[str], sub: str = "photos", copies: int = 1) -> Path:
    store = root / "users"
    for c in range(copies):
        for i, name in enumerate(names):
            folder = store / f"u{(i + c) % 3}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{c:02d}-{name}").write_bytes((shared / sub / name).read_bytes())
    return store


def _active(lake: Lake, name: str) -> set[str]:
    table = lake.open(name)
    return set() if table is None else set(pa.table(table.get_add_actions(flatten=True)).column("path").to_pylist())


def _parquet_on_disk(lake: Lake, name: str) -> set[str]:
    fs, root = filesystem_for(lake.table_uri(name), None)
    from pyarrow.fs import FileSelector

    infos = fs.get_file_info(FileSelector(root, recursive=True, allow_not_found=True))
    return {i.path[len(root):].lstrip("/") for i in infos
            if i.path.endswith(".parquet") and "_delta_log" not in i.path}


def _sorted_rows(lake: Lake, name: str) -> list[dict[str, Any]]:
    table = lake.read(name)
    keys = [c for c in ("photo_id", "face_id", "det_index") if c in table.column_names]
    return sorted(table.to_pylist(), key=lambda r: tuple(str(r[k]) for k in keys))


# ---------------------------------------------------------------------------------------------- file sizes


def test_files_per_table_follow_rows_per_file_not_batch_size(ray_local: None, shared_data: Path,
                                                             tmp_path: Path) -> None:
    store = _store(tmp_path / "store", shared_data, PHOTOS, copies=5)  # 40 photos
    big = Lake(str(tmp_path / "big"))
    report = run_tag(TagConfig(photos=str(store), lake=big.root, stages=("decode",), batch_size=4, progress=False,
                               run_id="big-files"))
    assert report.n_todo == 40 and report.status_counts == {"ok": 40}
    assert len(_active(big, "photos")) == 1  # was 10: one file per 4-photo batch
    assert big.read("photos").num_rows == 40

    small = Lake(str(tmp_path / "small"))
    run_tag(TagConfig(photos=str(store), lake=small.root, stages=("decode",), batch_size=4, progress=False,
                      run_id="small-files", rows_per_file=10))
    files = small.open("photos").get_add_actions(flatten=True)  # type: ignore[union-attr]
    rows = pa.table(files).column("num_records").to_pylist()
    assert sum(rows) == 40 and max(rows) <= 10
    # Ray Data hands the writer batches of up to 10 rows; a bundle's remainder may make a shorter one.
    assert 4 <= len(rows) <= 8


# ---------------------------------------------------------------------------------------------- vacuum


@pytest.mark.slow
def test_vacuum_removes_a_crashed_runs_staged_embeddings_never_committed_files(
        ray_local: None, shared_data: Path, model_store: str, tmp_path: Path) -> None:
    lake = Lake(str(tmp_path / "lake"))
    # A committed night first: its files must survive every vacuum.
    store_a = _store(tmp_path / "a", shared_data, PHOTOS[:4])
    run_tag(TagConfig(photos=str(store_a), lake=lake.root, stages=("decode",), progress=False, run_id="night-ok"))
    committed = {n: _active(lake, n) for n in ("photos", "faces")}
    rows_before = _sorted_rows(lake, "photos")

    # Then a run with the faces stage killed before committing faces: embeddings staged, never committed.
    store_b = _store(tmp_path / "b", shared_data, FACES, sub="faces/deepface")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "AWS_EC2_METADATA_DISABLED": "true",
           "PHOTOLENS_FAULT": "crash_before_commit=faces"}
    env.pop("RAY_ADDRESS", None)
    killed = subprocess.run([sys.executable, "-m", "photolens.cli", "tag", "--photos", str(store_b), "--lake",
                             lake.root, "--stages", "decode,faces", "--model-store", model_store, "--run-id",
                             "night-crash", "--json"], env=env, capture_output=True, text=True, timeout=600,
                            check=False)
    assert killed.returncode == 137, killed.stderr[-3000:]
    orphan_faces = _parquet_on_disk(lake, "faces") - _active(lake, "faces")
    assert orphan_faces, "the crashed run staged no faces file"
    fs, root = filesystem_for(lake.table_uri("faces"), None)
    staged = pa.concat_tables([pq.read_table(f"{root}/{p}", filesystem=fs) for p in orphan_faces])
    assert staged.column("embedding").drop_null().to_pylist(), "no embeddings in the staged faces files"
    assert lake.read("faces").num_rows == 0  # invisible: never committed
    staging = Path(lake.root) / "_photolens" / "staging" / "night-crash"
    assert staging.is_dir()

    # Within the lease expiry nothing is an orphan yet; a dry run only counts.
    young = vacuum(VacuumConfig(lake=lake.root))
    assert young["tables"]["faces"]["orphans_removed"] == 0 and young["staging"]["runs_removed"] == 0
    dry = vacuum(VacuumConfig(lake=lake.root, older_than_hours=0, dry_run=True))
    assert dry["tables"]["faces"]["orphans_removed"] == len(orphan_faces)
    assert _parquet_on_disk(lake, "faces") >= orphan_faces

    done = vacuum(VacuumConfig(lake=lake.root, older_than_hours=0))
    assert done["tables"]["faces"]["orphans_removed"] == len(orphan_faces) and done["tables"]["faces"]["restricted"]
    assert done["tables"]["photos"]["orphans_removed"] >= 1  # the crashed run's photos file too
    assert not (_parquet_on_disk(lake, "faces") & orphan_faces)
    assert not staging.exists()
    for name, paths in committed.items():
        assert paths <= _parquet_on_disk(lake, name), f"a committed {name} file was deleted"
        assert _active(lake, name) == paths
    assert _sorted_rows(lake, "photos") == rows_before

    # The CLI runs the same job.
    out = subprocess.run([sys.executable, "-m", "photolens.cli", "vacuum", "--lake", lake.root, "--older-than", "0"],
                         env={**env, "PHOTOLENS_FAULT": ""}, capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout)["tables"]["faces"]["orphans_removed"] == 0


def test_vacuum_keeps_the_files_of_a_run_whose_lease_is_fresh(tmp_path: Path) -> None:
    lake = Lake(str(tmp_path / "lake"))
    lake.append("photos", _photos_rows(range(3), "earlier"))
    staged = lake.stage("photos", _photos_rows(range(3, 6), "live-run"), "live-run-000000000000")
    lake.touch_lease("live-run")
    # Only a lease: the file is not referenced, but its run is alive.
    out = vacuum(VacuumConfig(lake=lake.root, older_than_hours=0.5))
    fs, root = filesystem_for(lake.table_uri("photos"), None)
    assert out["tables"]["photos"]["orphans_removed"] == 0
    assert fs.get_file_info(f"{root}/{staged[0].path}").size == staged[0].size


# ---------------------------------------------------------------------------------------------- optimize


def _photos_rows(ids: range, run_id: str, status: str = "ok") -> pa.Table:
    n = len(ids)
    return pa.table({"photo_id": [f"{i:032x}" for i in ids], "user_id": [f"u{i % 7}" for i in ids],
                     "uri": [f"s3://p/users/u{i % 7}/{i}.jpg" for i in ids], "status": [status] * n,
                     "error_code": [None if status == "ok" else "FETCH_TRANSIENT"] * n, "run_id": [run_id] * n,
                     "run_date": ["2026-01-0" + str(1 + i % 2) for i in ids]})


def _faces_rows(ids: range) -> pa.Table:
    return pa.table({"face_id": [f"f{i:031x}" for i in ids], "photo_id": [f"{i:032x}" for i in ids],
                     "user_id": [f"u{i % 7}" for i in ids], "face_index": pa.array([0] * len(ids), pa.int32()),
                     "embedding": [[float(i), 1.0, 2.0] for i in ids], "run_id": ["r"] * len(ids),
                     "run_date": ["2026-01-01"] * len(ids)})


@pytest.mark.parametrize("z_order", [False, True])
def test_optimize_compacts_and_keeps_every_row(tmp_path: Path, z_order: bool) -> None:
    lake = Lake(str(tmp_path / "lake"))
    for start in range(0, 120, 10):  # 12 small commits, two partitions each
        status = "error" if start == 50 else "ok"
        lake.append("photos", _photos_rows(range(start, start + 10), f"r{start}", status))
        lake.append("faces", _faces_rows(range(start, start + 10)))
    before = {n: _sorted_rows(lake, n) for n in ("photos", "faces")}
    files_before = {n: len(_active(lake, n)) for n in ("photos", "faces")}

    out = optimize(OptimizeConfig(lake=lake.root, z_order=z_order))
    for name in ("photos", "faces"):
        assert _sorted_rows(lake, name) == before[name]
        assert out["tables"][name]["files_after"] < files_before[name]
        assert len(_active(lake, name)) == out["tables"][name]["files_after"]
    assert out["tables"]["faces"]["mode"] == ("z_order(user_id)" if z_order else "compact")

    # Reprocessing after compaction: the transient errors' rows are replaced in the compacted files.
    shard = tmp_path / "replace.parquet"
    pq.write_table(pa.table({"photo_id": [f"{i:032x}" for i in range(50, 60)]}), shard)
    new = lake.stage("photos", _photos_rows(range(50, 60), "retry"), "retry-000000000000")
    lake.commit_staged("photos", new, "photolens.tag/retry", 1,
                       replace=Replacement("photo_id", (str(shard),), 10, (("status", "error"),), "retry"))
    rows = {r["photo_id"]: r for r in lake.read("photos").to_pylist()}
    assert len(rows) == lake.read("photos").num_rows == 120
    assert {pid for pid, r in rows.items() if r["run_id"] == "retry"} == {f"{i:032x}" for i in range(50, 60)}
    assert {r["status"] for r in rows.values()} == {"ok"}

    # Optimize left removed files for time travel; vacuum past the retention removes them, rows unchanged.
    vacuum(VacuumConfig(lake=lake.root, retention_hours=0, older_than_hours=0))
    for name in ("photos", "faces"):
        assert _parquet_on_disk(lake, name) == _active(lake, name)
    assert _sorted_rows(lake, "faces") == before["faces"]
    if z_order:  # the CLI runs the same job: one table, nothing left to compact in it
        env = {**os.environ, "RAY_AUTH_MODE": "disabled", "AWS_EC2_METADATA_DISABLED": "true"}
        out = subprocess.run([sys.executable, "-m", "photolens.cli", "optimize", "--lake", lake.root, "--table",
                              "faces"], env=env, capture_output=True, text=True, timeout=300, check=False)
        assert out.returncode == 0, out.stderr[-2000:]
        doc = json.loads(out.stdout)
        assert list(doc["tables"]) == ["faces"] and doc["tables"]["faces"]["files_after"] == 1
        assert _sorted_rows(lake, "faces") == before["faces"]


def test_vacuum_keeps_the_files_of_a_run_whose_driver_holds_its_lease(tmp_path: Path) -> None:
    from photolens.lake.lease import RunLease

    lake = Lake(str(tmp_path / "lake"))
    lake.append("photos", _photos_rows(range(3), "earlier"))
    lease = RunLease(lake, "driven")
    lease.acquire(lambda doc: {"run_id": "driven", "attempt": 1, "state": "started"})
    staged = lake.stage("photos", _photos_rows(range(3, 6), "driven"), "driven-000000000000")
    fs, root = filesystem_for(lake.table_uri("photos"), None)
    # Even past every age limit: the driver's live lease protects what it staged.
    assert vacuum(VacuumConfig(lake=lake.root, older_than_hours=0))["tables"]["photos"]["orphans_removed"] == 0
    assert fs.get_file_info(f"{root}/{staged[0].path}").size == staged[0].size
    lease.release(state="rolled_back")
    out = vacuum(VacuumConfig(lake=lake.root, older_than_hours=0))
    assert out["tables"]["photos"]["orphans_removed"] == len(staged)
    assert _active(lake, "photos") == _parquet_on_disk(lake, "photos")


@pytest.mark.s3
def test_vacuum_on_an_object_store(local_s3: Any) -> None:
    local_s3.create_bucket("vacuum-lake")
    lake = Lake("s3://vacuum-lake/lake")
    lake.append("photos", _photos_rows(range(4), "earlier"))
    lake.append("faces", _faces_rows(range(4)))
    committed = {n: _active(lake, n) for n in ("photos", "faces")}
    orphans = lake.stage("faces", _faces_rows(range(4, 8)), "lost-run-000000000000")
    fs, root = filesystem_for(lake.table_uri("faces"), None)
    assert fs.get_file_info(f"{root}/{orphans[0].path}").size == orphans[0].size

    kept = vacuum(VacuumConfig(lake=lake.root))  # within the lease expiry: nothing goes
    assert kept["tables"]["faces"]["orphans_removed"] == 0 and kept["tables"]["faces"]["kept_younger_than_lease"] == 1
    out = vacuum(VacuumConfig(lake=lake.root, older_than_hours=0))
    assert out["tables"]["faces"]["orphans_removed"] == 1 and out["tables"]["photos"]["orphans_removed"] == 0
    from pyarrow.fs import FileSelector, FileType

    on_store = {i.path[len(root):].lstrip("/") for i in fs.get_file_info(FileSelector(root, recursive=True))
                if i.type == FileType.File and i.path.endswith(".parquet") and "_delta_log" not in i.path}
    assert on_store == committed["faces"] and _active(lake, "photos") == committed["photos"]
    assert lake.read("faces").num_rows == 4


def test_vacuum_reads_checkpoints_once_old_log_entries_are_gone(tmp_path: Path) -> None:
    lake = Lake(str(tmp_path / "lake"))
    for start in range(0, 12, 4):
        lake.append("photos", _photos_rows(range(start, start + 4), f"r{start}"))
    table = lake.open("photos")
    assert table is not None
    table.create_checkpoint()
    log = Path(lake.table_uri("photos")) / "_delta_log"
    for entry in sorted(log.glob("*.json"))[:-1]:  # log cleanup: only the checkpoint names the first files now
        entry.unlink()
    committed = _active(lake, "photos")
    orphans = lake.stage("photos", _photos_rows(range(20, 22), "gone"), "gone-000000000000")
    out = vacuum(VacuumConfig(lake=lake.root, older_than_hours=0))
    assert out["tables"]["photos"]["orphans_removed"] == len(orphans)
    assert _parquet_on_disk(lake, "photos") == committed == _active(lake, "photos")
    assert lake.read("photos").num_rows == 12
