"""``photolens eval``: quality of the recognition models on labelled data, with the pipeline's own chain.

* ``eval faces``: face verification on labelled pairs (``file_x,file_y,Decision`` with Yes/No, the
  deepface ``master.csv`` layout). Each photo goes through the tagging pipeline's decode, MTCNN,
  dlib150 alignment and the face embedder; its main face (the largest confident one) is compared by
  cosine similarity. Reported: ROC AUC, the best accuracy over thresholds and its threshold, and TAR at
  FAR = 1e-2. A photo where no face is found scores -1 in all its pairs (a failure to enrol is a reject,
  not a skipped pair) and is counted.
* ``eval detection``: mAP and recall at IoU 0.5 and 0.75 on a COCO annotation file, strict and with
  related categories (seed 000_0fb00c7dd830498f.txt reports both), via ``photolens.models.eval_detection``.

``eval clustering`` (face clustering quality: ARI/AMI/F-measure) lives with the people job
(``photolens.jobs.people``); every ``eval`` flag is defined in ``photolens.jobs.commands``.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from photolens.models.store import ModelStore, default_store_uri
from photolens.udfs.decode import DecodeConfig, decode_photo
from photolens.udfs.recognize import DEFAULT_MODELS

Handler = Callable[[argparse.Namespace], int]
# MTCNN's O-Net score above which a face counts as confident when choosing a photo's main face.
MAIN_FACE_MIN_SCORE = 0.9
FAR_TARGET = 1e-2


# ---------------------------------------------------------------------------------------------- faces


def read_pairs(pairs_csv: Path) -> list[tuple[str, str, bool]]:
    """``(file_x, file_y, same person)`` from a CSV with columns file_x, file_y, Decision (Yes/No)."""
    with Path(pairs_csv).open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"file_x", "file_y", "Decision"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{pairs_csv}: missing column(s) {sorted(missing)} (need file_x, file_y, Decision)")
        pairs = []
        for lineno, row in enumerate(reader, start=2):
            decision = row["Decision"].strip().lower()
            if decision not in ("yes", "no"):
                raise ValueError(f"{pairs_csv}:{lineno}: Decision must be Yes or No, got {row['Decision']!r}")
            pairs.append((row["file_x"].strip(), row["file_y"].strip(), decision == "yes"))
    if not pairs:
        raise ValueError(f"{pairs_csv}: no pairs")
    return pairs


def main_face(boxes: np.ndarray, scores: np.ndarray) -> int | None:
    """Index of the photo's main face: the largest box among confident faces, else the best score."""
    if len(scores) == 0:
        return None
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    confident = np.flatnonzero(scores >= MAIN_FACE_MIN_SCORE)
    if confident.size:
        return int(confident[np.argmax(area[confident])])
    return int(np.argmax(scores))


