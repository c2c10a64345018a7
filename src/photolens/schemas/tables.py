"""Every table photolens writes, as versioned pyarrow schemas plus a Delta spec.

Writers refuse data that does not match these schemas (``conform``); a table on disk written by another
``schema_version`` stops a job before it commits (``check_compatible``). Embeddings are ``list<float32>``:
Polars cannot read ``fixed_size_list`` and Ray's tensor type leaves extension metadata in Delta schemas.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

SCHEMA_VERSION_KEY = b"photolens.schema_version"
TABLE_KEY = b"photolens.table"

_TS = pa.timestamp("us", tz="UTC")
_F32_LIST = pa.list_(pa.float32())
_STR_LIST = pa.list_(pa.string())


def _schema(name: str, version: int, fields: list[pa.Field]) -> pa.Schema:
    return pa.schema(fields, metadata={SCHEMA_VERSION_KEY: str(version).encode(), TABLE_KEY: name.encode()})


PHOTOS = _schema(
    "photos",
    1,
    [
        pa.field("photo_id", pa.string(), nullable=False),
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("etag", pa.string()),
        pa.field("size_bytes", pa.int64()),
        pa.field("mtime", _TS),
        pa.field("is_profile", pa.bool_()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error_code", pa.string()),
        pa.field("error_stage", pa.string()),
        pa.field("error_detail", pa.string()),
        pa.field("format", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("orientation", pa.int8()),
        pa.field("n_frames", pa.int16()),
        pa.field("taken_at", _TS),
        pa.field("gps_lat", pa.float64()),
        pa.field("gps_lon", pa.float64()),
        pa.field("phash", pa.string()),
        # model outputs (null until the stage ran; the recognition stages fill them)
        pa.field("n_detections", pa.int32()),
        pa.field("scene_labels", _STR_LIST),
        pa.field("scene_scores", _F32_LIST),
        pa.field("scene_coarse", pa.string()),
        pa.field("scene_coarse_score", pa.float32()),
        pa.field("landmark_id", pa.string()),
        pa.field("landmark_score", pa.float32()),
        pa.field("n_faces", pa.int32()),
        pa.field("n_faces_passed", pa.int32()),
        pa.field("is_private", pa.bool_()),
        pa.field("model_versions", pa.string()),  # JSON {role: "name@version"}
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("run_date", pa.string(), nullable=False),
        pa.field("processed_at", _TS),
    ],
)

DETECTIONS = _schema(
    "detections",
    1,
    [
        pa.field("photo_id", pa.string(), nullable=False),
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("det_index", pa.int32(), nullable=False),
        pa.field("category", pa.string(), nullable=False),
        pa.field("category_path", _STR_LIST),  # the category and its parents up to the root
        pa.field("score", pa.float32()),
        pa.field("box", _F32_LIST),  # x0, y0, x1, y1 normalised to [0, 1]
        pa.field("model", pa.string()),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("run_date", pa.string(), nullable=False),
    ],
)

FACES = _schema(
    "faces",
    1,
    [
        pa.field("face_id", pa.string(), nullable=False),
        pa.field("photo_id", pa.string(), nullable=False),
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("is_profile", pa.bool_()),
        pa.field("face_index", pa.int32(), nullable=False),
        pa.field("box", _F32_LIST),  # pixels of the working image, x0, y0, x1, y1
        pa.field("points", _F32_LIST),  # 5 points, x/y interleaved
        pa.field("det_score", pa.float32()),
        pa.field("roll", pa.float32()),
        pa.field("yaw", pa.float32()),
        pa.field("pitch", pa.float32()),
        pa.field("sharpness", pa.float32()),
        pa.field("size_px", pa.float32()),
        pa.field("quality", pa.float32()),
        pa.field("passed_gate", pa.bool_()),
        pa.field("gate_reason", pa.string()),
        pa.field("embedding", _F32_LIST),
        pa.field("embedding_model", pa.string()),
        pa.field("emotion_probs", _F32_LIST),
        pa.field("emotion", pa.string()),
        pa.field("smile", pa.float32()),
        pa.field("emotion_model", pa.string()),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("run_date", pa.string(), nullable=False),
    ],
)

RUNS = _schema(
    "runs",
    1,
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("job", pa.string(), nullable=False),
        pa.field("run_date", pa.string(), nullable=False),
        pa.field("started_at", _TS),
        pa.field("finished_at", _TS),
        pa.field("config", pa.string()),  # resolved config, JSON
        pa.field("git_sha", pa.string()),
        pa.field("photolens_version", pa.string()),
        pa.field("model_versions", pa.string()),  # JSON
        pa.field("n_manifest", pa.int64()),
        pa.field("n_todo", pa.int64()),
        pa.field("n_ok", pa.int64()),
        pa.field("n_error", pa.int64()),
        pa.field("n_skipped", pa.int64()),
        pa.field("error_counts", pa.string()),  # JSON {code: n}
        pa.field("stages", pa.string()),  # JSON [{stage, rows, seconds, rows_per_s}]
        pa.field("seconds", pa.float64()),
        pa.field("photos_per_s", pa.float64()),
        pa.field("table_versions", pa.string()),  # JSON {table: version}
    ],
)

TEMPLATES = _schema(
    "templates",
    1,
    [
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),  # ok | none
        pa.field("reason", pa.string()),
        pa.field("n_profile_photos", pa.int32()),
        pa.field("n_faces", pa.int32()),
        pa.field("n_members", pa.int32()),
        pa.field("member_face_ids", _STR_LIST),
        pa.field("weights", _F32_LIST),
        pa.field("vectors", pa.list_(_F32_LIST)),
        pa.field("density", pa.float32()),
        pa.field("embedding_model", pa.string()),
        pa.field("built_at", _TS),
        pa.field("run_id", pa.string(), nullable=False),
    ],
)

PEOPLE = _schema(
    "people",
    1,
    [
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("face_id", pa.string(), nullable=False),
        pa.field("photo_id", pa.string(), nullable=False),
        pa.field("person", pa.int32(), nullable=False),  # cluster label within the user's gallery
        pa.field("cluster_size", pa.int32()),
        pa.field("linkage", pa.string()),
        pa.field("threshold", pa.float32()),
        pa.field("run_id", pa.string(), nullable=False),
    ],
)

SUGGESTIONS = _schema(
    "suggestions",
    1,
    [
        pa.field("photo_id", pa.string(), nullable=False),
        pa.field("face_id", pa.string(), nullable=False),
        pa.field("uploader_id", pa.string(), nullable=False),
        pa.field("candidates", _STR_LIST),
        pa.field("distances", _F32_LIST),
        pa.field("verified_user_id", pa.string()),
        pa.field("verified", pa.bool_()),
        pa.field("verify_distance", pa.float32()),
        pa.field("threshold", pa.float32()),
        pa.field("index_version", pa.string()),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("created_at", _TS),
    ],
)

FRIENDS = _schema(
    "friends",
    1,
    [
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("friend_id", pa.string(), nullable=False),
    ],
)

PREFERENCES = _schema(
    "preferences",
    1,
    [
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),  # object | scene | landmark
        pa.field("level", pa.int8(), nullable=False),  # depth in the category tree, 0 = root
        pa.field("category", pa.string(), nullable=False),
        pa.field("score", pa.float64()),
        pa.field("share", pa.float64()),
        pa.field("weighted_share", pa.float64()),
        pa.field("lift", pa.float64()),
        pa.field("photo_count", pa.int64()),
        pa.field("n_photos", pa.int64()),  # the user's public photos that fed the scores
        pa.field("n_private_excluded", pa.int64()),
        pa.field("as_of", pa.string(), nullable=False),
        pa.field("lineage", pa.string()),  # JSON: model versions and run ids
    ],
)

TOMBSTONES = _schema(
    "tombstones",
    1,
    [
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("forgotten_at", _TS),
        pa.field("receipt_uri", pa.string()),
    ],
)


@dataclass(frozen=True)
class TableSpec:
    name: str
    schema: pa.Schema
    partition_by: tuple[str, ...]
    key: tuple[str, ...]
    # Restricted tables hold biometric data: they live under a separate root, never the analyst lake.
    restricted: bool = False
    # Sorting by these inside each file keeps min/max stats tight, so per-user deletes skip files.
    sort_by: tuple[str, ...] = ()

    @property
    def version(self) -> int:
        return schema_version(self.schema)


TABLES: dict[str, TableSpec] = {
    spec.name: spec
    for spec in (
        TableSpec("photos", PHOTOS, ("run_date",), ("photo_id",), sort_by=("user_id", "photo_id")),
        TableSpec("detections", DETECTIONS, ("run_date",), ("photo_id", "det_index"), sort_by=("user_id",)),
        TableSpec("faces", FACES, ("run_date",), ("face_id",), restricted=True, sort_by=("user_id",)),
        TableSpec("runs", RUNS, (), ("run_id",)),
        TableSpec("templates", TEMPLATES, (), ("user_id",), restricted=True, sort_by=("user_id",)),
        TableSpec("people", PEOPLE, (), ("user_id", "face_id"), restricted=True, sort_by=("user_id",)),
        TableSpec("suggestions", SUGGESTIONS, (), ("face_id",), sort_by=("uploader_id",)),
        TableSpec("friends", FRIENDS, (), ("user_id", "friend_id"), sort_by=("user_id",)),
        TableSpec("preferences", PREFERENCES, ("as_of",), ("user_id", "source", "category", "as_of"),
                  sort_by=("user_id",)),
        TableSpec("tombstones", TOMBSTONES, (), ("user_id",)),
    )
}


def schema_version(schema: pa.Schema) -> int:
    meta = schema.metadata or {}
    return int(meta.get(SCHEMA_VERSION_KEY, b"0"))


class SchemaMismatchError(ValueError):
    """Data or a table on disk does not match the schema photolens expects."""


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Return ``table`` cast to ``schema`` (columns in schema order); refuse anything that is not a safe match.

    Missing nullable columns become nulls (the recognition stages fill them later); unknown columns,
    missing non-nullable columns and unsafe casts raise ``SchemaMismatchError``.
    """
    name = (schema.metadata or {}).get(TABLE_KEY, b"?").decode()
    extra = set(table.column_names) - set(schema.names)
    if extra:
        raise SchemaMismatchError(f"table {name!r}: unexpected columns {sorted(extra)}")
    columns = []
    for field in schema:
        if field.name in table.column_names:
            col = table.column(field.name)
            if not col.type.equals(field.type):
                try:
                    col = col.cast(field.type, safe=True)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                    raise SchemaMismatchError(
                        f"table {name!r}: column {field.name!r} is {col.type}, expected {field.type}"
                    ) from exc
            if not field.nullable and col.null_count:
                raise SchemaMismatchError(f"table {name!r}: column {field.name!r} has nulls")
        elif field.nullable:
            col = pa.nulls(table.num_rows, field.type)
        else:
            raise SchemaMismatchError(f"table {name!r}: missing required column {field.name!r}")
        columns.append(col)
    return pa.Table.from_arrays(columns, schema=schema)


def diff_schemas(expected: pa.Schema, found: pa.Schema) -> list[str]:
    """Human-readable differences between the schema we write and one found on disk."""
    out = []
    exp = {f.name: f.type for f in expected}
    got = {f.name: f.type for f in found}
    for name in exp.keys() - got.keys():
        out.append(f"column {name!r} ({exp[name]}) is missing on disk")
    for name in got.keys() - exp.keys():
        out.append(f"column {name!r} ({got[name]}) on disk is unknown to this version")
    for name in exp.keys() & got.keys():
        if not _types_compatible(exp[name], got[name]):
            out.append(f"column {name!r} is {got[name]} on disk, expected {exp[name]}")
    return sorted(out)


def _types_compatible(a: pa.DataType, b: pa.DataType) -> bool:
    # Delta round-trips strings as large/view variants and timestamps without the tz name; compare the essence.
    def norm(t: pa.DataType) -> str:
        if pa.types.is_large_string(t) or pa.types.is_string_view(t):
            return "string"
        if pa.types.is_timestamp(t):
            return "timestamp"
        if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_list_view(t):
            return f"list<{norm(t.value_type)}>"
        return str(t)

    return norm(a) == norm(b)
