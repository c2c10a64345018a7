"""Fault injection: whatever breaks, nothing is lost.

Every scenario ends with the same check: the ``photos`` table holds exactly the manifest's photo ids (computed
here from the store or the manifest, not by the planner), once each, every row ``ok`` or ``error`` with a code
and a stage, and running the same run id again changes no table version.

F1 a worker node killed mid-run (simulated 3-node Ray cluster) · F2 the driver killed between its commits,
restarted under the same or a new run id · F3 throttling (503 SlowDown), 500s and connection resets from the
object store, through a fault-injecting proxy · F4 objects deleted or overwritten after the manifest was taken ·
F5 concurrent writers on one Delta table, and two drivers running the same run id · F6 schema drift (old
table, unexpected manifest column) · F8 a decode that takes too long.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from deltalake import write_deltalake
from deltalake.exceptions import CommitFailedError
from faultproxy import Fault, FaultProxy
from PIL import Image

from photolens.jobs.tag import TagConfig, run_tag
from photolens.lake.delta import Lake
from photolens.lake.photostore import ManifestError
from photolens.lake.storage import exists
from photolens.schemas.tables import PHOTOS, SchemaMismatchError

pytestmark = [pytest.mark.s3]

TESTS = Path(__file__).resolve().parent
TABLES = ("photos", "detections", "faces", "runs")
REAL = ["dog.jpg", "horses.jpg", "kite.jpg", "fruits.jpg", "eagle.jpg", "giraffe.jpg", "person.jpg"]
DETECTABLE = ["dog.jpg", "horses.jpg", "kite.jpg", "giraffe.jpg", "person.jpg"]


# ---------------------------------------------------------------------------------------------- helpers


def _id(uri: str, etag: str) -> str:
    return hashlib.blake2b(f"{uri}\x00etag:{etag}".encode(), digest_size=16).hexdigest()


def _local_id(path: Path) -> str:
    st = path.stat()
    ident = f"{path.resolve()}\x00size:{st.st_size}\x00mtime:{st.st_mtime_ns // 1000}"
    return hashlib.blake2b(ident.encode(), digest_size=16).hexdigest()


def _client(local_s3: Any) -> Any:
    return local_s3.settings().boto3_client(max_attempts=3)


def _put_photos(local_s3: Any, bucket: str, shared: Path, names: list[str], users: tuple[str, ...] = ("u1", "u2"),
                copies: int = 1) -> set[str]:
    local_s3.create_bucket(bucket)
    client = _client(local_s3)
    keys = set()
    for c in range(copies):
        for i, name in enumerate(names):
            key = f"users/{users[(i + c) % len(users)]}/{c:03d}-{name}"
            client.put_object(Bucket=bucket, Key=key, Body=(shared / "photos" / name).read_bytes())
            keys.add(key)
    return keys


def _listing_ids(local_s3: Any, bucket: str) -> set[str]:
    """Photo ids of every object in the bucket: blake2b(uri, etag) from the store's own listing."""
    out = set()
    for page in _client(local_s3).get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            out.add(_id(f"s3://{bucket}/{obj['Key']}", obj["ETag"].strip('"')))
    return out


def _versions(lake: Lake) -> dict[str, int | None]:
    return {n: lake.version(n) for n in TABLES}


def assert_nothing_lost(lake: Lake, expected: set[str]) -> pa.Table:
    photos = lake.read("photos")
    ids = photos.column("photo_id").to_pylist()
    assert len(ids) == len(set(ids)), f"{len(ids) - len(set(ids))} duplicate photo rows"
    assert set(ids) == expected, f"missing {len(expected - set(ids))}, unexpected {len(set(ids) - expected)}"
    for row in photos.to_pylist():
        assert row["status"] in ("ok", "error"), row
        if row["status"] == "error":
            assert row["error_code"] and row["error_stage"], row
        else:
            assert row["error_code"] is None and row["error_stage"] is None, row
    return photos


