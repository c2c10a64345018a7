"""Planning a night without listing: ``plan_run`` over a manifest of 10^6 / 10^7 keys (no Ray, no S3).

    .venv/bin/python bench/bench_plan.py [--sizes 1000000 10000000] [--done 0.0 0.9]
                                         [--workdir DIR] [--out bench/results/plan.json]

For each manifest size N: a Parquet manifest of keys ``users/{u}/{i}.jpg`` with ``etag`` and ``size`` columns is
generated in chunks (the generator holds one chunk), then ``plan_run`` streams it against a lake whose
``photos`` table already holds a fraction ``--done`` of those photos (0: the first night; 0.9: a later night).
Each step runs in its own process, so its peak RSS (``ru_maxrss``) is the planner's own, not the harness's.
Goal for the planner: 10^7 keys in under 5 minutes and 4 GiB of driver memory.

The plan is checked: the todo shards hold exactly N x (1 - done) rows (Parquet footers only).

``--transient 0.1``: one more case per size, the night after a night that left 10 % of all N photos as
transient errors (``FETCH_TRANSIENT``, in the error files the writer keeps apart from ok rows). Planning writes
those ids to replace shards (no Python list on the driver); then, each in a fresh process, the new rows are
staged and the ``photos`` commit applies the replacement (rewriting the files that hold error rows): seconds
and peak RSS of that commit, and a check that the table again holds N rows, none of them an error.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PHOTOS_ROOT = "s3://bench-photos"  # keys resolve under it; planning never reads a photo
CHUNK = 1_000_000
USERS_PER_CHUNK = 10_000  # 100 photos per user
GOAL_SECONDS = 300.0
GOAL_RSS_GIB = 4.0


def _peak_rss_mib() -> float:
    # ru_maxrss is KiB on Linux (bytes on macOS).
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def generate(path: Path, n: int) -> dict[str, Any]:
    """Write an N-key manifest in chunks of CHUNK rows (bounded memory whatever N)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    t0 = time.perf_counter()
    schema = pa.schema([("key", pa.string()), ("etag", pa.string()), ("size", pa.int64())])
    rng = np.random.default_rng(0)
    tmp = path.with_suffix(".tmp")
    with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
        for start in range(0, n, CHUNK):
            idx = pa.array(np.arange(start, min(start + CHUNK, n), dtype=np.int64))
            users = pc.divide(idx, 100)
            keys = pc.binary_join_element_wise("users/", users.cast(pa.string()), "/", idx.cast(pa.string()), ".jpg",
                                               "")
            # An S3-style etag (32 hex digits) that differs per key.
            raw = rng.integers(0, 256, size=(len(idx), 16), dtype=np.uint8)
            digits = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
            hexed = np.empty((len(idx), 32), dtype=np.uint8)
            hexed[:, 0::2], hexed[:, 1::2] = digits[raw >> 4], digits[raw & 15]
            etags = pa.array(hexed.view("S32").ravel()).cast(pa.string())
            sizes = pa.array(rng.integers(20_000, 8_000_000, size=len(idx)), pa.int64())
            writer.write_table(pa.table([keys, etags, sizes], schema=schema), row_group_size=65_536)
    tmp.replace(path)
    return {"seconds": round(time.perf_counter() - t0, 2), "peak_rss_mib": round(_peak_rss_mib(), 1),
            "bytes": path.stat().st_size}


