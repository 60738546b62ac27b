"""The Flax Linen adapter: params or variables -> leaves -> a mask in the same containers.

The input is a params mapping or a whole variables mapping, as ``dict`` or
``FrozenDict``; the mask comes back in exactly the same containers (optax rejects a
mix), with one bool at each ``nn.Partitioned`` box so that it is a prefix of the boxed
params. A mapping is read as variables when it has a ``params`` key, every top-level
value is a mapping and no other top-level key is a Flax auto name (``Dense_0``); with
``module=``, the traced model decides instead, since a model may name a submodule
``params``. Canonical paths join keys with ``/``; in variables, ``params`` paths drop
their ``params/`` prefix (a glob written for params works on both) and other
collections keep theirs (``batch_stats/BatchNorm_0/mean``). Other collections are
state: never decayed.

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
   recurrent, one with ``query``, ``key``, ``value`` and ``out`` children is attention.

Two kinds of module own the arrays of modules inside them. A recurrent cell (Linen's
cells keep their gates in ``Dense`` or ``Conv`` children such as ``ii``/``hi``) owns
its gates' kernels and biases, with roles ``weight`` and ``bias``, exactly as an
Equinox ``GRUCell`` owns ``weight_ih``: ``layer="recurrent"`` selects the same arrays
in both. ``WeightNorm`` and ``SpectralNorm`` own the arrays they keep for the layer they
wrap, as a layer of that layer's kind. A cell does not own a child of another kind (a
norm inside a user's cell stays a norm).

With ``module=`` and ``args=``, ``model.init`` is traced abstractly (``jax.eval_shape``,
no arrays allocated) with a method interceptor that records the class of every module
path and the rank each array has inside its layer (so arrays stacked by ``nn.scan`` or
``nn.vmap`` get ``batch_axes``; by names alone, only layers of a fixed rank under a
``Scan``/``Vmap`` auto name get them). A class is looked up in the registry, then in
:data:`KIND_TABLE` (subclasses count), then by its name, and where none of these knows
it, the rules above decide, so the classes are never worse than the names.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
import reprlib
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
from flax.core import meta as _meta
from flax.core.scope import Scope

from ..core import _registry
from ..core._infer import is_generic_norm_name, kind_from_name, role_from_name
from ..core._leaf import Layer, Leaf
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
# OptimizedLSTMCell keeps its gates in this Dense look-alike.
_DENSE_PARAMS: type | None = getattr(nn.recurrent, "DenseParams", None)
if _DENSE_PARAMS is not None:
    KIND_TABLE[_DENSE_PARAMS] = "linear"

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

# The rank one layer gives an array, where only names are known: under a lifted
# scan/vmap ancestor, leading axes beyond it are stacked axes. Layers whose ranks
# depend on their configuration (Einsum, DenseGeneral, ConvLocal) are left out.
_NORM_NDIM = {"scale": 1, "bias": 1, "weight": 1, "mean": 1, "var": 1}
_NATURAL_NDIM: dict[str, dict[str, int]] = {
    "linear": {"kernel": 2, "weight": 2, "bias": 1},
    "conv": {"bias": 1},
    "embedding": {"embedding": 2, "weight": 2},
    "recurrent": {"kernel": 2, "bias": 1},
    "prelu": {"negative_slope": 0},
    **{kind: _NORM_NDIM for kind in ("layer_norm", "rms_norm", "group_norm", "batch_norm",
                                     "instance_norm")},
}
_FREE_NDIM = frozenset({"Einsum", "DenseGeneral", "ConvLocal"})
# MultiHeadDotProductAttention's DenseGeneral children: (kernel, bias) ranks.
_ATTENTION_NDIM = {"query": (3, 2), "key": (3, 2), "value": (3, 2), "out": (3, 1)}


# (batch_dims, axis, features) axis counts of MultiHeadDotProductAttention's
# DenseGeneral children, for their matrix layouts by name.
_ATTENTION_LAYOUT = {"query": (0, 1, 2), "key": (0, 1, 2), "value": (0, 1, 2), "out": (0, 2, 1)}

# Linen's kernel layouts, most specific class first (DenseGeneral is not a Dense).
_LAYOUT_CLASSES: tuple[tuple[type, str], ...] = (
    (nn.Einsum, "Einsum"),
    (nn.DenseGeneral, "DenseGeneral"),
    (nn.Dense, "Dense"),
    *(((_DENSE_PARAMS, "Dense"),) if _DENSE_PARAMS is not None else ()),
    (nn.ConvLocal, "ConvLocal"),
    (nn.Conv, "Conv"),
    (nn.ConvTranspose, "Conv"),
    (nn.Embed, "Embed"),
)
_LAYOUT_NAMES = {cls.__name__: base for cls, base in _LAYOUT_CLASSES}


def _layout_base(layer: Layer) -> str | None:
    """Which Linen matrix layout a layer's kernel has, by class or auto name."""
    if layer.cls is not None:
        for cls, base in _LAYOUT_CLASSES:
            if issubclass(layer.cls, cls):
                return base
        return None
    return _LAYOUT_NAMES.get(layer.type_name) if layer.type_name is not None else None


