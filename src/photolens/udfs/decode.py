"""Decode stage: photo bytes → one bounded, EXIF-oriented RGB working image per row, or an error row.

Decoding is its own stage because it is where untrusted bytes meet C decoders: every later stage (and
every GPU actor) must only ever see valid pixels, and one bad file must never fail a batch. The pure
function :func:`decode_photo` never raises for bad data; it returns a :class:`DecodeResult` with a
closed :class:`~photolens.schemas.errors.ErrorCode`. Exceptions that are not bad data (bugs in our
code, bad configuration) still propagate: only the exception types Pillow raises for malformed input
are caught, and the ones that could equally be our own bugs (``IndexError``, ``KeyError``, ``TypeError``
...) only when they were raised inside Pillow's own code.

Time bound per photo (``DecodeConfig.time_limit_s``), two layers:

1. Hard bound for the caller: the decode runs in a fresh daemon thread and the caller waits at most
   ``time_limit_s``; past it the row is ``DECODE_TIMEOUT``. Pillow's decoders and resamplers release
   the GIL, so the caller does wake up on time; a C call that held the GIL would delay it.
2. Cooperative stop for the abandoned thread: it reads the bytes through a file object that raises
   once the deadline has passed (Pillow feeds decoders in 64 KiB reads, GIF frame walks read block by
   block), and checks the deadline between steps. A timed-out thread therefore stops at its next read
   or step. What runs inside one call finishes first: decoders that take the whole buffer at once
   (WebP, libtiff), or one 64 KiB read of a highly compressible PNG (measured: a 64 Mpx all-black PNG
   of 62 KB ran on ~0.4 s past its deadline); such a call is bounded by ``max_pixels``. No process is
   killed, and the caller does not wait for it.

Orientation follows ``ImageOps.exif_transpose`` (same table), applied to the small working image;
``width``/``height`` are the full-size dimensions after orientation. The EXIF is read after the pixels
(a pixel failure must never hide inside a tolerated EXIF failure), except TIFF's orientation, which
Pillow's TIFF loader applies itself and then removes.

``time_limit_s=None`` decodes inline with no bound (for callers that bound time themselves).

Header mode (``DecodeConfig.pixels=False``) is for pipelines that decode JPEGs on a GPU
(:mod:`photolens.udfs.gpudecode`): a plain baseline/progressive JPEG in RGB or grey is checked as far
as it can be without its pixels (size, allowlist, dimensions and bomb limits, EXIF) and handed on as
its validated bytes plus the working size, with ``pixels_deferred`` set. Anything else, and any JPEG
whose structure looks off (no end-of-image marker after its scan: truncated; CMYK; Adobe RGB without
colour transform; MPO), is decoded here as in pixel mode. The device decode can still fail on bytes
that passed the header (a broken Huffman table); the caller then runs :func:`decode_photo` with
``pixels=True`` on that row, which turns it into the same error row as ever.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math
import re
import struct
import threading
import time
import warnings
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import numpy as np
import scipy.fft
from PIL import ExifTags, Image, UnidentifiedImageError

from photolens.schemas.errors import ErrorCode, Stage, Status
from photolens.udfs.columns import text_column

__all__ = [
    "DEFAULT_FORMATS",
    "DEVICE_FORMATS",
    "DecodeConfig",
    "DecodeResult",
    "DecodeUDF",
    "decode_photo",
    "perceptual_hash",
    "phash_distance",
    "working_shape",
]

# Pillow format names (``Image.format``). MPO is what Pillow calls a JPEG carrying extra frames
# (phones write them for depth maps and stereo pairs); its first frame is a plain JPEG.
DEFAULT_FORMATS: Final[frozenset[str]] = frozenset({"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO"})

# Formats that decode through the JPEG plugin and so accept ``draft`` (DCT-domain downscaling).
_JPEG_FAMILY: Final[frozenset[str]] = frozenset({"JPEG", "MPO"})
# What header mode hands to a device decoder. Not MPO: a device decoder's view of a file with
# several images is not specified, so those stay with libjpeg through Pillow.
DEVICE_FORMATS: Final[frozenset[str]] = frozenset({"JPEG"})
# Pillow modes of JPEGs whose colours nvJPEG / libjpeg-turbo's RGB output and Pillow agree on.
_DEVICE_MODES: Final[frozenset[str]] = frozenset({"RGB", "L"})

_ERROR_DETAIL_MAX: Final[int] = 199
_EMPTY_IMAGE: Final[np.ndarray] = np.zeros((0, 0, 3), dtype=np.uint8)
_EMPTY_IMAGE.setflags(write=False)

# ImageOps.exif_transpose's table: orientation tag value → the transpose that undoes it.
_TRANSPOSE: Final[dict[int, Image.Transpose]] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

# Signatures of formats Pillow cannot (or must not) decode here, so that a PDF or an iPhone HEIC
# renamed to .jpg reads as UNSUPPORTED_FORMAT rather than UNREADABLE.
_FOREIGN_SIGNATURES: Final[tuple[tuple[int, bytes, str], ...]] = (
    (0, b"%PDF", "PDF"),
    (0, b"%!PS", "PostScript/EPS"),
    (0, b"\xc5\xd0\xd3\xc6", "EPS"),
    (0, b"8BPS", "PSD"),
    (0, b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
    (0, b"\xff\x4f\xff\x51", "JPEG 2000"),
    (0, b"\xff\x0a", "JPEG XL"),
    (0, b"\x00\x00\x00\x0cJXL ", "JPEG XL"),
    (0, b"PK\x03\x04", "ZIP"),
    (0, b"<svg", "SVG"),
    (0, b"<?xml", "XML/SVG"),
    (4, b"ftypheic", "HEIC"),
    (4, b"ftypheix", "HEIC"),
    (4, b"ftyphevc", "HEIC"),
    (4, b"ftypmif1", "HEIF"),
    (4, b"ftypmsf1", "HEIF"),
    (4, b"ftypavif", "AVIF"),
    (4, b"ftypqt  ", "QuickTime video"),
    (4, b"ftypisom", "MP4 video"),
    (4, b"ftypmp42", "MP4 video"),
)

_EXIF_DATETIME = re.compile(r"^\s*(\d{4}):(\d{2}):(\d{2})[ T](\d{2}):(\d{2}):(\d{2})")
_EXIF_OFFSET = re.compile(r"^[+-]\d{2}:\d{2}$")
_TAG_ORIENTATION: Final[int] = ExifTags.Base.Orientation
_TAG_DATETIME_ORIGINAL: Final[int] = ExifTags.Base.DateTimeOriginal
_TAG_OFFSET_TIME_ORIGINAL: Final[int] = ExifTags.Base.OffsetTimeOriginal


@dataclass(frozen=True)
class DecodeConfig:
    """Limits and output size of the decode stage.

    ``max_pixels`` is checked on the header's dimensions before any pixel is decoded. Pillow's own
    process-wide limit (``Image.MAX_IMAGE_PIXELS``, same default) stays in force and its warning
    between 1x and 2x of that limit is turned into an error per call, so ``max_pixels`` may only
    lower it. ``working_size`` is the longest side of the image handed to model stages; JPEGs are
    decoded straight at a reduced DCT scale when they are at least twice that size.

    ``pixels=False`` is header mode (see the module docstring): plain JPEGs come back validated but
    undecoded, for a device decoder; every other row is decoded as usual.
    """

    formats: frozenset[str] = DEFAULT_FORMATS
    max_bytes: int = 50 * 1024 * 1024
    max_pixels: int = 89_478_485
    working_size: int = 1024
    min_side: int = 16
    max_aspect: float = 20.0
    time_limit_s: float | None = 10.0
    pixels: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "formats", frozenset(f.upper() for f in self.formats))
        if not self.formats:
            raise ValueError("DecodeConfig.formats must name at least one format")
        Image.init()
        unknown = sorted(f for f in self.formats if f not in Image.OPEN and f != "MPO")
        if unknown:
            # Caught here: an unknown name would otherwise fail inside Pillow, on every row.
            raise ValueError(f"DecodeConfig.formats has formats Pillow cannot open: {unknown}")
        if self.max_bytes <= 0 or self.max_pixels <= 0:
            raise ValueError("DecodeConfig.max_bytes and max_pixels must be positive")
        pillow_limit = Image.MAX_IMAGE_PIXELS
        if pillow_limit is not None and self.max_pixels > pillow_limit:
            raise ValueError(
                f"DecodeConfig.max_pixels={self.max_pixels} exceeds Pillow's MAX_IMAGE_PIXELS="
                f"{pillow_limit}; images above that are rejected as decompression bombs anyway"
            )
        if self.working_size < 32:
            raise ValueError("DecodeConfig.working_size must be at least 32 (the pHash grid)")
        if self.min_side < 1 or self.max_aspect < 1:
            raise ValueError("DecodeConfig.min_side must be >= 1 and max_aspect >= 1")
        if self.time_limit_s is not None and not self.time_limit_s > 0:
            raise ValueError("DecodeConfig.time_limit_s must be positive or None")


@dataclass(frozen=True)
class DecodeResult:
    """One photo's decode outcome. ``image`` is the empty (0, 0, 3) array on error."""

    status: Status
    image: np.ndarray
    width: int = 0
    height: int = 0
    orientation: int = 0
    format: str | None = None
    taken_at: str | None = None
    gps_lat: float | None = None
    gps_lon: float | None = None
    phash: str | None = None
    n_frames: int = 0
    # Header mode: the bytes passed every header check and still need decoding (``image`` is empty,
    # ``phash`` is None); work_width/work_height are the oriented working size they decode to.
    pixels_deferred: bool = False
    work_width: int = 0
    work_height: int = 0
    error_code: ErrorCode | None = None
    error_stage: Stage | None = None
    error_detail: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status is Status.OK


