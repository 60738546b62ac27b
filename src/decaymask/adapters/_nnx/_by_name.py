"""NNX leaves read by names alone: a State, and the variables of a Linen module in NNX.

A State carries no classes: kinds come from its keys and the arrays each key holds,
read by the shared inference, with what only a State shows added; stacked leading axes
from what the arrays under a module agree on (``_stacking``), and everything else from
one layer's shapes.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from ...core._infer import Reading, read_kind
from ...core._leaf import Layer, Leaf
from ...core._names import kind_from_name
from ...core._roles import role_from_name
from .._common import MatrixAxes, key_name, path_text
from .._contract import TreedefRebuild
from ._layouts import IN_OUT
from ._stacking import stacked_axes
from ._values import EMPTY, leaf_name, not_an_array, module_key, shape_dtype

# Attention projections: their kernels have more than two axes but are not convolutions.
_PROJECTIONS = frozenset({"query", "key", "value", "out"})

_name_layers: dict[tuple[str, str], Layer] = {}


def _name_layer(kind: str, source: str = "name") -> Layer:
    layer = _name_layers.get((kind, source))
    if layer is None:
        layer = _name_layers[(kind, source)] = Layer(kind, None, None, source)
    return layer


def _level_kind(key: Any) -> str | None:
    return kind_from_name(key) if isinstance(key, str) else None


def _is_projection(own: str | None) -> bool:
    return own is not None and (own in _PROJECTIONS or own.endswith("_proj"))


Children = dict[tuple, frozenset]
"""Module path -> the keys of the modules under it that hold arrays."""

_NO_READING = Reading("recurrent", "name")
"""A cell's gates: their arrays are the cell's, read by no content."""


def _name_owner(
    parent: tuple, arrays: dict[str, tuple[int, ...]], children: Children
) -> tuple[Layer, tuple[Layer, ...], tuple[int, ...], Reading]:
    """The owner layer, its ancestors, where they stand (``Leaf.module_depths``) and the
    reading of its arrays, for the arrays held under ``parent``.

    Every key of ``parent`` is read as a module: the ancestors are those of the keys
    before the owner's (a recurrent cell's, before the cell's), each standing at its
    own key, and the owner right after them; at the root, at no key.
    """
    layer, outer, reading = _name_layers_of(parent, arrays, children)
    return layer, outer, tuple(range(1, len(outer) + 2)) if parent else (0,), reading


def _in_attention(parent: tuple, levels: list[str | None], children: Children) -> bool:
    """Whether the module holding ``parent`` is an attention layer: its name says so, or
    it holds query, key, value and out projections (as ``nnx.MultiHeadAttention``)."""
    if len(parent) < 2:
        return False
    return levels[-2] == "attention" or {"query", "key", "value", "out"} <= children.get(
        parent[:-1], frozenset()
    )


def _name_layers_of(
    parent: tuple, arrays: dict[str, tuple[int, ...]], children: Children
) -> tuple[Layer, tuple[Layer, ...], Reading]:
    """The owner layer, its ancestors and the reading of its arrays, for the arrays
    held under ``parent``.

    The owner's key and the names and shapes of the arrays it holds are read by the
    shared inference (:func:`read_kind`), as the module walk reads a module's class
    name and arrays; what only a State shows is added: the gates of a module named as
    a recurrent cell are the cell's, and the multi-axis kernels of an attention layer's
    projections are linear.
    """
    levels = [_level_kind(key) for key in parent]
    own = module_key(parent)
    outer = tuple(_name_layer(k or "unknown") for k in levels[:-1])
    kind = _level_kind(own)
    if kind in (None, "linear"):
        # Inside a module named as a recurrent cell, unnamed layers and dense gates are
        # the cell's own, as with classes (NNX cells hold Linear gates like dense_i).
        for depth, level in enumerate(levels[:-1]):
            if level == "recurrent":
                cell_outer = tuple(_name_layer(k or "unknown") for k in levels[:depth])
                return _name_layer("recurrent"), cell_outer, _NO_READING
    reading = read_kind(own, arrays)
    kind, evidence = reading.kind, reading.evidence
    ranks = {name: len(shape) - reading.stacked for name, shape in arrays.items()}
    if kind == "linear" and _level_kind(own) == "conv" and ranks.get("kernel", 0) >= 3:
        # A kernel of a conv's rank whose bias has more than one axis: a stack of
        # convolutions (the bias's extra axes are the stacked ones), as the name says.
        return _name_layer("conv", "name"), outer, reading
    if kind == "conv" and "kernel" in ranks and _level_kind(own) != "conv":
        if _is_projection(own) and _in_attention(parent, levels, children):
            # A multi-axis projection of an attention layer (in, heads, head_dim).
            return _name_layer("linear", "content"), outer, reading
        if _level_kind(own) == "linear":
            # A kernel of three or more axes named as a linear layer that is no stack
            # of linear layers: a convolution, as far as ranks tell.
            return _name_layer("conv", "ambiguous"), outer, reading
        if _level_kind(own) is None and len(ranks) == 1 and ranks["kernel"] == 3:
            # A lone (k, in, out) kernel no name speaks for: a bias-free 1-D conv, or
            # linear layers stacked by nnx.vmap (the module walk knows which).
            return _name_layer("conv", "ambiguous"), outer, reading
    return _name_layer(kind, evidence), outer, reading


def _name_axes(kind: str, own: Any, name: str, rank: int) -> MatrixAxes | None:
    """The (in, out) layout of a weight matrix known only by names and rank."""
    if rank == 2 and (
        (name == "kernel" and kind in ("linear", "recurrent"))
        or (name == "embedding" and kind == "embedding")
        or (name in ("lora_a", "lora_b") and kind == "lora")
    ):
        return IN_OUT
    if name == "kernel" and kind == "conv" and rank >= 3:
        return tuple(range(rank - 1)), (rank - 1,)
    if name == "kernel" and kind == "linear" and rank == 3 and own in _PROJECTIONS:
        # MultiHeadAttention: query/key/value are (in, heads, head_dim), out is
        # (heads, head_dim, out).
        return ((0, 1), (2,)) if own == "out" else ((0,), (1, 2))
    return None


def _name_layout_axes(kind: str, name: str, shape: tuple, axes: MatrixAxes | None) -> int:
    """Layout axes known by names: a linear layer's kernel is one matrix however many
    axes its in and out features take, and its bias one vector."""
    if kind != "linear":
        return 0
    if name == "kernel" and axes is not None:
        return len(axes[0]) + len(axes[1]) - 2
    if name == "bias":
        return max(0, len(shape) - 1)
    return 0


def _is_param_by_name(variable: Any, value: Any, kind: str, name: str) -> bool:
    if value is None:
        return False
    if variable is not None:
        return isinstance(variable, nnx.Param)
    # A State of raw arrays (what optax hands a callable mask at update) carries no
    # variable types: an array is a parameter unless Flax's names say it is a running
    # statistic, so that the masks made at init and at update agree.
    return not (kind == "batch_norm" and name in ("mean", "var"))


def _entry_key(entry: Any) -> Any:
    """A jax key-path entry as the raw key nnx uses (a str or an int)."""
    if isinstance(entry, jax.tree_util.DictKey):
        return entry.key
    if isinstance(entry, jax.tree_util.SequenceKey):
        return entry.idx
    return key_name(entry)


def _is_variable_leaf(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _is_masked_node(value: Any) -> bool:
    optax = sys.modules.get("optax")
    return optax is not None and isinstance(value, optax.MaskedNode)


def state_walk(state: Any, fn: str) -> tuple[list[Leaf], Callable[[list[Any]], Any]]:
    """The leaves of a State, and the function that puts one value per leaf back in
    the State's own containers, in place of its variables or arrays."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(state, is_leaf=_is_variable_leaf)
    entries = []
    for jax_path, item in flat:
        path = tuple(_entry_key(entry) for entry in jax_path)
        variable = item if isinstance(item, nnx.Variable) else None
        value = item.get_raw_value() if variable is not None else item
        if _is_masked_node(value):
            # One optax.partition (or contrib.muon) branch's view: another branch's
            # leaf, which this branch leaves alone, like a variable holding None.
            value = None
        found = shape_dtype(value)
        if found is None:
            raise not_an_array(fn, path, variable, "a leaf", value)
        entries.append((path, path, variable, value, found))
    return leaves_by_name(entries), TreedefRebuild(treedef)


