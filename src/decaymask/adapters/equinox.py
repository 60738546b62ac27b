"""The Equinox adapter's claim and entry point; the walk is in ``_equinox``."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any

from ..core._leaf import Leaf
from ._contract import Adapter, Claim, PytreeAdapter, Rebuild, call, is_plain_mapping


class EquinoxAdapter(PytreeAdapter):
    """Equinox modules, their filtered params, abstract models, and pytrees of them."""

    name = "equinox"
    face = "equinox"
    title = "Equinox"
    requires = "equinox"
    extra = "equinox"
    accepts = "an Equinox module, its params, or a pytree holding Equinox modules"
    usage = "policy.{method}(model) for Equinox models and their params"
    non_floating_fix = (
        "Hand optax eqx.filter(model, eqx.is_inexact_array) and build the mask from that "
        "(or pass mask=policy.for_equinox)."
    )
    factory_result = "an Equinox module"
    flattens_with_paths = True

    def claim(self, tree: Any) -> Claim:
        # A user's nnx.Module or linen.Module subclass lives in the user's module.
        if any(c.__module__.startswith("flax.") for c in type(tree).__mro__):
            return Claim.NO
        eqx = sys.modules.get("equinox")
        if eqx is not None and isinstance(tree, eqx.Module):
            return Claim.CERTAINLY
        if isinstance(tree, Mapping):
            return Claim.CERTAINLY if holds_module(tree) else Claim.NO
        # Any other pytree of arrays reads as Equinox params (one bool per array), and
        # so does one array; an object jax takes for one leaf is not params.
        if hasattr(tree, "shape") and hasattr(tree, "dtype"):
            return Claim.POSSIBLY
        jax = sys.modules.get("jax")
        if jax is None:
            return Claim.POSSIBLY if isinstance(tree, (list, tuple)) else Claim.NO
        treedef = jax.tree_util.tree_structure(tree, is_leaf=lambda x: x is not tree)
        if treedef.num_nodes == 1 and treedef.num_leaves == 1:
            return Claim.NO
        return Claim.POSSIBLY

    def walk(self, tree: Any, *, method: str, **options: Any) -> tuple[Sequence[Leaf], Rebuild]:
        if options:
            raise TypeError(
                f"{method}: Equinox models take no options; got "
                f"{', '.join(f'{k}=' for k in options)}."
            )
        from . import _equinox

        return _equinox.walk(tree, method=method)

    def describe(self, tree: Any) -> str:
        return f"an Equinox {type(tree).__name__}"

    def refusal(self, tree: Any, method: str, claimant: Adapter, claim: Claim) -> str | None:
        if is_plain_mapping(tree):
            return (
                f"{method}: got a {type(tree).__name__} that holds no Equinox module, "
                f"which looks like {claimant.title} params; use "
                f"{call(claimant, method, 'params')}. For a pytree of "
                f"Equinox modules, pass the modules themselves."
            )
        return super().refusal(tree, method, claimant, claim)

    def factory_model(self, result: Any) -> bool:
        return holds_module(result)

    def build_model(self, factory: Any, result: Any, concrete: bool) -> tuple[Any, dict[str, Any]]:
        return result, {}


def holds_module(tree: Any) -> bool:
    """Whether ``tree`` is or holds an Equinox module (never, with equinox not loaded)."""
    eqx = sys.modules.get("equinox")
    if eqx is None:
        return False
    if type(tree) is dict and _dicts_of_arrays(tree):
        return False  # Linen or Haiku params: nothing but dicts down to arrays
    import jax

    is_module = lambda x: isinstance(x, eqx.Module)  # noqa: E731
    return any(is_module(x) for x in jax.tree_util.tree_leaves(tree, is_leaf=is_module))


_array_kinds: dict[type, bool] = {}  # type -> whether its instances are arrays


def _dicts_of_arrays(tree: dict) -> bool:
    """Whether ``tree`` is plain dicts down to arrays, and nothing else (no module)."""
    from ._common import is_array_like

    kinds = _array_kinds
    pending = [tree]
    while pending:
        for value in pending.pop().values():
            kind = type(value)
            if kind is dict:
                pending.append(value)
                continue
            known = kinds.get(kind)
            if known is None:
                known = kinds[kind] = is_array_like(value)
            if not known:
                return False
    return True


ADAPTER = EquinoxAdapter()
