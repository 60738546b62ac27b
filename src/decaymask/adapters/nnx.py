"""The Flax NNX adapter's claim and entry point; the walk is in ``_nnx``."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from ..core._leaf import Leaf
from ._contract import Adapter, Claim, Rebuild

FLAX_USAGE = "policy.{method}(...) for Flax params, variables, nnx.Module or nnx.State"
FLAX_NON_FLOATING_FIX = "Keep integer and bool arrays out of the params handed to optax."
FLAX_LAYOUT_FIX = "Linen params: module=model, args=(x,); an NNX State: the model itself"


class NnxAdapter(Adapter):
    """``nnx.Module`` graphs and ``nnx.State`` trees (masks come back as ``nnx.State``)."""

    name = "nnx"
    face = "flax"
    title = "Flax NNX"
    requires = "flax.nnx"
    extra = "flax"
    accepts = "an nnx.Module or an nnx.State"
    usage = FLAX_USAGE
    non_floating_fix = FLAX_NON_FLOATING_FIX
    layout_fix = FLAX_LAYOUT_FIX
    factory_result = "an NNX module"

    def claim(self, tree: Any) -> Claim:
        # An NNX object exists only once flax.nnx is loaded, which takes most of a
        # second: a Linen program never loads it.
        nnx = sys.modules.get("flax.nnx")
        if nnx is not None and isinstance(tree, (nnx.Module, nnx.State)):
            return Claim.CERTAINLY
        return Claim.NO

    def walk(self, tree: Any, *, method: str, **options: Any) -> tuple[Sequence[Leaf], Rebuild]:
        from . import _nnx

        return _nnx.walk(tree, method=method, **options)

    def describe(self, tree: Any) -> str:
        return f"a {type(tree).__name__} from Flax"

    def factory_model(self, result: Any) -> bool:
        nnx = sys.modules.get("flax.nnx")
        return nnx is not None and isinstance(result, nnx.Module)

    def build_model(self, factory: Any, result: Any, concrete: bool) -> tuple[Any, dict[str, Any]]:
        if concrete:
            return result, {}
        from flax import nnx

        return nnx.eval_shape(factory), {}


ADAPTER = NnxAdapter()
