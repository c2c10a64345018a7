"""Write stage: per-photo rows (with their model outputs) become Parquet files staged in the Delta tables.

Nothing written here is visible to readers: the driver commits the staged files once per run. Each call
returns one small descriptor row (files written, counts, seconds per stage), which is all the driver keeps.

File sizes: the job gives this stage batches of :func:`write_batch_rows` photos (its rows carry no pixels by
then, so a batch is small), and each batch becomes one file per table (two for ``photos`` when it holds both
ok and other rows: error rows live apart, so a reprocessing commit rewrites only the small error files). Ray
Data hands the last, shorter batch to the stage like any other, so no buffered rows wait for an end of stream
that ``map_batches`` would never announce. An input bundle that overshoots the batch size leaves a shorter batch
(and file) behind, so a run stages at most about twice ``photos / rows_per_file`` files per table.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from photolens.lake.delta import Lake
from photolens.lake.storage import S3Settings
from photolens.schemas.errors import Status

PRIVACY_POLICIES = ("face_passed_gate", "any_face", "never")


@dataclass(frozen=True)
class WriteConfig:
    lake_root: str
    restricted_root: str | None
    run_id: str
    run_date: str
    s3: S3Settings | None = None
    # Seed 000: "a photo with a face in it is private". Which faces count is policy.
    privacy: str = "face_passed_gate"
    emotion_labels: tuple[str, ...] = ()


def face_id(photo_id: str, index: int) -> str:
    return hashlib.blake2b(f"{photo_id}:{index}".encode(), digest_size=16).hexdigest()


def _col(batch: dict[str, np.ndarray], name: str, n: int) -> np.ndarray:
    if name in batch:
        return batch[name]
    return np.array([None] * n, dtype=object)


def _opt(v: object) -> object:
    if v is None:
        return None
    if isinstance(v, float | np.floating) and np.isnan(v):
        return None
    return v.item() if isinstance(v, np.generic) else v


def build_rows(batch: dict[str, np.ndarray], cfg: WriteConfig) -> tuple[pa.Table, pa.Table, pa.Table]:
    """The photos, detections and faces rows of one batch."""
    n = len(batch["photo_id"])
    now = dt.datetime.now(dt.UTC)
    status = [str(s) for s in batch["status"]]
    get = {name: _col(batch, name, n) for name in (
        "detections_json", "faces_json", "face_embeddings", "face_emotions", "scene_labels", "scene_scores",
        "scene_coarse", "scene_coarse_score", "landmark_id", "landmark_score", "format", "width", "height",
        "orientation", "n_frames", "taken_at", "gps_lat", "gps_lon", "phash", "etag", "size_bytes", "mtime",
        "is_profile", "error_code", "error_stage", "error_detail")}
    model_cols = sorted(c for c in batch if c.startswith("model_"))
    happy = cfg.emotion_labels.index("happy") if "happy" in cfg.emotion_labels else None

    photos: dict[str, list] = {k: [] for k in (
        "photo_id", "user_id", "uri", "etag", "size_bytes", "mtime", "is_profile", "status", "error_code",
        "error_stage", "error_detail", "format", "width", "height", "orientation", "n_frames", "taken_at", "gps_lat",
        "gps_lon", "phash",
        "n_detections", "scene_labels", "scene_scores", "scene_coarse", "scene_coarse_score", "landmark_id",
        "landmark_score", "n_faces", "n_faces_passed", "is_private", "model_versions")}
    dets: dict[str, list] = {k: [] for k in ("photo_id", "user_id", "det_index", "category", "category_path", "score",
                                             "box", "model")}
    faces: dict[str, list] = {k: [] for k in (
        "face_id", "photo_id", "user_id", "is_profile", "face_index", "box", "points", "det_score", "roll", "yaw",
        "pitch", "sharpness", "size_px", "quality", "passed_gate", "gate_reason", "embedding", "embedding_model",
        "emotion_probs", "emotion", "smile", "emotion_model")}

    for i in range(n):
        pid, uid = str(batch["photo_id"][i]), str(batch["user_id"][i])
        ok = status[i] == Status.OK.value
        models = {c.removeprefix("model_"): str(batch[c][i]) for c in model_cols if ok and batch[c][i]}
        det_list = json.loads(get["detections_json"][i]) if ok and get["detections_json"][i] else None
        face_list = json.loads(get["faces_json"][i]) if ok and get["faces_json"][i] else None
        for k, d in enumerate(det_list or []):
            dets["photo_id"].append(pid)
            dets["user_id"].append(uid)
            dets["det_index"].append(k)
            dets["category"].append(d["category"])
            dets["category_path"].append(d.get("category_path") or [d["category"]])
            dets["score"].append(d["score"])
            dets["box"].append(d["box"])
            dets["model"].append(models.get("detect"))
        embs = get["face_embeddings"][i] if ok else None
        emos = get["face_emotions"][i] if ok else None
        n_passed = 0
        for k, f in enumerate(face_list or []):
            n_passed += bool(f.get("passed_gate"))
            emb = embs[k].astype(np.float32).tolist() if embs is not None and len(embs) > k else None
            probs = emos[k].astype(np.float32).tolist() if emos is not None and len(emos) > k else None
            faces["face_id"].append(face_id(pid, k))
            faces["photo_id"].append(pid)
            faces["user_id"].append(uid)
            faces["is_profile"].append(_opt(get["is_profile"][i]))
            faces["face_index"].append(k)
            for key in ("box", "points", "det_score", "roll", "yaw", "pitch", "sharpness", "size_px", "quality",
                        "passed_gate", "gate_reason"):
                faces[key].append(f.get(key))
            faces["embedding"].append(emb)
            faces["embedding_model"].append(models.get("embed") if emb is not None else None)
            faces["emotion_probs"].append(probs)
            label = cfg.emotion_labels[int(np.argmax(probs))] if probs and cfg.emotion_labels else None
            faces["emotion"].append(label)
            faces["smile"].append(probs[happy] if probs and happy is not None else None)
            faces["emotion_model"].append(models.get("emotion") if probs is not None else None)
        n_faces = len(face_list) if face_list is not None else None
        if not ok or face_list is None or cfg.privacy == "never":
            private = None if not ok or face_list is None else False
        else:
            private = (n_passed > 0) if cfg.privacy == "face_passed_gate" else (n_faces or 0) > 0

        photos["photo_id"].append(pid)
        photos["user_id"].append(uid)
        photos["uri"].append(str(batch["uri"][i]))
        for key in ("etag", "size_bytes", "mtime", "is_profile", "error_code", "error_stage", "error_detail"):
            photos[key].append(_opt(get[key][i]))
        photos["status"].append(status[i])
        for key in ("format", "width", "height", "orientation", "n_frames", "taken_at", "gps_lat", "gps_lon",
                    "phash", "scene_coarse", "scene_coarse_score", "landmark_id", "landmark_score"):
            photos[key].append(_opt(get[key][i]) if ok else None)
        photos["scene_labels"].append(list(get["scene_labels"][i]) if ok and get["scene_labels"][i] is not None
                                      else None)
        photos["scene_scores"].append([float(x) for x in get["scene_scores"][i]]
                                      if ok and get["scene_scores"][i] is not None else None)
        photos["n_detections"].append(len(det_list) if det_list is not None else None)
        photos["n_faces"].append(n_faces)
        photos["n_faces_passed"].append(n_passed if face_list is not None else None)
        photos["is_private"].append(private)
        photos["model_versions"].append(json.dumps(models, sort_keys=True) if models else None)

    common = {"run_id": cfg.run_id, "run_date": cfg.run_date}
    photos_t = _table(photos, n, {**common, "processed_at": now})
    if photos_t.num_rows and "mtime" in photos_t.column_names and pa.types.is_integer(photos_t["mtime"].type):
        photos_t = photos_t.set_column(photos_t.schema.get_field_index("mtime"), "mtime",
                                       photos_t["mtime"].cast(pa.timestamp("us", tz="UTC")))
    if photos_t.num_rows:
        taken = [dt.datetime.fromisoformat(t) if t else None for t in photos["taken_at"]]
        taken = [t.replace(tzinfo=dt.UTC) if t and t.tzinfo is None else t for t in taken]
        photos_t = photos_t.set_column(photos_t.schema.get_field_index("taken_at"), "taken_at",
                                       pa.array(taken, pa.timestamp("us", tz="UTC")))
    return photos_t, _table(dets, len(dets["photo_id"]), common), _table(faces, len(faces["face_id"]), common)


def _table(cols: dict[str, list], n: int, constants: dict[str, object]) -> pa.Table:
    data = {k: pa.array(v) if any(x is not None for x in v) else pa.nulls(n) for k, v in cols.items()}
    for k, v in constants.items():
        data[k] = pa.array([v] * n)
    return pa.table(data) if n else pa.table({k: pa.nulls(0) for k in data})


# Bytes a photo adds to the staged files, all tables together, as measured by bench/bench_write.py on
# zstd Parquet (a photos row, its detections and a face with its 128-d embedding): sizes a file target.
BYTES_PER_PHOTO = 600
_BUILD_ROWS = 8_192


def write_batch_rows(rows_per_file: int | None, target_file_mib: float) -> int:
    """Photos per write batch (= per staged file): ``rows_per_file``, else what fills ``target_file_mib``."""
    if rows_per_file is not None:
        return max(1, int(rows_per_file))
    return max(1, int(target_file_mib * 2**20 / BYTES_PER_PHOTO))


class WriteUDF:
    """Stages each batch's rows as Parquet in the tables' folders and describes what it wrote."""

    def __init__(self, config: WriteConfig) -> None:
        self.config = config
        self.lake = Lake(config.lake_root, config.restricted_root, config.s3)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # A file's worth of photos at once: rows become Arrow (compact) a slice at a time, so the Python
        # objects build_rows makes per row never exist for the whole batch.
        n = len(batch["photo_id"])
        slices = [{k: v[a : a + _BUILD_ROWS] for k, v in batch.items()} for a in range(0, n, _BUILD_ROWS)]
        built = [build_rows(part, self.config) for part in slices] if n > _BUILD_ROWS else [build_rows(batch,
                                                                                                     self.config)]
        photos, dets, faces = (pa.concat_tables([b[i] for b in built if b[i].num_rows] or [built[0][i]],
                                                promote_options="default") for i in range(3))
        del built
        tag = f"{self.config.run_id}-{hashlib.blake2b(str(batch['photo_id'][0]).encode(), digest_size=6).hexdigest()}"
        files = []
        ok = pc.equal(photos.column("status"), Status.OK.value) if photos.num_rows else None
        parts = [("photos", photos)] if ok is None else [("photos", photos.filter(ok)),
                                                         ("photos", photos.filter(pc.invert(ok)))]
        for name, table in (*parts, ("detections", dets), ("faces", faces)):
            files += [f.to_dict() for f in self.lake.stage(name, table, tag)]
        # The run's lease: a vacuum leaves the staged files of a run that wrote within its lease alone.
        self.lake.touch_lease(self.config.run_id)
        statuses = Counter(str(s) for s in batch["status"])
        errors = Counter(str(c) for c, s in zip(_col(batch, "error_code", len(photos)), batch["status"], strict=True)
                         if s != Status.OK.value and c)
        seconds = {c.removesuffix("_seconds"): float(np.sum(batch[c])) for c in batch if c.endswith("_seconds")}
        # Every stage stamps each row with its share of the batch's time, so rows/seconds is a per-worker rate.
        rows = dict.fromkeys(seconds, len(photos))
        return {
            "files": np.array([json.dumps(files)], dtype=object),
            "n_rows": np.array([len(photos)], dtype=np.int64),
            "status_counts": np.array([json.dumps(statuses)], dtype=object),
            "error_counts": np.array([json.dumps(errors)], dtype=object),
            "stage_seconds": np.array([json.dumps(seconds)], dtype=object),
            "stage_rows": np.array([json.dumps(rows)], dtype=object),
            "n_detections": np.array([dets.num_rows], dtype=np.int64),
            "n_faces": np.array([faces.num_rows], dtype=np.int64),
        }
