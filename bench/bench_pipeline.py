"""The whole tagging pipeline (``run_tag`` on Ray) against a plain per-image loop over the same decode and models.

    .venv/bin/python bench/bench_pipeline.py                      # CPU, 128 photos (~4 minutes on 2 cores)
    .venv/bin/python bench/bench_pipeline.py --device cuda --photos 512
    .venv/bin/python bench/bench_pipeline.py --actor-memory       # peak memory of each actor type (see below)

Photos: ``--photos`` JPEGs generated from the real photos in ../shared/data (objects, scenes and the deepface
portraits, so every model has work), half at phone size (12 MP, 4000x3000, upscaled with Pillow's bicubic, JPEG
quality 90) and half at 0.5 MP (816x612), spread over a few users.

Pipeline: the real ``photolens tag`` job (``run_tag``: plan, fetch, decode, detect, scene, landmark, faces,
embed, emotion, staged Parquet writes and the Delta commits) from a local folder into a temporary local lake,
on a local Ray started before the clock starts. On CPU it runs once per ``--model-pools`` layout (default fused:
one actor pool for all models; separate: one pool per model UDF) and ``--max-actors`` value (default 1 and 2
fused actors; the job gives each fused CPU actor ``node CPUs // max actors`` torch threads). Written files hold
one model batch each, so the driver sees each batch when it is written; ``--block-mib`` (default 4) makes Ray
Data cut a shard into blocks the stages can overlap on.

Plain loop: no Ray, one process: ``decode_photo`` and then each model stage's UDF on a one-photo batch, photo
after photo (the same model code and outputs as the pipeline, one image per forward pass).

Two comparisons, both kept in the JSON and the table:

* end to end: photos / seconds including actor start-up and model loading on both sides (the pipeline's
  ``RunReport.seconds``; the loop's ``load_seconds + loop_seconds``);
* steady state (the headline ratio, ``ratio_steady``): the pipeline's photos after its first written batch over
  the seconds from that batch to the last, against the loop's photos over ``loop_seconds`` (model loading
  excluded). Null when every batch reached the driver at once.

Per stage: photos per second of stage time (the pipeline's are per worker, from the run report). GPU
utilisation: mean of ``torch.cuda.utilization()`` (or nvidia-smi) sampled every 0.2 s while each phase runs;
null on CPU. ``--actor-memory`` runs the pipeline with a near-zero memory request per pool, so Ray Data's issue
detector reports each operator's peak USS; those numbers are the ``ACTOR_MEMORY_MIB`` constants in
``photolens.jobs.tag``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
SOURCES = [DATA / "photos" / n for n in ("dog.jpg", "kite.jpg", "horses.jpg", "giraffe.jpg", "person.jpg",
                                          "messi5.jpg", "building.jpg", "home.jpg", "leuvenB.jpg", "aero3.jpg")]
SOURCES += [DATA / "faces" / "deepface" / n for n in ("couple.jpg", "img1.jpg", "img5.jpg", "img17.jpg",
                                                       "selfie-many-people.jpg")]
GALLERY = {"leuven": ["leuvenA.jpg"], "graf": ["graf1.png", "graf3.png"], "aero": ["aero1.jpg"]}
PHONE = (4000, 3000)
SMALL = (816, 612)
STAGES = ("decode", "detect", "scene", "landmark", "faces")
MODEL_UDF_STAGES = ("detect", "scene", "landmark", "faces", "embed", "emotion")


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def make_photos(folder: Path, n: int, n_users: int = 4) -> list[Path]:
    """``n`` JPEGs from the real photos: even indices at 12 MP, odd at 0.5 MP (sources cycled)."""
    missing = [str(p) for p in SOURCES if not p.is_file()]
    if missing:
        raise SystemExit(f"real photos missing: {missing} (the benchmark needs ../shared/data)")
    out = []
    for i in range(n):
        src = SOURCES[(i // 2) % len(SOURCES)]
        size = PHONE if i % 2 == 0 else SMALL
        with Image.open(src) as im:
            img = im.convert("RGB")
        if img.width < img.height:
            size = (size[1], size[0])
        user = folder / "users" / f"u{i % n_users}"
        user.mkdir(parents=True, exist_ok=True)
        path = user / f"{i:04d}-{src.stem}-{size[0]}x{size[1]}.jpg"
        img.resize(size, Image.Resampling.BICUBIC).save(path, quality=90)
        out.append(path)
    return out


class GpuSampler:
    """Mean GPU utilisation (percent) while the block runs; None without CUDA."""

    def __init__(self, device: str) -> None:
        self.enabled = device.startswith("cuda")
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> float | None:
        import torch

        try:
            return float(torch.cuda.utilization())
        except Exception:  # noqa: BLE001 - no pynvml: ask nvidia-smi
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=5, check=False)
                return float(out.stdout.split()[0])
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                return None

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            value = self._read()
            if value is not None:
                self.samples.append(value)

    def __enter__(self) -> GpuSampler:
        if self.enabled:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    @property
    def mean(self) -> float | None:
        return round(float(np.mean(self.samples)), 1) if self.samples else None


def prepare_store(work: Path) -> str:
    from photolens.jobs.landmarks import build_landmark_references
    from photolens.models.store import ModelStore

    store = ModelStore(str(work / "models"))
    store.install()
    for lid, files in GALLERY.items():
        (work / "gallery" / lid).mkdir(parents=True)
        for f in files:
            shutil.copy(DATA / "photos" / f, work / "gallery" / lid / f)
    # At the store's default place, so the job's landmark stage finds them (without, it skips the stage).
    build_landmark_references(work / "gallery", None, store.uri)
    return store.uri


def plain_loop(paths: list[Path], store_uri: str, device: str, bf16: bool) -> dict[str, Any]:
    """decode_photo + each model stage's UDF on one photo at a time, in this process."""
    import torch

    from photolens.jobs.tag import TagConfig, recognize_options
    from photolens.udfs.decode import DecodeConfig, decode_photo
    from photolens.udfs.recognize import stage_udfs

    started = time.perf_counter()
    options = recognize_options(TagConfig(photos="/", lake="/", bf16=bf16))
    udfs = [cls(cfg) for cls, cfg in stage_udfs(list(STAGES[1:]), store_uri, device, None, options)]
    load_s = time.perf_counter() - started
    decode_cfg = DecodeConfig(working_size=1024)
    seconds = dict.fromkeys(("decode", *MODEL_UDF_STAGES), 0.0)
    rows = dict.fromkeys(seconds, 0)
    loop_started = time.perf_counter()
    for i, path in enumerate(paths):
        t = time.perf_counter()
        result = decode_photo(path.read_bytes(), decode_cfg)
        seconds["decode"] += time.perf_counter() - t
        rows["decode"] += 1
        if not result.ok:
            continue
        image = np.empty(1, dtype=object)
        image[0] = result.image
        batch: dict[str, np.ndarray] = {"photo_id": np.array([f"p{i}"], dtype=object),
                                        "status": np.array(["ok"], dtype=object), "image": image}
        for udf in udfs:
            t = time.perf_counter()
            batch = udf(batch)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds[udf.stage.value] += time.perf_counter() - t
            rows[udf.stage.value] += 1
    loop_s = time.perf_counter() - loop_started
    return {"seconds": load_s + loop_s, "load_seconds": load_s, "loop_seconds": loop_s,
            "stages": {s: {"rows": rows[s], "seconds": seconds[s],
                           "photos_per_s": rows[s] / seconds[s] if seconds[s] else None} for s in seconds}}


