"""The NNX module walk: one pass over a module graph, in ``nnx.state``'s order.

A module is walked once, in the order ``nnx.state`` flattens it, so the walk sees the
same variables at the same paths as ``nnx.state(model, wrt)`` and knows the class of
every module on the way.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx

from ...core import _registry
from ...core._infer import Reading
from ...core._leaf import Layer, Leaf
from ...core._roles import role_from_name
from .._common import UNOWNED, path_text, registered_batch_axes
from ._by_name import leaves_by_name
from ._classes import NNX_TRANSPARENT, nnx_class, nnx_layer, nnx_reading
from ._layouts import Layout, check_registered, general_layout_axes
from ._values import leaf_name, module_key, not_an_array, raw_value, shape_dtype

_graphlib = nnx.graphlib
_get_node_impl = _graphlib.get_node_impl
_GraphNodeImpl = _graphlib.GraphNodeImpl
_DataElem = _graphlib.DataElem
_StaticElem = _graphlib.StaticElem
_is_array_ref = nnx.variablelib.is_array_ref
_Variable = nnx.Variable
_Param = nnx.Param


def _is_to_nnx(node: Any) -> bool:
    """Whether ``node`` is an ``nnx.bridge.ToNNX`` (its module is loaded if one exists)."""
    bridge = sys.modules.get("flax.nnx.bridge.wrappers")
    return bridge is not None and isinstance(node, bridge.ToNNX)


@dataclasses.dataclass(frozen=True, slots=True)
class NnxOwner:
    """The module that owns the arrays below a point of the walk."""

    layer: Layer
    ancestors: tuple[Layer, ...]
    """The modules around ``layer``, outermost first."""
    enclosing: tuple[Layer, ...]
    """The ancestors of anything entered below: ``ancestors``, the owner and the
    containers between it and this point."""
    depths: tuple[int, ...]
    """Where the modules of ``ancestors + (layer,)`` stand: the number of path keys
    naming each (``Leaf.module_depths``)."""
    enclosing_depths: tuple[int, ...]
    """Where the modules of ``enclosing`` stand."""
    registration: _registry.Registration | None
    absorbing: bool
    """A recurrent cell: the layers inside it are its gates, not owners."""
    holder: Any
    """The module an array is an attribute of: the owner, or a cell's gate layer."""
    layout: Layout | None
    reading: Reading | None = None
    """How the owner's arrays were read where they decided its kind (their stacked and
    layout axes), else ``None``."""


def _holds(module: Any, name: str, variable: Any, value: Any) -> bool:
    """Whether the array is the module's own attribute (what its reading saw), not one
    in a list or dict inside it."""
    found = vars(module).get(name)
    return found is not None and (found is variable or found is value)


