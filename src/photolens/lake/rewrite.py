"""Row rewrites of Delta tables: drop the rows a mask selects, keep every other row, in one commit.

Delta files are immutable, so removing rows means: each data file holding some of them is removed and its
other rows are added back as a new file, all in one commit (readers see the table before or after, never
half). Used by ``forget`` (a user's rows in every table) and by reprocessing (the old rows of photos that
are tagged again, in the same commit as their new rows).

Written with pyarrow rather than delta-rs' ``delete``: delta-rs rewrites files with ``string_view`` columns,
which pyarrow dataset filters refuse to compare with plain strings; these rewrites write plain ``string``
columns (and normalise files that delta-rs wrote earlier), and carry Delta file statistics so per-user
reads and deletes keep skipping files.
"""

from __future__ import annotations

import bisect
import datetime as dt
import json
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from deltalake import CommitProperties, DeltaTable, Transaction
from deltalake.transaction import AddAction, RemoveAction

from photolens.lake.storage import S3Settings, filesystem_for

__all__ = [
    "ColumnIn",
    "RewriteResult",
    "RowMask",
    "StatsAccumulator",
    "commit_properties",
    "plain_strings",
    "rewrite_actions",
    "rewrite_rows",
]

_STATS_PREFIX = 16
REWRITE_BATCH = 65_536  # rows per record batch while rewriting a file
# One record batch of a data file (plain string columns, partition columns not included; during a probe
# only the probe columns) -> True for each row to drop.
RowMask = Callable[[pa.Table], np.ndarray]
# A row of ``DeltaTable.get_add_actions(flatten=True)`` (path, size, partition.*, min.*, max.*) -> whether
# the file may hold rows to drop; False skips reading it.
FileFilter = Callable[[Mapping[str, Any]], bool]


