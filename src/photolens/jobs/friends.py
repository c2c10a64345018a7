"""``photolens friends import``: the friend graph that ``suggest`` searches in, from a CSV or Parquet file.

The file has exactly the columns ``user_id`` and ``friend_id`` (strings; a CSV needs the header line), a
local path or an ``s3://`` URI. Everything is checked before anything is written: a file with a missing or
unknown column, an empty id, a non-string column or a self-friendship stops the import with a message
naming the rows, and the table stays as it was. Repeated pairs are kept once.

* ``--mode merge`` (default): pairs not in the table yet are appended in one commit.
* ``--mode replace``: the file becomes the whole graph, in one commit (readers see the old or the new graph).
* ``--symmetric``: every pair is stored both ways. Suggestions read friendship as mutual either way
  (``suggest._friends_of``); the reverse rows make the table answer "friends of X" with one column.

Pairs naming a forgotten user (``tombstones``) are left out and counted: an import must not bring back a
user that ``forget`` removed.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass
from typing import Any, Final

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from deltalake import write_deltalake

from photolens.jobs._faceshared import print_json, tombstoned_users
from photolens.jobs.tag import ConfigError
from photolens.lake.delta import Lake
from photolens.lake.rewrite import commit_properties
from photolens.lake.storage import Location, filesystem_for
from photolens.schemas.tables import FRIENDS, conform

__all__ = ["COLUMNS", "MODES", "FriendsConfig", "cmd_friends", "import_friends", "read_friend_pairs"]

COLUMNS: Final = ("user_id", "friend_id")
MODES: Final = ("merge", "replace")
_SHOW: Final = 5  # rows named in an error message


@dataclass(frozen=True)
class FriendsConfig:
    lake: str
    source: str  # the CSV or Parquet file
    format: str  # "csv" | "parquet"
    symmetric: bool = False
    mode: str = "merge"

    def validate(self) -> FriendsConfig:
        if not self.lake:
            raise ConfigError("friends import needs --lake")
        if not self.source:
            raise ConfigError("friends import needs --csv or --parquet")
        if self.format not in ("csv", "parquet"):
            raise ConfigError(f"unknown friends file format {self.format!r}: use --csv or --parquet")
        if self.mode not in MODES:
            raise ConfigError(f"--mode must be one of {MODES}, got {self.mode!r}")
        return self


def _where(rows: list[int], fmt: str) -> str:
    # CSV: the file's line numbers (the header is line 1); Parquet: 1-based row numbers.
    shown = [r + 2 if fmt == "csv" else r + 1 for r in rows[:_SHOW]]
    more = f" and {len(rows) - _SHOW} more" if len(rows) > _SHOW else ""
    return f"{'line' if fmt == 'csv' else 'row'}{'s' if len(rows) > 1 else ''} {', '.join(map(str, shown))}{more}"


def _read_table(source: str, fmt: str) -> pa.Table:
    uri = Location.parse(source).uri
    fs, path = filesystem_for(source)
    if fs.get_file_info(path).type != pafs.FileType.File:
        raise ConfigError(f"friends file not found: {uri}")
    try:
        with fs.open_input_file(path) as f:
            data = f.read()
        if fmt == "parquet":
            return pq.read_table(pa.BufferReader(data))
        # Every column as text: an id such as 00123 must stay what the file says.
        names = pacsv.open_csv(pa.BufferReader(data)).schema.names
        return pacsv.read_csv(pa.BufferReader(data), convert_options=pacsv.ConvertOptions(
            column_types=dict.fromkeys(names, pa.string()), strings_can_be_null=False))
    except (pa.ArrowInvalid, OSError) as exc:
        raise ConfigError(f"{uri}: not a readable {fmt.upper()} file ({exc})") from exc


def read_friend_pairs(source: str, fmt: str) -> tuple[pa.Table, dict[str, int]]:
    """The file's pairs, validated, as a ``friends`` table (duplicates dropped), and counts of what was read.

    Raises ``ConfigError`` naming the rows at fault; ids keep their text except for surrounding whitespace.
    """
    uri = Location.parse(source).uri
    raw = _read_table(source, fmt)
    names = raw.column_names
    repeated = sorted({c for c in names if names.count(c) > 1})
    if repeated:
        raise ConfigError(f"{uri}: column(s) {repeated} appear more than once; a friends file has exactly the "
                          "columns user_id, friend_id")
    missing = [c for c in COLUMNS if c not in names]
    extra = [c for c in names if c not in COLUMNS]
    if missing or extra:
        problems = ([f"missing column(s) {missing}"] if missing else []) + (
            [f"unknown column(s) {extra}"] if extra else [])
        raise ConfigError(f"{uri}: {'; '.join(problems)}; a friends file has exactly the columns user_id, friend_id")
    if raw.num_rows == 0:
        raise ConfigError(f"{uri}: no pairs (a friends file needs at least one user_id, friend_id row)")
    cols = {}
    for c in COLUMNS:
        col = raw.column(c)
        if pa.types.is_dictionary(col.type) and _is_text(col.type.value_type):
            col = col.cast(col.type.value_type)
        if not _is_text(col.type):
            raise ConfigError(f"{uri}: column {c} is {col.type}, ids must be strings (write the ids as text)")
        col = pc.utf8_trim_whitespace(col.cast(pa.string()))
        empty = pc.or_kleene(pc.is_null(col), pc.equal(pc.fill_null(col, ""), ""))
        bad = pc.indices_nonzero(pc.fill_null(empty, True)).to_pylist()
        if bad:
            raise ConfigError(f"{uri}: empty {c} at {_where(bad, fmt)}")
        cols[c] = col
    self_rows = pc.indices_nonzero(pc.equal(cols["user_id"], cols["friend_id"])).to_pylist()
    if self_rows:
        raise ConfigError(f"{uri}: a user cannot be their own friend (user_id = friend_id) at {_where(self_rows, fmt)}")
    pairs = pa.table(cols)
    unique = pairs.group_by(list(COLUMNS), use_threads=False).aggregate([])
    counts = {"rows_read": raw.num_rows, "duplicates_dropped": raw.num_rows - unique.num_rows}
    return conform(unique.select(list(COLUMNS)), FRIENDS), counts


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _anti_join(left: pa.Table, right: pa.Table) -> pa.Table:
    if not right.num_rows or not left.num_rows:
        return left
    return left.join(right.select(list(COLUMNS)), list(COLUMNS), join_type="left anti").select(list(COLUMNS))


def import_friends(cfg: FriendsConfig) -> dict[str, Any]:
    """Validate the file, then write the ``friends`` table in one commit (merge or replace)."""
    cfg.validate()
    started = time.perf_counter()
    lake = Lake(cfg.lake)
    lake.check_schema("friends")
    pairs, counts = read_friend_pairs(cfg.source, cfg.format)
    reversed_added = 0
    if cfg.symmetric:
        both = pa.concat_tables([pairs, pairs.select(["friend_id", "user_id"]).rename_columns(list(COLUMNS))])
        both = both.group_by(list(COLUMNS), use_threads=False).aggregate([]).select(list(COLUMNS))
        reversed_added = both.num_rows - pairs.num_rows
        pairs = conform(both, FRIENDS)
    gone = tombstoned_users(lake)
    n_forgotten = 0
    if gone:
        forgotten = pa.array(sorted(gone), pa.string())
        named = pc.or_(pc.is_in(pairs.column("user_id"), forgotten), pc.is_in(pairs.column("friend_id"), forgotten))
        n_forgotten = int(pc.sum(named).as_py() or 0)
        pairs = pairs.filter(pc.invert(named))
    before = lake.read("friends", list(COLUMNS))
    report: dict[str, Any] = {"job": "friends", **asdict(cfg), **counts, "reversed_added": reversed_added,
                              "skipped_forgotten_users": n_forgotten, "pairs_before": before.num_rows,
                              "table": lake.table_uri("friends")}
    meta = {"photolens.job": "friends", "photolens.mode": cfg.mode, "photolens.source": Location.parse(cfg.source).uri}
    pairs = pairs.sort_by([(c, "ascending") for c in COLUMNS])
    if cfg.mode == "replace":
        table = lake.ensure("friends")
        write_deltalake(table, pairs, mode="overwrite", commit_properties=commit_properties(None, 1, meta))
        added = _anti_join(pairs, before).num_rows
        removed = _anti_join(before, pairs).num_rows
        report.update(status="committed", pairs_added=added, pairs_removed=removed)
    else:
        new = _anti_join(pairs, before)
        if new.num_rows:
            lake.append("friends", new, custom_metadata=meta)
        report.update(status="committed" if new.num_rows else "nothing new", pairs_added=new.num_rows,
                      pairs_removed=0)
    report.update(pairs_after=lake.read("friends", ["user_id"]).num_rows, table_version=lake.version("friends"),
                  seconds=round(time.perf_counter() - started, 3))
    return report


def cmd_friends(args: argparse.Namespace) -> int:
    source, fmt = (args.csv, "csv") if args.csv else (args.parquet, "parquet")
    print_json(import_friends(FriendsConfig(lake=args.lake, source=source, format=fmt, symmetric=args.symmetric,
                                            mode=args.mode)))
    return 0
