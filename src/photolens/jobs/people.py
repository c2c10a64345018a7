"""``photolens people cluster`` and ``photolens eval clustering``: frequent people in a gallery.

* ``people cluster``: one user's whole gallery (faces that passed the gate) clustered with the
  same-photo cannot-link constraint → restricted ``people`` (the user's rows replaced in one commit).
* ``eval clustering``: K/C, ARI, AMI, pairwise P/R/F per linkage on a labelled face set, with the
  pipeline's own detector, alignment and embedder (seed 000's table). :func:`embed_photos` runs that
  chain on local files.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, get_args

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from deltalake.transaction import AddAction

from photolens.faceindex.cluster import (
    DEFAULT_EUCLIDEAN_THRESHOLD,
    DEFAULT_RANK_ORDER_FRACTION,
    DEFAULT_RANK_ORDER_K,
    EUCLIDEAN_ONLY,
    LinkageMethod,
    cluster_faces,
)
from photolens.faceindex.metrics import clustering_scores
from photolens.jobs._faceshared import check_run_id, embedding_matrix, new_run_id, now_utc, print_json
from photolens.jobs.commands import SEED000_LINKAGES
from photolens.jobs.tag import ConfigError
from photolens.lake.delta import Lake
from photolens.lake.rewrite import ColumnIn, rewrite_rows
from photolens.schemas.tables import PEOPLE, conform

__all__ = [
    "PEOPLE_APP", "PeopleConfig", "PhotoFaces", "cluster_people", "cmd_eval_clustering", "cmd_people",
    "embed_photos", "eval_clustering", "format_clustering", "identity_groups",
]

PEOPLE_APP: Final = "photolens.people/"


# ---------------------------------------------------------------------------------------------- people


@dataclass(frozen=True)
class PeopleConfig:
    lake: str
    user: str
    restricted_lake: str | None = None
    linkage: LinkageMethod = "average"
    threshold: float | None = None  # None: cluster.py's default for the distance used
    rank_order: bool = False
    rank_order_k: int = DEFAULT_RANK_ORDER_K
    run_id: str | None = None

    def validate(self) -> PeopleConfig:
        if not self.lake or not self.user:
            raise ConfigError("people cluster needs --lake and --user")
        if self.linkage not in get_args(LinkageMethod):
            raise ConfigError(f"unknown linkage {self.linkage!r}")
        if self.rank_order and self.linkage in EUCLIDEAN_ONLY:
            raise ConfigError(f"{self.linkage} linkage needs Euclidean distances, not --rank-order")
        check_run_id(self.run_id)
        return self


def _relabel_by_size(labels: np.ndarray) -> np.ndarray:
    """Person 0 is the most frequent face in the gallery (ties: first seen first)."""
    sizes = np.bincount(labels)
    order = sorted(range(len(sizes)), key=lambda c: (-sizes[c], c))
    rank = np.empty(len(sizes), dtype=np.int64)
    rank[order] = np.arange(len(sizes))
    return rank[labels]


def cluster_people(cfg: PeopleConfig) -> dict[str, Any]:
    """Cluster one user's gallery into people and replace that user's rows of ``people``."""
    cfg.validate()
    started = time.perf_counter()
    lake = Lake(cfg.lake, cfg.restricted_lake)
    lake.check_schema("people")
    run_id = cfg.run_id or new_run_id("people")
    where = (pc.field("user_id") == cfg.user) & (pc.field("passed_gate") == True)  # noqa: E712 (an expression)
    faces = lake.read("faces", ["face_id", "photo_id", "embedding", "embedding_model"], where)
    faces = faces.filter(pc.is_valid(faces.column("embedding")))
    skipped = 0
    if faces.num_rows:
        # One model per clustering: the gallery's most common one.
        counts = Counter(faces.column("embedding_model").to_pylist())
        model = counts.most_common(1)[0][0]
        skipped = faces.num_rows - counts[model]
        faces = faces.filter(pc.equal(faces.column("embedding_model"), model))
    n = faces.num_rows
    threshold = cfg.threshold
    if threshold is None:
        threshold = (DEFAULT_RANK_ORDER_FRACTION * 2 * min(cfg.rank_order_k, max(n, 1)) if cfg.rank_order
                     else DEFAULT_EUCLIDEAN_THRESHOLD)
    photo_ids = np.asarray(faces.column("photo_id").to_pylist(), dtype=object)
    if n:
        labels = cluster_faces(embedding_matrix(faces.column("embedding")), photo_ids, cfg.linkage, threshold,
                               rank_order=cfg.rank_order, rank_order_k=cfg.rank_order_k)
        labels = _relabel_by_size(labels)
    else:
        labels = np.zeros(0, dtype=np.int64)
    sizes = np.bincount(labels) if n else np.zeros(0, dtype=np.int64)
    distance = "rank_order" if cfg.rank_order else "euclidean"
    data = pa.table({
        "user_id": pa.array([cfg.user] * n, pa.string()),
        "face_id": faces.column("face_id"),
        "photo_id": faces.column("photo_id"),
        "person": pa.array(labels.astype(np.int32)),
        "cluster_size": pa.array(sizes[labels].astype(np.int32) if n else np.zeros(0, np.int32)),
        "linkage": pa.array([f"{cfg.linkage}/{distance}"] * n, pa.string()),
        "threshold": pa.array([threshold] * n, pa.float32()),
        "run_id": pa.array([run_id] * n, pa.string()),
    })
    data = conform(data, PEOPLE)
    # Replace exactly this user's rows in one commit (new file added, the user's old rows rewritten
    # away): readers never see the gallery half-done. A run id that committed commits nothing again.
    app_id = PEOPLE_APP + run_id
    table = lake.ensure("people")
    if (table.transaction_version(app_id) or 0) < 1:
        now_ms = int(now_utc().timestamp() * 1000)
        adds = [AddAction(f.path, f.size, f.partition_values, now_ms, True, f.stats)
                for f in lake.stage("people", data, tag=f"people-{run_id}")]
        rewrite_rows(table, lake.table_uri("people"), ColumnIn("user_id", [cfg.user]), s3=lake.s3, adds=adds,
                     app_id=app_id, custom_metadata={"photolens.run_id": run_id}, tag=f"people-{run_id}")
    # A cannot-link check on what is written, cheap and independent of the clustering code.
    violations = 0
    for person in range(len(sizes)):
        members = photo_ids[labels == person]
        violations += len(members) - len(set(members))
    return {
        "job": "people",
        "user": cfg.user,
        "run_id": run_id,
        "n_faces": n,
        "n_people": len(sizes),
        "n_singletons": int((sizes == 1).sum()),
        "largest": sizes[:10].astype(int).tolist(),
        "faces_of_other_models_skipped": int(skipped),
        "linkage": cfg.linkage,
        "distance": distance,
        "threshold": float(threshold),
        "cannot_link_violations": int(violations),
        "table": lake.table_uri("people"),
        "table_version": lake.version("people"),
        "seconds": round(time.perf_counter() - started, 3),
    }




# ---------------------------------------------------------------------------------------------- real face chain


@dataclass(frozen=True, eq=False)
class PhotoFaces:
    """Every face the pipeline's chain finds on one photo, best detector score first."""

    name: str
    boxes: np.ndarray  # (n, 4) float32, working-image pixels
    det_scores: np.ndarray  # (n,) float32
    quality: np.ndarray  # (n,) float32, the quality weight
    passed_gate: np.ndarray  # (n,) bool
    gate_reasons: tuple[str | None, ...]
    embeddings: np.ndarray  # (n, d) float32, unit rows

    def __len__(self) -> int:
        return len(self.det_scores)


