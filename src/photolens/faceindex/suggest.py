"""Friend suggestions and verification at upload time (seed 001, 001_3c33a7603d0fbc67.txt).

When someone uploads after a quiet spell, fetch their friends' templates from the key-value store,
compress them with the published index's trained OPQ/PQ codec, build one small nearest-neighbour
structure and keep it in RAM for a short time: 77% of users upload several photos at once, so the
rest of the burst reuses it. Each face gets up to 5 candidates by L2 over the compressed
templates (a template scores its best vector). Verification is open-set and exact: the face
against each candidate's uncompressed template vectors, best distance, one fixed threshold
calibrated for a target false-accept rate. Search tolerates the lossy codes because verification
re-checks the ≤ 5 survivors on the originals.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import faiss
import numpy as np

from photolens.faceindex.index import deserialize, search
from photolens.faceindex.vectors import l2_normalise

__all__ = [
    "CacheStats",
    "Calibration",
    "Candidate",
    "FriendIndex",
    "FriendIndexCache",
    "TemplateProvider",
    "Verification",
    "best_distances",
    "build_friend_index",
    "calibrate_threshold",
    "verify",
]

# uploader id -> {friend user id: template matrix (k, d)}; friends without a template are left out.
TemplateProvider = Callable[[str], Mapping[str, np.ndarray]]

MAX_CANDIDATES = 5  # seed 001: verification runs on at most the five search candidates


@dataclass(frozen=True)
class Candidate:
    user_id: str
    distance: float  # L2 between the face and the template's nearest compressed vector


@dataclass(frozen=True)
class Verification:
    user_id: str
    distance: float  # L2 between the face and the template's nearest original vector
    accepted: bool


@dataclass(frozen=True)
class Calibration:
    threshold: float  # accept when distance <= threshold
    far: float  # impostor distances accepted, at this threshold
    frr: float  # genuine distances rejected, at this threshold
    target_far: float
    n_genuine: int
    n_impostor: int


@dataclass(frozen=True)
class CacheStats:
    hits: int
    misses: int
    expired: int  # misses that found a stale entry
    evicted: int  # entries dropped to stay under max_entries
    entries: int


def _templates_matrix(templates: Mapping[str, np.ndarray]) -> tuple[list[str], np.ndarray, np.ndarray]:
    friend_ids: list[str] = []
    blocks: list[np.ndarray] = []
    owner: list[np.ndarray] = []
    for uid, tmpl in templates.items():
        t = np.asarray(tmpl, dtype=np.float32)
        if t.ndim == 1:
            t = t[None, :]
        if len(t) == 0:
            continue
        owner.append(np.full(len(t), len(friend_ids), dtype=np.int64))
        friend_ids.append(str(uid))
        blocks.append(t)
    if not blocks:
        return [], np.zeros((0, 0), dtype=np.float32), np.zeros(0, dtype=np.int64)
    return friend_ids, l2_normalise(np.concatenate(blocks)), np.concatenate(owner)


@dataclass(frozen=True, eq=False)
class FriendIndex:
    """One uploader's friends: compressed codes for search, originals for verification."""

    friend_ids: tuple[str, ...]
    index: faiss.Index | None  # IDMap over the codec; ids are positions in friend_ids
    templates: Mapping[str, np.ndarray]  # uncompressed, unit rows
    n_vectors: int
    built_at: float

    def search(self, faces: np.ndarray, k: int = MAX_CANDIDATES) -> list[list[Candidate]]:
        q = l2_normalise(np.atleast_2d(np.asarray(faces, dtype=np.float32)))
        if self.index is None or not self.friend_ids:
            return [[] for _ in range(len(q))]
        dist, ids = search(self.index, q, min(k, len(self.friend_ids)))
        return [
            [Candidate(self.friend_ids[i], float(dv)) for dv, i in zip(drow, irow, strict=True) if i >= 0]
            for drow, irow in zip(dist, ids, strict=True)
        ]


def build_friend_index(
    codec: bytes | faiss.Index, templates: Mapping[str, np.ndarray], *, now: float = 0.0
) -> FriendIndex:
    """Encode the friends' templates with the trained codec (an empty trained index or its bytes)."""
    friend_ids, vectors, owner = _templates_matrix(templates)
    originals = {}
    start = 0
    for pos, uid in enumerate(friend_ids):
        count = int((owner == pos).sum())
        originals[uid] = vectors[start : start + count]
        start += count
    if not friend_ids:
        return FriendIndex((), None, originals, 0, now)
    proto = deserialize(codec) if isinstance(codec, bytes | bytearray | memoryview) else codec
    index = faiss.clone_index(proto)
    index.reset()
    if not index.is_trained:
        raise ValueError("the codec is not trained: pass the published index's trained codec")
    if index.d != vectors.shape[1]:
        raise ValueError(f"templates are {vectors.shape[1]}-d but the codec is {index.d}-d")
    if not isinstance(faiss.downcast_index(index), faiss.IndexIDMap):
        index = faiss.IndexIDMap(index)
    index.add_with_ids(vectors, owner)
    return FriendIndex(tuple(friend_ids), index, originals, len(vectors), now)


