"""``photolens forget``: delete a user everywhere, with a receipt.

Tombstone first (later tagging runs skip the user), then one Delta commit per table of both roots
removing the user's rows (``lake.rewrite``: files holding them rewritten without them), vacuum with an
explicit retention, removal of unreferenced files that still hold the user's rows, removal from every
index version, and a receipt without vectors.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from deltalake import DeltaTable

from photolens.jobs._faceshared import (
    commit_props,
    now_utc,
    print_json,
)
from photolens.jobs.index import CODEC_FILE, IndexBuildConfig, build_face_index
from photolens.jobs.tag import ConfigError
from photolens.lake.delta import Lake
from photolens.lake.rewrite import plain_strings, rewrite_rows
from photolens.lake.storage import filesystem_for, join_uri

__all__ = ["FORGET_APP", "RECEIPT_FORMAT", "ForgetConfig", "cmd_forget", "forget_user"]

FORGET_APP: Final = "photolens.forget/"
RECEIPT_FORMAT: Final = "photolens.forget-receipt/1"
# Delta's default deletedFileRetentionDuration: vacuum refuses a shorter retention unless told not to check.
DELTA_DEFAULT_RETENTION_HOURS: Final = 168
# Columns that name a user, in any table; a forgotten user's rows are those naming them in one of these.
USER_COLUMNS: Final = ("user_id", "friend_id", "uploader_id", "verified_user_id")
USER_LIST_COLUMNS: Final = ("candidates",)
# Tables a forget never deletes from: the tombstone is what keeps the user out afterwards.
FORGET_KEEP: Final = frozenset({"tombstones"})
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


# ---------------------------------------------------------------------------------------------- forget


@dataclass(frozen=True)
class ForgetConfig:
    user: str
    lake: str
    restricted_lake: str | None = None
    index_store: str | None = None
    # Hours of history vacuum keeps. 0 deletes the replaced files at once (no time travel back to
    # the user's rows); Delta refuses < 168 h unless enforce_retention_duration is turned off, which
    # this job does, and says so in the receipt.
    retention_hours: int = 0
    # False: remove the user's ids from every stored index version (a scrubbed copy per version,
    # the rollback chain re-pointed at the copies, the originals deleted). True: retrain from the
    # templates left and keep only that version (the codec no longer saw the user's vectors either).
    rebuild_index: bool = False

    def validate(self) -> ForgetConfig:
        if not self.user or any(ord(c) < 32 for c in self.user):
            raise ConfigError(f"--user {self.user!r}: need a non-empty user id without control characters")
        if not self.lake:
            raise ConfigError("forget needs --lake")
        if self.retention_hours < 0:
            raise ConfigError("--retention-hours must be >= 0")
        return self


def _receipt_name(user: str) -> str:
    """The user id when it is safe in a file name, else its hash."""
    return user if _SAFE_NAME.match(user) else "h" + hashlib.blake2b(user.encode(), digest_size=12).hexdigest()


def _delta_tables(lake: Lake) -> list[tuple[str, str]]:
    """``(name, uri)`` of every Delta table under the analyst root and the restricted root."""
    out = []
    for root in (join_uri(lake.root, "tables"), lake.restricted_root):
        fs, path = filesystem_for(root, lake.s3)
        for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)):
            if info.type != pafs.FileType.Directory:
                continue
            if fs.get_file_info(f"{info.path}/_delta_log").type == pafs.FileType.Directory:
                out.append((info.base_name, join_uri(root, info.base_name)))
    return sorted(set(out))


def _in_flight_runs(lake: Lake) -> list[str]:
    """Tagging runs whose ledger says started: their staged files are not orphans yet."""
    fs, path = filesystem_for(lake.meta_uri("runs"), lake.s3)
    runs = []
    for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)):
        if info.type == pafs.FileType.File and info.base_name.endswith(".json"):
            ledger = lake.get_json(lake.meta_uri("runs", info.base_name)) or {}
            if ledger.get("state") == "started":
                runs.append(str(ledger.get("run_id")))
    return sorted(runs)


def _user_mask(body: pa.Table, user: str, face_ids: set[str]) -> np.ndarray:
    """Rows of ``body`` (plain strings) that name the user, or hold one of ``face_ids``."""
    mask = np.zeros(body.num_rows, dtype=bool)
    for c in USER_COLUMNS:
        if c in body.column_names:
            mask |= pc.fill_null(pc.equal(body.column(c), user), False).to_numpy(zero_copy_only=False)
    for c in USER_LIST_COLUMNS:
        if c in body.column_names:
            col = body.column(c).combine_chunks()
            flat = pc.list_flatten(col)
            if len(flat):
                hit = pc.fill_null(pc.equal(flat, user), False).to_numpy(zero_copy_only=False)
                parents = pc.list_parent_indices(col).to_numpy(zero_copy_only=False)
                mask[np.unique(parents[hit])] = True
    if face_ids and "face_id" in body.column_names:
        mask |= pc.is_in(body.column("face_id"), pa.array(sorted(face_ids), pa.string())).to_numpy(
            zero_copy_only=False)
    return mask


def _delete_rows(lake: Lake, uri: str, table: DeltaTable, user: str, face_ids: set[str]) -> int:
    """Delete the user's rows in one Delta commit (files holding some rewritten without them); returns the
    rows deleted."""
    result = rewrite_rows(table, uri, lambda body: _user_mask(body, user, face_ids), s3=lake.s3, tag="forget",
                          custom_metadata={"photolens.job": "forget"})
    return result.rows_removed


def _scrub_unreferenced(lake: Lake, uri: str, table: DeltaTable, user: str, face_ids: set[str],
                        in_flight: Sequence[str], retention_hours: int) -> dict[str, int]:
    """Delete data files the table no longer references that still hold the user's rows.

    Vacuum's default mode only deletes files that a commit removed; a crashed tagging run leaves staged
    files no commit ever mentioned, and they can hold the user's faces. Files of runs still in flight
    are kept (their commit would reference them) and counted; so are files younger than the retention.
    """
    fs, root = filesystem_for(uri, lake.s3)
    referenced = set(table.file_uris())
    cutoff = now_utc() - dt.timedelta(hours=retention_hours)
    deleted = kept_in_flight = kept_recent = 0
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True)):
        rel = info.path[len(root.rstrip("/")) + 1:]
        if info.type != pafs.FileType.File or not rel.endswith(".parquet"):
            continue
        if any(part.startswith(("_", ".")) for part in rel.split("/")):
            continue
        if join_uri(uri, rel) in referenced or rel in referenced:
            continue
        with fs.open_input_file(info.path) as f:
            body = plain_strings(pq.read_table(f))
        if not _user_mask(body, user, face_ids).any():
            continue
        if any(f"part-{run}-" in info.base_name for run in in_flight):
            kept_in_flight += 1
            continue
        mtime = info.mtime
        if retention_hours and mtime is not None and mtime.replace(tzinfo=mtime.tzinfo or dt.UTC) > cutoff:
            kept_recent += 1
            continue
        fs.delete_file(info.path)
        deleted += 1
    return {"orphans_deleted": deleted, "orphans_kept_in_flight": kept_in_flight,
            "orphans_kept_within_retention": kept_recent}


def _forget_tables(lake: Lake, user: str, retention_hours: int) -> tuple[dict[str, Any], list[str], int]:
    storage = lake.storage_options()
    # Faces of the user found in other people's photos (verified suggestions) are the user's
    # biometric data too, though they sit in the uploader's rows: they go as well.
    verified = lake.read("suggestions", ["face_id", "uploader_id"],
                         (pc.field("verified_user_id") == user) & (pc.field("verified") == True))  # noqa: E712
    verified_faces = sorted({f for f, up in zip(verified.column("face_id").to_pylist(),
                                                verified.column("uploader_id").to_pylist(), strict=True)
                             if up != user})
    in_flight = _in_flight_runs(lake)
    enforce = retention_hours >= DELTA_DEFAULT_RETENTION_HOURS
    tables: dict[str, Any] = {}
    for name, uri in _delta_tables(lake):
        if name in FORGET_KEEP:
            continue
        table = DeltaTable(uri, storage_options=storage)
        columns = [f.name for f in table.schema().fields]
        face_ids = set(verified_faces) if name in ("faces", "people") else set()
        if not set(columns) & {*USER_COLUMNS, *USER_LIST_COLUMNS}:
            continue
        before = table.version()
        n_deleted = _delete_rows(lake, uri, table, user, face_ids)
        vacuumed = table.vacuum(retention_hours=retention_hours, dry_run=False,
                                enforce_retention_duration=enforce,
                                commit_properties=commit_props(None, {"photolens.job": "forget"}))
        table.update_incremental()
        scrub = _scrub_unreferenced(lake, uri, table, user, face_ids, in_flight, retention_hours)
        tables[name] = {
            "uri": uri,
            "rows_deleted": n_deleted,
            "version_before": before,
            "version_after": table.version(),
            "matched_on": [c for c in (*USER_COLUMNS, *USER_LIST_COLUMNS) if c in columns]
            + (["face_id (verified as the user)"] if verified_faces and name in ("faces", "people") else []),
            "vacuum_files_deleted": len(vacuumed),
            **scrub,
        }
    return tables, in_flight, len(verified_faces)


def _forget_in_index(cfg: ForgetConfig, stamp: str, extra_training: np.ndarray | None) -> dict[str, Any]:
    """Leave no version of the index holding the user's id (see ForgetConfig.rebuild_index)."""
    import faiss

    from photolens.faceindex.artifacts import IndexStore
    from photolens.faceindex.index import remove_ids, serialize, user_key

    assert cfg.index_store is not None
    store = IndexStore(cfg.index_store)
    key = user_key(cfg.user)
    info = store.info()
    current, previous = info["current"], list(info["previous"])

    def holds(vid: str) -> bool:
        index = store.load(vid).index()
        return bool(np.isin(key, faiss.vector_to_array(faiss.downcast_index(index).id_map)))

    containing = [v for v in store.list_versions() if holds(v)]
    out: dict[str, Any] = {"store": cfg.index_store, "current_before": current,
                           "versions_before": len(info["versions"]), "versions_with_user": len(containing),
                           "mode": "rebuild" if cfg.rebuild_index else "scrub"}
    if not containing:
        return {**out, "current_after": current, "replaced": {}, "deleted": []}
    replaced: dict[str, str] = {}
    removed_vectors = 0
    if cfg.rebuild_index and current is not None:
        sidecar = store.sidecar(current)
        built = build_face_index(
            IndexBuildConfig(lake=cfg.lake, index_store=cfg.index_store, restricted_lake=cfg.restricted_lake,
                             factory=sidecar.get("factory"),
                             train_size=max(256, int(sidecar.get("config", {}).get("train_size", 50_000))),
                             seed=int(sidecar.get("seed", 0))),
            extra_training=extra_training)
        new_current, new_previous = built["version"], []
        to_delete = [v for v in store.list_versions() if v != new_current]
    else:
        for vid in containing:
            loaded = store.load(vid)
            index = loaded.index()
            n_removed = remove_ids(index, [key])
            removed_vectors += n_removed if vid == current else 0
            data = serialize(index)
            ids = faiss.vector_to_array(faiss.downcast_index(index).id_map)
            # No user id in the sidecar: the index store must not name the forgotten user either.
            sidecar = {**loaded.sidecar, "n": int(index.ntotal), "n_ids": len(np.unique(ids)),
                       "memory_bytes": len(data), "derived_from": vid,
                       "forget": {"removed_vectors": n_removed, "at": stamp,
                                  "recall_measured_on": "derived_from, before the removal"}}
            extra = {}
            with contextlib.suppress(KeyError):
                extra[CODEC_FILE] = store.load_extra(vid, CODEC_FILE)
            replaced[vid] = store.put_version(data, sidecar, extra_files=extra)
        new_current = replaced.get(current, current) if current is not None else None
        new_previous = [replaced.get(p, p) for p in previous]
        to_delete = list(containing)
    if new_current is not None:
        store.repoint(new_current, new_previous, "forget")
    for vid in to_delete:
        store.delete_version(vid)
    return {**out, "current_after": new_current, "previous_after": new_previous, "replaced": replaced,
            "deleted": to_delete, "removed_vectors_from_current": removed_vectors,
            "versions_after": len(store.list_versions())}


