"""Leaf values: array and box tests decided once per type, dtypes, keys as text."""

from __future__ import annotations

import operator
from collections.abc import Mapping
from typing import Any

import jax
from flax.core import meta as _meta

from .._common import dtype_name, is_array_like, key_name

_DictKey = jax.tree_util.DictKey

# isinstance against the abstract base classes involved (jax.Array, AxisMetadata) is
# slow; a tree has few leaf types, so each is classified once.
_box_types: dict[type, bool] = {}
_array_types: dict[type, bool] = {}
_dtype_names: dict[Any, str] = {}
_FLOATING: dict[Any, bool] = {}


def _is_box(x: Any) -> bool:
    found = _box_types.get(type(x))
    if found is None:
        found = _box_types[type(x)] = isinstance(x, _meta.AxisMetadata)
    return found


def _is_array(x: Any) -> bool:
    found = _array_types.get(type(x))
    if found is None:
        found = _array_types[type(x)] = is_array_like(x)
    return found


def _dtype_name(x: Any) -> str:
    found = _dtype_names.get(x.dtype)
    if found is None:
        found = _dtype_names[x.dtype] = dtype_name(x)
    return found


def _keys(keys: tuple) -> tuple[str, ...]:
    # Keys that are not strings (ints, tuples: jax and optax take them) read as text.
    return tuple(
        k.key if type(k) is _DictKey and type(k.key) is str else key_name(k) for k in keys
    )


def _unbox(x: Any) -> Any:
    value = getattr(x, "value", None)
    return value if value is not None else x.unbox()


_FLOATING_PREFIXES = ("float", "bfloat", "complex")


def _is_floating(array: Any) -> bool:
    """Whether the array can decay at all (as :attr:`Leaf.floating`), once per dtype."""
    dtype = array.dtype
    floating = _FLOATING.get(dtype)
    if floating is None:
        floating = _FLOATING[dtype] = _dtype_name(array).startswith(_FLOATING_PREFIXES)
    return floating



# What a leaf's type is, decided once per type: isinstance against jax.Array and
# AxisMetadata goes through their metaclasses. The sets let a whole module's values be
# checked at once (set.issuperset over their types).
_ARRAY, _BOX, _NEITHER = 1, 2, 0
_leaf_kinds: dict[type, int] = {}
_plain_types: set[type] = set()  # the types of _ARRAY
_box_kinds: set[type] = set()  # the types of _BOX
_leafy_types: set[type] = set()  # either


def _leaf_kind(value: Any) -> int:
    """Classifies the type of ``value`` (an array, a box, or neither) for good."""
    found = _leaf_kinds[type(value)] = (
        _BOX if _is_box(value) else _ARRAY if _is_array(value) else _NEITHER
    )
    if found is not _NEITHER:
        (_plain_types if found is _ARRAY else _box_kinds).add(type(value))
        _leafy_types.add(type(value))
    return found



_dtype_of = operator.attrgetter("dtype")


def _shapes(direct: Mapping[str, Any]) -> tuple:
    """The shapes of a module's arrays, in the mapping's order, where inference read any."""
    return tuple([value.shape for value in direct.values()])

