"""People clustering: linkages vs scipy, rank-order distance, cannot-link, metrics, real faces."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from realdata import dlib_embeddings
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform
from sklearn.metrics import adjusted_rand_score

from photolens.faceindex.cluster import (
    cluster_faces,
    constrained_linkage,
    euclidean_distances,
    rank_order_distances,
)
from photolens.faceindex.metrics import clustering_scores, k_over_c, pairwise_prf
from photolens.faceindex.synthetic import CLUSTER_THRESHOLD, make_identities
from photolens.faceindex.vectors import l2_normalise

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ALL_LINKAGES = ["single", "average", "complete", "weighted", "median", "centroid", "ward"]


@pytest.mark.parametrize("method", ALL_LINKAGES)
def test_unconstrained_merges_match_scipy(method: str) -> None:
    x = np.random.default_rng(1).standard_normal((60, 5))
    dist = euclidean_distances(x)
    if method in ("median", "centroid", "ward"):
        reference = linkage(x, method=method)  # scipy needs the observations for these
    else:
        reference = linkage(squareform(dist, checks=False), method=method)
    ours = constrained_linkage(dist, None, method).merges
    assert ours.shape == reference.shape
    np.testing.assert_allclose(ours[:, 2], reference[:, 2], rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(ours[:, 3], reference[:, 3])
    # Same merges: compare the unordered pairs of merged node ids.
    assert [set(r) for r in ours[:, :2].tolist()] == [set(r) for r in reference[:, :2].tolist()]


@pytest.mark.parametrize("method", ["single", "average", "complete", "weighted", "ward"])
def test_threshold_cut_matches_fcluster(method: str) -> None:
    x = np.random.default_rng(2).standard_normal((80, 4))
    dist = euclidean_distances(x)
    reference = linkage(x, method) if method == "ward" else linkage(squareform(dist, checks=False), method)
    heights = np.sort(reference[:, 2])
    for q in (20, 50, 70):
        cut = (heights[q] + heights[q + 1]) / 2  # between two merges: no ties at the cut
        expected = fcluster(reference, cut, criterion="distance")
        got = constrained_linkage(dist, None, method, cut).labels
        assert adjusted_rand_score(expected, got) == 1.0
        assert len(np.unique(got)) == len(x) - (q + 1)


def _photo_ids(rng: np.random.Generator, n: int, faces_per_photo: int) -> np.ndarray:
    return rng.integers(0, max(1, n // faces_per_photo), size=n).astype(str)


@pytest.mark.parametrize("rank_order", [False, True])
def test_cannot_link_property_on_random_data(rank_order: bool) -> None:
    """No cluster ever holds two faces of one photo, for every linkage and many random cases."""
    rng = np.random.default_rng(7)
    methods = ["single", "average", "complete", "weighted"] + ([] if rank_order else ["median", "centroid", "ward"])
    for trial in range(40):
        n = int(rng.integers(5, 120))
        emb = rng.standard_normal((n, int(rng.integers(2, 16))))
        photos = _photo_ids(rng, n, int(rng.integers(2, 8)))  # many faces share a photo
        method = methods[trial % len(methods)]
        # No threshold: merge as far as the constraint allows.
        threshold = float("inf") if trial % 2 == 0 else float(rng.uniform(0.5, 40.0))
        labels = cluster_faces(emb, photos, method, threshold, rank_order=rank_order, rank_order_k=10)
        assert len(labels) == n
        for c in np.unique(labels):
            members = photos[labels == c]
            assert len(set(members)) == len(members), (trial, method, c)
        if threshold == float("inf"):
            # Maximal: any two remaining clusters must share a photo, or they would have merged.
            groups = [set(photos[labels == c]) for c in np.unique(labels)]
            for i in range(len(groups)):
                for j in range(i + 1, len(groups)):
                    assert groups[i] & groups[j], (trial, method)


def test_cannot_link_separates_lookalikes_seen_together() -> None:
    """Two similar people always photographed together: only the constraint keeps them apart."""
    rng = np.random.default_rng(3)
    base = l2_normalise(rng.standard_normal((1, 128)))
    other = l2_normalise(rng.standard_normal((1, 128)))
    # Centres at cosine ≈ 0.9 ("twins"), faces at noise 0.3 around them.
    centres = l2_normalise(np.concatenate([base, base + 0.48 * other]))
    labels_true = np.repeat([0, 1], 12)
    emb = l2_normalise(centres[labels_true] + rng.standard_normal((24, 128)) * 0.3 / np.sqrt(128))
    photos = np.tile(np.arange(12), 2).astype(str)  # photo i shows twin A and twin B
    free = cluster_faces(emb, None, "average", CLUSTER_THRESHOLD)
    constrained = cluster_faces(emb, photos, "average", CLUSTER_THRESHOLD)
    assert len(np.unique(free)) == 1  # unconstrained, the twins are one person
    assert adjusted_rand_score(labels_true, constrained) == 1.0


def test_rank_order_distance_by_hand() -> None:
    # Points on a line at 0, 1, 3, 7 (k = n: the exact distance). Neighbour lists:
    # O_0 = [0, 1, 2, 3], O_1 = [1, 0, 2, 3], O_2 = [2, 1, 0, 3], O_3 = [3, 2, 1, 0].
    # d(0,1) = O_1(0) + O_1(1) = 1; d(1,0) = O_0(1) + O_0(0) = 1; D = 2 / min(1, 1) = 2.
    # d(0,3) = 3+2+1+0 = 6 = d(3,0); D = 12 / 3 = 4.
    # d(1,2) = O_2(1) + O_2(0) + O_2(2) = 1+2+0 = 3; d(2,1) = O_1(2) + O_1(1) = 2; D = 5 / 1 = 5.
    dist = rank_order_distances(np.array([[0.0], [1.0], [3.0], [7.0]]), k=4)
    assert dist[0, 1] == pytest.approx(2.0)
    assert dist[0, 3] == pytest.approx(4.0)
    assert dist[1, 2] == pytest.approx(5.0)
    np.testing.assert_allclose(dist, dist.T)
    np.testing.assert_array_equal(np.diag(dist), 0.0)


def _rank_order_reference(emb: np.ndarray, k: int) -> np.ndarray:
    """Zhu et al.'s formula written out literally, loops and all."""
    n = len(emb)
    d = np.linalg.norm(emb[:, None] - emb[None], axis=-1)
    np.fill_diagonal(d, -1)
    lists = [list(np.argsort(d[a], kind="stable")[:k]) for a in range(n)]

    def rank(a: int, x: int) -> int:
        return lists[a].index(x) if x in lists[a] else k

    out = np.zeros((n, n))
    for a in range(n):
        for b in range(n):
            if a == b:
                continue
            d_ab = sum(rank(b, lists[a][i]) for i in range(min(rank(a, b), k - 1) + 1))
            d_ba = sum(rank(a, lists[b][i]) for i in range(min(rank(b, a), k - 1) + 1))
            out[a, b] = (d_ab + d_ba) / min(rank(a, b), rank(b, a))
    return out


