"""Landmark recognition by embeddings and per-landmark reference vectors (seed 002_c25c13e8b0f7e642.txt).

The seed cuts the classifier off a scene network, turns every image into an embedding, keeps one
reference vector per landmark, compares a query with every reference and answers "not a landmark"
below a threshold. Here the network is the scene model's ImageNet MobileNetV2 without fine-tuning:

* embedding = pooled feature map of the last inverted-residual block (320 channels, before the
  1x1 expansion to 1280), L2-normalised. The input keeps its aspect ratio (long side 320 px,
  letterboxed to a square so batches stack) and the pooling skips the padded cells;
* pooling = GeM with p = 1, i.e. average pooling. Measured on the same-place pairs of the test photos
  (leuvenA/B, graf1/3, aero1/3, box/box_in_scene) against the 28 other photos: the smallest margin
  "pair similarity - best similarity to any other photo" over the first three pairs is +0.40 with
  p = 1, +0.07 with p = 3 and +0.04 with max pooling; on the 1280-channel map the best is +0.19
  (also p = 1). The bottleneck is signed (no ReLU), so only p = 1 and max use all of it;
* references = mean of a landmark's embeddings, renormalised; match = best cosine similarity,
  accepted at or above the threshold (:func:`calibrate_threshold` picks it from labelled pairs).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms.v2 import functional as TF

from photolens.models.scene import check_images, load_mobilenet_v2, normalize_imagenet
from photolens.schemas.calibration import load_calibration

REFERENCES_FORMAT = 1

# torchvision MobileNetV2 ``features`` indices: [:18] ends with the last inverted-residual block
# (320 channels, total stride 32); the full ``features`` adds the 1x1 conv to 1280 + ReLU6.
FEATURE_LAYERS = {"bottleneck": (18, 320), "last": (19, 1280)}
_STRIDE = 32


class ReferencesError(ValueError):
    """A reference file pair that is missing, inconsistent or from another embedding model."""


@dataclass(frozen=True)
class LandmarkConfig:
    input_size: int = 320  # long side in pixels; the short side keeps the aspect ratio
    feature_layer: str = "bottleneck"  # "bottleneck" (320-d) or "last" (1280-d)
    pooling: str = "gem"  # "gem" or "max"
    gem_p: float = 1.0  # 1 = average pooling (the measured best, see the module docstring)
    batch_size: int = 32
    # Reject threshold on cosine similarity when references are built without calibration: fitted by
    # tools/calibrate.py on the calibration photos (same-place pairs vs all other pairs, balanced
    # accuracy) and read from schemas/calibration.json. Calibrate on a real gallery with calibrate_threshold.
    threshold: float = field(default_factory=lambda: float(load_calibration()["landmark"]["threshold"]))
    channels_last: bool = False  # GPU option
    bf16: bool = False  # GPU option: autocast to bfloat16

    def __post_init__(self) -> None:
        if self.feature_layer not in FEATURE_LAYERS:
            raise ValueError(f"feature_layer must be one of {sorted(FEATURE_LAYERS)}")
        if self.pooling not in ("gem", "max"):
            raise ValueError("pooling must be 'gem' or 'max'")
        if self.pooling == "gem" and self.gem_p <= 0:
            raise ValueError("gem_p must be > 0")
        if self.input_size < _STRIDE or self.batch_size < 1:
            raise ValueError(f"input_size must be >= {_STRIDE} and batch_size >= 1")

    @property
    def tag(self) -> str:
        pool = f"gem{self.gem_p:g}" if self.pooling == "gem" else "max"
        return f"{self.feature_layer}-{pool}-{self.input_size}"


def pool_features(features: torch.Tensor, valid_hw: Sequence[tuple[int, int]], pooling: str,
                  gem_p: float) -> torch.Tensor:
    """Pool ``(n, c, h, w)`` maps over each image's valid top-left ``(h_i, w_i)`` cells."""
    n, _, h, w = features.shape
    mask = torch.zeros(n, 1, h, w, dtype=torch.bool, device=features.device)
    for i, (vh, vw) in enumerate(valid_hw):
        mask[i, :, :vh, :vw] = True
    x = features.float()
    if pooling == "max":
        return x.masked_fill(~mask, float("-inf")).amax(dim=(2, 3))
    count = mask.sum(dim=(2, 3)).clamp(min=1)
    if gem_p == 1.0:
        return (x * mask).sum(dim=(2, 3)) / count
    # GeM needs non-negative inputs; clamping is the usual choice (Radenovic et al.).
    x = x.clamp(min=1e-6).pow(gem_p)
    return ((x * mask).sum(dim=(2, 3)) / count).pow(1.0 / gem_p)


