"""Delta tables of a lake, and the commit protocol that makes a run exactly-once.

Layout: analyst tables at ``<lake>/tables/<name>``; restricted ones (biometric data) under a separate root,
``<restricted>/<name>`` (default ``<lake>/restricted``), so access can be granted per root.

Protocol of a run (``photolens tag``):
1. the run's ledger ``<lake>/_photolens/runs/<run_id>.json`` records the attempt and the driver's lease
   (``photolens.lake.lease``) before any data is written; only one live driver holds a run id;
2. workers write Parquet files into the tables' folders: invisible to readers until committed;
3. the driver commits child tables first (detections, faces), ``photos`` last, each commit carrying the
   app-transaction ``(photolens.tag/<run_id>, attempt)``; the ``photos`` commit is the run's completion; the
   lease is checked right before each commit;
4. a run whose ``photos`` commit is missing and whose driver is gone (lease expired or released) is rolled back
   (:meth:`Lake.rollback`): its child rows go and the rows its commits replaced come back, recorded by the app
   id ``<app_id>#rolled-back``. ``commit_staged`` refuses a later attempt beside rows of an earlier one that
   were never rolled back, and commits nothing for a run whose ``photos`` commit exists, whichever attempt asks.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import math
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake
from deltalake.exceptions import TableNotFoundError
from deltalake.transaction import AddAction, RemoveAction

from photolens.lake.storage import (
    Location,
    S3Settings,
    StorageUnavailableError,
    filesystem_for,
    join_uri,
    read_versioned,
    write_bytes_atomic,
    write_conditional,
)
from photolens.schemas.tables import TABLES, SchemaMismatchError, TableSpec, conform, diff_schemas

log = logging.getLogger(__name__)

# The table whose commit completes a run (protocol step 3): once it carries a run's app id, the run is done.
COMPLETION_TABLE = "photos"
# The app id whose transaction version records the newest attempt of a run rolled back from a table.
ROLLBACK_SUFFIX = "#rolled-back"
# Reads of small documents (ledgers, receipts): attempts and the first back-off delay (doubling).
READ_ATTEMPTS = 5
READ_BASE_DELAY_S = 0.2


class LakeUnavailableError(StorageUnavailableError):
    """A lake document could not be read after retries: absent and unreadable are never confused."""


class UnrolledAttemptError(RuntimeError):
    """A child table still holds rows of an earlier attempt of the same run: committing would double them."""
# Columns whose min/max go into the Delta stats, so readers and per-user deletes can skip files.
_STATS_TYPES = (pa.types.is_integer, pa.types.is_floating, pa.types.is_timestamp, pa.types.is_string,
                pa.types.is_boolean)


@dataclass(frozen=True)
class StagedFile:
    """A Parquet file written into a table folder, not yet part of the table."""

    table: str
    path: str  # relative to the table root
    size: int
    num_rows: int
    partition_values: dict[str, str | None]
    stats: str

    def to_dict(self) -> dict[str, Any]:
        return {"table": self.table, "path": self.path, "size": self.size, "num_rows": self.num_rows,
                "partition_values": self.partition_values, "stats": self.stats}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StagedFile:
        return cls(d["table"], d["path"], int(d["size"]), int(d["num_rows"]), dict(d["partition_values"]),
                   d["stats"])


@dataclass(frozen=True)
class Replacement:
    """Rows a commit removes: those whose ``column`` value is in the Parquet ``shards`` (one column, same name).

    ``where``: (column, value) pairs every replaced row satisfies; files whose min/max stats exclude them are
    not opened, and rows that fail them are kept. ``run_id`` names the rewritten files, so a vacuum can tell
    whose they are.
    """

    column: str
    shards: tuple[str, ...]
    n: int
    where: tuple[tuple[str, str], ...] = ()
    run_id: str | None = None


_HEX = np.full(256, 255, dtype=np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEX[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _HEX[_c] = 10 + _i


def _hex128(values: pa.Array) -> np.ndarray | None:
    """32-hex-digit strings (photo ids) as 16-byte keys (``S16``); None when some value is not one."""
    if pa.types.is_string_view(values.type) or pa.types.is_large_string(values.type):
        values = values.cast(pa.string())
    if not pa.types.is_string(values.type) or values.null_count:
        return None
    n = len(values)
    if n == 0:
        return np.empty(0, dtype="S16")
    _, offsets_buf, data_buf = values.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=np.int32, count=n + 1, offset=values.offset * 4)
    if not (np.diff(offsets) == 32).all():
        return None
    data = np.frombuffer(data_buf, dtype=np.uint8)[offsets[0] : offsets[0] + 32 * n].reshape(n, 32)
    nibbles = _HEX[data]
    if (nibbles == 255).any():
        return None
    packed = np.ascontiguousarray((nibbles[:, 0::2] << 4) | nibbles[:, 1::2])
    return packed.view("S16").ravel()


class KeySet:
    """The values of a replacement's shards, for membership tests: 16 bytes a photo id.

    Photo ids (32 hex digits) are held as sorted 16-byte keys, exact (no hashing) and several times smaller
    than Arrow or Python strings; other values fall back to an Arrow string set.
    """

    def __init__(self, keys: np.ndarray | None, strings: pa.Array | None) -> None:
        self._keys, self._strings = keys, strings

    @classmethod
    def load(cls, shards: tuple[str, ...], column: str, s3: S3Settings | None) -> KeySet:
        parts: list[np.ndarray] = []
        strings: list[pa.Array] = []
        for uri in shards:
            fs, path = filesystem_for(uri, s3)
            with fs.open_input_file(path) as f:
                col = pq.read_table(f, columns=[column]).column(column)
            for chunk in col.chunks:
                keys = None if strings else _hex128(chunk)
                if keys is None:
                    strings.append(chunk.cast(pa.string()))
                else:
                    parts.append(keys)
        if strings:  # not all photo ids: exact string matching for everything
            strings += [pa.array([k.hex() for k in p.tolist()], pa.string()) for p in parts]
            return cls(None, pa.concat_arrays(strings).unique())
        keys = np.concatenate(parts) if parts else np.empty(0, dtype="S16")
        keys.sort()
        return cls(keys, None)

    def __len__(self) -> int:
        return len(self._keys) if self._keys is not None else len(self._strings or [])

    def contains(self, values: pa.Array | pa.ChunkedArray) -> np.ndarray:
        if isinstance(values, pa.ChunkedArray):
            parts = [self.contains(c) for c in values.chunks]
            return np.concatenate(parts) if parts else np.zeros(0, dtype=bool)
        if self._strings is not None:
            found: np.ndarray = pc.is_in(values.cast(pa.string()), value_set=self._strings).to_numpy(
                zero_copy_only=False)
            return found
        assert self._keys is not None
        if not len(self._keys):
            return np.zeros(len(values), dtype=bool)
        keys = _hex128(values)
        if keys is None:
            # Some value is no photo id (32 hex digits); such a value is in no set of photo ids.
            vals = values.to_pylist()
            ok = np.array([isinstance(v, str) and _is_hex32(v) for v in vals], dtype=bool)
            out = np.zeros(len(vals), dtype=bool)
            if ok.any():
                out[ok] = self._member(np.array([bytes.fromhex(v) for v, o in zip(vals, ok, strict=True) if o],
                                                dtype="S16"))
            return out
        return self._member(keys)

    def _member(self, keys: np.ndarray) -> np.ndarray:
        assert self._keys is not None
        pos = np.searchsorted(self._keys, keys)
        np.minimum(pos, len(self._keys) - 1, out=pos)
        hits: np.ndarray = self._keys[pos] == keys
        return hits


def _is_hex32(v: str) -> bool:
    return len(v) == 32 and all(c in "0123456789abcdefABCDEF" for c in v)


def _stat_value(v: Any) -> Any:
    if isinstance(v, dt.datetime):
        return v.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    return v


def file_stats(table: pa.Table, skip: tuple[str, ...] = ()) -> str:
    mins: dict[str, Any] = {}
    maxs: dict[str, Any] = {}
    nulls: dict[str, int] = {}
    for name in table.column_names:
        if name in skip:
            continue
        col = table.column(name)
        nulls[name] = col.null_count
        if any(check(col.type) for check in _STATS_TYPES) and col.null_count < len(col):
            mm = pc.min_max(col)
            lo, hi = mm["min"].as_py(), mm["max"].as_py()
            if isinstance(lo, float) and (math.isnan(lo) or math.isnan(hi)):
                continue
            mins[name], maxs[name] = _stat_value(lo), _stat_value(hi)
    return json.dumps({"numRecords": table.num_rows, "minValues": mins, "maxValues": maxs, "nullCount": nulls})


_LEASE_LOCK = threading.Lock()
_LEASE_TOUCHED: dict[str, float] = {}
_LEASE_MIN_INTERVAL_S = 5.0
_REWRITE_BATCH = 65_536
_REWRITE_THREADS = 4


def _stats_may_hold(add: Mapping[str, Any], column: str, value: str) -> bool:
    """False only when the file's min/max stats of ``column`` exclude ``value`` (no stats: it may)."""
    lo, hi = add.get(f"min.{column}"), add.get(f"max.{column}")
    if lo is None or hi is None:
        return True
    return str(lo) <= value <= str(hi)


