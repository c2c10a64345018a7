"""Scheduling the tag pipeline: pool layouts that always fit the cluster (no Ray), and real runs on a local Ray
that declares one logical GPU, where the fused model stage runs on device=cpu and must give the CPU path's rows.

The Ray runs happen in child processes: each needs its own local Ray (one with a GPU declared), and the
session's ``ray_local`` cluster must stay as the other tests expect it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from photolens.jobs.tag import (
    ConfigError,
    TagConfig,
    _LogProgress,
    actor_memory,
    fit_cpus,
    model_units,
    plan_pipeline,
    resolve_model_batch_size,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PHOTOS = {"couple.jpg": DATA / "faces" / "deepface" / "couple.jpg", "dog.jpg": DATA / "photos" / "dog.jpg"}
GIB = float(1 << 30)
ALL = ["detect", "scene", "landmark", "faces"]


def _cluster(cpus: float, gpus: float = 0.0, memory: float = 16 * GIB) -> dict[str, float]:
    return {"CPU": cpus, "GPU": gpus, "memory": memory} if gpus else {"CPU": cpus, "memory": memory}


def _minimum(layout: Any, key: str) -> float:
    return sum(p.min_size * getattr(p, key) for p in layout.pools.values())


# ---------------------------------------------------------------------------------------------- layouts


def test_gpu_stages_are_one_pool_bounded_by_the_node_gpus() -> None:
    cfg = TagConfig(photos="/p", lake="/l", num_gpus=1.0, max_actors=4)
    layout = plan_pipeline(cfg, ALL, _cluster(16, gpus=1), local=True)
    assert layout.fused and layout.model_units == ("models",) and layout.device == "cuda"
    models = layout.pools["models"]
    assert (models.min_size, models.max_size, models.num_gpus) == (1, 1, 1.0)
    assert list(layout.pools) == ["fetch", "decode", "models", "write"]
    assert layout.model_batch_size == 64  # independent of the fetch/decode batch (16)
    # a quarter GPU per actor: four actors on the one GPU, never more than max_actors
    quarter = plan_pipeline(TagConfig(photos="/p", lake="/l", num_gpus=0.25, max_actors=16), ALL,
                            _cluster(16, gpus=1), local=True)
    assert quarter.pools["models"].max_size == 4
    # a remote cluster's autoscaler may add GPU nodes: the configured bound stands there
    remote = plan_pipeline(TagConfig(photos="/p", lake="/l", num_gpus=0.25, max_actors=16), ALL,
                           _cluster(16, gpus=1), local=False)
    assert remote.pools["models"].max_size == 16


def test_a_gpu_request_the_local_node_cannot_hold_fails_at_start() -> None:
    with pytest.raises(ConfigError, match=r"needs 2 GPUs; this Ray cluster has 1.*--num-gpus-node"):
        plan_pipeline(TagConfig(photos="/p", lake="/l", num_gpus=1.0, min_actors=2, max_actors=2), ALL,
                      _cluster(8, gpus=1), local=True)
    with pytest.raises(ConfigError, match="has 0"):
        plan_pipeline(TagConfig(photos="/p", lake="/l", num_gpus=1.0), ["faces"], _cluster(8), local=True)
    waiting = plan_pipeline(TagConfig(photos="/p", lake="/l", num_gpus=1.0), ["faces"], _cluster(8), local=False)
    assert "autoscaler" in waiting.notes[0]
    with pytest.raises(ConfigError, match="--num-gpus-node"):
        TagConfig(photos="/p", lake="/l", num_gpus=1.0, num_gpus_node=0.5).validate()
    with pytest.raises(ConfigError, match="--model-batch-size"):
        TagConfig(photos="/p", lake="/l", model_batch_size=0).validate()
    with pytest.raises(ConfigError, match="--model-pools"):
        TagConfig(photos="/p", lake="/l", model_pools="many").validate()


@pytest.mark.parametrize("stages", [["faces"], ["detect"], ALL])
@pytest.mark.parametrize("pools", ["fused", "separate"])
@pytest.mark.parametrize("cpus", [1.0, 2.0, 4.0])
def test_every_pool_minimum_fits_a_small_cpu_cluster(stages: list[str], pools: str, cpus: float) -> None:
    cfg = TagConfig(photos="/p", lake="/l", model_pools=pools, min_actors=1, max_actors=2)
    memory = 3 * GIB
    layout = plan_pipeline(cfg, stages, _cluster(cpus, memory=memory), local=True, node_memory=memory)
    n_model = 1 if pools == "fused" else len(model_units(stages))
    assert len(layout.pools) == 3 + n_model
    # "faces" alone is three pools when separate: the deadlock of `--stages decode,faces` was counting one
    assert layout.model_units == (("models",) if pools == "fused" else tuple(model_units(stages)))
    # the read tasks keep a CPU; every pool's minimum is placeable in what is left
    assert _minimum(layout, "num_cpus") <= max(cpus - 1.0, 0.5) + 1e-6
    assert _minimum(layout, "memory") <= 0.8 * memory
    assert all(p.num_cpus > 0 and p.memory > 0 and p.min_size >= 1 for p in layout.pools.values())


def test_requests_stand_on_a_big_cluster() -> None:
    cfg = TagConfig(photos="/p", lake="/l", model_pools="separate")
    layout = plan_pipeline(cfg, ALL, _cluster(64, memory=256 * GIB), local=False)
    assert fit_cpus(cfg, 6, 64.0) == {"io": 0.25, "decode": 1.0, "model": 1.0}
    assert {k: p.num_cpus for k, p in layout.pools.items()} == {
        "fetch": 0.25, "decode": 1.0, "detect": 1.0, "scene": 1.0, "landmark": 1.0, "faces": 1.0, "embed": 1.0,
        "emotion": 1.0, "write": 0.25}
    assert layout.pools["faces"].memory == actor_memory("faces", resolve_model_batch_size(cfg))
    # the fused actor holds every model; a GPU actor adds a CUDA context's host memory
    fused = actor_memory("models:detect+scene+faces", 16)
    assert fused > actor_memory("faces", 16) > actor_memory("emotion", 16)
    assert actor_memory("models:faces", 64, on_gpu=True) > actor_memory("models:faces", 64)


def test_progress_lines_for_logs() -> None:
    class Sink:
        def __init__(self) -> None:
            self.lines: list[str] = []

        def write(self, text: str) -> None:
            self.lines += [x for x in text.splitlines() if x]

        def flush(self) -> None:
            pass

    sink = Sink()
    bar = _LogProgress(10, interval_s=0.0, stream=sink)
    bar.update(4)
    bar.update(6)
    bar.close()  # the last update already said 10/10: no repeat
    assert len(sink.lines) == 2 and sink.lines[0].startswith("photos 4/10 (40%)") and "left" in sink.lines[0]
    assert sink.lines[1].startswith("photos 10/10 (100%)") and "left" not in sink.lines[1]


# ---------------------------------------------------------------------------------------------- real runs

_DRIVER = r"""
import json, sys
import ray
from photolens.jobs.tag import TagConfig, run_tag
from ray._private import state

