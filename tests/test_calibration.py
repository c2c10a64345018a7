"""Calibration kept apart from evaluation: the split is disjoint and complete, the constants in code are the
ones tools/calibrate.py fits on the calibration half, and their figures on the evaluation half."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from realdata import DATA, SPLIT, packaged_weight, split_files

from photolens.schemas.calibration import load_calibration

ROOT = Path(__file__).resolve().parents[1]


def _calibrate() -> ModuleType:
    spec = importlib.util.spec_from_file_location("calibrate", ROOT / "tools" / "calibrate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["calibrate"] = module
    spec.loader.exec_module(module)
    return module


def test_split_is_disjoint_and_covers_every_photo() -> None:
    for folder, halves in SPLIT.items():
        cal, ev = set(halves["calibration"]), set(halves["evaluation"])
        assert cal and ev, folder
        assert not cal & ev, (folder, sorted(cal & ev))
        assert len(cal) == len(halves["calibration"]) and len(ev) == len(halves["evaluation"])
        where = DATA / folder
        if where.is_dir():
            on_disk = {p.name for p in where.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")}
            assert cal | ev == on_disk, (folder, sorted(on_disk ^ (cal | ev)))
    # Same-place pairs stay on one side: a view of a place in both halves would leak.
    cal = set(split_files("photos", "calibration"))
    for a, b in _calibrate().KEEP_TOGETHER:
        assert (a in cal) == (b in cal), (a, b)


def test_scene_labels_cover_the_photos_with_known_labels() -> None:
    from photolens.schemas.scenes import load_scene_mapping

    labels = _calibrate().load_scene_labels()
    assert set(labels) == set(SPLIT["photos"]["calibration"]) | set(SPLIT["photos"]["evaluation"])
    known = set(load_scene_mapping().coarse_labels) | {"none"}
    assert all(ok <= known for ok in labels.values()), {n: ok - known for n, ok in labels.items() if ok - known}


def test_constants_in_code_are_the_stored_fit() -> None:
    import numpy as np

    import photolens.models.face_align as fa
    from photolens.models.landmark import LandmarkConfig
    from photolens.models.scene import SceneClassifier

    doc = load_calibration()
    clf = SceneClassifier.from_mobilenet_v2(packaged_weight("mobilenet_v2_imagenet", "mobilenet_v2-b0353104.pth"))
    assert clf.calibrated
    assert clf.threshold == doc["scene"]["mobilenet_v2_imagenet"]["min_coarse_score"]
    assert LandmarkConfig().threshold == doc["landmark"]["threshold"]
    fit = doc["face_align"]["dlib150"]
    assert fit["fitted_on"] == "faces/deepface/calibration" and fit["faces"] >= 30
    np.testing.assert_array_equal(fa.DLIB150.points, np.asarray(fit["points"]))
    np.testing.assert_array_equal(fa.DLIB150.weights, np.asarray(fit["weights"]))
    assert fa.DLIB150.size == fit["size"] == 150


@pytest.fixture(scope="module")
def fresh_fit() -> dict[str, Any]:
    if not (DATA / "photos").is_dir():
        pytest.skip(f"test photos not found at {DATA}")
    # The template fit runs dlib's HOG detector over 32 photos (minutes on 2 cores): `tools/calibrate.py --check`
    # re-runs it; here the two quick fits.
    fit: dict[str, Any] = _calibrate().fit_all(("scene", "landmark"))
    return fit


@pytest.mark.slow
def test_stored_fit_is_what_the_script_writes(fresh_fit: dict[str, Any]) -> None:
    stored = load_calibration()
    assert set(stored) == {"about", "split", *_calibrate().PARTS}
    assert fresh_fit == {k: v for k, v in stored.items() if k != "face_align"}


@pytest.mark.slow
def test_scene_abstention_on_the_evaluation_photos() -> None:
    """Coverage and accuracy when not abstaining, on photos the threshold never saw (README: Scenes)."""
    cal = _calibrate()
    labels = cal.load_scene_labels()
    names = split_files("photos", "evaluation")
    best = cal.scene_best(names)
    t = load_calibration()["scene"]["mobilenet_v2_imagenet"]["min_coarse_score"]
    out = cal.scene_outcomes(best, [labels[n] for n in names], t)
    print(f"scene, evaluation photos at {t}: {out}")
    assert out["named"] >= 3  # the beach, the football pitch, the palace
    assert out["accuracy"] is not None and out["accuracy"] >= 0.75, out
    # Photos of objects, paintings and close-ups: the classifier names no scene on them.
    abstained, total = map(int, out["abstained_on_no_scene"].split("/"))
    assert total >= 5 and abstained == total, out