def _natural_ndim(layer: Layer, module_key: str, name: str) -> int | None:
    """The rank ``name`` has in one layer known by name only, or ``None``."""
    if layer.type_name == "DenseGeneral" and module_key in _ATTENTION_NDIM:
        kernel, bias = _ATTENTION_NDIM[module_key]
        return kernel if name == "kernel" else bias if name == "bias" else None
    if layer.type_name in _FREE_NDIM:
        return None
    if layer.type_name == "ConvLSTMCell" and name == "kernel":
        return None
    return _NATURAL_NDIM.get(layer.kind, {}).get(name)


_TRUSTED = ("class", "registered")
_DictKey = jax.tree_util.DictKey


# isinstance against the abstract base classes involved (jax.Array, AxisMetadata) is
# slow; a tree has few leaf types, so each is classified once.
_box_types: dict[type, bool] = {}
_array_types: dict[type, bool] = {}
_dtype_names: dict[Any, str] = {}


def _is_box(x: Any) -> bool:
    found = _box_types.get(type(x))
    if found is None:
        found = _box_types[type(x)] = isinstance(x, _meta.AxisMetadata)
    return found


def _is_array(x: Any) -> bool:
    found = _array_types.get(type(x))
    if found is None:
        found = _array_types[type(x)] = is_array_like(x)
    return found


def _dtype_name(x: Any) -> str:
    found = _dtype_names.get(x.dtype)
    if found is None:
        found = _dtype_names[x.dtype] = dtype_name(x)
    return found


def _keys(keys: tuple) -> tuple[str, ...]:
    return tuple(k.key if type(k) is _DictKey else key_name(k) for k in keys)


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


_auto_cache: dict[str | None, tuple[str | None, str, _registry.Registration | None]] = {}
_auto_generation = -1


def _auto_kind(auto: str | None) -> tuple[str | None, str, _registry.Registration | None]:
    """(kind, source, registration) for a class known by its auto name only.

    The kind is ``None`` where neither the registry nor :data:`KIND_TABLE` knows the
    class name, and ``"wrapper"`` for :data:`WRAPPERS`.
    """
    global _auto_generation
    if _auto_generation != _registry.generation:
        _auto_cache.clear()
        _auto_generation = _registry.generation
    found = _auto_cache.get(auto)
    if found is None:
        registration = _registry.lookup_name(auto) if auto is not None else None
        if registration is not None:
            found = (registration.kind, "registered", registration)
        elif auto in _WRAPPER_NAMES:
            found = ("wrapper", "name", None)
        else:
            found = (_KIND_BY_NAME.get(auto), "name", None)  # type: ignore[arg-type]
        _auto_cache[auto] = found
    return found


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
    general: dict[tuple[str, ...], tuple[int, int, int]]
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
    general: dict[tuple[str, ...], tuple[int, int, int]] = {}
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
        if isinstance(bound, nn.DenseGeneral) and path not in general:
            # The kernel is batch_dims + axis + features axes: its matrix layout.
            batch, axis, features = (
                len(v) if isinstance(v, (tuple, list)) else 1
                for v in (bound.batch_dims, bound.axis, bound.features)
            )
            general[path] = (batch, axis, features)
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
    return _Trace(classes, wrapped, ndims, general, variables)


