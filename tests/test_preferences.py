"""Preference tables from a hand-built, hand-tagged lake; expected values recounted here with plain loops.

``hand_built_lake`` is also used by ``test_notebooks.py`` (loaded from this file by path).
"""

from __future__ import annotations

import json
from collections import defaultdict
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from deltalake import DeltaTable, write_deltalake

from photolens.jobs.preferences import (
    format_interests,
    latest_as_of,
    run_preferences,
    table_uri,
    top_interests,
)
from photolens.prefs.preferences import build_preferences, parse_as_of, wide_vectors
from photolens.schemas.tables import DETECTIONS, PHOTOS, PREFERENCES, RUNS, conform
from photolens.schemas.taxonomy import CategoryTree

AS_OF = "2024-06-10"
PREV_AS_OF = "2024-06-03"
MIN_SCORE = 0.5
MIN_SCENE = 0.05

# The test's own parent links for the categories it uses (seed 000: canary -> bird, cat -> animal).
PARENT: dict[str, str | None] = {
    "canary": "bird", "parrot": "bird", "bird": "animal", "animal": None,
    "dog": "pet", "cat": "pet", "pet": "animal",
    "car": "vehicle", "truck": "vehicle", "vehicle": "transport", "transport": None,
    "person": None,
}

MV_R1 = json.dumps({"detector": "ssd_mobilenet_v2_coco@2018_03_29", "scene": "mobilenet_v2_imagenet@b0353104"})
MV_R0 = json.dumps({"detector": "ssd_mobilenet_v2_coco@2017_11_17", "scene": "mobilenet_v2_imagenet@b0353104"})


def _ts(day: str, hour: int = 12) -> datetime:
    return datetime.combine(date.fromisoformat(day), time(hour), tzinfo=UTC)


# photo_id, user, run, status, is_private, taken_at, (coarse, p), [(fine, p)], (landmark, p), detections
PHOTOS_SPEC: list[tuple[Any, ...]] = [
    # alice: two canary boxes in a1 count once; a3 is private (a face), a7 unknown privacy, a4 after as_of,
    # a5 failed, a6 undated with a detection under min_score.
    ("a1", "alice", "r1", "ok", False, _ts("2024-06-01"), ("forest", 0.8), [("forest path", 0.5),
     ("rainforest", 0.03)], None, [("canary", 0.9), ("canary", 0.7), ("dog", 0.6)]),
    ("a2", "alice", "r1", "ok", False, _ts("2024-06-09"), ("beach", 0.6), [("coast", 0.4)],
     ("eiffel_tower", 0.75), [("parrot", 0.8)]),
    ("a3", "alice", "r1", "ok", True, _ts("2024-06-05"), ("forest", 0.9), [], None,
     [("canary", 0.95), ("person", 0.99)]),
    ("a4", "alice", "r1", "ok", False, _ts("2024-06-12"), ("forest", 0.7), [], None, [("car", 0.9)]),
    ("a5", "alice", "r1", "error", None, _ts("2024-06-02"), None, [], None, []),
    ("a6", "alice", "r1", "ok", False, None, ("forest", 0.9), [("forest road", 0.6)], None,
     [("car", 0.85), ("cat", 0.3)]),
    ("a7", "alice", "r1", "ok", None, _ts("2024-06-02"), ("beach", 0.9), [], None, [("dog", 0.9)]),
    # bob: b4 was re-processed: only its latest ok row (r1) and r1's detections count.
    ("b1", "bob", "r1", "ok", False, _ts("2024-05-20"), ("beach", 0.9), [("coast", 0.7)], None,
     [("car", 0.9), ("truck", 0.7)]),
    ("b2", "bob", "r1", "ok", False, _ts("2024-06-08"), ("beach", 0.7), [], ("eiffel_tower", 0.6),
     [("dog", 0.8)]),
    ("b3", "bob", "r1", "ok", True, _ts("2024-06-01"), None, [], None, [("cat", 0.9)]),
    ("b4", "bob", "r0", "ok", False, _ts("2024-05-30"), ("forest", 0.4), [], None, [("cat", 0.9)]),
    ("b4", "bob", "r1", "ok", False, _ts("2024-05-30"), ("forest", 0.5), [], None, [("dog", 0.6)]),
    # carol: only private photos -> no preferences; dave: a public photo with nothing recognised.
    ("c1", "carol", "r1", "ok", True, _ts("2024-06-01"), ("beach", 0.9), [], None, [("dog", 0.9)]),
    ("d1", "dave", "r1", "ok", False, _ts("2024-06-01"), None, [], None, [("person", 0.4)]),
]
RUN_DATES = {"r0": "2024-05-31", "r1": "2024-06-10"}