photos, store, out = sys.argv[1:4]
ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
common = dict(photos=photos, model_store=store, stages=("decode", "detect", "scene", "faces"), batch_size=2,
              min_actors=1, max_actors=2, cpu_actors=1, progress=False)
result = {}
for name, extra in (("gpu", dict(num_gpus=1.0, device="cpu")), ("cpu", dict(model_pools="separate"))):
    before = set(state.actors())
    report = run_tag(TagConfig(lake=f"{out}/{name}", run_id=name, **common, **extra))
    classes = [a["ActorClassName"] for k, a in state.actors().items() if k not in before]
    result[name] = {"report": json.loads(report.to_json()), "actors": classes}
with open(f"{out}/result.json", "w") as f:
    json.dump(result, f)
"""


def _photo_dir(tmp_path: Path) -> Path:
    missing = [str(p) for p in PHOTOS.values() if not p.is_file()]
    if missing:
        pytest.skip(f"real test photos missing: {missing} (see ../shared/data/README.md)")
    user = tmp_path / "photos" / "users" / "u1"
    user.mkdir(parents=True)
    for name, src in PHOTOS.items():
        shutil.copy(src, user / name)
    (user / "broken.jpg").write_bytes(PHOTOS["dog.jpg"].read_bytes()[:5000])
    return tmp_path / "photos"


def _env() -> dict[str, str]:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    return env


def _rows(lake: str, table: str, key: tuple[str, ...]) -> list[dict[str, Any]]:
    from photolens.lake.delta import Lake

    drop = {"run_id", "processed_at", "run_date"}
    rows = [{k: v for k, v in r.items() if k not in drop} for r in Lake(lake).read(table).to_pylist()]
    return sorted(rows, key=lambda r: tuple(str(r[k]) for k in key))


def _same(a: Any, b: Any, where: str) -> None:
    if isinstance(a, float) and isinstance(b, float):
        assert math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-5), where
    elif isinstance(a, list) and a and isinstance(a[0], float):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=where)
    elif isinstance(a, list) and a and isinstance(a[0], list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.mark.slow
def test_gpu_pipeline_on_one_logical_gpu_gives_the_cpu_rows(tmp_path: Path, model_store: str) -> None:
    photos = _photo_dir(tmp_path)
    out = tmp_path / "runs"
    out.mkdir()
    proc = subprocess.run([sys.executable, "-c", _DRIVER, str(photos), model_store, str(out)], env=_env(), check=False,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((out / "result.json").read_text())
    for name in ("gpu", "cpu"):
        report = result[name]["report"]
        assert report["status"] == "committed" and report["n_todo"] == 3
        assert report["status_counts"] == {"ok": 2, "error": 1}
        assert {s["stage"] for s in report["stages"]} >= {"decode", "detect", "scene", "faces", "embed", "emotion"}
    gpu_actors, cpu_actors = result["gpu"]["actors"], result["cpu"]["actors"]
    # one fused pool, bounded to the one declared GPU; the CPU run here used a pool per model UDF
    assert sum("RecognizeUDF" in c for c in gpu_actors) == 1
    assert not any(u in c for c in gpu_actors for u in ("DetectUDF", "FacesUDF", "EmbedUDF"))
    assert all(any(f"MapBatches({u})" in c for c in cpu_actors) for u in ("DetectUDF", "SceneUDF", "FacesUDF",
                                                                            "EmbedUDF", "EmotionUDF"))
    assert not any("RecognizeUDF" in c for c in cpu_actors)

    gpu_lake, cpu_lake = str(out / "gpu"), str(out / "cpu")
    for table, key in (("photos", ("photo_id",)), ("detections", ("photo_id", "det_index")),
                       ("faces", ("face_id",))):
        a, b = _rows(gpu_lake, table, key), _rows(cpu_lake, table, key)
        assert len(a) == len(b) > 0, table
        for i, (ra, rb) in enumerate(zip(a, b, strict=True)):
            assert set(ra) == set(rb)
            for col in ra:
                _same(ra[col], rb[col], f"{table}[{i}].{col}")
    faces = _rows(gpu_lake, "faces", ("face_id",))
    assert len(faces) == 2 and all(len(f["embedding"]) == 128 for f in faces)


@pytest.mark.slow
def test_cli_decode_faces_on_a_declared_gpu_finishes_quietly(tmp_path: Path, model_store: str) -> None:
    """`photolens tag --stages decode,faces --num-gpus 1` on a one-GPU node: the local Ray declares the node's
    GPU (here --num-gpus-node 1, the models on --device cpu), the run finishes, and stderr (not a terminal)
    carries a progress line but no Ray error or memory warning."""
    photos = _photo_dir(tmp_path)
    lake = tmp_path / "lake"
    cmd = [sys.executable, "-c", "from photolens.cli import main; raise SystemExit(main())", "tag",
           "--photos", str(photos), "--lake", str(lake), "--model-store", model_store, "--stages", "decode,faces",
           "--num-gpus", "1", "--num-gpus-node", "1", "--device", "cpu", "--batch-size", "2",
           "--model-batch-size", "4", "--max-actors", "1", "--cpu-actors", "1", "--run-id", "faces-only", "--json"]
    proc = subprocess.run(cmd, env=_env(), check=False, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["status"] == "committed" and report["status_counts"] == {"ok": 2, "error": 1}
    assert report["n_faces"] == 2 and report["n_detections"] == 0
    assert {s["stage"] for s in report["stages"]} == {"fetch", "decode", "faces", "embed", "emotion"}
    assert "photos 3/3 (100%)" in proc.stderr
    for noise in ("core_worker", "Progress bars disabled", "memory per worker", "memory=", "experimental", "Traceback"):
        assert noise not in proc.stderr, proc.stderr[-4000:]
    faces = _rows(str(lake), "faces", ("face_id",))
    assert len(faces) == 2 and all(f["passed_gate"] for f in faces)
    photos_rows = {Path(r["uri"]).name: r for r in _rows(str(lake), "photos", ("photo_id",))}
    assert photos_rows["couple.jpg"]["is_private"] is True and photos_rows["dog.jpg"]["n_faces"] == 0
    assert photos_rows["broken.jpg"]["error_code"] == "TRUNCATED"


def test_fused_cpu_actors_share_the_node_cores_as_torch_threads() -> None:
    one = plan_pipeline(TagConfig(photos="/p", lake="/l", max_actors=1), ALL, _cluster(2), local=True)
    two = plan_pipeline(TagConfig(photos="/p", lake="/l", max_actors=2), ALL, _cluster(2), local=True)
    # the fused actor's CPU request is shrunk below one CPU beside fetch, decode and write ...
    assert one.pools["models"].num_cpus < 1.0
    # ... but a single fused actor still runs torch on both cores; two split them
    assert (one.model_threads, two.model_threads) == (2, 1)
    separate = plan_pipeline(TagConfig(photos="/p", lake="/l", model_pools="separate"), ALL, _cluster(2), local=True)
    gpu = plan_pipeline(TagConfig(photos="/p", lake="/l", num_gpus=1.0), ALL, _cluster(16, gpus=1), local=True)
    remote = plan_pipeline(TagConfig(photos="/p", lake="/l", max_actors=1), ALL, _cluster(64), local=False)
    assert separate.model_threads is gpu.model_threads is remote.model_threads is None
