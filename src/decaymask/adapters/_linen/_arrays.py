"""Leaf values: array and box tests decided once per type, dtypes, keys as text."""

from __future__ import annotations

import operator
from collections.abc import Mapping
from typing import Any

import jax
from flax.core import meta as _meta

from .._common import dtype_name, is_array_like, key_name

DictKey = jax.tree_util.DictKey

# isinstance against the abstract base classes involved (jax.Array, AxisMetadata) is
# slow; a tree has few leaf types, so each is classified once.
_box_type_cache: dict[type, bool] = {}
_array_type_cache: dict[type, bool] = {}
_dtype_name_cache: dict[Any, str] = {}
_floating_dtypes: dict[Any, bool] = {}


def is_box(x: Any) -> bool:
    found = _box_type_cache.get(type(x))
    if found is None:
        found = _box_type_cache[type(x)] = isinstance(x, _meta.AxisMetadata)
    return found


def is_array_leaf(x: Any) -> bool:
    found = _array_type_cache.get(type(x))
    if found is None:
        found = _array_type_cache[type(x)] = is_array_like(x)
    return found


def cached_dtype_name(x: Any) -> str:
    found = _dtype_name_cache.get(x.dtype)
    if found is None:
        found = _dtype_name_cache[x.dtype] = dtype_name(x)
    return found


def str_keys(keys: tuple) -> tuple[str, ...]:
    # Keys that are not strings (ints, tuples: jax and optax take them) read as text.
    return tuple(
        k.key if type(k) is DictKey and type(k.key) is str else key_name(k) for k in keys
    )


def unbox(x: Any) -> Any:
    value = getattr(x, "value", None)
    return value if value is not None else x.unbox()


_FLOATING_DTYPE_PREFIXES = ("float", "bfloat", "complex")


def is_floating(array: Any) -> bool:
    """Whether the array can decay at all (as :attr:`Leaf.floating`), once per dtype."""
    dtype = array.dtype
    floating = _floating_dtypes.get(dtype)
    if floating is None:
        floating = cached_dtype_name(array).startswith(_FLOATING_DTYPE_PREFIXES)
        _floating_dtypes[dtype] = floating
    return floating



# What a leaf's type is, decided once per type: isinstance against jax.Array and
# AxisMetadata goes through their metaclasses. The sets let a whole module's values be
# checked at once (set.issuperset over their types).
ARRAY, BOX, NEITHER = 1, 2, 0
leaf_kinds: dict[type, int] = {}
plain_types: set[type] = set()  # the types of ARRAY
box_types: set[type] = set()  # the types of BOX
leafy_types: set[type] = set()  # either


def classify_leaf(value: Any) -> int:
    """Classifies the type of ``value`` (an array, a box, or neither) for good."""
    found = leaf_kinds[type(value)] = (
        BOX if is_box(value) else ARRAY if is_array_leaf(value) else NEITHER
    )
    if found is not NEITHER:
        (plain_types if found is ARRAY else box_types).add(type(value))
        leafy_types.add(type(value))
    return found



dtype_of = operator.attrgetter("dtype")


def shapes_of(direct: Mapping[str, Any]) -> tuple:
    """The shapes of a module's arrays, in the mapping's order, where inference read any."""
    return tuple([value.shape for value in direct.values()])