class _DeadlineExceededError(Exception):
    """Raised inside the decode thread once the per-photo time limit has passed."""


class _BadDataError(Exception):
    """A decision of our own checks (limits, allowlist) that the row is an error."""

    def __init__(self, code: ErrorCode, detail: str) -> None:
        super().__init__(detail)
        self.code = code


class _DeadlineReader(io.BytesIO):
    """In-memory file whose reads fail after the deadline: Pillow pulls compressed data through
    ``read`` in bounded chunks, so this is where a long decode can be stopped from inside."""

    def __init__(self, data: bytes, deadline: float | None) -> None:
        super().__init__(data)
        self._deadline = deadline
        # Set when a reader asked for more than was left: the evidence that a failure is truncation,
        # whatever words the plugin used for it.
        self.ran_out = False

    def read(self, size: int | None = -1, /) -> bytes:
        _check_deadline(self._deadline)
        out = super().read(size)
        if size is not None and 0 <= len(out) < size:
            self.ran_out = True
        return out


def _check_deadline(deadline: float | None) -> None:
    if deadline is not None and time.monotonic() > deadline:
        raise _DeadlineExceededError("time limit exceeded")


# Exception types Pillow raises for malformed input. UnidentifiedImageError is an OSError.
_PILLOW_BAD_DATA: Final[tuple[type[BaseException], ...]] = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    Image.DecompressionBombError,
    Image.DecompressionBombWarning,
)
# Types that malformed input also provokes deep inside Pillow's plugins, but that are just as likely
# to be a bug of ours: accepted as bad data only when the innermost frame is Pillow's code.
_PILLOW_INTERNAL_FAILURES: Final[tuple[type[BaseException], ...]] = (
    IndexError,
    KeyError,
    TypeError,
    AttributeError,
    ZeroDivisionError,
    OverflowError,
)


