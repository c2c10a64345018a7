"""SSD-MobileNet-v2 COCO in pure torch, with the weights of the TensorFlow frozen graph that cv2.dnn runs.

The frozen graph (``frozen_inference_graph.pb``, TF Object Detection API, 2018_03_29) is a protobuf
``GraphDef``; its weights are ``Const`` nodes. :func:`read_graph_consts` reads them straight from the
protobuf wire format, so neither tensorflow nor a generated protobuf module is needed:

* ``GraphDef``: ``node = 1`` (repeated ``NodeDef``); ``NodeDef``: ``name = 1``, ``op = 2``,
  ``input = 3``, ``attr = 5`` (``map<string, AttrValue>``: entries with ``key = 1``, ``value = 2``);
* ``AttrValue``: ``tensor = 8``; ``TensorProto``: ``dtype = 1``, ``tensor_shape = 2``
  (``dim = 2`` with ``size = 1``), ``tensor_content = 4`` (raw little-endian), or the typed
  repeated fields ``float_val = 5``, ``int_val = 7``, ``int64_val = 10`` (packed or not; fewer
  values than the shape holds means the last one repeats, as TF fills them).

The network (:class:`SsdMobileNetV2`) is the Object Detection API's ``ssd_mobilenet_v2`` feature
extractor (MobileNetV2, depth multiplier 1, features from ``expanded_conv_13/expand`` (19x19) and
``Conv_1`` (10x10) plus four extra depthwise-separable stride-2 layers) with one 3x3 box and one 3x3
class convolution per feature map. Convolutions fold their ``FusedBatchNorm`` (epsilon from the
graph's config). TF's ``SAME`` padding puts the odd pixel of a stride-2 convolution on the right and
bottom; :class:`_SameConv` pads explicitly so the sampling grid is TF's, not torch's symmetric one.

Anchors come from the training pipeline's ``ssd_anchor_generator`` parameters
(:class:`AnchorConfig`: min_scale 0.2, max_scale 0.95, aspect ratios 1, 2, 0.5, 3, 0.3333,
reduce_boxes_in_lowest_layer); :func:`check_config_priors` verifies them against the ``PriorBox``
sizes of the ``.pbtxt`` that cv2.dnn reads, and the detection-output settings (score floor, NMS
IoU, per-class ``top_k``, ``keep_top_k``) are read from that ``.pbtxt`` too, so the torch model
ends where cv2.dnn's ``DetectionOutput`` ends. Then the shared :func:`postprocess` runs, as for
every detector.

:class:`TorchSsdMobileNetCoco` is a drop-in for :class:`SsdMobileNetCoco` that runs batched on any
device, optionally with bfloat16 autocast and channels-last.
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import batched_nms

from photolens.models.detector import (
    COCO_LABELS_91,
    CheckpointError,
    Detections,
    PostprocessConfig,
    _check_images,
    find_ssd_mobilenet_files,
    postprocess,
)

__all__ = [
    "AnchorConfig",
    "GraphReadError",
    "OutputConfig",
    "SsdMobileNetV2",
    "TorchSsdConfig",
    "TorchSsdMobileNetCoco",
    "check_config_priors",
    "decode_boxes",
    "expected_tensors",
    "generate_anchors",
    "read_config_nodes",
    "read_graph_consts",
]


class GraphReadError(CheckpointError):
    """The frozen graph cannot be parsed, or lacks a tensor the network needs."""


# ------------------------------------------------------------------------------ protobuf wire format

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5

# tensorflow/core/framework/types.proto
_DTYPES: Final[dict[int, np.dtype]] = {
    1: np.dtype("<f4"),  # DT_FLOAT
    2: np.dtype("<f8"),  # DT_DOUBLE
    3: np.dtype("<i4"),  # DT_INT32
    4: np.dtype("u1"),  # DT_UINT8
    9: np.dtype("<i8"),  # DT_INT64
    10: np.dtype("?"),  # DT_BOOL
    19: np.dtype("<f2"),  # DT_HALF
}


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end:
            raise GraphReadError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise GraphReadError("malformed varint")


def _fields(buf: memoryview, pos: int, end: int) -> Iterator[tuple[int, int, Any]]:
    """``(field number, wire type, value)`` of one message: an int for varints, ``(start, stop)`` for
    length-delimited fields, the raw bytes for fixed-width ones."""
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            value, pos = _varint(buf, pos, end)
        elif wire == _LEN:
            size, pos = _varint(buf, pos, end)
            if pos + size > end:
                raise GraphReadError(f"truncated field {number}: {size} bytes announced, {end - pos} left")
            value = (pos, pos + size)
            pos += size
        elif wire in (_I64, _I32):
            width = 8 if wire == _I64 else 4
            if pos + width > end:
                raise GraphReadError(f"truncated fixed-width field {number}")
            value = bytes(buf[pos : pos + width])
            pos += width
        else:
            raise GraphReadError(f"unsupported wire type {wire} (field {number})")
        yield number, wire, value


def _tensor(buf: memoryview, start: int, end: int) -> np.ndarray | None:
    """A ``TensorProto`` as an array, or None for dtypes we never need (strings, resources)."""
    dtype_id = 0
    shape: list[int] = []
    content: tuple[int, int] | None = None
    scalars: list[Any] = []
    packed: list[tuple[int, int, int]] = []  # (field, start, stop) of packed repeated values
    for number, wire, value in _fields(buf, start, end):
        if number == 1 and wire == _VARINT:
            dtype_id = value
        elif number == 2 and wire == _LEN:
            for dnum, dwire, dval in _fields(buf, *value):
                if dnum == 2 and dwire == _LEN:
                    size = 0
                    for snum, swire, sval in _fields(buf, *dval):
                        if snum == 1 and swire == _VARINT:
                            size = sval
                    shape.append(size)
        elif number == 4 and wire == _LEN:
            content = value
        elif number in (5, 6, 7, 10):
            if wire == _LEN:
                packed.append((number, *value))
            elif wire == _I32:
                scalars.append(struct.unpack("<f", value)[0])
            elif wire == _I64:
                scalars.append(struct.unpack("<d", value)[0])
            else:
                scalars.append(value)
    dtype = _DTYPES.get(dtype_id)
    if dtype is None:
        return None
    numel = math.prod(shape)
    if content is not None:
        raw = np.frombuffer(buf[content[0] : content[1]], dtype=dtype)
        if raw.size != numel:
            raise GraphReadError(f"tensor content holds {raw.size} values for shape {shape}")
        return raw.reshape(shape).copy()
    for number, pstart, pstop in packed:
        if number == 5:
            scalars.extend(np.frombuffer(buf[pstart:pstop], dtype="<f4").tolist())
        elif number == 6:
            scalars.extend(np.frombuffer(buf[pstart:pstop], dtype="<f8").tolist())
        else:
            pos = pstart
            while pos < pstop:
                v, pos = _varint(buf, pos, pstop)
                scalars.append(v)
    if dtype.kind in "iu":
        # int_val/int64_val are varints of the two's complement: undo it for negatives.
        scalars = [v - (1 << 64) if v >= 1 << 63 else v for v in scalars]
    values = np.asarray(scalars, dtype=dtype)
    if values.size == numel:
        return values.reshape(shape)
    if values.size == 0 or values.size > numel:
        raise GraphReadError(f"tensor holds {values.size} values for shape {shape}")
    return np.concatenate([values, np.full(numel - values.size, values[-1], dtype)]).reshape(shape)


def read_graph_consts(path: str | Path, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """The ``Const`` tensors of a frozen TF ``GraphDef`` by node name (only ``names`` when given;
    every one of them must be there, else :class:`GraphReadError` lists those that are not)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"TensorFlow graph not found: {path}")
    wanted = None if names is None else set(names)
    data = memoryview(path.read_bytes())
    out: dict[str, np.ndarray] = {}
    try:
        for number, wire, value in _fields(data, 0, len(data)):
            if number != 1 or wire != _LEN:
                continue  # versions, library: not weights
            name = op = ""
            tensor_span: tuple[int, int] | None = None
            for nnum, nwire, nval in _fields(data, *value):
                if nwire != _LEN:
                    continue
                if nnum == 1:
                    name = bytes(data[nval[0] : nval[1]]).decode()
                elif nnum == 2:
                    op = bytes(data[nval[0] : nval[1]]).decode()
                elif nnum == 5:
                    key, attr = "", None
                    for anum, awire, aval in _fields(data, *nval):
                        if anum == 1 and awire == _LEN:
                            key = bytes(data[aval[0] : aval[1]]).decode()
                        elif anum == 2 and awire == _LEN:
                            attr = aval
                    if key == "value" and attr is not None:
                        for vnum, vwire, vval in _fields(data, *attr):
                            if vnum == 8 and vwire == _LEN:
                                tensor_span = vval
            if op != "Const" or tensor_span is None or (wanted is not None and name not in wanted):
                continue
            tensor = _tensor(data, *tensor_span)
            if tensor is not None:
                out[name] = tensor
    except (GraphReadError, UnicodeDecodeError) as err:
        raise GraphReadError(f"{path} is not a readable TensorFlow GraphDef: {err}") from err
    if wanted is not None:
        missing = sorted(wanted - set(out))
        if missing:
            shown = ", ".join(missing[:5]) + (f" ... ({len(missing)} in all)" if len(missing) > 5 else "")
            raise GraphReadError(f"{path} lacks tensors the SSD needs: {shown}")
    return out