class WriteClock:
    """Stands in for the job's progress display: when each written batch's rows reach the driver."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.marks: list[tuple[float, int]] = []

    def update(self, n: int) -> None:
        self.marks.append((time.perf_counter() - self.started, n))

    def close(self) -> None:
        pass

    def steady(self) -> dict[str, Any]:
        """Photos per second after the first written batch: start-up, model loading and filling the
        pipeline are behind it."""
        t0 = self.marks[0][0] if self.marks else None
        if len(self.marks) < 2 or self.marks[-1][0] - self.marks[0][0] < 1.0:
            # Every batch reached the driver at once: the stages ran one after the other on one block,
            # so there is no steady state to measure.
            return {"first_write_s": t0, "photos": None, "seconds": None, "photos_per_s": None}
        t0, rows = self.marks[0][0], sum(n for _, n in self.marks[1:])
        return {"first_write_s": t0, "photos": rows, "seconds": self.marks[-1][0] - t0,
                "photos_per_s": rows / (self.marks[-1][0] - t0)}


def pipeline(photos: Path, lake: Path, store_uri: str, device: str, args: argparse.Namespace,
             model_pools: str, max_actors: int) -> dict[str, Any]:
    from photolens.jobs import tag
    from photolens.jobs.tag import TagConfig, run_tag

    on_gpu = device.startswith("cuda")
    # One file per model batch: the writer hands a batch back as soon as it is written, so the driver sees
    # when the first photos are through (file-sized write batches would return once, at the end).
    rows_per_file = args.model_batch_size or tag.resolve_model_batch_size(
        TagConfig(photos="/", lake="/", num_gpus=args.num_gpus if on_gpu else 0.0, batch_size=args.batch_size))
    cfg = TagConfig(photos=str(photos), lake=str(lake), model_store=store_uri, stages=STAGES,
                    num_gpus=args.num_gpus if on_gpu else 0.0, device=device, model_pools=model_pools,
                    batch_size=args.batch_size, model_batch_size=args.model_batch_size, bf16=args.bf16,
                    gpu_decode=args.gpu_decode, max_actors=max_actors, cpu_actors=args.cpu_actors,
                    rows_per_file=rows_per_file, progress=True, run_id=f"bench-{model_pools}-{max_actors}")
    clock = WriteClock()
    progress = tag._progress
    tag._progress = lambda *a, **k: clock  # type: ignore[assignment]
    try:
        report = run_tag(cfg)
    finally:
        tag._progress = progress
    if report.status != "committed" or report.n_todo != args.photos:
        raise SystemExit(f"pipeline run {report.status} with {report.n_todo} photos: {report.render()}")
    return {"seconds": report.seconds, "photos_per_s": report.photos_per_s, "status_counts": report.status_counts,
            "n_detections": report.n_detections, "n_faces": report.n_faces, "model_pools": model_pools,
            "max_actors": max_actors, "name": f"{model_pools}, {max_actors} model actor(s)",
            "rows_per_file": rows_per_file, "steady": clock.steady(),
            "stages": {s["stage"]: {"rows": s["rows"], "seconds": s["seconds"], "photos_per_s": s["rows_per_s"]}
                       for s in report.stages}}


@contextlib.contextmanager
def phase_load() -> Iterator[list[float]]:
    """The 1-minute load average at the start and the end of the block (the machine may be shared)."""
    load = [os.getloadavg()[0]]
    try:
        yield load
    finally:
        load.append(os.getloadavg()[0])
        load[:] = [round(float(np.mean(load)), 1), *load]


@contextlib.contextmanager
def issue_log() -> Iterator[list[str]]:
    """Messages Ray Data's issue detector logs while the block runs."""
    messages: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    logger = logging.getLogger("ray.data._internal.issue_detection.issue_detector_manager")
    handler = Keep(logging.WARNING)
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