@dataclasses.dataclass
class _Module:
    """One module path, as far as the names or the trace tell."""

    layer: Layer
    ancestors: tuple[Layer, ...]
    stacked: int  # lifted scan/vmap modules at or around it, by their auto names
    registration: _registry.Registration | None = None
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


_EMBED_NAMES = frozenset({"embedding", "embeddings", "embedding_table"})
_GATE_SETS = frozenset(_CELL_GATES)


def _path_text(path: tuple[str, ...]) -> str:
    return "/".join(path)


class _Walk:
    """One pass over a Linen mapping: its leaves, and where each goes in the mask."""

    def __init__(
        self,
        fn: str,
        tree: Any,
        module: Any = None,
        args: Any = (),
        kwargs: Any = None,
    ):
        if not isinstance(tree, Mapping):
            raise TypeError(
                f"{fn}: expected a Linen params or variables mapping (dict or FrozenDict), "
                f"got {type(tree).__name__}."
            )
        given_args = not (isinstance(args, tuple) and not args)
        if module is None and (given_args or kwargs is not None):
            raise TypeError(
                f"{fn}(params, args=..., kwargs=...): these are example inputs for "
                f"tracing module=, but no module= was given. Pass the model too: "
                f"policy.{fn}(params, module=model, args=(x,))."
            )
        self.fn = fn
        flat, self.treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_box)
        if len(flat) == 1 and flat[0][1] is tree:
            raise TypeError(
                f"{fn}: expected a Linen params or variables mapping (dict or FrozenDict), "
                f"got {type(tree).__name__}, which jax treats as a single leaf."
            )
        keyed = [(_keys(keys), value) for keys, value in flat]
        self.variables = _looks_like_variables(tree)
        self.trace: _Trace | None = None
        traced_shapes: dict[str, tuple[int, ...]] = {}
        if module is not None:
            self.trace = _trace(fn, module, args, kwargs, _wanted(keyed, self.variables))
            traced_shapes = self._traced_param_shapes()
            self.variables = self._reading(keyed, traced_shapes)
        entries = self._entries(keyed)
        if self.trace is not None:
            self._check_trace(entries, traced_shapes)
        self.children: dict[tuple[str, ...], set[str]] = {}
        for path in list(self.direct) + list(self.direct_other):
            for i in range(len(path) - 1, -1, -1):
                seen = path[:i] in self.children
                self.children.setdefault(path[:i], set()).add(path[i])
                if seen:
                    break
        self.modules: dict[tuple[str, ...], _Module] = {}
        # One leaf per flat position: a result is the treedef unflattened over them.
        self.leaves = [self._leaf(*entry) for entry in entries]

    def _entries(self, keyed: list) -> list[tuple[str, tuple[str, ...], str, Any]]:
        """(collection, module path, key, array) per flat position."""
        entries: list[tuple[str, tuple[str, ...], str, Any]] = []
        self.direct: dict[tuple[str, ...], dict[str, Any]] = {}
        self.direct_other: dict[tuple[str, ...], dict[str, Any]] = {}
        for names, value in keyed:
            collection = "params"
            rest = names
            if self.variables:
                collection, rest = names[0], names[1:]
            array = _unbox(value) if _is_box(value) else value
            if not _is_array(array) or not rest:
                raise TypeError(
                    f"{self.fn}: leaf {_path_text(names)!r} is {reprlib.repr(array)} "
                    f"({type(array).__name__}); expected a jax or numpy array, or an "
                    f"nn.Partitioned (flax AxisMetadata) box around one. Remove "
                    f"non-array entries from the tree before building the mask."
                )
            path, name = rest[:-1], rest[-1]
            table = self.direct if collection == "params" else self.direct_other
            table.setdefault(path, {})[name] = array
            entries.append((collection, path, name, array))
        return entries

    # The trace against the tree.

    def _traced_param_shapes(self) -> dict[str, tuple[int, ...]]:
        assert self.trace is not None
        traced = self.trace.variables
        flat, _ = jax.tree_util.tree_flatten_with_path(
            traced.get("params", {}), is_leaf=_is_box
        )
        shapes = {}
        for keys, value in flat:
            array = _unbox(value) if _is_box(value) else value
            shapes[_path_text(tuple(key_name(k) for k in keys))] = tuple(array.shape)
        return shapes

    def _reading(self, keyed: list, traced: dict[str, tuple[int, ...]]) -> bool:
        """Whether the tree is a variables mapping, as the traced model tells."""
        if not self.variables:
            return False
        as_variables = {
            _path_text(names[1:]) for names, _ in keyed if names and names[0] == "params"
        }
        if as_variables == set(traced):
            return True
        as_params = {_path_text(names) for names, _ in keyed}
        # A model with a top-level submodule named "params": its keys are modules.
        return as_params != set(traced)

    def _check_trace(self, entries: list, traced: dict[str, tuple[int, ...]]) -> None:
        given = {
            _path_text(entry[1] + (entry[2],)): tuple(entry[3].shape)
            for entry in entries
            if entry[0] == "params"
        }
        for path, shape in given.items():
            if path not in traced:
                raise self._mismatch(f"{path!r} is in the params, not in the model's")
            if traced[path] != shape:
                raise self._mismatch(
                    f"{path!r} has shape {shape} in the params and {traced[path]} in "
                    f"the model's"
                )
        for path in traced:
            if path not in given:
                raise self._mismatch(f"{path!r} is in the model's params, not in these")

    def _mismatch(self, what: str) -> ValueError:
        return ValueError(
            f"{self.fn}(params, module=...): the params do not match the traced model: "
            f"{what}. Pass the module that made these params, and args= with the "
            f"feature sizes they were made with."
        )

    # Modules.

    def _module(self, path: tuple[str, ...]) -> _Module:
        found = self.modules.get(path)
        if found is None:
            parent = self._module(path[:-1]) if path else None
            found = self._infer(path, parent)
            self.modules[path] = found
        return found

    def _infer(self, path: tuple[str, ...], parent: _Module | None) -> _Module:
        key = path[-1] if path else ""
        ancestors: tuple[Layer, ...] = ()
        stacked = 0
        in_attention = False
        absorbed_by = None
        if parent is not None:
            ancestors = parent.ancestors + (parent.layer,) if parent.visible else parent.ancestors
            stacked = parent.stacked
            in_attention = parent.in_attention or parent.layer.kind == "attention"
            absorbed_by = parent.absorbed_by or (parent if parent.wrapper else None)
        auto, stacked_here = _auto_class(key)
        stacked += stacked_here

        cls = self.trace.classes.get(path) if self.trace is not None else None
        registration = None
        if cls is not None:
            kind, source = _class_kind(cls)
            type_name: str | None = cls.__name__
            trusted = source in _TRUSTED
            if source == "registered":
                registration = _registry.lookup_class(cls)
        else:
            if (
                self.trace is not None
                and parent is not None
                and parent.trusted
                and parent.layer.kind != "unknown"
            ):
                # Not a module: arrays nested inside a known layer's own variable.
                return dataclasses.replace(
                    parent, absorbed_by=absorbed_by or parent, visible=False
                )
            type_name = auto
            kind, source, registration = _auto_kind(auto)
            trusted = kind is not None
        if (kind is None or kind == "norm") and key and not trusted:
            # The module's own name, where the class (or auto name) says nothing
            # specific: `input_layernorm` holding an HF-style `weight`.
            guess = kind_from_name(key)
            if guess is None and kind is None and is_generic_norm_name(key):
                guess = "norm"
            if guess is not None:
                kind, source = guess, "name"

        wrapper = kind == "wrapper"
        direct = self.direct.get(path) or self.direct_other.get(path) or {}
        if wrapper:
            kind, source = self._wrapped_kind(path, source)
        elif (
            kind is None
            or kind == "norm"
            or (not trusted and kind in _KERNEL_OVERRIDES and "kernel" in direct)
        ):
            content = self._content_kind(path, direct, in_attention, stacked)
            if content is not None:
                kind, source = content, "name"
            elif kind == "norm":
                kind = "layer_norm" if "bias" in direct else "rms_norm"
            elif kind is None:
                kind = "unknown"
                source = "class" if cls is not None else "name"
        assert kind is not None
        cell = kind == "recurrent" and (
            trusted or frozenset(self.children.get(path, ())) in _GATE_SETS
        )
        if (
            cls is None
            and kind == "linear"
            and key in _ATTENTION_CHILDREN
            and parent is not None
            and parent.layer.type_name in _ATTENTION_NAMES
        ):
            type_name = "DenseGeneral"
        if absorbed_by is None and parent is not None and parent.cell:
            if kind in ("linear", "conv"):
                absorbed_by = parent
        layer = Layer(kind, type_name, cls, source)
        return _Module(
            layer=layer,
            ancestors=ancestors,
            stacked=stacked,
            registration=registration,
            cell=cell,
            wrapper=wrapper,
            in_attention=in_attention,
            absorbed_by=absorbed_by,
            # Without a trace the root is anonymous: nothing to match it by.
            visible=bool(path) or self.trace is not None,
            trusted=trusted,
        )

    def _wrapped_kind(self, path: tuple[str, ...], source: str) -> tuple[str, str]:
        """The kind of the layer a WeightNorm or SpectralNorm at ``path`` wraps."""
        if self.trace is not None:
            inner = self.trace.wrapped.get(path)
            if inner is not None:
                kind, inner_source = _class_kind(inner)
                if kind not in (None, "norm", "wrapper"):
                    return kind, inner_source
            return "unknown", source
        # WeightNorm keeps `Dense_0/kernel/scale`: one key naming the wrapped layer.
        direct = {**self.direct.get(path, {}), **self.direct_other.get(path, {})}
        children = set(self.children.get(path, ()))
        children.update(k.split("/", 1)[0] for k in direct if "/" in k)
        if len(children) == 1:
            (child,) = children
            auto, _ = _auto_class(child)
            kind = _auto_kind(auto)[0]
            if kind in (None, "wrapper"):
                kind = kind_from_name(child)
            if kind is not None:
                return kind, source
        return "unknown", source

    def _content_kind(
        self,
        path: tuple[str, ...],
        direct: dict[str, Any],
        in_attention: bool,
        stacked: int,
    ) -> str | None:
        """The kind the arrays a module owns (or its gate children) make evident."""
        if not direct:
            children = frozenset(self.children.get(path, ()))
            if children in _GATE_SETS:
                return "recurrent"
            if _ATTENTION_CHILDREN <= children:
                return "attention"
            return None
        if not _EMBED_NAMES.isdisjoint(direct):
            return "embedding"
        kernel = direct.get("kernel")
        if kernel is None:
            weight = direct.get("weight")
            if weight is not None and len(weight.shape) - stacked >= 2:
                kernel = weight
        if kernel is not None:
            if in_attention:
                return "linear"
            bias = direct.get("bias")
            rank = len(kernel.shape) - stacked
            # DenseGeneral's bias has the shape of its output axes, the kernel's last.
            general = (
                bias is not None
                and 2 <= len(bias.shape) <= len(kernel.shape)
                and tuple(kernel.shape[-len(bias.shape) :]) == tuple(bias.shape)
            )
            return "conv" if rank >= 3 and not general else "linear"
        names = set(direct)
        if "scale" in names and names <= {"scale", "bias"}:
            return "layer_norm" if "bias" in names else "rms_norm"
        if names == {"mean", "var"}:
            return "batch_norm"
        if names == {"negative_slope"}:
            return "prelu"
        return None

    # Leaves.

    def _leaf(self, collection: str, path: tuple[str, ...], key: str, array: Any) -> Leaf:
        module = self._module(path)
        owner = module.absorbed_by or module
        layer = owner.layer
        # WeightNorm names its variables by path (`Dense_0/kernel/scale`).
        name = key.rsplit("/", 1)[-1]
        role = None
        if owner.registration is not None:
            role = owner.registration.role_of(name)
        if role is None:
            role = role_from_name(layer.kind, name)
        shape = tuple(array.shape)
        batch_axes = 0
        known_rank = True
        if self.trace is not None:
            inner = self.trace.ndims.get((collection, path + (key,)))
            if inner is not None:
                batch_axes = max(0, len(shape) - inner)
        elif module.stacked:
            natural = _natural_ndim(module.layer, path[-1] if path else "", name)
            if natural is not None:
                batch_axes = min(module.stacked, max(0, len(shape) - natural))
            known_rank = natural is not None
        matrix_axes = None
        if collection == "params" and known_rank:
            matrix_axes = self._matrix_axes(owner, module, path, name, len(shape) - batch_axes)
        text = "/".join(path + (key,))
        if collection != "params":
            text = f"{collection}/{text}"
        return Leaf(
            path=text,
            layer=layer.kind,
            role=role,
            shape=shape,
            dtype=_dtype_name(array),
            name=name,
            layer_type=layer.type_name,
            layer_class=layer.cls,
            ancestors=owner.ancestors,
            is_param=collection == "params",
            kind_source=layer.source,
            batch_axes=batch_axes,
            matrix_axes=matrix_axes,
        )

    def _general_sizes(self, path: tuple[str, ...], rank: int) -> tuple[int, int, int] | None:
        """A DenseGeneral's axis counts read off its bias: the kernel's last axes."""
        direct = self.direct.get(path, {})
        kernel, bias = direct.get("kernel"), direct.get("bias")
        if kernel is None or bias is None:
            return None
        features = len(bias.shape)
        stacked = len(kernel.shape) - rank
        if not 0 < features < rank or bias.shape[stacked:] != kernel.shape[-features:]:
            return None
        return 0, rank - features, features

    def _matrix_axes(
        self, owner: _Module, module: _Module, path: tuple[str, ...], name: str, rank: int
    ) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
        """(reduction, output) axes of a weight matrix in Linen's (in, out) layouts."""
        if owner.registration is not None:
            return owner.registration.matrix_axes_of(name)
        if name not in ("kernel", "embedding"):
            return None
        layer = module.layer
        base = _layout_base(layer)
        if base is None:
            # A layer known by kind only (a user-named module, a third-party class)
            # keeps Linen's layouts: a 2-D kernel is (in, out), a conv's (*window, in,
            # out). A multi-axis bias shows a DenseGeneral's output axes.
            if layer.kind == "linear" and name == "kernel":
                base = "Dense" if rank == 2 else "DenseGeneral"
            elif layer.kind == "conv" and name == "kernel":
                base = "Conv"
            elif layer.kind == "embedding" and name == "embedding":
                base = "Embed"
        if base in ("Dense", "Embed") and rank == 2:
            return (0,), (1,)
        if base == "Conv" and rank >= 2:
            # (*window, in, out): a window position is part of the input of the matmul.
            return tuple(range(rank - 1)), (rank - 1,)
        if base == "ConvLocal" and rank >= 2:
            # (*out_window, window * in, out): one matrix per output position.
            return (rank - 2,), (rank - 1,)
        if base == "DenseGeneral":
            sizes = self.trace.general.get(path) if self.trace is not None else None
            if sizes is None and layer.cls is None:
                if layer.type_name == "DenseGeneral" and path and path[-1] in _ATTENTION_LAYOUT:
                    sizes = _ATTENTION_LAYOUT[path[-1]]
                else:
                    sizes = self._general_sizes(path, rank)
            if sizes is not None and sum(sizes) == rank:
                batch, reduction, _ = sizes
                return (
                    tuple(range(batch, batch + reduction)),
                    tuple(range(batch + reduction, rank)),
                )
        return None



