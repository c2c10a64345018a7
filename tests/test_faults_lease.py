"""Run leases, rollback that restores, ledger reads that never mistake a failure for absence, error budget.

The first part drives the building blocks directly on real stores (a local folder and the SeaweedFS server):
conditional writes, the lease, Delta rollback. The second runs the tagging job with model stages on (decode,
detect, faces) over a few real photos and compares every table with one uninterrupted reference run:
exactly the same photo ids, detections and faces, nothing lost, nothing doubled.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from faultproxy import Fault, FaultProxy

from photolens.lake.delta import READ_ATTEMPTS, Lake, LakeUnavailableError, UnrolledAttemptError
from photolens.lake.lease import LeaseHeldError, LeaseLostError, RunLease, lease_is_live
from photolens.lake.storage import (
    PreconditionFailedError,
    S3Settings,
    delete_conditional,
    read_versioned,
    write_conditional,
)

pytestmark = [pytest.mark.s3]


@pytest.fixture(params=["local", "s3"])
def store_root(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, S3Settings | None]]:
    if request.param == "local":
        yield str(tmp_path / "lake"), None
        return
    local_s3 = request.getfixturevalue("local_s3")
    bucket = "lease-" + hashlib.blake2b(str(tmp_path).encode(), digest_size=4).hexdigest()
    local_s3.create_bucket(bucket)
    yield f"s3://{bucket}/lake", local_s3.settings()


# ---------------------------------------------------------------------------------------------- building blocks


def test_conditional_writes_decide_races_in_the_store(store_root: tuple[str, S3Settings | None]) -> None:
    root, s3 = store_root
    uri = root + "/_photolens/runs/r.json"
    assert read_versioned(uri, s3) is None
    v1 = write_conditional(uri, b"one", s3, if_absent=True)
    with pytest.raises(PreconditionFailedError):
        write_conditional(uri, b"two", s3, if_absent=True)
    with pytest.raises(PreconditionFailedError):
        write_conditional(uri, b"two", s3, if_match='"0123456789abcdef0123456789abcdef"')
    got = read_versioned(uri, s3)
    assert got is not None and (got.data, got.etag) == (b"one", v1)
    v2 = write_conditional(uri, b"two", s3, if_match=v1)
    assert v2 != v1
    with pytest.raises(PreconditionFailedError):  # the version it was read at is gone
        write_conditional(uri, b"three", s3, if_match=v1)
    with pytest.raises(PreconditionFailedError):
        delete_conditional(uri, v1, s3)
    delete_conditional(uri, v2, s3)
    assert read_versioned(uri, s3) is None


def _doc(current: dict[str, Any] | None) -> dict[str, Any]:
    return {"run_id": "r", "attempt": int((current or {}).get("attempt", 0)) + 1, "state": "started"}


def test_one_live_holder_and_takeover_only_after_expiry(store_root: tuple[str, S3Settings | None]) -> None:
    root, s3 = store_root
    lake = Lake(root, s3=s3)
    first = RunLease(lake, "r", seconds=3)
    assert first.acquire(_doc)["attempt"] == 1
    first.start_heartbeat()
    second = RunLease(lake, "r", seconds=3)
    # The heartbeat keeps the lease live well past its length.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with pytest.raises(LeaseHeldError, match="another driver"):
            second.acquire(_doc)
        time.sleep(0.5)
    first.check()  # still ours
    first.stop_heartbeat()
    time.sleep(3.2)  # no beat: the lease runs out
    assert not lease_is_live(lake.get_json(first.uri))
    assert second.acquire(_doc)["attempt"] == 2
    with pytest.raises(LeaseLostError):
        first.check()
    with pytest.raises(LeaseLostError):
        first.release(state="committed")
    assert lake.get_json(second.uri)["lease"]["owner"] == second.holder.owner
    second.release(state="committed")
    assert not lease_is_live(lake.get_json(second.uri))


def test_a_dead_holder_on_this_machine_is_not_waited_for(tmp_path: Path) -> None:
    lake = Lake(str(tmp_path / "lake"))
    child = subprocess.run(
        [sys.executable, "-c", "from photolens.lake.delta import Lake; from photolens.lake.lease import RunLease; "
         f"RunLease(Lake({lake.root!r}), 'r', 300).acquire(lambda c: {{'attempt': 1, 'state': 'started'}})"],
        capture_output=True, text=True, timeout=120, check=False)
    assert child.returncode == 0, child.stderr
    doc = lake.get_json(lake.meta_uri("runs", "r.json"))
    assert doc["lease"]["expires_at"] > time.time() + 200  # unexpired, yet its process is gone
    assert not lease_is_live(doc)
    assert RunLease(lake, "r", 300).acquire(_doc)["attempt"] == 2


def test_ledger_read_failures_are_retried_then_fail_never_absent(local_s3: Any) -> None:
    local_s3.create_bucket("ledger-503")
    key = "lake/_photolens/runs/r.json"
    Lake("s3://ledger-503/lake", s3=local_s3.settings()).put_json(f"s3://ledger-503/{key}", {"attempt": 4})
    with FaultProxy(local_s3.endpoint, [Fault(key, "unavailable", READ_ATTEMPTS + READ_ATTEMPTS - 1)]) as proxy:
        base = local_s3.settings()
        lake = Lake("s3://ledger-503/lake", s3=S3Settings(proxy.endpoint, base.region, base.access_key,
                                                           base.secret_key, None))
        with pytest.raises(LakeUnavailableError, match="rather than treating it as absent"):
            lake.get_json(f"s3://ledger-503/{key}")
        assert proxy.count(key) == READ_ATTEMPTS
        # Below the bound the read succeeds, with the real content.
        assert lake.get_json(f"s3://ledger-503/{key}") == {"attempt": 4}
        assert proxy.count(key) == 2 * READ_ATTEMPTS
        assert lake.get_json("s3://ledger-503/lake/_photolens/runs/absent.json") is None


def _det_rows(run_id: str, photos: list[str], per_photo: int = 2) -> pa.Table:
    rows = [{"photo_id": p, "user_id": "u1", "det_index": i, "category": "dog", "category_path": ["dog", "animal"],
             "score": 0.9, "box": [0.1, 0.1, 0.5, 0.5], "model": "m", "run_id": run_id, "run_date": "2026-11-20"}
            for p in photos for i in range(per_photo)]
    return pa.Table.from_pylist(rows)


def _photo_rows(run_id: str, photos: list[str]) -> pa.Table:
    return pa.Table.from_pylist([{"photo_id": p, "user_id": "u1", "uri": f"/x/{p}.jpg", "status": "ok",
                                  "run_id": run_id, "run_date": "2026-11-20"} for p in photos])


def _pid(i: int) -> str:
    return hashlib.blake2b(str(i).encode(), digest_size=16).hexdigest()


def _dets(lake: Lake) -> list[tuple[str, int, str]]:
    t = lake.read("detections", ["photo_id", "det_index", "run_id"])
    return sorted(zip(t.column("photo_id").to_pylist(), t.column("det_index").to_pylist(),
                      t.column("run_id").to_pylist(), strict=True))


def _replace(lake: Lake, run_id: str, ids: list[str]) -> Any:
    from photolens.lake.delta import Replacement

    shard = lake.meta_uri("staging", run_id, "replace.parquet")
    Path(shard).parent.mkdir(parents=True, exist_ok=True)
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"photo_id": pa.array(ids, pa.string())}), shard)
    return Replacement("photo_id", (shard,), len(ids), run_id=run_id)


@pytest.mark.parametrize("later_commit", [False, True], ids=["restore", "rows"])
def test_rollback_of_a_reprocess_commit_brings_the_old_rows_back(tmp_path: Path, later_commit: bool) -> None:
    """Run "old" committed; run "re" reprocessed two of its photos (their old detections were replaced in
    the same commit) and died before its photos commit. Its rollback must leave exactly the old rows."""
    lake = Lake(str(tmp_path / "lake"))
    old_ids, other = [_pid(i) for i in range(3)], [_pid(9)]
    lake.commit_staged("detections", lake.stage("detections", _det_rows("old", old_ids), "old"), "a/old", 1)
    lake.commit_staged("photos", lake.stage("photos", _photo_rows("old", old_ids), "old"), "a/old", 1)
    before = _dets(lake)
    re_ids = old_ids[:2]
    lake.commit_staged("detections", lake.stage("detections", _det_rows("re", re_ids, 3), "re"), "a/re", 1,
                       replace=_replace(lake, "re", re_ids))
    assert {r for _, _, r in _dets(lake)} == {"old", "re"}
    if later_commit:  # another run's rows land after the crashed one's: no restore to an older version
        lake.commit_staged("detections", lake.stage("detections", _det_rows("new", other), "new"), "a/new", 1)
        lake.commit_staged("photos", lake.stage("photos", _photo_rows("new", other), "new"), "a/new", 1)
        before = sorted(before + [(other[0], i, "new") for i in range(2)])
    # The next attempt may not commit beside the crashed one's rows.
    with pytest.raises(UnrolledAttemptError):
        lake.commit_staged("detections", lake.stage("detections", _det_rows("re", re_ids), "re2"), "a/re", 2)
    done = lake.rollback("detections", "a/re", "re")
    assert done is not None and done["how"] == ("rows" if later_commit else "restore")
    assert _dets(lake) == before
    assert lake.rollback("detections", "a/re", "re") is None  # recorded: a second rollback does nothing
    assert _dets(lake) == before
    # Now attempt 2 commits (replacing the old rows again), exactly once.
    lake.commit_staged("detections", lake.stage("detections", _det_rows("re", re_ids), "re2"), "a/re", 2,
                       replace=_replace(lake, "re", re_ids))
    assert [d for d in _dets(lake) if d[0] in re_ids] == sorted((p, i, "re") for p in re_ids for i in range(2))


def test_forget_with_work_pending_exits_non_zero(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A forget that ran while a tagging run was in flight deleted what it could; its receipt is incomplete
    and the exit code says so (a scheduler must run it again after the run commits)."""
    from photolens.cli import EXIT_INCOMPLETE, main

    lake = Lake(str(tmp_path / "lake"))
    lease = RunLease(lake, "night", 300)
    lease.acquire(lambda _: {"run_id": "night", "attempt": 1, "state": "started"})
    assert main(["forget", "--user", "u1", "--lake", lake.root]) == EXIT_INCOMPLETE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "incomplete" in err[0] and "night" in err[0]
    receipt = json.loads(Path(err[0].rsplit("receipt ", 1)[1]).read_text())
    assert receipt["complete"] is False and receipt["in_flight_runs"] == ["night"]
    lease.release(state="committed")
    assert main(["forget", "--user", "u1", "--lake", lake.root]) == 0