@dataclass(frozen=True)
class ColumnIn:
    """Rows whose ``column`` is one of ``values``; files whose min/max statistics exclude every value are
    skipped without being read (tables sorted by that column keep a rewrite to the files that hold it)."""

    column: str
    values: Sequence[str]
    _sorted: tuple[str, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_sorted", tuple(sorted({str(v) for v in self.values})))

    def __call__(self, body: pa.Table) -> np.ndarray:
        if self.column not in body.column_names or not self._sorted:
            return np.zeros(body.num_rows, dtype=bool)
        hit = pc.is_in(body.column(self.column), value_set=pa.array(self._sorted, pa.string()))
        mask: np.ndarray = pc.fill_null(hit, False).to_numpy(zero_copy_only=False)
        return mask

    def may_match(self, add: Mapping[str, Any]) -> bool:
        if not self._sorted:
            return False
        lo, hi = add.get(f"min.{self.column}"), add.get(f"max.{self.column}")
        if not isinstance(lo, str) or not isinstance(hi, str):  # no statistics: read the file
            return True
        # Writers may cut string statistics to a prefix (the max with a tie-breaker appended), so only
        # the first _STATS_PREFIX characters of the max bound anything; a cut min is still a lower bound.
        first = bisect.bisect_left(self._sorted, lo)
        if first == len(self._sorted):
            return False
        v = self._sorted[first]  # the smallest value >= lo: if it is above the max, every later one is
        return v <= hi if len(hi) < _STATS_PREFIX else v[:_STATS_PREFIX] <= hi[:_STATS_PREFIX]


@dataclass(frozen=True)
class RewriteResult:
    """What a rewrite did: its Delta actions (remove + re-add), rows dropped, files rewritten or skipped."""

    actions: list[AddAction | RemoveAction]
    rows_removed: int
    files_rewritten: int
    files_read: int  # read in full (a probe that found nothing does not count)
    files_skipped: int  # excluded by their statistics, never opened
    version: int | None = None  # the commit's version (rewrite_rows), None when nothing was committed


def plain_strings(table: pa.Table) -> pa.Table:
    """``string_view``/``large_string`` columns (delta-rs writes them when it rewrites files) as ``string``."""

    def plain(t: pa.DataType) -> pa.DataType:
        if pa.types.is_string_view(t) or pa.types.is_large_string(t):
            return pa.string()
        if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_list_view(t):
            return pa.list_(plain(t.value_type))
        return t

    target = pa.schema([f.with_type(plain(f.type)) for f in table.schema], metadata=table.schema.metadata)
    return table if target.equals(table.schema) else table.cast(target)


def commit_properties(app_id: str | None, txn_version: int = 1,
                      custom_metadata: Mapping[str, str] | None = None) -> CommitProperties:
    """Commit properties with the app-transaction ``(app_id, txn_version)`` and ``photolens.app_id`` in the
    commit's metadata (the run report and receipts find their commit by it)."""
    meta = dict(custom_metadata or {})
    if app_id:
        meta["photolens.app_id"] = app_id
    return CommitProperties(custom_metadata=meta or None,
                            app_transactions=[Transaction(app_id, txn_version)] if app_id else None)


class StatsAccumulator:
    """Delta file stats (numRecords, min/max, null counts) merged over the record batches of one file."""

    def __init__(self, skip: tuple[str, ...] = ()) -> None:
        self.skip = skip
        self.n = 0
        self.mins: dict[str, Any] = {}
        self.maxs: dict[str, Any] = {}
        self.nulls: dict[str, int] = {}

    def add(self, part: pa.Table) -> None:
        from photolens.lake.delta import file_stats

        doc = json.loads(file_stats(part, self.skip))
        self.n += doc["numRecords"]
        for k, v in doc["nullCount"].items():
            self.nulls[k] = self.nulls.get(k, 0) + v
        for k, v in doc["minValues"].items():
            self.mins[k] = v if k not in self.mins else min(self.mins[k], v)
        for k, v in doc["maxValues"].items():
            self.maxs[k] = v if k not in self.maxs else max(self.maxs[k], v)

    def json(self) -> str:
        return json.dumps({"numRecords": self.n, "minValues": self.mins, "maxValues": self.maxs,
                           "nullCount": self.nulls})


def _rewrite_file(fs: pafs.FileSystem, root: str, add: Mapping[str, Any], drop: RowMask,
                  probe_columns: Sequence[str] | None, partition_by: tuple[str, ...], now_ms: int, tag: str,
                  batch_size: int) -> tuple[list[AddAction | RemoveAction], int, bool]:
    """One file: (its remove + re-add actions, rows dropped, whether it was read in full)."""
    path = add["path"]
    src = f"{root}/{path}"
    if probe_columns:
        # A first pass over the few columns the mask needs: most candidate files hold no dropped row.
        with fs.open_input_file(src) as f:
            pf = pq.ParquetFile(f)
            probe = [c for c in probe_columns if c in pf.schema_arrow.names]
            hits = sum(int(np.count_nonzero(drop(plain_strings(pa.Table.from_batches([b])))))
                       for b in pf.iter_batches(columns=probe, batch_size=batch_size))
        if not hits:
            return [], 0, False
    parts = {k.removeprefix("partition."): None if v is None else str(v)
             for k, v in add.items() if k.startswith("partition.")}
    folder = path.rsplit("/", 1)[0] + "/" if "/" in path else ""
    rel = f"{folder}part-{tag}-{uuid.uuid4().hex[:12]}-{uuid.uuid4().hex[:12]}.parquet"
    stats = StatsAccumulator(skip=partition_by)
    removed = 0
    writer: pq.ParquetWriter | None = None
    sink = None
    try:
        with fs.open_input_file(src) as f:
            pf = pq.ParquetFile(f)
            for batch in pf.iter_batches(batch_size=batch_size):
                body = plain_strings(pa.Table.from_batches([batch]))
                hit = np.asarray(drop(body), dtype=bool)
                removed += int(np.count_nonzero(hit))
                keep = body.filter(pa.array(~hit)) if hit.any() else body
                if not keep.num_rows:
                    continue
                if writer is None:
                    sink = fs.open_output_stream(f"{root}/{rel}")
                    writer = pq.ParquetWriter(sink, keep.schema, compression="zstd")
                writer.write_table(keep)
                stats.add(keep)
    finally:
        if writer is not None:
            writer.close()
        if sink is not None:
            sink.close()
    if not removed:  # nothing to drop after all: the new copy is not needed
        if writer is not None:
            fs.delete_file(f"{root}/{rel}")
        return [], 0, True
    out: list[AddAction | RemoveAction] = [RemoveAction(path, True, now_ms, add["size_bytes"], parts)]
    if writer is not None:
        out.append(AddAction(rel, fs.get_file_info(f"{root}/{rel}").size, parts, now_ms, True, stats.json()))
    return out, removed, True


def rewrite_actions(table: DeltaTable, uri: str, drop: RowMask, *, s3: S3Settings | None = None,
                    may_match: FileFilter | None = None, probe_columns: Sequence[str] | None = None,
                    now_ms: int | None = None, tag: str = "rewrite", threads: int = 1,
                    batch_size: int = REWRITE_BATCH,
                    on_file: Callable[[Mapping[str, Any]], None] | None = None) -> RewriteResult:
    """The remove + re-add actions that drop ``drop``'s rows from every file of ``table`` (nothing committed).

    Memory: one record batch at a time. ``may_match`` (default :meth:`ColumnIn.may_match` for a
    :class:`ColumnIn`) skips files without opening them; with ``probe_columns`` (the columns ``drop`` reads),
    a file is scanned on those columns first and read in full only when it holds a dropped row. New files
    go beside the ones they replace (same partition folder), named ``part-<tag>-<random>.parquet`` (a run's
    id as ``tag`` tells a vacuum whose they are). ``threads``: files rewritten side by side (Parquet I/O
    releases the GIL; useful on object stores). ``on_file`` is called before each candidate file (a long
    rewrite renews its run's lease there).
    """
    fs, root = filesystem_for(uri, s3)
    partition_by = tuple(table.metadata().partition_columns)
    now_ms = int(dt.datetime.now(dt.UTC).timestamp() * 1000) if now_ms is None else now_ms
    if may_match is None and isinstance(drop, ColumnIn):
        may_match = drop.may_match
    if probe_columns is None and isinstance(drop, ColumnIn):
        probe_columns = [drop.column]
    adds = pa.table(table.get_add_actions(flatten=True)).to_pylist()
    candidates = [a for a in adds if may_match is None or may_match(a)]

    def one(add: Mapping[str, Any]) -> tuple[list[AddAction | RemoveAction], int, bool]:
        if on_file is not None:
            on_file(add)
        return _rewrite_file(fs, root, add, drop, probe_columns, partition_by, now_ms, tag, batch_size)

    if threads > 1 and len(candidates) > 1:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            results = list(pool.map(one, candidates))
    else:
        results = [one(a) for a in candidates]
    actions = [a for acts, _, _ in results for a in acts]
    return RewriteResult(actions, sum(n for _, n, _ in results), sum(1 for acts, _, _ in results if acts),
                         sum(1 for _, _, full in results if full), len(adds) - len(candidates))


def rewrite_rows(table: DeltaTable, uri: str, drop: RowMask, *, s3: S3Settings | None = None,
                 may_match: FileFilter | None = None, probe_columns: Sequence[str] | None = None,
                 threads: int = 1, adds: Iterable[AddAction] = (),
                 app_id: str | None = None, txn_version: int = 1,
                 custom_metadata: Mapping[str, str] | None = None, tag: str = "rewrite") -> RewriteResult:
    """Drop ``drop``'s rows from ``table`` (at ``uri``) keeping every other row, in one Delta commit.

    ``adds``: files already written into the table folder that join the same commit (new rows replacing
    the dropped ones). The commit carries the app-transaction ``(app_id, txn_version)`` and
    ``custom_metadata``. Nothing is committed when no row matches and there is nothing to add.
    """
    result = rewrite_actions(table, uri, drop, s3=s3, may_match=may_match, probe_columns=probe_columns,
                             tag=tag, threads=threads)
    actions = [*adds, *result.actions]
    if not actions:
        return result
    partition_by = list(table.metadata().partition_columns)
    table.create_write_transaction(actions, mode="append", schema=table.schema(), partition_by=partition_by or None,
                                   commit_properties=commit_properties(app_id, txn_version, custom_metadata))
    table.update_incremental()
    return RewriteResult(actions, result.rows_removed, result.files_rewritten, result.files_read,
                         result.files_skipped, table.version())
