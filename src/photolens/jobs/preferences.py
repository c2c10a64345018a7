"""The preferences job: photos + detections (Delta) → one ``as_of`` snapshot of ``preferences`` and
``preferences_wide``.

Each snapshot is a partition (``as_of``). Recomputing a date replaces exactly that partition in one Delta
commit (``mode="overwrite"`` with ``predicate="as_of = '...'"``): a re-run never leaves two copies, and
readers see either the old snapshot or the new one. Never reads the restricted tables: preferences come from
tags of public photos only.

The job runs on one machine (Polars over the columns it needs); it reads no pixels and no embeddings.
"""

from __future__ import annotations

import time
from datetime import date
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
from deltalake import CommitProperties, DeltaTable, write_deltalake

from photolens.prefs.preferences import (
    DEFAULT_MIN_SCENE_SCORE,
    DEFAULT_MIN_SCORE,
    build_preferences,
    default_tree,
    parse_as_of,
    wide_vectors,
)
from photolens.schemas.tables import PREFERENCES, SchemaMismatchError, diff_schemas

PREFERENCES_TABLE = "preferences"
WIDE_TABLE = "preferences_wide"
# The wide table is the ML-facing interest vector: object categories at every level of the tree.
WIDE_SOURCE = "object"

_PHOTO_COLUMNS = (
    "photo_id", "user_id", "status", "is_private", "taken_at", "scene_coarse", "scene_coarse_score",
    "scene_labels", "scene_scores", "landmark_id", "landmark_score", "model_versions", "run_id", "run_date",
    "processed_at",
)
_DETECTION_COLUMNS = ("photo_id", "run_id", "category", "category_path", "score", "model")


def table_uri(lake: str, name: str) -> str:
    """``<lake>/tables/<name>``: the analyst tables (the restricted ones live under ``<lake>/restricted``)."""
    return f"{lake.rstrip('/')}/tables/{name}"


def _open(lake: str, name: str, storage_options: dict[str, str] | None) -> DeltaTable:
    uri = table_uri(lake, name)
    if not DeltaTable.is_deltatable(uri, storage_options=storage_options):
        raise FileNotFoundError(f"no Delta table at {uri}")
    return DeltaTable(uri, storage_options=storage_options)


def _read(dt: DeltaTable, columns: tuple[str, ...], where: pads.Expression | None = None) -> pa.Table:
    dataset = dt.to_pyarrow_dataset()
    present = [c for c in columns if c in dataset.schema.names]
    return dataset.to_table(columns=present, filter=where)


def _check_schema(uri: str, expected: pa.Schema, storage_options: dict[str, str] | None) -> None:
    if not DeltaTable.is_deltatable(uri, storage_options=storage_options):
        return
    found = pa.schema(DeltaTable(uri, storage_options=storage_options).schema().to_arrow())
    problems = diff_schemas(expected, found)
    if problems:
        raise SchemaMismatchError(f"{uri}: written by another schema version: {'; '.join(problems)}")


def _replace_snapshot(uri: str, table: pa.Table, as_of: str, storage_options: dict[str, str] | None,
                      *, merge_schema: bool = False) -> int:
    # as_of went through parse_as_of, so it is a plain date: safe to put inside the predicate.
    write_deltalake(
        uri,
        table,
        mode="overwrite",
        predicate=f"as_of = '{as_of}'",
        partition_by=["as_of"],
        schema_mode="merge" if merge_schema else None,
        storage_options=storage_options,
        commit_properties=CommitProperties(custom_metadata={"photolens.job": "preferences", "as_of": as_of}),
    )
    return DeltaTable(uri, storage_options=storage_options).version()


