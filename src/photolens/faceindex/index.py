"""OPQ/PQ face index over owner templates (seed 001, 001_3c33a7603d0fbc67.txt).

Seed 001 searches friends' templates with Optimized Product Quantization: a 256-word codebook per
sub-vector, 8× fewer bits than float32, accuracy almost unchanged. Here that is
``OPQ{m},PQ{m}x8np`` with ``m = d·4 / compression`` one-byte codes: 64 bytes for a 128-d dlib
vector (512 bytes as float32), 256 bytes for 512-d. ``np`` turns off the polysemous training the
factory would otherwise run: it only serves Hamming-filtered search, which we do not use, and costs
most of the training time on 2 cores (STACK.md).

A template contributes several vectors, all carrying its user's int64 id (:func:`user_key`), in an
``IndexIDMap`` (not ``IDMap2``, whose reverse map needs unique ids) so ``remove_ids`` forgets a
user in one call. Building is split into pure steps so a job can run the encoding as parallel
tasks: ``train(...) -> bytes``, ``encode_shard(trained, vectors, ids) -> bytes`` per shard of
:func:`plan_shards`, ``merge(shards) -> Index``. Shards encoded with the same trained bytes merge
into exactly the codes a single-shot build gives.

Distances returned by :func:`search` are Euclidean (not squared) L2.

Below the codec's training size (one training vector per codeword: 256 for 8-bit codes) a codec cannot be
trained, and a deployment that small does not need one: :func:`train` then returns an exact
``IDMap,Flat`` index instead (float32 vectors, exact search), with the same artifacts, sidecar and
publish/rollback; the sidecar says ``kind: flat`` and its measured recall is 1.0. The next build with enough
vectors trains OPQ (``kind: opq``).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import faiss
import numpy as np

__all__ = [
    "FLAT_FACTORY",
    "SIDECAR_FORMAT",
    "BuiltIndex",
    "IndexConfig",
    "build_index",
    "codec_bytes",
    "codec_fingerprint",
    "default_factory",
    "deserialize",
    "encode_shard",
    "encode_shard_bytes_estimate",
    "evaluate_recall",
    "faiss_threads",
    "index_kind",
    "make_sidecar",
    "merge",
    "min_train_vectors",
    "plan_shards",
    "remove_ids",
    "search",
    "serialize",
    "train",
    "user_key",
]

SIDECAR_FORMAT: Final[str] = "photolens.faceindex/1"
FLAT_FACTORY: Final[str] = "IDMap,Flat"  # exact search, for pools below the codec's training size
_KSUB: Final[int] = 256  # 8-bit codes: seed 001's 256-word codebook per sub-vector
_MAX_ID: Final[int] = 2**63 - 1


@dataclass(frozen=True)
class IndexConfig:
    factory: str | None = None  # None: default_factory(d, compression)
    compression: float = 8.0  # float32 bytes / code bytes, seed 001's "8× fewer bits"
    train_size: int = 50_000  # vectors sampled (seeded) to train OPQ and the codebooks
    seed: int = 0
    # faiss defaults to 50 OPQ iterations; on 2 cores each one is seconds to tens of seconds
    # (STACK.md), and the rotation has mostly converged after ~10 on face embeddings.
    opq_niter: int = 10
    opq_train_size: int = 20_000  # OPQ rotation learnt on a sub-sample of the training set
    pq_niter: int = 25  # k-means iterations per sub-quantizer (faiss default)
    n_eval_queries: int = 1_000
    model_version: str = "unknown"  # the embedding model's version, recorded in the sidecar
    # OpenMP threads while training (None: faiss's default, all cores). Training runs many small
    # k-means whose parallel regions spin at barriers: on a shared 2-core machine one thread was
    # 4-5x faster than two.
    threads: int | None = None
    # Training pools smaller than this get an exact flat index; None: the codec's own minimum (256 for
    # 8-bit codes). Raise it to keep exact search longer (a flat index costs 4·d bytes per vector).
    flat_below: int | None = None

    def __post_init__(self) -> None:
        if self.train_size < _KSUB:
            raise ValueError(f"train_size must be >= {_KSUB} (one point per codeword at least)")
        if self.compression <= 0:
            raise ValueError("compression must be positive")


@dataclass(frozen=True, eq=False)
class BuiltIndex:
    index: faiss.Index
    index_bytes: bytes
    trained_bytes: bytes  # the empty trained codec: encode_shard input, and friend caches' codec
    sidecar: dict[str, Any] = field(default_factory=dict)


@contextlib.contextmanager
def faiss_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` OpenMP threads in faiss (process-wide), then restore the count."""
    if n is None:
        yield
        return
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(max(1, n))
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def user_key(user_id: str | int) -> int:
    """The int64 id a user's template vectors carry in the index.

    Non-negative ints are used as they are; strings are hashed (BLAKE2b, 63 bits: the chance of
    any collision among 100 M users is about 5·10⁻⁴; -1 is faiss's "no result" and never produced).
    """
    if isinstance(user_id, (int, np.integer)):
        if not 0 <= int(user_id) <= _MAX_ID:
            raise ValueError(f"integer user id out of range [0, 2^63): {user_id}")
        return int(user_id)
    digest = hashlib.blake2b(str(user_id).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _MAX_ID


def default_factory(d: int, compression: float = 8.0) -> str:
    """``OPQ{m},PQ{m}x8np`` with code bytes ``m = d·4 / compression`` (64 for d=128 at 8×)."""
    code_bytes = d * 4 / compression
    m = round(code_bytes)
    if abs(code_bytes - m) > 1e-9 or m < 1 or d % m:
        raise ValueError(
            f"{compression}x compression of {d}-d float32 needs {code_bytes} one-byte codes, which must be "
            "a whole number dividing d; pass an explicit factory"
        )
    return f"OPQ{m},PQ{m}x8np"


def serialize(index: faiss.Index) -> bytes:
    data: bytes = faiss.serialize_index(index).tobytes()
    return data


def deserialize(data: bytes | bytearray | memoryview) -> faiss.Index:
    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))


