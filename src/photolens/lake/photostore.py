"""The photo store: what photos exist (listing or manifest), who owns them, and their bytes.

Manifests let a nightly job skip listing 10^8 keys: CSV or Parquet of keys/URIs, or an S3 Inventory report
(its ``manifest.json`` or one of its CSV files). Everything streams as record batches, so planning holds
one batch at a time, whatever the manifest's size.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import os
import random
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote_plus

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from photolens.lake.storage import Location, S3Settings, filesystem_for, read_bytes, s3_settings
from photolens.schemas.errors import ErrorCode

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("photo_id", pa.string(), nullable=False),
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("etag", pa.string()),
        pa.field("size_bytes", pa.int64()),
        pa.field("mtime", pa.timestamp("us", tz="UTC")),
        pa.field("is_profile", pa.bool_()),
    ]
)

# Columns a manifest may carry (aliases on the right). Anything else stops the job before it commits.
MANIFEST_COLUMNS = {
    "uri": ("uri", "url", "path"),
    "key": ("key",),
    "bucket": ("bucket",),
    "user_id": ("user_id", "user"),
    "etag": ("etag", "e_tag"),
    "size_bytes": ("size_bytes", "size"),
    "mtime": ("mtime", "last_modified", "last_modified_date", "lastmodifieddate"),
    "is_profile": ("is_profile", "profile"),
}
# S3 Inventory CSVs have no header; these are its field names (manifest.json's fileSchema gives the order).
INVENTORY_FIELDS = {
    "Bucket": "bucket",
    "Key": "key",
    "Size": "size_bytes",
    "LastModifiedDate": "mtime",
    "ETag": "etag",
}
DEFAULT_INVENTORY_SCHEMA = "Bucket, Key, Size, LastModifiedDate, ETag"


class ManifestError(ValueError):
    """The manifest cannot be used as it is; the message says what to fix."""


@dataclass(frozen=True)
class OwnerRules:
    """How a key tells its owner and whether it is a profile photo."""

    user_pattern: str = "users/{user_id}/"
    profile_pattern: str = "/profile/"

    def user_regex(self) -> re.Pattern[str]:
        if "{user_id}" not in self.user_pattern:
            raise ValueError(f"user_pattern {self.user_pattern!r} must contain {{user_id}}")
        head, tail = self.user_pattern.split("{user_id}", 1)
        return re.compile("(?:^|/)" + re.escape(head.lstrip("/")) + r"(?P<user_id>[^/]+)" + re.escape(tail))

    def user_ids(self, uris: pa.Array) -> pa.Array:
        extracted = pc.extract_regex(uris, self.user_regex().pattern)
        users = pc.struct_field(extracted, "user_id")
        return pc.if_else(pc.is_valid(extracted), users, pa.scalar(None, pa.string()))

    def profiles(self, uris: pa.Array) -> pa.Array:
        if not self.profile_pattern:
            return pa.array([False] * len(uris), pa.bool_())
        return pc.match_substring_regex(uris, re.escape(self.profile_pattern))


def photo_ids(uris: pa.Array, etags: pa.Array, sizes: pa.Array, mtimes: pa.Array) -> pa.Array:
    """Content identity: uri + etag where the store gives one, else uri + size + mtime. Never a position."""
    out = []
    for uri, etag, size, mtime in zip(
        uris.to_pylist(), etags.to_pylist(), sizes.to_pylist(), mtimes.cast(pa.int64()).to_pylist(), strict=True
    ):
        ident = f"{uri}\x00etag:{etag}" if etag else f"{uri}\x00size:{size}\x00mtime:{mtime}"
        out.append(hashlib.blake2b(ident.encode(), digest_size=16).hexdigest())
    return pa.array(out, pa.string())


def _normalise_etag(etag: str | None) -> str | None:
    return etag.strip('"') if etag else None


def list_photos(photos_uri: str, s3: S3Settings | None = None, page_size: int = 1000) -> Iterator[pa.RecordBatch]:
    """List a folder or an S3 prefix as raw batches (uri, etag, size_bytes, mtime)."""
    loc = Location.parse(photos_uri)
    if loc.is_s3:
        client = (s3 or s3_settings()).boto3_client(max_attempts=5)
        paginator = client.get_paginator("list_objects_v2")
        prefix = loc.path.rstrip("/") + "/" if loc.path else ""
        for page in paginator.paginate(Bucket=loc.bucket, Prefix=prefix, PaginationConfig={"PageSize": page_size}):
            rows = [o for o in page.get("Contents", []) if not o["Key"].endswith("/")]
            if rows:
                yield pa.record_batch(
                    {
                        "uri": [f"s3://{loc.bucket}/{o['Key']}" for o in rows],
                        "etag": [_normalise_etag(o.get("ETag")) for o in rows],
                        "size_bytes": pa.array([o["Size"] for o in rows], pa.int64()),
                        "mtime": pa.array([o["LastModified"] for o in rows], pa.timestamp("us", tz="UTC")),
                    }
                )
        return
    if not os.path.isdir(loc.path):
        raise ManifestError(f"photo store {photos_uri!r} is not a folder (or an s3:// prefix)")
    batch: list[tuple[str, int, int]] = []
    for root, dirs, files in os.walk(loc.path):
        dirs.sort()
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = os.path.join(root, name)
            st = os.stat(path)
            batch.append((path, st.st_size, st.st_mtime_ns // 1000))
            if len(batch) >= page_size:
                yield _local_batch(batch)
                batch = []
    if batch:
        yield _local_batch(batch)


def _local_batch(rows: list[tuple[str, int, int]]) -> pa.RecordBatch:
    return pa.record_batch(
        {
            "uri": [r[0] for r in rows],
            "etag": pa.nulls(len(rows), pa.string()),
            "size_bytes": pa.array([r[1] for r in rows], pa.int64()),
            "mtime": pa.array([r[2] for r in rows], pa.int64()).cast(pa.timestamp("us", tz="UTC")),
        }
    )


def detect_format(manifest_uri: str) -> str:
    lower = manifest_uri.lower()
    if lower.endswith("manifest.json"):
        return "s3-inventory"
    if lower.endswith((".parquet", ".pq")):
        return "parquet"
    if lower.endswith((".csv", ".csv.gz", ".tsv")):
        return "csv"
    raise ManifestError(
        f"cannot tell the format of manifest {manifest_uri!r}: pass --manifest-format csv|parquet|s3-inventory"
    )


def read_manifest(
    manifest_uri: str,
    photos_uri: str | None = None,
    fmt: str = "auto",
    s3: S3Settings | None = None,
    batch_rows: int = 65536,
) -> Iterator[pa.RecordBatch]:
    """Stream a manifest as raw batches (uri, etag, size_bytes, mtime, [user_id], [is_profile])."""
    fmt = detect_format(manifest_uri) if fmt == "auto" else fmt
    if fmt == "s3-inventory":
        yield from _read_inventory(manifest_uri, s3, batch_rows)
        return
    fs, path = filesystem_for(manifest_uri, s3)
    if fmt == "parquet":
        pf = pq.ParquetFile(fs.open_input_file(path))
        for batch in pf.iter_batches(batch_size=batch_rows):
            yield _normalise_manifest_batch(batch, photos_uri, manifest_uri)
    elif fmt == "csv":
        stream = fs.open_input_stream(path, compression="gzip" if path.endswith(".gz") else None)
        reader = pacsv.open_csv(
            stream,
            read_options=pacsv.ReadOptions(block_size=1 << 22),
            convert_options=pacsv.ConvertOptions(
                column_types={"user_id": pa.string(), "etag": pa.string(), "key": pa.string(), "uri": pa.string()},
            ),
        )
        for batch in reader:
            yield _normalise_manifest_batch(batch, photos_uri, manifest_uri)
    else:
        raise ManifestError(f"unknown manifest format {fmt!r}: use csv, parquet or s3-inventory")


def _normalise_manifest_batch(batch: pa.RecordBatch, photos_uri: str | None, manifest_uri: str) -> pa.RecordBatch:
    lookup = {alias: canon for canon, aliases in MANIFEST_COLUMNS.items() for alias in aliases}
    cols: dict[str, pa.Array] = {}
    unknown = []
    for name, col in zip(batch.schema.names, batch.columns, strict=True):
        canon = lookup.get(name.strip().lower())
        if canon is None:
            unknown.append(name)
        else:
            cols[canon] = col
    if unknown:
        raise ManifestError(
            f"manifest {manifest_uri!r} has unexpected column(s) {unknown}; "
            f"allowed: {sorted(a for aliases in MANIFEST_COLUMNS.values() for a in aliases)}"
        )
    if "uri" not in cols:
        if "key" not in cols:
            raise ManifestError(f"manifest {manifest_uri!r} needs a 'uri' or a 'key' column")
        keys = cols.pop("key")
        if "bucket" in cols:
            buckets = cols.pop("bucket")
            cols["uri"] = pc.binary_join_element_wise("s3:/", buckets, keys, "/")
        elif photos_uri:
            cols["uri"] = pc.binary_join_element_wise(Location.parse(photos_uri).uri.rstrip("/"), keys, "/")
        else:
            raise ManifestError(f"manifest {manifest_uri!r} has keys but no bucket: pass --photos for their root")
    n = batch.num_rows
    out = {
        "uri": cols["uri"].cast(pa.string()),
        "etag": _etag_array(cols.get("etag"), n),
        "size_bytes": cols["size_bytes"].cast(pa.int64()) if "size_bytes" in cols else pa.nulls(n, pa.int64()),
        "mtime": _mtime_array(cols.get("mtime"), n),
    }
    if "user_id" in cols:
        out["user_id"] = cols["user_id"].cast(pa.string())
    if "is_profile" in cols:
        out["is_profile"] = cols["is_profile"].cast(pa.bool_())
    return pa.record_batch(out)


def _etag_array(col: pa.Array | None, n: int) -> pa.Array:
    if col is None:
        return pa.nulls(n, pa.string())
    return pa.array([_normalise_etag(e) for e in col.cast(pa.string()).to_pylist()], pa.string())


def _mtime_array(col: pa.Array | None, n: int) -> pa.Array:
    ts = pa.timestamp("us", tz="UTC")
    if col is None:
        return pa.nulls(n, ts)
    if pa.types.is_timestamp(col.type):
        return col.cast(ts) if col.type.tz else pc.assume_timezone(col, "UTC").cast(ts)
    if pa.types.is_integer(col.type):
        return col.cast(pa.int64()).cast(ts)
    texts = col.cast(pa.string()).to_pylist()
    parsed = [datetime.fromisoformat(v.replace("Z", "+00:00")) if v else None for v in texts]
    return pa.array([p.astimezone(UTC) if p and p.tzinfo else p for p in parsed], ts)


def _read_inventory(manifest_uri: str, s3: S3Settings | None, batch_rows: int) -> Iterator[pa.RecordBatch]:
    """S3 Inventory: manifest.json lists gzipped header-less CSVs whose columns its fileSchema names."""
    if manifest_uri.lower().endswith(".json"):
        manifest = json.loads(read_bytes(manifest_uri, s3))
        schema = manifest.get("fileSchema", DEFAULT_INVENTORY_SCHEMA)
        if manifest.get("fileFormat", "CSV").upper() != "CSV":
            raise ManifestError(f"{manifest_uri}: only CSV inventories are supported, got {manifest.get('fileFormat')}")
        dest = Location.parse(manifest_uri)
        bucket = manifest.get("destinationBucket", "").removeprefix("arn:aws:s3:::") or dest.bucket
        # A local copy of an inventory keeps its data files beside manifest.json.
        here = os.path.dirname(dest.path)
        files = [
            f"s3://{bucket}/{f['key']}" if dest.is_s3 else os.path.join(here, os.path.basename(f["key"]))
            for f in manifest.get("files", [])
        ]
    else:
        schema, files = DEFAULT_INVENTORY_SCHEMA, [manifest_uri]
    fields = [f.strip() for f in schema.split(",")]
    missing = {"Bucket", "Key"} - set(fields)
    if missing:
        raise ManifestError(f"{manifest_uri}: inventory fileSchema lacks {sorted(missing)}")
    for file_uri in files:
        raw = read_bytes(file_uri, s3)
        if file_uri.endswith(".gz"):
            raw = gzip.decompress(raw)
        rows: dict[str, list[str]] = {f: [] for f in fields}
        for rec in csv.reader(io.StringIO(raw.decode())):
            if len(rec) != len(fields):
                raise ManifestError(f"{file_uri}: a row has {len(rec)} fields, fileSchema names {len(fields)}")
            for f, v in zip(fields, rec, strict=True):
                rows[f].append(v)
            if len(rows["Key"]) >= batch_rows:
                yield _inventory_batch(rows)
                rows = {f: [] for f in fields}
        if rows["Key"]:
            yield _inventory_batch(rows)


def _inventory_batch(rows: dict[str, list[str]]) -> pa.RecordBatch:
    keys = [unquote_plus(k) for k in rows["Key"]]
    n = len(keys)
    return pa.record_batch(
        {
            "uri": [f"s3://{b}/{k}" for b, k in zip(rows["Bucket"], keys, strict=True)],
            "etag": _etag_array(pa.array(rows["ETag"]) if "ETag" in rows else None, n),
            "size_bytes": pa.array([int(s) if s else None for s in rows["Size"]], pa.int64())
            if "Size" in rows
            else pa.nulls(n, pa.int64()),
            "mtime": _mtime_array(pa.array(rows["LastModifiedDate"]) if "LastModifiedDate" in rows else None, n),
        }
    )


def to_manifest(batch: pa.RecordBatch, rules: OwnerRules) -> tuple[pa.RecordBatch, int]:
    """Raw batch → MANIFEST_SCHEMA rows; returns (rows, how many had no owner and were left out)."""
    uris = batch.column("uri")
    names = batch.schema.names
    users = batch.column("user_id") if "user_id" in names else rules.user_ids(uris)
    profiles = batch.column("is_profile") if "is_profile" in names else rules.profiles(uris)
    keep = pc.is_valid(users)
    n_unowned = batch.num_rows - pc.sum(keep.cast(pa.int64())).as_py() if batch.num_rows else 0
    ids = photo_ids(uris, batch.column("etag"), batch.column("size_bytes"), batch.column("mtime"))
    cols = [ids, users, uris, batch.column("etag"), batch.column("size_bytes"), batch.column("mtime"), profiles]
    out = pa.record_batch([c.filter(keep) if n_unowned else c for c in cols], schema=MANIFEST_SCHEMA)
    return out, n_unowned


# ---------------------------------------------------------------- fetching bytes, with classified retries

RETRYABLE_S3_CODES = {"SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout", "503", "500", "502", "504",
                      "RequestTimeTooSkewed", "Throttling", "ThrottlingException"}


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 5
    base_delay_s: float = 0.2
    max_delay_s: float = 5.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        # Full jitter: spreads retries of many workers hitting one throttled prefix.
        return rng.uniform(0, min(self.max_delay_s, self.base_delay_s * 2 ** (attempt - 1)))


@dataclass
class FetchResult:
    data: bytes | None
    error_code: ErrorCode | None = None
    detail: str | None = None
    attempts: int = 1


class PhotoFetcher:
    """Reads one photo's bytes; classifies failures; retries only what is worth retrying."""

    def __init__(self, s3: S3Settings | None = None, policy: RetryPolicy | None = None, max_bytes: int = 50 << 20,
                 timeout_s: float = 60.0) -> None:
        self.s3 = s3
        self.policy = policy or RetryPolicy()
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self._client = None
        self._rng = random.Random()

    def _s3_client(self) -> Any:
        if self._client is None:
            self._client = (self.s3 or s3_settings()).boto3_client(
                max_attempts=1, connect_timeout=min(10, self.timeout_s), read_timeout=self.timeout_s
            )
        return self._client

    def fetch(self, uri: str, size_hint: int | None = None, etag: str | None = None) -> FetchResult:
        if size_hint is not None and size_hint > self.max_bytes:
            return FetchResult(None, ErrorCode.TOO_LARGE_BYTES, f"{size_hint} bytes > limit {self.max_bytes}", 0)
        loc = Location.parse(uri)
        return self._fetch_s3(loc, etag) if loc.is_s3 else self._fetch_local(loc.path)

    def _fetch_local(self, path: str) -> FetchResult:
        try:
            size = os.stat(path).st_size
            if size > self.max_bytes:
                return FetchResult(None, ErrorCode.TOO_LARGE_BYTES, f"{size} bytes > limit {self.max_bytes}")
            with open(path, "rb") as f:
                return FetchResult(f.read())
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            return FetchResult(None, ErrorCode.FETCH_NOT_FOUND, type(exc).__name__)
        except PermissionError:
            return FetchResult(None, ErrorCode.FETCH_DENIED, "permission denied")

    def _fetch_s3(self, loc: Location, etag: str | None) -> FetchResult:
        import botocore.exceptions as bexc

        attempt = 0
        last = ""
        while True:
            attempt += 1
            try:
                kwargs = {"Bucket": loc.bucket, "Key": loc.path}
                if etag:
                    kwargs["IfMatch"] = f'"{etag}"'
                resp = self._s3_client().get_object(**kwargs)
                length = resp.get("ContentLength") or 0
                if length > self.max_bytes:
                    resp["Body"].close()
                    return FetchResult(None, ErrorCode.TOO_LARGE_BYTES, f"{length} bytes > limit {self.max_bytes}",
                                       attempt)
                return FetchResult(resp["Body"].read(), attempts=attempt)
            except bexc.ClientError as exc:
                err = exc.response.get("Error", {})
                code = str(err.get("Code", ""))
                status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                if code in ("NoSuchKey", "404", "NotFound") or status == 404:
                    return FetchResult(None, ErrorCode.FETCH_NOT_FOUND, f"{code or status}", attempt)
                if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch") or status == 403:
                    return FetchResult(None, ErrorCode.FETCH_DENIED, f"{code or status}", attempt)
                if code == "PreconditionFailed" or status == 412:
                    return FetchResult(None, ErrorCode.FETCH_CHANGED, "object changed since the manifest was taken",
                                       attempt)
                if code not in RETRYABLE_S3_CODES and not (status and status >= 500):
                    return FetchResult(None, ErrorCode.FETCH_DENIED if status == 401 else ErrorCode.FETCH_TRANSIENT,
                                       f"{code or status}", attempt)
                last = f"{code or status}"
                final = ErrorCode.FETCH_TRANSIENT
            except (bexc.ReadTimeoutError, bexc.ConnectTimeoutError) as exc:
                last, final = type(exc).__name__, ErrorCode.FETCH_TIMEOUT
            except (bexc.EndpointConnectionError, bexc.ConnectionClosedError, bexc.ResponseStreamingError,
                    bexc.IncompleteReadError, ConnectionError) as exc:
                last, final = type(exc).__name__, ErrorCode.FETCH_TRANSIENT
            if attempt >= self.policy.max_attempts:
                return FetchResult(None, final, f"{last} after {attempt} attempts", attempt)
            time.sleep(self.policy.delay(attempt, self._rng))
