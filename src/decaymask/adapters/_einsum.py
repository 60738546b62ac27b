"""Muon layouts read off einsum equations: which axes of a kernel contract."""

from __future__ import annotations

from typing import Any

MatrixAxes = tuple[tuple[int, ...], tuple[int, ...]]


def einsum_matrix_axes(equation: str, rank: int | None = None) -> MatrixAxes | None:
    """The (reduction, output) axes of the kernel of ``einsum(equation, x, kernel)``:
    the kernel's indices (``rank`` of them, where given) that ``x`` has and the result
    has not are reduced, those the result has and ``x`` has not are outputs, those all
    three have are separate matrices (batch axes). ``None`` where the equation is not one matrix product of
    the kernel (an ellipsis, a kernel index summed alone, no reduction or no output).

    Example: ``"BTNH,NHD->BTD"`` (an attention output projection): ``((0, 1), (2,))``.
    """
    equation = equation.replace(" ", "")
    if "->" not in equation or "." in equation:
        return None
    operands, result = equation.split("->")
    parts = operands.split(",")
    if len(parts) != 2:
        return None
    x, kernel = parts
    if (rank is not None and len(kernel) != rank) or len(set(kernel)) != len(kernel):
        return None
    reduction = tuple(i for i, c in enumerate(kernel) if c in x and c not in result)
    output = tuple(i for i, c in enumerate(kernel) if c in result and c not in x)
    if any(c not in x and c not in result for c in kernel) or not reduction or not output:
        return None
    return reduction, output


def equation_axes(node: Any) -> MatrixAxes | None:
    """The layout of the kernel of an einsum equation the layer keeps: an attribute
    (``einsum_str``, ``equation``...) that reads as ``"x,kernel->out"``. ``None`` where
    it keeps none, or one that is not one matrix product."""
    found = None
    for value in getattr(node, "__dict__", {}).values():
        if type(value) is str and "->" in value and "," in value:
            axes = einsum_matrix_axes(value)
            if axes is not None:
                if found is not None and found != axes:
                    return None
                found = axes
    return found
