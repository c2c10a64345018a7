"""Seeded synthetic identity embeddings for tests and benchmarks of the face engine.

Real face embeddings are not shippable test data at scale, so the index, clustering and suggestion
code is exercised on vectors with the same geometry: every identity is a random unit centre in
``d`` dimensions, every face is ``normalise(centre + noise)``. With isotropic noise of total variance
``s²`` two faces of one identity have an expected cosine of about ``1 / (1 + s²)`` and faces of
different identities about 0 (random directions in 128-d are nearly orthogonal, std ≈ 1/√d). The
default ``noise=0.55`` gives an intra-identity cosine of ≈ 0.75, the range that face networks reach
on frontal photos; ``noise_spread`` varies the noise per face (pose, blur) so some faces are hard.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from photolens.faceindex.vectors import l2_normalise

__all__ = ["CLUSTER_THRESHOLD", "SyntheticFaces", "make_identities", "sample_faces"]

# Euclidean cut between identities of this generator at the default noise: faces of one identity
# sit at ≈ 0.7 from each other, different identities at ≈ 1.4 (unit vectors).
CLUSTER_THRESHOLD = 1.0


@dataclass(frozen=True, eq=False)
class SyntheticFaces:
    """Embeddings with their true identity; ``centres[labels[i]]`` is face ``i``'s identity centre."""

    embeddings: np.ndarray  # (n, d) float32, unit rows
    labels: np.ndarray  # (n,) int64 identity index
    centres: np.ndarray  # (n_ids, d) float32, unit rows


def _noise(rng: np.random.Generator, n: int, d: int, noise: float, noise_spread: float) -> np.ndarray:
    # Per-component std noise/√d makes the noise vector's norm ≈ noise whatever d is.
    scale = np.full((n, 1), noise / np.sqrt(d), dtype=np.float32)
    if noise_spread > 0:
        scale *= np.exp(noise_spread * rng.standard_normal((n, 1))).astype(np.float32)
    return rng.standard_normal((n, d), dtype=np.float32) * scale


def sample_faces(
    centres: np.ndarray,
    labels: np.ndarray,
    *,
    noise: float = 0.55,
    noise_spread: float = 0.0,
    seed: int = 0,
) -> np.ndarray:
    """New faces of the given identities (for example held-out queries), unit rows."""
    centres = np.asarray(centres, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return l2_normalise(centres[labels] + _noise(rng, len(labels), centres.shape[1], noise, noise_spread))


def make_identities(
    n_ids: int,
    per_id: int | np.ndarray,
    *,
    d: int = 128,
    noise: float = 0.55,
    noise_spread: float = 0.0,
    seed: int = 0,
) -> SyntheticFaces:
    """``n_ids`` identities with ``per_id`` faces each (an int, or one count per identity).

    Faces are grouped by identity in the output order; shuffle if order matters to the caller.
    """
    if n_ids < 1 or d < 2:
        raise ValueError(f"need n_ids >= 1 and d >= 2, got n_ids={n_ids}, d={d}")
    rng = np.random.default_rng(seed)
    centres = l2_normalise(rng.standard_normal((n_ids, d), dtype=np.float32))
    counts = np.broadcast_to(np.asarray(per_id, dtype=np.int64), (n_ids,))
    if (counts < 0).any():
        raise ValueError("per_id must be non-negative")
    labels = np.repeat(np.arange(n_ids, dtype=np.int64), counts)
    emb = l2_normalise(centres[labels] + _noise(rng, len(labels), d, noise, noise_spread))
    return SyntheticFaces(embeddings=emb, labels=labels, centres=centres)
