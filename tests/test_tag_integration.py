"""The nightly job on local Ray against a real S3-compatible store (SeaweedFS on 127.0.0.1).

Asserts the exactly-once contract: output photo_ids equal the manifest, no duplicates, a re-run commits nothing,
new photos alone are processed, and a job killed mid-run then re-run ends complete with no duplicates.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import polars as pl
import pyarrow as pa
import pytest

from photolens.jobs.tag import TagConfig, run_tag
from photolens.lake.delta import Lake
from photolens.lake.photostore import ManifestError

pytestmark = [pytest.mark.s3]

REAL = ["dog.jpg", "horses.jpg", "kite.jpg", "fruits.jpg", "chicky_512.png", "basketball1.png", "eagle.jpg"]
BROKEN = {"trunc.jpg": None, "empty.jpg": b"", "text.jpg": b"hello, not a photo\n"}


def _put_store(local_s3, bucket: str, shared: Path, users: tuple[str, ...] = ("u1", "u2")) -> set[str]:
    local_s3.create_bucket(bucket)
    client = local_s3.settings().boto3_client(max_attempts=3)
    keys = set()
    for i, name in enumerate(REAL):
        key = f"users/{users[i % len(users)]}/{name}"
        client.put_object(Bucket=bucket, Key=key, Body=(shared / "photos" / name).read_bytes())
        keys.add(key)
    dog = (shared / "photos" / "dog.jpg").read_bytes()
    for name, body in BROKEN.items():
        key = f"users/{users[0]}/broken/{name}"
        client.put_object(Bucket=bucket, Key=key, Body=dog[:5000] if body is None else body)
        keys.add(key)
    return keys


def _photos(lake: Lake) -> pa.Table:
    return lake.read("photos")


def _expected_ids(local_s3, bucket: str) -> set[str]:
    """Photo ids computed here from the bucket listing: blake2b(uri, etag), independent of the job's planner."""
    client = local_s3.settings().boto3_client()
    out = set()
    for obj in client.list_objects_v2(Bucket=bucket)["Contents"]:
        ident = f"s3://{bucket}/{obj['Key']}\x00etag:{obj['ETag'].strip(chr(34))}"
        out.add(hashlib.blake2b(ident.encode(), digest_size=16).hexdigest())
    return out


def _cfg(bucket: str, lake: str, **kw) -> TagConfig:
    return TagConfig(photos=f"s3://{bucket}/users/", lake=lake, stages=("decode",), batch_size=4, progress=False,
                     fetch_base_delay_s=0.01, **kw)


def test_nightly_runs_are_exactly_once(local_s3, ray_local, shared_data) -> None:
    bucket, lake_uri = "night", "s3://night-lake/lake"
    local_s3.create_bucket("night-lake")
    keys = _put_store(local_s3, bucket, shared_data)
    lake = Lake(lake_uri)

    first = run_tag(_cfg(bucket, lake_uri, run_id="n1"))
    photos = _photos(lake)
    ids = photos.column("photo_id").to_pylist()
    assert set(ids) == _expected_ids(local_s3, bucket)
    assert len(ids) == len(set(ids)) == len(keys)
    by_uri = {r["uri"].split("/", 3)[-1]: r for r in photos.to_pylist()}
    assert by_uri["users/u1/broken/empty.jpg"]["error_code"] == "EMPTY_FILE"
    assert by_uri["users/u1/broken/text.jpg"]["status"] == "error"
    assert by_uri["users/u1/broken/trunc.jpg"]["error_code"] == "TRUNCATED"
    assert all(by_uri[f"users/u{1 + i % 2}/{n}"]["status"] == "ok" for i, n in enumerate(REAL))
    assert by_uri["users/u1/dog.jpg"]["width"] == 768  # decoded at full size, orientation normal
    assert first.status_counts == {"ok": len(REAL), "error": len(BROKEN)}
    runs = lake.read("runs").to_pylist()
    assert [r["run_id"] for r in runs] == ["n1"] and runs[0]["n_ok"] == len(REAL)
    assert json.loads(runs[0]["error_counts"]) == first.error_counts

    # The same run again commits nothing: every table keeps its version.
    versions = {n: lake.version(n) for n in ("photos", "detections", "faces", "runs")}
    again = run_tag(_cfg(bucket, lake_uri, run_id="n1"))
    assert again.status == "already committed"
    assert {n: lake.version(n) for n in versions} == versions

    # A new night with nothing new processes nothing; the permanent errors are not retried by default.
    quiet = run_tag(_cfg(bucket, lake_uri, run_id="n2"))
    assert quiet.n_todo == 0 and quiet.n_done_before == len(keys)

    # Three photos added: only those three are processed.
    client = local_s3.settings().boto3_client()
    for name in ("apple.jpg", "orange.jpg", "baboon.jpg"):
        client.put_object(Bucket=bucket, Key=f"users/u3/{name}", Body=(shared_data / "photos" / name).read_bytes())
    third = run_tag(_cfg(bucket, lake_uri, run_id="n3"))
    assert third.n_todo == 3
    photos = _photos(lake)
    assert photos.num_rows == len(keys) + 3
    assert sorted(r["uri"].rsplit("/", 1)[-1] for r in photos.to_pylist() if r["run_id"] == "n3") == [
        "apple.jpg", "baboon.jpg", "orange.jpg"]

    # --reprocess errors retries the permanent errors and still keeps one row per photo.
    fourth = run_tag(_cfg(bucket, lake_uri, run_id="n4", reprocess="errors"))
    assert fourth.n_todo == len(BROKEN)
    photos = _photos(lake)
    ids = photos.column("photo_id").to_pylist()
    assert len(ids) == len(set(ids)) == len(keys) + 3
    assert {r["run_id"] for r in photos.to_pylist() if r["status"] == "error"} == {"n4"}

    # The tables open in DuckDB and Polars.
    opts = lake.storage_options()
    assert pl.read_delta(lake.table_uri("photos"), storage_options=opts).height == len(keys) + 3
    con = duckdb.connect()
    con.register("photos", lake.open("photos").to_pyarrow_dataset())
    n_ok = con.execute("SELECT count(DISTINCT photo_id) FROM photos WHERE status = 'ok'").fetchall()[0][0]
    assert n_ok == len(REAL) + 3


