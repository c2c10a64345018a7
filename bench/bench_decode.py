"""Decode throughput, side by side, on the real test photos replicated to ~200 files.

    .venv/bin/python bench/bench_decode.py [--files 200] [--cores N] [--out bench/results/decode.json]

Three ways over the same files, in one run:
  (a) plain PIL loop: open, exif_transpose, convert RGB, thumbnail to the working size;
  (b) ``decode_photo`` in a plain loop (bytes read from disk in the loop);
  (c) Ray Data: read_binary_files → DecodeUDF on an actor pool of N actors (N = all cores).

Ratio = pipeline rate / (plain-loop rate x cores used); goal >= 0.6. It is given against both loops,
and for the pipeline both end to end (actor start-up included: what a short job pays) and steady
state (while every actor was decoding, from batch timestamps taken inside the actors: what a long
job approaches). The three modes run back to back in each round so they see the same machine load;
on a shared machine the actors also wait for CPUs others hold, so the CPU seconds per photo (loop vs
inside the actors) are reported too: that ratio is the pipeline's own overhead, load aside.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import PIL
from PIL import Image, ImageOps

from photolens.udfs.decode import DecodeConfig, DecodeUDF, decode_photo

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
SOURCES = (DATA / "photos", DATA / "faces" / "deepface")
SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}


class TimedDecodeUDF(DecodeUDF):
    """DecodeUDF that stamps each batch's wall-clock start and end (defined in __main__, so Ray
    ships it to the actors by value)."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        started = time.time()
        cpu_started = time.process_time()
        out = super().__call__(batch)
        n = len(out["status"])
        # CPU seconds of this actor process (all threads) per row: separates the pipeline's own
        # cost from waiting for a CPU that other processes hold.
        out["cpu_s"] = np.full(n, (time.process_time() - cpu_started) / max(n, 1), dtype=np.float64)
        out["t_start"] = np.full(n, started, dtype=np.float64)
        out["t_end"] = np.full(n, time.time(), dtype=np.float64)
        out["actor_pid"] = np.full(n, os.getpid(), dtype=np.int64)
        return out


def replicate(target: int, dest: Path) -> list[Path]:
    sources = sorted(p for folder in SOURCES for p in folder.iterdir() if p.suffix.lower() in SUFFIXES)
    if not sources:
        raise SystemExit(f"no photos under {DATA}")
    paths = []
    for i in range(target):
        src = sources[i % len(sources)]
        path = dest / f"{i:04d}_{src.name}"
        shutil.copyfile(src, path)
        paths.append(path)
    return paths


def plain_pil(paths: list[Path], working_size: int) -> Counter[str]:
    outcome: Counter[str] = Counter()
    for path in paths:
        with Image.open(path) as img:
            oriented = ImageOps.exif_transpose(img)
            rgb = oriented.convert("RGB")
            rgb.thumbnail((working_size, working_size))
            np.asarray(rgb)
        outcome["ok"] += 1
    return outcome


def plain_decode(paths: list[Path], cfg: DecodeConfig) -> Counter[str]:
    outcome: Counter[str] = Counter()
    for path in paths:
        outcome[str(decode_photo(path.read_bytes(), cfg).status)] += 1
    return outcome


def timed(fn: Callable[[], Counter[str]]) -> tuple[float, float, Counter[str]]:
    """Wall seconds, CPU seconds of this process, outcome."""
    started, cpu_started = time.perf_counter(), time.process_time()
    outcome = fn()
    return time.perf_counter() - started, time.process_time() - cpu_started, outcome


