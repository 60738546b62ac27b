"""The Flax Linen adapter: params or variables -> leaves -> a mask in the same containers.

The input is a params mapping or a whole variables mapping, as ``dict`` or
``FrozenDict``; the mask comes back in exactly the same containers (optax rejects a
mix), with one bool at each ``nn.Partitioned`` box so that it is a prefix of the boxed
params. A mapping is read as variables when it has a ``params`` key, every top-level
value is a mapping and every other top-level key looks like a collection (a Flax
collection name, or a mapping without arrays named like parameters); a key that is an
auto name (``Dense_0``) or holds parameters is a module beside a submodule named
``params``, and where both readings fit, the call asks for ``module=``. With
``module=``, the traced model decides. Equinox modules inside a mapping are turned
away (``for_equinox`` reads them). Canonical paths join keys with ``/``; in
variables, ``params`` paths drop their ``params/`` prefix (a glob written for params
works on both) and other collections keep theirs (``batch_stats/BatchNorm_0/mean``).
Other collections are state: never decayed.

Linen params carry no classes, only keys. Without a module, every mapping level is read
as a module, in this order:

1. A Flax auto name (``Dense_3``) gives a class name (``Dense``); a lift prefix is
   dropped (``ScanBlock_0`` is a ``Block`` stacked by ``nn.scan``). A class name the
   user registered with ``dm.register_layer`` gives its kind (``"registered"``), then
   a Linen class name from :data:`KIND_TABLE` (``"name"``).
2. Otherwise the shared inference (:func:`decaymask.core._infer.resolve_kind`) reads
   the class name (or the key: ``ln_f``, ``input_layernorm``) as words together with
   what the module owns: the names of its arrays, the rank each has in one layer and
   the keys of its submodules. Content decides where the two contradict (a
   ``FlaxConv1D`` with a 2-D kernel is linear, a ``ProjNorm`` owning a kernel is not a
   norm), and ``kind_source`` says which did (``"name"`` or ``"content"``). What only
   Linen shows is added: axes stacked by a ``Scan``/``Vmap`` auto name do not count; a
   bias whose leading axes repeat the kernel's shows layers stacked by a user-named
   ``nn.scan``/``nn.vmap`` (their kernels keep one layer's rank) and a bias equal to
   the kernel's last axes a ``DenseGeneral``; where both fit and say different kinds,
   the leaf is ``"ambiguous"``. The ``query``/``key``/``value``/``out`` children of an
   attention layer are its projections.

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
``Scan``/``Vmap`` auto name, or a stack a bias proves, get them). A class is looked up
in the registry, then in :data:`KIND_TABLE` (subclasses count); any other class name is
read with the module's arrays as in step 2, so the classes are never worse than the
names. A call compiled by ``nn.jit`` that jax has cached runs no Python: where the
trace saw no module at paths the params hold, it runs again with jit disabled, and a
``PolicyWarning`` names the paths it still misses.

Muon layouts (``matrix_axes``) are never guessed: they come from a class of
:data:`KIND_TABLE` (traced, or by its auto name), a registration (checked against each
array's rank, leading axes beyond it stacked), an attention layer's projections or a
Linen cell's gates. A module known by its names or arrays only has none.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import operator
import re
import reprlib
import sys
import types
import warnings
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Any, cast

import flax.linen as nn
import jax
from flax.core import meta as _meta
from flax.core.frozen_dict import FrozenDict
from flax.core.scope import Scope

from ..core import _registry
from ..core._infer import kind_from_name, name_kind, resolve_kind, role_from_name
from ..core._leaf import Layer, Leaf
from ..core._table import LeafTable
from ._common import RegistryCache, dtype_name, is_array_like, key_name, path_text

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
_FLOATING: dict[Any, bool] = {}


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
    # Keys that are not strings (ints, tuples: jax and optax take them) read as text.
    return tuple(
        k.key if type(k) is _DictKey and type(k.key) is str else key_name(k) for k in keys
    )


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
_class_cache = RegistryCache()  # class -> (kind, source)


def _class_kind(cls: type) -> tuple[str | None, str]:
    """(kind, how it was found) for a module class; kind ``None`` where neither the
    registry nor :data:`KIND_TABLE` knows it (its name is then read with its arrays).

    The kind is ``"wrapper"`` for :data:`WRAPPERS`.
    """
    table = _class_cache.table()
    found = table.get(cls)
    if found is None:
        found = table[cls] = _resolve_class_kind(cls)
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
    # Neither table nor registry: the class name is read with the arrays, per module.
    return None, "class"


_auto_cache = RegistryCache()  # auto name -> (kind, source, registration)


def _auto_kind(auto: str | None) -> tuple[str | None, str, _registry.Registration | None]:
    """(kind, source, registration) for a class known by its auto name only.

    The kind is ``None`` where neither the registry nor :data:`KIND_TABLE` knows the
    class name, and ``"wrapper"`` for :data:`WRAPPERS`.
    """
    table = _auto_cache.table()
    found = table.get(auto)
    if found is None:
        registration = _registry.lookup_name(auto) if auto is not None else None
        if registration is not None:
            found = (registration.kind, "registered", registration)
        elif auto in _WRAPPER_NAMES:
            found = ("wrapper", "name", None)
        else:
            found = (_KIND_BY_NAME.get(auto), "name", None)  # type: ignore[arg-type]
        table[auto] = found
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

    def __post_init__(self) -> None:
        # "params" first: a module's kind is read off its params where it has any.
        others = sorted({collection for collection, _ in self.ndims} - {"params"})
        self.collections = ("params", *others)


def _trace(
    fn: str,
    module: Any,
    args: Any,
    kwargs: Any,
    wanted: dict[tuple[str, ...], list[tuple[str, str]]],
    eager: bool = False,
) -> _Trace:
    """Runs ``module.init(key, *args, **kwargs)`` under ``jax.eval_shape``, recording.

    With ``eager``, under ``jax.disable_jit()`` too: a call compiled by ``nn.jit`` that
    jax has cached runs no Python, so the methods inside it are seen only then.
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
        if eager:
            with jax.disable_jit():
                variables = jax.eval_shape(init)
        else:
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
    absorbed_by: _Module | None = None  # the module that owns this one's arrays
    visible: bool = True  # listed among ancestors
    trusted: bool = False  # kind from a table or the registry (class or auto name)
    key: str = ""  # its own key: an embedding named for positions holds a position table
    batch: int | None = None  # stacked axes its arrays prove (a user-named stack)