def hand_built_tables() -> tuple[pa.Table, pa.Table]:
    tree = CategoryTree.load()
    photos: list[dict[str, Any]] = []
    dets: list[dict[str, Any]] = []
    for pid, user, run, status, private, taken, coarse, fine, landmark, boxes in PHOTOS_SPEC:
        photos.append({
            "photo_id": pid, "user_id": user, "uri": f"s3://gallery/{user}/{pid}.jpg", "status": status,
            "error_code": "UNREADABLE" if status == "error" else None,
            "error_stage": "decode" if status == "error" else None,
            "is_private": private, "taken_at": taken,
            "scene_coarse": coarse[0] if coarse else None, "scene_coarse_score": coarse[1] if coarse else None,
            "scene_labels": [f for f, _ in fine] if coarse else None,
            "scene_scores": [p for _, p in fine] if coarse else None,
            "landmark_id": landmark[0] if landmark else None,
            "landmark_score": landmark[1] if landmark else None,
            "n_detections": len(boxes), "model_versions": MV_R0 if run == "r0" else MV_R1,
            "run_id": run, "run_date": RUN_DATES[run], "processed_at": _ts(RUN_DATES[run], 3),
        })
        for i, (cat, score) in enumerate(boxes):
            dets.append({
                "photo_id": pid, "user_id": user, "det_index": i, "category": cat,
                "category_path": tree.roll_up(cat), "score": score, "box": [0.1, 0.1, 0.5, 0.5],
                "model": json.loads(photos[-1]["model_versions"])["detector"],
                "run_id": run, "run_date": RUN_DATES[run],
            })
    return (conform(pa.Table.from_pylist(photos, schema=_loose(PHOTOS)), PHOTOS),
            conform(pa.Table.from_pylist(dets, schema=_loose(DETECTIONS)), DETECTIONS))


def _loose(schema: pa.Schema) -> pa.Schema:
    return pa.schema([f.with_nullable(True) for f in schema])


def runs_table() -> pa.Table:
    """Run records that agree with the photos above: r0 tagged b4 once, r1 the other 13 inputs."""
    def stages(n_in: int, n_ok: int, seconds: tuple[float, ...]) -> str:
        names = ("fetch", "decode", "detect", "scene")
        rows = (n_in, n_in, n_ok, n_ok)
        return json.dumps([{"stage": st, "rows": r, "seconds": s, "rows_per_s": round(r / s, 3)}
                           for st, r, s in zip(names, rows, seconds, strict=False)])

    rows = [
        {"run_id": "r0", "job": "tag", "run_date": RUN_DATES["r0"], "n_manifest": 1, "n_todo": 1, "n_ok": 1,
         "n_error": 0, "n_skipped": 0, "error_counts": "{}", "stages": stages(1, 1, (0.2, 0.3)),
         "seconds": 0.5, "photos_per_s": 2.0, "model_versions": MV_R0, "started_at": _ts(RUN_DATES["r0"], 2)},
        {"run_id": "r1", "job": "tag", "run_date": RUN_DATES["r1"], "n_manifest": 13, "n_todo": 13, "n_ok": 12,
         "n_error": 1, "n_skipped": 0, "error_counts": json.dumps({"UNREADABLE": 1}),
         "stages": stages(13, 12, (0.5, 1.3, 2.4, 1.2)), "seconds": 6.0, "photos_per_s": 13 / 6.0,
         "model_versions": MV_R1, "started_at": _ts(RUN_DATES["r1"], 2)},
    ]
    return conform(pa.Table.from_pylist(rows, schema=_loose(RUNS)), RUNS)


