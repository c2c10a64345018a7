"""Table maintenance: ``photolens optimize`` (compaction, optional z-order) and ``photolens vacuum``.

``vacuum`` does what Delta's own VACUUM does (deletes files that commits removed, once they are older than the
table's retention) and what it does not: it deletes **orphaned staged files**, Parquet files in a table's folder
that no entry of its Delta log references. Those are the files staged by runs that crashed before their commit,
by a twin driver that lost the race, or by a rewrite whose commit failed; in the restricted root they hold face
embeddings, which must not outlive a failed run. The run's temporary folder ``_photolens/staging/<run_id>``
(todo and replace shards) goes the same way.

A file is an orphan only when (1) no log entry (JSON commit or checkpoint, add or remove) names it, (2) it is
older than ``--older-than`` (the lease expiry, default 1 h) and (3) the run that staged it (named in the file) is
not alive: a run is alive while its driver's lease in the ledger (``photolens.lake.lease``) is live, or while
its staging lease (``_photolens/leases/<run_id>.json``, renewed by every write batch and every file a commit
rewrites) or its ledger entry, still ``started``, is younger than the lease expiry. A file that some commit
references is never touched by this pass.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import sys
import time
import urllib.parse
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pyarrow.fs import FileInfo, FileSystem

    from photolens.lake.delta import Lake

__all__ = ["OptimizeConfig", "VacuumConfig", "optimize", "register", "vacuum"]

# part-<run_id>-<12 hex>-<12 hex>.parquet: Lake.stage's and the replace rewrite's names.
_STAGED_NAME = re.compile(r"^part-(?P<run>.+)-[0-9a-f]{12}-[0-9a-f]{12}\.parquet$")


class MaintenanceConfigError(ValueError):
    """A maintenance job's configuration cannot work; the message says what to fix."""


def _tables(lake: Lake, names: tuple[str, ...]) -> list[str]:
    from photolens.schemas.tables import TABLES

    unknown = sorted(set(names) - set(TABLES))
    if unknown:
        raise MaintenanceConfigError(f"unknown table(s) {unknown}; known: {', '.join(sorted(TABLES))}")
    return list(names) if names else sorted(TABLES)


# ---------------------------------------------------------------------------------------------- optimize


@dataclass(frozen=True)
class OptimizeConfig:
    lake: str
    restricted_lake: str | None = None
    tables: tuple[str, ...] = ()  # default: every table of the lake that exists
    z_order: bool = False  # z-order by user_id (a full rewrite) instead of compacting small files only
    target_file_mib: float = 256.0

    def validate(self) -> OptimizeConfig:
        if not self.lake:
            raise MaintenanceConfigError("optimize needs --lake")
        if self.target_file_mib <= 0:
            raise MaintenanceConfigError("--target-file-mib must be > 0")
        return self


def optimize(cfg: OptimizeConfig) -> dict[str, Any]:
    """Compact each table's small files into files of about ``target_file_mib`` (or z-order by user_id).

    Rows are unchanged: Delta's optimize rewrites files and removes the old ones in one commit (the old ones
    stay on disk for time travel until ``vacuum``). Per-user deletes (``forget``) skip files by user_id stats,
    which z-ordering keeps tight.
    """
    from deltalake import CommitProperties

    from photolens.lake.delta import Lake

    cfg.validate()
    lake = Lake(cfg.lake, cfg.restricted_lake)
    target = int(cfg.target_file_mib * 2**20)
    out: dict[str, Any] = {"job": "optimize", "tables": {}}
    for name in _tables(lake, cfg.tables):
        table = lake.open(name)
        if table is None:
            continue
        before = len(table.file_uris())
        props = CommitProperties(custom_metadata={"photolens.job": "optimize"})
        columns = [f.name for f in table.schema().to_arrow()]
        if cfg.z_order and "user_id" in columns:
            metrics = table.optimize.z_order(["user_id"], target_size=target, commit_properties=props)
            mode = "z_order(user_id)"
        else:
            metrics = table.optimize.compact(target_size=target, commit_properties=props)
            mode = "compact"
        table.update_incremental()
        out["tables"][name] = {"mode": mode, "files_before": before, "files_after": len(table.file_uris()),
                               "files_added": int(metrics.get("numFilesAdded", 0) or 0),
                               "files_removed": int(metrics.get("numFilesRemoved", 0) or 0),
                               "version": table.version()}
    return out


# ---------------------------------------------------------------------------------------------- vacuum


