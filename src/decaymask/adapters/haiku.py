"""The Haiku adapter: ``hk.transform(f).init(...)`` params -> leaves -> the same dicts.

Paths: the module path as Haiku writes it, ``~`` kept (a constructor's module,
``mlp/~/linear_0``, beside a ``__call__``'s, ``mlp/linear_0``), then the param name.
The params come as ``dict`` or Haiku's ``FlatMap``; every output has the same containers.
Kinds by names: a registered class as Haiku spells it (``MyProj`` for ``my_proj_1``),
else Haiku's own module names (snake_case, numbered: ``linear_1``, ``conv2_d``) read with
the arrays as every name is (a ``Conv2D`` named ``embed`` holds a 4-D ``w``: a conv),
else the shared inference; ``lstm``/``vanilla_rnn`` own their ``linear`` gates, attention
layers' children are projections. Modules alike in what is read of them are read once
(``_haiku_modules``, names in ``_haiku_segments``); the walk is in ``_haiku_walk``. ``fn=``/``args=`` trace ``init``
(``jax.eval_shape``, ``hk.intercept_methods``) for every module's class and every param's
one-layer rank.
``hk.layer_stack`` adds a batch axis per ``__layer_stack_{no,with}_per_layer`` segment
(Haiku 0.0.17's names; no ``~``), or as the trace shows. A user-named stack shows in no
name: a ``b`` repeating its ``w``'s leading axes, or a ``Linear``/``Embed`` with more axes
than one layer has, proves it, and every param of the lifted module (the outermost module
around the proof all of whose params have the same sizes in front and, where the kind
fixes it, one layer's rank behind them) gets its axes. State (``batch_norm/~/mean_ema``) is
never decayed. Muon layouts only where proven (a Haiku class, traced or by its exact
name, or a registration): ``Linear``/``Embed`` ``(in, out)``, ``ConvND``
``(*kernel, in, out)``, ``ConvNDTranspose`` ``(*kernel, out, in)``.
"""

from __future__ import annotations

import importlib.util
import itertools
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from ..core._leaf import Leaf

from ._contract import Adapter, Claim, PytreeAdapter, Rebuild
from ._haiku_segments import snake as snake
from ._haiku_trace import is_array_like
from ._haiku_walk import _ARRAY_KINDS, ACCEPTS

_DICT = frozenset({dict})
_STR = frozenset({str})
_HAIKU_SEGMENT = re.compile(r"~\Z|[a-z_][a-z0-9_]*\Z")
_LOOKED_AT = 64  # modules a claim reads in full


