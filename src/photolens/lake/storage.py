"""Where bytes live: local folders and S3 (AWS or any S3-compatible endpoint), one vocabulary for both.

Credentials follow the standard AWS chain (environment, shared config, instance profile) through boto3; the
same resolved credentials are handed to pyarrow and deltalake so every client talks to the same store. An
endpoint override (``AWS_ENDPOINT_URL`` or ``PHOTOLENS_S3_ENDPOINT``) points everything at an S3-compatible store.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs as pafs

DEFAULT_REGION = "us-east-1"


@dataclass(frozen=True)
class Location:
    """A parsed URI: ``s3://bucket/key`` or a local path (``file://`` accepted)."""

    scheme: str  # "s3" | "file"
    bucket: str  # "" for local paths
    path: str  # key prefix for s3 (no leading slash), absolute path for local

    @classmethod
    def parse(cls, uri: str) -> Location:
        if uri.startswith("s3://"):
            parsed = urlparse(uri)
            if not parsed.netloc:
                raise ValueError(f"{uri!r}: an S3 URI needs a bucket, like s3://bucket/prefix")
            return cls("s3", parsed.netloc, parsed.path.lstrip("/"))
        if uri.startswith("file://"):
            uri = uri[len("file://") :]
        if "://" in uri:
            raise ValueError(f"{uri!r}: only local paths and s3:// URIs are supported")
        return cls("file", "", str(Path(uri).expanduser().resolve()))

    @property
    def is_s3(self) -> bool:
        return self.scheme == "s3"

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.path}" if self.is_s3 else self.path

    @property
    def fs_path(self) -> str:
        """The path as pyarrow filesystems spell it (``bucket/key`` for S3)."""
        return f"{self.bucket}/{self.path}".rstrip("/") if self.is_s3 else self.path

    def join(self, *parts: str) -> Location:
        tail = "/".join(p.strip("/") for p in parts if p)
        if not tail:
            return self
        base = self.path.rstrip("/")
        return Location(self.scheme, self.bucket, f"{base}/{tail}" if base else tail)


def join_uri(uri: str, *parts: str) -> str:
    return Location.parse(uri).join(*parts).uri


@dataclass(frozen=True)
class S3Settings:
    """Resolved S3 connection settings; picklable, so Ray workers rebuild the same clients."""

    endpoint_url: str | None
    region: str
    access_key: str | None
    secret_key: str | None
    session_token: str | None

    @classmethod
    def from_env(cls) -> S3Settings:
        endpoint = os.environ.get("PHOTOLENS_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL") or None
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or DEFAULT_REGION
        access = secret = token = None
        import boto3

        creds = boto3.Session().get_credentials()
        if creds is not None:
            frozen = creds.get_frozen_credentials()
            access, secret, token = frozen.access_key, frozen.secret_key, frozen.token
        return cls(endpoint, region, access, secret, token)

    def boto3_client(self, max_attempts: int = 1, connect_timeout: float = 10, read_timeout: float = 60) -> Any:
        """A boto3 S3 client. Retries default to one attempt: callers classify and retry themselves."""
        import boto3
        import botocore.config

        config = botocore.config.Config(
            s3={"addressing_style": "path"} if self.endpoint_url else {},
            # total_max_attempts counts the first request; botocore's max_attempts counts retries after it, which
            # doubled every request of the fetcher's own retry loop (a throttled key got 2x the requests).
            retries={"total_max_attempts": max_attempts, "mode": "standard"},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_pool_connections=32,
        )
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            aws_session_token=self.session_token,
            config=config,
        )

    def pyarrow_fs(self) -> pafs.S3FileSystem:
        kwargs: dict[str, Any] = {"region": self.region}
        if self.access_key:
            kwargs.update(access_key=self.access_key, secret_key=self.secret_key, session_token=self.session_token)
        if self.endpoint_url:
            parsed = urlparse(self.endpoint_url)
            kwargs.update(endpoint_override=parsed.netloc or parsed.path, scheme=parsed.scheme or "https")
        return pafs.S3FileSystem(**kwargs)

    def delta_options(self) -> dict[str, str]:
        opts = {"AWS_REGION": self.region}
        if self.access_key:
            opts["AWS_ACCESS_KEY_ID"] = self.access_key
            opts["AWS_SECRET_ACCESS_KEY"] = self.secret_key or ""
        if self.session_token:
            opts["AWS_SESSION_TOKEN"] = self.session_token
        if self.endpoint_url:
            opts["AWS_ENDPOINT_URL"] = self.endpoint_url
            if self.endpoint_url.startswith("http://"):
                opts["AWS_ALLOW_HTTP"] = "true"
        return opts