def _as_vectors(x: np.ndarray, d: int | None = None) -> np.ndarray:
    arr = np.ascontiguousarray(x, dtype=np.float32)
    if arr.ndim != 2 or (d is not None and arr.shape[1] != d):
        raise ValueError(f"expected (n, {d or 'd'}) vectors, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError("vectors contain NaN or inf")
    return arr


def _as_ids(ids: Iterable[int] | np.ndarray, n: int) -> np.ndarray:
    arr = np.ascontiguousarray(np.asarray(ids, dtype=np.int64).reshape(-1))
    if len(arr) != n:
        raise ValueError(f"{len(arr)} ids for {n} vectors")
    if len(arr) and arr.min() < 0:
        raise ValueError("ids must be non-negative (-1 means 'no result' in faiss)")
    return arr


def _unwrap(index: faiss.Index) -> faiss.Index:
    """The positional index under an IDMap (its labels are insertion positions)."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexIDMap | faiss.IndexIDMap2):
        return faiss.downcast_index(index.index)
    return index


def _configure(index: faiss.Index, cfg: IndexConfig) -> None:
    """Training knobs the factory string cannot carry (iterations, seeds, polysemous off)."""
    inner = _unwrap(index)
    if isinstance(inner, faiss.IndexPreTransform):
        for i in range(inner.chain.size()):
            vt = faiss.downcast_VectorTransform(inner.chain.at(i))
            if isinstance(vt, faiss.OPQMatrix):
                vt.niter = cfg.opq_niter
                vt.niter_pq_0 = cfg.pq_niter  # faiss defaults to 40 for the first codebooks: most of a short run
                vt.max_train_points = cfg.opq_train_size
        inner = faiss.downcast_index(inner.index)
    if isinstance(inner, faiss.IndexPQ):
        inner.do_polysemous_training = False
    pq = getattr(inner, "pq", None)
    if pq is not None:
        pq.cp.niter = cfg.pq_niter
        pq.cp.seed = cfg.seed


def _empty_index(d: int, cfg: IndexConfig) -> tuple[faiss.Index, str]:
    factory = cfg.factory or default_factory(d, cfg.compression)
    if factory.startswith("IDMap2"):
        raise ValueError("IDMap2 needs unique ids; a template's vectors share their user's id")
    index = faiss.index_factory(d, factory)
    if not factory.startswith("IDMap"):
        index = faiss.IndexIDMap(index)
    _configure(index, cfg)
    return index, factory


def min_train_vectors(d: int, config: IndexConfig | None = None) -> int:
    """Training vectors the configured codec needs: one per codeword of each quantizer (and OPQ's own)."""
    cfg = config or IndexConfig()
    index, _ = _empty_index(d, cfg)
    if index.is_trained:
        return 0
    need = 1
    inner = _unwrap(index)
    if isinstance(inner, faiss.IndexPreTransform):
        for i in range(inner.chain.size()):
            if isinstance(faiss.downcast_VectorTransform(inner.chain.at(i)), faiss.OPQMatrix):
                need = max(need, _KSUB)  # OPQ trains its own 8-bit PQ while it learns the rotation
        inner = faiss.downcast_index(inner.index)
    pq = getattr(inner, "pq", None)
    if pq is not None:
        need = max(need, int(pq.ksub))
    nlist = getattr(inner, "nlist", None)
    if nlist:
        need = max(need, int(nlist))
    return max(need, cfg.flat_below or 0)


def index_kind(index: faiss.Index) -> str:
    """``flat`` (exact float32), ``opq`` (OPQ rotation + PQ codes), ``pq`` or the faiss class name."""
    inner = _unwrap(index)
    if isinstance(inner, faiss.IndexFlat):
        return "flat"
    if isinstance(inner, faiss.IndexPreTransform):
        for i in range(inner.chain.size()):
            vt = faiss.downcast_VectorTransform(inner.chain.at(i))
            # A read-back OPQMatrix is a plain LinearTransform: a square rotation before the codes.
            if isinstance(vt, faiss.OPQMatrix) or (isinstance(vt, faiss.LinearTransform) and vt.d_in == vt.d_out):
                return "opq"
        inner = faiss.downcast_index(inner.index)
    return "pq" if isinstance(inner, faiss.IndexPQ) else type(inner).__name__.lower()


def train(vectors: np.ndarray, config: IndexConfig | None = None) -> bytes:
    """Train the codec on a seeded sample of ``vectors``; returns the empty trained index's bytes.

    With fewer vectors than the codec needs (:func:`min_train_vectors`), the result is an empty exact
    ``IDMap,Flat`` index: nothing to train, exact search, recall 1.0.
    """
    cfg = config or IndexConfig()
    x = _as_vectors(vectors)
    n, d = x.shape
    if n == 0:
        raise ValueError("no vectors to build an index from")
    if n < min_train_vectors(d, cfg):
        return serialize(faiss.IndexIDMap(faiss.IndexFlatL2(d)))
    if n > cfg.train_size:
        rows = np.sort(np.random.default_rng(cfg.seed).choice(n, cfg.train_size, replace=False))
        x = x[rows]
    index, _ = _empty_index(d, cfg)
    with faiss_threads(cfg.threads):
        index.train(x)
    return serialize(index)


def encode_shard(trained_bytes: bytes, vectors: np.ndarray, ids: Iterable[int] | np.ndarray) -> bytes:
    """Encode one shard with the trained codec; returns the shard index's bytes (codes + ids)."""
    index = deserialize(trained_bytes)
    if not index.is_trained or index.ntotal:
        raise ValueError("encode_shard needs the empty trained index that train() returns")
    x = _as_vectors(vectors, index.d)
    index.add_with_ids(x, _as_ids(ids, len(x)))
    return serialize(index)


def codec_fingerprint(index: faiss.Index) -> str:
    """SHA-256 of the trained parameters (rotation, codebooks), whatever the index holds.

    Two shards merge only if this matches: faiss checks code sizes, not that the codebooks agree.
    """
    h = hashlib.sha256()
    inner = _unwrap(index)
    h.update(type(inner).__name__.encode())
    if isinstance(inner, faiss.IndexPreTransform):
        for i in range(inner.chain.size()):
            vt = faiss.downcast_VectorTransform(inner.chain.at(i))
            h.update(type(vt).__name__.encode())
            if isinstance(vt, faiss.LinearTransform):
                h.update(faiss.vector_to_array(vt.A).tobytes())
                h.update(faiss.vector_to_array(vt.b).tobytes())
        inner = faiss.downcast_index(inner.index)
    if isinstance(inner, faiss.IndexPQ):
        h.update(faiss.vector_to_array(inner.pq.centroids).tobytes())
    else:  # any other index type: hash the serialized empty clone
        empty = faiss.clone_index(inner)
        empty.reset()
        h.update(serialize(empty))
    return h.hexdigest()


def merge(shard_bytes_list: Sequence[bytes]) -> faiss.Index:
    """Concatenate shard indexes (codes and ids, in list order) into one index."""
    if not shard_bytes_list:
        raise ValueError("no shards to merge")
    merged = deserialize(shard_bytes_list[0])
    fingerprint = codec_fingerprint(merged)
    for i, data in enumerate(shard_bytes_list[1:], start=1):
        shard = deserialize(data)
        if codec_fingerprint(shard) != fingerprint:
            raise ValueError(f"shard {i} was encoded with a different trained codec")
        merged.merge_from(shard, 0)  # 0: keep the shard's own ids
    return merged


def codec_bytes(index: faiss.Index) -> bytes:
    """The empty trained codec of a built index (same form as :func:`train`'s output)."""
    empty = faiss.clone_index(index)
    empty.reset()
    return serialize(empty)


def _code_bytes(index: faiss.Index) -> int:
    return int(_unwrap(index).sa_code_size())


def encode_shard_bytes_estimate(rows: int, d: int, code_bytes: int) -> int:
    """Peak bytes one :func:`encode_shard` call needs beyond the trained codec.

    The float32 input and the OPQ-rotated copy (2·4·d per row), then codes and ids counted four
    times: the index's code and id vectors (which over-allocate as they grow), the serialized array
    and the returned ``bytes``. Measured by bench/bench_index.py: a 12,500-row 128-d shard rose
    15.0 MiB against 14.8 MiB for three copies, so three was not quite enough.
    """
    return rows * (8 * d + 4 * (code_bytes + 8))


def plan_shards(
    n: int, d: int, memory_budget_bytes: int, code_bytes: int | None = None, compression: float = 8.0
) -> list[tuple[int, int]]:
    """Split ``n`` rows into as few ``[start, stop)`` shards as fit one encode in the budget.

    The trained codec (OPQ rotation d², codebooks 256·d floats, twice: bytes and object) is charged
    to every shard. A budget too small for even one row is an error, not a silent huge shard.
    """
    if n < 0 or d < 1:
        raise ValueError(f"bad sizes n={n}, d={d}")
    cb = code_bytes if code_bytes is not None else max(1, round(d * 4 / compression))
    fixed = 2 * 4 * (d * d + _KSUB * d)
    per_row = encode_shard_bytes_estimate(1, d, cb)
    rows = (memory_budget_bytes - fixed) // per_row
    if rows < 1:
        raise ValueError(
            f"memory budget {memory_budget_bytes} B cannot encode one {d}-d row (needs {fixed + per_row} B)"
        )
    if n == 0:
        return []
    n_shards = math.ceil(n / rows)
    bounds = np.linspace(0, n, n_shards + 1).round().astype(np.int64)
    return [(int(a), int(b)) for a, b in itertools.pairwise(bounds)]


def remove_ids(index: faiss.Index, ids: Iterable[int] | np.ndarray) -> int:
    """Remove every vector carrying one of ``ids`` (all of a forgotten user's template); returns count."""
    arr = np.ascontiguousarray(np.fromiter(ids, dtype=np.int64))
    if len(arr) == 0:
        return 0
    return int(index.remove_ids(faiss.IDSelectorBatch(arr)))


def search(index: faiss.Index, queries: np.ndarray, k: int = 5, overfetch: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` distinct ids per query, each at its best (smallest) L2 distance over its vectors.

    A template has several vectors with one id, so the raw top-k can repeat an id: fetch
    ``k·overfetch`` and widen the search for the rows that still have fewer than ``k`` distinct
    ids, until the index is exhausted. Missing slots are id -1 at distance inf.
    """
    q = _as_vectors(queries, index.d)
    nq = len(q)
    dist = np.full((nq, k), np.inf, dtype=np.float32)
    ids = np.full((nq, k), -1, dtype=np.int64)
    ntotal = int(index.ntotal)
    if nq == 0 or ntotal == 0 or k < 1:
        return dist, ids
    todo = np.arange(nq)
    fetch = min(ntotal, k * max(1, overfetch))
    while len(todo):
        found_d, found_i = index.search(q[todo], fetch)
        unfinished = []
        for r, row in enumerate(todo):
            valid = found_i[r] >= 0
            row_ids, row_d = found_i[r][valid], found_d[r][valid]
            # Results come sorted by distance, so an id's first occurrence is its best vector.
            take = np.sort(np.unique(row_ids, return_index=True)[1])[:k]
            got = len(take)
            ids[row, :got] = row_ids[take]
            dist[row, :got] = row_d[take]
            if got < k:
                unfinished.append(row)
        if fetch >= ntotal:
            break
        todo = np.asarray(unfinished, dtype=np.int64)
        fetch = min(ntotal, fetch * 4)
    return np.sqrt(np.maximum(dist, 0.0)), ids


def evaluate_recall(
    index: faiss.Index,
    base: np.ndarray,
    queries: np.ndarray | None = None,
    ks: Sequence[int] = (1, 5),
    n_queries: int = 1_000,
    seed: int = 0,
) -> dict[str, Any]:
    """Recall@k of the compressed index against exact L2 search over the same vectors.

    recall@k = share of queries whose exact nearest vector is among the index's top-k vectors.
    ``base`` must be the indexed vectors in insertion order. With ``queries=None`` a seeded sample
    of ``base`` is queried leave-one-out (each query's own vector excluded on both sides), so the
    report needs no extra data; pass held-out queries when there are some.
    """
    x = _as_vectors(base, index.d)
    inner = _unwrap(index)
    if inner.ntotal != len(x):
        raise ValueError(f"index holds {inner.ntotal} vectors but base has {len(x)}")
    kmax = max(ks)
    if queries is None:
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(len(x), min(n_queries, len(x)), replace=False))
        q = x[rows]
        mode = "leave_one_out"
        _, exact = faiss.knn(q, x, 2)
        _, approx = inner.search(q, kmax + 1)
        # Drop the query's own position from both result lists.
        exact_nn = np.where(exact[:, 0] == rows, exact[:, 1], exact[:, 0])
        approx = np.stack([row[row != own][:kmax] for row, own in zip(approx, rows, strict=True)])
    else:
        q = _as_vectors(queries, index.d)
        mode = "held_out"
        _, exact = faiss.knn(q, x, 1)
        exact_nn = exact[:, 0]
        _, approx = inner.search(q, kmax)
    report: dict[str, Any] = {"eval_mode": mode, "n_eval_queries": len(q)}
    for k in ks:
        report[f"recall_at_{k}"] = float(np.mean((approx[:, :k] == exact_nn[:, None]).any(axis=1)))
    return report


def make_sidecar(
    index: faiss.Index,
    *,
    factory: str,
    train_size: int,
    model_version: str,
    index_bytes_len: int,
    recall: dict[str, Any],
    n_shards: int = 1,
    seed: int = 0,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The index's sidecar: what it is, how it was trained, how good it is (STYLE.md #11)."""
    d = int(index.d)
    code_bytes = _code_bytes(index)
    kind = index_kind(index)
    requested = factory
    if kind == "flat" and not factory.replace("IDMap,", "").startswith("Flat"):
        factory = FLAT_FACTORY  # too few vectors to train the requested codec (see train)
    id_map = faiss.vector_to_array(faiss.downcast_index(index).id_map) if hasattr(index, "id_map") else None
    sidecar: dict[str, Any] = {
        "format": SIDECAR_FORMAT,
        "kind": kind,
        "factory": factory,
        "d": d,
        "n": int(index.ntotal),
        "n_ids": len(np.unique(id_map)) if id_map is not None else None,
        "train_size": int(train_size),
        "code_bytes": code_bytes,
        "compression_ratio": d * 4 / code_bytes,
        "model_version": model_version,
        "memory_bytes": int(index_bytes_len),
        "n_shards": int(n_shards),
        "seed": int(seed),
        "codec_sha256": codec_fingerprint(index),
        "faiss_version": faiss.__version__,
        "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
        **recall,
    }
    if factory != requested:
        sidecar["factory_requested"] = requested
        sidecar["flat_reason"] = f"{int(train_size)} training vectors, fewer than the requested codec needs"
    if extra:
        sidecar.update(extra)
    return sidecar


def build_index(
    vectors: np.ndarray,
    ids: Iterable[int] | np.ndarray,
    config: IndexConfig | None = None,
    *,
    memory_budget_bytes: int | None = None,
    queries: np.ndarray | None = None,
) -> BuiltIndex:
    """Train, encode (sharded when over ``memory_budget_bytes``), merge and report, in this process.

    A distributed job runs the same steps with :func:`encode_shard` as remote tasks.
    """
    cfg = config or IndexConfig()
    x = _as_vectors(vectors)
    id_arr = _as_ids(ids, len(x))
    n, d = x.shape
    t0 = time.perf_counter()
    trained = train(x, cfg)
    t1 = time.perf_counter()
    empty = deserialize(trained)
    code_bytes = _code_bytes(empty)
    shards = [(0, n)] if memory_budget_bytes is None else plan_shards(n, d, memory_budget_bytes, code_bytes=code_bytes)
    parts = [encode_shard(trained, x[a:b], id_arr[a:b]) for a, b in shards]
    t2 = time.perf_counter()
    index = merge(parts)
    del parts
    index_bytes = serialize(index)
    t3 = time.perf_counter()
    recall = evaluate_recall(index, x, queries, n_queries=cfg.n_eval_queries, seed=cfg.seed)
    t4 = time.perf_counter()
    factory = cfg.factory or default_factory(d, cfg.compression)
    sidecar = make_sidecar(
        index,
        factory=factory,
        train_size=min(n, cfg.train_size),
        model_version=cfg.model_version,
        index_bytes_len=len(index_bytes),
        recall=recall,
        n_shards=len(shards),
        seed=cfg.seed,
        extra={
            "config": asdict(cfg),
            "timings_s": {
                "train": round(t1 - t0, 3),
                "encode": round(t2 - t1, 3),
                "merge": round(t3 - t2, 3),
                "evaluate": round(t4 - t3, 3),
            },
        },
    )
    return BuiltIndex(index=index, index_bytes=index_bytes, trained_bytes=trained, sidecar=sidecar)