@pytest.mark.parametrize("k", [3, 8, 40])
def test_rank_order_matches_literal_formula(k: int) -> None:
    emb = np.random.default_rng(k).standard_normal((40, 6))
    got = rank_order_distances(emb, k=k, block=7)  # odd block size: exercise the blocking
    np.testing.assert_allclose(got, _rank_order_reference(emb, k))
    # Two faces whose top-k lists are disjoint share no neighbour and sit at exactly 2k.
    d = np.linalg.norm(emb[:, None] - emb[None], axis=-1)
    np.fill_diagonal(d, -1)
    lists = [set(np.argsort(row, kind="stable")[:k].tolist()) for row in d]
    strangers = [(a, b) for a in range(40) for b in range(40) if not lists[a] & lists[b]]
    assert strangers or k == 40
    for a, b in strangers:
        assert got[a, b] == 2 * k


@pytest.mark.parametrize("method", ["single", "average", "complete", "weighted", "median"])
def test_synthetic_identities_reach_high_ari(method: str) -> None:
    data = make_identities(30, 15, noise=0.55, noise_spread=0.2, seed=4)
    # Group photos of 3 different people: the j-th faces of identities 3g, 3g+1, 3g+2 share one.
    nth = np.arange(len(data.labels)) % 15
    photos = np.array([f"g{label // 3}-{j}" for label, j in zip(data.labels, nth, strict=True)])
    labels = cluster_faces(data.embeddings, photos, method, CLUSTER_THRESHOLD)
    scores = clustering_scores(data.labels, labels)
    assert scores.ari >= 0.95, scores
    assert scores.ami >= 0.95 and scores.f_measure >= 0.95
    assert 0.9 <= scores.k_over_c <= 1.3


