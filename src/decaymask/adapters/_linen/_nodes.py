"""What each node of a Linen tree is, as jax flattens it: its keys in order, and per
value an array, a submodule, or nothing."""

from __future__ import annotations

import sys
from typing import Any

import jax
from flax.core.frozen_dict import FrozenDict

from .._common import path_text
from ._arrays import ARRAY, BOX, classify_leaf, is_box, leaf_kinds, leafy_types, str_keys, unbox
from ._leaf import LinenReader
from ._traced import leaf_error

# What a value is to the module that holds it: one of its arrays (or a box around
# one), a submodule that holds arrays, or a node that holds none (None, {}).
AT_LEAF, AT_NODE, AT_CONST = 0, 1, 2


def holds_leaves(node: Any) -> bool:
    """Whether jax finds a leaf below ``node`` (which :class:`LinenWalk` then reads as
    an array or rejects): only then is it a submodule."""
    stack = [node]
    while stack:
        here = stack.pop()
        kind = type(here)
        if kind is dict:
            stack.extend(here.values())
        elif kind is FrozenDict:
            stack.extend(here._dict.values())
        elif here is None:
            continue
        elif kind in leafy_types or jax.tree_util.tree_leaves(here, is_leaf=is_box):
            return True
    return False



# Keys of these types only are read as they are (a set: its test of a whole node's key
# types runs in C).
STR_ONLY = frozenset({str})


class EmptyNode(Exception):
    """A non-empty mapping holds no leaf: the walk starts again, checking every one."""


def mapping_of(node: Any) -> dict | None:
    """The dict behind a dict or FrozenDict; ``None`` for any other node."""
    kind = type(node)
    if kind is dict:
        return node
    if kind is FrozenDict:
        return node._dict
    return None


class NodeReader(LinenReader):
    """Reads one node of the tree: its keys and what each value is."""

    boxed: bool  # a box (nn.Partitioned) was met: it is a leaf of the result

    variables: bool

    def _items(self, node: Any, where: tuple[str, ...]) -> tuple[list[str], dict[str, Any]]:
        """The keys of the node at the key path ``where``, as text in jax's order, and its
        values by them."""
        mapping = mapping_of(node)
        if mapping is not None:
            keys = None
            try:
                keys = sorted(mapping)
            except TypeError:
                pass  # keys jax cannot sort either: its flatten says why
            if keys is not None and STR_ONLY.issuperset(map(type, keys)):
                return keys, mapping
        children = jax.tree_util.tree_flatten_with_path(node, is_leaf=lambda x: x is not node)[0]
        names = [str_keys(keys)[0] for keys, _ in children]
        values = dict(zip(names, (value for _, value in children)))
        if len(values) != len(names):
            twice = sorted({name for name in names if names.count(name) > 1})
            raise TypeError(
                f"{self.fn}: the keys of {path_text(where)!r} read as the same "
                f"text ({', '.join(map(repr, twice))}), so their paths would be one. "
                f"Give them keys that differ as strings."
            )
        return names, values

    def _names(self, path: tuple[str, ...]) -> tuple[str, ...]:
        """The key path of a module path in the tree (with ``params/`` in variables)."""
        return ("params", *path) if self.variables else path

    def _classify(self, where: tuple[str, ...], name: str, value: Any) -> tuple[int, Any]:
        """(what the value ``name`` of the node at the key path ``where`` is to it, the
        value unboxed)."""
        names = (*where, name)
        kind = type(value)
        if kind is dict or kind is FrozenDict:
            return (AT_NODE if value and holds_leaves(value) else AT_CONST), value
        what = leaf_kinds.get(kind)
        if what is None:
            what = classify_leaf(value)
        if what is ARRAY:
            return AT_LEAF, value
        if what is BOX:
            self.boxed = True
            array = unbox(value)
            what = leaf_kinds.get(type(array))
            if what is None:
                what = classify_leaf(array)
            if what is not ARRAY:
                raise leaf_error(self.fn, names, array)
            return AT_LEAF, array
        if value is None:
            return AT_CONST, value
        eqx = sys.modules.get("equinox")
        if eqx is not None and isinstance(value, eqx.Module):
            raise TypeError(
                f"{self.fn}: {path_text(names)!r} is an Equinox {type(value).__name__}, "
                f"not Linen params. Use policy.{self.fn.replace('flax', 'equinox')}(tree) "
                f"for Equinox models, and for mappings of them."
            )
        one = jax.tree_util.tree_flatten(value, is_leaf=lambda x: x is not value)[0]
        if len(one) == 1 and one[0] is value:
            raise leaf_error(self.fn, names, value)
        return (AT_NODE if holds_leaves(value) else AT_CONST), value
