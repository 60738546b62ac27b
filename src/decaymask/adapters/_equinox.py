"""The Equinox adapter: module tree -> leaves -> a mask of the tree's own structure."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, cast

import equinox as eqx
import jax

from ..core import _registry
from ..core._infer import owner_says_position, role_from_name
from ..core._leaf import Layer, Leaf
from ..core._table import LeafTable
from ._common import (
    ARRAY_TYPES,
    ClassKinds,
    RegistryCache,
    check_not_a_step_count,
    dtype_name,
    is_array_like,
    key_name,
    path_text,
    registered_batch_axes,
)

_nn = eqx.nn
METHOD = "for_equinox"

# Base classes first match wins: subclasses of these count as the base kind.
KIND_TABLE: dict[type, str] = {
    _nn.Linear: "linear",
    _nn.Conv: "conv",
    _nn.ConvTranspose: "conv",
    _nn.Embedding: "embedding",
    _nn.LayerNorm: "layer_norm",
    _nn.RMSNorm: "rms_norm",
    _nn.GroupNorm: "group_norm",
    _nn.BatchNorm: "batch_norm",
    _nn.MultiheadAttention: "attention",
    _nn.GRUCell: "recurrent",
    _nn.LSTMCell: "recurrent",
    _nn.PReLU: "prelu",
}

# Wrappers reparametrise one inner layer: the inner layer owns its arrays, and the
# wrapper's own arrays (WeightNorm's `g`) belong to a layer of the inner layer's kind.
WRAPPERS = (_nn.WeightNorm, _nn.SpectralNorm)

# Containers whose class is known not to be a layer: never "unknown", never guessed.
_CONTAINERS: tuple[type, ...] = (
    _nn.MLP,
    _nn.Sequential,
    _nn.Shared,
    _nn.Lambda,
    _nn.Identity,
    _nn.Dropout,
    _nn.RotaryPositionalEmbedding,
)

_class_kind = ClassKinds(KIND_TABLE, WRAPPERS, _CONTAINERS)


def _module_layer(node: eqx.Module) -> Layer:
    cls = type(node)
    layer = _class_kind.layer(cls)
    if layer is not None:
        return layer
    kind, source, _ = _class_kind(cls)
    if kind == "wrapper":
        inner = _module_layer(cast("eqx.nn.WeightNorm | eqx.nn.SpectralNorm", node).layer)
        return Layer(inner.kind, cls.__name__, cls, inner.source)
    # The class name said a kind: what the instance owns confirms or overrides it.
    arrays, children = _content(node)
    return _class_kind.content_layer(cls, arrays, children)


def _content(node: Any) -> tuple[dict[str, int], list[str]]:
    """The rank of every array a module owns directly (in a list or tuple field, or
    through an array wrapper), and the fields that hold modules."""
    arrays: dict[str, int] = {}
    children: list[str] = []
    for keys, value in _children(node):
        name = key_name(keys[0])
        for item in value if type(value) in (list, tuple) else (value,):
            if _node_kind(type(item)) == "module" and not _is_array_wrapper(item):
                children.append(name)
                continue
            array = _wrapped_array(item) if not is_array_like(item) else item
            if array is not None:
                arrays[name] = max(arrays.get(name, 0), len(array.shape))
    return arrays, children


def _children(node: Any) -> list[tuple[tuple, Any]]:
    """The immediate children of a pytree node with their keys."""
    return jax.tree_util.tree_flatten_with_path(node, is_leaf=lambda x: x is not node)[0]


# Field names a type holding one array gives it when the name says nothing of what the
# array is for (a named-array type's ``array``): the field holding the type names it.
_WRAPPED_NAMES = frozenset({"array", "value", "data", "val", "raw", "tensor", "_value", "_array"})
_PLAIN_TYPES = (list, tuple, dict, type(None))


def _is_array_wrapper(node: Any) -> bool:
    """Whether ``node`` is a pytree node that only wraps one array (a named array with
    its axis names as static data), not a layer: it owns nothing, and the array is
    named by the field holding the node."""
    cls = type(node)
    table = _wrapper_classes.table()
    could = table.get(cls)
    if could is None:
        could = table[cls] = _could_wrap(cls)
    if not could:
        return False
    if _node_kind(cls) is not None:
        # A module's children are its dynamic fields: read them without a flatten.
        values = _getattr(node, "__dict__")
        found = [(name, values.get(name)) for name in _dynamic_fields(cls)]
        found = [(name, value) for name, value in found if value is not None]
        if len(found) != 1 or not is_array_like(found[0][1]):
            return False
        return found[0][0] in _WRAPPED_NAMES
    children = [(keys, value) for keys, value in _children(node) if value is not None]
    if len(children) != 1 or not is_array_like(children[0][1]):
        return False
    entry = children[0][0][0]
    return isinstance(entry, _INDEX_KEYS) or key_name(entry) in _WRAPPED_NAMES


# class -> whether its instances may wrap one array; a registration can change it.
_wrapper_classes = RegistryCache()
_FIELDS: dict[type, tuple[str, ...]] = {}


def _could_wrap(cls: type) -> bool:
    """Whether instances of ``cls`` may be array wrappers: not a plain container, not
    an array, not a module of a known kind."""
    if cls in _PLAIN_TYPES or issubclass(cls, ARRAY_TYPES):
        return False
    if _node_kind(cls) is not None:
        kind, source, _ = _class_kind(cls)
        return kind == "unknown" and source == "class" and not issubclass(cls, _CONTAINERS)
    return True


def _dynamic_fields(cls: type) -> tuple[str, ...]:
    names = _FIELDS.get(cls)
    if names is None:
        names = _FIELDS[cls] = tuple(
            f.name for f in dataclasses.fields(cls) if not f.metadata.get("static", False)
        )
    return names


def _array_field(node: Any, field: str) -> Any:
    """The array a module holds in ``field`` (through an array wrapper), or ``None``."""
    value = getattr(node, field, None)
    return value if is_array_like(value) else _wrapped_array(value)


def _wrapped_array(node: Any) -> Any:
    if not _is_array_wrapper(node):
        return None
    return next(value for _, value in _children(node) if value is not None)


def _has_array(node: Any, name: str) -> bool:
    return is_array_like(getattr(node, name, None))


def _expected_ndim(node: Any, layer: Layer, name: str) -> int | None:
    """The rank one layer of this class gives ``name``; more axes are stacked axes."""
    if not isinstance(node, eqx.Module) or layer.source != "class":
        return None
    if isinstance(node, WRAPPERS):
        inner = node.layer
        return _expected_ndim(inner, _module_layer(inner), node.weight_name)
    if isinstance(node, (_nn.Linear, _nn.Embedding, _nn.GRUCell, _nn.LSTMCell)):
        return 1 if name.startswith("bias") else 2
    if isinstance(node, (_nn.Conv, _nn.ConvTranspose)):
        return node.num_spatial_dims + (1 if name == "bias" else 2)
    if isinstance(node, (_nn.LayerNorm, _nn.RMSNorm)):
        return len(node.shape)
    if isinstance(node, (_nn.GroupNorm, _nn.BatchNorm)):
        return 1
    return None


def _matrix_axes(node: Any, name: str) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """(reduction, output) axes of a weight matrix in Equinox's (out, in, ...) layouts."""
    if isinstance(node, (_nn.Linear, _nn.GRUCell, _nn.LSTMCell)):
        return ((1,), (0,)) if name.startswith("weight") else None
    if isinstance(node, (_nn.Conv, _nn.ConvTranspose)) and name == "weight":
        # (out, in, *kernel): a kernel position is part of the input of the matmul.
        return tuple(range(1, node.num_spatial_dims + 2)), (0,)
    if isinstance(node, _nn.Embedding):
        # (num, features): a lookup is a one-hot row times the table.
        return (0,), (1,)
    return None


