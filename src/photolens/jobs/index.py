"""``photolens index build|publish|rollback|info``: the OPQ/PQ face index over the templates.

Every vector of every ``ok`` template, id = ``user_key(user_id)``; the codec is trained (a Ray task) on a
sample of face embeddings, the vectors are encoded as Ray tasks over the shards that ``plan_shards`` fits
in the memory budget, merged, measured against exact search on held-out faces, and stored as a new
immutable version (``--publish`` makes it current).
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Final

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from photolens.faceindex.vectors import l2_normalise
from photolens.jobs._faceshared import (
    check_run_id,
    embedding_matrix,
    new_run_id,
    print_json,
    template_matrices,
    tombstoned_users,
)
from photolens.jobs.tag import ConfigError
from photolens.lake.delta import Lake

__all__ = [
    "CODEC_FILE", "IndexBuildConfig", "build_face_index", "cmd_index", "index_info", "publish_index",
    "rollback_index",
]

CODEC_FILE: Final = "codec.faiss"  # the empty trained codec beside each index version, for friend caches


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
        check_run_id(self.run_id)
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
    return l2_normalise(embedding_matrix(faces.column("embedding"))) if faces.num_rows else np.zeros((0, 0))


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
    run_id = cfg.run_id or new_run_id("index")
    rows = lake.read("templates", ["user_id", "vectors", "member_face_ids", "embedding_model"],
                     pc.field("status") == "ok")
    if rows.num_rows == 0:
        raise ConfigError(f"no ok templates in {lake.table_uri('templates')}: run `photolens templates build` first")
    # One model per index: the one most templates use (the others wait for their users' re-tagging).
    counts = Counter(rows.column("embedding_model").to_pylist())
    model = str(counts.most_common(1)[0][0])
    skipped = rows.num_rows - counts[model]
    rows = rows.filter(pc.equal(rows.column("embedding_model"), model))
    gone = tombstoned_users(lake)
    if gone:
        rows = rows.filter(pc.invert(pc.is_in(rows.column("user_id"), pa.array(sorted(gone), pa.string()))))
    mats = template_matrices(rows.column("vectors"))
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
    # Below the codec's training size train() gives an exact flat index (sidecar kind "flat").
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




def cmd_index(args: argparse.Namespace) -> int:
    if args.index_cmd == "build":
        print_json(build_face_index(IndexBuildConfig(
            lake=args.lake, index_store=args.index_store, restricted_lake=args.restricted_lake, factory=args.factory,
            train_size=args.train_size, memory_budget_mb=args.memory_budget_mb, publish=args.publish,
            seed=args.seed, n_eval_queries=args.eval_queries, run_id=args.run_id)))
    elif args.index_cmd == "publish":
        print_json(publish_index(args.index_store, args.version))
    elif args.index_cmd == "rollback":
        print_json(rollback_index(args.index_store))
    else:
        print_json(index_info(args.index_store))
    return 0

