"""Fit the constants that are fitted, on the calibration half of the real test photos only.

    .venv/bin/python tools/calibrate.py            # writes src/photolens/schemas/calibration.json
    .venv/bin/python tools/calibrate.py --check    # exit 1 when the file differs from a fresh fit

The split is ``tests/data/calibration_split.json`` (rule in its ``about``); the photos are ``../shared/data``.
What is fitted here:

* ``scene.<model>.min_coarse_score``: below it the scene classifier abstains. Labels are the hand labels of
  ``tests/data/scene_labels.csv`` (acceptable coarse labels per photo, ``none`` where no place shows). The
  threshold maximises (photos named right - photos named wrong) over the calibration photos: a wrong
  scene costs as much as a right one gains; ties go to the higher threshold (abstain more).
* ``landmark.threshold``: cosine similarity at which a landmark reference matches, by balanced accuracy
  (``models.landmark.calibrate_threshold``) on the calibration photos: same-place pairs are positives,
  every other pair of calibration photos a negative (the box found again in a scene included).

* ``face_align.dlib150``: the five points (and their weights) of the dlib 150x150 chip template, from MTCNN's
  points mapped into dlib's own chip of the same faces on the calibration deepface photos (``fit_dlib150``).

Not fitted (README, Calibration): the quality-weight softness constants of ``models/face_align.py`` are set by
hand from the ranges seen on the deepface portraits, and MTCNN's stage thresholds are facenet-pytorch's
published defaults.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
SPLIT_PATH = ROOT / "tests" / "data" / "calibration_split.json"
SCENE_LABELS_PATH = ROOT / "tests" / "data" / "scene_labels.csv"
OUT_PATH = ROOT / "src" / "photolens" / "schemas" / "calibration.json"
SCENE_MODEL = "mobilenet_v2_imagenet"
SCENE_WEIGHTS = "mobilenet_v2-b0353104.pth"
# Two views of one place: landmark positives. The split keeps each pair on one side, and box.png /
# box_in_scene.png too (one object found again: not a place, so a landmark negative).
SAME_PLACE = (("aero1.jpg", "aero3.jpg"), ("basketball1.png", "basketball2.png"), ("graf1.png", "graf3.png"),
              ("leuvenA.jpg", "leuvenB.jpg"))
KEEP_TOGETHER = (*SAME_PLACE, ("box.png", "box_in_scene.png"))


def load_split(path: Path = SPLIT_PATH) -> dict[str, dict[str, list[str]]]:
    doc = json.loads(path.read_text(encoding="utf-8"))
    return {k: v for k, v in doc.items() if isinstance(v, dict)}


def load_scene_labels(path: Path = SCENE_LABELS_PATH) -> dict[str, frozenset[str]]:
    """``{file: acceptable coarse labels}``; ``none`` among them means abstaining is right."""
    with path.open(newline="", encoding="utf-8") as f:
        return {r["file"]: frozenset(r["scene"].split("|")) for r in csv.DictReader(f)}


def read_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _weights() -> Path:
    from photolens.models.store import PACKAGED, package_folder

    entry = next(p for p in PACKAGED if p.name == SCENE_MODEL)
    folder = package_folder(entry.package)
    return next(folder / rel for rel in entry.files if rel.endswith(SCENE_WEIGHTS))


# ---------------------------------------------------------------------------------------------- scene


def scene_outcomes(best: Sequence[tuple[str | None, float]], labels: Sequence[frozenset[str]],
                   threshold: float) -> dict[str, Any]:
    """Coverage and accuracy at ``threshold`` given each photo's best coarse label and its score.

    ``coverage``: photos named / photos; ``accuracy``: named right / named (None when nothing is named);
    ``abstained_right``: abstentions on photos labelled ``none`` / photos labelled ``none``."""
    named = right = none_total = none_abstained = 0
    for (label, score), ok in zip(best, labels, strict=True):
        names = label is not None and score >= threshold
        named += names
        right += bool(names and label in ok)
        if "none" in ok and len(ok) == 1:
            none_total += 1
            none_abstained += not names
    n = len(best)
    return {"photos": n, "named": named, "right": right, "wrong": named - right,
            "coverage": round(named / n, 4) if n else 0.0,
            "accuracy": round(right / named, 4) if named else None,
            "abstained_on_no_scene": f"{none_abstained}/{none_total}"}


def fit_scene_threshold(best: Sequence[tuple[str | None, float]], labels: Sequence[frozenset[str]]) -> float:
    """The threshold maximising right - wrong; candidates are midpoints between distinct scores (and 1.0,
    which names nothing); ties go to the highest threshold."""
    scores = sorted({round(s, 6) for _, s in best} | {0.0, 1.0})
    candidates = [(a + b) / 2 for a, b in itertools.pairwise(scores)] + [1.0]
    best_t, best_gain = 1.0, 0
    for t in sorted(candidates, reverse=True):
        o = scene_outcomes(best, labels, t)
        gain = o["right"] - o["wrong"]
        if gain > best_gain:
            best_t, best_gain = t, gain
    return round(best_t, 4)


def scene_best(names: Sequence[str]) -> list[tuple[str | None, float]]:
    """Each photo's best coarse label and its probability, by the classifier with abstention off."""
    from photolens.models.scene import SceneClassifier, SceneConfig

    clf = SceneClassifier.from_mobilenet_v2(_weights(), config=SceneConfig(abstain_below=0.0))
    results = clf.classify([read_rgb(DATA / "photos" / n) for n in names])
    return [(next(iter(r.coarse), None), r.coarse_score) for r in results]