def seed_lake(manifest: Path, lake_root: Path, fraction: float, transient: float = 0.0) -> dict[str, Any]:
    """A ``photos`` table holding the first ``fraction`` of the manifest's photos as done (``ok``).

    With ``transient``: that share of the seeded photos (every 1/transient-th) are ``FETCH_TRANSIENT`` errors,
    appended as files of their own, as the writer stages them.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from photolens.lake.delta import Lake
    from photolens.lake.photostore import OwnerRules, read_manifest, to_manifest

    t0 = time.perf_counter()
    lake = Lake(str(lake_root))
    n_total = pq.ParquetFile(manifest).metadata.num_rows
    want = int(n_total * fraction)
    done = 0
    errors = 0
    pending: list[pa.RecordBatch] = []
    for raw in read_manifest(str(manifest), PHOTOS_ROOT):
        if done >= want:
            break
        rows, _ = to_manifest(raw.slice(0, want - done), OwnerRules())
        done += rows.num_rows
        pending.append(rows)
        if sum(b.num_rows for b in pending) >= CHUNK or done >= want:
            t = pa.Table.from_batches(pending)
            n = t.num_rows
            err = np.zeros(n, dtype=bool)
            if transient > 0:
                err[:: max(1, round(1 / transient))] = True
            t = t.append_column("status", pa.array(np.where(err, "error", "ok")))
            t = t.append_column("error_code", pa.array(np.where(err, "FETCH_TRANSIENT", None), pa.string()))
            t = t.append_column("run_id", pa.array(["seed"] * n))
            t = t.append_column("run_date", pa.array(["2026-01-01"] * n))
            is_err = pc.equal(t.column("status"), "error")
            errors += int(err.sum())
            for part in (t.filter(pc.invert(is_err)), t.filter(is_err)):
                if part.num_rows:
                    lake.append("photos", part)
            pending = []
    return {"seconds": round(time.perf_counter() - t0, 2), "rows": done, "errors": errors}


def plan(manifest: Path, lake_root: Path) -> dict[str, Any]:
    """The measured step: plan_run alone, in a fresh process."""
    import pyarrow.parquet as pq

    from photolens.jobs.tag import TagConfig, plan_run
    from photolens.lake.delta import Lake

    rss_imports = _peak_rss_mib()
    cfg = TagConfig(photos=PHOTOS_ROOT + "/", manifest=str(manifest), lake=str(lake_root), stages=("decode",),
                    run_id="bench", progress=False)
    lake = Lake(cfg.lake)
    t0 = time.perf_counter()
    p = plan_run(cfg, lake, "bench", 1, None)
    seconds = time.perf_counter() - t0
    rows_in_shards = sum(pq.ParquetFile(u).metadata.num_rows for u in p.shards)
    replace_rows = sum(pq.ParquetFile(u).metadata.num_rows for u in p.replace_shards)
    (lake_root / "bench-plan.json").write_text(json.dumps({"shards": p.shards, "replace_shards": p.replace_shards,
                                                           "n_replaced": p.n_replaced, "todo_uri": p.todo_uri}))
    return {"seconds": round(seconds, 2), "peak_rss_mib": round(_peak_rss_mib(), 1),
            "n_replaced": p.n_replaced, "n_replace_shards": len(p.replace_shards),
            "rows_in_replace_shards": replace_rows,
            "rss_after_imports_mib": round(rss_imports, 1), "n_manifest": p.n_manifest, "n_todo": p.n_todo,
            "n_done_before": p.n_done_before, "n_duplicates": p.n_duplicates, "n_shards": len(p.shards),
            "rows_in_shards": rows_in_shards, "keys_per_s": round(p.n_manifest / seconds) if seconds else 0}


def stage_retries(lake_root: Path) -> dict[str, Any]:
    """Stage tonight's rows for the planned photos (all ok now), as the write stage would; not measured."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from photolens.lake.delta import Lake

    t0 = time.perf_counter()
    doc = json.loads((lake_root / "bench-plan.json").read_text())
    lake = Lake(str(lake_root))
    files = []
    for k, uri in enumerate(doc["shards"]):
        t = pq.read_table(uri)
        n = t.num_rows
        t = t.append_column("status", pa.array(["ok"] * n)).append_column("run_id", pa.array(["bench"] * n))
        t = t.append_column("run_date", pa.array(["2026-01-02"] * n))
        files += [f.to_dict() for f in lake.stage("photos", t, f"bench-{k:012x}")]
    (lake_root / "bench-staged.json").write_text(json.dumps(files))
    return {"seconds": round(time.perf_counter() - t0, 2), "files": len(files)}


def commit_retries(lake_root: Path) -> dict[str, Any]:
    """The measured step: the ``photos`` commit that adds tonight's files and applies the replace shards."""
    import pyarrow.compute as pc

    from photolens.jobs.plan import Plan
    from photolens.lake.delta import Lake, StagedFile

    rss_imports = _peak_rss_mib()
    doc = json.loads((lake_root / "bench-plan.json").read_text())
    p = Plan(todo_uri=doc["todo_uri"], shards=doc["shards"], replace_shards=doc["replace_shards"],
             n_replaced=doc["n_replaced"])
    files = [StagedFile.from_dict(d) for d in json.loads((lake_root / "bench-staged.json").read_text())]
    lake = Lake(str(lake_root))
    table = lake.open("photos")
    assert table is not None
    files_before = len(table.file_uris())
    t0 = time.perf_counter()
    lake.commit_staged("photos", files, "photolens.tag/bench", 1, replace=p.replacement("photos", "bench"))
    seconds = time.perf_counter() - t0
    peak = _peak_rss_mib()
    reopened = lake.open("photos")
    assert reopened is not None
    ds = reopened.to_pyarrow_dataset()
    n_rows = ds.count_rows()
    n_errors = ds.count_rows(filter=pc.field("status") == "error")
    after = lake.open("photos")
    assert after is not None
    return {"seconds": round(seconds, 2), "peak_rss_mib": round(peak, 1),
            "rss_after_imports_mib": round(rss_imports, 1), "files_before": files_before,
            "files_after": len(after.file_uris()), "rows_after": n_rows, "errors_after": n_errors}


