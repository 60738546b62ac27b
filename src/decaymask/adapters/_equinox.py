"""The Equinox adapter: module tree -> leaves -> a mask of the tree's own structure."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import equinox as eqx
import jax

from ..core import _registry
from ..core._infer import is_generic_norm_name, kind_from_name, role_from_name
from ..core._leaf import Layer, Leaf
from ._common import check_not_a_step_count, dtype_name, is_array_like, key_name

_nn = eqx.nn
METHOD = "for_equinox"

# Base classes first match wins: subclasses of these count as the base kind.
KIND_TABLE: dict[type, str] = {
    _nn.Linear: "linear",
    _nn.Conv: "conv",
    _nn.ConvTranspose: "conv",
    _nn.Embedding: "embedding",
    _nn.LayerNorm: "layer_norm",
    _nn.RMSNorm: "rms_norm",
    _nn.GroupNorm: "group_norm",
    _nn.BatchNorm: "batch_norm",
    _nn.MultiheadAttention: "attention",
    _nn.GRUCell: "recurrent",
    _nn.LSTMCell: "recurrent",
    _nn.PReLU: "prelu",
}

# Wrappers reparametrise one inner layer: the inner layer owns its arrays, and the
# wrapper's own arrays (WeightNorm's `g`) belong to a layer of the inner layer's kind.
WRAPPERS: tuple[type, ...] = (_nn.WeightNorm, _nn.SpectralNorm)

# Containers whose class is known not to be a layer: never "unknown", never guessed.
_CONTAINERS: tuple[type, ...] = (
    _nn.MLP,
    _nn.Sequential,
    _nn.Shared,
    _nn.Lambda,
    _nn.Identity,
    _nn.Dropout,
    _nn.RotaryPositionalEmbedding,
)

_class_cache: dict[type, tuple[str, str, _registry.Registration | None]] = {}
_cache_generation = -1


def _class_kind(cls: type) -> tuple[str, str, _registry.Registration | None]:
    """(kind, how it was found, registration) for a module class, cached per class."""
    global _cache_generation
    if _cache_generation != _registry.generation:
        _class_cache.clear()
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
        if base in _CONTAINERS:
            return "unknown", "class", None
    guessed = kind_from_name(cls.__name__)
    if guessed is not None:
        return guessed, "name", None
    if is_generic_norm_name(cls.__name__):
        return "norm", "name", None
    return "unknown", "class", None


def _module_layer(node: eqx.Module) -> Layer:
    cls = type(node)
    if isinstance(node, WRAPPERS):
        inner = _module_layer(node.layer)
        return Layer(inner.kind, cls.__name__, cls, inner.source)
    kind, source, _ = _class_kind(cls)
    if kind == "norm":
        # A class named only "...Norm": a bias says layer norm, no bias says RMS norm.
        kind = "layer_norm" if _has_array(node, "bias") else "rms_norm"
    return Layer(kind, cls.__name__, cls, source)


def _has_array(node: Any, name: str) -> bool:
    return is_array_like(getattr(node, name, None))


def _expected_ndim(node: Any, layer: Layer, name: str) -> int | None:
    """The rank one layer of this class gives ``name``; more axes are stacked axes."""
    if not isinstance(node, eqx.Module) or layer.source != "class":
        return None
    if isinstance(node, WRAPPERS):
        inner = node.layer
        return _expected_ndim(inner, _module_layer(inner), node.weight_name)
    if isinstance(node, (_nn.Linear, _nn.Embedding, _nn.GRUCell, _nn.LSTMCell)):
        return 1 if name.startswith("bias") else 2
    if isinstance(node, (_nn.Conv, _nn.ConvTranspose)):
        return node.num_spatial_dims + (1 if name == "bias" else 2)
    if isinstance(node, (_nn.LayerNorm, _nn.RMSNorm)):
        return len(node.shape)
    if isinstance(node, (_nn.GroupNorm, _nn.BatchNorm)):
        return 1
    return None


def _matrix_axes(node: Any, name: str) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """(reduction, output) axes of a weight matrix in Equinox's (out, in, ...) layouts."""
    if isinstance(node, (_nn.Linear, _nn.GRUCell, _nn.LSTMCell)):
        return ((1,), (0,)) if name.startswith("weight") else None
    if isinstance(node, (_nn.Conv, _nn.ConvTranspose)) and name == "weight":
        # (out, in, *kernel): a kernel position is part of the input of the matmul.
        return tuple(range(1, node.num_spatial_dims + 2)), (0,)
    if isinstance(node, _nn.Embedding):
        # (num, features): a lookup is a one-hot row times the table.
        return (0,), (1,)
    return None


def _field_name(keys: tuple) -> str:
    """The attribute or key an array is stored under, skipping sequence indices."""
    for entry in reversed(keys):
        if not isinstance(entry, (jax.tree_util.SequenceKey, jax.tree_util.FlattenedIndexKey)):
            return key_name(entry)
    return key_name(keys[-1]) if keys else ""