# ------------------------------------------------------------------------------ the .pbtxt (text format)

# One token of the text format: a comment, ``field {`` (or ``field: {``), ``field: value`` or ``}``.
_TOKEN = re.compile(
    r'\s*(?:(#[^\n]*)|([A-Za-z_]\w*)\s*(:)?\s*(\{)|([A-Za-z_]\w*)\s*:\s*("(?:[^"\\]|\\.)*"|[^\s}]+)|(\}))'
)


def _parse_text(text: str) -> list[tuple[str, Any]]:
    """Protobuf text format as nested ``[(field, value)]`` lists (values stay strings)."""
    stack: list[list[tuple[str, Any]]] = [[]]
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            if text[pos:].strip() == "":
                break
            raise CheckpointError(f"cannot parse the graph config near: {text[pos : pos + 60]!r}")
        pos = m.end()
        if m.group(1):
            continue
        if m.group(4):
            child: list[tuple[str, Any]] = []
            stack[-1].append((m.group(2), child))
            stack.append(child)
        elif m.group(5):
            raw = m.group(6)
            stack[-1].append((m.group(5), raw[1:-1] if raw.startswith('"') else raw))
        elif m.group(7):
            if len(stack) == 1:
                raise CheckpointError("unbalanced '}' in the graph config")
            stack.pop()
    if len(stack) != 1:
        raise CheckpointError("the graph config ends inside a message")
    return stack[0]


