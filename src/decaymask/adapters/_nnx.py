"""The Flax NNX adapter: a module graph or a State -> leaves -> an ``nnx.State`` of bools.

A module is walked once, in the order ``nnx.state`` flattens it, so the walk sees the
same variables at the same paths as ``nnx.state(model, wrt)`` and knows the class of
every module on the way. A State carries no classes: kinds come from its keys and
from sibling arrays, as for Linen params.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx

from ..core import _registry
from ..core._infer import is_generic_norm_name, kind_from_name, role_from_name
from ..core._leaf import Layer, Leaf
from ..core._policy import Policy
from ..core._report import Report

_graphlib = nnx.graphlib
_get_node_impl = _graphlib.get_node_impl
_GraphNodeImpl = _graphlib.GraphNodeImpl
_DataElem = _graphlib.DataElem
_StaticElem = _graphlib.StaticElem
_is_array_ref = nnx.variablelib.is_array_ref
_Variable = nnx.Variable
_Param = nnx.Param

# Base classes, first match along the MRO wins: subclasses count as the base kind.
KIND_TABLE: dict[type, str] = {
    nnx.Linear: "linear",  # and LoRALinear, a subclass
    nnx.LinearGeneral: "linear",
    nnx.Einsum: "linear",
    nnx.Conv: "conv",
    nnx.ConvTranspose: "conv",
    nnx.Embed: "embedding",
    nnx.LayerNorm: "layer_norm",
    nnx.RMSNorm: "rms_norm",
    nnx.GroupNorm: "group_norm",
    nnx.BatchNorm: "batch_norm",
    nnx.InstanceNorm: "instance_norm",
    nnx.MultiHeadAttention: "attention",
    # GRUCell, LSTMCell, OptimizedLSTMCell, SimpleCell and user cells share this base.
    nnx.RNNCellBase: "recurrent",
    nnx.PReLU: "prelu",
    nnx.LoRA: "lora",
}

# Wrappers reparametrise one inner layer (``layer_instance``): the inner layer owns its
# arrays, and the wrapper counts as a layer of the inner layer's kind.
WRAPPERS: tuple[type, ...] = (nnx.WeightNorm, nnx.SpectralNorm)

# Containers whose class is known not to be a layer: never "unknown"-by-name guesses.
_CONTAINERS: tuple[type, ...] = (
    nnx.Sequential,
    nnx.List,
    nnx.Dict,
    nnx.RNN,
    nnx.Bidirectional,
    nnx.Dropout,
)

# Sequence and mapping containers enclose the modules they hold but own no arrays: a
# variable held directly in an ``nnx.List`` belongs to the module holding the list,
# as an array in a list field of an Equinox module does.
_NON_OWNING: tuple[type, ...] = (nnx.List, nnx.Dict)

# Random-number state, not a layer: looked through.
_TRANSPARENT: tuple[type, ...] = (nnx.Rngs, nnx.RngStream)


# Class kinds


_class_cache: dict[type, tuple[str, str, _registry.Registration | None]] = {}
_layer_cache: dict[type, Layer] = {}
_cache_generation = -1


def _class_kind(cls: type) -> tuple[str, str, _registry.Registration | None]:
    """(kind, how it was found, registration) for a module class, cached per class."""
    global _cache_generation
    if _cache_generation != _registry.generation:
        _class_cache.clear()
        _layer_cache.clear()
        _cache_generation = _registry.generation
    found = _class_cache.get(cls)
    if found is None:
        found = _resolve_class_kind(cls)
        _class_cache[cls] = found
    return found


def _resolve_class_kind(cls: type) -> tuple[str, str, _registry.Registration | None]:
    registration = _registry.lookup_class(cls)
    if registration is not None:
        return registration.kind, "registered", registration
    for base in cls.__mro__:
        kind = KIND_TABLE.get(base)
        if kind is not None:
            return kind, "class", None
        if base in WRAPPERS:
            # Resolved per instance from the wrapped layer; the name ("WeightNorm")
            # would otherwise read as a norm.
            return "wrapper", "class", None
        if base in _CONTAINERS:
            return "unknown", "class", None
    guessed = kind_from_name(cls.__name__)
    if guessed is not None:
        return guessed, "name", None
    if is_generic_norm_name(cls.__name__):
        return "norm", "name", None
    return "unknown", "class", None


def _module_layer(module: Any) -> Layer:
    cls = type(module)
    kind, source, _ = _class_kind(cls)
    if kind == "norm":
        # A class named only "...Norm": a bias says layer norm, no bias says RMS norm.
        bias = getattr(module, "bias", None)
        kind = "layer_norm" if isinstance(bias, _Variable) else "rms_norm"
        return Layer(kind, cls.__name__, cls, source)
    if kind == "wrapper":
        inner = _module_layer(module.layer_instance)
        return Layer(inner.kind, cls.__name__, cls, inner.source)
    layer = _layer_cache.get(cls)
    if layer is None:
        layer = _layer_cache[cls] = Layer(kind, cls.__name__, cls, source)
    return layer


# The rank one layer gives each of its arrays: more leading axes are stacked axes
# (nnx.vmap, nnx.scan). Only for the arrays of the classes below, which fix their shapes.


def _ndim_linear_general(node: Any, name: str) -> int | None:
    batch = len(node.batch_axis)
    if name == "kernel":
        return batch + len(node.in_features) + len(node.out_features)
    if name == "bias":
        return batch + len(node.out_features)
    return None


def _ndim_einsum(node: Any, name: str) -> int | None:
    if name == "kernel":
        return len(node.kernel_shape)
    if name == "bias" and node.bias_shape is not None:
        return len(node.bias_shape)
    return None


def _ndim_conv(node: Any, name: str) -> int | None:
    if name == "kernel":
        return len(node.kernel_shape)
    return 1 if name == "bias" else None


def _ndim_matrix(node: Any, name: str) -> int | None:
    if name in ("kernel", "embedding", "lora_a", "lora_b"):
        return 2
    return 1 if name == "bias" else None


def _ndim_norm(node: Any, name: str) -> int | None:
    return 1 if name in ("scale", "bias", "mean", "var") else None


def _ndim_prelu(node: Any, name: str) -> int | None:
    return 0 if name == "negative_slope" else None


_NDIM_RULES: tuple[tuple[type | tuple[type, ...], Callable[[Any, str], int | None]], ...] = (
    (nnx.LinearGeneral, _ndim_linear_general),
    (nnx.Einsum, _ndim_einsum),
    ((nnx.Conv, nnx.ConvTranspose), _ndim_conv),
    ((nnx.Linear, nnx.Embed, nnx.LoRA), _ndim_matrix),
    (
        (nnx.LayerNorm, nnx.RMSNorm, nnx.GroupNorm, nnx.BatchNorm, nnx.InstanceNorm),
        _ndim_norm,
    ),
    (nnx.PReLU, _ndim_prelu),
)

_ndim_cache: dict[type, Callable[[Any, str], int | None] | None] = {}


def _ndim_rule(cls: type, source: str) -> Callable[[Any, str], int | None] | None:
    if source != "class":
        return None
    if cls not in _ndim_cache:
        _ndim_cache[cls] = next(
            (rule for bases, rule in _NDIM_RULES if issubclass(cls, bases)), None
        )
    return _ndim_cache[cls]


# Values


def _shape_dtype(value: Any) -> tuple[tuple[int, ...], str] | None:
    """Shape and dtype name of an array-like value; ``None`` for ``None``.

    Raises ``TypeError`` (without a message) for anything else: the caller words it.
    """
    if value is None:
        return None
    dtype = getattr(value, "dtype", None)
    shape = getattr(value, "shape", None)
    if dtype is None or shape is None:
        if isinstance(value, (bool, int, float, complex)):
            array = np.asarray(value)
            return (), array.dtype.name
        raise TypeError
    # Random keys (key<fry>) have no numpy name; their text is still a dtype name.
    return tuple(shape), getattr(dtype, "name", None) or str(dtype)


def _bad_value(fn: str, path: str, holder: str, value: Any) -> TypeError:
    return TypeError(
        f"{fn}: {path!r} is {holder} holding {value!r} ({type(value).__name__}); "
        f"expected an array, a jax.ShapeDtypeStruct, a Python number or None. Keep "
        f"other values out of the selected variables (plain attributes, or a "
        f"Variable type that wrt= does not select)."
    )


def _path_text(path: tuple) -> str:
    return "/".join(map(str, path))


def _leaf_name(path: tuple) -> str:
    """The attribute or key an array is stored under, skipping sequence indices."""
    for key in reversed(path):
        if isinstance(key, str):
            return key
    return str(path[-1]) if path else ""


# Filters


_FILTER_FORMS = (
    "a Variable type (nnx.Param, nnx.LoRAParam, nnx.BatchStat, ...), a tag string, "
    "nnx.PathContains(...), a callable (path, variable) -> bool, ..., True/False, "
    "or a tuple of those"
)


def _check_filter(fn: str, item: Any) -> None:
    if isinstance(item, (list, tuple)):
        for inner in item:
            _check_filter(fn, inner)
        return
    if isinstance(item, type):
        if issubclass(item, nnx.Pytree):
            raise TypeError(
                f"{fn}(..., wrt={item.__name__}): {item.__name__} is a module class, "
                f"but wrt= selects variables. Select the variable type it holds "
                f"(wrt=nnx.Param) or its path (wrt=nnx.PathContains('name'))."
            )
        return
    if item is None or item is Ellipsis or isinstance(item, (str, bool)) or callable(item):
        return
    raise TypeError(
        f"{fn}(..., wrt={item!r}): expected {_FILTER_FORMS}; got {type(item).__name__}."
    )


def _predicate(fn: str, wrt: Any) -> Callable[[tuple, Any], bool]:
    if wrt is None:
        # nnx's own filters read None as "nothing"; here it means the default.
        wrt = _Param
    _check_filter(fn, wrt)
    return nnx.filterlib.to_predicate(wrt)


# The module walk


@dataclasses.dataclass(frozen=True, slots=True)
class _Owner:
    """The module that owns the arrays below a point of the walk."""

    layer: Layer
    ancestors: tuple[Layer, ...]
    """The modules around ``layer``, outermost first."""
    enclosing: tuple[Layer, ...]
    """The modules around anything entered below: ``ancestors`` plus the owner and
    the containers between it and this point."""
    registration: _registry.Registration | None
    absorbing: bool
    """A recurrent cell: the layers inside it are its own gates, not owners."""
    holder: Any
    """The module whose attribute an array is: the owner, or a cell's inner layer."""
    ndim_rule: Callable[[Any, str], int | None] | None