def _by_key(photos: pa.Table) -> dict[str, dict[str, Any]]:
    return {r["uri"].split("/", 3)[-1]: r for r in photos.to_pylist()}


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "AWS_EC2_METADATA_DISABLED": "true", **extra}
    for k in ("PHOTOLENS_FAULT", "RAY_ADDRESS"):
        if k not in extra:
            env.pop(k, None)
    return env


def _run_cli(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "photolens.cli", "tag", *args], env=env or _env(),
                          capture_output=True, text=True, timeout=600, check=False)


def _report(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _rerun_changes_nothing(lake: Lake, args: list[str], env: dict[str, str] | None = None) -> None:
    before = _versions(lake)
    again = _report(_run_cli(args, env))
    assert again["status"] == "already committed"
    assert _versions(lake) == before


def _ledger(lake: Lake, run_id: str) -> dict[str, Any]:
    return lake.get_json(lake.meta_uri("runs", f"{run_id}.json")) or {}


# ---------------------------------------------------------------------------------------------- F1


@pytest.mark.slow
def test_f1_worker_node_killed_mid_run(local_s3: Any, shared_data: Path) -> None:
    """Ray restarts the killed node's actors and retries their tasks; the run commits exactly its manifest."""
    bucket, lake_uri = "f1-photos", "s3://f1-lake/lake"
    local_s3.create_bucket("f1-lake")
    names = sorted(p.name for p in (shared_data / "photos").iterdir() if p.suffix in (".jpg", ".png"))
    keys = _put_photos(local_s3, bucket, shared_data, names, users=("u1", "u2", "u3"), copies=2)
    expected = _listing_ids(local_s3, bucket)
    # A short private temp dir: Cluster() records its address there, where no other Ray on this machine looks.
    with tempfile.TemporaryDirectory(prefix="rf1-", dir="/tmp") as ray_tmp:
        out = Path(ray_tmp) / "result.json"
        proc = subprocess.run(
            [sys.executable, str(TESTS / "faultcluster.py"), "--photos", f"s3://{bucket}/users/", "--lake", lake_uri,
             "--run-id", "f1-night", "--out", str(out), "--kill-after", "2"],
            env=_env(RAY_TMPDIR=ray_tmp), capture_output=True, text=True, timeout=600, check=False)
        assert proc.returncode == 0, proc.stderr[-4000:]
        result = json.loads(out.read_text())
    killed, report = result["killed"], result["report"]
    # The kill was real and came mid-run: the node hosted the write actor (the slowest stage, never idle), which
    # Ray restarted on the other worker, and most of the run (batches of 2 photos) was still to come.
    assert killed, "the watcher never saw staged batches with actors on a worker node"
    assert killed["actors"] and killed["used_cpus"] > 0
    writers = [a["id"] for a in killed["actors"] if "WriteUDF" in a["class"]]
    assert writers and all(result["fates"][a]["restarts"] >= 1 for a in writers), (killed, result["fates"])
    assert killed["staged_at_kill"] < len(keys) / 4
    assert killed["removed_at"] < result["finished_at"]

    lake = Lake(lake_uri)
    photos = assert_nothing_lost(lake, expected)
    assert report["status"] == "committed" and report["n_todo"] == len(keys)
    assert set(photos.column("status").to_pylist()) == {"ok"}
    assert report["status_counts"] == {"ok": len(keys)}
    assert lake.read("runs").column("run_id").to_pylist() == ["f1-night"]
    _rerun_changes_nothing(lake, ["--photos", f"s3://{bucket}/users/", "--lake", lake_uri, "--stages", "decode",
                                  "--run-id", "f1-night", "--json"])


# ---------------------------------------------------------------------------------------------- F2


@pytest.mark.slow
def test_f2_driver_killed_before_committing_detections_then_restarted(local_s3: Any, shared_data: Path) -> None:
    bucket, lake_uri = "f2-detections", "s3://f2-detections-lake/lake"
    local_s3.create_bucket("f2-detections-lake")
    keys = _put_photos(local_s3, bucket, shared_data, REAL)
    args = ["--photos", f"s3://{bucket}/users/", "--lake", lake_uri, "--stages", "decode", "--batch-size", "2",
            "--run-id", "f2-night", "--json"]
    killed = _run_cli(args, _env(PHOTOLENS_FAULT="crash_before_commit=detections"))
    assert killed.returncode == 137, killed.stderr[-2000:]
    lake = Lake(lake_uri)
    assert all(v is None for v in _versions(lake).values())  # nothing was committed anywhere
    assert _ledger(lake, "f2-night")["state"] == "started"

    done = _report(_run_cli(args))
    assert done["attempt"] == 2 and done["n_todo"] == len(keys)
    assert_nothing_lost(lake, _listing_ids(local_s3, bucket))
    assert _ledger(lake, "f2-night")["state"] == "committed"
    assert lake.read("runs").num_rows == 1
    _rerun_changes_nothing(lake, args)


@pytest.mark.slow
def test_f2_orphaned_run_rolled_back_when_a_new_run_id_starts(local_s3: Any, shared_data: Path,
                                                              model_store: str) -> None:
    """Run A dies after committing its detections but before ``photos``; run B (a new id) rolls A back."""
    bucket, lake_uri = "f2-newid", "s3://f2-newid-lake/lake"
    local_s3.create_bucket("f2-newid-lake")
    _put_photos(local_s3, bucket, shared_data, DETECTABLE)
    common = ["--photos", f"s3://{bucket}/users/", "--lake", lake_uri, "--stages", "decode,detect",
              "--model-store", model_store, "--batch-size", "2", "--json"]
    killed = _run_cli([*common, "--run-id", "night-a"], _env(PHOTOLENS_FAULT="crash_before_commit=photos"))
    assert killed.returncode == 137, killed.stderr[-2000:]
    lake = Lake(lake_uri)
    orphans = lake.read("detections")
    assert orphans.num_rows > 0 and set(orphans.column("run_id").to_pylist()) == {"night-a"}
    assert lake.read("photos").num_rows == 0
    assert _ledger(lake, "night-a")["state"] == "started"

    b = _report(_run_cli([*common, "--run-id", "night-b"]))
    assert b["status"] == "committed" and b["n_todo"] == len(DETECTABLE)
    assert _ledger(lake, "night-a")["state"] == "rolled_back"
    photos = assert_nothing_lost(lake, _listing_ids(local_s3, bucket))
    assert set(photos.column("run_id").to_pylist()) == {"night-b"}
    dets = lake.read("detections")
    assert set(dets.column("run_id").to_pylist()) == {"night-b"}  # A's rows are gone
    pairs = list(zip(dets.column("photo_id").to_pylist(), dets.column("det_index").to_pylist(), strict=True))
    assert len(pairs) == len(set(pairs)) == b["n_detections"] > 0
    assert set(dets.column("photo_id").to_pylist()) <= set(photos.column("photo_id").to_pylist())
    assert lake.read("runs").column("run_id").to_pylist() == ["night-b"]
    _rerun_changes_nothing(lake, [*common, "--run-id", "night-b"])


# ---------------------------------------------------------------------------------------------- F3 + F4

ATTEMPTS = 3  # fetch_attempts of the proxied runs
# key (under users/u1/) → (fault kind, how many requests fail): below the attempt limit the read succeeds.
FAULTS = {
    "slow2.jpg": ("slowdown", ATTEMPTS - 1),
    "internal-at-limit.jpg": ("internal", ATTEMPTS),
    "reset1.jpg": ("reset", 1),
    "reset-at-limit.jpg": ("reset", ATTEMPTS),
    "unavailable-at-limit.jpg": ("unavailable", ATTEMPTS),
}
CLEAN = ["dog.jpg", "horses.jpg", "fruits.jpg"]


@dataclass
class ProxiedNights:
    expected: set[str]
    night1: dict[str, Any]
    photos1: pa.Table
    counts1: dict[str, int]
    versions1: dict[str, int | None]
    rerun: dict[str, Any]
    versions_after_rerun: dict[str, int | None]
    counts_after_rerun: dict[str, int]
    night2: dict[str, Any]
    photos2: pa.Table
    counts2: dict[str, int]


@pytest.fixture(scope="module")
def proxied_nights(local_s3: Any, shared_data: Path,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxiedNights]:
    """Two nights through a fault-injecting proxy; photo reads only (the lake and manifest are local)."""
    bucket = "faulty"
    local_s3.create_bucket(bucket)
    client = _client(local_s3)
    dog = (shared_data / "photos" / "dog.jpg").read_bytes()
    bodies = {f"users/u1/{k}": dog for k in FAULTS}
    bodies |= {f"users/u2/{n}": (shared_data / "photos" / n).read_bytes() for n in CLEAN}
    bodies |= {"users/u2/gone.jpg": dog, "users/u2/changed.jpg": dog}
    etags = {}
    for key, body in bodies.items():
        client.put_object(Bucket=bucket, Key=key, Body=body)
        etags[key] = client.head_object(Bucket=bucket, Key=key)["ETag"].strip('"')
    work = tmp_path_factory.mktemp("proxied")
    manifest = work / "manifest.csv"
    with manifest.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["key", "etag"])
        w.writerows(sorted(etags.items()))
    # After the manifest was taken: one object deleted, one overwritten (new bytes, new etag).
    client.delete_object(Bucket=bucket, Key="users/u2/gone.jpg")
    client.put_object(Bucket=bucket, Key="users/u2/changed.jpg",
                      Body=(shared_data / "photos" / "eagle.jpg").read_bytes())
    expected = {_id(f"s3://{bucket}/{k}", e) for k, e in etags.items()}

    config = work / "night.yaml"
    config.write_text(f"fetch_attempts: {ATTEMPTS}\nfetch_base_delay_s: 0.01\nprogress: false\n")
    lake = Lake(str(work / "lake"))
    faults = [Fault(f"users/u1/{k}", kind, times) for k, (kind, times) in FAULTS.items()]

    def args(run_id: str) -> list[str]:
        return ["--photos", f"s3://{bucket}/", "--manifest", str(manifest), "--lake", lake.root, "--stages",
                "decode", "--batch-size", "2", "--config", str(config), "--run-id", run_id, "--json"]

    with FaultProxy(local_s3.endpoint, faults) as proxy:
        env = _env(AWS_ENDPOINT_URL=proxy.endpoint, PHOTOLENS_S3_ENDPOINT=proxy.endpoint)

        def counts() -> dict[str, int]:
            return {k: proxy.count(k) for k in bodies}

        night1 = _report(_run_cli(args("p1"), env))
        photos1, counts1, versions1 = lake.read("photos"), counts(), _versions(lake)
        rerun = _report(_run_cli(args("p1"), env))
        versions_after_rerun, counts_after_rerun = _versions(lake), counts()
        # The next night: every fault rule is used up, so the transient failures now read fine.
        night2 = _report(_run_cli(args("p2"), env))
        yield ProxiedNights(expected, night1, photos1, counts1, versions1, rerun, versions_after_rerun,
                            counts_after_rerun, night2, lake.read("photos"), counts())