def _raised_inside_pillow(exc: BaseException) -> bool:
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    module = tb.tb_frame.f_globals.get("__name__", "")
    return isinstance(module, str) and (module == "PIL" or module.startswith("PIL."))


def _is_bad_data(exc: BaseException) -> bool:
    if isinstance(exc, UnidentifiedImageError | Image.DecompressionBombError | Image.DecompressionBombWarning):
        return True
    # Everything else must come from Pillow: the same ValueError raised by our own numpy code is a bug.
    return _raised_inside_pillow(exc)


def _classify(exc: BaseException, reader: _DeadlineReader) -> ErrorCode:
    if isinstance(exc, Image.DecompressionBombError | Image.DecompressionBombWarning):
        return ErrorCode.DECOMPRESSION_BOMB
    message = str(exc).lower()
    if isinstance(exc, ValueError) and "too large" in message:
        # PNG text/ICC chunks that inflate past Pillow's MAX_TEXT_CHUNK.
        return ErrorCode.DECOMPRESSION_BOMB
    if isinstance(exc, EOFError | struct.error) or "truncated" in message or reader.ran_out:
        return ErrorCode.TRUNCATED
    return ErrorCode.DECODE_FAILED


def _detail(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _ERROR_DETAIL_MAX else text[: _ERROR_DETAIL_MAX - 1] + "…"


def _error(code: ErrorCode, detail: str, seconds: float = 0.0) -> DecodeResult:
    return DecodeResult(
        status=Status.ERROR,
        image=_EMPTY_IMAGE,
        error_code=code,
        error_stage=Stage.DECODE,
        error_detail=_detail(detail),
        seconds=seconds,
    )


def decode_photo(data: bytes | bytearray | memoryview, cfg: DecodeConfig) -> DecodeResult:
    """Decode one photo into an RGB uint8 working image; never raises for bad data.

    Raises only for what is not bad data: a ``data`` of the wrong type, or a bug (re-raised from the
    decode thread with its traceback).
    """
    started = time.perf_counter()
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"decode_photo expects bytes, got {type(data).__name__}")
    size = len(data) if not isinstance(data, memoryview) else data.nbytes
    if size == 0:
        return _error(ErrorCode.EMPTY_FILE, "zero bytes")
    if size > cfg.max_bytes:
        return _error(ErrorCode.TOO_LARGE_BYTES, f"{size} bytes > max_bytes {cfg.max_bytes}")

    if cfg.time_limit_s is None:
        result = _decode_guarded(bytes(data), cfg, None)
        return _with_seconds(result, time.perf_counter() - started)

    deadline = time.monotonic() + cfg.time_limit_s
    box: list[DecodeResult | BaseException] = []

    def work() -> None:
        try:
            box.append(_decode_guarded(bytes(data), cfg, deadline))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller, which re-raises it
            box.append(exc)

    worker = threading.Thread(target=work, name="photolens-decode", daemon=True)
    worker.start()
    worker.join(cfg.time_limit_s)
    elapsed = time.perf_counter() - started
    if not box:
        # The thread keeps running until its next read or step notices the deadline, then exits.
        return _error(ErrorCode.DECODE_TIMEOUT, f"decode exceeded {cfg.time_limit_s:g} s (hard bound)", elapsed)
    outcome = box[0]
    if isinstance(outcome, BaseException):
        raise outcome
    return _with_seconds(outcome, elapsed)


