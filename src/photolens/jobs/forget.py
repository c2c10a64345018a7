"""Face jobs over the lake (seed 001, 001_3c33a7603d0fbc67.txt; seed 000 for clustering).

Each job reads Delta tables, runs the pure code of ``photolens.faceindex`` and writes Delta tables or
index versions:

* ``templates build``: per user, the faces of up to 30 profile photos (newest first), low-weight
  faces dropped, the densest/largest cluster as the owner's template → restricted ``templates``
  (the whole table is replaced in one atomic Delta commit: it is one small row per user, and a
  rebuild derives every row again, so users whose template disappeared disappear too).
* ``people cluster``: one user's whole gallery (faces that passed the gate) clustered with the
  same-photo cannot-link constraint → restricted ``people`` (the user's rows replaced in one commit).
* ``eval clustering``: K/C, ARI, AMI, pairwise P/R/F per linkage on a labelled face set, with the
  pipeline's own detector, alignment and embedder (seed 000's table).
* ``index build``: every vector of every ``ok`` template, id = ``user_key(user_id)``; the codec is
  trained (a Ray task) on a sample of face embeddings, the vectors are encoded as Ray tasks over the
  shards that ``plan_shards`` fits in the memory budget, merged, measured against exact search on
  held-out faces, stored as a new immutable version (``--publish`` makes it current).
* ``suggest``: new faces of a tagging run, grouped by uploader; each uploader group runs as one Ray
  task holding a ``FriendIndexCache`` (the friends' templates compressed with the published codec,
  built once and reused by every photo of the burst); top-5 by L2 on the codes, then verification on
  the uncompressed templates against a threshold calibrated on the templates (target FAR 1e-2) →
  ``suggestions`` with the app-transaction ``photolens.suggest/<run_id>`` (a re-run commits nothing).
* ``forget``: tombstone first (later tagging runs skip the user), then one Delta commit per table of
  both roots removing the user's rows (files holding them rewritten with pyarrow), vacuum with an
  explicit retention, removal of unreferenced files that still hold the user's rows, removal from
  every index version, and a receipt without vectors.

Ray is used only where the work parallelises (codec training and shard encoding, per-uploader
suggestion groups); the per-user template and clustering loops are small numpy work in the driver.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import itertools
import json
import re
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final, get_args

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake

from photolens.faceindex.cluster import (
    DEFAULT_EUCLIDEAN_THRESHOLD,
    DEFAULT_RANK_ORDER_FRACTION,
    DEFAULT_RANK_ORDER_K,
    EUCLIDEAN_ONLY,
    LinkageMethod,
    cluster_faces,
)
from photolens.faceindex.metrics import clustering_scores
from photolens.faceindex.suggest import MAX_CANDIDATES, Calibration, FriendIndexCache, calibrate_threshold, verify
from photolens.faceindex.synthetic import l2_normalise
from photolens.faceindex.templates import NoTemplate, NoTemplateReason, TemplateConfig, build_owner_template
from photolens.jobs.tag import ConfigError
from photolens.lake.delta import Lake
from photolens.lake.storage import filesystem_for, join_uri
from photolens.schemas.tables import PEOPLE, SUGGESTIONS, TEMPLATES, conform

__all__ = [
    "ForgetConfig",
    "IndexBuildConfig",
    "PeopleConfig",
    "PhotoFaces",
    "SuggestConfig",
    "TemplatesConfig",
    "build_face_index",
    "build_templates",
    "calibrate_from_templates",
    "cluster_people",
    "embed_photos",
    "eval_clustering",
    "forget_user",
    "format_clustering",
    "identity_groups",
    "index_info",
    "publish_index",
    "register",
    "register_eval",
    "rollback_index",
    "run_suggest",
    "suggest_for_uploaders",
]

TEMPLATES_APP: Final = "photolens.templates/"
PEOPLE_APP: Final = "photolens.people/"
SUGGEST_APP: Final = "photolens.suggest/"
FORGET_APP: Final = "photolens.forget/"
RECEIPT_FORMAT: Final = "photolens.forget-receipt/1"
CODEC_FILE: Final = "codec.faiss"  # the empty trained codec beside each index version, for friend caches
PROFILE_SOURCES: Final = ("manifest", "pattern")
SEED000_LINKAGES: Final[tuple[str, ...]] = ("single", "average", "complete", "weighted", "median")
# Delta's default deletedFileRetentionDuration: vacuum refuses a shorter retention unless told not to check.
DELTA_DEFAULT_RETENTION_HOURS: Final = 168
# Columns that name a user, in any table; a forgotten user's rows are those naming them in one of these.
USER_COLUMNS: Final = ("user_id", "friend_id", "uploader_id", "verified_user_id")
USER_LIST_COLUMNS: Final = ("candidates",)
# Tables a forget never deletes from: the tombstone is what keeps the user out afterwards.
FORGET_KEEP: Final = frozenset({"tombstones"})
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


# ---------------------------------------------------------------------------------------------- shared


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _new_run_id(prefix: str) -> str:
    return f"{prefix}-{_now():%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"


def _props(app_id: str | None, meta: Mapping[str, str] | None = None) -> CommitProperties:
    custom = dict(meta or {})
    if app_id:
        custom["photolens.app_id"] = app_id
    return CommitProperties(custom_metadata=custom or None,
                            app_transactions=[Transaction(app_id, 1)] if app_id else None)


def _check_run_id(run_id: str | None) -> None:
    if run_id is not None and (not run_id or "/" in run_id or "'" in run_id):
        raise ConfigError(f"run id {run_id!r}: use letters, digits, '-', '_' or '.'")


def _tombstoned(lake: Lake) -> set[str]:
    return {str(u) for u in lake.read("tombstones", ["user_id"]).column("user_id").to_pylist()}


def _embedding_matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """``list<float32>`` rows (no nulls, one length) as an ``(n, d)`` float32 matrix."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n = len(arr)
    if n == 0:
        return np.zeros((0, 0), dtype=np.float32)
    lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
    if arr.null_count or len(np.unique(lengths)) != 1:
        raise ValueError("embeddings must be non-null and all of one dimension")
    return np.asarray(pc.list_flatten(arr).to_numpy(zero_copy_only=False), dtype=np.float32).reshape(n, -1)


def _template_matrices(column: pa.ChunkedArray | pa.Array) -> list[np.ndarray]:
    """``list<list<float32>>`` template rows as one ``(k, d)`` matrix per row."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    counts = pc.fill_null(pc.list_value_length(arr), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    inner = pc.list_flatten(arr)
    if len(inner) == 0:
        return [np.zeros((0, 0), dtype=np.float32) for _ in counts]
    flat = _embedding_matrix(inner)
    return np.split(flat, np.cumsum(counts)[:-1])


def _read_templates(lake: Lake, users: Iterable[str] | None = None) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """``{user: unit template matrix}`` and ``{user: embedding model}`` of the ``ok`` templates."""
    where = pc.field("status") == "ok"
    if users is not None:
        wanted = sorted(set(users))
        if not wanted:
            return {}, {}
        where = where & pc.field("user_id").isin(wanted)
    rows = lake.read("templates", ["user_id", "vectors", "embedding_model"], where)
    mats = _template_matrices(rows.column("vectors"))
    templates, models = {}, {}
    for uid, mat, model in zip(rows.column("user_id").to_pylist(), mats, rows.column("embedding_model").to_pylist(),
                               strict=True):
        if len(mat):
            templates[str(uid)] = l2_normalise(mat)
            models[str(uid)] = str(model)
    return templates, models


# ---------------------------------------------------------------------------------------------- real face chain


@dataclass(frozen=True, eq=False)
class PhotoFaces:
    """Every face the pipeline's chain finds on one photo, best detector score first."""

    name: str
    boxes: np.ndarray  # (n, 4) float32, working-image pixels
    det_scores: np.ndarray  # (n,) float32
    quality: np.ndarray  # (n,) float32, the quality weight
    passed_gate: np.ndarray  # (n,) bool
    gate_reasons: tuple[str | None, ...]
    embeddings: np.ndarray  # (n, d) float32, unit rows

    def __len__(self) -> int:
        return len(self.det_scores)


