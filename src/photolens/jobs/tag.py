"""The nightly tagging job: photo store → Ray Data (fetch → decode → model stages → staged writes) → Delta.

Exactly-once: the run's commits carry the app-transaction ``photolens.tag/<run_id>``; a run that already
committed commits nothing again; a killed run started again rolls back what its earlier attempt committed to
child tables and finishes the work (see ``photolens.lake.delta`` for the protocol).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import pyarrow as pa

from photolens import __version__
from photolens.jobs.plan import Plan, plan_run
from photolens.lake.delta import Lake, Replacement, StagedFile
from photolens.lake.lease import DEFAULT_LEASE_SECONDS, MIN_LEASE_SECONDS, RunLease, lease_is_live
from photolens.lake.photostore import ManifestError
from photolens.lake.storage import Location, S3Settings, filesystem_for, join_uri, s3_settings
from photolens.schemas.errors import ErrorCode
from photolens.schemas.tables import SchemaMismatchError

APP_PREFIX = "photolens.tag/"
CHILD_TABLES = ("detections", "faces")
REPROCESS = ("none", "errors", "all")
# Failures that a later night may fix by itself; permanent ones (the same bytes fail the same way) wait for
# --reprocess errors.
TRANSIENT_ERRORS = (ErrorCode.FETCH_TRANSIENT, ErrorCode.FETCH_TIMEOUT, ErrorCode.MODEL_FAILED,
                    ErrorCode.DECODE_TIMEOUT)
MODEL_STAGES = ("detect", "scene", "landmark", "faces")
ALL_STAGES = ("decode", *MODEL_STAGES)


class ConfigError(ValueError):
    """The job's configuration cannot work; the message says what to fix."""


class ErrorBudgetExceededError(RuntimeError):
    """Too many photos failed in the model stages: the run commits nothing (a broken device, not bad photos)."""


@dataclass(frozen=True)
class TagConfig:
    photos: str | None = None
    lake: str = ""
    manifest: str | None = None
    manifest_format: str = "auto"
    restricted_lake: str | None = None
    run_id: str | None = None
    reprocess: str = "none"
    stages: tuple[str, ...] = ALL_STAGES
    model_store: str | None = None
    user_pattern: str = "users/{user_id}/"
    profile_pattern: str = "/profile/"
    privacy: str = "face_passed_gate"
    # resources: the job, not the UDFs, decides them
    num_gpus: float = 0.0
    accelerator_type: str | None = None
    min_actors: int = 1
    max_actors: int = 2
    cpu_actors: int = 2  # upper bound for the CPU pools (fetch, decode): size it to the CPU workers
    io_num_cpus: float = 0.25
    decode_num_cpus: float = 1.0
    model_num_cpus: float = 1.0
    batch_size: int = 16
    # Photos per call of the model stages (and per forward pass of the photo-level models), independent of
    # the fetch/decode batch; None: 64 on GPUs, batch_size on CPUs.
    model_batch_size: int | None = None
    # "auto"/"fused": all model stages in one actor pool (always so on GPUs); "separate": a pool per stage.
    model_pools: str = "auto"
    num_gpus_node: float | None = None  # GPUs a local Ray declares; None: torch.cuda.device_count()
    gpu_decode: bool = False  # decode JPEGs in the model actor on its device (photolens.udfs.gpudecode)
    decode_working_size: int = 1024
    max_bytes: int = 50 << 20
    decode_time_limit_s: float = 10.0
    fetch_attempts: int = 5
    fetch_base_delay_s: float = 0.2
    todo_shard_rows: int = 50_000
    # Output files: rows per staged file (photos per write batch), or derived from a target size in MiB.
    rows_per_file: int | None = None
    target_file_mib: float = 128.0
    device: str | None = None  # torch device for model stages; default cuda when num_gpus > 0
    # model choices (names in the model store) and GPU numerics
    detector: str = "ssd_mobilenet_v2_coco"
    detector_arch: str | None = None
    detect_score_threshold: float = 0.5
    scene_model: str = "mobilenet_v2_imagenet"
    embedder: str = "dlib_resnet34"
    arcface_arch: str = "iresnet50"
    landmark_references: str | None = None
    bf16: bool = False
    channels_last: bool = False
    progress: bool = True
    progress_interval_s: float = 30.0  # seconds between progress lines when stderr is not a terminal
    lease_seconds: float = DEFAULT_LEASE_SECONDS  # a driver silent this long has lost its run
    max_error_rate: float = 0.5  # MODEL_FAILED share of the photos reaching the model stages; above it, no commit
    fault: str | None = None  # test hook: "crash_after_batches=N" | "crash_before_commit=<table>" | ...
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> TagConfig:
        problems = []
        if not self.photos and not self.manifest:
            problems.append("give --photos (a folder or s3:// prefix to list) or --manifest (a list of keys)")
        if not self.lake:
            problems.append("give --lake (a folder or s3:// prefix for the Delta tables)")
        for name, uri in (("--photos", self.photos), ("--lake", self.lake), ("--manifest", self.manifest),
                          ("--restricted-lake", self.restricted_lake), ("--model-store", self.model_store)):
            if uri:
                try:
                    Location.parse(uri)
                except ValueError as exc:
                    problems.append(f"{name}: {exc}")
        if self.reprocess not in REPROCESS:
            problems.append(f"--reprocess must be one of {REPROCESS}, got {self.reprocess!r}")
        unknown = set(self.stages) - set(ALL_STAGES)
        if unknown:
            problems.append(f"unknown stage(s) {sorted(unknown)}; known: {', '.join(ALL_STAGES)}")
        if "decode" not in self.stages:
            problems.append("the decode stage is required (every model stage reads its pixels)")
        if self.manifest_format not in ("auto", "csv", "parquet", "s3-inventory"):
            problems.append(f"--manifest-format must be auto|csv|parquet|s3-inventory, got {self.manifest_format!r}")
        if "{user_id}" not in self.user_pattern:
            problems.append(f"user_pattern {self.user_pattern!r} must contain {{user_id}}")
        if self.num_gpus < 0 or self.min_actors < 1 or self.max_actors < self.min_actors or self.batch_size < 1:
            problems.append("need num_gpus >= 0, 1 <= min_actors <= max_actors, batch_size >= 1")
        if self.lease_seconds < MIN_LEASE_SECONDS:
            problems.append(f"--lease-seconds must be >= {MIN_LEASE_SECONDS:g}, got {self.lease_seconds:g}")
        if not 0.0 <= self.max_error_rate <= 1.0:
            problems.append(f"--max-error-rate must be between 0 and 1, got {self.max_error_rate:g}")
        if self.model_batch_size is not None and self.model_batch_size < 1:
            problems.append(f"--model-batch-size must be >= 1, got {self.model_batch_size}")
        if self.model_pools not in MODEL_POOLS:
            problems.append(f"--model-pools must be one of {MODEL_POOLS}, got {self.model_pools!r}")
        if self.num_gpus_node is not None and (self.num_gpus_node < 0 or self.num_gpus_node < self.num_gpus):
            problems.append(f"--num-gpus-node {self.num_gpus_node:g} must be >= 0 and hold one model actor's "
                            f"--num-gpus {self.num_gpus:g}")
        if self.progress_interval_s <= 0:
            problems.append(f"progress_interval_s must be positive, got {self.progress_interval_s}")
        if self.gpu_decode and not _decode_has_header_mode():
            problems.append("--gpu-decode needs the decode stage's header mode (DecodeConfig.pixels), which this "
                            "build lacks: leave --gpu-decode off")
        if self.privacy not in ("face_passed_gate", "any_face", "never"):
            problems.append(f"privacy must be face_passed_gate|any_face|never, got {self.privacy!r}")
        if self.run_id is not None and (not self.run_id or "/" in self.run_id or "'" in self.run_id):
            problems.append(f"--run-id {self.run_id!r}: use letters, digits, '-', '_' or '.'")
        if (self.rows_per_file is not None and self.rows_per_file < 1) or self.target_file_mib <= 0:
            problems.append("need --rows-per-file >= 1 and --target-file-mib > 0")
        if problems:
            raise ConfigError("bad configuration:\n  " + "\n  ".join(problems))
        return self

    @classmethod
    def from_mapping(cls, values: dict[str, Any]) -> TagConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ConfigError(f"unknown config key(s) {sorted(unknown)}; known: {sorted(known)}")
        if "stages" in values and isinstance(values["stages"], str):
            values = {**values, "stages": tuple(s.strip() for s in values["stages"].split(",") if s.strip())}
        return cls(**values)

    def public_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "extra"}


