"""Planning without listing, at scale: ``plan_run`` streams a 2·10^5-key manifest with bounded memory.

A fast stand-in for ``bench/bench_plan.py`` (10^6 / 10^7 keys). The manifest repeats some keys (also across
the reader's batches) and the lake already holds some photos as done, as transient errors (planned again)
and as permanent errors (not planned again); the todo shards must hold every remaining key exactly once.
Memory is measured in a fresh process: planning 2·10^5 keys after 1.35·10^5 (both past the per-batch
plateau) may only grow the planner's peak by the id sets (8-25 bytes a key), not by anything kept per key in
Python or Arrow.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from photolens.lake.delta import Lake

PHOTOS_ROOT = "s3://scale-photos"
N_BIG = 200_000
N_SMALL = 135_000  # over two reader batches (65,536 rows): both plans reach their per-batch plateau
N_REPEATED = 3_000

# Runs in a fresh interpreter so that peaks are the planner's own (pytest's process has loaded everything).
MEASURE = r"""
import json, resource, sys, tracemalloc
import pyarrow as pa
import pyarrow.compute as pc
from photolens.jobs.tag import TagConfig, plan_run
from photolens.lake.delta import Lake

def plan(manifest, lake_root, run_id):
    cfg = TagConfig(photos=sys.argv[1] + "/", manifest=manifest, lake=lake_root, stages=("decode",), run_id=run_id,
                    progress=False)
    return plan_run(cfg, Lake(lake_root), run_id, 1, None)

plan(sys.argv[2], sys.argv[4], "warm-up")  # first-use costs (imports, thread pools) out of the way
out = {}
for name, manifest in (("small", sys.argv[2]), ("big", sys.argv[3])):
    tracemalloc.start()
    p = plan(manifest, sys.argv[4], name)
    python_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    out[name] = {"python_peak": python_peak, "rss_peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                 "arrow_held": pa.total_allocated_bytes(), "shards": p.shards, "n_manifest": p.n_manifest,
                 "n_todo": p.n_todo, "n_done_before": p.n_done_before, "n_duplicates": p.n_duplicates}
print(json.dumps(out))
"""


def _keys(n: int) -> list[str]:
    return [f"users/{i // 100}/{i}.jpg" for i in range(n)]


def _etag(key: str) -> str:
    return hashlib.md5(key.encode()).hexdigest()  # an S3-style etag


def _photo_id(key: str) -> str:
    """blake2b(uri, etag) written out here, independent of the planner's code."""
    return hashlib.blake2b(f"{PHOTOS_ROOT}/{key}\x00etag:{_etag(key)}".encode(), digest_size=16).hexdigest()


def _write_manifest(path: Path, keys: list[str]) -> None:
    table = pa.table({"key": keys, "etag": [_etag(k) for k in keys],
                      "size": pa.array(np.arange(len(keys)) + 10_000, pa.int64())})
    pq.write_table(table, path, row_group_size=20_000)


def _seed_lake(root: Path, ok: list[str], transient: list[str], permanent: list[str]) -> None:
    keys = ok + transient + permanent
    status = ["ok"] * len(ok) + ["error"] * (len(transient) + len(permanent))
    codes = [None] * len(ok) + ["FETCH_TRANSIENT"] * len(transient) + ["UNREADABLE"] * len(permanent)
    Lake(str(root)).append("photos", pa.table({
        "photo_id": [_photo_id(k) for k in keys], "user_id": [k.split("/")[1] for k in keys],
        "uri": [f"{PHOTOS_ROOT}/{k}" for k in keys], "etag": [_etag(k) for k in keys], "status": status,
        "error_code": codes, "run_id": ["earlier"] * len(keys), "run_date": ["2026-01-01"] * len(keys)}))


