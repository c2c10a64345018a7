"""Helpers the face jobs share: run ids, commit properties, tombstones, embedding columns as matrices."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from deltalake import CommitProperties

from photolens.faceindex.vectors import l2_normalise
from photolens.jobs.tag import ConfigError
from photolens.lake.delta import Lake
from photolens.lake.rewrite import commit_properties


def now_utc() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def new_run_id(prefix: str) -> str:
    return f"{prefix}-{now_utc():%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"


def commit_props(app_id: str | None, meta: Mapping[str, str] | None = None) -> CommitProperties:
    """A face job's commit: app-transaction ``(app_id, 1)`` (a re-run commits nothing) and its metadata."""
    return commit_properties(app_id, 1, meta)


def check_run_id(run_id: str | None) -> None:
    if run_id is not None and (not run_id or "/" in run_id or "'" in run_id):
        raise ConfigError(f"run id {run_id!r}: use letters, digits, '-', '_' or '.'")


def tombstoned_users(lake: Lake) -> set[str]:
    return {str(u) for u in lake.read("tombstones", ["user_id"]).column("user_id").to_pylist()}


def embedding_matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """``list<float32>`` rows (no nulls, one length) as an ``(n, d)`` float32 matrix."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n = len(arr)
    if n == 0:
        return np.zeros((0, 0), dtype=np.float32)
    lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
    if arr.null_count or len(np.unique(lengths)) != 1:
        raise ValueError("embeddings must be non-null and all of one dimension")
    return np.asarray(pc.list_flatten(arr).to_numpy(zero_copy_only=False), dtype=np.float32).reshape(n, -1)


def template_matrices(column: pa.ChunkedArray | pa.Array) -> list[np.ndarray]:
    """``list<list<float32>>`` template rows as one ``(k, d)`` matrix per row."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    counts = pc.fill_null(pc.list_value_length(arr), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    inner = pc.list_flatten(arr)
    if len(inner) == 0:
        return [np.zeros((0, 0), dtype=np.float32) for _ in counts]
    flat = embedding_matrix(inner)
    return np.split(flat, np.cumsum(counts)[:-1])


def read_templates(lake: Lake, users: Iterable[str] | None = None) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """``{user: unit template matrix}`` and ``{user: embedding model}`` of the ``ok`` templates."""
    where = pc.field("status") == "ok"
    if users is not None:
        wanted = sorted(set(users))
        if not wanted:
            return {}, {}
        where = where & pc.field("user_id").isin(wanted)
    rows = lake.read("templates", ["user_id", "vectors", "embedding_model"], where)
    mats = template_matrices(rows.column("vectors"))
    templates, models = {}, {}
    for uid, mat, model in zip(rows.column("user_id").to_pylist(), mats, rows.column("embedding_model").to_pylist(),
                               strict=True):
        if len(mat):
            templates[str(uid)] = l2_normalise(mat)
            models[str(uid)] = str(model)
    return templates, models




def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))

