"""The Equinox walk: one flatten of a module tree, every array's owner found once.

Every leaf is keyed by what a rule can read without its own path, rank or value, so
that the policy decides once per key (:class:`~decaymask.core._table.LeafTable`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax

from ...core import _registry
from ...core._leaf import Layer, Leaf
from ...core._roles import owner_trait, role_from_name
from ...core._table import LeafTable
from .._common import (
    ARRAY_TYPES,
    UNOWNED,
    dtype_name,
    floating_dtypes,
    is_floating,
    key_name,
    path_text,
    registered_batch_axes,
)
from .._contract import TreedefRebuild
from .._structure import flat_with_path_of
from ._classes import (
    INDEX_KEYS,
    array_field,
    equinox_class,
    equinox_reading,
    is_array_wrapper,
    pytree_children,
    read_field,
)
from ._repeats import Repeats
from ._layouts import equinox_expected_ndim, equinox_layout_axes, equinox_matrix_axes



class EquinoxContext:
    """What every array below one node shares: its owner, the modules around it, the
    name its arrays take where their own key names nothing."""

    __slots__ = ("node", "owner", "ancestors", "depths", "owner_node", "in_state", "key",
                 "field", "wrapper", "owner_name", "reading")

    def __init__(self, node, owner, ancestors, depths, owner_node, in_state, key, field=None,
                 wrapper=False, owner_name="", reading=None):
        self.node = node
        self.owner = owner
        self.ancestors = ancestors
        # Where the modules of ``ancestors + (owner,)`` stand in the path (the number of
        # keys naming each); ``()`` while no module encloses the node.
        self.depths = depths
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
        # How the owner's arrays were read where they decided its kind (stacked and
        # layout axes), else ``None``.
        self.reading = reading


def _child_of(node: Any, entry: Any) -> Any:
    if isinstance(entry, jax.tree_util.GetAttrKey):
        return read_field(node, entry.name)
    if isinstance(entry, jax.tree_util.SequenceKey) and type(node) in (list, tuple):
        return node[entry.idx]
    if isinstance(entry, jax.tree_util.DictKey) and isinstance(node, Mapping):
        return node[entry.key]
    # A custom pytree node: its children in flattening order.
    for keys, child in pytree_children(node):
        if keys[0] == entry:
            return child
    raise KeyError(entry)


class EquinoxWalk:
    """One flatten of the tree; every array's owner found once per parent node.

    Every leaf's key holds all a rule can read without the leaf's own path, rank or
    value: the owner, its ancestors, whether it is state, the array's name (the field
    it is held in, past list indices and array wrappers) and, for embeddings, the
    owner's name (it decides a position table's role).
    """

    def __init__(self, tree: Any):
        flat, self.treedef = flat_with_path_of(tree)
        self.size = len(flat)
        self.contexts: dict[tuple, EquinoxContext] = {}
        self.interned: dict[tuple, int] = {}
        # One tuple per distinct depths: every block of a list shares its block's.
        self.depth_tuples: dict[tuple[int, ...], tuple[int, ...]] = {}
        self.shared: list[tuple[tuple, Any]] = []  # (key path, eqx.nn.Shared node)
        root = EquinoxContext(tree, None, (), (), None, False, 0)
        self.contexts[()] = self._enter(root, tree, None, ())
        self.positions: list[int] = []
        # (key path, array, context or None until a leaf of it is built, name)
        self.entries: list[tuple[tuple, Any, EquinoxContext | None, str]] = []
        keys: list[tuple] = []
        self.keys = keys
        # By names and classes alone, blocks alike to an earlier one are keyed as it is.
        self.repeats = None if _registry.instance_layouts else Repeats(flat)
        floating_of = floating_dtypes
        index_keys = INDEX_KEYS
        position, size = 0, len(flat)
        while position < size:
            keypath, value = flat[position]
            if not isinstance(value, ARRAY_TYPES):
                position += 1
                continue
            parent = keypath[:-1]
            context = self.contexts.get(parent)
            if context is None:
                self.at = position
                found = self._context(parent)
                if found is None:  # a block alike to an earlier one, keyed at once
                    assert self.repeats is not None
                    position = self.repeats.apply(self, position)
                    continue
                context = found
            last = keypath[-1] if keypath else None
            if last is None:
                name = ""
            elif context.wrapper or isinstance(last, index_keys):
                name = context.field or key_name(last)
            else:
                name = key_name(last)
            floating = floating_of.get(value.dtype)
            if floating is None:
                floating = is_floating(value)
            self.positions.append(position)
            self.entries.append((keypath, value, context, name))
            keys.append((context.key, name, floating))
            position += 1
        self.repeats = None  # holds the flatten and nodes of the tree
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
        inside = EquinoxWalk(node())
        at: dict[int, list[int]] = {}
        for j, (_, value, _, _) in enumerate(inside.entries):
            at.setdefault(id(value), []).append(j)
        context = self.contexts[prefix]
        outer = context.ancestors + ((context.owner,) if context.owner is not None else ())
        base = prefix + (jax.tree_util.GetAttrKey("pytree"),)
        shift = len(base)
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
                    # The view's modules stand ``base`` further in, below the outer ones.
                    module_depths=(*context.depths, *(d + shift for d in view.module_depths)),
                )
                for j in places
                for keypath, view in ((inside.entries[j][0], inside.table[j]),)
                if keypath != own
            )
            if views:
                self.views[i] = views
                # A leaf with views is decided on its own: its key is its own.
                keys[i] = ("shared", i)

    def _context(self, prefix: tuple) -> EquinoxContext | None:
        """The context of the node at ``prefix``, made with those above it; ``None``
        where a block above the node (or the node) is alike to an earlier one: the
        walk keys its leaves as the earlier one's (``self.repeats.hit``)."""
        parent = self.contexts.get(prefix[:-1])
        if parent is None:
            parent = self._context(prefix[:-1])
            if parent is None:
                return None
        entry = prefix[-1]
        node = _child_of(parent.node, entry)
        repeats = self.repeats
        family = None
        if repeats is not None and equinox_class(type(node)).node == "module":
            field = parent.field if parent.wrapper or isinstance(entry, INDEX_KEYS) \
                else key_name(entry)
            family = (parent.key, field, type(node))
            if repeats.alike(self, family, prefix, node):
                return None
        context = self._enter(parent, node, entry, prefix)
        self.contexts[prefix] = context
        if family is not None:
            repeats.met(family, prefix, node, self.at)  # type: ignore[union-attr]
        return context

    def _enter(
        self, parent: EquinoxContext, node: Any, entry: Any, prefix: tuple
    ) -> EquinoxContext:
        if entry is None or parent.wrapper or isinstance(entry, INDEX_KEYS):
            field = parent.field
        else:
            field = key_name(entry)
        facts = equinox_class(type(node))
        if facts.shared:
            self.shared.append((prefix, node))
        what = facts.node
        wrapper = is_array_wrapper(node, facts)
        if wrapper:
            what = None
        if what is None:
            return EquinoxContext(node, parent.owner, parent.ancestors, parent.depths,
                                  parent.owner_node, parent.in_state, parent.key, field,
                                  wrapper, parent.owner_name, parent.reading)
        if what == "state":
            # A StateIndex holds the initial value of some state of its layer.
            return EquinoxContext(node, parent.owner, parent.ancestors, parent.depths,
                                  parent.owner_node, True,
                                  self._intern(parent.owner, parent.ancestors, True, ""),
                                  field, False, parent.owner_name, parent.reading)
        layer, reading = equinox_reading(node)
        ancestors = parent.ancestors if parent.owner is None else parent.ancestors + (parent.owner,)
        # The module stands where its keys lead: parent.depths already holds the
        # depths of ``ancestors``. Not part of the key: a rule reads them with the path.
        depths = parent.depths + (len(prefix),)
        depths = self.depth_tuples.setdefault(depths, depths)
        owner_name = field or ""
        # A role reads of its owner's name only its trait (a position table, a layer scale).
        key_name_part = owner_trait(owner_name)
        return EquinoxContext(node, layer, ancestors, depths, node, parent.in_state,
                              self._intern(layer, ancestors, parent.in_state, key_name_part),
                              field, False, owner_name, reading)

    def _intern(
        self, owner: Layer | None, ancestors: tuple, in_state: bool, owner_name: str
    ) -> int:
        return self.interned.setdefault(
            (owner, ancestors, in_state, owner_name), len(self.interned) + 1
        )

    def _build(self, index: int) -> Leaf:
        keypath, value, found, name = self.entries[index]
        # The leaf of a block keyed as an earlier one: its context is made now.
        context = found or self.contexts.get(keypath[:-1]) or self._context(keypath[:-1])
        assert context is not None
        owner = context.owner or UNOWNED
        # No module encloses the array (so no ancestors either): its owner stands for
        # the node holding it, the path's parent.
        depths = context.depths if context.owner is not None else (max(0, len(keypath) - 1),)
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
            matrix_axes = registration.matrix_axes_of(name, owner_node)
            if registration.matrix_axes:
                registered_batch = registered_batch_axes(
                    registration, lambda field: array_field(owner_node, field), owner_node
                )
        elif not in_state and owner.source == "class":
            matrix_axes = equinox_matrix_axes(owner_node, name)
        else:
            matrix_axes = None
        shape = tuple(value.shape)
        expected = None if in_state else equinox_expected_ndim(owner_node, owner, name)
        reading = context.reading
        if registered_batch is not None:
            batch_axes = min(registered_batch, len(shape))
        elif expected is not None:
            batch_axes = max(0, len(shape) - expected)
        elif reading is not None and not in_state:
            # Axes its arrays share that are not one layer's (eqx.filter_vmap).
            batch_axes = min(reading.stacked, len(shape))
        else:
            batch_axes = 0
        if reading is not None and not in_state:
            layout_axes = reading.layout_axes(name)
        else:
            layout_axes = equinox_layout_axes(owner_node, owner, name, len(shape) - batch_axes)
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
            module_depths=depths,
            is_param=not in_state,
            kind_source=owner.source,
            batch_axes=batch_axes,
            layout_axes=layout_axes,
            matrix_axes=matrix_axes,
            shared_with=self.views.get(index, ()),
        )

    @property
    def rebuild(self) -> TreedefRebuild:
        """Values at the arrays, ``None`` at every other leaf of the model."""
        return TreedefRebuild(self.treedef, self.positions, self.size)