def _owner_id(owner: _Module) -> tuple:
    """What a policy can read of a leaf's owner: alike owners decide alike."""
    # A table under a key that says position is a position table (role_from_name).
    named = role_from_name("embedding", "embedding", owner.key) == "position"
    return owner.layer, owner.ancestors, owner.registration, named


# Flax's own collections: a top-level key among these names a collection.
_COLLECTIONS = frozenset(
    {"params", "batch_stats", "cache", "intermediates", "losses", "perturbations"}
)
# Arrays by these names are parameters: a top-level key holding them is a module.
_PARAM_NAMES = frozenset({"kernel", "bias", "scale", "embedding"})


def _looks_like_variables(tree: Mapping) -> bool | None:
    """Whether a mapping is a variables mapping (``True``) or params (``False``);
    ``None`` where its keys and arrays cannot tell.

    Variables have a ``params`` key and only mappings at the top. Every other top-level
    key must look like a collection: one of Flax's (``batch_stats``, ``cache``, ...),
    or a mapping that holds no array named like a parameter (a ``counter`` collection).
    A key that holds parameters (``head`` with a ``kernel``) or is an auto name is a
    module beside a submodule named ``params``; one that holds parameters in
    submodules the ``params`` tree also has could be either (a copy of the params kept
    in a collection of its own).
    """
    if "params" not in tree:
        return False
    others = []
    for key, value in tree.items():
        if not isinstance(value, Mapping):
            return False
        if key == "params":
            continue
        if not isinstance(key, str) or _AUTO_NAME.fullmatch(key):
            return False
        if key not in _COLLECTIONS:
            others.append(key)
    if not others:
        return True
    readings = set()
    for key in others:
        if not _holds_param_names(tree[key]):
            readings.add("collection")
        elif (paths := _module_paths(tree[key])) != {()} and paths <= _module_paths(
            tree["params"]
        ):
            readings.add("either")
        else:
            readings.add("module")
    if readings == {"collection"}:
        return True
    if readings == {"module"}:
        return False
    return None


def _holds_param_names(tree: Mapping) -> bool:
    for key, value in tree.items():
        if isinstance(value, Mapping):
            if _holds_param_names(value):
                return True
        elif key in _PARAM_NAMES:
            return True
    return False


def _module_paths(tree: Mapping, path: tuple = ()) -> set[tuple]:
    """The paths of the mappings in ``tree`` that hold arrays directly."""
    found: set[tuple] = set()
    for key, value in tree.items():
        if isinstance(value, Mapping):
            found |= _module_paths(value, path + (key,))
        else:
            found.add(path)
    return found


def _undecidable(fn: str, tree: Mapping) -> ValueError:
    others = sorted(str(k) for k in tree if k != "params")
    return ValueError(
        f"{fn}: cannot tell whether this mapping is a variables mapping (collections "
        f"'params', {', '.join(map(repr, others))}) or params whose top-level modules "
        f"include one named 'params': the arrays fit both. Fix: pass the model, "
        f"policy.{fn}(tree, module=model, args=(x,)), so that its trace decides, or "
        f"pass variables['params'] alone."
    )


_GATE_SETS = frozenset(_CELL_GATES)


def _path_text(path: tuple[str, ...]) -> str:
    return path_text(path)


