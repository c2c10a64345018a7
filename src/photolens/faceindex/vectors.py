"""Vector helpers of the face engine, shared by templates, the index, suggestions and the face jobs."""

from __future__ import annotations

import numpy as np

__all__ = ["l2_normalise"]


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, as float32 (zero rows stay zero instead of becoming NaN)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    unit: np.ndarray = (x / np.maximum(norms, np.float32(1e-12))).astype(np.float32, copy=False)
    return unit
