"""The layouts of Equinox's own layers: one layer's rank per array, matrix axes."""

from __future__ import annotations

from typing import Any

import equinox as eqx

from ...core._leaf import Layer
from .._common import MatrixAxes
from ._classes import EQUINOX_WRAPPERS, equinox_layer

_nn = eqx.nn


def equinox_expected_ndim(node: Any, layer: Layer, name: str) -> int | None:
    """The rank one layer of this class gives ``name``; more axes are stacked axes."""
    if not isinstance(node, eqx.Module) or layer.source != "class":
        return None
    if isinstance(node, EQUINOX_WRAPPERS):
        inner = node.layer
        return equinox_expected_ndim(inner, equinox_layer(inner), node.weight_name)
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


def equinox_layout_axes(node: Any, name: str) -> int:
    """MatrixAxes the layout adds to one array beyond its matrix or vector."""
    if name == "bias" and isinstance(node, (_nn.Conv, _nn.ConvTranspose)):
        # Equinox keeps a conv bias as (out, 1, ..., 1) to broadcast over space.
        return node.num_spatial_dims
    return 0