class _Walk:
    """One pass over an NNX module graph in ``nnx.state``'s flattening order."""

    def __init__(self, root: Any, predicate: Callable[[tuple, Any], bool], fn: str):
        self.predicate = predicate
        self.fn = fn
        self.paths: list[tuple] = []
        """The path of every selected variable: the keys of the output State."""
        self.slots: list[int] = []
        """Per selected variable, its index in ``leaves``; -1 where it holds None."""
        self.leaves: list[Leaf] = []
        self._first: dict[int, int] = {}  # id(variable) -> index in paths, -1 if left out
        self._views: dict[int, list[Leaf]] = {}  # index in leaves -> other views
        self._walked: set[int] = set()  # ids of graph nodes walked at least once
        self._active: set[int] = set()  # ids of graph nodes being walked (cycle guard)
        self._node(root, _get_node_impl(root), (), None, False)
        for index, views in self._views.items():
            self.leaves[index] = dataclasses.replace(
                self.leaves[index], shared_with=tuple(views)
            )

    def _node(self, node: Any, impl: Any, path: tuple, owner: _Owner | None, repeat: bool) -> None:
        graph_node = type(impl) is _GraphNodeImpl
        if graph_node:
            node_id = id(node)
            if node_id in self._active:
                return
            if node_id in self._walked:
                # A module reached again (shared): nnx.state lists its variables at
                # the first path only, but this owner's view of them is decided too.
                repeat = True
            self._walked.add(node_id)
            self._active.add(node_id)
        if isinstance(node, nnx.Pytree) and not isinstance(node, _TRANSPARENT):
            owner = self._owner(node, owner)
        items, _ = impl.flatten(node)
        for key, value in items:
            # The same classification as nnx's own graph flatten.
            data = False
            if type(value) is _StaticElem:
                continue
            if type(value) is _DataElem:
                value = value.value
                data = True
            child = path + (key,)
            if isinstance(value, _Variable):
                self._variable(value, child, owner)
                continue
            child_impl = _get_node_impl(value)
            if child_impl is not None:
                self._node(value, child_impl, child, owner, repeat)
            elif not repeat and (
                data or _is_array_ref(value) or isinstance(value, (jax.Array, np.ndarray))
            ):
                self._raw(value, child, owner)
        if graph_node:
            self._active.discard(node_id)

    @staticmethod
    def _owner(module: Any, outer: _Owner | None) -> _Owner:
        if outer is not None and outer.absorbing:
            # A cell's gate layers (LSTMCell.ii, GRUCell.dense_h, ...): the cell owns
            # their arrays, so layer="recurrent" matches them as in Equinox.
            source = _class_kind(type(module))[1]
            return dataclasses.replace(
                outer, holder=module, ndim_rule=_ndim_rule(type(module), source)
            )
        layer = _module_layer(module)
        enclosing = (outer.enclosing if outer is not None else ()) + (layer,)
        if outer is not None and isinstance(module, _NON_OWNING):
            return dataclasses.replace(outer, enclosing=enclosing)
        _, _, registration = _class_kind(type(module))
        return _Owner(
            layer=layer,
            ancestors=outer.enclosing if outer is not None else (),
            enclosing=enclosing,
            registration=registration,
            absorbing=layer.kind == "recurrent" and layer.source in ("class", "registered"),
            holder=module,
            ndim_rule=_ndim_rule(type(module), layer.source),
        )

    def _variable(self, variable: Any, path: tuple, owner: _Owner | None) -> None:
        variable_id = id(variable)
        index = self._first.get(variable_id)
        if index is not None:
            # Another reference to a variable already listed (a tied weight).
            if index >= 0 and self.slots[index] >= 0:
                leaf = self._leaf(path, variable.get_raw_value(), owner, variable)
                if leaf is not None:
                    self._views.setdefault(self.slots[index], []).append(leaf)
            return
        if not self.predicate(path, variable):
            self._first[variable_id] = -1
            return
        self._first[variable_id] = len(self.paths)
        self._add(path, variable.get_raw_value(), owner, variable)

    def _raw(self, value: Any, path: tuple, owner: _Owner | None) -> None:
        if self.predicate(path, value):
            self._add(path, value, owner, None)

    def _add(self, path: tuple, value: Any, owner: _Owner | None, variable: Any) -> None:
        leaf = self._leaf(path, value, owner, variable)
        self.paths.append(path)
        if leaf is None:
            self.slots.append(-1)
        else:
            self.slots.append(len(self.leaves))
            self.leaves.append(leaf)

    def _leaf(self, path: tuple, value: Any, owner: _Owner | None, variable: Any) -> Leaf | None:
        try:
            found = _shape_dtype(value)
        except TypeError:
            holder = f"an nnx.{type(variable).__name__}" if variable is not None else "a value"
            raise _bad_value(self.fn, _path_text(path), holder, value) from None
        if found is None:
            return None
        shape, dtype = found
        name = _leaf_name(path)
        if owner is None:
            layer, ancestors, role = Layer("unknown", None, None, "class"), (), None
            expected = None
        else:
            layer, ancestors = owner.layer, owner.ancestors
            registration = owner.registration
            role = registration.role_of(name) if registration is not None else None
            rule = owner.ndim_rule
            expected = rule(owner.holder, name) if rule is not None else None
        if role is None:
            role = role_from_name(layer.kind, name)
        return Leaf(
            path=_path_text(path),
            layer=layer.kind,
            role=role,
            shape=shape,
            dtype=dtype,
            name=name,
            layer_type=layer.type_name,
            layer_class=layer.cls,
            ancestors=ancestors,
            # Only Params are parameters: BatchStat, Cache, RNG state and raw arrays in
            # the selection are state, never decayed.
            is_param=isinstance(variable, _Param),
            kind_source=layer.source,
            batch_axes=max(0, len(shape) - expected) if expected is not None else 0,
        )


