"""Model-stage UDFs on real photos (no Ray): the column contract, per-row failure isolation, pixel dropping;
then one small run of the whole tagging job on local Ray with every stage (slow)."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from photolens.models.landmark import ReferencesError
from photolens.models.store import ModelStore, ModelStoreError
from photolens.schemas.emotions import EMOTIONS
from photolens.schemas.taxonomy import CategoryTree
from photolens.udfs.decode import DecodeConfig, DecodeUDF
from photolens.udfs.recognize import (
    DetectConfig,
    DetectUDF,
    EmbedConfig,
    EmbedUDF,
    EmotionConfig,
    EmotionUDF,
    FacesConfig,
    FacesUDF,
    LandmarkStageConfig,
    LandmarkUDF,
    RecognizeConfig,
    RecognizeUDF,
    SceneStageConfig,
    SceneUDF,
    required_models,
    stage_udfs,
)
from photolens.udfs.write import WriteConfig, build_rows

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PHOTOS = DATA / "photos"
COUPLE = DATA / "faces" / "deepface" / "couple.jpg"
SOURCES = {"dog.jpg": PHOTOS / "dog.jpg", "kite.jpg": PHOTOS / "kite.jpg", "couple.jpg": COUPLE}
BROKEN = "broken.jpg"  # the first 5,000 bytes of dog.jpg: the decode stage makes it an error row


def _require_data() -> None:
    missing = [str(p) for p in SOURCES.values() if not p.is_file()]
    if missing:
        pytest.skip(f"real test photos missing: {missing} (see ../shared/data/README.md)")


@pytest.fixture(scope="session")
def store_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    _require_data()
    store = ModelStore(str(tmp_path_factory.mktemp("recognize-models")))
    store.install()
    return store.uri


def decoded_batch(names: list[str]) -> dict[str, np.ndarray]:
    """A batch as the decode stage hands it on: real photos through DecodeUDF, ``broken.jpg`` truncated.
    Names are keys of SOURCES or files of the photos folder."""
    _require_data()
    paths = [SOURCES["dog.jpg"] if n == BROKEN else SOURCES.get(n, PHOTOS / n) for n in names]
    for path in paths:
        if not path.is_file():
            pytest.skip(f"test photo missing: {path}")
    data = [p.read_bytes()[:5000] if n == BROKEN else p.read_bytes() for n, p in zip(names, paths, strict=True)]
    payload = np.empty(len(names), dtype=object)
    payload[:] = data
    batch = {
        "photo_id": np.array([f"id-{n}" for n in names], dtype=object),
        "user_id": np.array(["u1"] * len(names), dtype=object),
        "uri": np.array([f"/photos/users/u1/{n}" for n in names], dtype=object),
        "data": payload,
    }
    return DecodeUDF(DecodeConfig())(batch)


@pytest.fixture(scope="module")
def detect(store_uri: str) -> DetectUDF:
    return DetectUDF(DetectConfig(model_store=store_uri))


@pytest.fixture(scope="module")
def faces_chain(store_uri: str) -> tuple[FacesUDF, EmbedUDF, EmotionUDF]:
    return (FacesUDF(FacesConfig(model_store=store_uri)), EmbedUDF(EmbedConfig(model_store=store_uri)),
            EmotionUDF(EmotionConfig(model_store=store_uri, drop_pixels=True)))


NAMES = ["dog.jpg", BROKEN, "kite.jpg", "couple.jpg"]


@pytest.fixture(scope="module")
def batch() -> dict[str, np.ndarray]:
    out = decoded_batch(NAMES)
    assert list(out["status"]) == ["ok", "error", "ok", "ok"]
    return out


def _categories(batch: dict[str, np.ndarray], i: int) -> list[dict[str, Any]]:
    return json.loads(batch["detections_json"][i])


def _assert_untouched(before: dict[str, np.ndarray], after: dict[str, np.ndarray], i: int) -> None:
    for col in ("status", "error_code", "error_stage", "error_detail"):
        assert after[col][i] == before[col][i], col


# ---------------------------------------------------------------------------------------------- detect


def test_detect_dog_and_kite(detect: DetectUDF, batch: dict[str, np.ndarray]) -> None:
    out = detect(batch)
    tree = CategoryTree.load()
    dog = _categories(out, 0)
    kite = _categories(out, 2)
    assert {"dog", "bicycle"} <= {d["category"] for d in dog}
    assert {"kite", "person"} <= {d["category"] for d in kite}
    for det in dog + kite:
        path = det["category_path"]
        assert path[0] == det["category"]
        assert tree.parent(path[-1]) is None, f"{path} does not end at a root"
        assert path == tree.roll_up(det["category"])
        x0, y0, x1, y1 = det["box"]
        assert 0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0
        assert 0.5 <= det["score"] <= 1.0
    # the dog sits in the lower-left half of the photo (hand-checked: x 130-310 of 768 px)
    best_dog = max((d for d in dog if d["category"] == "dog"), key=lambda d: d["score"])
    assert best_dog["box"][0] < 0.3 and best_dog["box"][2] < 0.5
    assert out["model_detect"][0] == "ssd_mobilenet_v2_coco@2018_03_29"
    assert out["detect_seconds"].dtype == np.float32 and (out["detect_seconds"] > 0).all()
    # the corrupt row passes through untouched, with no outputs
    _assert_untouched(batch, out, 1)
    assert out["status"][1] == "error" and out["error_code"][1] == "TRUNCATED"
    assert out["detections_json"][1] is None and out["model_detect"][1] is None
    assert "image" in out  # only the last model stage drops the pixels


def test_injected_model_failure_marks_one_row(detect: DetectUDF, batch: dict[str, np.ndarray],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    kite_shape = batch["image"][2].shape
    real = detect.detector.detect

    def flaky(images: list[np.ndarray]) -> list[Any]:
        if any(img.shape == kite_shape for img in images):
            raise RuntimeError("injected: CUDA error on this photo")
        return real(images)

    monkeypatch.setattr(detect.detector, "detect", flaky)
    out = detect(batch)
    assert list(out["status"]) == ["ok", "error", "error", "ok"]
    assert (out["error_code"][2], out["error_stage"][2]) == ("MODEL_FAILED", "detect")
    assert "injected" in out["error_detail"][2] and len(out["error_detail"][2]) < 200
    assert out["detections_json"][2] is None and out["model_detect"][2] is None
    assert {"dog", "bicycle"} <= {d["category"] for d in _categories(out, 0)}
    assert {"person"} <= {d["category"] for d in _categories(out, 3)}
    _assert_untouched(batch, out, 1)
    # the input batch itself was not modified
    assert batch["status"][2] == "ok"


def test_a_bug_is_not_a_photo_error(detect: DetectUDF, batch: dict[str, np.ndarray],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    def buggy(images: list[np.ndarray]) -> list[Any]:
        raise TypeError("a bug in our code")

    monkeypatch.setattr(detect.detector, "detect", buggy)
    with pytest.raises(TypeError, match="a bug"):
        detect(batch)


def test_bad_configuration_raises_at_init(store_uri: str, tmp_path: Path) -> None:
    with pytest.raises(ModelStoreError, match="not in the model store"):
        DetectUDF(DetectConfig(model_store=store_uri, model="no_such_detector"))
    with pytest.raises(ModelStoreError):
        FacesUDF(FacesConfig(model_store=str(tmp_path / "empty-store")))
    with pytest.raises(ValueError, match="batch_size"):
        SceneStageConfig(model_store=store_uri, batch_size=0)
    with pytest.raises(ValueError, match="score_threshold"):
        DetectUDF(DetectConfig(model_store=store_uri, score_threshold=1.5))
    with pytest.raises(ReferencesError, match="cannot be read"):
        LandmarkUDF(LandmarkStageConfig(model_store=store_uri, references=str(tmp_path / "missing-refs")))


# ---------------------------------------------------------------------------------------------- scene


def test_scene_labels(store_uri: str, batch: dict[str, np.ndarray]) -> None:
    out = SceneUDF(SceneStageConfig(model_store=store_uri, drop_pixels=True))(batch)
    assert out["scene_coarse"][2] == "beach"  # kite.jpg: kites over a beach
    assert 0.2 <= out["scene_coarse_score"][2] <= 1.0
    for i in (0, 2, 3):
        labels, scores = out["scene_labels"][i], out["scene_scores"][i]
        # Where the classifier abstains (no coarse scene) it names no fine scene either.
        assert len(labels) == len(scores) <= 5
        assert (len(labels) >= 1) == (out["scene_coarse"][i] is not None)
        assert all(isinstance(x, str) for x in labels)
        assert scores == sorted(scores, reverse=True) and all(0.0 < s <= 1.0 for s in scores)
        assert out["model_scene"][i] == "mobilenet_v2_imagenet@torchvision-b0353104"
    assert out["scene_labels"][1] is None and np.isnan(out["scene_coarse_score"][1])
    _assert_untouched(batch, out, 1)
    assert "image" not in out  # drop_pixels


# ---------------------------------------------------------------------------------------------- faces


def test_faces_embed_emotion_on_couple(faces_chain: tuple[FacesUDF, EmbedUDF, EmotionUDF],
                                       batch: dict[str, np.ndarray]) -> None:
    faces_udf, embed_udf, emotion_udf = faces_chain
    after_faces = faces_udf(batch)
    chips = after_faces["face_chips"]
    assert chips[3].shape == (2, 150, 150, 3) and chips[3].dtype == np.uint8
    assert chips[0].shape == (0, 150, 150, 3)  # dog.jpg: no face
    after_embed = embed_udf(after_faces)
    out = emotion_udf(after_embed)

    faces = json.loads(out["faces_json"][3])
    assert len(faces) == 2
    h, w = batch["image"][3].shape[:2]
    for f in faces:
        x0, y0, x1, y1 = f["box"]
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        assert len(f["points"]) == 10
        assert f["det_score"] > 0.99 and f["passed_gate"] is True and f["gate_reason"] is None
        assert 0.0 < f["quality"] <= 1.0 and f["size_px"] > 16
    assert json.loads(out["faces_json"][0]) == []
    emb = out["face_embeddings"][3]
    assert emb.shape == (2, 128) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert float(emb[0] @ emb[1]) < 0.9  # two different people (same-person pairs score > 0.92)
    probs = out["face_emotions"][3]
    assert probs.shape == (2, len(EMOTIONS)) == (2, 7)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert out["face_embeddings"][0].shape == (0, 128) and out["face_emotions"][0].shape == (0, 7)
    for role, name in (("faces", "mtcnn"), ("embed", "dlib_resnet34"), ("emotion", "mini_xception_fer2013")):
        assert str(out[f"model_{role}"][3]).startswith(name + "@")
        assert out[f"{role}_seconds"].dtype == np.float32
    # biometric pixels end here
    assert "face_chips" not in out and "image" not in out
    _assert_untouched(batch, out, 1)
    assert out["faces_json"][1] is None and out["face_embeddings"][1].shape == (0, 128)

    # the writer's contract: faces rows with 128 floats, privacy from faces that passed the gate
    photos, _, faces_t = build_rows(out, WriteConfig("/lake", None, "r1", "2024-01-01", emotion_labels=EMOTIONS))
    private = dict(zip(photos["photo_id"].to_pylist(), photos["is_private"].to_pylist(), strict=True))
    assert private == {"id-dog.jpg": False, "id-broken.jpg": None, "id-kite.jpg": False, "id-couple.jpg": True}
    assert faces_t.num_rows == 2 and {len(e) for e in faces_t["embedding"].to_pylist()} == {128}
    assert set(faces_t["emotion"].to_pylist()) <= set(EMOTIONS)


def test_face_model_failure_passes_down_the_chain(faces_chain: tuple[FacesUDF, EmbedUDF, EmotionUDF],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    names = ["couple.jpg", "dog.jpg"]
    batch = decoded_batch(names)
    faces_udf, embed_udf, emotion_udf = faces_chain
    couple_shape = batch["image"][0].shape
    real = faces_udf.detector.detect

    def flaky(images: list[np.ndarray]) -> list[Any]:
        if any(img.shape == couple_shape for img in images):
            raise ValueError("injected: bad tensor")
        return real(images)

    monkeypatch.setattr(faces_udf.detector, "detect", flaky)
    out = emotion_udf(embed_udf(faces_udf(batch)))
    assert list(out["status"]) == ["error", "ok"]
    assert (out["error_code"][0], out["error_stage"][0]) == ("MODEL_FAILED", "faces")
    assert out["faces_json"][0] is None and out["face_embeddings"][0].shape == (0, 128)
    assert json.loads(out["faces_json"][1]) == []


def test_checkpoints_added_to_the_store(tmp_path: Path, batch: dict[str, np.ndarray],
                                       faces_chain: tuple[FacesUDF, EmbedUDF, EmotionUDF]) -> None:
    """The torchvision-detector and ArcFace paths, on checkpoints this test writes (random weights: only
    the plumbing is checked, never the outputs' meaning)."""
    import torch

    from photolens.models.detector import build_torchvision_model
    from photolens.models.face_embed import iresnet

    torch.manual_seed(0)
    store = ModelStore(str(tmp_path / "store"))
    store.install(("mtcnn",))
    det_file = tmp_path / "ssdlite320_mobilenet_v3_large_coco-test.pth"
    torch.save(build_torchvision_model("ssdlite320_mobilenet_v3_large").state_dict(), det_file)
    store.add("ssdlite320_mobilenet_v3_large", "detect", "test-1", [det_file], "test", "written by the test")
    arc_file = tmp_path / "backbone.pth"
    torch.save(iresnet("iresnet18").state_dict(), arc_file)
    store.add("arcface_r18_test", "face_embed", "test-2", [arc_file], "test", "written by the test")

    detect = DetectUDF(DetectConfig(model_store=store.uri, model="ssdlite320_mobilenet_v3_large", score_threshold=0.0,
                                    max_detections=5))
    out = detect(batch)
    assert out["model_detect"][0] == "ssdlite320_mobilenet_v3_large@test-1"
    for i in (0, 2, 3):
        dets = _categories(out, i)
        assert len(dets) <= 5 and all(d["category_path"][0] == d["category"] for d in dets)
    assert out["detections_json"][1] is None

    embed = EmbedUDF(EmbedConfig(model_store=store.uri, model="arcface_r18_test", arcface_arch="iresnet18"))
    faces = faces_chain[0](batch)
    emb = embed(faces)["face_embeddings"]
    assert emb[3].shape == (2, 512) and emb[0].shape == (0, 512)
    np.testing.assert_allclose(np.linalg.norm(emb[3], axis=1), 1.0, atol=1e-5)
    assert embed(faces)["model_embed"][3] == "arcface_iresnet18@test-2"


# ---------------------------------------------------------------------------------------------- landmark


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory, store_uri: str) -> str:
    """References built by the landmarks job from a tiny gallery of the same-place photos."""
    from photolens.jobs.landmarks import register as register_landmarks

    gallery = tmp_path_factory.mktemp("gallery")
    layout = {"leuven": ["leuvenA.jpg"], "graf": ["graf1.png", "graf3.png"], "aero": ["aero1.jpg"],
              "_none": ["fruits.jpg", "baboon.jpg"]}
    for lid, files in layout.items():
        (gallery / lid).mkdir()
        for f in files:
            if not (PHOTOS / f).is_file():
                pytest.skip(f"test photo missing: {PHOTOS / f}")
            shutil.copy(PHOTOS / f, gallery / lid / f)
    out = str(tmp_path_factory.mktemp("refs") / "references")
    # Through the CLI command, as an operator builds them.
    parser = argparse.ArgumentParser(prog="photolens")
    register_landmarks(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["landmarks", "build", "--gallery", str(gallery), "--out", out, "--store", store_uri,
                              "--json"])
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert args.handler(args) == 0
    report = json.loads(printed.getvalue())
    assert report["n_landmarks"] == 3 and report["n_images"] == 4 and report["n_negative_images"] == 2
    # graf1 vs graf3 is the one leave-one-out positive; it must sit above every negative
    assert report["calibrated"] and report["n_positive_pairs"] == 2 and report["balanced_accuracy"] == 1.0
    assert report["negative_scores"]["max"] < report["threshold"] < report["positive_scores"]["min"]
    return out


