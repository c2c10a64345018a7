"""Model stages of the tagging pipeline: Ray Data UDFs around the pure models in ``photolens.models``.

Pipeline order (``stage_udfs``): detect → scene → landmark → faces, where "faces" is three UDFs:
:class:`FacesUDF` (MTCNN, alignment, quality gate) → :class:`EmbedUDF` (face descriptors) →
:class:`EmotionUDF` (emotion probabilities). Each UDF loads its weights from the model store once per
actor and runs its model batched across the photos of a batch. The column contract is the one
``photolens.udfs.write.build_rows`` reads.

Rows: only rows with ``status == "ok"`` and a non-empty ``image`` are processed; every other row passes
through untouched. A model exception on one photo marks that row ``error`` / ``MODEL_FAILED`` with the
stage and a short detail and the rest of the batch carries on: the batch runs as one call first and,
if that call raises, again photo by photo, so only the failing photos are marked. Only the exception
types that model code raises for data it cannot handle (:data:`MODEL_ERRORS`) are caught; anything
else (a ``TypeError``, a ``KeyError``) is a bug and fails the task. Bad configuration (missing model,
missing references that were asked for, a bad threshold) raises in ``__init__``, before any row.

Pixels stop at the last model stage: the last UDF of :func:`stage_udfs` gets ``drop_pixels=True`` and
deletes ``image`` (and :class:`EmotionUDF` always deletes ``face_chips``), so the writer never
receives them.

:class:`RecognizeUDF` runs all selected stages of a batch in one actor, in the same order and through
the same stage objects: one model pool per GPU instead of six, and the working images never travel
between model actors. The job uses it whenever the model stages run on a GPU; each stage keeps its own
seconds column, model column and per-row failure isolation.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final, TypeVar

import cv2
import numpy as np
import torch

from photolens.lake.storage import S3Settings, join_uri, read_bytes
from photolens.models.face_align import QualityGate
from photolens.models.landmark import References, ReferencesError
from photolens.models.store import ModelEntry, ModelStore, ModelStoreError, default_store_uri
from photolens.schemas.errors import ErrorCode, Stage, Status
from photolens.udfs.columns import text_column

__all__ = [
    "DEFAULT_MODELS",
    "MODEL_ERRORS",
    "DetectConfig",
    "DetectUDF",
    "EmbedConfig",
    "EmbedUDF",
    "EmotionConfig",
    "EmotionUDF",
    "FacesConfig",
    "FacesUDF",
    "LandmarkStageConfig",
    "LandmarkUDF",
    "RecognizeConfig",
    "RecognizeOptions",
    "RecognizeUDF",
    "SceneStageConfig",
    "SceneUDF",
    "default_references_uri",
    "load_references",
    "required_models",
    "stage_udfs",
]

log = logging.getLogger(__name__)

# Exception types model code raises for inputs it cannot handle: torch (RuntimeError, including CUDA
# out-of-memory), numpy/OpenCV shape and value checks (ValueError, numpy's LinAlgError is one),
# arithmetic on degenerate geometry, and OpenCV's own error type. A TypeError, KeyError, AttributeError
# or IndexError is our bug and must fail the task, not hide as a per-photo error.
MODEL_ERRORS: Final[tuple[type[BaseException], ...]] = (RuntimeError, ValueError, ArithmeticError, cv2.error)

# Default model-store names per role (see photolens.models.store.PACKAGED).
DEFAULT_MODELS: Final[dict[str, str]] = {
    "detect": "ssd_mobilenet_v2_coco",
    "scene": "mobilenet_v2_imagenet",
    "landmark": "mobilenet_v2_imagenet",
    "faces": "mtcnn",
    "embed": "dlib_resnet34",
    "emotion": "mini_xception_fer2013",
}
MODEL_STAGES: Final[tuple[str, ...]] = ("detect", "scene", "landmark", "faces")
REFERENCES_BASENAME: Final = "references"
_DETAIL_MAX: Final = 199
_DLIB_CHIP: Final = 150

T = TypeVar("T")
R = TypeVar("R")


# ---------------------------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class _StageConfig:
    """What every model stage needs: where the weights are, where to run, and whether to drop pixels."""

    model_store: str | None = None  # None: default_store_uri() (resolved on the worker)
    device: str = "cpu"
    s3: S3Settings | None = None
    batch_size: int = 64  # images (or chips) per forward pass inside one Ray batch
    bf16: bool = False  # GPU option: bfloat16 autocast / weights where the model supports it
    channels_last: bool = False  # GPU option
    drop_pixels: bool = False  # delete the ``image`` column on the way out (the last model stage)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        torch.device(self.device)  # raises for a malformed device string, here rather than on a worker

    def store(self) -> ModelStore:
        return ModelStore(self.model_store or default_store_uri(), self.s3)


@dataclass(frozen=True)
class DetectConfig(_StageConfig):
    model: str = DEFAULT_MODELS["detect"]
    # A torchvision architecture name (photolens.models.detector.TORCHVISION_ARCHS) when ``model`` is a
    # torchvision checkpoint in the store; None: ``model`` itself names the architecture if it is one.
    arch: str | None = None
    score_threshold: float = 0.5  # the graph's usual operating point (see models/detector.py)
    nms_iou: float = 0.5
    max_detections: int = 100
    batch_size: int = 16
    # How the SSD graph runs: "torch" (photolens.models.ssd_torch: batched, any device) or "cv2"
    # (OpenCV's dnn module on CPU, the reference it is tested against).
    engine: str = "torch"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.engine not in ("torch", "cv2"):
            raise ValueError(f"detector engine must be 'torch' or 'cv2', got {self.engine!r}")


@dataclass(frozen=True)
class SceneStageConfig(_StageConfig):
    model: str = DEFAULT_MODELS["scene"]
    top_k: int = 5
    min_coarse_score: float = 0.2


@dataclass(frozen=True)
class LandmarkStageConfig(_StageConfig):
    model: str = DEFAULT_MODELS["landmark"]
    # Reference vectors (``<uri>.npz`` + ``<uri>.json``, as written by ``photolens landmarks build``).
    # None: ``<model_store>/landmarks/references`` when it exists, else no landmark ids are emitted.
    # A URI given here must exist.
    references: str | None = None
    batch_size: int = 32


@dataclass(frozen=True)
class FacesConfig(_StageConfig):
    model: str = DEFAULT_MODELS["faces"]
    min_face_size: int = 20
    thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7)
    # Which faces count for templates, suggestions and the privacy policy "face_passed_gate".
    gate: QualityGate = field(default_factory=QualityGate)


@dataclass(frozen=True)
class EmbedConfig(_StageConfig):
    model: str = DEFAULT_MODELS["embed"]
    # For an ArcFace checkpoint in the store (any model name other than dlib's): its iresnet depth.
    arcface_arch: str = "iresnet50"


@dataclass(frozen=True)
class EmotionConfig(_StageConfig):
    model: str = DEFAULT_MODELS["emotion"]
    batch_size: int = 512


@dataclass(frozen=True)
class RecognizeOptions:
    """Choices a job may override for all model stages (everything else has per-stage defaults)."""

    detector: str = DEFAULT_MODELS["detect"]
    detector_arch: str | None = None
    detect_score_threshold: float = 0.5
    scene_model: str = DEFAULT_MODELS["scene"]
    scene_top_k: int = 5
    landmark_references: str | None = None
    embedder: str = DEFAULT_MODELS["embed"]
    arcface_arch: str = "iresnet50"
    bf16: bool = False
    channels_last: bool = False
    faces: FacesConfig = field(default_factory=FacesConfig)  # gate and cascade settings (store/device ignored)


# ---------------------------------------------------------------------------------------------- planning


def required_models(stages: Sequence[str], options: RecognizeOptions | None = None) -> tuple[str, ...]:
    """Model-store names the given stages need ("faces" = detector + embedder + emotion model)."""
    opts = options or RecognizeOptions()
    unknown = sorted(set(stages) - set(MODEL_STAGES))
    if unknown:
        raise ValueError(f"unknown model stage(s) {unknown}; known: {', '.join(MODEL_STAGES)}")
    names: list[str] = []
    for stage in MODEL_STAGES:
        if stage not in stages:
            continue
        if stage == "detect":
            names.append(opts.detector)
        elif stage == "scene":
            names.append(opts.scene_model)
        elif stage == "landmark":
            names.append(DEFAULT_MODELS["landmark"])
        else:
            names += [opts.faces.model, opts.embedder, DEFAULT_MODELS["emotion"]]
    return tuple(dict.fromkeys(names))


def stage_udfs(stages: Sequence[str], model_store_uri: str | None, device: str, s3: S3Settings | None,
               options: RecognizeOptions | None = None,
               batch_size: int | None = None) -> list[tuple[type, Any]]:
    """``(UDF class, config)`` pairs in pipeline order for the selected model stages.

    ``batch_size`` sets the photos per forward pass of the photo-level stages (detect, scene, landmark,
    faces); None keeps each stage's default. The chip-level stages (embed, emotion) keep theirs: a batch
    of photos gives them a few chips per photo, and their defaults already exceed a photo batch.
    The last config gets ``drop_pixels=True``: nothing after the model stages needs the pixels.
    """
    opts = options or RecognizeOptions()
    required_models(stages, opts)  # validates the stage names
    common: dict[str, Any] = {"model_store": model_store_uri, "device": device, "s3": s3, "bf16": opts.bf16,
                              "channels_last": opts.channels_last}
    photo = {**common, "batch_size": batch_size} if batch_size is not None else common
    out: list[tuple[type, Any]] = []
    if "detect" in stages:
        out.append((DetectUDF, DetectConfig(**photo, model=opts.detector, arch=opts.detector_arch,
                                            score_threshold=opts.detect_score_threshold)))
    if "scene" in stages:
        out.append((SceneUDF, SceneStageConfig(**photo, model=opts.scene_model, top_k=opts.scene_top_k)))
    if "landmark" in stages:
        out.append((LandmarkUDF, LandmarkStageConfig(**photo, references=opts.landmark_references)))
    if "faces" in stages:
        out.append((FacesUDF, replace(opts.faces, **photo)))
        out.append((EmbedUDF, EmbedConfig(**common, model=opts.embedder, arcface_arch=opts.arcface_arch)))
        out.append((EmotionUDF, EmotionConfig(**common)))
    if out:
        cls, cfg = out[-1]
        out[-1] = (cls, replace(cfg, drop_pixels=True))
    return out


# ---------------------------------------------------------------------------------------------- helpers


# Columns holding a Python list per row. Ray hands an Arrow list column to the next UDF as 1-D ndarrays;
# passed on as such, a batch whose first row has one becomes a tensor column while a batch starting
# with a null becomes a list column, and Ray then cannot concatenate the two. Lists keep it a list.
_LIST_COLUMNS: Final[tuple[str, ...]] = ("scene_labels", "scene_scores")


def _as_lists(column: np.ndarray) -> np.ndarray:
    out = np.full(len(column), None, dtype=object)
    for i, value in enumerate(column):
        if isinstance(value, np.ndarray):
            out[i] = value.tolist()
        elif isinstance(value, list | tuple):
            out[i] = list(value)
    return out


def _detail(exc: BaseException) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= _DETAIL_MAX else text[: _DETAIL_MAX - 1] + "…"


def _run_isolated(fn: Callable[[list[T]], list[R]], items: list[T],
                  stage: str) -> tuple[list[R | None], dict[int, str]]:
    """``fn`` over all items in one call; if it raises a model error, item by item.

    Returns the results (None for failed items) and ``{index: detail}`` of the items that failed alone.
    """
    if not items:
        return [], {}
    try:
        results = fn(items)
    except MODEL_ERRORS as exc:
        if len(items) == 1:
            log.warning("%s: model failed on one photo: %s", stage, _detail(exc), exc_info=True)
            return [None], {0: _detail(exc)}
        log.warning("%s: batch of %d failed (%s); retrying photo by photo", stage, len(items), _detail(exc))
    else:
        if len(results) != len(items):
            raise RuntimeError(f"{stage}: model returned {len(results)} results for {len(items)} inputs")
        return list(results), {}
    out: list[R | None] = []
    failures: dict[int, str] = {}
    for k, item in enumerate(items):
        try:
            out.append(fn([item])[0])
        except MODEL_ERRORS as exc:
            log.warning("%s: model failed on one photo: %s", stage, _detail(exc), exc_info=True)
            out.append(None)
            failures[k] = _detail(exc)
    if len(items) >= 2 and len(failures) == len(items):
        # Every photo failing on its own is the model or its device failing (a broken CUDA context), not bad
        # data: fail the task, so Ray retries it (on a restarted actor) or fails the run, instead of marking
        # the whole batch MODEL_FAILED.
        raise RuntimeError(f"{stage}: all {len(items)} photos of the batch failed one by one (first: "
                           f"{failures[0]}); treating the actor as broken")
    return out, failures


def _chunked(fn: Callable[[list[T]], list[R]], size: int) -> Callable[[list[T]], list[R]]:
    """``fn`` over ``items`` in calls of at most ``size``: a model batch larger than one forward pass
    should fill the device, not overflow its memory (MTCNN pads a batch to its largest image)."""

    def run(items: list[T]) -> list[R]:
        if len(items) <= size:
            return list(fn(items))
        out: list[R] = []
        for start in range(0, len(items), size):
            out += list(fn(items[start : start + size]))
        return out

    return run


def _file(store: ModelStore, entry: ModelEntry, suffixes: tuple[str, ...], what: str) -> Path:
    """The one file of ``entry`` whose name ends with one of ``suffixes`` (verified, local)."""
    matches = [f.name for f in entry.files if f.name.endswith(suffixes)]
    if len(matches) != 1:
        raise ModelStoreError(f"model {entry.name!r}: expected one {what} file ({'/'.join(suffixes)}), "
                              f"found {matches or 'none'} in {[f.name for f in entry.files]}")
    return store.local_path(entry.name, matches[0])


def _dtype(cfg: _StageConfig) -> torch.dtype:
    # bf16 only pays off (and stays accurate enough) on GPUs; on a CPU it is slow and lossy.
    return torch.bfloat16 if cfg.bf16 and torch.device(cfg.device).type == "cuda" else torch.float32


class _ModelUDF:
    """Shared row bookkeeping: which rows to run, error marking, seconds and model columns."""

    stage: Stage
    role: str
    tag: str

    def __init__(self, config: _StageConfig) -> None:
        self.config = config

    def _begin(self, batch: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[int], float]:
        started = time.perf_counter()
        n = len(batch["status"])
        out = dict(batch)
        for name in ("status", "error_code", "error_stage", "error_detail"):
            out[name] = text_column(batch.get(name), n)
        for name in _LIST_COLUMNS:
            if name in out:
                out[name] = _as_lists(out[name])
        images = batch.get("image")
        rows = []
        for i in range(n):
            if out["status"][i] != Status.OK.value or images is None:
                continue
            img = images[i]
            if isinstance(img, np.ndarray) and img.ndim == 3 and img.size > 0:
                rows.append(i)
        return out, rows, started

    def _fail(self, out: dict[str, np.ndarray], row: int, detail: str) -> None:
        out["status"][row] = Status.ERROR.value
        out["error_code"][row] = ErrorCode.MODEL_FAILED.value
        out["error_stage"][row] = self.stage.value
        out["error_detail"][row] = detail

    def _finish(self, out: dict[str, np.ndarray], started: float) -> dict[str, np.ndarray]:
        n = len(out["status"])
        ok = out["status"] == Status.OK.value
        model = np.full(n, None, dtype=object)
        model[ok] = self.tag
        out[f"model_{self.role}"] = model
        # Every row carries its share of the batch's time: the writer sums them per stage.
        out[f"{self.stage.value}_seconds"] = np.full(n, (time.perf_counter() - started) / max(n, 1), np.float32)
        if self.config.drop_pixels:
            out.pop("image", None)
        return out


# ---------------------------------------------------------------------------------------------- detect


class DetectUDF(_ModelUDF):
    """COCO objects per photo: ``detections_json`` with each box's category path up the category tree."""

    stage = Stage.DETECT
    role = "detect"

    def __init__(self, config: DetectConfig) -> None:
        super().__init__(config)
        from photolens.models.detector import (
            COCO_LABELS_91,
            TORCHVISION_ARCHS,
            PostprocessConfig,
            SsdConfig,
            SsdMobileNetCoco,
            TorchvisionDetector,
            TorchvisionDetectorConfig,
        )
        from photolens.schemas.taxonomy import CategoryTree

        post = PostprocessConfig(config.score_threshold, config.nms_iou, config.max_detections)
        store = config.store()
        entry = store.entry(config.model)
        arch = config.arch or (config.model if config.model in TORCHVISION_ARCHS else None)
        self.detector: Any
        if arch is not None:
            checkpoint = _file(store, entry, (".pth", ".pt"), "checkpoint")
            tv_cfg = TorchvisionDetectorConfig(postprocess=post, bf16=config.bf16 and config.device.startswith("cuda"),
                                               channels_last=config.channels_last)
            self.detector = TorchvisionDetector(arch, checkpoint, tv_cfg, device=config.device, version=entry.version)
            self.detector.name = entry.name
        else:
            graph = _file(store, entry, (".pb",), "TensorFlow graph")
            pbtxt = _file(store, entry, (".pbtxt",), "graph config")
            if config.engine == "cv2":
                self.detector = SsdMobileNetCoco(graph, pbtxt, SsdConfig(postprocess=post), version=entry.version)
            else:
                from photolens.models.ssd_torch import TorchSsdConfig, TorchSsdMobileNetCoco

                ssd_cfg = TorchSsdConfig(postprocess=post, bf16=config.bf16 and config.device.startswith("cuda"),
                                         channels_last=config.channels_last)
                self.detector = TorchSsdMobileNetCoco(graph, pbtxt, ssd_cfg, device=config.device,
                                                      version=entry.version)
        self.tag = f"{self.detector.name}@{self.detector.version}"
        self.tree = CategoryTree.load()
        missing = sorted({c for c in COCO_LABELS_91 if c not in ("__background__", "N/A") and c not in self.tree})
        if missing:
            raise ValueError(f"COCO classes missing from the category tree: {missing}")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out, rows, started = self._begin(batch)
        n = len(out["status"])
        det_json = np.full(n, None, dtype=object)
        images = [batch["image"][i] for i in rows]
        with torch.inference_mode():
            results, failures = _run_isolated(_chunked(self.detector.detect, self.config.batch_size), images,
                                              self.stage.value)
        for k, (row, dets) in enumerate(zip(rows, results, strict=True)):
            if k in failures or dets is None:
                self._fail(out, row, failures.get(k, "no result"))
                continue
            det_json[row] = json.dumps([
                {"category": name, "category_path": self.tree.roll_up(name), "score": round(float(score), 5),
                 "box": [round(float(v), 5) for v in box]}
                for box, score, name in zip(dets.boxes, dets.scores, dets.categories, strict=True)
            ])
        out["detections_json"] = det_json
        return self._finish(out, started)


