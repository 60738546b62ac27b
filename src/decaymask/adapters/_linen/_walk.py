"""The walk of a Linen mapping: params or variables, traced or not, in one pass."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import jax
from flax.core.frozen_dict import FrozenDict

from ...core._leaf import Leaf
from ...core._table import LeafTable
from ._arrays import (
    ARRAY,
    box_types,
    dtype_of,
    is_box,
    is_floating,
    leaf_kinds,
    leafy_types,
    plain_types,
    shapes_of,
    unbox,
)
from .._stacks import Proof, lifted_modules
from .._structure import treedef_of
from ._infer import LinenModule
from ._nodes import AT_LEAF, AT_NODE, STR_ONLY, EmptyNode, mapping_of
from ._other import OtherCollections
from ._repeats import Repeats
from ._signature import ResolvedModule, WatchedArrays, facts_below, key_traits, trace_facts
from ._signature import traits_of
from ._traced import traced_reading
from ._variables import looks_like_variables, undecidable_error

# A visit of one module: the submodules still to visit are yielded as the arguments of
# their own visits, so that depth is not limited by the Python stack.
Visit = Iterator[tuple[Any, tuple[str, ...], ResolvedModule, bool]]


class LinenWalk(OtherCollections):
    """Any Linen mapping, one module at a time, alike modules inferred once.

    The tree is visited as jax flattens it (dict and FrozenDict keys sorted, other
    pytrees as jax orders their children, ``None`` and empty containers holding
    nothing), so that a result is jax's treedef of the tree unflattened over one value
    per leaf. Modules with the same parent, key traits, array names and dtypes and
    submodule keys (and, where inference reads them, the same shapes) share one
    signature and are inferred once: the blocks of a deep model cost a dictionary
    lookup each, and by names a block alike to an earlier one in all of that, all the
    way down, takes the earlier one's keys without a visit (:mod:`._repeats`). A traced
    module's signature holds what the trace says of its path (``trace_facts``).

    Per leaf the walk keeps an int key; every key's first leaf is located for the
    core, any other leaf by visiting once more, on demand. A variables mapping's other
    collections are gathered first (a module's arrays may be spread over them: its
    kind is read off all of them) and their leaves are located as they are gathered.
    """

    def __init__(
        self,
        fn: str,
        tree: Mapping,
        module: Any = None,
        args: Any = (),
        kwargs: Any = None,
    ):
        self.fn = fn
        self.tree = tree
        # The keys of the subtrees of params visited, for blocks alike to them (_repeats).
        self.repeats: Repeats | None = None
        self.trace = None
        # Lifted modules of user-named stacks, by names: their arrays' stacked axes.
        self.lifted: dict[tuple[str, ...], Proof] = {}
        self.boxed = False  # a box (nn.Partitioned) was met: it is a leaf of the result
        if mapping_of(tree) is None:
            one = jax.tree_util.tree_flatten(tree, is_leaf=lambda x: x is not tree)[0]
            if len(one) == 1 and one[0] is tree:
                raise TypeError(
                    f"{fn}: expected a Linen params or variables mapping (dict or "
                    f"FrozenDict), got {type(tree).__name__}, which jax treats as a "
                    f"single leaf."
                )
        reading = looks_like_variables(tree)
        if module is not None:
            self.trace, reading = traced_reading(fn, tree, module, args, kwargs, reading)
        elif reading is None:
            raise undecidable_error(fn, tree)
        self.variables = bool(reading)
        # By names alone: a signature needs nothing a trace says.
        self.fast = self.trace is None and not self.variables
        # Params (not variables): layers are read off their own order (_visit_layer),
        # where a signature needs no other collections, and blocks alike to an earlier
        # one take its keys (_repeats), traced or not.
        self.layers = not self.variables
        # Optimistic: a non-empty mapping is taken to hold a leaf until its visit finds
        # none (only None and empty containers below it), which is checked everywhere
        # on a second visit.
        self.careful = False
        try:
            self._start()
        except EmptyNode:
            self.careful = True
            self._start()
        self.repeats = None  # holds subtrees of the tree
        if self.proved:
            self._find_lifted()
        self.leaves = LeafTable(self.keys, self._build_leaf)
        self.treedef = (
            jax.tree_util.tree_structure(tree, is_leaf=is_box) if self.boxed else treedef_of(tree)
        )
        flattened = self.treedef.num_leaves  # type: ignore[attr-defined, unused-ignore]  # mypy cannot resolve jaxlib's PyTreeDef
        if flattened != len(self.keys):
            raise RuntimeError(
                f"{fn}: decaymask read {len(self.keys)} leaves where jax flattens "
                f"{flattened}; this is a bug in decaymask, please report it "
                f"with the tree's structure."
            )

    # Visiting.

    def _start(self) -> None:
        """Visits the whole tree, from empty tables."""
        self.keys: list[int] = []
        self.repeats = Repeats()
        # Signature -> ResolvedModule, or -> {shapes: ResolvedModule} where inference
        # read shapes. Modules read in key order (_visit) and layers read in their own
        # order (_visit_layer) have signatures of different forms: one table each.
        self.signatures: dict[tuple, Any] = {}
        self.layer_signatures: dict[tuple, Any] = {}
        self.owner_ids: dict[tuple, int] = {}
        self.key_ids: dict[tuple, int] = {}
        self.tokens = 0  # a ResolvedModule's token stands for it in its children's signatures
        # Leaf index -> (collection, path, name, array, module, direct): every key's first.
        self.located: dict[int, tuple] = {}
        self.seen: set[int] = set()
        self.complete = False
        self.proved = False  # by names, a module's arrays proved a stack
        # The other collections of a variables mapping, by module path.
        self.other: dict[tuple[str, ...], dict[str, Any]] = {}
        self.other_children: dict[tuple[str, ...], set[str]] = {}
        self.other_paths: set[tuple[str, ...]] = set()
        self.by_path: dict[tuple[str, ...], tuple[LinenModule, dict[str, Any]]] = {}
        self.params = self.tree
        self.base = 0
        if self.variables:
            self._variables()
        else:
            self._run(self.params, False)

    def _run(self, node: Any, everything: bool) -> None:
        """Visits the tree below ``node`` (the params), one module at a time."""
        stack = [self._visit(node, (), None, everything)]
        while stack:
            try:
                stack.append(self._visit(*next(stack[-1])))
            except StopIteration:
                stack.pop()

    def _visit(
        self,
        node: Any,
        path: tuple[str, ...],
        parent: ResolvedModule | None,
        everything: bool,
    ) -> Visit:
        """Appends the keys of the arrays below ``node``, the module at ``path``."""
        mapping = mapping_of(node)
        if mapping is not None and STR_ONLY.issuperset(map(type, mapping)):
            names = sorted(mapping)
        else:
            names, mapping = self._items(node, self._names(path))
        direct: dict[str, Any] = {}
        kinds: list[int] = []
        dtypes: list[Any] = []
        children: list[str] = []
        careful = self.careful
        for name in names:
            value = mapping[name]
            kind = type(value)
            if (kind is dict or kind is FrozenDict) and value and not careful:
                # Holds a leaf, or the visit below finds it holds none (EmptyNode).
                kinds.append(AT_NODE)
                children.append(name)
                continue
            if leaf_kinds.get(kind) is ARRAY:
                at = AT_LEAF
            else:
                at, value = self._classify(self._names(path), name, value)
            kinds.append(at)
            if at is AT_LEAF:
                direct[name] = value
                dtypes.append(value.dtype)
            elif at is AT_NODE:
                children.append(name)
        signature: tuple = (parent.token if parent is not None else -1,
                            key_traits(path[-1]) if path else -1,
                            tuple(names), tuple(kinds), tuple(dtypes))
        other = None
        gathered = False
        if not self.fast:
            if self.trace is not None:
                signature += (trace_facts(self.trace, path, direct),)
            gathered = self.variables and path in self.other_paths
            if gathered:
                other = self.other.get(path)
                below = self.other_children.get(path, set())
                signature += (
                    tuple(other or ()),
                    tuple(map(dtype_of, (other or {}).values())),
                    shapes_of(other or {}),
                    tuple(sorted(below)),
                )
                children = children + sorted(below.difference(children))
        resolved = self.signatures.get(signature)
        if type(resolved) is dict:
            resolved = resolved.get(shapes_of(direct))
        if resolved is None:
            layout = tuple(zip(names, kinds))
            resolved = self._resolve(
                self.signatures, signature, path, parent, direct, children, layout, other=other
            )
        if gathered:
            self.by_path[path] = (resolved.module, direct)
        own = iter(resolved.keys)
        fast, layers = self.fast, self.layers
        for name, at in resolved.layout:  # type: ignore[union-attr]
            if at is AT_LEAF:
                if resolved.emitted and not everything:
                    self.keys.append(next(own))
                else:
                    next(own)
                    self._locate(resolved, path, {name: direct[name]}, direct, everything)
            elif at is AT_NODE:
                value = mapping[name]
                if not (layers and self._visit_layer(value, path, name, resolved, everything)):
                    repeats = self.repeats if layers and not everything else None
                    if repeats is not None:
                        traits = traits_of.get(name)
                        family = (resolved.token, key_traits(name) if traits is None else traits)
                        facts = () if fast else facts_below(self.trace, path + (name,))
                        keys, found = repeats.find(family, value, facts)
                        if keys is not None:  # a block alike to one read before
                            self.keys.extend(keys)
                            continue
                    before = len(self.keys)
                    yield value, path + (name,), resolved, everything
                    if len(self.keys) == before:
                        raise EmptyNode
                    if repeats is not None:
                        repeats.note(family, value, tuple(self.keys[before:]), found, facts)
        resolved.emitted = True

    def _visit_layer(
        self, node: Any, path: tuple[str, ...], name: str, parent: ResolvedModule, everything: bool
    ) -> bool:
        """Visits the submodule ``name`` of the module at ``path``, if it is a layer:
        a dict or FrozenDict of arrays (or boxes around arrays) of known types only, as
        every layer of most models is. Its signature is read off its values in their own
        order, without sorting. ``False`` where it is not such a layer."""
        if type(node) is FrozenDict:
            node = node._dict
        elif type(node) is not dict:
            return False
        values = node.values()
        arrays: Any = values
        if not plain_types.issuperset(map(type, values)):
            if not leafy_types.issuperset(map(type, values)):
                return False
            # Boxes (nn.Partitioned): the arrays inside say what the module is.
            arrays = [unbox(v) if type(v) in box_types else v for v in values]
            if not plain_types.issuperset(map(type, arrays)):
                return False
            self.boxed = True
        traits = traits_of.get(name)
        if traits is None:
            traits = key_traits(name)
        signature: tuple = (parent.token, traits, tuple(node), tuple(map(dtype_of, arrays)))
        if self.trace is not None:
            signature += (trace_facts(self.trace, path + (name,), node),)
        resolved = self.layer_signatures.get(signature)
        if type(resolved) is dict:
            own = node if arrays is values else dict(zip(node, arrays))
            resolved = resolved.get(shapes_of(own))
        if resolved is None:
            if not STR_ONLY.issuperset(map(type, node)):
                return False
            names = sorted(node)
            own = dict(zip(node, arrays))
            resolved = self._resolve(
                self.layer_signatures,
                signature,
                path + (name,),
                parent,
                {key: own[key] for key in names},
                (),
                None,
                keyed_by=own,
            )
        if resolved.emitted and not everything:
            self.keys.extend(resolved.keys)
        else:
            own = dict(zip(node, arrays))
            direct = {key: own[key] for key in resolved.names}
            self._locate(resolved, path + (name,), direct, direct, everything)
        return True

    def _locate(
        self,
        resolved: ResolvedModule,
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
                self.located[len(keys)] = ("params", path, name, array, module, direct)
            keys.append(key)
        if arrays is direct:
            resolved.emitted = True

    def _resolve(
        self,
        table: dict[tuple, Any],
        signature: tuple,
        path: tuple[str, ...],
        parent: ResolvedModule | None,
        direct: dict[str, Any],
        children: list[str] | tuple[()],
        layout: tuple[tuple[str, int], ...] | None,
        keyed_by: dict[str, Any] | None = None,
        other: dict[str, Any] | None = None,
    ) -> ResolvedModule:
        """Infers the module of a new signature, and the keys of the params it owns.

        Where inference read shapes, the module is filed under the shapes of
        ``keyed_by`` (``direct`` in the order its later look-ups see), default
        ``direct``. ``other`` holds the module's arrays in a variables mapping's other
        collections."""
        watched = WatchedArrays(direct or other or {})
        merged = WatchedArrays({**direct, **other}) if direct and other else watched
        module = self.infer_module(
            path, parent.module if parent is not None else None, watched, merged, children
        )
        if module.batch and self.trace is None:
            self.proved = True
        keys = tuple(
            self.key_ids.setdefault((self._owner_id(module), name, is_floating(array)), len(self.key_ids))
            for name, array in direct.items()
        )
        resolved = ResolvedModule(module, self.tokens, keys, tuple(direct), layout)
        self.tokens += 1
        if watched.looked or merged.looked:
            by_shapes = table.get(signature)
            if type(by_shapes) is not dict:
                by_shapes = table[signature] = {}
            by_shapes[shapes_of(direct if keyed_by is None else keyed_by)] = resolved
        else:
            table[signature] = resolved
        return resolved

    # Leaves.

    def _locate_all(self) -> None:
        """Locates every leaf, once (a leaf that is no key's first is located only by
        visiting once more)."""
        if not self.complete:
            keys = self.keys
            self.keys = keys[: self.base]
            self._run(self.params, True)
            self.keys = keys
            self.complete = True

    def _find_lifted(self) -> None:
        """The lifted modules of user-named stacks that some arrays proved by names."""
        self._locate_all()
        arrays = []
        for collection, path, name, array, module, _ in self.located.values():
            if collection == "params":
                shape = tuple(array.shape)
                arrays.append((path, shape, self.one_layer_ndim(path, name, module),
                               self.own_proof(shape, module)))
        self.lifted = lifted_modules(arrays)

    def _build_leaf(self, index: int) -> Leaf:
        found = self.located.get(index)
        if found is None:
            self._locate_all()
            found = self.located[index]
        collection, path, name, array, module, direct = found
        return self.leaf_record(collection, path, name, array, module, direct)
