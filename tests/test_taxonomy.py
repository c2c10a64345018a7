"""The category tree: packaged data, queries, the related-category rule and validation."""

from __future__ import annotations

import copy
import json
from importlib import resources
from typing import Any

import pytest

from photolens.schemas.taxonomy import SCHEMA_VERSION, CategoryTree, TaxonomyError, UnknownCategoryError


@pytest.fixture(scope="module")
def tree() -> CategoryTree:
    return CategoryTree.load()


@pytest.fixture
def doc() -> dict[str, Any]:
    text = resources.files("photolens.schemas").joinpath("category_tree.json").read_text(encoding="utf-8")
    return json.loads(text)


def test_packaged_tree_loads_once_with_its_schema_version(tree: CategoryTree, doc: dict[str, Any]) -> None:
    assert doc["schema_version"] == SCHEMA_VERSION == tree.schema_version
    assert CategoryTree.load() is tree
    assert len(tree) == len(doc["nodes"])
    assert set(tree) == {n["name"] for n in doc["nodes"]}


def test_every_coco_class_is_a_node(tree: CategoryTree) -> None:
    assert len(tree.coco_categories) == 80
    assert all(name in tree for name in tree.coco_names)
    assert tree.coco_name(1) == "person"
    assert tree.coco_name(18) == "dog"
    assert tree.coco_name(90) == "toothbrush"
    with pytest.raises(UnknownCategoryError):
        tree.coco_name(12)  # one of the ten unused COCO ids


def test_examples_from_the_brief_roll_up_to_broad_groups(tree: CategoryTree) -> None:
    assert tree.roll_up("canary") == ["canary", "bird", "animal"]
    assert tree.roll_up("car") == ["car", "vehicle", "transport"]
    assert tree.roll_up("cat") == ["cat", "pet", "animal"]
    assert tree.root("pizza") == "food"
    assert tree.parents("taxi") == ["car", "vehicle", "transport"]
    assert tree.path("taxi") == ["transport", "vehicle", "car", "taxi"]
    assert tree.path("football") == ["sports", "ball game equipment", "sports ball", "football"]


def test_roots_are_the_broad_groups_at_level_zero(tree: CategoryTree) -> None:
    roots = tree.roots
    assert {"person", "animal", "transport", "food", "furniture", "electronics", "building"} <= set(roots)
    for root in roots:
        assert tree.level(root) == 0
        assert tree.parents(root) == []
        assert tree.parent(root) is None
        assert tree.roll_up(root) == [root]
        assert tree.children(root), f"root {root!r} groups nothing"
    # "person" is both a COCO class and its own group (man, woman, boy, girl below it).
    assert "person" in roots
    assert tree.children("person") == ["man", "woman", "boy", "girl"]


def test_levels_partition_the_tree_and_follow_parents(tree: CategoryTree) -> None:
    seen: list[str] = []
    for level in range(tree.depth):
        nodes = tree.nodes_at_level(level)
        assert nodes, f"level {level} is empty"
        for name in nodes:
            assert tree.level(name) == level
            parent = tree.parent(name)
            assert (parent is None) == (level == 0)
            if parent is not None:
                assert tree.level(parent) == level - 1
                assert name in tree.children(parent)
        seen += nodes
    assert sorted(seen) == sorted(tree)
    assert tree.nodes_at_level(tree.depth) == []
    assert tree.nodes_at_level(0) == tree.roots


def test_at_level_and_is_ancestor(tree: CategoryTree) -> None:
    assert tree.at_level("canary", 0) == "animal"
    assert tree.at_level("canary", 1) == "bird"
    assert tree.at_level("canary", 2) == "canary"
    assert tree.at_level("canary", 3) is None
    assert tree.at_level("bird", 2) is None
    assert tree.is_ancestor("animal", "canary")
    assert tree.is_ancestor("bird", "canary")
    assert not tree.is_ancestor("canary", "canary")
    assert not tree.is_ancestor("canary", "bird")
    assert not tree.is_ancestor("transport", "canary")


