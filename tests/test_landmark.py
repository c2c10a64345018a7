"""Landmark embeddings on real photos: same-place pairs are nearest neighbours, references built from one
view recognise the other, unrelated photos fall below a calibrated threshold; references persist."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from realdata import packaged_weight, split_files

from photolens.models.landmark import (
    LandmarkEmbedder,
    References,
    ReferencesError,
    balanced_accuracy,
    build_references,
    calibrate_threshold,
    pool_features,
    references_from_embeddings,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PHOTOS = DATA / "photos"
WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"
# Two views of one place each; the last is an object (a box) found again in a cluttered scene.
PAIRS = [("leuvenA.jpg", "leuvenB.jpg"), ("graf1.png", "graf3.png"), ("aero1.jpg", "aero3.jpg"),
         ("box.png", "box_in_scene.png")]
LANDMARK_PAIRS = PAIRS[:3]


def _weights() -> Path:
    return packaged_weight("mobilenet_v2_imagenet", WEIGHTS_FILE)


@pytest.fixture(scope="module")

def photos() -> dict[str, np.ndarray]:
    if not PHOTOS.is_dir():
        pytest.skip(f"test photos not found at {PHOTOS}")
    return {p.name: np.asarray(Image.open(p).convert("RGB"))
            for p in sorted(PHOTOS.iterdir()) if p.suffix in (".jpg", ".png")}


@pytest.fixture(scope="module")
def embedder() -> LandmarkEmbedder:
    return LandmarkEmbedder.from_mobilenet_v2(_weights())


@pytest.fixture(scope="module")
def feature_maps(embedder: LandmarkEmbedder, photos: dict[str, np.ndarray]) -> list:
    return embedder.feature_maps(list(photos.values()))


def _pool(feature_maps: list, pooling: str, gem_p: float) -> np.ndarray:
    return np.concatenate([F.normalize(pool_features(f, valid, pooling, gem_p), dim=1).numpy()
                           for f, valid in feature_maps])


@pytest.fixture(scope="module")
def embeddings(embedder: LandmarkEmbedder, photos: dict[str, np.ndarray], feature_maps: list) -> dict[str, np.ndarray]:
    cfg = embedder.config
    return dict(zip(photos, _pool(feature_maps, cfg.pooling, cfg.gem_p), strict=True))


def _margins(emb: dict[str, np.ndarray]) -> list[float]:
    """Per pair: its similarity minus the best similarity of either image to any other photo."""
    names = list(emb)
    e = np.stack([emb[n] for n in names])
    sim = e @ e.T
    out = []
    for a, b in PAIRS:
        i, j = names.index(a), names.index(b)
        others = [k for k in range(len(names)) if k not in (i, j)]
        out.append(float(sim[i, j] - max(sim[i, others].max(), sim[j, others].max())))
    return out


def test_embeddings_are_unit_vectors(embedder: LandmarkEmbedder, embeddings: dict[str, np.ndarray],
                                     photos: dict[str, np.ndarray]) -> None:
    e = np.stack(list(embeddings.values()))
    assert e.shape == (len(photos), 320)
    assert e.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    names = ["kite.jpg", "graf1.png", "basketball1.png"]  # different sizes and aspect ratios
    together = embedder.embed([photos[n] for n in names])
    one_by_one = np.stack([embedder.embed([photos[n]])[0] for n in names])
    np.testing.assert_allclose(together, np.stack([embeddings[n] for n in names]), atol=1e-5)
    np.testing.assert_allclose(one_by_one, together, atol=1e-5)
    assert embedder.embed([]).shape == (0, 320)
    assert embedder.name == "mobilenet_v2_landmark_bottleneck-gem1-320"
    assert embedder.version == "mobilenet_v2-b0353104"


def test_same_place_pairs_are_mutual_nearest_neighbours(embeddings: dict[str, np.ndarray]) -> None:
    names = list(embeddings)
    e = np.stack([embeddings[n] for n in names])
    sim = e @ e.T
    np.fill_diagonal(sim, -np.inf)
    nearest = {n: names[int(sim[i].argmax())] for i, n in enumerate(names)}
    for a, b in LANDMARK_PAIRS:
        assert nearest[a] == b, f"{a}: nearest is {nearest[a]}"
        assert nearest[b] == a, f"{b}: nearest is {nearest[b]}"
    # The box pair is an object in clutter rather than a place; it passes too (margin +0.12 measured).
    a, b = PAIRS[3]
    assert (nearest[a], nearest[b]) == (b, a)
    margins = _margins(embeddings)
    assert min(margins[:3]) > 0.3, margins


def test_average_pooling_separates_best(photos: dict[str, np.ndarray], feature_maps: list,
                                        embeddings: dict[str, np.ndarray]) -> None:
    """The default (GeM p=1 = average) against GeM p=3 and max pooling of the same feature maps."""
    chosen = min(_margins(embeddings)[:3])
    for pooling, p in (("gem", 3.0), ("max", 1.0)):
        emb = dict(zip(photos, _pool(feature_maps, pooling, p), strict=True))
        assert chosen > min(_margins(emb)[:3]) + 0.1, (pooling, p)


def test_references_recognise_the_other_view_and_reject_unrelated_photos(
    embedder: LandmarkEmbedder, photos: dict[str, np.ndarray], embeddings: dict[str, np.ndarray]
) -> None:
    gallery = {a.split(".")[0].rstrip("AB1"): [photos[a]] for a, _ in PAIRS}
    refs = build_references(gallery, embedder)
    assert refs.landmark_ids == ("leuven", "graf", "aero", "box")
    assert refs.model == f"{embedder.name}@{embedder.version}"
    queries = [b for _, b in PAIRS]
    scores = refs.scores(np.stack([embeddings[q] for q in queries]))
    # every second view is closest to its own reference, the box one included
    assert [refs.landmark_ids[i] for i in scores.argmax(axis=1)] == list(refs.landmark_ids)

    in_pairs = {n for pair in PAIRS for n in pair}
    unrelated = [n for n in photos if n not in in_pairs]
    calibration, held_out = unrelated[0::2], unrelated[1::2]
    positives = [float(scores[i, i]) for i in range(3)]  # the three places
    negatives = [float(refs.scores(embeddings[n][None]).max()) for n in calibration]
    threshold = calibrate_threshold(positives, negatives)
    assert balanced_accuracy(positives, negatives, threshold) == 1.0
    refs = refs.with_threshold(threshold)
    for (a, b), lid in zip(LANDMARK_PAIRS, refs.landmark_ids, strict=False):
        got, score = refs.match(embeddings[b])
        assert got == lid, (a, b, score, threshold)
    rejected = {n: refs.match(embeddings[n]) for n in held_out}
    assert all(lid is None for lid, _ in rejected.values()), (threshold, rejected)
    # the uncalibrated default agrees on these photos
    default = refs.with_threshold(embedder.config.threshold)
    assert [default.match(embeddings[b])[0] for _, b in LANDMARK_PAIRS] == ["leuven", "graf", "aero"]
    assert all(default.match(embeddings[n])[0] is None for n in unrelated)


def test_reference_is_the_renormalised_mean() -> None:
    a = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], np.float32)
    refs = references_from_embeddings({"x": a, "y": np.array([[0.0, 0.0, 1.0]], np.float32)}, threshold=0.5,
                                      model="m@1")
    np.testing.assert_allclose(refs.vectors[0], [2**-0.5, 2**-0.5, 0.0], atol=1e-6)
    assert refs.counts == (2, 1)
    assert refs.match(np.array([1.0, 0.0, 0.0], np.float32)) == ("x", pytest.approx(2**-0.5))
    assert refs.match(np.array([0.6, -0.8, 0.0], np.float32))[0] is None  # below 0.5 for both
    with pytest.raises(ReferencesError, match="dimension"):
        refs.match(np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="cancel out"):
        references_from_embeddings({"z": np.array([[1.0, 0], [-1.0, 0]])}, threshold=0.5, model="m@1")


def test_calibrate_threshold_maximises_balanced_accuracy() -> None:
    # Separable: the threshold lies in the gap, at its midpoint.
    assert calibrate_threshold([0.8, 0.9, 0.85], [0.1, 0.5, 0.6]) == pytest.approx(0.7)
    # Imbalanced: 2 positives, 10 negatives, one negative above a positive. Plain accuracy prefers
    # rejecting the weak positive (t > 0.55: 11/12 right); balanced accuracy accepts it (t in
    # (0.5, 0.55]: recall 1, 9/10 negatives rejected = 0.95 vs 0.75).
    pos = [0.55, 0.9]
    neg = [0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.6]
    t = calibrate_threshold(pos, neg)
    assert 0.5 < t <= 0.55
    assert balanced_accuracy(pos, neg, t) == pytest.approx(0.95)
    with pytest.raises(ValueError, match="at least one"):
        calibrate_threshold([], [0.1])


def test_references_save_and_load(tmp_path: Path, embeddings: dict[str, np.ndarray]) -> None:
    refs = references_from_embeddings({"leuven": embeddings["leuvenA.jpg"], "aero": embeddings["aero1.jpg"]},
                                      threshold=0.61, model="mobilenet_v2_landmark_bottleneck-gem1-320@v")
    npz, side = refs.save(tmp_path / "refs" / "city")
    assert (npz.name, side.name) == ("city.npz", "city.json")
    assert json.loads(side.read_text())["landmark_ids"] == ["leuven", "aero"]
    back = References.load(tmp_path / "refs" / "city.npz", expect_model=refs.model)
    assert back.landmark_ids == refs.landmark_ids
    assert back.threshold == 0.61
    assert back.counts == (1, 1)
    np.testing.assert_array_equal(back.vectors, refs.vectors)
    assert back.match(embeddings["leuvenB.jpg"])[0] == "leuven"
    with pytest.raises(ReferencesError, match="built with"):
        References.load(tmp_path / "refs" / "city", expect_model="other@1")
    doc = json.loads(side.read_text())
    doc["landmark_ids"].append("extra")
    side.write_text(json.dumps(doc))
    with pytest.raises(ReferencesError, match="do not match"):
        References.load(tmp_path / "refs" / "city")
    npz.unlink()
    with pytest.raises(ReferencesError, match="missing"):
        References.load(tmp_path / "refs" / "city")


@pytest.mark.gpu
def test_gpu_matches_cpu(embedder: LandmarkEmbedder, photos: dict[str, np.ndarray],
                         embeddings: dict[str, np.ndarray]) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    names = [n for pair in PAIRS for n in pair]
    gpu = LandmarkEmbedder.from_mobilenet_v2(_weights(), device="cuda").embed([photos[n] for n in names])
    np.testing.assert_allclose(gpu, np.stack([embeddings[n] for n in names]), atol=2e-3)


def test_default_threshold_on_the_evaluation_photos(embedder: LandmarkEmbedder, photos: dict[str, np.ndarray],
                                                    embeddings: dict[str, np.ndarray]) -> None:
    """The default threshold was fitted (tools/calibrate.py) on the calibration photos only; here, on the
    evaluation photos: the second view of each place matches the first, every unrelated photo is rejected."""
    evaluation = set(split_files("photos", "evaluation"))
    pairs = [(a, b) for a, b in (("basketball1.png", "basketball2.png"), ("graf1.png", "graf3.png"))
             if a in evaluation and b in evaluation]
    assert len(pairs) == 2
    refs = build_references({a: [photos[a]] for a, _ in pairs}, embedder)
    assert refs.threshold == embedder.config.threshold
    assert [refs.match(embeddings[b])[0] for _, b in pairs] == [a for a, _ in pairs]
    in_pairs = {n for pair in pairs for n in pair}
    unrelated = sorted(evaluation - in_pairs)
    assert len(unrelated) >= 10
    matched = {n: refs.match(embeddings[n]) for n in unrelated}
    assert all(lid is None for lid, _ in matched.values()), (refs.threshold, matched)
