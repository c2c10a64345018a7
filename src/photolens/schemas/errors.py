"""The closed vocabularies every row speaks: status, error codes and pipeline stages."""

from __future__ import annotations

from enum import StrEnum


class Status(StrEnum):
    OK = "ok"
    ERROR = "error"
    # Skipped on purpose (tombstoned user, filtered by policy) is not a failure.
    SKIPPED = "skipped"


class Stage(StrEnum):
    FETCH = "fetch"
    DECODE = "decode"
    DETECT = "detect"
    SCENE = "scene"
    LANDMARK = "landmark"
    FACES = "faces"
    EMBED = "embed"
    EMOTION = "emotion"
    WRITE = "write"


class ErrorCode(StrEnum):
    # fetch
    FETCH_NOT_FOUND = "FETCH_NOT_FOUND"
    FETCH_DENIED = "FETCH_DENIED"
    FETCH_TRANSIENT = "FETCH_TRANSIENT"
    FETCH_TIMEOUT = "FETCH_TIMEOUT"
    FETCH_CHANGED = "FETCH_CHANGED"
    # decode
    EMPTY_FILE = "EMPTY_FILE"
    TOO_LARGE_BYTES = "TOO_LARGE_BYTES"
    UNSUPPORTED_FORMAT = "UNSUPPORTED_FORMAT"
    UNREADABLE = "UNREADABLE"
    TRUNCATED = "TRUNCATED"
    DECOMPRESSION_BOMB = "DECOMPRESSION_BOMB"
    BAD_DIMENSIONS = "BAD_DIMENSIONS"
    DECODE_TIMEOUT = "DECODE_TIMEOUT"
    DECODE_FAILED = "DECODE_FAILED"
    # models
    MODEL_FAILED = "MODEL_FAILED"


SKIP_TOMBSTONED = "user_forgotten"