class _Reader:
    """What both walks share: a module's kind from the trace, its names and its arrays,
    and the :class:`Leaf` record of one array.

    Subclasses set ``fn`` (the entry point, for messages) and ``trace``.
    """

    fn: str
    trace: _Trace | None

    def _infer(
        self,
        path: tuple[str, ...],
        parent: _Module | None,
        direct: Mapping[str, Any],
        merged: Mapping[str, Any],
        children: Collection[str],
    ) -> _Module:
        """The module at ``path``.

        Args:
          path: the module path.
          parent: the module at ``path[:-1]``; ``None`` at the root.
          direct: the arrays the module owns in ``params`` (in another collection where
            it owns none there), by name.
          merged: the arrays it owns in every collection, by name.
          children: the keys of its submodules that hold arrays, in any collection.

        Without a trace, the result depends on ``path`` only through the last key's
        :func:`_key_traits` and whether ``path`` is empty: the names-only walk relies on
        that to infer once per distinct (parent, traits, arrays, children).
        """
        key = path[-1] if path else ""
        ancestors: tuple[Layer, ...] = ()
        stacked = 0
        absorbed_by = None
        if parent is not None:
            ancestors = parent.ancestors + (parent.layer,) if parent.visible else parent.ancestors
            stacked = parent.stacked
            absorbed_by = parent.absorbed_by or (parent if parent.wrapper else None)
        auto, stacked_here = _auto_class(key)
        stacked += stacked_here

        cls = self.trace.classes.get(path) if self.trace is not None else None
        registration = None
        # The name read with the arrays where no table knows the module: a traced class
        # name that says something, else the auto name's class or the key.
        name = auto or key
        if cls is not None:
            kind, source = _class_kind(cls)
            type_name: str | None = cls.__name__
            trusted = kind is not None
            if source == "registered":
                registration = _registry.lookup_class(cls)
            said = name_kind(cls.__name__)
            if said is not None and (said != "norm" or kind_from_name(key) is None):
                # The class name's head word, unless it says only "norm" where the
                # key says which (an `HFNorm` at `input_layernorm`).
                name = cls.__name__
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

        wrapper = kind == "wrapper"
        batch: int | None = None
        if wrapper:
            kind, source = self._wrapped_kind(path, source, merged, children)
        elif kind is None:
            kind, source, batch = self._read_kind(
                path, name, parent, direct, children, stacked
            )
            if kind == "unknown":
                # Nothing said what it is: the class (or the name) is all there was.
                source = "class" if cls is not None else "name"
        cell = kind == "recurrent" and (trusted or frozenset(children) in _GATE_SETS)
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
            absorbed_by=absorbed_by,
            # Without a trace the root is anonymous: nothing to match it by.
            visible=bool(path) or self.trace is not None,
            trusted=trusted,
            key=key,
            batch=batch,
        )

    def _read_kind(
        self,
        path: tuple[str, ...],
        name: str,
        parent: _Module | None,
        direct: Mapping[str, Any],
        children: Collection[str],
        stacked: int,
    ) -> tuple[str, str, int | None]:
        """(kind, evidence, stacked axes the arrays prove) of a module no table knows.

        Names and content are read together (:func:`resolve_kind`), with what only
        Linen shows: the rank each array has in one layer (from the trace, or past the
        axes a ``Scan``/``Vmap`` auto name stacks), a bias whose leading axes repeat
        the kernel's (layers stacked by a user-named ``nn.scan``/``nn.vmap``) or whose
        shape is the kernel's last axes (a ``DenseGeneral``), and the projections of an
        attention layer.
        """
        key = path[-1] if path else ""
        if (
            key in _ATTENTION_CHILDREN
            and parent is not None
            and parent.layer.kind == "attention"
            and ("kernel" in direct or "weight" in direct)
        ):
            # An attention layer's query/key/value/out are its projections, however
            # many axes their DenseGeneral kernels have.
            return "linear", "name", None
        ranks = self._ranks(path, direct, stacked)
        batch = None
        kernel, bias = direct.get("kernel"), direct.get("bias")
        if self.trace is None and kernel is not None and bias is not None:
            k, b = kernel.shape[stacked:], bias.shape[stacked:]
            if len(b) >= 2 and len(k) > len(b) - 1:
                # Either reading makes a linear layer where the kernel is 3-D; a
                # deeper kernel under a stack reads as a stacked conv.
                general = tuple(k[-len(b) :]) == tuple(b)
                stack = tuple(k[: len(b) - 1]) == tuple(b[:-1]) and k[-1] == b[-1]
                if stack and not general:
                    batch = len(b) - 1
                    ranks = {n: max(0, r - batch) for n, r in ranks.items()}
                elif stack and general:
                    as_stack = resolve_kind(
                        name, {n: max(0, r - len(b) + 1) for n, r in ranks.items()}, children
                    )
                    as_general = resolve_kind(name, ranks, children)
                    if as_stack[0] != as_general[0]:
                        return as_general[0], "ambiguous", None
        kind, evidence = resolve_kind(name, ranks, children)
        return kind, evidence, batch

    def _ranks(
        self, path: tuple[str, ...], direct: Mapping[str, Any], stacked: int
    ) -> dict[str, int]:
        """The rank of each array a module owns, in one layer as far as is known."""
        ranks = {}
        ndims = self.trace.ndims if self.trace is not None else None
        for name in direct:
            shape = cast(Any, direct.get(name)).shape  # get: a names-only walk keys modules by shape
            inner = None
            if ndims is not None:
                for collection in self.trace.collections:  # type: ignore[union-attr]
                    inner = ndims.get((collection, path + (name,)))
                    if inner is not None:
                        break
            ranks[name] = inner if inner is not None else max(0, len(shape) - stacked)
        return ranks

    def _wrapped_kind(
        self,
        path: tuple[str, ...],
        source: str,
        merged: Mapping[str, Any],
        children: Collection[str],
    ) -> tuple[str, str]:
        """The kind of the layer a WeightNorm or SpectralNorm at ``path`` wraps."""
        if self.trace is not None:
            inner = self.trace.wrapped.get(path)
            if inner is not None:
                kind, inner_source = _class_kind(inner)
                if kind not in (None, "norm", "wrapper"):
                    return kind, inner_source
            return "unknown", source
        # WeightNorm keeps `Dense_0/kernel/scale`: one key naming the wrapped layer.
        inside = set(children)
        inside.update(k.split("/", 1)[0] for k in merged if "/" in k)
        if len(inside) == 1:
            (child,) = inside
            auto, _ = _auto_class(child)
            kind = _auto_kind(auto)[0]
            if kind in (None, "wrapper"):
                kind = kind_from_name(child)
            if kind is not None:
                return kind, source
        return "unknown", source

    # Leaves.

    def _leaf(
        self,
        collection: str,
        path: tuple[str, ...],
        key: str,
        array: Any,
        module: _Module,
        direct: Mapping[str, Any],
    ) -> Leaf:
        """The record of the array ``key`` of the module ``module`` at ``path``, which
        owns ``direct`` in ``params``."""
        owner = module.absorbed_by or module
        layer = owner.layer
        # WeightNorm names its variables by path (`Dense_0/kernel/scale`).
        name = key.rsplit("/", 1)[-1]
        role = None
        if owner.registration is not None:
            role = owner.registration.role_of(name)
        if role is None:
            if module.wrapper and name == "scale" and "/" in key:
                # WeightNorm's gain (`Dense_0/kernel/scale`), not a norm's scale:
                # Equinox's WeightNorm calls it `g`, and both are gains.
                role = "gain"
            else:
                role = role_from_name(layer.kind, name, owner.key)
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
        elif module.batch is not None:
            # A bias whose leading axes repeat the kernel's: layers stacked by a
            # user-named nn.scan or nn.vmap, which must not widen the kernel's window.
            batch_axes = min(module.batch, len(shape))
        elif layer.kind == "conv" and collection == "params" and layer.type_name != "ConvLocal":
            # A conv's bias is (out,) in one layer (ConvLocal's has one per position):
            # more axes show stacked layers (a user-named nn.scan), which must not widen
            # the kernel's window.
            bias = direct.get("bias")
            if bias is not None and hasattr(bias, "shape"):
                batch_axes = max(0, len(bias.shape) - 1)
        text = path_text(path + (key,) if collection == "params" else (collection, *path, key))
        matrix_axes = None
        if owner.registration is not None and collection == "params":
            axes = owner.registration.matrix_axes_of(name)
            if axes is not None:
                batch_axes = self._registered_batch(text, shape, axes, batch_axes, known_rank)
                matrix_axes = axes
        elif collection == "params" and known_rank:
            matrix_axes = self._matrix_axes(
                owner, module, path, name, len(shape) - batch_axes, direct
            )
        # A linear layer's kernel is one matrix and its bias one vector, however many
        # axes a DenseGeneral's (or an attention projection's) features take.
        layout_axes = 0
        if layer.kind == "linear" and collection == "params":
            if name == "kernel" and matrix_axes is not None:
                layout_axes = len(matrix_axes[0]) + len(matrix_axes[1]) - 2
            elif name == "kernel":
                layout_axes = max(0, len(shape) - batch_axes - 2)
            elif name == "bias":
                layout_axes = max(0, len(shape) - batch_axes - 1)
        return Leaf(
            layout_axes=layout_axes,
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

    def _registered_batch(
        self,
        text: str,
        shape: tuple[int, ...],
        axes: tuple[tuple[int, ...], tuple[int, ...]],
        batch_axes: int,
        known_rank: bool,
    ) -> int:
        """The stacked axes of an array whose layout was registered, checked against it.

        The registered axes describe one layer's array: leading axes beyond them are
        stacked layers (``nn.scan``/``nn.vmap``), where the trace has not said so.

        Raises:
          ValueError: the array has fewer axes than the registered layout names.
        """
        needed = max((*axes[0], *axes[1])) + 1
        if self.trace is None or not known_rank:
            batch_axes = max(batch_axes, len(shape) - needed)
        if len(shape) - batch_axes < needed:
            where = f" ({batch_axes} of them stacked)" if batch_axes else ""
            raise ValueError(
                f"{self.fn}: {text} has shape {shape}{where}, but its layer was "
                f"registered with matrix_axes {axes}, which name axis {needed - 1} of "
                f"one layer's array. Fix: register the (reduction axes, output axes) of "
                f"one layer's array of rank {len(shape) - batch_axes}, e.g. "
                f"dm.register_layer(cls, kind, matrix_axes={{{text.rsplit('/', 1)[-1]!r}: "
                f"((0,), (1,))}}) for an (in, out) matrix."
            )
        return batch_axes

    def _general_sizes(
        self, direct: Mapping[str, Any], rank: int
    ) -> tuple[int, int, int] | None:
        """A DenseGeneral's axis counts read off its bias: the kernel's last axes."""
        kernel, bias = direct.get("kernel"), direct.get("bias")
        if kernel is None or bias is None:
            return None
        features = len(bias.shape)
        stacked = len(kernel.shape) - rank
        if not 0 < features < rank or bias.shape[stacked:] != kernel.shape[-features:]:
            return None
        return 0, rank - features, features

    def _matrix_axes(
        self,
        owner: _Module,
        module: _Module,
        path: tuple[str, ...],
        name: str,
        rank: int,
        direct: Mapping[str, Any],
    ) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
        """(reduction, output) axes of a weight matrix in Linen's (in, out) layouts.

        Only where a layout is known, never guessed: a class of :data:`KIND_TABLE` (by
        the trace or by its auto name), an attention layer's projections and a Linen
        cell's gates. A module known by its names or arrays only (a user-named module,
        a third-party class such as GPT-2's ``(out, in)`` ``FlaxConv1D``) has none.
        """
        if name not in ("kernel", "embedding"):
            return None
        layer = module.layer
        base = _layout_base(layer)
        if base is None and owner.cell and owner.trusted and name == "kernel":
            # Linen's cells build their gates as Dense (ConvLSTMCell: Conv) layers.
            base = {"linear": "Dense", "conv": "Conv"}.get(layer.kind)
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
                    sizes = self._general_sizes(direct, rank)
            if sizes is not None and sum(sizes) == rank:
                batch, reduction, _ = sizes
                return (
                    tuple(range(batch, batch + reduction)),
                    tuple(range(batch + reduction, rank)),
                )
        return None


_FLOATING_PREFIXES = ("float", "bfloat", "complex")


def _is_floating(array: Any) -> bool:
    """Whether the array can decay at all (as :attr:`Leaf.floating`), once per dtype."""
    dtype = array.dtype
    floating = _FLOATING.get(dtype)
    if floating is None:
        floating = _FLOATING[dtype] = _dtype_name(array).startswith(_FLOATING_PREFIXES)
    return floating


def _warn_unseen(fn: str, name: str, unseen: list[str]) -> None:
    from ..core._warnings import PolicyWarning

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


def _check_not_equinox(fn: str, tree: Mapping, flat: list) -> None:
    """Equinox modules in a mapping are flattened by their fields: read as Linen
    names they would decide wrongly, so they are turned away.

    Raises:
      TypeError: a value of ``tree`` is an Equinox module.
    """
    eqx = sys.modules.get("equinox")
    if eqx is None:
        return
    for keys, _ in flat:
        if keys and type(keys[-1]) is _DictKey and type(keys[0]) is _DictKey:
            # Fields of a module (GetAttrKey) and list items end or start a path.
            continue
        for i, entry in enumerate(keys):
            if type(entry) is _DictKey:
                continue
            node: Any = tree
            for parent in keys[:i]:
                node = node[parent.key]
            if isinstance(node, eqx.Module):
                where = _path_text(tuple(str(k.key) for k in keys[:i]))
                raise TypeError(
                    f"{fn}: {where!r} is an Equinox {type(node).__name__}, not Linen "
                    f"params. Use policy.{fn.replace('flax', 'equinox')}(tree) for "
                    f"Equinox models, and for mappings of them."
                )
            break


class _Walk(_Reader):
    """Any Linen mapping, with or without a trace: one flatten, modules by path.

    Variables mappings (a module's arrays spread over collections) and traced models
    take this walk; names-only params take :class:`_NamedWalk`, which gives the same
    leaves, keys and masks faster. Trees this walk rejects are rejected here, with
    messages that name the offending path.
    """

    def __init__(
        self,
        fn: str,
        tree: Any,
        module: Any = None,
        args: Any = (),
        kwargs: Any = None,
    ):
        self.fn = fn
        flat, self.treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_box)
        if len(flat) == 1 and flat[0][1] is tree:
            raise TypeError(
                f"{fn}: expected a Linen params or variables mapping (dict or FrozenDict), "
                f"got {type(tree).__name__}, which jax treats as a single leaf."
            )
        _check_not_equinox(fn, tree, flat)
        keyed = [(_keys(keys), value) for keys, value in flat]
        reading = _looks_like_variables(tree)
        if reading is None and module is None:
            raise _undecidable(fn, tree)
        # Undecided: the trace decides (_reading).
        self.variables = reading is not False
        self.trace: _Trace | None = None
        traced_shapes: dict[str, tuple[int, ...]] = {}
        if module is not None:
            wanted = _wanted(keyed, self.variables)
            self.trace = _trace(fn, module, args, kwargs, wanted)
            traced_shapes = self._traced_param_shapes()
            self.variables = self._reading(keyed, traced_shapes)
        entries = self._entries(keyed)
        if self.trace is not None:
            self._check_trace(entries, traced_shapes)
            if self._unseen():
                self.trace = _trace(fn, module, args, kwargs, wanted, eager=True)
                unseen = self._unseen()
                if unseen:
                    _warn_unseen(fn, type(module).__name__, unseen)
        self.children: dict[tuple[str, ...], set[str]] = {}
        for path in list(self.direct) + list(self.direct_other):
            for i in range(len(path) - 1, -1, -1):
                seen = path[:i] in self.children
                self.children.setdefault(path[:i], set()).add(path[i])
                if seen:
                    break
        self.modules: dict[tuple[str, ...], _Module] = {}
        # One leaf per flat position: a result is the treedef unflattened over them.
        self.leaves = LeafTable(self._keys(entries), lambda i: self._entry_leaf(*entries[i]))

    def _keys(self, entries: list) -> list[int]:
        """Per leaf, a key equal only for leaves a policy cannot tell apart by owner,
        ancestors, role and name: alike blocks of a deep model share them. Small ints,
        so that the core hashes them fast."""
        owner_ids: dict[tuple[str, ...], int] = {}
        interned: dict[tuple, int] = {}
        key_ids: dict[tuple, int] = {}
        keys = []
        for collection, path, key, array in entries:
            owner_id = owner_ids.get(path)
            if owner_id is None:
                module = self._module(path)
                owner = module.absorbed_by or module
                owner_id = owner_ids[path] = interned.setdefault(
                    _owner_id(owner), len(interned)
                )
            keys.append(
                key_ids.setdefault(
                    (owner_id, collection, key, _is_floating(array)), len(key_ids)
                )
            )
        return keys

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

    def _entry_leaf(self, collection: str, path: tuple[str, ...], key: str, array: Any) -> Leaf:
        return self._leaf(
            collection, path, key, array, self._module(path), self.direct.get(path, {})
        )

    # The trace against the tree.

    def _unseen(self) -> list[str]:
        """Module paths holding params where the trace saw no module at all."""
        seen = self.trace.classes  # type: ignore[union-attr]
        unseen = []
        for path in self.direct:
            if path and not any(path[:i] in seen for i in range(1, len(path) + 1)):
                unseen.append(_path_text(path))
        return sorted(unseen)

    def _traced_param_shapes(self) -> dict[str, tuple[int, ...]]:
        traced = self.trace.variables  # type: ignore[union-attr]
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
        if found is not None:
            return found
        # The modules from the nearest one already inferred down to ``path``, outermost
        # first: a loop, so that depth is not limited by the Python stack.
        todo = [path]
        while todo[-1] and todo[-1][:-1] not in self.modules:
            todo.append(todo[-1][:-1])
        for here in reversed(todo):
            parent = self.modules[here[:-1]] if here else None
            params = self.direct.get(here)
            other = self.direct_other.get(here)
            direct = params or other or {}
            merged = {**params, **other} if params and other else direct
            found = self._infer(here, parent, direct, merged, self.children.get(here, ()))
            self.modules[here] = found
        return found  # type: ignore[return-value]