@dataclass(frozen=True)
class ConfigNode:
    name: str
    op: str
    inputs: tuple[str, ...]
    attrs: dict[str, list[tuple[str, Any]]]  # attr key -> the AttrValue's fields

    def scalar(self, key: str, kind: str) -> str:
        for field_name, value in self.attrs.get(key, []):
            if field_name == kind:
                return value
        raise CheckpointError(f"graph config node {self.name!r} has no {kind!r} attribute {key!r}")

    def floats(self, key: str) -> list[float]:
        for field_name, value in self.attrs.get(key, []):
            if field_name == "tensor":
                return [float(v) for f, v in value if f == "float_val"]
        raise CheckpointError(f"graph config node {self.name!r} has no tensor attribute {key!r}")


def read_config_nodes(path: str | Path) -> dict[str, ConfigNode]:
    """The nodes of cv2.dnn's text graph config (``.pbtxt``) by name."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"graph config not found: {path}")
    nodes = {}
    for key, body in _parse_text(path.read_text()):
        if key != "node" or not isinstance(body, list):
            continue
        name = next((v for k, v in body if k == "name"), "")
        op = next((v for k, v in body if k == "op"), "")
        inputs = tuple(v for k, v in body if k == "input")
        attrs: dict[str, list[tuple[str, Any]]] = {}
        for k, v in body:
            if k == "attr" and isinstance(v, list):
                akey = next((x for f, x in v if f == "key"), "")
                aval = next((x for f, x in v if f == "value"), [])
                attrs[akey] = aval
        nodes[name] = ConfigNode(name, op, inputs, attrs)
    return nodes


# ------------------------------------------------------------------------------ anchors and decoding


@dataclass(frozen=True)
class AnchorConfig:
    """The training pipeline's ``ssd_anchor_generator`` (ssd_mobilenet_v2_coco.config)."""

    num_layers: int = 6
    min_scale: float = 0.2
    max_scale: float = 0.95
    aspect_ratios: tuple[float, ...] = (1.0, 2.0, 0.5, 3.0, 0.3333)
    interpolated_scale_aspect_ratio: float = 1.0
    reduce_boxes_in_lowest_layer: bool = True


