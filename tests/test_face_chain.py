"""The full face chain of the tagging job (decode → MTCNN → dlib150 alignment → embedder) on the labelled
pairs of ../shared/data/faces/deepface/master.csv: 300 pairs (38 same person, 262 different) over 25 photos."""

from __future__ import annotations

from pathlib import Path

import pytest

from photolens.jobs.evaluate import eval_faces, format_faces
from photolens.models.store import ModelStore

FACES = Path(__file__).resolve().parents[2] / "shared" / "data" / "faces" / "deepface"


@pytest.mark.slow
def test_verification_on_labelled_pairs(tmp_path: Path) -> None:
    pairs = FACES / "master.csv"
    if not pairs.is_file():
        pytest.skip(f"labelled face pairs not found at {pairs} (see ../shared/data/README.md)")
    store = ModelStore(str(tmp_path / "models"))
    store.install(("mtcnn", "dlib_resnet34"))
    result = eval_faces(pairs, FACES, store.uri)
    print("\n" + format_faces(result))
    assert (result["n_pairs"], result["n_same"], result["n_different"]) == (300, 38, 262)
    assert result["n_images"] == 25 and result["n_images_without_face"] == 0
    assert result["roc_auc"] >= 0.98
    assert result["best_accuracy"] >= 0.95
    # dlib's descriptor separates these public-figure portraits well: most same-person pairs pass at 1% FAR
    assert result["tar_at_far"] >= 0.9 and result["far_achieved"] <= 0.01
