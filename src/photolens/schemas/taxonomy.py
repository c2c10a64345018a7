"""The category tree: detector classes, the groups they roll up to, and which labels are "related".

The tree is data (``category_tree.json`` in this package, with its own ``schema_version``); this module
loads and validates it and answers questions about it. Every node has exactly one parent; roots are
the broad groups (animal, transport, food, ...) at level 0.

**Related categories** (seed 000_0fb00c7dd830498f.txt: "close categories whose confusion is not an
error, e.g. canary - bird, cat - animal"): two labels are related when

* they are the same node, or
* one is an ancestor of the other, at any distance and including the roots — the seed's own examples
  are exactly this shape (canary → bird is a parent, cat → animal is a root two levels up), and a
  coarser true label is a correct answer, only a less specific one.

Siblings (car / truck, cat / dog, canary / parrot) are *not* related by default: they are different
objects, and a user who photographs dogs would rightly call "cat" a mistake. ``related(...,
siblings=True)`` adds children of the same **non-root** parent for callers that want a looser
measure; sharing only a root (cat / giraffe under animal, car / airplane under transport) is never
enough. The relation is symmetric.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

SCHEMA_VERSION = 1
TREE_RESOURCE = "category_tree.json"
_PACKAGE = "photolens.schemas"


class TaxonomyError(ValueError):
    """The tree data is malformed (cycle, unknown parent, duplicate name, missing COCO class...)."""


class UnknownCategoryError(KeyError):
    """A category name that is not a node of the tree."""

    def __str__(self) -> str:
        # KeyError's default repr-quotes the whole message; keep it readable.
        return str(self.args[0]) if self.args else "unknown category"


@dataclass(frozen=True)
class CocoCategory:
    id: int
    name: str


class CategoryTree:
    """A validated, immutable category tree. Build with :meth:`load` or :meth:`from_dict`."""

    def __init__(
        self,
        parent_of: Mapping[str, str | None],
        coco_categories: tuple[CocoCategory, ...],
        schema_version: int,
    ) -> None:
        self._parent: dict[str, str | None] = dict(parent_of)
        self.coco_categories = coco_categories
        self.schema_version = schema_version
        self._children: dict[str, list[str]] = {name: [] for name in self._parent}
        for name, parent in self._parent.items():
            if parent is not None:
                self._children[parent].append(name)
        # Chains are computed once: the tree is small and these lookups run per detection row.
        self._roll_up: dict[str, tuple[str, ...]] = {name: self._walk_up(name) for name in self._parent}

    # ------------------------------------------------------------------ construction
    @classmethod
    def load(cls) -> CategoryTree:
        """The packaged tree (``photolens.schemas/category_tree.json``), parsed once per process."""
        return _load_packaged()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CategoryTree:
        """Validate a tree document (the JSON layout) and build the tree; raises :class:`TaxonomyError`."""
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise TaxonomyError(f"category tree schema_version {version!r} is not supported (want {SCHEMA_VERSION})")
        raw_nodes = data.get("nodes")
        if not isinstance(raw_nodes, list) or not raw_nodes:
            raise TaxonomyError("category tree has no 'nodes' list")
        parent_of: dict[str, str | None] = {}
        for i, node in enumerate(raw_nodes):
            if not isinstance(node, Mapping) or not isinstance(node.get("name"), str):
                raise TaxonomyError(f"node #{i} needs a string 'name': {node!r}")
            name = node["name"]
            parent = node.get("parent")
            if parent is not None and not isinstance(parent, str):
                raise TaxonomyError(f"node {name!r}: parent must be a string or null, got {parent!r}")
            if name != name.strip().lower() or not name:
                # Names are the join key with detector labels and table rows: one spelling only.
                raise TaxonomyError(f"node name {name!r} must be non-empty, lower case, without outer spaces")
            if name in parent_of:
                raise TaxonomyError(f"duplicate node {name!r}: every node has exactly one parent")
            parent_of[name] = parent
        for name, parent in parent_of.items():
            if parent is not None and parent not in parent_of:
                raise TaxonomyError(f"node {name!r} has unknown parent {parent!r}")
        _check_acyclic(parent_of)

        coco: list[CocoCategory] = []
        for entry in data.get("coco_categories", []):
            if (
                not isinstance(entry, Mapping)
                or not isinstance(entry.get("id"), int)
                or not isinstance(entry.get("name"), str)
            ):
                raise TaxonomyError(f"coco_categories entries need an int 'id' and a str 'name': {entry!r}")
            cat = CocoCategory(id=entry["id"], name=entry["name"])
            if cat.name not in parent_of:
                raise TaxonomyError(f"COCO class {cat.name!r} (id {cat.id}) is not a node of the tree")
            coco.append(cat)
        if len({c.id for c in coco}) != len(coco) or len({c.name for c in coco}) != len(coco):
            raise TaxonomyError("coco_categories has a repeated id or name")
        if len(coco) != 80:
            raise TaxonomyError(f"coco_categories must list the 80 COCO classes, found {len(coco)}")
        return cls(parent_of, tuple(coco), int(version))

    def _walk_up(self, name: str) -> tuple[str, ...]:
        chain = [name]
        parent = self._parent[name]
        while parent is not None:
            chain.append(parent)
            parent = self._parent[parent]
        return tuple(chain)

    # ------------------------------------------------------------------ queries
    def __contains__(self, name: object) -> bool:
        return name in self._parent

    def __iter__(self) -> Iterator[str]:
        return iter(self._parent)

    def __len__(self) -> int:
        return len(self._parent)

    def _require(self, name: str) -> None:
        if name not in self._parent:
            raise UnknownCategoryError(f"unknown category {name!r} (not in the category tree)")

    def parent(self, name: str) -> str | None:
        self._require(name)
        return self._parent[name]

    def children(self, name: str) -> list[str]:
        self._require(name)
        return list(self._children[name])

    def parents(self, name: str) -> list[str]:
        """Ancestors of ``name``, nearest first, ending at its root; ``[]`` for a root."""
        self._require(name)
        return list(self._roll_up[name][1:])

    def roll_up(self, name: str) -> list[str]:
        """``[name, parent, ..., root]``: the labels a detection of ``name`` also counts for."""
        self._require(name)
        return list(self._roll_up[name])

    def path(self, name: str) -> list[str]:
        """``[root, ..., parent, name]``: the node's path from its root."""
        return self.roll_up(name)[::-1]

    def root(self, name: str) -> str:
        return self.roll_up(name)[-1]

    def level(self, name: str) -> int:
        """Depth of the node: 0 for a root."""
        self._require(name)
        return len(self._roll_up[name]) - 1

    def at_level(self, name: str, level: int) -> str | None:
        """The ancestor of ``name`` (or itself) at ``level``; ``None`` when the node is shallower."""
        path = self.path(name)
        return path[level] if 0 <= level < len(path) else None

    @property
    def roots(self) -> list[str]:
        return self.nodes_at_level(0)

    @property
    def depth(self) -> int:
        """Number of levels (1 for a tree of roots only)."""
        return max(len(chain) for chain in self._roll_up.values())

    def nodes_at_level(self, level: int) -> list[str]:
        """Nodes at ``level``, in the order of the tree file."""
        return [name for name, chain in self._roll_up.items() if len(chain) - 1 == level]

    def is_ancestor(self, ancestor: str, name: str) -> bool:
        """True when ``ancestor`` is a strict ancestor of ``name``."""
        self._require(ancestor)
        self._require(name)
        return ancestor in self._roll_up[name][1:]

    def related(self, a: str, b: str, *, siblings: bool = False) -> bool:
        """Whether confusing ``a`` and ``b`` is not an error (see the module docstring).

        Same node, or one an ancestor of the other (roots included); with ``siblings=True`` also two
        nodes that share a non-root parent. Symmetric. Unknown names raise :class:`UnknownCategoryError`.
        """
        self._require(a)
        self._require(b)
        if a == b or a in self._roll_up[b] or b in self._roll_up[a]:
            return True
        if siblings:
            parent = self._parent[a]
            return parent is not None and parent == self._parent[b] and self._parent[parent] is not None
        return False

    @property
    def coco_names(self) -> list[str]:
        """The 80 COCO class names in label-map order."""
        return [c.name for c in self.coco_categories]

    def coco_name(self, category_id: int) -> str:
        for cat in self.coco_categories:
            if cat.id == category_id:
                return cat.name
        raise UnknownCategoryError(f"unknown COCO category id {category_id}")


def _check_acyclic(parent_of: Mapping[str, str | None]) -> None:
    # Colour each node once: "done" nodes are known to reach a root, so the walk is linear overall.
    done: set[str] = set()
    for start in parent_of:
        seen: list[str] = []
        on_path: set[str] = set()
        node: str | None = start
        while node is not None and node not in done:
            if node in on_path:
                cycle = [*seen[seen.index(node) :], node]
                raise TaxonomyError(f"category tree has a cycle: {' -> '.join(cycle)}")
            on_path.add(node)
            seen.append(node)
            node = parent_of[node]
        done.update(seen)


@cache
def _load_packaged() -> CategoryTree:
    text = resources.files(_PACKAGE).joinpath(TREE_RESOURCE).read_text(encoding="utf-8")
    return CategoryTree.from_dict(json.loads(text))