# The names-only walk of params.


class _Fallback(Exception):
    """The tree holds something only :class:`_Walk` reads (or rejects) exactly."""


# What a leaf's type is, decided once per type: isinstance against jax.Array and
# AxisMetadata goes through their metaclasses. The sets let a whole module's values be
# checked at once (set.issuperset over their types).
_ARRAY, _BOX, _NEITHER = 1, 2, 0
_leaf_kinds: dict[type, int] = {}
_plain_types: set[type] = set()  # the types of _ARRAY
_box_kinds: set[type] = set()  # the types of _BOX
_leafy_types: set[type] = set()  # either


def _leaf_kind(value: Any) -> int:
    """Classifies the type of ``value`` (an array, a box, or neither) for good."""
    found = _leaf_kinds[type(value)] = (
        _BOX if _is_box(value) else _ARRAY if _is_array(value) else _NEITHER
    )
    if found is not _NEITHER:
        (_plain_types if found is _ARRAY else _box_kinds).add(type(value))
        _leafy_types.add(type(value))
    return found


# Module keys by what names-only inference reads of them (see _key_traits). The ids
# are never reused, so that a walk's cache stays valid while the key map is cleared.
_traits_of: dict[str, int] = {}
_trait_ids: dict[tuple, int] = {}
_TRAITS_KEPT = 1 << 16


