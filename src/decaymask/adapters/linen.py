"""The Flax Linen adapter's claim and entry point; the walk is in ``_linen``."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any

from ..core._leaf import Leaf
from ._contract import Adapter, Claim, PytreeAdapter, Rebuild
from .nnx import FLAX_LAYOUT_FIX, FLAX_NON_FLOATING_FIX, FLAX_USAGE

# Names only Linen gives: auto names (``Dense_0``, :func:`_is_auto_name`) and its
# parameter names.
_LINEN_PARAMS = frozenset({"kernel", "bias", "embedding"})
_LOOKED_AT = 64  # keys a claim reads; evidence is near the top or nowhere


class LinenAdapter(PytreeAdapter):
    """Linen params and variables mappings (``dict`` or ``FrozenDict``), optionally with
    the module that made them for an abstract trace."""

    name = "linen"
    face = "flax"
    title = "Flax Linen"
    requires = "flax.linen"
    extra = "flax"
    accepts = "a Linen params or variables mapping (dict or FrozenDict)"
    usage = FLAX_USAGE
    non_floating_fix = FLAX_NON_FLOATING_FIX
    layout_fix = FLAX_LAYOUT_FIX
    factory_result = "a Linen (module, args) pair"
    factory_shape = (
        "for Linen the factory must return (module, args) or (module, args, kwargs) with "
        "example inputs"
    )

    def claim(self, tree: Any) -> Claim:
        if type(tree) is dict:
            return Claim.CERTAINLY if _linen_names(tree) else Claim.POSSIBLY
        if not isinstance(tree, Mapping):
            return Claim.NO
        module = type(tree).__module__
        if module.startswith("flax.nnx"):
            return Claim.NO
        if module.startswith("flax.core") or _linen_names(tree):
            return Claim.CERTAINLY
        return Claim.POSSIBLY

    def walk(self, tree: Any, *, method: str, **options: Any) -> tuple[Sequence[Leaf], Rebuild]:
        from . import _linen

        return _linen.walk(tree, method=method, **options)

    def owns_options(self, options: Mapping[str, Any]) -> bool:
        """``recorded=`` holds the Linen inits of a ``dm.record()`` block."""
        from .._record import Recording

        recorded = options.get("recorded")
        return isinstance(recorded, Recording) and recorded.inits > 0

    def describe(self, tree: Any) -> str:
        return f"a {type(tree).__name__} from Flax"

    def refusal(self, tree: Any, method: str, claimant: Adapter, claim: Claim) -> str | None:
        if claimant.name == "equinox" and isinstance(tree, Mapping):
            return None  # the walk names the path of the first Equinox module
        return super().refusal(tree, method, claimant, claim)

    def factory_model(self, result: Any) -> bool:
        linen = sys.modules.get("flax.linen")
        return (
            linen is not None
            and isinstance(result, tuple)
            and len(result) in (2, 3)
            and isinstance(result[0], linen.Module)
        )

    def build_model(self, factory: Any, result: Any, concrete: bool) -> tuple[Any, dict[str, Any]]:
        import jax

        module, args, *rest = result
        kwargs = rest[0] if rest else {}
        # The example inputs are small: make abstract ones concrete, so that both this
        # init and explain's own trace of init can compute on them.
        args, kwargs = jax.tree_util.tree_map(
            lambda x: jax.numpy.zeros(x.shape, x.dtype)
            if isinstance(x, jax.ShapeDtypeStruct)
            else x,
            (tuple(args), dict(kwargs)),
        )

        def init() -> Any:
            return module.init(jax.random.key(0), *args, **kwargs)

        variables = init() if concrete else jax.eval_shape(init)
        return variables, {"module": module, "args": args, "kwargs": kwargs}


def _is_auto_name(key: str) -> bool:
    """Whether ``key`` is a Flax auto name (``Dense_0``): ``[A-Z]\\w*_\\d+``."""
    head, underscore, number = key.rpartition("_")
    return (
        bool(underscore)
        and number.isdigit()
        and "A" <= head[:1] <= "Z"
        and (head.isidentifier() or head.replace("_", "a").isalnum())
    )


def _linen_names(tree: Mapping) -> bool:
    """Whether the first levels of ``tree`` hold a name only Linen gives."""
    level: list[Mapping] = [tree]
    seen = 0
    for _ in range(3):
        below: list[Mapping] = []
        for node in level:
            for key, value in node.items():
                seen += 1
                if seen > _LOOKED_AT:
                    return False
                if type(key) is str and (key in _LINEN_PARAMS or _is_auto_name(key)):
                    return True
                if isinstance(value, Mapping):
                    below.append(value)
        level = below
    return False


ADAPTER = LinenAdapter()
