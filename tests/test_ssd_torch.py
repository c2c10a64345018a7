"""SSD-MobileNet-v2 COCO in torch from the frozen graph's weights, checked against cv2.dnn running the same graph."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from realdata import DATA, load_rgb, packaged_weight

from photolens.models.detector import CheckpointError, Detections, PostprocessConfig, SsdConfig, SsdMobileNetCoco
from photolens.models.eval_detection import box_iou
from photolens.models.ssd_torch import (
    AnchorConfig,
    GraphReadError,
    SsdMobileNetV2,
    TorchSsdConfig,
    TorchSsdMobileNetCoco,
    check_config_priors,
    expected_tensors,
    generate_anchors,
    read_config_nodes,
    read_graph_consts,
)
from photolens.models.store import ModelStore
from photolens.udfs.recognize import DetectConfig, DetectUDF

PHOTOS = DATA / "photos"
# A handful of the classic photos: 24 boxes at or above 0.5 between them (55 above 0.1, 36 of those
# within 0.03 of 0.1).
NAMES = ("dog.jpg", "horses.jpg", "kite.jpg", "giraffe.jpg", "person.jpg", "fruits.jpg")
SCORE_TOL = 0.02
IOU_MIN = 0.9
# Measured on NAMES (CPU autocast, channels-last): bf16 moves any anchor's score by at most 0.068
# (99.9 % of them by < 0.0035), a detection's by at most 0.043 (the dog in person.jpg, 0.602 ->
# 0.645), and keeps its box at IoU >= 0.90 with the fp32 box, except small boxes (a 2 % wide kite:
# IoU 0.68), where a few pixels of shift are a large part of the box.
BF16_SCORE_TOL = 0.08
BF16_IOU_MIN = 0.6


@pytest.fixture(scope="module")
def files() -> tuple[Path, Path]:
    return (packaged_weight("ssd_mobilenet_v2_coco", "frozen_inference_graph.pb"),
            packaged_weight("ssd_mobilenet_v2_coco", "ssd_mobilenet_v2_coco_2018_03_29.pbtxt"))


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    # load_rgb: the long side the decode stage would deliver; 640 keeps small kites and people in.
    return [load_rgb(PHOTOS / name, max_side=640) for name in NAMES]


@pytest.fixture(scope="module")
def torch_ssd(files: tuple[Path, Path]) -> TorchSsdMobileNetCoco:
    return TorchSsdMobileNetCoco(*files, TorchSsdConfig(postprocess=PostprocessConfig(score_threshold=0.05)))


@pytest.fixture(scope="module")
def torch_dets(torch_ssd: TorchSsdMobileNetCoco, photos: list[np.ndarray]) -> list[Detections]:
    return torch_ssd.detect(photos)


@pytest.fixture(scope="module")
def cv2_dets(files: tuple[Path, Path], photos: list[np.ndarray]) -> list[Detections]:
    reference = SsdMobileNetCoco(*files, SsdConfig(postprocess=PostprocessConfig(score_threshold=0.05)))
    return [reference.detect([img])[0] for img in photos]


def _above(dets: Detections, threshold: float) -> Detections:
    keep = dets.scores >= threshold
    return Detections(dets.boxes[keep], dets.scores[keep], dets.category_ids[keep],
                      tuple(c for c, k in zip(dets.categories, keep, strict=True) if k))


def unmatched(ref: Detections, other: Detections, threshold: float, score_tol: float, iou_min: float) -> list[str]:
    """Boxes of ``ref`` (at or above ``threshold``) without a box of ``other`` of the same class, IoU >=
    ``iou_min`` and a score within ``score_tol``; a box within ``score_tol`` of the threshold may go
    unmatched (its twin can fall just under it)."""
    misses = []
    for i in range(len(ref)):
        if ref.scores[i] < threshold:
            continue
        same = np.flatnonzero(other.category_ids == ref.category_ids[i])
        ok = False
        if len(same):
            ious = box_iou(ref.boxes[i : i + 1].astype(np.float64), other.boxes[same].astype(np.float64))[0]
            ok = bool(((ious >= iou_min) & (np.abs(other.scores[same] - ref.scores[i]) <= score_tol)).any())
        if not ok and ref.scores[i] >= threshold + score_tol:
            misses.append(f"{ref.categories[i]} {ref.scores[i]:.3f} {np.round(ref.boxes[i], 3).tolist()}")
    return misses


def _compare(ref: list[Detections], got: list[Detections], threshold: float, score_tol: float,
             iou_min: float) -> int:
    problems = []
    for name, a, b in zip(NAMES, ref, got, strict=True):
        for side, x, y in (("reference", a, b), ("candidate", b, a)):
            misses = unmatched(x, y, threshold, score_tol, iou_min)
            if misses:
                problems.append(f"{name}: {side} boxes without a match: {misses}")
    assert not problems, "\n".join(problems)
    return sum(int((d.scores >= threshold).sum()) for d in ref)


# ------------------------------------------------------------------------------------------ reading the graph


def test_graph_reader_finds_every_tensor(files: tuple[Path, Path]) -> None:
    graph, _ = files
    consts = read_graph_consts(graph)
    needed = expected_tensors()
    assert len(needed) == len(set(needed)) == 346
    assert not [n for n in needed if n not in consts]
    assert consts["FeatureExtractor/MobilenetV2/Conv/weights"].shape == (3, 3, 3, 32)  # HWIO
    assert consts["FeatureExtractor/MobilenetV2/expanded_conv_1/depthwise/depthwise_weights"].shape == (3, 3, 96, 1)
    assert consts["BoxPredictor_0/ClassPredictor/weights"].shape == (3, 3, 576, 3 * 91)
    assert consts["BoxPredictor_5/BoxEncodingPredictor/weights"].shape == (3, 3, 128, 6 * 4)
    assert float(consts["Preprocessor/mul/x"]) == pytest.approx(2 / 255)
    assert float(consts["Preprocessor/sub/y"]) == 1.0
    var = consts["FeatureExtractor/MobilenetV2/Conv_1/BatchNorm/moving_variance"]
    assert var.dtype == np.float32 and var.shape == (1280,) and (var > 0).all()
    # Asking for names reads only those, and the network takes them as they are.
    model = SsdMobileNetV2(read_graph_consts(graph, needed))
    codes, logits, sizes = model(torch.zeros(1, 3, 300, 300))
    assert sizes == [(19, 19), (10, 10), (5, 5), (3, 3), (2, 2), (1, 1)]
    assert codes.shape == (1, 1917, 4) and logits.shape == (1, 1917, 91)


def test_a_graph_lacking_a_tensor_fails_clearly(files: tuple[Path, Path], tmp_path: Path) -> None:
    graph, pbtxt = files
    data = graph.read_bytes()
    name = b"BoxPredictor_5/ClassPredictor/biases"
    assert name in data
    # Same length, so every protobuf length prefix stays right: a well-formed graph without that Const.
    altered = tmp_path / "renamed.pb"
    altered.write_bytes(data.replace(name, b"BoxPredictor_5/ClassPredictor/biasez"))
    with pytest.raises(GraphReadError, match="lacks tensors the SSD needs: BoxPredictor_5/ClassPredictor/biases"):
        TorchSsdMobileNetCoco(altered, pbtxt)
    truncated = tmp_path / "truncated.pb"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(GraphReadError, match="truncated"):
        read_graph_consts(truncated, expected_tensors())
    garbage = tmp_path / "garbage.pb"
    garbage.write_bytes(b"\xff" * 64)
    with pytest.raises(GraphReadError, match="not a readable TensorFlow GraphDef"):
        read_graph_consts(garbage)
    empty = tmp_path / "empty.pb"
    empty.write_bytes(b"")
    with pytest.raises(GraphReadError, match=r"lacks tensors the SSD needs: .* \(346 in all\)"):
        read_graph_consts(empty, expected_tensors())
    with pytest.raises(FileNotFoundError, match="SSD model file not found"):
        TorchSsdMobileNetCoco(tmp_path / "none.pb", pbtxt)


def test_anchors_agree_with_the_config_priors(files: tuple[Path, Path], tmp_path: Path) -> None:
    _, pbtxt = files
    output = check_config_priors(read_config_nodes(pbtxt), AnchorConfig(), 300)
    assert (output.nms_threshold, output.top_k, output.keep_top_k) == (pytest.approx(0.6), 100, 100)
    assert output.variance == pytest.approx((0.1, 0.1, 0.2, 0.2))
    anchors = generate_anchors(AnchorConfig(), [(19, 19), (10, 10), (5, 5), (3, 3), (2, 2), (1, 1)])
    assert anchors.shape == (19 * 19 * 3 + (100 + 25 + 9 + 4 + 1) * 6, 4)
    # The first cell's anchors (cy, cx, h, w): 0.1 square, then scale 0.2 at aspect 2 and 0.5.
    np.testing.assert_allclose(
        anchors[:3].numpy(),
        [[0.5 / 19, 0.5 / 19, 0.1, 0.1], [0.5 / 19, 0.5 / 19, 0.2 / 2**0.5, 0.2 * 2**0.5],
         [0.5 / 19, 0.5 / 19, 0.2 * 2**0.5, 0.2 / 2**0.5]], rtol=1e-5)
    # The last one: the 1x1 map's interpolated square, sqrt(0.95 * 1.0).
    np.testing.assert_allclose(anchors[-1].numpy(), [0.5, 0.5, 0.95**0.5, 0.95**0.5], rtol=1e-5)
    # A config made for other anchors is refused, naming the layer.
    other = tmp_path / "other.pbtxt"
    other.write_text(pbtxt.read_text().replace("float_val: 105.0", "float_val: 110.0", 1))
    with pytest.raises(CheckpointError, match="PriorBox_1 sizes"):
        TorchSsdMobileNetCoco(files[0], other)
    with pytest.raises(CheckpointError, match="PriorBox_0 sizes"):
        check_config_priors(read_config_nodes(pbtxt), AnchorConfig(min_scale=0.25), 300)


# ------------------------------------------------------------------------------------------ against cv2.dnn


@pytest.mark.parametrize("threshold", [0.5, 0.1])
def test_torch_matches_cv2_dnn_on_real_photos(
    torch_dets: list[Detections], cv2_dets: list[Detections], threshold: float
) -> None:
    ref = [_above(d, threshold) for d in cv2_dets]
    got = [_above(d, threshold) for d in torch_dets]
    checked = _compare(ref, got, threshold, SCORE_TOL, IOU_MIN)
    assert checked >= (24 if threshold == 0.5 else 55)
    # The classic photos' objects are there (tests/test_detector.py's expectations).
    found = {name: set(d.categories) for name, d in zip(NAMES, got, strict=True)}
    assert {"dog", "bicycle", "car"} <= found["dog.jpg"] and "horse" in found["horses.jpg"]
    assert {"kite", "person"} <= found["kite.jpg"] and {"giraffe", "zebra"} <= found["giraffe.jpg"]


def test_at_the_default_threshold_the_detections_are_cv2s(torch_dets: list[Detections],
                                                           cv2_dets: list[Detections]) -> None:
    threshold = TorchSsdConfig().postprocess.score_threshold
    assert TorchSsdConfig().postprocess == SsdConfig().postprocess
    # Same preprocessing, weights and decoding: on these photos not just matches, the same list.
    for a, b in zip(cv2_dets, torch_dets, strict=True):
        a, b = _above(a, threshold), _above(b, threshold)
        assert a.categories == b.categories
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-3)
        np.testing.assert_allclose(a.boxes, b.boxes, atol=2e-3)


def test_batched_equals_one_by_one(torch_ssd: TorchSsdMobileNetCoco, photos: list[np.ndarray]) -> None:
    # Other sizes and shapes in one batch: a photo, a tiny image, one already 300x300.
    images = [photos[0], np.zeros((7, 5, 3), np.uint8), photos[2][:300, :300].copy()]
    batched = torch_ssd.detect(images)
    assert len(batched) == len(images) and len(batched[0]) > 0 and len(batched[2]) > 0
    for img, dets in zip(images, batched, strict=True):
        (single,) = torch_ssd.detect([img])
        assert dets.categories == single.categories
        np.testing.assert_allclose(dets.scores, single.scores, atol=1e-5)
        np.testing.assert_allclose(dets.boxes, single.boxes, atol=1e-5)


def test_bf16_autocast_is_close_to_fp32(files: tuple[Path, Path], torch_ssd: TorchSsdMobileNetCoco,
                                        torch_dets: list[Detections], photos: list[np.ndarray]) -> None:
    bf16 = TorchSsdMobileNetCoco(*files, TorchSsdConfig(postprocess=torch_ssd.config.postprocess, bf16=True,
                                                        channels_last=True))
    _, scores32 = torch_ssd.forward_raw(photos)
    boxes16, scores16 = bf16.forward_raw(photos)
    assert boxes16.dtype == scores16.dtype == torch.float32
    diff = (scores16 - scores32).abs()
    assert 1e-3 < float(diff.max()) <= BF16_SCORE_TOL  # > 1e-3: autocast did run in bfloat16
    assert float(diff.flatten().quantile(0.999)) < 0.005
    checked = _compare(torch_dets, bf16.detect(photos), 0.5, BF16_SCORE_TOL, BF16_IOU_MIN)
    assert checked >= 24


def test_interface_and_bad_input(torch_ssd: TorchSsdMobileNetCoco) -> None:
    assert (torch_ssd.name, torch_ssd.version, torch_ssd.device.type) == ("ssd_mobilenet_v2_coco", "2018_03_29", "cpu")
    assert torch_ssd.detect([]) == []
    with pytest.raises(ValueError, match="RGB uint8"):
        torch_ssd.detect([np.zeros((10, 10), np.uint8)])
    with pytest.raises(ValueError, match="RGB uint8"):
        torch_ssd.detect([np.zeros((10, 10, 3), np.float32)])


def test_detect_stage_runs_torch_by_default_and_cv2_on_request(tmp_path: Path, photos: list[np.ndarray]) -> None:
    store = ModelStore(str(tmp_path / "models"))
    store.install(("ssd_mobilenet_v2_coco",))
    images = np.empty(2, dtype=object)
    images[:] = [photos[0], photos[2]]
    batch = {"status": np.array(["ok", "ok"], dtype=object), "image": images}
    default = DetectUDF(DetectConfig(model_store=store.uri))
    reference = DetectUDF(DetectConfig(model_store=store.uri, engine="cv2"))
    assert isinstance(default.detector, TorchSsdMobileNetCoco)
    assert isinstance(reference.detector, SsdMobileNetCoco)
    assert default.tag == reference.tag == "ssd_mobilenet_v2_coco@2018_03_29"
    out, ref = default(dict(batch)), reference(dict(batch))
    assert list(out["status"]) == ["ok", "ok"]
    for i in range(2):
        a, b = (json.loads(o["detections_json"][i]) for o in (ref, out))
        assert len(a) > 0
        assert [d["category"] for d in a] == [d["category"] for d in b]
        np.testing.assert_allclose([d["score"] for d in a], [d["score"] for d in b], atol=1e-3)
    with pytest.raises(ValueError, match="engine must be 'torch' or 'cv2'"):
        DetectConfig(engine="tensorflow")


# ------------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
def test_cuda_matches_cpu_in_fp32_and_bf16(files: tuple[Path, Path], torch_ssd: TorchSsdMobileNetCoco,
                                           torch_dets: list[Detections], photos: list[np.ndarray]) -> None:
    post = torch_ssd.config.postprocess
    cpu = torch_dets
    fp32 = TorchSsdMobileNetCoco(*files, TorchSsdConfig(postprocess=post), device="cuda")
    assert fp32.device.type == "cuda" and next(fp32.model.parameters()).is_cuda
    _compare(cpu, fp32.detect(photos), 0.1, SCORE_TOL, IOU_MIN)
    bf16 = TorchSsdMobileNetCoco(*files, TorchSsdConfig(postprocess=post, bf16=True, channels_last=True),
                                 device="cuda")
    assert _compare(cpu, bf16.detect(photos), 0.5, BF16_SCORE_TOL, BF16_IOU_MIN) >= 24
    # A large batch stays one forward pass on the device.
    many = bf16.detect(photos * 16)
    assert [d.categories for d in many[: len(photos)]] == [d.categories for d in many[-len(photos):]]
