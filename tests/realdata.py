"""Helpers shared by tests that use real weights and real photos (imported by test modules, not a test)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from photolens.models.store import PACKAGED, ModelStoreError, package_folder

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
# Which photos fit constants (tools/calibrate.py) and which measure them (the tests): never both.
SPLIT_PATH = Path(__file__).resolve().parent / "data" / "calibration_split.json"
SPLIT: dict[str, dict[str, list[str]]] = {
    k: v for k, v in json.loads(SPLIT_PATH.read_text(encoding="utf-8")).items() if isinstance(v, dict)}


def split_files(folder: str, half: str = "evaluation") -> list[str]:
    """File names of one half (``calibration`` or ``evaluation``) of ``folder`` (``photos``, ``faces/deepface``)."""
    return list(SPLIT[folder][half])


def packaged_weight(model: str, filename: str) -> Path:
    """A weight file inside its installed package, found the way the model store finds it."""
    entry = next(p for p in PACKAGED if p.name == model)
    try:
        folder = package_folder(entry.package)
    except ModelStoreError:
        pytest.skip(f"{entry.distribution} is not installed (make install installs it)")
    hits = [folder / rel for rel in entry.files if rel.endswith(filename)]
    if not hits or not hits[0].exists():
        pytest.skip(f"{entry.distribution} lacks {filename}")
    return hits[0]


def dlib_embeddings(names: list[str]) -> dict[str, np.ndarray]:
    """dlib's own HOG detector, 5-point aligner and ResNet embedder on deepface photos: the reference model."""
    dlib = pytest.importorskip("dlib")
    from PIL import Image, ImageOps

    try:
        models = package_folder("face_recognition_models") / "models"
    except ModelStoreError:
        pytest.skip("face_recognition_models weights are not installed")
    detector = dlib.get_frontal_face_detector()
    aligner = dlib.shape_predictor(str(models / "shape_predictor_5_face_landmarks.dat"))
    net = dlib.face_recognition_model_v1(str(models / "dlib_face_recognition_resnet_model_v1.dat"))
    out = {}
    for name in names:
        with Image.open(DATA / "faces" / "deepface" / name) as im:
            img = ImageOps.exif_transpose(im).convert("RGB")
        scale = min(1.0, 800 / max(img.size))  # HOG time grows with pixels; faces stay > 80 px
        pixels = np.asarray(img.resize((round(img.width * scale), round(img.height * scale))))
        boxes = detector(pixels, 1)
        if boxes:
            box = max(boxes, key=lambda b: b.area())
            out[name] = np.asarray(net.compute_face_descriptor(pixels, aligner(pixels, box)))
    return out


def mtcnn_weight_paths() -> tuple[Path, Path, Path]:
    """P-, R- and O-Net state dicts from the facenet-pytorch wheel."""
    return tuple(packaged_weight("mtcnn", f"{net}.pt") for net in ("pnet", "rnet", "onet"))  # type: ignore[return-value]


def load_rgb(path: Path, max_side: int = 480) -> np.ndarray:
    """Photos as the decode stage delivers them: RGB uint8, long side bounded (keeps tests quick)."""
    from PIL import Image

    if not path.is_file():
        pytest.skip(f"test photo missing: {path} (see ../shared/data/README.md)")
    with Image.open(path) as im:
        im = im.convert("RGB")
        im.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
        return np.asarray(im).copy()
