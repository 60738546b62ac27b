"""The layouts of Equinox's own layers: one layer's rank per array, matrix axes."""

from __future__ import annotations

from typing import Any

import equinox as eqx

from ...core._leaf import Layer
from .._common import MatrixAxes
from ._classes import EQUINOX_WRAPPERS, array_field, equinox_reading

_nn = eqx.nn


def equinox_expected_ndim(node: Any, layer: Layer, name: str) -> int | None:
    """The rank one layer of this class gives ``name``; more axes are stacked axes.

    A wrapper's own arrays (WeightNorm's ``g``) have the rank of the wrapped weight:
    the wrapped layer's class says it, or the reading of its arrays where they decided
    its kind (the weight's axes past the stacked ones).
    """
    if not isinstance(node, eqx.Module):
        return None
    if isinstance(node, EQUINOX_WRAPPERS):
        inner = node.layer
        inner_layer, reading = equinox_reading(inner)
        if reading is not None:
            weight = array_field(inner, node.weight_name)
            return None if weight is None else max(0, len(weight.shape) - reading.stacked)
        return equinox_expected_ndim(inner, inner_layer, node.weight_name)
    if layer.source != "class":
        return None
    if isinstance(node, (_nn.Linear, _nn.Embedding, _nn.GRUCell, _nn.LSTMCell)):
        return 1 if name.startswith("bias") else 2
    if isinstance(node, (_nn.Conv, _nn.ConvTranspose)):
        return node.num_spatial_dims + (1 if name == "bias" else 2)
    if isinstance(node, (_nn.LayerNorm, _nn.RMSNorm)):
        return len(node.shape)
    if isinstance(node, (_nn.GroupNorm, _nn.BatchNorm)):
        return 1
    return None


def equinox_matrix_axes(node: Any, name: str) -> MatrixAxes | None:
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


def equinox_layout_axes(node: Any, layer: Layer, name: str, rank: int) -> int:
    """Axes the layout adds to one layer's array (of ``rank`` axes) beyond its matrix,
    vector or scalar, for the layers whose class says it."""
    if isinstance(node, _nn.WeightNorm) and name == "g":
        # g keeps the weight's axes, each 1 but the one it norms along: a gain per
        # output, (out, 1) for a Linear as Flax's WeightNorm keeps (out,); one gain
        # where it norms along no axis.
        return max(0, rank - (0 if node.axis is None else 1))
    if layer.source != "class":
        return 0
    if name == "bias" and isinstance(node, (_nn.Conv, _nn.ConvTranspose)):
        # Equinox keeps a conv bias as (out, 1, ..., 1) to broadcast over space.
        return node.num_spatial_dims
    if isinstance(node, (_nn.LayerNorm, _nn.RMSNorm)) and name in ("weight", "bias"):
        # A norm over several axes keeps a gain of their shape: one gain per feature.
        return max(0, rank - 1)
    return 0