@dataclass
class RunReport:
    run_id: str
    lake: str
    restricted_lake: str
    status: str = "committed"
    attempt: int = 1
    n_manifest: int = 0
    n_todo: int = 0
    n_done_before: int = 0
    n_unowned: int = 0
    n_forgotten: int = 0
    n_duplicates: int = 0
    status_counts: dict[str, int] = field(default_factory=dict)
    error_counts: dict[str, int] = field(default_factory=dict)
    stages: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    n_detections: int = 0
    n_faces: int = 0
    table_versions: dict[str, int | None] = field(default_factory=dict)
    model_versions: dict[str, str] = field(default_factory=dict)
    tables: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def photos_per_s(self) -> float:
        return self.n_todo / self.seconds if self.seconds else 0.0

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "photos_per_s": self.photos_per_s}, sort_keys=True)

    def render(self) -> str:
        lines = [f"run {self.run_id}: {self.status} (attempt {self.attempt})",
                 f"  manifest {self.n_manifest} photos; done before {self.n_done_before}; processed {self.n_todo}"
                 f" in {self.seconds:.1f}s ({self.photos_per_s:.1f} photos/s)"]
        if self.n_unowned or self.n_forgotten or self.n_duplicates:
            lines.append(f"  left out: {self.n_unowned} without an owner, {self.n_forgotten} of forgotten users, "
                         f"{self.n_duplicates} duplicate manifest rows")
        if self.status_counts:
            lines.append("  by status: " + ", ".join(f"{k}={v}" for k, v in sorted(self.status_counts.items())))
        if self.error_counts:
            lines.append("  errors by code: " + ", ".join(f"{k}={v}" for k, v in sorted(self.error_counts.items())))
        if self.stages:
            lines.append(f"  {'stage':<10}{'rows':>8}{'seconds':>10}{'photos/s':>10}  (per worker)")
            for s in self.stages:
                lines.append(f"  {s['stage']:<10}{s['rows']:>8}{s['seconds']:>10.2f}{s['rows_per_s']:>10.1f}")
        lines.append(f"  detections {self.n_detections}, faces {self.n_faces}")
        if self.model_versions:
            lines.append("  models: " + ", ".join(f"{k}={v}" for k, v in sorted(self.model_versions.items())))
        for name, uri in self.tables.items():
            lines.append(f"  table {name:<11} {uri}  (version {self.table_versions.get(name)})")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def _ledger_uri(lake: Lake, run_id: str) -> str:
    return lake.meta_uri("runs", f"{run_id}.json")


def _staging_uri(lake: Lake, run_id: str, attempt: int) -> str:
    return lake.meta_uri("staging", run_id, f"attempt-{attempt}")


# ---------------------------------------------------------------------------------------------- planning
# Planning lives in photolens.jobs.plan (Plan and plan_run are imported above for callers of this module).


# ---------------------------------------------------------------------------------------------- recovery


def recover_incomplete_runs(lake: Lake, s3: S3Settings | None,
                            lease_seconds: float = DEFAULT_LEASE_SECONDS) -> list[str]:
    """Roll back the child-table commits of runs that never committed ``photos`` and whose driver is gone.

    Gone: its lease expired unrenewed, was released by a driver that failed, or its process is dead on this
    machine. A run whose lease is live is someone's work in progress and is left alone. Each run is taken
    over with a conditional write first, so two recovering drivers never roll back one run together. A
    ledger that cannot be read stops recovery (and the run) with a message: it is never taken as absent.
    """
    fs, root = filesystem_for(lake.meta_uri("runs"), s3)
    from pyarrow.fs import FileSelector

    try:
        infos = fs.get_file_info(FileSelector(root, allow_not_found=True))
    except FileNotFoundError:
        return []
    rolled = []
    for info in infos:
        if not info.base_name.endswith(".json") or info.base_name.startswith("."):
            continue
        ledger = lake.get_json(lake.meta_uri("runs", info.base_name))
        if not ledger or ledger.get("state") not in ("started", "failed") or lease_is_live(ledger):
            continue
        run_id = str(ledger.get("run_id") or info.base_name.removesuffix(".json"))
        lease = RunLease(lake, run_id, lease_seconds)
        taken = lease.acquire(lambda cur: {**(cur or {}), "recovering": True}, skip_live=True)
        if taken is None:
            continue  # another driver took it between our read and our write
        lease.start_heartbeat()  # a rollback of a big table may outlast one lease
        if taken.get("state") not in ("started", "failed"):
            lease.release(recovering=False)
            continue
        try:
            outcome = _roll_back_run(lake, run_id, lease)
        except BaseException as exc:
            # Leave the run to the next recovery (a rollback is idempotent), and say why this one stopped.
            lease.stop_heartbeat()
            with contextlib.suppress(Exception):
                lease.release(recovering=False, recovery_error=_one_line(exc))
            raise
        if outcome == "rolled_back":
            rolled.append(run_id)
    return rolled