_UNOWNED = Layer("unknown", None, None, "class")
_INDEX_KEYS = (jax.tree_util.SequenceKey, jax.tree_util.FlattenedIndexKey)


class _Context:
    """What every array below one node shares: its owner, the modules around it, the
    name its arrays take where their own key names nothing."""

    __slots__ = ("node", "owner", "ancestors", "owner_node", "in_state", "key", "field",
                 "wrapper", "owner_name")

    def __init__(self, node, owner, ancestors, owner_node, in_state, key, field=None,
                 wrapper=False, owner_name=""):
        self.node = node
        self.owner = owner
        self.ancestors = ancestors
        self.owner_node = owner_node
        self.in_state = in_state
        # Equal for contexts that decide alike; interned so that leaf keys hash fast.
        self.key = key
        # The field this node is held in, past list indices and array wrappers.
        self.field = field
        # An array wrapper (a named array): its child is named by ``field``.
        self.wrapper = wrapper
        # The field holding the owner module (``position_embeddings``).
        self.owner_name = owner_name


_getattr = object.__getattribute__  # Module.__getattribute__ does work fields never need


def _child(node: Any, entry: Any) -> Any:
    if isinstance(entry, jax.tree_util.GetAttrKey):
        return _getattr(node, entry.name)
    if isinstance(entry, jax.tree_util.SequenceKey) and type(node) in (list, tuple):
        return node[entry.idx]
    if isinstance(entry, jax.tree_util.DictKey) and isinstance(node, Mapping):
        return node[entry.key]
    # A custom pytree node: its children in flattening order.
    for keys, child in _children(node):
        if keys[0] == entry:
            return child
    raise KeyError(entry)


