"""``photolens demo``: the nightly job end to end on one machine, with nothing to set up.

Starts an S3-compatible object store (SeaweedFS) on 127.0.0.1, seeds it with a small photo store built from real
photos that ship inside installed packages (scikit-image's and matplotlib's sample images) plus a few deliberately
broken files, fills the model store, runs the tagging job into a Delta lake in the same object store, prints the
run report and two DuckDB queries over the tables, then builds the preference tables.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

from photolens.lake.seaweed import LocalS3
from photolens.lake.storage import reset_s3_settings
from photolens.models.store import ModelStore, package_folder

# (user, key inside the user's folder, package, path inside the package)
SAMPLE_PHOTOS: tuple[tuple[str, str, str, str], ...] = (
    ("ada", "profile/astronaut.png", "skimage", "data/astronaut.png"),
    ("ada", "2024/coffee.png", "skimage", "data/coffee.png"),
    ("ada", "2024/chelsea.png", "skimage", "data/chelsea.png"),
    ("ada", "2024/motorcycle.png", "skimage", "data/motorcycle_left.png"),
    ("grace", "profile/grace_hopper.jpg", "matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
    ("grace", "2024/rocket.jpg", "skimage", "data/rocket.jpg"),
    ("grace", "2024/hubble.jpg", "skimage", "data/hubble_deep_field.jpg"),
    ("ben", "2025/camera.png", "skimage", "data/camera.png"),
    ("ben", "2025/motorcycle_right.png", "skimage", "data/motorcycle_right.png"),
    ("ben", "2025/coins.png", "skimage", "data/coins.png"),
)


def _bomb_png(width: int = 60000, height: int = 60000) -> bytes:
    """A tiny PNG whose header claims 3.6 gigapixels: the decoder must refuse it, not allocate it."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def sample_photos() -> Iterator[tuple[str, bytes]]:
    """(key, bytes) of the demo photo store: real sample photos plus broken files."""
    for user, name, package, rel in SAMPLE_PHOTOS:
        yield f"users/{user}/{name}", (package_folder(package) / rel).read_bytes()
    jpeg = (package_folder("matplotlib") / "mpl-data/sample_data/grace_hopper.jpg").read_bytes()
    yield "users/ben/broken/truncated.jpg", jpeg[: len(jpeg) // 3]
    yield "users/ben/broken/empty.jpg", b""
    yield "users/ben/broken/notes.jpg", b"this is a text file, not a photo\n"
    yield "users/ben/broken/bomb.png", _bomb_png()


def seed_folder(root: Path) -> int:
    n = 0
    for key, data in sample_photos():
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        n += 1
    return n


def seed_bucket(s3: LocalS3, bucket: str) -> int:
    s3.create_bucket(bucket)
    client = s3.settings().boto3_client(max_attempts=3)
    n = 0
    for key, data in sample_photos():
        client.put_object(Bucket=bucket, Key=key, Body=data)
        n += 1
    return n


def print_queries(lake_root: str, storage_options: dict[str, str] | None) -> None:
    import duckdb
    from deltalake import DeltaTable

    from photolens.lake.storage import join_uri

    con = duckdb.connect()
    for name, sub in (("photos", "tables"), ("detections", "tables")):
        ds = DeltaTable(join_uri(lake_root, sub, name), storage_options=storage_options).to_pyarrow_dataset()
        con.register(name, ds)
    queries = {
        "photos by status and error code": (
            "SELECT status, coalesce(error_code, '-') AS error_code, count(*) AS photos "
            "FROM photos GROUP BY ALL ORDER BY photos DESC"
        ),
        "top objects per user (rolled up the category tree)": (
            "SELECT user_id, category_path[len(category_path)] AS group_, category, "
            "count(DISTINCT photo_id) AS photos, round(max(score), 2) AS best FROM detections "
            "GROUP BY ALL ORDER BY user_id, photos DESC, best DESC"
        ),
    }
    queries["scenes, faces and privacy per photo"] = (
        "SELECT user_id, regexp_extract(uri, '[^/]+$') AS photo, scene_coarse, round(scene_coarse_score, 2) AS p, "
        "scene_labels[1] AS top_scene, n_faces, is_private FROM photos WHERE status = 'ok' ORDER BY user_id, photo"
    )
    for title, sql in queries.items():
        print(f"\n-- {title}\n{sql};")
        print(con.sql(sql))


def run_demo(workdir: Path, use_s3: bool = True, keep: bool = False) -> int:
    from photolens.jobs.tag import TagConfig, run_tag

    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    store = ModelStore(str(workdir / "models"))
    installed = store.install()
    print(f"model store {store.uri}: {', '.join(e.tag for e in installed)}")
    with contextlib.ExitStack() as stack:
        if use_s3:
            s3 = stack.enter_context(LocalS3(workdir / "seaweedfs"))
            os.environ.update(s3.env())
            reset_s3_settings()
            n = seed_bucket(s3, "photos")
            s3.create_bucket("lake")
            photos, lake = "s3://photos/users/", "s3://lake/demo"
            print(f"object store: SeaweedFS at {s3.endpoint}; seeded s3://photos with {n} files")
        else:
            photos_dir = workdir / "photos"
            n = seed_folder(photos_dir)
            photos, lake = str(photos_dir), str(workdir / "lake")
            print(f"photo store: {photos_dir} ({n} files)")
        run_id = f"demo-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S}"
        cfg = TagConfig(photos=photos, lake=lake, run_id=run_id, model_store=store.uri, min_actors=1, max_actors=1)
        report = run_tag(cfg)
        print()
        print(report.render())
        from photolens.lake.delta import Lake

        lake_obj = Lake(lake)
        print_queries(lake_obj.root, lake_obj.storage_options())
        print_preferences(lake, lake_obj.storage_options())
        if keep and use_s3:
            print(f"\nobject store still running at {os.environ['AWS_ENDPOINT_URL']}; Ctrl-C to stop")
            with contextlib.suppress(KeyboardInterrupt):
                import time

                while True:
                    time.sleep(3600)
    return 0


def print_preferences(lake: str, storage_options: dict[str, str] | None) -> None:
    from photolens.jobs.preferences import format_interests, run_preferences, top_interests

    as_of = dt.datetime.now(dt.UTC).date().isoformat()
    report = run_preferences(lake, as_of, storage_options=storage_options)
    print(f"\npreferences as of {as_of}: {report['users']} users, {report['rows']} rows, "
          f"{report['n_private_excluded']} private photos excluded")
    for user in ("ada", "grace", "ben"):
        rows = top_interests(lake, user, as_of=as_of, n=5, storage_options=storage_options)
        print(f"top interests of {user}:")
        print(format_interests(rows) if rows.num_rows else "  (none: no public photos with tags)")

