"""``photolens templates build``: per-user owner templates from profile photos (seed 001).

Per user, the faces of up to 30 profile photos (newest first), low-weight faces dropped, the
densest/largest cluster as the owner's template → restricted ``templates``. The whole table is replaced
in one atomic Delta commit: it is one small row per user, and a rebuild derives every row again, so users
whose template disappeared disappear too. The per-user loop is small numpy work in the driver.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Final, get_args

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from deltalake import write_deltalake

from photolens.faceindex.cluster import (
    DEFAULT_EUCLIDEAN_THRESHOLD,
    LinkageMethod,
)
from photolens.faceindex.templates import NoTemplate, NoTemplateReason, TemplateConfig, build_owner_template
from photolens.jobs._faceshared import (
    check_run_id,
    commit_props,
    embedding_matrix,
    new_run_id,
    now_utc,
    print_json,
    tombstoned_users,
)
from photolens.jobs.commands import PROFILE_SOURCES
from photolens.jobs.tag import ConfigError
from photolens.lake.delta import Lake
from photolens.schemas.tables import TEMPLATES, conform

__all__ = ["TEMPLATES_APP", "TemplatesConfig", "build_templates", "cmd_templates"]

TEMPLATES_APP: Final = "photolens.templates/"


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
        check_run_id(self.run_id)
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
    run_id = cfg.run_id or new_run_id("templates")
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
    gone = tombstoned_users(lake)
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
    emb = embedding_matrix(faces.column("embedding")) if faces.num_rows else np.zeros((0, 0), np.float32)

    tcfg = TemplateConfig(linkage=cfg.linkage, threshold=cfg.threshold)
    built_at = now_utc()
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
    write_deltalake(table, data, mode="overwrite", commit_properties=commit_props(app_id, {"photolens.run_id": run_id}))
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




def cmd_templates(args: argparse.Namespace) -> int:
    print_json(build_templates(TemplatesConfig(
        lake=args.lake, restricted_lake=args.restricted_lake, min_weight=args.min_weight, max_photos=args.max_photos,
        profile_from=args.profile_from, profile_pattern=args.profile_pattern, linkage=args.linkage,
        threshold=args.threshold, run_id=args.run_id)))
    return 0