def hand_built_lake(root: Path | str, storage_options: dict[str, str] | None = None) -> str:
    """Writes photos, detections and runs as Delta tables under ``root`` (the lake) and returns its URI."""
    photos, dets = hand_built_tables()
    lake = str(root)
    opts = {"storage_options": storage_options}
    write_deltalake(table_uri(lake, "photos"), photos, partition_by=["run_date"], **opts)
    write_deltalake(table_uri(lake, "detections"), dets, partition_by=["run_date"], **opts)
    write_deltalake(table_uri(lake, "runs"), runs_table(), **opts)
    return lake


# ---------------------------------------------------------------- the independent recount


def _chain(cat: str) -> list[str]:
    out = [cat]
    while PARENT[out[-1]] is not None:
        out.append(PARENT[out[-1]])  # type: ignore[arg-type]
    return out


def expected_preferences(photos: pa.Table, dets: pa.Table, as_of: str, *, half_life: float | None = None,
                         include_private: bool = False, unknown_is_private: bool = True
                         ) -> tuple[dict[tuple[str, str, str], dict[str, Any]], dict[str, tuple[int, int]]]:
    """{(user, source, category): values} and {user: (n_photos, n_private_excluded)}, by plain loops."""
    end = datetime.combine(date.fromisoformat(as_of) + timedelta(days=1), time(), tzinfo=UTC)
    latest: dict[str, dict[str, Any]] = {}
    for row in photos.to_pylist():
        if row["status"] != "ok":
            continue
        key = (row["run_date"], row["processed_at"], row["run_id"])
        held = latest.get(row["photo_id"])
        if held is None or key > (held["run_date"], held["processed_at"], held["run_id"]):
            latest[row["photo_id"]] = row
    public: dict[str, list[dict[str, Any]]] = defaultdict(list)
    excluded: dict[str, int] = defaultdict(int)
    for row in latest.values():
        if row["taken_at"] is not None and row["taken_at"] >= end:
            continue
        private = row["is_private"] if row["is_private"] is not None else unknown_is_private
        if private and not include_private:
            excluded[row["user_id"]] += 1
        else:
            public[row["user_id"]].append(row)

    def weight(row: dict[str, Any]) -> float:
        if half_life is None or row["taken_at"] is None:
            return 1.0
        age = max(0.0, (end - row["taken_at"]).total_seconds() / 86400)
        return 0.5 ** (age / half_life)

    det_rows = dets.to_pylist()
    seen: dict[tuple[str, str, str], dict[str, Any]] = {}
    population: dict[tuple[str, str], int] = defaultdict(int)
    n_population = 0
    for user, rows in public.items():
        w_total = sum(weight(r) for r in rows)
        n_population += len(rows)
        for row in rows:
            found: dict[tuple[str, str, int], float] = {}
            for d in det_rows:
                if d["photo_id"] == row["photo_id"] and d["run_id"] == row["run_id"] and d["score"] >= MIN_SCORE:
                    chain = _chain(d["category"])
                    for i, cat in enumerate(chain):
                        key = ("object", cat, len(chain) - 1 - i)
                        found[key] = max(found.get(key, 0.0), d["score"])
            if row["scene_coarse"] is not None and row["scene_coarse_score"] >= MIN_SCENE:
                found["scene", row["scene_coarse"], 0] = row["scene_coarse_score"]
            for label, p in zip(row["scene_labels"] or [], row["scene_scores"] or [], strict=True):
                if p >= MIN_SCENE:
                    found["scene", label, 1] = max(found.get(("scene", label, 1), 0.0), p)
            if row["landmark_id"] is not None:
                found["landmark", row["landmark_id"], 0] = row["landmark_score"]
            for (source, cat, level), conf in found.items():
                entry = seen.setdefault((user, source, cat), {"level": level, "photo_count": 0, "wc": 0.0})
                entry["photo_count"] += 1
                entry["wc"] += weight(row) * conf
                population[source, cat] += 1
        for (u, _source, _cat), entry in seen.items():
            if u == user and "share" not in entry:
                entry["share"] = entry["photo_count"] / len(rows)
                entry["score"] = entry["wc"] / w_total
    for (_, source, cat), entry in seen.items():
        entry["lift"] = entry["share"] / (population[source, cat] / n_population)
    users = {u: (len(public.get(u, [])), excluded.get(u, 0)) for u in set(public) | set(excluded)}
    return seen, users