def embed_photos(
    paths: Sequence[Path], store_uri: str | None = None, device: str = "cpu"
) -> tuple[dict[str, PhotoFaces], dict[str, str], dict[str, str]]:
    """Decode → MTCNN → dlib150 alignment + quality gate → embedder, as the tagging job's faces stages.

    Returns ``{file name: PhotoFaces}``, ``{file name: why nothing}`` (decode errors) and the model tags
    (``{"faces": ..., "embed": ...}``, the ``embedding_model`` value the tagging job writes).
    """
    from photolens.jobs.evaluate import FaceChain
    from photolens.models.face_align import QualityGate, assess
    from photolens.udfs.decode import decode_photo

    chain = FaceChain(store_uri, device=device)
    gate = QualityGate()  # the tagging job's gate (udfs.recognize.FacesConfig has the same defaults)
    found: dict[str, PhotoFaces] = {}
    missing: dict[str, str] = {}
    for path in paths:
        path = Path(path)
        if not path.is_file():
            missing[path.name] = "file not found"
            continue
        result = decode_photo(path.read_bytes(), chain.decode_cfg)
        if not result.ok:
            missing[path.name] = f"decode: {result.error_code}"
            continue
        dets = chain.detector.detect([result.image])[0]
        chips, qualities = assess(result.image, dets.boxes, dets.scores, dets.points, "dlib150")
        verdicts = [gate.gate(q) for q in qualities]
        emb = chain.embedder.embed(chips) if len(chips) else np.zeros((0, 0), dtype=np.float32)
        found[path.name] = PhotoFaces(
            name=path.name,
            boxes=np.asarray(dets.boxes, dtype=np.float32).reshape(-1, 4),
            det_scores=np.asarray(dets.scores, dtype=np.float32).reshape(-1),
            quality=np.array([q.weight for q in qualities], dtype=np.float32),
            passed_gate=np.array([ok for ok, _ in verdicts], dtype=bool),
            gate_reasons=tuple(reason for _, reason in verdicts),
            embeddings=np.asarray(emb, dtype=np.float32),
        )
    return found, missing, dict(chain.models)


# ---------------------------------------------------------------------------------------------- templates


@dataclass(frozen=True)
class TemplatesConfig:
    lake: str
    restricted_lake: str | None = None
    # The tagging gate's weight floor (models.face_align.QualityGate.min_weight): faces below it, and
    # faces that failed the gate for any other reason, count as low weight.
    min_weight: float = 0.15
    max_photos: int = 30  # seed 001: "up to 30 photos of the profile"
    # manifest: the is_profile flag the manifest gave (faces.is_profile / photos.is_profile);
    # pattern: photos whose uri contains profile_pattern.
    profile_from: str = "manifest"
    profile_pattern: str = "/profile/"
    linkage: LinkageMethod = "average"
    threshold: float = DEFAULT_EUCLIDEAN_THRESHOLD
    run_id: str | None = None

    def validate(self) -> TemplatesConfig:
        if not self.lake:
            raise ConfigError("templates build needs --lake")
        if self.profile_from not in PROFILE_SOURCES:
            raise ConfigError(f"--profile-from must be one of {PROFILE_SOURCES}, got {self.profile_from!r}")
        if self.max_photos < 1 or not 0.0 <= self.min_weight <= 1.0:
            raise ConfigError("need --max-photos >= 1 and --min-weight in [0, 1]")
        if self.linkage not in get_args(LinkageMethod):
            raise ConfigError(f"unknown linkage {self.linkage!r}")
        _check_run_id(self.run_id)
        return self


_FACE_COLUMNS: Final = ["face_id", "photo_id", "user_id", "is_profile", "face_index", "quality", "passed_gate",
                        "embedding", "embedding_model", "run_date"]


def _photo_times(lake: Lake) -> tuple[dict[str, int], pa.Table]:
    """``{photo_id: processed_at µs}`` and the photos columns the profile rules need."""
    photos = lake.read("photos", ["photo_id", "user_id", "uri", "is_profile", "status", "processed_at"])
    ts = pc.cast(photos.column("processed_at"), pa.int64()).to_numpy(zero_copy_only=False)
    ids = photos.column("photo_id").to_pylist()
    times = {pid: int(t) for pid, t in zip(ids, ts, strict=True) if t is not None and not np.isnan(t)}
    return times, photos


def _run_date_us(values: Sequence[str | None]) -> np.ndarray:
    out = np.zeros(len(values), dtype=np.int64)
    for i, v in enumerate(values):
        if v:
            day = dt.datetime.strptime(v, "%Y-%m-%d").replace(tzinfo=dt.UTC)
            out[i] = int(day.timestamp() * 1_000_000)
    return out