def _with_seconds(result: DecodeResult, seconds: float) -> DecodeResult:
    return dataclasses.replace(result, seconds=seconds)


def _decode_guarded(data: bytes, cfg: DecodeConfig, deadline: float | None) -> DecodeResult:
    reader = _DeadlineReader(data, deadline)
    try:
        return _decode(reader, cfg, deadline)
    except _DeadlineExceededError:
        return _error(ErrorCode.DECODE_TIMEOUT, f"decode exceeded {cfg.time_limit_s:g} s (stopped)")
    except _BadDataError as exc:
        return _error(exc.code, str(exc))
    except UnidentifiedImageError:
        return _unidentified(data, cfg)
    except (*_PILLOW_BAD_DATA, *_PILLOW_INTERNAL_FAILURES) as exc:
        if not _is_bad_data(exc):
            raise
        return _error(_classify(exc, reader), f"{type(exc).__name__}: {exc}")


def _unidentified(data: bytes, cfg: DecodeConfig) -> DecodeResult:
    """No allowed format opened the bytes: say why as precisely as the bytes allow."""
    # An allowed format's signature whose header then failed: Image.open hides the plugin's own
    # exception (it moves on to the next format), so run that opener again and keep it.
    prefix = data[:16]
    for name in _opener_formats(cfg.formats):
        factory, accept = Image.OPEN[name]
        if accept is None or not accept(prefix):
            continue
        reader = _DeadlineReader(data, None)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                factory(reader, "").close()
        except (*_PILLOW_BAD_DATA, *_PILLOW_INTERNAL_FAILURES) as exc:
            if not _is_bad_data(exc):
                raise
            code = _classify(exc, reader)
            return _error(code, f"{name} header rejected: {type(exc).__name__}: {exc}")
    for offset, magic, foreign in _FOREIGN_SIGNATURES:
        if data[offset : offset + len(magic)] == magic:
            return _error(ErrorCode.UNSUPPORTED_FORMAT, f"{foreign} is not an allowed format")
    head = data[:512].lstrip()
    if head[:5].lower() == b"<?xml" or head[:4].lower() == b"<svg":
        return _error(ErrorCode.UNSUPPORTED_FORMAT, "SVG/XML is not an allowed format")
    # Let Pillow name the format, but only trust plugins that check a signature: header-only
    # plugins (TGA, ...) would "recognise" random bytes. Nothing is decoded here.
    known: str | None = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(_DeadlineReader(data, None)) as img:
                fmt = img.format
                if fmt is not None and Image.OPEN.get(fmt, (None, None))[1] is not None:
                    known = fmt
    except (*_PILLOW_BAD_DATA, *_PILLOW_INTERNAL_FAILURES) as exc:
        if not _is_bad_data(exc):
            raise
    if known is not None and known not in cfg.formats:
        return _error(ErrorCode.UNSUPPORTED_FORMAT, f"{known} is not an allowed format")
    return _error(ErrorCode.UNREADABLE, f"not a recognised image ({len(data)} bytes, starts {data[:8]!r})")


def _decode(reader: _DeadlineReader, cfg: DecodeConfig, deadline: float | None) -> DecodeResult:
    with warnings.catch_warnings():
        # Pillow only warns between 1x and 2x its pixel limit; here that is an error row. The filter
        # lives for this block only (warnings filters are process-wide, so keep the window short).
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img = Image.open(reader, formats=_opener_formats(cfg.formats))
        with img:
            if not cfg.pixels:
                return _decode_opened(img, cfg, deadline, data=reader.getvalue())
            return _decode_opened(img, cfg, deadline)