@pytest.mark.slow
def test_f3_throttling_errors_and_resets_are_retried_within_bounds(proxied_nights: ProxiedNights) -> None:
    n = proxied_nights
    rows = _by_key(n.photos1)
    for name, (_, times) in FAULTS.items():
        key = f"users/u1/{name}"
        if times < ATTEMPTS:
            assert rows[key]["status"] == "ok", rows[key]
            assert n.counts1[key] == times + 1  # retried just until it worked
        else:
            assert (rows[key]["status"], rows[key]["error_code"], rows[key]["error_stage"]) == (
                "error", "FETCH_TRANSIENT", "fetch"), rows[key]
            assert n.counts1[key] == ATTEMPTS  # no retry storm: the fetcher's bound is the only one
    for name in CLEAN:
        assert rows[f"users/u2/{name}"]["status"] == "ok"
        assert n.counts1[f"users/u2/{name}"] == 1
    # The job finished and says what happened.
    at_limit = sum(1 for _, t in FAULTS.values() if t >= ATTEMPTS)
    assert n.night1["status"] == "committed"
    assert n.night1["error_counts"]["FETCH_TRANSIENT"] == at_limit


@pytest.mark.slow
def test_f4_objects_gone_or_changed_after_the_manifest_fail_fast(proxied_nights: ProxiedNights) -> None:
    rows = _by_key(proxied_nights.photos1)
    gone, changed = rows["users/u2/gone.jpg"], rows["users/u2/changed.jpg"]
    assert (gone["status"], gone["error_code"], gone["error_stage"]) == ("error", "FETCH_NOT_FOUND", "fetch")
    assert (changed["status"], changed["error_code"], changed["error_stage"]) == ("error", "FETCH_CHANGED", "fetch")
    # Permanent: one request each, this night and every later one (they are not planned again).
    assert proxied_nights.counts1["users/u2/gone.jpg"] == 1
    assert proxied_nights.counts1["users/u2/changed.jpg"] == 1
    assert proxied_nights.counts2["users/u2/gone.jpg"] == 1
    assert proxied_nights.counts2["users/u2/changed.jpg"] == 1


