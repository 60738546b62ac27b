"""The Haiku adapter's abstract trace of ``init``: each module's class and each param's
one-layer rank, by full name, with no arrays allocated."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

LIFT = "haiku._src.lift"  # the module of hk.lift, which hk.layer_stack uses


def is_array_like(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype") and not isinstance(x, Mapping)


class HaikuTrace:
    """What an abstract ``init`` showed: module classes and param ranks by full name."""

    def __init__(self, method: str, fn: Any, args: Any, kwargs: Any, tree: Mapping):
        import haiku as hk
        import jax

        wrapped = isinstance(fn, (hk.Transformed, hk.TransformedWithState))
        if not wrapped and not callable(fn):
            raise TypeError(f"{method}(params, fn=...): expected hk.transform(f) (or the "
                            f"function f it wraps), got {type(fn).__name__}.")
        made = getattr(fn, "__module__", "").startswith("haiku.") and not wrapped
        if made and getattr(fn, "__name__", "") == "apply_fn":
            raise TypeError(f"{method}(params, fn=...): got the apply function of a transformed "
                            f"function, which cannot make params; pass the transformed "
                            f"function itself: fn=transformed (hk.transform(f)).")
        # hk.transform(f), its init (a function Haiku made), or f itself.
        init = fn.init if wrapped else fn if made else hk.transform_with_state(fn).init
        if not isinstance(args, tuple):
            raise TypeError(f"{method}(params, fn=..., args=...): expected a tuple of example "
                            f"inputs, got {type(args).__name__}. Write args=(x,) for one input.")
        if kwargs is not None and not isinstance(kwargs, Mapping):
            raise TypeError(f"{method}(params, fn=..., kwargs=...): expected a mapping of "
                            f"keyword inputs, got {type(kwargs).__name__}.")
        self.classes: dict[str, type] = {}
        self.ranks: dict[str, int] = {}
        lifts: list[str] = []

        def full(name: str) -> str:  # a name inside hk.lift (layer_stack) is relative
            return "/".join((*lifts, name))

        def creator(next_creator: Callable, shape: Any, dtype: Any, init: Any, context: Any) -> Any:
            self.ranks.setdefault(full(context.full_name), len(shape))
            return next_creator(shape, dtype, init)

        def interceptor(next_fun: Callable, a: Any, kw: Any, context: Any) -> Any:
            module = context.module
            lifting = context.method_name == "__call__" and \
                type(module).__module__.startswith(LIFT)
            lifts.extend([module.module_name] if lifting else [])
            try:
                with hk.custom_creator(creator, params=True, state=True):
                    out = next_fun(*a, **kw)
            finally:
                if lifting:
                    lifts.pop()
            self.classes.setdefault(full(module.module_name), type(module))
            return out

        def traced() -> Any:
            with hk.intercept_methods(interceptor):
                out = init(jax.random.PRNGKey(0), *args, **(kwargs or {}))
                return out if isinstance(out, tuple) else (out, {})

        try:
            out = jax.eval_shape(traced)
        except Exception as err:
            err.add_note(f"(raised while {method} traced init(rng, *args, **kwargs) abstractly "
                         f"to find the module classes; check that args= and kwargs= are inputs "
                         f"the function accepts)")
            raise
        given, theirs, state = _shapes(tree), _shapes(out[0]), _shapes(out[1])
        self.state = given == state and given != theirs  # the state dict was handed over
        if not self.state and given != theirs:
            what = [f"{p!r} has shape {given[p]} in the params and {theirs[p]} in the model's"
                    for p in sorted(set(given) & set(theirs)) if given[p] != theirs[p]]
            what += [f"{p!r} is in the params, not in the model's"
                     for p in sorted(set(given) - set(theirs))]
            what += [f"{p!r} is in the model's params, not in these"
                     for p in sorted(set(theirs) - set(given))]
            raise ValueError(f"{method}(params, fn=...): the params do not match the traced "
                             f"function: {what[0]}. Pass the function that made these params, "
                             f"and args= with the input shapes they were made with.")


def _shapes(tree: Mapping) -> dict[str, tuple[int, ...]]:
    return {f"{k}/{n}": tuple(v.shape) for k, m in tree.items() for n, v in m.items()
            if is_array_like(v)}