def _wanted(keyed: list, variables: bool) -> dict[tuple[str, ...], list[tuple[str, str]]]:
    """The (collection, name) pairs each module path may hold, under either reading."""
    wanted: dict[tuple[str, ...], list[tuple[str, str]]] = {}
    for names, _ in keyed:
        if not names:
            continue
        wanted.setdefault(names[:-1], []).append(("params", names[-1]))
        if variables and len(names) >= 2:
            wanted.setdefault(names[1:-1], []).append((names[0], names[-1]))
    return wanted


NON_FLOATING_FIX = "Keep integer and bool arrays out of the params handed to optax."


def walk(
    tree: Any,
    *,
    module: Any = None,
    args: Any = (),
    kwargs: Any = None,
    method: str = "for_flax",
) -> tuple[list[Leaf], Callable[[list[Any]], Any]]:
    """The leaves of a Linen mapping, and the function that puts one value per leaf back.

    The rebuilt tree has exactly the containers of ``tree`` (``dict`` or
    ``FrozenDict`` at every level) with one value at each array and at each
    ``nn.Partitioned`` box. Arguments as :func:`leaves`; ``method`` names the entry
    point in error messages.
    """
    state = _Walk(method, tree, module, args, kwargs)
    return state.leaves, state.treedef.unflatten