def embed_photos(
    paths: Sequence[Path], store_uri: str | None = None, device: str = "cpu"
) -> tuple[dict[str, PhotoFaces], dict[str, str], dict[str, str]]:
    """Decode → MTCNN → dlib150 alignment + quality gate → embedder, as the tagging job's faces stages.

    Returns ``{file name: PhotoFaces}``, ``{file name: why nothing}`` (decode errors) and the model tags
    (``{"faces": ..., "embed": ...}``, the ``embedding_model`` value the tagging job writes).
    """
    from photolens.jobs.evaluate import FaceChain
    from photolens.models.face_align import QualityGate, assess
    from photolens.udfs.decode import decode_photo

    chain = FaceChain(store_uri, device=device)
    gate = QualityGate()  # the tagging job's gate (udfs.recognize.FacesConfig has the same defaults)
    found: dict[str, PhotoFaces] = {}
    missing: dict[str, str] = {}
    for path in paths:
        path = Path(path)
        if not path.is_file():
            missing[path.name] = "file not found"
            continue
        result = decode_photo(path.read_bytes(), chain.decode_cfg)
        if not result.ok:
            missing[path.name] = f"decode: {result.error_code}"
            continue
        dets = chain.detector.detect([result.image])[0]
        chips, qualities = assess(result.image, dets.boxes, dets.scores, dets.points, "dlib150")
        verdicts = [gate.gate(q) for q in qualities]
        emb = chain.embedder.embed(chips) if len(chips) else np.zeros((0, 0), dtype=np.float32)
        found[path.name] = PhotoFaces(
            name=path.name,
            boxes=np.asarray(dets.boxes, dtype=np.float32).reshape(-1, 4),
            det_scores=np.asarray(dets.scores, dtype=np.float32).reshape(-1),
            quality=np.array([q.weight for q in qualities], dtype=np.float32),
            passed_gate=np.array([ok for ok, _ in verdicts], dtype=bool),
            gate_reasons=tuple(reason for _, reason in verdicts),
            embeddings=np.asarray(emb, dtype=np.float32),
        )
    return found, missing, dict(chain.models)




