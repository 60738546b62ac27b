"""The abstract trace of ``module.init``: the class at every module path, the rank each
array has in one layer, the layers WeightNorm/SpectralNorm wrap, DenseGeneral's
axis counts and the equation each Einsum was called with."""

from __future__ import annotations

import dataclasses
import inspect
import sys
import types
import warnings
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
from flax.core.scope import Scope

from ._arrays import is_box, unbox
from ._tables import WRAPPERS

# (collection, array name) pairs wanted per module path.
Wanted = dict[tuple[str, ...], list[tuple[str, str]]]


def _is_lifted(cls: type) -> bool:
    # Lifted transforms build their classes in flax.linen.transforms; the instance they
    # clone inside the transform has the user's class and the real path.
    return cls.__module__ == "flax.linen.transforms"


def _required_args(module: nn.Module) -> list[str]:
    call = getattr(type(module), "__call__", None)
    if call is None:
        return []
    try:
        parameters = list(inspect.signature(call).parameters.values())[1:]
    except (TypeError, ValueError):
        return []
    return [
        p.name
        for p in parameters
        if p.default is inspect.Parameter.empty
        and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    ]


@dataclasses.dataclass
class LinenTrace:
    """What an abstract ``model.init`` showed: classes by module path, inner ranks."""

    classes: dict[tuple[str, ...], type]
    wrapped: dict[tuple[str, ...], type]
    ndims: dict[tuple[str, tuple[str, ...]], int]
    general: dict[tuple[str, ...], tuple[int, int, int]]
    variables: Any
    equations: dict[tuple[str, ...], str] = dataclasses.field(default_factory=dict)
    """The equation each ``nn.Einsum`` was called with (its own or the call's), by path."""

    def __post_init__(self) -> None:
        # "params" first: a module's kind is read off its params where it has any.
        others = sorted({collection for collection, _ in self.ndims} - {"params"})
        self.collections = ("params", *others)