class _Walk:
    """One flatten of the tree; every array's owner found once per parent node.

    Every leaf's key holds all a rule can read without the leaf's own path, rank or
    value: the owner, its ancestors, whether it is state, the array's name (the field
    it is held in, past list indices and array wrappers) and, for embeddings, the
    owner's name (it decides a position table's role).
    """

    def __init__(self, tree: Any):
        flat, self.treedef = jax.tree_util.tree_flatten_with_path(tree)
        self.size = len(flat)
        self.contexts: dict[tuple, _Context] = {}
        self.interned: dict[tuple, int] = {}
        self.shared: list[tuple[tuple, Any]] = []  # (key path, eqx.nn.Shared node)
        if _is_shared(type(tree)):
            self.shared.append(((), tree))
        self.contexts[()] = self._enter(_Context(tree, None, (), None, False, 0), tree, None)
        self.positions: list[int] = []
        self.entries: list[tuple[tuple, Any, _Context, str]] = []
        keys: list[tuple] = []
        floating_of = _FLOATING
        index_keys = _INDEX_KEYS
        for position, (keypath, value) in enumerate(flat):
            if not isinstance(value, ARRAY_TYPES):
                continue
            parent = keypath[:-1]
            context = self.contexts.get(parent)
            if context is None:
                context = self._context(parent)
            last = keypath[-1] if keypath else None
            if last is None:
                name = ""
            elif context.wrapper or isinstance(last, index_keys):
                name = context.field or key_name(last)
            else:
                name = key_name(last)
            dtype = value.dtype
            floating = floating_of.get(dtype)
            if floating is None:
                floating = floating_of[dtype] = dtype_name(value).startswith(_FLOATING_PREFIXES)
            self.positions.append(position)
            self.entries.append((keypath, value, context, name))
            keys.append((context.key, name, floating))
        self.views: dict[int, tuple[Leaf, ...]] = {}
        for prefix, node in self.shared:
            self._find_views(prefix, node, keys)
        self.table = LeafTable(keys, self._build)

    def _find_views(self, prefix: tuple, node: Any, keys: list[tuple]) -> None:
        """The other places an ``eqx.nn.Shared`` array is used: the ``where`` nodes the
        Shared removed and fills with ``get`` at call time, as leaves of their own
        owners, so that owners deciding differently are reported (as NNX's are)."""
        if not (callable(node.where) and callable(node.get)):
            return  # filtered params: eqx.filter dropped the functions, as optax sees them
        inside = _Walk(node())
        at: dict[int, list[int]] = {}
        for j, (_, value, _, _) in enumerate(inside.entries):
            at.setdefault(id(value), []).append(j)
        context = self.contexts[prefix]
        outer = context.ancestors + ((context.owner,) if context.owner is not None else ())
        base = prefix + (jax.tree_util.GetAttrKey("pytree"),)
        here = {id(value): i for i, (keypath, value, _, _) in enumerate(self.entries)
                if keypath[: len(base)] == base}
        for identity, i in here.items():
            places = at.get(identity, [])
            if len(places) < 2:
                continue
            own = self.entries[i][0][len(base):]
            views = tuple(
                dataclasses.replace(
                    view,
                    path=path_text(base + keypath),
                    ancestors=outer + view.ancestors,
                )
                for j in places
                for keypath, view in ((inside.entries[j][0], inside.table[j]),)
                if keypath != own
            )
            if views:
                self.views[i] = views
                # A leaf with views is decided on its own: its key is its own.
                keys[i] = ("shared", i)

    def _context(self, prefix: tuple) -> _Context:
        parent = self.contexts.get(prefix[:-1])
        if parent is None:
            parent = self._context(prefix[:-1])
        node = _child(parent.node, prefix[-1])
        if _is_shared(type(node)):
            self.shared.append((prefix, node))
        context = self._enter(parent, node, prefix[-1])
        self.contexts[prefix] = context
        return context

    def _enter(self, parent: _Context, node: Any, entry: Any) -> _Context:
        if entry is None or parent.wrapper or isinstance(entry, _INDEX_KEYS):
            field = parent.field
        else:
            field = key_name(entry)
        what = _node_kind(type(node))
        wrapper = _is_array_wrapper(node)
        if wrapper:
            what = None
        if what is None:
            return _Context(node, parent.owner, parent.ancestors, parent.owner_node,
                            parent.in_state, parent.key, field, wrapper, parent.owner_name)
        if what == "state":
            # A StateIndex holds the initial value of some state of its layer.
            return _Context(node, parent.owner, parent.ancestors, parent.owner_node, True,
                            self._intern(parent.owner, parent.ancestors, True, ""), field,
                            False, parent.owner_name)
        layer = _module_layer(node)
        ancestors = parent.ancestors if parent.owner is None else parent.ancestors + (parent.owner,)
        owner_name = field or ""
        # A role reads its owner's name only to tell a position table.
        key_name_part = "position" if owner_says_position(owner_name) else ""
        return _Context(node, layer, ancestors, node, parent.in_state,
                        self._intern(layer, ancestors, parent.in_state, key_name_part),
                        field, False, owner_name)

    def _intern(self, owner: Layer | None, ancestors: tuple, in_state: bool, owner_name: str) -> int:
        return self.interned.setdefault(
            (owner, ancestors, in_state, owner_name), len(self.interned) + 1
        )

    def _build(self, index: int) -> Leaf:
        keypath, value, context, name = self.entries[index]
        owner = context.owner or _UNOWNED
        owner_node = context.owner_node
        in_state = context.in_state
        registration = None
        if owner.source == "registered" and owner.cls is not None:
            registration = _registry.lookup_class(owner.cls)
        role = registration.role_of(name) if registration is not None else None
        if role is None:
            role = role_from_name(owner.kind, name, context.owner_name)
        registered_batch = None
        if registration is not None:
            matrix_axes = registration.matrix_axes_of(name)
            if registration.matrix_axes:
                registered_batch = registered_batch_axes(
                    registration, lambda field: _array_field(owner_node, field)
                )
        elif not in_state and owner.source == "class":
            matrix_axes = _matrix_axes(owner_node, name)
        else:
            matrix_axes = None
        shape = tuple(value.shape)
        expected = None if in_state else _expected_ndim(owner_node, owner, name)
        if registered_batch is not None:
            batch_axes = min(registered_batch, len(shape))
        else:
            batch_axes = max(0, len(shape) - expected) if expected is not None else 0
        layout_axes = 0
        if name == "bias" and isinstance(owner_node, (_nn.Conv, _nn.ConvTranspose)):
            # Equinox keeps a conv bias as (out, 1, ..., 1) to broadcast over space.
            layout_axes = owner_node.num_spatial_dims
        return Leaf(
            path=path_text(keypath),
            layer=owner.kind,
            role=role,
            shape=shape,
            dtype=dtype_name(value),
            name=name,
            layer_type=owner.type_name,
            layer_class=owner.cls,
            ancestors=context.ancestors,
            is_param=not in_state,
            kind_source=owner.source,
            batch_axes=batch_axes,
            layout_axes=layout_axes,
            matrix_axes=matrix_axes,
            shared_with=self.views.get(index, ()),
        )

    def rebuild(self, values: list[Any]) -> Any:
        out: list[Any] = [None] * self.size
        for position, value in zip(self.positions, values):
            out[position] = value
        return self.treedef.unflatten(out)  # type: ignore[attr-defined, unused-ignore]  # mypy cannot resolve jaxlib's PyTreeDef