def _run_cli(args: list[str], fault: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("PHOTOLENS_FAULT", None)
    if fault:
        env["PHOTOLENS_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "photolens.cli", "tag", *args], env=env, capture_output=True,
                          text=True, timeout=600, check=False)


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["crash_after_batches=1", "crash_before_commit=photos"])
def test_killed_run_then_rerun_is_complete_without_duplicates(local_s3, shared_data, fault: str) -> None:
    bucket = "crash-" + fault.split("=", maxsplit=1)[0].replace("_", "-")
    lake_uri = f"s3://{bucket}-lake/lake"
    local_s3.create_bucket(f"{bucket}-lake")
    keys = _put_store(local_s3, bucket, shared_data)
    args = ["--photos", f"s3://{bucket}/users/", "--lake", lake_uri, "--stages", "decode", "--batch-size", "2",
            "--run-id", "night-1", "--json"]
    killed = _run_cli(args, fault)
    assert killed.returncode == 137, killed.stderr[-2000:]
    lake = Lake(lake_uri)
    assert _photos(lake).num_rows == 0  # nothing half-committed is visible

    done = _run_cli(args)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["attempt"] == 2
    ids = _photos(lake).column("photo_id").to_pylist()
    assert set(ids) == _expected_ids(local_s3, bucket) and len(ids) == len(set(ids)) == len(keys)
    assert lake.read("runs").num_rows == 1


def test_manifest_inputs(local_s3, ray_local, shared_data, tmp_path: Path) -> None:
    bucket = "manifests"
    keys = sorted(_put_store(local_s3, bucket, shared_data))
    lake_uri = str(tmp_path / "lake")

    # CSV of keys with a user_id column overriding the key pattern.
    csv_path = tmp_path / "keys.csv"
    csv_path.write_text("key,user_id\n" + "".join(f"{k},owner-{k.split('/')[1]}\n" for k in keys[:5]))
    report = run_tag(TagConfig(photos=f"s3://{bucket}/", manifest=str(csv_path), lake=lake_uri, stages=("decode",),
                               progress=False, run_id="m1"))
    assert report.n_todo == 5
    users = set(Lake(lake_uri).read("photos").column("user_id").to_pylist())
    assert users <= {"owner-u1", "owner-u2"}

    # An S3 Inventory report: manifest.json listing a gzipped, header-less CSV with URL-encoded keys.
    client = local_s3.settings().boto3_client()
    rows = []
    for k in keys[5:]:
        head = client.head_object(Bucket=bucket, Key=k)
        rows.append(f'"{bucket}","{k.replace("/", "%2F")}","{head["ContentLength"]}",'
                    f'"2026-11-20T01:00:00.000Z","{head["ETag"].strip(chr(34))}"')
    local_s3.create_bucket("inventory")
    client.put_object(Bucket="inventory", Key="inv/data/part-0.csv.gz", Body=gzip.compress("\n".join(rows).encode()))
    client.put_object(Bucket="inventory", Key="inv/manifest.json", Body=json.dumps({
        "sourceBucket": bucket, "destinationBucket": "arn:aws:s3:::inventory", "fileFormat": "CSV",
        "fileSchema": "Bucket, Key, Size, LastModifiedDate, ETag",
        "files": [{"key": "inv/data/part-0.csv.gz", "size": 1, "MD5checksum": "x"}]}).encode())
    report = run_tag(TagConfig(photos=None, manifest="s3://inventory/inv/manifest.json", lake=lake_uri,
                               stages=("decode",), progress=False, run_id="m2"))
    assert report.n_todo == len(keys) - 5
    photos = Lake(lake_uri).read("photos")
    assert photos.num_rows == len(keys) == len(set(photos.column("photo_id").to_pylist()))

    # An unexpected manifest column stops the job before any commit, naming the column.
    bad = tmp_path / "bad.csv"
    bad.write_text("key,owner_email\nusers/u1/dog.jpg,x@example.com\n")
    before = Lake(lake_uri).version("photos")
    with pytest.raises(ManifestError, match="owner_email"):
        run_tag(TagConfig(photos=f"s3://{bucket}/", manifest=str(bad), lake=lake_uri, stages=("decode",),
                          progress=False, run_id="m3"))
    assert Lake(lake_uri).version("photos") == before