def run_preferences(
    lake: str,
    as_of: str | date,
    storage_options: dict[str, str] | None = None,
    half_life_days: float | None = None,
    include_private: bool = False,
    *,
    min_score: float = DEFAULT_MIN_SCORE,
    min_scene_score: float = DEFAULT_MIN_SCENE_SCORE,
) -> dict[str, Any]:
    """Build the ``as_of`` snapshot from ``<lake>/tables/{photos,detections}`` and replace it in
    ``preferences`` and ``preferences_wide``; returns a report (counts, table versions, seconds)."""
    started = time.perf_counter()
    day = parse_as_of(as_of).isoformat()
    prefs_uri = table_uri(lake, PREFERENCES_TABLE)
    wide_uri = table_uri(lake, WIDE_TABLE)
    # Fail before the work, not at the commit, when the table on disk is of another schema version.
    _check_schema(prefs_uri, PREFERENCES, storage_options)

    photos = _read(_open(lake, "photos", storage_options), _PHOTO_COLUMNS, pc.field("status") == "ok")
    detections = _read(_open(lake, "detections", storage_options), _DETECTION_COLUMNS,
                       pc.field("score") >= min_score)
    tree = default_tree()
    prefs = build_preferences(photos, detections, day, half_life_days=half_life_days,
                              include_private=include_private, min_score=min_score,
                              min_scene_score=min_scene_score, tree=tree)
    wide = wide_vectors(prefs, source=WIDE_SOURCE, level=None, categories=list(tree))
    wide = wide.append_column(pa.field("as_of", pa.string(), nullable=False),
                              pa.array([day] * wide.num_rows, pa.string()))

    version = _replace_snapshot(prefs_uri, prefs, day, storage_options)
    # New tree nodes add columns; older snapshots read them as null ("not computed then").
    wide_version = _replace_snapshot(wide_uri, wide, day, storage_options, merge_schema=True)

    # n_photos and n_private_excluded repeat on every row of a user: one row per user sums them.
    per_user = prefs.group_by("user_id").aggregate([("n_photos", "max"), ("n_private_excluded", "max")])
    by_source = prefs.group_by("source").aggregate([("source", "count")]).to_pylist()
    return {
        "job": "preferences",
        "as_of": day,
        "users": per_user.num_rows,
        "rows": prefs.num_rows,
        "rows_by_source": {r["source"]: r["source_count"] for r in by_source},
        "photos_ok": photos.num_rows,
        "n_photos_used": pc.sum(per_user["n_photos_max"]).as_py() or 0,
        "n_private_excluded": pc.sum(per_user["n_private_excluded_max"]).as_py() or 0,
        "table": prefs_uri,
        "table_version": version,
        "wide_table": wide_uri,
        "wide_table_version": wide_version,
        "wide_columns": wide.num_columns - 2,
        "half_life_days": half_life_days,
        "include_private": include_private,
        "seconds": round(time.perf_counter() - started, 3),
    }


def latest_as_of(lake: str, storage_options: dict[str, str] | None = None) -> str | None:
    """The newest snapshot date in ``preferences``, or None when it has none."""
    dates = [p["as_of"] for p in _open(lake, PREFERENCES_TABLE, storage_options).partitions()]
    return max(dates) if dates else None


def top_interests(
    lake: str,
    user_id: str,
    as_of: str | date | None = None,
    n: int = 10,
    *,
    source: str | None = None,
    level: int | None = None,
    storage_options: dict[str, str] | None = None,
) -> pa.Table:
    """A user's ``n`` highest-scoring categories in one snapshot (the latest when ``as_of`` is None)."""
    day = parse_as_of(as_of).isoformat() if as_of is not None else latest_as_of(lake, storage_options)
    dt = _open(lake, PREFERENCES_TABLE, storage_options)
    if day is None:
        return PREFERENCES.empty_table()
    where = (pc.field("as_of") == day) & (pc.field("user_id") == user_id)
    if source is not None:
        where &= pc.field("source") == source
    if level is not None:
        where &= pc.field("level") == level
    rows = dt.to_pyarrow_dataset().to_table(filter=where)
    return rows.sort_by([("score", "descending"), ("category", "ascending")]).slice(0, n)


def format_interests(rows: pa.Table) -> str:
    """Plain-text lines for a terminal: ``source/level  category  score  share  lift  photos``."""
    lines = [f"{'source':<9}{'lvl':>3}  {'category':<24}{'score':>7}{'share':>7}{'lift':>7}{'photos':>7}"]
    for r in rows.to_pylist():
        lines.append(f"{r['source']:<9}{r['level']:>3}  {r['category']:<24}{r['score']:>7.3f}"
                     f"{r['share']:>7.3f}{r['lift']:>7.2f}{r['photo_count']:>7d}")
    return "\n".join(lines)