@pytest.mark.slow
def test_f3_f4_nothing_lost_rerun_idle_and_next_night_heals(proxied_nights: ProxiedNights, tmp_path: Path) -> None:
    n = proxied_nights
    ids = n.photos1.column("photo_id").to_pylist()
    assert len(ids) == len(set(ids)) and set(ids) == n.expected
    # Same run id again: no table changes, and not a single photo read.
    assert n.rerun["status"] == "already committed"
    assert n.versions_after_rerun == n.versions1
    assert n.counts_after_rerun == n.counts1
    # Next night: exactly the transient failures are processed again, now ok; still one row per photo.
    transient = {k for k, r in _by_key(n.photos1).items() if r["error_code"] == "FETCH_TRANSIENT"}
    assert n.night2["n_todo"] == len(transient)
    rows2 = _by_key(n.photos2)
    assert all(rows2[k]["status"] == "ok" and rows2[k]["run_id"] == "p2" for k in transient)
    ids2 = n.photos2.column("photo_id").to_pylist()
    assert len(ids2) == len(set(ids2)) and set(ids2) == n.expected
    assert {k for k, r in rows2.items() if r["status"] == "error"} == {"users/u2/gone.jpg", "users/u2/changed.jpg"}


# ---------------------------------------------------------------------------------------------- F5


