"""Per-user owner templates (seed 001's "etalon", 001_3c33a7603d0fbc67.txt).

Look at up to 30 profile photos, drop low-weight faces (extreme angles, blur, tiny), cluster what
is left with the same-photo cannot-link constraint (the owner appears at most once per photo, which
also caps a template at one vector per photo), and take the densest, most numerous cluster as the
owner. Its vectors, as a matrix, are the template; matching a face against it takes the best of
its rows.

The choice is by size first. A cluster is only accepted as the owner when it is clearly so: at
least ``min_members`` faces, present on at least ``min_photo_share`` of the photos that had a
usable face, tight enough (``min_density``; by default its average pair must be closer than the
cut height), and not tied in size with another cluster of about the same density. Density is the
mean pairwise cosine similarity inside the cluster (1.0 for a singleton). Everything else is a
:class:`NoTemplate` with a reason from a closed set.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from photolens.faceindex.cluster import DEFAULT_EUCLIDEAN_THRESHOLD, LinkageMethod, cluster_faces
from photolens.faceindex.vectors import l2_normalise

__all__ = ["NoTemplate", "NoTemplateReason", "Template", "TemplateConfig", "build_owner_template"]


class NoTemplateReason(StrEnum):
    NO_FACES = "no_faces"  # no face at all on the profile photos
    ALL_LOW_QUALITY = "all_low_quality"  # faces, but every one below the weight floor
    NO_DOMINANT_CLUSTER = "no_dominant_cluster"  # no cluster big enough (size / photo share)
    TIED_CLUSTERS = "tied_clusters"  # two largest clusters equal in size and about as dense
    LOW_DENSITY = "low_density"  # the largest cluster is too loose to be one person


@dataclass(frozen=True)
class TemplateConfig:
    linkage: LinkageMethod = "average"
    threshold: float = DEFAULT_EUCLIDEAN_THRESHOLD
    min_members: int = 2
    min_photo_share: float = 0.4
    # Mean pairwise cosine the owner cluster must reach. None: the cosine of two faces exactly at
    # the cut distance t (1 - t²/2 on unit vectors), so "on average closer than the cut".
    min_density: float | None = None
    # Two equally large clusters: the denser wins only by at least this much mean cosine.
    tie_density_margin: float = 0.02

    def __post_init__(self) -> None:
        if self.min_members < 1:
            raise ValueError("min_members must be >= 1")
        if not 0.0 <= self.min_photo_share <= 1.0:
            raise ValueError("min_photo_share must be in [0, 1]")

    @property
    def density_floor(self) -> float:
        return self.min_density if self.min_density is not None else 1.0 - self.threshold**2 / 2.0


@dataclass(frozen=True, eq=False)
class Template:
    vectors: np.ndarray  # (k, d) float32, unit rows: one per owner face, at most one per photo
    face_ids: tuple[str, ...]
    photo_ids: tuple[str, ...]
    weights: np.ndarray  # (k,) float32, the faces' quality weights
    density: float  # mean pairwise cosine inside the owner cluster
    n_photos: int  # photos considered that had at least one usable face
    n_faces: int  # usable faces that were clustered
    runner_up_size: int  # size of the second largest cluster (0 if none)

    @property
    def size(self) -> int:
        return len(self.face_ids)


@dataclass(frozen=True)
class NoTemplate:
    reason: NoTemplateReason
    n_photos: int = 0
    n_faces: int = 0


def _density(unit: np.ndarray) -> float:
    k = len(unit)
    if k < 2:
        return 1.0
    gram = unit.astype(np.float64) @ unit.T.astype(np.float64)
    return float((gram.sum() - np.trace(gram)) / (k * (k - 1)))


def build_owner_template(
    emb: np.ndarray,
    weights: np.ndarray,
    face_ids: Sequence[str],
    photo_ids: Sequence[str],
    min_weight: float,
    max_photos: int = 30,
    config: TemplateConfig | None = None,
) -> Template | NoTemplate:
    """Owner template from the faces of a user's profile photos.

    Faces are expected in profile order (newest photo first): only the first ``max_photos``
    distinct photos are used, as in seed 001.
    """
    cfg = config or TemplateConfig()
    x = np.asarray(emb, dtype=np.float32)
    w = np.asarray(weights, dtype=np.float32).reshape(-1)
    n = len(face_ids)
    if x.ndim != 2 or len(x) != n or len(w) != n or len(photo_ids) != n:
        raise ValueError(
            f"inconsistent inputs: emb {x.shape}, weights {w.shape}, {n} face ids, {len(photo_ids)} photo ids"
        )
    if n == 0:
        return NoTemplate(NoTemplateReason.NO_FACES)
    photos = np.asarray([str(p) for p in photo_ids])
    _, first_seen = np.unique(photos, return_index=True)
    kept_photos = set(photos[np.sort(first_seen)[:max_photos]])
    in_window = np.fromiter((p in kept_photos for p in photos), dtype=bool, count=n)
    usable = in_window & (w >= min_weight)
    if not usable.any():
        return NoTemplate(NoTemplateReason.ALL_LOW_QUALITY, n_photos=0, n_faces=0)

    idx = np.flatnonzero(usable)
    unit = l2_normalise(x[idx])
    n_photos = len(set(photos[idx]))
    labels = cluster_faces(unit, photos[idx], cfg.linkage, cfg.threshold)
    sizes = np.bincount(labels)
    dens = np.array([_density(unit[labels == c]) for c in range(len(sizes))])
    # Largest first, denser first among equals.
    order = sorted(range(len(sizes)), key=lambda c: (-sizes[c], -dens[c]))
    best = order[0]
    runner_up = order[1] if len(order) > 1 else None
    runner_up_size = int(sizes[runner_up]) if runner_up is not None else 0
    stats = {"n_photos": n_photos, "n_faces": len(idx)}
    if sizes[best] < cfg.min_members or sizes[best] < cfg.min_photo_share * n_photos:
        return NoTemplate(NoTemplateReason.NO_DOMINANT_CLUSTER, **stats)
    if (
        runner_up is not None
        and sizes[runner_up] == sizes[best]
        and dens[best] - dens[runner_up] < cfg.tie_density_margin
    ):
        return NoTemplate(NoTemplateReason.TIED_CLUSTERS, **stats)
    if dens[best] < cfg.density_floor:
        return NoTemplate(NoTemplateReason.LOW_DENSITY, **stats)
    members = idx[labels == best]
    return Template(
        vectors=unit[labels == best],
        face_ids=tuple(str(face_ids[i]) for i in members),
        photo_ids=tuple(photos[members].tolist()),
        weights=w[members],
        density=float(dens[best]),
        n_photos=n_photos,
        n_faces=len(idx),
        runner_up_size=runner_up_size,
    )