def test_landmark_with_and_without_references(store_uri: str, references: str) -> None:
    batch = decoded_batch(["leuvenB.jpg", "aero3.jpg", "dog.jpg"])
    out = LandmarkUDF(LandmarkStageConfig(model_store=store_uri, references=references))(batch)
    assert list(out["landmark_id"]) == ["leuven", "aero", None]
    scores = out["landmark_score"]
    assert scores.dtype == np.float32 and np.isfinite(scores).all()
    assert scores[2] < scores[0] and scores[2] < scores[1]
    assert "+refs-" in out["model_landmark"][0]

    bare = LandmarkUDF(LandmarkStageConfig(model_store=store_uri))(batch)  # the store holds no references
    assert list(bare["landmark_id"]) == [None, None, None] and np.isnan(bare["landmark_score"]).all()
    assert bare["model_landmark"][0].endswith("+no-references")


# ---------------------------------------------------------------------------------------------- planning


def test_stage_list_and_required_models(store_uri: str) -> None:
    assert required_models(["faces"]) == ("mtcnn", "dlib_resnet34", "mini_xception_fer2013")
    assert required_models(["scene", "landmark", "detect"]) == ("ssd_mobilenet_v2_coco", "mobilenet_v2_imagenet")
    with pytest.raises(ValueError, match="unknown model stage"):
        required_models(["decode"])
    full = stage_udfs(["faces", "detect", "scene", "landmark"], store_uri, "cpu", None)
    assert [cls for cls, _ in full] == [DetectUDF, SceneUDF, LandmarkUDF, FacesUDF, EmbedUDF, EmotionUDF]
    assert [cfg.drop_pixels for _, cfg in full] == [False] * 5 + [True]
    assert all(cfg.model_store == store_uri and cfg.device == "cpu" for _, cfg in full)
    short = stage_udfs(["detect", "scene"], None, "cpu", None)
    assert [(cls, cfg.drop_pixels) for cls, cfg in short] == [(DetectUDF, False), (SceneUDF, True)]