def _key_traits(key: str) -> int:
    """An id equal for module keys that names-only inference cannot tell apart.

    :meth:`_Reader._infer` reads a key only through its auto name, the kind its name
    makes evident, whether it says "norm", whether it names an attention projection,
    and whether it is empty: ``Block_0`` and ``Block_7`` share an id, and so do
    ``Dense_0`` and ``Dense_1``.

    Raises:
      _Fallback: the key is not a string.
    """
    found = _traits_of.get(key)
    if found is None:
        if type(key) is not str:
            raise _Fallback
        auto, stacked = _auto_class(key)
        traits = (
            auto,
            stacked,
            name_kind(key),
            role_from_name("embedding", "embedding", key),
            key in _ATTENTION_CHILDREN,
            bool(key),
        )
        found = _trait_ids.setdefault(traits, len(_trait_ids))
        if len(_traits_of) >= _TRAITS_KEPT:
            _traits_of.clear()
        _traits_of[key] = found
    return found


class _Watched(dict):
    """The arrays of a module, noting whether inference looked at one (its shape)."""

    looked = False

    def get(self, key: Any, default: Any = None) -> Any:
        self.looked = True
        return super().get(key, default)


_LEAF, _DICT, _FROZEN = 0, 1, 2


class _Resolved:
    """What every module of one signature shares: its module, its arrays' keys, and
    the layout of its mapping."""

    __slots__ = ("emitted", "keys", "layout", "module", "names", "token")

    def __init__(
        self,
        module: _Module,
        token: int,
        keys: tuple[int, ...],
        names: tuple[str, ...],
        layout: tuple[tuple[str, int], ...] | None,
    ):
        self.module = module
        self.token = token
        self.keys = keys  # one per array the module owns, in key order
        self.names = names  # the names of those arrays, in key order
        # Every key in order with _LEAF, _DICT or _FROZEN; None where all are arrays.
        self.layout = layout
        self.emitted = False  # every one of its keys has a located first leaf


