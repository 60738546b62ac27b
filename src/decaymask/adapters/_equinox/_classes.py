"""What Equinox classes are: layer kinds, modules and state, array wrappers.

Everything the walk asks of a node's class is worked out once per class (and again
after the registry changes) into one :class:`EquinoxClass` record.
"""

from __future__ import annotations

import dataclasses
from typing import Any, cast

import equinox as eqx
import jax

from ...core._infer import Reading
from ...core._leaf import Layer
from .._common import (
    ARRAY_TYPES,
    ClassKinds,
    RegistryCache,
    instance_layer,
    is_array_like,
    key_name,
)

_nn = eqx.nn

# Base classes first match wins: subclasses of these count as the base kind.
EQUINOX_KINDS: dict[type, str] = {
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
EQUINOX_WRAPPERS = (_nn.WeightNorm, _nn.SpectralNorm)

# Containers whose class is known not to be a layer: never "unknown", never guessed.
EQUINOX_CONTAINERS: tuple[type, ...] = (
    _nn.MLP,
    _nn.Sequential,
    _nn.Shared,
    _nn.Lambda,
    _nn.Identity,
    _nn.Dropout,
    _nn.RotaryPositionalEmbedding,
)

equinox_class_kind = ClassKinds(EQUINOX_KINDS, EQUINOX_WRAPPERS, EQUINOX_CONTAINERS)

# Field names a type holding one array gives it when the name says nothing of what the
# array is for (a named-array type's ``array``): the field holding the type names it.
_WRAPPED_NAMES = frozenset({"array", "value", "data", "val", "raw", "tensor", "_value", "_array"})
_PLAIN_TYPES = (list, tuple, dict, type(None))
INDEX_KEYS = (jax.tree_util.SequenceKey, jax.tree_util.FlattenedIndexKey)

read_field = object.__getattribute__  # Module.__getattribute__ does work fields never need


@dataclasses.dataclass(frozen=True, slots=True)
class EquinoxClass:
    """What the walk needs to know of one pytree node class."""

    node: str | None
    """``None`` for a plain container, ``"state"`` for a StateIndex, else ``"module"``."""
    shared: bool
    """An ``eqx.nn.Shared``."""
    could_wrap: bool
    """Its instances may be array wrappers: not a plain container, not an array, not a
    module of a known kind (a registration can change that)."""
    fields: tuple[str, ...]
    """The dynamic fields of a module class that could wrap an array, else ``()``."""


_equinox_classes = RegistryCache()  # class -> EquinoxClass


def equinox_class(cls: type) -> EquinoxClass:
    """The :class:`EquinoxClass` of ``cls``, cached: ``isinstance`` against
    ``eqx.Module`` goes through ``ABCMeta``."""
    table = _equinox_classes.table()
    found = table.get(cls)
    if found is None:
        found = table[cls] = _resolve(cls)
    return found


def _resolve(cls: type) -> EquinoxClass:
    node: str | None
    if not issubclass(cls, eqx.Module):
        node = None
    elif issubclass(cls, _nn.StateIndex):
        node = "state"
    else:
        node = "module"
    if cls in _PLAIN_TYPES or issubclass(cls, ARRAY_TYPES):
        could = False
    elif node is not None:
        kind, source, _ = equinox_class_kind(cls)
        could = kind == "unknown" and source in ("class", "name") and \
            not issubclass(cls, EQUINOX_CONTAINERS)
    else:
        could = True
    fields = _dynamic_fields(cls) if could and node is not None else ()
    return EquinoxClass(node, issubclass(cls, _nn.Shared), could, fields)


def _dynamic_fields(cls: type) -> tuple[str, ...]:
    return tuple(
        f.name for f in dataclasses.fields(cls) if not f.metadata.get("static", False)
    )


def equinox_layer(node: eqx.Module) -> Layer:
    """The layer an Equinox module is."""
    return equinox_reading(node)[0]


def equinox_reading(node: eqx.Module) -> tuple[Layer, Reading | None]:
    """The layer an Equinox module is, and how its arrays were read where they decided
    it (their stacked and layout axes: :func:`~decaymask.core._infer.read_kind`)."""
    return instance_layer(equinox_class_kind, node, _equinox_inner, _equinox_content)


def _equinox_inner(node: Any) -> Any:
    return cast("eqx.nn.WeightNorm | eqx.nn.SpectralNorm", node).layer


def _equinox_content(node: Any) -> tuple[dict[str, Any], list[str]]:
    """The shape of every array a module owns directly (in a list or tuple field, or
    through an array wrapper; a field holding arrays of different shapes gives the
    largest rank), and the fields that hold modules."""
    arrays: dict[str, Any] = {}
    children: list[str] = []
    for keys, value in pytree_children(node):
        name = key_name(keys[0])
        for item in value if type(value) in (list, tuple) else (value,):
            if equinox_class(type(item)).node == "module" and not is_array_wrapper(item):
                children.append(name)
                continue
            array = wrapped_array(item) if not is_array_like(item) else item
            if array is None:
                continue
            shape = tuple(array.shape)
            seen = arrays.get(name)
            if seen is None or seen == shape:
                arrays[name] = shape
            else:
                arrays[name] = max(len(shape), seen if isinstance(seen, int) else len(seen))
    return arrays, children


def pytree_children(node: Any) -> list[tuple[tuple, Any]]:
    """The immediate children of a pytree node with their keys."""
    return jax.tree_util.tree_flatten_with_path(node, is_leaf=lambda x: x is not node)[0]


def is_array_wrapper(node: Any, facts: EquinoxClass | None = None) -> bool:
    """Whether ``node`` is a pytree node that only wraps one array (a named array with
    its axis names as static data), not a layer: it owns nothing, and the array is
    named by the field holding the node. ``facts`` is its class's, where known."""
    if facts is None:
        facts = equinox_class(type(node))
    if not facts.could_wrap:
        return False
    if facts.node is not None:
        # A module's children are its dynamic fields: read them without a flatten.
        values = read_field(node, "__dict__")
        found = [(name, values.get(name)) for name in facts.fields]
        found = [(name, value) for name, value in found if value is not None]
        if len(found) != 1 or not is_array_like(found[0][1]):
            return False
        return found[0][0] in _WRAPPED_NAMES
    children = [(keys, value) for keys, value in pytree_children(node) if value is not None]
    if len(children) != 1 or not is_array_like(children[0][1]):
        return False
    entry = children[0][0][0]
    return isinstance(entry, INDEX_KEYS) or key_name(entry) in _WRAPPED_NAMES


def wrapped_array(node: Any) -> Any:
    """The array an array wrapper holds, or ``None`` for anything else."""
    if not is_array_wrapper(node):
        return None
    return next(value for _, value in pytree_children(node) if value is not None)


def array_field(node: Any, field: str) -> Any:
    """The array a module holds in ``field`` (through an array wrapper), or ``None``."""
    value = getattr(node, field, None)
    return value if is_array_like(value) else wrapped_array(value)