def _checked_inputs(fn: str, module: Any, args: Any, kwargs: Any) -> Mapping:
    """``kwargs`` as a mapping, once ``module=``, ``args=`` and ``kwargs=`` are checked.

    Raises:
      TypeError: one of them is of the wrong type, or no inputs were given to a model
        whose ``__call__`` needs some.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"{fn}(..., module={module!r}): expected a flax.linen.Module, got "
            f"{type(module).__name__}. Pass the Linen model the params belong to; for an "
            f"NNX model pass the model itself as the tree: policy.{fn}(model)."
        )
    name = type(module).__name__
    if not isinstance(args, tuple):
        raise TypeError(
            f"{fn}(..., module={name}(...), args=...): expected a tuple of example "
            f"inputs, got {type(args).__name__}. Write args=(x,) for a single input."
        )
    if kwargs is None:
        kwargs = {}
    elif not isinstance(kwargs, Mapping):
        raise TypeError(
            f"{fn}(..., module={name}(...), kwargs=...): expected a mapping of keyword "
            f"inputs, got {type(kwargs).__name__}. Write kwargs={{'train': False}}."
        )
    if not args and not kwargs:
        required = _required_args(module)
        if required:
            raise TypeError(
                f"{fn}(..., module={name}(...)): {name}.__call__ needs "
                f"{', '.join(required)}, but no args= were given. Pass example inputs: "
                f"policy.{fn}(params, module=model, args=(x,)). They are traced "
                f"abstractly, so only their shapes and dtypes matter."
            )
    return kwargs


class LinenInitRecorder:
    """A method interceptor that records what each bound module shows."""

    def __init__(self, root: nn.Module, wanted: Wanted):
        self.root_class = type(root)
        self.classes: dict[tuple[str, ...], type] = {(): type(root)}
        self.wrapped: dict[tuple[str, ...], type] = {}
        self.ndims: dict[tuple[str, tuple[str, ...]], int] = {}
        self.general: dict[tuple[str, ...], tuple[int, int, int]] = {}
        self.equations: dict[tuple[str, ...], str] = {}
        self.pending = {path: list(names) for path, names in wanted.items()}

    def __call__(self, next_fun: Any, call_args: Any, call_kwargs: Any, context: Any) -> Any:
        out = next_fun(*call_args, **call_kwargs)
        bound = context.module
        scope = bound.scope
        if scope is None:
            return out
        path = tuple(scope.path)
        if path:
            # Skips lifted wrapper classes and the temporary clones Flax binds at the
            # root to validate `setup`: a module at its real path bears that name.
            if path[-1] != bound.name or _is_lifted(type(bound)):
                return out
            self.classes.setdefault(path, type(bound))
        elif type(bound) is not self.root_class or type(bound.parent) is not Scope:
            return out
        self._record_layout(bound, path)
        if isinstance(bound, nn.Einsum) and context.method_name == "__call__":
            # The call's equation takes precedence over the module's (Flax merges them).
            given = call_kwargs.get("einsum_str", call_args[1] if len(call_args) > 1 else None)
            equation = given if given is not None else bound.einsum_str
            if isinstance(equation, str):
                self.equations.setdefault(path, equation)
        if self.pending.get(path):
            self._record_ranks(bound, path)
        return out

    def _record_layout(self, bound: nn.Module, path: tuple[str, ...]) -> None:
        if isinstance(bound, WRAPPERS) and path not in self.wrapped:
            self.wrapped[path] = type(bound.layer_instance)
        if isinstance(bound, nn.DenseGeneral) and path not in self.general:
            # The kernel is batch_dims + axis + features axes: its matrix layout.
            batch, axis, features = (
                len(v) if isinstance(v, (tuple, list)) else 1
                for v in (bound.batch_dims, bound.axis, bound.features)
            )
            self.general[path] = (batch, axis, features)

    def _record_ranks(self, bound: nn.Module, path: tuple[str, ...]) -> None:
        # Inside nn.scan/nn.vmap the module sees one layer's arrays: their rank is the
        # layer's own, the rest of the final rank is stacked axes.
        left = []
        for collection, leaf_name in self.pending[path]:
            if bound.has_variable(collection, leaf_name):
                value: Any = bound.get_variable(collection, leaf_name)
                if is_box(value):
                    value = unbox(value)
                shape = getattr(value, "shape", None)
                if shape is not None:
                    self.ndims[(collection, path + (leaf_name,))] = len(shape)
                    continue
            left.append((collection, leaf_name))
        self.pending[path] = left


def trace_init(
    fn: str,
    module: Any,
    args: Any,
    kwargs: Any,
    wanted: Wanted,
    eager: bool = False,
) -> LinenTrace:
    """Runs ``module.init(key, *args, **kwargs)`` under ``jax.eval_shape``, recording.

    With ``eager``, under ``jax.disable_jit()`` too: a call compiled by ``nn.jit`` that
    jax has cached runs no Python, so the methods inside it are seen only then.
    """
    kwargs = _checked_inputs(fn, module, args, kwargs)
    recorder = LinenInitRecorder(module, wanted)

    def run_init() -> Any:
        with nn.intercept_methods(recorder):
            return module.init(jax.random.key(0), *args, **kwargs)

    try:
        if eager:
            with jax.disable_jit():
                variables = jax.eval_shape(run_init)
        else:
            variables = jax.eval_shape(run_init)
    except Exception as err:
        if hasattr(err, "add_note"):
            err.add_note(
                f"(raised while {fn} traced {type(module).__name__}.init(key, *args, "
                f"**kwargs) abstractly to find the layer classes; check that args= and "
                f"kwargs= are inputs the model accepts)"
            )
        raise
    return LinenTrace(
        recorder.classes, recorder.wrapped, recorder.ndims, recorder.general, variables,
        recorder.equations,
    )


def wanted_names(keyed: list, variables: bool) -> Wanted:
    """The (collection, name) pairs each module path may hold, under either reading."""
    wanted: Wanted = {}
    for names, _ in keyed:
        if not names:
            continue
        wanted.setdefault(names[:-1], []).append(("params", names[-1]))
        if variables and len(names) >= 2:
            wanted.setdefault(names[1:-1], []).append((names[0], names[-1]))
    return wanted


def warn_unseen(fn: str, name: str, unseen: list[str]) -> None:
    from ...core._warnings import PolicyWarning

    shown = ", ".join(unseen[:3]) + (f" and {len(unseen) - 3} more" if len(unseen) > 3 else "")
    # Point at the caller's line: the first frame outside decaymask.
    frame: types.FrameType | None
    level, frame = 2, sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__", "").startswith("decaymask"):
        level, frame = level + 1, frame.f_back
    warnings.warn(
        f"{fn}(params, module={name}(...)): the trace of {name}.init saw no module at "
        f"{shown}, so names decided there, not classes or registrations. A method "
        f"whose modules run outside Flax's interceptor (a custom jax transform around "
        f"them) hides them; register those layers by class name "
        f"(dm.register_layer('ClassName', kind)) so that names find them.",
        PolicyWarning,
        stacklevel=level,
    )
