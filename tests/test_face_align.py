"""Alignment, pose, sharpness, weight and gate on real faces (detected by our MTCNN)."""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from realdata import load_rgb, mtcnn_weight_paths, split_files

from photolens.models import face_align as fa
from photolens.models.mtcnn import MTCNN, FaceDetections

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FACES = DATA / "faces" / "deepface"
PHOTOS = DATA / "photos"


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"weight package {name} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def _mtcnn(**kwargs: object) -> MTCNN:
    return MTCNN.from_files(*mtcnn_weight_paths(), **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def detector() -> MTCNN:
    if not DATA.is_dir():
        pytest.skip(f"shared test data not found at {DATA}")
    return _mtcnn()


PORTRAITS = ["img1.jpg", "img2.jpg", "img11.jpg", "img11_reflection.jpg", "img30.jpg", "img43.jpg"]


@pytest.fixture(scope="module")
def portraits(detector: MTCNN) -> dict[str, tuple[np.ndarray, FaceDetections]]:
    images = {name: load_rgb(FACES / name) for name in PORTRAITS}
    images["couple.jpg"] = load_rgb(FACES / "couple.jpg", 640)
    found = detector.detect(list(images.values()))
    return {name: (img, det) for (name, img), det in zip(images.items(), found, strict=True)}


def _main_face(det: FaceDetections) -> tuple[np.ndarray, np.ndarray, float]:
    assert len(det) >= 1
    return det.boxes[0], det.points[0], float(det.scores[0])


# ------------------------------------------------------------------------------ pure geometry


def test_similarity_fit_recovers_a_known_transform() -> None:
    rng = np.random.default_rng(7)
    src = fa.ARCFACE112.points
    for _ in range(20):
        angle = rng.uniform(-math.pi, math.pi)
        scale = rng.uniform(0.2, 5.0)
        shift = rng.uniform(-300, 300, size=2)
        rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
        dst = scale * src @ rot.T + shift
        m = fa.similarity_transforms(src, dst)
        np.testing.assert_allclose(m[:, :2], scale * rot, atol=1e-9)
        np.testing.assert_allclose(m[:, 2], shift, atol=1e-7)
        np.testing.assert_allclose(fa.transform_points(m, src), dst, atol=1e-7)


def test_similarity_fit_never_reflects_and_respects_weights() -> None:
    pts = fa.DLIB150.points
    mirrored = pts * np.array([-1.0, 1.0])
    m = fa.similarity_transforms(mirrored, pts)
    assert np.linalg.det(m[:, :2]) > 0
    # A wild nose with zero weight leaves the fit exact on the other four points.
    moved = pts.copy()
    moved[2] += [40.0, -30.0]
    w = np.array([1.0, 1.0, 0.0, 1.0, 1.0])
    m = fa.similarity_transforms(moved, pts, w)
    np.testing.assert_allclose(fa.transform_points(m, moved)[[0, 1, 3, 4]], pts[[0, 1, 3, 4]], atol=1e-9)
    with pytest.raises(ValueError):
        fa.similarity_transforms(np.zeros((5, 2)), pts)


def test_batched_transforms_equal_single_ones() -> None:
    rng = np.random.default_rng(3)
    pts = fa.DLIB150.points[None] * rng.uniform(0.5, 2, (6, 1, 1)) + rng.normal(0, 3, (6, 5, 2))
    batched = fa.alignment_transforms(pts, "arcface112")
    for i in range(6):
        one = fa.similarity_transforms(pts[i], fa.ARCFACE112.points, fa.ARCFACE112.weights)
        np.testing.assert_allclose(batched[i], one, atol=1e-10)


def test_templates_are_face_layouts() -> None:
    for t in fa.TEMPLATES.values():
        p = t.points
        assert p.shape == (5, 2)
        assert t.weights.shape == (5,)
        assert ((p > 0) & (p < t.size)).all()
        assert p[0, 0] < p[2, 0] < p[1, 0]  # nose between the eyes
        assert max(p[0, 1], p[1, 1]) < p[2, 1] < min(p[3, 1], p[4, 1])  # eyes, nose, mouth
        assert abs(p[0, 1] - p[1, 1]) < 0.01 * t.size  # level eyes
    with pytest.raises(ValueError):
        fa.align(np.zeros((50, 50, 3), np.uint8), fa.DLIB150.points, "vggface")


def test_pose_of_synthetic_points() -> None:
    level = fa.DLIB150.points  # the mean MTCNN layout of frontal faces
    roll, yaw, pitch = fa.estimate_pose(level)
    assert abs(roll) < 1
    assert abs(yaw) < 2
    assert abs(pitch) < 3
    centre = level.mean(axis=0)
    for angle in (-40.0, -10.0, 25.0):
        a = math.radians(angle)
        rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
        turned = (level - centre) @ rot.T + centre
        r2, y2, p2 = fa.estimate_pose(turned)
        assert r2 == pytest.approx(roll + angle, abs=1e-6)  # in-plane rotation is all roll
        assert y2 == pytest.approx(yaw, abs=1e-6)
        assert p2 == pytest.approx(pitch, abs=1e-6)
    nose_right = level.copy()
    nose_right[2, 0] += 10
    assert fa.estimate_pose(nose_right)[1] > yaw + 5
    nose_down = level.copy()
    nose_down[2, 1] += 10
    assert fa.estimate_pose(nose_down)[2] > pitch + 5


def test_weight_falls_with_angles_and_transform() -> None:
    base = {"score": 0.999, "yaw": 0.0, "pitch": 0.0, "rotation": 0.0, "shape_error": 0.04}
    good = fa.quality_weight(**base, sharp=0.1, iod_px=60)
    assert 0.5 < good <= 1.0
    for key, values in {
        "yaw": [10, 25, 45, 70],
        "pitch": [-10, -25, -45],
        "rotation": [15, 40, 80],
        "shape_error": [0.1, 0.2, 0.35],
    }.items():
        weights = [fa.quality_weight(**{**base, key: v}, sharp=0.1, iod_px=60) for v in values]
        assert good > weights[0], key
        assert all(a > b for a, b in itertools.pairwise(weights)), key
    assert fa.quality_weight(**base, sharp=0.01, iod_px=60) < good
    assert fa.quality_weight(**base, sharp=0.1, iod_px=12) < good
    assert fa.quality_weight(**{**base, "score": 0.75}, sharp=0.1, iod_px=60) < good


# ------------------------------------------------------------------------------ real faces


def test_alignment_levels_the_eyes(detector: MTCNN, portraits: dict) -> None:
    """Re-detect on the chips: the eye line is horizontal and the points land on the template."""
    rolls = [fa.estimate_pose(det.points[0])[0] for _, det in portraits.values()]
    assert max(abs(r) for r in rolls) > 10  # the set has tilted heads (img11: ~15°)
    for template in ("dlib150", "arcface112"):
        t = fa.TEMPLATES[template]
        chips = [fa.align(img, det.points[0], template) for img, det in portraits.values()]
        for chip in chips:
            assert chip.shape == (t.size, t.size, 3)
            assert chip.dtype == np.uint8
        # ArcFace chips are cropped tight; a grey frame gives the detector its context back.
        pad = 40
        framed = [cv2.copyMakeBorder(c, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=(128, 128, 128)) for c in chips]
        for name, again in zip(portraits, detector.detect(framed), strict=True):
            assert len(again) >= 1, f"{template} {name}: no face on the chip"
            pts = again.points[0] - pad
            roll = fa.estimate_pose(pts)[0]
            assert abs(roll) < 3.0, f"{template} {name}: roll {roll:.1f} after alignment"
            err = np.linalg.norm(pts - t.points, axis=1)
            assert err[:2].max() < 0.06 * t.size, f"{template} {name}: eyes off by {err[:2]}"


def test_dlib150_chip_matches_dlibs_own_chip(portraits: dict) -> None:
    """Our chip from MTCNN points vs dlib.get_face_chip from dlib's 5 landmarks, compared where it
    matters: dlib's face descriptor. Same-person distances are < 0.6; ours differ by ~0.07."""
    dlib = pytest.importorskip("dlib")
    models = _package_dir("face_recognition_models") / "models"
    hog = dlib.get_frontal_face_detector()
    shapes = dlib.shape_predictor(str(models / "shape_predictor_5_face_landmarks.dat"))
    net = dlib.face_recognition_model_v1(str(models / "dlib_face_recognition_resnet_model_v1.dat"))
    cosines = []
    # The template was fitted on the calibration half of the photos: measured on the evaluation half only.
    for name in [n for n in PORTRAITS if n in split_files("faces/deepface")]:
        img, det = portraits[name]
        (rect,) = hog(img, 1)
        theirs = dlib.get_face_chip(img, shapes(img, rect), size=150, padding=0.25)
        ours = fa.align(img, det.points[0], "dlib150")
        a = np.asarray(net.compute_face_descriptor(theirs))
        b = np.asarray(net.compute_face_descriptor(ours))
        cosines.append(float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)))
    assert min(cosines) > 0.98, cosines