# The State walk: kinds from names only


# Attention projections: their kernels have more than two axes but are not convolutions.
_PROJECTIONS = frozenset({"query", "key", "value", "out", "qkv"})

_name_layers: dict[str, Layer] = {}


def _name_layer(kind: str) -> Layer:
    layer = _name_layers.get(kind)
    if layer is None:
        layer = _name_layers[kind] = Layer(kind, None, None, "name")
    return layer


def _level_kind(key: Any) -> str | None:
    return kind_from_name(key) if isinstance(key, str) else None


def _kind_from_siblings(
    own: str | None, arrays: dict[str, tuple[int, ...]], context: tuple[str | None, ...]
) -> str:
    """The kind of a layer known only by its key and the arrays it holds."""
    names = arrays.keys()
    if "embedding" in names:
        return "embedding"
    if "scale" in names:
        if "mean" in names and "var" in names:
            return "batch_norm"
        return "layer_norm" if "bias" in names else "rms_norm"
    if "kernel" in names:
        if len(arrays["kernel"]) <= 2:
            return "linear"
        # More than two axes: a convolution, unless the layer is a multi-axis
        # projection (attention, LinearGeneral with a multi-axis bias, or a stack of
        # linear layers, whose bias is then 2-D too).
        if (own is not None and (own in _PROJECTIONS or own.endswith("_proj"))) or (
            "attention" in context
        ):
            return "linear"
        bias = arrays.get("bias")
        return "linear" if bias is not None and len(bias) >= 2 else "conv"
    if "lora_a" in names or "lora_b" in names:
        return "lora"
    if "negative_slope" in names:
        return "prelu"
    return "unknown"