@dataclass(frozen=True)
class VacuumConfig:
    lake: str
    restricted_lake: str | None = None
    tables: tuple[str, ...] = ()
    older_than_hours: float = 1.0  # the lease expiry: staged files younger than this, or of a live run, stay
    retention_hours: int | None = None  # Delta's retention of removed files (None: the table's, 7 days)
    dry_run: bool = False

    def validate(self) -> VacuumConfig:
        if not self.lake:
            raise MaintenanceConfigError("vacuum needs --lake")
        if self.older_than_hours < 0 or (self.retention_hours is not None and self.retention_hours < 0):
            raise MaintenanceConfigError("--older-than and --retention-hours must be >= 0")
        return self


def _list(fs: FileSystem, path: str) -> list[FileInfo]:
    from pyarrow.fs import FileSelector, FileType

    try:
        infos = fs.get_file_info(FileSelector(path, recursive=True, allow_not_found=True))
    except FileNotFoundError:
        return []
    return [i for i in infos if i.type == FileType.File]


def _mtime(info: FileInfo) -> float:
    m = info.mtime
    if m is None:
        return time.time()  # unknown age: treat as new, never as an orphan
    if m.tzinfo is None:
        m = m.replace(tzinfo=dt.UTC)
    return m.timestamp()


def _log_paths(fs: FileSystem, root: str) -> set[str]:
    """Every data file path (relative, decoded) that an add or remove action in the Delta log names."""
    import pyarrow.parquet as pq

    paths: set[str] = set()
    for info in _list(fs, f"{root}/_delta_log"):
        name = info.base_name
        if name.endswith(".json"):
            with fs.open_input_stream(info.path) as f:
                for line in f.read().decode().splitlines():
                    if not line.strip():
                        continue
                    action = json.loads(line)
                    for kind in ("add", "remove"):
                        if kind in action and action[kind].get("path"):
                            paths.add(urllib.parse.unquote(action[kind]["path"]))
        elif ".checkpoint" in name and name.endswith(".parquet"):
            with fs.open_input_file(info.path) as f:
                cp = pq.read_table(f)
            for kind in ("add", "remove"):
                if kind in cp.column_names:
                    for p in cp.column(kind).combine_chunks().field("path").to_pylist():
                        if p:
                            paths.add(urllib.parse.unquote(p))
    return paths


class _Liveness:
    """Which runs are alive: a lease or a ``started`` ledger entry younger than the lease expiry."""

    def __init__(self, lake: Lake, expiry_s: float, now: float) -> None:
        from photolens.lake.storage import filesystem_for

        self.lake, self.expiry_s, self.now = lake, expiry_s, now
        self.leases: dict[str, float] = {}
        fs, root = filesystem_for(lake.meta_uri("leases"), lake.s3)
        for info in _list(fs, root):
            if info.base_name.endswith(".json"):
                self.leases[info.base_name.removesuffix(".json")] = _mtime(info)
        self.ledgers: dict[str, tuple[dict[str, Any], float]] = {}
        fs, root = filesystem_for(lake.meta_uri("runs"), lake.s3)
        for info in _list(fs, root):
            if info.base_name.endswith(".json"):
                doc = lake.get_json(lake.meta_uri("runs", info.base_name)) or {}
                self.ledgers[info.base_name.removesuffix(".json")] = (doc, _mtime(info))

    def alive(self, run_id: str | None) -> bool:
        from photolens.lake.lease import lease_is_live

        if run_id is None:
            return False
        lease = self.leases.get(run_id)
        if lease is not None and self.now - lease < self.expiry_s:
            return True
        doc, at = self.ledgers.get(run_id, ({}, 0.0))
        if lease_is_live(doc, self.now):  # the driver's own lease, renewed while it runs
            return True
        return doc.get("state") == "started" and self.now - at < self.expiry_s


def _run_of(name: str) -> str | None:
    m = _STAGED_NAME.match(name)
    return m.group("run") if m else None


def _hidden(rel: str) -> bool:
    return any(part.startswith(("_", ".")) for part in rel.split("/"))


