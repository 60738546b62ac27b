"""Pieces every adapter shares: path keys, array tests, dtypes."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

_KEY_TYPES = (
    jax.tree_util.GetAttrKey,
    jax.tree_util.DictKey,
    jax.tree_util.SequenceKey,
    jax.tree_util.FlattenedIndexKey,
)


def key_name(entry: Any) -> str:
    """One path entry as a plain string: the one place key types are normalised."""
    if isinstance(entry, jax.tree_util.GetAttrKey):
        return entry.name
    if isinstance(entry, jax.tree_util.DictKey):
        return str(entry.key)
    if isinstance(entry, jax.tree_util.SequenceKey):
        return str(entry.idx)
    if isinstance(entry, jax.tree_util.FlattenedIndexKey):
        return str(entry.key)
    return str(entry)


ARRAY_TYPES = (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct)
"""What counts as an array leaf: concrete, traced and abstract arrays alike."""


def is_array_like(x: Any) -> bool:
    return isinstance(x, ARRAY_TYPES)


def dtype_name(x: Any) -> str:
    return np.dtype(x.dtype).name


def shape_of(x: Any) -> tuple[int, ...]:
    return tuple(x.shape)
