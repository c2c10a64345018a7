"""Pure-numpy reader of dlib's binary DNN serialization (the ``.dat`` files dlib's ``serialize`` writes).

dlib's stream is not self-describing: it is written by the network's C++ type, so a reader must
follow the same order of calls. For the networks we read (a loss layer over a stack of
``add_layer`` / ``add_tag_layer`` / ``add_skip_layer`` wrappers over an input layer) that order is:

* ``add_loss_layer``: int version, the loss details, then the subnetwork.
* ``add_layer``: int version, then the subnetwork (recursively), then this layer's details, three
  bools and the scratch tensors. So all wrapper versions come first (top to bottom), then the input
  layer, then the layers' details bottom-up.
* ``add_tag_layer`` / ``add_skip_layer``: int version (1) and the subnetwork, nothing else: which tag
  they are is in the C++ type only, so the caller checks the wrapper sequence against its own
  architecture.

Encodings (dlib/serialize.h, dlib/float_details.h, dlib/dnn/tensor.h):

* integers: one control byte (low nibble = number of little-endian magnitude bytes, bit 7 = negative)
  followed by those bytes;
* floats/doubles: the integer encoding of an int64 mantissa then an int16 exponent,
  value = mantissa * 2**exponent (exponents 32000/32001/32002 mean +inf/-inf/nan);
* bool: the character ``'1'`` or ``'0'``; std::string: integer length then the bytes;
* tensor: int version, then num_samples, k, nr, nc; version 2 stores raw little-endian float32,
  version 1 stores every value in the float encoding above;
* alias_tensor (a view into a layer's ``params``): int version, num_samples, k, nr, nc.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import numpy as np

# float_details' special exponents (dlib/float_details.h).
_EXP_INF: Final = 32000
_EXP_NINF: Final = 32001
_EXP_NAN: Final = 32002

WRAPPER_LAYER: Final = "layer"
WRAPPER_TAG_OR_SKIP: Final = "tag_or_skip"


class DatFormatError(ValueError):
    """The bytes do not follow dlib's serialization layout for the layers we know."""


@dataclass(frozen=True)
class DatLayer:
    """One computational layer, as dlib serialized it.

    ``kind`` is the layer family ("con", "affine", "relu", "add_prev", "avg_pool", "max_pool", "fc"),
    ``version`` the exact tag string dlib wrote (e.g. ``"con_4"``), ``attrs`` its scalar settings and
    ``params`` its tensors, already split into named arrays in dlib's layout
    (con: weight (out, in, kh, kw), bias (out,); affine: gamma, beta (k,);
    fc: weight (num_inputs, num_outputs), bias (num_outputs,) when present).
    """

    kind: str
    version: str
    attrs: dict[str, int | float | bool] = field(default_factory=dict)
    params: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class DatNetwork:
    """A parsed dlib network.

    ``wrappers`` lists the wrapper kinds from the top (next to the loss) down to the input:
    ``"layer"`` for an ``add_layer`` and ``"tag_or_skip"`` for an ``add_tag_layer``/``add_skip_layer``.
    ``layers`` holds the computational layers bottom-up (the first one reads the input).
    """

    loss: str
    loss_attrs: dict[str, float]
    input: str
    input_attrs: dict[str, float | int]
    wrappers: tuple[str, ...]
    layers: tuple[DatLayer, ...]


