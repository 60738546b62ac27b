"""The layouts of Flax NNX's own layers.

The rank one layer gives each of its arrays (more leading axes are stacked axes, from
nnx.vmap or nnx.scan) and the (reduction, output) axes of its weight matrices in
Flax's (in, out) layouts. Only for the arrays of the classes below, whose constructors
fix those shapes; the attributes they keep (in_features, kernel_shape) describe one
layer even when the arrays are stacked.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flax import nnx

from .._common import MatrixAxes
from .._einsum import einsum_matrix_axes, equation_axes

Layout = Callable[[Any, str], tuple[Any, Any]]
"""(rank of one layer's array, its matrix axes or None) from the layer and a name."""
IN_OUT: MatrixAxes = ((0,), (1,))
_NO_LAYOUT: tuple[None, None] = (None, None)


def _layout_linear(node: Any, name: str) -> tuple[int | None, MatrixAxes | None]:
    if name == "kernel":
        return 2, IN_OUT
    return (1, None) if name == "bias" else _NO_LAYOUT


def _layout_embed(node: Any, name: str) -> tuple[int | None, MatrixAxes | None]:
    # (num, features): a lookup is a one-hot row times the table.
    return (2, IN_OUT) if name == "embedding" else _NO_LAYOUT


def _layout_lora(node: Any, name: str) -> tuple[int | None, MatrixAxes | None]:
    # lora_a is (in, rank), lora_b is (rank, out): both (in, out) matrices.
    return (2, IN_OUT) if name in ("lora_a", "lora_b") else _NO_LAYOUT


def _layout_linear_general(node: Any, name: str) -> tuple[int | None, MatrixAxes | None]:
    # (*batch, *in, *out): the batch_axis axes are separate matrices, part of the layer.
    batch, n_in, n_out = len(node.batch_axis), len(node.in_features), len(node.out_features)
    if name == "kernel":
        reduction = tuple(range(batch, batch + n_in))
        output = tuple(range(batch + n_in, batch + n_in + n_out))
        return batch + n_in + n_out, (reduction, output)
    return (batch + n_out, None) if name == "bias" else _NO_LAYOUT


def general_layout_axes(node: Any, name: str) -> int:
    """MatrixAxes a LinearGeneral's layout adds to one matrix: ``(in, heads, head_dim)`` is a
    matrix, ``(heads, head_dim)`` a bias vector, as an Equinox Linear's are."""
    n_in, n_out = len(node.in_features), len(node.out_features)
    if name == "kernel":
        return n_in - 1 + n_out - 1
    return n_out - 1 if name == "bias" else 0


def _layout_einsum(node: Any, name: str) -> tuple[int | None, MatrixAxes | None]:
    # The equation decides which axes contract, instance by instance; an Einsum given
    # its equation only when called has no layout to read.
    if name == "kernel":
        rank = len(node.kernel_shape)
        equation = getattr(node, "einsum_str", None)
        return rank, einsum_matrix_axes(equation, rank) if isinstance(equation, str) else None
    if name == "bias" and node.bias_shape is not None:
        return len(node.bias_shape), None
    return _NO_LAYOUT


def _layout_conv(node: Any, name: str) -> tuple[int | None, MatrixAxes | None]:
    if name == "bias":
        return 1, None
    if name != "kernel":
        return _NO_LAYOUT
    rank = len(node.kernel_shape)
    window = tuple(range(rank - 2))
    if getattr(node, "transpose_kernel", False):
        # ConvTranspose(transpose_kernel=True) keeps (*window, out, in).
        return rank, (window + (rank - 1,), (rank - 2,))
    # (*window, in, out): a window position is part of the input of the matmul.
    return rank, (window + (rank - 2,), (rank - 1,))


def _layout_norm(node: Any, name: str) -> tuple[int | None, MatrixAxes | None]:
    return (1, None) if name in ("scale", "bias", "mean", "var") else _NO_LAYOUT


def _layout_prelu(node: Any, name: str) -> tuple[int | None, MatrixAxes | None]:
    return (0, None) if name == "negative_slope" else _NO_LAYOUT


# Most specific first: LoRALinear is a Linear, and the LoRA inside it has its own entry.
_LAYOUTS: tuple[tuple[type | tuple[type, ...], Layout], ...] = (
    (nnx.LinearGeneral, _layout_linear_general),
    (nnx.Einsum, _layout_einsum),
    ((nnx.Conv, nnx.ConvTranspose), _layout_conv),
    (nnx.Linear, _layout_linear),
    (nnx.Embed, _layout_embed),
    (nnx.LoRA, _layout_lora),
    (
        (nnx.LayerNorm, nnx.RMSNorm, nnx.GroupNorm, nnx.BatchNorm, nnx.InstanceNorm),
        _layout_norm,
    ),
    (nnx.PReLU, _layout_prelu),
)


def nnx_layout(cls: type) -> Layout | None:
    """The layout function of ``cls`` in the table above, else ``None``."""
    return next((layout for bases, layout in _LAYOUTS if issubclass(cls, bases)), None)


def check_registered(
    method: str, path: str, node: Any, name: str, registered: MatrixAxes | None
) -> None:
    """Raises where the layout registered for the class of ``node`` contradicts the
    one read off the instance itself (an Einsum's equation, a LinearGeneral's axes):
    a layout registered for a class holds for every instance, and where instances
    differ it fits some of them only."""
    if registered is None:
        return
    layout = nnx_layout(type(node))
    if layout is not None:
        read = layout(node, name)[1]
    else:
        # A layer of the user's that keeps its einsum equation (Gemma's Einsum).
        read = equation_axes(node)
    if read is None or registered == read:
        return
    cls = type(node).__name__
    equation = getattr(node, "einsum_str", None)
    source = f"its equation {equation!r}" if isinstance(equation, str) else "its configuration"
    raise ValueError(
        f"{method}: {path} ({cls}) has the layout registered for {cls}.{name}, reduction "
        f"{registered[0]} and output {registered[1]}, but {source} gives reduction "
        f"{read[0]} and output {read[1]}. A layout registered for a class holds for every "
        f"instance of it. Fix: dm.unregister_layer({cls}), and decaymask reads each "
        f"instance's layout; or register a function of the layer: "
        f"matrix_axes={{{name!r}: lambda layer: ((...), (...))}}."
    )