# ---------------------------------------------------------------------------------------------- eval clustering


def identity_groups(pairs_files: Sequence[Path]) -> dict[str, str]:
    """``{file name: group}``: connected components of the "same person" pairs over every named file.

    Reads ``file_x,file_y,Decision`` (deepface ``master.csv``; ``decision`` also accepted, paths reduced to
    the file name). A file only in "different" pairs is a group of its own.
    """
    import csv

    parent: dict[str, str] = {}

    def find(a: str) -> str:
        parent.setdefault(a, a)
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for path in pairs_files:
        with Path(path).open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            fields = {name.lower(): name for name in reader.fieldnames or ()}
            if not {"file_x", "file_y", "decision"} <= set(fields):
                raise ConfigError(f"{path}: need columns file_x, file_y, Decision")
            for row in reader:
                x = row[fields["file_x"]].strip().rsplit("/", 1)[-1]
                y = row[fields["file_y"]].strip().rsplit("/", 1)[-1]
                rx, ry = find(x), find(y)
                if row[fields["decision"]].strip().lower() == "yes" and rx != ry:
                    parent[rx] = ry
    return {name: find(name) for name in sorted(parent)}


def eval_clustering(
    faces_dir: Path,
    pairs: Sequence[Path],
    linkages: Sequence[str] = SEED000_LINKAGES,
    threshold: float | None = None,
    rank_order: bool = False,
    distractors: Sequence[str] = (),
    store_uri: str | None = None,
    device: str = "cpu",
    embedded: Mapping[str, PhotoFaces] | None = None,
) -> dict[str, Any]:
    """Seed 000's clustering table on a labelled face set, with the pipeline's face chain.

    The gallery is every face that passed the gate on the labelled photos (and on ``distractors``:
    unlabelled photos, e.g. group shots, that only add faces and cannot-link constraints). Each labelled
    photo's main face (largest confident one) carries the photo's identity and is what is scored; the
    other faces are clustered but unscored. ``embedded`` reuses faces already embedded (by file name).
    """
    from photolens.jobs.evaluate import main_face

    started = time.perf_counter()
    groups = identity_groups(pairs)
    names = [n for n in groups if (Path(faces_dir) / n).is_file()]
    wanted = sorted(set(names) | set(distractors))
    models: dict[str, str] = {}
    missing: dict[str, str] = {}
    if embedded is None:
        found, missing, models = embed_photos([Path(faces_dir) / n for n in wanted], store_uri, device)
    else:
        found = {n: embedded[n] for n in wanted if n in embedded}
        missing = {n: "not embedded" for n in wanted if n not in embedded}
    vectors, photo_of, truth = [], [], []
    unscored: dict[str, str] = {}
    for name in wanted:
        faces = found.get(name)
        if faces is None:
            continue
        main = main_face(faces.boxes, faces.det_scores) if name in groups else None
        if name in groups and (main is None or not faces.passed_gate[main]):
            unscored[name] = "no face" if main is None else f"main face failed the gate ({faces.gate_reasons[main]})"
        for k in np.flatnonzero(faces.passed_gate):
            vectors.append(faces.embeddings[k])
            photo_of.append(name)
            truth.append(groups[name] if k == main and name in groups else None)
    if not vectors:
        raise ConfigError(f"no face passed the gate on the {len(wanted)} photos under {faces_dir}")
    x = np.stack(vectors)
    photos = np.asarray(photo_of, dtype=object)
    scored = np.array([t is not None for t in truth])
    labels_true = np.unique(np.array([t for t in truth if t is not None]), return_inverse=True)[1]
    variants = [(m, False) for m in linkages] + ([(m, True) for m in linkages if m not in EUCLIDEAN_ONLY]
                                                 if rank_order else [])
    rows = []
    for method, ro in variants:
        if method not in get_args(LinkageMethod):
            raise ConfigError(f"unknown linkage {method!r}")
        labels = cluster_faces(x, photos, method, threshold, rank_order=ro)  # type: ignore[arg-type]
        violations = sum(len(p) - len(set(p)) for p in (photos[labels == c] for c in np.unique(labels)))
        scores = clustering_scores(labels_true, labels[scored])
        rows.append({"linkage": method, "distance": "rank_order" if ro else "euclidean", **scores.as_dict(),
                     "cannot_link_violations": int(violations)})
    return {
        "rows": rows,
        "threshold": threshold if threshold is not None else "default",
        "n_photos": len(found),
        "n_labelled_photos": len(names),
        "n_identities": len({groups[n] for n in names}),
        "n_faces": len(x),
        "n_scored_faces": int(scored.sum()),
        "unscored": unscored,
        "missing": missing,
        "models": models,
        "seconds": round(time.perf_counter() - started, 2),
    }


