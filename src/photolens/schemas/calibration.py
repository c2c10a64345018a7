"""Fitted constants as data: ``calibration.json`` (next to this module), written by ``tools/calibrate.py``.

Each entry records the value, the subset of the real test photos it was fitted on (the ``calibration``
half of ``tests/data/calibration_split.json``) and the figures of the fit. Code reads its constants from
here; ``tests/test_calibration.py`` checks that the file is what the script produces and the tests that
measure these constants use only the ``evaluation`` half.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

CALIBRATION_PATH = Path(__file__).with_name("calibration.json")


@lru_cache(maxsize=4)
def load_calibration(path: str | Path = CALIBRATION_PATH) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(Path(path).read_text(encoding="utf-8"))
    return doc