def ray_pipeline(paths: list[Path], cfg: DecodeConfig, cores: int, batch_size: int) -> dict[str, object]:
    import ray  # imported late: the plain loops must not pay for it

    def to_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # read_binary_files names the column "bytes"; the decode stage reads "data".
        return {"photo_id": batch["path"], "data": batch["bytes"]}

    started = time.perf_counter()
    ds = (
        ray.data.read_binary_files(
            [str(p) for p in paths],
            include_paths=True,
            override_num_blocks=cores * 4,
            # The decode actors hold every logical CPU; reads asking for one would never be scheduled
            # (the pipeline stalls). Reading bytes is I/O, so it runs beside them.
            ray_remote_args={"num_cpus": 0},
        )
        .map_batches(to_rows, batch_size=None)
        .map_batches(
            TimedDecodeUDF,
            fn_constructor_kwargs={"config": cfg},
            compute=ray.data.ActorPoolStrategy(size=cores),
            batch_size=batch_size,
            num_cpus=1,
        )
    )
    # The driver is the consumer: it receives every decoded image (no extra projection stage, which
    # would need CPUs the actors hold) and keeps only the bookkeeping columns.
    keep = ("status", "t_start", "t_end", "actor_pid", "decode_seconds", "cpu_s")
    rows: list[dict[str, object]] = []
    pixels = 0
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        pixels += sum(int(np.asarray(image).size) for image in batch["image"])
        rows.extend({key: batch[key][i] for key in keep} for i in range(len(batch["status"])))
    wall = time.perf_counter() - started
    steady_rate, steady_s = steady_state(rows)
    return {
        "rows": len(rows),
        "image_bytes_received": pixels,
        "wall_s": wall,
        "actors_seen": len({r["actor_pid"] for r in rows}),
        "steady_window_s": steady_s,
        "steady_photos_per_s": steady_rate,
        "decode_wall_s_in_actors": float(sum(r["decode_seconds"] for r in rows)),  # type: ignore[misc]
        "cpu_s_in_actors": float(sum(r["cpu_s"] for r in rows)),  # type: ignore[misc]
        "status": dict(Counter(str(r["status"]) for r in rows)),
    }


def steady_state(rows: list[dict[str, object]]) -> tuple[float, float]:
    """Rate while every actor was running: from the last actor's first batch to the first actor's
    last batch (start-up and the tail excluded), batches cut at the window prorated."""
    batches: dict[tuple[int, float, float], int] = Counter(
        (int(r["actor_pid"]), float(r["t_start"]), float(r["t_end"]))
        for r in rows  # type: ignore[arg-type]
    )
    per_actor: dict[int, list[tuple[float, float]]] = {}
    for pid, start, end in batches:
        per_actor.setdefault(pid, []).append((start, end))
    window_start = max(min(s for s, _ in spans) for spans in per_actor.values())
    window_end = min(max(e for _, e in spans) for spans in per_actor.values())
    if window_end <= window_start:
        # One actor did everything (or they never overlapped): fall back to first start → last end.
        window_start = min(s for _, s, _ in batches)
        window_end = max(e for _, _, e in batches)
    done = 0.0
    for (_, start, end), n in batches.items():
        overlap = min(end, window_end) - max(start, window_start)
        if overlap > 0:
            done += n * overlap / max(end - start, 1e-9)
    seconds = window_end - window_start
    return done / seconds, seconds