def calibrate_scene(split: Mapping[str, Mapping[str, list[str]]]) -> dict[str, Any]:
    labels = load_scene_labels()
    names = [n for n in split["photos"]["calibration"] if n in labels]
    best = scene_best(names)
    ok = [labels[n] for n in names]
    t = fit_scene_threshold(best, ok)
    return {SCENE_MODEL: {"min_coarse_score": t, "fitted_on": "photos/calibration",
                          "objective": "max(named right - named wrong); ties: higher threshold",
                          "calibration": scene_outcomes(best, ok, t)}}


# ---------------------------------------------------------------------------------------------- landmark


def landmark_pair_scores(names: Sequence[str]) -> tuple[list[float], list[float]]:
    """Cosine similarities of same-place pairs (positives) and of every other pair (negatives)."""
    from photolens.models.landmark import LandmarkEmbedder

    emb = LandmarkEmbedder.from_mobilenet_v2(_weights()).embed([read_rgb(DATA / "photos" / n) for n in names])
    sim = emb @ emb.T
    same = {frozenset(p) for p in SAME_PLACE}
    pos: list[float] = []
    neg: list[float] = []
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            (pos if frozenset((names[i], names[j])) in same else neg).append(float(sim[i, j]))
    return pos, neg


def calibrate_landmark(split: Mapping[str, Mapping[str, list[str]]]) -> dict[str, Any]:
    from photolens.models.landmark import balanced_accuracy, calibrate_threshold

    pos, neg = landmark_pair_scores(split["photos"]["calibration"])
    t = round(calibrate_threshold(pos, neg), 4)
    return {"threshold": t, "fitted_on": "photos/calibration", "objective": "balanced accuracy on photo pairs",
            "calibration": {"positive_pairs": len(pos), "negative_pairs": len(neg),
                            "balanced_accuracy": round(balanced_accuracy(pos, neg, t), 4)}}


# ---------------------------------------------------------------------------------------------- dlib150 template


def _load_800(path: Path) -> np.ndarray:
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        img = ImageOps.exif_transpose(im).convert("RGB")
    scale = min(1.0, 800 / max(img.size))
    return np.asarray(img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BILINEAR))


def _dlib_image_to_chip(details: Any) -> np.ndarray:
    """dlib's image -> chip affine (2x3, pixel-centre coordinates) of ``get_face_chip_details``: the chip's
    corners (0,0), (cols-1,0), (cols-1,rows-1) are the rectangle's corners rotated by ``angle`` about its centre
    (dlib's ``get_mapping_to_chip``)."""
    r = details.rect
    cx, cy = (r.left() + r.right()) / 2.0, (r.top() + r.bottom()) / 2.0
    cos, sin = np.cos(details.angle), np.sin(details.angle)

    def rot(x: float, y: float) -> tuple[float, float]:
        dx, dy = x - cx, y - cy
        return cx + cos * dx - sin * dy, cy + sin * dx + cos * dy

    src = np.array([rot(r.left(), r.top()), rot(r.right(), r.top()), rot(r.right(), r.bottom())])
    dst = np.array([[0.0, 0.0], [details.cols - 1.0, 0.0], [details.cols - 1.0, details.rows - 1.0]])
    a = np.hstack([src, np.ones((3, 1))])
    return np.linalg.solve(a, dst).T


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    x0, y0, x1, y1 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
    area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / area) if area > 0 else 0.0