# ---------------------------------------------------------------------------------------------- whole job


@pytest.fixture
def local_ray() -> Iterator[None]:
    import ray

    os.environ["RAY_AUTH_MODE"] = "disabled"
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


@pytest.mark.slow
def test_tag_job_with_every_stage(tmp_path: Path, local_ray: None) -> None:
    from photolens.jobs.landmarks import build_landmark_references
    from photolens.jobs.tag import ALL_STAGES, TagConfig, run_tag
    from photolens.lake.delta import Lake

    _require_data()
    store = ModelStore(str(tmp_path / "models"))
    store.install()
    gallery = tmp_path / "gallery"
    for lid, f in (("leuven", "leuvenA.jpg"), ("graf", "graf1.png"), ("graf", "graf3.png"), ("aero", "aero1.jpg")):
        (gallery / lid).mkdir(parents=True, exist_ok=True)
        shutil.copy(PHOTOS / f, gallery / lid / f)
    build_landmark_references(gallery, None, store.uri)  # default place: <store>/landmarks/references

    user = tmp_path / "photos" / "users" / "u1"
    user.mkdir(parents=True)
    for name, src in (("dog.jpg", SOURCES["dog.jpg"]), ("kite.jpg", SOURCES["kite.jpg"]),
                      ("couple.jpg", COUPLE), ("leuvenB.jpg", PHOTOS / "leuvenB.jpg")):
        shutil.copy(src, user / name)
    (user / "broken.jpg").write_bytes(SOURCES["dog.jpg"].read_bytes()[:5000])

    cfg = TagConfig(photos=str(tmp_path / "photos"), lake=str(tmp_path / "lake"), model_store=store.uri,
                    stages=ALL_STAGES, batch_size=4, min_actors=1, max_actors=1, cpu_actors=1, progress=False,
                    run_id="all-stages")
    report = run_tag(cfg)
    assert report.status == "committed" and report.n_todo == 5
    assert report.status_counts == {"ok": 4, "error": 1} and report.error_counts == {"TRUNCATED": 1}
    assert {s["stage"] for s in report.stages} >= {"decode", "detect", "scene", "landmark", "faces", "embed",
                                                   "emotion"}

    lake = Lake(cfg.lake)
    photos = {Path(r["uri"]).name: r for r in lake.read("photos").to_pylist()}
    assert set(photos) == {"dog.jpg", "kite.jpg", "couple.jpg", "leuvenB.jpg", "broken.jpg"}
    for name in ("dog.jpg", "kite.jpg", "couple.jpg", "leuvenB.jpg"):
        r = photos[name]
        # an empty list where the scene classifier abstains (below its calibrated threshold)
        assert r["status"] == "ok" and r["scene_labels"] is not None
        assert len(r["scene_scores"]) == len(r["scene_labels"])
        assert r["landmark_score"] is not None and r["is_private"] is not None
        models = json.loads(r["model_versions"])
        assert set(models) == {"detect", "scene", "landmark", "faces", "embed", "emotion"}
    assert photos["leuvenB.jpg"]["landmark_id"] == "leuven"
    assert photos["dog.jpg"]["landmark_id"] is None
    assert photos["kite.jpg"]["scene_coarse"] == "beach"
    assert photos["couple.jpg"]["is_private"] is True and photos["couple.jpg"]["n_faces"] == 2
    assert photos["dog.jpg"]["is_private"] is False and photos["dog.jpg"]["n_faces"] == 0
    assert photos["broken.jpg"]["status"] == "error" and photos["broken.jpg"]["is_private"] is None

    dets = lake.read("detections").to_pylist()
    dog_id = photos["dog.jpg"]["photo_id"]
    assert {"dog", "bicycle"} <= {d["category"] for d in dets if d["photo_id"] == dog_id}
    assert all(d["category_path"][0] == d["category"] for d in dets)

    faces = lake.read("faces")
    import pyarrow as pa

    assert faces.schema.field("embedding").type == pa.list_(pa.float32())
    rows = faces.to_pylist()
    assert len(rows) == 2 and {r["photo_id"] for r in rows} == {photos["couple.jpg"]["photo_id"]}
    for r in rows:
        assert len(r["embedding"]) == 128 and abs(float(np.linalg.norm(r["embedding"])) - 1.0) < 1e-4
        assert len(r["emotion_probs"]) == 7 and abs(sum(r["emotion_probs"]) - 1.0) < 1e-4
        assert r["emotion"] in EMOTIONS and r["passed_gate"] is True
    assert lake.table_uri("faces").startswith(str(tmp_path / "lake" / "restricted"))