def _norm_from_siblings(arrays: dict[str, tuple[int, ...]]) -> str:
    if "mean" in arrays and "var" in arrays:
        return "batch_norm"
    return "layer_norm" if "bias" in arrays else "rms_norm"


def _name_owner(
    parent: tuple, arrays: dict[str, tuple[int, ...]]
) -> tuple[Layer, tuple[Layer, ...]]:
    """The owner layer and its ancestors for the arrays held under ``parent``."""
    levels = [_level_kind(key) for key in parent]
    own = next((key for key in reversed(parent) if isinstance(key, str)), None)
    kind = _level_kind(own) if own is not None else None
    if kind is None and own is not None and is_generic_norm_name(own):
        kind = _norm_from_siblings(arrays)
    if kind in (None, "linear"):
        # Inside a module named as a recurrent cell, unnamed layers and dense gates
        # are the cell's own (NNX cells hold Linear gates such as dense_i).
        for depth, level in enumerate(levels[:-1]):
            if level == "recurrent":
                outer = tuple(_name_layer(k or "unknown") for k in levels[:depth])
                return _name_layer("recurrent"), outer
    if kind is None:
        kind = _kind_from_siblings(own, arrays, tuple(levels))
    ancestors = tuple(_name_layer(k or "unknown") for k in levels[:-1])
    return _name_layer(kind), ancestors


