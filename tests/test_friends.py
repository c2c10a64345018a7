"""``photolens friends import``: validated friend pairs into the ``friends`` Delta table (merge / replace)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from photolens.cli import main
from photolens.jobs.friends import FriendsConfig, import_friends
from photolens.jobs.suggest import _friends_of
from photolens.jobs.tag import ConfigError
from photolens.lake.delta import Lake


def _pairs(lake: str) -> list[tuple[str, str]]:
    t = Lake(lake).read("friends", ["user_id", "friend_id"])
    return sorted(zip(t.column("user_id").to_pylist(), t.column("friend_id").to_pylist(), strict=True))


def _csv(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_csv_merge_then_parquet_replace_symmetric(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lake = str(tmp_path / "lake")
    # Ids stay text (00123 is not 123); surrounding spaces go; a repeated pair is kept once.
    first = _csv(tmp_path / "a.csv", "user_id,friend_id\nalice,bob\n alice , carol\nalice,bob\n00123,alice\n")
    assert main(["friends", "import", "--lake", lake, "--csv", first]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["duplicates_dropped"] == 1 and report["pairs_added"] == 3 and report["status"] == "committed"
    assert _pairs(lake) == [("00123", "alice"), ("alice", "bob"), ("alice", "carol")]
    v1 = Lake(lake).version("friends")

    # Merge again with one known and one new pair: only the new one is appended.
    second = _csv(tmp_path / "b.csv", "user_id,friend_id\nalice,bob\ndave,erin\n")
    report = import_friends(FriendsConfig(lake=lake, source=second, format="csv"))
    assert report["pairs_added"] == 1 and report["pairs_after"] == 4
    # The same file once more: nothing new, no commit.
    report = import_friends(FriendsConfig(lake=lake, source=second, format="csv"))
    assert report["status"] == "nothing new" and Lake(lake).version("friends") == v1 + 1

    # Parquet, symmetric, replace: the file becomes the whole graph, stored both ways.
    pq.write_table(pa.table({"user_id": ["bob", "erin"], "friend_id": ["carol", "bob"]}), tmp_path / "g.parquet")
    report = import_friends(FriendsConfig(lake=lake, source=str(tmp_path / "g.parquet"), format="parquet",
                                          symmetric=True, mode="replace"))
    assert report["reversed_added"] == 2 and report["pairs_removed"] == 4
    assert _pairs(lake) == [("bob", "carol"), ("bob", "erin"), ("carol", "bob"), ("erin", "bob")]
    assert Lake(lake).version("friends") == v1 + 2  # one commit
    # What suggest reads: friendship is mutual.
    assert _friends_of(Lake(lake), ["bob", "carol"]) == {"bob": ["carol", "erin"], "carol": ["bob"]}

    # Merge, symmetric: (carol, dave) and (dave, carol) both added; (bob, carol) already there.
    pq.write_table(pa.table({"user_id": pa.array(["carol", "carol"], pa.large_string()),
                             "friend_id": pa.array(["dave", "bob"], pa.large_string())}), tmp_path / "h.parquet")
    report = import_friends(FriendsConfig(lake=lake, source=str(tmp_path / "h.parquet"), format="parquet",
                                          symmetric=True))
    assert report["pairs_added"] == 2
    assert ("carol", "dave") in _pairs(lake) and ("dave", "carol") in _pairs(lake)


BAD_FILES: dict[str, tuple[str, str]] = {
    "missing column": ("user_id,friend\nalice,bob\n", "missing column(s) ['friend_id']"),
    "unknown column": ("user_id,friend_id,since\nalice,bob,2020\n", "unknown column(s) ['since']"),
    "empty id": ("user_id,friend_id\nalice,bob\nalice,\n", "empty friend_id at line 3"),
    "blank id": ("user_id,friend_id\n  ,bob\n", "empty user_id at line 2"),
    "self-friendship": ("user_id,friend_id\nalice,bob\nbob,bob\ncarol,carol\n", "own friend"),
    "no rows": ("user_id,friend_id\n", "no pairs"),
    "repeated column": ("user_id,friend_id,user_id\nalice,bob,carol\n", "appear more than once"),
    "ragged row": ("user_id,friend_id\nalice,bob,carol\n", "not a readable CSV"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_csv_fails_clearly_and_writes_nothing(tmp_path: Path, case: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    lake = str(tmp_path / "lake")
    good = _csv(tmp_path / "good.csv", "user_id,friend_id\nalice,bob\n")
    import_friends(FriendsConfig(lake=lake, source=good, format="csv"))
    version = Lake(lake).version("friends")
    text, message = BAD_FILES[case]
    bad = _csv(tmp_path / "bad.csv", text)
    for mode in ("merge", "replace"):
        assert main(["friends", "import", "--lake", lake, "--csv", bad, "--mode", mode]) == 2
        err = capsys.readouterr().err
        assert message in err and "bad.csv" in err, err
    assert Lake(lake).version("friends") == version
    assert _pairs(lake) == [("alice", "bob")]
    if case == "self-friendship":
        assert "lines 3, 4" in err


def test_parquet_types_are_checked(tmp_path: Path) -> None:
    lake = str(tmp_path / "lake")
    pq.write_table(pa.table({"user_id": [1, 2], "friend_id": ["a", "b"]}), tmp_path / "ints.parquet")
    with pytest.raises(ConfigError, match="column user_id is int64, ids must be strings"):
        import_friends(FriendsConfig(lake=lake, source=str(tmp_path / "ints.parquet"), format="parquet"))
    pq.write_table(pa.table({"user_id": ["a", None], "friend_id": ["b", "c"]}), tmp_path / "nulls.parquet")
    with pytest.raises(ConfigError, match="empty user_id at row 2"):
        import_friends(FriendsConfig(lake=lake, source=str(tmp_path / "nulls.parquet"), format="parquet"))
    with pytest.raises(ConfigError, match="friends file not found"):
        import_friends(FriendsConfig(lake=lake, source=str(tmp_path / "nope.csv"), format="csv"))
    with pytest.raises(ConfigError, match="not a readable PARQUET"):
        import_friends(FriendsConfig(lake=lake, source=_csv(tmp_path / "x.parquet", "user_id\n"), format="parquet"))
    assert Lake(lake).version("friends") is None  # no table was even created


def test_forgotten_users_are_not_imported(tmp_path: Path) -> None:
    lake = str(tmp_path / "lake")
    Lake(lake).append("tombstones", pa.Table.from_pylist(
        [{"user_id": "mallory", "forgotten_at": dt.datetime.now(dt.UTC), "receipt_uri": "r"}]))
    src = _csv(tmp_path / "f.csv", "user_id,friend_id\nalice,mallory\nalice,bob\n")
    report = import_friends(FriendsConfig(lake=lake, source=src, format="csv", symmetric=True))
    assert report["skipped_forgotten_users"] == 2 and _pairs(lake) == [("alice", "bob"), ("bob", "alice")]


def test_import_from_s3(local_s3: Any) -> None:
    local_s3.create_bucket("friends-in")
    local_s3.create_bucket("friends-lake")
    client = local_s3.settings().boto3_client(max_attempts=3)
    client.put_object(Bucket="friends-in", Key="graph/friends.csv", Body=b"user_id,friend_id\nu1,u2\nu2,u3\n")
    lake = "s3://friends-lake/prod"
    report = import_friends(FriendsConfig(lake=lake, source="s3://friends-in/graph/friends.csv", format="csv",
                                          symmetric=True, mode="replace"))
    assert report["pairs_added"] == 4
    assert _pairs(lake) == [("u1", "u2"), ("u2", "u1"), ("u2", "u3"), ("u3", "u2")]
    client.put_object(Bucket="friends-in", Key="graph/bad.csv", Body=b"user_id,friend_id\nu1,u1\n")
    with pytest.raises(ConfigError, match="own friend"):
        import_friends(FriendsConfig(lake=lake, source="s3://friends-in/graph/bad.csv", format="csv",
                                     mode="replace"))
    assert len(_pairs(lake)) == 4
