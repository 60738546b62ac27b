"""The Flax Linen adapter: a params or variables mapping -> leaves -> a mask of the same containers.

Linen params carry no classes, only keys. Without a module, every mapping level is read
as a module and its kind comes from names, in this order:

1. A Flax auto name (``Dense_3``) gives a class name (``Dense``); a lift prefix is
   dropped (``ScanBlock_0`` is a ``Block`` stacked by ``nn.scan``). A class name the
   user registered with ``dm.register_layer`` gives its kind (``"registered"``), then
   a Linen class name from :data:`KIND_TABLE`.
2. Otherwise the module or class name, if it makes the kind evident (``ln_f``,
   ``input_layernorm``, ``LlamaRMSNorm_0``). A name that says only "norm" is a layer
   norm when the module has a ``bias`` and an RMS norm when it has not. A name that
   says embedding, attention or norm does not hold against a ``kernel`` the module owns
   (``patch_embed`` holding a conv kernel is a conv).
3. Otherwise the arrays the module owns: an ``embedding`` makes an embedding; a
   ``kernel`` makes a linear layer, or a conv when the kernel has three or more axes of
   its own (axes stacked by a ``Scan``/``Vmap`` ancestor do not count) and neither an
   attention ancestor nor a multi-axis bias says ``DenseGeneral``; ``scale`` beside
   ``bias`` makes a layer norm, ``scale`` alone an RMS norm; a module whose children are
   exactly the gates of a Linen cell (``ir``, ``iz``, ``in``, ``hr``, ``hz``, ``hn``) is
   recurrent.

Two kinds of module own the arrays of modules inside them. A recurrent cell (Linen's
cells keep their gates in ``Dense`` or ``Conv`` children such as ``ii``/``hi``) owns
its gates' kernels and biases, with roles ``weight`` and ``bias``, exactly as an
Equinox ``GRUCell`` owns ``weight_ih``: ``layer="recurrent"`` selects the same arrays
in both. ``WeightNorm`` and ``SpectralNorm`` own the arrays they keep for the layer they
wrap, as a layer of that layer's kind.

With ``module=`` and ``args=``, ``model.init`` is traced abstractly (``jax.eval_shape``,
no arrays allocated) with a method interceptor that records the class of every module
path and the rank each array has inside its layer (so arrays stacked by ``nn.scan`` or
``nn.vmap`` get ``batch_axes``). A class is looked up in the registry, then in
:data:`KIND_TABLE` (subclasses count), then by its name, and where none of these knows
it, the rules above decide, so the classes are never worse than the names.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
from flax.core import meta as _meta
from flax.core.scope import Scope

from ..core import _registry
from ..core._infer import is_generic_norm_name, kind_from_name, role_from_name
from ..core._leaf import Layer, Leaf
from ..core._policy import Policy
from ..core._report import Report
from ._common import dtype_name, is_array_like, key_name

# Base classes: subclasses count as the base kind.
KIND_TABLE: dict[type, str] = {
    nn.Dense: "linear",
    nn.DenseGeneral: "linear",
    nn.Einsum: "linear",
    nn.Conv: "conv",
    nn.ConvTranspose: "conv",
    nn.ConvLocal: "conv",
    nn.Embed: "embedding",
    nn.LayerNorm: "layer_norm",
    nn.RMSNorm: "rms_norm",
    nn.GroupNorm: "group_norm",
    nn.BatchNorm: "batch_norm",
    nn.InstanceNorm: "instance_norm",
    nn.MultiHeadDotProductAttention: "attention",
    nn.MultiHeadAttention: "attention",
    nn.SelfAttention: "attention",
    nn.GRUCell: "recurrent",
    nn.LSTMCell: "recurrent",
    nn.OptimizedLSTMCell: "recurrent",
    nn.MGUCell: "recurrent",
    nn.SimpleCell: "recurrent",
    nn.ConvLSTMCell: "recurrent",
    nn.PReLU: "prelu",
}

# Wrappers keep arrays for the layer they wrap: they own them as a layer of its kind.
WRAPPERS: tuple[type, ...] = (nn.WeightNorm, nn.SpectralNorm)

# Containers whose class is known not to be a layer: never guessed from their name.
_CONTAINERS: tuple[type, ...] = (nn.Sequential, nn.RNN, nn.Bidirectional, nn.Dropout)

_KIND_BY_NAME: dict[str, str] = {cls.__name__: kind for cls, kind in KIND_TABLE.items()}
_WRAPPER_NAMES = frozenset(cls.__name__ for cls in WRAPPERS)
_ATTENTION_NAMES = frozenset(n for n, k in _KIND_BY_NAME.items() if k == "attention")
_ATTENTION_CHILDREN = frozenset({"query", "key", "value", "out"})

# Lifted transforms name their class `<Transform><Class>`; scan and vmap stack arrays.
_LIFT_PREFIXES = ("Scan", "Vmap", "Checkpoint", "Remat", "Jit", "Map_variables")
_STACKING_PREFIXES = frozenset({"Scan", "Vmap"})
_AUTO_NAME = re.compile(r"([A-Z]\w*)_\d+")

# The gate submodules of Linen's cells, for cells under a name of the user's choosing.
_CELL_GATES = (
    frozenset({"ir", "iz", "in", "hr", "hz", "hn"}),  # GRUCell
    frozenset({"ii", "if", "ig", "io", "hi", "hf", "hg", "ho"}),  # (Optimized)LSTMCell
    frozenset({"if", "in", "hf", "hn"}),  # MGUCell
    frozenset({"i", "h"}),  # SimpleCell
    frozenset({"ih", "hh"}),  # ConvLSTMCell
)

# Names a fuzzy name-derived kind cannot keep when the module owns a kernel.
_KERNEL_OVERRIDES = frozenset(
    {"embedding", "attention", "layer_norm", "rms_norm", "group_norm", "batch_norm",
     "instance_norm", "norm"}
)

# The rank one layer gives an array, for layers known by auto name only: where an
# ancestor is a lifted scan/vmap, extra leading axes are stacked axes.
_NATURAL_NDIM: dict[tuple[str, str], int] = {
    ("Dense", "kernel"): 2,
    ("Dense", "bias"): 1,
    ("Embed", "embedding"): 2,
    ("PReLU", "negative_slope"): 0,
    ("Conv", "bias"): 1,
    ("ConvTranspose", "bias"): 1,
    ("ConvLSTMCell", "bias"): 1,
}
for _norm in ("LayerNorm", "RMSNorm", "GroupNorm", "BatchNorm", "InstanceNorm"):
    for _name in ("scale", "bias", "mean", "var"):
        _NATURAL_NDIM[(_norm, _name)] = 1
for _cell in ("GRUCell", "LSTMCell", "OptimizedLSTMCell", "MGUCell", "SimpleCell"):
    _NATURAL_NDIM[(_cell, "kernel")] = 2
    _NATURAL_NDIM[(_cell, "bias")] = 1

_TRUSTED = ("class", "registered")


def _is_box(x: Any) -> bool:
    return isinstance(x, _meta.AxisMetadata)


def _unbox(x: Any) -> Any:
    value = getattr(x, "value", None)
    return value if value is not None else x.unbox()


@functools.lru_cache(maxsize=4096)
def _auto_class(key: str) -> tuple[str | None, int]:
    """The class name in a Flax auto name, lift prefixes dropped, and how many stack."""
    match = _AUTO_NAME.fullmatch(key)
    if match is None:
        return None, 0
    name = match.group(1)
    stacked = 0
    stripped = True
    while stripped:
        stripped = False
        for prefix in _LIFT_PREFIXES:
            rest = name[len(prefix) :]
            if name.startswith(prefix) and rest[:1].isupper():
                stacked += prefix in _STACKING_PREFIXES
                name = rest
                stripped = True
    return name, stacked


# Per-class answers, dropped whenever the registry changes.
_class_cache: dict[type, tuple[str | None, str]] = {}
_cache_generation = -1


def _class_kind(cls: type) -> tuple[str | None, str]:
    """(kind, how it was found) for a module class; kind ``None`` where nothing knows it.

    The kind is ``"wrapper"`` for :data:`WRAPPERS` and may be ``"norm"`` for a class
    whose name says only that it is a norm.
    """
    global _cache_generation
    if _cache_generation != _registry.generation:
        _class_cache.clear()
        _cache_generation = _registry.generation
    found = _class_cache.get(cls)
    if found is None:
        found = _resolve_class_kind(cls)
        _class_cache[cls] = found
    return found


def _resolve_class_kind(cls: type) -> tuple[str | None, str]:
    registration = _registry.lookup_class(cls)
    if registration is not None:
        return registration.kind, "registered"
    if issubclass(cls, WRAPPERS):
        return "wrapper", "class"
    for base in cls.__mro__:
        kind = KIND_TABLE.get(base)
        if kind is not None:
            return kind, "class"
        if base in _CONTAINERS:
            return "unknown", "class"
    guessed = kind_from_name(cls.__name__)
    if guessed is not None:
        return guessed, "name"
    if is_generic_norm_name(cls.__name__):
        return "norm", "name"
    return None, "class"


@functools.lru_cache(maxsize=256)
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
class _Trace:
    """What an abstract ``model.init`` showed: classes by module path, inner ranks."""

    classes: dict[tuple[str, ...], type]
    wrapped: dict[tuple[str, ...], type]
    ndims: dict[tuple[str, tuple[str, ...]], int]
    variables: Any


def _trace(
    fn: str,
    module: Any,
    args: Any,
    kwargs: Any,
    wanted: dict[tuple[str, ...], list[tuple[str, str]]],
) -> _Trace:
    """Runs ``module.init(key, *args, **kwargs)`` under ``jax.eval_shape``, recording."""
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

    classes: dict[tuple[str, ...], type] = {(): type(module)}
    wrapped: dict[tuple[str, ...], type] = {}
    ndims: dict[tuple[str, tuple[str, ...]], int] = {}
    pending = {path: list(names) for path, names in wanted.items()}
    root_class = type(module)

    def interceptor(next_fun, call_args, call_kwargs, context):
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
            classes.setdefault(path, type(bound))
        elif type(bound) is not root_class or type(bound.parent) is not Scope:
            return out
        if isinstance(bound, WRAPPERS) and path not in wrapped:
            wrapped[path] = type(bound.layer_instance)
        names = pending.get(path)
        if names:
            # Inside nn.scan/nn.vmap the module sees one layer's arrays: their rank
            # is the layer's own, the rest of the final rank is stacked axes.
            left = []
            for collection, leaf_name in names:
                if bound.has_variable(collection, leaf_name):
                    value = bound.get_variable(collection, leaf_name)
                    if _is_box(value):
                        value = _unbox(value)
                    shape = getattr(value, "shape", None)
                    if shape is not None:
                        ndims[(collection, path + (leaf_name,))] = len(shape)
                        continue
                left.append((collection, leaf_name))
            pending[path] = left
        return out

    def init() -> Any:
        with nn.intercept_methods(interceptor):
            return module.init(jax.random.key(0), *args, **kwargs)

    try:
        variables = jax.eval_shape(init)
    except Exception as err:
        if hasattr(err, "add_note"):
            err.add_note(
                f"(raised while {fn} traced {name}.init(key, *args, **kwargs) abstractly "
                f"to find the layer classes; check that args= and kwargs= are inputs "
                f"the model accepts)"
            )
        raise
    return _Trace(classes, wrapped, ndims, variables)


@dataclasses.dataclass
class _Module:
    """One module path, as far as the names or the trace tell."""

    layer: Layer
    ancestors: tuple[Layer, ...]
    stacked: int  # lifted scan/vmap modules around it (names) or 0
    cell: bool = False  # a recurrent cell: owns its linear/conv gate children
    wrapper: bool = False  # WeightNorm/SpectralNorm: owns what it keeps below it
    in_attention: bool = False
    absorbed_by: _Module | None = None  # the module that owns this one's arrays
    visible: bool = True  # listed among ancestors
    trusted: bool = False  # kind from a table or the registry (class or auto name)


def _looks_like_variables(tree: Mapping) -> bool:
    """A variables mapping: a ``params`` key, mappings only, no auto-named module key."""
    if "params" not in tree:
        return False
    for key, value in tree.items():
        if not isinstance(value, Mapping):
            return False
        if key != "params" and isinstance(key, str) and _AUTO_NAME.fullmatch(key):
            return False
    return True