_NODE_KINDS: dict[type, str | None] = {}


def _node_kind(cls: type) -> str | None:
    """``None`` for a plain container, ``"state"`` for a StateIndex, else ``"module"``.

    Cached per class: ``isinstance`` against ``eqx.Module`` goes through ``ABCMeta``.
    """
    found = _NODE_KINDS.get(cls, _MISSING)
    if found is _MISSING:
        if not issubclass(cls, eqx.Module):
            found = None
        elif issubclass(cls, _nn.StateIndex):
            found = "state"
        else:
            found = "module"
        _NODE_KINDS[cls] = found
    return found  # type: ignore[return-value]


_SHARED: dict[type, bool] = {}


def _is_shared(cls: type) -> bool:
    """Whether ``cls`` is an ``eqx.nn.Shared``, once per class (``isinstance`` against
    a module class goes through ``ABCMeta``)."""
    found = _SHARED.get(cls)
    if found is None:
        found = _SHARED[cls] = issubclass(cls, _nn.Shared)
    return found


_MISSING = object()
_FLOATING: dict[Any, bool] = {}
_FLOATING_PREFIXES = ("float", "bfloat", "complex")


def leaves(tree: Any) -> list[Leaf]:
    """The :class:`Leaf` records of every array in ``tree``, in flattening order."""
    return list(walk(tree, method="leaves")[0])