def leaves_by_name(
    entries: list[tuple], around: tuple[Layer, ...] = (), depths: tuple[int, ...] = ()
) -> list[Leaf]:
    """Leaves whose kinds come from their keys and sibling arrays alone.

    Each entry is (path to read names from, full path, variable or None, value,
    (shape, dtype)), the first the last keys of the second, below one root for all;
    ``around`` are the modules enclosing that root, standing at ``depths`` of the
    full paths. Stacked leading axes are those the arrays under a module agree on
    (``_stacking``), and those the arrays of one module share and its name needs
    removed (:func:`read_kind`); kinds, roles and layouts are read from one layer's
    shapes.
    """
    groups: dict[tuple, dict[str, tuple[int, ...]]] = {}
    for path, _, _, _, found in entries:
        arrays = groups.setdefault(path[:-1], {})
        if found != EMPTY:
            arrays[leaf_name(path)] = found[0]
    inside: dict[tuple, set] = {}
    for parent in groups:
        for end in range(len(parent)):
            inside.setdefault(parent[:end], set()).add(parent[end])
    children = {path: frozenset(keys) for path, keys in inside.items()}
    stacking = stacked_axes(
        groups, lambda parent, one: _name_layers_of(parent, one, children)[0].kind
    )
    # The keys of the full paths before the root the names are read from.
    offset = len(entries[0][1]) - len(entries[0][0]) if entries else 0
    owners = {}
    for parent, arrays in groups.items():
        stacked = stacking.get(parent, 0)
        one = {name: shape[stacked:] for name, shape in arrays.items()}
        layer, outer, inner, reading = _name_owner(parent, one, children)
        if reading.stacked:
            stacked += reading.stacked
            one = {name: shape[reading.stacked:] for name, shape in one.items()}
        if offset:
            inner = tuple([offset + d for d in inner])
        owners[parent] = (layer, around + outer, depths + inner, stacked, one, reading)
    leaves = []
    for path, full_path, variable, value, (shape, dtype) in entries:
        name = leaf_name(path)
        layer, ancestors, module_depths, stacked, one, reading = owners[path[:-1]]
        if (shape, dtype) == EMPTY:
            stacked = 0
        own = module_key(path[:-1])
        single = shape[stacked:]
        # Names and ranks that contradict give no layout: Muon never guesses.
        axes = None if layer.source == "ambiguous" else _name_axes(layer.kind, own, name, len(single))
        if axes is None and layer.kind == "linear" and name == "kernel" and len(single) > 2:
            # A LinearGeneral: its bias is the kernel's trailing (output) axes.
            bias = one.get("bias")
            if bias is not None and 1 < len(bias) < len(single) and single[-len(bias):] == bias:
                split = len(single) - len(bias)
                axes = tuple(range(split)), tuple(range(split, len(single)))
        leaves.append(
            Leaf(
                path=path_text(full_path),
                layer=layer.kind,
                role=role_from_name(layer.kind, name, own or ""),
                shape=shape,
                dtype=dtype,
                name=name,
                ancestors=ancestors,
                module_depths=module_depths,
                is_param=_is_param_by_name(variable, value, layer.kind, name),
                kind_source=layer.source,
                batch_axes=stacked,
                matrix_axes=axes,
                layout_axes=(
                    _name_layout_axes(layer.kind, name, single, axes)
                    + reading.layout_axes(name)
                ),
            )
        )
    return leaves
