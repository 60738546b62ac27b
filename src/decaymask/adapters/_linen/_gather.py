"""The arrays of a Linen mapping grouped by the path that holds them, in jax's leaf order."""

from __future__ import annotations

import reprlib
import sys
from collections.abc import Mapping
from typing import Any

import jax
from flax.core.frozen_dict import FrozenDict

from ...core._infer import name_kind, role_from_name
from .._common import path_text
from ._arrays import (
    ARRAY,
    BOX,
    classify_leaf,
    is_array_leaf,
    is_box,
    leaf_kinds,
    plain_types,
    str_keys,
    unbox,
)
from ._tables import ATTENTION_PROJECTIONS, auto_class

_MAPPINGS = (dict, FrozenDict)


class Gathered:
    """Every array of a mapping, by the node of key paths that holds it.

    Nodes are numbered in jax's order, a node after its parent: ``paths[m]`` is the
    key path of node ``m`` (as text; a variables mapping's start with their
    collection), ``parent[m]`` its parent's number (``-1`` at the top), ``arrays[m]``
    the arrays (unboxed) it holds directly, by name, or ``None``, and ``children[m]``
    the keys of its nodes that hold arrays somewhere below, or ``None``. Leaf ``i`` of
    jax's flattening is ``arrays[node[i]][name[i]]``: per leaf only an int and a string
    are kept, so that a large tree does not wake the cyclic garbage collector.
    """

    __slots__ = ("arrays", "boxed", "children", "held", "name", "node", "parent", "paths")

    def __init__(self) -> None:
        self.boxed = False  # a leaf is a box (nn.Partitioned) around its array
        self.paths: list[tuple[str, ...]] = []
        self.parent: list[int] = []
        self.arrays: list[dict[str, Any] | None] = []
        self.children: list[set[str] | None] = []
        self.held: list[bool] = []  # arrays at or below the node
        self.node: list[int] = []
        self.name: list[str] = []

    def add_node(self, path: tuple[str, ...], parent: int) -> int:
        self.paths.append(path)
        self.parent.append(parent)
        self.arrays.append(None)
        self.children.append(None)
        self.held.append(False)
        return len(self.paths) - 1

    def hold(self, m: int) -> None:
        """Notes that node ``m`` holds an array: each node above holds its key."""
        held, parent, children, paths = self.held, self.parent, self.children, self.paths
        while m >= 0 and not held[m]:
            held[m] = True
            up = parent[m]
            if up >= 0:
                below = children[up]
                if below is None:
                    below = children[up] = set()
                below.add(paths[m][-1])
            m = up


def gather(fn: str, tree: Mapping) -> Gathered:
    """The arrays of ``tree`` in jax's flattening order (boxes count as leaves).

    Plain dicts and FrozenDicts are read directly, their keys in sorted order as jax
    reads them; any other node (a list, a tuple, a registered pytree) is flattened by
    jax, its keys read as text.

    Raises:
      TypeError: a leaf is not an array (nor a box around one), or a node is an
        Equinox module.
    """
    out = Gathered()
    paths, parents, arrays_of, children, held = (
        out.paths, out.parent, out.arrays, out.children, out.held
    )
    add_leaf, add_name = out.node.append, out.name.append
    # Frames of (node number, its path, node, sorted keys, next position): a loop, so
    # that depth is not limited by the Python stack. A frame is left at a submodule and
    # taken up again after it, which keeps jax's order.
    stack: list[tuple[int, tuple[str, ...], Any, list, int]] = []
    if type(tree) in _MAPPINGS:
        stack.append((out.add_node((), -1), (), _own_dict(tree), sorted(tree), 0))
    else:
        _foreign(fn, out, out.add_node((), -1), tree)
    while stack:
        m, path, node, keys, at = stack.pop()
        arrays = arrays_of[m]
        while at < len(keys):
            key = keys[at]
            at += 1
            value = node[key]
            name = key if type(key) is str else str(key)
            kind = type(value)
            if kind not in plain_types:
                if kind is dict or kind is FrozenDict:
                    if value:
                        stack.append((m, path, node, keys, at))
                        inner = len(paths)
                        inner_path = path + (name,)
                        paths.append(inner_path)
                        parents.append(m)
                        arrays_of.append(None)
                        children.append(None)
                        held.append(False)
                        stack.append((inner, inner_path, _own_dict(value), sorted(value), 0))
                        break
                    continue
                what = leaf_kinds.get(kind)
                if what is None:
                    what = classify_leaf(value)
                if what is not BOX and what is not ARRAY:
                    _foreign(fn, out, out.add_node(path + (name,), m), value)
                    continue
                if what is BOX:
                    out.boxed = True
                    value = unbox(value)
                    if not is_array_leaf(value):
                        raise _not_an_array(fn, path + (name,), value)
            if arrays is None:
                arrays = arrays_of[m] = {}
                if not held[m]:
                    out.hold(m)
            arrays[name] = value
            add_leaf(m)
            add_name(name)
    return out