class Lake:
    """The tables of one lake root (local or s3://), with the restricted root beside it."""

    def __init__(self, root: str, restricted_root: str | None = None, s3: S3Settings | None = None) -> None:
        self.root = Location.parse(root).uri
        self.restricted_root = Location.parse(restricted_root).uri if restricted_root else join_uri(root, "restricted")
        self.s3 = s3

    # ---------------------------------------------------------------- locations
    def spec(self, name: str) -> TableSpec:
        try:
            return TABLES[name]
        except KeyError:
            raise KeyError(f"unknown table {name!r}; known: {sorted(TABLES)}") from None

    def table_uri(self, name: str) -> str:
        spec = self.spec(name)
        return join_uri(self.restricted_root if spec.restricted else join_uri(self.root, "tables"), name)

    def meta_uri(self, *parts: str) -> str:
        return join_uri(self.root, "_photolens", *parts)

    def storage_options(self) -> dict[str, str] | None:
        if not Location.parse(self.root).is_s3 and not Location.parse(self.restricted_root).is_s3:
            return None
        from photolens.lake.storage import s3_settings

        return (self.s3 or s3_settings()).delta_options()

    # ---------------------------------------------------------------- tables
    def open(self, name: str) -> DeltaTable | None:
        try:
            return DeltaTable(self.table_uri(name), storage_options=self.storage_options())
        except TableNotFoundError:
            return None

    def check_schema(self, name: str) -> None:
        """Stop before any commit when a table on disk was written with another schema."""
        table = self.open(name)
        if table is None:
            return
        spec = self.spec(name)
        found = pa.schema(table.schema().to_arrow())
        diffs = diff_schemas(spec.schema, found)
        if diffs:
            raise SchemaMismatchError(
                f"table {name!r} at {self.table_uri(name)} does not match schema v{spec.version}: "
                + "; ".join(diffs)
                + ". Migrate it (or point --lake elsewhere) before running this version."
            )

    def ensure(self, name: str) -> DeltaTable:
        table = self.open(name)
        if table is not None:
            return table
        spec = self.spec(name)
        return DeltaTable.create(
            self.table_uri(name),
            schema=spec.schema,
            mode="ignore",
            partition_by=list(spec.partition_by) or None,
            name=name,
            description=f"photolens {name}, schema v{spec.version}",
            storage_options=self.storage_options(),
        )

    def read(self, name: str, columns: list[str] | None = None, filters: Any = None) -> pa.Table:
        table = self.open(name)
        if table is None:
            empty = self.spec(name).schema.empty_table()
            return empty.select(columns) if columns else empty
        ds = table.to_pyarrow_dataset()
        try:
            return ds.to_table(columns=columns, filter=filters)
        except pa.ArrowNotImplementedError:
            # Files rewritten by delta-rs (delete, overwrite with a predicate) carry string_view columns,
            # which pyarrow's dataset filters refuse to compare with plain strings: filter in memory.
            data = ds.to_table().filter(filters)
            return data.select(columns) if columns else data

    def version(self, name: str) -> int | None:
        table = self.open(name)
        return None if table is None else table.version()

    def append(self, name: str, data: pa.Table, app_id: str | None = None, txn_version: int = 1,
               custom_metadata: dict[str, str] | None = None) -> int | None:
        """Append rows in one commit; with ``app_id``, a second call with the same id commits nothing."""
        spec = self.spec(name)
        table = self.ensure(name)
        if app_id is not None and (table.transaction_version(app_id) or 0) >= txn_version:
            return None
        data = conform(data, spec.schema)
        if spec.sort_by and data.num_rows:
            data = data.sort_by([(c, "ascending") for c in spec.sort_by])
        write_deltalake(
            table,
            data,
            mode="append",
            partition_by=list(spec.partition_by) or None,
            commit_properties=_props(app_id, txn_version, custom_metadata),
        )
        table.update_incremental()
        return table.version()

    # ---------------------------------------------------------------- staged writes (workers) + commit (driver)
    def lease_uri(self, run_id: str) -> str:
        return self.meta_uri("leases", f"{run_id}.json")

    def touch_lease(self, run_id: str) -> None:
        """Mark ``run_id`` as alive now: its staged, not yet committed files are not orphans.

        At most one write per run every few seconds per process (rewrite threads call it per file).
        """
        now = time.monotonic()
        with _LEASE_LOCK:
            if now - _LEASE_TOUCHED.get(run_id, -1e9) < _LEASE_MIN_INTERVAL_S:
                return
            _LEASE_TOUCHED[run_id] = now
            self.put_json(self.lease_uri(run_id), {"run_id": run_id, "at": dt.datetime.now(dt.UTC).isoformat()})

    def stage(self, name: str, data: pa.Table, tag: str) -> list[StagedFile]:
        """Write ``data`` as Parquet file(s) in the table's folder; nothing is visible until ``commit_staged``."""
        if data.num_rows == 0:
            return []
        spec = self.spec(name)
        data = conform(data, spec.schema)
        fs, root = filesystem_for(self.table_uri(name), self.s3)
        groups: list[tuple[dict[str, str | None], pa.Table]]
        if spec.partition_by:
            keys = data.select(list(spec.partition_by)).group_by(list(spec.partition_by)).aggregate([])
            groups = []
            for row in keys.to_pylist():
                mask = None
                for col, val in row.items():
                    m = pc.is_null(data.column(col)) if val is None else pc.equal(data.column(col), val)
                    mask = m if mask is None else pc.and_(mask, m)
                groups.append(({k: None if v is None else str(v) for k, v in row.items()}, data.filter(mask)))
        else:
            groups = [({}, data)]
        out = []
        for values, part in groups:
            if spec.sort_by:
                part = part.sort_by([(c, "ascending") for c in spec.sort_by])
            folder = "/".join(f"{k}={v if v is not None else '__HIVE_DEFAULT_PARTITION__'}" for k, v in values.items())
            rel = (folder + "/" if folder else "") + f"part-{tag}-{uuid.uuid4().hex[:12]}.parquet"
            body = part.drop_columns(list(spec.partition_by)) if spec.partition_by else part
            if not Location.parse(self.table_uri(name)).is_s3:
                fs.create_dir(f"{root}/{folder}" if folder else root, recursive=True)
            with fs.open_output_stream(f"{root}/{rel}") as f:
                pq.write_table(body, f, compression="zstd")
            size = fs.get_file_info(f"{root}/{rel}").size
            out.append(StagedFile(name, rel, size, part.num_rows, values, file_stats(body)))
        return out

    def commit_staged(self, name: str, files: list[StagedFile], app_id: str, txn_version: int,
                      custom_metadata: dict[str, str] | None = None,
                      replace: Replacement | None = None) -> int | None:
        """One Delta commit adding ``files``; returns the new version, or None when this txn already landed.

        ``replace``: rows whose ``replace.column`` is among the values of its shards are removed in the same
        commit (their files are rewritten without them, one file at a time), so a reprocessed photo keeps
        exactly one row.
        """
        spec = self.spec(name)
        table = self.ensure(name)
        prior = table.transaction_version(app_id)
        if (prior or 0) >= txn_version:
            return None
        # The run already completed under another attempt (a twin driver of the same run id, whose higher
        # attempt number would pass the check above): its rows are in, commit nothing more of it.
        if self.committed_version(COMPLETION_TABLE, app_id) is not None:
            return None
        # An earlier attempt of this app id committed here: its rows must have been rolled back first, or
        # this commit would add the same photos' rows a second time.
        if prior is not None and (table.transaction_version(app_id + ROLLBACK_SUFFIX) or 0) < prior:
            raise UnrolledAttemptError(
                f"{name}: attempt {prior} of {app_id} committed rows that were never rolled back; attempt "
                f"{txn_version} refuses to add its own beside them (recovery rolls them back first)")
        custom_metadata = {**(custom_metadata or {}), "photolens.attempt": str(txn_version)}
        now_ms = int(dt.datetime.now(dt.UTC).timestamp() * 1000)
        actions: list[AddAction | RemoveAction] = [
            AddAction(f.path, f.size, f.partition_values, now_ms, True, f.stats) for f in files
        ]
        if replace is not None and replace.n:
            actions += self._rewrite_without(name, table, replace, now_ms)
        table.create_write_transaction(
            actions,
            mode="append",
            schema=table.schema(),
            partition_by=list(spec.partition_by) or None,
            commit_properties=_props(app_id, txn_version, custom_metadata),
        )
        table.update_incremental()
        return table.version()

    def _rewrite_without(self, name: str, table: DeltaTable, replace: Replacement,
                         now_ms: int) -> list[AddAction | RemoveAction]:
        """Remove + re-add actions for every file that holds a replaced row.

        Memory: the replaced keys (16 bytes each) and one record batch at a time; files whose stats exclude
        ``replace.where`` are not opened, the others are scanned on the key columns first and streamed
        through a rewrite only when they hold a replaced row (``photolens.lake.rewrite``).
        """
        keys = KeySet.load(replace.shards, replace.column, self.s3)
        if not len(keys):
            return []
        from photolens.lake.rewrite import rewrite_actions

        def touch(_add: Any) -> None:
            if replace.run_id:  # a long rewrite must not let a vacuum take the run's staged files
                self.touch_lease(replace.run_id)

        # Files are independent: a few at a time keeps the object store busy (Parquet I/O releases the GIL).
        return rewrite_actions(
            table, self.table_uri(name), lambda body: self._hits(body, keys, replace), s3=self.s3,
            may_match=lambda add: all(_stats_may_hold(add, col, val) for col, val in replace.where),
            probe_columns=[replace.column, *(c for c, _ in replace.where)], now_ms=now_ms,
            tag=replace.run_id or "rewrite", threads=_REWRITE_THREADS, batch_size=_REWRITE_BATCH, on_file=touch,
        ).actions

    @staticmethod
    def _hits(batch: pa.RecordBatch, keys: KeySet, replace: Replacement) -> np.ndarray:
        hit = keys.contains(batch.column(replace.column))
        for col, val in replace.where:
            hit &= pc.fill_null(pc.equal(batch.column(col), val), False).to_numpy(zero_copy_only=False)
        return hit

    def committed_version(self, name: str, app_id: str) -> int | None:
        table = self.open(name)
        return None if table is None else table.transaction_version(app_id)

    def delete_where(self, name: str, predicate: str, app_id: str | None = None, txn_version: int = 1) -> int:
        table = self.open(name)
        if table is None:
            return 0
        metrics = table.delete(predicate, commit_properties=_props(app_id, txn_version, None))
        return int(metrics.get("num_deleted_rows", 0) or 0)

    def commit_metadata(self, name: str, app_id: str) -> dict[str, Any] | None:
        """The custom metadata of the commit that carried ``app_id`` (the run report rides on it)."""
        table = self.open(name)
        if table is None:
            return None
        for entry in table.history():
            if entry.get("photolens.app_id") == app_id:
                return entry
        return None

    # ---------------------------------------------------------------- rollback of an incomplete run
    def rollback(self, name: str, app_id: str, run_id: str) -> dict[str, Any] | None:
        """Undo the commit an incomplete run (no completion commit) made to table ``name``.

        Its rows go, and rows its commit removed (the old rows of photos it reprocessed) come back. When
        nothing else committed to the table since, that is a Delta ``restore`` to the version before; otherwise
        one commit removes the run's rows and re-adds, from the files the run's commit removed (read from the
        Delta log), the rows of photos that have no rows now and whose ``photos`` row is still the run that
        wrote them. The commit carries the app id ``<app_id>#rolled-back`` at the rolled-back attempt, so a
        repeated rollback does nothing and a later attempt of the run may commit. Returns what was done, or
        None when there was nothing to undo.
        """
        table = self.open(name)
        if table is None or not self.needs_rollback(name, app_id, table):
            return None
        attempt = table.transaction_version(app_id)
        assert attempt is not None
        version = None
        for entry in sorted(table.history(), key=lambda e: -int(e["version"])):
            if entry.get("photolens.app_id") == app_id and entry.get("photolens.attempt", str(attempt)) == str(attempt):
                version = int(entry["version"])
                break
        props = _props(app_id + ROLLBACK_SUFFIX, attempt, {"photolens.rollback_of": app_id,
                                                            "photolens.run_id": run_id})
        if version is not None and version == table.version():
            table.restore(version - 1, commit_properties=props)
            table.update_incremental()
            return {"table": name, "attempt": attempt, "how": "restore", "to_version": version - 1,
                    "version": table.version()}
        return self._rollback_rows(name, table, run_id, attempt, version, props)

    def needs_rollback(self, name: str, app_id: str, table: DeltaTable | None = None) -> bool:
        """Whether ``app_id`` committed to ``name`` in an attempt that was not rolled back since."""
        table = table if table is not None else self.open(name)
        if table is None:
            return False
        attempt = table.transaction_version(app_id)
        return attempt is not None and (table.transaction_version(app_id + ROLLBACK_SUFFIX) or 0) < attempt

    def _rollback_rows(self, name: str, table: DeltaTable, run_id: str, attempt: int, version: int | None,
                       props: CommitProperties) -> dict[str, Any]:
        spec = self.spec(name)
        now_ms = int(dt.datetime.now(dt.UTC).timestamp() * 1000)
        shard = self.meta_uri("staging", run_id, f"rollback-{name}-{uuid.uuid4().hex[:8]}.parquet")
        fs, shard_path = filesystem_for(shard, self.s3)
        if not Location.parse(shard).is_s3:
            fs.create_dir(shard_path.rsplit("/", 1)[0], recursive=True)
        pq.write_table(pa.table({"run_id": pa.array([run_id], pa.string())}), shard_path, filesystem=fs)
        actions: list[AddAction | RemoveAction] = list(self._rewrite_without(
            name, table, Replacement("run_id", (shard,), 1, (("run_id", run_id),)), now_ms))
        restored = self._rows_removed_by(name, table, version) if version is not None else None
        n_restored = 0
        if restored is not None and restored.num_rows:
            ids = pc.unique(restored.column("photo_id"))
            now = self.read(name, ["photo_id", "run_id"], pc.field("photo_id").isin(ids))
            still = set(now.filter(pc.not_equal(now.column("run_id"), run_id)).column("photo_id").to_pylist())
            owners = self.read(COMPLETION_TABLE, ["photo_id", "run_id"], pc.field("photo_id").isin(ids))
            owner = dict(zip(owners.column("photo_id").to_pylist(), owners.column("run_id").to_pylist(),
                             strict=True))
            keep = [pid not in still and owner.get(pid) == rid for pid, rid in
                    zip(restored.column("photo_id").to_pylist(), restored.column("run_id").to_pylist(), strict=True)]
            restored = restored.filter(pa.array(keep, pa.bool_()))
            n_restored = restored.num_rows
            for f in self.stage(name, restored, f"restore-{run_id}"):
                actions.append(AddAction(f.path, f.size, f.partition_values, now_ms, True, f.stats))
        with contextlib.suppress(OSError):
            fs.delete_file(shard_path)
        if actions:
            table.create_write_transaction(actions, mode="append", schema=table.schema(),
                                           partition_by=list(spec.partition_by) or None, commit_properties=props)
        else:  # nothing to change, but the rollback must still be recorded
            write_deltalake(table, spec.schema.empty_table(), mode="append",
                            partition_by=list(spec.partition_by) or None, commit_properties=props)
        table.update_incremental()
        return {"table": name, "attempt": attempt, "how": "rows", "rows_restored": n_restored,
                "version": table.version()}

    def _rows_removed_by(self, name: str, table: DeltaTable, version: int) -> pa.Table:
        """The rows of every file that commit ``version`` removed, with their partition columns."""
        spec = self.spec(name)
        log_fs, log_path = filesystem_for(join_uri(self.table_uri(name), "_delta_log", f"{version:020d}.json"),
                                          self.s3)
        with log_fs.open_input_stream(log_path) as f:
            entries = [json.loads(line) for line in f.read().decode().splitlines() if line.strip()]
        removes = [e["remove"] for e in entries if "remove" in e]
        live = set(pa.table(table.get_add_actions(flatten=True)).column("path").to_pylist())
        fs, root = filesystem_for(self.table_uri(name), self.s3)
        parts = []
        for rm in removes:
            if rm["path"] in live:
                continue
            with fs.open_input_file(f"{root}/{rm['path']}") as f:
                body = pq.read_table(f)
            for col, value in (rm.get("partitionValues") or {}).items():
                if col not in body.column_names:
                    body = body.append_column(col, pa.array([value] * body.num_rows, pa.string()))
            parts.append(conform(body, spec.schema))
        return pa.concat_tables(parts) if parts else spec.schema.empty_table()

    # ---------------------------------------------------------------- small JSON documents (ledger, receipts)
    def put_json(self, uri: str, doc: Any) -> None:
        write_bytes_atomic(uri, _dumps(doc), self.s3)

    def put_json_conditional(self, uri: str, doc: Any, *, if_absent: bool = False, if_match: str | None = None) -> str:
        """Write only if absent or still at version ``if_match``; returns the new version
        (:class:`~photolens.lake.storage.PreconditionFailedError` when the condition does not hold)."""
        return write_conditional(uri, _dumps(doc), self.s3, if_absent=if_absent, if_match=if_match)

    def get_json(self, uri: str) -> Any | None:
        """The document, or None when it does not exist; a store that fails to answer is retried with
        back-off and then raises :class:`LakeUnavailableError`, never read as "absent"."""
        found = self.get_json_versioned(uri)
        return None if found is None else found[0]

    def get_json_versioned(self, uri: str) -> tuple[Any, str] | None:
        delay, last = READ_BASE_DELAY_S, ""
        for attempt in range(1, READ_ATTEMPTS + 1):
            try:
                found = read_versioned(uri, self.s3)
                if found is None:
                    return None
                return json.loads(found.data), found.etag
            except (StorageUnavailableError, json.JSONDecodeError, UnicodeDecodeError) as exc:
                last = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
                log.warning("reading %s failed (attempt %d of %d): %s", uri, attempt, READ_ATTEMPTS, last)
            if attempt < READ_ATTEMPTS:
                time.sleep(delay)
                delay *= 2
        raise LakeUnavailableError(f"cannot read {uri} after {READ_ATTEMPTS} attempts ({last}); stopping rather "
                                   "than treating it as absent")


def _dumps(doc: Any) -> bytes:
    return json.dumps(doc, indent=2, sort_keys=True, default=str).encode()

def _props(app_id: str | None, version: int, custom: dict[str, str] | None) -> CommitProperties:
    meta = dict(custom or {})
    if app_id:
        meta["photolens.app_id"] = app_id
    return CommitProperties(
        custom_metadata=meta or None,
        app_transactions=[Transaction(app_id, version)] if app_id else None,
    )