# ---------------------------------------------------------------------------------------------- fused


def _same_outputs(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert set(a) == set(b)
    for col, values in a.items():
        if col.endswith("_seconds"):
            assert values.dtype == b[col].dtype == np.float32
            continue
        for i, (x, y) in enumerate(zip(values, b[col], strict=True)):
            if isinstance(x, np.ndarray) or (isinstance(x, list) and x and isinstance(x[0], float)):
                np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6, err_msg=f"{col}[{i}]")
            elif isinstance(x, float | np.floating) and np.isnan(x):
                assert np.isnan(y), f"{col}[{i}]"
            else:
                assert x == y, f"{col}[{i}]: {x!r} != {y!r}"


FUSED_STAGES = ("detect", "scene", "faces")


@pytest.fixture(scope="module")
def fused(store_uri: str) -> RecognizeUDF:
    return RecognizeUDF(RecognizeConfig(stages=FUSED_STAGES, model_store=store_uri, batch_size=2))


def test_fused_stage_matches_the_stage_chain(fused: RecognizeUDF, store_uri: str,
                                             batch: dict[str, np.ndarray]) -> None:
    assert [type(s) for s in fused.stages] == [DetectUDF, SceneUDF, FacesUDF, EmbedUDF, EmotionUDF]
    # batch_size reaches the photo-level stages only; the chip-level ones keep their larger defaults
    assert [s.config.batch_size for s in fused.stages] == [2, 2, 2, 64, 512]
    out = fused(batch)
    chained = dict(batch)
    for cls, cfg in stage_udfs(list(FUSED_STAGES), store_uri, "cpu", None, batch_size=2):
        chained = cls(cfg)(chained)
    _same_outputs(out, chained)
    assert "image" not in out and "face_chips" not in out
    assert {f"{s}_seconds" for s in ("detect", "scene", "faces", "embed", "emotion")} <= set(out)
    assert {"dog", "bicycle"} <= {d["category"] for d in _categories(out, 0)}
    assert len(json.loads(out["faces_json"][3])) == 2 and out["face_embeddings"][3].shape == (2, 128)
    assert fused.tags["detect"] == out["model_detect"][0]
    _assert_untouched(batch, out, 1)