@functools.lru_cache(maxsize=8)
def _opener_formats(formats: frozenset[str]) -> tuple[str, ...]:
    """Pillow opener names for the allowed formats: MPO has no opener of its own, JPEG's returns it."""
    names = {"JPEG" if name == "MPO" else name for name in formats}
    return tuple(sorted(names))


def _decode_opened(
    img: Image.ImageFile.ImageFile, cfg: DecodeConfig, deadline: float | None, *, data: bytes | None = None
) -> DecodeResult:
    fmt = img.format or ""
    if fmt not in cfg.formats:
        # JPEG's opener hands back MPO for JPEGs with extra frames, whatever ``formats`` allowed.
        raise _BadDataError(ErrorCode.UNSUPPORTED_FORMAT, f"{fmt or 'unknown'} is not an allowed format")
    stored_w, stored_h = img.size
    if stored_w <= 0 or stored_h <= 0:
        raise _BadDataError(ErrorCode.BAD_DIMENSIONS, f"{stored_w}x{stored_h}")
    if stored_w * stored_h > cfg.max_pixels:
        raise _BadDataError(ErrorCode.DECOMPRESSION_BOMB, f"{stored_w}x{stored_h} pixels > max_pixels {cfg.max_pixels}")
    short, long_ = sorted((stored_w, stored_h))
    if short < cfg.min_side:
        raise _BadDataError(ErrorCode.BAD_DIMENSIONS, f"{stored_w}x{stored_h}: side < min_side {cfg.min_side}")
    if long_ / short > cfg.max_aspect:
        raise _BadDataError(ErrorCode.BAD_DIMENSIONS, f"{stored_w}x{stored_h}: aspect > max_aspect {cfg.max_aspect:g}")

    # Walking an animation's frames reads every block (bounded by the deadline reader).
    n_frames = int(getattr(img, "n_frames", 1))
    if n_frames > 1:
        img.seek(0)
    _check_deadline(deadline)

    # TIFF's loader applies the orientation itself and then drops the tag: note it from the header
    # tags first. (Other formats' EXIF is read after the pixels: PNG's getexif() would load them
    # itself, and a pixel failure must not hide inside an EXIF failure.)
    header_tags = getattr(img, "tag_v2", None)
    header_orientation = header_tags.get(_TAG_ORIENTATION) if header_tags is not None else None
    scale = min(1.0, cfg.working_size / long_)
    if data is not None and not cfg.pixels and _device_decodable(img, fmt, n_frames, data):
        return _deferred(img, cfg, fmt, stored_w, stored_h, scale)
    if fmt in _JPEG_FAMILY and scale < 1.0:
        # libjpeg scales by 1/2, 1/4 or 1/8 in the DCT domain, never below the target size.
        img.draft("RGB", (max(1, round(stored_w * scale)), max(1, round(stored_h * scale))))
    img.load()
    _check_deadline(deadline)

    orientation, taken_at, gps = _read_exif(img)
    if (
        orientation == 1
        and isinstance(header_orientation, int)
        and header_orientation in _TRANSPOSE
        and _orientation_tag(img) is None
    ):
        # The loader turned the pixels already (and reports the turned size): full size, oriented.
        orientation = header_orientation
        pending = 1
        width, height = img.size
    else:
        pending = orientation
        width, height = (stored_h, stored_w) if orientation in (5, 6, 7, 8) else (stored_w, stored_h)
    out_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    # Resize in the stored orientation, turn last (the turn is cheaper on the small image).
    target = (out_size[1], out_size[0]) if pending in (5, 6, 7, 8) else out_size
    pic = _to_rgb_or_l(img)
    _check_deadline(deadline)
    if pic.size != target:
        pic = pic.resize(target, Image.Resampling.BICUBIC, reducing_gap=2.0)
    if pic.mode != "RGB":
        pic = pic.convert("RGB")
    method = _TRANSPOSE.get(pending)
    if method is not None:
        pic = pic.transpose(method)
    _check_deadline(deadline)

    image = np.array(pic, dtype=np.uint8)
    if image.ndim != 3 or image.shape[2] != 3:
        raise AssertionError(f"working image has shape {image.shape}")  # a bug, never bad data
    return DecodeResult(
        status=Status.OK,
        image=image,
        width=width,
        height=height,
        orientation=orientation,
        format=fmt,
        taken_at=taken_at,
        gps_lat=gps[0] if gps else None,
        gps_lon=gps[1] if gps else None,
        phash=perceptual_hash(image),
        n_frames=n_frames,
        work_width=int(image.shape[1]),
        work_height=int(image.shape[0]),
    )