class FriendIndexCache:
    """Per-uploader friend indexes kept for ``ttl_s`` seconds (seed 001: "in RAM for a short time").

    ``provider(uploader_id)`` returns the friends' templates; it is called on a miss only, so a
    burst of uploads costs one fetch and one build. Entries older than the TTL are rebuilt; the
    least recently used are dropped beyond ``max_entries``.
    """

    def __init__(
        self,
        codec: bytes | faiss.Index,
        provider: TemplateProvider,
        *,
        ttl_s: float = 300.0,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl_s <= 0 or max_entries < 1:
            raise ValueError("ttl_s must be > 0 and max_entries >= 1")
        proto = deserialize(codec) if isinstance(codec, bytes | bytearray | memoryview) else codec
        if not proto.is_trained:
            raise ValueError("the codec is not trained: pass the published index's trained codec")
        self._codec = faiss.clone_index(proto)
        self._codec.reset()  # a built index may be passed: keep its codebooks, not its codes
        self._provider = provider
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[str, FriendIndex] = OrderedDict()
        self._lock = threading.Lock()
        self._hits = self._misses = self._expired = self._evicted = 0

    @property
    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(self._hits, self._misses, self._expired, self._evicted, len(self._entries))

    def invalidate(self, uploader_id: str) -> None:
        with self._lock:
            self._entries.pop(uploader_id, None)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def get(self, uploader_id: str) -> FriendIndex:
        now = self._clock()
        with self._lock:
            entry = self._entries.get(uploader_id)
            if entry is not None and now - entry.built_at <= self.ttl_s:
                self._hits += 1
                self._entries.move_to_end(uploader_id)
                return entry
            self._misses += 1
            if entry is not None:
                self._expired += 1
                del self._entries[uploader_id]
        # Fetch and build outside the lock: a slow key-value store must not stall other uploaders.
        built = build_friend_index(self._codec, self._provider(uploader_id), now=now)
        with self._lock:
            self._entries[uploader_id] = built
            self._entries.move_to_end(uploader_id)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
                self._evicted += 1
        return built

    def suggest(self, uploader_id: str, face_embeddings: np.ndarray, k: int = MAX_CANDIDATES) -> list[list[Candidate]]:
        """Per face, up to ``k`` friends nearest by L2 on the compressed templates."""
        return self.get(uploader_id).search(face_embeddings, k)

    def suggest_and_verify(
        self, uploader_id: str, face_embeddings: np.ndarray, threshold: float
    ) -> list[list[Verification]]:
        """Search, then verify each face's ≤ 5 candidates on their uncompressed templates."""
        entry = self.get(uploader_id)
        faces = np.atleast_2d(np.asarray(face_embeddings, dtype=np.float32))
        out = []
        for face, cands in zip(faces, entry.search(faces, MAX_CANDIDATES), strict=True):
            out.append(verify(face, {c.user_id: entry.templates[c.user_id] for c in cands}, threshold))
        return out


def best_distances(face_emb: np.ndarray, template: np.ndarray) -> float:
    """Smallest L2 distance between a face and a template's vectors (both L2-normalised)."""
    f = l2_normalise(np.asarray(face_emb, dtype=np.float32).reshape(1, -1))[0].astype(np.float64)
    t = l2_normalise(np.atleast_2d(np.asarray(template, dtype=np.float32))).astype(np.float64)
    if len(t) == 0:
        return float("inf")
    return float(np.sqrt(np.maximum(((t - f) ** 2).sum(axis=1), 0.0)).min())


def verify(
    face_emb: np.ndarray,
    candidate_templates: Mapping[str, np.ndarray],
    threshold: float,
    max_candidates: int = MAX_CANDIDATES,
) -> list[Verification]:
    """Open-set check of ≤ ``max_candidates`` candidates on uncompressed templates, best first."""
    if len(candidate_templates) > max_candidates:
        raise ValueError(f"{len(candidate_templates)} candidates; verification takes at most {max_candidates}")
    results = [
        Verification(str(uid), d, d <= threshold)
        for uid, tmpl in candidate_templates.items()
        for d in [best_distances(face_emb, tmpl)]
    ]
    return sorted(results, key=lambda v: v.distance)


def calibrate_threshold(genuine_d: np.ndarray, impostor_d: np.ndarray, target_far: float) -> Calibration:
    """Largest threshold whose false-accept rate on ``impostor_d`` is at most ``target_far``.

    Accept means ``distance <= threshold``. At most ``floor(target_far · n_impostor)`` impostor
    distances may fall at or under it, so the threshold sits just below the next impostor distance;
    the false-reject rate on ``genuine_d`` is reported at that threshold.
    """
    gen = np.sort(np.asarray(genuine_d, dtype=np.float64).reshape(-1))
    imp = np.sort(np.asarray(impostor_d, dtype=np.float64).reshape(-1))
    if len(gen) == 0 or len(imp) == 0:
        raise ValueError("need genuine and impostor distances to calibrate")
    if not 0.0 <= target_far < 1.0:
        raise ValueError("target_far must be in [0, 1)")
    allowed = int(np.floor(target_far * len(imp) + 1e-9))
    threshold = float(np.nextafter(imp[allowed], -np.inf))
    far = float(np.mean(imp <= threshold))
    frr = float(np.mean(gen > threshold))
    return Calibration(threshold, far, frr, target_far, len(gen), len(imp))