# ---------------------------------------------------------------------------------------------- scene


class SceneUDF(_ModelUDF):
    """Top-k fine scene labels and the best coarse scene per photo."""

    stage = Stage.SCENE
    role = "scene"

    def __init__(self, config: SceneStageConfig) -> None:
        super().__init__(config)
        from photolens.models.scene import SceneClassifier
        from photolens.models.scene import SceneConfig as ModelSceneConfig

        model_cfg = ModelSceneConfig(top_k=config.top_k, batch_size=config.batch_size,
                                     min_coarse_score=config.min_coarse_score, channels_last=config.channels_last,
                                     bf16=config.bf16)
        store = config.store()
        entry = store.entry(config.model)
        if config.model == DEFAULT_MODELS["scene"]:
            weights = _file(store, entry, (".pth", ".pt"), "weights")
            self.model = SceneClassifier.from_mobilenet_v2(weights, config=model_cfg, device=config.device,
                                                           version=entry.version)
        else:
            # A Places365 checkpoint added to the store with its categories file.
            checkpoint = _file(store, entry, (".pth", ".pt", ".tar"), "checkpoint")
            categories = _file(store, entry, (".txt",), "categories")
            self.model = SceneClassifier.from_places365(checkpoint, categories, config=model_cfg,
                                                        device=config.device, version=entry.version)
        self.tag = f"{self.model.name}@{self.model.version}"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out, rows, started = self._begin(batch)
        n = len(out["status"])
        labels = np.full(n, None, dtype=object)
        scores = np.full(n, None, dtype=object)
        coarse = np.full(n, None, dtype=object)
        coarse_score = np.full(n, np.nan, dtype=np.float32)
        images = [batch["image"][i] for i in rows]
        results, failures = _run_isolated(self.model.classify, images, self.stage.value)
        for k, (row, res) in enumerate(zip(rows, results, strict=True)):
            if k in failures or res is None:
                self._fail(out, row, failures.get(k, "no result"))
                continue
            labels[row] = list(res.labels)
            scores[row] = [float(s) for s in res.scores]
            if res.coarse_label is not None:
                # Below min_coarse_score the photo has no coarse scene, and so no score for one.
                coarse[row] = res.coarse_label
                coarse_score[row] = res.coarse_score
        out.update(scene_labels=labels, scene_scores=scores, scene_coarse=coarse, scene_coarse_score=coarse_score)
        return self._finish(out, started)