def one_round(paths: list[Path], cfg: DecodeConfig, cores: int, batch_size: int) -> dict[str, object]:
    """(a), (b) and (c) back to back, so that their ratio sees the same machine load."""
    n = len(paths)
    pil_s, pil_cpu, pil_status = timed(lambda: plain_pil(paths, cfg.working_size))
    dec_s, dec_cpu, dec_status = timed(lambda: plain_decode(paths, cfg))
    pipe = ray_pipeline(paths, cfg, cores, batch_size)
    rate_pil, rate_dec = n / pil_s, n / dec_s
    rate_pipe = n / float(pipe["wall_s"])  # type: ignore[arg-type]
    rate_steady = float(pipe["steady_photos_per_s"])  # type: ignore[arg-type]
    return {
        "plain_pil": {"seconds": pil_s, "cpu_s": pil_cpu, "photos_per_s": rate_pil, "status": dict(pil_status)},
        "plain_decode_photo": {
            "seconds": dec_s,
            "cpu_s": dec_cpu,
            "photos_per_s": rate_dec,
            "status": dict(dec_status),
        },
        "ray_pipeline": {**pipe, "photos_per_s": rate_pipe},
        "ratios": {
            "pipeline_vs_decode_loop": rate_pipe / (rate_dec * cores),
            "pipeline_steady_vs_decode_loop": rate_steady / (rate_dec * cores),
            "pipeline_vs_pil_loop": rate_pipe / (rate_pil * cores),
            "pipeline_steady_vs_pil_loop": rate_steady / (rate_pil * cores),
            # Same work per photo, CPU seconds only: decode_photo in the loop vs inside the actors.
            "actor_cpu_efficiency": dec_cpu / float(pipe["cpu_s_in_actors"]),  # type: ignore[arg-type]
        },
        "load_average": os.getloadavg()[0],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=200, help="files after replication (default 200)")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="decode actors (default: all)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of (a)+(b)+(c); the median is reported")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "decode.json")
    args = parser.parse_args(argv)

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    cfg = DecodeConfig()
    cores = args.cores
    with tempfile.TemporaryDirectory(prefix="photolens-bench-decode-") as tmp:
        paths = replicate(args.files, Path(tmp))
        total_bytes = sum(p.stat().st_size for p in paths)
        plain_decode(paths[:10], cfg)  # warm the page cache and imports
        ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
        try:
            ray.data.DataContext.get_current().enable_progress_bars = False
            ray_pipeline(paths[: cores * args.batch_size], cfg, cores, args.batch_size)  # warm-up
            rounds = [one_round(paths, cfg, cores, args.batch_size) for _ in range(args.rounds)]
        finally:
            ray.shutdown()

    # The round whose steady-state ratio against decode_photo is the median stands for the run.
    key = "pipeline_steady_vs_decode_loop"
    median = sorted(rounds, key=lambda r: r["ratios"][key])[len(rounds) // 2]  # type: ignore[index]
    result = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "cores_used": cores,
            "python": platform.python_version(),
            "pillow": PIL.__version__,
            "ray": ray.__version__,
            "platform": platform.platform(),
        },
        "files": len(paths),
        "bytes": total_bytes,
        "config": {k: sorted(v) if isinstance(v, frozenset) else v for k, v in asdict(cfg).items()},
        "batch_size": args.batch_size,
        "goal": 0.6,
        "median_round": median,
        "rounds": rounds,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    table = io.StringIO()
    table.write(f"decode benchmark: {len(paths)} files, {total_bytes / 1e6:.1f} MB, {cores} cores, ")
    table.write(f"{len(rounds)} rounds (median round shown; load average {median['load_average']:.1f})\n")
    table.write(f"{'mode':34s} {'seconds':>8s} {'photos/s':>9s}\n")
    pil, dec, pipe = median["plain_pil"], median["plain_decode_photo"], median["ray_pipeline"]
    table.write(f"{'(a) plain PIL loop':34s} {pil['seconds']:8.2f} {pil['photos_per_s']:9.1f}\n")  # type: ignore[index]
    table.write(f"{'(b) decode_photo loop':34s} {dec['seconds']:8.2f} {dec['photos_per_s']:9.1f}\n")  # type: ignore[index]
    table.write(f"{'(c) Ray pipeline, end to end':34s} {pipe['wall_s']:8.2f} {pipe['photos_per_s']:9.1f}\n")  # type: ignore[index]
    steady = f"{pipe['steady_window_s']:8.2f} {pipe['steady_photos_per_s']:9.1f}"  # type: ignore[index]
    table.write(f"{'(c) Ray pipeline, steady state':34s} {steady}\n")
    for name in median["ratios"]:  # type: ignore[attr-defined]
        values = " ".join(f"{r['ratios'][name]:.2f}" for r in rounds)  # type: ignore[index]
        goal = "" if name == "actor_cpu_efficiency" else "; goal 0.6"
        table.write(f"ratio {name:34s} {median['ratios'][name]:.2f}   (rounds: {values}{goal})\n")  # type: ignore[index]
    table.write(f"wrote {args.out}\n")
    sys.stdout.write(table.getvalue())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