def _rotate(image: np.ndarray, degrees: float) -> np.ndarray:
    """Rotate counter-clockwise on a canvas big enough to keep every pixel."""
    h, w = image.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), degrees, 1.0)
    cos, sin = abs(m[0, 0]), abs(m[0, 1])
    nw, nh = int(h * sin + w * cos), int(h * cos + w * sin)
    m[0, 2] += nw / 2 - w / 2
    m[1, 2] += nh / 2 - h / 2
    return cv2.warpAffine(image, m, (nw, nh), flags=cv2.INTER_LINEAR, borderValue=(0, 0, 0))


def test_roll_follows_a_rotated_photo(detector: MTCNN, portraits: dict) -> None:
    names = ["img1.jpg", "img2.jpg", "img30.jpg"]
    rotated = {(n, d): _rotate(portraits[n][0], d) for n in names for d in (30.0, -30.0)}
    found = dict(zip(rotated, detector.detect(list(rotated.values())), strict=True))
    for (name, degrees), det in found.items():
        roll0, yaw0, pitch0 = fa.estimate_pose(portraits[name][1].points[0])
        roll, yaw, pitch = fa.estimate_pose(_main_face(det)[1])
        # Counter-clockwise in the image lifts the right-hand eye: roll goes down by the angle.
        assert roll - roll0 == pytest.approx(-degrees, abs=5.0), name
        # Yaw and pitch do not depend on in-plane rotation; what moves them here is MTCNN's points
        # drifting on a tilted face (seen up to ~12° at 30° on these photos).
        assert abs(yaw - yaw0) < 15, name
        assert abs(pitch - pitch0) < 15, name