def vacuum(cfg: VacuumConfig) -> dict[str, Any]:
    """Delta VACUUM on every table, then orphaned staged files and staging folders (see the module doc)."""
    from photolens.lake.delta import Lake
    from photolens.lake.storage import filesystem_for

    cfg.validate()
    lake = Lake(cfg.lake, cfg.restricted_lake)
    now = time.time()
    expiry_s = cfg.older_than_hours * 3600.0
    live = _Liveness(lake, expiry_s, now)
    out: dict[str, Any] = {"job": "vacuum", "dry_run": cfg.dry_run, "older_than_hours": cfg.older_than_hours,
                           "tables": {}, "staging": {}}
    for name in _tables(lake, cfg.tables):
        table = lake.open(name)
        if table is None:
            continue
        removed = table.vacuum(retention_hours=cfg.retention_hours, dry_run=cfg.dry_run,
                               enforce_retention_duration=cfg.retention_hours is None)
        # Re-read the log after Delta's vacuum: any file a commit names (active, or removed within the
        # retention for time travel) is off limits below.
        fs, root = filesystem_for(lake.table_uri(name), lake.s3)
        referenced = _log_paths(fs, root)
        orphans, kept_live, kept_young, orphan_bytes = [], 0, 0, 0
        for info in _list(fs, root):
            rel = info.path[len(root):].lstrip("/")
            if _hidden(rel) or rel in referenced or not rel.endswith(".parquet"):
                continue
            if now - _mtime(info) < expiry_s:
                kept_young += 1
                continue
            if live.alive(_run_of(info.base_name)):
                kept_live += 1
                continue
            orphans.append(info)
            orphan_bytes += int(info.size or 0)
        if not cfg.dry_run:
            for info in orphans:
                fs.delete_file(info.path)
        out["tables"][name] = {"delta_vacuumed": len(removed), "orphans_removed": len(orphans),
                               "orphan_bytes": orphan_bytes, "kept_live_run": kept_live,
                               "kept_younger_than_lease": kept_young, "restricted": lake.spec(name).restricted}

    # Staging folders of runs that are not alive and hold nothing younger than the lease expiry.
    fs, root = filesystem_for(lake.meta_uri("staging"), lake.s3)
    runs: dict[str, float] = {}
    for info in _list(fs, root):
        run = info.path[len(root):].lstrip("/").split("/", 1)[0]
        runs[run] = max(runs.get(run, 0.0), _mtime(info))
    removed_runs = [r for r, newest in sorted(runs.items()) if now - newest >= expiry_s and not live.alive(r)]
    if not cfg.dry_run:
        for run in removed_runs:
            fs.delete_dir(f"{root}/{run}")
        # Leases only matter while they are fresh; stale ones would pile up one per run.
        lfs, lroot = filesystem_for(lake.meta_uri("leases"), lake.s3)
        for run, at in live.leases.items():
            if now - at >= expiry_s:
                lfs.delete_file(f"{lroot}/{run}.json")
    out["staging"] = {"runs_removed": len(removed_runs), "runs_kept": len(runs) - len(removed_runs)}
    return out


# ---------------------------------------------------------------------------------------------- CLI


def register(sub: Any) -> None:
    """Add ``optimize`` and ``vacuum`` to the CLI's sub-parsers."""
    for cmd, helptext in (("optimize", "compact each table's small files (optionally z-order by user_id)"),
                          ("vacuum", "Delta vacuum + orphaned staged files of crashed or losing runs")):
        p = sub.add_parser(cmd, help=helptext)
        p.add_argument("--lake", required=True, help="lake root: a folder or s3://bucket/prefix")
        p.add_argument("--restricted-lake", dest="restricted_lake",
                       help="root of the biometric tables (faces, templates, people); default <lake>/restricted")
        p.add_argument("--table", dest="tables", action="append", default=[],
                       help="only this table (repeat for several; default: all)")
        if cmd == "optimize":
            p.add_argument("--z-order", dest="z_order", action="store_true",
                           help="z-order by user_id (rewrites every file) instead of compacting small ones")
            p.add_argument("--target-file-mib", dest="target_file_mib", type=float, default=256.0)
            p.set_defaults(handler=cmd_optimize)
        else:
            p.add_argument("--older-than", dest="older_than_hours", type=float, default=1.0,
                           help="hours: the lease expiry; younger staged files and live runs' files stay (default 1)")
            p.add_argument("--retention-hours", dest="retention_hours", type=int,
                           help="Delta retention for files that commits removed (default: the table's, 7 days)")
            p.add_argument("--dry-run", dest="dry_run", action="store_true", help="count, delete nothing")
            p.set_defaults(handler=cmd_vacuum)


def _run(fn: Any, config: Any) -> int:
    try:
        result = fn(config)
    except MaintenanceConfigError as exc:
        print(f"photolens: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2, sort_keys=True, default=str))
    return 0


def cmd_optimize(args: argparse.Namespace) -> int:
    return _run(optimize, OptimizeConfig(lake=args.lake, restricted_lake=args.restricted_lake,
                                         tables=tuple(args.tables), z_order=args.z_order,
                                         target_file_mib=args.target_file_mib))


def cmd_vacuum(args: argparse.Namespace) -> int:
    return _run(vacuum, VacuumConfig(lake=args.lake, restricted_lake=args.restricted_lake, tables=tuple(args.tables),
                                     older_than_hours=args.older_than_hours, retention_hours=args.retention_hours,
                                     dry_run=args.dry_run))