def build_templates(cfg: TemplatesConfig) -> dict[str, Any]:
    """Rebuild every user's owner template from the faces of their profile photos (one Delta commit)."""
    cfg.validate()
    started = time.perf_counter()
    lake = Lake(cfg.lake, cfg.restricted_lake)
    for name in ("faces", "photos", "templates"):
        lake.check_schema(name)
    run_id = cfg.run_id or _new_run_id("templates")
    app_id = TEMPLATES_APP + run_id
    report: dict[str, Any] = {"job": "templates", "run_id": run_id, "table": lake.table_uri("templates")}
    if lake.committed_version("templates", app_id) is not None:
        return {**report, "status": "already committed", "table_version": lake.version("templates")}

    times, photos = _photo_times(lake)
    ok_photos = photos.filter(pc.equal(photos.column("status"), "ok"))
    if cfg.profile_from == "pattern":
        profile_ids = pc.filter(ok_photos.column("photo_id"),
                                pc.match_substring(ok_photos.column("uri"), cfg.profile_pattern))
        faces = lake.read("faces", _FACE_COLUMNS, pc.field("photo_id").isin(profile_ids))
        profile_users = pc.filter(ok_photos.column("user_id"),
                                  pc.match_substring(ok_photos.column("uri"), cfg.profile_pattern))
    else:
        faces = lake.read("faces", _FACE_COLUMNS, pc.field("is_profile") == True)  # noqa: E712 (an expression)
        profile_users = pc.filter(ok_photos.column("user_id"), pc.fill_null(ok_photos.column("is_profile"), False))
    gone = _tombstoned(lake)
    faces = faces.filter(pc.is_valid(faces.column("embedding")))

    users = faces.column("user_id").to_numpy(zero_copy_only=False).astype(str)
    photo_ids = faces.column("photo_id").to_numpy(zero_copy_only=False).astype(str)
    # Newest profile photo first: when the photos table knows when a photo was processed, that order;
    # otherwise the run date of its faces.
    fallback = _run_date_us(faces.column("run_date").to_pylist())
    when = np.array([times.get(p, f) for p, f in zip(photo_ids, fallback, strict=True)], dtype=np.int64)
    face_index = pc.fill_null(faces.column("face_index"), 0).to_numpy(zero_copy_only=False)
    order = np.lexsort((face_index, photo_ids, -when, users))
    faces = faces.take(pa.array(order))
    users = users[order]

    quality = pc.fill_null(faces.column("quality"), 0.0).to_numpy(zero_copy_only=False).astype(np.float32)
    passed = pc.fill_null(faces.column("passed_gate"), False).to_numpy(zero_copy_only=False).astype(bool)
    weights = np.where(passed, quality, np.float32(0.0))
    models = faces.column("embedding_model").to_numpy(zero_copy_only=False).astype(str)
    face_ids = faces.column("face_id").to_numpy(zero_copy_only=False).astype(str)
    photo_ids = faces.column("photo_id").to_numpy(zero_copy_only=False).astype(str)
    emb = _embedding_matrix(faces.column("embedding")) if faces.num_rows else np.zeros((0, 0), np.float32)

    tcfg = TemplateConfig(linkage=cfg.linkage, threshold=cfg.threshold)
    built_at = _now()
    rows: list[dict[str, Any]] = []
    reasons: Counter[str] = Counter()
    skipped_models = 0
    bounds = np.flatnonzero(np.r_[True, users[1:] != users[:-1], True]) if len(users) else np.array([0])
    for a, b in itertools.pairwise(bounds):
        uid = str(users[a])
        if uid in gone:
            continue
        # One embedding model per template: the model of the user's newest profile face (a model
        # upgrade re-tags newest photos first; vectors of two models are not comparable).
        model = models[a]
        rows_u = np.arange(a, b)[models[a:b] == model]
        skipped_models += (b - a) - len(rows_u)
        result = build_owner_template(emb[rows_u], weights[rows_u], face_ids[rows_u], photo_ids[rows_u],
                                      min_weight=cfg.min_weight, max_photos=cfg.max_photos, config=tcfg)
        row: dict[str, Any] = {"user_id": uid, "embedding_model": model, "built_at": built_at, "run_id": run_id,
                               "n_profile_photos": result.n_photos, "n_faces": result.n_faces}
        if isinstance(result, NoTemplate):
            reasons[result.reason.value] += 1
            row.update(status="none", reason=result.reason.value, n_members=0)
        else:
            row.update(status="ok", n_members=result.size, member_face_ids=list(result.face_ids),
                       weights=result.weights.tolist(), vectors=result.vectors.tolist(), density=result.density)
        rows.append(row)
    # Users with profile photos on which nothing usable was found still get a row saying why.
    seen = {r["user_id"] for r in rows}
    for uid in sorted({str(u) for u in profile_users.to_pylist()} - seen - gone):
        reasons[NoTemplateReason.NO_FACES.value] += 1
        rows.append({"user_id": uid, "status": "none", "reason": NoTemplateReason.NO_FACES.value,
                     "n_profile_photos": 0, "n_faces": 0, "n_members": 0, "built_at": built_at, "run_id": run_id})

    data = conform(pa.Table.from_pylist(rows, schema=TEMPLATES) if rows else TEMPLATES.empty_table(), TEMPLATES)
    data = data.sort_by([("user_id", "ascending")])
    table = lake.ensure("templates")
    # One row per user and every row derived again: replacing the whole (small) table in one commit is
    # atomic for readers and drops the templates of users who no longer have one.
    write_deltalake(table, data, mode="overwrite", commit_properties=_props(app_id, {"photolens.run_id": run_id}))
    n_ok = sum(1 for r in rows if r["status"] == "ok")
    return {
        **report,
        "status": "committed",
        "users": len(rows),
        "ok": n_ok,
        "none": dict(sorted(reasons.items())),
        "faces_of_other_models_skipped": int(skipped_models),
        "mean_members": round(float(np.mean([r["n_members"] for r in rows if r["status"] == "ok"])), 3)
        if n_ok else 0.0,
        "config": asdict(cfg),
        "table_version": lake.version("templates"),
        "seconds": round(time.perf_counter() - started, 3),
    }


# ---------------------------------------------------------------------------------------------- people


@dataclass(frozen=True)
class PeopleConfig:
    lake: str
    user: str
    restricted_lake: str | None = None
    linkage: LinkageMethod = "average"
    threshold: float | None = None  # None: cluster.py's default for the distance used
    rank_order: bool = False
    rank_order_k: int = DEFAULT_RANK_ORDER_K
    run_id: str | None = None

    def validate(self) -> PeopleConfig:
        if not self.lake or not self.user:
            raise ConfigError("people cluster needs --lake and --user")
        if self.linkage not in get_args(LinkageMethod):
            raise ConfigError(f"unknown linkage {self.linkage!r}")
        if self.rank_order and self.linkage in EUCLIDEAN_ONLY:
            raise ConfigError(f"{self.linkage} linkage needs Euclidean distances, not --rank-order")
        _check_run_id(self.run_id)
        return self


def _relabel_by_size(labels: np.ndarray) -> np.ndarray:
    """Person 0 is the most frequent face in the gallery (ties: first seen first)."""
    sizes = np.bincount(labels)
    order = sorted(range(len(sizes)), key=lambda c: (-sizes[c], c))
    rank = np.empty(len(sizes), dtype=np.int64)
    rank[order] = np.arange(len(sizes))
    return rank[labels]


def cluster_people(cfg: PeopleConfig) -> dict[str, Any]:
    """Cluster one user's gallery into people and replace that user's rows of ``people``."""
    cfg.validate()
    started = time.perf_counter()
    lake = Lake(cfg.lake, cfg.restricted_lake)
    lake.check_schema("people")
    run_id = cfg.run_id or _new_run_id("people")
    where = (pc.field("user_id") == cfg.user) & (pc.field("passed_gate") == True)  # noqa: E712 (an expression)
    faces = lake.read("faces", ["face_id", "photo_id", "embedding", "embedding_model"], where)
    faces = faces.filter(pc.is_valid(faces.column("embedding")))
    skipped = 0
    if faces.num_rows:
        # One model per clustering: the gallery's most common one.
        counts = Counter(faces.column("embedding_model").to_pylist())
        model = counts.most_common(1)[0][0]
        skipped = faces.num_rows - counts[model]
        faces = faces.filter(pc.equal(faces.column("embedding_model"), model))
    n = faces.num_rows
    threshold = cfg.threshold
    if threshold is None:
        threshold = (DEFAULT_RANK_ORDER_FRACTION * 2 * min(cfg.rank_order_k, max(n, 1)) if cfg.rank_order
                     else DEFAULT_EUCLIDEAN_THRESHOLD)
    photo_ids = np.asarray(faces.column("photo_id").to_pylist(), dtype=object)
    if n:
        labels = cluster_faces(_embedding_matrix(faces.column("embedding")), photo_ids, cfg.linkage, threshold,
                               rank_order=cfg.rank_order, rank_order_k=cfg.rank_order_k)
        labels = _relabel_by_size(labels)
    else:
        labels = np.zeros(0, dtype=np.int64)
    sizes = np.bincount(labels) if n else np.zeros(0, dtype=np.int64)
    distance = "rank_order" if cfg.rank_order else "euclidean"
    data = pa.table({
        "user_id": pa.array([cfg.user] * n, pa.string()),
        "face_id": faces.column("face_id"),
        "photo_id": faces.column("photo_id"),
        "person": pa.array(labels.astype(np.int32)),
        "cluster_size": pa.array(sizes[labels].astype(np.int32) if n else np.zeros(0, np.int32)),
        "linkage": pa.array([f"{cfg.linkage}/{distance}"] * n, pa.string()),
        "threshold": pa.array([threshold] * n, pa.float32()),
        "run_id": pa.array([run_id] * n, pa.string()),
    })
    data = conform(data, PEOPLE)
    # Replace exactly this user's rows in one commit (new file added, the user's old rows rewritten
    # away by pyarrow): readers never see the gallery half-done. Not delta-rs' delete/overwrite-where,
    # whose rewritten files come back as string_view columns that pyarrow dataset filters refuse.
    staged = lake.stage("people", data, tag=f"people-{run_id}")
    lake.commit_staged("people", staged, PEOPLE_APP + run_id, 1, {"photolens.run_id": run_id},
                       replace=("user_id", [cfg.user]))
    # A cannot-link check on what is written, cheap and independent of the clustering code.
    violations = 0
    for person in range(len(sizes)):
        members = photo_ids[labels == person]
        violations += len(members) - len(set(members))
    return {
        "job": "people",
        "user": cfg.user,
        "run_id": run_id,
        "n_faces": n,
        "n_people": len(sizes),
        "n_singletons": int((sizes == 1).sum()),
        "largest": sizes[:10].astype(int).tolist(),
        "faces_of_other_models_skipped": int(skipped),
        "linkage": cfg.linkage,
        "distance": distance,
        "threshold": float(threshold),
        "cannot_link_violations": int(violations),
        "table": lake.table_uri("people"),
        "table_version": lake.version("people"),
        "seconds": round(time.perf_counter() - started, 3),
    }