def working_shape(width: int, height: int, working_size: int) -> tuple[int, int]:
    """(height, width) of the working image for an oriented full size: the one rule both decoders use."""
    scale = min(1.0, working_size / max(width, height))
    return max(1, round(height * scale)), max(1, round(width * scale))


def _deferred(
    img: Image.ImageFile.ImageFile, cfg: DecodeConfig, fmt: str, stored_w: int, stored_h: int, scale: float
) -> DecodeResult:
    """Header mode's result for a JPEG a device will decode: everything but the pixels."""
    # A JPEG's EXIF sits in its APP1 header segment, which Image.open has already read.
    orientation, taken_at, gps = _read_exif(img)
    width, height = (stored_h, stored_w) if orientation in (5, 6, 7, 8) else (stored_w, stored_h)
    return DecodeResult(
        status=Status.OK,
        image=_EMPTY_IMAGE,
        width=width,
        height=height,
        orientation=orientation,
        format=fmt,
        taken_at=taken_at,
        gps_lat=gps[0] if gps else None,
        gps_lon=gps[1] if gps else None,
        n_frames=1,
        pixels_deferred=True,
        work_width=max(1, round(width * scale)),
        work_height=max(1, round(height * scale)),
    )


def _device_decodable(img: Image.ImageFile.ImageFile, fmt: str, n_frames: int, data: bytes) -> bool:
    """Whether header mode may hand these bytes to a device decoder instead of decoding them here.

    Conservative on purpose: nothing guarantees that a device decoder fails where libjpeg does
    (libjpeg-turbo through torchvision refuses a cut scan; how nvJPEG treats one is its own
    business), so anything that Pillow would reject while decoding and that the header can show
    (no end-of-image marker after the scan) stays on the CPU, where it becomes the usual error row.
    """
    if fmt not in DEVICE_FORMATS or n_frames != 1 or img.mode not in _DEVICE_MODES:
        return False
    if img.mode == "RGB" and img.info.get("adobe_transform") == 0:
        return False  # RGB stored without the YCbCr transform: rare, and decoders disagree on it
    scan = _first_scan_offset(data)
    return scan is not None and data.rfind(b"\xff\xd9") > scan


def _first_scan_offset(data: bytes) -> int | None:
    """Offset of the main image's first SOS marker, walking the marker segments from SOI (an EXIF
    thumbnail carries its own SOS/EOI inside APP1, so a plain search would find that one)."""
    if data[:2] != b"\xff\xd8":
        return None
    pos, end = 2, len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker == 0xDA:
            return pos
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # TEM, RSTn, SOI: no length
            pos += 2
            continue
        if marker == 0xD9:
            return None  # EOI before any scan
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if length < 2:
            return None
        pos += 2 + length
    return None


def _to_rgb_or_l(img: Image.Image) -> Image.Image:
    """Bring any Pillow mode to RGB or L, compositing transparency on white."""
    mode = img.mode
    if mode in ("RGB", "L") and "transparency" not in img.info:
        return img
    if mode == "P":
        has_alpha = "transparency" in img.info or (img.palette is not None and img.palette.mode == "RGBA")
        return _on_white(img.convert("RGBA")) if has_alpha else img.convert("RGB")
    if mode in ("RGBA", "RGBa", "LA", "La", "PA"):
        return _on_white(img.convert("RGBA"))
    if mode == "1":
        return img.convert("L")
    if mode.startswith("I;16") or mode in ("I", "F"):
        return Image.fromarray(_scale_to_u8(np.asarray(img), mode), mode="L")
    if mode in ("RGB", "L"):
        # A tRNS colour key: that one value is transparent.
        return _on_white(img.convert("RGBA"))
    # CMYK, YCbCr, LAB, HSV, RGBX: Pillow's own conversion (CMYK: the naive inverse, no ICC).
    return img.convert("RGB")


