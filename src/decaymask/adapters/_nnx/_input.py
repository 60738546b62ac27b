"""What the NNX entry points accept: a module or a State, and the ``wrt=`` filter."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flax import nnx

_FILTER_FORMS = (
    "a Variable type (nnx.Param, nnx.LoRAParam, nnx.BatchStat, ...), a tag string, "
    "nnx.PathContains(...), nnx.All/Any/Not(...), a callable (path, value) -> bool, "
    "..., True/False, or a tuple of those"
)


def _check_filter(fn: str, item: Any) -> None:
    if isinstance(item, (list, tuple)):
        for inner in item:
            _check_filter(fn, inner)
        return
    if isinstance(item, type):
        if issubclass(item, nnx.Pytree):
            raise TypeError(
                f"{fn}(..., wrt={item.__name__}): {item.__name__} is a module class, "
                f"but wrt= selects variables. Select the variable type it holds "
                f"(wrt=nnx.Param) or its path (wrt=nnx.PathContains('name'))."
            )
        return
    if item is None or item is Ellipsis or isinstance(item, (str, bool)) or callable(item):
        return
    # nnx.filterlib.to_predicate's own message fails to format for these.
    raise TypeError(
        f"{fn}(..., wrt={item!r}): expected {_FILTER_FORMS}; got {type(item).__name__}."
    )


def wrt_predicate(fn: str, wrt: Any) -> Callable[[tuple, Any], bool]:
    """The predicate of an NNX filter; ``None`` means ``nnx.Param``."""
    if wrt is None:
        # nnx's own filters read None as "nothing"; here it means the default.
        wrt = nnx.Param
    _check_filter(fn, wrt)
    return nnx.filterlib.to_predicate(wrt)


def is_state(fn: str, tree: Any, wrt: Any, unexpected: dict[str, Any]) -> bool:
    """Whether ``tree`` is a State (else a module); raises for anything else, for
    ``wrt=`` with a State and for Linen's arguments (``unexpected``)."""
    if isinstance(tree, nnx.State):
        if wrt is not None:
            raise ValueError(
                f"{fn}(state, wrt={wrt!r}): an nnx.State is already a selection of "
                f"variables, so wrt= does not apply to it. Pass the module, "
                f"{fn}(model, wrt=...), or select first: {fn}(nnx.state(model, ...))."
            )
        state = True
    elif isinstance(tree, nnx.Module):
        state = False
    else:
        raise TypeError(
            f"{fn}: expected an nnx.Module or an nnx.State, got {type(tree).__name__}. "
            f"For Linen params pass the params mapping; for an Equinox model use "
            f"policy.for_equinox(model)."
        )
    if unexpected:
        given = ", ".join(f"{key}=..." for key in unexpected)
        raise TypeError(
            f"{fn}(..., {given}): an nnx.Module or nnx.State takes only wrt= (the "
            f"filter of the variables the optimizer updates); module=, args= and "
            f"kwargs= are for Linen params."
        )
    return state