def _by_key(prefs: pa.Table) -> dict[tuple[str, str, str], dict[str, Any]]:
    out = {}
    for row in prefs.to_pylist():
        key = (row["user_id"], row["source"], row["category"])
        assert key not in out, f"duplicate preference row {key}"
        out[key] = row
    return out


def _assert_matches(prefs: pa.Table, expected: dict[tuple[str, str, str], dict[str, Any]],
                    users: dict[str, tuple[int, int]]) -> None:
    got = _by_key(prefs)
    assert set(got) == set(expected)
    for key, exp in expected.items():
        row = got[key]
        assert row["level"] == exp["level"], key
        assert row["photo_count"] == exp["photo_count"], key
        assert row["share"] == pytest.approx(exp["share"], rel=1e-9), key
        assert row["score"] == pytest.approx(exp["score"], rel=1e-6), key
        assert row["weighted_share"] == row["score"], key
        assert row["lift"] == pytest.approx(exp["lift"], rel=1e-9), key
        assert (row["n_photos"], row["n_private_excluded"]) == users[key[0]], key


@pytest.fixture(scope="module")
def tables() -> tuple[pa.Table, pa.Table]:
    return hand_built_tables()


# ---------------------------------------------------------------- tests


def test_test_parents_agree_with_category_tree() -> None:
    tree = CategoryTree.load()
    for cat in PARENT:
        assert tree.roll_up(cat) == _chain(cat)
        assert tree.level(cat) == len(_chain(cat)) - 1


def test_scores_match_an_independent_recount(tables: tuple[pa.Table, pa.Table]) -> None:
    photos, dets = tables
    prefs = build_preferences(photos, dets, AS_OF, min_score=MIN_SCORE, min_scene_score=MIN_SCENE)
    assert prefs.schema.equals(PREFERENCES, check_metadata=False)
    expected, users = expected_preferences(photos, dets, AS_OF)
    _assert_matches(prefs, expected, users)
    assert set(prefs["as_of"].to_pylist()) == {AS_OF}
    # The hand-checked numbers behind the recount, for the reader: alice has a1, a2, a6 public.
    got = _by_key(prefs)
    assert got["alice", "object", "bird"]["photo_count"] == 2
    assert got["alice", "object", "bird"]["score"] == pytest.approx((0.9 + 0.8) / 3, rel=1e-6)
    assert got["alice", "scene", "forest"]["share"] == pytest.approx(2 / 3)


def test_roll_up_counts_each_photo_once_at_every_level(tables: tuple[pa.Table, pa.Table]) -> None:
    photos, dets = tables
    got = _by_key(build_preferences(photos, dets, AS_OF, min_score=MIN_SCORE, min_scene_score=MIN_SCENE))
    tree = CategoryTree.load()
    # a1 has two canary boxes (0.9, 0.7) and a dog: canary, bird and animal each count a1 once, at 0.9.
    for cat, level in (("canary", 2), ("bird", 1), ("animal", 0)):
        assert got["alice", "object", cat]["level"] == level == tree.level(cat)
    assert got["alice", "object", "canary"]["photo_count"] == 1
    assert got["alice", "object", "canary"]["score"] == pytest.approx(0.9 / 3, rel=1e-6)
    # animal: a1 (canary 0.9, dog 0.6 -> 0.9) and a2 (parrot 0.8); cat in a6 is under min_score.
    assert got["alice", "object", "animal"]["photo_count"] == 2
    assert ("alice", "object", "cat") not in got
    assert got["alice", "object", "pet"]["photo_count"] == 1
    # Every level of every chain is present: a detection never counts for a child without its parents.
    for (user, source, cat), row in got.items():
        if source == "object":
            for ancestor in tree.roll_up(cat):
                parent_row = got[user, source, ancestor]
                assert parent_row["photo_count"] >= row["photo_count"]
                assert parent_row["score"] >= row["score"] - 1e-12
    # Scenes: coarse at level 0, fine labels at level 1; fine labels under min_scene_score are dropped.
    assert got["alice", "scene", "forest path"]["level"] == 1
    assert ("alice", "scene", "rainforest") not in got
    # b4's stale r0 row (cat) gave way to its r1 row (dog).
    assert ("bob", "object", "cat") not in got
    assert got["bob", "object", "dog"]["photo_count"] == 2


