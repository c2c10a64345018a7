"""MTCNN face detector (P-Net → R-Net → O-Net cascade) in torch, batched over images of any size.

The three networks mirror the layer layout of facenet-pytorch 2.6.0 so that its published state dicts
(`facenet_pytorch/data/{pnet,rnet,onet}.pt`, MIT) load with ``strict=True``; the package itself is never
imported (its pins conflict with our stack and it returns ``None`` for "no faces" under numpy 2).

Cascade, as in Zhang et al. 2016 and facenet-pytorch, with three deliberate differences:

* every image of a batch runs through one P-Net call per pyramid level: the levels of images of
  different sizes are zero-padded to a common canvas and the padding is masked out of the net (see
  :meth:`PNet.forward`), so a batch gives the same faces as one image at a time;
* all resampling (pyramid levels and the 24/48 px crops) is an exact area average computed from an
  integer summed-area table, i.e. what ``F.interpolate(mode="area")`` computes, but for all crops of an
  image in one gather instead of one call per box;
* crops that cross the image border are zero-padded (as in the original MTCNN) rather than clipped
  and stretched, so points and boxes of faces cut by the frame keep their geometry.

Coordinates are continuous pixel-edge coordinates: pixel (row i, column j) covers [j, j+1) x [i, i+1);
a box is (x0, y0, x1, y1) with x1/y1 exclusive. Boxes are not clipped to the image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision.ops import batched_nms

__all__ = ["MTCNN", "DetectorSettings", "FaceDetections", "ONet", "PNet", "RNet"]

MODEL_NAME = "mtcnn"
MODEL_VERSION = "facenet-pytorch-2.6.0"

# The nets were trained on pixels mapped to [-1, 1) this way (facenet-pytorch / original Caffe models).
_PIXEL_MEAN = 127.5
_PIXEL_SCALE = 0.0078125
# Activations after P-Net's first PReLU stay within a few tens for inputs in [-1, 1]; this value
# loses every max-pool comparison against them, which is what ceil_mode does with a partial window.
_MASK_VALUE = -1.0e4
_PNET_CELL = 12
_PNET_STRIDE = 2


class PNet(nn.Module):
    """Proposal net: fully convolutional, 12x12 window, stride 2."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 10, kernel_size=3)
        self.prelu1 = nn.PReLU(10)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(10, 16, kernel_size=3)
        self.prelu2 = nn.PReLU(16)
        self.conv3 = nn.Conv2d(16, 32, kernel_size=3)
        self.prelu3 = nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, kernel_size=1)
        self.softmax4_1 = nn.Softmax(dim=1)
        self.conv4_2 = nn.Conv2d(32, 4, kernel_size=1)

    def forward(self, x: torch.Tensor, valid_hw: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (box regression (B,4,h,w), face probability (B,2,h,w)).

        ``valid_hw`` (B,2) gives each image's real height/width inside a zero-padded canvas. The
        only layer where padding could leak into real output cells is the ceil-mode max pool (its last
        window is partial on an image of odd size but full on the canvas), so the padded part of that
        layer's input is pushed to a value that never wins the max. Cells whose receptive field
        reaches into the padding are garbage and must be dropped by the caller.
        """
        x = self.prelu1(self.conv1(x))
        if valid_hw is not None:
            rows = torch.arange(x.shape[2], device=x.device)
            cols = torch.arange(x.shape[3], device=x.device)
            # conv1 (3x3, no padding) shrinks each side by 2.
            row_ok = rows[None, :] < (valid_hw[:, 0:1] - 2)
            col_ok = cols[None, :] < (valid_hw[:, 1:2] - 2)
            keep = row_ok[:, None, :, None] & col_ok[:, None, None, :]
            x = x.masked_fill(~keep, _MASK_VALUE)
        x = self.pool1(x)
        x = self.prelu2(self.conv2(x))
        x = self.prelu3(self.conv3(x))
        return self.conv4_2(x), self.softmax4_1(self.conv4_1(x))


class RNet(nn.Module):
    """Refinement net on 24x24 crops."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 28, kernel_size=3)
        self.prelu1 = nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(28, 48, kernel_size=3)
        self.prelu2 = nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(48, 64, kernel_size=2)
        self.prelu3 = nn.PReLU(64)
        self.dense4 = nn.Linear(576, 128)
        self.prelu4 = nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.softmax5_1 = nn.Softmax(dim=1)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (box regression (B,4), face probability (B,2))."""
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu3(self.conv3(x))
        # The dense weights were converted from Caffe, which flattens (W, H, C)-major.
        x = x.permute(0, 3, 2, 1).contiguous()
        x = self.prelu4(self.dense4(x.view(x.shape[0], -1)))
        return self.dense5_2(x), self.softmax5_1(self.dense5_1(x))


class ONet(nn.Module):
    """Output net on 48x48 crops: box regression, 5 landmarks, face probability."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, kernel_size=3)
        self.prelu1 = nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3)
        self.prelu2 = nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(64, 64, kernel_size=3)
        self.prelu3 = nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4 = nn.Conv2d(64, 128, kernel_size=2)
        self.prelu4 = nn.PReLU(128)
        self.dense5 = nn.Linear(1152, 256)
        self.prelu5 = nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.softmax6_1 = nn.Softmax(dim=1)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (box regression (B,4), landmarks (B,10: x1..x5, y1..y5 in [0,1]), probability (B,2))."""
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu4(self.conv4(x))
        x = x.permute(0, 3, 2, 1).contiguous()
        x = self.prelu5(self.dense5(x.view(x.shape[0], -1)))
        return self.dense6_2(x), self.dense6_3(x), self.softmax6_1(self.dense6_1(x))


@dataclass(frozen=True, eq=False)  # arrays inside: no field-wise ==
class FaceDetections:
    """Faces of one image, best score first. Never ``None``: no face gives arrays with 0 rows.

    boxes (n,4) float32 x0,y0,x1,y1; scores (n,) float32; points (n,5,2) float32 (x, y) in the order
    left eye, right eye, nose, mouth left, mouth right ("left" = smaller x in a frontal face).
    """

    boxes: np.ndarray
    scores: np.ndarray
    points: np.ndarray

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    @classmethod
    def empty(cls) -> FaceDetections:
        return cls(
            boxes=np.zeros((0, 4), np.float32),
            scores=np.zeros((0,), np.float32),
            points=np.zeros((0, 5, 2), np.float32),
        )


@dataclass(frozen=True)
class DetectorSettings:
    """Cascade parameters. Defaults are facenet-pytorch's; NMS overlaps are the original MTCNN's."""

    min_face_size: int = 20
    thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7)
    factor: float = 0.709
    nms_pnet_level: float = 0.5
    nms_pnet_image: float = 0.7
    nms_rnet: float = 0.7
    # O-Net overlap is intersection over the smaller box: drops a box lying inside a bigger face.
    nms_onet_min: float = 0.7
    # Pixels per P-Net canvas (P-Net's first layer holds 10 floats per pixel) and source pixels per
    # group of images whose pyramids are built together: together they bound memory.
    max_pnet_pixels: int = 8_000_000
    # Crops per R-Net / O-Net call.
    max_crops: int = 4096

    def __post_init__(self) -> None:
        if self.min_face_size < 1:
            raise ValueError(f"min_face_size must be >= 1, got {self.min_face_size}")
        if not 0.0 < self.factor < 1.0:
            raise ValueError(f"factor must be in (0, 1), got {self.factor}")
        if len(self.thresholds) != 3 or not all(0.0 <= t <= 1.0 for t in self.thresholds):
            raise ValueError(f"thresholds must be three probabilities, got {self.thresholds}")


def _load_state(net: nn.Module, path: str | Path) -> nn.Module:
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    net.load_state_dict(state, strict=True)
    return net.eval()


# ---------------------------------------------------------------------------------------------
# Exact area resampling from a summed-area table.


def _integral(image: torch.Tensor) -> torch.Tensor:
    """(H,W,3) uint8 → (H+1,W+1,3) summed-area table, exact integers (no float rounding)."""
    h, w, c = image.shape
    # int32 holds the full sum up to ~8.4 MP; larger images need int64 (twice the memory).
    dtype = torch.int32 if 255 * h * w < 2**31 else torch.int64
    table = torch.zeros((h + 1, w + 1, c), dtype=dtype, device=image.device)
    table[1:, 1:] = image.to(dtype).cumsum(0).cumsum(1)
    return table


def _row_integral(image: torch.Tensor) -> torch.Tensor:
    """(H,W,3) uint8 → (H+1,W,3) int32 cumulative sums down each column."""
    h, w, c = image.shape
    table = torch.zeros((h + 1, w, c), dtype=torch.int32, device=image.device)
    table[1:] = image.to(torch.int32).cumsum(0)
    return table


def _area_resize(row_sums: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    """Whole-image area resize (= ``F.interpolate(mode="area")``) → (3,out_h,out_w) normalised.

    Separable: rows through the column sums, then columns through a second cumulative sum; two
    index_selects per axis are far cheaper than a 2-D gather over the whole level.
    """
    h = row_sums.shape[0] - 1
    w = row_sums.shape[1]
    zero = torch.zeros(1, dtype=torch.int64, device=row_sums.device)
    ylo, yhi, ysz = _bins(zero, zero + h, out_h, h)
    xlo, xhi, xsz = _bins(zero, zero + w, out_w, w)
    rows = (row_sums.index_select(0, yhi[0]) - row_sums.index_select(0, ylo[0])).to(torch.int64)
    cols = torch.zeros((out_h, w + 1, rows.shape[2]), dtype=torch.int64, device=row_sums.device)
    cols[:, 1:] = rows.cumsum(1)
    total = cols.index_select(1, xhi[0]) - cols.index_select(1, xlo[0])
    area = (ysz[0][:, None] * xsz[0][None, :]).to(torch.float32).unsqueeze(-1)
    mean = total.to(torch.float32) / area
    return ((mean - _PIXEL_MEAN) * _PIXEL_SCALE).permute(2, 0, 1).contiguous()


def _bins(start: torch.Tensor, length: torch.Tensor, out: int, limit: int) -> tuple[torch.Tensor, ...]:
    """Area bins of ``adaptive_avg_pool`` along one axis for n windows.

    start, length: (n,) int64. Bin k covers [floor(k*L/out), ceil((k+1)*L/out)) of the window.
    Returns lower/upper indices into the summed-area table clamped to the image (outside counts as
    zero: zero padding) and the unclamped bin sizes (the divisors).
    """
    k = torch.arange(out, device=start.device, dtype=torch.int64)
    lo = (k[None, :] * length[:, None]) // out
    hi = -((-(k[None, :] + 1) * length[:, None]) // out)
    size = hi - lo
    lo = (lo + start[:, None]).clamp(0, limit)
    hi = (hi + start[:, None]).clamp(0, limit)
    return lo, hi, size


def _area_resample(
    table: torch.Tensor,
    *,
    y0: torch.Tensor,
    x0: torch.Tensor,
    h: torch.Tensor,
    w: torch.Tensor,
    out_h: int,
    out_w: int,
) -> torch.Tensor:
    """Area-average n windows (y0, x0, h, w; int64 (n,)) of one image to (n,3,out_h,out_w) float32,
    normalised for the nets. Same bins as ``F.interpolate(mode="area")`` on each window, with zeros
    outside the image."""
    H = table.shape[0] - 1
    W = table.shape[1] - 1
    ylo, yhi, ysz = _bins(y0, h, out_h, H)
    xlo, xhi, xsz = _bins(x0, w, out_w, W)
    ylo, yhi = ylo[:, :, None], yhi[:, :, None]
    xlo, xhi = xlo[:, None, :], xhi[:, None, :]
    total = table[yhi, xhi] - table[ylo, xhi] - table[yhi, xlo] + table[ylo, xlo]
    area = (ysz[:, :, None] * xsz[:, None, :]).unsqueeze(-1)
    mean = total.to(torch.float32) / area.to(torch.float32)
    return ((mean - _PIXEL_MEAN) * _PIXEL_SCALE).permute(0, 3, 1, 2).contiguous()


# ---------------------------------------------------------------------------------------------
# Box helpers (continuous pixel-edge coordinates, (n, 4) float32).


def _regress(boxes: torch.Tensor, reg: torch.Tensor) -> torch.Tensor:
    """Apply MTCNN's box regression: offsets in units of the box side."""
    wh = (boxes[:, 2:4] - boxes[:, 0:2]).repeat(1, 2)
    return boxes + reg * wh


