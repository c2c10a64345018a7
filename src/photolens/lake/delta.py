"""Delta tables of a lake, and the commit protocol that makes a run exactly-once.

Layout: analyst tables at ``<lake>/tables/<name>``; restricted ones (biometric data) under a separate root,
``<restricted>/<name>`` (default ``<lake>/restricted``), so access can be granted per root.

Protocol of a run (``photolens tag``):
1. a ledger entry ``<lake>/_photolens/runs/<run_id>.json`` records the attempt before any data is written;
2. workers write Parquet files into the tables' folders: invisible to readers until committed;
3. the driver commits child tables first (detections, faces), ``photos`` last, each commit carrying the
   app-transaction ``(photolens.tag/<run_id>, attempt)``; the ``photos`` commit is the run's completion;
4. a restarted run whose ``photos`` commit is missing first deletes the rows its earlier attempt committed to
   child tables, so a crash between commits never leaves duplicates; a run whose ``photos`` commit exists
   commits nothing again, whichever attempt asks (``commit_staged`` checks the completion itself, so a second
   driver started with the same run id while the first was still running cannot add its rows again).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake
from deltalake.exceptions import TableNotFoundError
from deltalake.transaction import AddAction, RemoveAction

from photolens.lake.storage import Location, S3Settings, filesystem_for, join_uri, read_bytes, write_bytes_atomic
from photolens.schemas.tables import TABLES, SchemaMismatchError, TableSpec, conform, diff_schemas

# The table whose commit completes a run (protocol step 3): once it carries a run's app id, the run is done.
COMPLETION_TABLE = "photos"
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
                      replace: tuple[str, list[str]] | None = None) -> int | None:
        """One Delta commit adding ``files``; returns the new version, or None when this txn already landed.

        ``replace=(column, values)``: rows whose ``column`` is in ``values`` are removed in the same commit
        (their files are rewritten without them), so a reprocessed photo keeps exactly one row.
        """
        spec = self.spec(name)
        table = self.ensure(name)
        if (table.transaction_version(app_id) or 0) >= txn_version:
            return None
        # The run already completed under another attempt (a twin driver of the same run id, whose higher
        # attempt number would pass the check above): its rows are in, commit nothing more of it.
        if self.committed_version(COMPLETION_TABLE, app_id) is not None:
            return None
        now_ms = int(dt.datetime.now(dt.UTC).timestamp() * 1000)
        actions: list[AddAction | RemoveAction] = [
            AddAction(f.path, f.size, f.partition_values, now_ms, True, f.stats) for f in files
        ]
        if replace and replace[1]:
            actions += self._rewrite_without(name, table, replace[0], replace[1], now_ms)
        table.create_write_transaction(
            actions,
            mode="append",
            schema=table.schema(),
            partition_by=list(spec.partition_by) or None,
            commit_properties=_props(app_id, txn_version, custom_metadata),
        )
        table.update_incremental()
        return table.version()

    def _rewrite_without(self, name: str, table: DeltaTable, column: str, values: list[str],
                         now_ms: int) -> list[AddAction | RemoveAction]:
        """Remove + re-add actions for every file that holds one of ``values`` in ``column``."""
        spec = self.spec(name)
        value_set = pa.array(sorted(set(values)), pa.string())
        fs, root = filesystem_for(self.table_uri(name), self.s3)
        actions: list[AddAction | RemoveAction] = []
        adds = pa.table(table.get_add_actions(flatten=True)).to_pylist()
        for add in adds:
            path = add["path"]
            with fs.open_input_file(f"{root}/{path}") as f:
                body = pq.read_table(f)
            hit = pc.is_in(body.column(column), value_set=value_set)
            if not pc.any(hit).as_py():
                continue
            parts = {k.removeprefix("partition."): v for k, v in add.items() if k.startswith("partition.")}
            parts = {k: None if v is None else str(v) for k, v in parts.items()}
            actions.append(RemoveAction(path, True, now_ms, add["size_bytes"], parts))
            keep = body.filter(pc.invert(hit))
            if keep.num_rows:
                folder = path.rsplit("/", 1)[0] if "/" in path else ""
                rel = (folder + "/" if folder else "") + f"part-rewrite-{uuid.uuid4().hex[:12]}.parquet"
                with fs.open_output_stream(f"{root}/{rel}") as f:
                    pq.write_table(keep, f, compression="zstd")
                size = fs.get_file_info(f"{root}/{rel}").size
                actions.append(AddAction(rel, size, parts, now_ms, True,
                                         file_stats(keep, skip=tuple(spec.partition_by))))
        return actions

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

    # ---------------------------------------------------------------- small JSON documents (ledger, receipts)
    def put_json(self, uri: str, doc: Any) -> None:
        write_bytes_atomic(uri, json.dumps(doc, indent=2, sort_keys=True, default=str).encode(), self.s3)

    def get_json(self, uri: str) -> Any | None:
        try:
            return json.loads(read_bytes(uri, self.s3))
        except (FileNotFoundError, OSError):
            return None


def _props(app_id: str | None, version: int, custom: dict[str, str] | None) -> CommitProperties:
    meta = dict(custom or {})
    if app_id:
        meta["photolens.app_id"] = app_id
    return CommitProperties(
        custom_metadata=meta or None,
        app_transactions=[Transaction(app_id, version)] if app_id else None,
    )