_dtype_of = operator.attrgetter("dtype")


_NAMED_DEPTH = 100  # levels of modules the recursive names-only walk takes


class _NamedWalk(_Reader):
    """Names-only params of plain dicts and FrozenDicts: one recursive pass, no flatten.

    Modules with the same parent, key traits, array names and dtypes and submodule
    keys (and, where inference reads them, the same kernel, weight and bias shapes)
    share one signature and are inferred once: the blocks of a deep model cost a
    dictionary lookup each. The walk keeps an int per leaf and, per module, a reference
    to its signature's :class:`_Resolved`, which :meth:`rebuild` reads back in order
    instead of walking the tree again. The first leaf of each key is located for the
    core; any other leaf is found by walking once more, on demand. Nothing per leaf or
    per module outlives the walk but those references, so that a large tree does not
    wake the cyclic garbage collector.

    Raises:
      _Fallback: a value that is neither a mapping of these two types nor an array (or
        a box around one), an empty mapping below the root, or a key that is not a
        string: :class:`_Walk` reads or rejects the tree exactly.
    """

    def __init__(self, fn: str, tree: Mapping):
        self.fn = fn
        self.trace = None
        self.tree = tree
        self.keys: list[int] = []
        self.plan: list[_Resolved] = []
        # Signature -> _Resolved, or -> {shapes: _Resolved} where inference read shapes.
        # Modules read in key order (_visit) and layers read in their own order
        # (_child) have signatures of different forms: one table each.
        self.signatures: dict[tuple, Any] = {}
        self.leaf_signatures: dict[tuple, Any] = {}
        self.owner_ids: dict[tuple, int] = {}
        self.key_ids: dict[tuple, int] = {}
        # A _Resolved's token stands for its module in its children's signatures.
        self.tokens = 0
        # Leaf index -> (path, name, array, module, direct): every key's first leaf.
        self.located: dict[int, tuple] = {}
        self.seen: set[int] = set()
        self.complete = False
        self._visit(tree._dict if type(tree) is FrozenDict else tree, (), None, False)
        self.leaves = LeafTable(self.keys, self._build)

    def _visit(
        self,
        node: Mapping[str, Any],
        path: tuple[str, ...],
        parent: _Resolved | None,
        everything: bool,
    ) -> None:
        """Appends the keys of the arrays below ``node``, the module at ``path``."""
        if len(path) > _NAMED_DEPTH:
            # This walk recurses once per level; _Walk is not limited by the stack.
            raise _Fallback
        try:
            names = sorted(node)
        except Exception:  # noqa: BLE001 - whatever jax's own sort would raise instead
            # Keys jax cannot sort either: its flatten says why.
            raise _Fallback from None
        direct: dict[str, Any] = {}
        kinds: list[int] = []
        dtypes: list[Any] = []
        children: list[str] = []
        for name in names:
            value = node[name]
            kind = type(value)
            if kind is dict or kind is FrozenDict:
                if not value:
                    # Not a module to jax (it holds no array): only _Walk's children,
                    # read off the paths of arrays, leave it out exactly.
                    raise _Fallback
                # Every mapping below holds something, and the walk falls back on
                # anything but arrays: this submodule holds arrays.
                kinds.append(_DICT if kind is dict else _FROZEN)
                children.append(name)
                continue
            what = _leaf_kinds.get(kind)
            if what is None:
                what = _leaf_kind(value)
            if what is _BOX:
                value = _unbox(value)
                what = _leaf_kinds.get(type(value))
                if what is None:
                    what = _leaf_kind(value)
                if what is not _ARRAY:
                    raise _Fallback
            elif what is not _ARRAY:
                raise _Fallback
            direct[name] = value
            kinds.append(_LEAF)
            dtypes.append(value.dtype)
        signature = (
            parent.token if parent is not None else -1,
            _key_traits(path[-1]) if path else -1,
            tuple(names),
            tuple(kinds),
            tuple(dtypes),
        )
        resolved = self.signatures.get(signature)
        if type(resolved) is dict:
            resolved = resolved.get(_shapes(direct))
        if resolved is None:
            layout = tuple(zip(names, kinds)) if children else None
            resolved = self._resolve(
                self.signatures, signature, path, parent, direct, children, layout
            )
        self.plan.append(resolved)
        if not children:
            if resolved.emitted and not everything:
                self.keys.extend(resolved.keys)
            else:
                self._locate(resolved, path, direct, direct, everything)
            return
        own = iter(resolved.keys)
        # A module with children always has a layout.
        own_layout = cast("tuple[tuple[str, int], ...]", resolved.layout)
        for name, child_kind in own_layout:
            if child_kind is not _LEAF:
                value = node[name]
                value = value if child_kind is _DICT else value._dict
                self._child(value, path, name, resolved, everything)
            elif resolved.emitted and not everything:
                self.keys.append(next(own))
            else:
                next(own)
                self._locate(resolved, path, {name: direct[name]}, direct, everything)
        resolved.emitted = True

    def _child(
        self, node: dict, path: tuple[str, ...], name: str, parent: _Resolved, everything: bool
    ) -> None:
        """Visits the submodule ``name`` of the module at ``path``.

        A module that holds arrays (or boxes around arrays) of known types only, as
        every layer of most models does, takes the short way: its signature is read
        off its values in their own order, without sorting.
        """
        values = node.values()
        arrays: Any = values
        if not _plain_types.issuperset(map(type, values)):
            if not _leafy_types.issuperset(map(type, values)):
                self._visit(node, path + (name,), parent, everything)
                return
            # Boxes (nn.Partitioned): the arrays inside say what the module is.
            arrays = [_unbox(v) if type(v) in _box_kinds else v for v in values]
            if not _plain_types.issuperset(map(type, arrays)):
                self._visit(node, path + (name,), parent, everything)
                return
        traits = _traits_of.get(name)
        if traits is None:
            traits = _key_traits(name)
        signature = (parent.token, traits, tuple(node), tuple(map(_dtype_of, arrays)))
        resolved = self.leaf_signatures.get(signature)
        if type(resolved) is dict:
            own = node if arrays is values else dict(zip(node, arrays))
            resolved = resolved.get(_shapes(own))
        if resolved is None:
            try:
                names = sorted(node)
            except Exception:  # noqa: BLE001 - whatever jax's own sort would raise instead
                raise _Fallback from None
            own = dict(zip(node, arrays))
            resolved = self._resolve(
                self.leaf_signatures,
                signature,
                path + (name,),
                parent,
                {key: own[key] for key in names},
                (),
                None,
                own,
            )
        self.plan.append(resolved)
        if resolved.emitted and not everything:
            self.keys.extend(resolved.keys)
        else:
            own = dict(zip(node, arrays))
            direct = {key: own[key] for key in resolved.names}
            self._locate(resolved, path + (name,), direct, direct, everything)

    def _locate(
        self,
        resolved: _Resolved,
        path: tuple[str, ...],
        arrays: dict[str, Any],
        direct: dict[str, Any],
        everything: bool,
    ) -> None:
        """Appends the keys of ``arrays`` (some of the module's ``direct``), noting
        where each key first occurs (or, with ``everything``, where every leaf is)."""
        keys = self.keys
        own = dict(zip(resolved.names, resolved.keys))
        module = resolved.module
        for name, array in arrays.items():
            key = own[name]
            if everything or key not in self.seen:
                self.seen.add(key)
                self.located[len(keys)] = (path, name, array, module, direct)
            keys.append(key)
        if arrays is direct:
            resolved.emitted = True

    def _resolve(
        self,
        table: dict[tuple, Any],
        signature: tuple,
        path: tuple[str, ...],
        parent: _Resolved | None,
        direct: dict[str, Any],
        children: list[str] | tuple[()],
        layout: tuple[tuple[str, int], ...] | None,
        keyed_by: dict[str, Any] | None = None,
    ) -> _Resolved:
        """Infers the module of a new signature, and the keys of the arrays it owns.

        Where inference read shapes, the module is filed under the shapes of
        ``keyed_by`` (``direct`` in the order its later look-ups see), default
        ``direct``."""
        for name in direct:
            if type(name) is not str:
                raise _Fallback
        watched = _Watched(direct)
        module = self._infer(
            path, parent.module if parent is not None else None, watched, watched, children
        )
        owner = module.absorbed_by or module
        owner_id = self.owner_ids.setdefault(
            _owner_id(owner), len(self.owner_ids)
        )
        keys = tuple(
            self.key_ids.setdefault((owner_id, name, _is_floating(array)), len(self.key_ids))
            for name, array in direct.items()
        )
        resolved = _Resolved(module, self.tokens, keys, tuple(direct), layout)
        self.tokens += 1
        if watched.looked:
            by_shapes = table.get(signature)
            if type(by_shapes) is not dict:
                by_shapes = table[signature] = {}
            by_shapes[_shapes(direct if keyed_by is None else keyed_by)] = resolved
        else:
            table[signature] = resolved
        return resolved

    def _build(self, index: int) -> Leaf:
        found = self.located.get(index)
        if found is None and not self.complete:
            # A leaf that is no key's first: locate every leaf, once.
            keys, plan = self.keys, self.plan
            self.keys, self.plan = [], []
            tree = self.tree
            self._visit(tree._dict if type(tree) is FrozenDict else tree, (), None, True)
            assert self.keys == keys
            self.keys, self.plan = keys, plan
            self.complete = True
            found = self.located[index]
        # Every leaf is located once the walk is complete.
        path, name, array, module, direct = cast(tuple, found)
        return self._leaf("params", path, name, array, module, direct)

    def rebuild(self, values: list[Any]) -> Any:
        """One value per leaf, in the tree's own containers (jax's key order)."""
        if len(values) != len(self.keys):
            raise ValueError(
                f"{self.fn}: expected {len(self.keys)} values, one per leaf, got "
                f"{len(values)}."
            )
        plan = iter(self.plan).__next__
        built = _rebuilt(plan(), plan, iter(values))
        if type(self.tree) is FrozenDict:
            return FrozenDict(built, __unsafe_skip_copy__=True)
        return built