def _roll_back_run(lake: Lake, run_id: str, lease: RunLease) -> str:
    """Undo an incomplete run's child commits (restoring rows its reprocessing replaced) while holding its
    lease; the ledger ends ``committed`` (its photos commit landed after all) or ``rolled_back``."""
    app_id = APP_PREFIX + run_id
    if lake.committed_version("photos", app_id) is not None:
        lease.release(state="committed", recovering=False)
        return "committed"
    undone = []
    if any(lake.needs_rollback(name, app_id) for name in CHILD_TABLES):
        # Under the commit lock: a rollback restores rows by what the photos table says, which must not
        # change under it.
        with _commit_lock(lake, f"rollback of {run_id}", lease.seconds):
            for name in CHILD_TABLES:
                lease.check()
                result = lake.rollback(name, app_id, run_id)
                if result is not None:
                    undone.append(result)
    lease.release(state="rolled_back", recovering=False, rolled_back=undone,
                  rolled_back_at=dt.datetime.now(dt.UTC).isoformat())
    return "rolled_back"


def _one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:500]


# ---------------------------------------------------------------------------------------------- pipeline


def _fault(cfg: TagConfig, key: str) -> str | None:
    spec = cfg.fault or os.environ.get("PHOTOLENS_FAULT")
    if not spec:
        return None
    for part in spec.split(","):
        k, _, v = part.partition("=")
        if k.strip() == key:
            return v.strip()
    return None


def _hold(cfg: TagConfig, table: str) -> None:
    """Test hook ``wait_before_commit=<table>:<path>``: a live driver paused before a commit until ``path``
    exists (its lease heartbeat keeps running), so a test can start another driver meanwhile."""
    spec = _fault(cfg, "wait_before_commit")
    if not spec or spec.partition(":")[0] != table:
        return
    path = Path(spec.partition(":")[2])
    print(f"[fault injection] holding before committing {table} until {path} exists", file=sys.stderr, flush=True)
    deadline = time.monotonic() + 900
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.1)


def _crash(reason: str) -> None:
    print(f"[fault injection] killing the driver: {reason}", file=sys.stderr, flush=True)
    os._exit(137)


# Measured actor memory: peak USS (MiB) of each operator's actors as Ray Data's issue detector reports it,
# on the 2-core development machine (Python 3.11, torch 2.14 CPU, Ray 2.60), all stages, batches of 16 photos
# (half 12 MP, half 0.5 MP JPEGs; working size 1024), 2026-12-04. Peaks grow over a run (allocator and
# oneDNN caches, more image shapes): fetch, decode and the fused actor are from a 96-photo run (``bench/
# bench_pipeline.py --photos 96``, where the detector named them: 235, 692 and 1798 MiB); the per-stage
# actors from ``--actor-memory --photos 16`` (every pool requests ~no memory, so the detector names each
# one's peak), scaled by the fused actor's growth between the two runs (1798 / 1488 = 1.21). A model actor is
# a torch worker (``model_base``: about the smallest model's actor, mini-Xception, 470 MiB at 16 photos,
# less its net) plus what its model and a batch's activations add; a fused actor holds every model but runs
# one stage's activations at a time, so it stays below the sum of the parts (1488 vs 2248 at 16 photos).
_GROWTH = 1798.0 / 1488.3
ACTOR_MEMORY_MIB: dict[str, float] = {
    "fetch": 234.7,
    "decode": 692.2,
    "write": 118.2,
    "model_base": 450.0 * _GROWTH,
    "detect": (913.5 - 450.0) * _GROWTH,
    "scene": (664.9 - 450.0) * _GROWTH,
    "landmark": (824.4 - 450.0) * _GROWTH,
    "faces": (1091.4 - 450.0) * _GROWTH,
    "embed": (534.2 - 450.0) * _GROWTH,
    "emotion": (469.5 - 450.0) * _GROWTH,
    "fused_all": 1798.0,
}
MEASURED_BATCH = 16
# Beyond the measured batch of 16 (estimates, not measured): a model batch's working images and CPU
# activations (1024 px RGB is 3 MiB; MTCNN's first pyramid level in float32 with its 10-channel conv output is
# about 15 MiB more), a fetch/decode batch's 12 MP JPEG bytes and decoded image.
MODEL_MIB_PER_PHOTO = 12.0
CPU_MIB_PER_PHOTO = 8.0
# A write batch is a whole output file of small rows (JSON, lists, a 128-d embedding per face) in numpy and
# Arrow form at once (estimate: 4 KiB a photo; the 118 MiB above held 16).
WRITE_MIB_PER_ROW = 4.0 / 1024
# A CUDA context and the GPU libraries' host pages (estimate: not measurable on the CPU-only machine).
CUDA_CONTEXT_MIB = 2048.0
# Requests are the estimate x 1.5: Ray Data's issue detector warns when a peak passes 1/1.25 of the request,
# and a batch of photos with more faces or bigger images than the measured one must stay below that.
_MEMORY_HEADROOM = 1.5
MODEL_POOLS = ("auto", "fused", "separate")


@dataclass(frozen=True)
class PoolSpec:
    """One actor pool of the pipeline: its size bounds and what each actor requests from Ray."""

    min_size: int
    max_size: int
    num_cpus: float
    num_gpus: float = 0.0
    memory: int = 0  # bytes

    def remote_args(self) -> dict[str, Any]:
        args: dict[str, Any] = {"num_cpus": self.num_cpus}
        if self.num_gpus:
            args["num_gpus"] = self.num_gpus
        if self.memory:
            args["memory"] = self.memory
        return args


@dataclass(frozen=True)
class PipelineLayout:
    """The pools ``build_dataset`` creates, in pipeline order, and how the model stages are grouped."""

    pools: dict[str, PoolSpec]
    fused: bool
    model_units: tuple[str, ...]  # "models" (fused), or one entry per model UDF
    model_batch_size: int
    device: str
    notes: tuple[str, ...] = ()
    # torch threads per fused CPU model actor; None: each actor's Ray CPUs, rounded up.
    model_threads: int | None = None


def model_units(model_stages: list[str]) -> list[str]:
    """The UDFs the model stages become when each runs its own pool ("faces" is three)."""
    units: list[str] = []
    for stage in model_stages:
        units += ["faces", "embed", "emotion"] if stage == "faces" else [stage]
    return units