# ---------------------------------------------------------------------------------------------- eval clustering


def identity_groups(pairs_files: Sequence[Path]) -> dict[str, str]:
    """``{file name: group}``: connected components of the "same person" pairs over every named file.

    Reads ``file_x,file_y,Decision`` (deepface ``master.csv``; ``decision`` also accepted, paths reduced to
    the file name). A file only in "different" pairs is a group of its own.
    """
    import csv

    parent: dict[str, str] = {}

    def find(a: str) -> str:
        parent.setdefault(a, a)
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for path in pairs_files:
        with Path(path).open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            fields = {name.lower(): name for name in reader.fieldnames or ()}
            if not {"file_x", "file_y", "decision"} <= set(fields):
                raise ConfigError(f"{path}: need columns file_x, file_y, Decision")
            for row in reader:
                x = row[fields["file_x"]].strip().rsplit("/", 1)[-1]
                y = row[fields["file_y"]].strip().rsplit("/", 1)[-1]
                rx, ry = find(x), find(y)
                if row[fields["decision"]].strip().lower() == "yes" and rx != ry:
                    parent[rx] = ry
    return {name: find(name) for name in sorted(parent)}


def eval_clustering(
    faces_dir: Path,
    pairs: Sequence[Path],
    linkages: Sequence[str] = SEED000_LINKAGES,
    threshold: float | None = None,
    rank_order: bool = False,
    distractors: Sequence[str] = (),
    store_uri: str | None = None,
    device: str = "cpu",
    embedded: Mapping[str, PhotoFaces] | None = None,
) -> dict[str, Any]:
    """Seed 000's clustering table on a labelled face set, with the pipeline's face chain.

    The gallery is every face that passed the gate on the labelled photos (and on ``distractors``:
    unlabelled photos, e.g. group shots, that only add faces and cannot-link constraints). Each labelled
    photo's main face (largest confident one) carries the photo's identity and is what is scored; the
    other faces are clustered but unscored. ``embedded`` reuses faces already embedded (by file name).
    """
    from photolens.jobs.evaluate import main_face

    started = time.perf_counter()
    groups = identity_groups(pairs)
    names = [n for n in groups if (Path(faces_dir) / n).is_file()]
    wanted = sorted(set(names) | set(distractors))
    models: dict[str, str] = {}
    missing: dict[str, str] = {}
    if embedded is None:
        found, missing, models = embed_photos([Path(faces_dir) / n for n in wanted], store_uri, device)
    else:
        found = {n: embedded[n] for n in wanted if n in embedded}
        missing = {n: "not embedded" for n in wanted if n not in embedded}
    vectors, photo_of, truth = [], [], []
    unscored: dict[str, str] = {}
    for name in wanted:
        faces = found.get(name)
        if faces is None:
            continue
        main = main_face(faces.boxes, faces.det_scores) if name in groups else None
        if name in groups and (main is None or not faces.passed_gate[main]):
            unscored[name] = "no face" if main is None else f"main face failed the gate ({faces.gate_reasons[main]})"
        for k in np.flatnonzero(faces.passed_gate):
            vectors.append(faces.embeddings[k])
            photo_of.append(name)
            truth.append(groups[name] if k == main and name in groups else None)
    if not vectors:
        raise ConfigError(f"no face passed the gate on the {len(wanted)} photos under {faces_dir}")
    x = np.stack(vectors)
    photos = np.asarray(photo_of, dtype=object)
    scored = np.array([t is not None for t in truth])
    labels_true = np.unique(np.array([t for t in truth if t is not None]), return_inverse=True)[1]
    variants = [(m, False) for m in linkages] + ([(m, True) for m in linkages if m not in EUCLIDEAN_ONLY]
                                                 if rank_order else [])
    rows = []
    for method, ro in variants:
        if method not in get_args(LinkageMethod):
            raise ConfigError(f"unknown linkage {method!r}")
        labels = cluster_faces(x, photos, method, threshold, rank_order=ro)  # type: ignore[arg-type]
        violations = sum(len(p) - len(set(p)) for p in (photos[labels == c] for c in np.unique(labels)))
        scores = clustering_scores(labels_true, labels[scored])
        rows.append({"linkage": method, "distance": "rank_order" if ro else "euclidean", **scores.as_dict(),
                     "cannot_link_violations": int(violations)})
    return {
        "rows": rows,
        "threshold": threshold if threshold is not None else "default",
        "n_photos": len(found),
        "n_labelled_photos": len(names),
        "n_identities": len({groups[n] for n in names}),
        "n_faces": len(x),
        "n_scored_faces": int(scored.sum()),
        "unscored": unscored,
        "missing": missing,
        "models": models,
        "seconds": round(time.perf_counter() - started, 2),
    }