class FaceChain:
    """decode → MTCNN → dlib150 alignment → embedder, as the tagging job's faces stages run it."""

    def __init__(self, store_uri: str | None = None, device: str = "cpu", batch_size: int = 8) -> None:
        from photolens.models.face_embed import FaceEmbedder
        from photolens.models.mtcnn import MTCNN

        store = ModelStore(store_uri or default_store_uri())
        mtcnn = store.entry(DEFAULT_MODELS["faces"])
        embed = store.entry(DEFAULT_MODELS["embed"])
        self.detector = MTCNN.from_files(*(store.local_path(mtcnn.name, f"{n}.pt") for n in ("pnet", "rnet", "onet")),
                                         device=device)
        dat = next(f.name for f in embed.files if f.name.endswith(".dat"))
        self.embedder = FaceEmbedder.from_dat(store.local_path(embed.name, dat), device=device)
        self.models = {"faces": f"{self.detector.name}@{mtcnn.version}",
                       "embed": f"{self.embedder.name}@{self.embedder.version}"}
        self.decode_cfg = DecodeConfig()
        self.batch_size = batch_size

    def embed_files(self, paths: Sequence[Path]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        """``{file name: unit embedding}`` of each photo's main face, and ``{file name: why not}``."""
        from photolens.models.face_align import align

        found: dict[str, np.ndarray] = {}
        missing: dict[str, str] = {}
        for start in range(0, len(paths), self.batch_size):
            chunk = paths[start : start + self.batch_size]
            names, images = [], []
            for path in chunk:
                if not path.is_file():
                    missing[path.name] = "file not found"
                    continue
                result = decode_photo(path.read_bytes(), self.decode_cfg)
                if not result.ok:
                    missing[path.name] = f"decode: {result.error_code}"
                    continue
                names.append(path.name)
                images.append(result.image)
            chips, owners = [], []
            for name, image, dets in zip(names, images, self.detector.detect(images), strict=True):
                k = main_face(dets.boxes, dets.scores)
                if k is None:
                    missing[name] = "no face"
                    continue
                chips.append(align(image, dets.points[k], "dlib150"))
                owners.append(name)
            if chips:
                for name, vec in zip(owners, self.embedder.embed(np.stack(chips)), strict=True):
                    found[name] = vec
        return found, missing


def verification_metrics(scores: np.ndarray, same: np.ndarray, far_target: float = FAR_TARGET) -> dict[str, float]:
    """ROC AUC, best accuracy and its threshold (accept score >= t), TAR at FAR <= ``far_target``."""
    from sklearn.metrics import roc_auc_score, roc_curve

    scores = np.asarray(scores, dtype=np.float64)
    same = np.asarray(same, dtype=bool)
    if same.all() or not same.any():
        raise ValueError("verification metrics need both same-person and different-person pairs")
    auc = float(roc_auc_score(same, scores))
    # Accuracy at every threshold that changes a decision: midpoints between sorted distinct scores.
    values = np.unique(scores)
    cuts = np.concatenate([[values[0] - 1e-6], (values[:-1] + values[1:]) / 2.0, [values[-1] + 1e-6]])
    accepted = scores[None, :] >= cuts[:, None]
    accuracy = (accepted == same[None, :]).mean(axis=1)
    best = int(np.argmax(accuracy))
    fpr, tpr, thresholds = roc_curve(same, scores)
    ok = np.flatnonzero(fpr <= far_target)
    at = ok[np.argmax(tpr[ok])]
    return {
        "roc_auc": auc,
        "best_accuracy": float(accuracy[best]),
        "best_threshold": float(cuts[best]),
        "far_target": far_target,
        "tar_at_far": float(tpr[at]),
        "far_achieved": float(fpr[at]),
        "threshold_at_far": float(min(thresholds[at], 1.0)),
    }


def eval_faces(pairs_csv: Path, images_root: Path, store_uri: str | None = None, device: str = "cpu") -> dict[str, Any]:
    """Verification quality of the full face chain on labelled pairs (see the module docstring)."""
    started = time.perf_counter()
    pairs = read_pairs(Path(pairs_csv))
    files = sorted({name for a, b, _ in pairs for name in (a, b)})
    chain = FaceChain(store_uri, device=device)
    embeddings, missing = chain.embed_files([Path(images_root) / name for name in files])
    scores = np.array([float(embeddings[a] @ embeddings[b]) if a in embeddings and b in embeddings else -1.0
                       for a, b, _ in pairs])
    same = np.array([s for _, _, s in pairs], dtype=bool)
    metrics = verification_metrics(scores, same)
    return {
        **metrics,
        "n_pairs": len(pairs),
        "n_same": int(same.sum()),
        "n_different": int((~same).sum()),
        "n_images": len(files),
        "n_images_without_face": len(missing),
        "images_without_face": missing,
        "n_pairs_without_face": int(sum(1 for a, b, _ in pairs if a not in embeddings or b not in embeddings)),
        "models": chain.models,
        "seconds": round(time.perf_counter() - started, 2),
    }


def format_faces(result: dict[str, Any]) -> str:
    lines = [
        f"face verification: {result['n_pairs']} pairs ({result['n_same']} same, {result['n_different']} different) "
        f"over {result['n_images']} photos; models {result['models']['faces']}, {result['models']['embed']}",
        f"  {'ROC AUC':<26}{result['roc_auc']:.4f}",
        f"  {'best accuracy':<26}{result['best_accuracy']:.4f}  (cosine >= {result['best_threshold']:.4f})",
        f"  {'TAR @ FAR ' + format(result['far_target'], 'g'):<26}{result['tar_at_far']:.4f}  "
        f"(FAR {result['far_achieved']:.4f}, cosine >= {result['threshold_at_far']:.4f})",
        f"  photos without a face: {result['n_images_without_face']} "
        f"({result['n_pairs_without_face']} pairs scored -1)",
        f"  {result['seconds']:.1f} s",
    ]
    for name, why in sorted(result["images_without_face"].items()):
        lines.append(f"    {name}: {why}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- detection


def load_detector(store_uri: str | None, model: str = DEFAULT_MODELS["detect"], score_threshold: float = 0.05,
                  device: str = "cpu", arch: str | None = None) -> Any:
    """The detection stage's model from the store, with the given score threshold."""
    from photolens.udfs.recognize import DetectConfig, DetectUDF

    udf = DetectUDF(DetectConfig(model_store=store_uri, device=device, model=model, arch=arch,
                                 score_threshold=score_threshold))
    return udf.detector


def eval_detection(annotations_json: Path, images_root: Path, store_uri: str | None = None,
                   score_threshold: float = 0.05, model: str = DEFAULT_MODELS["detect"], device: str = "cpu",
                   arch: str | None = None) -> dict[str, Any]:
    """mAP/recall at IoU 0.5 and 0.75, strict and related, of the store's detector on a COCO file.

    ``score_threshold`` is low by default so the PR curves are complete (the pipeline runs at 0.5).
    """
    from photolens.models.eval_detection import EvalConfig, evaluate, predict_coco_images

    started = time.perf_counter()
    gt = json.loads(Path(annotations_json).read_text(encoding="utf-8"))
    detector = load_detector(store_uri, model, score_threshold, device, arch)
    predictions = predict_coco_images(detector, gt, images_root)
    out: dict[str, Any] = {"model": f"{detector.name}@{detector.version}", "score_threshold": score_threshold,
                           "n_predictions": len(predictions)}
    for mode in ("strict", "related"):
        res = evaluate(gt, predictions, EvalConfig(iou_thresholds=(0.5, 0.75), mode=mode))
        out["n_images"] = res.n_images
        out["n_gt"] = res.n_gt
        out[mode] = {
            **{k.replace("@0.50", "@0.5"): v for k, v in res.summary().items()},
            "per_class": res.to_rows(),
        }
    out["seconds"] = round(time.perf_counter() - started, 2)
    return out


def format_detection(result: dict[str, Any]) -> str:
    head = f"{'category':<16}{'n_gt':>6}" + "".join(
        f"{m + ' AP@' + t:>16}" for m in ("strict", "related") for t in ("0.5", "0.75"))
    lines = [f"detection: {result['model']} on {result['n_images']} images, {sum(result['n_gt'].values())} boxes, "
             f"{result['n_predictions']} predictions (score >= {result['score_threshold']:g})", head]
    ap: dict[tuple[str, str, float], float] = {}
    for mode in ("strict", "related"):
        for row in result[mode]["per_class"]:
            ap[(mode, row["category"], row["iou_threshold"])] = row["ap"]
    for cat in sorted(result["n_gt"]):
        cells = "".join(f"{ap[(m, cat, t)]:>16.3f}" for m in ("strict", "related") for t in (0.5, 0.75))
        lines.append(f"{cat:<16}{result['n_gt'][cat]:>6}{cells}")
    cells = "".join(f"{result[m][f'mAP@{t}']:>16.3f}" for m in ("strict", "related") for t in ("0.5", "0.75"))
    lines.append(f"{'mAP':<16}{sum(result['n_gt'].values()):>6}{cells}")
    cells = "".join(f"{result[m][f'recall@{t}']:>16.3f}" for m in ("strict", "related") for t in ("0.5", "0.75"))
    lines.append(f"{'mean recall':<16}{'':>6}{cells}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- CLI


def cmd_faces(args: argparse.Namespace) -> int:
    result = eval_faces(Path(args.pairs), Path(args.images), args.store, device=args.device)
    print(json.dumps(result, indent=2, sort_keys=True) if args.json else format_faces(result))
    return 0


def cmd_detection(args: argparse.Namespace) -> int:
    result = eval_detection(Path(args.annotations), Path(args.images), args.store, args.score_threshold,
                            args.model, device=args.device, arch=args.arch)
    print(json.dumps(result, indent=2, sort_keys=True) if args.json else format_detection(result))
    return 0


def register(sub: Any, extra_eval: Sequence[Callable[[Any], None]] = ()) -> None:
    """Add ``eval faces``, ``eval detection`` and ``eval clustering`` to the CLI's sub-parsers.

    The flags live in ``photolens.jobs.commands`` (importable without torch, for a fast ``--help``).
    ``extra_eval``: functions that add more ``eval`` sub-commands to the ``eval`` sub-parsers.
    """
    from photolens.jobs.commands import register_eval

    register_eval(sub, extra_eval)