def resolve_model_batch_size(cfg: TagConfig) -> int:
    if cfg.model_batch_size is not None:
        return cfg.model_batch_size
    # A GPU wants big forward passes; on CPUs a bigger batch only delays the first rows.
    return max(64, cfg.batch_size) if cfg.num_gpus > 0 else cfg.batch_size


def _mib(value: float) -> int:
    return int(value * (1 << 20))


def actor_memory(unit: str, batch_size: int, on_gpu: bool = False) -> int:
    """Memory request (bytes) of one actor of ``unit`` ("fetch", "decode", "write", "models:<stages>"
    for a fused pool, or a model UDF's name) for batches of ``batch_size`` photos."""
    m = ACTOR_MEMORY_MIB
    extra = max(batch_size - MEASURED_BATCH, 0)
    if unit == "write":
        mib = m[unit] + WRITE_MIB_PER_ROW * batch_size
    elif unit in ("fetch", "decode"):
        mib = m[unit] + CPU_MIB_PER_PHOTO * extra
    else:
        stages = unit.removeprefix("models:").split("+") if unit.startswith("models:") else [unit]
        mib = m["model_base"] + sum(m[s] for s in stages)
        if len(stages) > 1:
            mib = min(mib, m["fused_all"])
        mib += MODEL_MIB_PER_PHOTO * extra
        if on_gpu:
            mib += CUDA_CONTEXT_MIB
    return _mib(mib * _MEMORY_HEADROOM)