def format_clustering(result: dict[str, Any]) -> str:
    lines = [f"face clustering: {result['n_faces']} faces on {result['n_photos']} photos, "
             f"{result['n_scored_faces']} scored over {result['n_identities']} identities; "
             f"cut {result['threshold']}",
             f"  {'linkage':<10}{'distance':<12}{'K/C':>7}{'ARI':>8}{'AMI':>8}{'P':>8}{'R':>8}{'F':>8}"]
    for r in result["rows"]:
        lines.append(f"  {r['linkage']:<10}{r['distance']:<12}{r['k_over_c']:>7.2f}{r['ari']:>8.3f}{r['ami']:>8.3f}"
                     f"{r['precision']:>8.3f}{r['recall']:>8.3f}{r['f_measure']:>8.3f}")
    for name, why in sorted({**result["unscored"], **result["missing"]}.items()):
        lines.append(f"    {name}: {why}")
    return "\n".join(lines)




def cmd_people(args: argparse.Namespace) -> int:
    print_json(cluster_people(PeopleConfig(
        lake=args.lake, user=args.user, restricted_lake=args.restricted_lake, linkage=args.linkage,
        threshold=args.threshold, rank_order=args.rank_order, rank_order_k=args.rank_order_k, run_id=args.run_id)))
    return 0


def cmd_eval_clustering(args: argparse.Namespace) -> int:
    result = eval_clustering(Path(args.faces_dir), [Path(p) for p in args.pairs], args.linkage or SEED000_LINKAGES,
                             args.threshold, args.rank_order, args.distractor or (), args.store, args.device)
    print(json.dumps(result, indent=2, sort_keys=True) if args.json else format_clustering(result))
    return 0

