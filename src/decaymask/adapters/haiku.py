"""The Haiku adapter: ``hk.transform(f).init(...)`` params -> leaves -> the same dicts.

Paths: the module path as Haiku writes it, ``~`` kept (a constructor's module,
``mlp/~/linear_0``, beside a ``__call__``'s, ``mlp/linear_0``), then the param name.
Kinds by names: a registered class as Haiku spells it (``MyProj`` for ``my_proj_1``),
else Haiku's own module names (snake_case, numbered: ``linear_1``, ``conv2_d``), else the
shared inference; ``lstm``/``vanilla_rnn`` own their ``linear`` gates, attention layers'
children are projections. ``fn=``/``args=`` trace ``init`` (``jax.eval_shape``,
``hk.intercept_methods``) for every module's class and every param's one-layer rank.
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

import functools
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from ..core import _registry
from ..core._infer import resolve_kind
from ..core._leaf import Layer, Leaf
from ..core._names import words
from ..core._roles import role_from_name
from ._contract import Adapter, Claim, PytreeAdapter, Rebuild
from ._haiku_stacks import ONE_LAYER_NDIM, lifted, module_path, proof_of, stacked_by_bias
from ._haiku_trace import LIFT, HaikuTrace, is_array_like
from ._stacks import Proof, agrees, lifted_at

_SNAKE = re.compile(r"((?<=[a-z0-9])[A-Z]|(?!^)[A-Z](?=[a-z]))")
_NUMBERED = re.compile(r"(.+?)_\d+\Z")
_STACK = re.compile(r"__layer_stack_(no|with)_per_layer(_\d+)?\Z")
_HAIKU_SEGMENT = re.compile(r"~\Z|[a-z_][a-z0-9_]*\Z")
_LOOKED_AT = 64  # modules a claim reads in full


def snake(class_name: str) -> str:
    """A class name as Haiku names its instances: ``Conv2DTranspose`` -> ``conv2_d_transpose``."""
    return _SNAKE.sub(r"_\1", class_name).lower()


# Haiku's modules by their instances' names: (class name, kind, layout of the weight).
_DENSE, _CONV, _TRANSPOSE = "dense", "conv", "transpose"
_BUILTIN: dict[str, tuple[str, str, str | None]] = {snake(c): (c, k, lay) for c, k, lay in (
    ("Linear", "linear", _DENSE), ("Embed", "embedding", _DENSE), ("GRU", "recurrent", _DENSE),
    ("MultiHeadAttention", "attention", None), ("LSTM", "recurrent", None),
    ("VanillaRNN", "recurrent", None), ("LayerNorm", "layer_norm", None),
    ("RMSNorm", "rms_norm", None), ("BatchNorm", "batch_norm", None),
    ("GroupNorm", "group_norm", None), ("InstanceNorm", "instance_norm", None),
    *((c, "conv", _CONV) for c in ("Conv1D", "Conv2D", "Conv3D", "ConvND")),
    *((c + "Transpose", "conv", _TRANSPOSE) for c in ("Conv1D", "Conv2D", "Conv3D", "ConvND")),
)}
_CELLS = frozenset({"LSTM", "VanillaRNN"})  # keep their gates in Linear children


class HaikuAdapter(PytreeAdapter):
    """Haiku params dicts (``module/~/path -> {name: array}``), optionally with the
    transformed function that made them, for an abstract trace."""

    name = "haiku"
    face = "haiku"
    title = "Haiku"
    requires = "haiku"
    extra = "haiku"
    accepts = "a Haiku params dict (module path -> {param name: array})"
    usage = "policy.{method}(params) for Haiku params"
    non_floating_fix = "Keep integer and bool arrays out of the params handed to optax."
    layout_fix = "for Haiku params: fn=transformed, args=(x,)"
    factory_result = "a Haiku (transformed, args) pair"
    factory_shape = ("for Haiku the factory must return (transformed, args) or (transformed, "
                     "args, kwargs), with hk.transform's result and example inputs")

    def claim(self, tree: Any) -> Claim:
        if "haiku" not in sys.modules or not _two_levels(tree):
            return Claim.NO
        certain = any("~" in key or key.startswith("__layer_stack_") for key in tree)
        return Claim.CERTAINLY if certain else Claim.POSSIBLY

    def walk(self, tree: Any, *, method: str, **options: Any) -> tuple[Sequence[Leaf], Rebuild]:
        extra = sorted(set(options) - {"fn", "args", "kwargs"})
        if extra:
            raise TypeError(f"{method}: Haiku params take fn=, args= and kwargs=; got "
                            f"{', '.join(k + '=' for k in extra)}.")
        fn, args, kwargs = options.get("fn"), options.get("args", ()), options.get("kwargs")
        return _walk(tree, method, fn, args, kwargs)

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


def _two_levels(tree: Any) -> bool:
    """A plain dict of str -> dict of str -> array (the first modules read in full)."""
    return type(tree) is dict and bool(tree) and all(
        isinstance(key, str) and type(module) is dict and (i >= _LOOKED_AT or all(
            isinstance(k, str) and is_array_like(v) for k, v in module.items()))
        for i, (key, module) in enumerate(tree.items()))


def _params_and_state(tree: Any, method: str) -> str | None:
    """The message for ``(params, state)`` handed over as one tree, else ``None``."""
    if not (type(tree) is tuple and len(tree) == 2 and all(type(t) is dict for t in tree)):
        return None
    return (f"{method}: got a tuple of two dicts, which looks like the (params, state) of "
            f"hk.transform_with_state's init; pass the params alone: policy.{method}(params). "
            f"Haiku state is never decayed and optax does not see it.")


class _Module:
    """One module of a path, as far as its name, its arrays or the trace tell."""

    def __init__(self, layer: Layer, ancestors: tuple[Layer, ...], builtin: str | None = None,
                 registration: _registry.Registration | None = None):
        # builtin: the Haiku class it is (or derives from), by the trace or its exact name
        self.layer, self.ancestors, self.registration = layer, ancestors, registration
        self.trusted = builtin is not None
        self.layout = _BUILTIN[snake(builtin)][2] if builtin is not None else None
        self.cell = builtin in _CELLS
        self.owned_by: _Module | None = None  # a cell owns its gates' arrays
        self.hidden = False  # a stack: not among the ancestors
        # Where the modules of ancestors + (this one,) stand in a path: the number of its
        # keys, ``~`` counted, up to each module's own name. Set by ``_read``.
        self.depths: tuple[int, ...] = ()

    @property
    def owner(self) -> _Module:
        return self.owned_by if self.owned_by is not None else self


def _walk(tree: Any, method: str, fn: Any, args: Any, kwargs: Any) -> tuple[list[Leaf], Rebuild]:
    from ._common import dtype_name, path_text, registered_batch_axes

    if _params_and_state(tree, method):
        raise TypeError(_params_and_state(tree, method))
    if not isinstance(tree, Mapping) or type(tree).__module__.startswith("flax."):
        raise TypeError(f"{method}: expected {HaikuAdapter.accepts}, as hk.transform(f).init "
                        f"returns; got {type(tree).__name__}.")
    for key, module in tree.items():
        if not isinstance(key, str) or not isinstance(module, Mapping):
            raise TypeError(f"{method}: expected {HaikuAdapter.accepts}; {key!r} holds a "
                            f"{type(module).__name__}, not a dict of params.")
        for name, value in module.items():
            # optax.MaskedNode (an empty NamedTuple) stands for other branches' leaves.
            if not is_array_like(value) and value != ():
                raise TypeError(f"{method}: {key}/{name} is a {type(value).__name__}, not an "
                                f"array; Haiku params hold arrays, one level below each module.")
    if fn is None and (args != () or kwargs is not None):
        raise TypeError(f"{method}(params, args=..., kwargs=...): these are example inputs for "
                        f"tracing fn=, but no fn= was given. Pass the transformed function "
                        f"too: policy.{method}(params, fn=transformed, args=(x,)).")
    trace = None if fn is None else HaikuTrace(method, fn, args, kwargs, tree)
    modules = _Modules(tree, trace)
    if trace is None and any([modules.proof(key) for key in tree]):
        # By names, some params proved a user-named stack: the modules it lifts.
        modules.lifted = lifted(modules)
    batch_of, paths = modules.batch_of, modules.paths

    leaves: list[Leaf] = []
    order: list[tuple[str, str]] = []
    for key in sorted(tree):
        segments = paths[key]
        mid = _module_id(segments)
        module = modules.of(mid) if mid and not all(_STACK.match(s) for s in mid) else None
        if module is not None:
            owner = module.owner
        else:  # no module: the owner stands for the path's parent, the params' key
            owner = _Module(Layer("unknown", None, None, "name"), ())
            owner.depths = (len(segments),)
        layer, registration = owner.layer, owner.registration
        for name in sorted(tree[key]):
            value = tree[key][name]
            if not is_array_like(value):
                continue
            shape = tuple(value.shape)
            batch = batch_of(key, name, shape)
            role, axes = (registration.role_of(name), registration.matrix_axes_of(name)) \
                if registration is not None else (None, None)
            if axes is not None and (trace is None or f"{key}/{name}" not in trace.ranks):
                batch = max(batch, registered_batch_axes(registration, tree[key].get) or 0)
            elif registration is None and module is not None:
                axes = _layout(module, name, len(shape) - batch)
            layout_axes = 0
            if layer.kind == "batch_norm" and name in ("scale", "offset"):
                # BatchNorm keeps them in the input's rank, reduced axes of size 1.
                ones = sum(1 for d in shape[batch:] if d == 1)
                layout_axes = min(ones, max(0, len(shape) - batch - 1))
            leaves.append(Leaf(
                path=path_text((*segments, name)), layer=layer.kind, name=name,
                role=role or role_from_name(layer.kind, name, segments[-1]),
                shape=shape, dtype=dtype_name(value), layer_type=layer.type_name,
                layer_class=layer.cls, ancestors=owner.ancestors, module_depths=owner.depths,
                is_param=_is_param(name, segments, trace), kind_source=layer.source,
                batch_axes=batch, layout_axes=layout_axes, matrix_axes=axes,
            ))
            order.append((key, name))
    def rebuild(values: list[Any]) -> Any:  # other values (optax.MaskedNode) stay as they are
        out = {key: dict(module) for key, module in tree.items()}
        for (key, name), value in zip(order, values, strict=True):
            out[key][name] = value
        return out

    return leaves, rebuild


class _Modules:
    """The module of every path of a params dict, read once each, and the stacked axes
    of every param.

    Stacked axes come from the trace, else from names: one per default-named
    ``hk.layer_stack`` segment, those a module's own params prove (:meth:`proof`), and
    those of the lifted module around it (``lifted``, set from :func:`_lifted`) where
    the param agrees. Kinds are read before the lifted modules are known (the ranks
    they see count the axes that default names and a module's own params show), as
    they are read from Linen params.
    """

    def __init__(self, tree: Mapping[str, Any], trace: HaikuTrace | None):
        self.tree, self.trace = tree, trace
        self.lifted: dict[tuple[str, ...], Proof] = {}
        self.paths = {key: tuple(key.split("/")) for key in tree}
        self.children: dict[tuple[str, ...], set[str]] = {}
        for segments in self.paths.values():
            for i in (i for i in range(1, len(segments)) if segments[i] != "~"):
                self.children.setdefault(_module_id(segments[:i]), set()).add(segments[i])
        self.modules: dict[tuple[str, ...], _Module] = {}
        self.proofs: dict[str, Proof | None] = {}

    def of(self, mid: tuple[str, ...]) -> _Module:
        """The module of path segments ``mid`` (no trailing ``~``)."""
        found = self.modules.get(mid)
        if found is None:
            up, key = _module_id(mid[:-1]), "/".join(mid)
            direct = self.tree.get(key, {})
            arrays = {n: len(v.shape) - self.batch_of(key, n, tuple(v.shape), False)
                      for n, v in direct.items() if is_array_like(v)}
            cls = self.trace.classes.get(key) if self.trace is not None else None
            found = self.modules[mid] = _read(mid, cls, arrays, self.children.get(mid, set()),
                                              self.of(up) if up else None)
        return found

    def batch_of(self, key: str, name: str, shape: tuple[int, ...], read: bool = True) -> int:
        """The stacked leading axes of the param ``name`` of the module at ``key``;
        without ``read``, only what names and shapes show before its module is read."""
        rank = self.trace.ranks.get(f"{key}/{name}") if self.trace is not None else None
        if rank is not None:
            return max(0, len(shape) - rank)
        segments = self.paths[key]
        direct = self.tree[key]
        batch = sum(1 for s in segments if _STACK.match(s))
        if not read:  # a w and b of a stacked linear show it before its kind is read
            return min(len(shape), max(batch, stacked_by_bias(_is_linear(segments), direct) or 0))
        own = self.proof(key)
        batch = max(batch, own[0] if own is not None else 0)
        found = lifted_at(self.lifted, module_path(segments)) if self.lifted else None
        if found is not None and agrees(shape, self.one_layer_ndim(key, name), found,
                                        own and (own[0], tuple(shape[: own[0]]))):
            batch = max(batch, found[0])
        return min(len(shape), batch)

    def proof(self, key: str) -> Proof | None:
        """The stack the params of the module at ``key`` prove by names, if any."""
        if key not in self.proofs:
            proof = None
            if self.trace is None:
                proof = proof_of(_is_linear(self.paths[key]), self.module_at(key), self.tree[key])
            self.proofs[key] = proof
        return self.proofs[key]

    def one_layer_ndim(self, key: str, name: str) -> int | None:
        """The rank the param ``name`` has in one layer of the module at ``key``, where
        its kind fixes it."""
        module = self.module_at(key)
        return ONE_LAYER_NDIM.get(module.layer.kind, {}).get(name) if module else None

    def module_at(self, key: str) -> _Module | None:
        """The module that holds the params at ``key`` (none for the root's, ``~``)."""
        mid = _module_id(self.paths[key])
        return self.of(mid) if mid else None


def _is_linear(segments: Sequence[str]) -> bool:
    """Whether a module is Haiku's Linear by its name (or a name Haiku gives no class)."""
    return _BUILTIN.get(_base(segments[-1]), ("Linear",))[0] == "Linear"


def _base(segment: str) -> str:
    """A module name without Haiku's numbering: ``linear_1`` -> ``linear``."""
    return segment[: segment.rindex("_")] if _NUMBERED.match(segment) else segment


def _module_id(segments: Sequence[str]) -> tuple[str, ...]:
    """A module path's segments without a trailing ``~``."""
    return tuple(segments[:-1]) if segments and segments[-1] == "~" else tuple(segments)


def _read(mid: tuple[str, ...], cls: type | None, arrays: Mapping[str, int], children: set[str],
          parent: _Module | None) -> _Module:
    """The module of path segments ``mid``, of class ``cls`` where a trace saw it."""
    segment = mid[-1]
    ancestors = () if parent is None else \
        parent.ancestors if parent.hidden else (*parent.ancestors, parent.layer)
    # Aligned with ancestors + (the module,): a hidden parent's own depth is dropped as it is.
    above = () if parent is None else parent.depths[:-1] if parent.hidden else parent.depths
    depths = (*above, len(mid))
    if _STACK.match(segment) or (cls is not None and cls.__module__.startswith(LIFT)):
        # A stack (or lift) is looked through: its layers are the modules below it.
        module = _Module(Layer("unknown", None, cls, "class" if cls else "name"), ancestors)
        module.hidden = True
        module.depths = depths
        return module
    if cls is not None:
        kinds = _class_kinds()
        kind, source, registration = kinds(cls)
        base = next((b for b in cls.__mro__ if b in kinds.table), None)
        if source == "name" or (kind == "unknown" and not issubclass(cls, kinds.containers)):
            layer = kinds.content_layer(cls, arrays, children)  # never worse than names
        else:
            layer = Layer(kind, cls.__name__, cls, source)
        builtin = base.__name__ if base is not None and registration is None else None
        module = _Module(layer, ancestors, builtin, registration)
    else:
        name = _base(segment)
        registration = _registry.lookup_spelled(name, snake) or \
            _registry.lookup_spelled(segment, snake)
        known = _BUILTIN.get(name)
        if registration is not None:
            module = _Module(Layer(registration.kind, None, None, "registered"), ancestors, None,
                             registration)
        elif known is not None:
            module = _Module(Layer(known[1], known[0], None, "name"), ancestors, known[0])
        elif parent is not None and parent.trusted and parent.layer.kind == "attention":
            # MultiHeadAttention's query, key, value and output are Linears.
            module = _Module(Layer("linear", "Linear", None, "name"), ancestors, "Linear")
        else:
            kind, source = resolve_kind(segment, arrays, children)
            module = _Module(Layer(kind, None, None, source), ancestors)
    if parent is not None and parent.cell and module.layer.kind == "linear":
        module.owned_by = parent
        module.layout = _DENSE if module.trusted else None
    module.depths = depths
    return module


@functools.cache
def _class_kinds() -> Any:
    """Haiku's classes for :class:`ClassKinds` (which drops its answers as the registry changes)."""
    import haiku as hk

    from ._common import ClassKinds

    table = {getattr(hk, cls): kind for cls, kind, _ in _BUILTIN.values()}
    return ClassKinds(table, containers=(hk.nets.MLP, hk.Sequential, hk.DeepRNN))


def _layout(module: _Module, name: str, rank: int) -> \
        tuple[tuple[int, ...], tuple[int, ...]] | None:
    """(reduction, output) axes of a weight in Haiku's layouts, where the class is known."""
    layout = module.layout
    if layout is None or name not in ("w", "w_i", "w_h", "embeddings") or rank < 2:
        return None
    if layout == _DENSE:
        return ((0,), (1,)) if rank == 2 else None
    # ConvND: (*kernel, in, out); ConvNDTranspose: (*kernel, out, in).
    out = rank - 1 if layout == _CONV else rank - 2
    return tuple(a for a in range(rank) if a != out), (out,)


def _is_param(name: str, segments: tuple[str, ...], trace: HaikuTrace | None) -> bool:
    if trace is not None:
        return not trace.state
    moving = segments[-1] == "exponential_moving_average" or words(segments[-1])[-1:] == ("ema",)
    return not (moving and name in ("average", "hidden", "counter"))  # an EMA's state


ADAPTER = HaikuAdapter()
