"""``photolens landmarks build``: landmark reference vectors from a labelled gallery, with a calibrated threshold.

Gallery layout: one folder per landmark, named by its id, holding photos of it::

    gallery/
      leuven_town_hall/  a.jpg b.jpg ...
      graffiti_wall/     ...
      _none/             photos of no landmark (optional; folders starting with "_" are negatives only)

Each photo goes through the pipeline's own decode (EXIF orientation, working size), then the landmark
embedder the tagging job's LandmarkUDF uses, with the same model-store weights, so the references'
model tag matches what the UDF checks.

Threshold (seed 002_c25c13e8b0f7e642.txt: below a threshold → "not a landmark"), calibrated on the
gallery itself: a positive score is a photo against the reference built from the *other* photos of its
landmark (leave one out, so it is not compared with itself); a negative score is a photo against every
other landmark's reference, and a "_" photo against every reference. The threshold maximises balanced
accuracy (:func:`photolens.models.landmark.calibrate_threshold`). With no positive (no landmark has two
photos) or no negative pair, the embedder's default threshold is kept and the report says so.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from photolens.lake.storage import Location, S3Settings, write_bytes_atomic
from photolens.models.landmark import (
    LandmarkConfig,
    LandmarkEmbedder,
    balanced_accuracy,
    calibrate_threshold,
    references_from_embeddings,
)
from photolens.models.store import ModelStore, default_store_uri
from photolens.udfs.decode import DecodeConfig, decode_photo
from photolens.udfs.recognize import DEFAULT_MODELS, default_references_uri

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
NEGATIVE_PREFIX = "_"


class GalleryError(ValueError):
    """The gallery folder cannot give references (missing, empty, no landmark with a usable photo)."""


@dataclass(frozen=True)
class GalleryPhoto:
    landmark: str  # folder name; starts with "_" for non-landmark photos
    path: Path


def scan_gallery(gallery_dir: Path) -> list[GalleryPhoto]:
    """Photos of the gallery in a stable order (folder, then file name)."""
    if not gallery_dir.is_dir():
        raise GalleryError(f"gallery folder not found: {gallery_dir}")
    photos = []
    for folder in sorted(p for p in gallery_dir.iterdir() if p.is_dir()):
        for path in sorted(folder.iterdir()):
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
                photos.append(GalleryPhoto(folder.name, path))
    return photos


def _leave_one_out(emb: np.ndarray) -> np.ndarray:
    """Per row: cosine with the renormalised mean of the other rows (needs >= 2 rows)."""
    total = emb.sum(axis=0)
    others = total[None, :] - emb
    norms = np.linalg.norm(others, axis=1, keepdims=True)
    others = np.divide(others, norms, out=np.zeros_like(others), where=norms > 0)
    return (emb * others).sum(axis=1)


def calibration_scores(embeddings: dict[str, np.ndarray], negatives: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(positive scores, negative scores) for the gallery, as described in the module docstring."""
    refs = references_from_embeddings(embeddings, threshold=0.0, model="calibration")
    pos: list[np.ndarray] = []
    neg: list[np.ndarray] = []
    for j, lid in enumerate(refs.landmark_ids):
        emb = embeddings[lid]
        if len(emb) >= 2:
            pos.append(_leave_one_out(emb))
        scores = refs.scores(emb)
        neg.append(np.delete(scores, j, axis=1).ravel())
    if len(negatives):
        neg.append(refs.scores(negatives).ravel())
    empty = np.zeros(0, np.float64)
    return (np.concatenate(pos).astype(np.float64) if pos else empty,
            np.concatenate(neg).astype(np.float64) if neg else empty)