class _Walk:
    """One pass over a pytree of Equinox modules, collecting leaves level by level."""

    def __init__(self, tree: Any):
        self.leaves: list[Leaf] = []
        if isinstance(tree, eqx.Module):
            self.level = self._enter(tree, "", None, (), None, False)
        else:
            self.level = self._visit(tree, "", None, (), None, False)

    def _visit(
        self,
        node: Any,
        prefix: str,
        owner: Layer | None,
        ancestors: tuple[Layer, ...],
        owner_node: Any,
        in_state: bool,
    ) -> tuple:
        entries, treedef = jax.tree_util.tree_flatten_with_path(
            node, is_leaf=lambda x: x is not node and isinstance(x, eqx.Module)
        )
        items: list[Any] = []
        for keys, value in entries:
            path = prefix + "/".join(key_name(k) for k in keys)
            if isinstance(value, eqx.Module):
                items.append(self._enter(value, path + "/", owner, ancestors, owner_node, in_state))
            elif is_array_like(value):
                items.append(len(self.leaves))
                self.leaves.append(
                    self._leaf(path, keys, value, owner, ancestors, owner_node, in_state)
                )
            else:
                items.append(None)
        return treedef, items

    def _enter(
        self,
        module: eqx.Module,
        prefix: str,
        owner: Layer | None,
        ancestors: tuple[Layer, ...],
        owner_node: Any,
        in_state: bool,
    ) -> tuple:
        if isinstance(module, _nn.StateIndex):
            # A StateIndex holds the initial value of some state of its layer.
            return self._visit(module, prefix, owner, ancestors, owner_node, True)
        layer = _module_layer(module)
        inner = ancestors if owner is None else ancestors + (owner,)
        return self._visit(module, prefix, layer, inner, module, in_state)

    @staticmethod
    def _leaf(
        path: str,
        keys: tuple,
        value: Any,
        owner: Layer | None,
        ancestors: tuple[Layer, ...],
        owner_node: Any,
        in_state: bool,
    ) -> Leaf:
        if owner is None:
            owner = Layer("unknown", None, None, "class")
        name = _field_name(keys)
        registration = None
        if owner.source == "registered" and owner.cls is not None:
            registration = _registry.lookup_class(owner.cls)
        role = registration.role_of(name) if registration is not None else None
        if role is None:
            role = role_from_name(owner.kind, name)
        if registration is not None:
            matrix_axes = registration.matrix_axes_of(name)
        elif not in_state and owner.source == "class":
            matrix_axes = _matrix_axes(owner_node, name)
        else:
            matrix_axes = None
        shape = tuple(value.shape)
        expected = None if in_state else _expected_ndim(owner_node, owner, name)
        batch_axes = max(0, len(shape) - expected) if expected is not None else 0
        layout_axes = 0
        if name == "bias" and isinstance(owner_node, (_nn.Conv, _nn.ConvTranspose)):
            # Equinox keeps a conv bias as (out, 1, ..., 1) to broadcast over space.
            layout_axes = owner_node.num_spatial_dims
        return Leaf(
            path=path.rstrip("/"),
            layer=owner.kind,
            role=role,
            shape=shape,
            dtype=dtype_name(value),
            name=name,
            layer_type=owner.type_name,
            layer_class=owner.cls,
            ancestors=ancestors,
            is_param=not in_state,
            kind_source=owner.source,
            batch_axes=batch_axes,
            layout_axes=layout_axes,
            matrix_axes=matrix_axes,
        )


def _rebuild(level: tuple, values: list[Any]) -> Any:
    treedef, items = level
    return treedef.unflatten(
        [
            values[item] if type(item) is int else None if item is None else _rebuild(item, values)
            for item in items
        ]
    )


def leaves(tree: Any) -> list[Leaf]:
    """The :class:`Leaf` records of every array in ``tree``, in flattening order."""
    return walk(tree, method="leaves")[0]


def walk(tree: Any, *, method: str = METHOD) -> tuple[list[Leaf], Callable[[list[Any]], Any]]:
    """The leaves of ``tree``, and a function that puts one value per leaf back in place.

    The rebuilt tree has the structure of ``tree`` with ``None`` at every non-array
    leaf: the structure of ``eqx.filter(tree, eqx.is_array)``.
    """
    _check_input(tree, method)
    state = _Walk(tree)
    return state.leaves, lambda values: _rebuild(state.level, values)


NON_FLOATING_FIX = (
    "Hand optax eqx.filter(model, eqx.is_inexact_array) and build the mask from that "
    "(or pass mask=policy.for_equinox)."
)


def _check_input(tree: Any, method: str) -> None:
    """Flax objects handed to the Equinox entry point get the right method named."""
    check_not_a_step_count(tree, method)
    flax_method = method.replace("equinox", "flax")
    if type(tree).__module__.startswith("flax."):
        raise TypeError(
            f"{method}: got a {type(tree).__name__} from Flax; use "
            f"policy.{flax_method}(...) for Flax params, variables, nnx.Module or "
            f"nnx.State."
        )
    if isinstance(tree, Mapping) and not _holds_module(tree):
        raise TypeError(
            f"{method}: got a {type(tree).__name__} that holds no Equinox module, "
            f"which looks like Flax Linen params; use policy.{flax_method}(params). For "
            f"a pytree of Equinox modules, pass the modules themselves."
        )


def _holds_module(tree: Any) -> bool:
    return any(
        isinstance(x, eqx.Module)
        for x in jax.tree_util.tree_leaves(tree, is_leaf=lambda x: isinstance(x, eqx.Module))
    )