def _on_white(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGB", rgba.size, (255, 255, 255))
    background.paste(rgba, mask=rgba.getchannel("A"))
    return background


def _scale_to_u8(values: np.ndarray, mode: str) -> np.ndarray:
    """16-bit, 32-bit and float greyscale → 8 bits: by the format's full range where it has one."""
    arr = values.astype(np.float64, copy=False)
    if mode.startswith("I;16"):
        scaled = arr / 257.0
    else:
        finite = arr[np.isfinite(arr)]
        low = float(finite.min()) if finite.size else 0.0
        high = float(finite.max()) if finite.size else 0.0
        if mode == "F" and low >= 0.0 and high <= 1.0:
            scaled = arr * 255.0
        elif low >= 0.0 and high <= 255.0:
            scaled = arr
        elif low >= 0.0 and high <= 65535.0:
            scaled = arr / 257.0
        else:
            # No known range: stretch what is there so the picture stays visible.
            scaled = (arr - low) * (255.0 / (high - low)) if high > low else np.zeros_like(arr)
    return np.nan_to_num(np.rint(scaled), nan=0.0, posinf=255.0, neginf=0.0).clip(0, 255).astype(np.uint8)


def _read_exif(img: Image.Image) -> tuple[int, str | None, tuple[float, float] | None]:
    """Orientation (1 when absent or invalid), capture time and GPS; bad EXIF never fails the photo."""
    try:
        exif = img.getexif()
        raw_orientation = exif.get(_TAG_ORIENTATION, 1)
        exif_ifd = exif.get_ifd(ExifTags.IFD.Exif)
        raw_time = exif_ifd.get(_TAG_DATETIME_ORIGINAL)
        raw_offset = exif_ifd.get(_TAG_OFFSET_TIME_ORIGINAL)
        gps_ifd = dict(exif.get_ifd(ExifTags.IFD.GPSInfo))
    except (*_PILLOW_BAD_DATA, *_PILLOW_INTERNAL_FAILURES) as exc:
        if not _is_bad_data(exc):
            raise
        return 1, None, None
    orientation = raw_orientation if isinstance(raw_orientation, int) and 1 <= raw_orientation <= 8 else 1
    return orientation, _exif_time(raw_time, raw_offset), _exif_gps(gps_ifd)


def _orientation_tag(img: Image.Image) -> int | None:
    try:
        value = img.getexif().get(_TAG_ORIENTATION)
    except (*_PILLOW_BAD_DATA, *_PILLOW_INTERNAL_FAILURES) as exc:
        if not _is_bad_data(exc):
            raise
        return None
    return value if isinstance(value, int) else None


def _exif_text(value: Any) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return value.strip("\x00 ") if isinstance(value, str) else None


def _exif_time(raw: Any, raw_offset: Any) -> str | None:
    text = _exif_text(raw)
    match = _EXIF_DATETIME.match(text) if text else None
    if match is None:
        return None
    try:
        # Cameras without a clock write "0000:00:00 00:00:00": no date rather than a wrong one.
        stamp = datetime(*(int(part) for part in match.groups()))
    except ValueError:
        return None
    offset = _exif_text(raw_offset)
    iso = stamp.isoformat(timespec="seconds")
    return iso + offset if offset and _EXIF_OFFSET.match(offset) else iso


def _rational(value: Any) -> float:
    if isinstance(value, tuple) and len(value) == 2:
        num, den = value
        return float(num) / float(den) if den else math.nan
    return float(value)


def _exif_gps(gps: dict[int, Any]) -> tuple[float, float] | None:
    """GPSLatitude/Longitude (degrees, minutes, seconds) + N/S, E/W → signed decimal degrees."""
    lat = _dms(gps.get(ExifTags.GPS.GPSLatitude), _exif_text(gps.get(ExifTags.GPS.GPSLatitudeRef)), "S")
    lon = _dms(gps.get(ExifTags.GPS.GPSLongitude), _exif_text(gps.get(ExifTags.GPS.GPSLongitudeRef)), "W")
    if lat is None or lon is None or abs(lat) > 90.0 or abs(lon) > 180.0:
        return None
    return lat, lon


def _dms(value: Any, ref: str | None, negative_ref: str) -> float | None:
    if not isinstance(value, tuple | list) or not 1 <= len(value) <= 3:
        return None
    try:
        parts = [_rational(part) for part in value]
    except (TypeError, ValueError, ZeroDivisionError, OverflowError):
        return None  # a malformed GPS entry means "no position", not a failed photo
    if not all(math.isfinite(part) for part in parts):
        return None
    degrees = sum(part / 60.0**i for i, part in enumerate(parts))
    return -degrees if ref and ref.upper().startswith(negative_ref) else degrees


def perceptual_hash(image: np.ndarray) -> str:
    """64-bit pHash as 16 hex chars: DCT of the 32x32 grey image, low 8x8 block against its median.

    Same construction as the common ``imagehash.phash`` (so hashes are comparable in spirit, not
    bit-for-bit): robust to re-encoding and mild resizing, different for different scenes.
    """
    grey = Image.fromarray(np.ascontiguousarray(image)).convert("L")
    small = grey.resize((32, 32), Image.Resampling.LANCZOS, reducing_gap=4.0)
    pixels = np.asarray(small, dtype=np.float64)
    dct = scipy.fft.dct(scipy.fft.dct(pixels, axis=0), axis=1)
    low = dct[:8, :8]
    bits = (low > np.median(low)).ravel()
    return np.packbits(bits).tobytes().hex()


def phash_distance(a: str, b: str) -> int:
    """Hamming distance between two hashes from :func:`perceptual_hash` (0..64)."""
    return (int(a, 16) ^ int(b, 16)).bit_count()


class DecodeUDF:
    """Ray Data stage: decodes the ``data`` column row by row and drops it.

    Rows whose ``status`` is not ``ok`` (the fetch already failed, or the row was skipped) pass
    through with their status and error columns untouched. When the input has no status columns
    every row counts as fetched and they are created. All other input columns are kept.

    In header mode (``config.pixels=False``) three more columns come out: ``jpeg`` (the validated
    bytes of rows whose pixels are deferred to a device decoder, else None) and ``work_width`` /
    ``work_height`` (the working size); a deferred row's ``image`` is empty and its ``phash`` None
    until :func:`photolens.udfs.gpudecode.finish_on_device` fills them.
    """

    def __init__(self, config: DecodeConfig) -> None:
        self.config = config

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if "data" not in batch:
            raise KeyError("DecodeUDF needs a 'data' column of photo bytes")
        data = batch["data"]
        n = len(data)
        status = text_column(batch.get("status"), n, Status.OK.value)
        error_code = text_column(batch.get("error_code"), n, None)
        error_stage = text_column(batch.get("error_stage"), n, None)
        error_detail = text_column(batch.get("error_detail"), n, None)

        image = np.empty(n, dtype=object)
        width = np.zeros(n, dtype=np.int32)
        height = np.zeros(n, dtype=np.int32)
        orientation = np.zeros(n, dtype=np.int8)
        fmt = np.full(n, None, dtype=object)
        taken_at = np.full(n, None, dtype=object)
        gps_lat = np.full(n, np.nan, dtype=np.float64)
        gps_lon = np.full(n, np.nan, dtype=np.float64)
        phash = np.full(n, None, dtype=object)
        n_frames = np.zeros(n, dtype=np.int16)
        seconds = np.zeros(n, dtype=np.float32)
        header_mode = not self.config.pixels
        if header_mode:
            jpeg = np.full(n, None, dtype=object)
            work_width = np.zeros(n, dtype=np.int32)
            work_height = np.zeros(n, dtype=np.int32)

        for i in range(n):
            image[i] = _EMPTY_IMAGE
            if status[i] != Status.OK.value:
                continue
            payload = _payload(data[i])
            if payload is None:
                result = _error(ErrorCode.EMPTY_FILE, "no bytes for a row the fetch marked ok")
            else:
                result = decode_photo(payload, self.config)
            seconds[i] = result.seconds
            if not result.ok:
                status[i] = result.status.value
                error_code[i] = result.error_code.value if result.error_code else None
                error_stage[i] = result.error_stage.value if result.error_stage else None
                error_detail[i] = result.error_detail
                continue
            image[i] = result.image
            width[i] = result.width
            height[i] = result.height
            orientation[i] = result.orientation
            fmt[i] = result.format
            taken_at[i] = result.taken_at
            if result.gps_lat is not None and result.gps_lon is not None:
                gps_lat[i] = result.gps_lat
                gps_lon[i] = result.gps_lon
            phash[i] = result.phash
            n_frames[i] = min(result.n_frames, np.iinfo(np.int16).max)
            if header_mode:
                work_width[i] = result.work_width
                work_height[i] = result.work_height
                if result.pixels_deferred:
                    jpeg[i] = bytes(payload)

        out = {key: value for key, value in batch.items() if key != "data"}
        out.update(
            status=status,
            error_code=error_code,
            error_stage=error_stage,
            error_detail=error_detail,
            image=image,
            width=width,
            height=height,
            orientation=orientation,
            format=fmt,
            taken_at=taken_at,
            gps_lat=gps_lat,
            gps_lon=gps_lon,
            phash=phash,
            n_frames=n_frames,
            decode_seconds=seconds,
        )
        if header_mode:
            # Only in header mode, so pixel-mode batches keep the schema every stage knows.
            out.update(jpeg=jpeg, work_width=work_width, work_height=work_height)
        return out


def _payload(value: object) -> bytes | bytearray | memoryview | None:
    if isinstance(value, bytes | bytearray | memoryview):
        return value
    if isinstance(value, np.ndarray) and value.dtype == np.uint8:
        return value.tobytes()
    if value is None or (isinstance(value, float | np.floating) and math.isnan(value)):
        return None  # a null in the Arrow column
    raise TypeError(f"DecodeUDF: 'data' holds {type(value).__name__}, expected bytes")
