"""Device JPEG decode: header mode lets no bad photo through, and the device pixels are the CPU pixels.

``device="cpu"`` runs the same torchvision decode (libjpeg-turbo instead of nvJPEG), the EXIF turn and
the resize as CUDA would; the CUDA tests at the end repeat the comparison on a GPU.
"""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_decode import (
    BAD_CASES,
    CFG,
    NUMPY_ORIENT,
    BadCase,
    assert_error_row,
    encode,
    exif_with,
    jpeg_bytes,
    mixed_rows,
    noise,
    udf_batch,
    write_and_read,
)

from photolens.schemas.errors import ErrorCode, Stage, Status
from photolens.udfs.decode import DecodeConfig, DecodeUDF, decode_photo, phash_distance
from photolens.udfs.gpudecode import decode_on_device, finish_on_device

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
HEADER = replace(CFG, pixels=False)
# Real photos for the pixel comparison: small ones (no resize), large ones (resize, and on the CPU
# path libjpeg's DCT-domain reduction first), greys and the biggest of the set.
REAL = [
    ("photos", "HappyFish.jpg"),
    ("photos", "baboon.jpg"),
    ("photos", "messi5.jpg"),
    ("photos", "board.jpg"),
    ("photos", "starry_night.jpg"),
    ("faces/deepface", "couple.jpg"),
    ("faces/deepface", "img3.jpg"),
    ("faces/deepface", "img26.jpg"),
    ("faces/deepface", "img40.jpg"),
    ("faces/deepface", "img49.jpg"),
    ("faces/deepface", "img11.jpg"),
    ("faces/deepface", "selfie-many-people.jpg"),
]
# Mean absolute difference (0-255 scale) allowed between the device and the CPU working image. Seen:
# 0 without a resize, 0.6-2.4 with one (the CPU path's DCT-domain 1/2-1/8 reduction before bicubic
# against the device's full decode and antialiased bicubic).
MAX_MEAN_DIFF = 3.0


def _real(folder: str, name: str) -> bytes:
    path = DATA / folder / name
    if not path.is_file():
        pytest.skip(f"real photo missing: {path} (see ../shared/data/README.md)")
    return path.read_bytes()


def _meta(result: object) -> dict:
    return {"orientation": result.orientation, "width": result.width, "height": result.height}  # type: ignore[attr-defined]


def _mean_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


# ---------------------------------------------------------------- pixels


def test_device_pixels_match_pillow_on_real_photos() -> None:
    payloads, metas, references = [], [], []
    for folder, name in REAL:
        data = _real(folder, name)
        header = decode_photo(data, HEADER)
        assert header.ok, (name, header.error_code)
        assert header.pixels_deferred, name
        assert header.image.shape == (0, 0, 3)
        assert header.phash is None
        reference = decode_photo(data, CFG)
        assert (header.width, header.height, header.orientation) == (reference.width, reference.height, 1)
        assert (header.work_height, header.work_width) == reference.image.shape[:2], name
        payloads.append(data)
        metas.append(_meta(header))
        references.append(reference)
    images = decode_on_device(payloads, metas, "cpu", CFG.working_size)
    resized = 0
    for (_, name), image, reference in zip(REAL, images, references, strict=True):
        assert image is not None, name
        assert image.dtype == torch.uint8
        assert image.is_contiguous()
        got = image.numpy()
        assert got.shape == reference.image.shape, name
        diff = _mean_diff(got, reference.image)
        assert diff < MAX_MEAN_DIFF, (name, diff)
        if max(reference.width, reference.height) <= CFG.working_size:
            assert diff == 0.0, name  # same libjpeg, no resize: the same pixels
        else:
            resized += 1
    assert resized >= 5


@pytest.fixture(scope="module")
def portrait_pixels() -> np.ndarray:
    """A real portrait, not square, big enough that the working-size resize runs."""
    with Image.open(io.BytesIO(_real("faces/deepface", "img3.jpg"))) as img:
        img = img.convert("RGB")
        img = img.resize((1500, round(1500 * img.height / img.width)), Image.Resampling.LANCZOS)
        return np.asarray(img).copy()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_on_the_device(tmp_path: Path, portrait_pixels: np.ndarray, orientation: int) -> None:
    stored = portrait_pixels
    assert stored.shape[0] != stored.shape[1]
    encoded = encode(Image.fromarray(stored), "JPEG", quality=92, exif=exif_with(orientation))
    data = write_and_read(tmp_path, f"o{orientation}.jpg", encoded)
    header = decode_photo(data, HEADER)
    assert header.pixels_deferred
    assert header.orientation == orientation
    reference = decode_photo(data, CFG)
    (image,) = decode_on_device([data], [_meta(header)], "cpu", CFG.working_size)
    assert image is not None
    got = image.numpy()
    assert got.shape == reference.image.shape
    assert (header.work_height, header.work_width) == got.shape[:2]
    assert _mean_diff(got, reference.image) < MAX_MEAN_DIFF
    # Independently of the decode module: the plain decode of the same pixels, turned by numpy.
    (upright,) = decode_on_device([data], [{**_meta(header), "orientation": 1,
                                            "width": stored.shape[1], "height": stored.shape[0]}],
                                  "cpu", CFG.working_size)  # fmt: skip
    assert upright is not None
    expected = NUMPY_ORIENT[orientation](upright.numpy())
    assert got.shape == expected.shape
    # Same pixels, turned: only the resize grid differs between the two (sub-pixel, ~1 level).
    assert _mean_diff(got, expected) < 2.0
    wrong = [o for o in range(1, 9) if NUMPY_ORIENT[o](upright.numpy()).shape == got.shape and o != orientation]
    for other in wrong:
        assert _mean_diff(got, NUMPY_ORIENT[other](upright.numpy())) > 10.0, other