def test_related_follows_the_seed_examples(tree: CategoryTree) -> None:
    # seed 000: canary - bird and cat - animal are not errors, in either direction.
    for a, b in [("canary", "bird"), ("cat", "animal"), ("taxi", "transport"), ("dog", "dog")]:
        assert tree.related(a, b)
        assert tree.related(b, a)
    # Different objects are errors, even when they share a parent or a root.
    for a, b in [("cat", "dog"), ("car", "truck"), ("canary", "parrot"), ("cat", "giraffe"), ("car", "airplane")]:
        assert not tree.related(a, b)
        assert not tree.related(b, a)
    # Unrelated branches.
    assert not tree.related("canary", "pet")
    assert not tree.related("pizza", "animal")


def test_related_with_siblings_needs_a_non_root_parent(tree: CategoryTree) -> None:
    assert tree.related("cat", "dog", siblings=True)  # both under "pet"
    assert tree.related("canary", "parrot", siblings=True)
    assert tree.related("giraffe", "zebra", siblings=True)
    assert not tree.related("cat", "giraffe", siblings=True)  # pet vs wild animal: only the root is shared
    assert not tree.related("vehicle", "aircraft", siblings=True)  # siblings under a root
    assert not tree.related("person", "animal", siblings=True)  # two roots
    assert not tree.related("canary", "cat", siblings=True)


def test_unknown_category_raises(tree: CategoryTree) -> None:
    for call in (tree.parents, tree.path, tree.level, tree.roll_up, tree.children):
        with pytest.raises(UnknownCategoryError, match="spaceship"):
            call("spaceship")
    with pytest.raises(UnknownCategoryError):
        tree.related("spaceship", "car")
    with pytest.raises(UnknownCategoryError):
        tree.related("car", "spaceship")
    assert "spaceship" not in tree
    assert "car" in tree


def _node(doc: dict[str, Any], name: str) -> dict[str, Any]:
    return next(n for n in doc["nodes"] if n["name"] == name)


def test_validation_rejects_a_cycle(doc: dict[str, Any]) -> None:
    bad = copy.deepcopy(doc)
    _node(bad, "animal")["parent"] = "canary"  # animal -> canary -> bird -> animal
    with pytest.raises(TaxonomyError, match="cycle") as err:
        CategoryTree.from_dict(bad)
    assert {"animal", "bird", "canary"} <= set(str(err.value).replace("->", " ").split())


def test_validation_rejects_a_self_loop(doc: dict[str, Any]) -> None:
    bad = copy.deepcopy(doc)
    _node(bad, "bird")["parent"] = "bird"
    with pytest.raises(TaxonomyError, match="cycle"):
        CategoryTree.from_dict(bad)


def test_validation_rejects_a_missing_coco_class(doc: dict[str, Any]) -> None:
    bad = copy.deepcopy(doc)
    bad["nodes"] = [n for n in bad["nodes"] if n["name"] != "toothbrush"]
    with pytest.raises(TaxonomyError, match="toothbrush"):
        CategoryTree.from_dict(bad)
    short = copy.deepcopy(doc)
    short["coco_categories"] = short["coco_categories"][:-1]
    with pytest.raises(TaxonomyError, match="80 COCO classes"):
        CategoryTree.from_dict(short)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d["nodes"].append({"name": "bird", "parent": "pet"}), "duplicate node 'bird'"),
        (lambda d: _node(d, "canary").update(parent="birds"), "unknown parent 'birds'"),
        (lambda d: d.update(schema_version=99), "schema_version 99"),
        (lambda d: d["nodes"].append({"name": "Robin", "parent": "bird"}), "lower case"),
        (lambda d: d["nodes"].append({"name": "robin", "parent": 3}), "parent must be a string"),
        (lambda d: d.update(nodes=[]), "no 'nodes'"),
        (lambda d: d["coco_categories"].append({"id": 91, "name": "dog"}), "repeated id or name"),
        (lambda d: d["coco_categories"].append({"id": "x", "name": "dog"}), "int 'id'"),
    ],
)
def test_validation_errors_name_the_problem(doc: dict[str, Any], mutate: Any, message: str) -> None:
    bad = copy.deepcopy(doc)
    mutate(bad)
    with pytest.raises(TaxonomyError, match=message):
        CategoryTree.from_dict(bad)


def test_a_valid_variant_builds(doc: dict[str, Any]) -> None:
    extended = copy.deepcopy(doc)
    extended["nodes"].append({"name": "robin", "parent": "bird"})
    tree = CategoryTree.from_dict(extended)
    assert tree.roll_up("robin") == ["robin", "bird", "animal"]
    assert tree.related("robin", "animal")
    assert not tree.related("robin", "canary")