@pytest.mark.parametrize(("field", "value", "flag"), [("lease_seconds", 1.0, "--lease-seconds"),
                                                       ("max_error_rate", 1.5, "--max-error-rate"),
                                                       ("max_error_rate", -0.1, "--max-error-rate")])
def test_bad_lease_or_budget_fails_at_start(tmp_path: Path, field: str, value: float, flag: str) -> None:
    from photolens.jobs.tag import ConfigError, TagConfig

    with pytest.raises(ConfigError, match=flag):
        TagConfig(photos=str(tmp_path), lake=str(tmp_path / "lake"), **{field: value}).validate()


# ---------------------------------------------------------------------------------------------- the job, models on

TESTS = Path(__file__).resolve().parent
NAMES = ["dog.jpg", "person.jpg", "couple.jpg", "kite.jpg"]
STAGES = "decode,detect,faces"


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "AWS_EC2_METADATA_DISABLED": "true", **extra}
    for k in ("PHOTOLENS_FAULT", "RAY_ADDRESS"):
        if k not in extra:
            env.pop(k, None)
    return env


def _tag(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "photolens.cli", "tag", *args, "--json"], env=env or _env(),
                          capture_output=True, text=True, timeout=900, check=False)


class Driver:
    """A tagging driver in the background; its output goes to files (a full pipe would stall it)."""

    def __init__(self, args: list[str], logs: Path, env: dict[str, str] | None = None) -> None:
        logs.mkdir(parents=True, exist_ok=True)
        self.out, self.err = logs / "stdout", logs / "stderr"
        with self.out.open("w") as out, self.err.open("w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "photolens.cli", "tag", *args, "--json"],
                                         env=env or _env(), stdout=out, stderr=err, text=True)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stderr(self) -> str:
        return self.err.read_text()[-3000:]

    def report(self, timeout: float = 900) -> dict[str, Any]:
        self.proc.wait(timeout=timeout)
        assert self.proc.returncode == 0, self.stderr()
        return json.loads(self.out.read_text().strip().splitlines()[-1])


