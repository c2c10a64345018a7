"""Throughput of each model stage, as its UDF runs inside the tagging job, at several batch sizes.

    .venv/bin/python bench/bench_stages.py [--batch-sizes 1,4,16] [--photos 16] [--out bench/results/stages.json]
    python bench/bench_stages.py --device cuda --dtype bf16 --channels-last --compile   # on a GPU machine

Inputs are the real test photos (../shared/data/photos and the deepface portraits, so the face stages see
faces), decoded once by the pipeline's own decode stage (working size 1024) and cycled to ``--photos``
photos. Each stage's UDF is called directly (no Ray) on batches of each size, after one warm-up batch;
the rate is photos per second of UDF time, faces per second for the embedder and the emotion model
(their inputs are the chips FacesUDF made on the portraits alone). The landmark stage is measured with
a small reference set (three landmarks) so that it embeds: without references it does nothing.

``--dtype bf16`` and ``--channels-last`` set the models' own GPU options; ``--compile`` wraps the fixed-size
torch networks (scene, landmark trunk, face embedder, emotion net) in ``torch.compile``; MTCNN and the
detectors see images of varying sizes and are left alone. SSD-MobileNet runs through OpenCV on the CPU
whatever ``--device`` says.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from photolens.models.store import ModelStore
from photolens.udfs.decode import DecodeConfig, decode_photo
from photolens.udfs.recognize import (
    DetectConfig,
    DetectUDF,
    EmbedConfig,
    EmbedUDF,
    EmotionConfig,
    EmotionUDF,
    FacesConfig,
    FacesUDF,
    LandmarkStageConfig,
    LandmarkUDF,
    SceneStageConfig,
    SceneUDF,
)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
PHOTOS = DATA / "photos"
FACES = DATA / "faces" / "deepface"
SCENE_PHOTOS = ["dog.jpg", "horses.jpg", "giraffe.jpg", "kite.jpg", "person.jpg", "eagle.jpg", "messi5.jpg",
                "building.jpg", "home.jpg", "fruits.jpg", "leuvenA.jpg", "aero1.jpg"]
FACE_PHOTOS = ["couple.jpg", "img1.jpg", "img5.jpg", "img17.jpg"]
GALLERY = {"leuven": ["leuvenA.jpg"], "graf": ["graf1.png", "graf3.png"], "aero": ["aero1.jpg"]}


def device_name(device: str) -> str:
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_photos(n: int, paths: list[Path]) -> list[np.ndarray]:
    """``n`` decoded working images, cycling through ``paths``."""
    cfg = DecodeConfig()
    images = []
    for path in paths:
        if not path.is_file():
            raise SystemExit(f"test photo missing: {path} (the benchmark needs ../shared/data)")
        result = decode_photo(path.read_bytes(), cfg)
        if not result.ok:
            raise SystemExit(f"{path}: {result.error_code}")
        images.append(result.image)
    return [images[i % len(images)] for i in range(n)]


def batch_of(images: list[np.ndarray]) -> dict[str, np.ndarray]:
    column = np.empty(len(images), dtype=object)
    column[:] = images
    n = len(images)
    return {"photo_id": np.array([f"p{i}" for i in range(n)], dtype=object),
            "status": np.array(["ok"] * n, dtype=object), "image": column}


def compile_modules(udf: Any) -> None:
    """torch.compile the fixed-input-size networks inside a UDF (GPU runs only)."""
    if isinstance(udf, SceneUDF):
        udf.model.model = torch.compile(udf.model.model)
    elif isinstance(udf, LandmarkUDF):
        udf.embedder.trunk = torch.compile(udf.embedder.trunk)
    elif isinstance(udf, EmbedUDF):
        udf.embedder.model = torch.compile(udf.embedder.model)
    elif isinstance(udf, EmotionUDF):
        udf.model.model = torch.compile(udf.model.model)


def timed(call: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]], batches: list[dict[str, np.ndarray]],
          device: str) -> tuple[float, list[dict[str, np.ndarray]]]:
    call(batches[0])  # warm-up: first-call allocations, cuDNN autotuning, compilation
    outs = []
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for b in batches:
        outs.append(call(b))
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started, outs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", default="1,4,16", type=lambda s: [int(x) for x in s.split(",") if x])
    ap.add_argument("--photos", type=int, default=16, help="photos per batch size and stage (cycled)")
    ap.add_argument("--stages", default="detect,scene,landmark,faces,embed,emotion")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "stages.json"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    stages = [s for s in args.stages.split(",") if s]

    work = Path(tempfile.mkdtemp(prefix="photolens-bench-"))
    try:
        store = ModelStore(str(work / "models"))
        store.install()
        refs = None
        if "landmark" in stages:
            from photolens.jobs.landmarks import build_landmark_references

            for lid, files in GALLERY.items():
                (work / "gallery" / lid).mkdir(parents=True)
                for f in files:
                    shutil.copy(PHOTOS / f, work / "gallery" / lid / f)
            refs = str(work / "references")
            build_landmark_references(work / "gallery", refs, store.uri)
        common: dict[str, Any] = {"model_store": store.uri, "device": args.device, "bf16": args.dtype == "bf16",
                                  "channels_last": args.channels_last}
        n = max(args.photos, *args.batch_sizes)
        images = load_photos(n, [PHOTOS / p for p in SCENE_PHOTOS] + [FACES / p for p in FACE_PHOTOS])
        # The face models are fed from portraits only, so that a run has enough faces to time.
        face_images = load_photos(n, [FACES / p for p in FACE_PHOTOS])
        print(f"device: {device_name(args.device)}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
              f"{len(images)} photos per run, load average {os.getloadavg()[0]:.1f}", flush=True)

        rows: list[dict[str, Any]] = []
        faces_udf = FacesUDF(FacesConfig(**common)) if {"faces", "embed", "emotion"} & set(stages) else None
        builders: dict[str, Callable[[], Any]] = {
            "detect": lambda: DetectUDF(DetectConfig(**common)),
            "scene": lambda: SceneUDF(SceneStageConfig(**common)),
            "landmark": lambda: LandmarkUDF(LandmarkStageConfig(**common, references=refs)),
            "faces": lambda: faces_udf,
            "embed": lambda: EmbedUDF(EmbedConfig(**common)),
            "emotion": lambda: EmotionUDF(EmotionConfig(**common)),
        }
        for stage in stages:
            udf = builders[stage]()
            if args.compile:
                compile_modules(udf)
            for bs in args.batch_sizes:
                if stage in ("embed", "emotion"):
                    assert faces_udf is not None
                    # Inputs of the face models are FacesUDF's outputs (chips, points); only the model is timed.
                    batches = [faces_udf(batch_of(face_images[i : i + bs])) for i in range(0, n, bs)]
                else:
                    batches = [batch_of(images[i : i + bs]) for i in range(0, n, bs)]
                seconds, outs = timed(udf, batches, args.device)
                n_photos = sum(len(b["status"]) for b in batches)
                n_faces = sum(len(x) for o in outs for x in o.get("face_embeddings", o.get("face_emotions", [])))
                unit, count = ("faces", n_faces) if stage in ("embed", "emotion") else ("photos", n_photos)
                errors = sum(int((o["status"] != "ok").sum()) for o in outs)
                rows.append({"stage": stage, "batch_size": bs, "unit": unit, "count": count,
                             "seconds": round(seconds, 4), "per_s": round(count / seconds, 2) if seconds else None,
                             "errors": errors})
                print(f"  {stage:<9} batch {bs:>3}: {count:>4} {unit:<6} in {seconds:7.2f} s = "
                      f"{count / seconds:8.2f} {unit}/s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    sizes = args.batch_sizes
    print(f"\n{'stage':<10}{'unit':<8}" + "".join(f"{'b=' + str(b):>10}" for b in sizes))
    for stage in stages:
        got = {r["batch_size"]: r for r in rows if r["stage"] == stage}
        unit = next(iter(got.values()))["unit"]
        print(f"{stage:<10}{unit + '/s':<8}" + "".join(f"{got[b]['per_s']:>10.2f}" for b in sizes))
    result = {
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "device": args.device,
        "device_name": device_name(args.device),
        "dtype": args.dtype,
        "channels_last": args.channels_last,
        "compile": args.compile,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_at_end": os.getloadavg()[0],
        "photos_per_run": len(images),
        "python": sys.version.split()[0],
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwritten {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
