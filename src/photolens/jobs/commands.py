"""Sub-commands and flags of the jobs, for ``photolens`` (``cli.py``).

Nothing here imports job code: ``photolens --help`` and ``photolens <cmd> --help`` must not pay for torch,
cv2, faiss, Ray or deltalake. Each handler is a :class:`LazyHandler` naming the job module and its
``cmd_*`` function; the module is imported when the command runs.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable, Sequence
from typing import Any, Final

__all__ = ["PROFILE_SOURCES", "SEED000_LINKAGES", "LazyHandler", "register", "register_eval", "register_landmarks"]

# templates build --profile-from: the manifest's is_profile flag, or a substring of the photo's uri.
PROFILE_SOURCES: Final = ("manifest", "pattern")
# The linkages of seed 000's clustering table (eval clustering's default rows).
SEED000_LINKAGES: Final[tuple[str, ...]] = ("single", "average", "complete", "weighted", "median")
# Defaults owned by heavier modules (numpy, torch), repeated here so that parsing imports none of them;
# tests/test_cli_help.py checks that each still equals its source.
LINKAGES: Final[tuple[str, ...]] = ("single", "average", "complete", "weighted", "median", "centroid", "ward")
DEFAULT_EUCLIDEAN_THRESHOLD: Final = 0.4  # faceindex.cluster.DEFAULT_EUCLIDEAN_THRESHOLD
DEFAULT_RANK_ORDER_K: Final = 20  # faceindex.cluster.DEFAULT_RANK_ORDER_K
DEFAULT_DETECTOR: Final = "ssd_mobilenet_v2_coco"  # udfs.recognize.DEFAULT_MODELS["detect"]
_STORE_HELP: Final = "model store (default $PHOTOLENS_MODEL_STORE or ~/.cache/photolens/models)"


class LazyHandler:
    """``module:function`` as a handler: the module is imported only when the command runs."""

    def __init__(self, module: str, function: str) -> None:
        self.module = module
        self.function = function

    def __call__(self, args: argparse.Namespace) -> int:
        return int(getattr(importlib.import_module(self.module), self.function)(args) or 0)

    def __repr__(self) -> str:
        return f"LazyHandler({self.module}:{self.function})"


def _handler(p: argparse.ArgumentParser, module: str, function: str) -> None:
    p.set_defaults(handler=LazyHandler(f"photolens.jobs.{module}", function))


def _lake_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lake", required=True, help="lake root: a folder or s3://bucket/prefix")
    p.add_argument("--restricted-lake", dest="restricted_lake",
                   help="root of the biometric tables (faces, templates, people); default <lake>/restricted")


def register(sub: Any) -> None:
    """Add ``templates``, ``people``, ``index``, ``suggest``, ``forget`` and ``friends`` to the CLI's sub-parsers."""
    linkages = list(LINKAGES)
    templates = sub.add_parser("templates", help="per-user owner templates").add_subparsers(
        dest="templates_cmd", required=True)
    p = templates.add_parser("build", help="rebuild every user's template from their profile photos' faces")
    _lake_args(p)
    p.add_argument("--min-weight", dest="min_weight", type=float, default=0.15, help="drop faces below this weight")
    p.add_argument("--max-photos", dest="max_photos", type=int, default=30, help="newest profile photos used")
    p.add_argument("--profile-from", dest="profile_from", choices=PROFILE_SOURCES, default="manifest",
                   help="manifest: the is_profile flag; pattern: photo uri contains --profile-pattern")
    p.add_argument("--profile-pattern", dest="profile_pattern", default="/profile/")
    p.add_argument("--linkage", choices=linkages, default="average")
    p.add_argument("--threshold", type=float, default=DEFAULT_EUCLIDEAN_THRESHOLD, help="cut on unit vectors")
    p.add_argument("--run-id", dest="run_id", help="idempotency key: a committed run id commits nothing again")
    _handler(p, "templates", "cmd_templates")

    people = sub.add_parser("people", help="frequent people in a user's gallery").add_subparsers(
        dest="people_cmd", required=True)
    p = people.add_parser("cluster", help="cluster one user's gallery (cannot-link per photo)")
    _lake_args(p)
    p.add_argument("--user", required=True)
    p.add_argument("--linkage", choices=linkages, default="average")
    p.add_argument("--threshold", type=float, help="cut height (default: the distance's own default)")
    p.add_argument("--rank-order", dest="rank_order", action="store_true", help="rank-order distance (Zhu et al.)")
    p.add_argument("--rank-order-k", dest="rank_order_k", type=int, default=DEFAULT_RANK_ORDER_K)
    p.add_argument("--run-id", dest="run_id")
    _handler(p, "people", "cmd_people")

    index = sub.add_parser("index", help="the OPQ/PQ face index").add_subparsers(dest="index_cmd", required=True)
    p = index.add_parser("build", help="train + encode (Ray tasks) + merge + recall report; a new version")
    _lake_args(p)
    p.add_argument("--index-store", dest="index_store", required=True, help="folder or s3:// prefix of versions")
    p.add_argument("--factory", help="faiss factory string (default OPQ{m},PQ{m}x8np, 8x compression)")
    p.add_argument("--train-size", dest="train_size", type=int, default=50_000)
    p.add_argument("--memory-budget-mb", dest="memory_budget_mb", type=float, default=1024.0,
                   help="per encode task; the vectors are split into shards that fit")
    p.add_argument("--eval-queries", dest="eval_queries", type=int, default=1_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--publish", action="store_true", help="make the new version current")
    p.add_argument("--run-id", dest="run_id")
    for name, helptext in (("publish", "make a stored version current"), ("rollback", "back to the previous one"),
                           ("info", "the current version's sidecar, versions and history")):
        q = index.add_parser(name, help=helptext)
        q.add_argument("--index-store", dest="index_store", required=True)
        if name == "publish":
            q.add_argument("--version", required=True)
    for q in index.choices.values():
        _handler(q, "index", "cmd_index")

    p = sub.add_parser("suggest", help="friend suggestions + verification for new faces")
    _lake_args(p)
    p.add_argument("--index-store", dest="index_store", required=True)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--photos-run", dest="photos_run", help="faces of this tagging run")
    which.add_argument("--faces-since", dest="faces_since", help="faces of runs on/after YYYY-MM-DD")
    p.add_argument("--threshold", type=float, help="verification distance (default: calibrated on the templates)")
    p.add_argument("--target-far", dest="target_far", type=float, default=1e-2)
    p.add_argument("--run-id", dest="run_id", help="default photos-<run> / since-<day>: a re-run commits nothing")
    p.add_argument("--max-tasks", dest="max_tasks", type=int, default=16, help="uploader groups run as Ray tasks")
    _handler(p, "suggest", "cmd_suggest")

    p = sub.add_parser("forget", help="delete a user everywhere (tables, files, index versions) with a receipt")
    p.add_argument("--user", required=True)
    _lake_args(p)
    p.add_argument("--index-store", dest="index_store", help="also remove the user from every index version")
    p.add_argument("--retention-hours", dest="retention_hours", type=int, default=0,
                   help="vacuum retention; 0 deletes replaced files now (turns off Delta's 168 h check)")
    p.add_argument("--rebuild-index", dest="rebuild_index", action="store_true",
                   help="retrain the index without the user instead of scrubbing ids from each version")
    _handler(p, "forget", "cmd_forget")

    friends = sub.add_parser("friends", help="the friend graph suggestions search in").add_subparsers(
        dest="friends_cmd", required=True)
    p = friends.add_parser("import", help="load user_id,friend_id pairs into the friends table (validated first)")
    p.add_argument("--lake", required=True, help="lake root: a folder or s3://bucket/prefix")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--csv", help="CSV with a header user_id,friend_id (local path or s3://)")
    source.add_argument("--parquet", help="Parquet file with string columns user_id, friend_id (local path or s3://)")
    p.add_argument("--symmetric", action="store_true", help="also store (friend_id, user_id) for every pair")
    p.add_argument("--mode", choices=("replace", "merge"), default="merge",
                   help="replace: the file becomes the whole graph; merge: add the pairs not there yet")
    _handler(p, "friends", "cmd_friends")


def register_eval(sub: Any, extra_eval: Sequence[Callable[[Any], None]] = ()) -> None:
    """Add ``eval faces``, ``eval detection`` and ``eval clustering`` to the CLI's sub-parsers.

    ``extra_eval``: functions that add more sub-commands to the ``eval`` sub-parsers.
    """
    evaluate = sub.add_parser("eval", help="model quality on labelled data")
    cmds = evaluate.add_subparsers(dest="eval_cmd", required=True)

    p = cmds.add_parser("faces", help="face verification on labelled pairs: ROC AUC, accuracy, TAR@FAR")
    p.add_argument("--pairs", required=True, help="CSV with file_x,file_y,Decision (Yes/No)")
    p.add_argument("--images", required=True, help="folder holding the files the pairs name")
    p.add_argument("--store", help=_STORE_HELP)
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    _handler(p, "evaluate", "cmd_faces")

    p = cmds.add_parser("detection", help="mAP/recall at IoU 0.5 and 0.75, strict and related categories")
    p.add_argument("--annotations", required=True, help="COCO ground truth JSON (images, annotations, categories)")
    p.add_argument("--images", required=True, help="folder holding the images' file_name entries")
    p.add_argument("--store", help=_STORE_HELP)
    p.add_argument("--model", default=DEFAULT_DETECTOR, help="detector name in the model store")
    p.add_argument("--arch", help="torchvision architecture of --model when it is a torchvision checkpoint")
    p.add_argument("--score-threshold", dest="score_threshold", type=float, default=0.05,
                   help="keep predictions at or above this score (low: complete PR curves)")
    p.add_argument("--device", default="cpu", help="torch device for torchvision detectors")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    _handler(p, "evaluate", "cmd_detection")

    p = cmds.add_parser("clustering", help="face clustering on labelled pairs: K/C, ARI, AMI, F per linkage")
    p.add_argument("--faces-dir", dest="faces_dir", required=True, help="folder with the labelled photos")
    p.add_argument("--pairs", action="append", required=True,
                   help="CSV file_x,file_y,Decision; identities = connected 'Yes' pairs (repeatable)")
    p.add_argument("--linkage", action="append", choices=list(LINKAGES),
                   help=f"repeatable; default {', '.join(SEED000_LINKAGES)}")
    p.add_argument("--threshold", type=float, help="cut height (default: the distance's own default)")
    p.add_argument("--rank-order", dest="rank_order", action="store_true", help="also rank-order distance rows")
    p.add_argument("--distractor", action="append", help="unlabelled photo in --faces-dir to add (repeatable)")
    p.add_argument("--store", help=_STORE_HELP)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true")
    _handler(p, "people", "cmd_eval_clustering")
    for add in extra_eval:
        add(cmds)


def register_landmarks(sub: Any) -> None:
    """Add ``landmarks build`` to the CLI's sub-parsers."""
    landmarks = sub.add_parser("landmarks", help="landmark references for the landmark stage")
    cmds = landmarks.add_subparsers(dest="landmarks_cmd", required=True)
    p = cmds.add_parser("build", help="embed a gallery (a folder per landmark), calibrate, write the references")
    p.add_argument("--gallery", required=True, help="folder with one sub-folder of photos per landmark id")
    p.add_argument("--store", help=_STORE_HELP)
    p.add_argument("--out", help="references URI without suffix (default <store>/landmarks/references)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    _handler(p, "landmarks", "cmd_build")
