"""Column helpers shared by the UDFs: what Ray hands a numpy batch is not always what the writer put in."""

from __future__ import annotations

from typing import Any

import numpy as np


def text_column(column: Any, n: int, default: str | None = None) -> np.ndarray:
    """A fresh, writable object column of str/None. Ray hands an all-null Arrow column over as float NaNs."""
    out = np.full(n, default, dtype=object)
    if column is not None:
        for i, value in enumerate(column):
            if isinstance(value, str):
                out[i] = value
            elif isinstance(value, bytes):
                out[i] = value.decode("utf-8", "replace")
    return out