class _Reader:
    def __init__(self, data: bytes) -> None:
        self._data = data
        self.pos = 0

    def _take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self._data):
            raise DatFormatError(f"unexpected end of file at byte {self.pos} (wanted {n} more bytes)")
        chunk = self._data[self.pos : end]
        self.pos = end
        return chunk

    def at_end(self) -> bool:
        return self.pos == len(self._data)

    def int_(self) -> int:
        ctrl = self._take(1)[0]
        size = ctrl & 0x0F
        if size == 0 or size > 8 or ctrl & 0x70:
            raise DatFormatError(f"bad integer control byte 0x{ctrl:02x} at byte {self.pos - 1}")
        value = int.from_bytes(self._take(size), "little")
        return -value if ctrl & 0x80 else value

    def float_(self) -> float:
        mantissa = self.int_()
        exponent = self.int_()
        if exponent == _EXP_INF:
            return math.inf
        if exponent == _EXP_NINF:
            return -math.inf
        if exponent == _EXP_NAN:
            return math.nan
        return math.ldexp(float(mantissa), exponent)

    def bool_(self) -> bool:
        ch = self._take(1)
        if ch not in (b"0", b"1"):
            raise DatFormatError(f"bad bool byte {ch!r} at byte {self.pos - 1}")
        return ch == b"1"

    def str_(self) -> str:
        n = self.int_()
        if n > 256:
            raise DatFormatError(f"implausible string length {n} at byte {self.pos}")
        return self._take(n).decode("ascii", errors="replace")

    def peek_str(self) -> str | None:
        """The string at the cursor if one parses there, without moving the cursor."""
        start = self.pos
        try:
            return self.str_()
        except DatFormatError:
            return None
        finally:
            self.pos = start

    def tensor(self) -> np.ndarray:
        version = self.int_()
        shape = tuple(self.int_() for _ in range(4))
        if any(d < 0 for d in shape):
            raise DatFormatError(f"negative tensor dimension {shape} at byte {self.pos}")
        count = math.prod(shape)
        if version == 2:
            arr = np.frombuffer(self._take(4 * count), dtype="<f4").astype(np.float32)
        elif version == 1:
            arr = np.array([self.float_() for _ in range(count)], dtype=np.float32)
        else:
            raise DatFormatError(f"unknown tensor version {version} at byte {self.pos}")
        return arr.reshape(shape)

    def alias(self) -> tuple[int, int, int, int]:
        version = self.int_()
        if version != 1:
            raise DatFormatError(f"unknown alias_tensor version {version} at byte {self.pos}")
        n, k, nr, nc = (self.int_() for _ in range(4))
        return n, k, nr, nc


def _split(params: np.ndarray, *views: tuple[int, int, int, int]) -> list[np.ndarray]:
    """Cut a layer's flat ``params`` tensor into its alias views, in order (dlib lays them end to end)."""
    flat = params.reshape(-1)
    out: list[np.ndarray] = []
    offset = 0
    for shape in views:
        size = math.prod(shape)
        if offset + size > flat.size:
            raise DatFormatError(f"alias {shape} does not fit in params of size {flat.size}")
        out.append(flat[offset : offset + size].reshape(shape).copy())
        offset += size
    if offset != flat.size:
        raise DatFormatError(f"params of size {flat.size} has {flat.size - offset} unused values")
    return out


def _read_con(r: _Reader, version: str) -> DatLayer:
    if version not in ("con_4", "con_5", "con_6"):
        raise DatFormatError(f"unsupported con_ version {version!r}")
    params = r.tensor()
    attrs: dict[str, int | float | bool] = {
        "num_filters": r.int_(),
        "nr": r.int_(),
        "nc": r.int_(),
        "stride_y": r.int_(),
        "stride_x": r.int_(),
        "padding_y": r.int_(),
        "padding_x": r.int_(),
    }
    filters = r.alias()
    biases = r.alias()
    for name in ("learning_rate_mult", "weight_decay_mult", "bias_learning_rate_mult", "bias_weight_decay_mult"):
        attrs[name] = r.float_()
    attrs["use_bias"] = r.bool_() if version in ("con_5", "con_6") else True
    if version == "con_6":
        attrs["use_relu"] = r.bool_()
    views = [filters] + ([biases] if attrs["use_bias"] else [])
    parts = _split(params, *views)
    named = {"weight": parts[0]}
    if attrs["use_bias"]:
        named["bias"] = parts[1].reshape(-1)
    return DatLayer("con", version, attrs, named)


def _read_affine(r: _Reader, version: str) -> DatLayer:
    if version not in ("affine_", "affine_2"):
        # bn_ layers would need their running statistics folded in; the networks we read were
        # saved after dlib already converted every bn_ into an affine_.
        raise DatFormatError(f"unsupported affine_ version {version!r}")
    params = r.tensor()
    gamma = r.alias()
    beta = r.alias()
    attrs: dict[str, int | float | bool] = {"mode": r.int_()}  # 0 = CONV_MODE, 1 = FC_MODE
    if version == "affine_2":
        attrs["disabled"] = r.bool_()
    g, b = _split(params, gamma, beta)
    return DatLayer("affine", version, attrs, {"gamma": g.reshape(-1), "beta": b.reshape(-1)})


def _read_pool(r: _Reader, version: str, kind: str) -> DatLayer:
    if version != f"{kind}_2":
        raise DatFormatError(f"unsupported {kind}_ version {version!r}")
    attrs: dict[str, int | float | bool] = {
        "nr": r.int_(),
        "nc": r.int_(),
        "stride_y": r.int_(),
        "stride_x": r.int_(),
        "padding_y": r.int_(),
        "padding_x": r.int_(),
    }
    return DatLayer(kind, version, attrs)