def fit_dlib150(names: Sequence[str]) -> dict[str, Any]:
    """MTCNN's five points mapped into dlib's own 150x150 chip (padding 0.25) of the same face; the template is
    their mean, each point weighted by 1/variance (largest weight 1). Faces: dlib's HOG detector (upsample 1)
    and 5-landmark predictor, where MTCNN found the same face (box IoU > 0.3); photos at long side 800 px."""
    import dlib

    from photolens.models.mtcnn import MTCNN
    from photolens.models.store import PACKAGED, package_folder

    entry = next(p for p in PACKAGED if p.name == "mtcnn")
    folder = package_folder(entry.package)
    nets = [next(folder / rel for rel in entry.files if rel.endswith(f"{n}.pt")) for n in ("pnet", "rnet", "onet")]
    detector = MTCNN.from_files(*nets)
    models = package_folder("face_recognition_models") / "models"
    hog = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(str(models / "shape_predictor_5_face_landmarks.dat"))
    mapped = []
    for name in names:
        img = _load_800(DATA / "faces" / "deepface" / name)
        det = detector.detect([img])[0]
        for rect in hog(img, 1):
            box = np.array([rect.left(), rect.top(), rect.right() + 1, rect.bottom() + 1], dtype=np.float64)
            ious = [_iou(box, np.asarray(b, dtype=np.float64)) for b in det.boxes]
            if not ious or max(ious) <= 0.3:
                continue
            m = _dlib_image_to_chip(dlib.get_face_chip_details(predictor(img, rect), size=150, padding=0.25))
            # Our points are pixel-edge (pixel j spans [j, j+1)); dlib's are pixel centres.
            pts = np.asarray(det.points[int(np.argmax(ious))], dtype=np.float64) - 0.5
            mapped.append(pts @ m[:, :2].T + m[:, 2] + 0.5)
    x = np.stack(mapped)
    mean = x.mean(axis=0)
    var = ((x - mean) ** 2).sum(axis=-1).mean(axis=0)
    weights = (1.0 / var) / (1.0 / var).max()
    return {"points": np.round(mean, 2).tolist(), "weights": np.round(weights, 3).tolist(), "size": 150,
            "fitted_on": "faces/deepface/calibration", "faces": len(x),
            "spread_px": np.round(np.sqrt(var), 2).tolist(),
            "objective": "mean of MTCNN points in dlib's chip; weights 1/variance, largest 1"}


PARTS: Final = ("scene", "landmark", "face_align")


def fit_all(parts: Sequence[str] = PARTS) -> dict[str, Any]:
    """The calibration document, or the named parts of it."""
    split = load_split()
    fits: dict[str, Callable[[], dict[str, Any]]] = {
        "scene": lambda: calibrate_scene(split),
        "landmark": lambda: calibrate_landmark(split),
        "face_align": lambda: {"dlib150": fit_dlib150(split["faces/deepface"]["calibration"])},
    }
    doc: dict[str, Any] = {
        "about": "written by tools/calibrate.py; do not edit by hand (tests/test_calibration.py checks it)",
        "split": str(SPLIT_PATH.relative_to(ROOT)),
    }
    doc.update({name: fits[name]() for name in parts})
    return doc


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--check", action="store_true", help="compare with the stored file instead of writing it")
    args = ap.parse_args(argv)
    if not (DATA / "photos").is_dir():
        print(f"real photos not found at {DATA} (see ../shared/data/README.md)", file=sys.stderr)
        return 2
    doc = fit_all()
    text = json.dumps(doc, indent=1, sort_keys=True) + "\n"
    if args.check:
        same = OUT_PATH.is_file() and json.loads(OUT_PATH.read_text(encoding="utf-8")) == doc
        print("calibration.json is up to date" if same else f"calibration.json differs from a fresh fit:\n{text}")
        return 0 if same else 1
    OUT_PATH.write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