def actor_memory(photos: Path, work: Path, store_uri: str, args: argparse.Namespace) -> dict[str, Any]:
    """Peak USS per operator, from the issue detector's final report on runs that request ~no memory."""
    from photolens.jobs import tag

    tag.ACTOR_MEMORY_MIB.update(dict.fromkeys(tag.ACTOR_MEMORY_MIB, 1e-6))
    tag._MEMORY_HEADROOM = 1.0
    tag.MODEL_MIB_PER_PHOTO = tag.CPU_MIB_PER_PHOTO = tag.WRITE_MIB_PER_ROW = tag.CUDA_CONTEXT_MIB = 0.0
    found: dict[str, float] = {}
    for pools in ("fused", "separate"):
        with issue_log() as messages:
            pipeline(photos, work / f"lake-mem-{pools}", store_uri, args.device, args, pools,
                     int(str(args.max_actors).split(",")[0]))
        for text in messages:
            flat = " ".join(text.split())
            op = re.search(r"Operator '([^']+)' used up to", flat)
            rec = re.search(r"memory=(\d+)", flat)
            if op and rec:
                name = re.sub(r"^MapBatches\((\w+)\)$", r"\1", op.group(1))
                found[name] = round(int(rec.group(1)) / 1.25 / 2**20, 1)  # the detector recommends 1.25x the peak
    return found


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda for the GPU path (fused pool, --num-gpus each)")
    ap.add_argument("--photos", type=int, default=None, help="photos to generate (default 128 on CPU, 256 on cuda)")
    ap.add_argument("--model-pools", default=None,
                    help="comma-separated layouts to run on CPU: fused,separate (default fused; GPU is always fused)")
    ap.add_argument("--num-gpus", type=float, default=1.0, help="GPUs per model actor on cuda")
    ap.add_argument("--batch-size", type=int, default=16, help="fetch/decode batch")
    ap.add_argument("--model-batch-size", type=int, default=None, help="model batch (default: the job's)")
    ap.add_argument("--max-actors", default=None,
                    help="comma-separated model pool sizes, one pipeline run each (default 1,2 on CPU, 2 on cuda)")
    ap.add_argument("--cpu-actors", type=int, default=None, help="fetch/decode pool bound (default: CPUs)")
    ap.add_argument("--block-mib", type=float, default=4.0,
                    help="Ray Data's target_max_block_size (MiB): at the 128 MiB default one shard of photos "
                         "stays one block, and the stages run one after the other on it (0: Ray's default)")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--gpu-decode", action="store_true", help="decode JPEGs on the model device (cuda only)")
    ap.add_argument("--actor-memory", action="store_true", help="measure each actor type's peak memory instead")
    ap.add_argument("--loop-repeats", type=int, default=2,
                    help="plain-loop runs, before and after the pipeline; the ratio uses the fastest (default 2)")
    ap.add_argument("--keep", action="store_true", help="keep the generated photos and lakes")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "bench_pipeline.json"))
    args = ap.parse_args(argv)
    on_gpu = args.device.startswith("cuda")
    args.photos = args.photos or (256 if on_gpu else 128)
    args.cpu_actors = args.cpu_actors or max(os.cpu_count() or 1, 1)
    args.max_actors = args.max_actors or ("2" if on_gpu else "1,2")
    actor_counts = [int(v) for v in str(args.max_actors).split(",")]
    layouts = [(pools, k) for pools in (["fused"] if on_gpu else (args.model_pools or "fused").split(","))
               for k in actor_counts]
    if args.gpu_decode and not on_gpu:
        raise SystemExit("--gpu-decode is for --device cuda")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    work = Path(tempfile.mkdtemp(prefix="photolens-bench-pipeline-"))
    try:
        t = time.perf_counter()
        paths = make_photos(work / "photos", args.photos)
        store_uri = prepare_store(work)
        print(f"{args.photos} photos ({sum(p.stat().st_size for p in paths) / 2**20:.0f} MiB) and the model store "
              f"in {time.perf_counter() - t:.0f}s", file=sys.stderr)
        from photolens.jobs.tag import ensure_ray, local_gpu_count

        if args.actor_memory:
            ensure_ray(args.num_gpus if on_gpu else 0.0)
            found = actor_memory(work / "photos", work, store_uri, args)
            print(f"{'operator':<22}{'peak USS MiB':>14}")
            for name, mib in sorted(found.items()):
                print(f"{name:<22}{mib:>14.1f}")
            return 0

        loops = []
        with GpuSampler(args.device) as gpu, phase_load() as load:
            loops.append(plain_loop(paths, store_uri, args.device, args.bf16))
        loops[-1].update(gpu_util_percent=gpu.mean, load_average=load)
        # Ray starts before the pipeline's clock: a nightly run pays it once for hours of work.
        ensure_ray(args.num_gpus if on_gpu else 0.0, float(local_gpu_count()) if on_gpu else None)
        if args.block_mib:
            import ray.data

            ray.data.DataContext.get_current().target_max_block_size = int(args.block_mib * 2**20)
        runs = []
        for pools, k in layouts:
            with GpuSampler(args.device) as gpu, phase_load() as load:
                run = pipeline(work / "photos", work / f"lake-{pools}-{k}", store_uri, args.device, args, pools, k)
            run.update(gpu_util_percent=gpu.mean, load_average=load)
            runs.append(run)
        for _ in range(args.loop_repeats - 1):
            # Again after the pipeline: on a shared machine the load changes between phases, and the ratio
            # is taken against the loop's better run.
            with GpuSampler(args.device) as gpu, phase_load() as load:
                loops.append(plain_loop(paths, store_uri, args.device, args.bf16))
            loops[-1].update(gpu_util_percent=gpu.mean, load_average=load)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    n = args.photos
    for loop in loops:
        loop["photos_per_s"] = n / loop["seconds"]
        loop["steady_photos_per_s"] = n / loop["loop_seconds"]
    plain = min(loops, key=lambda r: r["seconds"])
    plain_steady = max(loops, key=lambda r: r["steady_photos_per_s"])
    for r in runs:
        r["ratio_end_to_end"] = r["photos_per_s"] / plain["photos_per_s"]
        steady = r["steady"]["photos_per_s"]
        r["ratio_steady"] = steady / plain_steady["steady_photos_per_s"] if steady else None
    best = max(runs, key=lambda r: r["steady"]["photos_per_s"] or 0.0)
    best_e2e = max(runs, key=lambda r: r["photos_per_s"])
    result = {
        "bench": "pipeline",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "device": args.device,
        "device_name": device_name(args.device),
        "cpus": os.cpu_count(),
        "load_average": list(os.getloadavg()),
        "photos": n,
        "photo_sizes": {"12MP": (n + 1) // 2, "0.5MP": n // 2},
        "settings": {k: getattr(args, k) for k in ("num_gpus", "batch_size", "model_batch_size", "max_actors",
                                                   "cpu_actors", "bf16", "gpu_decode", "block_mib")},
        "definitions": {
            "end_to_end": "photos / seconds including start-up and model loading on both sides (pipeline: the "
                          "run report's seconds, Ray itself started before; loop: load_seconds + loop_seconds)",
            "steady": "pipeline: photos after the first written batch / seconds from that batch to the last; "
                      "loop: photos / loop_seconds (model loading excluded)",
            "headline": "ratio_steady (steady state), best pipeline run over the loop's faster run",
        },
        "plain_loop": plain,
        "plain_loop_runs": [{k: v for k, v in loop.items() if k != "stages"} for loop in loops],
        "pipeline": runs,
        "best_layout": best["name"],
        "ratio_steady": best["ratio_steady"],
        "ratio_end_to_end": best_e2e["ratio_end_to_end"],
        "ratio_end_to_end_layout": best_e2e["name"],
        # Kept for readers of older results: the same end-to-end ratio under its former name.
        "ratio_pipeline_over_plain_loop": best_e2e["ratio_end_to_end"],
    }
    print(f"\n{n} photos on {result['device_name']} ({args.device}, {result['cpus']} CPUs, load "
          f"{result['load_average'][0]:.1f})")
    print(f"{'':<34}{'end to end':>22}{'steady state':>22}{'GPU %':>8}")
    print(f"{'':<34}{'photos/s (s)':>22}{'photos/s (s)':>22}")
    for k, loop in enumerate(loops):
        gpu_text = "-" if loop["gpu_util_percent"] is None else f"{loop['gpu_util_percent']:.0f}"
        e2e = f"{loop['photos_per_s']:.2f} ({loop['seconds']:.1f})"
        st = f"{loop['steady_photos_per_s']:.2f} ({loop['loop_seconds']:.1f})"
        print(f"{'plain loop' + (' (again)' if k else ''):<34}{e2e:>22}{st:>22}{gpu_text:>8}"
              f"   (model load {loop['load_seconds']:.1f}s, load average {loop['load_average'][0]:.0f})")
    for r in runs:
        gpu_text = "-" if r["gpu_util_percent"] is None else f"{r['gpu_util_percent']:.0f}"
        e2e = f"{r['photos_per_s']:.2f} ({r['seconds']:.1f})"
        sp = r["steady"]["photos_per_s"]
        st = "-" if sp is None else f"{sp:.2f} ({r['steady']['seconds']:.1f})"
        ratio = "-" if r["ratio_steady"] is None else f"{r['ratio_steady']:.2f}x"
        print(f"{'pipeline, ' + r['name']:<34}{e2e:>22}{st:>22}{gpu_text:>8}"
              f"   ({r['ratio_end_to_end']:.2f}x / {ratio} the loop; first write at "
              f"{r['steady']['first_write_s'] or 0:.1f}s, load average {r['load_average'][0]:.0f})")
    print(f"\n{'stage photos/s':<16}{'plain':>10}" + "".join(f"{r['model_pools'] + str(r['max_actors']):>12}"
                                                          for r in runs))
    for stage in ("decode", *MODEL_UDF_STAGES):
        cells = [plain["stages"].get(stage, {}).get("photos_per_s")] + [
            r["stages"].get(stage, {}).get("photos_per_s") for r in runs]
        print(f"{stage:<16}" + "".join(f"{'-' if c is None else f'{c:.2f}':>{10 if k == 0 else 12}}"
                                       for k, c in enumerate(cells)))
    steady_text = "-" if result["ratio_steady"] is None else f"{result['ratio_steady']:.2f}x"
    print(f"\npipeline / plain loop, steady state (the headline): {steady_text} ({best['name']}); "
          f"end to end incl. start-up and model load: {result['ratio_end_to_end']:.2f}x ({best_e2e['name']})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