def _rebuilt(resolved: _Resolved, plan: Callable[[], _Resolved], values: Iterator) -> dict:
    """The mapping of one module with the next values at its leaves, as jax's unflatten
    builds it: keys in order, a new dict per level."""
    if resolved.layout is None:
        # zip takes a name before a value: it stops without consuming one too many.
        return dict(zip(resolved.names, values))
    out = {}
    for name, kind in resolved.layout:
        if kind is _LEAF:
            out[name] = next(values)
            continue
        child = plan()
        inner = (
            dict(zip(child.names, values))
            if child.layout is None
            else _rebuilt(child, plan, values)
        )
        out[name] = inner if kind is _DICT else FrozenDict(inner, __unsafe_skip_copy__=True)
    return out


def _shapes(direct: Mapping[str, Any]) -> tuple:
    """The shapes of a module's arrays, in the mapping's order, where inference read any."""
    return tuple([value.shape for value in direct.values()])


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
) -> tuple[LeafTable, Callable[[list[Any]], Any]]:
    """The leaves of a Linen mapping, and the function that puts one value per leaf back.

    The rebuilt tree has exactly the containers of ``tree`` (``dict`` or
    ``FrozenDict`` at every level) with one value at each array and at each
    ``nn.Partitioned`` box. Arguments as :func:`leaves`; ``method`` names the entry
    point in error messages.

    Params read by names alone take :class:`_NamedWalk`, which never flattens the tree
    and infers each distinct module once; variables, traced models and trees it does
    not read exactly take :class:`_Walk`. Both give the same leaves, keys and masks.
    """
    if not isinstance(tree, Mapping):
        raise TypeError(
            f"{method}: expected a Linen params or variables mapping (dict or FrozenDict), "
            f"got {type(tree).__name__}."
        )
    given_args = not (isinstance(args, tuple) and not args)
    if module is None and (given_args or kwargs is not None):
        raise TypeError(
            f"{method}(params, args=..., kwargs=...): these are example inputs for "
            f"tracing module=, but no module= was given. Pass the model too: "
            f"policy.{method}(params, module=model, args=(x,))."
        )
    if module is None and type(tree) in (dict, FrozenDict) and _looks_like_variables(tree) is False:
        try:
            named = _NamedWalk(method, tree)
        except _Fallback:
            pass
        else:
            return named.leaves, named.rebuild
    state = _Walk(method, tree, module, args, kwargs)
    return state.leaves, state.treedef.unflatten  # type: ignore[attr-defined, unused-ignore]  # mypy cannot resolve jaxlib's PyTreeDef