# ---------------------------------------------------------------- bad input never reaches the device


@pytest.mark.parametrize("case", BAD_CASES, ids=[case.name for case in BAD_CASES])
def test_header_mode_rejects_what_the_cpu_path_rejects(tmp_path: Path, case: BadCase) -> None:
    data = write_and_read(tmp_path, case.name + case.suffix, case.make())
    result = decode_photo(data, replace(case.cfg, pixels=False))
    assert not result.pixels_deferred
    assert_error_row(result, case.code)


def _bad_dht_jpeg() -> bytes:
    """A JPEG whose header parses (Pillow reads no Huffman table when opening) but whose Huffman
    table is garbage: only decoding the pixels finds out."""
    data = bytearray(jpeg_bytes())
    dht = data.find(b"\xff\xc4")
    # After marker, length and class/id: the 16 code-length counts, now summing far past 256 codes.
    data[dht + 5 : dht + 21] = b"\xff" * 16
    return bytes(data)


def _header_batch(payloads: list[bytes]) -> dict[str, np.ndarray]:
    ids = np.array([f"p{i}" for i in range(len(payloads))], dtype=object)
    data = np.empty(len(payloads), dtype=object)
    data[:] = payloads
    return DecodeUDF(HEADER)({"photo_id": ids, "data": data})


def test_a_jpeg_that_passes_the_header_but_not_the_decoder_is_an_error_row() -> None:
    good, bad = jpeg_bytes(1), _bad_dht_jpeg()
    cpu = decode_photo(bad, CFG)
    assert not cpu.ok
    batch = _header_batch([good, bad, good])
    assert list(batch["status"]) == ["ok", "ok", "ok"]  # the header cannot tell
    assert all(isinstance(b, bytes) for b in batch["jpeg"])
    # The device decoder refuses the row, alone and inside a batch (the batch falls back per row).
    assert decode_on_device([bad], [{"orientation": 1}], "cpu", 1024) == [None]
    images, out = finish_on_device(batch, HEADER, "cpu")
    assert [image is not None for image in images] == [True, False, True]
    assert list(out["status"]) == ["ok", "error", "ok"]
    assert out["error_code"][1] == cpu.error_code.value  # type: ignore[union-attr]
    assert out["error_stage"][1] == Stage.DECODE.value
    assert out["error_detail"][1]
    assert (out["width"][1], out["height"][1], out["phash"][1], out["format"][1]) == (0, 0, None, None)
    assert "jpeg" not in out
    assert images[0] is not None and images[0].shape == (120, 160, 3)