# ---------------------------------------------------------------------------------------------- landmark


def default_references_uri(model_store: str | None) -> str:
    """``<model_store>/landmarks/references`` (the pair ``.npz`` + ``.json``)."""
    return join_uri(model_store or default_store_uri(), "landmarks", REFERENCES_BASENAME)


def _strip_suffix(uri: str) -> str:
    for suffix in (".npz", ".json"):
        if uri.endswith(suffix):
            return uri[: -len(suffix)]
    return uri


def load_references(uri: str, s3: S3Settings | None = None, *, required: bool,
                    expect_model: str | None = None) -> tuple[References, str] | None:
    """``(references, content digest)`` for the pair at ``uri`` (local or S3), or None when the files do
    not exist and ``required`` is false. Raises ReferencesError for a damaged pair or one built with
    another embedder."""

    base = _strip_suffix(uri)
    try:
        side = read_bytes(base + ".json", s3)
        npz = read_bytes(base + ".npz", s3)
    except (FileNotFoundError, OSError) as exc:
        if required:
            raise ReferencesError(f"landmark references {base}.npz/.json cannot be read: {exc}") from exc
        return None
    with tempfile.TemporaryDirectory(prefix="photolens-refs-") as tmp:
        local = Path(tmp) / REFERENCES_BASENAME
        local.with_suffix(".npz").write_bytes(npz)
        local.with_suffix(".json").write_bytes(side)
        refs = References.load(local, expect_model=expect_model)
    digest = hashlib.sha256(npz + side).hexdigest()[:12]
    return refs, digest