def leaves(
    tree: Any, *, module: Any = None, args: Any = (), kwargs: Any = None
) -> list[Leaf]:
    """The :class:`Leaf` records of every array in a Linen mapping, in flattening order.

    Args:
      tree: a params mapping or a whole variables mapping (``{"params": ...,
        "batch_stats": ...}``), as ``dict`` or ``FrozenDict``. It is read as variables
        when it has a ``params`` key, every top-level value is a mapping and every
        other top-level key looks like a collection (see the module docstring); with
        ``module=``, the traced model decides (a model may name a submodule
        ``params``). Paths in
        ``params`` drop the ``params/`` prefix; other collections keep theirs
        (``batch_stats/BatchNorm_0/mean``) and are never decayed.
      module: the ``flax.linen.Module`` that made the params, to find the exact class
        of every layer by an abstract trace of ``module.init``.
      args: example inputs for ``module.__call__`` (only shapes and dtypes matter).
      kwargs: example keyword inputs for ``module.__call__``.

    Returns:
      One :class:`Leaf` per array, in ``jax.tree_util`` flattening order.

    Raises:
      TypeError: ``tree`` is not a mapping, holds Equinox modules, a leaf is not an
        array, or ``module=``/``args=``/``kwargs=`` are of the wrong type or missing.
      ValueError: the traced model's params differ from ``tree``'s, or without
        ``module=`` the tree fits both the variables and the params reading.

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
    return list(walk(tree, module=module, args=args, kwargs=kwargs, method="leaves")[0])
