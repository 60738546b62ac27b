"""Leaf values: array and box tests decided once per type, dtypes, keys as text."""

from __future__ import annotations

import operator
from collections.abc import Mapping
from typing import Any

import jax
from flax.core import meta as _meta

from .._common import dtype_name, is_array_like, key_name

DictKey = jax.tree_util.DictKey

# What a leaf's type is (an array, a box, or neither), decided once per type:
# isinstance against jax.Array and AxisMetadata goes through their metaclasses. The sets
# let a whole module's values be checked at once (set.issuperset over their types).
ARRAY, BOX, NEITHER = 1, 2, 0
leaf_kinds: dict[type, int] = {}
plain_types: set[type] = set()  # the types of ARRAY
box_types: set[type] = set()  # the types of BOX
leafy_types: set[type] = set()  # either
# dtype -> (its name, whether it can decay at all).
_dtypes: dict[Any, tuple[str, bool]] = {}


def classify_leaf(value: Any) -> int:
    """Classifies the type of ``value`` (an array, a box, or neither) for good."""
    found = leaf_kinds[type(value)] = (
        BOX
        if isinstance(value, _meta.AxisMetadata)
        else ARRAY
        if is_array_like(value)
        else NEITHER
    )
    if found is not NEITHER:
        (plain_types if found is ARRAY else box_types).add(type(value))
        leafy_types.add(type(value))
    return found


def is_box(x: Any) -> bool:
    found = leaf_kinds.get(type(x))
    if found is None:
        found = classify_leaf(x)
    return found is BOX


def is_array_leaf(x: Any) -> bool:
    found = leaf_kinds.get(type(x))
    if found is None:
        found = classify_leaf(x)
    return found is ARRAY


_FLOATING_DTYPE_PREFIXES = ("float", "bfloat", "complex")


def _dtype_facts(x: Any) -> tuple[str, bool]:
    name = dtype_name(x)
    found = _dtypes[x.dtype] = (name, name.startswith(_FLOATING_DTYPE_PREFIXES))
    return found


def cached_dtype_name(x: Any) -> str:
    found = _dtypes.get(x.dtype)
    return (found if found is not None else _dtype_facts(x))[0]


def is_floating(array: Any) -> bool:
    """Whether the array can decay at all (as :attr:`Leaf.floating`), once per dtype."""
    found = _dtypes.get(array.dtype)
    return (found if found is not None else _dtype_facts(array))[1]


def str_keys(keys: tuple) -> tuple[str, ...]:
    # Keys that are not strings (ints, tuples: jax and optax take them) read as text.
    return tuple(
        k.key if type(k) is DictKey and type(k.key) is str else key_name(k) for k in keys
    )


def unbox(x: Any) -> Any:
    value = getattr(x, "value", None)
    return value if value is not None else x.unbox()


dtype_of = operator.attrgetter("dtype")


def shapes_of(direct: Mapping[str, Any]) -> tuple:
    """The shapes of a module's arrays, in the mapping's order, where inference read any."""
    return tuple([value.shape for value in direct.values()])