def _photo_rows(tag: str, n: int) -> pa.Table:
    return pa.table({"photo_id": [hashlib.blake2b(f"{tag}/{i}".encode(), digest_size=16).hexdigest() for i in range(n)],
                     "user_id": ["u1"] * n, "uri": [f"s3://x/users/u1/{tag}-{i}.jpg" for i in range(n)],
                     "status": ["ok"] * n, "run_id": [tag] * n, "run_date": ["2026-11-20"] * n})


def test_f5_two_writers_commit_to_one_s3_table_at_once(local_s3: Any) -> None:
    local_s3.create_bucket("f5-lake")
    lake_uri, rounds, rows_each = "s3://f5-lake/concurrent", 4, 20
    barrier = threading.Barrier(2)
    outcomes: dict[str, str] = {}  # app id → "ok" | "refused"
    crashes: list[BaseException] = []

    def writer(w: int) -> None:
        lake = Lake(lake_uri)  # each writer its own Lake and table handles, as two processes would have
        try:
            for r in range(rounds):
                app = f"writer-{w}/round-{r}"
                rows = _photo_rows(app, rows_each)
                barrier.wait(timeout=60)
                try:
                    if r % 2:  # the job's path: staged files, then a commit of them
                        lake.commit_staged("photos", lake.stage("photos", rows, f"w{w}r{r}"), app, 1)
                    else:
                        lake.append("photos", rows, app_id=app)
                    outcomes[app] = "ok"
                except CommitFailedError:
                    outcomes[app] = "refused"  # a clean refusal: nothing of it may be visible
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread below
            crashes.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    if crashes:
        raise crashes[0]
    assert len(outcomes) == 2 * rounds
    ok = sorted(a for a, o in outcomes.items() if o == "ok")
    assert all(any(outcomes[f"writer-{w}/round-{r}"] == "ok" for w in range(2)) for r in range(rounds))

    lake = Lake(lake_uri)
    table = lake.open("photos")
    assert table is not None
    data = table.to_pyarrow_table()
    assert data.num_rows == rows_each * len(ok)
    assert sorted(set(data.column("run_id").to_pylist())) == ok
    assert len(set(data.column("photo_id").to_pylist())) == data.num_rows
    history = sorted(table.history(), key=lambda h: h["version"])
    assert [h["version"] for h in history] == list(range(table.version() + 1))  # linear, no gaps
    assert sum(1 for h in history if h.get("photolens.app_id")) == len(ok)
    for app, outcome in outcomes.items():
        assert table.transaction_version(app) == (1 if outcome == "ok" else None)