def _square_snap(boxes: torch.Tensor) -> torch.Tensor:
    """Square boxes of side max(w, h) on the same centre, snapped to whole pixels → (n,3) int64
    (x0, y0, side): the next stage crops exactly this window, and its regression is relative to it."""
    side = (boxes[:, 2:4] - boxes[:, 0:2]).amax(dim=1)
    centre = (boxes[:, 0:2] + boxes[:, 2:4]) * 0.5
    side_px = side.round().clamp_min(1.0)
    x0y0 = torch.round(centre - side_px[:, None] * 0.5)
    return torch.cat([x0y0, side_px[:, None]], dim=1).to(torch.int64)


def _snapped_to_boxes(win: torch.Tensor) -> torch.Tensor:
    x0y0 = win[:, 0:2].to(torch.float32)
    side = win[:, 2:3].to(torch.float32)
    return torch.cat([x0y0, x0y0 + side], dim=1)


def _rank_scores(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores → (position of each box in a stable best-first sort, strictly decreasing stand-in scores).

    NMS depends only on the order of the scores. Clear faces tie at 1.0 in float32, and how an
    unstable sort orders ties would then depend on the other boxes in the call (other images of the
    batch); ranking with a stable sort first breaks every tie by input position, so one image's boxes
    keep the same order whatever else is in the batch.
    """
    order = torch.sort(scores, descending=True, stable=True).indices
    position = torch.empty_like(order)
    position[order] = torch.arange(order.numel(), device=order.device)
    # Exact in float64 for any realistic count (< 2**53 boxes).
    return position, (order.numel() - position).to(torch.float64)


def _nms_per_image(boxes: torch.Tensor, scores: torch.Tensor, owners: torch.Tensor, iou: float) -> torch.Tensor:
    """IoU NMS within each image, all images in one ``batched_nms`` call; returns kept indices
    grouped by image (ascending), best first within an image.

    Same result as one ``nms`` per image in float64: ties are broken by input position
    (:func:`_rank_scores`), and the boxes go in as float64 because ``batched_nms`` separates images by
    shifting each by its index times the largest coordinate; in float64 that shift is exact for
    float32 coordinates (in float32 it would round them by up to 1/100 px on a big batch, and make a
    face depend on its batch-mates). Against float32 NMS the kept boxes differ only where an IoU sits
    on the threshold itself, which P-Net's stride-2 grid makes common (two 12 px cells two apart
    overlap by exactly 0.5): float64 decides those ties exactly, float32 by its rounding.
    """
    if boxes.shape[0] == 0:
        return torch.zeros((0,), dtype=torch.int64, device=boxes.device)
    position, ranked = _rank_scores(scores)
    wide = boxes.to(torch.float64)
    # batched_nms expects coordinates >= 0 (its shift assumes it); boxes here are not clipped.
    wide = wide - wide.min()
    keep = batched_nms(wide, ranked, owners, iou)
    # Group by image, then best first: the order a per-image loop would produce.
    key = owners[keep].to(torch.int64) * boxes.shape[0] + position[keep]
    return keep[torch.argsort(key)]


def _nms_min(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, overlap: float) -> torch.Tensor:
    """Greedy NMS with intersection over the smaller area (torchvision only offers IoU); returns
    kept indices best first.

    Used after O-Net: a box mostly inside a better-scored one (part of a face detected as a face) is
    dropped even when its IoU is small. Greedy NMS is sequential (a box survives when no *kept*
    better box overlaps it), so it is solved as the fixed point of ``keep = not any(keep_j and
    suppresses(j, i))`` over the whole overlap matrix at once: each pass settles at least the next box
    in score order, and in practice two or three passes settle all (suppression chains are short).
    """
    n = boxes.shape[0]
    if n == 0:
        return torch.zeros((0,), dtype=torch.int64, device=boxes.device)
    order = torch.sort(scores, descending=True, stable=True).indices
    b = boxes[order].to(torch.float64)
    g = groups[order]
    area = (b[:, 2] - b[:, 0]).clamp_min(0) * (b[:, 3] - b[:, 1]).clamp_min(0)
    lt = torch.maximum(b[:, None, :2], b[None, :, :2])
    rb = torch.minimum(b[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp_min(0).prod(dim=2)
    smaller = torch.minimum(area[:, None], area[None, :]).clamp_min(1e-9)
    # suppress[j, i]: j comes before i in score order, is in i's image and overlaps it enough.
    rank = torch.arange(n, device=boxes.device)
    earlier = rank[:, None] < rank[None, :]
    suppress = (inter / smaller > overlap) & (g[:, None] == g[None, :]) & earlier
    suppress_f = suppress.to(torch.float32)
    keep = torch.ones(n, dtype=torch.bool, device=boxes.device)
    for _ in range(n):
        # A float matmul counts the kept suppressors of each box (bool matmul is not supported).
        new_keep = (keep.to(torch.float32) @ suppress_f) == 0
        if torch.equal(new_keep, keep):
            break
        keep = new_keep
    return order[keep]


# ---------------------------------------------------------------------------------------------


class MTCNN:
    """The cascade over batches of RGB uint8 images of any (and mixed) sizes."""

    name: str = MODEL_NAME
    version: str = MODEL_VERSION

    def __init__(
        self,
        pnet: PNet,
        rnet: RNet,
        onet: ONet,
        device: str | torch.device = "cpu",
        settings: DetectorSettings | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        channels_last: bool = False,
    ) -> None:
        """``dtype=torch.bfloat16`` (or float16) runs P-Net and R-Net under autocast (convolutions
        and dense layers in low precision, weights kept in float32), which is where nearly all the
        arithmetic is (P-Net over every pyramid level). O-Net stays float32: it does not tolerate
        bf16. Its box regression and landmarks come straight out of its last dense layers, and in
        bf16 even a lone frontal portrait's final box moved to IoU 0.91 against float32 (landmarks
        by ~2% of the box), against >= 0.93 (portraits ~0.97-1.0) with P-/R-Net in bf16 alone.
        Everything around the nets (pyramids, crops, box arithmetic, NMS) stays float32/float64.
        ``channels_last`` lays the nets' inputs out NHWC."""
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"MTCNN dtype must be float32, bfloat16 or float16, got {dtype}")
        self.device = torch.device(device)
        self.settings = settings or DetectorSettings()
        self.dtype = dtype
        self.channels_last = channels_last
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.pnet = pnet.to(self.device, memory_format=memory_format).eval()
        self.rnet = rnet.to(self.device, memory_format=memory_format).eval()
        self.onet = onet.to(self.device, memory_format=memory_format).eval()

    @classmethod
    def from_files(
        cls,
        pnet_path: str | Path,
        rnet_path: str | Path,
        onet_path: str | Path,
        *,
        device: str | torch.device = "cpu",
        min_face_size: int = 20,
        thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7),
        factor: float = 0.709,
        dtype: torch.dtype = torch.float32,
        channels_last: bool = False,
    ) -> MTCNN:
        """Load the three facenet-pytorch state dicts (strict) from local files."""
        settings = DetectorSettings(min_face_size=min_face_size, thresholds=tuple(thresholds), factor=factor)
        return cls(
            _load_state(PNet(), pnet_path),
            _load_state(RNet(), rnet_path),
            _load_state(ONet(), onet_path),
            device=device,
            settings=settings,
            dtype=dtype,
            channels_last=channels_last,
        )

    # -- public ------------------------------------------------------------------------------

    def detect(self, images: Sequence[np.ndarray]) -> list[FaceDetections]:
        """Detect faces in each image (RGB uint8 HxWx3); one result per image, in order."""
        tensors = [self._to_tensor(i, image) for i, image in enumerate(images)]
        if not tensors:
            return []
        with torch.inference_mode():
            windows, owners = self._stage_pnet(tensors)
            windows, owners = self._stage_rnet(tensors, windows, owners)
            boxes, scores, points, owners = self._stage_onet(tensors, windows, owners)
        return self._split(len(tensors), boxes, scores, points, owners)

    # -- stages ------------------------------------------------------------------------------

    def _forward(self, net: nn.Module, x: torch.Tensor, *extra: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """One net call in the configured precision and layout; outputs always float32."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.dtype == torch.float32 or net is self.onet:
            return tuple(net(x, *extra))
        with torch.autocast(device_type=self.device.type, dtype=self.dtype):
            out = net(x, *extra)
        return tuple(o.float() for o in out)

    def _to_tensor(self, index: int, image: np.ndarray) -> torch.Tensor:
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
            raise TypeError(f"image {index}: expected a uint8 numpy array, got {type(image).__name__}")
        if image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
            raise ValueError(f"image {index}: expected HxWx3 RGB, got shape {image.shape}")
        # torch refuses read-only arrays (decoded frames often are): copy only then.
        array = image if image.flags.writeable else image.copy()
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

    def _scales(self, height: int, width: int) -> list[float]:
        # Same pyramid as facenet-pytorch: the smallest face maps to P-Net's 12 px cell, then shrink
        # by `factor` while the short side still holds one cell.
        first = _PNET_CELL / self.settings.min_face_size
        short = min(height, width) * first
        scales: list[float] = []
        scale = first
        while short >= _PNET_CELL:
            scales.append(scale)
            scale *= self.settings.factor
            short *= self.settings.factor
        return scales

    def _stage_pnet(self, images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.settings
        sizes = [(int(im.shape[0]), int(im.shape[1])) for im in images]
        scales = [self._scales(h, w) for h, w in sizes]
        kept_boxes: list[torch.Tensor] = []
        kept_owner: list[torch.Tensor] = []
        # Images of similar size go together (less padding); a group's pyramids are held in memory
        # at once (~9 bytes per source pixel), so a group is bounded by the pixel budget too.
        by_size = sorted(range(len(images)), key=lambda i: sizes[i][0] * sizes[i][1], reverse=True)
        for group in self._groups(by_size, [sizes[i] for i in by_size], s.max_pnet_pixels):
            # Pyramid levels per image, all resampled from one table of column sums.
            levels: dict[int, list[torch.Tensor]] = {}
            for i in group:
                (h, w), row_sums = sizes[i], _row_integral(images[i])
                # Level size rounded up as in facenet-pytorch: int(h * scale + 1).
                levels[i] = [_area_resize(row_sums, int(h * sc + 1), int(w * sc + 1)) for sc in scales[i]]
                del row_sums
            for level in range(max((len(scales[i]) for i in group), default=0)):
                members = [i for i in group if len(scales[i]) > level]
                shapes = [(levels[i][level].shape[1], levels[i][level].shape[2]) for i in members]
                for chunk in self._groups(members, shapes, s.max_pnet_pixels):
                    boxes, owner = self._pnet_chunk(chunk, [levels[i][level] for i in chunk], sizes)
                    if boxes.shape[0]:
                        keep = _nms_per_image(boxes[:, :4], boxes[:, 4], owner, s.nms_pnet_level)
                        kept_boxes.append(boxes[keep])
                        kept_owner.append(owner[keep])
        if not kept_boxes:
            return self._no_windows()
        boxes = torch.cat(kept_boxes)
        owner = torch.cat(kept_owner)
        keep = _nms_per_image(boxes[:, :4], boxes[:, 4], owner, s.nms_pnet_image)
        boxes, owner = boxes[keep], owner[keep]
        return _square_snap(_regress(boxes[:, :4], boxes[:, 5:9])), owner

    @staticmethod
    def _groups(members: list[int], shapes: list[tuple[int, int]], budget: int) -> list[list[int]]:
        """Split members (sorted by size, largest first) so that each group's zero-padded canvas
        (count x tallest x widest) stays within the pixel budget; an oversized member still gets a
        group of its own."""
        groups: list[list[int]] = []
        current: list[int] = []
        tall = wide = 0
        for index, (h, w) in zip(members, shapes, strict=True):
            if current and (len(current) + 1) * max(tall, h) * max(wide, w) > budget:
                groups.append(current)
                current, tall, wide = [], 0, 0
            current.append(index)
            tall, wide = max(tall, h), max(wide, w)
        if current:
            groups.append(current)
        return groups

    def _pnet_chunk(
        self, members: list[int], tensors: list[torch.Tensor], sizes: list[tuple[int, int]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run P-Net on one padded canvas; return (n, 9) rows x0,y0,x1,y1,score,reg*4 and owners."""
        canvas_h = max(t.shape[1] for t in tensors)
        canvas_w = max(t.shape[2] for t in tensors)
        batch = torch.zeros((len(tensors), 3, canvas_h, canvas_w), device=self.device)
        for k, t in enumerate(tensors):
            batch[k, :, : t.shape[1], : t.shape[2]] = t
        valid = torch.tensor([[t.shape[1], t.shape[2]] for t in tensors], device=self.device)
        reg, prob = self._forward(self.pnet, batch, valid if len(tensors) > 1 else None)
        face = prob[:, 1]
        # Output cells whose 12x12 window lies inside the real image (see PNet.forward).
        out_h = (valid[:, 0] - 2 + 1) // 2 - 4
        out_w = (valid[:, 1] - 2 + 1) // 2 - 4
        rows = torch.arange(face.shape[1], device=self.device)
        cols = torch.arange(face.shape[2], device=self.device)
        inside = (rows[None, :, None] < out_h[:, None, None]) & (cols[None, None, :] < out_w[:, None, None])
        hit = (face >= self.settings.thresholds[0]) & inside
        b, r, c = hit.nonzero(as_tuple=True)
        if b.numel() == 0:
            return torch.zeros((0, 9), device=self.device), torch.zeros((0,), dtype=torch.int64, device=self.device)
        member = torch.tensor(members, device=self.device)[b]
        orig = torch.tensor(sizes, device=self.device, dtype=torch.float32)[member]
        # Real per-axis scale of this level (the level size was rounded up from h*scale).
        scale_y = valid[b, 0].to(torch.float32) / orig[:, 0]
        scale_x = valid[b, 1].to(torch.float32) / orig[:, 1]
        x0 = (_PNET_STRIDE * c).to(torch.float32) / scale_x
        y0 = (_PNET_STRIDE * r).to(torch.float32) / scale_y
        x1 = (_PNET_STRIDE * c + _PNET_CELL).to(torch.float32) / scale_x
        y1 = (_PNET_STRIDE * r + _PNET_CELL).to(torch.float32) / scale_y
        rows_out = torch.stack([x0, y0, x1, y1, face[b, r, c]], dim=1)
        rows_out = torch.cat([rows_out, reg[b, :, r, c]], dim=1)
        return rows_out, member

    def _crops(
        self, images: list[torch.Tensor], windows: torch.Tensor, owners: torch.Tensor, size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Crops of all windows, grouped by image; returns crops and the window order used."""
        crops: list[torch.Tensor] = []
        order: list[torch.Tensor] = []
        for i in torch.unique(owners).tolist():
            idx = (owners == i).nonzero(as_tuple=True)[0]
            win = windows[idx]
            table = _integral(images[i])
            crops.append(
                _area_resample(table, y0=win[:, 1], x0=win[:, 0], h=win[:, 2], w=win[:, 2], out_h=size, out_w=size)
            )
            order.append(idx)
            del table
        return torch.cat(crops), torch.cat(order)

    def _run_chunked(self, net: nn.Module, crops: torch.Tensor) -> tuple[torch.Tensor, ...]:
        step = self.settings.max_crops
        outs = [self._forward(net, crops[i : i + step]) for i in range(0, crops.shape[0], step)]
        return tuple(torch.cat(parts) for parts in zip(*outs, strict=True))

    def _stage_rnet(
        self, images: list[torch.Tensor], windows: torch.Tensor, owners: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if windows.shape[0] == 0:
            return windows, owners
        crops, order = self._crops(images, windows, owners, 24)
        windows, owners = windows[order], owners[order]
        reg, prob = self._run_chunked(self.rnet, crops)
        score = prob[:, 1]
        ok = score > self.settings.thresholds[1]
        boxes, score, reg, owners = _snapped_to_boxes(windows[ok]), score[ok], reg[ok], owners[ok]
        keep = _nms_per_image(boxes, score, owners, self.settings.nms_rnet)
        boxes = _regress(boxes[keep], reg[keep])
        return _square_snap(boxes), owners[keep]

    def _stage_onet(
        self, images: list[torch.Tensor], windows: torch.Tensor, owners: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        if windows.shape[0] == 0:
            return (
                torch.zeros((0, 4)),
                torch.zeros((0,)),
                torch.zeros((0, 5, 2)),
                torch.zeros((0,), dtype=torch.int64),
            )
        crops, order = self._crops(images, windows, owners, 48)
        windows, owners = windows[order], owners[order]
        reg, marks, prob = self._run_chunked(self.onet, crops)
        score = prob[:, 1]
        ok = score > self.settings.thresholds[2]
        boxes, score, reg, marks, owners = (
            _snapped_to_boxes(windows[ok]),
            score[ok],
            reg[ok],
            marks[ok],
            owners[ok],
        )
        side = (boxes[:, 2] - boxes[:, 0])[:, None]
        points = torch.stack([boxes[:, 0:1] + marks[:, 0:5] * side, boxes[:, 1:2] + marks[:, 5:10] * side], dim=2)
        boxes = _regress(boxes, reg)
        keep = _nms_min(boxes, score, owners, self.settings.nms_onet_min)
        return boxes[keep].cpu(), score[keep].cpu(), points[keep].cpu(), owners[keep].cpu()

    def _no_windows(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (
            torch.zeros((0, 3), dtype=torch.int64, device=self.device),
            torch.zeros((0,), dtype=torch.int64, device=self.device),
        )

    @staticmethod
    def _split(
        n_images: int, boxes: torch.Tensor, scores: torch.Tensor, points: torch.Tensor, owners: torch.Tensor
    ) -> list[FaceDetections]:
        out: list[FaceDetections] = []
        boxes_np = boxes.numpy().astype(np.float32)
        scores_np = scores.numpy().astype(np.float32)
        points_np = points.numpy().astype(np.float32)
        owners_np = owners.numpy()
        for i in range(n_images):
            idx = np.flatnonzero(owners_np == i)
            # Best score first; scores tie at 1.0 in float32, so break ties by position to make the
            # order independent of how the batch was put together.
            idx = idx[np.lexsort((boxes_np[idx, 1], boxes_np[idx, 0], -scores_np[idx]))]
            if idx.size == 0:
                out.append(FaceDetections.empty())
                continue
            out.append(
                FaceDetections(
                    boxes=np.ascontiguousarray(boxes_np[idx]),
                    scores=np.ascontiguousarray(scores_np[idx]),
                    points=np.ascontiguousarray(points_np[idx]),
                )
            )
        return out


def weights_from_dir(folder: str | Path) -> tuple[Path, Path, Path]:
    """The three weight files as laid out in facenet-pytorch's data folder (and in the model store)."""
    base = Path(folder)
    paths = (base / "pnet.pt", base / "rnet.pt", base / "onet.pt")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"MTCNN weights missing: {', '.join(missing)}")
    return paths