class LandmarkUDF(_ModelUDF):
    """Landmark id (or None: "not a landmark") by the best reference vector over the threshold.

    Without references (none at the default place and none configured) the stage emits no ids, and its
    model column says so (``+no-references``): a None there means "not checked", not "not a landmark".
    """

    stage = Stage.LANDMARK
    role = "landmark"

    def __init__(self, config: LandmarkStageConfig) -> None:
        super().__init__(config)
        from photolens.models.landmark import LandmarkConfig, LandmarkEmbedder

        store = config.store()
        entry = store.entry(config.model)
        weights = _file(store, entry, (".pth", ".pt"), "weights")
        model_cfg = LandmarkConfig(batch_size=config.batch_size, channels_last=config.channels_last, bf16=config.bf16)
        self.embedder = LandmarkEmbedder.from_mobilenet_v2(weights, model_cfg, device=config.device,
                                                           version=entry.version)
        uri = config.references or default_references_uri(store.uri)
        loaded = load_references(uri, config.s3, required=config.references is not None,
                                 expect_model=self.embedder.model_tag)
        self.references: References | None = None
        if loaded is None:
            self.tag = f"{self.embedder.name}@{self.embedder.version}+no-references"
        else:
            self.references, digest = loaded
            self.tag = f"{self.embedder.name}@{self.embedder.version}+refs-{digest}"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out, rows, started = self._begin(batch)
        n = len(out["status"])
        ids = np.full(n, None, dtype=object)
        scores = np.full(n, np.nan, dtype=np.float32)
        if self.references is not None and rows:
            images = [batch["image"][i] for i in rows]

            def embed(imgs: list[np.ndarray]) -> list[np.ndarray]:
                return list(self.embedder.embed(imgs))

            vectors, failures = _run_isolated(embed, images, self.stage.value)
            good = [k for k in range(len(rows)) if k not in failures and vectors[k] is not None]
            for k in failures:
                self._fail(out, rows[k], failures[k])
            if good:
                matches = self.references.match_batch(np.stack([vectors[k] for k in good]))
                for k, (lid, score) in zip(good, matches, strict=True):
                    ids[rows[k]] = lid
                    # The best similarity is kept also for "not a landmark": it says how close it came.
                    scores[rows[k]] = score if math.isfinite(score) else np.nan
        out.update(landmark_id=ids, landmark_score=scores)
        return self._finish(out, started)


