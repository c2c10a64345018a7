"""Planning a night: stream the manifest, drop what is done (or forgotten), write the rest as todo shards.

Nothing grows with the number of photos on the driver except the id sets (8 bytes per known id): photos to
process go to Parquet todo shards, and the ids whose old rows a reprocessed photo replaces go to Parquet
replace shards beside them (``<lake>/_photolens/staging/<run_id>/attempt-<n>/replace/``). The commit applies
those shards file by file (``Lake.commit_staged(replace=...)``), so neither planning nor the commit ever holds
a Python list of ids or a whole table, whatever ``--reprocess`` says.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from photolens.lake.delta import Lake, Replacement
from photolens.lake.photostore import OwnerRules, list_photos, read_manifest, to_manifest
from photolens.lake.storage import Location, S3Settings, filesystem_for, join_uri
from photolens.schemas.errors import Status

if TYPE_CHECKING:
    from photolens.jobs.tag import TagConfig

__all__ = ["IdSet", "Plan", "plan_run"]


class IdSet:
    """A set of photo ids as sorted 64-bit hashes: 8 bytes per id, so 10^7 ids fit in 80 MB.

    A false "seen" needs two ids sharing the first 64 bits of their 128-bit blake2b (about 3e-6 for a
    10^7-photo table); the cost would be one photo skipped until ``--reprocess all``.

    Held as a few sorted runs of geometrically shrinking size (newest last), merged as they grow: planning
    calls ``contains`` and ``add`` once per manifest batch, and re-sorting one array per batch made planning
    quadratic (10^7 keys took 14 minutes; now seconds). Merges use sort + neighbour compare, not
    ``np.unique``, which is ~80x slower than a sort for uint64 under numpy 2.
    """

    def __init__(self) -> None:
        self._runs: list[np.ndarray] = []  # each sorted and unique; a value may sit in several runs

    @staticmethod
    def hashes(ids: pa.Array | pa.ChunkedArray | list[str]) -> np.ndarray:
        """The first 16 hex digits of each id as uint64: ``int(id[:16], 16)``, vectorised."""
        if isinstance(ids, pa.ChunkedArray):
            parts = [IdSet.hashes(c) for c in ids.chunks]
            return np.concatenate(parts) if parts else np.empty(0, dtype=np.uint64)
        if isinstance(ids, pa.Array):
            fast = _hex_prefix_u64(ids)
            if fast is not None:
                return fast
            values = ids.to_pylist()
        else:
            values = ids
        return np.array([int(x[:16], 16) for x in values], dtype=np.uint64)

    def add(self, h: np.ndarray) -> None:
        run = _sorted_unique(np.array(h, dtype=np.uint64))  # a copy: sorted in place below
        if not len(run):
            return
        self._runs.append(run)
        # Merge while the newest run is at least half its elder: O(log n) runs, each id merged O(log n) times.
        while len(self._runs) > 1 and 2 * len(self._runs[-1]) >= len(self._runs[-2]):
            newer = self._runs.pop()
            self._runs[-1] = _sorted_unique(np.concatenate((self._runs[-1], newer)))

    def contains(self, h: np.ndarray) -> np.ndarray:
        h = np.asarray(h, dtype=np.uint64)
        found = np.zeros(len(h), dtype=bool)
        for run in self._runs:
            pos = np.searchsorted(run, h)
            np.minimum(pos, len(run) - 1, out=pos)
            found |= run[pos] == h
        return found

    def __len__(self) -> int:
        if len(self._runs) > 1:
            self._runs = [_sorted_unique(np.concatenate(self._runs))]
        return len(self._runs[0]) if self._runs else 0


_HEX_VALUE = np.full(256, 255, dtype=np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEX_VALUE[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _HEX_VALUE[_c] = 10 + _i


def _hex_prefix_u64(ids: pa.Array) -> np.ndarray | None:
    """``int(s[:16], 16)`` for every string straight from Arrow's buffers; None when some value is not 16+
    plain hex digits (the caller then takes the per-value path, which keeps ``int``'s exact semantics)."""
    if pa.types.is_string_view(ids.type):
        ids = ids.cast(pa.string())
    if not (pa.types.is_string(ids.type) or pa.types.is_large_string(ids.type)) or ids.null_count:
        return None
    n = len(ids)
    if n == 0:
        return np.empty(0, dtype=np.uint64)
    width = np.int64 if pa.types.is_large_string(ids.type) else np.int32
    _, offsets_buf, data_buf = ids.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=width, count=n + 1, offset=ids.offset * np.dtype(width).itemsize)
    data = np.frombuffer(data_buf, dtype=np.uint8)
    starts = offsets[:-1].astype(np.int64)
    lengths = np.diff(offsets)
    if lengths.min() < 16:
        return None
    if (lengths == lengths[0]).all():  # photo ids: all 32 characters, back to back
        block = data[starts[0] : starts[0] + n * int(lengths[0])].reshape(n, int(lengths[0]))[:, :16]
    else:
        block = data[starts[:, None] + np.arange(16)]
    nibbles = _HEX_VALUE[block]
    if (nibbles == 255).any():
        return None
    packed = (nibbles[:, 0::2] << 4) | nibbles[:, 1::2]  # 8 big-endian bytes per id
    return np.ascontiguousarray(packed).view(">u8").ravel().astype(np.uint64)


