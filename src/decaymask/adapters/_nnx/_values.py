"""What an NNX variable holds, as a leaf sees it: shape, dtype, name."""

from __future__ import annotations

from typing import Any

import numpy as np
from flax import nnx

from .._common import path_text

# A variable holding None has no array, but nnx.state lists it and optax sees its box
# at init: it gets a leaf of no elements that is never decayed, so that every value
# rebuilt from the decisions (mask, label, rate) has a place there too.
EMPTY = ((0,), "none")

_nnx_dtype_names: dict[Any, str] = {}  # dtype -> its name


def _dtype_text(dtype: Any) -> str:
    name = _nnx_dtype_names.get(dtype)
    if name is None:
        # Random keys (key<fry>) have no numpy name; their text is still a dtype name.
        name = _nnx_dtype_names[dtype] = getattr(dtype, "name", None) or str(dtype)
    return name


def shape_dtype(value: Any) -> tuple[tuple[int, ...], str] | None:
    """Shape and dtype name of an array-like value; ``EMPTY`` for ``None``; else ``None``."""
    if value is None:
        return EMPTY
    dtype = getattr(value, "dtype", None)
    shape = getattr(value, "shape", None)
    if dtype is not None and shape is not None:
        return tuple(shape), _dtype_text(dtype)
    if isinstance(value, (bool, int, float, complex)):
        return (), np.asarray(value).dtype.name
    return None


def not_an_array(fn: str, path: tuple, variable: Any, otherwise: str, value: Any) -> TypeError:
    """The error for a selected ``variable`` (or, where ``None``, the ``otherwise``
    named) holding something that is not an array."""
    holder = f"an nnx.{type(variable).__name__}" if variable is not None else otherwise
    return TypeError(
        f"{fn}: {path_text(path)!r} is {holder} holding {value!r} "
        f"({type(value).__name__}); expected an array, a jax.ShapeDtypeStruct, a Python "
        f"number or None. Keep other values out of the selected variables: a plain "
        f"attribute, or a Variable type that wrt= does not select."
    )


def raw_value(value: Any) -> Any:
    """The value a variable holds; anything else as it is."""
    return value.get_raw_value() if isinstance(value, nnx.Variable) else value


def leaf_name(path: tuple) -> str:
    """The attribute or key an array is stored under, skipping sequence indices."""
    for key in reversed(path):
        if isinstance(key, str):
            return key
    return str(path[-1]) if path else ""


def module_key(parent: tuple) -> str | None:
    """The last attribute or key of a module's path (the module's own name), if any."""
    return next((key for key in reversed(parent) if isinstance(key, str)), None)
