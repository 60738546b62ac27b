"""The Flax entry point: Linen mappings and NNX objects go to their own adapters."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from types import ModuleType
from typing import Any

from flax import nnx

from ..core._policy import Policy
from ..core._report import Report
from ._common import check_not_a_step_count


def _adapter(tree: Any) -> ModuleType:
    if isinstance(tree, (nnx.Module, nnx.State)):
        from . import _nnx

        return _nnx
    if isinstance(tree, Mapping):
        from . import _linen

        return _linen
    check_not_a_step_count(tree, "for_flax")
    if type(tree).__module__.startswith("equinox") or _is_equinox_module(tree):
        raise TypeError(
            f"for_flax: got an Equinox {type(tree).__name__}; use "
            f"policy.for_equinox(model) for Equinox models and their params."
        )
    raise TypeError(
        f"for_flax: expected a Linen params or variables mapping (dict or FrozenDict), "
        f"an nnx.Module or an nnx.State; got {type(tree).__name__}. For an Equinox "
        f"model use policy.for_equinox(model)."
    )


def _is_equinox_module(tree: Any) -> bool:
    eqx = sys.modules.get("equinox")
    return eqx is not None and isinstance(tree, eqx.Module)


def leaves(tree: Any, **kwargs: Any) -> list:
    return _adapter(tree).leaves(tree, **kwargs)


def mask(policy: Policy, tree: Any, **kwargs: Any) -> Any:
    return _adapter(tree).mask(policy, tree, **kwargs)


def explain(policy: Policy, tree: Any, **kwargs: Any) -> Report:
    return _adapter(tree).explain(policy, tree, **kwargs)
