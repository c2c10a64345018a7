"""``photolens demo``: the nightly job and the face journey end to end on one machine, with nothing to set up.

Starts an S3-compatible object store (SeaweedFS) on 127.0.0.1, seeds it with a small photo store built from real
photos that ship inside registry packages (scikit-image's and matplotlib's sample images, and the test photos in
the ``face_recognition==1.3.0`` source archive) plus a few deliberately broken files, fills the model store, and
then, all inside that store:

1. night 1: the tagging job (objects, scenes, faces into the restricted root) and two DuckDB queries;
2. owner templates from the profile photos, the friend graph, the face index (published; an exact index
   until enough vectors train OPQ);
3. ``forget`` of one user (joe) everywhere, tables and index versions, and its receipt;
4. night 2: a group photo of barack and joe arrives; the tagging job embeds its faces, ``suggest`` ranks the
   uploader's friends for each face and verifies the best one on the uncompressed template: barack is
   recognised, joe no longer is;
5. the preference tables over everything the lake then holds, and each user's top interests.

A short summary (``demo_summary.json`` in the work folder) keeps what the report printed, for checks.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import logging
import os
import shutil
import struct
import sys
import tarfile
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Final

from photolens.jobs.tag import ConfigError
from photolens.lake.seaweed import LocalS3
from photolens.lake.storage import reset_s3_settings
from photolens.models.store import ModelStore, package_folder

# The face photos come from this source archive on PyPI (MIT; its tests/test_images are official White House
# photographs). `make install` downloads it (pip download --no-binary) into FACE_SAMPLES_DIR; nothing is built.
FACE_SDIST: Final = "face_recognition-1.3.0.tar.gz"
FACE_SDIST_IMAGES: Final = "face_recognition-1.3.0/tests/test_images/"


def face_samples_dir() -> Path:
    return Path(os.environ.get("PHOTOLENS_SAMPLES", Path(sys.prefix) / "share" / "photolens" / "samples"))


class DemoSetupError(ConfigError):
    """Something the demo needs is not installed; the message says how to install it."""


@dataclass(frozen=True)
class Photo:
    """One demo photo: where its bytes come from and what the demo does to them."""

    key: str  # users/<user>/...
    source: str  # "pkg:<package>:<path inside>" or "sdist:<file in tests/test_images>"
    # None: the file as shipped. "mirror" / "brighter": a second "session" made from the same photo (there is
    # only one photo of ada, grace and joe in any package); the report says so.
    augment: str | None = None


SAMPLE_PHOTOS: Final[tuple[Photo, ...]] = (
    Photo("users/ada/profile/astronaut.png", "pkg:skimage:data/astronaut.png"),
    Photo("users/ada/profile/astronaut_mirrored.jpg", "pkg:skimage:data/astronaut.png", "mirror"),
    Photo("users/ada/2024/coffee.png", "pkg:skimage:data/coffee.png"),
    Photo("users/ada/2024/chelsea.png", "pkg:skimage:data/chelsea.png"),
    Photo("users/ada/2024/motorcycle.png", "pkg:skimage:data/motorcycle_left.png"),
    Photo("users/grace/profile/grace_hopper.jpg", "pkg:matplotlib:mpl-data/sample_data/grace_hopper.jpg"),
    Photo("users/grace/profile/grace_hopper_brighter.jpg", "pkg:matplotlib:mpl-data/sample_data/grace_hopper.jpg",
          "brighter"),
    Photo("users/grace/2024/rocket.jpg", "pkg:skimage:data/rocket.jpg"),
    Photo("users/grace/2024/hubble.jpg", "pkg:skimage:data/hubble_deep_field.jpg"),
    Photo("users/barack/profile/obama.jpg", "sdist:obama.jpg"),
    Photo("users/barack/profile/obama2.jpg", "sdist:obama2.jpg"),
    Photo("users/joe/profile/biden.jpg", "sdist:biden.jpg"),
    Photo("users/joe/profile/biden_mirrored.jpg", "sdist:biden.jpg", "mirror"),
    Photo("users/ben/2025/camera.png", "pkg:skimage:data/camera.png"),
    Photo("users/ben/2025/motorcycle_right.png", "pkg:skimage:data/motorcycle_right.png"),
    Photo("users/ben/2025/coins.png", "pkg:skimage:data/coins.png"),
)
# Night 2: ada uploads a group photo. No package ships a photo of two of these people together, so it is a
# collage of two real photos side by side: barack (obama3.jpg, a photo his template never saw) and joe
# (biden.jpg), whom the demo forgets before that night: his face must then match nobody.
GROUP_PHOTO: Final = "users/ada/2025/group_photo.jpg"
GROUP_SOURCES: Final = ("obama3.jpg", "biden.jpg")
FRIENDS: Final[tuple[tuple[str, str], ...]] = (("ada", "barack"), ("ada", "joe"), ("ada", "grace"), ("grace", "ben"))
FORGET_USER: Final = "joe"
USERS: Final = ("ada", "grace", "barack", "joe", "ben")


def _bomb_png(width: int = 60000, height: int = 60000) -> bytes:
    """A tiny PNG whose header claims 3.6 gigapixels: the decoder must refuse it, not allocate it."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