def anchor_sizes(config: AnchorConfig) -> list[list[tuple[float, float]]]:
    """Per feature map, the ``(height, width)`` of each anchor as a fraction of the image, in the
    order the box predictor emits them (object_detection/anchor_generators/multiple_grid_anchor_generator.py)."""
    n = config.num_layers
    scales = [config.min_scale + (config.max_scale - config.min_scale) * i / (n - 1) for i in range(n)] + [1.0]
    layers = []
    for i in range(n):
        if i == 0 and config.reduce_boxes_in_lowest_layer:
            specs = [(0.1, 1.0), (scales[0], 2.0), (scales[0], 0.5)]
        else:
            specs = [(scales[i], ar) for ar in config.aspect_ratios]
            if config.interpolated_scale_aspect_ratio > 0:
                specs.append((math.sqrt(scales[i] * scales[i + 1]), config.interpolated_scale_aspect_ratio))
        layers.append([(s / math.sqrt(ar), s * math.sqrt(ar)) for s, ar in specs])
    return layers


def generate_anchors(
    config: AnchorConfig, feature_sizes: Sequence[tuple[int, int]], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """``(num_anchors, 4)`` anchors as ``(cy, cx, h, w)`` in [0, 1], centred on each cell (offset 0.5),
    ordered by feature map, row, column, anchor: the order of the flattened predictor outputs."""
    sizes = anchor_sizes(config)
    if len(feature_sizes) != len(sizes):
        raise ValueError(f"{len(feature_sizes)} feature maps for {len(sizes)} anchor layers")
    out = []
    for (fh, fw), layer in zip(feature_sizes, sizes, strict=True):
        hw = torch.tensor(layer, dtype=torch.float64)  # (k, 2)
        cy = (torch.arange(fh, dtype=torch.float64) + 0.5) / fh
        cx = (torch.arange(fw, dtype=torch.float64) + 0.5) / fw
        gy, gx = torch.meshgrid(cy, cx, indexing="ij")
        centres = torch.stack([gy, gx], -1).reshape(-1, 1, 2).expand(-1, len(layer), 2)
        out.append(torch.cat([centres, hw.expand(fh * fw, -1, -1)], -1).reshape(-1, 4))
    return torch.cat(out).to(device=device, dtype=torch.float32)


def decode_boxes(
    codes: torch.Tensor, anchors: torch.Tensor, scale: Sequence[float] = (10.0, 10.0, 5.0, 5.0)
) -> torch.Tensor:
    """TF's ``FasterRcnnBoxCoder`` decode: codes ``(..., 4)`` as ``(ty, tx, th, tw)`` against anchors
    ``(cy, cx, h, w)``; returns ``(x0, y0, x1, y1)`` in [0, 1] units (not clipped)."""
    codes = codes.float()
    ty, tx, th, tw = codes.unbind(-1)
    acy, acx, ah, aw = anchors.unbind(-1)
    cy = ty / scale[0] * ah + acy
    cx = tx / scale[1] * aw + acx
    h = torch.exp(th / scale[2]) * ah
    w = torch.exp(tw / scale[3]) * aw
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


@dataclass(frozen=True)
class OutputConfig:
    """cv2.dnn's ``DetectionOutput`` settings (from the ``.pbtxt``): what the graph hands to post-processing."""

    confidence_threshold: float = 0.01
    nms_threshold: float = 0.6
    top_k: int = 100  # candidates per class before NMS
    keep_top_k: int = 100  # boxes per image after NMS
    variance: tuple[float, float, float, float] = (0.1, 0.1, 0.2, 0.2)
    num_classes: int = 91


def check_config_priors(nodes: Mapping[str, ConfigNode], anchors: AnchorConfig, input_size: int) -> OutputConfig:
    """Check the ``.pbtxt``'s ``PriorBox`` sizes against ``anchors`` and read its ``DetectionOutput``
    settings; a config made for another anchor layout or head fails here, naming what differs."""
    sizes = anchor_sizes(anchors)
    variance: list[float] = []
    for i, layer in enumerate(sizes):
        node = nodes.get(f"PriorBox_{i}")
        if node is None or node.op != "PriorBox":
            raise CheckpointError(f"graph config lacks the PriorBox_{i} node of an SSD with {len(sizes)} feature maps")
        heights, widths = node.floats("height"), node.floats("width")
        want_h = [h * input_size for h, _ in layer]
        want_w = [w * input_size for _, w in layer]
        # rtol 1e-3: cv2's config generator wrote the 0.3333 aspect ratio as 0.333 (sizes 0.05 % apart).
        if len(heights) != len(want_h) or not np.allclose(heights, want_h, rtol=1e-3) or not np.allclose(
            widths, want_w, rtol=1e-3
        ):
            raise CheckpointError(
                f"graph config PriorBox_{i} sizes (h {heights}, w {widths}) differ from the anchor generator's "
                f"(h {want_h}, w {want_w}): the graph was trained with other anchor settings"
            )
        variance = node.floats("variance")
    out = nodes.get("detection_out")
    if out is None or out.op != "DetectionOutput":
        raise CheckpointError("graph config lacks its detection_out (DetectionOutput) node")
    if out.scalar("code_type", "s") != "CENTER_SIZE" or out.scalar("share_location", "b") != "true":
        raise CheckpointError("graph config's DetectionOutput is not a shared-location CENTER_SIZE decoder")
    if int(out.scalar("background_label_id", "i")) != 0:
        raise CheckpointError("graph config's DetectionOutput does not use class 0 as background")
    config = OutputConfig(
        confidence_threshold=float(out.scalar("confidence_threshold", "f")),
        nms_threshold=float(out.scalar("nms_threshold", "f")),
        top_k=int(out.scalar("top_k", "i")),
        keep_top_k=int(out.scalar("keep_top_k", "i")),
        variance=tuple(variance),  # type: ignore[arg-type]
        num_classes=int(out.scalar("num_classes", "i")),
    )
    if config.num_classes != len(COCO_LABELS_91):
        raise CheckpointError(
            f"graph config has {config.num_classes} classes, the COCO label map {len(COCO_LABELS_91)}"
        )
    return config


# ------------------------------------------------------------------------------ the network

_FE: Final = "FeatureExtractor/MobilenetV2"
# MobileNetV2 inverted residual blocks (expanded_conv .. expanded_conv_16): stride of each block's
# depthwise convolution. Channels and expansion come from the weights' shapes.
_BLOCK_STRIDES: Final = (1, 2, 1, 2, 1, 1, 2, 1, 1, 1, 1, 1, 1, 2, 1, 1, 1)
# The four extra feature layers after Conv_1: (1x1 name, depthwise 3x3 stride-2 name).
_EXTRAS: Final = (
    ("layer_19_1_Conv2d_2_1x1_256", "layer_19_2_Conv2d_2_3x3_s2_512"),
    ("layer_19_1_Conv2d_3_1x1_128", "layer_19_2_Conv2d_3_3x3_s2_256"),
    ("layer_19_1_Conv2d_4_1x1_128", "layer_19_2_Conv2d_4_3x3_s2_256"),
    ("layer_19_1_Conv2d_5_1x1_64", "layer_19_2_Conv2d_5_3x3_s2_128"),
)
_NUM_MAPS: Final = 6
# The first feature map is block 13's expansion (576 channels at 19x19 for a 300x300 input): the
# feature extractor's ``layer_15/expansion_output``, taken before that block's stride-2 depthwise.
_TAP_BLOCK: Final = 13
_PREPROCESS: Final = ("Preprocessor/mul/x", "Preprocessor/sub/y")
_BN: Final = ("gamma", "beta", "moving_mean", "moving_variance")


def _block_name(i: int) -> str:
    return f"{_FE}/expanded_conv" + (f"_{i}" if i else "")


def _conv_bn_layers() -> list[tuple[str, str, int, bool]]:
    """``(scope, weight const, stride, relu6)`` of every convolution followed by BatchNorm, in order.
    Only the blocks' projections are linear (MobileNetV2's linear bottleneck)."""
    layers = [(f"{_FE}/Conv", f"{_FE}/Conv/weights", 2, True)]
    for i, stride in enumerate(_BLOCK_STRIDES):
        block = _block_name(i)
        if i:
            layers.append((f"{block}/expand", f"{block}/expand/weights", 1, True))
        layers.append((f"{block}/depthwise", f"{block}/depthwise/depthwise_weights", stride, True))
        layers.append((f"{block}/project", f"{block}/project/weights", 1, False))
    layers.append((f"{_FE}/Conv_1", f"{_FE}/Conv_1/weights", 1, True))
    for pointwise, depthwise in _EXTRAS:
        layers.append((f"{_FE}/{pointwise}", f"{_FE}/{pointwise}/weights", 1, True))
        layers.append((f"{_FE}/{depthwise}_depthwise", f"{_FE}/{depthwise}_depthwise/depthwise_weights", 2, True))
        layers.append((f"{_FE}/{depthwise}", f"{_FE}/{depthwise}/weights", 1, True))
    return layers


def expected_tensors() -> list[str]:
    """Every ``Const`` the network reads from the graph."""
    names = list(_PREPROCESS)
    for scope, weight, _, _ in _conv_bn_layers():
        names.append(weight)
        names.extend(f"{scope}/BatchNorm/{p}" for p in _BN)
    for i in range(_NUM_MAPS):
        for head in ("BoxEncodingPredictor", "ClassPredictor"):
            names.extend((f"BoxPredictor_{i}/{head}/weights", f"BoxPredictor_{i}/{head}/biases"))
    return names


class _SameConv(nn.Module):
    """A convolution with TF's ``SAME`` padding: total ``max((ceil(n/s)-1)*s + k - n, 0)`` per axis,
    the odd pixel after (right/bottom), computed from the input so any input size is exact."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, stride: int, groups: int, relu6: bool) -> None:
        super().__init__()
        out_c, in_per_group, kh, kw = weight.shape
        self.conv = nn.Conv2d(in_per_group * groups, out_c, (kh, kw), stride=stride, groups=groups, bias=True)
        with torch.no_grad():
            self.conv.weight.copy_(weight)
            self.conv.bias.copy_(bias)
        self.kernel = (kh, kw)
        self.stride = stride
        self.relu6 = relu6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k in ((x.shape[-1], self.kernel[1]), (x.shape[-2], self.kernel[0])):
            total = max((-(-size // self.stride) - 1) * self.stride + k - size, 0)
            pads.extend((total // 2, total - total // 2))
        left, right, top, bottom = pads
        conv = self.conv
        if left == right and top == bottom:
            # Symmetric: the convolution pads itself, sparing a copy of the input.
            x = F.conv2d(x, conv.weight, conv.bias, self.stride, (top, left), 1, conv.groups)
        else:
            x = F.conv2d(F.pad(x, pads), conv.weight, conv.bias, self.stride, 0, 1, conv.groups)
        return F.relu6(x, inplace=True) if self.relu6 else x  # in place: x is the fresh conv output


class _InvertedResidual(nn.Module):
    def __init__(self, expand: _SameConv | None, depthwise: _SameConv, project: _SameConv, residual: bool) -> None:
        super().__init__()
        self.expand = expand
        self.depthwise = depthwise
        self.project = project
        self.residual = residual

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The block's output and its expansion (the first SSD feature map taps block 13's)."""
        expanded = self.expand(x) if self.expand is not None else x
        y = self.project(self.depthwise(expanded))
        return (x + y if self.residual else y), expanded


class SsdMobileNetV2(nn.Module):
    """MobileNetV2 SSD feature extractor and box/class heads, built from the graph's ``Const`` tensors.

    ``forward`` takes ``(n, 3, h, w)`` RGB pixel values 0..255 (any float dtype; the graph's own
    preprocessing, ``x * mul - sub``, runs inside) and returns box codes ``(n, anchors, 4)`` and class
    logits ``(n, anchors, 91)``, anchors ordered as :func:`generate_anchors` orders them.
    """

    def __init__(self, tensors: Mapping[str, np.ndarray], bn_epsilon: float = 1e-3) -> None:
        super().__init__()
        missing = sorted(set(expected_tensors()) - set(tensors))
        if missing:
            raise GraphReadError(f"graph lacks tensors the SSD needs: {', '.join(missing[:5])}")
        self.register_buffer("pre_mul", torch.tensor(float(np.asarray(tensors[_PREPROCESS[0]]).reshape(-1)[0])))
        self.register_buffer("pre_sub", torch.tensor(float(np.asarray(tensors[_PREPROCESS[1]]).reshape(-1)[0])))
        convs = {scope: self._conv_bn(tensors, scope, weight, stride, relu6, bn_epsilon)
                 for scope, weight, stride, relu6 in _conv_bn_layers()}
        self.stem = convs[f"{_FE}/Conv"]
        blocks = []
        for i, stride in enumerate(_BLOCK_STRIDES):
            name = _block_name(i)
            expand = convs.get(f"{name}/expand") if i else None
            project = convs[f"{name}/project"]
            in_c = (expand.conv.in_channels if expand is not None else convs[f"{name}/depthwise"].conv.in_channels)
            residual = stride == 1 and in_c == project.conv.out_channels
            blocks.append(_InvertedResidual(expand, convs[f"{name}/depthwise"], project, residual))
        self.blocks = nn.ModuleList(blocks)
        self.head_conv = convs[f"{_FE}/Conv_1"]
        self.extras = nn.ModuleList(
            nn.Sequential(convs[f"{_FE}/{pw}"], convs[f"{_FE}/{dw}_depthwise"], convs[f"{_FE}/{dw}"])
            for pw, dw in _EXTRAS
        )
        self.box_heads = nn.ModuleList(self._head(tensors, f"BoxPredictor_{i}/BoxEncodingPredictor", 4)
                                       for i in range(_NUM_MAPS))
        self.class_heads = nn.ModuleList(self._head(tensors, f"BoxPredictor_{i}/ClassPredictor", len(COCO_LABELS_91))
                                         for i in range(_NUM_MAPS))
        self.eval()

    @staticmethod
    def _conv_bn(
        tensors: Mapping[str, np.ndarray], scope: str, weight: str, stride: int, relu6: bool, eps: float
    ) -> _SameConv:
        w = np.asarray(tensors[weight], np.float64)
        gamma, beta, mean, var = (np.asarray(tensors[f"{scope}/BatchNorm/{p}"], np.float64) for p in _BN)
        if w.ndim != 4:
            raise GraphReadError(f"{weight}: expected a 4-d kernel, got shape {w.shape}")
        if "depthwise_weights" in weight:
            # TF depthwise kernels are (kh, kw, in, multiplier); torch wants (in * multiplier, 1, kh, kw).
            kh, kw, c, mult = w.shape
            kernel = w.transpose(2, 3, 0, 1).reshape(c * mult, 1, kh, kw)
            groups = c
        else:
            kernel = w.transpose(3, 2, 0, 1)  # HWIO -> OIHW
            groups = 1
        out_c = kernel.shape[0]
        if not all(p.shape == (out_c,) for p in (gamma, beta, mean, var)):
            raise GraphReadError(f"{scope}: BatchNorm parameters do not fit {out_c} channels")
        factor = gamma / np.sqrt(var + eps)
        folded = kernel * factor[:, None, None, None]
        bias = beta - mean * factor
        return _SameConv(torch.from_numpy(folded).float(), torch.from_numpy(bias).float(), stride, groups, relu6)

    @staticmethod
    def _head(tensors: Mapping[str, np.ndarray], scope: str, per_anchor: int) -> _SameConv:
        w = np.asarray(tensors[f"{scope}/weights"], np.float32)
        b = np.asarray(tensors[f"{scope}/biases"], np.float32)
        if w.ndim != 4 or b.shape != (w.shape[3],) or w.shape[3] % per_anchor:
            raise GraphReadError(f"{scope}: weights {w.shape} / biases {b.shape} do not form a predictor")
        return _SameConv(torch.from_numpy(w.transpose(3, 2, 0, 1).copy()), torch.from_numpy(b), 1, 1, relu6=False)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = x * self.pre_mul - self.pre_sub
        x = self.stem(x)
        maps = []
        for i, block in enumerate(self.blocks):
            x, expanded = block(x)
            if i == _TAP_BLOCK:
                maps.append(expanded)
        x = self.head_conv(x)
        maps.append(x)
        for extra in self.extras:
            x = extra(x)
            maps.append(x)
        return maps

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
        maps = self.features(x)
        n = x.shape[0]
        codes = [h(m).permute(0, 2, 3, 1).reshape(n, -1, 4) for h, m in zip(self.box_heads, maps, strict=True)]
        logits = [h(m).permute(0, 2, 3, 1).reshape(n, -1, len(COCO_LABELS_91))
                  for h, m in zip(self.class_heads, maps, strict=True)]
        return torch.cat(codes, 1), torch.cat(logits, 1), [(m.shape[-2], m.shape[-1]) for m in maps]


# ------------------------------------------------------------------------------ the detector


@dataclass(frozen=True)
class TorchSsdConfig:
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)
    # The graph's fixed 300x300 stretch (no aspect-preserving padding), as cv2.dnn feeds it.
    input_size: int = 300
    anchors: AnchorConfig = field(default_factory=AnchorConfig)
    bf16: bool = False  # bfloat16 autocast of the network (decoding and NMS stay float32)
    channels_last: bool = False