def format_clustering(result: dict[str, Any]) -> str:
    lines = [f"face clustering: {result['n_faces']} faces on {result['n_photos']} photos, "
             f"{result['n_scored_faces']} scored over {result['n_identities']} identities; "
             f"cut {result['threshold']}",
             f"  {'linkage':<10}{'distance':<12}{'K/C':>7}{'ARI':>8}{'AMI':>8}{'P':>8}{'R':>8}{'F':>8}"]
    for r in result["rows"]:
        lines.append(f"  {r['linkage']:<10}{r['distance']:<12}{r['k_over_c']:>7.2f}{r['ari']:>8.3f}{r['ami']:>8.3f}"
                     f"{r['precision']:>8.3f}{r['recall']:>8.3f}{r['f_measure']:>8.3f}")
    for name, why in sorted({**result["unscored"], **result["missing"]}.items()):
        lines.append(f"    {name}: {why}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- index


@dataclass(frozen=True)
class IndexBuildConfig:
    lake: str
    index_store: str
    restricted_lake: str | None = None
    factory: str | None = None  # None: faceindex.index.default_factory (OPQ, 8× compression)
    train_size: int = 50_000
    memory_budget_mb: float = 1024.0  # per encode task; plan_shards splits the vectors to fit
    publish: bool = False
    seed: int = 0
    n_eval_queries: int = 1_000
    opq_niter: int = 10
    threads: int | None = 1  # OpenMP threads inside each task (Ray already runs tasks side by side)
    task_cpus: float = 1.0
    run_id: str | None = None

    def validate(self) -> IndexBuildConfig:
        if not self.lake or not self.index_store:
            raise ConfigError("index build needs --lake and --index-store")
        if self.memory_budget_mb <= 0 or self.train_size < 256:
            raise ConfigError("need --memory-budget-mb > 0 and --train-size >= 256")
        _check_run_id(self.run_id)
        return self


def _index_config(cfg: IndexBuildConfig, model_version: str) -> Any:
    from photolens.faceindex.index import IndexConfig

    return IndexConfig(factory=cfg.factory, train_size=cfg.train_size, seed=cfg.seed, opq_niter=cfg.opq_niter,
                       n_eval_queries=cfg.n_eval_queries, model_version=model_version, threads=cfg.threads)


def _faces_outside_templates(lake: Lake, model: str, members: set[str], n: int, seed: int) -> np.ndarray:
    """Up to ``n`` gated faces of the index's model that are in no template (seeded sample, shuffled)."""
    where = (pc.field("passed_gate") == True) & (pc.field("embedding_model") == model)  # noqa: E712
    faces = lake.read("faces", ["face_id", "embedding"], where)
    faces = faces.filter(pc.is_valid(faces.column("embedding")))
    if members and faces.num_rows:
        faces = faces.filter(pc.invert(pc.is_in(faces.column("face_id"), pa.array(sorted(members), pa.string()))))
    rows = np.random.default_rng(seed).permutation(faces.num_rows)[:n]
    faces = faces.take(pa.array(rows, pa.int64()))
    return l2_normalise(_embedding_matrix(faces.column("embedding"))) if faces.num_rows else np.zeros((0, 0))


def build_face_index(cfg: IndexBuildConfig, *, extra_training: np.ndarray | None = None) -> dict[str, Any]:
    """Train, encode (Ray tasks per shard), merge, measure, store a version; publish if asked.

    The codec is trained on a seeded sample of face embeddings: the template vectors plus gated faces
    of the same model that are in no template and not held out for the recall report (the
    distribution search queries come from). ``extra_training`` adds
    vectors to that pool only (never to the index): for tests and tiny lakes below the 256 vectors
    one 8-bit codebook needs.
    """
    import ray

    from photolens.faceindex.artifacts import IndexStore
    from photolens.faceindex.index import (
        deserialize,
        encode_shard,
        evaluate_recall,
        make_sidecar,
        merge,
        plan_shards,
        serialize,
        train,
        user_key,
    )
    from photolens.jobs.tag import ensure_ray

    cfg.validate()
    started = time.perf_counter()
    lake = Lake(cfg.lake, cfg.restricted_lake)
    run_id = cfg.run_id or _new_run_id("index")
    rows = lake.read("templates", ["user_id", "vectors", "member_face_ids", "embedding_model"],
                     pc.field("status") == "ok")
    if rows.num_rows == 0:
        raise ConfigError(f"no ok templates in {lake.table_uri('templates')}: run `photolens templates build` first")
    # One model per index: the one most templates use (the others wait for their users' re-tagging).
    counts = Counter(rows.column("embedding_model").to_pylist())
    model = str(counts.most_common(1)[0][0])
    skipped = rows.num_rows - counts[model]
    rows = rows.filter(pc.equal(rows.column("embedding_model"), model))
    gone = _tombstoned(lake)
    if gone:
        rows = rows.filter(pc.invert(pc.is_in(rows.column("user_id"), pa.array(sorted(gone), pa.string()))))
    mats = _template_matrices(rows.column("vectors"))
    users = [str(u) for u in rows.column("user_id").to_pylist()]
    vectors = l2_normalise(np.concatenate(mats))
    ids = np.concatenate([np.full(len(m), user_key(u), dtype=np.int64) for u, m in zip(users, mats, strict=True)])
    n, d = vectors.shape
    members = {f for fl in rows.column("member_face_ids").to_pylist() for f in (fl or ())}
    # Faces in no template: the first ones are the held-out queries of the recall report (real queries
    # the index never saw), the rest join the codec's training sample (the distribution queries come from).
    others = _faces_outside_templates(lake, model, members, cfg.n_eval_queries + cfg.train_size, cfg.seed)
    queries, other_train = others[:cfg.n_eval_queries], others[cfg.n_eval_queries:]
    pool_parts = [vectors] + ([other_train] if len(other_train) else [])
    n_extra = 0
    if extra_training is not None and len(extra_training):
        pool_parts.append(l2_normalise(np.asarray(extra_training, dtype=np.float32)))
        n_extra = len(extra_training)
    pool = np.concatenate(pool_parts)
    if len(pool) < 256:
        raise ConfigError(f"only {len(pool)} face embeddings to train the codec on; one 8-bit codebook needs 256")
    icfg = _index_config(cfg, model)

    ensure_ray()
    budget = int(cfg.memory_budget_mb * 2**20)
    memory = ray.cluster_resources().get("memory", 0.0)
    if memory and budget > memory:
        raise ConfigError(f"--memory-budget-mb {cfg.memory_budget_mb} exceeds the cluster's {memory / 2**20:.0f} MiB")
    t0 = time.perf_counter()
    trained = ray.get(ray.remote(train).options(num_cpus=cfg.task_cpus).remote(pool, icfg))
    t1 = time.perf_counter()
    code_bytes = int(deserialize(trained).sa_code_size())
    shards = plan_shards(n, d, budget, code_bytes=code_bytes)
    trained_ref = ray.put(trained)
    encode = ray.remote(encode_shard).options(num_cpus=cfg.task_cpus, memory=budget)
    parts = ray.get([encode.remote(trained_ref, vectors[a:b], ids[a:b]) for a, b in shards])
    t2 = time.perf_counter()
    index = merge(parts)
    del parts
    index_bytes = serialize(index)
    recall = evaluate_recall(index, vectors, queries if len(queries) else None, n_queries=cfg.n_eval_queries,
                             seed=cfg.seed)
    t3 = time.perf_counter()
    factory = icfg.factory or _default_factory(d)
    sidecar = make_sidecar(
        index, factory=factory, train_size=min(len(pool), cfg.train_size), model_version=model,
        index_bytes_len=len(index_bytes), recall=recall, n_shards=len(shards), seed=cfg.seed,
        extra={
            "run_id": run_id,
            "n_users": len(users),
            "templates_table_version": lake.version("templates"),
            "templates_of_other_models_skipped": int(skipped),
            "eval_queries": "gated faces in no template" if len(queries) else "leave-one-out over the templates",
            "train_pool": {"template_vectors": n, "other_faces": len(other_train), "extra": n_extra},
            "memory_budget_mb": cfg.memory_budget_mb,
            "config": asdict(cfg),
            "timings_s": {"train": round(t1 - t0, 3), "encode": round(t2 - t1, 3), "merge_eval": round(t3 - t2, 3)},
        },
    )
    store = IndexStore(cfg.index_store)
    version = store.put_version(index_bytes, sidecar, extra_files={CODEC_FILE: trained})
    if cfg.publish:
        store.publish(version)
    return {"job": "index", "version": version, "published": cfg.publish, "current": store.current(),
            "sidecar": sidecar, "seconds": round(time.perf_counter() - started, 3)}


def _default_factory(d: int) -> str:
    from photolens.faceindex.index import default_factory

    return default_factory(d)


def publish_index(index_store: str, version: str) -> dict[str, Any]:
    from photolens.faceindex.artifacts import IndexStore

    store = IndexStore(index_store)
    store.publish(version)
    return store.info()


def rollback_index(index_store: str) -> dict[str, Any]:
    from photolens.faceindex.artifacts import IndexStore

    store = IndexStore(index_store)
    store.rollback()
    return store.info()


def index_info(index_store: str) -> dict[str, Any]:
    from photolens.faceindex.artifacts import IndexStore

    store = IndexStore(index_store)
    return {**store.info(), "history": store.history()}


# ---------------------------------------------------------------------------------------------- suggest


@dataclass(frozen=True)
class SuggestConfig:
    lake: str
    index_store: str
    restricted_lake: str | None = None
    photos_run: str | None = None  # faces of this tagging run ...
    faces_since: str | None = None  # ... or of runs dated on/after this day (YYYY-MM-DD)
    threshold: float | None = None  # None: calibrated on the templates at target_far
    target_far: float = 1e-2
    calibration_max_users: int = 2_000
    run_id: str | None = None  # default from the selection: "photos-<run>" or "since-<day>"
    max_tasks: int = 16  # uploader groups (Ray tasks); each uploader's burst stays in one task
    cache_ttl_s: float = 300.0
    seed: int = 0

    def validate(self) -> SuggestConfig:
        if not self.lake or not self.index_store:
            raise ConfigError("suggest needs --lake and --index-store")
        if (self.photos_run is None) == (self.faces_since is None):
            raise ConfigError("give exactly one of --photos-run and --faces-since")
        if self.faces_since is not None:
            try:
                dt.date.fromisoformat(self.faces_since)
            except ValueError as exc:
                raise ConfigError(f"--faces-since {self.faces_since!r} is not YYYY-MM-DD") from exc
        if not 0.0 < self.target_far < 1.0 or self.max_tasks < 1:
            raise ConfigError("need 0 < --target-far < 1 and --max-tasks >= 1")
        _check_run_id(self.run_id)
        _check_run_id(self.photos_run)
        return self

    def resolved_run_id(self) -> str:
        if self.run_id:
            return self.run_id
        return f"photos-{self.photos_run}" if self.photos_run else f"since-{self.faces_since}"


def calibrate_from_templates(
    templates: Mapping[str, np.ndarray], target_far: float = 1e-2, max_users: int = 2_000, seed: int = 0
) -> Calibration:
    """Verification threshold from the templates themselves.

    Genuine: each template vector against the rest of its own template (leave-one-out, best distance).
    Impostor: each template vector against every other user's template (best distance). A seeded
    sample of ``max_users`` users bounds the ``O(vectors²)`` work.
    """
    uids = sorted(templates)
    if len(uids) > max_users:
        uids = sorted(np.random.default_rng(seed).choice(uids, max_users, replace=False).tolist())
    mats = [l2_normalise(np.atleast_2d(templates[u])) for u in uids]
    if len(mats) < 2:
        raise ConfigError("calibration needs templates of at least two users; give --threshold")
    x = np.concatenate(mats).astype(np.float64)
    owner = np.concatenate([np.full(len(m), i) for i, m in enumerate(mats)])
    sq = np.einsum("ij,ij->i", x, x)
    dist = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2.0 * x @ x.T, 0.0))
    starts = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]])
    per_user = np.minimum.reduceat(dist, starts, axis=1)  # (vectors, users): best distance to each template
    genuine = []
    for i, m in enumerate(mats):
        if len(m) < 2:
            continue
        block = dist[np.ix_(owner == i, owner == i)].copy()
        np.fill_diagonal(block, np.inf)
        genuine.append(block.min(axis=1))
    if not genuine:
        raise ConfigError("calibration needs a template with two or more vectors; give --threshold")
    impostor = per_user[owner[:, None] != np.arange(len(mats))[None, :]]
    return calibrate_threshold(np.concatenate(genuine), impostor, target_far)