def _child(*args: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{args[0]} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--done", type=float, nargs="+", default=[0.0, 0.9],
                    help="fractions of the manifest already in the lake (one run per size and fraction)")
    ap.add_argument("--transient", type=float, nargs="*", default=[0.1],
                    help="per size, one more case: every photo done the night before, this share as transient errors")
    ap.add_argument("--workdir", type=Path, help="where manifests and lakes go (default: a temp folder, removed)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "plan.json")
    args = ap.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="photolens-bench-plan-"))
    work.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        for n in args.sizes:
            manifest = work / f"manifest-{n}.parquet"
            gen = _child("--generate", str(manifest), str(n)) if not manifest.exists() else None
            if gen:
                print(f"generated {n:,} keys in {gen['seconds']} s (peak RSS {gen['peak_rss_mib']} MiB, "
                      f"{gen['bytes'] / 1e6:.0f} MB)", flush=True)
            cases = [(frac, 0.0) for frac in args.done] + [(1.0, tr) for tr in args.transient]
            for frac, transient in cases:
                lake = work / f"lake-{n}-{frac}-{transient}"
                shutil.rmtree(lake, ignore_errors=True)
                seed = (_child("--seed", str(manifest), str(lake), str(frac), str(transient)) if frac > 0 else None)
                res = _child("--plan", str(manifest), str(lake))
                n_transient = seed["errors"] if seed else 0
                expected_todo = n - (seed["rows"] if seed else 0) + n_transient
                ok = (res["rows_in_shards"] == res["n_todo"] == expected_todo and res["n_manifest"] == n
                      and res["n_duplicates"] == 0
                      and res["n_replaced"] == res["rows_in_replace_shards"] == n_transient)
                commit = None
                if transient:
                    _child("--stage", str(lake))
                    commit = _child("--commit", str(lake))
                    ok = ok and commit["rows_after"] == n and commit["errors_after"] == 0
                row = {"n_keys": n, "done_fraction": frac, "transient_fraction": transient, **res, "generate": gen,
                       "seed": seed, "commit": commit, "checked": ok,
                       "meets_goal": res["seconds"] < GOAL_SECONDS and res["peak_rss_mib"] < GOAL_RSS_GIB * 1024}
                results.append(row)
                print(f"planned {n:,} keys (done {frac:.0%}, transient {transient:.0%}): {res['seconds']} s, peak RSS "
                      f"{res['peak_rss_mib']} MiB, todo {res['n_todo']:,} in {res['n_shards']} shards, replaced "
                      f"{res['n_replaced']:,}, check {'ok' if ok else 'FAILED'}", flush=True)
                if commit:
                    print(f"  commit with the replacement: {commit['seconds']} s, peak RSS "
                          f"{commit['peak_rss_mib']} MiB, files {commit['files_before']} -> {commit['files_after']}",
                          flush=True)
                shutil.rmtree(lake, ignore_errors=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    print()
    print(f"{'keys':>12} {'done':>5} {'transient':>9} {'seconds':>9} {'keys/s':>10} {'peak RSS MiB':>13} "
          f"{'todo':>12} {'replaced':>10} {'commit s':>9} {'commit MiB':>11} {'goal':>5}")
    for r in results:
        c = r.get("commit") or {}
        print(f"{r['n_keys']:>12,} {r['done_fraction']:>5.0%} {r['transient_fraction']:>9.0%} {r['seconds']:>9.1f} "
              f"{r['keys_per_s']:>10,} {r['peak_rss_mib']:>13.0f} {r['n_todo']:>12,} {r['n_replaced']:>10,} "
              f"{c.get('seconds', ''):>9} {c.get('peak_rss_mib', ''):>11} {'yes' if r['meets_goal'] else 'NO':>5}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"bench": "plan_run", "goal": {"seconds": GOAL_SECONDS, "peak_rss_gib": GOAL_RSS_GIB},
           "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
           "results": results}
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if all(r["checked"] for r in results) else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--generate":
        print(json.dumps(generate(Path(sys.argv[2]), int(sys.argv[3]))))
    elif len(sys.argv) > 1 and sys.argv[1] == "--seed":
        print(json.dumps(seed_lake(Path(sys.argv[2]), Path(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]))))
    elif len(sys.argv) > 1 and sys.argv[1] == "--stage":
        print(json.dumps(stage_retries(Path(sys.argv[2]))))
    elif len(sys.argv) > 1 and sys.argv[1] == "--commit":
        print(json.dumps(commit_retries(Path(sys.argv[2]))))
    elif len(sys.argv) > 1 and sys.argv[1] == "--plan":
        print(json.dumps(plan(Path(sys.argv[2]), Path(sys.argv[3]))))
    else:
        sys.exit(main())