def test_mirror_photo_mirrors_roll_and_yaw(portraits: dict) -> None:
    _, det = portraits["img11.jpg"]
    _, mirror = portraits["img11_reflection.jpg"]
    roll, yaw, pitch = fa.estimate_pose(det.points[0])
    roll_m, yaw_m, pitch_m = fa.estimate_pose(mirror.points[0])
    assert abs(roll) > 8  # a clearly tilted head, so the sign test means something
    assert roll_m == pytest.approx(-roll, abs=3)
    assert yaw_m == pytest.approx(-yaw, abs=4)
    assert pitch_m == pytest.approx(pitch, abs=4)


def test_blur_lowers_sharpness_and_weight(portraits: dict) -> None:
    gate = fa.QualityGate()
    for name in ["img2.jpg", "img11.jpg", "img43.jpg", "couple.jpg"]:
        img, det = portraits[name]
        blurred = cv2.GaussianBlur(img, (0, 0), 2.5)
        _, sharp_q = fa.assess(img, det.boxes, det.scores, det.points)
        _, blur_q = fa.assess(blurred, det.boxes, det.scores, det.points)
        for q, b in zip(sharp_q, blur_q, strict=True):
            assert b.sharpness < 0.5 * q.sharpness, name
            assert b.weight < 0.7 * q.weight, name
            assert gate.gate(q) == (True, None), (name, q)
            assert gate.gate(b) == (False, "blur"), (name, b)