def _entry_key(entry: Any) -> Any:
    """A jax key-path entry as the raw key nnx uses (str or int)."""
    if isinstance(entry, jax.tree_util.DictKey):
        return entry.key
    if isinstance(entry, jax.tree_util.SequenceKey):
        return entry.idx
    if isinstance(entry, jax.tree_util.GetAttrKey):
        return entry.name
    if isinstance(entry, jax.tree_util.FlattenedIndexKey):
        return entry.key
    return str(entry)


def _is_variable(x: Any) -> bool:
    return isinstance(x, _Variable)


def _state_walk(state: Any, fn: str) -> tuple[list[Leaf], list[int], Any]:
    """Leaves of a State, the leaf index of every flattened entry (-1: holds None), and
    the treedef that puts bools back in the State's own containers."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(state, is_leaf=_is_variable)
    entries: list[tuple[tuple, Any, Any, tuple[tuple[int, ...], str]]] = []
    slots: list[int] = []
    groups: dict[tuple, dict[str, tuple[int, ...]]] = {}
    for jax_path, item in flat:
        path = tuple(_entry_key(entry) for entry in jax_path)
        variable = item if isinstance(item, _Variable) else None
        value = item.get_raw_value() if variable is not None else item
        try:
            found = _shape_dtype(value)
        except TypeError:
            holder = f"an nnx.{type(variable).__name__}" if variable is not None else "a leaf"
            raise _bad_value(fn, _path_text(path), holder, value) from None
        if found is None:
            slots.append(-1)
            continue
        slots.append(len(entries))
        entries.append((path, value, variable, found))
        groups.setdefault(path[:-1], {})[_leaf_name(path)] = found[0]
    owners = {parent: _name_owner(parent, arrays) for parent, arrays in groups.items()}
    leaves = []
    for path, _, variable, (shape, dtype) in entries:
        layer, ancestors = owners[path[:-1]]
        name = _leaf_name(path)
        leaves.append(
            Leaf(
                path=_path_text(path),
                layer=layer.kind,
                role=role_from_name(layer.kind, name),
                shape=shape,
                dtype=dtype,
                name=name,
                ancestors=ancestors,
                # A State of raw arrays (what optax hands a callable mask at update)
                # carries no variable types: every array counts as a parameter.
                is_param=variable is None or isinstance(variable, _Param),
                kind_source="name",
            )
        )
    return leaves, slots, treedef


# Entry points


def _check_tree(fn: str, tree: Any, wrt: Any) -> bool:
    """Whether ``tree`` is a State (else a module); raises for anything else."""
    if isinstance(tree, nnx.State):
        if wrt is not None:
            raise ValueError(
                f"{fn}(state, wrt={wrt!r}): an nnx.State is already a selection of "
                f"variables, so wrt= does not apply to it. Pass the module instead, "
                f"{fn}(model, wrt=...), or select first: {fn}(nnx.state(model, ...))."
            )
        return True
    if isinstance(tree, nnx.Module):
        return False
    raise TypeError(
        f"{fn}: expected an nnx.Module or an nnx.State, got {type(tree).__name__}. "
        f"For a Linen params dict pass the dict; for an Equinox model use "
        f"policy.for_equinox(model)."
    )


def leaves(tree: Any, *, wrt: Any = None) -> list[Leaf]:
    """The :class:`Leaf` records of the arrays ``nnx.state(tree, wrt)`` holds, in order.

    Args:
      tree: an ``nnx.Module`` (kinds from classes) or an ``nnx.State`` (kinds from
        names).
      wrt: for a module, an NNX filter choosing the variables; ``nnx.Param`` (and its
        subclasses, such as ``nnx.LoRAParam``) by default.

    Returns:
      One leaf per array, in the State's flattening order. A variable reachable from
      several modules appears once, at its first path; its other views are in
      ``Leaf.shared_with``.
    """
    if _check_tree("leaves", tree, wrt):
        return _state_walk(tree, "leaves")[0]
    return _Walk(tree, _predicate("leaves", wrt), "leaves").leaves


def mask(policy: Policy, tree: Any, *, wrt: Any = None) -> Any:
    """The optax mask: an ``nnx.State`` of Python bools shaped as ``nnx.state(tree, wrt)``.

    For a State (what optax hands a callable mask), the bools replace its variables or
    arrays in its own containers. A variable holding ``None`` gets ``False``.
    """
    if _check_tree("for_flax", tree, wrt):
        leaves_, slots, treedef = _state_walk(tree, "for_flax")
        decisions = policy.decide(leaves_)
        return treedef.unflatten([slot >= 0 and decisions[slot].decay for slot in slots])
    walk = _Walk(tree, _predicate("for_flax", wrt), "for_flax")
    decisions = policy.decide(walk.leaves)
    return nnx.from_flat_state(
        [
            (path, slot >= 0 and decisions[slot].decay)
            for path, slot in zip(walk.paths, walk.slots)
        ]
    )


def explain(policy: Policy, tree: Any, *, wrt: Any = None) -> Report:
    """A :class:`Report` with one row per array of ``nnx.state(tree, wrt)``."""
    if _check_tree("explain", tree, wrt):
        return Report(policy.decide(_state_walk(tree, "explain")[0]), policy=policy)
    return Report(policy.decide(_Walk(tree, _predicate("explain", wrt), "explain").leaves), policy=policy)
