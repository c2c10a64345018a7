"""Clustering quality, as seed 000 reports it (000_0fb00c7dd830498f.txt): K/C, ARI, AMI, F-measure.

K/C is the number of clusters found over the number of true clusters (1.0 is right, > 1 means people
were split, < 1 merged). ARI and AMI are sklearn's. Precision, recall and F-measure are pairwise: a
pair of faces is "positive" when both sit in one cluster; precision is the share of predicted
same-cluster pairs that are truly the same person, recall the share of true same-person pairs that
were put together.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from sklearn.metrics import adjusted_mutual_info_score, adjusted_rand_score
from sklearn.metrics.cluster import contingency_matrix

__all__ = ["ClusteringScores", "clustering_scores", "k_over_c", "pairwise_prf"]


@dataclass(frozen=True)
class ClusteringScores:
    n_true: int
    n_found: int
    k_over_c: float
    ari: float
    ami: float
    precision: float
    recall: float
    f_measure: float

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def _check(labels_true: np.ndarray, labels_pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    t = np.asarray(labels_true).reshape(-1)
    p = np.asarray(labels_pred).reshape(-1)
    if len(t) != len(p):
        raise ValueError(f"{len(t)} true labels but {len(p)} predicted")
    if len(t) == 0:
        raise ValueError("no labels to score")
    return t, p


def k_over_c(labels_true: np.ndarray, labels_pred: np.ndarray) -> float:
    """Clusters found / true clusters."""
    t, p = _check(labels_true, labels_pred)
    return len(np.unique(p)) / len(np.unique(t))


def _pairs(counts: np.ndarray) -> int:
    c = counts.astype(np.int64)
    return int((c * (c - 1) // 2).sum())


def pairwise_prf(labels_true: np.ndarray, labels_pred: np.ndarray) -> tuple[float, float, float]:
    """Pairwise (precision, recall, F-measure).

    With no predicted pairs (all singletons) nothing was wrongly joined, so precision is 1.0; with
    no true pairs recall is 1.0 likewise. F is 0.0 when both precision and recall are 0.
    """
    t, p = _check(labels_true, labels_pred)
    table = contingency_matrix(t, p, sparse=True)
    same_both = _pairs(table.data)
    same_pred = _pairs(np.asarray(table.sum(axis=0)).reshape(-1))
    same_true = _pairs(np.asarray(table.sum(axis=1)).reshape(-1))
    precision = same_both / same_pred if same_pred else 1.0
    recall = same_both / same_true if same_true else 1.0
    f = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return precision, recall, f


def clustering_scores(labels_true: np.ndarray, labels_pred: np.ndarray) -> ClusteringScores:
    """All of seed 000's clustering columns for one labelling."""
    t, p = _check(labels_true, labels_pred)
    precision, recall, f = pairwise_prf(t, p)
    n_true, n_found = len(np.unique(t)), len(np.unique(p))
    return ClusteringScores(
        n_true=n_true,
        n_found=n_found,
        k_over_c=n_found / n_true,
        ari=float(adjusted_rand_score(t, p)),
        ami=float(adjusted_mutual_info_score(t, p)),
        precision=precision,
        recall=recall,
        f_measure=f,
    )