def test_fused_stage_isolates_a_failing_photo(fused: RecognizeUDF, batch: dict[str, np.ndarray],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    detect = fused.stages[0]
    couple_shape = batch["image"][3].shape
    real = detect.detector.detect

    def flaky(images: list[np.ndarray]) -> list[Any]:
        if any(img.shape == couple_shape for img in images):
            raise RuntimeError("injected: device error on this photo")
        return real(images)

    monkeypatch.setattr(detect.detector, "detect", flaky)
    out = fused(batch)
    assert list(out["status"]) == ["ok", "error", "ok", "error"]
    assert (out["error_code"][3], out["error_stage"][3]) == ("MODEL_FAILED", "detect")
    # the stages after the failure leave that photo alone; the others carry on
    assert out["faces_json"][3] is None and out["face_embeddings"][3].shape == (0, 128)
    assert out["scene_labels"][3] is None and out["model_faces"][3] is None
    assert out["model_faces"][0].startswith("mtcnn@") and out["scene_coarse"][2] == "beach"
    assert json.loads(out["faces_json"][0]) == [] and {"kite"} <= {d["category"] for d in _categories(out, 2)}
    assert out["error_code"][1] == "TRUNCATED"


def test_fused_stage_configuration_fails_on_the_driver(store_uri: str) -> None:
    with pytest.raises(ValueError, match="unknown model stage"):
        RecognizeConfig(stages=("decode", "faces"))
    with pytest.raises(ValueError, match="at least one"):
        RecognizeConfig(stages=())
    with pytest.raises(ValueError, match="batch_size"):
        RecognizeConfig(stages=("faces",), batch_size=0)
    with pytest.raises(ValueError, match="num_threads"):
        RecognizeConfig(stages=("faces",), num_threads=0)
    with pytest.raises(ModelStoreError):
        RecognizeUDF(RecognizeConfig(stages=("scene",), model_store=store_uri + "-missing"))


def test_fused_stage_decodes_deferred_jpegs(store_uri: str,
                                            faces_chain: tuple[FacesUDF, EmbedUDF, EmotionUDF]) -> None:
    """The GPU-decode seam on device=cpu: header-mode decode defers the JPEGs, the fused stage decodes
    them and gets the same working images (so the same model outputs) as the CPU decode stage."""
    import dataclasses

    pytest.importorskip("photolens.udfs.gpudecode")
    if "pixels" not in {f.name for f in dataclasses.fields(DecodeConfig)}:
        pytest.skip("this build's decode stage has no header mode")
    names = ["couple.jpg", "dog.jpg", BROKEN]
    pixel = decoded_batch(names)
    _require_data()
    header_in = {k: v for k, v in pixel.items() if k in ("photo_id", "user_id", "uri")}
    data = np.empty(len(names), dtype=object)
    data[:] = [COUPLE.read_bytes(), SOURCES["dog.jpg"].read_bytes(), SOURCES["dog.jpg"].read_bytes()[:5000]]
    header = DecodeUDF(DecodeConfig(pixels=False))({**header_in, "data": data})
    assert header["jpeg"][0] is not None and header["image"][0].size == 0  # deferred to the device

    on_device = RecognizeUDF(RecognizeConfig(stages=("faces",), model_store=store_uri, gpu_decode=True))(header)
    plain = faces_chain[2](faces_chain[1](faces_chain[0](pixel)))
    assert list(on_device["status"]) == list(plain["status"]) == ["ok", "ok", "error"]
    assert "jpeg" not in on_device and "image" not in on_device
    assert on_device["phash"][0] is not None and on_device["decode_seconds"][0] > 0
    faces_dev, faces_cpu = json.loads(on_device["faces_json"][0]), json.loads(plain["faces_json"][0])
    assert len(faces_dev) == len(faces_cpu) == 2
    for a, b in zip(faces_dev, faces_cpu, strict=True):
        np.testing.assert_allclose(a["box"], b["box"], atol=3.0)  # decoders may differ by a few grey levels