def _ok(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@dataclass(frozen=True)
class Tables:
    photos: set[tuple[Any, ...]]
    detections: list[tuple[Any, ...]]
    faces: list[tuple[Any, ...]]


def _tables(lake: Lake) -> Tables:
    """What a run leaves, without what differs between two runs of the same photos (run id, timings)."""
    p = lake.read("photos", ["photo_id", "status", "error_code", "n_detections", "n_faces"]).to_pylist()
    d = lake.read("detections", ["photo_id", "det_index", "category", "score"]).to_pylist()
    f = lake.read("faces", ["photo_id", "face_index", "det_score"]).to_pylist()
    return Tables({tuple(r.values()) for r in p},
                  sorted((r["photo_id"], r["det_index"], r["category"], round(r["score"], 3)) for r in d),
                  sorted((r["photo_id"], r["face_index"], round(r["det_score"], 3)) for r in f))


def _assert_same(lake: Lake, ref: Tables) -> None:
    got = _tables(lake)
    ids = lake.read("photos", ["photo_id"]).column("photo_id").to_pylist()
    assert len(ids) == len(set(ids)), "doubled photo rows"
    assert got.photos == ref.photos
    assert got.detections == ref.detections  # a list: a doubled row would show
    assert got.faces == ref.faces


@dataclass(frozen=True)
class Setup:
    photos: str
    model_store: str
    ref: Tables
    tmp: Path
    ref_lake: str

    def args(self, lake: str, run_id: str, *extra: str) -> list[str]:
        return ["--photos", self.photos, "--lake", lake, "--stages", STAGES, "--model-store", self.model_store,
                "--batch-size", "2", "--run-id", run_id, *extra]


@pytest.fixture(scope="module")
def setup(shared_data: Path, model_store: str, tmp_path_factory: pytest.TempPathFactory) -> Setup:
    """Four real photos (objects, one face, two faces) under two users, and one uninterrupted reference run."""
    tmp = tmp_path_factory.mktemp("lease-job")
    root = tmp / "photos"
    sources = {n: shared_data / "photos" / n for n in NAMES}
    sources["couple.jpg"] = shared_data / "faces" / "deepface" / "couple.jpg"
    for i, (name, src) in enumerate(sources.items()):
        dst = root / "users" / f"u{i % 2 + 1}" / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(src.read_bytes())
    ref_lake = str(tmp / "ref-lake")
    s = Setup(str(root / "users"), model_store, Tables(set(), [], []), tmp, ref_lake)
    report = _ok(_tag(s.args(ref_lake, "ref")))
    assert report["status"] == "committed" and report["n_todo"] == len(NAMES)
    ref = _tables(Lake(ref_lake))
    assert ref.detections and ref.faces and len(ref.photos) == len(NAMES)  # child tables are not empty
    return Setup(s.photos, model_store, ref, tmp, ref_lake)


@pytest.mark.slow
def test_two_drivers_of_one_run_id_land_one_set_of_child_rows(setup: Setup) -> None:
    lake_uri = str(setup.tmp / "twins")
    lake = Lake(lake_uri)
    first = Driver(setup.args(lake_uri, "twin"), setup.tmp / "twin-logs")
    deadline = time.monotonic() + 300
    while (lake.get_json(lake.meta_uri("runs", "twin.json")) or {}).get("state") != "started":
        assert time.monotonic() < deadline and first.alive(), first.stderr()
        time.sleep(0.1)
    second = _tag(setup.args(lake_uri, "twin"))
    assert second.returncode == 3, second.stderr[-2000:]
    message = second.stderr.strip().splitlines()
    assert len(message) == 1 and "being driven by another driver" in message[0], second.stderr
    assert "Traceback" not in second.stderr
    assert first.report()["attempt"] == 1
    _assert_same(lake, setup.ref)
    assert lake.read("runs").column("run_id").to_pylist() == ["twin"]


@pytest.mark.slow
def test_two_runs_over_the_same_photos_at_once_lose_and_double_nothing(setup: Setup) -> None:
    """Run A holds between its child commits and its photos commit; run B (another id, the same photos)
    starts meanwhile. B's recovery must leave the live A alone, and B's commit, queued behind A's on the
    lake's commit lock, replaces A's rows instead of adding a second set."""
    lake_uri = str(setup.tmp / "overlap")
    lake = Lake(lake_uri)
    release = setup.tmp / "overlap-release"
    a = Driver(setup.args(lake_uri, "night-a"), setup.tmp / "night-a-logs",
               _env(PHOTOLENS_FAULT=f"wait_before_commit=photos:{release}"))
    deadline = time.monotonic() + 600
    while lake.committed_version("faces", "photolens.tag/night-a") is None:
        assert time.monotonic() < deadline and a.alive(), a.stderr()
        time.sleep(0.2)
    a_children = (lake.read("detections").num_rows, lake.read("faces").num_rows)
    assert a_children[0] > 0 and a_children[1] > 0
    b = Driver(setup.args(lake_uri, "night-b"), setup.tmp / "night-b-logs")
    while "waiting for the lake's commit lock" not in b.stderr():  # B recovered, processed, and queued
        assert time.monotonic() < deadline and b.alive(), b.stderr()
        time.sleep(0.2)
    assert (lake.get_json(lake.meta_uri("runs", "night-a.json")) or {})["state"] == "started"
    assert (lake.read("detections").num_rows, lake.read("faces").num_rows) == a_children
    release.write_text("go")
    assert a.report()["status"] == "committed"
    done = b.report()
    assert done["status"] == "committed"
    assert any("committed by another run" in n for n in done["notes"]), done["notes"]
    _assert_same(lake, setup.ref)
    for name in ("photos", "detections", "faces"):
        assert set(lake.read(name, ["run_id"]).column("run_id").to_pylist()) == {"night-b"}, name


@pytest.mark.slow
def test_reprocess_crashed_between_commits_then_rerun_keeps_old_rows(setup: Setup) -> None:
    lake_uri = str(setup.tmp / "reprocess")
    shutil.copytree(setup.ref_lake, lake_uri)  # night 1: the reference run, committed
    lake = Lake(lake_uri)
    _assert_same(lake, setup.ref)
    old = (lake.read("detections").num_rows, lake.read("faces").num_rows)
    crashed = _tag(setup.args(lake_uri, "n2", "--reprocess", "all"), _env(PHOTOLENS_FAULT="crash_before_commit=photos"))
    assert crashed.returncode == 137, crashed.stderr[-2000:]
    # Its commits replaced every old child row with its own.
    assert set(lake.read("detections").column("run_id").to_pylist()) == {"n2"}
    assert set(lake.read("faces").column("run_id").to_pylist()) == {"n2"}
    # The next night (another id, nothing to reprocess) rolls n2 back: the old rows are whole again.
    n3 = _ok(_tag(setup.args(lake_uri, "n3")))
    assert n3["n_todo"] == 0
    assert (lake.get_json(lake.meta_uri("runs", "n2.json")) or {})["state"] == "rolled_back"
    _assert_same(lake, setup.ref)
    assert (lake.read("detections").num_rows, lake.read("faces").num_rows) == old
    assert set(lake.read("detections").column("run_id").to_pylist()) == {"ref"}
    assert set(lake.read("faces").column("run_id").to_pylist()) == {"ref"}


@pytest.mark.slow
def test_ledger_unreadable_fails_the_run_and_keeps_its_attempt(setup: Setup, local_s3: Any) -> None:
    local_s3.create_bucket("lease-ledger")
    lake_uri, key = "s3://lease-ledger/lake", "lake/_photolens/runs/r503.json"
    lake = Lake(lake_uri)
    crashed = _tag(setup.args(lake_uri, "r503"), _env(PHOTOLENS_FAULT="crash_before_commit=photos"))
    assert crashed.returncode == 137, crashed.stderr[-2000:]
    assert lake.get_json(lake.meta_uri("runs", "r503.json"))["attempt"] == 1
    with FaultProxy(local_s3.endpoint, [Fault(key, "unavailable", 10 * READ_ATTEMPTS)]) as proxy:
        failed = _tag(setup.args(lake_uri, "r503"), _env(AWS_ENDPOINT_URL=proxy.endpoint,
                                                         PHOTOLENS_S3_ENDPOINT=proxy.endpoint))
        assert proxy.count(key) == READ_ATTEMPTS
    assert failed.returncode == 3, failed.stderr[-2000:]
    assert "cannot read" in failed.stderr and "Traceback" not in failed.stderr
    ledger = lake.get_json(lake.meta_uri("runs", "r503.json"))
    assert (ledger["attempt"], ledger["state"]) == (1, "started")  # not reset, not rolled back blindly
    assert lake.read("detections").num_rows > 0  # attempt 1's child rows still wait for a real recovery
    done = _ok(_tag(setup.args(lake_uri, "r503")))
    assert done["attempt"] == 2 and done["status"] == "committed"
    _assert_same(lake, setup.ref)


@pytest.mark.slow
def test_error_budget_exceeded_commits_nothing(setup: Setup) -> None:
    """The face model on a device that cannot compute (torch's meta device: every forward pass fails)."""
    lake_uri = str(setup.tmp / "budget")
    lake = Lake(lake_uri)
    # One photo per batch: each failure is isolated to its photo, so they become MODEL_FAILED rows.
    args = [*setup.args(lake_uri, "broken"), "--device", "meta", "--batch-size", "1"]
    proc = _tag(args)
    assert proc.returncode == 3, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert "above --max-error-rate 0.5" in line and "nothing committed" in line, proc.stderr[-2000:]
    assert all(lake.version(n) is None or lake.read(n).num_rows == 0 for n in ("photos", "detections", "faces"))
    assert lake.get_json(lake.meta_uri("runs", "broken.json"))["state"] == "failed"
    # Batches of two where every photo fails: the actor is broken, the run fails, nothing is committed.
    whole = _tag([*setup.args(lake_uri, "broken-batch"), "--device", "meta"])
    assert whole.returncode != 0
    assert "treating the actor as broken" in whole.stderr, whole.stderr[-3000:]
    assert all(lake.version(n) is None or lake.read(n).num_rows == 0 for n in ("photos", "detections", "faces"))