# ---------------------------------------------------------------------------------------------- faces


def _empty_chips(size: int = _DLIB_CHIP) -> np.ndarray:
    return np.zeros((0, size, size, 3), dtype=np.uint8)


class FacesUDF(_ModelUDF):
    """MTCNN faces, five points, pose, sharpness, quality weight and gate; dlib150 chips for the next UDFs."""

    stage = Stage.FACES
    role = "faces"

    def __init__(self, config: FacesConfig) -> None:
        super().__init__(config)
        from photolens.models.mtcnn import MTCNN

        store = config.store()
        entry = store.entry(config.model)
        paths = [store.local_path(entry.name, f"{net}.pt") for net in ("pnet", "rnet", "onet")]
        self.detector = MTCNN.from_files(*paths, device=config.device, min_face_size=config.min_face_size,
                                         thresholds=config.thresholds)
        self.gate = config.gate
        self.tag = f"{self.detector.name}@{entry.version}"

    def _describe(self, image: np.ndarray, dets: Any) -> tuple[str, np.ndarray]:
        from photolens.models.face_align import assess

        chips, qualities = assess(image, dets.boxes, dets.scores, dets.points, "dlib150")
        faces = []
        for box, pts, q in zip(dets.boxes, dets.points, qualities, strict=True):
            passed, reason = self.gate.gate(q)
            faces.append({
                "box": [round(float(v), 2) for v in box],
                "points": [round(float(v), 2) for v in np.asarray(pts).reshape(-1)],
                "det_score": round(q.score, 5),
                "roll": round(q.roll, 2),
                "yaw": round(q.yaw, 2),
                "pitch": round(q.pitch, 2),
                "sharpness": round(q.sharpness, 5),
                # Inter-ocular distance in working-image pixels: the size QualityGate.min_size_px limits.
                "size_px": round(q.iod_px, 2),
                "quality": round(q.weight, 5),
                "passed_gate": bool(passed),
                "gate_reason": reason,
            })
        return json.dumps(faces), chips

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out, rows, started = self._begin(batch)
        n = len(out["status"])
        faces_json = np.full(n, None, dtype=object)
        chips = np.empty(n, dtype=object)
        for i in range(n):
            chips[i] = _empty_chips()
        images = [batch["image"][i] for i in rows]
        detections, failures = _run_isolated(_chunked(self.detector.detect, self.config.batch_size), images,
                                             self.stage.value)
        for k, (row, dets) in enumerate(zip(rows, detections, strict=True)):
            if k in failures or dets is None:
                self._fail(out, row, failures.get(k, "no result"))
                continue
            try:
                faces_json[row], chips[row] = self._describe(images[k], dets)
            except MODEL_ERRORS as exc:
                log.warning("faces: alignment failed on one photo: %s", _detail(exc), exc_info=True)
                self._fail(out, row, _detail(exc))
        out.update(faces_json=faces_json, face_chips=chips)
        return self._finish(out, started)


