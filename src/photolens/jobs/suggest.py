"""``photolens suggest``: friend suggestions + verification for the new faces of a tagging run.

New faces are grouped by uploader; each uploader group runs as one Ray task holding a
``FriendIndexCache`` (the friends' templates compressed with the published codec, built once and reused
by every photo of the burst); top-5 by L2 on the codes, then verification on the uncompressed templates
against a threshold calibrated on the templates (target FAR 1e-2) → ``suggestions`` with the
app-transaction ``photolens.suggest/<run_id>`` (a re-run commits nothing). Friends come from the
``friends`` table (``photolens friends import``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import time
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Final

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from photolens.faceindex.suggest import MAX_CANDIDATES, Calibration, FriendIndexCache, calibrate_threshold, verify
from photolens.faceindex.vectors import l2_normalise
from photolens.jobs._faceshared import (
    check_run_id,
    embedding_matrix,
    now_utc,
    print_json,
    read_templates,
    tombstoned_users,
)
from photolens.jobs.index import CODEC_FILE
from photolens.jobs.tag import ConfigError
from photolens.lake.delta import Lake
from photolens.schemas.tables import SUGGESTIONS

__all__ = [
    "SUGGEST_APP", "SuggestConfig", "UploaderFaces", "calibrate_from_templates", "cmd_suggest", "run_suggest",
    "suggest_for_uploaders",
]

SUGGEST_APP: Final = "photolens.suggest/"


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
        check_run_id(self.run_id)
        check_run_id(self.photos_run)
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
    gone = tombstoned_users(lake)
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
    templates, t_models = read_templates(lake, needed)
    templates = {u: m for u, m in templates.items() if t_models[u] == model}
    if cfg.threshold is not None:
        threshold, calibration = float(cfg.threshold), None
    else:
        all_templates, all_models = read_templates(lake)
        calibration = calibrate_from_templates({u: m for u, m in all_templates.items() if all_models[u] == model
                                                and u not in gone}, cfg.target_far, cfg.calibration_max_users,
                                               cfg.seed)
        threshold = calibration.threshold

    rows: list[dict[str, Any]] = []
    cache_stats: Counter[str] = Counter()
    n_tasks = 0
    if faces.num_rows:
        emb = l2_normalise(embedding_matrix(faces.column("embedding")))
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

    created_at = now_utc()
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




def cmd_suggest(args: argparse.Namespace) -> int:
    print_json(run_suggest(SuggestConfig(
        lake=args.lake, index_store=args.index_store, restricted_lake=args.restricted_lake,
        photos_run=args.photos_run, faces_since=args.faces_since, threshold=args.threshold,
        target_far=args.target_far, run_id=args.run_id, max_tasks=args.max_tasks)))
    return 0

