"""The scene taxonomy as data: model classes -> fine scene labels -> coarse labels.

``scene_mapping.json`` (next to this module) holds

* ``coarse_labels``: the labels users search by (forest, beach, restaurant, ...) with a description;
* ``coarse_to_fine``: every fine label under exactly one coarse label. Fine labels are the Places365
  category names without their ``/x/`` prefix (``/p/pub/indoor`` -> ``pub/indoor``), plus a few for
  ImageNet classes without a Places365 equivalent (``sandbar``, ``geyser``, ``planetarium`` ...);
* ``imagenet_to_fine``: the ImageNet-1k classes that show a scene or a place (``seashore``,
  ``alp``, ``restaurant``, ``church`` ...) or an object strongly tied to one (``park bench`` ->
  ``park``, ``soccer ball`` -> ``soccer_field``), as ``index: [ImageNet name, fine label]``; the
  other ImageNet classes are objects and map to no scene;
* ``places365_categories``: the 365 CSAIL category names in output order.

The seed 002_c25c13e8b0f7e642.txt ("Scene mapping") gives the rule and the examples kept here:
bamboo forest, broadleaf forest, forest path, forest road, rainforest -> forest; hospital, hospital
room, nursery, operating room -> hospital; hotel outdoor, hotel room, inn outdoor, youth hostel ->
hotel; cafeteria, sushi bar, restaurant, food court, pub -> restaurant, with probabilities adding up
(0.18 + 0.18 + 0.17 + 0.09 + 0.07 -> restaurant 0.7). Its WRN example keeps ``dining_hall`` apart from
restaurant (restaurant 0.62, "dining room" 0.07); here dining halls go with dining rooms under home.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

SCENE_MAPPING_PATH = Path(__file__).with_name("scene_mapping.json")


class SceneMappingError(ValueError):
    """The mapping file is inconsistent (a fine label under two coarse labels, an unknown label ...)."""


def places_fine_label(category: str) -> str:
    """``/a/apartment_building/outdoor`` -> ``apartment_building/outdoor`` (already bare names pass)."""
    category = category.strip()
    if category.startswith("/"):
        parts = category.split("/", 2)
        if len(parts) < 3 or len(parts[1]) != 1 or not parts[2]:
            raise SceneMappingError(f"not a Places365 category name: {category!r}")
        return parts[2]
    return category


@dataclass(frozen=True)
class SceneMapping:
    schema_version: int
    coarse_labels: tuple[str, ...]
    fine_to_coarse: Mapping[str, str]
    imagenet_to_fine: Mapping[int, str]
    imagenet_names: Mapping[int, str]
    places365_categories: tuple[str, ...]

    @property
    def fine_labels(self) -> tuple[str, ...]:
        return tuple(self.fine_to_coarse)

    def coarse_of(self, fine: str) -> str:
        try:
            return self.fine_to_coarse[fine]
        except KeyError:
            raise SceneMappingError(f"fine scene label {fine!r} is not in the scene mapping") from None


def parse_scene_mapping(doc: Mapping[str, Any]) -> SceneMapping:
    """Build and check a :class:`SceneMapping` from the JSON document."""
    coarse: tuple[str, ...] = tuple(doc["coarse_labels"])
    fine_to_coarse: dict[str, str] = {}
    for c, fines in doc["coarse_to_fine"].items():
        if c not in coarse:
            raise SceneMappingError(f"coarse_to_fine uses undeclared coarse label {c!r}")
        for f in fines:
            if f in fine_to_coarse:
                raise SceneMappingError(f"fine label {f!r} is under both {fine_to_coarse[f]!r} and {c!r}")
            fine_to_coarse[f] = c
    imagenet_to_fine: dict[int, str] = {}
    imagenet_names: dict[int, str] = {}
    for key, (name, fine) in doc["imagenet_to_fine"].items():
        idx = int(key)
        if not 0 <= idx < 1000:
            raise SceneMappingError(f"ImageNet index {idx} out of range")
        if fine not in fine_to_coarse:
            raise SceneMappingError(f"ImageNet class {idx} ({name}) maps to unknown fine label {fine!r}")
        imagenet_to_fine[idx] = fine
        imagenet_names[idx] = name
    places: tuple[str, ...] = tuple(doc["places365_categories"])
    if len(places) != 365 or len(set(places)) != 365:
        raise SceneMappingError(f"places365_categories must list 365 distinct names, got {len(places)}")
    unmapped = [p for p in places if places_fine_label(p) not in fine_to_coarse]
    if unmapped:
        raise SceneMappingError(f"Places365 categories without a coarse label: {unmapped[:5]}")
    return SceneMapping(int(doc["schema_version"]), coarse, fine_to_coarse, imagenet_to_fine, imagenet_names, places)


@lru_cache(maxsize=4)
def load_scene_mapping(path: str | Path = SCENE_MAPPING_PATH) -> SceneMapping:
    return parse_scene_mapping(json.loads(Path(path).read_text(encoding="utf-8")))