def _faces_of(batch: dict[str, np.ndarray], row: int) -> list[dict[str, Any]]:
    raw = batch.get("faces_json")
    value = raw[row] if raw is not None else None
    return json.loads(value) if isinstance(value, str) and value else []


class EmbedUDF(_ModelUDF):
    """One L2-normalised descriptor per face (every face of the photo, gated or not), all chips of the
    batch in one pass: dlib ResNet-34 on the dlib150 chips, or ArcFace on arcface112 chips re-aligned
    from the image and the five points."""

    stage = Stage.EMBED
    role = "embed"

    def __init__(self, config: EmbedConfig) -> None:
        super().__init__(config)
        from photolens.models.face_embed import DLIB_NAME, ArcFaceEmbedder, FaceEmbedder

        store = config.store()
        entry = store.entry(config.model)
        dtype = _dtype(config)
        self.embedder: Any
        if config.model == DLIB_NAME:
            dat = _file(store, entry, (".dat",), "dlib network")
            self.embedder = FaceEmbedder.from_dat(dat, device=config.device, dtype=dtype,
                                                  channels_last=config.channels_last, batch_size=config.batch_size)
            self.template = "dlib150"
        else:
            checkpoint = _file(store, entry, (".pth", ".pt"), "checkpoint")
            self.embedder = ArcFaceEmbedder.from_checkpoint(checkpoint, config.arcface_arch, device=config.device,
                                                            dtype=dtype, channels_last=config.channels_last,
                                                            batch_size=config.batch_size, version=entry.version)
            self.template = "arcface112"
        self.tag = f"{self.embedder.name}@{self.embedder.version}"
        self.dim = int(self.embedder.dim)

    def _chips(self, batch: dict[str, np.ndarray], row: int) -> np.ndarray:
        from photolens.models.face_align import align_batch

        if self.template == "dlib150":
            chips = batch["face_chips"][row]
            return np.asarray(chips, dtype=np.uint8).reshape(-1, _DLIB_CHIP, _DLIB_CHIP, 3)
        faces = _faces_of(batch, row)
        points = np.array([f["points"] for f in faces], dtype=np.float64).reshape(-1, 5, 2)
        return align_batch(batch["image"][row], points, self.template)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out, rows, started = self._begin(batch)
        n = len(out["status"])
        embeddings = np.empty(n, dtype=object)
        for i in range(n):
            embeddings[i] = np.zeros((0, self.dim), dtype=np.float32)
        if "faces_json" not in batch or "face_chips" not in batch:
            raise KeyError("EmbedUDF needs the faces_json and face_chips columns of FacesUDF before it")
        rows = [r for r in rows if _faces_of(batch, r)]
        per_photo: list[np.ndarray] = []
        aligned: list[int] = []
        for r in rows:
            try:
                per_photo.append(self._chips(batch, r))
                aligned.append(r)
            except MODEL_ERRORS as exc:  # degenerate points for a re-alignment
                self._fail(out, r, _detail(exc))
        rows = aligned

        def embed(chip_sets: list[np.ndarray]) -> list[np.ndarray]:
            # One forward pass over every chip of the batch, split back per photo.
            vectors = self.embedder.embed(np.concatenate(chip_sets))
            return np.split(vectors, np.cumsum([len(c) for c in chip_sets])[:-1])

        results, failures = _run_isolated(embed, per_photo, self.stage.value)
        for k, (row, vectors) in enumerate(zip(rows, results, strict=True)):
            if k in failures or vectors is None:
                self._fail(out, row, failures.get(k, "no result"))
                continue
            embeddings[row] = np.ascontiguousarray(vectors, dtype=np.float32)
        out["face_embeddings"] = embeddings
        return self._finish(out, started)