class TorchSsdMobileNetCoco:
    """SSD-MobileNet-v2 COCO (2018_03_29) in torch: same interface and outputs as :class:`SsdMobileNetCoco`,
    batched on any device."""

    name = "ssd_mobilenet_v2_coco"

    def __init__(
        self,
        graph_path: str | Path,
        config_path: str | Path,
        config: TorchSsdConfig | None = None,
        *,
        device: str | torch.device = "cpu",
        version: str = "2018_03_29",
    ) -> None:
        self.config = config or TorchSsdConfig()
        self.version = version
        self.device = torch.device(device)
        graph_path, config_path = Path(graph_path), Path(config_path)
        for path in (graph_path, config_path):
            if not path.is_file():
                raise FileNotFoundError(f"SSD model file not found: {path}")
        nodes = read_config_nodes(config_path)
        self.output = check_config_priors(nodes, self.config.anchors, self.config.input_size)
        bn = nodes.get(f"{_FE}/Conv/BatchNorm/batchnorm/add_1")
        epsilon = float(bn.scalar("epsilon", "f")) if bn is not None else 1e-3
        tensors = read_graph_consts(graph_path, expected_tensors())
        model = SsdMobileNetV2(tensors, bn_epsilon=epsilon).to(self.device)
        if self.config.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model.eval()
        self._anchors: dict[tuple[tuple[int, int], ...], torch.Tensor] = {}

    @classmethod
    def from_installed_package(
        cls, config: TorchSsdConfig | None = None, *, device: str | torch.device = "cpu"
    ) -> TorchSsdMobileNetCoco:
        graph, pbtxt = find_ssd_mobilenet_files()
        return cls(graph, pbtxt, config, device=device)

    def preprocess(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """``(n, 3, size, size)`` float pixel values on the device, resized as cv2.dnn's
        ``blobFromImages`` resizes (bilinear on the uint8 image, before the float conversion)."""
        size = self.config.input_size
        # Resizing on the host keeps the bytes shipped to the device at 270 kB per photo whatever its size.
        resized = np.stack([
            img if img.shape[:2] == (size, size) else cv2.resize(np.ascontiguousarray(img), (size, size),
                                                                 interpolation=cv2.INTER_LINEAR)
            for img in images
        ])
        batch = torch.from_numpy(resized)
        if self.device.type == "cuda":
            batch = batch.pin_memory()
        x = batch.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
        # The permuted NHWC pixels already have channels-last strides, which convolutions would follow:
        # lay them out as the config says.
        layout = torch.channels_last if self.config.channels_last else torch.contiguous_format
        return x.contiguous(memory_format=layout)

    def anchors(self, feature_sizes: Sequence[tuple[int, int]]) -> torch.Tensor:
        key = tuple(feature_sizes)
        if key not in self._anchors:
            self._anchors[key] = generate_anchors(self.config.anchors, key, self.device)
        return self._anchors[key]

    def forward_raw(self, images: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoded boxes ``(n, anchors, 4)`` (x0, y0, x1, y1 in [0, 1]) and sigmoid scores
        ``(n, anchors, 91)``, float32 on the device."""
        _check_images(images)
        x = self.preprocess(images)
        with (
            torch.inference_mode(),
            torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.config.bf16),
        ):
            codes, logits, sizes = self.model(x)
        with torch.inference_mode():
            v = self.output.variance
            boxes = decode_boxes(codes, self.anchors(sizes), (1 / v[0], 1 / v[1], 1 / v[2], 1 / v[3]))
            return boxes, torch.sigmoid(logits.float())

    def _select(self, boxes: torch.Tensor, scores: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
        """cv2.dnn's ``DetectionOutput``, batched: per image and class the ``top_k`` best scores above the
        floor, NMS at the graph's IoU, then the image's ``keep_top_k`` best."""
        out = self.output
        n, num_anchors, _ = scores.shape
        cls_scores = scores[:, :, 1:]  # class 0 is the background
        k = min(out.top_k, num_anchors)
        top, idx = cls_scores.topk(k, dim=1)  # (n, k, classes)
        keep = (top > out.confidence_threshold) & (top >= self.config.postprocess.score_threshold)
        img_i, rank_i, cls_i = keep.nonzero(as_tuple=True)
        anchor_i = idx[img_i, rank_i, cls_i]
        cand_scores = top[img_i, rank_i, cls_i]
        cand_boxes = boxes[img_i, anchor_i]
        labels = cls_i + 1
        group = img_i * len(COCO_LABELS_91) + labels
        kept = batched_nms(cand_boxes, cand_scores, group, out.nms_threshold)  # sorted by score
        kept_img = img_i[kept]
        result = []
        cpu = (cand_boxes[kept].cpu(), cand_scores[kept].cpu(), labels[kept].cpu(), kept_img.cpu())
        for i in range(n):
            mine = cpu[3] == i
            result.append(tuple(t[mine][: out.keep_top_k] for t in cpu[:3]))
        return result

    def detect(self, images: Sequence[np.ndarray]) -> list[Detections]:
        """Detect objects in RGB uint8 images of any sizes; one :class:`Detections` per image."""
        if len(images) == 0:
            return []
        boxes, scores = self.forward_raw(images)
        with torch.inference_mode():
            selected = self._select(boxes, scores)
        return [postprocess(b, s, c, self.config.postprocess) for b, s, c in selected]
