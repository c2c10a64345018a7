"""SSD-MobileNet-v2 COCO: cv2.dnn (the reference) vs the torch re-implementation, photos per second.

    .venv/bin/python bench/bench_ssd.py [--photos 32] [--batch-sizes 1,16] [--out bench/results/ssd.json]
    python bench/bench_ssd.py --device cuda --batch-sizes 16,64,256     # adds torch on the GPU (fp32, bf16)

Inputs are real test photos (../shared/data/photos), decoded with PIL and bounded to a long side of 1024 as
the decode stage delivers them, cycled to ``--photos``. Each detector's ``detect`` is timed end to end (host
resize, forward, decoding, NMS, post-processing) over all photos in batches of each size, after one warm-up
batch; cv2.dnn always runs on the CPU. Also reported: the largest score difference between torch and cv2.dnn
over all detections both keep (same class, same rank), as a check that the timed paths compute the same thing.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image

from photolens.models.detector import Detections, SsdMobileNetCoco, find_ssd_mobilenet_files
from photolens.models.ssd_torch import TorchSsdConfig, TorchSsdMobileNetCoco

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT.parent / "shared" / "data" / "photos"
NAMES = ["dog.jpg", "horses.jpg", "giraffe.jpg", "kite.jpg", "person.jpg", "eagle.jpg", "messi5.jpg",
         "building.jpg", "home.jpg", "fruits.jpg"]


def load(count: int) -> list[np.ndarray]:
    images = []
    for name in NAMES:
        with Image.open(PHOTOS / name) as im:
            im = im.convert("RGB")
            im.thumbnail((1024, 1024), Image.Resampling.BILINEAR)
            images.append(np.asarray(im).copy())
    return [images[i % len(images)] for i in range(count)]


def rate(detect: Callable[[Sequence[np.ndarray]], list[Detections]], images: list[np.ndarray], batch: int,
         sync: bool) -> tuple[float, list[Detections]]:
    detect(images[:batch])  # warm-up: allocations, kernel selection
    if sync:
        torch.cuda.synchronize()
    out: list[Detections] = []
    start = time.perf_counter()
    for i in range(0, len(images), batch):
        out += detect(images[i : i + batch])
    if sync:
        torch.cuda.synchronize()
    return len(images) / (time.perf_counter() - start), out


def max_score_gap(ref: list[Detections], got: list[Detections]) -> float:
    gap = 0.0
    for a, b in zip(ref, got, strict=True):
        n = min(len(a), len(b))
        same = a.category_ids[:n] == b.category_ids[:n]
        if same.any():
            gap = max(gap, float(np.abs(a.scores[:n][same] - b.scores[:n][same]).max()))
    return gap


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=int, default=32)
    ap.add_argument("--batch-sizes", default="1,16")
    ap.add_argument("--device", default="cpu", help="device for the torch runs besides the CPU ones")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads for both engines (default: each library's own); 1 is what a Ray actor "
                         "with num_cpus=1 gets, and the only fair setting on a machine shared with other work")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "ssd.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        cv2.setNumThreads(args.threads)
    images = load(args.photos)
    graph, pbtxt = find_ssd_mobilenet_files()
    runs: list[tuple[str, str, Callable[[Sequence[np.ndarray]], list[Detections]]]] = [
        ("cv2.dnn", "cpu", SsdMobileNetCoco(graph, pbtxt).detect),
        ("torch fp32", "cpu", TorchSsdMobileNetCoco(graph, pbtxt).detect),
        ("torch bf16 channels-last", "cpu",
         TorchSsdMobileNetCoco(graph, pbtxt, TorchSsdConfig(bf16=True, channels_last=True)).detect),
    ]
    if args.device != "cpu":
        runs += [
            ("torch fp32", args.device, TorchSsdMobileNetCoco(graph, pbtxt, device=args.device).detect),
            ("torch bf16 channels-last", args.device,
             TorchSsdMobileNetCoco(graph, pbtxt, TorchSsdConfig(bf16=True, channels_last=True),
                                   device=args.device).detect),
        ]
    rows: list[dict[str, Any]] = []
    reference: dict[int, list[Detections]] = {}
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        for engine, device, detect in runs:
            if engine == "cv2.dnn" and batch > 16:
                continue  # one CPU graph: larger batches only cost memory
            per_s, dets = rate(detect, images, batch, device.startswith("cuda"))
            if engine == "cv2.dnn":
                reference[batch] = dets
            ref = reference.get(batch) or next(iter(reference.values()), None)
            gap = max_score_gap(ref, dets) if ref is not None else float("nan")
            rows.append({"engine": engine, "device": device, "batch": batch, "photos_per_s": round(per_s, 2),
                         "max_score_gap_vs_cv2": round(gap, 4)})
            print(f"{engine:26s} {device:6s} batch {batch:4d}: {per_s:8.2f} photos/s   "
                  f"max |score - cv2| {gap:.4f}", flush=True)
    doc = {
        "bench": "ssd", "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                    "load_avg_1m": round(os.getloadavg()[0], 2),
                    "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
        "photos": args.photos, "torch_threads": torch.get_num_threads(), "cv2_threads": cv2.getNumThreads(),
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
