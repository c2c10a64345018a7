"""Five-point face alignment, pose estimate, sharpness and a quality weight per face.

Points are MTCNN's five landmarks (left eye, right eye, nose, mouth left, mouth right) in continuous
pixel-edge coordinates (pixel j spans [j, j+1)); see :mod:`photolens.models.mtcnn`. Templates use the
same convention in chip pixels, so a similarity transform maps image coordinates to chip coordinates
with no half-pixel fix-ups except at the OpenCV boundary (OpenCV puts pixel centres on integers).

Why weights: 001_3c33a7603d0fbc67.txt (VK, "Smart photos") keeps a face for recognition only when it
is sharp, big enough, not too turned and realistic, and lowers a face's weight "the larger the
transform and the angles". :func:`assess` turns that into numbers; :class:`QualityGate` is the cut.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from photolens.schemas.calibration import load_calibration

__all__ = [
    "GATE_REASONS",
    "TEMPLATES",
    "FaceQuality",
    "FaceTemplate",
    "QualityGate",
    "align",
    "align_batch",
    "align_batch_torch",
    "alignment_transforms",
    "alignment_transforms_torch",
    "assess",
    "estimate_pose",
    "estimate_poses",
    "quality_weight",
    "sharpness",
    "similarity_transforms",
    "transform_points",
]


@dataclass(frozen=True, eq=False)  # arrays inside: no field-wise ==
class FaceTemplate:
    """Where the five points go in a square chip of ``size`` pixels (pixel-edge coordinates).

    ``weights`` weigh the points in the least-squares fit (they need not sum to one).
    """

    name: str
    size: int
    points: np.ndarray
    weights: np.ndarray


def _template(name: str, size: int, points: list[list[float]], weights: list[float]) -> FaceTemplate:
    pts = np.asarray(points, dtype=np.float64)
    pts.setflags(write=False)
    w = np.asarray(weights, dtype=np.float64)
    w.setflags(write=False)
    return FaceTemplate(name=name, size=size, points=pts, weights=w)


# dlib's 150x150 face chip, padding 0.25: the input of dlib's ResNet face recognition model.
#
# dlib aligns its own 5 landmarks (outer/inner eye corners and the base of the nose) to a fixed mean
# shape (dlib get_face_chip_details); MTCNN's eye centres, nose tip and mouth corners are different
# points, so this template is fitted (tools/calibrate.py, fit_dlib150; values in schemas/calibration.json)
# on the calibration half of ../shared/data/faces/deepface only (tests/data/calibration_split.json): photos
# at long side 800 px, dlib's HOG detector (upsample 1) and shape_predictor_5_face_landmarks.dat on the faces
# MTCNN also found (box IoU > 0.3). dlib's exact image->chip similarity of each face (its get_mapping_to_chip)
# maps MTCNN's five points into dlib's chip; the template is their mean (the least-squares solution) and each
# point is weighed by 1/variance of those mapped points (largest weight 1): the eyes scatter least, as in
# dlib's own alignment, which 4 of its 5 points dominate. Figures of the fit: README, Calibration.
_DLIB150_FIT = load_calibration()["face_align"]["dlib150"]
DLIB150 = _template("dlib150", int(_DLIB150_FIT["size"]), _DLIB150_FIT["points"], _DLIB150_FIT["weights"])

# insightface's ArcFace 112x112 template (arcface_dst in insightface/utils/face_align.py), given there
# in OpenCV pixel-centre coordinates: +0.5 puts it in our pixel-edge convention.
ARCFACE112 = _template(
    "arcface112",
    112,
    [
        [38.2946 + 0.5, 51.6963 + 0.5],
        [73.5318 + 0.5, 51.5014 + 0.5],
        [56.0252 + 0.5, 71.7366 + 0.5],
        [41.5493 + 0.5, 92.3655 + 0.5],
        [70.7299 + 0.5, 92.2041 + 0.5],
    ],
    [1.0, 1.0, 1.0, 1.0, 1.0],
)

TEMPLATES: dict[str, FaceTemplate] = {t.name: t for t in (DLIB150, ARCFACE112)}


def _get_template(template: str | FaceTemplate) -> FaceTemplate:
    if isinstance(template, FaceTemplate):
        return template
    try:
        return TEMPLATES[template]
    except KeyError:
        raise ValueError(f"unknown template {template!r}; known: {sorted(TEMPLATES)}") from None


def _as_points(points: np.ndarray) -> np.ndarray:
    pts = np.asarray(points, dtype=np.float64)
    if pts.shape[-2:] != (5, 2):
        raise ValueError(f"expected (..., 5, 2) points, got shape {pts.shape}")
    if not np.isfinite(pts).all():
        raise ValueError("points must be finite")
    return pts


# ---------------------------------------------------------------------------------------------
# Similarity transforms


def similarity_transforms(src: np.ndarray, dst: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation; no reflection) per face.

    Umeyama (1991), with optional per-point weights. src (n,k,2) or (k,2); dst (k,2) or like src.
    Returns (n,2,3) (or (2,3) for a single src) mapping src → dst: ``dst ≈ M[:, :2] @ p + M[:, 2]``.
    """
    single = np.asarray(src).ndim == 2
    s = np.asarray(src, dtype=np.float64).reshape((-1, *np.shape(src)[-2:]))
    d = np.broadcast_to(np.asarray(dst, dtype=np.float64), s.shape)
    k = s.shape[1]
    w = np.ones(k) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (k,) or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be {k} non-negative numbers with a positive sum")
    w = w / w.sum()
    mean_s = np.einsum("k,nkj->nj", w, s)
    mean_d = np.einsum("k,nkj->nj", w, d)
    s0 = s - mean_s[:, None]
    d0 = d - mean_d[:, None]
    cov = np.einsum("k,nki,nkj->nij", w, d0, s0)
    u, sing, vt = np.linalg.svd(cov)
    # A reflection would fit a mirrored face better than any rotation; forbid it (Umeyama's S).
    flip = np.sign(np.linalg.det(u) * np.linalg.det(vt))
    flip[flip == 0] = 1.0
    fix = np.ones((s.shape[0], 2))
    fix[:, 1] = flip
    rot = u @ (fix[:, :, None] * vt)
    var = np.einsum("k,nkj->n", w, s0**2)
    if (var <= 1e-12).any():
        raise ValueError("degenerate points: all five coincide")
    scale = (sing * fix).sum(axis=1) / var
    lin = scale[:, None, None] * rot
    trans = mean_d - np.einsum("nij,nj->ni", lin, mean_s)
    out = np.concatenate([lin, trans[:, :, None]], axis=2)
    return out[0] if single else out