class EmotionUDF(_ModelUDF):
    """Seven emotion probabilities per face (``schemas.emotions.EMOTIONS`` order) from the dlib150 chips.

    The aligned chips serve the emotion model at least as well as fer's own box crops: on the smiling
    and neutral portraits of the emotion tests P(happy) is 0.98-1.00 vs 0.00-0.17 with them (fer-style
    crops of the same MTCNN boxes: 0.97-1.00 vs 0.00-0.58). Drops ``face_chips`` on the way out.
    """

    stage = Stage.EMOTION
    role = "emotion"

    def __init__(self, config: EmotionConfig) -> None:
        super().__init__(config)
        from photolens.models.emotion import EmotionClassifier
        from photolens.models.emotion import EmotionConfig as ModelEmotionConfig

        store = config.store()
        entry = store.entry(config.model)
        weights = _file(store, entry, (".hdf5", ".h5"), "Keras weights")
        model_cfg = ModelEmotionConfig(batch_size=config.batch_size, channels_last=config.channels_last,
                                       bf16=config.bf16)
        self.model = EmotionClassifier.from_hdf5(weights, model_cfg, device=config.device, version=entry.version)
        self.tag = f"{self.model.name}@{self.model.version}"
        self.n_classes = len(self.model.labels)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out, rows, started = self._begin(batch)
        n = len(out["status"])
        emotions = np.empty(n, dtype=object)
        for i in range(n):
            emotions[i] = np.zeros((0, self.n_classes), dtype=np.float32)
        if "face_chips" not in batch:
            raise KeyError("EmotionUDF needs the face_chips column of FacesUDF before it")
        chip_col = batch["face_chips"]
        rows = [r for r in rows if len(chip_col[r])]
        per_photo = [np.asarray(chip_col[r], dtype=np.uint8) for r in rows]

        def predict(chip_sets: list[np.ndarray]) -> list[np.ndarray]:
            probs = self.model.predict(np.concatenate(chip_sets))
            return np.split(probs, np.cumsum([len(c) for c in chip_sets])[:-1])

        results, failures = _run_isolated(predict, per_photo, self.stage.value)
        for k, (row, probs) in enumerate(zip(rows, results, strict=True)):
            if k in failures or probs is None:
                self._fail(out, row, failures.get(k, "no result"))
                continue
            emotions[row] = np.ascontiguousarray(probs, dtype=np.float32)
        out["face_emotions"] = emotions
        # The chips are biometric pixels: nothing downstream needs them and the writer must not see them.
        out.pop("face_chips", None)
        return self._finish(out, started)


# ---------------------------------------------------------------------------------------------- fused


@dataclass(frozen=True)
class RecognizeConfig:
    """Every selected model stage in one actor (:class:`RecognizeUDF`)."""

    stages: tuple[str, ...] = MODEL_STAGES
    model_store: str | None = None
    device: str = "cpu"
    s3: S3Settings | None = None
    options: RecognizeOptions = field(default_factory=RecognizeOptions)
    # Photos per forward pass of the photo-level stages; None: each stage's default.
    batch_size: int | None = None
    # Decode the JPEGs on ``device`` (photolens.udfs.gpudecode) from the bytes the CPU decode stage
    # validated in header mode (``DecodeConfig(pixels=False)``); what the device declines is decoded
    # on the CPU in this actor.
    gpu_decode: bool = False
    working_size: int = 1024
    decode_time_limit_s: float | None = 10.0
    # torch intra-op threads on a CPU device; None: the CPUs Ray assigned this actor, rounded up.
    num_threads: int | None = None

    def __post_init__(self) -> None:
        required_models(self.stages, self.options)  # unknown stage names fail here, on the driver
        if not self.stages:
            raise ValueError("RecognizeConfig needs at least one model stage")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {self.num_threads}")
        torch.device(self.device)


def _assigned_cpus() -> float | None:
    """CPUs Ray assigned the current actor (None outside a Ray worker, e.g. on a driver with Ray running)."""
    try:
        import ray
    except ImportError:
        return None
    if not ray.is_initialized():
        return None
    ctx = ray.get_runtime_context()
    if ctx.worker.mode != ray.WORKER_MODE:
        return None
    return float(ray.get_runtime_context().get_assigned_resources().get("CPU", 0.0)) or None


