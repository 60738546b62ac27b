"""The Flax NNX adapter: a module graph or a State -> leaves -> an ``nnx.State`` of bools.

A module is walked once, in the order ``nnx.state`` flattens it, so the walk sees the
same variables at the same paths as ``nnx.state(model, wrt)`` and knows the class of
every module on the way. A State carries no classes: kinds come from its keys and
the arrays each key holds, read by the shared inference.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx

from ..core import _registry
from ..core._infer import kind_from_name, resolve_kind, role_from_name
from ..core._leaf import Layer, Leaf
from ._common import ClassKinds, key_name, path_text, registered_batch_axes

_graphlib = nnx.graphlib
_get_node_impl = _graphlib.get_node_impl
_GraphNodeImpl = _graphlib.GraphNodeImpl
_DataElem = _graphlib.DataElem
_StaticElem = _graphlib.StaticElem
_is_array_ref = nnx.variablelib.is_array_ref
_Variable = nnx.Variable
_Param = nnx.Param

# Base classes, first match along the MRO wins: subclasses count as the base kind.
KIND_TABLE: dict[type, str] = {
    nnx.Linear: "linear",  # and LoRALinear, a subclass
    nnx.LinearGeneral: "linear",
    nnx.Einsum: "linear",
    nnx.Conv: "conv",
    nnx.ConvTranspose: "conv",
    nnx.Embed: "embedding",
    nnx.LayerNorm: "layer_norm",
    nnx.RMSNorm: "rms_norm",
    nnx.GroupNorm: "group_norm",
    nnx.BatchNorm: "batch_norm",
    nnx.InstanceNorm: "instance_norm",
    nnx.MultiHeadAttention: "attention",
    # GRUCell, LSTMCell, OptimizedLSTMCell, SimpleCell and user cells share this base.
    nnx.RNNCellBase: "recurrent",
    nnx.PReLU: "prelu",
    nnx.LoRA: "lora",
}

# Wrappers reparametrise one inner layer (``layer_instance``): the inner layer owns its
# arrays, and the wrapper counts as a layer of the inner layer's kind.
WRAPPERS: tuple[type, ...] = (nnx.WeightNorm, nnx.SpectralNorm)

# Containers whose class is known not to be a layer: kind "unknown", not read off the name.
_CONTAINERS: tuple[type, ...] = (
    nnx.Sequential,
    nnx.List,
    nnx.Dict,
    nnx.RNN,
    nnx.Bidirectional,
    nnx.Dropout,
)

# Sequence and mapping containers enclose the modules they hold but own no arrays: a
# variable held directly in an ``nnx.List`` belongs to the module holding the list,
# as an array in a list field of an Equinox module does.
_NON_OWNING: tuple[type, ...] = (nnx.List, nnx.Dict)

# Random-number state, not a layer: looked through.
_TRANSPARENT: tuple[type, ...] = (nnx.Rngs, nnx.RngStream)


# Class kinds


_class_kind = ClassKinds(KIND_TABLE, WRAPPERS, _CONTAINERS)


def _module_layer(module: Any) -> Layer:
    cls = type(module)
    kind, source, _ = _class_kind(cls)
    if kind == "wrapper":
        inner = _module_layer(module.layer_instance)
        return Layer(inner.kind, cls.__name__, cls, inner.source)
    if source == "name":
        # The class name said a kind: what the instance owns confirms or overrides it.
        arrays, children = _content(module)
        return _class_kind.content_layer(cls, arrays, children)
    return _class_kind.layer(cls)  # type: ignore[return-value]


def _content(module: Any) -> tuple[dict[str, int], list[str]]:
    """The rank of every array a module owns directly (its variables and raw array
    attributes), and the attributes that hold modules."""
    arrays: dict[str, int] = {}
    children: list[str] = []
    for name, value in vars(module).items():
        if isinstance(value, _Variable):
            value = value.get_raw_value()
        if isinstance(value, nnx.Pytree):
            if not isinstance(value, _TRANSPARENT):
                children.append(name)
            continue
        shape = getattr(value, "shape", None)
        if shape is not None and getattr(value, "dtype", None) is not None:
            arrays[name] = len(shape)
    return arrays, children


# Layouts: the rank one layer gives each of its arrays (more leading axes are stacked
# axes, from nnx.vmap or nnx.scan) and the (reduction, output) axes of its weight
# matrices in Flax's (in, out) layouts. Only for the arrays of the classes below, whose
# constructors fix those shapes; the attributes they keep (in_features, kernel_shape)
# describe one layer even when the arrays are stacked.

_Axes = tuple[tuple[int, ...], tuple[int, ...]]
_Layout = Callable[[Any, str], tuple[Any, Any]]
"""(rank of one layer's array, its matrix axes or None) from the layer and a name."""
_IN_OUT: _Axes = ((0,), (1,))
_NO_LAYOUT: tuple[None, None] = (None, None)


def _layout_linear(node: Any, name: str) -> tuple[int | None, _Axes | None]:
    if name == "kernel":
        return 2, _IN_OUT
    return (1, None) if name == "bias" else _NO_LAYOUT


def _layout_embed(node: Any, name: str) -> tuple[int | None, _Axes | None]:
    # (num, features): a lookup is a one-hot row times the table.
    return (2, _IN_OUT) if name == "embedding" else _NO_LAYOUT


def _layout_lora(node: Any, name: str) -> tuple[int | None, _Axes | None]:
    # lora_a is (in, rank), lora_b is (rank, out): both (in, out) matrices.
    return (2, _IN_OUT) if name in ("lora_a", "lora_b") else _NO_LAYOUT


def _layout_linear_general(node: Any, name: str) -> tuple[int | None, _Axes | None]:
    # (*batch, *in, *out): the batch_axis axes are separate matrices, part of the layer.
    batch, n_in, n_out = len(node.batch_axis), len(node.in_features), len(node.out_features)
    if name == "kernel":
        reduction = tuple(range(batch, batch + n_in))
        output = tuple(range(batch + n_in, batch + n_in + n_out))
        return batch + n_in + n_out, (reduction, output)
    return (batch + n_out, None) if name == "bias" else _NO_LAYOUT


def _general_layout_axes(node: Any, name: str) -> int:
    """Axes a LinearGeneral's layout adds to one matrix: ``(in, heads, head_dim)`` is a
    matrix, ``(heads, head_dim)`` a bias vector, as an Equinox Linear's are."""
    n_in, n_out = len(node.in_features), len(node.out_features)
    if name == "kernel":
        return n_in - 1 + n_out - 1
    return n_out - 1 if name == "bias" else 0


def _layout_einsum(node: Any, name: str) -> tuple[int | None, _Axes | None]:
    # The einsum string decides which axes contract: no fixed matrix layout.
    if name == "kernel":
        return len(node.kernel_shape), None
    if name == "bias" and node.bias_shape is not None:
        return len(node.bias_shape), None
    return _NO_LAYOUT


def _layout_conv(node: Any, name: str) -> tuple[int | None, _Axes | None]:
    if name == "bias":
        return 1, None
    if name != "kernel":
        return _NO_LAYOUT
    rank = len(node.kernel_shape)
    window = tuple(range(rank - 2))
    if getattr(node, "transpose_kernel", False):
        # ConvTranspose(transpose_kernel=True) keeps (*window, out, in).
        return rank, (window + (rank - 1,), (rank - 2,))
    # (*window, in, out): a window position is part of the input of the matmul.
    return rank, (window + (rank - 2,), (rank - 1,))


def _layout_norm(node: Any, name: str) -> tuple[int | None, _Axes | None]:
    return (1, None) if name in ("scale", "bias", "mean", "var") else _NO_LAYOUT


def _layout_prelu(node: Any, name: str) -> tuple[int | None, _Axes | None]:
    return (0, None) if name == "negative_slope" else _NO_LAYOUT


# Most specific first: LoRALinear is a Linear, and the LoRA inside it has its own entry.
_LAYOUTS: tuple[tuple[type | tuple[type, ...], _Layout], ...] = (
    (nnx.LinearGeneral, _layout_linear_general),
    (nnx.Einsum, _layout_einsum),
    ((nnx.Conv, nnx.ConvTranspose), _layout_conv),
    (nnx.Linear, _layout_linear),
    (nnx.Embed, _layout_embed),
    (nnx.LoRA, _layout_lora),
    (
        (nnx.LayerNorm, nnx.RMSNorm, nnx.GroupNorm, nnx.BatchNorm, nnx.InstanceNorm),
        _layout_norm,
    ),
    (nnx.PReLU, _layout_prelu),
)

_layout_cache: dict[type, _Layout | None] = {}


def _layout(cls: type, source: str) -> _Layout | None:
    """The layout function of a layer class found in the kind table, else ``None``."""
    if source != "class":
        return None
    if cls not in _layout_cache:
        _layout_cache[cls] = next(
            (layout for bases, layout in _LAYOUTS if issubclass(cls, bases)), None
        )
    return _layout_cache[cls]


# Values


_dtype_names: dict[Any, str] = {}


def _dtype_name(dtype: Any) -> str:
    name = _dtype_names.get(dtype)
    if name is None:
        # Random keys (key<fry>) have no numpy name; their text is still a dtype name.
        name = _dtype_names[dtype] = getattr(dtype, "name", None) or str(dtype)
    return name


# A variable holding None has no array, but nnx.state lists it and optax sees its box
# at init: it gets a leaf of no elements that is never decayed, so that every value
# rebuilt from the decisions (mask, label, rate) has a place there too.
_EMPTY = ((0,), "none")


def _shape_dtype(value: Any) -> tuple[tuple[int, ...], str] | None:
    """Shape and dtype name of an array-like value; ``_EMPTY`` for ``None``; else ``None``."""
    if value is None:
        return _EMPTY
    dtype = getattr(value, "dtype", None)
    shape = getattr(value, "shape", None)
    if dtype is not None and shape is not None:
        return tuple(shape), _dtype_name(dtype)
    if isinstance(value, (bool, int, float, complex)):
        return (), np.asarray(value).dtype.name
    return None


def _bad_value(fn: str, path: tuple, holder: str, value: Any) -> TypeError:
    return TypeError(
        f"{fn}: {_path_text(path)!r} is {holder} holding {value!r} "
        f"({type(value).__name__}); expected an array, a jax.ShapeDtypeStruct, a Python "
        f"number or None. Keep other values out of the selected variables: a plain "
        f"attribute, or a Variable type that wrt= does not select."
    )


def _is_to_nnx(node: Any) -> bool:
    """Whether ``node`` is an ``nnx.bridge.ToNNX`` (its module is loaded if one exists)."""
    bridge = sys.modules.get("flax.nnx.bridge.wrappers")
    return bridge is not None and isinstance(node, bridge.ToNNX)


def _raw(value: Any) -> Any:
    return value.get_raw_value() if isinstance(value, _Variable) else value


def _holder(variable: Any, otherwise: str) -> str:
    return f"an nnx.{type(variable).__name__}" if variable is not None else otherwise


def _path_text(path: tuple) -> str:
    return path_text(path)


def _leaf_name(path: tuple) -> str:
    """The attribute or key an array is stored under, skipping sequence indices."""
    for key in reversed(path):
        if isinstance(key, str):
            return key
    return str(path[-1]) if path else ""


# Filters


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


def _predicate(fn: str, wrt: Any) -> Callable[[tuple, Any], bool]:
    if wrt is None:
        # nnx's own filters read None as "nothing"; here it means the default.
        wrt = _Param
    _check_filter(fn, wrt)
    return nnx.filterlib.to_predicate(wrt)


# The module walk


@dataclasses.dataclass(frozen=True, slots=True)
class _Owner:
    """The module that owns the arrays below a point of the walk."""

    layer: Layer
    ancestors: tuple[Layer, ...]
    """The modules around ``layer``, outermost first."""
    enclosing: tuple[Layer, ...]
    """The ancestors of anything entered below: ``ancestors``, the owner and the
    containers between it and this point."""
    registration: _registry.Registration | None
    absorbing: bool
    """A recurrent cell: the layers inside it are its gates, not owners."""
    holder: Any
    """The module an array is an attribute of: the owner, or a cell's gate layer."""
    layout: _Layout | None


class _Walk:
    """One pass over an NNX module graph, in ``nnx.state``'s flattening order."""

    def __init__(self, root: Any, predicate: Callable[[tuple, Any], bool], fn: str):
        self.predicate = predicate
        self.fn = fn
        self.paths: list[tuple] = []
        """The path of every selected variable: the keys of the output State."""
        self.leaves: list[Leaf] = []
        # id(variable) -> index in leaves, -1 where the filter left it out.
        self._first: dict[int, int] = {}
        self._views: dict[int, list[Leaf]] = {}  # index in leaves -> other owners' views
        self._walked: set[int] = set()  # ids of graph nodes walked at least once
        self._active: set[int] = set()  # ids of graph nodes on the current path: cycles
        self._node(root, _get_node_impl(root), (), None, False)
        for index, views in self._views.items():
            self.leaves[index] = dataclasses.replace(
                self.leaves[index], shared_with=tuple(views)
            )

    def rebuild(self, values: list[Any]) -> Any:
        return nnx.from_flat_state(list(zip(self.paths, values)))

    def _node(
        self, node: Any, impl: Any, path: tuple, owner: _Owner | None, repeat: bool
    ) -> None:
        graph_node = type(impl) is _GraphNodeImpl
        if graph_node:
            node_id = id(node)
            if node_id in self._active:
                return
            if node_id in self._walked:
                # A module reached again (shared): nnx.state lists its variables at the
                # first path only, but this owner's view of them is decided too.
                repeat = True
            self._walked.add(node_id)
            self._active.add(node_id)
        if isinstance(node, nnx.Pytree) and not isinstance(node, _TRANSPARENT):
            if _is_to_nnx(node) and not repeat:
                # A Linen module in NNX: its variables carry Linen's names, not classes.
                around = (owner.enclosing if owner is not None else ()) + (_module_layer(node),)
                bridged = (len(self.leaves), around)
                owner = None
            else:
                bridged = None
                owner = self._owner(node, owner)
        else:
            bridged = None
        items, _ = impl.flatten(node)
        for key, value in items:
            # The classification of nnx's own graph flatten, so that the walk selects
            # what nnx.state(model, wrt) holds, at the same paths.
            data = False
            if type(value) is _StaticElem:
                continue
            if type(value) is _DataElem:
                value = value.value
                data = True
            child = (*path, key)
            if isinstance(value, _Variable):
                self._variable(value, child, owner)
                continue
            child_impl = _get_node_impl(value)
            if child_impl is not None:
                self._node(value, child_impl, child, owner, repeat)
            elif (
                not repeat
                and (data or _is_array_ref(value) or isinstance(value, (jax.Array, np.ndarray)))
                and self.predicate(child, value)
            ):
                # A raw array attribute: in nnx.state, but no Variable type to select it.
                self._add(child, value, owner, None)
        if bridged is not None:
            self._read_by_name(path, *bridged)
        if graph_node:
            self._active.discard(node_id)

    def _read_by_name(self, path: tuple, start: int, around: tuple[Layer, ...]) -> None:
        """Re-reads the leaves from ``start`` on, all below ``path`` (an
        ``nnx.bridge.ToNNX``), by their Linen names as a State's are: the wrapper is no
        layer, and registering it could not help."""
        entries = [
            (self.paths[i][len(path):], self.paths[i], None, None,
             (self.leaves[i].shape, self.leaves[i].dtype))
            for i in range(start, len(self.leaves))
        ]
        for offset, leaf in enumerate(_leaves_by_name(entries, around)):
            index = start + offset
            # Whether it is a parameter is the variable's type, already read.
            is_param = self.leaves[index].is_param and not (
                leaf.layer == "batch_norm" and leaf.name in ("mean", "var")
            )
            self.leaves[index] = dataclasses.replace(leaf, is_param=is_param)

    @staticmethod
    def _owner(module: Any, outer: _Owner | None) -> _Owner:
        cls = type(module)
        if outer is not None and outer.absorbing:
            # A cell's gates (LSTMCell.ii, GRUCell.dense_h, ...): the cell owns their
            # arrays, as Equinox's GRUCell owns weight_ih, so layer="recurrent" matches.
            return dataclasses.replace(
                outer, holder=module, layout=_layout(cls, _class_kind(cls)[1])
            )
        layer = _module_layer(module)
        enclosing = (outer.enclosing if outer is not None else ()) + (layer,)
        if outer is not None and isinstance(module, _NON_OWNING):
            return dataclasses.replace(outer, enclosing=enclosing)
        return _Owner(
            layer=layer,
            ancestors=outer.enclosing if outer is not None else (),
            enclosing=enclosing,
            registration=_class_kind(cls)[2],
            absorbing=layer.kind == "recurrent" and layer.source in ("class", "registered"),
            holder=module,
            layout=_layout(cls, layer.source),
        )

    def _variable(self, variable: Any, path: tuple, owner: _Owner | None) -> None:
        variable_id = id(variable)
        index = self._first.get(variable_id)
        if index is not None:
            # Another reference to a variable already met (a tied weight): nnx.state
            # lists it once, at its first path; this is one more view of it.
            if index >= 0:
                view = self._leaf(path, variable.get_raw_value(), owner, variable)
                self._views.setdefault(index, []).append(view)
            return
        if not self.predicate(path, variable):
            self._first[variable_id] = -1
            return
        self._first[variable_id] = len(self.leaves)
        self._add(path, variable.get_raw_value(), owner, variable)

    def _add(self, path: tuple, value: Any, owner: _Owner | None, variable: Any) -> None:
        self.paths.append(path)
        self.leaves.append(self._leaf(path, value, owner, variable))

    def _leaf(self, path: tuple, value: Any, owner: _Owner | None, variable: Any) -> Leaf:
        found = _shape_dtype(value)
        if found is None:
            raise _bad_value(self.fn, path, _holder(variable, "an array attribute"), value)
        shape, dtype = found
        name = _leaf_name(path)
        role = expected = axes = None
        layout_axes = 0
        ancestors: tuple[Layer, ...]
        if owner is None:
            layer, ancestors = Layer("unknown", None, None, "class"), ()
        else:
            layer, ancestors = owner.layer, owner.ancestors
            registration = owner.registration
            if registration is not None:
                role = registration.role_of(name)
                axes = registration.matrix_axes_of(name)
                if registration.matrix_axes:
                    stacked = registered_batch_axes(
                        registration, lambda field: _raw(getattr(owner.holder, field, None))
                    )
                    if stacked is not None:
                        expected = max(0, len(shape) - stacked)
            elif owner.layout is not None:
                expected, axes = owner.layout(owner.holder, name)
                if isinstance(owner.holder, nnx.LinearGeneral):
                    layout_axes = _general_layout_axes(owner.holder, name)
        if role is None:
            if name == "scales" and owner is not None and isinstance(owner.holder, nnx.WeightNorm):
                # WeightNorm's learned norms of the wrapped layer's kernels: gains.
                role = "gain"
            else:
                own = next((k for k in reversed(path[:-1]) if isinstance(k, str)), "")
                role = role_from_name(layer.kind, name, own)
        return Leaf(
            layout_axes=layout_axes,
            path=_path_text(path),
            layer=layer.kind,
            role=role,
            shape=shape,
            dtype=dtype,
            name=name,
            layer_type=layer.type_name,
            layer_class=layer.cls,
            ancestors=ancestors,
            # Params are parameters, and raw array attributes the selection holds (the
            # optimizer trains them as it trains params) but a batch norm's running
            # statistics; BatchStat, Cache and RNG state are state, never decayed.
            is_param=(
                isinstance(variable, _Param)
                or (variable is None and not (layer.kind == "batch_norm" and name in ("mean", "var")))
            ) and value is not None,
            kind_source=layer.source,
            batch_axes=max(0, len(shape) - expected) if expected is not None else 0,
            matrix_axes=axes,
        )


# The State walk: kinds from names only


# Attention projections: their kernels have more than two axes but are not convolutions.
_PROJECTIONS = frozenset({"query", "key", "value", "out"})

_name_layers: dict[tuple[str, str], Layer] = {}


def _name_layer(kind: str, source: str = "name") -> Layer:
    layer = _name_layers.get((kind, source))
    if layer is None:
        layer = _name_layers[(kind, source)] = Layer(kind, None, None, source)
    return layer


def _level_kind(key: Any) -> str | None:
    return kind_from_name(key) if isinstance(key, str) else None


def _is_projection(own: str | None) -> bool:
    return own is not None and (own in _PROJECTIONS or own.endswith("_proj"))


def _name_owner(
    parent: tuple, arrays: dict[str, tuple[int, ...]]
) -> tuple[Layer, tuple[Layer, ...]]:
    """The owner layer and its ancestors for the arrays held under ``parent``.

    The owner's key and the names and ranks of the arrays it holds are read by the
    shared inference (:func:`resolve_kind`); what only a State shows is added: the
    gates of a module named as a recurrent cell are the cell's, and the multi-axis
    kernels of attention projections are linear.
    """
    levels = [_level_kind(key) for key in parent]
    own = next((key for key in reversed(parent) if isinstance(key, str)), None)
    outer = tuple(_name_layer(k or "unknown") for k in levels[:-1])
    kind = _level_kind(own)
    if kind in (None, "linear"):
        # Inside a module named as a recurrent cell, unnamed layers and dense gates are
        # the cell's own, as with classes (NNX cells hold Linear gates like dense_i).
        for depth, level in enumerate(levels[:-1]):
            if level == "recurrent":
                cell_outer = tuple(_name_layer(k or "unknown") for k in levels[:depth])
                return _name_layer("recurrent"), cell_outer
    ranks = {name: len(shape) for name, shape in arrays.items()}
    kind, evidence = resolve_kind(own, ranks)
    if kind == "linear" and _level_kind(own) == "conv" and ranks.get("kernel", 0) >= 3:
        # A kernel of a conv's rank whose bias has more than one axis: a stack of
        # convolutions (the bias's extra axes are the stacked ones), as the name says.
        return _name_layer("conv", "name"), outer
    if kind == "conv" and "kernel" in ranks and _level_kind(own) != "conv":
        if _is_projection(own) or "attention" in levels:
            # A multi-axis projection of an attention layer (in, heads, head_dim).
            return _name_layer("linear", "content"), outer
        if _level_kind(own) == "linear":
            # A kernel of three or more axes named as a linear layer: a stack of
            # linear layers or a convolution, which names and ranks cannot tell.
            return _name_layer("conv", "ambiguous"), outer
    return _name_layer(kind, evidence), outer


def _name_axes(kind: str, own: Any, name: str, rank: int) -> _Axes | None:
    """The (in, out) layout of a weight matrix known only by names and rank."""
    if rank == 2 and (
        (name == "kernel" and kind in ("linear", "recurrent"))
        or (name == "embedding" and kind == "embedding")
        or (name in ("lora_a", "lora_b") and kind == "lora")
    ):
        return _IN_OUT
    if name == "kernel" and kind == "conv" and rank >= 3:
        return tuple(range(rank - 1)), (rank - 1,)
    if name == "kernel" and kind == "linear" and rank == 3 and own in _PROJECTIONS:
        # MultiHeadAttention: query/key/value are (in, heads, head_dim), out is
        # (heads, head_dim, out).
        return ((0, 1), (2,)) if own == "out" else ((0,), (1, 2))
    return None


def _name_layout_axes(kind: str, name: str, shape: tuple, axes: _Axes | None) -> int:
    """Layout axes known by names: a linear layer's kernel is one matrix however many
    axes its in and out features take, and its bias one vector."""
    if kind != "linear":
        return 0
    if name == "kernel" and axes is not None:
        return len(axes[0]) + len(axes[1]) - 2
    if name == "bias":
        return max(0, len(shape) - 1)
    return 0


def _is_param_by_name(variable: Any, value: Any, kind: str, name: str) -> bool:
    if value is None:
        return False
    if variable is not None:
        return isinstance(variable, _Param)
    # A State of raw arrays (what optax hands a callable mask at update) carries no
    # variable types: an array is a parameter unless Flax's names say it is a running
    # statistic, so that the masks made at init and at update agree.
    return not (kind == "batch_norm" and name in ("mean", "var"))


def _entry_key(entry: Any) -> Any:
    """A jax key-path entry as the raw key nnx uses (a str or an int)."""
    if isinstance(entry, jax.tree_util.DictKey):
        return entry.key
    if isinstance(entry, jax.tree_util.SequenceKey):
        return entry.idx
    return key_name(entry)


def _is_variable(x: Any) -> bool:
    return isinstance(x, _Variable)


def _is_masked_node(value: Any) -> bool:
    optax = sys.modules.get("optax")
    return optax is not None and isinstance(value, optax.MaskedNode)


def _state_walk(state: Any, fn: str) -> tuple[list[Leaf], Callable[[list[Any]], Any]]:
    flat, treedef = jax.tree_util.tree_flatten_with_path(state, is_leaf=_is_variable)
    entries = []
    for jax_path, item in flat:
        path = tuple(_entry_key(entry) for entry in jax_path)
        variable = item if isinstance(item, _Variable) else None
        value = item.get_raw_value() if variable is not None else item
        if _is_masked_node(value):
            # One optax.partition (or contrib.muon) branch's view: another branch's
            # leaf, which this branch leaves alone, like a variable holding None.
            value = None
        found = _shape_dtype(value)
        if found is None:
            raise _bad_value(fn, path, _holder(variable, "a leaf"), value)
        entries.append((path, path, variable, value, found))
    return _leaves_by_name(entries), treedef.unflatten  # type: ignore[attr-defined, unused-ignore]  # mypy cannot resolve jaxlib's PyTreeDef


def _leaves_by_name(entries: list[tuple], around: tuple[Layer, ...] = ()) -> list[Leaf]:
    """Leaves whose kinds come from their keys and sibling arrays alone.

    Each entry is (path to read names from, full path, variable or None, value,
    (shape, dtype)); ``around`` are the modules enclosing the first path's root.
    """
    groups: dict[tuple, dict[str, tuple[int, ...]]] = {}
    for path, _, _, _, found in entries:
        groups.setdefault(path[:-1], {})[_leaf_name(path)] = found[0]
    owners = {parent: _name_owner(parent, arrays) for parent, arrays in groups.items()}
    leaves = []
    for path, full_path, variable, value, (shape, dtype) in entries:
        name = _leaf_name(path)
        layer, ancestors = owners[path[:-1]]
        own = next((key for key in reversed(path[:-1]) if isinstance(key, str)), None)
        stacked = 0
        if layer.kind == "conv":
            # A conv's bias is (out,) in one layer: more axes are stacked layers. With no
            # bias in sight (none, or masked out on one optax.partition branch) the
            # kernel is read as one layer's.
            bias = groups[path[:-1]].get("bias")
            stacked = 0 if bias is None else max(0, len(bias) - 1)
        # Names and ranks that contradict give no layout: Muon never guesses.
        axes = None if layer.source == "ambiguous" else _name_axes(layer.kind, own, name, len(shape) - stacked)
        if axes is None and layer.kind == "linear" and name == "kernel" and len(shape) > 2:
            # A LinearGeneral: its bias is the kernel's trailing (output) axes.
            bias = groups[path[:-1]].get("bias")
            if bias is not None and 1 < len(bias) < len(shape) and shape[-len(bias):] == bias:
                split = len(shape) - len(bias)
                axes = tuple(range(split)), tuple(range(split, len(shape)))
        leaves.append(
            Leaf(
                path=_path_text(full_path),
                layer=layer.kind,
                role=role_from_name(layer.kind, name, own or ""),
                shape=shape,
                dtype=dtype,
                name=name,
                ancestors=around + ancestors,
                is_param=_is_param_by_name(variable, value, layer.kind, name),
                kind_source=layer.source,
                batch_axes=stacked,
                matrix_axes=axes,
                layout_axes=_name_layout_axes(layer.kind, name, shape, axes),
            )
        )
    return leaves


# Entry points


NON_FLOATING_FIX = (
    "Keep integer and bool arrays out of nnx.Param: hold them in another Variable type "
    "(nnx.Variable, or a subclass of it) that the optimizer's wrt= does not select."
)


def _is_state(fn: str, tree: Any, wrt: Any) -> bool:
    """Whether ``tree`` is a State (else a module); raises for anything else."""
    if isinstance(tree, nnx.State):
        if wrt is not None:
            raise ValueError(
                f"{fn}(state, wrt={wrt!r}): an nnx.State is already a selection of "
                f"variables, so wrt= does not apply to it. Pass the module, "
                f"{fn}(model, wrt=...), or select first: {fn}(nnx.state(model, ...))."
            )
        return True
    if isinstance(tree, nnx.Module):
        return False
    raise TypeError(
        f"{fn}: expected an nnx.Module or an nnx.State, got {type(tree).__name__}. "
        f"For Linen params pass the params mapping; for an Equinox model use "
        f"policy.for_equinox(model)."
    )


def walk(
    tree: Any, *, wrt: Any = None, method: str = "for_flax", **unexpected: Any
) -> tuple[list[Leaf], Callable[[list[Any]], Any]]:
    """The leaves of an NNX module or State, and the function that puts one value per
    leaf back, as an ``nnx.State`` shaped as ``nnx.state(tree, wrt)``.

    For a State the values go back in the State's own containers, in place of its
    variables or arrays. Arguments as :func:`leaves`; ``method`` names the entry point
    in error messages.

    Raises:
      TypeError: as :func:`leaves`, and for Linen's ``module=``/``args=``/``kwargs=``.
    """
    is_state = _is_state(method, tree, wrt)
    if unexpected:
        given = ", ".join(f"{key}=..." for key in unexpected)
        raise TypeError(
            f"{method}(..., {given}): an nnx.Module or nnx.State takes only wrt= (the "
            f"filter of the variables the optimizer updates); module=, args= and "
            f"kwargs= are for Linen params."
        )
    if is_state:
        return _state_walk(tree, method)
    state = _Walk(tree, _predicate(method, wrt), method)
    return state.leaves, state.rebuild


def leaves(tree: Any, *, wrt: Any = None) -> list[Leaf]:
    """The :class:`Leaf` records of the arrays ``nnx.state(tree, wrt)`` holds, in order.

    From a module, kinds come from the classes in the module graph: the nearest
    enclosing module owns an array, and the modules around it are its ancestors
    (``nnx.List``/``nnx.Dict`` never own: a variable held directly in one belongs to
    the module holding it). Recurrent cells own the arrays of their gate layers.
    The variables of an ``nnx.bridge.ToNNX`` carry Linen's names, not classes: they
    are read as a State's are. Raw array attributes the selection holds (``wrt=...``)
    are decided like params. From a State, kinds come from its keys and sibling arrays
    alone (``kind_source`` ``"name"`` or ``"content"``, ``"ambiguous"`` where they
    contradict), with no stacked axes known; in a State of raw arrays, which carries
    no variable types, every array is a parameter but a batch norm's ``mean`` and
    ``var``.

    Args:
      tree: an ``nnx.Module`` (abstract ones from ``nnx.eval_shape`` too) or an
        ``nnx.State``, of variables or of raw arrays.
      wrt: for a module, the NNX filter of the variables the optimizer updates;
        ``nnx.Param`` (and its subclasses, such as ``nnx.LoRAParam``) by default.
        Variables it selects that are not ``nnx.Param`` (``nnx.BatchStat``, ...) are
        state, never decayed.

    Returns:
      One leaf per entry of the State, in its flattening order. A variable reachable
      from several modules appears once, at its first path; the other owners' views
      of it are in ``Leaf.shared_with``. A variable holding ``None`` gets a leaf of
      shape ``(0,)`` that is never decayed.

    Raises:
      TypeError: ``tree`` is neither a module nor a State, ``wrt`` is not an NNX
        filter, or a selected variable holds something other than an array.
      ValueError: ``wrt`` given with a State.

    Example:
      >>> from flax import nnx
      >>> from decaymask.adapters import _nnx
      >>> rngs = nnx.Rngs(0)
      >>> model = nnx.Sequential(nnx.Linear(3, 4, rngs=rngs), nnx.LayerNorm(4, rngs=rngs))
      >>> [(x.path, x.layer, x.role) for x in _nnx.leaves(model)]  # doctest: +NORMALIZE_WHITESPACE
      [('layers/0/bias', 'linear', 'bias'), ('layers/0/kernel', 'linear', 'weight'),
       ('layers/1/bias', 'layer_norm', 'bias'), ('layers/1/scale', 'layer_norm', 'scale')]
    """
    return walk(tree, wrt=wrt, method="leaves")[0]
