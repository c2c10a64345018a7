"""Detection quality on COCO-format data: AP per class, mAP and recall, strict or with related categories.

Inputs are the usual COCO documents: ground truth ``{"images", "annotations", "categories"}`` with
pixel boxes ``[x, y, w, h]``, and a list of predictions ``{"image_id", "category_id" | "category",
"bbox", "score"}`` (a prediction may name its class instead of giving an id, so a detector can emit
classes the ground truth has no id for, such as "canary" against a "bird" annotation).

Method (seed 003_c5aa6a2958f22570.txt: correctness by IoU over a threshold, PR curve -> AP, mean over
classes -> mAP):

* For each class with at least one (non-crowd) ground-truth box, predictions of that class over all
  images are taken in descending score order; each is matched to the unmatched ground-truth box of
  the same class and image with the highest IoU >= threshold (true positive), otherwise it is a false
  positive. A prediction that only overlaps an ``iscrowd`` region (intersection over the
  prediction's area >= threshold, as in COCO) is ignored rather than counted false.
* AP is the area under the all-point interpolated PR curve (each precision replaced by the best
  precision at any higher recall; the PASCAL VOC 2010+ rule). mAP is the mean over those classes.
* Recall per class is matched ground truth / ground truth, counting predictions with score >=
  ``recall_score_threshold`` (0 by default, i.e. the end point of the PR curve).

**Related mode** (seed 000_0fb00c7dd830498f.txt reports both "strict" and "related categories"
metrics: confusions such as canary - bird or cat - animal are not errors). Before matching, at each
IoU threshold, a prediction that overlaps no ground-truth box of its own class (IoU >= threshold)
takes the class of the best-overlapping ground-truth box in the same image whose class is related
to its own (:meth:`photolens.schemas.taxonomy.CategoryTree.related`). It is then matched as above,
so it is a true positive if that box is still unmatched and a duplicate (false positive) if another
prediction already took it. Classes missing from the tree are related only to themselves.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from photolens.schemas.taxonomy import CategoryTree

Mode = Literal["strict", "related"]


@dataclass(frozen=True)
class EvalConfig:
    iou_thresholds: tuple[float, ...] = (0.5, 0.75)
    mode: Mode = "strict"
    # Related mode only: also accept a sibling under the same non-root parent (see taxonomy.py).
    related_siblings: bool = False
    recall_score_threshold: float = 0.0

    def __post_init__(self) -> None:
        if not self.iou_thresholds or not all(0.0 < t <= 1.0 for t in self.iou_thresholds):
            raise ValueError(f"iou_thresholds must be non-empty and in (0, 1], got {self.iou_thresholds}")
        if self.mode not in ("strict", "related"):
            raise ValueError(f"mode must be 'strict' or 'related', got {self.mode!r}")


@dataclass(frozen=True)
class ThresholdMetrics:
    """Metrics at one IoU threshold. Per-class dicts cover the classes with ground truth."""

    iou_threshold: float
    ap: dict[str, float]
    recall: dict[str, float]
    true_positives: dict[str, int]
    false_positives: dict[str, int]
    map: float
    mean_recall: float


@dataclass(frozen=True)
class DetectionEvalResult:
    mode: Mode
    n_gt: dict[str, int]  # non-crowd ground-truth boxes per class (classes with none are left out)
    n_images: int
    n_predictions: int
    thresholds: tuple[ThresholdMetrics, ...] = field(default_factory=tuple)

    def at(self, iou_threshold: float) -> ThresholdMetrics:
        for metrics in self.thresholds:
            if math.isclose(metrics.iou_threshold, iou_threshold):
                return metrics
        raise KeyError(f"IoU threshold {iou_threshold} was not evaluated")

    def summary(self) -> dict[str, float]:
        """``{"mAP@0.50": .., "recall@0.50": .., ...}`` for run records and reports."""
        out: dict[str, float] = {}
        for m in self.thresholds:
            out[f"mAP@{m.iou_threshold:.2f}"] = m.map
            out[f"recall@{m.iou_threshold:.2f}"] = m.mean_recall
        return out

    def to_rows(self) -> list[dict[str, Any]]:
        """One row per (class, IoU threshold): a table for notebooks and run reports."""
        return [
            {
                "mode": self.mode,
                "iou_threshold": m.iou_threshold,
                "category": cat,
                "n_gt": self.n_gt[cat],
                "ap": m.ap[cat],
                "recall": m.recall[cat],
                "tp": m.true_positives[cat],
                "fp": m.false_positives[cat],
            }
            for m in self.thresholds
            for cat in sorted(self.n_gt)
        ]


# ------------------------------------------------------------------------------------------ geometry


def xywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    return np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], axis=1)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix of ``(n, 4)`` and ``(m, 4)`` boxes in ``(x0, y0, x1, y1)`` (continuous coordinates)."""
    inter = _intersection(a, b)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _intersection(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    wh = np.minimum(a[:, None, 2:], b[None, :, 2:]) - np.maximum(a[:, None, :2], b[None, :, :2])
    wh = np.clip(wh, 0.0, None)
    return wh[..., 0] * wh[..., 1]


def _crowd_overlap(pred: np.ndarray, crowd: np.ndarray) -> np.ndarray:
    # COCO scores a detection against a crowd region by intersection over the detection's own area:
    # a box on one member of a crowd is not a false positive.
    inter = _intersection(pred, crowd)
    area = ((pred[:, 2] - pred[:, 0]) * (pred[:, 3] - pred[:, 1]))[:, None]
    return np.divide(inter, area, out=np.zeros_like(inter), where=area > 0)


def average_precision(recall: Sequence[float] | np.ndarray, precision: Sequence[float] | np.ndarray) -> float:
    """Area under the all-point interpolated PR curve (points in descending-score order)."""
    rec = np.concatenate([[0.0], np.asarray(recall, np.float64), [1.0]])
    prec = np.concatenate([[0.0], np.asarray(precision, np.float64), [0.0]])
    # Envelope: precision at recall r becomes the best precision at any recall >= r.
    prec = np.maximum.accumulate(prec[::-1])[::-1]
    steps = np.nonzero(rec[1:] != rec[:-1])[0]
    return float(np.sum((rec[steps + 1] - rec[steps]) * prec[steps + 1]))


# -------------------------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class _Gt:
    boxes: np.ndarray  # (n, 4) xyxy
    categories: list[str]
    crowd: np.ndarray  # bool (n,)


@dataclass(frozen=True)
class _Pred:
    image_id: Any
    box: np.ndarray  # (4,) xyxy
    category: str
    score: float
    order: int  # input position: ties in score keep input order, so results are reproducible


def _bbox(value: Any, what: str) -> np.ndarray:
    box = np.asarray(value, np.float64)
    if box.shape != (4,) or not np.all(np.isfinite(box)) or box[2] < 0 or box[3] < 0:
        raise ValueError(f"{what}: bbox must be 4 finite numbers [x, y, w, h] with w, h >= 0, got {value!r}")
    return xywh_to_xyxy(box)[0]


def _parse_gt(gt: Mapping[str, Any]) -> tuple[dict[Any, _Gt], dict[int, str]]:
    try:
        id_to_name = {int(c["id"]): str(c["name"]) for c in gt["categories"]}
        image_ids = [img["id"] for img in gt["images"]]
        annotations = gt["annotations"]
    except (KeyError, TypeError) as err:
        raise ValueError(f"ground truth is not a COCO document (images/annotations/categories): {err}") from err
    if len(set(id_to_name.values())) != len(id_to_name):
        raise ValueError("ground-truth categories repeat a name")
    per_image: dict[Any, tuple[list[np.ndarray], list[str], list[bool]]] = {i: ([], [], []) for i in image_ids}
    for ann in annotations:
        what = f"annotation {ann.get('id', '?')}"
        if ann.get("image_id") not in per_image:
            raise ValueError(f"{what}: unknown image_id {ann.get('image_id')!r}")
        if ann.get("category_id") not in id_to_name:
            raise ValueError(f"{what}: unknown category_id {ann.get('category_id')!r}")
        boxes, cats, crowd = per_image[ann["image_id"]]
        boxes.append(_bbox(ann.get("bbox"), what))
        cats.append(id_to_name[ann["category_id"]])
        crowd.append(bool(ann.get("iscrowd", 0)))
    parsed = {
        image_id: _Gt(np.asarray(b, np.float64).reshape(-1, 4), c, np.asarray(w, bool))
        for image_id, (b, c, w) in per_image.items()
    }
    return parsed, id_to_name


def _parse_predictions(
    predictions: Iterable[Mapping[str, Any]], images: Mapping[Any, _Gt], id_to_name: Mapping[int, str]
) -> list[_Pred]:
    out = []
    for i, p in enumerate(predictions):
        what = f"prediction #{i}"
        if p.get("image_id") not in images:
            raise ValueError(f"{what}: image_id {p.get('image_id')!r} is not in the ground truth")
        name = p.get("category")
        cid = p.get("category_id")
        if cid in id_to_name:
            if name is not None and name != id_to_name[cid]:
                raise ValueError(f"{what}: category {name!r} contradicts category_id {cid} ({id_to_name[cid]!r})")
            name = id_to_name[cid]
        elif cid is not None and name is None:
            # With a name as well, an id outside the ground truth's list is fine (a detector emits all
            # 80 COCO classes against a subset); alone it cannot be named.
            raise ValueError(f"{what}: unknown category_id {cid!r} (give a 'category' name instead)")
        if not isinstance(name, str):
            raise ValueError(f"{what}: needs a 'category_id' or a 'category' name")
        score = float(p["score"]) if "score" in p else math.nan
        if not math.isfinite(score):
            raise ValueError(f"{what}: needs a finite 'score'")
        out.append(_Pred(p["image_id"], _bbox(p.get("bbox"), what), name, score, i))
    return out


# ---------------------------------------------------------------------------------------- evaluation


def _relabel_related(
    preds: list[_Pred],
    images: Mapping[Any, _Gt],
    iou_threshold: float,
    tree: CategoryTree,
    siblings: bool,
) -> list[_Pred]:
    cache: dict[tuple[str, str], bool] = {}

    def related(a: str, b: str) -> bool:
        key = (a, b)
        if key not in cache:
            cache[key] = a == b or (a in tree and b in tree and tree.related(a, b, siblings=siblings))
        return cache[key]

    out = []
    for p in preds:
        gt = images[p.image_id]
        keep = [i for i in range(len(gt.categories)) if not gt.crowd[i]]
        if not keep:
            out.append(p)
            continue
        ious = box_iou(p.box[None, :], gt.boxes[keep])[0]
        cats = [gt.categories[i] for i in keep]
        hits = ious >= iou_threshold
        if any(h and c == p.category for h, c in zip(hits, cats, strict=True)):
            out.append(p)  # its own class is there: nothing to forgive
            continue
        best, best_iou = None, -1.0
        for iou, c, hit in zip(ious, cats, hits, strict=True):
            if hit and iou > best_iou and related(p.category, c):
                best, best_iou = c, float(iou)
        out.append(p if best is None else _Pred(p.image_id, p.box, best, p.score, p.order))
    return out


def _evaluate_threshold(
    preds: list[_Pred], images: Mapping[Any, _Gt], n_gt: Mapping[str, int], t: float, recall_score: float
) -> ThresholdMetrics:
    by_class: dict[str, list[_Pred]] = defaultdict(list)
    for p in preds:
        if p.category in n_gt:  # classes without ground truth have no AP (as in COCO)
            by_class[p.category].append(p)
    ap, recall, tps, fps = {}, {}, {}, {}
    for cat, total in n_gt.items():
        ranked = sorted(by_class.get(cat, []), key=lambda p: (-p.score, p.order))
        taken: dict[Any, np.ndarray] = {}
        tp = np.zeros(len(ranked), bool)
        fp = np.zeros(len(ranked), bool)
        for k, p in enumerate(ranked):
            gt = images[p.image_id]
            mine = np.array([c == cat for c in gt.categories], bool)
            real = np.nonzero(mine & ~gt.crowd)[0]
            used = taken.setdefault(p.image_id, np.zeros(len(gt.categories), bool))
            if len(real):
                ious = box_iou(p.box[None, :], gt.boxes[real])[0]
                ious[used[real]] = -1.0
                j = int(np.argmax(ious))
                if ious[j] >= t:
                    used[real[j]] = True
                    tp[k] = True
                    continue
            crowd = np.nonzero(mine & gt.crowd)[0]
            if len(crowd) and _crowd_overlap(p.box[None, :], gt.boxes[crowd]).max() >= t:
                continue  # neither right nor wrong
            fp[k] = True
        counted = tp | fp
        ctp, cfp = np.cumsum(tp[counted]), np.cumsum(fp[counted])
        rec = ctp / total
        prec = ctp / np.maximum(ctp + cfp, 1)
        ap[cat] = average_precision(rec, prec) if len(rec) else 0.0
        scores = np.array([p.score for p in ranked])
        recall[cat] = float(np.sum(tp & (scores >= recall_score))) / total if ranked else 0.0
        tps[cat], fps[cat] = int(tp.sum()), int(fp.sum())
    return ThresholdMetrics(
        iou_threshold=t,
        ap=ap,
        recall=recall,
        true_positives=tps,
        false_positives=fps,
        map=float(np.mean(list(ap.values()))),
        mean_recall=float(np.mean(list(recall.values()))),
    )


def evaluate(
    ground_truth: Mapping[str, Any],
    predictions: Iterable[Mapping[str, Any]],
    config: EvalConfig | None = None,
    tree: CategoryTree | None = None,
) -> DetectionEvalResult:
    """Evaluate COCO-format predictions against COCO-format ground truth (see the module docstring)."""
    config = config or EvalConfig()
    images, id_to_name = _parse_gt(ground_truth)
    preds = _parse_predictions(predictions, images, id_to_name)
    n_gt: dict[str, int] = defaultdict(int)
    for gt in images.values():
        for cat, crowd in zip(gt.categories, gt.crowd, strict=True):
            if not crowd:
                n_gt[cat] += 1
    if not n_gt:
        raise ValueError("the ground truth has no (non-crowd) boxes: nothing to evaluate")
    related_tree = (tree or CategoryTree.load()) if config.mode == "related" else None
    metrics = []
    for t in config.iou_thresholds:
        labelled = preds
        if related_tree is not None:
            labelled = _relabel_related(preds, images, t, related_tree, config.related_siblings)
        metrics.append(_evaluate_threshold(labelled, images, n_gt, t, config.recall_score_threshold))
    return DetectionEvalResult(
        mode=config.mode,
        n_gt=dict(n_gt),
        n_images=len(images),
        n_predictions=len(preds),
        thresholds=tuple(metrics),
    )


# ----------------------------------------------------------------------------------- files and models


class _Detector(Protocol):
    name: str

    def detect(self, images: Sequence[np.ndarray]) -> Sequence[Any]: ...


def predict_coco_images(
    detector: _Detector, ground_truth: Mapping[str, Any], image_root: str | Path, batch_size: int = 8
) -> list[dict[str, Any]]:
    """Run a detector (``SsdMobileNetCoco`` / ``TorchvisionDetector``) over the images of a COCO
    document (``file_name`` under ``image_root``) and return COCO prediction records.

    EXIF orientation is deliberately not applied: COCO boxes are drawn on the stored pixels.
    """
    from PIL import Image  # only this helper decodes files

    root = Path(image_root)
    records: list[dict[str, Any]] = []
    entries = list(ground_truth["images"])
    for start in range(0, len(entries), batch_size):
        chunk = entries[start : start + batch_size]
        pixels = []
        for entry in chunk:
            with Image.open(root / entry["file_name"]) as img:
                pixels.append(np.asarray(img.convert("RGB")))
        for entry, img, dets in zip(chunk, pixels, detector.detect(pixels), strict=True):
            records.extend(dets.to_coco(entry["id"], width=img.shape[1], height=img.shape[0]))
    return records


def evaluate_files(
    annotations: str | Path, predictions: str | Path, config: EvalConfig | None = None
) -> DetectionEvalResult:
    """:func:`evaluate` on a COCO annotation JSON and a JSON list of predictions."""
    gt = json.loads(Path(annotations).read_text(encoding="utf-8"))
    preds = json.loads(Path(predictions).read_text(encoding="utf-8"))
    if not isinstance(preds, list):
        raise ValueError(f"{predictions}: expected a JSON list of predictions")
    return evaluate(gt, preds, config)


def format_report(result: DetectionEvalResult) -> str:
    """A plain-text table: one line per class with AP and recall at each IoU threshold."""
    ts = [m.iou_threshold for m in result.thresholds]
    head = ["category", "n_gt"] + [f"AP@{t:.2f}" for t in ts] + [f"R@{t:.2f}" for t in ts]
    lines = [
        f"detection eval ({result.mode}): {result.n_images} images, {sum(result.n_gt.values())} boxes, "
        f"{result.n_predictions} predictions",
        "  ".join(f"{h:>14}" for h in head),
    ]
    for cat in sorted(result.n_gt):
        cells = [cat, str(result.n_gt[cat])]
        cells += [f"{m.ap[cat]:.3f}" for m in result.thresholds]
        cells += [f"{m.recall[cat]:.3f}" for m in result.thresholds]
        lines.append("  ".join(f"{c:>14}" for c in cells))
    cells = ["mean", str(sum(result.n_gt.values()))]
    cells += [f"{m.map:.3f}" for m in result.thresholds] + [f"{m.mean_recall:.3f}" for m in result.thresholds]
    lines.append("  ".join(f"{c:>14}" for c in cells))
    return "\n".join(lines)