def _use_cpu_threads(num_threads: int | None) -> int:
    """torch's intra-op threads for this actor: ``num_threads``, else its Ray CPUs rounded up (>= 1).

    Ray sets ``OMP_NUM_THREADS`` from the actor's CPU request, and a fractional request (what small
    clusters give after :func:`photolens.jobs.tag.fit_cpus`) becomes one thread: the fused model actor
    would leave cores idle that fetch and decode (short, mostly I/O) do not use.
    """
    n = num_threads if num_threads is not None else max(math.ceil((_assigned_cpus() or 1.0) - 1e-9), 1)
    torch.set_num_threads(n)
    # Interop threads can only be set before the first parallel op of the process; a reused worker
    # keeps its first setting, which is harmless.
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(n)
    cv2.setNumThreads(n)
    return n


class RecognizeUDF:
    """detect → scene → landmark → faces → embed → emotion of each photo in one actor.

    The stages are the per-stage UDF objects of :func:`stage_udfs`, called one after the other on the
    batch, so each keeps its columns, its ``<stage>_seconds`` timing and its per-row failure isolation
    (a photo one stage marked ``MODEL_FAILED`` is skipped by the stages after it). ``image`` (and, with
    ``gpu_decode``, the ``jpeg`` bytes) leave with the last stage: the writer receives small rows only.
    """

    def __init__(self, config: RecognizeConfig) -> None:
        self.config = config
        if torch.device(config.device).type == "cpu":
            _use_cpu_threads(config.num_threads)
        self.stages: list[_ModelUDF] = [
            cls(cfg) for cls, cfg in stage_udfs(config.stages, config.model_store, config.device, config.s3,
                                                config.options, batch_size=config.batch_size)
        ]
        self._finish_on_device: Callable[..., tuple[list[Any], dict[str, np.ndarray]]] | None = None
        if config.gpu_decode:
            try:
                from photolens.udfs.gpudecode import finish_on_device
            except ImportError as exc:
                raise ValueError(f"gpu_decode is on but photolens.udfs.gpudecode cannot be imported ({exc}); "
                                 "turn gpu_decode off") from exc
            self._finish_on_device = finish_on_device

    @property
    def tags(self) -> dict[str, str]:
        """Model version per role, as the stages stamp them."""
        return {stage.role: stage.tag for stage in self.stages}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._finish_on_device is not None:
            batch = self._device_decode(batch)
        for stage in self.stages:
            batch = stage(batch)
        batch.pop("jpeg", None)
        return batch

    def _device_decode(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Working images for the rows whose pixels the CPU decode stage (header mode) deferred.

        :func:`photolens.udfs.gpudecode.finish_on_device` decodes the validated ``jpeg`` bytes on the
        device (rows it declines are decoded on the CPU or become decode error rows there). The models
        take host arrays, so the working images come back to the host once: the full-size decode is
        what the device takes off the CPUs.
        """
        from photolens.udfs.decode import DecodeConfig

        assert self._finish_on_device is not None
        started = time.perf_counter()
        n = len(batch["status"])
        batch = dict(batch)
        if "jpeg" in batch:
            # An all-null Arrow column reaches a UDF as NaNs: only bytes are bytes to decode.
            jpeg = np.full(n, None, dtype=object)
            for i, value in enumerate(batch["jpeg"]):
                jpeg[i] = _bytes_of(value)
            batch["jpeg"] = jpeg
        # The decoder fills these in place: text columns must hold str/None (not an all-null column's NaNs),
        # and the images one array per row (Ray hands equal-shaped images, e.g. all empty, as one ndarray).
        for name in ("status", "error_code", "error_stage", "error_detail", "format", "taken_at", "phash"):
            if name in batch:
                batch[name] = text_column(batch[name], n)
        images = np.empty(n, dtype=object)
        for i in range(n):
            images[i] = batch["image"][i] if "image" in batch else np.zeros((0, 0, 3), dtype=np.uint8)
        batch["image"] = images
        cpu_cfg = DecodeConfig(working_size=self.config.working_size, time_limit_s=self.config.decode_time_limit_s,
                               pixels=False)
        tensors, out = self._finish_on_device(batch, cpu_cfg, self.config.device)
        image = np.empty(n, dtype=object)
        for i, tensor in enumerate(tensors):
            image[i] = (np.ascontiguousarray(tensor.detach().to("cpu").numpy(), dtype=np.uint8) if tensor is not None
                        else np.zeros((0, 0, 3), dtype=np.uint8))
        out["image"] = image
        seconds = np.asarray(out.get("decode_seconds", np.zeros(n, np.float32)), dtype=np.float32).copy()
        out["decode_seconds"] = seconds + np.float32((time.perf_counter() - started) / max(n, 1))
        for name in ("work_width", "work_height"):
            out.pop(name, None)
        return out


def _bytes_of(value: object) -> bytes | None:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value) if len(value) else None
    if isinstance(value, np.ndarray) and value.dtype == np.uint8 and value.size:
        return value.tobytes()
    return None


