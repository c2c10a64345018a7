"""Per-user preference tables: what a user's public gallery says they are interested in (seed 000).

A user's preferences are a vector of interests inferred from the photos in their gallery. This module turns
the tagged ``photos`` and ``detections`` tables into the long ``preferences`` table (one row per user, source
and category) and into wide vectors for ML consumers. Pure code: Polars and pyarrow, no Ray.

Definitions (one snapshot, ``as_of``):

* **eligible photo** — the latest ``ok`` row of a photo (by ``run_date``, ``processed_at``, ``run_id``), taken
  before the end of the ``as_of`` day (UTC) when ``taken_at`` is known; undated photos are eligible.
* **privacy** (seed 000: a photo with a face is private, and private media never leaves the device) — private
  photos are excluded unless ``include_private``; a photo whose ``is_private`` is unknown (null) counts as
  private unless ``unknown_is_private=False``, because sending an unchecked photo is the failure we cannot undo.
  ``n_private_excluded`` makes the rule visible per user.
* **sources** — ``object``: detections with ``score >= min_score``, rolled up the category tree, so a canary
  also counts for bird and for animal; ``scene``: the coarse scene (``scene_coarse`` with its mapped
  probability, level 0) and the fine scene labels (``scene_labels``/``scene_scores``, level 1), each with
  probability ``>= min_scene_score``; ``landmark``: ``landmark_id`` with ``landmark_score`` (level 0; the
  landmark stage already applied its reject threshold). A missing probability counts as 1. A detector label
  the tree does not know counts for the ancestors on its row's ``category_path`` that the tree knows, and
  is named in the lineage (``categories_not_in_tree``).
* **photo_count** — the user's public photos with the category (a photo counts once, however many boxes).
* **share** — ``photo_count / n_photos``, ``n_photos`` = the user's public eligible photos.
* **weighted_share** — ``sum(w_p * conf_p) / sum(w_p)`` over the user's public photos, where ``conf_p`` is the
  highest detection score of the category (or of any descendant) in photo ``p``, or the scene/landmark
  probability, and ``0`` when absent; ``w_p = 0.5 ** (age_days / half_life_days)`` with the age measured from
  ``taken_at`` to the end of the ``as_of`` day (``w_p = 1`` without a half-life or without ``taken_at``).
* **score** — ``weighted_share``: in [0, 1], it rewards both how often and how surely a category appears,
  and with a half-life it favours recent photos.
* **lift** — ``share / population_share``, the population share being the category's photo count over all
  public eligible photos of all users: > 1 means the user shows the category more than people do on average.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from datetime import UTC, date, datetime, time, timedelta
from typing import Protocol

import polars as pl
import pyarrow as pa

from photolens.schemas.tables import PREFERENCES, conform

SOURCES = ("object", "scene", "landmark")
DEFAULT_MIN_SCORE = 0.5
DEFAULT_MIN_SCENE_SCORE = 0.05

_PHOTO_COLUMNS: dict[str, pl.DataType] = {
    "photo_id": pl.String(),
    "user_id": pl.String(),
    "status": pl.String(),
    "is_private": pl.Boolean(),
    "taken_at": pl.Datetime("us", "UTC"),
    "scene_coarse": pl.String(),
    "scene_coarse_score": pl.Float64(),
    "scene_labels": pl.List(pl.String()),
    "scene_scores": pl.List(pl.Float64()),
    "landmark_id": pl.String(),
    "landmark_score": pl.Float64(),
    "model_versions": pl.String(),
    "run_id": pl.String(),
    "run_date": pl.String(),
    "processed_at": pl.Datetime("us", "UTC"),
}
_DETECTION_COLUMNS: dict[str, pl.DataType] = {
    "photo_id": pl.String(),
    "run_id": pl.String(),
    "category": pl.String(),
    "category_path": pl.List(pl.String()),
    "score": pl.Float64(),
    "model": pl.String(),
}
_OBS_SCHEMA = {"photo_id": pl.String(), "source": pl.String(), "category": pl.String(),
               "level": pl.Int64(), "conf": pl.Float64()}
_AS_OF_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


class CategoryTreeLike(Protocol):
    """What this module needs from ``photolens.schemas.taxonomy.CategoryTree``."""

    def roll_up(self, category: str) -> list[str]: ...

    def level(self, category: str) -> int: ...


def parse_as_of(as_of: date | str) -> date:
    """``as_of`` as a date; strings must be ``YYYY-MM-DD`` (they end up inside Delta predicates)."""
    if isinstance(as_of, datetime):
        return as_of.date()
    if isinstance(as_of, date):
        return as_of
    if not isinstance(as_of, str) or not _AS_OF_RE.match(as_of):
        raise ValueError(f"as_of must be a date or 'YYYY-MM-DD', got {as_of!r}")
    return date.fromisoformat(as_of)


def default_tree() -> CategoryTreeLike:
    from photolens.schemas.taxonomy import CategoryTree

    return CategoryTree.load()


def _frame(table: pa.Table, columns: dict[str, pl.DataType]) -> pl.DataFrame:
    """The needed columns as a Polars frame; optional columns a table lacks become typed nulls."""
    series = []
    for name, dtype in columns.items():
        if name in table.column_names:
            col = pl.from_arrow(table.column(name))
            assert isinstance(col, pl.Series)
            series.append(col.alias(name).cast(dtype))
        else:
            series.append(pl.Series(name, [None] * table.num_rows, dtype=dtype))
    return pl.DataFrame(series)


def _eligible_photos(photos: pa.Table, as_of: date, *, half_life_days: float | None,
                     include_private: bool, unknown_is_private: bool) -> pl.DataFrame:
    df = _frame(photos, _PHOTO_COLUMNS)
    for required in ("photo_id", "user_id", "status"):
        if df[required].null_count() == df.height and df.height:
            raise ValueError(f"photos: column {required!r} is missing or empty")
    end = datetime.combine(as_of + timedelta(days=1), time(), tzinfo=UTC)
    df = (
        df.filter(pl.col("status") == "ok")
        # A photo re-processed by a later run keeps only its latest ok row (and that run's detections).
        .sort(["run_date", "processed_at", "run_id"], descending=True, nulls_last=True)
        .unique(subset="photo_id", keep="first", maintain_order=True)
        .filter(pl.col("taken_at").is_null() | (pl.col("taken_at") < pl.lit(end)))
        .with_columns(_private=pl.col("is_private").fill_null(unknown_is_private))
    )
    if half_life_days is None:
        weight = pl.lit(1.0)
    else:
        age_days = (pl.lit(end) - pl.col("taken_at")).dt.total_microseconds() / 86_400e6
        weight = pl.when(pl.col("taken_at").is_null()).then(1.0).otherwise(
            pl.lit(0.5).pow(age_days.clip(lower_bound=0.0) / half_life_days))
    return df.with_columns(
        _public=pl.lit(True) if include_private else ~pl.col("_private"),
        _w=weight.cast(pl.Float64),
    )


def _category_paths(categories: Iterable[str], fallback: dict[str, list[str]],
                    tree: CategoryTreeLike) -> tuple[pl.DataFrame, list[str]]:
    """(category, ancestor, level) for every ancestor of every category, the category itself included.

    Levels always come from the tree. A category the tree does not know (a newer detector label) has no level
    of its own: it is left out, but still counts for the first of its row's ``category_path`` ancestors the
    tree knows, and up from there. The unknown names go back to the caller for the lineage.
    """
    rows: list[tuple[str, str, int]] = []
    unknown: list[str] = []
    for cat in sorted(set(categories)):
        try:
            path = tree.roll_up(cat)
        except KeyError:
            unknown.append(cat)
            path = []
            for ancestor in fallback.get(cat, []):
                try:
                    path = tree.roll_up(ancestor)
                except KeyError:
                    continue
                break
        rows.extend((cat, ancestor, tree.level(ancestor)) for ancestor in path)
    frame = pl.DataFrame(rows, schema={"category": pl.String(), "ancestor": pl.String(), "level": pl.Int64()},
                         orient="row")
    return frame.unique(), unknown


def _object_observations(dets: pl.DataFrame, public: pl.DataFrame, min_score: float,
                         tree: CategoryTreeLike) -> tuple[pl.DataFrame, list[str], pl.DataFrame]:
    # Joining on the run too keeps only the detections of the photo row we kept.
    dets = dets.join(public.select("photo_id", "run_id", "user_id"), on=["photo_id", "run_id"],
                     how="inner").filter((pl.col("score") >= min_score) & pl.col("category").is_not_null())
    fallback = {
        row["category"]: [c for c in (row["category_path"] or []) if c != row["category"]]
        for row in dets.filter(pl.col("category_path").is_not_null())
        .unique(subset="category", keep="first").iter_rows(named=True)
    }
    paths, unknown = _category_paths(dets["category"].to_list(), fallback, tree)
    obs = (
        dets.join(paths, on="category", how="inner")
        .group_by("photo_id", "ancestor", "level")
        .agg(conf=pl.col("score").max())
        .select("photo_id", source=pl.lit("object"), category=pl.col("ancestor"), level="level", conf="conf")
    )
    models = dets.group_by("user_id").agg(detection_models=pl.col("model").drop_nulls().unique().sort())
    return obs.cast(_OBS_SCHEMA), unknown, models


def _scene_observations(public: pl.DataFrame, min_scene_score: float) -> pl.DataFrame:
    coarse = public.filter(pl.col("scene_coarse").is_not_null()).select(
        "photo_id", source=pl.lit("scene"), category=pl.col("scene_coarse"), level=pl.lit(0),
        conf=pl.col("scene_coarse_score").fill_null(1.0))
    labelled = public.filter(pl.col("scene_labels").is_not_null())
    bad = labelled.filter(pl.col("scene_scores").list.len().fill_null(-1) != pl.col("scene_labels").list.len())
    if bad.height:
        raise ValueError(f"photos: scene_labels and scene_scores differ in length for {bad.height} photos, "
                         f"e.g. {bad['photo_id'][0]!r}")
    fine = (
        labelled.select("photo_id", "scene_labels", "scene_scores")
        .explode("scene_labels", "scene_scores")
        .filter(pl.col("scene_labels").is_not_null())
        .select("photo_id", source=pl.lit("scene"), category=pl.col("scene_labels"), level=pl.lit(1),
                conf=pl.col("scene_scores").fill_null(1.0))
    )
    both = pl.concat([coarse.cast(_OBS_SCHEMA), fine.cast(_OBS_SCHEMA)])
    return (both.filter(pl.col("conf") >= min_scene_score)
            .group_by("photo_id", "source", "category", "level").agg(conf=pl.col("conf").max()))


def _landmark_observations(public: pl.DataFrame) -> pl.DataFrame:
    return public.filter(pl.col("landmark_id").is_not_null()).select(
        "photo_id", source=pl.lit("landmark"), category=pl.col("landmark_id"), level=pl.lit(0),
        conf=pl.col("landmark_score").fill_null(1.0)).cast(_OBS_SCHEMA)


def _lineage(public: pl.DataFrame, params: dict[str, object], detection_models: pl.DataFrame,
             unknown: list[str]) -> pl.DataFrame:
    """One JSON document per user: the runs and model versions behind their rows, plus the parameters."""
    per_user = public.group_by("user_id").agg(
        runs=pl.col("run_id").drop_nulls().unique().sort(),
        versions=pl.col("model_versions").drop_nulls().unique(),
    ).join(detection_models, on="user_id", how="left")
    parsed: dict[str, dict[str, list[str]]] = {}
    docs = []
    for user_id, runs, versions, det_models in per_user.iter_rows():
        merged: dict[str, set[str]] = {}
        for raw in versions:
            if raw not in parsed:
                loaded = json.loads(raw)
                if not isinstance(loaded, dict):
                    raise ValueError(f"photos.model_versions must be a JSON object, got {raw!r}")
                parsed[raw] = {str(k): [str(v)] for k, v in loaded.items() if v is not None}
            for role, vs in parsed[raw].items():
                merged.setdefault(role, set()).update(vs)
        doc = {
            "run_ids": list(runs),
            "model_versions": {role: sorted(vs) for role, vs in sorted(merged.items())},
            "detection_models": list(det_models or []),
            "params": params,
        }
        if unknown:
            doc["categories_not_in_tree"] = unknown
        docs.append((user_id, json.dumps(doc, sort_keys=True, separators=(",", ":"))))
    return pl.DataFrame(docs, schema={"user_id": pl.String(), "lineage": pl.String()}, orient="row")


def build_preferences(
    photos: pa.Table,
    detections: pa.Table,
    as_of: date | str,
    *,
    half_life_days: float | None = None,
    include_private: bool = False,
    min_score: float = DEFAULT_MIN_SCORE,
    min_scene_score: float = DEFAULT_MIN_SCENE_SCORE,
    unknown_is_private: bool = True,
    tree: CategoryTreeLike | None = None,
) -> pa.Table:
    """The long preference table (schema ``PREFERENCES``) of one ``as_of`` snapshot; see the module docstring.

    Users without a single public eligible photo get no rows. Rows are sorted by user, source, level and
    descending score.
    """
    day = parse_as_of(as_of)
    if half_life_days is not None and not (math.isfinite(half_life_days) and half_life_days > 0):
        raise ValueError(f"half_life_days must be a positive number or None, got {half_life_days!r}")
    if not 0.0 <= min_score <= 1.0 or not 0.0 <= min_scene_score <= 1.0:
        raise ValueError("min_score and min_scene_score must lie in [0, 1]")
    tree = tree if tree is not None else default_tree()
    as_of_str = day.isoformat()

    eligible = _eligible_photos(photos, day, half_life_days=half_life_days, include_private=include_private,
                                unknown_is_private=unknown_is_private)
    users = eligible.group_by("user_id").agg(
        n_photos=pl.col("_public").sum().cast(pl.Int64),
        n_private_excluded=(~pl.col("_public")).sum().cast(pl.Int64),
        w_total=pl.col("_w").filter(pl.col("_public")).sum(),
    ).filter(pl.col("n_photos") > 0)
    public = eligible.filter(pl.col("_public"))

    objects, unknown, det_models = _object_observations(
        _frame(detections, _DETECTION_COLUMNS), public, min_score, tree)
    obs = pl.concat([objects, _scene_observations(public, min_scene_score), _landmark_observations(public)])
    obs = obs.join(public.select("photo_id", "user_id", "_w"), on="photo_id", how="inner")

    counts = obs.group_by("user_id", "source", "category", "level").agg(
        photo_count=pl.len().cast(pl.Int64),
        w_conf=(pl.col("_w") * pl.col("conf")).sum(),
    )
    n_population = public.height
    population = counts.group_by("source", "category").agg(pop_count=pl.col("photo_count").sum())
    params: dict[str, object] = {
        "as_of": as_of_str, "half_life_days": half_life_days, "include_private": include_private,
        "unknown_is_private": unknown_is_private, "min_score": min_score, "min_scene_score": min_scene_score,
    }
    lineage = _lineage(public, params, det_models, unknown)

    out = (
        counts.join(users, on="user_id", how="inner")
        .join(population, on=["source", "category"], how="left")
        .join(lineage, on="user_id", how="left")
        .with_columns(
            share=pl.col("photo_count") / pl.col("n_photos"),
            weighted_share=pl.when(pl.col("w_total") > 0)
            .then(pl.col("w_conf") / pl.col("w_total")).otherwise(0.0),
        )
        .with_columns(
            score=pl.col("weighted_share"),
            lift=pl.col("share") / (pl.col("pop_count") / n_population),
            as_of=pl.lit(as_of_str),
            level=pl.col("level").cast(pl.Int8),
        )
        .sort(["user_id", "source", "level", "score", "category"], descending=[False, False, False, True, False])
        .select(PREFERENCES.names)
    )
    return conform(out.to_arrow(), PREFERENCES)


def wide_vectors(
    prefs: pa.Table,
    *,
    source: str = "object",
    level: int | None = None,
    value: str = "score",
    categories: Sequence[str] | None = None,
) -> pa.Table:
    """``user_id`` plus one float column per category (0.0 where the user has none), for ML consumers.

    ``prefs`` must hold one ``as_of`` snapshot. ``level=None`` keeps every level (tree categories are unique,
    so the columns stay unambiguous). ``categories`` fixes the columns and their order — pass every category
    of the tree for a schema that does not move between snapshots; by default, the categories present.
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    if value not in ("score", "share", "weighted_share", "lift", "photo_count"):
        raise ValueError(f"value {value!r} is not a preference measure")
    df = pl.from_arrow(prefs.select(["user_id", "source", "level", "category", "as_of", value]))
    assert isinstance(df, pl.DataFrame)
    snapshots = df["as_of"].unique().to_list()
    if len(snapshots) > 1:
        raise ValueError(f"wide_vectors needs one as_of snapshot, got {sorted(snapshots)}")
    users = df.select("user_id").unique().sort("user_id")
    df = df.filter(pl.col("source") == source)
    if level is not None:
        df = df.filter(pl.col("level") == level)
    if categories is None:
        categories = sorted(df["category"].unique().to_list())
    reserved = {"user_id", "as_of"} & set(categories)
    if reserved:
        raise ValueError(f"categories named like reserved columns: {sorted(reserved)}")
    df = df.filter(pl.col("category").is_in(list(categories)))
    if df.select("user_id", "category").is_duplicated().any():
        raise ValueError("a category appears at two levels: pass level= to pick one")
    wide = (
        users.join(df.pivot(on="category", index="user_id", values=value), on="user_id", how="left")
        if df.height else users
    )
    columns = [pl.col("user_id")] + [
        (pl.col(c) if c in wide.columns else pl.lit(None)).cast(pl.Float64).fill_null(0.0).alias(c)
        for c in categories
    ]
    return wide.select(columns).to_arrow().cast(
        pa.schema([pa.field("user_id", pa.string(), nullable=False)]
                  + [pa.field(c, pa.float64(), nullable=False) for c in categories]))
