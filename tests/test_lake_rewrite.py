"""Row rewrites of Delta tables (lake/rewrite.py): matching rows dropped, every other row kept, one commit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from deltalake import DeltaTable, write_deltalake

from photolens.lake.rewrite import ColumnIn, plain_strings, rewrite_actions, rewrite_rows

SCHEMA = pa.schema([("user_id", pa.string()), ("n", pa.int64()), ("day", pa.string())])


def _table(tmp_path: Path) -> tuple[DeltaTable, str]:
    """Three commits = three files per partition touched; users sorted so each file has a narrow range."""
    uri = str(tmp_path / "t")
    batches = [
        {"user_id": ["alice", "alice", "bob"], "n": [1, 2, 3], "day": ["d1", "d2", "d1"]},
        {"user_id": ["carol", "dave"], "n": [4, 5], "day": ["d1", "d1"]},
        {"user_id": ["erin", "frank"], "n": [6, 7], "day": ["d2", "d2"]},
    ]
    for b in batches:
        write_deltalake(uri, pa.table(b, schema=SCHEMA), mode="append", partition_by=["day"])
    return DeltaTable(uri), uri


def _rows(uri: str) -> list[tuple[str, int, str]]:
    t = DeltaTable(uri).to_pyarrow_table()
    return sorted(zip(t.column("user_id").to_pylist(), t.column("n").to_pylist(), t.column("day").to_pylist(),
                      strict=True))


def test_rewrite_rows_drops_matches_keeps_the_rest_in_one_commit(tmp_path: Path) -> None:
    table, uri = _table(tmp_path)
    before = table.version()
    result = rewrite_rows(table, uri, ColumnIn("user_id", ["alice", "dave"]), app_id="photolens.test/r1",
                          custom_metadata={"photolens.job": "test"}, tag="test")
    assert result.rows_removed == 3 and result.version == before + 1
    assert _rows(uri) == [("bob", 3, "d1"), ("carol", 4, "d1"), ("erin", 6, "d2"), ("frank", 7, "d2")]
    # The erin/frank file's stats exclude both users: never opened.
    assert result.files_skipped >= 1
    latest = DeltaTable(uri)
    assert latest.transaction_version("photolens.test/r1") == 1
    meta = latest.history(1)[0]
    assert meta.get("photolens.job") == "test" and meta.get("photolens.app_id") == "photolens.test/r1"
    # Kept rows of a rewritten file stay in their partition folder, in a file named by the tag.
    kept = [p for p in latest.file_uris() if "part-test-" in p]
    assert kept and all("/day=d1/" in p for p in kept)


def test_nothing_to_drop_commits_nothing(tmp_path: Path) -> None:
    table, uri = _table(tmp_path)
    before = table.version()
    result = rewrite_rows(table, uri, ColumnIn("user_id", ["zoe"]))
    assert result.version is None and result.rows_removed == 0 and not result.actions
    assert DeltaTable(uri).version() == before
    # A mask that never matches, on files the stats cannot exclude: read (probe), nothing written.
    result = rewrite_rows(table, uri, lambda body: np.zeros(body.num_rows, dtype=bool))
    assert result.version is None and DeltaTable(uri).version() == before


def test_custom_mask_and_probe_columns(tmp_path: Path) -> None:
    table, uri = _table(tmp_path)
    # Any row with an even n: a mask over a column the stats cannot prune on.
    def even(body: pa.Table) -> np.ndarray:
        return (pc.bit_wise_and(body.column("n"), 1).to_numpy(zero_copy_only=False) == 0)

    actions = rewrite_actions(table, uri, even, probe_columns=["n"], tag="even")
    assert actions.rows_removed == 3 and actions.files_skipped == 0
    assert DeltaTable(uri).version() == table.version()  # actions only: nothing committed yet
    result = rewrite_rows(table, uri, even, probe_columns=["n"], threads=3)
    assert result.rows_removed == 3
    assert [n for _, n, _ in _rows(uri)] == [1, 3, 5, 7]


def test_column_in_statistics_pruning_is_conservative() -> None:
    pred = ColumnIn("user_id", ["bob", "mallory"])
    assert pred.may_match({"min.user_id": "alice", "max.user_id": "carol"})
    assert not pred.may_match({"min.user_id": "carol", "max.user_id": "dave"})
    assert not pred.may_match({"min.user_id": "n", "max.user_id": "z"})
    assert pred.may_match({"min.user_id": None, "max.user_id": None})  # no stats: read it
    # A max cut to a prefix (writers truncate long strings): values past the cut may still be inside.
    long_pred = ColumnIn("user_id", ["a" * 20 + "zz"])
    assert long_pred.may_match({"min.user_id": "a", "max.user_id": "a" * 20})
    assert not ColumnIn("user_id", []).may_match({"min.user_id": "a", "max.user_id": "z"})


def test_plain_strings_casts_string_views() -> None:
    t = pa.table({"a": pa.array(["x"], pa.string_view()), "b": pa.array([["y"]], pa.list_(pa.large_string()))})
    out = plain_strings(t)
    assert out.schema.field("a").type == pa.string() and out.schema.field("b").type == pa.list_(pa.string())
    same = pa.table({"a": ["x"]})
    assert plain_strings(same) is same


@pytest.mark.parametrize("partitioned", [False, True])
def test_rewrite_removes_a_file_whose_rows_all_go(tmp_path: Path, partitioned: bool) -> None:
    uri = str(tmp_path / "t")
    write_deltalake(uri, pa.table({"user_id": ["u1", "u1"], "n": [1, 2], "day": ["d", "d"]}, schema=SCHEMA),
                    partition_by=["day"] if partitioned else None)
    table = DeltaTable(uri)
    result = rewrite_rows(table, uri, ColumnIn("user_id", ["u1"]))
    assert result.rows_removed == 2 and result.files_rewritten == 1
    assert DeltaTable(uri).to_pyarrow_table().num_rows == 0 and not DeltaTable(uri).file_uris()
