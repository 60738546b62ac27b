"""The Flax entry point: Linen mappings and NNX objects go to their own adapters."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

from ._common import check_not_a_step_count


def _adapter(tree: Any, method: str = "for_flax") -> ModuleType:
    # flax.nnx takes most of a second to import: a Linen program never needs it, and an
    # NNX object exists only once flax.nnx is loaded.
    nnx = sys.modules.get("flax.nnx")
    if nnx is not None and isinstance(tree, (nnx.Module, nnx.State)):
        from . import _nnx

        return _nnx
    if isinstance(tree, Mapping):
        from . import _linen

        return _linen
    check_not_a_step_count(tree, method)
    if type(tree).__module__.startswith("equinox") or _is_equinox_module(tree):
        raise TypeError(
            f"{method}: got an Equinox {type(tree).__name__}; use "
            f"policy.{method.replace('flax', 'equinox')}(model) for Equinox models and "
            f"their params."
        )
    raise TypeError(
        f"{method}: expected a Linen params or variables mapping (dict or FrozenDict), "
        f"an nnx.Module or an nnx.State; got {type(tree).__name__}. For an Equinox "
        f"model use policy.{method.replace('flax', 'equinox')}(model)."
    )


def _is_equinox_module(tree: Any) -> bool:
    eqx = sys.modules.get("equinox")
    return eqx is not None and isinstance(tree, eqx.Module)


NON_FLOATING_FIX = "Keep integer and bool arrays out of the params handed to optax."


def leaves(tree: Any, **kwargs: Any) -> list:
    return walk(tree, **kwargs)[0]


def walk(
    tree: Any, *, method: str = "for_flax", **kwargs: Any
) -> tuple[list, Callable[[list[Any]], Any]]:
    """The leaves of a Linen mapping or an NNX object, and the function that rebuilds
    one value per leaf in the input's own structure and container types."""
    return _adapter(tree, method).walk(tree, method=method, **kwargs)
