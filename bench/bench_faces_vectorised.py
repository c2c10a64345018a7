"""Loops against their vectorised replacements: MTCNN's NMS, face alignment, JPEG decode.

    .venv/bin/python bench/bench_faces_vectorised.py [--repeats 3] [--out bench/results/faces_vectorised.json]
    python bench/bench_faces_vectorised.py --device cuda        # on a GPU machine (the torch paths move there)

* NMS: every NMS call of one real MTCNN run (P-Net levels, P-Net per image, R-Net, O-Net) on the face
  photos, recorded, then replayed through the per-image ``nms`` loop and the per-box greedy loop they
  replaced (copied here as they were) and through ``_nms_per_image`` / ``_nms_min`` as they are now.
* Alignment: the faces MTCNN found on those photos, as chips: ``align_batch`` (cv2, one warp per face,
  one call per photo) against ``align_batch_torch`` (all faces of all photos in one call).
* Decode: the real JPEGs to working images, ``decode_photo`` per photo (Pillow, pixel mode) against
  header mode per photo plus one ``decode_on_device`` call for the batch.

Each figure is the best of ``--repeats`` runs (the machine is shared: the best run is the least disturbed).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.ops import nms

from photolens.models import face_align as fa
from photolens.models import mtcnn as mtcnn_mod
from photolens.models.mtcnn import MTCNN
from photolens.models.store import PACKAGED, package_folder
from photolens.udfs.decode import DecodeConfig, decode_photo
from photolens.udfs.gpudecode import decode_on_device

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
FACES = DATA / "faces" / "deepface"
PHOTOS = DATA / "photos"
FACE_PHOTOS = ["couple.jpg", "selfie-many-people.jpg", "img1.jpg", "img5.jpg", "img11.jpg", "img17.jpg",
               "img21.jpg", "img30.jpg", "img33.jpg", "img43.jpg"]  # fmt: skip


def loop_nms_per_image(boxes: torch.Tensor, scores: torch.Tensor, owners: torch.Tensor, iou: float) -> torch.Tensor:
    """The per-image loop ``_nms_per_image`` replaced."""
    keep: list[torch.Tensor] = []
    for owner in torch.unique(owners).tolist():
        idx = (owners == owner).nonzero(as_tuple=True)[0]
        keep.append(idx[nms(boxes[idx], scores[idx], iou)])
    if not keep:
        return torch.zeros((0,), dtype=torch.int64, device=boxes.device)
    return torch.cat(keep)


def loop_nms_min(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, overlap: float) -> torch.Tensor:
    """The per-box greedy loop ``_nms_min`` replaced."""
    if boxes.shape[0] == 0:
        return torch.zeros((0,), dtype=torch.int64, device=boxes.device)
    b = boxes.detach().cpu().to(torch.float64)
    order = torch.sort(scores.detach().cpu(), descending=True, stable=True).indices
    area = (b[:, 2] - b[:, 0]).clamp_min(0) * (b[:, 3] - b[:, 1]).clamp_min(0)
    lt = torch.maximum(b[:, None, :2], b[None, :, :2])
    rb = torch.minimum(b[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp_min(0).prod(dim=2)
    smaller = torch.minimum(area[:, None], area[None, :]).clamp_min(1e-9)
    same_group = groups.detach().cpu()[:, None] == groups.detach().cpu()[None, :]
    suppress = (inter / smaller > overlap) & same_group
    alive = torch.ones(b.shape[0], dtype=torch.bool)
    keep: list[int] = []
    for i in order.tolist():
        if alive[i]:
            keep.append(i)
            alive &= ~suppress[i]
    return torch.tensor(keep, dtype=torch.int64, device=boxes.device)


def best_of(repeats: int, fn: Callable[[], Any], device: str) -> float:
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def load(path: Path, side: int) -> np.ndarray:
    with Image.open(path) as im:
        im = im.convert("RGB")
        im.thumbnail((side, side), Image.Resampling.BILINEAR)
        return np.asarray(im).copy()


def mtcnn_paths() -> list[Path]:
    entry = next(p for p in PACKAGED if p.name == "mtcnn")
    folder = package_folder(entry.package)
    return [next(folder / f for f in entry.files if f.endswith(f"{net}.pt")) for net in ("pnet", "rnet", "onet")]


def record_nms_calls(detector: MTCNN, images: list[np.ndarray]) -> tuple[list[tuple[str, tuple[Any, ...]]], list]:
    calls: list[tuple[str, tuple[Any, ...]]] = []
    per_image, per_min = mtcnn_mod._nms_per_image, mtcnn_mod._nms_min

    def rec_image(*args: Any) -> torch.Tensor:
        calls.append(("iou", args))
        return per_image(*args)

    def rec_min(*args: Any) -> torch.Tensor:
        calls.append(("min", args))
        return per_min(*args)

    mtcnn_mod._nms_per_image, mtcnn_mod._nms_min = rec_image, rec_min  # type: ignore[assignment]
    try:
        found = detector.detect(images)
    finally:
        mtcnn_mod._nms_per_image, mtcnn_mod._nms_min = per_image, per_min  # type: ignore[assignment]
    return calls, found


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--side", type=int, default=1024, help="long side of the face photos (the working size)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "faces_vectorised.json"))
    args = ap.parse_args(argv)
    dev = args.device
    rows: list[dict[str, Any]] = []

    def row(part: str, what: str, old_s: float, new_s: float, n: int, unit: str) -> None:
        rows.append({"part": part, "what": what, "old_s": old_s, "new_s": new_s, "items": n, "unit": unit,
                     "speedup": old_s / new_s if new_s > 0 else None})  # fmt: skip
        print(f"{part:<8}{what:<44}{n:>7} {unit:<7}{old_s * 1e3:>11.1f}{new_s * 1e3:>11.1f}{old_s / new_s:>9.2f}x",
              flush=True)  # fmt: skip

    images = [load(FACES / name, args.side) for name in FACE_PHOTOS]
    detector = MTCNN.from_files(*mtcnn_paths(), device=dev)
    print(f"{len(images)} face photos, long side {args.side}, device {dev}, load {os.getloadavg()[0]:.1f}")
    print(f"\n{'part':<8}{'what':<44}{'items':>7} {'':<7}{'old ms':>11}{'new ms':>11}{'speedup':>10}")

    calls, dets = record_nms_calls(detector, images)
    for kind, old_fn, new_fn in (
        ("iou", loop_nms_per_image, mtcnn_mod._nms_per_image),
        ("min", loop_nms_min, mtcnn_mod._nms_min),
    ):
        subset = [c for k, c in calls if k == kind]
        boxes = sum(int(c[0].shape[0]) for c in subset)
        old_s = best_of(args.repeats, lambda f=old_fn, s=subset: [f(*c) for c in s], dev)
        new_s = best_of(args.repeats, lambda f=new_fn, s=subset: [f(*c) for c in s], dev)
        label = "IoU NMS (P-Net levels, P-Net, R-Net)" if kind == "iou" else "min-overlap NMS (O-Net)"
        row("nms", f"{label}, {len(subset)} calls", old_s, new_s, boxes, "boxes")

    points = torch.from_numpy(np.concatenate([d.points for d in dets]))
    index = torch.tensor([i for i, d in enumerate(dets) for _ in range(len(d))])
    tensors = [torch.from_numpy(im).to(dev) for im in images]
    for template in ("dlib150", "arcface112"):
        old_s = best_of(args.repeats, lambda t=template: [fa.align_batch(im, d.points, t) for im, d in zip(images, dets, strict=True)], dev)  # noqa: E501
        new_s = best_of(args.repeats, lambda t=template: fa.align_batch_torch(tensors, points.to(dev), index.to(dev), t), dev)  # noqa: E501
        row("align", f"{template}: cv2 per face vs torch batch", old_s, new_s, len(index), "faces")

    jpegs = sorted(p for folder in (PHOTOS, FACES) for p in folder.iterdir() if p.suffix.lower() == ".jpg")
    payloads = [p.read_bytes() for p in jpegs]
    pixel_cfg, header_cfg = DecodeConfig(), DecodeConfig(pixels=False)
    headers = [decode_photo(b, header_cfg) for b in payloads]
    deferred = [(b, h) for b, h in zip(payloads, headers, strict=True) if h.pixels_deferred]
    metas = [{"orientation": h.orientation, "width": h.width, "height": h.height} for _, h in deferred]
    data = [b for b, _ in deferred]
    old_s = best_of(args.repeats, lambda: [decode_photo(b, pixel_cfg) for b in data], dev)
    head_s = best_of(args.repeats, lambda: [decode_photo(b, header_cfg) for b in data], dev)
    dev_s = best_of(args.repeats, lambda: decode_on_device(data, metas, dev, pixel_cfg.working_size), dev)
    row("decode", "Pillow per photo vs header + device batch", old_s, head_s + dev_s, len(data), "photos")
    row("decode", "  of which header mode alone (CPU)", old_s, head_s, len(data), "photos")

    result = {
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "device": dev,
        "device_name": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_at_end": os.getloadavg()[0],
        "face_photos": FACE_PHOTOS,
        "side": args.side,
        "repeats": args.repeats,
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