def test_privacy_exclusion_is_counted(tables: tuple[pa.Table, pa.Table]) -> None:
    photos, dets = tables
    got = _by_key(build_preferences(photos, dets, AS_OF, min_score=MIN_SCORE, min_scene_score=MIN_SCENE))
    alice = got["alice", "object", "animal"]
    # a3 has a face (private) and a7 was never checked (unknown counts as private); a4 is after as_of.
    assert (alice["n_photos"], alice["n_private_excluded"]) == (3, 2)
    assert got["bob", "scene", "beach"]["n_private_excluded"] == 1
    assert ("alice", "object", "person") not in got  # only a private photo shows a person
    assert not any(user == "carol" for user, _, _ in got)  # nothing public at all

    everything = build_preferences(photos, dets, AS_OF, include_private=True, min_score=MIN_SCORE,
                                   min_scene_score=MIN_SCENE)
    expected, users = expected_preferences(photos, dets, AS_OF, include_private=True)
    _assert_matches(everything, expected, users)
    got_all = _by_key(everything)
    assert (got_all["alice", "object", "canary"]["n_photos"], got_all["alice", "object", "canary"]
            ["n_private_excluded"]) == (5, 0)
    assert got_all["alice", "object", "canary"]["photo_count"] == 2
    assert ("carol", "object", "dog") in got_all

    trusting = build_preferences(photos, dets, AS_OF, unknown_is_private=False, min_score=MIN_SCORE,
                                 min_scene_score=MIN_SCENE)
    expected, users = expected_preferences(photos, dets, AS_OF, unknown_is_private=False)
    _assert_matches(trusting, expected, users)
    assert users["alice"] == (4, 1)


def test_time_decay_favours_recent_photos(tables: tuple[pa.Table, pa.Table]) -> None:
    photos, dets = tables
    flat = _by_key(build_preferences(photos, dets, AS_OF, min_score=MIN_SCORE, min_scene_score=MIN_SCENE))
    decayed_table = build_preferences(photos, dets, AS_OF, half_life_days=7.0, min_score=MIN_SCORE,
                                      min_scene_score=MIN_SCENE)
    expected, users = expected_preferences(photos, dets, AS_OF, half_life=7.0)
    _assert_matches(decayed_table, expected, users)
    decayed = _by_key(decayed_table)
    # Ages run to the end of the as_of day: a2 (parrot) is 1.5 days old, a1 (canary) 9.5; a6 is undated (w = 1).
    w1, w2 = 0.5 ** (9.5 / 7), 0.5 ** (1.5 / 7)
    assert decayed["alice", "object", "parrot"]["score"] == pytest.approx(0.8 * w2 / (w1 + w2 + 1), rel=1e-6)
    assert decayed["alice", "object", "parrot"]["score"] > flat["alice", "object", "parrot"]["score"]
    assert decayed["alice", "object", "canary"]["score"] < flat["alice", "object", "canary"]["score"]
    # Counts, shares and lift are not decayed: they stay recountable.
    for key, row in decayed.items():
        assert row["photo_count"] == flat[key]["photo_count"]
        assert row["share"] == flat[key]["share"]


def test_as_of_filters_photos_by_taken_at(tables: tuple[pa.Table, pa.Table]) -> None:
    photos, dets = tables
    late = _by_key(build_preferences(photos, dets, "2024-06-12", min_score=MIN_SCORE, min_scene_score=MIN_SCENE))
    early = _by_key(build_preferences(photos, dets, PREV_AS_OF, min_score=MIN_SCORE, min_scene_score=MIN_SCENE))
    assert late["alice", "object", "car"]["photo_count"] == 2  # a4 (taken on 06-12) now counts
    assert early["alice", "object", "animal"]["n_photos"] == 2  # a1 and undated a6; a2 not yet taken
    assert ("alice", "object", "parrot") not in early


