"""JPEG decode on the model's device: nvJPEG through ``torchvision.io.decode_jpeg`` on CUDA.

The CPU decode stage in header mode (:class:`~photolens.udfs.decode.DecodeConfig` ``pixels=False``)
has already checked every deferred JPEG as far as its header allows (allowlist, bombs, dimensions,
EXIF, an end-of-image marker after the scan). What is left for the device is the pixels: batched
decode, the EXIF turn and the resize to the working size, all without the full-size image ever
crossing to the host. Bytes that the device decoder refuses fall back to
:func:`~photolens.udfs.decode.decode_photo` (pixel mode, with its time limit) row by row, so a bad
photo still ends as the usual error row and never as pixels.

Same working image as the CPU path, up to the decoders: target size by
:func:`~photolens.udfs.decode.working_shape`, resized in the stored orientation with antialiased
bicubic (Pillow's BICUBIC, which the CPU path uses after libjpeg's DCT-domain reduction), then turned
by the orientation table of ``ImageOps.exif_transpose``. ``device="cpu"`` runs the same code through
libjpeg-turbo, which is how the tests pin the behaviour without a GPU.

The device decode has no time limit of its own (a CUDA kernel cannot be abandoned the way the CPU
decode thread is): its work is bounded by the header's pixel limit (``max_pixels``) instead, and the
CPU fallback keeps ``time_limit_s``. Failures of the decoder on a whole batch (a bad row, or the device
out of memory) retry row by row, and only the rows that still fail go to the CPU.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Final

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg

from photolens.schemas.errors import Status
from photolens.udfs.decode import DecodeConfig, decode_photo, perceptual_hash, working_shape

__all__ = ["decode_on_device", "finish_on_device", "orient", "resize_hwc"]

# Decoder failures that mean "these bytes", not "this code": torchvision raises RuntimeError for
# libjpeg/nvJPEG errors (and ValueError/TypeError for inputs it cannot take at all).
_DECODER_FAILURES: Final[tuple[type[BaseException], ...]] = (RuntimeError, ValueError, TypeError)


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """Undo an EXIF orientation on an HWC tensor (same table as ``ImageOps.exif_transpose``)."""
    if orientation == 2:
        return image.flip(1)
    if orientation == 3:
        return image.flip((0, 1))
    if orientation == 4:
        return image.flip(0)
    if orientation == 5:
        return image.transpose(0, 1)
    if orientation == 6:
        return torch.rot90(image, k=-1, dims=(0, 1))
    if orientation == 7:
        return torch.rot90(image, k=2, dims=(0, 1)).transpose(0, 1)
    if orientation == 8:
        return torch.rot90(image, k=1, dims=(0, 1))
    return image


def resize_hwc(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """HWC uint8 → (height, width) HWC uint8, antialiased bicubic; a no-op at the same size."""
    if tuple(image.shape[:2]) == (height, width):
        return image
    x = image.permute(2, 0, 1).unsqueeze(0).to(torch.float32)
    y = F.interpolate(x, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    return y.squeeze(0).permute(1, 2, 0).round_().clamp_(0, 255).to(torch.uint8)


def _as_tensor(payload: bytes | bytearray | memoryview | np.ndarray) -> torch.Tensor:
    if isinstance(payload, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(payload, dtype=np.uint8).reshape(-1).copy())
    # frombuffer shares memory and warns on read-only buffers: one copy into a writable bytearray.
    return torch.frombuffer(bytearray(payload), dtype=torch.uint8)


def _decode_list(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """One batched decoder call; when the batch fails, each row alone (a bad row fails only itself)."""
    if not tensors:
        return []
    try:
        out = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)
        return list(out)
    except _DECODER_FAILURES:
        pass
    rows: list[torch.Tensor | None] = []
    for t in tensors:
        try:
            rows.append(decode_jpeg(t, mode=ImageReadMode.RGB, device=device))
        except _DECODER_FAILURES:
            rows.append(None)
    return rows


def decode_on_device(
    payloads: list[bytes], metas: list[dict], device: str, working_size: int
) -> list[torch.Tensor | None]:
    """Decode JPEG bytes on ``device`` into oriented working images (HWC uint8 tensors on ``device``).

    ``metas[i]`` carries what header mode found: ``orientation`` (1-8) and the oriented full size
    ``width``/``height``. A row whose bytes do not decode, or decode to another size than the header
    said, is None: the caller decodes that row on the CPU (see :func:`finish_on_device`).
    """
    if len(payloads) != len(metas):
        raise ValueError(f"{len(payloads)} payloads but {len(metas)} metas")
    if working_size < 1:
        raise ValueError(f"working_size must be positive, got {working_size}")
    dev = torch.device(device)
    decoded = _decode_list([_as_tensor(p) for p in payloads], dev)
    out: list[torch.Tensor | None] = []
    for chw, meta in zip(decoded, metas, strict=True):
        if chw is None:
            out.append(None)
            continue
        orientation = int(meta.get("orientation") or 1)
        turned = orientation in (5, 6, 7, 8)
        stored_h, stored_w = int(chw.shape[1]), int(chw.shape[2])
        width, height = (stored_h, stored_w) if turned else (stored_w, stored_h)
        if (int(meta.get("width", width)), int(meta.get("height", height))) != (width, height) or chw.shape[0] != 3:
            # The header and the decoder disagree about the image: let the CPU path judge it.
            out.append(None)
            continue
        work_h, work_w = working_shape(width, height, working_size)
        # Resize in the stored orientation, turn last (as the CPU path does).
        target = (work_w, work_h) if turned else (work_h, work_w)
        hwc = resize_hwc(chw.permute(1, 2, 0), *target)
        out.append(orient(hwc, orientation).contiguous())
    return out


def finish_on_device(
    batch: Mapping[str, np.ndarray], config: DecodeConfig, device: str
) -> tuple[list[torch.Tensor | None], dict[str, np.ndarray]]:
    """Complete a header-mode :class:`~photolens.udfs.decode.DecodeUDF` batch on ``device``.

    Returns one working image per row (a tensor on ``device`` for every ``ok`` row, None for the
    others) and the batch with ``phash`` filled, ``jpeg`` dropped, and rows the device could not
    decode either decoded on the CPU or turned into decode error rows. Rows decoded on the CPU in
    header mode already (PNG, CMYK JPEG, ...) have their ``image`` moved to the device.
    """
    n = len(batch["status"])
    out = {key: (value.copy() if isinstance(value, np.ndarray) else value) for key, value in batch.items()}
    jpeg = out.pop("jpeg", np.full(n, None, dtype=object))
    images: list[torch.Tensor | None] = [None] * n
    dev = torch.device(device)
    pending = [i for i in range(n) if out["status"][i] == Status.OK.value and jpeg[i] is not None]
    metas = [
        {"orientation": int(out["orientation"][i]), "width": int(out["width"][i]), "height": int(out["height"][i])}
        for i in pending
    ]
    decoded = decode_on_device([jpeg[i] for i in pending], metas, str(dev), config.working_size)
    cpu_cfg = dataclasses.replace(config, pixels=True)
    for i, image in zip(pending, decoded, strict=True):
        if image is None:
            result = decode_photo(jpeg[i], cpu_cfg)
            out["decode_seconds"][i] += result.seconds
            if not result.ok:
                out["status"][i] = result.status.value
                out["error_code"][i] = result.error_code.value if result.error_code else None
                out["error_stage"][i] = result.error_stage.value if result.error_stage else None
                out["error_detail"][i] = result.error_detail
                out["width"][i] = out["height"][i] = out["orientation"][i] = 0
                for key in ("format", "taken_at"):
                    out[key][i] = None
                out["gps_lat"][i] = out["gps_lon"][i] = np.nan
                out["n_frames"][i] = 0
                if "work_width" in out:
                    out["work_width"][i] = out["work_height"][i] = 0
                continue
            out["image"][i] = result.image
            out["phash"][i] = result.phash
            out["width"][i], out["height"][i], out["orientation"][i] = result.width, result.height, result.orientation
            image = torch.from_numpy(np.ascontiguousarray(result.image)).to(dev)
        else:
            # pHash needs only the 32x32 grey thumbnail, but its LANCZOS grid is Pillow's: the working
            # image (≤ working_size) comes to the host once for it.
            out["phash"][i] = perceptual_hash(image.cpu().numpy())
        images[i] = image
    for i in range(n):
        if images[i] is None and out["status"][i] == Status.OK.value:
            existing = out["image"][i]
            if isinstance(existing, np.ndarray) and existing.size:
                images[i] = torch.from_numpy(np.ascontiguousarray(existing)).to(dev)
    return images, out