def _sorted_unique(a: np.ndarray) -> np.ndarray:
    """Sorts ``a`` in place (callers pass an array they own) and returns its distinct values."""
    if len(a) < 2:
        return a
    # Stable sort is timsort for uint64: concatenated sorted runs merge in linear time.
    a.sort(kind="stable")
    keep = np.empty(len(a), dtype=bool)
    keep[0] = True
    np.not_equal(a[1:], a[:-1], out=keep[1:])
    return a[keep]


@dataclass
class Plan:
    todo_uri: str
    n_manifest: int = 0
    n_todo: int = 0
    n_done_before: int = 0
    n_unowned: int = 0
    n_forgotten: int = 0
    n_duplicates: int = 0
    shards: list[str] = field(default_factory=list)
    # Photos planned again that already have a row: their ids, in Parquet shards (never a Python list).
    n_replaced: int = 0
    replace_shards: list[str] = field(default_factory=list)
    reprocess: str = "none"

    def replacement(self, table: str, run_id: str | None = None) -> Replacement | None:
        """What ``table``'s commit must remove so a reprocessed photo keeps exactly one row; None: nothing.

        Below ``--reprocess all`` only error rows are ever planned again (ok and skipped ones are finished),
        and an error photo has no detections or faces: the child tables need no rewrite, and in ``photos``
        only files holding error rows are opened (the writer keeps ok and error rows in separate files).
        """
        if not self.n_replaced:
            return None
        if self.reprocess != "all":
            if table != "photos":
                return None
            where: tuple[tuple[str, str], ...] = (("status", Status.ERROR.value),)
        else:
            where = ()
        return Replacement("photo_id", tuple(self.replace_shards), self.n_replaced, where, run_id)


def _raw_batches(cfg: TagConfig, s3: S3Settings | None) -> Iterator[pa.RecordBatch]:
    if cfg.manifest:
        yield from read_manifest(cfg.manifest, cfg.photos, cfg.manifest_format, s3)
    else:
        assert cfg.photos is not None
        yield from list_photos(cfg.photos, s3)


class _ShardWriter:
    """Buffers record batches and writes them as numbered Parquet shards of about ``rows`` rows."""

    def __init__(self, uri: str, prefix: str, rows: int, s3: S3Settings | None) -> None:
        self.uri, self.prefix, self.rows = uri, prefix, rows
        self.fs, self.root = filesystem_for(uri, s3)
        self.shards: list[str] = []
        self._buffer: list[pa.RecordBatch | pa.Table] = []
        self._n = 0
        self._made = False

    def add(self, data: pa.RecordBatch | pa.Table) -> None:
        if not data.num_rows:
            return
        self._buffer.append(data)
        self._n += data.num_rows
        if self._n >= self.rows:
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        if not self._made and not Location.parse(self.uri).is_s3:
            self.fs.create_dir(self.root, recursive=True)
        self._made = True
        name = f"{self.prefix}-{len(self.shards):06d}.parquet"
        parts = [b if isinstance(b, pa.Table) else pa.Table.from_batches([b]) for b in self._buffer]
        pq.write_table(pa.concat_tables(parts), f"{self.root}/{name}", filesystem=self.fs)
        self.shards.append(join_uri(self.uri, name))
        self._buffer, self._n = [], 0


