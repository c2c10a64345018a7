"""Fetch stage: manifest rows in, photo bytes (or a classified fetch error) out."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from photolens.lake.photostore import FetchResult, PhotoFetcher, RetryPolicy
from photolens.lake.storage import S3Settings, filesystem_for
from photolens.schemas.errors import Stage, Status


@dataclass(frozen=True)
class FetchConfig:
    s3: S3Settings | None = None
    max_bytes: int = 50 << 20
    max_attempts: int = 5
    base_delay_s: float = 0.2
    timeout_s: float = 60.0
    threads: int = 8  # object-store reads are latency bound: overlap them


def read_shards(batch: dict[str, np.ndarray]) -> pa.Table:
    """Planned manifest shards (Parquet URIs) → their rows. One task per shard keeps driver memory flat."""
    tables = []
    for uri in batch["shard"]:
        fs, path = filesystem_for(str(uri))
        tables.append(pq.read_table(path, filesystem=fs))
    return pa.concat_tables(tables)


class FetchUDF:
    """Reads each row's bytes; a row whose read fails carries its error code instead of bytes."""

    def __init__(self, config: FetchConfig) -> None:
        self.config = config
        self.fetcher = PhotoFetcher(
            config.s3, RetryPolicy(config.max_attempts, config.base_delay_s), config.max_bytes, config.timeout_s
        )
        self.pool = ThreadPoolExecutor(max_workers=config.threads)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        uris = batch["uri"]
        sizes = batch.get("size_bytes")
        etags = batch.get("etag")

        def one(i: int) -> FetchResult:
            size = None if sizes is None or _is_null(sizes[i]) else int(sizes[i])
            etag = None if etags is None or _is_null(etags[i]) else str(etags[i])
            return self.fetcher.fetch(str(uris[i]), size, etag)

        results = list(self.pool.map(one, range(len(uris))))
        n = len(results)
        out = dict(batch)
        out["data"] = np.array([r.data for r in results] + [None], dtype=object)[:n]
        out["status"] = np.array([Status.OK.value if r.data is not None else Status.ERROR.value for r in results],
                                 dtype=object)
        out["error_code"] = np.array([r.error_code.value if r.error_code else None for r in results], dtype=object)
        out["error_stage"] = np.array([Stage.FETCH.value if r.error_code else None for r in results], dtype=object)
        out["error_detail"] = np.array([r.detail for r in results], dtype=object)
        out["fetch_attempts"] = np.array([r.attempts for r in results], dtype=np.int16)
        out["fetch_seconds"] = np.full(n, (time.perf_counter() - t0) / max(n, 1), dtype=np.float32)
        return out


def _is_null(v: object) -> bool:
    return v is None or (isinstance(v, float | np.floating) and bool(np.isnan(v)))