def test_rank_order_clustering_on_synthetic_identities() -> None:
    data = make_identities(25, 12, noise=0.55, seed=5)
    labels = cluster_faces(data.embeddings, None, "average", rank_order=True, rank_order_k=20)
    assert clustering_scores(data.labels, labels).ari >= 0.9
    with pytest.raises(ValueError, match="Euclidean"):
        cluster_faces(data.embeddings, None, "median", rank_order=True)


def test_cluster_faces_edge_cases() -> None:
    assert cluster_faces(np.zeros((0, 8)), []).tolist() == []
    assert cluster_faces(np.ones((1, 8)), ["p"]).tolist() == [0]
    same = np.ones((3, 8))
    assert cluster_faces(same, ["a", "b", "c"]).tolist() == [0, 0, 0]
    assert cluster_faces(same, ["a", "a", "a"]).tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="photo ids"):
        cluster_faces(same, ["a"])
    with pytest.raises(ValueError, match="unknown linkage"):
        constrained_linkage(np.zeros((2, 2)), None, "centroidal")  # type: ignore[arg-type]


# -- metrics -------------------------------------------------------------------------------


def test_metrics_against_hand_computed_values() -> None:
    truth = [0, 0, 0, 1, 1, 2]
    pred = [0, 0, 1, 1, 1, 2]
    # Same-cluster pairs: predicted {01, 23, 24, 34} = 4, true {01, 02, 12, 34} = 4, shared {01, 34}.
    p, r, f = pairwise_prf(truth, pred)
    assert (p, r, f) == (0.5, 0.5, 0.5)
    s = clustering_scores(truth, pred)
    assert s.k_over_c == 1.0 and (s.n_true, s.n_found) == (3, 3)
    # ARI = (2 - 4·4/15) / ((4 + 4)/2 - 4·4/15) = (14/15) / (44/15) = 14/44.
    assert s.ari == pytest.approx(14 / 44)
    assert 0.0 < s.ami < 1.0

    singletons = [0, 1, 2, 3, 4, 5]
    assert pairwise_prf(truth, singletons) == (1.0, 0.0, 0.0)  # nothing joined, nothing found
    assert k_over_c(truth, singletons) == 2.0
    one = [7] * 6
    p, r, f = pairwise_prf(truth, one)  # 15 predicted pairs, 4 of them right
    assert (p, r) == (4 / 15, 1.0) and f == pytest.approx(8 / 19)
    assert k_over_c(truth, one) == pytest.approx(1 / 3)
    relabelled = clustering_scores(truth, [5, 5, 5, 9, 9, 1])
    assert relabelled.ari == relabelled.ami == relabelled.f_measure == 1.0
    with pytest.raises(ValueError):
        clustering_scores([0, 1], [0])


# -- real faces ------------------------------------------------------------------------------


def _identity_groups() -> dict[str, str]:
    """Connected components of the labelled 'same person' pairs."""
    folder = DATA / "faces" / "deepface"
    parent: dict[str, str] = {}

    def find(a: str) -> str:
        parent.setdefault(a, a)
        while parent[a] != a:
            a = parent[a]
        return a

    with open(folder / "master.csv", newline="") as f:
        for row in csv.DictReader(f):
            if row["Decision"] == "Yes":
                parent[find(row["file_x"])] = find(row["file_y"])
    with open(folder / "face-recognition-pivot.csv", newline="") as f:
        for row in csv.DictReader(f):
            if row["decision"] == "Yes":
                parent[find(row["file_x"].rsplit("/", 1)[-1])] = find(row["file_y"].rsplit("/", 1)[-1])
    return {name: find(name) for name in parent if (folder / name).exists()}


@pytest.mark.slow
def test_real_faces_cluster_into_labelled_identities() -> None:
    if not (DATA / "faces" / "deepface" / "master.csv").exists():
        pytest.skip(f"real test photos not found under {DATA}")
    groups = _identity_groups()
    emb = dlib_embeddings(sorted(groups))
    names = sorted(emb)
    assert len(names) >= 0.9 * len(groups)  # dlib finds a face on (nearly) every labelled photo
    truth = np.unique([groups[n] for n in names], return_inverse=True)[1]
    x = np.stack([emb[n] for n in names])
    scores = {m: clustering_scores(truth, cluster_faces(x, names, m)) for m in ["single", "average", "complete"]}
    # Seed 000's best was average linkage; on these photos it recovers the identities.
    assert scores["average"].ari >= 0.9, scores["average"]
    assert scores["average"].f_measure >= 0.9 and 0.8 <= scores["average"].k_over_c <= 1.2
