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
        # Module path -> what the trace says of every path below it (``facts_below``).
        self.below: dict[tuple[str, ...], tuple] | None = None


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
    """A method interceptor that records what each bound module of one root shows.

    With ``wanted``, the ranks of those arrays only (a trace knows the params); without,
    of every array each module holds when one of its methods returns (a recording of
    the user's own init, whose params are not known yet).
    """

    def __init__(self, root: type[nn.Module], wanted: Wanted | None):
        # A lifted root (nn.jit(Model)) subclasses the user's class, whose clone runs
        # inside the transform at the root: that clone is the root seen.
        while (
            _is_lifted(root)
            and issubclass(root.__mro__[1], nn.Module)
            and root.__mro__[1] is not nn.Module
        ):
            root = root.__mro__[1]
        self.root_class = root
        self.classes: dict[tuple[str, ...], type] = {(): root}
        self.wrapped: dict[tuple[str, ...], type] = {}
        self.ndims: dict[tuple[str, tuple[str, ...]], int] = {}
        self.general: dict[tuple[str, ...], tuple[int, int, int]] = {}
        self.equations: dict[tuple[str, ...], str] = {}
        self.pending = (
            None if wanted is None else {path: list(names) for path, names in wanted.items()}
        )

    def __call__(self, next_fun: Any, call_args: Any, call_kwargs: Any, context: Any) -> Any:
        out = next_fun(*call_args, **call_kwargs)
        self.saw(context, call_args, call_kwargs)
        return out

    def saw(self, context: Any, call_args: Any, call_kwargs: Any) -> None:
        """Records the module of ``context`` once one of its methods has returned."""
        bound = context.module
        scope = bound.scope
        if scope is None:
            return
        path = tuple(scope.path)
        if path:
            # Skips lifted wrapper classes and the temporary clones Flax binds at the
            # root to validate `setup`: a module at its real path bears that name.
            if path[-1] != bound.name or _is_lifted(type(bound)):
                return
            self.classes.setdefault(path, type(bound))
        elif type(bound) is not self.root_class or type(bound.parent) is not Scope:
            return
        self._record_layout(bound, path)
        if isinstance(bound, nn.Einsum) and context.method_name == "__call__":
            # The call's equation takes precedence over the module's (Flax merges them).
            given = call_kwargs.get("einsum_str", call_args[1] if len(call_args) > 1 else None)
            equation = given if given is not None else bound.einsum_str
            if isinstance(equation, str):
                self.equations.setdefault(path, equation)
        if self.pending is None:
            self._record_held(scope, path)
        elif self.pending.get(path):
            self._record_ranks(bound, path)

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
        assert self.pending is not None
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

    def _record_held(self, scope: Scope, path: tuple[str, ...]) -> None:
        # The same ranks as _record_ranks, of every array the module holds directly
        # (a mapping is a submodule's); only shapes are kept.
        for collection, held in scope.variables().items():
            for leaf_name, value in held.items():
                key = (collection, path + (leaf_name,))
                if key in self.ndims or isinstance(value, Mapping):
                    continue
                if is_box(value):
                    value = unbox(value)
                shape = getattr(value, "shape", None)
                if shape is not None:
                    self.ndims[key] = len(shape)

    def trace(self, variables: Any) -> LinenTrace:
        """What was recorded, with the ``variables`` the root's init made."""
        return LinenTrace(
            self.classes, self.wrapped, self.ndims, self.general, variables, self.equations
        )


class LinenRecording:
    """The interceptor of ``dm.record()``: one :class:`LinenTrace` per root ``init``
    (a root module bound to a scope whose params are mutable), with the shapes of the
    variables it made; a root call that raises is dropped."""

    def __init__(self) -> None:
        self.traces: list[LinenTrace] = []
        self.shapes: dict[int, dict[tuple[str, ...], tuple[int, ...]]] = {}  # params, once read
        # Per init: its params' treedef and shapes, and the trace read from them (per
        # reading), for a tree that is exactly those params.
        self.exact: dict[int, tuple[Any, tuple, dict[bool, LinenTrace]]] = {}
        self._open: LinenInitRecorder | None = None

    def __call__(self, next_fun: Any, call_args: Any, call_kwargs: Any, context: Any) -> Any:
        bound = context.module
        scope = bound.scope
        recorder = self._open
        opening = (
            recorder is None
            and scope is not None
            and not scope.path
            and type(bound.parent) is Scope
            and scope.is_mutable_collection("params")
        )
        if opening:
            recorder = self._open = LinenInitRecorder(type(bound), None)
        if recorder is None:
            return next_fun(*call_args, **call_kwargs)
        try:
            out = next_fun(*call_args, **call_kwargs)
        except BaseException:
            if opening:
                self._open = None
            raise
        recorder.saw(context, call_args, call_kwargs)
        if opening and scope is not None:
            self._open = None
            # Shapes only: the user's arrays are not kept alive.
            shapes = jax.tree_util.tree_map(_shape_of, scope.variables())
            self.traces.append(recorder.trace(shapes))
        return out


def _shape_of(value: Any) -> Any:
    shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
    return None if shape is None or dtype is None else jax.ShapeDtypeStruct(shape, dtype)


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
    recorder = LinenInitRecorder(type(module), wanted)

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
    return recorder.trace(variables)


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


def recorded_inits(fn: str, recorded: Any) -> LinenRecording:
    """The Linen inits a ``dm.record()`` block recorded, checked to be some.

    Raises:
      TypeError: ``recorded`` is not what ``dm.record()`` gives.
      ValueError: the block recorded no Linen init.
    """
    from ..._record import Recording

    if not isinstance(recorded, Recording):
        raise TypeError(
            f"{fn}(params, recorded=...): expected the object a `with dm.record() as "
            f"seen:` block gives, got {type(recorded).__name__}. Record the init: "
            f"`with dm.record() as seen: variables = model.init(key, x)`, then pass "
            f"recorded=seen."
        )
    linen = recorded._linen
    if linen is None:
        raise ValueError(
            f"{fn}(params, recorded=seen): flax.linen was not imported when the "
            f"`with dm.record()` block began, so no Linen init was recorded. Import "
            f"flax.linen before entering the block, and call model.init inside it."
        )
    if not linen.traces:
        raise ValueError(
            f"{fn}(params, recorded=seen): the `with dm.record()` block recorded no "
            f"Linen init: call model.init(key, x) inside the block. A "
            f"jax.jit(model.init), or a model under nn.jit, that jax has already "
            f"compiled for these inputs runs no Python, so it shows nothing: call the "
            f"init eagerly or through a fresh jax.jit inside the block, or pass "
            f"module=model, args=(x,) instead of recorded=."
        )
    return linen