def _own_dict(node: Mapping) -> dict:
    # A FrozenDict's own dict: its __getitem__ copies every dict value it returns.
    return node._dict if type(node) is FrozenDict else node  # type: ignore[return-value]


def _foreign(fn: str, out: Gathered, m: int, node: Any) -> None:
    """The leaves of node ``m``, neither a dict, a FrozenDict nor an array."""
    path = out.paths[m]
    eqx = sys.modules.get("equinox")
    if eqx is not None and isinstance(node, eqx.Module):
        raise TypeError(
            f"{fn}: {path_text(path)!r} is an Equinox {type(node).__name__}, not Linen "
            f"params. Use policy.{fn.replace('flax', 'equinox')}(tree) for "
            f"Equinox models, and for mappings of them."
        )
    flat = jax.tree_util.tree_flatten_with_path(node, is_leaf=is_box)[0]
    numbers = {path: m}
    for keys, value in flat:
        names = path + str_keys(keys)
        if not keys:
            raise _not_an_array(fn, names, value)
        array = value
        if is_box(value):
            out.boxed = True
            array = unbox(value)
        if not is_array_leaf(array):
            raise _not_an_array(fn, names, array)
        here = m
        for i in range(len(path) + 1, len(names)):
            found = numbers.get(names[:i])
            if found is None:
                found = numbers[names[:i]] = out.add_node(names[:i], here)
            here = found
        arrays = out.arrays[here]
        if arrays is None:
            arrays = out.arrays[here] = {}
            out.hold(here)
        arrays[names[-1]] = array
        out.node.append(here)
        out.name.append(names[-1])


def _not_an_array(fn: str, names: tuple[str, ...], value: Any) -> TypeError:
    return TypeError(
        f"{fn}: leaf {path_text(names)!r} is {reprlib.repr(value)} "
        f"({type(value).__name__}); expected a jax or numpy array, or an "
        f"nn.Partitioned (flax AxisMetadata) box around one. Remove "
        f"non-array entries from the tree before building the mask."
    )


# Module keys by what names-only inference reads of them (see key_traits).
_traits_of: dict[str, int] = {}
_trait_ids: dict[tuple, int] = {}
_TRAITS_KEPT = 1 << 16


def key_traits(key: str) -> int:
    """An id equal for module keys that names-only inference cannot tell apart.

    :meth:`LinenInference.infer_module` reads a key only through its auto name, the
    kind its name makes evident, whether it says position, whether it names an
    attention projection, and whether it is empty: ``Block_0`` and ``Block_7`` share an
    id, and so do ``Dense_0`` and ``Dense_1``. The ids are never reused, so that the map
    of keys may be cleared at any time.
    """
    found = _traits_of.get(key)
    if found is None:
        auto, stacked = auto_class(key)
        traits = (
            auto,
            stacked,
            name_kind(key),
            role_from_name("embedding", "embedding", key),
            key in ATTENTION_PROJECTIONS,
            bool(key),
        )
        found = _trait_ids.setdefault(traits, len(_trait_ids))
        if len(_traits_of) >= _TRAITS_KEPT:
            _traits_of.clear()
        _traits_of[key] = found
    return found

