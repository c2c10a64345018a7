"""COCO-format detection evaluation: hand-computed AP cases, related categories, a real-photo run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from photolens.models.eval_detection import (
    EvalConfig,
    average_precision,
    box_iou,
    evaluate,
    evaluate_files,
    format_report,
    predict_coco_images,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PHOTOS = DATA / "photos"

CATEGORIES = [
    {"id": 1, "name": "person"},
    {"id": 16, "name": "bird"},
    {"id": 17, "name": "cat"},
    {"id": 18, "name": "dog"},
]
ID = {c["name"]: c["id"] for c in CATEGORIES}


def coco(annotations: list[tuple[int, str, list[float]]], n_images: int = 1, crowd: tuple[int, ...] = ()) -> dict:
    """A COCO document; ``annotations`` are (image_id, class name, [x, y, w, h])."""
    return {
        "images": [{"id": i, "file_name": f"{i}.jpg", "width": 100, "height": 100} for i in range(1, n_images + 1)],
        "annotations": [
            {"id": k, "image_id": img, "category_id": ID[cat], "bbox": box, "iscrowd": int(k in crowd)}
            for k, (img, cat, box) in enumerate(annotations)
        ],
        "categories": CATEGORIES,
    }


def pred(image_id: int, cat: str, box: list[float], score: float, by_name: bool = False) -> dict[str, Any]:
    key: dict[str, Any] = {"category": cat} if by_name else {"category_id": ID[cat]}
    return {"image_id": image_id, "bbox": box, "score": score, **key}


# Two dogs, three predictions: the second-ranked one hits nothing; the third overlaps dog #2 with
# IoU 80 / 120 = 0.667 (a hit at 0.5, a miss at 0.75).
TWO_DOGS = coco([(1, "dog", [0, 0, 10, 10]), (1, "dog", [20, 20, 10, 10])])
THREE_PREDS = [
    pred(1, "dog", [0, 0, 10, 10], 0.9),
    pred(1, "dog", [50, 50, 10, 10], 0.8),
    pred(1, "dog", [22, 20, 10, 10], 0.7),
]


def test_two_gt_three_predictions_by_hand() -> None:
    result = evaluate(TWO_DOGS, THREE_PREDS)
    # IoU 0.5: TP, FP, TP. Precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1. The interpolated curve is
    # precision 1 up to recall 1/2 and 2/3 up to recall 1: AP = 1/2 * 1 + 1/2 * 2/3 = 5/6.
    at50 = result.at(0.5)
    assert at50.ap["dog"] == pytest.approx(5 / 6)
    assert at50.recall["dog"] == pytest.approx(1.0)
    assert (at50.true_positives["dog"], at50.false_positives["dog"]) == (2, 1)
    # IoU 0.75: TP, FP, FP. Only recall 1/2 is reached, at precision 1: AP = 1/2.
    at75 = result.at(0.75)
    assert at75.ap["dog"] == pytest.approx(0.5)
    assert at75.recall["dog"] == pytest.approx(0.5)
    assert result.summary() == pytest.approx(
        {"mAP@0.50": 5 / 6, "recall@0.50": 1.0, "mAP@0.75": 0.5, "recall@0.75": 0.5}
    )
    assert result.n_gt == {"dog": 2}


def test_a_higher_scored_false_positive_halves_precision() -> None:
    gt = coco([(1, "dog", [0, 0, 10, 10])])
    preds = [pred(1, "dog", [60, 60, 10, 10], 0.9), pred(1, "dog", [0, 0, 10, 10], 0.8)]
    # FP then TP: the only recall point (1.0) has precision 1/2.
    assert evaluate(gt, preds).at(0.5).ap["dog"] == pytest.approx(0.5)
    # Same boxes, scores swapped: TP first, AP 1.
    preds[0]["score"], preds[1]["score"] = 0.8, 0.9
    assert evaluate(gt, preds).at(0.5).ap["dog"] == pytest.approx(1.0)


def test_duplicates_are_false_positives_and_map_averages_classes() -> None:
    gt = coco([(1, "dog", [0, 0, 10, 10]), (2, "cat", [0, 0, 20, 20]), (2, "cat", [40, 40, 20, 20])], n_images=2)
    preds = [
        pred(1, "dog", [0, 0, 10, 10], 0.9),
        pred(1, "dog", [1, 0, 10, 10], 0.95),  # a duplicate on the same dog, ranked first: it takes the match
        pred(2, "cat", [0, 0, 20, 20], 0.5),
        pred(1, "cat", [0, 0, 20, 20], 0.6),  # right box size, wrong image: FP
    ]
    result = evaluate(gt, preds, EvalConfig(iou_thresholds=(0.5,)))
    m = result.at(0.5)
    assert m.ap["dog"] == pytest.approx(1.0)  # TP (0.95) then the duplicate FP: recall never grows again
    assert (m.true_positives["dog"], m.false_positives["dog"]) == (1, 1)
    # cat: FP (0.6) then TP (0.5): recall 1/2 at precision 1/2; the second cat is never found.
    assert m.ap["cat"] == pytest.approx(0.25)
    assert m.recall["cat"] == pytest.approx(0.5)
    assert m.map == pytest.approx((1.0 + 0.25) / 2)
    assert m.mean_recall == pytest.approx((1.0 + 0.5) / 2)


def test_greedy_match_takes_the_best_unmatched_box() -> None:
    # Two overlapping dogs; the top prediction overlaps A best, the second overlaps both but A is taken.
    gt = coco([(1, "dog", [0, 0, 10, 10]), (1, "dog", [4, 0, 10, 10])])
    preds = [pred(1, "dog", [0, 0, 10, 10], 0.9), pred(1, "dog", [1, 0, 10, 10], 0.8)]
    # Second prediction: IoU with A = 90/110, with B = 70/130 = 0.54 -> matched to B.
    assert evaluate(gt, preds).at(0.5).ap["dog"] == pytest.approx(1.0)
    assert evaluate(gt, preds).at(0.75).ap["dog"] == pytest.approx(0.5)


def test_crowd_regions_are_neither_hits_nor_errors() -> None:
    gt = coco([(1, "person", [0, 0, 10, 10]), (1, "person", [50, 0, 50, 50])], crowd=(1,))
    preds = [
        pred(1, "person", [60, 10, 10, 10], 0.95),  # inside the crowd region: ignored
        pred(1, "person", [0, 0, 10, 10], 0.9),
    ]
    result = evaluate(gt, preds)
    assert result.n_gt == {"person": 1}  # the crowd box is not a target
    assert result.at(0.5).ap["person"] == pytest.approx(1.0)
    assert result.at(0.5).false_positives["person"] == 0
    # Without the crowd flag that prediction is a false positive ranked first, and the big box is a
    # second person to find: recall 1/2 at precision 1/2, AP = 1/4.
    plain = evaluate(coco([(1, "person", [0, 0, 10, 10]), (1, "person", [50, 0, 50, 50])]), preds)
    assert plain.at(0.5).ap["person"] == pytest.approx(0.25)


def test_canary_for_a_bird_is_wrong_strictly_and_right_when_related() -> None:
    gt = coco([(1, "bird", [10, 10, 30, 30])])
    preds = [pred(1, "canary", [11, 10, 30, 30], 0.8, by_name=True)]
    strict = evaluate(gt, preds, EvalConfig(mode="strict"))
    related = evaluate(gt, preds, EvalConfig(mode="related"))
    for t in (0.5, 0.75):
        assert strict.at(t).ap["bird"] == 0.0
        assert strict.at(t).map == 0.0
        assert strict.at(t).recall["bird"] == 0.0
        assert related.at(t).ap["bird"] == pytest.approx(1.0)
        assert related.at(t).map == pytest.approx(1.0)
        assert related.at(t).recall["bird"] == pytest.approx(1.0)


def test_related_mode_uses_the_tree_both_ways_but_not_for_siblings() -> None:
    gt = coco([(1, "cat", [0, 0, 20, 20]), (1, "dog", [50, 50, 20, 20])])
    preds = [
        pred(1, "animal", [0, 0, 20, 20], 0.9, by_name=True),  # coarser label on the cat: fine
        pred(1, "cat", [50, 50, 20, 20], 0.8),  # a cat for the dog: an error
    ]
    related = evaluate(gt, preds, EvalConfig(mode="related", iou_thresholds=(0.5,)))
    assert related.at(0.5).ap == pytest.approx({"cat": 1.0, "dog": 0.0})
    siblings = evaluate(gt, preds, EvalConfig(mode="related", related_siblings=True, iou_thresholds=(0.5,)))
    assert siblings.at(0.5).ap == pytest.approx({"cat": 1.0, "dog": 1.0})
    strict = evaluate(gt, preds, EvalConfig(iou_thresholds=(0.5,)))
    assert strict.at(0.5).ap == pytest.approx({"cat": 0.0, "dog": 0.0})


def test_related_prediction_must_still_overlap_and_duplicates_still_count() -> None:
    gt = coco([(1, "bird", [10, 10, 30, 30])])
    far = [pred(1, "canary", [60, 60, 30, 30], 0.9, by_name=True)]
    assert evaluate(gt, far, EvalConfig(mode="related")).at(0.5).ap["bird"] == 0.0
    # A canary and a bird on the same bird: one match, the lower-scored one is a duplicate.
    both = [pred(1, "canary", [10, 10, 30, 30], 0.9, by_name=True), pred(1, "bird", [10, 10, 30, 30], 0.7)]
    m = evaluate(gt, both, EvalConfig(mode="related")).at(0.5)
    assert (m.true_positives["bird"], m.false_positives["bird"]) == (1, 1)
    assert m.ap["bird"] == pytest.approx(1.0)


def test_a_prediction_keeps_its_class_when_its_own_ground_truth_is_there() -> None:
    # A cat prediction on a cat that overlaps a dog: with its own class there it stays a cat, even when
    # siblings (cat - dog) are related; nothing is taken from the dog.
    gt = coco([(1, "cat", [0, 0, 20, 20]), (1, "dog", [2, 0, 20, 20])])
    preds = [pred(1, "cat", [0, 0, 20, 20], 0.9)]
    m = evaluate(gt, preds, EvalConfig(mode="related", related_siblings=True, iou_thresholds=(0.5,))).at(0.5)
    assert m.ap == pytest.approx({"cat": 1.0, "dog": 0.0})


def test_recall_at_a_score_threshold() -> None:
    m = evaluate(TWO_DOGS, THREE_PREDS, EvalConfig(iou_thresholds=(0.5,), recall_score_threshold=0.75)).at(0.5)
    assert m.recall["dog"] == pytest.approx(0.5)  # the 0.7 hit is below the operating point
    assert m.ap["dog"] == pytest.approx(5 / 6)  # AP still uses every prediction


def test_ids_and_names_are_the_same_prediction() -> None:
    by_name = [{**p, "category": "dog"} for p in THREE_PREDS]
    for p in by_name:
        del p["category_id"]
    assert evaluate(TWO_DOGS, by_name).summary() == evaluate(TWO_DOGS, THREE_PREDS).summary()
    both = [{**p, "category": "dog"} for p in THREE_PREDS]
    assert evaluate(TWO_DOGS, both).summary() == evaluate(TWO_DOGS, THREE_PREDS).summary()


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"image_id": 7, "category_id": 18, "bbox": [0, 0, 1, 1], "score": 0.5}, "not in the ground truth"),
        ({"image_id": 1, "category_id": 5, "bbox": [0, 0, 1, 1], "score": 0.5}, "unknown category_id"),
        ({"image_id": 1, "category_id": 18, "category": "cat", "bbox": [0, 0, 1, 1], "score": 0.5}, "contradicts"),
        ({"image_id": 1, "bbox": [0, 0, 1, 1], "score": 0.5}, "needs a 'category_id'"),
        ({"image_id": 1, "category_id": 18, "bbox": [0, 0, 1], "score": 0.5}, "bbox"),
        ({"image_id": 1, "category_id": 18, "bbox": [0, 0, -1, 1], "score": 0.5}, "bbox"),
        ({"image_id": 1, "category_id": 18, "bbox": [0, 0, 1, 1]}, "score"),
    ],
)
def test_bad_predictions_are_refused(bad: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        evaluate(TWO_DOGS, [bad])


def test_bad_ground_truth_is_refused() -> None:
    with pytest.raises(ValueError, match="COCO document"):
        evaluate({"images": []}, [])
    with pytest.raises(ValueError, match="no \\(non-crowd\\) boxes"):
        evaluate(coco([]), [])
    with pytest.raises(ValueError, match="unknown category_id"):
        evaluate({**coco([]), "annotations": [{"id": 1, "image_id": 1, "category_id": 99, "bbox": [0, 0, 1, 1]}]}, [])
    with pytest.raises(ValueError, match="mode"):
        EvalConfig(mode="loose")  # type: ignore[arg-type]


def _reference_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """Straight from the definition: sum over recall steps of the step times the best precision at
    that recall or beyond."""
    total, previous = 0.0, 0.0
    for r in sorted(set(recall.tolist())):
        if r > previous:
            total += (r - previous) * max(p for rr, p in zip(recall, precision, strict=True) if rr >= r)
            previous = r
    return total


def test_average_precision_matches_its_definition_on_random_rankings() -> None:
    rng = np.random.default_rng(7)
    for _ in range(200):
        n_gt = int(rng.integers(1, 6))
        hits = rng.random(int(rng.integers(1, 12))) < 0.5
        hits[np.cumsum(hits) > n_gt] = False  # cannot find more objects than there are
        tp = np.cumsum(hits)
        recall = tp / n_gt
        precision = tp / np.arange(1, len(hits) + 1)
        assert average_precision(recall, precision) == pytest.approx(_reference_ap(recall, precision))
    assert average_precision([], []) == 0.0
    assert average_precision([0.5, 1.0], [1.0, 1.0]) == pytest.approx(1.0)


def test_box_iou_by_hand() -> None:
    a = np.array([[0, 0, 10, 10]], float)
    b = np.array([[5, 0, 15, 10], [20, 20, 30, 30], [0, 0, 10, 10]], float)
    assert box_iou(a, b)[0] == pytest.approx([50 / 150, 0.0, 1.0])


def test_files_and_report(tmp_path: Path) -> None:
    gt_path, pred_path = tmp_path / "gt.json", tmp_path / "pred.json"
    gt_path.write_text(json.dumps(TWO_DOGS))
    pred_path.write_text(json.dumps(THREE_PREDS))
    result = evaluate_files(gt_path, pred_path)
    assert result.at(0.5).ap["dog"] == pytest.approx(5 / 6)
    report = format_report(result)
    assert "dog" in report
    assert "0.833" in report
    rows = result.to_rows()
    assert [(r["iou_threshold"], r["category"], round(r["ap"], 3)) for r in rows] == [
        (0.5, "dog", 0.833),
        (0.75, "dog", 0.5),
    ]
    pred_path.write_text(json.dumps({"not": "a list"}))
    with pytest.raises(ValueError, match="JSON list"):
        evaluate_files(gt_path, pred_path)


# Boxes drawn by hand on the two classic detector photos (pixels, [x, y, w, h]).
HAND_LABELLED = {
    "images": [
        {"id": 1, "file_name": "dog.jpg", "width": 768, "height": 576},
        {"id": 2, "file_name": "giraffe.jpg", "width": 500, "height": 500},
    ],
    "annotations": [
        {"id": 1, "image_id": 1, "category_id": 18, "bbox": [132, 222, 178, 320]},
        {"id": 2, "image_id": 1, "category_id": 2, "bbox": [125, 137, 442, 283]},
        {"id": 3, "image_id": 1, "category_id": 8, "bbox": [466, 75, 234, 95]},  # the pickup: COCO "truck"
        {"id": 4, "image_id": 2, "category_id": 25, "bbox": [168, 28, 279, 414]},
        {"id": 5, "image_id": 2, "category_id": 24, "bbox": [250, 205, 170, 220]},
    ],
    "categories": [
        {"id": 2, "name": "bicycle"},
        {"id": 8, "name": "truck"},
        {"id": 18, "name": "dog"},
        {"id": 24, "name": "zebra"},
        {"id": 25, "name": "giraffe"},
    ],
}


def test_ssd_on_hand_labelled_photos() -> None:
    if not PHOTOS.is_dir():
        pytest.skip(f"real test photos not found at {PHOTOS}")
    from photolens.models.detector import PostprocessConfig, SsdConfig, SsdMobileNetCoco

    detector = SsdMobileNetCoco.from_installed_package(SsdConfig(postprocess=PostprocessConfig(score_threshold=0.05)))
    preds = predict_coco_images(detector, HAND_LABELLED, PHOTOS, batch_size=2)
    assert {p["image_id"] for p in preds} == {1, 2}
    strict = evaluate(HAND_LABELLED, preds)
    m = strict.at(0.5)
    # Every labelled object is found, and each class's best-scored box is on its object.
    assert m.recall == pytest.approx(dict.fromkeys(["bicycle", "dog", "giraffe", "truck", "zebra"], 1.0))
    for cat in ("dog", "bicycle", "giraffe", "zebra"):
        assert m.ap[cat] == pytest.approx(1.0), cat
    # The graph scores the pickup as "car" above "truck" (a different COCO class): strict AP stays 1
    # because only truck predictions compete for the truck, and car has no ground truth here.
    assert m.ap["truck"] == pytest.approx(1.0)
    assert strict.at(0.75).map <= m.map
    related = evaluate(HAND_LABELLED, preds, EvalConfig(mode="related"))
    assert related.at(0.5).map >= m.map