def plan_run(cfg: TagConfig, lake: Lake, run_id: str, attempt: int, s3: S3Settings | None) -> Plan:
    """Stream the manifest, drop what is done (or forgotten), write the rest as Parquet shards to process."""
    from photolens.jobs.tag import TRANSIENT_ERRORS, _staging_uri

    done, existing = IdSet(), IdSet()
    photos = lake.open("photos")
    if photos is not None and cfg.reprocess != "all":
        ds = photos.to_pyarrow_dataset()
        for batch in ds.to_batches(columns=["photo_id", "status", "error_code"]):
            ids = batch.column("photo_id")
            existing.add(IdSet.hashes(ids))
            status = batch.column("status").to_numpy(zero_copy_only=False)
            codes = batch.column("error_code").to_numpy(zero_copy_only=False)
            finished = status == Status.OK.value
            if cfg.reprocess == "none":
                # Permanent errors are finished too: the same bytes would fail the same way tonight.
                finished |= (status == Status.ERROR.value) & ~np.isin(codes, [c.value for c in TRANSIENT_ERRORS])
            finished |= status == Status.SKIPPED.value
            done.add(IdSet.hashes(ids.filter(pa.array(finished))))
    elif photos is not None:
        for batch in photos.to_pyarrow_dataset().to_batches(columns=["photo_id"]):
            existing.add(IdSet.hashes(batch.column("photo_id")))
    forgotten = set(lake.read("tombstones", ["user_id"]).column("user_id").to_pylist())

    staging = _staging_uri(lake, run_id, attempt)
    plan = Plan(todo_uri=join_uri(staging, "todo"), reprocess=cfg.reprocess)
    todo_out = _ShardWriter(plan.todo_uri, "todo", cfg.todo_shard_rows, s3)
    # Ids alone are 32 characters: shards of a million keep their count small at 10^8 photos.
    replace_out = _ShardWriter(join_uri(staging, "replace"), "replace", max(cfg.todo_shard_rows, 1_000_000), s3)
    seen = IdSet()
    rules = OwnerRules(cfg.user_pattern, cfg.profile_pattern)

    for raw in _raw_batches(cfg, s3):
        batch, unowned = to_manifest(raw, rules)
        plan.n_manifest += raw.num_rows
        plan.n_unowned += unowned
        if not batch.num_rows:
            continue
        h = IdSet.hashes(batch.column("photo_id"))
        # first occurrence within this batch and not seen in earlier batches
        _, first = np.unique(h, return_index=True)
        fresh = np.zeros(len(h), dtype=bool)
        fresh[first] = True
        fresh &= ~seen.contains(h)
        plan.n_duplicates += int((~fresh).sum())
        seen.add(h[fresh])
        is_done = done.contains(h)
        plan.n_done_before += int((fresh & is_done).sum())
        users = batch.column("user_id").to_pylist()
        gone = np.array([u in forgotten for u in users], dtype=bool) if forgotten else np.zeros(len(h), bool)
        plan.n_forgotten += int((fresh & ~is_done & gone).sum())
        keep = fresh & ~is_done & ~gone
        if not keep.any():
            continue
        todo = batch.filter(pa.array(keep))
        # A 64-bit hash match may (rarely) be another photo: the commit then removes nothing for it, since it
        # matches rows on the full id.
        replaced = existing.contains(h[keep])
        if replaced.any():
            replace_out.add(pa.table({"photo_id": todo.column("photo_id").filter(pa.array(replaced))}))
            plan.n_replaced += int(replaced.sum())
        plan.n_todo += todo.num_rows
        todo_out.add(todo)
    todo_out.flush()
    replace_out.flush()
    plan.shards = todo_out.shards
    plan.replace_shards = replace_out.shards
    return plan