def test_assess_reports_size_transform_and_weight(portraits: dict) -> None:
    img, det = portraits["couple.jpg"]
    chips, qualities = fa.assess(img, det.boxes, det.scores, det.points)
    assert chips.shape == (2, 150, 150, 3)
    for box, pts, q in zip(det.boxes, det.points, qualities, strict=True):
        assert q.iod_px == pytest.approx(float(np.linalg.norm(pts[1] - pts[0])), rel=1e-6)
        assert q.box_px == pytest.approx(float(min(box[2] - box[0], box[3] - box[1])), rel=1e-6)
        # The chip's eyes are 54.9 px apart: the scale is that over the face's eye distance.
        assert q.transform_scale == pytest.approx(54.86 / q.iod_px, rel=0.1)
        assert q.transform_rotation == pytest.approx(-q.roll, abs=3)
        assert 0.0 <= q.weight <= 1.0
    # Same face, smaller photo: same pose, lower size factor → lower weight.
    small = cv2.resize(img, None, fx=0.25, fy=0.25, interpolation=cv2.INTER_AREA)
    _, small_q = fa.assess(small, det.boxes * 0.25, det.scores, det.points * 0.25)
    for big, little in zip(qualities, small_q, strict=True):
        assert little.iod_px == pytest.approx(big.iod_px / 4, rel=1e-6)
        assert little.weight < big.weight


def test_alignment_handles_edges_and_empty_input(portraits: dict) -> None:
    img, det = portraits["img2.jpg"]
    empty = fa.align_batch(img, np.zeros((0, 5, 2)))
    assert empty.shape == (0, 150, 150, 3)
    chips, qualities = fa.assess(img, np.zeros((0, 4)), np.zeros(0), np.zeros((0, 5, 2)))
    assert chips.shape == (0, 150, 150, 3)
    assert qualities == []
    # A face pushed half out of the frame: the chip is black where the photo ends.
    shift = np.array([det.points[0][:, 0].mean(), 0.0])
    chip = fa.align(img, det.points[0] - shift, "dlib150")
    assert chip[:, :30].max() == 0
    assert chip[:, 120:].max() > 0
    grey = fa.align(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY), det.points[0], "arcface112")
    assert grey.shape == (112, 112)
    np.testing.assert_array_equal(
        fa.align_batch(img, det.points[:1], "arcface112")[0], fa.align(img, det.points[0], "arcface112")
    )


def test_gate_passes_portraits_and_rejects_non_faces(portraits: dict) -> None:
    gate = fa.QualityGate()
    for name, (img, det) in portraits.items():
        _, qualities = fa.assess(img, det.boxes, det.scores, det.points)
        assert all(gate.gate(q)[0] for q in qualities), (name, qualities)
    # Animals, with a detector made permissive on purpose so there are candidates to reject.
    permissive = _mtcnn(thresholds=(0.5, 0.5, 0.5))
    images = [load_rgb(PHOTOS / n, 640) for n in ("dog.jpg", "horses.jpg", "baboon.jpg", "messi5.jpg")]
    found = permissive.detect(images)
    candidates = 0
    reasons = []
    for img, det in zip(images[:3], found[:3], strict=True):
        _, qualities = fa.assess(img, det.boxes, det.scores, det.points)
        candidates += len(qualities)
        for q in qualities:
            passed, reason = gate.gate(q)
            assert not passed
            assert reason in fa.GATE_REASONS
            reasons.append(reason)
    assert candidates >= 1  # the dog photo gives a 0.85 "face" at these thresholds
    # messi5: the real face is tiny (eyes ~12 px apart), the other candidate is not a face.
    _, qualities = fa.assess(images[3], found[3].boxes, found[3].scores, found[3].points)
    verdicts = sorted(gate.gate(q)[1] or "" for q in qualities)
    assert verdicts == ["low_score", "small"], qualities


def test_gate_reasons_follow_the_measurements() -> None:
    good = fa.FaceQuality(
        score=0.999,
        roll=5.0,
        yaw=-8.0,
        pitch=4.0,
        sharpness=0.12,
        iod_px=60.0,
        box_px=140.0,
        transform_scale=0.9,
        transform_rotation=-5.0,
        shape_error=0.05,
        weight=0.8,
    )
    gate = fa.QualityGate()
    assert gate.gate(good) == (True, None)
    cases = {
        "low_score": {"score": 0.8},
        "small": {"iod_px": 10.0},
        "shape": {"shape_error": 0.4},
        "pose": {"yaw": 60.0},
        "blur": {"sharpness": 0.005},
        "low_weight": {"weight": 0.05},
    }
    assert set(cases) == set(fa.GATE_REASONS)
    for reason, change in cases.items():
        assert gate.gate(dataclasses.replace(good, **change)) == (False, reason)
    for angle in ({"roll": -70.0}, {"pitch": 45.0}):
        assert gate.gate(dataclasses.replace(good, **angle)) == (False, "pose")
    # The first failing check wins.
    assert gate.gate(dataclasses.replace(good, score=0.5, sharpness=0.0)) == (False, "low_score")


