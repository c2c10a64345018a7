"""Decode stage: bad and odd inputs become the right error rows, good ones the right pixels.

Every input is generated here (Pillow/numpy into tmp dirs) except the real photos under
../shared/data, which must all decode.
"""

from __future__ import annotations

import io
import itertools
import json
import struct
import subprocess
import sys
import threading
import time
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
from PIL import ExifTags, Image, ImageOps
from PIL.TiffImagePlugin import IFDRational

from photolens.schemas.errors import ErrorCode, Stage, Status
from photolens.udfs import decode as decode_mod
from photolens.udfs.decode import DecodeConfig, DecodeResult, DecodeUDF, decode_photo, phash_distance

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PHOTO_DIRS = (DATA / "photos", DATA / "faces" / "deepface")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}

CFG = DecodeConfig()
# Four flat quadrants: any flip or rotation moves a colour to another corner, and flat colours
# survive JPEG well enough to compare at the quadrant centres.
RED, GREEN, BLUE, YELLOW = (230, 20, 20), (20, 200, 40), (30, 40, 220), (240, 220, 30)


# ---------------------------------------------------------------- generators


def encode(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def quadrants(height: int, width: int) -> np.ndarray:
    arr = np.zeros((height, width, 3), dtype=np.uint8)
    h2, w2 = height // 2, width // 2
    arr[:h2, :w2] = RED
    arr[:h2, w2:] = GREEN
    arr[h2:, :w2] = BLUE
    arr[h2:, w2:] = YELLOW
    return arr


def noise(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height grey pixels, with a few rows of data only."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    packer = zlib.compressobj(9)
    rows = b"".join(packer.compress(b"\x00" * (width + 1)) for _ in range(4)) + packer.flush()
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", rows) + png_chunk(b"IEND", b"")


def bomb_gif(width: int = 65535, height: int = 65535) -> bytes:
    """GIF89a whose screen and frame claim width x height, followed by a 1-pixel LZW stream."""
    screen = b"GIF89a" + struct.pack("<HHBBB", width, height, 0, 0, 0)
    frame = b"," + struct.pack("<HHHHB", 0, 0, width, height, 0)
    return screen + frame + b"\x02\x02\x44\x01\x00;"


def jpeg_bytes(seed: int = 0) -> bytes:
    return encode(Image.fromarray(noise(120, 160, seed)), "JPEG", quality=90)


def corrupt(data: bytes, start: int, length: int, seed: int = 7) -> bytes:
    out = bytearray(data)
    out[start : start + length] = np.random.default_rng(seed).bytes(length)
    return bytes(out)


def png_with_bad_ihdr_crc() -> bytes:
    data = bytearray(encode(Image.fromarray(noise(40, 50)), "PNG"))
    data[29] ^= 0xFF  # last byte of IHDR's CRC (8 signature + 4 length + 4 type + 13 data)
    return bytes(data)


def png_with_broken_idat() -> bytes:
    data = bytearray(encode(Image.fromarray(noise(40, 50)), "PNG"))
    idat = data.find(b"IDAT")
    data[idat + 20] ^= 0xFF  # inside the zlib stream
    return bytes(data)


def png_cut_in_idat() -> bytes:
    data = encode(Image.fromarray(noise(200, 200)), "PNG")
    return data[: len(data) // 2]


def big_flat_png() -> bytes:
    # 64 Mpx of zeros: tens of KiB on disk, hundreds of ms to inflate and resample.
    return encode(Image.new("L", (8000, 8000)), "PNG")


def heic_like() -> bytes:
    return struct.pack(">I", 24) + b"ftypheic" + b"\x00\x00\x00\x00mif1heic" + bytes(64)


@dataclass(frozen=True)
class BadCase:
    name: str
    suffix: str
    make: Callable[[], bytes]
    code: ErrorCode
    cfg: DecodeConfig = CFG


BAD_CASES: tuple[BadCase, ...] = (
    BadCase("truncated_jpeg", ".jpg", lambda: jpeg_bytes()[: len(jpeg_bytes()) // 2], ErrorCode.TRUNCATED),
    BadCase("jpeg_cut_in_header", ".jpg", lambda: jpeg_bytes()[:300], ErrorCode.TRUNCATED),
    BadCase("png_cut_in_idat", ".png", png_cut_in_idat, ErrorCode.TRUNCATED),
    BadCase("zero_bytes", ".jpg", lambda: b"", ErrorCode.EMPTY_FILE),
    BadCase("text_named_jpg", ".jpg", lambda: b"this is a shopping list, not a photo\n" * 4, ErrorCode.UNREADABLE),
    BadCase("random_bytes", ".jpg", lambda: np.random.default_rng(3).bytes(5000), ErrorCode.UNREADABLE),
    BadCase("png_bomb_over_2x", ".png", lambda: bomb_png(20_000, 20_000), ErrorCode.DECOMPRESSION_BOMB),
    # 100 Mpx: between Pillow's limit (89.5 M) and twice it, where Pillow only warns.
    BadCase("png_bomb_warning_band", ".png", lambda: bomb_png(10_000, 10_000), ErrorCode.DECOMPRESSION_BOMB),
    BadCase("gif_bomb", ".gif", bomb_gif, ErrorCode.DECOMPRESSION_BOMB),
    BadCase(
        "over_config_max_pixels",
        ".png",
        lambda: encode(Image.fromarray(noise(300, 300)), "PNG"),
        ErrorCode.DECOMPRESSION_BOMB,
        DecodeConfig(max_pixels=50_000),
    ),
    BadCase("one_by_one", ".png", lambda: encode(Image.new("RGB", (1, 1)), "PNG"), ErrorCode.BAD_DIMENSIONS),
    BadCase("4000x10", ".png", lambda: encode(Image.new("RGB", (4000, 10)), "PNG"), ErrorCode.BAD_DIMENSIONS),
    BadCase("aspect_40_to_1", ".png", lambda: encode(Image.new("RGB", (2000, 50)), "PNG"), ErrorCode.BAD_DIMENSIONS),
    BadCase(
        "eps_named_jpg",
        ".jpg",
        lambda: encode(Image.fromarray(noise(40, 40)), "EPS"),
        ErrorCode.UNSUPPORTED_FORMAT,
    ),
    BadCase(
        "pdf_named_jpg",
        ".jpg",
        lambda: encode(Image.fromarray(noise(40, 40)), "PDF"),
        ErrorCode.UNSUPPORTED_FORMAT,
    ),
    BadCase(
        "pcx_not_allowed",
        ".jpg",
        lambda: encode(Image.fromarray(noise(40, 40)), "PCX"),
        ErrorCode.UNSUPPORTED_FORMAT,
    ),
    BadCase(
        "png_when_only_jpeg_allowed",
        ".png",
        lambda: encode(Image.fromarray(noise(40, 40)), "PNG"),
        ErrorCode.UNSUPPORTED_FORMAT,
        DecodeConfig(formats=frozenset({"JPEG"})),
    ),
    BadCase("heic_named_jpg", ".jpg", heic_like, ErrorCode.UNSUPPORTED_FORMAT),
    # Bytes 600.. hold the quantisation/Huffman tables: the header no longer parses.
    BadCase("jpeg_corrupt_header", ".jpg", lambda: corrupt(jpeg_bytes(), 600, 1000), ErrorCode.DECODE_FAILED),
    BadCase("png_bad_ihdr_crc", ".png", png_with_bad_ihdr_crc, ErrorCode.DECODE_FAILED),
    BadCase("png_broken_idat", ".png", png_with_broken_idat, ErrorCode.DECODE_FAILED),
    BadCase("over_max_bytes", ".jpg", jpeg_bytes, ErrorCode.TOO_LARGE_BYTES, DecodeConfig(max_bytes=1000)),
    BadCase("slow_decode", ".png", big_flat_png, ErrorCode.DECODE_TIMEOUT, DecodeConfig(time_limit_s=0.02)),
)


def write_and_read(tmp_path: Path, name: str, data: bytes) -> bytes:
    path = tmp_path / name
    path.write_bytes(data)
    return path.read_bytes()


def assert_error_row(result: DecodeResult, code: ErrorCode) -> None:
    assert result.status is Status.ERROR, result
    assert result.error_code is code, (result.error_code, result.error_detail)
    assert result.error_stage is Stage.DECODE
    assert result.error_detail
    assert len(result.error_detail) < 200
    assert result.image.shape == (0, 0, 3)
    assert result.image.dtype == np.uint8
    assert (result.width, result.height, result.phash) == (0, 0, None)


def assert_ok_row(result: DecodeResult, shape: tuple[int, int]) -> np.ndarray:
    assert result.status is Status.OK, (result.error_code, result.error_detail)
    assert result.error_code is None
    assert result.error_stage is None
    assert result.image.dtype == np.uint8
    assert result.image.shape == (*shape, 3)
    assert result.image.flags.c_contiguous
    assert result.phash is not None
    assert len(result.phash) == 16
    int(result.phash, 16)
    return result.image


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("case", BAD_CASES, ids=[case.name for case in BAD_CASES])
def test_bad_input_becomes_error_row(tmp_path: Path, case: BadCase) -> None:
    data = write_and_read(tmp_path, case.name + case.suffix, case.make())
    result = decode_photo(data, case.cfg)
    assert_error_row(result, case.code)


def test_bombs_are_small_on_disk_and_checked_before_decoding() -> None:
    limit = Image.MAX_IMAGE_PIXELS
    assert limit is not None
    assert limit < 10_000 * 10_000 < 2 * limit  # the warning band really is the warning band
    for data in (bomb_png(20_000, 20_000), bomb_png(10_000, 10_000), bomb_gif()):
        assert len(data) < 64 * 1024
        started = time.perf_counter()
        assert_error_row(decode_photo(data, CFG), ErrorCode.DECOMPRESSION_BOMB)
        # Refused from the header: inflating 100-400 Mpx would take seconds and gigabytes.
        assert time.perf_counter() - started < 1.0


def test_warning_band_leaves_no_global_state_behind() -> None:
    filters_before = list(warnings.filters)
    limit_before = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = decode_photo(bomb_png(10_000, 10_000), CFG)
    assert_error_row(result, ErrorCode.DECOMPRESSION_BOMB)
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert warnings.filters == filters_before
    assert limit_before == Image.MAX_IMAGE_PIXELS


def test_eps_is_never_rendered(tmp_path: Path) -> None:
    # EPS rendering would run Ghostscript on untrusted input; it must be refused from the header.
    data = write_and_read(tmp_path, "x.jpg", encode(Image.fromarray(noise(40, 40)), "EPS"))
    result = decode_photo(data, CFG)
    assert_error_row(result, ErrorCode.UNSUPPORTED_FORMAT)
    assert "EPS" in (result.error_detail or "")


def _decode_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "photolens-decode" and t.is_alive()]


def _wait_for_decode_threads(timeout_s: float) -> bool:
    end = time.monotonic() + timeout_s
    while _decode_threads():
        if time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True


def test_time_limit_bounds_a_real_slow_decode() -> None:
    data = big_flat_png()
    assert _wait_for_decode_threads(10.0)
    started = time.perf_counter()
    result = decode_photo(data, DecodeConfig(time_limit_s=0.05))
    waited = time.perf_counter() - started
    assert_error_row(result, ErrorCode.DECODE_TIMEOUT)
    # Unbounded, these bytes take ~0.6 s to decode here: the limit cut it short.
    assert waited < 0.05 + 0.5
    # The abandoned worker notices the deadline at its next read or step and ends.
    assert _wait_for_decode_threads(10.0)


def test_time_limit_is_a_hard_bound_even_inside_a_step(monkeypatch: pytest.MonkeyPatch) -> None:
    original = decode_mod._decode_opened
    release = threading.Event()

    def stuck(*args: object, **kwargs: object) -> DecodeResult:
        release.wait(5.0)  # a decoder that does not come back (fault hook)
        return original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(decode_mod, "_decode_opened", stuck)
    started = time.perf_counter()
    result = decode_photo(jpeg_bytes(), DecodeConfig(time_limit_s=0.1))
    waited = time.perf_counter() - started
    release.set()
    assert_error_row(result, ErrorCode.DECODE_TIMEOUT)
    assert "hard bound" in (result.error_detail or "")
    assert 0.1 <= waited < 1.0
    # Released late, the worker hits the deadline check in the real step and exits cleanly.
    assert _wait_for_decode_threads(10.0)


def test_bugs_are_not_swallowed(monkeypatch: pytest.MonkeyPatch) -> None:
    def buggy(img: Image.Image) -> Image.Image:
        raise ValueError("bug in our own conversion code")

    monkeypatch.setattr(decode_mod, "_to_rgb_or_l", buggy)
    for cfg in (CFG, DecodeConfig(time_limit_s=None)):
        with pytest.raises(ValueError, match="bug in our own"):
            decode_photo(jpeg_bytes(), cfg)


def test_wrong_argument_type_is_a_bug_not_bad_data() -> None:
    with pytest.raises(TypeError):
        decode_photo("not bytes", CFG)  # type: ignore[arg-type]


def test_config_is_validated_at_construction() -> None:
    with pytest.raises(ValueError, match="cannot open"):
        DecodeConfig(formats=frozenset({"JPEG", "HEIC"}))
    with pytest.raises(ValueError, match="MAX_IMAGE_PIXELS"):
        DecodeConfig(max_pixels=10**12)
    with pytest.raises(ValueError, match="time_limit_s"):
        DecodeConfig(time_limit_s=0)
    assert DecodeConfig(formats=frozenset({"jpeg"})).formats == frozenset({"JPEG"})


def _bad_corpus(root: Path) -> dict[str, str]:
    expected = {}
    for case in BAD_CASES:
        if case.cfg != CFG:
            continue
        (root / (case.name + case.suffix)).write_bytes(case.make())
        expected[case.name + case.suffix] = case.code.value
    return expected


def test_whole_bad_corpus_in_a_fresh_process(tmp_path: Path) -> None:
    """A crash inside a C decoder would kill the worker: run the corpus in its own process."""
    expected = _bad_corpus(tmp_path)
    script = (
        "import json, sys, pathlib\n"
        "from photolens.udfs.decode import DecodeConfig, decode_photo\n"
        "root = pathlib.Path(sys.argv[1]); cfg = DecodeConfig()\n"
        "print(json.dumps({p.name: decode_photo(p.read_bytes(), cfg).error_code for p in sorted(root.iterdir())}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == expected


# ---------------------------------------------------------------- odd but valid input


def test_cmyk_jpeg_becomes_rgb(tmp_path: Path) -> None:
    cmyk = Image.new("CMYK", (64, 48), (0, 255, 255, 0))  # pure red in CMYK
    data = write_and_read(tmp_path, "cmyk.jpg", encode(cmyk, "JPEG", quality=95))
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    image = assert_ok_row(decode_photo(data, CFG), (48, 64))
    assert np.abs(image.reshape(-1, 3).mean(axis=0) - (255, 0, 0)).max() < 8


def test_16bit_png_is_scaled_to_8bit(tmp_path: Path) -> None:
    ramp = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (32, 1))
    data = write_and_read(tmp_path, "deep.png", encode(Image.fromarray(ramp), "PNG"))
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")
    image = assert_ok_row(decode_photo(data, CFG), (32, 256))
    expected = np.rint(ramp[0] / 257.0).astype(np.uint8)
    assert np.array_equal(image[5, :, 0], expected)
    assert np.array_equal(image[..., 0], image[..., 2])
    assert (image.min(), image.max()) == (0, 255)


def test_palette_with_transparency_composites_on_white(tmp_path: Path) -> None:
    indices = np.zeros((40, 60), dtype=np.uint8)
    indices[:, 30:] = 1
    pal = Image.fromarray(indices, mode="L").convert("P")
    pal.putpalette([0, 0, 0, *BLUE] + [0, 0, 0] * 254)
    data = write_and_read(tmp_path, "pal.png", encode(pal, "PNG", transparency=0))
    assert Image.open(io.BytesIO(data)).mode == "P"
    image = assert_ok_row(decode_photo(data, CFG), (40, 60))
    assert np.all(image[:, :30] == 255)  # transparent index → white, not its black palette colour
    assert np.all(image[:, 30:] == BLUE)


def test_rgba_and_la_composite_on_white(tmp_path: Path) -> None:
    rgba = np.zeros((40, 60, 4), dtype=np.uint8)
    rgba[..., :3] = RED
    rgba[:, 20:40, 3] = 255
    rgba[:, 40:, 3] = 128
    data = write_and_read(tmp_path, "rgba.png", encode(Image.fromarray(rgba, mode="RGBA"), "PNG"))
    image = assert_ok_row(decode_photo(data, CFG), (40, 60))
    assert np.all(image[:, :20] == 255)
    assert np.all(image[:, 20:40] == RED)
    half = np.round(np.array(RED) * 128 / 255 + 255 * 127 / 255)
    assert np.abs(image[:, 40:].astype(int) - half).max() <= 1

    la = np.zeros((40, 60, 2), dtype=np.uint8)
    la[..., 0] = 50
    la[:, 30:, 1] = 255
    data = write_and_read(tmp_path, "la.png", encode(Image.fromarray(la, mode="LA"), "PNG"))
    image = assert_ok_row(decode_photo(data, CFG), (40, 60))
    assert np.all(image[:, :30] == 255)
    assert np.all(image[:, 30:] == 50)


def test_grey_and_one_bit(tmp_path: Path) -> None:
    grey = np.tile(np.arange(0, 250, 5, dtype=np.uint8), (20, 1))
    data = write_and_read(tmp_path, "grey.png", encode(Image.fromarray(grey), "PNG"))
    image = assert_ok_row(decode_photo(data, CFG), grey.shape)
    for channel in range(3):
        assert np.array_equal(image[..., channel], grey)

    bits = np.zeros((32, 48), dtype=bool)
    bits[:, ::2] = True
    data = write_and_read(tmp_path, "bits.png", encode(Image.fromarray(bits), "PNG"))
    assert Image.open(io.BytesIO(data)).mode == "1"
    image = assert_ok_row(decode_photo(data, CFG), bits.shape)
    assert np.array_equal(image[..., 0], np.where(bits, 255, 0).astype(np.uint8))


def test_animated_gif_takes_the_first_frame(tmp_path: Path) -> None:
    colours = [RED, GREEN, BLUE, YELLOW, (255, 255, 255)]
    frames = [Image.new("RGB", (64, 48), colour) for colour in colours]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    result = decode_photo(write_and_read(tmp_path, "anim.gif", buf.getvalue()), CFG)
    image = assert_ok_row(result, (48, 64))
    assert result.n_frames == 5
    assert result.format == "GIF"
    assert np.abs(image.astype(int) - RED).max() <= 8  # GIF palette quantisation


def test_mpo_decodes_its_first_frame(tmp_path: Path) -> None:
    first = Image.fromarray(quadrants(48, 64))
    buf = io.BytesIO()
    first.save(buf, "MPO", save_all=True, append_images=[first.transpose(Image.Transpose.FLIP_LEFT_RIGHT)])
    result = decode_photo(write_and_read(tmp_path, "stereo.jpg", buf.getvalue()), CFG)
    image = assert_ok_row(result, (48, 64))
    assert (result.format, result.n_frames) == ("MPO", 2)
    assert np.abs(image[12, 16].astype(int) - RED).max() < 20


@pytest.mark.parametrize(("fmt", "kwargs"), [("TIFF", {}), ("WEBP", {"lossless": True}), ("BMP", {})])
def test_other_allowed_formats(tmp_path: Path, fmt: str, kwargs: dict[str, object]) -> None:
    source = noise(50, 70, seed=11)
    data = write_and_read(tmp_path, f"x.{fmt.lower()}", encode(Image.fromarray(source), fmt, **kwargs))
    result = decode_photo(data, CFG)
    image = assert_ok_row(result, (50, 70))
    assert result.format == fmt
    assert np.array_equal(image, source)


def test_corrupt_entropy_data_still_yields_pixels(tmp_path: Path) -> None:
    # libjpeg resynchronises over damaged scan data (grey blocks, not an exception): that is a photo.
    data = jpeg_bytes()
    damaged = write_and_read(tmp_path, "damaged.jpg", corrupt(data, len(data) // 2, 200))
    assert_ok_row(decode_photo(damaged, CFG), (120, 160))


def test_aspect_at_the_limit_and_a_big_jpeg_downscaled(tmp_path: Path) -> None:
    strip = encode(Image.new("RGB", (800, 40), GREEN), "PNG")
    assert_ok_row(decode_photo(strip, CFG), (40, 800))

    big = Image.fromarray(quadrants(2000, 3000))
    result = decode_photo(write_and_read(tmp_path, "big.jpg", encode(big, "JPEG", quality=92)), CFG)
    image = assert_ok_row(result, (683, 1024))
    assert (result.width, result.height) == (3000, 2000)
    for (row, col), colour in zip(itertools.product((170, 510), (256, 768)), (RED, GREEN, BLUE, YELLOW), strict=True):
        assert np.abs(image[row, col].astype(int) - colour).max() < 12


# ---------------------------------------------------------------- EXIF


def exif_with(orientation: int | None = None) -> Image.Exif:
    exif = Image.Exif()
    if orientation is not None:
        exif[ExifTags.Base.Orientation] = orientation
    return exif


# What each orientation value means, in numpy terms (independent of Pillow's table).
NUMPY_ORIENT: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1, :],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, k=-1),
    7: lambda a: np.rot90(a, k=2).transpose(1, 0, 2),
    8: lambda a: np.rot90(a, k=1),
}


def oriented_bytes(arr: np.ndarray, fmt: str, orientation: int) -> bytes:
    img = Image.fromarray(arr)
    if fmt == "TIFF":
        return encode(img, fmt, tiffinfo={ExifTags.Base.Orientation: orientation})
    extra: dict[str, object] = {"quality": 95} if fmt == "JPEG" else {"lossless": True} if fmt == "WEBP" else {}
    return encode(img, fmt, exif=exif_with(orientation), **extra)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "TIFF"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(tmp_path: Path, fmt: str, orientation: int) -> None:
    stored = quadrants(40, 64)
    stored[:8, :8] = (0, 0, 0)  # a mark in one corner, on top of four distinct quadrant colours
    data = write_and_read(tmp_path, f"o{orientation}.{fmt.lower()}", oriented_bytes(stored, fmt, orientation))
    expected = NUMPY_ORIENT[orientation](stored)
    result = decode_photo(data, CFG)
    image = assert_ok_row(result, expected.shape[:2])
    assert result.orientation == orientation
    assert (result.height, result.width) == expected.shape[:2]
    if fmt == "JPEG":
        # Lossy: close on average (any wrong flip or turn moves whole quadrants: errors near 150).
        assert np.abs(image.astype(int) - expected).mean() < 6
    else:
        assert np.array_equal(image, expected)
    # Same semantics as ImageOps.exif_transpose.
    reference = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    assert np.array_equal(image, reference)


def test_exif_orientation_on_a_downscaled_jpeg(tmp_path: Path) -> None:
    stored = quadrants(1000, 2400)
    data = write_and_read(tmp_path, "wide6.jpg", oriented_bytes(stored, "JPEG", 6))
    result = decode_photo(data, CFG)
    image = assert_ok_row(result, (1024, 427))
    assert (result.width, result.height, result.orientation) == (1000, 2400, 6)
    # Rotated 90° clockwise: the stored top-left (red) is now top-right.
    assert np.abs(image[100, 350].astype(int) - RED).max() < 12
    assert np.abs(image[100, 80].astype(int) - BLUE).max() < 12


def test_invalid_orientation_is_ignored(tmp_path: Path) -> None:
    stored = quadrants(40, 64)
    for bogus in (0, 9, 300):
        data = encode(Image.fromarray(stored), "PNG", exif=exif_with(bogus))
        result = decode_photo(data, CFG)
        assert np.array_equal(assert_ok_row(result, (40, 64)), stored)
        assert result.orientation == 1


def gps_exif(
    lat: tuple[float, float, float], lat_ref: str, lon: tuple[float, float, float], lon_ref: str
) -> Image.Exif:
    exif = exif_with(1)
    exif_ifd = exif.get_ifd(ExifTags.IFD.Exif)
    exif_ifd[ExifTags.Base.DateTimeOriginal] = "2021:07:04 12:34:56"
    exif_ifd[ExifTags.Base.OffsetTimeOriginal] = "+02:00"
    gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    gps[ExifTags.GPS.GPSLatitudeRef] = lat_ref
    gps[ExifTags.GPS.GPSLatitude] = tuple(IFDRational(v) for v in lat)
    gps[ExifTags.GPS.GPSLongitudeRef] = lon_ref
    gps[ExifTags.GPS.GPSLongitude] = tuple(IFDRational(v) for v in lon)
    return exif


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_exif_time_and_gps(tmp_path: Path, fmt: str) -> None:
    # Sydney Opera House (south, east) and the Statue of Liberty (north, west).
    for lat, lat_ref, lon, lon_ref, want in (
        ((33, 51, 24.2), "S", (151, 12, 54.6), "E", (-33.856722, 151.215167)),
        ((40, 41, 21.4), "N", (74, 2, 40.2), "W", (40.689278, -74.044500)),
    ):
        exif = gps_exif(lat, lat_ref, lon, lon_ref)
        data = write_and_read(tmp_path, f"gps.{fmt.lower()}", encode(Image.fromarray(noise(32, 32)), fmt, exif=exif))
        result = decode_photo(data, CFG)
        assert_ok_row(result, (32, 32))
        assert result.taken_at == "2021-07-04T12:34:56+02:00"
        assert result.gps_lat == pytest.approx(want[0], abs=1e-5)
        assert result.gps_lon == pytest.approx(want[1], abs=1e-5)


def test_missing_or_bogus_exif_gives_none(tmp_path: Path) -> None:
    plain = decode_photo(jpeg_bytes(), CFG)
    assert (plain.taken_at, plain.gps_lat, plain.gps_lon, plain.orientation) == (None, None, None, 1)

    exif = exif_with(1)
    exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.DateTimeOriginal] = "0000:00:00 00:00:00"
    gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    gps[ExifTags.GPS.GPSLatitudeRef] = "N"
    gps[ExifTags.GPS.GPSLatitude] = (IFDRational(123), IFDRational(0), IFDRational(0))  # > 90°
    gps[ExifTags.GPS.GPSLongitudeRef] = "E"
    gps[ExifTags.GPS.GPSLongitude] = (IFDRational(10), IFDRational(0), IFDRational(0))
    data = write_and_read(tmp_path, "bogus.jpg", encode(Image.fromarray(noise(32, 32)), "JPEG", exif=exif))
    result = decode_photo(data, CFG)
    assert_ok_row(result, (32, 32))
    assert (result.taken_at, result.gps_lat, result.gps_lon) == (None, None, None)


# ---------------------------------------------------------------- real photos


def real_photos() -> list[Path]:
    if not all(folder.is_dir() for folder in PHOTO_DIRS):
        pytest.skip(f"real photos not found under {DATA} (see shared/data/README.md)")
    return sorted(p for folder in PHOTO_DIRS for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


@pytest.fixture(scope="module")
def decoded_real() -> dict[Path, DecodeResult]:
    return {path: decode_photo(path.read_bytes(), CFG) for path in real_photos()}


def test_every_real_photo_decodes(decoded_real: dict[Path, DecodeResult]) -> None:
    assert len(decoded_real) >= 90
    for path, result in decoded_real.items():
        with Image.open(path) as img:
            truth = ImageOps.exif_transpose(img)
            width, height = truth.size
        scale = min(1.0, CFG.working_size / max(width, height))
        shape = (max(1, round(height * scale)), max(1, round(width * scale)))
        assert_ok_row(result, shape)
        assert (result.width, result.height) == (width, height), path.name
        assert max(result.image.shape[:2]) <= CFG.working_size
        assert result.error_detail is None


def test_phash_survives_reencoding_and_separates_photos(decoded_real: dict[Path, DecodeResult]) -> None:
    reencoded = {}
    for path, result in decoded_real.items():
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img).convert("RGB")
            smaller = img.resize((round(img.width * 0.9), round(img.height * 0.9)), Image.Resampling.BILINEAR)
        copy = decode_photo(encode(smaller, "JPEG", quality=70), CFG)
        assert copy.phash is not None
        assert result.phash is not None
        reencoded[path] = phash_distance(result.phash, copy.phash)
    assert max(reencoded.values()) <= 6, sorted(reencoded.items(), key=lambda kv: -kv[1])[:3]

    names = {path.name: result.phash for path, result in decoded_real.items()}
    pairs = {
        (a, b): phash_distance(ha or "", hb or "") for (a, ha), (b, hb) in itertools.combinations(names.items(), 2)
    }
    distances = np.array(list(pairs.values()))
    assert np.median(distances) >= 24
    # Two frames of the same basketball clip are the one true near-duplicate in the set.
    assert pairs[("basketball1.png", "basketball2.png")] <= 6
    far = distances > max(reencoded.values()) + 6
    assert far.mean() > 0.995


def test_phash_changes_under_a_mirror() -> None:
    arr = noise(64, 64, seed=5)
    arr[:, :32] //= 3
    a = decode_photo(encode(Image.fromarray(arr), "PNG"), CFG).phash
    b = decode_photo(encode(Image.fromarray(arr[:, ::-1].copy()), "PNG"), CFG).phash
    assert a is not None
    assert b is not None
    assert phash_distance(a, b) >= 16


# ---------------------------------------------------------------- the UDF


def udf_batch(rows: list[dict[str, object]]) -> dict[str, np.ndarray]:
    batch: dict[str, np.ndarray] = {}
    for key in rows[0]:
        column = np.empty(len(rows), dtype=object)
        column[:] = [row[key] for row in rows]
        batch[key] = column
    return batch


def mixed_rows() -> list[dict[str, object]]:
    good = encode(Image.fromarray(quadrants(60, 80)), "JPEG", quality=95)
    rotated = oriented_bytes(quadrants(40, 64), "PNG", 6)

    def row(pid: str, data: bytes | None, status: str = "ok", code: str | None = None) -> dict[str, object]:
        stage = "fetch" if code else None
        detail = f"{code} from the store" if code else None
        return {
            "photo_id": pid,
            "uri": f"file:///{pid}",
            "data": data,
            "status": status,
            "error_code": code,
            "error_stage": stage,
            "error_detail": detail,
        }

    return [
        row("good", good),
        row("rotated", rotated),
        row("junk", b"not an image at all"),
        row("gone", None, "error", ErrorCode.FETCH_NOT_FOUND.value),
        row("denied", None, "error", ErrorCode.FETCH_DENIED.value),
        row("skipped", None, "skipped"),
        row("empty", b""),
        row("bomb", bomb_png(20_000, 20_000)),
        row("null_bytes", None),
    ]


EXPECTED_STATUS: dict[str, tuple[str, str | None, str | None]] = {
    "good": ("ok", None, None),
    "rotated": ("ok", None, None),
    "junk": ("error", ErrorCode.UNREADABLE.value, Stage.DECODE.value),
    "gone": ("error", ErrorCode.FETCH_NOT_FOUND.value, Stage.FETCH.value),
    "denied": ("error", ErrorCode.FETCH_DENIED.value, Stage.FETCH.value),
    "skipped": ("skipped", None, None),
    "empty": ("error", ErrorCode.EMPTY_FILE.value, Stage.DECODE.value),
    "bomb": ("error", ErrorCode.DECOMPRESSION_BOMB.value, Stage.DECODE.value),
    "null_bytes": ("error", ErrorCode.EMPTY_FILE.value, Stage.DECODE.value),
}


def check_udf_rows(rows: Iterator[dict[str, object]]) -> None:
    seen = set()
    for row in rows:
        pid = str(row["photo_id"])
        seen.add(pid)
        assert "data" not in row
        assert row["uri"] == f"file:///{pid}"
        assert (row["status"], row["error_code"], row["error_stage"]) == EXPECTED_STATUS[pid], pid
        image = np.asarray(row["image"])
        if row["status"] == "ok":
            assert row["error_detail"] is None
            assert image.dtype == np.uint8
            assert int(row["width"]) == image.shape[1]  # type: ignore[call-overload]
            assert int(row["height"]) == image.shape[0]  # type: ignore[call-overload]
            assert isinstance(row["phash"], str)
            assert row["format"] in {"JPEG", "PNG"}
            assert int(row["n_frames"]) == 1  # type: ignore[call-overload]
            assert np.isnan(row["gps_lat"])  # type: ignore[arg-type]
        else:
            assert image.shape == (0, 0, 3)
            assert (row["width"], row["height"], row["phash"], row["format"]) == (0, 0, None, None)
            if row["status"] == "error" and row["error_stage"] == "fetch":
                assert row["error_detail"] == f"{row['error_code']} from the store"  # passed through
    assert seen == set(EXPECTED_STATUS)


def test_udf_without_ray() -> None:
    rows = mixed_rows()
    out = DecodeUDF(CFG)(udf_batch(rows))
    assert out["width"].dtype == np.int32
    assert out["height"].dtype == np.int32
    assert out["orientation"].dtype == np.int8
    assert out["gps_lat"].dtype == np.float64
    assert out["n_frames"].dtype == np.int16
    assert out["decode_seconds"].dtype == np.float32
    assert out["image"].dtype == object
    keys = list(out)
    check_udf_rows({key: out[key][i] for key in keys} for i in range(len(rows)))
    rotated = out["image"][1]
    assert rotated.shape == (64, 40, 3)
    assert out["orientation"][1] == 6


def test_udf_reads_null_columns_the_way_ray_hands_them_over() -> None:
    # An all-null Arrow column reaches a numpy batch as float32 NaNs, not as None.
    good = jpeg_bytes()
    batch = {
        "photo_id": np.array(["a", "b"], dtype=object),
        "data": np.array([good, b"junk"], dtype=object),
        "status": np.array(["ok", "ok"], dtype=object),
        "error_code": np.full(2, np.nan, dtype=np.float32),
        "error_stage": np.full(2, np.nan, dtype=np.float32),
        "error_detail": np.full(2, np.nan, dtype=np.float32),
    }
    out = DecodeUDF(CFG)(batch)
    assert list(out["status"]) == ["ok", "error"]
    assert list(out["error_code"]) == [None, ErrorCode.UNREADABLE.value]
    assert list(out["error_stage"]) == [None, Stage.DECODE.value]
    assert out["error_detail"][0] is None

    all_null_data = {"photo_id": np.array(["c"], dtype=object), "data": np.full(1, np.nan, dtype=np.float32)}
    out = DecodeUDF(CFG)(all_null_data)
    assert (out["status"][0], out["error_code"][0]) == ("error", ErrorCode.EMPTY_FILE.value)


def test_udf_in_a_ray_pipeline(ray_local: None) -> None:
    """Through a real local Ray (the session's ``ray_local`` fixture from conftest.py)."""
    import ray

    rows = mixed_rows()
    ds = ray.data.from_items(rows).map_batches(
        DecodeUDF,
        fn_constructor_kwargs={"config": replace(CFG, time_limit_s=5.0)},
        compute=ray.data.ActorPoolStrategy(size=1),
        batch_size=4,
    )
    out = ds.take_all()
    assert len(out) == len(rows)
    check_udf_rows(iter(out))
    by_id = {row["photo_id"]: row for row in out}
    assert np.asarray(by_id["rotated"]["image"]).shape == (64, 40, 3)
    assert np.asarray(by_id["good"]["image"]).shape == (60, 80, 3)