def transform_points(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply (2,3) or (n,2,3) affine matrices to points (...,2) / (n,...,2)."""
    m = np.asarray(matrix, dtype=np.float64)
    p = np.asarray(points, dtype=np.float64)
    if m.ndim == 2:
        return p @ m[:, :2].T + m[:, 2]
    trans = m[:, :, 2].reshape((m.shape[0],) + (1,) * (p.ndim - 2) + (2,))
    return np.einsum("nij,n...j->n...i", m[:, :, :2], p) + trans


def alignment_transforms(points: np.ndarray, template: str | FaceTemplate = "dlib150") -> np.ndarray:
    """(n,5,2) image points → (n,2,3) image→chip transforms (pixel-edge coordinates)."""
    t = _get_template(template)
    pts = _as_points(points)
    return similarity_transforms(pts.reshape(-1, 5, 2), t.points, t.weights)


def _scale_of(m: np.ndarray) -> np.ndarray:
    return np.sqrt(np.abs(np.linalg.det(m[..., :2])))


def _warp_one(image: np.ndarray, m: np.ndarray, size: int) -> np.ndarray:
    """Warp with an image→chip transform, area-downsampling first when the chip is smaller.

    Only the region under the chip is touched. Bilinear sampling alone aliases when it shrinks by
    more than 2x (a large face into a 150 px chip); dlib downsamples with a pyramid before sampling
    for the same reason. Outside the image the chip is black, as in dlib.
    """
    h, w = image.shape[:2]
    inv = cv2.invertAffineTransform(m)
    corners = np.array([[0, 0], [size, 0], [0, size], [size, size]], dtype=np.float64)
    mapped = corners @ inv[:, :2].T + inv[:, 2]
    x_lo = max(0, math.floor(mapped[:, 0].min()) - 2)
    y_lo = max(0, math.floor(mapped[:, 1].min()) - 2)
    x_hi = min(w, math.ceil(mapped[:, 0].max()) + 2)
    y_hi = min(h, math.ceil(mapped[:, 1].max()) + 2)
    shape = (size, size, *image.shape[2:])
    if x_hi <= x_lo or y_hi <= y_lo:
        return np.zeros(shape, dtype=np.uint8)
    crop = image[y_lo:y_hi, x_lo:x_hi]
    ch, cw = crop.shape[:2]
    fx = fy = 1.0
    scale = float(_scale_of(m))
    if scale < 1.0:
        new_w = max(1, round(cw * scale))
        new_h = max(1, round(ch * scale))
        crop = cv2.resize(crop, (new_w, new_h), interpolation=cv2.INTER_AREA)
        fx, fy = new_w / cw, new_h / ch
    # Chip ← crop (resized): undo the crop offset and the resize, then move to OpenCV's
    # pixel-centre convention on both sides: M_cv(p) = M(p + 0.5) - 0.5.
    lin = m[:, :2] @ np.diag([1.0 / fx, 1.0 / fy])
    trans = m[:, 2] + m[:, :2] @ np.array([x_lo, y_lo], dtype=np.float64)
    trans = trans + lin @ np.array([0.5, 0.5]) - 0.5
    m_cv = np.concatenate([lin, trans[:, None]], axis=1)
    out = cv2.warpAffine(
        np.ascontiguousarray(crop),
        m_cv,
        (size, size),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0,
    )
    return out.reshape(shape)


def align_batch(image: np.ndarray, points: np.ndarray, template: str | FaceTemplate = "dlib150") -> np.ndarray:
    """All faces of one image: (n,5,2) points → (n,size,size,3) uint8 chips (n may be 0)."""
    t = _get_template(template)
    _check_image(image)
    pts = _as_points(points).reshape(-1, 5, 2)
    if pts.shape[0] == 0:
        return np.zeros((0, t.size, t.size, *image.shape[2:]), dtype=np.uint8)
    mats = alignment_transforms(pts, t)
    return np.stack([_warp_one(image, m, t.size) for m in mats])


def align(image: np.ndarray, points: np.ndarray, template: str | FaceTemplate = "dlib150") -> np.ndarray:
    """One face: (5,2) points → (size,size,3) uint8 chip."""
    return align_batch(image, np.asarray(points)[None], template)[0]


# ---------------------------------------------------------------------------------------------
# The same alignment in torch, for all faces of a batch of images in one pass on the device.

# Most antialiasing taps per axis and face. A chip shrinks a face by 1/w with w up to ~5 for the
# largest faces of a 1024 px working image into a 150 px chip: 16 taps cover the filter of w <= 5.3
# at <= 1 source pixel spacing; beyond that the taps spread out (slight aliasing, no failure).
_MAX_TAPS = 16
# Variance (source px^2) the bilinear fetch of each tap adds: the tent of one pixel has 1/6.
_TENT_VARIANCE = 1.0 / 6.0
# Bilinear samples per grid_sample call: bounds the grid and output held at once (~200 MB).
_SAMPLES_PER_CALL = 1 << 23


def alignment_transforms_torch(points: torch.Tensor, template: str | FaceTemplate = "dlib150") -> torch.Tensor:
    """(n,5,2) image points → (n,2,3) float64 image→chip transforms, on the points' device.

    Same weighted Umeyama fit (no reflection) as :func:`similarity_transforms`.
    """
    t = _get_template(template)
    s = points.to(torch.float64).reshape(-1, 5, 2)
    if not bool(torch.isfinite(s).all()):
        raise ValueError("points must be finite")
    d = torch.tensor(t.points, dtype=torch.float64, device=s.device).expand_as(s)
    w = torch.tensor(t.weights / t.weights.sum(), dtype=torch.float64, device=s.device)
    mean_s = torch.einsum("k,nkj->nj", w, s)
    mean_d = torch.einsum("k,nkj->nj", w, d)
    s0 = s - mean_s[:, None]
    d0 = d - mean_d[:, None]
    cov = torch.einsum("k,nki,nkj->nij", w, d0, s0)
    u, sing, vt = torch.linalg.svd(cov)
    flip = torch.sign(torch.linalg.det(u) * torch.linalg.det(vt))
    flip = torch.where(flip == 0, torch.ones_like(flip), flip)
    fix = torch.stack([torch.ones_like(flip), flip], dim=1)
    rot = u @ (fix[:, :, None] * vt)
    var = torch.einsum("k,nkj->n", w, s0**2)
    if bool((var <= 1e-12).any()):
        raise ValueError("degenerate points: all five coincide")
    scale = (sing * fix).sum(dim=1) / var
    lin = scale[:, None, None] * rot
    trans = mean_d - torch.einsum("nij,nj->ni", lin, mean_s)
    return torch.cat([lin, trans[:, :, None]], dim=2)


def _quadratic_bspline(x: torch.Tensor) -> torch.Tensor:
    """box * box * box of unit width: a box filter (area average) followed by a tent (bilinear)."""
    a = x.abs()
    return torch.where(a < 0.5, 0.75 - a**2, torch.where(a < 1.5, 0.5 * (1.5 - a) ** 2, torch.zeros_like(a)))


def _as_list(images: torch.Tensor | Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], bool]:
    """A (B,H,W[,C]) batch or a list of (H,W[,C]) tensors → list of (H,W,C) tensors, grey?"""
    items = list(images.unbind(0)) if isinstance(images, torch.Tensor) else list(images)
    if not items:
        raise ValueError("no images")
    grey = items[0].ndim == 2
    for im in items:
        if im.ndim != (2 if grey else 3) or im.shape[0] < 1 or im.shape[1] < 1:
            raise ValueError(f"images must all be HxW or all HxWxC, got shape {tuple(im.shape)}")
    return [im[..., None] if grey else im for im in items], grey


def align_batch_torch(
    images: torch.Tensor | Sequence[torch.Tensor],
    points: torch.Tensor,
    image_index: torch.Tensor,
    template: str | FaceTemplate = "dlib150",
) -> torch.Tensor:
    """All faces of a batch of images in one pass: (n,5,2) points of faces in images[image_index] →
    (n,S,S[,C]) uint8 chips on the images' device, matching :func:`align_batch` (cv2) to about one
    grey level on average.

    ``images`` is a (B,H,W[,C]) uint8 batch or a list of (H,W[,C]) tensors of any sizes. Outside its
    photo a chip is black, as in :func:`align_batch`.

    How it matches :func:`_warp_one` without a per-face step: that function area-downsamples the face
    by the chip scale s (< 1) and then samples bilinearly, i.e. filters the photo with a box of width
    w = 1/s and then a tent of width w. Here every chip pixel averages k x k bilinear taps laid out
    over that box-then-tent (a quadratic B-spline of support 3w; the tap positions scale with each
    face's own w, so faces with the same k share the weights and one call), k = ceil(3w) up to 16;
    a magnified face (w <= 1) gets one tap: plain bilinear, as in cv2.

    The photos that hold faces are stacked into one tall canvas with a zero row between them, and a
    tap that falls more than half a pixel outside its own photo is weighted zero, so each face sees
    only its photo and black around it, in one ``grid_sample`` per row of taps for all faces that
    have that many taps.
    """
    t = _get_template(template)
    items, grey = _as_list(images)
    device = items[0].device
    channels = int(items[0].shape[2])
    size = t.size
    pts = points.to(device=device).reshape(-1, 5, 2)
    owner = image_index.to(device=device, dtype=torch.int64).reshape(-1)
    if owner.shape[0] != pts.shape[0]:
        raise ValueError(f"{pts.shape[0]} faces but {owner.shape[0]} image indices")
    n = pts.shape[0]
    out_shape = (n, size, size) if grey else (n, size, size, channels)
    if n == 0:
        return torch.zeros(out_shape, dtype=torch.uint8, device=device)
    used = torch.unique(owner).tolist()
    if used[0] < 0 or used[-1] >= len(items):
        raise ValueError(f"image_index must lie in [0, {len(items)})")

    # One canvas of the photos that have faces, one zero row below each.
    heights = [int(items[i].shape[0]) for i in used]
    canvas_w = max(int(items[i].shape[1]) for i in used)
    canvas = torch.zeros((1, channels, sum(heights) + len(used), canvas_w), dtype=torch.float32, device=device)
    top = torch.zeros(len(items), dtype=torch.float64, device=device)
    dims = torch.zeros((len(items), 2), dtype=torch.float64, device=device)  # (width, height) per photo
    row = 0
    for i, h in zip(used, heights, strict=True):
        im = items[i]
        canvas[0, :, row : row + h, : im.shape[1]] = im.permute(2, 0, 1).to(torch.float32)
        top[i] = row
        dims[i, 0], dims[i, 1] = float(im.shape[1]), float(h)
        row += h + 1

    mats = alignment_transforms_torch(pts, t)
    lin = mats[:, :, :2]
    inv = torch.linalg.inv(lin)  # chip → image (linear part)
    inv_t = -torch.einsum("nij,nj->ni", inv, mats[:, :, 2])
    # Source pixels per chip pixel, per face: the width of cv2's area filter.
    w = 1.0 / torch.sqrt(torch.abs(torch.linalg.det(lin)))
    # Each tap's bilinear fetch blurs by a tent of its own: narrow the B-spline to make up for it.
    w_eff = torch.where(w > 1.0, torch.sqrt(torch.clamp(w**2 - 4.0 * _TENT_VARIANCE, min=1e-12)), 0.0)
    # Taps per axis for each face: spacing <= 1 source pixel over the filter's 3 w support.
    face_taps = torch.clamp(torch.ceil(3.0 * w_eff), 1, _MAX_TAPS).to(torch.int64)

    # Chip pixel centres (pixel-edge convention: pixel j spans [j, j+1)) mapped into each photo.
    centre = torch.arange(size, dtype=torch.float64, device=device) + 0.5
    cy, cx = torch.meshgrid(centre, centre, indexing="ij")
    chip_xy = torch.stack([cx, cy], dim=-1).reshape(1, -1, 2)
    src = torch.einsum("nij,npj->npi", inv, chip_xy.expand(n, -1, -1)) + inv_t[:, None, :]  # (n, S*S, 2)
    # float32 from here: a canvas of 64 photos of 1024 rows still places taps to ~0.004 px.
    src = src.to(torch.float32)
    photo_top, photo_w, photo_h = (v.to(torch.float32) for v in (top[owner], dims[owner, 0], dims[owner, 1]))
    canvas_h = canvas.shape[2]
    pixels = size * size
    out = torch.empty((n, channels, pixels), dtype=torch.float32, device=device)
    # Faces are grouped by their tap count (a handful of groups), so a small face does not pay for
    # the biggest one in its batch and a face's chip does not depend on its batch-mates.
    for taps in torch.unique(face_taps).tolist():
        group = (face_taps == taps).nonzero(as_tuple=True)[0]
        offsets = (torch.arange(taps, dtype=torch.float64, device=device) + 0.5) / taps * 3.0 - 1.5
        weights = _quadratic_bspline(offsets) if taps > 1 else torch.ones(1, dtype=torch.float64, device=device)
        weights = (weights / weights.sum()).to(torch.float32)
        # The filter runs along the photo's axes (cv2 area-resizes on the photo's grid).
        tap = (offsets[None, :] * w_eff[group, None]).to(torch.float32)  # (g, k) source-pixel offsets
        per_call = max(1, _SAMPLES_PER_CALL // (pixels * taps))
        for lo in range(0, group.numel(), per_call):
            part = slice(lo, min(group.numel(), lo + per_call))
            faces = group[part]
            m = faces.numel()
            xs = src[faces, :, None, 0] + tap[part, None, :]  # (m, S*S, k)
            # A tap more than half a pixel outside its photo reads only zeros there (cv2's black
            # border); sent off the canvas, it reads grid_sample's zero padding, not a neighbour.
            x_out = (xs <= -0.5) | (xs >= photo_w[faces, None, None] + 0.5)
            # grid_sample, align_corners=False: -1 and +1 are the outer edges of the canvas.
            gx = torch.where(x_out, -2.0, xs * (2.0 / canvas_w) - 1.0)
            acc = torch.zeros((channels, m * pixels), dtype=torch.float32, device=device)
            for i in range(taps):
                ys = src[faces, :, None, 1] + tap[part, i, None, None]  # (m, S*S, 1)
                y_out = (ys <= -0.5) | (ys >= photo_h[faces, None, None] + 0.5)
                gy = torch.where(y_out, -2.0, (ys + photo_top[faces, None, None]) * (2.0 / canvas_h) - 1.0)
                grid = torch.stack([gx, gy.expand_as(gx)], dim=-1).reshape(1, m * pixels, taps, 2)
                sample = F.grid_sample(canvas, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
                acc += weights[i] * (sample[0] @ weights)  # (C, m*S*S): one row of taps, weighted
            out[faces] = acc.reshape(channels, m, pixels).permute(1, 0, 2)
    chips = out.reshape(n, channels, size, size).permute(0, 2, 3, 1)
    chips = chips.round_().clamp_(0, 255).to(torch.uint8)
    return chips[..., 0].contiguous() if grey else chips.contiguous()


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise TypeError("image must be a uint8 numpy array")
    if image.ndim not in (2, 3) or min(image.shape[:2]) < 1:
        raise ValueError(f"image must be HxW or HxWxC, got shape {image.shape}")


# ---------------------------------------------------------------------------------------------
# Pose from five points (documented approximations; no 3-D model fit).

# Depth of the nose tip in front of the eyes, over the inter-ocular distance, and in front of the
# eye-mouth plane, over the eye-to-mouth height. Both ~0.45 on an average adult head (nose tip ~30 mm
# ahead of the eyes, eye centres ~63 mm apart; eyes to mouth corners ~65 mm) and on the generic 3-D
# face model often used for head-pose with solvePnP. A nose offset x (in inter-ocular distances)
# then means yaw = atan(x / 0.45); similarly for pitch.
_YAW_DEPTH = 0.45
_PITCH_DEPTH = 0.45
# Nose height between the eye line (0) and the mouth line (1) on a level face: 0.588 is the median
# of MTCNN's points on the frontal portraits of ../shared/data/faces/deepface (quartiles 0.53/0.65),
# in line with adult proportions (eyes to nose tip ~38 mm, eyes to mouth corners ~65 mm).
_NOSE_HEIGHT_LEVEL = 0.588


def estimate_poses(points: np.ndarray) -> np.ndarray:
    """(...,5,2) points → (...,3) (roll, yaw, pitch) in degrees.

    roll: angle of the eye line (left eye → right eye) against the x axis; positive when the
      right-hand eye is lower, i.e. the face is turned clockwise in the image.
    yaw: nose offset from the eyes' midpoint along the eye line, in inter-ocular distances, through
      atan(offset / 0.45); positive when the nose points to the image's right.
    pitch: nose height between the eye line (0) and the mouth line (1) minus a level face's 0.588,
      through atan(delta / 0.45); positive when the face looks down.
    All three are rough (MTCNN points on strongly turned faces are themselves rough) but monotone,
    which is what a weight needs.
    """
    pts = _as_points(points)
    left, right, nose = pts[..., 0, :], pts[..., 1, :], pts[..., 2, :]
    mouth = 0.5 * (pts[..., 3, :] + pts[..., 4, :])
    eye_mid = 0.5 * (left + right)
    eye_vec = right - left
    iod = np.maximum(np.linalg.norm(eye_vec, axis=-1), 1e-9)
    u = eye_vec / iod[..., None]
    v = np.stack([-u[..., 1], u[..., 0]], axis=-1)  # face "down" direction (image y grows down)
    roll = np.degrees(np.arctan2(eye_vec[..., 1], eye_vec[..., 0]))
    nose_rel = nose - eye_mid
    yaw_offset = (nose_rel * u).sum(-1) / iod
    yaw = np.degrees(np.arctan(yaw_offset / _YAW_DEPTH))
    mouth_height = np.maximum(((mouth - eye_mid) * v).sum(-1), 1e-9)
    nose_height = (nose_rel * v).sum(-1) / mouth_height
    pitch = np.degrees(np.arctan((nose_height - _NOSE_HEIGHT_LEVEL) / _PITCH_DEPTH))
    return np.stack([roll, yaw, pitch], axis=-1)


def estimate_pose(points: np.ndarray) -> tuple[float, float, float]:
    """(5,2) points → (roll, yaw, pitch) in degrees; see :func:`estimate_poses`."""
    roll, yaw, pitch = estimate_poses(np.asarray(points)[None])[0]
    return float(roll), float(yaw), float(pitch)


# ---------------------------------------------------------------------------------------------
# Sharpness


def sharpness(chip: np.ndarray) -> float:
    """Variance of the Laplacian of the grey chip's central part, over the variance of its grey
    levels: high-frequency energy relative to contrast, so lighting and contrast cancel out.

    Measured on the middle 2/3 of the chip (the face, not the background the padding adds). Values
    depend on the chip size: compare chips of one template. Sensor noise reads as sharpness.
    """
    grey = cv2.cvtColor(chip, cv2.COLOR_RGB2GRAY) if chip.ndim == 3 else chip
    h, w = grey.shape[:2]
    y0, x0 = h // 6, w // 6
    centre = grey[y0 : h - y0, x0 : w - x0].astype(np.float32) / 255.0
    lap = cv2.Laplacian(centre, cv2.CV_32F, ksize=1)
    # Drop the Laplacian's one-pixel border: it sees the reflected edge, not the image.
    lap = lap[1:-1, 1:-1]
    contrast = float(centre.var())
    return float(lap.var()) / max(contrast, 1e-6)


# ---------------------------------------------------------------------------------------------
# Quality weight and gate

# Softness of each factor of the weight (a factor is 1 at best and falls smoothly). Seen on the
# deepface portraits (long side 800 px, dlib150 chips): sharpness 0.04-0.37, and 0.003-0.075 after a
# Gaussian blur of sigma 2; shape error 0.02-0.18 on real faces; weights 0.65-0.95 for clear frontal
# faces, 0.1-0.45 for turned or tilted ones, < 0.05 for tiny or blurred ones.
_SCORE_FLOOR = 0.7  # O-Net's default threshold: a score there gives factor 0
_POSE_SIGMA_DEG = 30.0  # yaw/pitch of 30° → factor exp(-1/2) ≈ 0.61 each
_ROTATION_SIGMA_DEG = 45.0  # in-plane rotation undone by the alignment
_SHAPE_SIGMA = 0.15  # RMS residual of the 5 points against a frontal layout, per inter-ocular
_SHARPNESS_SCALE = 0.05  # factor = 1 - exp(-sharpness / scale)
_FULL_SIZE_IOD_PX = 40.0  # inter-ocular pixels at which size no longer lowers the weight


@dataclass(frozen=True)
class FaceQuality:
    """Per-face measurements and the resulting weight in [0, 1]."""

    score: float
    roll: float
    yaw: float
    pitch: float
    sharpness: float
    iod_px: float  # inter-ocular distance in image pixels
    box_px: float  # shorter side of the detector box
    transform_scale: float  # chip pixels per image pixel (>1: the face was magnified)
    transform_rotation: float  # degrees the alignment rotated the face
    shape_error: float  # RMS misfit of the 5 points to a frontal face, in inter-ocular distances
    weight: float


def quality_weight(
    *,
    score: float,
    yaw: float,
    pitch: float,
    rotation: float,
    shape_error: float,
    sharp: float,
    iod_px: float,
) -> float:
    """Product of factors, each in [0,1]: confidence, out-of-plane pose, size of the alignment
    transform (rotation and how unrealistic the point layout is), sharpness and face size."""
    f_score = min(max((score - _SCORE_FLOOR) / (1.0 - _SCORE_FLOOR), 0.0), 1.0)
    f_pose = math.exp(-0.5 * ((yaw / _POSE_SIGMA_DEG) ** 2 + (pitch / _POSE_SIGMA_DEG) ** 2))
    f_transform = math.exp(-0.5 * ((rotation / _ROTATION_SIGMA_DEG) ** 2 + (shape_error / _SHAPE_SIGMA) ** 2))
    f_sharp = 1.0 - math.exp(-max(sharp, 0.0) / _SHARPNESS_SCALE)
    f_size = min(max(iod_px / _FULL_SIZE_IOD_PX, 0.0), 1.0)
    return float(f_score * f_pose * f_transform * f_sharp * f_size)


def _shape_errors(points: np.ndarray) -> np.ndarray:
    """RMS residual of an equal-weight similarity fit to the mean MTCNN layout of frontal faces
    (the dlib150 template points, which are that mean), per template inter-ocular distance.

    Independent of the chip template; grows with strong yaw/pitch and with point sets no face makes.
    """
    ref = DLIB150.points
    mats = similarity_transforms(points, ref)
    fitted = transform_points(mats, points)
    rms = np.sqrt(((fitted - ref) ** 2).sum(-1).mean(-1))
    return rms / float(np.linalg.norm(ref[1] - ref[0]))


def assess(
    image: np.ndarray,
    boxes: np.ndarray,
    scores: np.ndarray,
    points: np.ndarray,
    template: str | FaceTemplate = "dlib150",
) -> tuple[np.ndarray, list[FaceQuality]]:
    """Align every face of one image and measure it: returns (chips (n,S,S,3) uint8, qualities).

    boxes (n,4), scores (n,), points (n,5,2) as returned by the MTCNN detector. The chips are the
    ones an embedder should use, so each face is warped once.
    """
    t = _get_template(template)
    pts = _as_points(points).reshape(-1, 5, 2)
    box = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    score = np.asarray(scores, dtype=np.float64).reshape(-1)
    if not (pts.shape[0] == box.shape[0] == score.shape[0]):
        raise ValueError(f"boxes {box.shape}, scores {score.shape}, points {pts.shape} disagree")
    chips = align_batch(image, pts, t)
    if pts.shape[0] == 0:
        return chips, []
    mats = alignment_transforms(pts, t)
    poses = estimate_poses(pts)
    shape_err = _shape_errors(pts)
    scale = _scale_of(mats)
    rotation = np.degrees(np.arctan2(mats[:, 1, 0], mats[:, 0, 0]))
    iod = np.linalg.norm(pts[:, 1] - pts[:, 0], axis=-1)
    box_px = np.minimum(box[:, 2] - box[:, 0], box[:, 3] - box[:, 1])
    out: list[FaceQuality] = []
    for i in range(pts.shape[0]):
        sharp = sharpness(chips[i])
        roll, yaw, pitch = (float(x) for x in poses[i])
        out.append(
            FaceQuality(
                score=float(score[i]),
                roll=roll,
                yaw=yaw,
                pitch=pitch,
                sharpness=sharp,
                iod_px=float(iod[i]),
                box_px=float(box_px[i]),
                transform_scale=float(scale[i]),
                transform_rotation=float(rotation[i]),
                shape_error=float(shape_err[i]),
                weight=quality_weight(
                    score=float(score[i]),
                    yaw=yaw,
                    pitch=pitch,
                    rotation=float(rotation[i]),
                    shape_error=float(shape_err[i]),
                    sharp=sharp,
                    iod_px=float(iod[i]),
                ),
            )
        )
    return chips, out


GateReason = Literal["low_score", "small", "shape", "pose", "blur", "low_weight"]
GATE_REASONS: tuple[GateReason, ...] = ("low_score", "small", "shape", "pose", "blur", "low_weight")


@dataclass(frozen=True)
class QualityGate:
    """Hard limits for a face to be embedded and used for templates/suggestions.

    Checked in the order of GATE_REASONS; the first failed check is the reason. ``min_size_px`` is
    the inter-ocular distance in image pixels (MTCNN's box side is about 2.4x that). Sharpness
    limits hold for the "dlib150" chip. Roll is allowed further than yaw and pitch: the alignment
    undoes it, while turned faces lose part of the face.
    """

    min_score: float = 0.9
    min_size_px: float = 16.0
    max_abs_yaw: float = 45.0
    max_abs_roll: float = 60.0
    max_abs_pitch: float = 40.0
    min_sharpness: float = 0.02
    min_weight: float = 0.15
    max_shape_error: float = 0.3

    def gate(self, quality: FaceQuality) -> tuple[bool, GateReason | None]:
        """(passed, None) or (False, the first reason it failed)."""
        checks: Sequence[tuple[bool, GateReason]] = (
            (quality.score < self.min_score, "low_score"),
            (quality.iod_px < self.min_size_px, "small"),
            (quality.shape_error > self.max_shape_error, "shape"),
            (
                abs(quality.yaw) > self.max_abs_yaw
                or abs(quality.roll) > self.max_abs_roll
                or abs(quality.pitch) > self.max_abs_pitch,
                "pose",
            ),
            (quality.sharpness < self.min_sharpness, "blur"),
            (quality.weight < self.min_weight, "low_weight"),
        )
        for failed, reason in checks:
            if failed:
                return False, reason
        return True, None