# ------------------------------------------------------------------------------ batched torch alignment

# Mean absolute difference (grey levels) allowed between a torch chip and the cv2 chip. Seen on these
# photos: 0.07-0.13 where the chip magnifies (both bilinear), 0.5-1.1 where it shrinks by 1.3-4.2x
# (cv2's area resize on the photo grid against B-spline taps).
MAX_CHIP_DIFF = 1.5


def _flat(portraits: dict) -> tuple[list[np.ndarray], torch.Tensor, torch.Tensor]:
    images = [img for img, _ in portraits.values()]
    points = torch.from_numpy(np.concatenate([det.points for _, det in portraits.values()]))
    index = torch.tensor([i for i, (_, det) in enumerate(portraits.values()) for _ in range(len(det))])
    return images, points, index


def test_torch_transforms_equal_numpy_ones(portraits: dict) -> None:
    _, points, _ = _flat(portraits)
    for template in fa.TEMPLATES:
        np.testing.assert_allclose(
            fa.alignment_transforms_torch(points, template).numpy(),
            fa.alignment_transforms(points.numpy(), template),
            atol=1e-9,
        )
    with pytest.raises(ValueError, match="degenerate"):
        fa.alignment_transforms_torch(torch.zeros((1, 5, 2)))


def test_torch_alignment_matches_cv2_chips(detector: MTCNN, portraits: dict) -> None:
    images, points, index = _flat(portraits)
    # Two big photos too, where the chip shrinks the face 3-4x (the antialiasing matters there).
    big = [load_rgb(FACES / "img1.jpg", 1024), load_rgb(FACES / "couple.jpg", 1024)]
    big_dets = detector.detect(big)
    images = images + big
    points = torch.cat([points, torch.from_numpy(np.concatenate([d.points for d in big_dets]))])
    big_index = [len(portraits) + i for i, d in enumerate(big_dets) for _ in range(len(d))]
    index = torch.cat([index, torch.tensor(big_index)])
    assert len(index) >= 10
    for template in ("dlib150", "arcface112"):
        chips = fa.align_batch_torch([torch.from_numpy(im) for im in images], points, index, template)
        size = fa.TEMPLATES[template].size
        assert chips.shape == (len(index), size, size, 3)
        assert chips.dtype == torch.uint8
        shrink = 1.0 / np.sqrt(np.abs(np.linalg.det(fa.alignment_transforms(points.numpy(), template)[:, :, :2])))
        assert shrink.max() > 2.5  # the antialiased path is exercised (arcface112: > 4)
        assert shrink.min() < 1.0  # and the plain bilinear one
        for k, (i, pts) in enumerate(zip(index.tolist(), points.numpy(), strict=True)):
            want = fa.align(images[i], pts, template)
            diff = float(np.abs(chips[k].numpy().astype(np.int16) - want).mean())
            assert diff < MAX_CHIP_DIFF, (template, k, shrink[k], diff)