def build_landmark_references(gallery_dir: Path, out_uri: str | None = None, store_uri: str | None = None,
                              s3: S3Settings | None = None) -> dict[str, Any]:
    """Embed the gallery, calibrate the threshold, write ``<out>.npz`` + ``<out>.json``; returns a report.

    ``out_uri`` defaults to ``<store>/landmarks/references``, where the tagging job's landmark stage looks.
    """
    store = ModelStore(store_uri or default_store_uri(), s3)
    entry = store.entry(DEFAULT_MODELS["landmark"])
    weights = store.local_path(entry.name, next(f.name for f in entry.files if f.name.endswith((".pth", ".pt"))))
    embedder = LandmarkEmbedder.from_mobilenet_v2(weights, LandmarkConfig(), version=entry.version)

    photos = scan_gallery(Path(gallery_dir))
    decode_cfg = DecodeConfig()
    images: dict[str, list[np.ndarray]] = {}
    skipped: list[dict[str, str]] = []
    for photo in photos:
        result = decode_photo(photo.path.read_bytes(), decode_cfg)
        if not result.ok:
            skipped.append({"path": str(photo.path), "error_code": str(result.error_code),
                            "detail": result.error_detail or ""})
            continue
        images.setdefault(photo.landmark, []).append(result.image)
    landmark_images = {k: v for k, v in images.items() if not k.startswith(NEGATIVE_PREFIX)}
    if not landmark_images:
        raise GalleryError(f"{gallery_dir}: no landmark folder with a readable photo "
                           "(expected one folder per landmark id holding its photos)")
    embeddings = {lid: embedder.embed(imgs) for lid, imgs in landmark_images.items()}
    negative_images = [img for k, v in images.items() if k.startswith(NEGATIVE_PREFIX) for img in v]
    negatives = embedder.embed(negative_images) if negative_images else np.zeros((0, embedder.dim), np.float32)

    pos, neg = calibration_scores(embeddings, negatives)
    calibrated = bool(len(pos) and len(neg))
    threshold = calibrate_threshold(pos, neg) if calibrated else embedder.config.threshold
    refs = references_from_embeddings(embeddings, threshold=threshold, model=embedder.model_tag)

    out = out_uri or default_references_uri(store.uri)
    for suffix in (".npz", ".json"):
        out = out.removesuffix(suffix)
    with tempfile.TemporaryDirectory(prefix="photolens-landmarks-") as tmp:
        npz, side = refs.save(Path(tmp) / "references")
        # The JSON marks the pair complete (References.load needs both): written last.
        write_bytes_atomic(out + ".npz", npz.read_bytes(), s3)
        write_bytes_atomic(out + ".json", side.read_bytes(), s3)

    report: dict[str, Any] = {
        "references": Location.parse(out).uri,
        "model": refs.model,
        "n_landmarks": len(refs.landmark_ids),
        "n_images": int(sum(refs.counts)),
        "n_negative_images": len(negatives),
        "skipped": skipped,
        "threshold": float(threshold),
        "calibrated": calibrated,
        "n_positive_pairs": len(pos),
        "n_negative_pairs": len(neg),
    }
    if calibrated:
        report.update(
            balanced_accuracy=balanced_accuracy(pos, neg, threshold),
            positive_scores={"min": float(pos.min()), "median": float(np.median(pos)), "max": float(pos.max())},
            negative_scores={"min": float(neg.min()), "median": float(np.median(neg)), "max": float(neg.max())},
        )
    return report


def format_report(report: dict[str, Any]) -> str:
    lines = [f"landmark references: {report['references']}",
             f"  model {report['model']}",
             f"  {report['n_landmarks']} landmarks from {report['n_images']} photos"
             f" (+{report['n_negative_images']} non-landmark photos; {len(report['skipped'])} unreadable skipped)"]
    if report["calibrated"]:
        p, n = report["positive_scores"], report["negative_scores"]
        lines += [f"  threshold {report['threshold']:.4f} (calibrated: balanced accuracy "
                  f"{report['balanced_accuracy']:.3f} on {report['n_positive_pairs']} leave-one-out positives, "
                  f"{report['n_negative_pairs']} negatives)",
                  f"  positives min/median/max {p['min']:.3f}/{p['median']:.3f}/{p['max']:.3f}; "
                  f"negatives {n['min']:.3f}/{n['median']:.3f}/{n['max']:.3f}"]
    else:
        lines.append(f"  threshold {report['threshold']:.4f} (default: calibration needs a landmark with two photos "
                     "and a second landmark or a '_' folder of non-landmark photos)")
    for s in report["skipped"]:
        lines.append(f"  skipped {s['path']}: {s['error_code']} {s['detail']}")
    return "\n".join(lines)


def cmd_build(args: argparse.Namespace) -> int:
    report = build_landmark_references(Path(args.gallery), args.out, args.store)
    print(json.dumps(report, indent=2, sort_keys=True) if args.json else format_report(report))
    return 0


def register(sub: Any) -> None:
    """Add ``landmarks build`` to the CLI's sub-parsers (flags in ``photolens.jobs.commands``)."""
    from photolens.jobs.commands import register_landmarks

    register_landmarks(sub)