class LandmarkEmbedder:
    """L2-normalised global descriptors of RGB uint8 images from the MobileNetV2 backbone."""

    def __init__(self, backbone: nn.Module, *, version: str, device: str | torch.device = "cpu",
                 config: LandmarkConfig | None = None) -> None:
        self.config = config or LandmarkConfig()
        self.name = f"mobilenet_v2_landmark_{self.config.tag}"
        self.version = version
        self.device = torch.device(device)
        cut, self.dim = FEATURE_LAYERS[self.config.feature_layer]
        features = backbone.features if hasattr(backbone, "features") else backbone
        trunk = features[:cut].to(self.device).eval()  # type: ignore[index]
        if self.config.channels_last:
            trunk = trunk.to(memory_format=torch.channels_last)
        self.trunk = trunk

    @classmethod
    def from_mobilenet_v2(cls, weights_path: str | Path, config: LandmarkConfig | None = None, *,
                          device: str | torch.device = "cpu", version: str | None = None) -> LandmarkEmbedder:
        return cls(load_mobilenet_v2(weights_path), version=version or Path(weights_path).stem, device=device,
                   config=config)

    @property
    def model_tag(self) -> str:
        return f"{self.name}@{self.version}"

    def _letterbox(self, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        """Resize so the long side is ``input_size``; returns the uint8 canvas and the image's (h, w) on it."""
        size = self.config.input_size
        h, w = image.shape[:2]
        scale = size / max(h, w)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        if not image.flags.writeable:  # arrays over PIL buffers are read-only; torch wants writable memory
            image = image.copy()
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).to(self.device, non_blocking=True)
        canvas = torch.zeros(3, size, size, dtype=torch.uint8, device=self.device)
        canvas[:, :nh, :nw] = TF.resize(x, [nh, nw], antialias=True)
        return canvas, (nh, nw)

    @torch.inference_mode()
    def feature_maps(self, images: Sequence[np.ndarray]) -> list[tuple[torch.Tensor, list[tuple[int, int]]]]:
        """Per batch: the trunk's ``(n, dim, h, w)`` maps and each image's valid ``(h, w)`` cells."""
        check_images(images)
        use_bf16 = self.config.bf16 and self.device.type == "cuda"
        out = []
        for start in range(0, len(images), self.config.batch_size):
            boxed = [self._letterbox(img) for img in images[start : start + self.config.batch_size]]
            x = normalize_imagenet(torch.stack([b for b, _ in boxed]))
            valid = []
            for i, (_, (nh, nw)) in enumerate(boxed):
                # Padding = 0 after normalisation (the mean colour); pooling then skips the cells
                # that lie entirely in it, so the letterbox does not change the descriptor much.
                x[i, :, nh:, :] = 0.0
                x[i, :, :, nw:] = 0.0
                valid.append((math.ceil(nh / _STRIDE), math.ceil(nw / _STRIDE)))
            if self.config.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use_bf16):
                fmap = self.trunk(x)
            out.append((fmap.float(), valid))
        return out

    def embed(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """``(n, dim)`` float32 unit vectors."""
        if len(images) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        parts = [F.normalize(pool_features(fmap, valid, self.config.pooling, self.config.gem_p), dim=1).cpu()
                 for fmap, valid in self.feature_maps(images)]
        return torch.cat(parts).numpy().astype(np.float32)

    def build_references(self, gallery: Mapping[str, Sequence[np.ndarray]],
                         threshold: float | None = None) -> References:
        """One reference vector per landmark from its gallery images."""
        embeddings = {lid: self.embed(list(imgs)) for lid, imgs in gallery.items()}
        return references_from_embeddings(
            embeddings, threshold=self.config.threshold if threshold is None else threshold, model=self.model_tag)


# ------------------------------------------------------------------------------------ references


@dataclass(frozen=True, eq=False)
class References:
    landmark_ids: tuple[str, ...]
    vectors: np.ndarray  # (m, dim) float32, unit rows, same order as landmark_ids
    counts: tuple[int, ...]  # gallery images behind each reference
    threshold: float  # cosine similarity at or above which a match is accepted
    model: str  # "name@version" of the embedder; queries must come from the same one

    def __post_init__(self) -> None:
        if self.vectors.ndim != 2 or self.vectors.shape[0] != len(self.landmark_ids):
            raise ReferencesError(f"{len(self.landmark_ids)} ids but vectors of shape {self.vectors.shape}")
        if len(self.counts) != len(self.landmark_ids) or len(set(self.landmark_ids)) != len(self.landmark_ids):
            raise ReferencesError("landmark ids must be distinct and have one count each")

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def with_threshold(self, threshold: float) -> References:
        return replace(self, threshold=float(threshold))

    def scores(self, embeddings: np.ndarray) -> np.ndarray:
        """Cosine similarity of each query (rows of unit vectors) with every reference: ``(n, m)``."""
        q = np.atleast_2d(np.asarray(embeddings, dtype=np.float32))
        if q.shape[1] != self.dim:
            raise ReferencesError(f"query dimension {q.shape[1]} != reference dimension {self.dim}")
        return q @ self.vectors.T

    def match_batch(self, embeddings: np.ndarray) -> list[tuple[str | None, float]]:
        """Per query: ``(landmark_id, score)``, or ``(None, best score)`` below the threshold."""
        if not self.landmark_ids:
            return [(None, float("-inf"))] * len(np.atleast_2d(embeddings))
        s = self.scores(embeddings)
        best = s.argmax(axis=1)
        out: list[tuple[str | None, float]] = []
        for i, j in enumerate(best):
            score = float(s[i, j])
            out.append((self.landmark_ids[j] if score >= self.threshold else None, score))
        return out

    def match(self, embedding: np.ndarray) -> tuple[str | None, float]:
        """One query vector -> ``(landmark_id or None for "not a landmark", best cosine score)``."""
        emb = np.asarray(embedding)
        if emb.ndim != 1:
            raise ValueError(f"match takes one vector, got shape {emb.shape}; use match_batch")
        return self.match_batch(emb[None])[0]

    # -------------------------------------------------------------- persistence
    def save(self, path: str | Path) -> tuple[Path, Path]:
        """Write ``<path>.npz`` (vectors, counts) and ``<path>.json`` (ids, threshold, model). Each
        file is written to a temporary name and renamed, the JSON last: it marks the pair complete."""
        npz, side = _paths(path)
        npz.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(npz, lambda f: np.savez(f, vectors=self.vectors.astype(np.float32),
                                              counts=np.asarray(self.counts, dtype=np.int64)))
        doc = {"format": REFERENCES_FORMAT, "model": self.model, "dim": self.dim, "threshold": self.threshold,
               "landmark_ids": list(self.landmark_ids)}
        _atomic_write(side, lambda f: f.write(json.dumps(doc, indent=1).encode()))
        return npz, side

    @classmethod
    def load(cls, path: str | Path, expect_model: str | None = None) -> References:
        npz, side = _paths(path)
        if not side.is_file() or not npz.is_file():
            raise ReferencesError(f"reference files missing: {npz} and {side} are both needed")
        doc = json.loads(side.read_text(encoding="utf-8"))
        if doc.get("format") != REFERENCES_FORMAT:
            raise ReferencesError(f"{side}: unknown format {doc.get('format')!r}")
        with np.load(npz) as data:
            vectors, counts = data["vectors"].astype(np.float32), data["counts"]
        if vectors.shape != (len(doc["landmark_ids"]), doc["dim"]):
            raise ReferencesError(f"{npz}: vectors {vectors.shape} do not match {side} "
                                  f"({len(doc['landmark_ids'])} ids, dim {doc['dim']})")
        if expect_model is not None and doc["model"] != expect_model:
            raise ReferencesError(f"references were built with {doc['model']}, the embedder is {expect_model}")
        return cls(tuple(doc["landmark_ids"]), vectors, tuple(int(c) for c in counts), float(doc["threshold"]),
                   doc["model"])


def _paths(path: str | Path) -> tuple[Path, Path]:
    base = Path(path)
    if base.suffix in (".npz", ".json"):
        base = base.with_suffix("")
    return base.with_name(base.name + ".npz"), base.with_name(base.name + ".json")


def _atomic_write(path: Path, write: object) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)  # type: ignore[operator]
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def references_from_embeddings(embeddings: Mapping[str, np.ndarray], *, threshold: float,
                               model: str) -> References:
    """Mean of each landmark's unit embeddings, renormalised to unit length."""
    ids, vecs, counts = [], [], []
    for lid, emb in embeddings.items():
        e = np.atleast_2d(np.asarray(emb, dtype=np.float32))
        if e.shape[0] == 0:
            raise ValueError(f"landmark {lid!r} has no gallery images")
        mean = e.mean(axis=0)
        norm = float(np.linalg.norm(mean))
        if norm == 0.0:
            raise ValueError(f"landmark {lid!r}: embeddings cancel out, no reference direction")
        ids.append(str(lid))
        vecs.append(mean / norm)
        counts.append(e.shape[0])
    dim = vecs[0].shape[0] if vecs else 0
    return References(tuple(ids), np.stack(vecs).astype(np.float32) if vecs else np.zeros((0, dim), np.float32),
                      tuple(counts), float(threshold), model)