# (uploader, photo ids, face ids, embeddings (n, d)) in upload order
UploaderFaces = tuple[str, list[str], list[str], np.ndarray]


def suggest_for_uploaders(
    codec: bytes,
    groups: Sequence[UploaderFaces],
    friends: Mapping[str, Sequence[str]],
    templates: Mapping[str, np.ndarray],
    threshold: float,
    ttl_s: float = 300.0,
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Suggestion rows for the faces of some uploaders (one Ray task's work; pure, testable without Ray).

    Photo by photo, as uploads arrive: the uploader's friend index is built on their first photo and
    the rest of the burst hits the cache. Candidates: up to 5 friends nearest by L2 over compressed
    templates; verification: the best candidate on the uncompressed template, ``<= threshold``.
    ``verified_user_id`` is set only when accepted; ``verify_distance`` is the best exact distance
    either way (so a threshold change can be audited).
    """

    def provider(uploader: str) -> dict[str, np.ndarray]:
        return {f: templates[f] for f in friends.get(uploader, ()) if f in templates}

    cache = FriendIndexCache(codec, provider, ttl_s=ttl_s)
    rows: list[dict[str, Any]] = []
    for uploader, photo_ids, face_ids, emb in groups:
        by_photo: dict[str, list[int]] = defaultdict(list)
        for i, pid in enumerate(photo_ids):
            by_photo[pid].append(i)
        for pid, idx in by_photo.items():
            entry = cache.get(uploader)
            faces = emb[idx]
            for i, cands in zip(idx, entry.search(faces, MAX_CANDIDATES), strict=True):
                checks = verify(emb[i], {c.user_id: entry.templates[c.user_id] for c in cands}, threshold)
                best = checks[0] if checks else None
                rows.append({
                    "photo_id": pid,
                    "face_id": face_ids[i],
                    "uploader_id": uploader,
                    "candidates": [c.user_id for c in cands],
                    "distances": [c.distance for c in cands],
                    "verified_user_id": best.user_id if best is not None and best.accepted else None,
                    "verified": bool(best is not None and best.accepted),
                    "verify_distance": best.distance if best is not None else None,
                })
    stats = cache.stats
    return rows, {"hits": stats.hits, "misses": stats.misses, "entries": stats.entries}


def _friends_of(lake: Lake, uploaders: Sequence[str]) -> dict[str, list[str]]:
    """Friendship is mutual: a row (a, b) makes b a friend of a and a a friend of b."""
    arr = pa.array(sorted(set(uploaders)), pa.string())
    rows = lake.read("friends", ["user_id", "friend_id"],
                     pc.field("user_id").isin(arr) | pc.field("friend_id").isin(arr))
    wanted = set(uploaders)
    out: dict[str, set[str]] = defaultdict(set)
    for a, b in zip(rows.column("user_id").to_pylist(), rows.column("friend_id").to_pylist(), strict=True):
        if a in wanted and b != a:
            out[a].add(b)
        if b in wanted and a != b:
            out[b].add(a)
    return {u: sorted(f) for u, f in out.items()}


def _balanced_groups(sizes: Mapping[str, int], n_groups: int) -> list[list[str]]:
    """Uploaders into ``n_groups`` of about equal face counts (largest first into the lightest group)."""
    groups: list[list[str]] = [[] for _ in range(max(1, min(n_groups, len(sizes))))]
    load = [0] * len(groups)
    for uid in sorted(sizes, key=lambda u: (-sizes[u], u)):
        g = int(np.argmin(load))
        groups[g].append(uid)
        load[g] += sizes[uid]
    return [g for g in groups if g]


def run_suggest(cfg: SuggestConfig) -> dict[str, Any]:
    """Friend suggestions + verification for new faces; one ``suggestions`` commit per run id."""
    import ray

    from photolens.faceindex.artifacts import IndexStore
    from photolens.faceindex.index import codec_bytes
    from photolens.jobs.tag import ensure_ray

    cfg.validate()
    started = time.perf_counter()
    lake = Lake(cfg.lake, cfg.restricted_lake)
    lake.check_schema("suggestions")
    run_id = cfg.resolved_run_id()
    app_id = SUGGEST_APP + run_id
    report: dict[str, Any] = {"job": "suggest", "run_id": run_id, "table": lake.table_uri("suggestions")}
    if lake.committed_version("suggestions", app_id) is not None:
        return {**report, "status": "already committed", "table_version": lake.version("suggestions")}

    store = IndexStore(cfg.index_store)
    try:
        loaded = store.load()  # the published version
    except LookupError as exc:
        raise ConfigError(f"{exc}: build and publish an index first (`photolens index build --publish`)") from exc
    try:
        codec = store.load_extra(loaded.version, CODEC_FILE)
    except KeyError:
        codec = codec_bytes(loaded.index())
    model = str(loaded.sidecar.get("model_version"))

    where = pc.field("passed_gate") == True  # noqa: E712 (an expression)
    where &= (pc.field("run_id") == cfg.photos_run) if cfg.photos_run else (pc.field("run_date") >= cfg.faces_since)
    faces = lake.read("faces", ["face_id", "photo_id", "user_id", "face_index", "embedding", "embedding_model"], where)
    faces = faces.filter(pc.is_valid(faces.column("embedding")))
    n_read = faces.num_rows
    wrong_model = int(pc.sum(pc.not_equal(faces.column("embedding_model"), model)).as_py() or 0)
    faces = faces.filter(pc.equal(faces.column("embedding_model"), model))
    gone = _tombstoned(lake)
    if gone:
        faces = faces.filter(pc.invert(pc.is_in(faces.column("user_id"), pa.array(sorted(gone), pa.string()))))
    if faces.num_rows:
        # "New" faces: ones no earlier suggest run has answered (overlapping --faces-since windows).
        todo_ids = faces.column("face_id").combine_chunks()
        done = lake.read("suggestions", ["face_id"], pc.field("face_id").isin(todo_ids))
        if done.num_rows:
            faces = faces.filter(pc.invert(pc.is_in(faces.column("face_id"), done.column("face_id").combine_chunks())))
    faces = faces.sort_by([("user_id", "ascending"), ("photo_id", "ascending"), ("face_index", "ascending")])

    uploaders = sorted(set(faces.column("user_id").to_pylist()))
    friends = _friends_of(lake, uploaders) if uploaders else {}
    needed = {f for fl in friends.values() for f in fl} - gone
    templates, t_models = _read_templates(lake, needed)
    templates = {u: m for u, m in templates.items() if t_models[u] == model}
    if cfg.threshold is not None:
        threshold, calibration = float(cfg.threshold), None
    else:
        all_templates, all_models = _read_templates(lake)
        calibration = calibrate_from_templates({u: m for u, m in all_templates.items() if all_models[u] == model
                                                and u not in gone}, cfg.target_far, cfg.calibration_max_users,
                                               cfg.seed)
        threshold = calibration.threshold

    rows: list[dict[str, Any]] = []
    cache_stats: Counter[str] = Counter()
    n_tasks = 0
    if faces.num_rows:
        emb = l2_normalise(_embedding_matrix(faces.column("embedding")))
        user_col = np.asarray(faces.column("user_id").to_pylist(), dtype=object)
        photo_col = faces.column("photo_id").to_pylist()
        face_col = faces.column("face_id").to_pylist()
        per_user: dict[str, UploaderFaces] = {}
        bounds = np.flatnonzero(np.r_[True, user_col[1:] != user_col[:-1], True])
        for a, b in itertools.pairwise(bounds):
            uid = str(user_col[a])
            per_user[uid] = (uid, photo_col[a:b], face_col[a:b], emb[a:b])
        groups = _balanced_groups({u: len(v[1]) for u, v in per_user.items()}, cfg.max_tasks)
        ensure_ray()
        codec_ref = ray.put(codec)
        task = ray.remote(suggest_for_uploaders).options(num_cpus=1)
        refs = []
        for group in groups:
            g_friends = {u: friends.get(u, []) for u in group}
            g_templates = {f: templates[f] for fl in g_friends.values() for f in fl if f in templates}
            refs.append(task.remote(codec_ref, [per_user[u] for u in group], g_friends, g_templates, threshold,
                                    cfg.cache_ttl_s))
        n_tasks = len(refs)
        for task_rows, stats in ray.get(refs):
            rows.extend(task_rows)
            cache_stats.update(stats)

    created_at = _now()
    for r in rows:
        r.update(threshold=threshold, index_version=loaded.version, run_id=run_id, created_at=created_at)
    data = pa.Table.from_pylist(rows, schema=SUGGESTIONS) if rows else SUGGESTIONS.empty_table()
    version = lake.append("suggestions", data, app_id=app_id, custom_metadata={"photolens.run_id": run_id})
    return {
        **report,
        "status": "committed" if version is not None else "already committed",
        "index_version": loaded.version,
        "faces_read": n_read,
        "faces_of_other_models": wrong_model,
        "faces": len(rows),
        "uploaders": len(uploaders),
        "tasks": n_tasks,
        "with_candidates": sum(1 for r in rows if r["candidates"]),
        "verified": sum(1 for r in rows if r["verified"]),
        "threshold": threshold,
        "calibration": asdict(calibration) if calibration is not None else None,
        "cache": dict(cache_stats),
        "table_version": lake.version("suggestions"),
        "seconds": round(time.perf_counter() - started, 3),
    }


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


def _plain_strings(table: pa.Table) -> pa.Table:
    """``string_view`` columns (delta-rs writes them when it rewrites files) cast back to ``string``."""

    def plain(t: pa.DataType) -> pa.DataType:
        if pa.types.is_string_view(t) or pa.types.is_large_string(t):
            return pa.string()
        if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_list_view(t):
            return pa.list_(plain(t.value_type))
        return t

    target = pa.schema([f.with_type(plain(f.type)) for f in table.schema], metadata=table.schema.metadata)
    return table if target.equals(table.schema) else table.cast(target)


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
    """Delete the user's rows in one Delta commit: each file holding some is removed and its other rows
    re-added as a new file (pyarrow, plain string types). Returns the rows deleted."""
    from deltalake.transaction import AddAction, RemoveAction

    from photolens.lake.delta import file_stats

    fs, root = filesystem_for(uri, lake.s3)
    partition_by = list(table.metadata().partition_columns)
    now_ms = int(_now().timestamp() * 1000)
    actions: list[AddAction | RemoveAction] = []
    deleted = 0
    for add in pa.table(table.get_add_actions(flatten=True)).to_pylist():
        path = add["path"]
        with fs.open_input_file(f"{root}/{path}") as f:
            body = _plain_strings(pq.read_table(f))
        hit = _user_mask(body, user, face_ids)
        if not hit.any():
            continue
        deleted += int(hit.sum())
        parts = {k.removeprefix("partition."): None if v is None else str(v)
                 for k, v in add.items() if k.startswith("partition.")}
        actions.append(RemoveAction(path, True, now_ms, add["size_bytes"], parts))
        keep = body.filter(pa.array(~hit))
        if keep.num_rows:
            folder = path.rsplit("/", 1)[0] + "/" if "/" in path else ""
            rel = f"{folder}part-forget-{uuid.uuid4().hex[:12]}.parquet"
            with fs.open_output_stream(f"{root}/{rel}") as f:
                pq.write_table(keep, f, compression="zstd")
            size = fs.get_file_info(f"{root}/{rel}").size
            actions.append(AddAction(rel, size, parts, now_ms, True, file_stats(keep, skip=tuple(partition_by))))
    if actions:
        table.create_write_transaction(actions, mode="append", schema=table.schema(),
                                       partition_by=partition_by or None,
                                       commit_properties=_props(None, {"photolens.job": "forget"}))
        table.update_incremental()
    return deleted


def _scrub_unreferenced(lake: Lake, uri: str, table: DeltaTable, user: str, face_ids: set[str],
                        in_flight: Sequence[str], retention_hours: int) -> dict[str, int]:
    """Delete data files the table no longer references that still hold the user's rows.

    Vacuum's default mode only deletes files that a commit removed; a crashed tagging run leaves staged
    files no commit ever mentioned, and they can hold the user's faces. Files of runs still in flight
    are kept (their commit would reference them) and counted; so are files younger than the retention.
    """
    fs, root = filesystem_for(uri, lake.s3)
    referenced = set(table.file_uris())
    cutoff = _now() - dt.timedelta(hours=retention_hours)
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
            body = _plain_strings(pq.read_table(f))
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
                                commit_properties=_props(None, {"photolens.job": "forget"}))
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
    started_at = _now()
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
        "finished_at": _now().isoformat(),
        "receipt_uri": receipt_uri,
    }
    lake.put_json(receipt_uri, receipt)
    return receipt


# ---------------------------------------------------------------------------------------------- CLI


Handler = Callable[[argparse.Namespace], int]


def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))


def cmd_templates(args: argparse.Namespace) -> int:
    _print(build_templates(TemplatesConfig(
        lake=args.lake, restricted_lake=args.restricted_lake, min_weight=args.min_weight, max_photos=args.max_photos,
        profile_from=args.profile_from, profile_pattern=args.profile_pattern, linkage=args.linkage,
        threshold=args.threshold, run_id=args.run_id)))
    return 0


def cmd_people(args: argparse.Namespace) -> int:
    _print(cluster_people(PeopleConfig(
        lake=args.lake, user=args.user, restricted_lake=args.restricted_lake, linkage=args.linkage,
        threshold=args.threshold, rank_order=args.rank_order, rank_order_k=args.rank_order_k, run_id=args.run_id)))
    return 0


def cmd_eval_clustering(args: argparse.Namespace) -> int:
    result = eval_clustering(Path(args.faces_dir), [Path(p) for p in args.pairs], args.linkage or SEED000_LINKAGES,
                             args.threshold, args.rank_order, args.distractor or (), args.store, args.device)
    print(json.dumps(result, indent=2, sort_keys=True) if args.json else format_clustering(result))
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    if args.index_cmd == "build":
        _print(build_face_index(IndexBuildConfig(
            lake=args.lake, index_store=args.index_store, restricted_lake=args.restricted_lake, factory=args.factory,
            train_size=args.train_size, memory_budget_mb=args.memory_budget_mb, publish=args.publish,
            seed=args.seed, n_eval_queries=args.eval_queries, run_id=args.run_id)))
    elif args.index_cmd == "publish":
        _print(publish_index(args.index_store, args.version))
    elif args.index_cmd == "rollback":
        _print(rollback_index(args.index_store))
    else:
        _print(index_info(args.index_store))
    return 0


def cmd_suggest(args: argparse.Namespace) -> int:
    _print(run_suggest(SuggestConfig(
        lake=args.lake, index_store=args.index_store, restricted_lake=args.restricted_lake,
        photos_run=args.photos_run, faces_since=args.faces_since, threshold=args.threshold,
        target_far=args.target_far, run_id=args.run_id, max_tasks=args.max_tasks)))
    return 0


def cmd_forget(args: argparse.Namespace) -> int:
    _print(forget_user(ForgetConfig(
        user=args.user, lake=args.lake, restricted_lake=args.restricted_lake, index_store=args.index_store,
        retention_hours=args.retention_hours, rebuild_index=args.rebuild_index)))
    return 0


def _lake_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lake", required=True, help="lake root: a folder or s3://bucket/prefix")
    p.add_argument("--restricted-lake", dest="restricted_lake",
                   help="root of the biometric tables (faces, templates, people); default <lake>/restricted")


def register(sub: Any) -> None:
    """Add ``templates``, ``people``, ``index``, ``suggest`` and ``forget`` to the CLI's sub-parsers."""
    linkages = list(get_args(LinkageMethod))
    templates = sub.add_parser("templates", help="per-user owner templates").add_subparsers(
        dest="templates_cmd", required=True)
    p = templates.add_parser("build", help="rebuild every user's template from their profile photos' faces")
    _lake_args(p)
    p.add_argument("--min-weight", dest="min_weight", type=float, default=0.15, help="drop faces below this weight")
    p.add_argument("--max-photos", dest="max_photos", type=int, default=30, help="newest profile photos used")
    p.add_argument("--profile-from", dest="profile_from", choices=PROFILE_SOURCES, default="manifest",
                   help="manifest: the is_profile flag; pattern: photo uri contains --profile-pattern")
    p.add_argument("--profile-pattern", dest="profile_pattern", default="/profile/")
    p.add_argument("--linkage", choices=linkages, default="average")
    p.add_argument("--threshold", type=float, default=DEFAULT_EUCLIDEAN_THRESHOLD, help="cut on unit vectors")
    p.add_argument("--run-id", dest="run_id", help="idempotency key: a committed run id commits nothing again")
    handler: Handler = cmd_templates
    p.set_defaults(handler=handler)

    people = sub.add_parser("people", help="frequent people in a user's gallery").add_subparsers(
        dest="people_cmd", required=True)
    p = people.add_parser("cluster", help="cluster one user's gallery (cannot-link per photo)")
    _lake_args(p)
    p.add_argument("--user", required=True)
    p.add_argument("--linkage", choices=linkages, default="average")
    p.add_argument("--threshold", type=float, help="cut height (default: the distance's own default)")
    p.add_argument("--rank-order", dest="rank_order", action="store_true", help="rank-order distance (Zhu et al.)")
    p.add_argument("--rank-order-k", dest="rank_order_k", type=int, default=DEFAULT_RANK_ORDER_K)
    p.add_argument("--run-id", dest="run_id")
    handler = cmd_people
    p.set_defaults(handler=handler)

    index = sub.add_parser("index", help="the OPQ/PQ face index").add_subparsers(dest="index_cmd", required=True)
    p = index.add_parser("build", help="train + encode (Ray tasks) + merge + recall report; a new version")
    _lake_args(p)
    p.add_argument("--index-store", dest="index_store", required=True, help="folder or s3:// prefix of versions")
    p.add_argument("--factory", help="faiss factory string (default OPQ{m},PQ{m}x8np, 8x compression)")
    p.add_argument("--train-size", dest="train_size", type=int, default=50_000)
    p.add_argument("--memory-budget-mb", dest="memory_budget_mb", type=float, default=1024.0,
                   help="per encode task; the vectors are split into shards that fit")
    p.add_argument("--eval-queries", dest="eval_queries", type=int, default=1_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--publish", action="store_true", help="make the new version current")
    p.add_argument("--run-id", dest="run_id")
    for name, helptext in (("publish", "make a stored version current"), ("rollback", "back to the previous one"),
                           ("info", "the current version's sidecar, versions and history")):
        q = index.add_parser(name, help=helptext)
        q.add_argument("--index-store", dest="index_store", required=True)
        if name == "publish":
            q.add_argument("--version", required=True)
    for q in index.choices.values():
        handler = cmd_index
        q.set_defaults(handler=handler)

    p = sub.add_parser("suggest", help="friend suggestions + verification for new faces")
    _lake_args(p)
    p.add_argument("--index-store", dest="index_store", required=True)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--photos-run", dest="photos_run", help="faces of this tagging run")
    which.add_argument("--faces-since", dest="faces_since", help="faces of runs on/after YYYY-MM-DD")
    p.add_argument("--threshold", type=float, help="verification distance (default: calibrated on the templates)")
    p.add_argument("--target-far", dest="target_far", type=float, default=1e-2)
    p.add_argument("--run-id", dest="run_id", help="default photos-<run> / since-<day>: a re-run commits nothing")
    p.add_argument("--max-tasks", dest="max_tasks", type=int, default=16, help="uploader groups run as Ray tasks")
    handler = cmd_suggest
    p.set_defaults(handler=handler)

    p = sub.add_parser("forget", help="delete a user everywhere (tables, files, index versions) with a receipt")
    p.add_argument("--user", required=True)
    _lake_args(p)
    p.add_argument("--index-store", dest="index_store", help="also remove the user from every index version")
    p.add_argument("--retention-hours", dest="retention_hours", type=int, default=0,
                   help="vacuum retention; 0 deletes replaced files now (turns off Delta's 168 h check)")
    p.add_argument("--rebuild-index", dest="rebuild_index", action="store_true",
                   help="retrain the index without the user instead of scrubbing ids from each version")
    handler = cmd_forget
    p.set_defaults(handler=handler)


def register_eval(cmds: Any) -> None:
    """Add ``eval clustering`` to the ``eval`` sub-parsers (``jobs.evaluate.register(sub, extra_eval=...)``)."""
    p = cmds.add_parser("clustering", help="face clustering on labelled pairs: K/C, ARI, AMI, F per linkage")
    p.add_argument("--faces-dir", dest="faces_dir", required=True, help="folder with the labelled photos")
    p.add_argument("--pairs", action="append", required=True,
                   help="CSV file_x,file_y,Decision; identities = connected 'Yes' pairs (repeatable)")
    p.add_argument("--linkage", action="append", choices=list(get_args(LinkageMethod)),
                   help=f"repeatable; default {', '.join(SEED000_LINKAGES)}")
    p.add_argument("--threshold", type=float, help="cut height (default: the distance's own default)")
    p.add_argument("--rank-order", dest="rank_order", action="store_true", help="also rank-order distance rows")
    p.add_argument("--distractor", action="append", help="unlabelled photo in --faces-dir to add (repeatable)")
    p.add_argument("--store", help="model store (default $PHOTOLENS_MODEL_STORE or ~/.cache/photolens/models)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true")
    handler: Handler = cmd_eval_clustering
    p.set_defaults(handler=handler)