class HaikuAdapter(PytreeAdapter):
    """Haiku params dicts (``module/~/path -> {name: array}``), optionally with the
    transformed function that made them, for an abstract trace."""

    name = "haiku"
    face = "haiku"
    title = "Haiku"
    requires = "haiku"
    extra = "haiku"
    accepts = ACCEPTS
    usage = "policy.{method}(params) for Haiku params"
    non_floating_fix = "Keep integer and bool arrays out of the params handed to optax."
    layout_fix = "for Haiku params: fn=transformed, args=(x,)"
    factory_result = "a Haiku (transformed, args) pair"
    factory_shape = ("for Haiku the factory must return (transformed, args) or (transformed, "
                     "args, kwargs), with hk.transform's result and example inputs")

    def claim(self, tree: Any) -> Claim:
        if "haiku" not in sys.modules:
            return Claim.NO
        if _flat_map(tree):  # Haiku's own mapping (hk.data_structures.to_immutable_dict)
            return Claim.CERTAINLY
        if not _two_levels(tree):
            return Claim.NO
        joined = "/".join(tree)  # its keys, all strings: found in one scan
        certain = "~" in joined or ("__layer_stack_" in joined and
                                    any(key.startswith("__layer_stack_") for key in tree))
        return Claim.CERTAINLY if certain else Claim.POSSIBLY

    def installed(self) -> bool:
        """Whether Haiku is installed, found without importing it: a walk by names needs
        none of Haiku (importing it takes seconds, and imports Flax where that is
        installed); a trace imports it."""
        if not self._installed:
            found = "haiku" in sys.modules or importlib.util.find_spec("haiku") is not None
            self._installed = found
        return self._installed

    def owns_options(self, options: Mapping[str, Any]) -> bool:
        """``fn=`` is hk.transform's result, or a function it made (its ``init``)."""
        hk = sys.modules.get("haiku")
        fn = options.get("fn")
        return hk is not None and (
            isinstance(fn, (hk.Transformed, hk.TransformedWithState))
            or (callable(fn) and getattr(fn, "__module__", "").startswith("haiku.")))

    def walk(self, tree: Any, *, method: str, **options: Any) -> tuple[Sequence[Leaf], Rebuild]:
        from ._haiku_trace import HaikuTrace
        from ._haiku_walk import HaikuWalk, check

        extra = sorted(set(options) - {"fn", "args", "kwargs"})
        if extra:
            raise TypeError(f"{method}: Haiku params take fn=, args= and kwargs=; got "
                            f"{', '.join(k + '=' for k in extra)}.")
        fn, args, kwargs = options.get("fn"), options.get("args", ()), options.get("kwargs")
        check(tree, method, _params_and_state(tree, method))
        if fn is None and (args != () or kwargs is not None):
            raise TypeError(f"{method}(params, args=..., kwargs=...): these are example inputs "
                            f"for tracing fn=, but no fn= was given. Pass the transformed "
                            f"function too: policy.{method}(params, fn=transformed, args=(x,)).")
        trace = None if fn is None else HaikuTrace(method, fn, args, kwargs, tree)
        walked = HaikuWalk(tree, method, trace)
        return walked.leaves, walked.rebuild

    def describe(self, tree: Any) -> str:
        key = next((k for k in tree if "~" in k), next(iter(tree)))
        return f"Haiku params (module paths such as {key!r})"

    def refusal(self, tree: Any, method: str, claimant: Adapter, claim: Claim) -> str | None:
        if _params_and_state(tree, method):
            return _params_and_state(tree, method)
        if claimant.name == "linen" and _two_levels(tree) and all(
                _HAIKU_SEGMENT.match(s) for key in tree for s in key.split("/")):
            return None  # Haiku's lower-case module names, with a param Linen names (`bias`)
        return super().refusal(tree, method, claimant, claim)

    def factory_model(self, result: Any) -> bool:  # (transformed, args[, kwargs])
        hk = sys.modules.get("haiku")
        return hk is not None and isinstance(result, tuple) and len(result) in (2, 3) and \
            isinstance(result[0], (hk.Transformed, hk.TransformedWithState))

    def build_model(self, factory: Any, result: Any, concrete: bool) -> tuple[Any, dict[str, Any]]:
        import jax

        fn, args, *rest = result
        kwargs = dict(rest[0]) if rest else {}
        # The example inputs are small: concrete ones let both inits compute on them.
        args, kwargs = jax.tree_util.tree_map(lambda x: jax.numpy.zeros(x.shape, x.dtype) if
                                              isinstance(x, jax.ShapeDtypeStruct) else x,
                                              (tuple(args), kwargs))

        def init() -> Any:  # the params, not the state of (params, state)
            out = fn.init(jax.random.PRNGKey(0), *args, **kwargs)
            return out[0] if isinstance(out, tuple) else out

        params = init() if concrete else jax.eval_shape(init)
        return params, {"fn": fn, "args": args, "kwargs": kwargs}


def _flat_map(tree: Any) -> bool:
    kind = type(tree)
    return kind.__name__ == "FlatMap" and kind.__module__.startswith("haiku.")


def _two_levels(tree: Any) -> bool:
    """A plain dict of str -> dict of str -> array (the first modules read in full)."""
    if type(tree) is not dict or not tree or not _DICT.issuperset(map(type, tree.values())):
        return False
    if not _STR.issuperset(map(type, tree)) and not all(isinstance(k, str) for k in tree):
        return False
    for module in itertools.islice(tree.values(), _LOOKED_AT):
        if not _STR.issuperset(map(type, module)) and \
                not all(isinstance(k, str) for k in module):
            return False
        if not _ARRAY_KINDS.issuperset(map(type, module.values())) and \
                not all(map(is_array_like, module.values())):
            return False
    return True


def _params_and_state(tree: Any, method: str) -> str | None:
    """The message for ``(params, state)`` handed over as one tree, else ``None``."""
    if not (type(tree) is tuple and len(tree) == 2 and all(type(t) is dict for t in tree)):
        return None
    return (f"{method}: got a tuple of two dicts, which looks like the (params, state) of "
            f"hk.transform_with_state's init; pass the params alone: policy.{method}(params). "
            f"Haiku state is never decayed and optax does not see it.")


ADAPTER = HaikuAdapter()