@lru_cache(maxsize=16)
def _sdist_image(name: str) -> bytes:
    archive = face_samples_dir() / FACE_SDIST
    if not archive.is_file():
        raise DemoSetupError(
            f"the demo's face photos come from {FACE_SDIST}, not found in {archive.parent}: run `make install` "
            f"(it runs `pip download --no-deps --no-binary :all: face_recognition==1.3.0 -d {archive.parent}`)")
    with tarfile.open(archive, "r:gz") as tar:
        member = tar.extractfile(FACE_SDIST_IMAGES + name)
        if member is None:
            raise DemoSetupError(f"{archive} has no {FACE_SDIST_IMAGES}{name}")
        return member.read()


def _source_bytes(source: str) -> bytes:
    kind, _, rest = source.partition(":")
    if kind == "sdist":
        return _sdist_image(rest)
    package, _, rel = rest.partition(":")
    return (package_folder(package) / rel).read_bytes()


def _jpeg(image: Any) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def _augment(data: bytes, how: str) -> bytes:
    from PIL import Image, ImageEnhance, ImageOps

    with Image.open(io.BytesIO(data)) as im:
        img = im.convert("RGB")
    if how == "mirror":
        return _jpeg(ImageOps.mirror(img))
    if how == "brighter":
        w, h = img.size
        return _jpeg(ImageEnhance.Brightness(img.crop((w // 12, 0, w - w // 12, h - h // 10))).enhance(1.2))
    raise ValueError(f"unknown augmentation {how!r}")


def group_photo() -> bytes:
    from PIL import Image

    parts = []
    for name in GROUP_SOURCES:
        with Image.open(io.BytesIO(_sdist_image(name))) as im:
            img = im.convert("RGB")
        parts.append(img.resize((round(img.width * 1200 / img.height), 1200), Image.Resampling.LANCZOS))
    out = Image.new("RGB", (sum(p.width for p in parts), 1200))
    x = 0
    for p in parts:
        out.paste(p, (x, 0))
        x += p.width
    return _jpeg(out)


def sample_photos() -> Iterator[tuple[str, bytes]]:
    """(key, bytes) of night 1's photo store: real sample photos, two-session profiles, broken files."""
    for photo in SAMPLE_PHOTOS:
        data = _source_bytes(photo.source)
        yield photo.key, _augment(data, photo.augment) if photo.augment else data
    jpeg = (package_folder("matplotlib") / "mpl-data/sample_data/grace_hopper.jpg").read_bytes()
    yield "users/ben/broken/truncated.jpg", jpeg[: len(jpeg) // 3]
    yield "users/ben/broken/empty.jpg", b""
    yield "users/ben/broken/notes.jpg", b"this is a text file, not a photo\n"
    yield "users/ben/broken/bomb.png", _bomb_png()


class PhotoStore:
    """Where the demo's photos live: a bucket of the embedded object store, or a local folder."""

    def __init__(self, s3: LocalS3 | None, folder: Path) -> None:
        self.s3, self.folder = s3, folder
        if s3 is not None:
            s3.create_bucket("photos")
            self.client = s3.settings().boto3_client(max_attempts=3)

    @property
    def uri(self) -> str:
        return "s3://photos/users/" if self.s3 is not None else str(self.folder / "users")

    def put(self, key: str, data: bytes) -> None:
        if self.s3 is not None:
            self.client.put_object(Bucket="photos", Key=key, Body=data)
        else:
            path = self.folder / key
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)


def _quiet_ray() -> None:
    """Start the local Ray before the jobs do, with its own start-up, progress and advice lines off: the
    demo's report is the output. (A real run keeps Ray's warnings; they go to the job's log.)"""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.issue_detectors_config.detectors = []
    for name in ("ray", "ray.data", "ray.data._internal.progress"):
        logging.getLogger(name).setLevel(logging.ERROR)


@contextlib.contextmanager
def _stderr_to(path: Path) -> Iterator[None]:
    """File descriptor 2 into ``path`` while the jobs run: the driver's Ray core worker writes its C++ log
    lines (actor-restart advice and the like) straight to it, past Python's logging."""
    sys.stderr.flush()
    saved = os.dup(2)
    with path.open("wb") as log:
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def print_queries(lake_root: str, storage_options: dict[str, str] | None) -> None:
    import duckdb
    from deltalake import DeltaTable

    from photolens.lake.storage import join_uri

    con = duckdb.connect()
    for name, sub in (("photos", "tables"), ("detections", "tables")):
        ds = DeltaTable(join_uri(lake_root, sub, name), storage_options=storage_options).to_pyarrow_dataset()
        con.register(name, ds)
    queries = {
        "top two objects per user (rolled up the category tree)": (
            "SELECT * FROM (SELECT user_id, category_path[len(category_path)] AS group_, category, "
            "count(DISTINCT photo_id) AS photos, round(max(score), 2) AS best FROM detections GROUP BY ALL) "
            "QUALIFY row_number() OVER (PARTITION BY user_id ORDER BY photos DESC, best DESC) <= 2 "
            "ORDER BY user_id, photos DESC, best DESC"
        ),
        "scenes (NULL: the model abstains), faces and privacy per photo": (
            "SELECT user_id, regexp_extract(uri, '[^/]+$') AS photo, scene_coarse, round(scene_coarse_score, 2) "
            "AS p, n_faces, is_private FROM photos WHERE status = 'ok' ORDER BY user_id, photo"
        ),
    }
    for title, sql in queries.items():
        print(f"\n-- {title}")
        con.sql(sql).show(max_width=120, max_rows=40)


def print_preferences(lake: str, storage_options: dict[str, str] | None) -> None:
    from photolens.jobs.preferences import run_preferences, top_interests

    as_of = dt.datetime.now(dt.UTC).date().isoformat()
    report = run_preferences(lake, as_of, storage_options=storage_options)
    print(f"\npreferences as of {as_of}: {report['users']} users, {report['rows']} rows, "
          f"{report['n_private_excluded']} private photos excluded")
    for user in ("ada", "grace", "ben"):
        rows = top_interests(lake, user, as_of=as_of, n=3, storage_options=storage_options).to_pylist()
        top = ", ".join(f"{r['category']} ({r['source']}, {r['score']:.2f})" for r in rows)
        print(f"  top interests of {user}: {top or '(none: no public photos with tags)'}")


def _import_friends(lake_uri: str, folder: Path) -> dict[str, Any]:
    """The friend graph as an app exports it (a CSV), through ``photolens friends import``."""
    from photolens.jobs.friends import FriendsConfig, import_friends

    path = folder / "friends.csv"
    path.write_text("user_id,friend_id\n" + "".join(f"{a},{b}\n" for a, b in FRIENDS), encoding="utf-8")
    return import_friends(FriendsConfig(lake=lake_uri, source=str(path), format="csv"))


def face_journey(lake_uri: str, index_store: str, photos: PhotoStore, tag: Any, workdir: Path) -> dict[str, Any]:
    """Templates -> friends -> index -> forget joe -> night 2 with a group photo -> suggestions."""
    from photolens.jobs.forget import ForgetConfig, forget_user
    from photolens.jobs.index import IndexBuildConfig, build_face_index
    from photolens.jobs.suggest import SuggestConfig, run_suggest
    from photolens.jobs.templates import TemplatesConfig, build_templates
    from photolens.lake.delta import Lake

    lake = Lake(lake_uri)
    print("\n== faces: owner templates, face index, forget, suggestions")
    augmented = [p.key.removeprefix("users/") for p in SAMPLE_PHOTOS if p.augment]
    print("  profile photos: barack has two real photos (obama.jpg, obama2.jpg); ada, grace and joe have one "
          "each,\n  so their second 'session' is made from it:\n    " + ", ".join(augmented))
    t = build_templates(TemplatesConfig(lake=lake_uri, run_id="demo-templates"))
    rows = lake.read("templates", ["user_id", "status", "reason", "n_profile_photos", "n_members"]).to_pylist()
    print(f"templates: {t['ok']} ok of {t['users']} users -> restricted table {lake.table_uri('templates')}")
    for r in sorted(rows, key=lambda r: r["user_id"]):
        state = f"{r['n_members']} vectors" if r["status"] == "ok" else f"none ({r['reason']})"
        print(f"  {r['user_id']:<7} {r['n_profile_photos']} profile photos -> {state}")
    f = _import_friends(lake_uri, workdir)
    print(f"friends import: {f['pairs_added']} pairs (" + ", ".join(f"{a}-{b}" for a, b in FRIENDS) + ")")
    built = build_face_index(IndexBuildConfig(lake=lake_uri, index_store=index_store, publish=True,
                                              run_id="demo-index", n_eval_queries=50))
    side = built["sidecar"]
    # A new deployment with a few users has fewer vectors than an 8-bit codec trains on: the build keeps an
    # exact index until the next build with enough vectors trains OPQ.
    print(f"face index {built['version']} (published): {side.get('n')} template vectors of "
          f"{side.get('n_users')} users, kind {side.get('kind')} ({side.get('flat_reason') or side.get('factory')})")

    receipt = forget_user(ForgetConfig(user=FORGET_USER, lake=lake_uri, index_store=index_store))
    deleted = {name: t["rows_deleted"] for name, t in receipt["tables"].items() if t["rows_deleted"]}
    index = receipt.get("index") or {}
    print(f"\nforget {FORGET_USER}: receipt {receipt['receipt_uri']}")
    print(f"  tombstone appended: {receipt['tombstone']['appended']}; rows deleted {receipt['rows_deleted']}: "
          + ", ".join(f"{k}={v}" for k, v in sorted(deleted.items())))
    print(f"  index: {index.get('versions_with_user')} of {index.get('versions_before')} versions held the user, "
          f"{index.get('removed_vectors_from_current')} vectors removed from the current one; vacuum retention "
          f"{receipt['vacuum']['retention_hours']} h; complete: {receipt['complete']}")

    photos.put(GROUP_PHOTO, group_photo())
    print(f"\nnight 2: ada uploads {GROUP_PHOTO.rsplit('/', 1)[-1]}, a collage of two real photos: barack "
          f"({GROUP_SOURCES[0]}, new to his template) and {FORGET_USER} ({GROUP_SOURCES[1]}, forgotten above)")
    night2 = tag("demo-night-2")
    print(f"  {night2.render().splitlines()[0]}; {night2.n_faces} faces")
    scfg = SuggestConfig(lake=lake_uri, index_store=index_store, photos_run="demo-night-2")
    s = run_suggest(scfg)
    how = f"calibrated on the templates at FAR {scfg.target_far:g}" if s.get("calibration") else "given"
    print(f"suggest: {s['faces']} faces, {s['with_candidates']} with candidates, {s['verified']} verified; "
          f"verification threshold {s['threshold']:.3f} ({how})")
    name = GROUP_PHOTO.rsplit("/", 1)[-1]
    group_id = next((r["photo_id"] for r in lake.read("photos", ["photo_id", "uri"]).to_pylist()
                     if r["uri"].endswith("/ada/2025/" + name)), None)
    boxes = {f["face_id"]: f["box"] for f in lake.read("faces", ["face_id", "box"]).to_pylist()}
    on_group = sorted((r for r in lake.read("suggestions").to_pylist() if r["photo_id"] == group_id),
                      key=lambda r: (boxes.get(r["face_id"]) or [0.0])[0])
    for side_name, r in zip(("left", "right"), on_group, strict=False):
        cands = ", ".join(f"{c} {d:.2f}" for c, d in zip(r["candidates"], r["distances"], strict=True))
        verdict = f"verified {r['verified_user_id']}" if r["verified"] else "not verified"
        print(f"  face on the {side_name}: candidates (nearest first, index distance) [{cands}] -> {verdict} "
              f"(exact distance {r['verify_distance']:.3f})")
    return {"group_photo_id": group_id, "group_suggestions": on_group, "suggest": s, "receipt": receipt,
            "templates": rows}


def run_demo(workdir: Path, use_s3: bool = True, keep: bool = False) -> int:
    from photolens.jobs.tag import TagConfig, run_tag
    from photolens.lake.delta import Lake

    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    # Every run tells the story from the start: the demo's fixed run ids would otherwise find night 1,
    # the templates and the forget already committed by the previous run.
    for sub in ("seaweedfs", "lake", "index", "photos"):
        shutil.rmtree(workdir / sub, ignore_errors=True)
    (workdir / "demo_summary.json").unlink(missing_ok=True)
    _sdist_image(GROUP_SOURCES[0])  # fails here, before anything starts, when the face photos are missing
    store = ModelStore(str(workdir / "models"))
    installed = store.install()
    print(f"model store {store.uri}: {', '.join(e.tag for e in installed)}")
    with contextlib.ExitStack() as stack:
        s3 = None
        if use_s3:
            s3 = stack.enter_context(LocalS3(workdir / "seaweedfs"))
            os.environ.update(s3.env())
            reset_s3_settings()
            s3.create_bucket("lake")
            s3.create_bucket("index")
            lake, index_store = "s3://lake/demo", "s3://index/faces"
        else:
            lake, index_store = str(workdir / "lake"), str(workdir / "index")
        photos = PhotoStore(s3, workdir / "photos")
        n = 0
        for key, data in sample_photos():
            photos.put(key, data)
            n += 1
        where = f"SeaweedFS at {s3.endpoint}" if s3 is not None else "a local folder"
        print(f"photo store {photos.uri} ({where}): {n} files of {len(USERS)} users")
        ray_log = workdir / "ray-driver.log"
        stack.enter_context(_stderr_to(ray_log))
        _quiet_ray()

        def tag(run_id: str) -> Any:
            return run_tag(TagConfig(photos=photos.uri, lake=lake, run_id=run_id, model_store=store.uri,
                                     min_actors=1, max_actors=1))

        print("\n== night 1: tagging")
        print(tag("demo-night-1").render())
        lake_obj = Lake(lake)
        print_queries(lake_obj.root, lake_obj.storage_options())
        summary = face_journey(lake, index_store, photos, tag, workdir)
        # After night 2: the snapshot covers every photo the tables hold now.
        print_preferences(lake, lake_obj.storage_options())
        (workdir / "demo_summary.json").write_text(json.dumps(summary, indent=1, default=str), encoding="utf-8")
        print(f"\nRay's own log lines: {ray_log}")
        if keep and use_s3:
            print(f"\nobject store still running at {os.environ['AWS_ENDPOINT_URL']}; Ctrl-C to stop")
            with contextlib.suppress(KeyboardInterrupt):
                import time

                while True:
                    time.sleep(3600)
    return 0


def summary_of(workdir: Path) -> Mapping[str, Any]:
    """The summary a finished demo left in its work folder."""
    summary: Mapping[str, Any] = json.loads((workdir / "demo_summary.json").read_text(encoding="utf-8"))
    return summary