def test_torch_alignment_edges_grey_and_batch_forms(portraits: dict) -> None:
    img, det = portraits["img2.jpg"]
    other, other_det = portraits["couple.jpg"]
    shift = np.array([det.points[0][:, 0].mean(), 0.0])
    # A face pushed half out of its photo, beside a photo that is wider: still black past its edge.
    points = torch.from_numpy(np.stack([det.points[0] - shift, other_det.points[0]]))
    chips = fa.align_batch_torch([torch.from_numpy(img), torch.from_numpy(other)], points, torch.tensor([0, 1]))
    assert chips[0, :, :30].max() == 0
    assert chips[0, :, 120:].max() > 0
    want = fa.align(img, det.points[0] - shift)
    assert float(np.abs(chips[0].numpy().astype(np.int16) - want).mean()) < MAX_CHIP_DIFF
    # One (B,H,W,C) tensor gives what a list does; grey photos give grey chips.
    stacked = torch.from_numpy(np.stack([img, img]))
    pts = torch.from_numpy(det.points[:1]).repeat(2, 1, 1)
    a = fa.align_batch_torch(stacked, pts, torch.tensor([1, 0]), "arcface112")
    b = fa.align_batch_torch([torch.from_numpy(img)], pts[:1], torch.tensor([0]), "arcface112")
    # Equal up to float32 rounding of positions on the taller canvas (a level here and there).
    for chip in a:
        assert int((chip.to(torch.int16) - b[0].to(torch.int16)).abs().max()) <= 1
        assert float((chip.to(torch.int16) - b[0].to(torch.int16)).abs().float().mean()) < 0.05
    grey_img = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    grey = fa.align_batch_torch([torch.from_numpy(grey_img)], pts[:1], torch.tensor([0]), "arcface112")
    assert grey.shape == (1, 112, 112)
    grey_cv2 = fa.align(grey_img, det.points[0], "arcface112")
    assert float(np.abs(grey[0].numpy().astype(np.int16) - grey_cv2).mean()) < MAX_CHIP_DIFF
    empty = fa.align_batch_torch([torch.from_numpy(img)], torch.zeros((0, 5, 2)), torch.zeros(0, dtype=torch.int64))
    assert empty.shape == (0, 150, 150, 3)
    with pytest.raises(ValueError, match="image_index"):
        fa.align_batch_torch([torch.from_numpy(img)], pts[:1], torch.tensor([3]))
    with pytest.raises(ValueError, match="indices"):
        fa.align_batch_torch([torch.from_numpy(img)], pts, torch.tensor([0]))


@pytest.mark.gpu
def test_torch_alignment_on_cuda_matches_cpu(portraits: dict) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    images, points, index = _flat(portraits)
    cpu = fa.align_batch_torch([torch.from_numpy(im) for im in images], points, index)
    gpu = fa.align_batch_torch([torch.from_numpy(im).cuda() for im in images], points.cuda(), index.cuda())
    assert gpu.device.type == "cuda"
    assert float((gpu.cpu().to(torch.int16) - cpu.to(torch.int16)).abs().float().mean()) < 0.5


@pytest.mark.slow
def test_bf16_channels_last_chain_keeps_faces_and_embeddings(portraits: dict) -> None:
    """The GPU settings of the face chain, checked on the CPU: MTCNN under bf16 autocast with
    channels_last (P-/R-Net in bf16, O-Net float32), the torch alignment, dlib's embedder in bf16,
    against float32 MTCNN, cv2 alignment and the float32 embedder. Seen: box IoU >= 0.93, cosine
    >= 0.996."""
    from realdata import packaged_weight

    from photolens.models.face_embed import FaceEmbedder

    dat = packaged_weight("dlib_resnet34", "dlib_face_recognition_resnet_model_v1.dat")
    images = [img for img, _ in portraits.values()]
    fast_detector = _mtcnn(dtype=torch.bfloat16, channels_last=True)
    assert fast_detector.pnet.conv1.weight.dtype == torch.float32  # autocast: weights stay float32
    fast = fast_detector.detect(images)
    ref_embedder = FaceEmbedder.from_dat(dat)
    fast_embedder = FaceEmbedder.from_dat(dat, dtype=torch.bfloat16, channels_last=True)
    tensors = [torch.from_numpy(img) for img in images]
    compared = 0
    for k, ((name, (img, det)), quick) in enumerate(zip(portraits.items(), fast, strict=True)):
        assert len(quick) == len(det), name
        ref = ref_embedder.embed(fa.align_batch(img, det.points))
        chips = fa.align_batch_torch(tensors, torch.from_numpy(quick.points), torch.full((len(quick),), k))
        got = fast_embedder.embed(chips.numpy())
        for i, box in enumerate(det.boxes):
            j = int(np.argmax([_box_iou(box, other) for other in quick.boxes]))
            assert _box_iou(box, quick.boxes[j]) > 0.9, name
            assert float(ref[i] @ got[j]) >= 0.99, name
            compared += 1
    assert compared >= 8


def _box_iou(a: np.ndarray, b: np.ndarray) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return float(inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter))
