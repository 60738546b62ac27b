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
    try:
        return np.dtype(x.dtype).name
    except TypeError:
        # Extended dtypes (jax PRNG keys, ``key<fry>``) are not numpy dtypes.
        return str(x.dtype)


def shape_of(x: Any) -> tuple[int, ...]:
    return tuple(x.shape)


def check_not_a_step_count(tree: Any, method: str) -> None:
    """A scalar integer is the step count ``optax.inject_hyperparams`` hands a schedule.

    ``inject_hyperparams`` takes every callable hyperparameter for a schedule, so a
    callable mask is called with the step count and its result (no decay anywhere) is
    used silently. Nothing else hands a mask builder one integer scalar.
    """
    if (
        is_array_like(tree)
        and tuple(tree.shape) == ()
        and np.issubdtype(np.dtype(tree.dtype), np.integer)
    ):
        raise TypeError(
            f"{method} was called with a scalar {dtype_name(tree)}, not params: this is "
            f"the step count optax.inject_hyperparams hands a callable hyperparameter, "
            f"which it treats as a schedule. Fix: mark the mask static, "
            f"optax.inject_hyperparams(optax.adamw, static_args=('mask',))(..., "
            f"mask=policy.{method})."
        )


def muon_dimension_numbers(decision: Any, method: str) -> Any:
    """The ``MuonDimensionNumbers`` of a decided leaf, ``None`` where it is not selected."""
    if not decision.decay:
        return None
    axes = decision.leaf.muon_axes()
    if axes is None:
        leaf = decision.leaf
        raise ValueError(
            f"{method}: {leaf.path} ({leaf.layer_type or leaf.layer}, {leaf.role}, shape "
            f"{leaf.shape}) is selected by {decision.decided_by}, but its matrix layout "
            f"(reduction and output axes) is unknown. Fix: leave it out with a rule, e.g. "
            f"dm.no_decay(path={leaf.path!r}), or teach the layout with "
            f"dm.register_layer(cls, kind, matrix_axes={{{leaf.name!r}: ((...), (...))}})."
        )
    from optax.contrib import MuonDimensionNumbers

    reduction, output = axes
    return MuonDimensionNumbers(reduction_axis=reduction, output_axis=output)


def holds_masked_node(tree: Any) -> bool:
    """Whether ``tree`` is one branch's view of the params inside ``optax.partition``
    (or ``optax.contrib.muon``): the other branches' leaves are ``optax.MaskedNode``."""
    import sys

    optax = sys.modules.get("optax")
    if optax is None:
        return False
    masked = optax.MaskedNode
    return any(
        isinstance(x, masked)
        for x in jax.tree_util.tree_leaves(tree, is_leaf=lambda x: isinstance(x, masked))
    )