def test_truncated_jpeg_stays_off_the_device_and_fails_through_the_fallback() -> None:
    data = jpeg_bytes()
    truncated = data[: len(data) // 2]
    # The header shows it (no end-of-image marker after the scan): decoded on the CPU, an error row.
    result = decode_photo(truncated, HEADER)
    assert not result.pixels_deferred
    assert_error_row(result, ErrorCode.TRUNCATED)
    batch = _header_batch([truncated])
    assert (batch["status"][0], batch["error_code"][0], batch["jpeg"][0]) == ("error", "TRUNCATED", None)
    # Had it reached the device anyway: the decoder fails, the CPU fallback fails, an error row.
    assert decode_on_device([truncated, data], [{"orientation": 1}] * 2, "cpu", 1024)[0] is None
    forged = _header_batch([data, data])
    forged["jpeg"][1] = truncated
    images, out = finish_on_device(forged, HEADER, "cpu")
    assert images[0] is not None and images[1] is None
    assert (out["status"][1], out["error_code"][1]) == (Status.ERROR.value, ErrorCode.TRUNCATED.value)


def test_truncation_check_is_not_fooled_by_markers_inside_a_header_segment() -> None:
    # An embedded thumbnail (EXIF's APP1, here an APP2 for simplicity) has its own SOS and EOI.
    data = jpeg_bytes()
    thumbnail = b"\xff\xd8\xff\xda\x00\x02" + bytes(32) + b"\xff\xd9"
    app2 = b"\xff\xe2" + (len(thumbnail) + 2).to_bytes(2, "big") + thumbnail
    with_thumb = data[:2] + app2 + data[2:]
    assert decode_photo(with_thumb, HEADER).pixels_deferred
    cut = with_thumb[: len(with_thumb) // 2]
    assert cut.rfind(b"\xff\xd9") > cut.find(b"\xff\xda")  # a naive search would pass it
    assert_error_row(decode_photo(cut, HEADER), ErrorCode.TRUNCATED)


def test_header_mode_keeps_odd_jpegs_on_the_cpu(tmp_path: Path) -> None:
    cmyk = encode(Image.new("CMYK", (64, 48), (0, 255, 255, 0)), "JPEG", quality=95)
    first = Image.fromarray(noise(48, 64))
    buf = io.BytesIO()
    first.save(buf, "MPO", save_all=True, append_images=[first.transpose(Image.Transpose.FLIP_LEFT_RIGHT)])
    grey = encode(Image.fromarray(noise(48, 64)[..., 0]), "JPEG", quality=95)
    for name, data, deferred in (("cmyk", cmyk, False), ("mpo", buf.getvalue(), False), ("grey", grey, True)):
        result = decode_photo(write_and_read(tmp_path, f"{name}.jpg", data), HEADER)
        assert result.ok, name
        assert result.pixels_deferred is deferred, name
        if not deferred:
            assert result.image.shape == (48, 64, 3), name
            assert result.phash is not None
    (image,) = decode_on_device([grey], [{"orientation": 1}], "cpu", 1024)
    assert image is not None
    np.testing.assert_array_equal(image.numpy(), decode_photo(grey, CFG).image)


def test_header_mode_udf_then_device_gives_the_pixel_mode_rows() -> None:
    rows = mixed_rows()
    pixel = DecodeUDF(CFG)(udf_batch(rows))
    header = DecodeUDF(HEADER)(udf_batch(rows))
    assert {"jpeg", "work_width", "work_height"} <= set(header)
    assert "jpeg" not in pixel
    ids = list(header["photo_id"])
    good, rotated = ids.index("good"), ids.index("rotated")
    assert isinstance(header["jpeg"][good], bytes)  # a plain JPEG: deferred
    assert header["image"][good].shape == (0, 0, 3)
    assert header["jpeg"][rotated] is None  # a PNG: decoded here, as in pixel mode
    np.testing.assert_array_equal(header["image"][rotated], pixel["image"][rotated])
    assert (header["work_height"][good], header["work_width"][good]) == (60, 80)
    images, out = finish_on_device(header, HEADER, "cpu")
    for key in ("status", "error_code", "error_stage", "width", "height", "orientation", "format"):
        assert list(out[key]) == list(pixel[key]), key
    for i, image in enumerate(images):
        if pixel["status"][i] == "ok":
            assert image is not None
            assert _mean_diff(image.numpy(), pixel["image"][i]) < 1.0
            assert phash_distance(out["phash"][i], pixel["phash"][i]) <= 2
        else:
            assert image is None


def test_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="metas"):
        decode_on_device([jpeg_bytes()], [], "cpu", 1024)
    assert decode_on_device([], [], "cpu", 1024) == []
    # A header that disagrees with what the decoder found (120x160) is left to the CPU path.
    data = jpeg_bytes()
    assert decode_on_device([data], [{"orientation": 1, "width": 160, "height": 120}], "cpu", 1024)[0] is not None
    assert decode_on_device([data], [{"orientation": 6, "width": 160, "height": 120}], "cpu", 1024) == [None]
    assert decode_on_device([data], [{"orientation": 1, "width": 320, "height": 240}], "cpu", 1024) == [None]
    assert DecodeConfig(pixels=False).pixels is False


# ---------------------------------------------------------------- CUDA


@pytest.mark.gpu
def test_cuda_decode_matches_the_cpu_decode() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    payloads = [_real(folder, name) for folder, name in REAL]
    metas = [_meta(decode_photo(p, HEADER)) for p in payloads]
    on_cpu = decode_on_device(payloads, metas, "cpu", CFG.working_size)
    on_gpu = decode_on_device(payloads, metas, "cuda", CFG.working_size)
    for (_, name), a, b in zip(REAL, on_cpu, on_gpu, strict=True):
        assert a is not None and b is not None, name
        assert b.device.type == "cuda"
        assert a.shape == b.shape, name
        # nvJPEG's IDCT and upsampling are not libjpeg-turbo's: close, not equal.
        assert _mean_diff(a.numpy(), b.cpu().numpy()) < 2.0, name


@pytest.mark.gpu
def test_cuda_bad_rows_fall_back_to_error_rows() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    # Only bytes that pass the header: a cut JPEG never gets here (nothing promises that nvJPEG
    # refuses a cut scan as libjpeg does, which is why the header check keeps those on the CPU).
    good = jpeg_bytes(1)
    batch = _header_batch([good, _bad_dht_jpeg(), good])
    images, out = finish_on_device(batch, HEADER, "cuda")
    assert images[0] is not None and images[0].device.type == "cuda"
    assert images[1] is None
    assert list(out["status"]) == ["ok", "error", "ok"]
    assert out["error_code"][1] == decode_photo(_bad_dht_jpeg(), CFG).error_code.value  # type: ignore[union-attr]