def leaves(
    tree: Any, *, module: Any = None, args: Any = (), kwargs: Any = None
) -> list[Leaf]:
    """The :class:`Leaf` records of every array in a Linen mapping, in flattening order.

    Args:
      tree: a params mapping or a whole variables mapping (``{"params": ...,
        "batch_stats": ...}``), as ``dict`` or ``FrozenDict``. It is read as variables
        when it has a ``params`` key, every top-level value is a mapping and no other
        top-level key is a Flax auto name such as ``Dense_0``; with ``module=``, the
        traced model decides (a model may name a submodule ``params``). Paths in
        ``params`` drop the ``params/`` prefix; other collections keep theirs
        (``batch_stats/BatchNorm_0/mean``) and are never decayed.
      module: the ``flax.linen.Module`` that made the params, to find the exact class
        of every layer by an abstract trace of ``module.init``.
      args: example inputs for ``module.__call__`` (only shapes and dtypes matter).
      kwargs: example keyword inputs for ``module.__call__``.

    Returns:
      One :class:`Leaf` per array, in ``jax.tree_util`` flattening order.

    Raises:
      TypeError: ``tree`` is not a mapping, a leaf is not an array, or
        ``module=``/``args=``/``kwargs=`` are of the wrong type or missing.
      ValueError: the traced model's params differ from ``tree``'s.

    Example:
      >>> import flax.linen as nn, jax, jax.numpy as jnp
      >>> from decaymask.adapters import _linen
      >>> model = nn.Sequential([nn.Dense(4), nn.LayerNorm()])
      >>> params = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 3)))
      >>> for leaf in _linen.leaves(params):
      ...     print(leaf.path, leaf.layer, leaf.role)
      layers_0/bias linear bias
      layers_0/kernel linear weight
      layers_1/bias layer_norm bias
      layers_1/scale layer_norm scale
    """
    return walk(tree, module=module, args=args, kwargs=kwargs, method="leaves")[0]