def plan_pipeline(cfg: TagConfig, model_stages: list[str], cluster: dict[str, float], *, local: bool,
                  node_memory: float | None = None) -> PipelineLayout:
    """Pool sizes and per-actor requests such that every pool's minimum is placeable.

    ``cluster`` is ``ray.cluster_resources()``; ``node_memory`` the largest node's ``memory`` resource
    (every pool's minimum must fit one node, as when a worker of a small cluster is lost).
    GPU model stages run as one fused pool (:class:`~photolens.udfs.recognize.RecognizeUDF`) of up to
    ``cluster GPUs / num_gpus`` actors on a local Ray. On CPUs ``model_pools`` decides ("auto": fused,
    measured faster on small machines by ``bench/bench_pipeline.py``).
    """
    on_gpu = cfg.num_gpus > 0
    device = cfg.device or ("cuda" if on_gpu else "cpu")
    batch = resolve_model_batch_size(cfg)
    fused = bool(model_stages) and (on_gpu or cfg.model_pools in ("auto", "fused"))
    units = (["models"] if fused else model_units(model_stages)) if model_stages else []
    notes: list[str] = []

    model_min, model_max = cfg.min_actors, cfg.max_actors
    if on_gpu and model_stages:
        gpus = float(cluster.get("GPU", 0.0))
        fit = int(gpus / cfg.num_gpus + 1e-9)
        if fit < cfg.min_actors:
            message = (f"--num-gpus {cfg.num_gpus:g} per model actor x --min-actors {cfg.min_actors} needs "
                       f"{cfg.num_gpus * cfg.min_actors:g} GPUs; this Ray cluster has {gpus:g}")
            if local:
                raise ConfigError(message + ": lower --num-gpus or --min-actors, or declare the node's GPUs "
                                            "with --num-gpus-node")
            notes.append(message + " now: the model pool waits for the autoscaler to add GPU nodes")
        elif local:
            # Actors beyond what the node's GPUs hold would never start.
            model_max = max(model_min, min(cfg.max_actors, fit))

    cpus = fit_cpus(cfg, len(units), float(cluster.get("CPU", 1.0)))
    pools: dict[str, PoolSpec] = {
        "fetch": PoolSpec(cfg.min_actors, max(cfg.max_actors, cfg.cpu_actors), cpus["io"],
                          memory=actor_memory("fetch", cfg.batch_size)),
        "decode": PoolSpec(cfg.min_actors, max(cfg.max_actors, cfg.cpu_actors), cpus["decode"],
                           memory=actor_memory("decode", cfg.batch_size)),
    }
    for unit in units:
        name = "models:" + "+".join(model_units(model_stages)) if unit == "models" else unit
        pools[unit] = PoolSpec(model_min, model_max, cpus["model"], cfg.num_gpus if on_gpu else 0.0,
                               memory=actor_memory(name, batch, on_gpu=device.startswith("cuda")))
    from photolens.udfs.write import write_batch_rows

    write_rows = write_batch_rows(cfg.rows_per_file, cfg.target_file_mib)
    pools["write"] = PoolSpec(1, cfg.max_actors, cpus["io"], memory=actor_memory("write", write_rows))
    pools = fit_memory(pools, node_memory if node_memory is not None else cluster.get("memory"))
    threads = None
    if fused and local and not device.startswith("cuda"):
        # fit_cpus shrinks the model request below one CPU on a small node (one thread under Ray), but
        # fetch and decode are short or waiting on I/O: the fused actors share the node's cores.
        threads = max(int(float(cluster.get("CPU", 1.0)) // max(model_max, 1)), 1)
    return PipelineLayout(pools, fused, tuple(units), batch, device, tuple(notes), threads)


def fit_memory(pools: dict[str, PoolSpec], memory: float | None) -> dict[str, PoolSpec]:
    """Memory requests shrunk proportionally when the pools' minimum sizes would not fit ``memory``
    (bytes; None or 0: Ray reported none, so nothing is requested and nothing can block)."""
    if not memory:
        return {k: replace(p, memory=0) for k, p in pools.items()}
    needed = sum(p.min_size * p.memory for p in pools.values())
    room = 0.8 * memory  # the read tasks and Ray's own workers need some too
    if needed <= room:
        return pools
    scale = room / needed
    return {k: replace(p, memory=int(p.memory * scale)) for k, p in pools.items()}


def _decode_has_header_mode() -> bool:
    import dataclasses

    from photolens.udfs.decode import DecodeConfig

    return "pixels" in {f.name for f in dataclasses.fields(DecodeConfig)}


class _DecodeWithoutPixels:
    """The decode stage of a run without model stages: nothing after it reads the pixels, so they stay
    in the decode actor instead of travelling to the writer."""

    def __init__(self, config: Any) -> None:
        from photolens.udfs.decode import DecodeUDF

        self.decode = DecodeUDF(config)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        out = self.decode(batch)
        out.pop("image", None)
        return out


def build_dataset(cfg: TagConfig, plan: Plan, run_id: str, run_date: str, lake: Lake) -> Any:
    import ray
    import ray.data
    from ray.data import ActorPoolStrategy

    from photolens.udfs.decode import DecodeConfig, DecodeUDF
    from photolens.udfs.fetch import FetchConfig, FetchUDF, read_shards
    from photolens.udfs.write import WriteConfig, WriteUDF, write_batch_rows

    model_stages = [s for s in MODEL_STAGES if s in cfg.stages]
    node_memory = max((n.get("Resources", {}).get("memory", 0.0) for n in ray.nodes() if n.get("Alive")),
                      default=None)
    layout = plan_pipeline(cfg, model_stages, ray.cluster_resources(), local=not os.environ.get("RAY_ADDRESS"),
                           node_memory=node_memory)
    for note in layout.notes:
        print(f"photolens tag: {note}", file=sys.stderr, flush=True)

    def compute(name: str) -> dict[str, Any]:
        p = layout.pools[name]
        return {"compute": ActorPoolStrategy(min_size=p.min_size, max_size=p.max_size), **p.remote_args()}

    # One read task per planned shard (read_parquet's file listing stalls beside several actor pools on
    # small clusters, and the shard list is already known).
    ds = ray.data.from_items([{"shard": u} for u in plan.shards], override_num_blocks=max(len(plan.shards), 1))
    ds = ds.map_batches(read_shards, batch_size=1, num_cpus=0.25)
    # Workers resolve S3 credentials themselves (standard chain): frozen driver credentials would expire
    # during a long night on instance-profile or web-identity tokens.
    s3_for_workers = None
    fetch_cfg = FetchConfig(s3=s3_for_workers, max_bytes=cfg.max_bytes, max_attempts=cfg.fetch_attempts,
                            base_delay_s=cfg.fetch_base_delay_s)
    ds = ds.map_batches(FetchUDF, fn_constructor_kwargs={"config": fetch_cfg}, batch_size=cfg.batch_size,
                        zero_copy_batch=True, **compute("fetch"))
    decode_kwargs: dict[str, Any] = {}
    if cfg.gpu_decode and model_stages:
        decode_kwargs["pixels"] = False  # header mode: validate here, the model actor decodes on its device
    decode_cfg = DecodeConfig(working_size=cfg.decode_working_size, max_bytes=cfg.max_bytes,
                              time_limit_s=cfg.decode_time_limit_s, **decode_kwargs)
    decode_udf: Any = DecodeUDF if model_stages else _DecodeWithoutPixels
    ds = ds.map_batches(decode_udf, fn_constructor_kwargs={"config": decode_cfg}, batch_size=cfg.batch_size,
                        **compute("decode"))
    emotion_labels: tuple[str, ...] = ()
    if model_stages:
        from photolens.schemas.emotions import EMOTIONS
        from photolens.udfs.recognize import RecognizeConfig, RecognizeUDF, stage_udfs

        extra: dict[str, Any] = {"accelerator_type": cfg.accelerator_type} if cfg.accelerator_type else {}
        if layout.fused:
            rec_cfg = RecognizeConfig(stages=tuple(model_stages), model_store=cfg.model_store, device=layout.device,
                                      s3=s3_for_workers, options=recognize_options(cfg),
                                      batch_size=layout.model_batch_size, gpu_decode=cfg.gpu_decode,
                                      working_size=cfg.decode_working_size,
                                      decode_time_limit_s=cfg.decode_time_limit_s,
                                      num_threads=layout.model_threads)
            ds = ds.map_batches(RecognizeUDF, fn_constructor_kwargs={"config": rec_cfg},
                                batch_size=layout.model_batch_size, **compute("models"), **extra)
        else:
            udfs = stage_udfs(model_stages, cfg.model_store, layout.device, s3_for_workers, recognize_options(cfg),
                              batch_size=layout.model_batch_size)
            for unit, (udf_cls, udf_cfg) in zip(layout.model_units, udfs, strict=True):
                ds = ds.map_batches(udf_cls, fn_constructor_kwargs={"config": udf_cfg},
                                    batch_size=layout.model_batch_size, **compute(unit), **extra)
        emotion_labels = tuple(EMOTIONS)
    write_cfg = WriteConfig(lake.root, lake.restricted_root, run_id, run_date, s3_for_workers, cfg.privacy,
                            emotion_labels)
    # One write batch is one file per table: rows arrive here without pixels, so batches of a file's rows fit.
    return ds.map_batches(WriteUDF, fn_constructor_kwargs={"config": write_cfg},
                          batch_size=write_batch_rows(cfg.rows_per_file, cfg.target_file_mib), **compute("write"))


def fit_cpus(cfg: TagConfig, n_model_pools: int, cluster_cpus: float) -> dict[str, float]:
    """CPU requests per actor, shrunk when the pools' minimum sizes would not fit the cluster.

    Every pool must place ``min_actors`` actors and the Parquet read tasks need a CPU, or the pipeline
    waits forever. ``n_model_pools`` counts model UDF pools (one when fused; "faces" alone is three when
    not). On a laptop-sized cluster the requests shrink proportionally (torch still uses the cores it
    finds); on a real cluster the configured requests stand.
    """
    want = {"io": cfg.io_num_cpus, "decode": cfg.decode_num_cpus, "model": cfg.model_num_cpus}
    needed = cfg.min_actors * (2 * want["io"] + want["decode"] + n_model_pools * want["model"])
    room = max(cluster_cpus - 1.0, 0.5)
    if needed <= room:
        return want
    scale = room / needed
    # Rounded down: a request rounded up could leave the last pool one thousandth of a CPU short.
    return {k: max(int(v * scale * 1000) / 1000, 0.001) for k, v in want.items()}


def local_gpu_count() -> int:
    """CUDA devices torch sees on this machine (0 without CUDA)."""
    try:
        import torch
    except ImportError:
        return 0
    return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0


def ensure_ray(num_gpus: float = 0.0, num_gpus_node: float | None = None) -> None:
    """Connect to ``RAY_ADDRESS`` or start a local Ray that declares this machine's GPUs.

    A local Ray declares ``num_gpus_node`` GPUs when given, else torch's device count when the model
    actors ask for GPUs (a cluster's nodes declare their own: the driver is not probed then).
    """
    import ray

    if not ray.is_initialized():
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        address = os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=False, logging_level="warning")
        else:
            gpus = num_gpus_node if num_gpus_node is not None else (local_gpu_count() if num_gpus > 0 else None)
            if num_gpus > 0 and (gpus or 0) < num_gpus:
                raise ConfigError(
                    f"--num-gpus {num_gpus:g} per model actor, but this machine has {gpus or 0} CUDA device(s) "
                    "(torch.cuda.device_count()): run with --num-gpus 0 (CPU), or declare the node's GPUs "
                    "with --num-gpus-node N")
            ray.init(include_dashboard=False, log_to_driver=False, num_gpus=gpus, logging_level="warning")
    # Our own progress counts photos end to end; Ray Data's per-operator bars (or, off a terminal, its
    # progress log lines every few seconds) would bury the run report.
    import logging

    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # ... and then says, once per run, that it disabled them.
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    # A GPU model actor asks for CPUs too (its MTCNN crops, alignment and JSON run there), which Ray Data
    # calls experimental for map *tasks* on every run; actors schedule both resources as any Ray actor does.
    map_log = logging.getLogger("ray.data._internal.execution.operators.map_operator")
    if _not_mixed_resources_warning not in map_log.filters:
        map_log.addFilter(_not_mixed_resources_warning)
    _consume_constructor_ref_warning()


def _not_mixed_resources_warning(record: Any) -> bool:
    return not str(record.msg).startswith("Specifying both num_cpus and num_gpus")


_CONSTRUCTOR_REF_WARNING_CONSUMED = False


def _consume_constructor_ref_warning() -> None:
    """Ray Data hands every pipeline actor its context and transform as object refs, so the driver's core
    worker logs, once per process, an ERROR that restarting such an actor fails if those objects are lost
    (ray-project/ray#53727). The streaming executor holds both refs until the dataset finishes, so the
    restarts that carry a run over a lost worker are safe and the line is noise in every run's log. It is
    spent here on a throwaway actor while the driver's stderr is muted for that one call."""
    global _CONSTRUCTOR_REF_WARNING_CONSUMED
    if _CONSTRUCTOR_REF_WARNING_CONSUMED:
        return
    import ray

    @ray.remote(num_cpus=0, max_restarts=1)
    class _Throwaway:
        def __init__(self, _arg: Any) -> None:
            pass

    arg = ray.put(None)
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        actor = _Throwaway.remote(arg)
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
    ray.kill(actor)
    _CONSTRUCTOR_REF_WARNING_CONSUMED = True


def run_tag(cfg: TagConfig, s3: S3Settings | None = None) -> RunReport:
    cfg.validate()
    started_at = dt.datetime.now(dt.UTC)
    needs_s3 = any(Location.parse(u).is_s3 for u in (cfg.photos or "", cfg.manifest or "", cfg.lake,
                                                      cfg.restricted_lake or "", cfg.model_store or ""))
    s3 = s3 or (s3_settings() if needs_s3 else None)
    lake = Lake(cfg.lake, cfg.restricted_lake, s3)
    run_id = cfg.run_id or f"{started_at:%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
    app_id = APP_PREFIX + run_id
    report = RunReport(run_id, lake.root, lake.restricted_root)
    report.tables = {n: lake.table_uri(n) for n in ("photos", "detections", "faces", "runs")}

    # Preflight: everything that can fail does so here, before a byte is written.
    for name in ("photos", "detections", "faces", "runs", "tombstones"):
        lake.check_schema(name)
    cfg = _landmark_preflight(cfg, s3, report)
    model_versions = preflight_models(cfg, s3)
    report.model_versions = model_versions

    if lake.committed_version("photos", app_id) is not None:
        return _already_committed(lake, cfg, report, started_at, app_id)

    recover_incomplete_runs(lake, s3, cfg.lease_seconds)
    # The run's lease: a second driver of a live run id stops here, before it reads or writes anything of it.
    lease = RunLease(lake, run_id, cfg.lease_seconds)

    def fresh_attempt(current: dict[str, Any] | None) -> dict[str, Any]:
        return {"run_id": run_id, "attempt": int((current or {}).get("attempt", 0)) + 1, "state": "started",
                "started_at": started_at.isoformat(), "config": cfg.public_dict(),
                "previous_state": (current or {}).get("state")}

    ledger = lease.acquire(fresh_attempt)
    attempt = int(ledger["attempt"])
    report.attempt = attempt
    lease.start_heartbeat()
    try:
        if lake.committed_version("photos", app_id) is not None:  # a twin finished just before we took over
            lease.release(state="committed")
            return _already_committed(lake, cfg, report, started_at, app_id)
        return _run_leased(cfg, s3, lake, lease, report, started_at)
    except BaseException as exc:
        lease.stop_heartbeat()
        if lease.doc is not None and not (lease.doc.get("lease") or {}).get("released") and not lease.lost:
            with contextlib.suppress(Exception):  # the original error matters more than a failed ledger write
                lease.release(state="failed", error=_one_line(exc),
                              failed_at=dt.datetime.now(dt.UTC).isoformat())
        raise


def _already_committed(lake: Lake, cfg: TagConfig, report: RunReport, started_at: dt.datetime,
                       app_id: str) -> RunReport:
    prior = lake.commit_metadata("photos", app_id) or {}
    report.status = "already committed"
    if "photolens.report" in prior:
        old = json.loads(prior["photolens.report"])
        report.attempt, report.n_manifest, report.n_todo = old["attempt"], old["n_manifest"], old["n_todo"]
        report.status_counts, report.error_counts = old["status_counts"], old["error_counts"]
        _write_runs_row(lake, cfg, report, started_at, prior_report=old)
    report.table_versions = {n: lake.version(n) for n in report.tables}
    return report


def _run_leased(cfg: TagConfig, s3: S3Settings | None, lake: Lake, lease: RunLease, report: RunReport,
                started_at: dt.datetime) -> RunReport:
    """The run, from planning to the committed ledger, while this driver holds the run's lease."""
    run_id, attempt = report.run_id, report.attempt
    app_id = APP_PREFIX + run_id
    # An earlier attempt of this run that died between its commits: undo it before doing the work again.
    if any(lake.needs_rollback(name, app_id) for name in CHILD_TABLES):
        with _commit_lock(lake, f"rollback of {run_id}", cfg.lease_seconds):
            for name in CHILD_TABLES:
                undone = lake.rollback(name, app_id, run_id)
                if undone is not None:
                    report.notes.append(f"rolled back attempt {undone['attempt']} of this run from {name} "
                                        f"({undone['how']})")
    photos_version_at_plan = lake.version("photos")
    try:
        plan = plan_run(cfg, lake, run_id, attempt, s3)
    except ManifestError:
        if attempt == 1:
            # Nothing of the run exists yet: leave no ledger behind for a manifest that must be fixed first.
            lease.discard()
        raise
    for k in ("n_manifest", "n_todo", "n_done_before", "n_unowned", "n_forgotten", "n_duplicates"):
        setattr(report, k, getattr(plan, k))
    run_date = started_at.strftime("%Y-%m-%d")

    files: dict[str, list[StagedFile]] = {"photos": [], "detections": [], "faces": []}
    statuses: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    stage_seconds: Counter[str] = Counter()
    stage_rows: Counter[str] = Counter()
    t_pipe = time.perf_counter()
    if plan.n_todo:
        ensure_ray(cfg.num_gpus, cfg.num_gpus_node)
        ds = build_dataset(cfg, plan, run_id, run_date, lake)
        crash_after = _fault(cfg, "crash_after_batches")
        bar = _progress(plan.n_todo, cfg.progress, cfg.progress_interval_s)
        for n_batches, row in enumerate(ds.iter_rows(), start=1):
            for f in json.loads(row["files"]):
                sf = StagedFile.from_dict(f)
                files[sf.table].append(sf)
            statuses.update(json.loads(row["status_counts"]))
            errors.update(json.loads(row["error_counts"]))
            stage_seconds.update(json.loads(row["stage_seconds"]))
            stage_rows.update(json.loads(row["stage_rows"]))
            report.n_detections += int(row["n_detections"])
            report.n_faces += int(row["n_faces"])
            if bar is not None:
                bar.update(int(row["n_rows"]))
            if crash_after is not None and n_batches >= int(crash_after):
                _crash(f"after {n_batches} batches")
        if bar is not None:
            bar.close()
    report.seconds = time.perf_counter() - t_pipe
    report.status_counts, report.error_counts = dict(statuses), dict(errors)
    report.stages = [
        {"stage": s, "rows": int(stage_rows[s]), "seconds": stage_seconds[s],
         "rows_per_s": stage_rows[s] / stage_seconds[s] if stage_seconds[s] else 0.0}
        for s in ("fetch", "decode", *MODEL_STAGES, "embed", "emotion") if s in stage_seconds
    ]
    n_rows = sum(f.num_rows for f in files["photos"])
    if n_rows != plan.n_todo:
        raise RuntimeError(f"pipeline returned {n_rows} photo rows for {plan.n_todo} planned: refusing to commit")

    _check_error_budget(cfg, run_id, statuses, errors)

    # Commit: children first, photos last (the run's completion), then the runs row. The lease is checked
    # right before each commit: a driver that lost its run to another must not add rows beside that one's.
    # The lake's commit lock keeps the commits of two runs from interleaving, and inside it, photos that
    # another run committed since this one planned are replaced (rows and child rows), never doubled.
    custom = {"photolens.run_id": run_id}
    with _commit_lock(lake, run_id, cfg.lease_seconds):
        late = _committed_since(lake, photos_version_at_plan, files["photos"], run_id, attempt)
        if late is not None:
            report.notes.append(f"{late.n} photos were committed by another run after this one planned: "
                                "this run's rows replace theirs")
        for name in CHILD_TABLES:
            if _fault(cfg, "crash_before_commit") == name:
                _crash(f"before committing {name}")
            _hold(cfg, name)
            lease.check()
            lake.commit_staged(name, files[name], app_id, attempt, custom,
                               replace=_widened(plan.replacement(name, run_id), late))
        if _fault(cfg, "crash_before_commit") == "photos":
            _crash("before committing photos")
        _hold(cfg, "photos")
        report.seconds = time.perf_counter() - t_pipe
        lease.check()
        landed = lake.commit_staged("photos", files["photos"], app_id, attempt,
                                    {**custom, "photolens.report": report.to_json()},
                                    replace=_widened(plan.replacement("photos", run_id), late))
    if landed is None:
        # A twin driver of this run id completed first; our staged files stay uncommitted (VACUUM removes them).
        report.status = "already committed"
    report.table_versions = {n: lake.version(n) for n in report.tables}
    _write_runs_row(lake, cfg, report, started_at)
    report.table_versions["runs"] = lake.version("runs")
    lease.release(state="committed", finished_at=dt.datetime.now(dt.UTC).isoformat())
    _cleanup_staging(lake, run_id, s3)
    return report


@contextlib.contextmanager
def _commit_lock(lake: Lake, run_id: str, lease_seconds: float) -> Iterator[None]:
    """The lake-wide lock of the commit phase: a lease like a run's, at ``_photolens/locks/commit.json``."""
    lock = RunLease(lake, "commit-lock", lease_seconds, uri=lake.meta_uri("locks", "commit.json"))

    def waiting(doc: dict[str, Any]) -> None:
        print(f"[{run_id}] waiting for the lake's commit lock, held by run {doc.get('run_id')}",
              file=sys.stderr, flush=True)

    lock.acquire_waiting(lambda _: {"run_id": run_id, "state": "locked"}, on_wait=waiting)
    lock.start_heartbeat()
    try:
        yield
    finally:
        lock.stop_heartbeat()
        with contextlib.suppress(Exception):  # an expired lock frees itself; the commit's outcome matters more
            lock.release(state="free")


def _committed_since(lake: Lake, version: int | None, staged: list[StagedFile], run_id: str,
                     attempt: int) -> Replacement | None:
    """Photo ids of this run that another run committed to ``photos`` after ``version`` (this run's plan),
    as a replacement over all three tables; None when there are none. Reads only the files added since."""
    table = lake.open("photos")
    if table is None or table.version() == version:
        return None
    added = set(pa.table(table.get_add_actions(flatten=True)).column("path").to_pylist())
    if version is not None:
        from deltalake import DeltaTable

        before = DeltaTable(lake.table_uri("photos"), version=version, storage_options=lake.storage_options())
        added -= set(pa.table(before.get_add_actions(flatten=True)).column("path").to_pylist())
    if not added:
        return None
    import pyarrow.parquet as pq

    fs, root = filesystem_for(lake.table_uri("photos"), lake.s3)

    def ids(path: str) -> set[str]:
        with fs.open_input_file(f"{root}/{path}") as f:
            return set(pq.read_table(f, columns=["photo_id"]).column("photo_id").to_pylist())

    theirs: set[str] = set()
    for path in added:
        theirs |= ids(path)
    ours: set[str] = set()
    for sf in staged:
        ours |= ids(sf.path)
    late = sorted(ours & theirs)
    if not late:
        return None
    shard = join_uri(_staging_uri(lake, run_id, attempt), "late.parquet")
    sfs, shard_path = filesystem_for(shard, lake.s3)
    if not Location.parse(shard).is_s3:
        sfs.create_dir(shard_path.rsplit("/", 1)[0], recursive=True)
    pq.write_table(pa.table({"photo_id": pa.array(late, pa.string())}), shard_path, filesystem=sfs)
    return Replacement("photo_id", (shard,), len(late), (), run_id)


def _widened(planned: Replacement | None, late: Replacement | None) -> Replacement | None:
    """The planned replacement plus the late ids; the late ones hold ok rows, so no ``where`` narrows it."""
    if late is None:
        return planned
    if planned is None:
        return late
    return Replacement(planned.column, planned.shards + late.shards, planned.n + late.n, (), planned.run_id)


def _check_error_budget(cfg: TagConfig, run_id: str, statuses: Counter[str], errors: Counter[str]) -> None:
    """Refuse to commit when the model stages failed on more than ``max_error_rate`` of the photos they got.

    The share counts photos that reached the model stages (decoded fine): photos lost earlier (fetch,
    decode) say nothing about the models, and would hide a dead device behind a bad night of storage.
    """
    if not any(s in cfg.stages for s in MODEL_STAGES):
        return
    failed = int(errors.get(ErrorCode.MODEL_FAILED.value, 0))
    reached = int(statuses.get("ok", 0)) + failed
    if reached and failed / reached > cfg.max_error_rate:
        raise ErrorBudgetExceededError(
            f"run {run_id}: {failed} of {reached} photos failed in a model stage (MODEL_FAILED, "
            f"{failed / reached:.0%}), above --max-error-rate {cfg.max_error_rate:g}: nothing committed; "
            "check the model device (a broken CUDA context fails every photo), then run again")


class _LogProgress:
    """Progress for logs (a RayJob's driver log, a CronJob pod): one line every ``interval_s`` seconds
    instead of a bar that a file would record as one ever-growing line."""

    def __init__(self, total: int, interval_s: float, stream: Any = None) -> None:
        self.total, self.interval_s = total, interval_s
        self.stream = stream if stream is not None else sys.stderr
        self.done = self.last_done = 0
        self.started = self.last = time.monotonic()

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.interval_s:
            self.last = now
            self._line(now)

    def close(self) -> None:
        if self.last_done != self.done:
            self._line(time.monotonic())

    def _line(self, now: float) -> None:
        elapsed = max(now - self.started, 1e-9)
        rate = self.done / elapsed
        left = f", {_duration((self.total - self.done) / rate)} left" if rate > 0 and self.done < self.total else ""
        pct = 100.0 * self.done / self.total if self.total else 100.0
        self.last_done = self.done
        print(f"photos {self.done}/{self.total} ({pct:.0f}%) in {_duration(elapsed)}, {rate:.2f} photos/s{left}",
              file=self.stream, flush=True)


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _progress(total: int, enabled: bool, interval_s: float = 30.0, stream: Any = None) -> Any:
    """tqdm's bar on a terminal, a line every ``interval_s`` seconds otherwise; None when disabled."""
    if not enabled:
        return None
    stream = stream if stream is not None else sys.stderr
    isatty = getattr(stream, "isatty", None)
    if isatty is not None and isatty():
        from tqdm import tqdm

        return tqdm(total=total, unit="photo", desc="photos", file=stream, mininterval=2.0)
    return _LogProgress(total, interval_s, stream)


def _cleanup_staging(lake: Lake, run_id: str, s3: S3Settings | None) -> None:
    fs, path = filesystem_for(lake.meta_uri("staging", run_id), s3)
    with contextlib.suppress(FileNotFoundError, OSError):
        fs.delete_dir(path)


def _write_runs_row(lake: Lake, cfg: TagConfig, report: RunReport, started_at: dt.datetime,
                    prior_report: dict[str, Any] | None = None) -> None:
    src = prior_report or json.loads(report.to_json())
    row = {
        "run_id": report.run_id,
        "job": "tag",
        "run_date": started_at.strftime("%Y-%m-%d"),
        "started_at": started_at,
        "finished_at": dt.datetime.now(dt.UTC),
        "config": json.dumps(cfg.public_dict(), sort_keys=True, default=str),
        "git_sha": git_sha(),
        "photolens_version": __version__,
        "model_versions": json.dumps(src.get("model_versions", {}), sort_keys=True),
        "n_manifest": src["n_manifest"],
        "n_todo": src["n_todo"],
        "n_ok": src["status_counts"].get("ok", 0),
        "n_error": src["status_counts"].get("error", 0),
        "n_skipped": src["status_counts"].get("skipped", 0),
        "error_counts": json.dumps(src["error_counts"], sort_keys=True),
        "stages": json.dumps(src["stages"]),
        "seconds": src["seconds"],
        "photos_per_s": src["photos_per_s"],
        "table_versions": json.dumps(src.get("table_versions", {}), sort_keys=True),
    }
    lake.append("runs", pa.Table.from_pylist([row]), app_id=APP_PREFIX + report.run_id, txn_version=1)


def _landmark_preflight(cfg: TagConfig, s3: S3Settings | None, report: RunReport) -> TagConfig:
    """The landmark stage needs references; without any it would only spend time, so it is left out."""
    if "landmark" not in cfg.stages:
        return cfg
    from photolens.lake.storage import exists
    from photolens.udfs.recognize import default_references_uri

    uri = cfg.landmark_references or default_references_uri(cfg.model_store)
    base = uri.removesuffix(".npz").removesuffix(".json")
    if exists(base + ".json", s3) and exists(base + ".npz", s3):
        return cfg
    if cfg.landmark_references:
        raise ConfigError(f"--landmark-references {uri}: {base}.npz/.json not found; "
                          "build them with `photolens landmarks build --gallery DIR --out URI`")
    report.notes.append(f"landmark stage skipped: no references at {base}.npz "
                        "(build them with `photolens landmarks build --gallery DIR`)")
    return replace(cfg, stages=tuple(st for st in cfg.stages if st != "landmark"))


def recognize_options(cfg: TagConfig) -> Any:
    from photolens.udfs.recognize import RecognizeOptions

    return RecognizeOptions(
        detector=cfg.detector, detector_arch=cfg.detector_arch, detect_score_threshold=cfg.detect_score_threshold,
        scene_model=cfg.scene_model, landmark_references=cfg.landmark_references, embedder=cfg.embedder,
        arcface_arch=cfg.arcface_arch, bf16=cfg.bf16, channels_last=cfg.channels_last,
    )


def preflight_models(cfg: TagConfig, s3: S3Settings | None) -> dict[str, str]:
    model_stages = [s for s in MODEL_STAGES if s in cfg.stages]
    if not model_stages:
        return {}
    from photolens.models.store import ModelStore, default_store_uri
    from photolens.udfs.recognize import required_models

    store = ModelStore(cfg.model_store or default_store_uri(), s3)
    entries = store.require(required_models(model_stages, recognize_options(cfg)))
    return {e.role: e.tag for e in entries.values()}


def config_from_args(args: Any) -> TagConfig:
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        import yaml

        with open(args.config) as f:
            values.update(yaml.safe_load(f) or {})
    for f in fields(TagConfig):
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = v
    try:
        return TagConfig.from_mapping(values).validate()
    except TypeError as exc:
        raise ConfigError(f"bad configuration: {exc}") from exc


__all__ = ["ConfigError", "ManifestError", "RunReport", "SchemaMismatchError", "TagConfig", "run_tag"]