def forget_user(cfg: ForgetConfig, *, extra_training: np.ndarray | None = None) -> dict[str, Any]:
    """Delete a user everywhere, vacuum, scrub the index, tombstone; returns (and writes) the receipt.

    Order: the tombstone goes first, so a tagging run planned from now on skips the user; then the
    deletes; the receipt is written last. Re-running a forget is safe (deletes find nothing, the
    tombstone is appended once). A tagging run already in flight was planned before the tombstone:
    its staged files are kept and listed, and forget must be run again after it commits.
    ``extra_training`` is passed to the index rebuild (``rebuild_index``) only.
    """
    cfg.validate()
    started_at = now_utc()
    stamp = f"{started_at:%Y%m%dT%H%M%S%fZ}"
    lake = Lake(cfg.lake, cfg.restricted_lake)
    receipt_uri = lake.meta_uri("receipts", f"{_receipt_name(cfg.user)}-{stamp}.json")
    tombstone_version = lake.append(
        "tombstones",
        pa.Table.from_pylist([{"user_id": cfg.user, "forgotten_at": started_at, "receipt_uri": receipt_uri}]),
        app_id=FORGET_APP + cfg.user)
    tables, in_flight, n_verified = _forget_tables(lake, cfg.user, cfg.retention_hours)
    index = _forget_in_index(cfg, stamp, extra_training) if cfg.index_store else None
    enforce = cfg.retention_hours >= DELTA_DEFAULT_RETENTION_HOURS
    pending = [f"tagging run {r} was in flight: run forget again after it commits" for r in in_flight]
    pending += [f"{name}: {t['orphans_kept_within_retention']} unreferenced file(s) within the retention"
                for name, t in tables.items() if t["orphans_kept_within_retention"]]
    if cfg.retention_hours:
        pending.append(f"files replaced by the deletes stay for {cfg.retention_hours} h (time travel) until a vacuum")
    receipt = {
        "format": RECEIPT_FORMAT,
        "user_id": cfg.user,
        "started_at": started_at.isoformat(),
        "lake": lake.root,
        "restricted_lake": lake.restricted_root,
        "tombstone": {"table": lake.table_uri("tombstones"), "version": lake.version("tombstones"),
                      "appended": tombstone_version is not None},
        "tables": tables,
        "rows_deleted": sum(t["rows_deleted"] for t in tables.values()),
        "faces_verified_as_user_in_other_galleries": n_verified,
        "vacuum": {
            "retention_hours": cfg.retention_hours,
            "enforce_retention_duration": enforce,
            "note": ("retention below Delta's default 168 h: vacuum ran with enforce_retention_duration=False, so "
                     "the replaced files are gone and time travel to versions before the delete fails")
            if not enforce else "Delta's retention check was left on",
        },
        "index": index,
        "caches": ("none to clear: friend-index caches exist only inside one suggest task and end with it, "
                   "and the templates they are built from are deleted above"),
        "delta_log_note": ("the Delta logs keep the user id in the min/max statistics of removed files until "
                           "log retention (delta.logRetentionDuration) expires; they hold no vectors"),
        "in_flight_runs": in_flight,
        "pending": pending,
        "complete": not pending,
        "finished_at": now_utc().isoformat(),
        "receipt_uri": receipt_uri,
    }
    lake.put_json(receipt_uri, receipt)
    return receipt




def cmd_forget(args: argparse.Namespace) -> int:
    receipt = forget_user(ForgetConfig(
        user=args.user, lake=args.lake, restricted_lake=args.restricted_lake, index_store=args.index_store,
        retention_hours=args.retention_hours, rebuild_index=args.rebuild_index))
    print_json(receipt)
    if receipt["complete"]:
        return 0
    import sys

    print(f"photolens forget: incomplete ({'; '.join(receipt['pending'])}); receipt {receipt['receipt_uri']}",
          file=sys.stderr)
    return 4  # cli.EXIT_INCOMPLETE: deleted what it could, the receipt says what is still pending