@pytest.mark.slow
@pytest.mark.parametrize("start", ["together", "staggered"])
def test_f5_two_drivers_with_the_same_run_id_land_one_set_of_rows(local_s3: Any, shared_data: Path,
                                                                  start: str) -> None:
    """A scheduler starts the same night twice: at once, or the second while the first is mid-run."""
    bucket, lake_uri = f"f5-twins-{start}", f"s3://f5-twins-{start}-lake/lake"
    local_s3.create_bucket(f"f5-twins-{start}-lake")
    keys = _put_photos(local_s3, bucket, shared_data, REAL, copies=3)
    lake = Lake(lake_uri)
    args = ["--photos", f"s3://{bucket}/users/", "--lake", lake_uri, "--stages", "decode", "--batch-size", "2",
            "--run-id", "twin-night", "--json"]

    def launch() -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-m", "photolens.cli", "tag", *args], env=_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    procs = [launch()]
    if start == "staggered":
        # The second driver starts once the first has recorded its attempt and is planning or processing.
        deadline = time.monotonic() + 120
        while _ledger(lake, "twin-night").get("state") != "started":
            assert time.monotonic() < deadline and procs[0].poll() is None, "the first driver never started"
            time.sleep(0.05)
    procs.append(launch())
    results = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        results.append((p.returncode, out, err))
    # One set of rows lands: the driver that took the run's lease commits; the other finds the run live and
    # stops at once with a one-line message (exit 3), or, starting after the first finished, commits nothing.
    assert any(rc == 0 for rc, _, _ in results), [err[-2000:] for _, _, err in results]
    for rc, _, err in results:
        assert rc in (0, 3), err[-2000:]
        if rc == 3:
            assert "being driven by another driver" in err and "Traceback" not in err, err[-2000:]
    assert_nothing_lost(lake, _listing_ids(local_s3, bucket))
    assert lake.read("photos").num_rows == len(keys)
    assert lake.read("runs").column("run_id").to_pylist() == ["twin-night"]
    photos_commits = [h for h in lake.open("photos").history() if h.get("photolens.app_id")]
    assert len(photos_commits) == 1
    _rerun_changes_nothing(lake, args)


# ---------------------------------------------------------------------------------------------- F6


def _old_photos_schema(change: str) -> pa.Schema:
    fields = [f for f in PHOTOS if not (change == "missing" and f.name == "phash")]
    if change == "retyped":
        fields = [pa.field("width", pa.int64()) if f.name == "width" else f for f in fields]
    return pa.schema(fields)


