"""The names-only walk of params: plain dicts and FrozenDicts, one recursive pass."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

from flax.core.frozen_dict import FrozenDict

from ...core._leaf import Leaf
from ...core._table import LeafTable
from ._arrays import (
    ARRAY,
    BOX,
    box_types,
    classify_leaf,
    dtype_of,
    is_floating,
    leaf_kinds,
    leafy_types,
    plain_types,
    shapes_of,
    unbox,
)
from ._infer import owner_identity
from ._leaf import LinenReader
from ._signature import (
    AT_DICT,
    AT_FROZEN,
    AT_LEAF,
    NamesWalkFallback,
    ResolvedModule,
    WatchedArrays,
    key_traits,
    rebuilt_mapping,
    traits_of,
)

_NAMED_DEPTH = 100  # levels of modules the recursive names-only walk takes


class LinenNamesWalk(LinenReader):
    """Names-only params of plain dicts and FrozenDicts: one recursive pass, no flatten.

    Modules with the same parent, key traits, array names and dtypes and submodule
    keys (and, where inference reads them, the same kernel, weight and bias shapes)
    share one signature and are inferred once: the blocks of a deep model cost a
    dictionary lookup each. The walk keeps an int per leaf and, per module, a reference
    to its signature's :class:`ResolvedModule`, which :meth:`rebuild` reads back in order
    instead of walking the tree again. The first leaf of each key is located for the
    core; any other leaf is found by walking once more, on demand. Nothing per leaf or
    per module outlives the walk but those references, so that a large tree does not
    wake the cyclic garbage collector.

    Raises:
      NamesWalkFallback: a value that is neither a mapping of these two types nor an
        array (or a box around one), an empty mapping below the root, or a key that is
        not a string: :class:`LinenTreeWalk` reads or rejects the tree exactly.
    """

    def __init__(self, fn: str, tree: Mapping):
        self.fn = fn
        self.trace = None
        self.tree = tree
        self.keys: list[int] = []
        self.plan: list[ResolvedModule] = []
        # Signature -> ResolvedModule, or -> {shapes: ResolvedModule} where inference
        # read shapes.
        # Modules read in key order (_visit) and layers read in their own order
        # (_visit_layer) have signatures of different forms: one table each.
        self.signatures: dict[tuple, Any] = {}
        self.leaf_signatures: dict[tuple, Any] = {}
        self.owner_ids: dict[tuple, int] = {}
        self.key_ids: dict[tuple, int] = {}
        # A ResolvedModule's token stands for its module in its children's signatures.
        self.tokens = 0
        # Leaf index -> (path, name, array, module, direct): every key's first leaf.
        self.located: dict[int, tuple] = {}
        self.seen: set[int] = set()
        self.complete = False
        self._visit(tree._dict if type(tree) is FrozenDict else tree, (), None, False)
        self.leaves = LeafTable(self.keys, self._build_leaf)

    def _visit(
        self,
        node: Mapping[str, Any],
        path: tuple[str, ...],
        parent: ResolvedModule | None,
        everything: bool,
    ) -> None:
        """Appends the keys of the arrays below ``node``, the module at ``path``."""
        if len(path) > _NAMED_DEPTH:
            # This walk recurses once per level; LinenTreeWalk is not limited by the stack.
            raise NamesWalkFallback
        try:
            names = sorted(node)
        except Exception:  # noqa: BLE001 - whatever jax's own sort would raise instead
            # Keys jax cannot sort either: its flatten says why.
            raise NamesWalkFallback from None
        direct: dict[str, Any] = {}
        kinds: list[int] = []
        dtypes: list[Any] = []
        children: list[str] = []
        for name in names:
            value = node[name]
            kind = type(value)
            if kind is dict or kind is FrozenDict:
                if not value:
                    # Not a module to jax (it holds no array): only LinenTreeWalk's
                    # children, read off the paths of arrays, leave it out exactly.
                    raise NamesWalkFallback
                # Every mapping below holds something, and the walk falls back on
                # anything but arrays: this submodule holds arrays.
                kinds.append(AT_DICT if kind is dict else AT_FROZEN)
                children.append(name)
                continue
            what = leaf_kinds.get(kind)
            if what is None:
                what = classify_leaf(value)
            if what is BOX:
                value = unbox(value)
                what = leaf_kinds.get(type(value))
                if what is None:
                    what = classify_leaf(value)
                if what is not ARRAY:
                    raise NamesWalkFallback
            elif what is not ARRAY:
                raise NamesWalkFallback
            direct[name] = value
            kinds.append(AT_LEAF)
            dtypes.append(value.dtype)
        signature = (
            parent.token if parent is not None else -1,
            key_traits(path[-1]) if path else -1,
            tuple(names),
            tuple(kinds),
            tuple(dtypes),
        )
        resolved = self.signatures.get(signature)
        if type(resolved) is dict:
            resolved = resolved.get(shapes_of(direct))
        if resolved is None:
            layout = tuple(zip(names, kinds)) if children else None
            resolved = self._resolve_signature(
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
            if child_kind is not AT_LEAF:
                value = node[name]
                value = value if child_kind is AT_DICT else value._dict
                self._visit_layer(value, path, name, resolved, everything)
            elif resolved.emitted and not everything:
                self.keys.append(next(own))
            else:
                next(own)
                self._locate(resolved, path, {name: direct[name]}, direct, everything)
        resolved.emitted = True

    def _visit_layer(
        self, node: dict, path: tuple[str, ...], name: str, parent: ResolvedModule, everything: bool
    ) -> None:
        """Visits the submodule ``name`` of the module at ``path``.

        A module that holds arrays (or boxes around arrays) of known types only, as
        every layer of most models does, takes the short way: its signature is read
        off its values in their own order, without sorting.
        """
        values = node.values()
        arrays: Any = values
        if not plain_types.issuperset(map(type, values)):
            if not leafy_types.issuperset(map(type, values)):
                self._visit(node, path + (name,), parent, everything)
                return
            # Boxes (nn.Partitioned): the arrays inside say what the module is.
            arrays = [unbox(v) if type(v) in box_types else v for v in values]
            if not plain_types.issuperset(map(type, arrays)):
                self._visit(node, path + (name,), parent, everything)
                return
        traits = traits_of.get(name)
        if traits is None:
            traits = key_traits(name)
        signature = (parent.token, traits, tuple(node), tuple(map(dtype_of, arrays)))
        resolved = self.leaf_signatures.get(signature)
        if type(resolved) is dict:
            own = node if arrays is values else dict(zip(node, arrays))
            resolved = resolved.get(shapes_of(own))
        if resolved is None:
            try:
                names = sorted(node)
            except Exception:  # noqa: BLE001 - whatever jax's own sort would raise instead
                raise NamesWalkFallback from None
            own = dict(zip(node, arrays))
            resolved = self._resolve_signature(
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
                self.located[len(keys)] = (path, name, array, module, direct)
            keys.append(key)
        if arrays is direct:
            resolved.emitted = True

    def _resolve_signature(
        self,
        table: dict[tuple, Any],
        signature: tuple,
        path: tuple[str, ...],
        parent: ResolvedModule | None,
        direct: dict[str, Any],
        children: list[str] | tuple[()],
        layout: tuple[tuple[str, int], ...] | None,
        keyed_by: dict[str, Any] | None = None,
    ) -> ResolvedModule:
        """Infers the module of a new signature, and the keys of the arrays it owns.

        Where inference read shapes, the module is filed under the shapes of
        ``keyed_by`` (``direct`` in the order its later look-ups see), default
        ``direct``."""
        for name in direct:
            if type(name) is not str:
                raise NamesWalkFallback
        watched = WatchedArrays(direct)
        module = self.infer_module(
            path, parent.module if parent is not None else None, watched, watched, children
        )
        owner = module.absorbed_by or module
        owner_id = self.owner_ids.setdefault(
            owner_identity(owner), len(self.owner_ids)
        )
        keys = tuple(
            self.key_ids.setdefault((owner_id, name, is_floating(array)), len(self.key_ids))
            for name, array in direct.items()
        )
        resolved = ResolvedModule(module, self.tokens, keys, tuple(direct), layout)
        self.tokens += 1
        if watched.looked:
            by_shapes = table.get(signature)
            if type(by_shapes) is not dict:
                by_shapes = table[signature] = {}
            by_shapes[shapes_of(direct if keyed_by is None else keyed_by)] = resolved
        else:
            table[signature] = resolved
        return resolved

    def _build_leaf(self, index: int) -> Leaf:
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
        return self.leaf_record("params", path, name, array, module, direct)

    def rebuild(self, values: list[Any]) -> Any:
        """One value per leaf, in the tree's own containers (jax's key order)."""
        if len(values) != len(self.keys):
            raise ValueError(
                f"{self.fn}: expected {len(self.keys)} values, one per leaf, got "
                f"{len(values)}."
            )
        plan = iter(self.plan).__next__
        built = rebuilt_mapping(plan(), plan, iter(values))
        if type(self.tree) is FrozenDict:
            return FrozenDict(built, __unsafe_skip_copy__=True)
        return built