def walk(tree: Any, *, method: str = METHOD) -> tuple[LeafTable, Callable[[list[Any]], Any]]:
    """The leaves of ``tree``, and a function that puts one value per leaf back in place.

    The rebuilt tree has the structure of ``tree`` with ``None`` at every non-array
    leaf: the structure of ``eqx.filter(tree, eqx.is_array)``.
    """
    _check_input(tree, method)
    state = _Walk(tree)
    return state.table, state.rebuild


NON_FLOATING_FIX = (
    "Hand optax eqx.filter(model, eqx.is_inexact_array) and build the mask from that "
    "(or pass mask=policy.for_equinox)."
)


def _check_input(tree: Any, method: str) -> None:
    """Flax objects handed to the Equinox entry point get the right method named."""
    check_not_a_step_count(tree, method)
    flax_method = method.replace("equinox", "flax")
    # A user's nnx.Module or linen.Module subclass lives in the user's module.
    if any(c.__module__.startswith("flax.") for c in type(tree).__mro__):
        raise TypeError(
            f"{method}: got a {type(tree).__name__} from Flax; use "
            f"policy.{flax_method}(...) for Flax params, variables, nnx.Module or "
            f"nnx.State."
        )
    if isinstance(tree, Mapping) and not _holds_module(tree):
        raise TypeError(
            f"{method}: got a {type(tree).__name__} that holds no Equinox module, "
            f"which looks like Flax Linen params; use policy.{flax_method}(params). For "
            f"a pytree of Equinox modules, pass the modules themselves."
        )


def _holds_module(tree: Any) -> bool:
    return any(
        isinstance(x, eqx.Module)
        for x in jax.tree_util.tree_leaves(tree, is_leaf=lambda x: isinstance(x, eqx.Module))
    )