def test_lineage_names_the_runs_and_models_that_fed_a_user(tables: tuple[pa.Table, pa.Table]) -> None:
    photos, dets = tables
    got = _by_key(build_preferences(photos, dets, AS_OF, half_life_days=30.0))
    lineage = json.loads(got["bob", "object", "dog"]["lineage"])
    assert lineage["run_ids"] == ["r1"]  # b4's r0 row was superseded
    assert lineage["detection_models"] == [json.loads(MV_R1)["detector"]]
    assert lineage["model_versions"]["detector"] == [json.loads(MV_R1)["detector"]]
    assert lineage["params"]["half_life_days"] == 30.0
    assert lineage["params"]["include_private"] is False


def test_wide_vectors_match_the_long_table(tables: tuple[pa.Table, pa.Table]) -> None:
    photos, dets = tables
    prefs = build_preferences(photos, dets, AS_OF)
    got = _by_key(prefs)
    wide = wide_vectors(prefs, source="object", level=1)
    assert wide.column_names[0] == "user_id"
    assert sorted(wide.column_names[1:]) == sorted({c for (_, s, c), r in got.items()
                                                    if s == "object" and r["level"] == 1})
    for row in wide.to_pylist():
        for cat in wide.column_names[1:]:
            assert row[cat] == (got[row["user_id"], "object", cat]["score"]
                                if (row["user_id"], "object", cat) in got else 0.0)
    tree = CategoryTree.load()
    full = wide_vectors(prefs, source="scene", categories=["forest", "beach", "mountain"])
    assert full.column_names == ["user_id", "forest", "beach", "mountain"]
    assert full["mountain"].to_pylist() == [0.0] * full.num_rows
    assert len(wide_vectors(prefs, categories=list(tree)).column_names) == len(tree) + 1
    with pytest.raises(ValueError, match="one as_of"):
        wide_vectors(pa.concat_tables([prefs, build_preferences(photos, dets, PREV_AS_OF)]))


def test_a_label_unknown_to_the_tree_rolls_up_along_its_path(tables: tuple[pa.Table, pa.Table]) -> None:
    photos, dets = tables
    extra = conform(pa.Table.from_pylist([{
        "photo_id": "b1", "user_id": "bob", "det_index": 9, "category": "blue tit",
        "category_path": ["blue tit", "tit", "bird", "animal"], "score": 0.8, "model": "future-detector@1",
        "run_id": "r1", "run_date": RUN_DATES["r1"]}], schema=_loose(DETECTIONS)), DETECTIONS)
    got = _by_key(build_preferences(photos, pa.concat_tables([dets, extra]), AS_OF))
    before = _by_key(build_preferences(photos, dets, AS_OF))
    assert ("bob", "object", "blue tit") not in got  # no level for it in the tree
    assert ("bob", "object", "tit") not in got
    assert got["bob", "object", "bird"]["photo_count"] == 1
    assert got["bob", "object", "bird"]["level"] == 1
    assert got["bob", "object", "animal"]["photo_count"] == before["bob", "object", "animal"]["photo_count"] + 1
    assert json.loads(got["bob", "object", "bird"]["lineage"])["categories_not_in_tree"] == ["blue tit"]


def test_as_of_must_be_a_plain_date() -> None:
    assert parse_as_of("2024-06-10") == date(2024, 6, 10)
    assert parse_as_of(datetime(2024, 6, 10, 23, 0, tzinfo=UTC)) == date(2024, 6, 10)
    for bad in ("2024-6-1", "2024-06-10' or '1'='1", "yesterday"):
        with pytest.raises(ValueError, match="as_of"):
            parse_as_of(bad)