@pytest.mark.parametrize(("change", "column"), [("missing", "phash"), ("retyped", "width")])
def test_f6_photos_table_of_another_schema_stops_the_run_before_any_commit(tmp_path: Path, shared_data: Path,
                                                                           change: str, column: str) -> None:
    lake = Lake(str(tmp_path / "lake"))
    schema = _old_photos_schema(change)
    row = {"photo_id": "0" * 32, "user_id": "u1", "uri": "/old.jpg", "status": "ok", "run_id": "old",
           "run_date": "2025-01-01"}
    old = pa.Table.from_pylist([row], schema=schema)
    write_deltalake(lake.table_uri("photos"), old, partition_by=["run_date"])
    before = _versions(lake)
    cfg = TagConfig(photos=str(shared_data / "photos"), lake=lake.root, stages=("decode",), run_id="drift",
                    progress=False)
    with pytest.raises(SchemaMismatchError, match=column):
        run_tag(cfg)
    assert _versions(lake) == before  # photos untouched, no other table created
    assert not exists(lake.meta_uri("runs", "drift.json"))  # stopped before the run even started
    assert not exists(lake.meta_uri("staging", "drift"))


def test_f6_unexpected_manifest_column_stops_the_run_before_any_commit(tmp_path: Path) -> None:
    lake = Lake(str(tmp_path / "lake"))
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("key,etag,owner_email\nusers/u1/a.jpg,abc,someone@example.com\n")
    cfg = TagConfig(photos=str(tmp_path), manifest=str(manifest), lake=lake.root, stages=("decode",),
                    run_id="bad-manifest", progress=False)
    with pytest.raises(ManifestError, match="owner_email"):
        run_tag(cfg)
    assert all(v is None for v in _versions(lake).values())
    # Planning fails before the ledger entry is written: nothing of the run exists.
    assert not exists(lake.meta_uri("runs", "bad-manifest.json"))


# ---------------------------------------------------------------------------------------------- F8


def _slow_png() -> bytes:
    # A legal 16-bit greyscale scan of 88 Mpx (under Pillow's bomb limit): 170 KB that take seconds to decode.
    buf = io.BytesIO()
    Image.new("I;16", (9400, 9400)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.slow
def test_f8_a_decode_that_hangs_is_bounded_and_the_job_finishes(ray_local: None, shared_data: Path,
                                                                tmp_path: Path) -> None:
    photos = tmp_path / "photos" / "users"
    (photos / "u1").mkdir(parents=True)
    (photos / "u2").mkdir()
    for i, name in enumerate(["dog.jpg", "horses.jpg", "fruits.jpg"]):
        (photos / f"u{1 + i % 2}" / name).write_bytes((shared_data / "photos" / name).read_bytes())
    slow = photos / "u1" / "scan16.png"
    slow.write_bytes(_slow_png())
    expected = {_local_id(p) for p in photos.rglob("*") if p.is_file()}
    lake = Lake(str(tmp_path / "lake"))
    cfg = TagConfig(photos=str(photos), lake=lake.root, stages=("decode",), batch_size=2, progress=False,
                    decode_time_limit_s=0.5, run_id="hang-1")

    report = run_tag(cfg)
    assert report.status == "committed"
    rows = {Path(r["uri"]).name: r for r in assert_nothing_lost(lake, expected).to_pylist()}
    assert (rows["scan16.png"]["error_code"], rows["scan16.png"]["error_stage"]) == ("DECODE_TIMEOUT", "decode")
    assert all(rows[n]["status"] == "ok" for n in ("dog.jpg", "horses.jpg", "fruits.jpg"))
    assert report.error_counts == {"DECODE_TIMEOUT": 1}
    before = _versions(lake)
    assert run_tag(cfg).status == "already committed"
    assert _versions(lake) == before

    # A timeout is transient: the next night, with room to finish, decodes it; still one row per photo.
    later = run_tag(TagConfig(photos=str(photos), lake=lake.root, stages=("decode",), batch_size=2, progress=False,
                              decode_time_limit_s=120.0, run_id="hang-2"))
    assert later.n_todo == 1
    rows = {Path(r["uri"]).name: r for r in assert_nothing_lost(lake, expected).to_pylist()}
    assert rows["scan16.png"]["status"] == "ok" and rows["scan16.png"]["width"] == 9400