def build_references(gallery: Mapping[str, Sequence[np.ndarray]], embedder: LandmarkEmbedder,
                     threshold: float | None = None) -> References:
    """Reference vectors for a labelled gallery ``{landmark_id: [RGB uint8 images]}``."""
    return embedder.build_references(gallery, threshold)


# ------------------------------------------------------------------------------------ calibration


def balanced_accuracy(positives: Sequence[float] | np.ndarray, negatives: Sequence[float] | np.ndarray,
                      threshold: float) -> float:
    """Mean of the accept rate of positive pairs and the reject rate of negative pairs (score >= t accepts)."""
    pos, neg = np.asarray(positives, dtype=np.float64), np.asarray(negatives, dtype=np.float64)
    return 0.5 * (float(np.mean(pos >= threshold)) + float(np.mean(neg < threshold)))


def calibrate_threshold(positives: Sequence[float] | np.ndarray, negatives: Sequence[float] | np.ndarray) -> float:
    """The similarity threshold maximising balanced accuracy on labelled pair scores.

    ``positives``: scores of pairs that should match (same landmark), ``negatives``: pairs that should
    not. Balanced, because galleries hold far more non-landmark pairs than landmark ones (the seed's
    cloud test: 200 landmark photos vs 10,000 others). Candidates are midpoints between consecutive
    distinct scores; among equally good ones the widest gap's midpoint wins (largest margin)."""
    pos, neg = np.asarray(positives, dtype=np.float64), np.asarray(negatives, dtype=np.float64)
    if pos.size == 0 or neg.size == 0:
        raise ValueError("calibrate_threshold needs at least one positive and one negative score")
    values = np.unique(np.concatenate([pos, neg]))
    if values.size == 1:
        return float(values[0])
    mids = (values[:-1] + values[1:]) / 2.0
    gaps = values[1:] - values[:-1]
    pos_sorted, neg_sorted = np.sort(pos), np.sort(neg)
    tpr = 1.0 - np.searchsorted(pos_sorted, mids, side="left") / pos.size
    tnr = np.searchsorted(neg_sorted, mids, side="left") / neg.size
    bacc = 0.5 * (tpr + tnr)
    best = np.flatnonzero(np.isclose(bacc, bacc.max()))
    return float(mids[best[np.argmax(gaps[best])]])