class NnxWalk:
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
        self, node: Any, impl: Any, path: tuple, owner: NnxOwner | None, repeat: bool
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
        if isinstance(node, nnx.Pytree) and not isinstance(node, NNX_TRANSPARENT):
            if _is_to_nnx(node) and not repeat:
                # A Linen module in NNX: its variables carry Linen's names, not classes.
                around = (owner.enclosing if owner is not None else ()) + (nnx_layer(node),)
                depths = (owner.enclosing_depths if owner is not None else ()) + (len(path),)
                bridged = (len(self.leaves), around, depths)
                owner = None
            else:
                bridged = None
                owner = self._owner(node, owner, len(path))
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

    def _read_by_name(
        self, path: tuple, start: int, around: tuple[Layer, ...], depths: tuple[int, ...]
    ) -> None:
        """Re-reads the leaves from ``start`` on, all below ``path`` (an
        ``nnx.bridge.ToNNX``), by their Linen names as a State's are: the wrapper is no
        layer, and registering it could not help. ``around`` are the modules enclosing
        the names' root, at ``depths``."""
        entries = [
            (self.paths[i][len(path):], self.paths[i], None, None,
             (self.leaves[i].shape, self.leaves[i].dtype))
            for i in range(start, len(self.leaves))
        ]
        for offset, leaf in enumerate(leaves_by_name(entries, around, depths)):
            index = start + offset
            # Whether it is a parameter is the variable's type, already read.
            is_param = self.leaves[index].is_param and not (
                leaf.layer == "batch_norm" and leaf.name in ("mean", "var")
            )
            self.leaves[index] = dataclasses.replace(leaf, is_param=is_param)

    @staticmethod
    def _owner(module: Any, outer: NnxOwner | None, depth: int) -> NnxOwner:
        """The owner of the arrays below ``module``, which ``depth`` path keys name."""
        facts = nnx_class(type(module))
        if outer is not None and outer.absorbing:
            # A cell's gates (LSTMCell.ii, GRUCell.dense_h, ...): the cell owns their
            # arrays, as Equinox's GRUCell owns weight_ih, so layer="recurrent" matches.
            return dataclasses.replace(
                outer, holder=module, layout=facts.layout if facts.source == "class" else None
            )
        layer, reading = nnx_reading(module)
        enclosing = (outer.enclosing if outer is not None else ()) + (layer,)
        depths = (outer.enclosing_depths if outer is not None else ()) + (depth,)
        if outer is not None and facts.non_owning:
            return dataclasses.replace(outer, enclosing=enclosing, enclosing_depths=depths)
        return NnxOwner(
            layer=layer,
            ancestors=outer.enclosing if outer is not None else (),
            enclosing=enclosing,
            depths=depths,
            enclosing_depths=depths,
            registration=facts.registration,
            absorbing=layer.kind == "recurrent" and layer.source in ("class", "registered"),
            holder=module,
            layout=facts.layout if layer.source == "class" else None,
            reading=reading,
        )

    def _variable(self, variable: Any, path: tuple, owner: NnxOwner | None) -> None:
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

    def _add(self, path: tuple, value: Any, owner: NnxOwner | None, variable: Any) -> None:
        self.paths.append(path)
        self.leaves.append(self._leaf(path, value, owner, variable))

    def _leaf(self, path: tuple, value: Any, owner: NnxOwner | None, variable: Any) -> Leaf:
        found = shape_dtype(value)
        if found is None:
            raise not_an_array(self.fn, path, variable, "an array attribute", value)
        shape, dtype = found
        name = leaf_name(path)
        role = expected = axes = None
        layout_axes = 0
        ancestors: tuple[Layer, ...]
        depths: tuple[int, ...]
        if owner is None:
            # No module around it: it stands where its parent's keys end.
            layer, ancestors, depths = UNOWNED, (), (len(path) - 1,)
        else:
            layer, ancestors, depths = owner.layer, owner.ancestors, owner.depths
            registration = owner.registration
            if registration is not None:
                role = registration.role_of(name)
                axes = registration.matrix_axes_of(name, owner.holder)
                check_registered(self.fn, path_text(path), owner.holder, name, axes)
                if registration.matrix_axes:
                    stacked = registered_batch_axes(
                        registration,
                        lambda field: raw_value(getattr(owner.holder, field, None)),
                        owner.holder,
                    )
                    if stacked is not None:
                        expected = max(0, len(shape) - stacked)
            elif owner.layout is not None:
                expected, axes = owner.layout(owner.holder, name)
                if isinstance(owner.holder, nnx.LinearGeneral):
                    layout_axes = general_layout_axes(owner.holder, name)
            elif owner.reading is not None and _holds(owner.holder, name, variable, value):
                expected = max(0, len(shape) - owner.reading.stacked)
                layout_axes = owner.reading.layout_axes(name)
        if role is None:
            if name == "scales" and owner is not None and isinstance(owner.holder, nnx.WeightNorm):
                # WeightNorm's learned norms of the wrapped layer's kernels: gains.
                role = "gain"
            else:
                own = module_key(path[:-1]) or ""
                role = role_from_name(layer.kind, name, own)
        return Leaf(
            layout_axes=layout_axes,
            path=path_text(path),
            layer=layer.kind,
            role=role,
            shape=shape,
            dtype=dtype,
            name=name,
            layer_type=layer.type_name,
            layer_class=layer.cls,
            ancestors=ancestors,
            module_depths=depths,
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