def test_job_replaces_exactly_one_snapshot(tmp_path: Path) -> None:
    lake = hand_built_lake(tmp_path / "lake")
    photos, dets = hand_built_tables()
    direct = build_preferences(photos, dets, AS_OF)

    first = run_preferences(lake, AS_OF)
    assert first["rows"] == direct.num_rows
    assert first["users"] == 2  # alice and bob; carol's photos are private, dave's show nothing
    assert first["n_private_excluded"] == 3
    again = run_preferences(lake, AS_OF)
    assert again["table_version"] == first["table_version"] + 1

    dt = DeltaTable(table_uri(lake, "preferences"))
    assert [p["as_of"] for p in dt.partitions()] == [AS_OF]
    assert dt.to_pyarrow_table().num_rows == direct.num_rows
    assert dt.history(1)[0]["operationParameters"]["predicate"] == f"as_of = '{AS_OF}'"

    other = run_preferences(lake, PREV_AS_OF, half_life_days=14.0)
    dt = DeltaTable(table_uri(lake, "preferences"))
    assert sorted(p["as_of"] for p in dt.partitions()) == [PREV_AS_OF, AS_OF]
    assert dt.to_pyarrow_table().num_rows == direct.num_rows + other["rows"]
    # The earlier snapshot is untouched by the later write.
    kept = dt.to_pyarrow_dataset().to_table(filter=pa.compute.field("as_of") == AS_OF)
    assert sorted(_by_key(kept).items()) == sorted(_by_key(direct).items())

    wide = DeltaTable(table_uri(lake, "preferences_wide")).to_pyarrow_table()
    assert sorted(wide["as_of"].to_pylist()) == sorted([AS_OF, AS_OF, PREV_AS_OF, PREV_AS_OF])
    assert len(wide.column_names) == len(CategoryTree.load()) + 2
    alice = next(r for r in wide.to_pylist() if r["user_id"] == "alice" and r["as_of"] == AS_OF)
    assert alice["bird"] == _by_key(direct)["alice", "object", "bird"]["score"]
    assert alice["giraffe"] == 0.0

    assert latest_as_of(lake) == AS_OF
    top = top_interests(lake, "alice", n=3)
    scores = top["score"].to_pylist()
    assert len(scores) == 3
    assert scores == sorted(scores, reverse=True)
    assert scores[0] == max(r["score"] for k, r in _by_key(direct).items() if k[0] == "alice")
    old = top_interests(lake, "alice", PREV_AS_OF, n=50, source="object", level=0)
    assert set(old["level"].to_pylist()) == {0}
    assert set(old["as_of"].to_pylist()) == {PREV_AS_OF}
    assert format_interests(top).count("\n") == 3
    assert top_interests(lake, "nobody").num_rows == 0


def test_job_refuses_a_table_of_another_schema(tmp_path: Path) -> None:
    lake = hand_built_lake(tmp_path / "lake")
    write_deltalake(table_uri(lake, "preferences"),
                    pa.table({"user_id": ["x"], "as_of": [AS_OF], "interest": [1.0]}), partition_by=["as_of"])
    with pytest.raises(ValueError, match="schema"):
        run_preferences(lake, AS_OF)
    assert DeltaTable(table_uri(lake, "preferences")).version() == 0


@pytest.mark.s3
def test_job_on_an_s3_lake(tmp_path: Path) -> None:
    from photolens.lake.seaweed import LocalS3

    try:
        store = LocalS3(tmp_path / "s3").start()
    except FileNotFoundError as exc:
        pytest.skip(f"no local object store: {exc}")
    try:
        store.create_bucket("lake")
        env = store.env()
        opts = {"AWS_ENDPOINT_URL": store.endpoint, "AWS_ACCESS_KEY_ID": env["AWS_ACCESS_KEY_ID"],
                "AWS_SECRET_ACCESS_KEY": env["AWS_SECRET_ACCESS_KEY"], "AWS_REGION": "us-east-1",
                "AWS_ALLOW_HTTP": "true"}
        lake = hand_built_lake("s3://lake/photolens", opts)
        first = run_preferences(lake, AS_OF, storage_options=opts)
        run_preferences(lake, AS_OF, storage_options=opts)
        run_preferences(lake, PREV_AS_OF, storage_options=opts)
        dt = DeltaTable(table_uri(lake, "preferences"), storage_options=opts)
        assert sorted(p["as_of"] for p in dt.partitions()) == [PREV_AS_OF, AS_OF]
        now = dt.to_pyarrow_dataset().to_table(filter=pa.compute.field("as_of") == AS_OF)
        assert now.num_rows == first["rows"]
        photos, dets = hand_built_tables()
        expected, users = expected_preferences(photos, dets, AS_OF)
        _assert_matches(now, expected, users)
        assert latest_as_of(lake, opts) == AS_OF
        top = top_interests(lake, "bob", n=1, storage_options=opts)
        assert top["score"][0].as_py() == max(e["score"] for k, e in expected.items() if k[0] == "bob")
    finally:
        store.stop()