def _read_fc(r: _Reader, version: str) -> DatLayer:
    if version not in ("fc_2", "fc_3"):
        raise DatFormatError(f"unsupported fc_ version {version!r}")
    attrs: dict[str, int | float | bool] = {"num_outputs": r.int_(), "num_inputs": r.int_()}
    params = r.tensor()
    weights = r.alias()
    biases = r.alias()
    attrs["bias_mode"] = r.int_()  # 0 = FC_HAS_BIAS, 1 = FC_NO_BIAS
    for name in ("learning_rate_mult", "weight_decay_mult", "bias_learning_rate_mult", "bias_weight_decay_mult"):
        attrs[name] = r.float_()
    if version == "fc_3":
        attrs["use_bias"] = r.bool_()
    has_bias = attrs["bias_mode"] == 0 and bool(attrs.get("use_bias", True))
    parts = _split(params, weights, *([biases] if has_bias else []))
    named = {"weight": parts[0].reshape(weights[0], weights[1] * weights[2] * weights[3])}
    if has_bias:
        named["bias"] = parts[1].reshape(-1)
    return DatLayer("fc", version, attrs, named)


def _read_details(r: _Reader) -> DatLayer:
    version = r.str_()
    if version.startswith("con_"):
        return _read_con(r, version)
    if version.startswith("affine_"):
        return _read_affine(r, version)
    if version.startswith("max_pool_"):
        return _read_pool(r, version, "max_pool")
    if version.startswith("avg_pool_"):
        return _read_pool(r, version, "avg_pool")
    if version.startswith("fc_"):
        return _read_fc(r, version)
    if version == "relu_":
        return DatLayer("relu", version)
    if version == "add_prev_":
        return DatLayer("add_prev", version)
    raise DatFormatError(f"unsupported layer type {version!r} at byte {r.pos}")


def _read_loss(r: _Reader) -> tuple[str, dict[str, float]]:
    name = r.str_()
    if name == "loss_metric_2":
        return name, {"margin": r.float_(), "dist_thresh": r.float_()}
    if name == "loss_metric_":
        return name, {}
    raise DatFormatError(f"unsupported loss layer {name!r}")


def _read_input(r: _Reader) -> tuple[str, dict[str, float | int]]:
    name = r.str_()
    if name == "input_rgb_image_sized":
        attrs: dict[str, float | int] = {
            "avg_red": r.float_(),
            "avg_green": r.float_(),
            "avg_blue": r.float_(),
            "nr": r.int_(),
            "nc": r.int_(),
        }
        return name, attrs
    raise DatFormatError(f"unsupported input layer {name!r}")


def parse_dat(data: bytes) -> DatNetwork:
    """Parse the bytes of a dlib ``add_loss_layer`` network file."""
    r = _Reader(data)
    if r.int_() != 1:
        raise DatFormatError("unexpected add_loss_layer version (want 1)")
    loss, loss_attrs = _read_loss(r)

    # Wrapper versions, top-down, until the input layer's name appears.
    versions: list[int] = []
    while True:
        name = r.peek_str()
        if name is not None and name.startswith("input_"):
            break
        versions.append(r.int_())
        if len(versions) > 100_000:
            raise DatFormatError("no input layer found")
    if not versions or versions[-1] not in (2, 3):
        raise DatFormatError("the layer over the input must be an add_layer (version 2 or 3)")
    # Version 1 is a tag or skip wrapper; the last one (over the input) is always an add_layer.
    wrappers = (*(WRAPPER_LAYER if v == 2 else WRAPPER_TAG_OR_SKIP for v in versions[:-1]), WRAPPER_LAYER)
    if any(v not in (1, 2) for v in versions[:-1]):
        raise DatFormatError(f"unexpected wrapper versions {sorted(set(versions[:-1]))} (want 1 or 2)")
    input_name, input_attrs = _read_input(r)

    layers: list[DatLayer] = []
    n_layers = wrappers.count(WRAPPER_LAYER)
    for i in range(n_layers):
        layer = _read_details(r)
        for _ in range(3):  # this_layer_setup_called, gradient_input_is_stale, get_output..._disabled
            r.bool_()
        r.tensor()  # x_grad
        r.tensor()  # cached_output
        r.tensor()  # params_grad (grad_final for the layer over the input)
        if i == 0 and versions[-1] == 3:
            r.int_()  # _sample_expansion_factor
        layers.append(layer)
    if not r.at_end():
        raise DatFormatError(f"{len(data) - r.pos} trailing bytes after the network")
    return DatNetwork(loss, loss_attrs, input_name, input_attrs, wrappers, tuple(layers))


def read_dat(path: str | Path) -> DatNetwork:
    """Read a dlib DNN ``.dat`` file (uncompressed, as ``dlib::serialize(path) << net`` writes it)."""
    return parse_dat(Path(path).read_bytes())
