"""Agglomerative clustering of face embeddings with a same-photo cannot-link constraint.

Seed 000 (000_0fb00c7dd830498f.txt) compares single, average (UPGMA), complete, weighted (WPGMA) and
median linkage, with Euclidean and rank-order distances, to find the people who appear often in a
gallery. Seed 001 (001_3c33a7603d0fbc67.txt) clusters a profile's faces to find its owner. Both
gain from one fact scipy's ``linkage`` cannot use: two faces of the same photo are two different
people. So the merge loop is our own: the "primitive" agglomerative algorithm (always merge the
globally closest pair of clusters) with Lance–Williams distance updates, which refuses any merge of
two clusters that share a photo. Without constraints it reproduces scipy's merge heights for every
linkage (tested); with them no cluster ever holds two faces of one photo.

Cost: an ``n × n`` float64 distance matrix plus a boolean conflict matrix (≈ 9 bytes × n²: 81 MB
at n = 3,000) and O(n) numpy work per merge on average (a row's nearest neighbour is rescanned only
when its neighbour was merged), which is fine for the few thousand faces of one user.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal, get_args

import numpy as np

__all__ = [
    "DEFAULT_EUCLIDEAN_THRESHOLD",
    "DEFAULT_RANK_ORDER_FRACTION",
    "DEFAULT_RANK_ORDER_K",
    "EUCLIDEAN_ONLY",
    "Agglomeration",
    "LinkageMethod",
    "cluster_faces",
    "constrained_linkage",
    "euclidean_distances",
    "rank_order_distances",
]

LinkageMethod = Literal["single", "average", "complete", "weighted", "median", "centroid", "ward"]
LINKAGES: Final[tuple[str, ...]] = get_args(LinkageMethod)

# These update rules are only valid when the distances are Euclidean distances between observation
# vectors (they move cluster representatives: medians, centroids), so not over rank-order distances.
EUCLIDEAN_ONLY: Final[frozenset[str]] = frozenset({"median", "centroid", "ward"})

# Cut height on L2-normalised embeddings, for the default embedding model (dlib ResNet, 128-d). On
# the labelled deepface photos (../shared/data/faces/deepface) its unit vectors put the same person
# at 0.25 median / 0.38 max and different people at 0.37 min / 0.58 median, and average linkage cut
# at 0.4 recovers the 13 identities exactly (tests/test_faceindex_cluster.py). Embeddings with
# another geometry need their own cut: faceindex/synthetic.py's (intra-identity cosine ≈ 0.75,
# like margin-trained models) sit at ≈ 0.7 vs ≈ 1.4 and cut at 1.0. On rank-order distances two
# faces with disjoint top-k lists sit exactly at 2k, so that cut is a fraction of 2k, whatever the
# model.
DEFAULT_EUCLIDEAN_THRESHOLD: Final[float] = 0.4
DEFAULT_RANK_ORDER_FRACTION: Final[float] = 0.8
DEFAULT_RANK_ORDER_K: Final[int] = 20


@dataclass(frozen=True, eq=False)
class Agglomeration:
    """Result of :func:`constrained_linkage`.

    ``merges`` uses scipy's linkage-matrix layout, one row per merge done: ``[node_a, node_b,
    distance, size]`` where nodes ``< n`` are observations and node ``n + i`` is the cluster made
    by merge ``i``. It is a full dendrogram only when nothing stopped the merging (no threshold, no
    constraint).
    """

    labels: np.ndarray  # (n,) int64, clusters numbered by first appearance
    merges: np.ndarray  # (m, 4) float64


def euclidean_distances(emb: np.ndarray) -> np.ndarray:
    """Full ``(n, n)`` float64 Euclidean distance matrix of the rows of ``emb``."""
    x = np.asarray(emb, dtype=np.float64)
    sq = np.einsum("ij,ij->i", x, x)
    d2 = sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)
    np.maximum(d2, 0.0, out=d2)  # rounding makes tiny negatives on near-duplicates
    np.fill_diagonal(d2, 0.0)
    dist: np.ndarray = np.sqrt(d2)
    return dist


def rank_order_distances(emb: np.ndarray, k: int = DEFAULT_RANK_ORDER_K, *, block: int = 128) -> np.ndarray:
    """Rank-order distance of Zhu, Wen, Sun and Tang (CVPR 2011), on top-``k`` neighbour lists.

    ``O_a`` is face ``a``'s neighbour list ordered by Euclidean distance (``a`` itself at rank 0)
    and ``O_a(x)`` the rank of ``x`` in it. The asymmetric distance sums, over the faces ranked
    ahead of ``b`` in ``O_a``, their ranks in ``O_b``: ``d(a, b) = Σ_{i=0..O_a(b)} O_b(f_a(i))``; the
    symmetric one is ``D(a, b) = (d(a, b) + d(b, a)) / min(O_a(b), O_b(a))``. Two faces are close when
    they share their neighbourhoods, whatever the local density, which is why the paper prefers it
    for face tagging. As in the paper only the top ``k`` neighbours are kept: ranks beyond ``k`` are
    counted as ``k`` and the sums stop at the list's end; two faces whose top-k lists are disjoint
    then sit at exactly ``2k``. With ``k >= n`` it is the exact distance.
    """
    x = np.asarray(emb, dtype=np.float64)
    n = len(x)
    if n == 0:
        return np.zeros((0, 0))
    if k < 1:
        raise ValueError(f"rank-order k must be >= 1, got {k}")
    k = min(k, n)
    dist = euclidean_distances(x)
    np.fill_diagonal(dist, -1.0)  # the face itself is always rank 0, even with exact duplicates
    order = np.argsort(dist, axis=1, kind="stable")[:, :k]  # (n, k) neighbour lists
    rank = np.full((n, n), k, dtype=np.int64)
    np.put_along_axis(rank, order, np.arange(k, dtype=np.int64)[None, :].repeat(n, axis=0), axis=1)
    # Sum over i = 0 .. min(O_a(b), k - 1): beyond k the list ends (the top-k approximation).
    stop = np.minimum(rank, k - 1)
    asym = np.empty((n, n), dtype=np.float64)
    for start in range(0, n, block):
        rows = np.arange(start, min(start + block, n))
        # ranks_in_b[r, b, i] = O_b(f_a(i)) for a = rows[r]
        ranks_in_b = rank[:, order[rows]].transpose(1, 0, 2)  # (B, n, k)
        csum = np.cumsum(ranks_in_b, axis=2)
        asym[rows] = np.take_along_axis(csum, stop[rows][:, :, None], axis=2)[:, :, 0]
    denom = np.minimum(rank, rank.T).astype(np.float64)
    np.fill_diagonal(denom, 1.0)
    sym = (asym + asym.T) / denom
    np.fill_diagonal(sym, 0.0)
    return sym


def _lance_williams(
    method: str, d_ka: np.ndarray, d_kb: np.ndarray, d_ab: float, n_a: int, n_b: int, n_k: np.ndarray
) -> np.ndarray:
    """Distance from every cluster k to the union of a and b (the forms scipy uses)."""
    if method == "single":
        return np.asarray(np.minimum(d_ka, d_kb))
    if method == "complete":
        return np.asarray(np.maximum(d_ka, d_kb))
    if method == "average":
        return np.asarray((n_a * d_ka + n_b * d_kb) / (n_a + n_b))
    if method == "weighted":
        return np.asarray(0.5 * (d_ka + d_kb))
    # The centroid-type rules hold for squared Euclidean distances; clip the rounding negatives.
    if method == "median":
        sq = 0.5 * d_ka**2 + 0.5 * d_kb**2 - 0.25 * d_ab**2
    elif method == "centroid":
        n_ab = n_a + n_b
        sq = (n_a * d_ka**2 + n_b * d_kb**2) / n_ab - n_a * n_b * d_ab**2 / n_ab**2
    elif method == "ward":
        t = n_a + n_b + n_k
        sq = ((n_a + n_k) * d_ka**2 + (n_b + n_k) * d_kb**2 - n_k * d_ab**2) / t
    else:
        raise ValueError(f"unknown linkage {method!r}; expected one of {LINKAGES}")
    return np.sqrt(np.maximum(sq, 0.0))


def _group_codes(groups: Sequence[object] | np.ndarray) -> np.ndarray:
    arr = np.asarray(groups)
    if arr.dtype == object:
        arr = arr.astype(str)
    return np.unique(arr, return_inverse=True)[1].reshape(-1)


def constrained_linkage(
    dist: np.ndarray,
    groups: Sequence[object] | np.ndarray | None = None,
    method: LinkageMethod = "average",
    threshold: float = np.inf,
) -> Agglomeration:
    """Agglomerate from a square distance matrix; observations sharing a group never end up together.

    Merges the globally closest allowed pair while its distance is ``<= threshold``. With inversions
    (median, centroid) a later merge can be closer than an earlier one; merging stops at the first
    pair above the threshold either way, so the cut is well defined for every linkage.
    """
    if method not in LINKAGES:
        raise ValueError(f"unknown linkage {method!r}; expected one of {LINKAGES}")
    D = np.array(dist, dtype=np.float64, copy=True)
    if D.ndim != 2 or D.shape[0] != D.shape[1]:
        raise ValueError(f"expected a square distance matrix, got shape {D.shape}")
    if not np.all(np.isfinite(D)):
        raise ValueError("distance matrix has non-finite values")
    n = D.shape[0]
    if groups is None:
        blocked = np.zeros((n, n), dtype=bool)
    else:
        codes = _group_codes(groups)
        if len(codes) != n:
            raise ValueError(f"{len(codes)} group ids for {n} observations")
        blocked = codes[:, None] == codes[None, :]
    # blocked[i, j]: i and j may not merge now (same photo in both, same cluster, or j is gone).
    np.fill_diagonal(blocked, True)

    size = np.ones(n, dtype=np.int64)
    node = np.arange(n, dtype=np.int64)
    parent = np.arange(n, dtype=np.int64)
    active = np.ones(n, dtype=bool)
    merges: list[tuple[float, float, float, float]] = []

    def nearest(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        masked = np.where(blocked[rows], np.inf, D[rows])
        j = np.argmin(masked, axis=1) if len(rows) else np.zeros(0, dtype=np.int64)
        return masked[np.arange(len(rows)), j], j

    nn_d, nn_j = nearest(np.arange(n)) if n else (np.zeros(0), np.zeros(0, dtype=np.int64))
    for step in range(max(n - 1, 0)):
        i = int(np.argmin(nn_d))
        d_min = float(nn_d[i])
        if not np.isfinite(d_min) or d_min > threshold:
            break
        a, b = sorted((i, int(nn_j[i])))
        new = _lance_williams(method, D[a], D[b], float(D[a, b]), int(size[a]), int(size[b]), size)
        D[a, :] = new
        D[:, a] = new
        D[a, a] = 0.0
        merges.append((float(node[a]), float(node[b]), d_min, float(size[a] + size[b])))
        # The union conflicts with everything either part conflicted with: constraints only grow.
        blocked[a] |= blocked[b]
        blocked[:, a] = blocked[a]
        blocked[b, :] = True
        blocked[:, b] = True
        active[b] = False
        nn_d[b] = np.inf
        parent[b] = a
        size[a] += size[b]
        node[a] = n + step
        # Only rows whose nearest neighbour was a or b can have lost it; all others just compare
        # with the union's new distance.
        stale = ((nn_j == a) | (nn_j == b)) & active
        stale[a] = True
        rows = np.flatnonzero(stale)
        nn_d[rows], nn_j[rows] = nearest(rows)
        rest = np.flatnonzero(active & ~stale)
        cand = np.where(blocked[rest, a], np.inf, D[rest, a])
        better = cand < nn_d[rest]
        nn_d[rest[better]] = cand[better]
        nn_j[rest[better]] = a

    root = parent.copy()
    while True:  # path halving until every observation points at its cluster's surviving slot
        nxt = root[root]
        if np.array_equal(nxt, root):
            break
        root = nxt
    _, first, inverse = np.unique(root, return_index=True, return_inverse=True)
    rank_by_first = np.argsort(np.argsort(first, kind="stable"), kind="stable")
    labels = rank_by_first[inverse.reshape(-1)].astype(np.int64)
    return Agglomeration(labels=labels, merges=np.asarray(merges, dtype=np.float64).reshape(-1, 4))


def cluster_faces(
    emb: np.ndarray,
    photo_ids: Sequence[object] | np.ndarray | None,
    linkage: LinkageMethod = "average",
    threshold: float | None = None,
    rank_order: bool = False,
    rank_order_k: int = DEFAULT_RANK_ORDER_K,
) -> np.ndarray:
    """Cluster faces into people; labels are ``0 .. K-1`` numbered by first appearance.

    ``emb`` rows are L2-normalised here. ``photo_ids`` (one per face, or ``None`` for no
    constraint) forbids any cluster holding two faces of one photo. ``threshold`` is the cut height
    (default :data:`DEFAULT_EUCLIDEAN_THRESHOLD`, or ``DEFAULT_RANK_ORDER_FRACTION × 2k`` for
    rank-order). ``rank_order`` clusters on the rank-order distance over ``rank_order_k``
    neighbours instead of the Euclidean one; median/centroid/ward need Euclidean observations and
    refuse it.
    """
    x = np.asarray(emb, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"expected (n, d) embeddings, got shape {x.shape}")
    if rank_order and linkage in EUCLIDEAN_ONLY:
        raise ValueError(f"{linkage} linkage needs Euclidean observations, not rank-order distances")
    n = len(x)
    if photo_ids is not None and len(photo_ids) != n:
        raise ValueError(f"{len(photo_ids)} photo ids for {n} faces")
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    if rank_order:
        dist = rank_order_distances(x, rank_order_k)
        if threshold is None:
            threshold = DEFAULT_RANK_ORDER_FRACTION * 2 * min(rank_order_k, n)
    else:
        dist = euclidean_distances(x)
        if threshold is None:
            threshold = DEFAULT_EUCLIDEAN_THRESHOLD
    return constrained_linkage(dist, photo_ids, linkage, threshold).labels
