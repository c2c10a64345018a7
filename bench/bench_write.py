"""The write stage at scale: staged files per 10^6 photos, driver memory, rows/s (Ray Data, no photos, no models).

    .venv/bin/python bench/bench_write.py [--photos 1000000] [--old-photos 20000] [--rows-per-file N]
                                          [--target-file-mib 128] [--workdir DIR] [--out bench/results/write.json]

Rows like the ones that reach the writer after the model stages (no pixels: a photo row with scene labels, two
detections, one face with its 128-d embedding and emotion probabilities; 10 % error rows) are generated inside
Ray tasks, so the driver never holds them, then written by the job's own ``WriteUDF`` with the job's write batch
(``write_batch_rows``). The driver consumes the descriptor rows as ``run_tag`` does and keeps the staged-file
descriptors; its peak RSS (``ru_maxrss``, in a fresh process) is what a night costs the driver.

``--old-photos``: the same pipeline with the write batch at the old ``--batch-size`` (16), the files per 10^6
photos measured on that many photos and scaled.
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
BLOCK = 5_000  # rows per generated block


def _peak_rss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def make_rows(batch: dict[str, Any]) -> dict[str, Any]:
    """Post-model rows for the ids in ``batch["id"]`` (seeded by id: the same rows every run)."""
    import hashlib

    import numpy as np

    ids = batch["id"]
    n = len(ids)
    rng = np.random.default_rng(int(ids[0]))
    err = (ids % 10) == 7
    status = np.where(err, "error", "ok").astype(object)
    det = json.dumps([{"category": "dog", "category_path": ["animal", "dog"], "score": 0.91,
                       "box": [10.0, 20.0, 200.0, 220.0]},
                      {"category": "bicycle", "category_path": ["vehicle", "bicycle"], "score": 0.77,
                       "box": [40.0, 60.0, 300.0, 310.0]}])
    face = json.dumps([{"box": [50.0, 40.0, 120.0, 130.0], "points": [70.0, 72.0] * 5, "det_score": 0.99,
                        "roll": 1.5, "yaw": -3.0, "pitch": 2.0, "sharpness": 120.0, "size_px": 90.0,
                        "quality": 0.8, "passed_gate": True, "gate_reason": None}])
    emb = rng.standard_normal((n, 1, 128)).astype(np.float32)
    emo = rng.dirichlet(np.ones(7), size=(n, 1)).astype(np.float32)
    users = (ids // 100).astype(str)
    out: dict[str, Any] = {
        "photo_id": np.array([hashlib.blake2b(str(i).encode(), digest_size=16).hexdigest() for i in ids],
                             dtype=object),
        "user_id": np.array([f"u{u}" for u in users], dtype=object),
        "uri": np.array([f"s3://bench-photos/users/u{u}/{i}.jpg" for u, i in zip(users, ids, strict=True)],
                        dtype=object),
        "etag": np.array([f"{int(i):032x}" for i in ids], dtype=object),
        "size_bytes": rng.integers(50_000, 8_000_000, n),
        "status": status,
        "error_code": np.where(err, "FETCH_TRANSIENT", None).astype(object),
        "error_stage": np.where(err, "fetch", None).astype(object),
        "error_detail": np.where(err, "503 SlowDown after 5 attempts", None).astype(object),
        "format": np.full(n, "JPEG", dtype=object),
        "width": np.full(n, 4032), "height": np.full(n, 3024), "orientation": np.ones(n, dtype=np.int64),
        "n_frames": np.ones(n, dtype=np.int64),
        "phash": np.array([f"{int(x):016x}" for x in rng.integers(0, 2**62, n)], dtype=object),
        "detections_json": np.full(n, det, dtype=object),
        "faces_json": np.full(n, face, dtype=object),
        "face_embeddings": np.array(list(emb), dtype=object),
        "face_emotions": np.array(list(emo), dtype=object),
        "scene_labels": np.array([["beach", "coast", "sky"]] * n, dtype=object),
        "scene_scores": np.array([[0.5, 0.3, 0.1]] * n, dtype=object),
        "scene_coarse": np.full(n, "outdoor", dtype=object),
        "scene_coarse_score": np.full(n, 0.8),
        "model_detect": np.full(n, "ssd_mobilenet_v2_coco@1", dtype=object),
        "model_embed": np.full(n, "dlib_resnet34@1", dtype=object),
        "model_emotion": np.full(n, "mini_xception@1", dtype=object),
        "fetch_seconds": np.full(n, 0.01, dtype=np.float32),
        "decode_seconds": np.full(n, 0.02, dtype=np.float32),
    }
    return out


def run(lake_root: str, n: int, write_rows: int) -> dict[str, Any]:
    """The measured step, in a fresh process: generate -> WriteUDF; the driver keeps descriptors only."""
    import ray
    import ray.data
    from ray.data import ActorPoolStrategy

    from photolens.jobs.tag import ensure_ray
    from photolens.lake.delta import Lake, StagedFile
    from photolens.schemas.emotions import EMOTIONS
    from photolens.udfs.write import WriteConfig, WriteUDF

    ensure_ray()
    rss_start = _peak_rss_mib()
    lake = Lake(lake_root)
    cfg = WriteConfig(lake.root, lake.restricted_root, "bench", "2026-12-01", None, "face_passed_gate",
                      tuple(EMOTIONS))
    ds = ray.data.range(n, override_num_blocks=max(1, n // BLOCK))
    ds = ds.map_batches(make_rows, batch_size=BLOCK, num_cpus=0.5)
    ds = ds.map_batches(WriteUDF, fn_constructor_kwargs={"config": cfg}, batch_size=write_rows,
                        compute=ActorPoolStrategy(min_size=1, max_size=2), num_cpus=0.5)
    files: dict[str, list[StagedFile]] = {"photos": [], "detections": [], "faces": []}
    t0 = time.perf_counter()
    n_rows = 0
    for row in ds.iter_rows():
        for f in json.loads(row["files"]):
            sf = StagedFile.from_dict(f)
            files[sf.table].append(sf)
        n_rows += int(row["n_rows"])
    seconds = time.perf_counter() - t0
    ray.shutdown()
    sizes = {t: [f.size for f in fs] for t, fs in files.items()}
    return {
        "photos": n, "rows_written": n_rows, "write_batch_rows": write_rows, "seconds": round(seconds, 2),
        "rows_per_s": round(n_rows / seconds) if seconds else 0,
        "files": {t: len(v) for t, v in sizes.items()},
        "files_per_million_photos": {t: round(len(v) * 1e6 / n, 1) for t, v in sizes.items()},
        "mean_file_mib": {t: round(sum(v) / len(v) / 2**20, 2) if v else 0 for t, v in sizes.items()},
        "bytes_per_photo": round(sum(sum(v) for v in sizes.values()) / n, 1),
        "driver_peak_rss_mib": round(_peak_rss_mib(), 1), "driver_rss_after_ray_init_mib": round(rss_start, 1),
        "descriptor_bytes": sum(len(json.dumps(f.to_dict())) for fs in files.values() for f in fs),
    }


def _child(*args: str) -> dict[str, Any]:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=False, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{args[0]} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    from photolens.udfs.write import write_batch_rows

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=int, default=1_000_000)
    ap.add_argument("--old-photos", type=int, default=20_000, help="photos for the old 16-row write batch (0: skip)")
    ap.add_argument("--rows-per-file", type=int)
    ap.add_argument("--target-file-mib", type=float, default=128.0)
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "write.json")
    args = ap.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="photolens-bench-write-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = write_batch_rows(args.rows_per_file, args.target_file_mib)
    results = []
    try:
        cases = [("file-sized batches", args.photos, rows)]
        if args.old_photos:
            cases.append(("old: --batch-size 16", args.old_photos, 16))
        for label, n, batch in cases:
            lake = work / f"lake-{batch}"
            shutil.rmtree(lake, ignore_errors=True)
            res = {"case": label, **_child("--run", str(lake), str(n), str(batch))}
            results.append(res)
            print(f"{label}: {n:,} photos in {res['seconds']} s, files {res['files']}, "
                  f"driver peak {res['driver_peak_rss_mib']} MiB", flush=True)
            shutil.rmtree(lake, ignore_errors=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    print()
    print(f"{'case':<22}{'photos':>10}{'batch':>8}{'files/1e6 (photos, dets, faces)':>34}{'MiB/file':>10}"
          f"{'rows/s':>9}{'driver MiB':>11}")
    for r in results:
        f = r["files_per_million_photos"]
        print(f"{r['case']:<22}{r['photos']:>10,}{r['write_batch_rows']:>8}"
              f"{f['photos']:>12.1f}{f['detections']:>11.1f}{f['faces']:>11.1f}"
              f"{r['mean_file_mib']['faces']:>10.2f}{r['rows_per_s']:>9,}{r['driver_peak_rss_mib']:>11.0f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"bench": "write_stage", "target_file_mib": args.target_file_mib, "rows_per_file": args.rows_per_file,
           "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
           "results": results}
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if all(r["rows_written"] == r["photos"] for r in results) else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--run":
        print(json.dumps(run(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))
    else:
        sys.exit(main())
