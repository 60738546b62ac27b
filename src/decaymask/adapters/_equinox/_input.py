"""What the Equinox entry points refuse: Flax objects, step counts."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .._common import check_not_a_step_count
from ..equinox import holds_module


def _check_input(tree: Any, method: str) -> None:
    """Flax objects handed to the Equinox entry point get the right method named."""
    check_not_a_step_count(tree, method)
    flax_method = method.replace("equinox", "flax")
    # A user's nnx.Module or linen.Module subclass lives in the user's module.
    if any(c.__module__.startswith("flax.") for c in type(tree).__mro__):
        raise TypeError(
            f"{method}: got a {type(tree).__name__} from Flax; use "
            f"policy.{flax_method}(...) for Flax params, variables, nnx.Module or "
            f"nnx.State."
        )
    if isinstance(tree, Mapping) and not holds_module(tree):
        raise TypeError(
            f"{method}: got a {type(tree).__name__} that holds no Equinox module, "
            f"which looks like Flax Linen params; use policy.{flax_method}(params). For "
            f"a pytree of Equinox modules, pass the modules themselves."
        )