def test_plan_streams_a_large_manifest_exactly_once_in_bounded_memory(tmp_path: Path) -> None:
    keys = _keys(N_BIG)
    rng = np.random.default_rng(7)
    # Repeats land in later reader batches (65,536 rows each) than their first occurrence, and inside one batch.
    repeats = [keys[i] for i in rng.choice(N_BIG, N_REPEATED, replace=False)]
    rows = keys + repeats
    order = rng.permutation(len(rows))
    big = tmp_path / "big.parquet"
    _write_manifest(big, [rows[i] for i in order])
    small = tmp_path / "small.parquet"
    _write_manifest(small, _keys(N_SMALL))

    ok, transient, permanent = keys[:5_000], keys[5_000:6_000], keys[6_000:7_000]
    lake = tmp_path / "lake"
    _seed_lake(lake, ok, transient, permanent)

    proc = subprocess.run([sys.executable, "-c", MEASURE, PHOTOS_ROOT, str(small), str(big), str(lake)],
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    res = out["big"]

    # Exactly once: every key not finished before is in the shards, once; nothing else is.
    planned = pa.concat_tables([pq.read_table(u) for u in res["shards"]])
    ids = planned.column("photo_id").to_pylist()
    expected = {_photo_id(k) for k in keys} - {_photo_id(k) for k in ok + permanent}
    assert len(ids) == len(set(ids)) == len(expected)
    assert set(ids) == expected
    assert {_photo_id(k) for k in transient} <= set(ids)  # transient failures are retried the next night
    assert res["n_manifest"] == N_BIG + N_REPEATED
    assert res["n_duplicates"] == N_REPEATED
    assert res["n_done_before"] == len(ok) + len(permanent)
    assert res["n_todo"] == len(expected)
    # The shards carry the manifest's own columns through, for the fetch stage.
    by_id = dict(zip(ids, planned.column("etag").to_pylist(), strict=True))
    assert by_id[_photo_id(keys[-1])] == _etag(keys[-1])

    # Bounded: more keys may grow Python's peak by the id sets only (<= 40 bytes a key over the 68,000 more:
    # anything kept per key as Python objects costs hundreds), and Arrow holds nothing once planning is over.
    growth = out["big"]["python_peak"] - out["small"]["python_peak"]
    assert growth < 40 * (N_BIG + N_REPEATED - N_SMALL), f"Python peak grew by {growth / 2**20:.1f} MiB"
    assert out["big"]["arrow_held"] < 16 << 20
    rss_growth_mib = (out["big"]["rss_peak_kib"] - out["small"]["rss_peak_kib"]) / 1024
    assert rss_growth_mib < 256, f"peak RSS grew by {rss_growth_mib:.0f} MiB planning 2e5 keys"


# ---------------------------------------------------------------------------------------------- replacements


def _commit_night(lake: Lake, plan: object, run_id: str, code_of: dict[str, str], with_children: bool) -> None:
    """What the job commits for a plan: a new row per todo photo (staged), old rows replaced in the same commit."""
    from photolens.jobs.tag import APP_PREFIX, CHILD_TABLES

    todo = pa.concat_tables([pq.read_table(u) for u in plan.shards])  # type: ignore[attr-defined]
    ids = todo.column("photo_id").to_pylist()
    users = todo.column("user_id").to_pylist()
    status = ["error" if i in code_of else "ok" for i in ids]
    rows = {"photo_id": ids, "user_id": users, "uri": todo.column("uri").to_pylist(), "status": status,
            "error_code": [code_of.get(i) for i in ids],
            "run_id": [run_id] * len(ids), "run_date": ["2026-01-02"] * len(ids)}
    photos = pa.table(rows)
    staged = {"photos": (lake.stage("photos", photos.filter(pc.equal(photos["status"], "ok")), run_id + "-aaaaaaaaaaaa")
                         + lake.stage("photos", photos.filter(pc.not_equal(photos["status"], "ok")),
                                      run_id + "-bbbbbbbbbbbb"))}
    ok_ids = [i for i, s in zip(ids, status, strict=True) if s == "ok"]
    dets = pa.table({"photo_id": ok_ids, "user_id": [users[ids.index(i)] for i in ok_ids],
                     "det_index": pa.array([0] * len(ok_ids), pa.int32()), "category": ["dog"] * len(ok_ids),
                     "run_id": [run_id] * len(ok_ids), "run_date": ["2026-01-02"] * len(ok_ids)})
    staged["detections"] = lake.stage("detections", dets, run_id + "-cccccccccccc") if with_children else []
    app = APP_PREFIX + run_id
    for name in CHILD_TABLES:
        lake.commit_staged(name, staged.get(name, []), app, 1, replace=plan.replacement(name, run_id))  # type: ignore[attr-defined]
    lake.commit_staged("photos", staged["photos"], app, 1, replace=plan.replacement("photos", run_id))  # type: ignore[attr-defined]


def _plan(lake_root: str, manifest: Path, run_id: str, reprocess: str = "none") -> object:
    from photolens.jobs.tag import TagConfig, plan_run

    cfg = TagConfig(photos=PHOTOS_ROOT + "/", manifest=str(manifest), lake=lake_root, stages=("decode",), run_id=run_id,
                    progress=False, reprocess=reprocess, todo_shard_rows=300)
    return plan_run(cfg, Lake(lake_root), run_id, 1, None)


def test_replacements_apply_from_shards_and_keep_one_row_per_photo(tmp_path: Path) -> None:
    """Three nights over 1,000 keys: transient errors retried (only error files rewritten), then --reprocess
    errors, then --reprocess all (children too); after each commit the tables hold exactly the expected rows."""
    keys = _keys(1_000)
    manifest = tmp_path / "keys.parquet"
    _write_manifest(manifest, keys)
    root = str(tmp_path / "lake")
    lake = Lake(root)
    pid = {k: _photo_id(k) for k in keys}

    # Night 1: everything new; 100 transient failures, 50 permanent.
    first = _plan(root, manifest, "n1")
    assert first.n_todo == 1_000 and first.n_replaced == 0 and first.replacement("photos") is None
    codes1 = {pid[k]: "FETCH_TRANSIENT" if i < 100 else "UNREADABLE" for i, k in enumerate(keys[:150])}
    _commit_night(lake, first, "n1", codes1, with_children=True)
    dets_before = sorted(lake.read("detections", ["photo_id"]).column("photo_id").to_pylist())
    adds = pa.table(lake.open("photos").get_add_actions(flatten=True)).to_pylist()  # type: ignore[union-attr]
    ok_files = {a["path"] for a in adds if a["min.status"] == a["max.status"] == "ok"}
    assert ok_files and len(ok_files) < len(adds)
    det_files = set(pa.table(lake.open("detections").get_add_actions(flatten=True)).column("path").to_pylist())  # type: ignore[union-attr]

    # Night 2: the 100 transient ones again (replace shards, not a list); 30 of them fail again.
    second = _plan(root, manifest, "n2")
    assert second.n_todo == second.n_replaced == 100 and second.replace_shards
    assert pq.read_table(second.replace_shards[0]).column_names == ["photo_id"]
    assert second.replacement("detections") is None  # error photos have no child rows
    _commit_night(lake, second, "n2", {pid[k]: "FETCH_TIMEOUT" for k in keys[:30]}, with_children=True)
    photos = lake.read("photos", ["photo_id", "status", "error_code", "run_id"]).to_pylist()
    assert sorted(r["photo_id"] for r in photos) == sorted(pid.values())  # exactly one row each
    by_id = {r["photo_id"]: r for r in photos}
    assert {k for k in keys if by_id[pid[k]]["run_id"] == "n2"} == set(keys[:100])
    assert {k for k in keys if by_id[pid[k]]["status"] == "error"} == set(keys[:30]) | set(keys[100:150])
    assert sorted(lake.read("detections", ["photo_id"]).column("photo_id").to_pylist()) == sorted(
        dets_before + [pid[k] for k in keys[30:100]])
    # Files with only ok rows were left alone (the rewrite touched error files only), and so were the children.
    after = set(pa.table(lake.open("photos").get_add_actions(flatten=True)).column("path").to_pylist())  # type: ignore[union-attr]
    assert ok_files <= after
    assert det_files <= set(pa.table(lake.open("detections").get_add_actions(flatten=True)).column("path").to_pylist())  # type: ignore[union-attr]

    # Night 3: --reprocess errors retries the 30 transient and the 50 permanent ones.
    third = _plan(root, manifest, "n3", reprocess="errors")
    assert third.n_todo == third.n_replaced == 80
    _commit_night(lake, third, "n3", {}, with_children=True)
    photos = lake.read("photos", ["photo_id", "status"]).to_pylist()
    assert sorted(r["photo_id"] for r in photos) == sorted(pid.values())
    assert {r["status"] for r in photos} == {"ok"}

    # Night 4: --reprocess all replaces every row, the children's too.
    fourth = _plan(root, manifest, "n4", reprocess="all")
    assert fourth.n_todo == fourth.n_replaced == 1_000
    assert fourth.replacement("detections") is not None
    _commit_night(lake, fourth, "n4", {}, with_children=True)
    photos = lake.read("photos", ["photo_id", "run_id"]).to_pylist()
    assert sorted(r["photo_id"] for r in photos) == sorted(pid.values())
    assert {r["run_id"] for r in photos} == {"n4"}
    dets = lake.read("detections", ["photo_id", "run_id"]).to_pylist()
    assert sorted(r["photo_id"] for r in dets) == sorted(pid.values()) and {r["run_id"] for r in dets} == {"n4"}