@cache
def _default_s3() -> S3Settings:
    return S3Settings.from_env()


def s3_settings() -> S3Settings:
    return _default_s3()


def reset_s3_settings() -> None:
    """Forget cached settings (tests and the demo change the environment)."""
    _default_s3.cache_clear()


def filesystem_for(uri: str, s3: S3Settings | None = None) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it."""
    loc = Location.parse(uri)
    if loc.is_s3:
        return (s3 or s3_settings()).pyarrow_fs(), loc.fs_path
    return pafs.LocalFileSystem(), loc.path


def delta_storage_options(uri: str, s3: S3Settings | None = None) -> dict[str, str] | None:
    return (s3 or s3_settings()).delta_options() if Location.parse(uri).is_s3 else None


def read_bytes(uri: str, s3: S3Settings | None = None) -> bytes:
    fs, path = filesystem_for(uri, s3)
    # compression=None: the raw bytes, even for a .gz name (pyarrow would otherwise inflate it silently).
    with fs.open_input_stream(path, compression=None) as f:
        data: bytes = f.read()
    return data


def write_bytes_atomic(uri: str, data: bytes, s3: S3Settings | None = None) -> None:
    """Write a small object so readers see the old or the new content, never a torn one.

    S3 PUTs are atomic per object; on a local filesystem we write a temp file and rename it.
    """
    fs, path = filesystem_for(uri, s3)
    loc = Location.parse(uri)
    if loc.is_s3:
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def exists(uri: str, s3: S3Settings | None = None) -> bool:
    fs, path = filesystem_for(uri, s3)
    return bool(fs.get_file_info(path).type != pafs.FileType.NotFound)


# ---------------------------------------------------------------------------------------------- conditional I/O
# Small documents that several drivers may race on (run leases) are read with their version (ETag) and
# written only if absent (If-None-Match: *) or only if unchanged (If-Match: <etag>). S3 (and S3-compatible
# stores that honour the headers, SeaweedFS among them) decide the race server-side; local folders get
# the same contract from link(2) (fails when the name exists) and a compare-then-rename under an flock.


class StorageUnavailableError(OSError):
    """The store answered with neither the object nor its absence (a 5xx, a reset, a timeout)."""


class PreconditionFailedError(Exception):
    """A conditional write lost its race: the object exists (create) or changed since it was read (update)."""


@dataclass(frozen=True)
class Versioned:
    data: bytes
    etag: str


_ABSENT_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
_PRECONDITION_CODES = frozenset({"PreconditionFailed", "412", "ConditionalRequestConflict", "409"})


def _s3_client(s3: S3Settings | None) -> Any:
    # One attempt per call: callers retry with their own bound, and a test proxy counts every request.
    return (s3 or s3_settings()).boto3_client(max_attempts=1, connect_timeout=5, read_timeout=20)


def _client_error_code(exc: BaseException) -> str:
    response = getattr(exc, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code or str(status or "")


def read_versioned(uri: str, s3: S3Settings | None = None) -> Versioned | None:
    """The object and its version, or None when it does not exist. Anything else raises
    :class:`StorageUnavailableError`: an unreadable object is never reported as absent."""
    loc = Location.parse(uri)
    if loc.is_s3:
        import botocore.exceptions

        try:
            resp = _s3_client(s3).get_object(Bucket=loc.bucket, Key=loc.path)
            return Versioned(resp["Body"].read(), str(resp["ETag"]))
        except botocore.exceptions.ClientError as exc:
            if _client_error_code(exc) in _ABSENT_CODES:
                return None
            raise StorageUnavailableError(f"{uri}: {exc}") from exc
        except botocore.exceptions.BotoCoreError as exc:  # connection errors, timeouts, bad responses
            raise StorageUnavailableError(f"{uri}: {exc}") from exc
    try:
        data = Path(loc.path).read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StorageUnavailableError(f"{uri}: {exc}") from exc
    return Versioned(data, _local_etag(data))


def write_conditional(uri: str, data: bytes, s3: S3Settings | None = None, *, if_absent: bool = False,
                      if_match: str | None = None) -> str:
    """Write ``data`` only if the object is absent (``if_absent``) or still at version ``if_match``.

    Returns the new version. Raises :class:`PreconditionFailedError` when the condition does not hold,
    :class:`StorageUnavailableError` when the store fails to answer.
    """
    if if_absent == (if_match is not None):
        raise ValueError("write_conditional: give exactly one of if_absent=True or if_match=<etag>")
    loc = Location.parse(uri)
    if loc.is_s3:
        import botocore.exceptions

        cond = {"IfNoneMatch": "*"} if if_absent else {"IfMatch": if_match}
        try:
            resp = _s3_client(s3).put_object(Bucket=loc.bucket, Key=loc.path, Body=data, **cond)
            return str(resp["ETag"])
        except botocore.exceptions.ClientError as exc:
            if _client_error_code(exc) in _PRECONDITION_CODES:
                raise PreconditionFailedError(f"{uri}: {'exists' if if_absent else 'changed since read'}") from exc
            raise StorageUnavailableError(f"{uri}: {exc}") from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise StorageUnavailableError(f"{uri}: {exc}") from exc
    path = Path(loc.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    try:
        with _local_lock(path):
            if if_absent:
                try:
                    os.link(tmp, path)  # atomic, and fails if the name exists: readers never see a torn file
                except FileExistsError:
                    raise PreconditionFailedError(f"{uri}: exists") from None
            else:
                try:
                    current = _local_etag(path.read_bytes())
                except FileNotFoundError:
                    raise PreconditionFailedError(f"{uri}: gone since read") from None
                if current != if_match:
                    raise PreconditionFailedError(f"{uri}: changed since read")
                os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return _local_etag(data)


def delete_conditional(uri: str, etag: str, s3: S3Settings | None = None) -> None:
    """Delete the object only if it is still at version ``etag``."""
    loc = Location.parse(uri)
    if loc.is_s3:
        import botocore.exceptions

        try:
            _s3_client(s3).delete_object(Bucket=loc.bucket, Key=loc.path, IfMatch=etag)
        except botocore.exceptions.ClientError as exc:
            if _client_error_code(exc) in _PRECONDITION_CODES:
                raise PreconditionFailedError(f"{uri}: changed since read") from exc
            raise StorageUnavailableError(f"{uri}: {exc}") from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise StorageUnavailableError(f"{uri}: {exc}") from exc
        return
    path = Path(loc.path)
    with _local_lock(path):
        try:
            if _local_etag(path.read_bytes()) != etag:
                raise PreconditionFailedError(f"{uri}: changed since read")
        except FileNotFoundError:
            return
        path.unlink()


def _local_etag(data: bytes) -> str:
    import hashlib

    return '"' + hashlib.blake2b(data, digest_size=16).hexdigest() + '"'


@contextmanager
def _local_lock(path: Path) -> Iterator[None]:
    # flock is released by the kernel when its holder dies, so a crashed writer never wedges the document.
    import fcntl

    with open(path.with_name(f".{path.name}.lock"), "a+b") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
