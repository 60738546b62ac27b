"""The walk of any Linen mapping, with or without a trace: arrays by path, each distinct
module inferred once."""

from __future__ import annotations

import operator
from typing import Any

import jax

from ...core._leaf import Leaf
from ...core._table import LeafTable
from .._common import key_name, path_text
from ._arrays import dtype_of, is_box, is_floating, unbox
from ._gather import gather, key_traits
from ._infer import LinenModule, owner_identity
from ._leaf import LinenReader
from ._trace import LinenTrace, trace_init, wanted_names, warn_unseen
from ._variables import looks_like_variables, undecidable_error


class LinenTreeWalk(LinenReader):
    """Any Linen mapping (params or variables), with or without a trace.

    The tree is flattened once by jax for its structure (the rebuild is
    ``treedef.unflatten``) and read once for its arrays by path (:func:`gather`).
    Without a trace, modules with the same parent, key traits (:func:`key_traits`),
    array names and shapes in each collection and submodule keys are inferred once:
    :meth:`LinenInference.infer_module` reads nothing else of them, so the blocks of a
    deep model cost a dictionary lookup each. Trees this walk rejects are rejected
    with messages that name the offending path.
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
        # jax's own errors first (keys it cannot sort); boxes are leaves where any is.
        flat, self.treedef = jax.tree_util.tree_flatten(tree)
        if len(flat) == 1 and flat[0] is tree:
            raise TypeError(
                f"{fn}: expected a Linen params or variables mapping (dict or FrozenDict), "
                f"got {type(tree).__name__}, which jax treats as a single leaf."
            )
        found = self.found = gather(fn, tree)
        if found.boxed:
            flat, self.treedef = jax.tree_util.tree_flatten(tree, is_leaf=is_box)
        if len(found.node) != len(flat):
            raise RuntimeError(
                f"{fn}: read {len(found.node)} arrays in the tree, but jax flattens it "
                f"to {len(flat)} leaves. Please report this tree's structure."
            )
        reading = looks_like_variables(tree)
        if reading is None and module is None:
            raise undecidable_error(fn, tree)
        # Undecided: the trace decides (_reading).
        self.variables = reading is not False
        self.trace: LinenTrace | None = None
        traced_shapes: dict[str, tuple[int, ...]] = {}
        if module is not None:
            wanted = wanted_names(self._held_arrays(), self.variables)
            self.trace = trace_init(fn, module, args, kwargs, wanted)
            traced_shapes = self._traced_param_shapes()
            self.variables = self._reading(traced_shapes)
        self._number_modules()
        if self.trace is not None:
            self._check_trace(traced_shapes)
            if self._unseen():
                self.trace = trace_init(fn, module, args, kwargs, wanted, eager=True)
                unseen = self._unseen()
                if unseen:
                    warn_unseen(fn, type(module).__name__, unseen)
        self.modules = self._infer_modules()
        self.leaves = LeafTable(self._leaf_keys(), self._leaf_at)

    def _held_arrays(self) -> list[tuple[tuple[str, ...], dict[str, Any]]]:
        """(key path, arrays) of every node that holds arrays directly."""
        found = self.found
        return [(path, arrays) for path, arrays in zip(found.paths, found.arrays) if arrays]

    def _number_modules(self) -> None:
        """Numbers the module paths (a variables mapping's without their collection),
        a module after its parent, with what each holds in every collection."""
        found = self.found
        self.slot: list[int] = []  # per node: its module's number, -1 for none
        self.collection: list[str] = []  # per node
        self.paths: list[tuple[str, ...]] = []
        self.parents: list[int] = []
        self.params: list[dict[str, Any] | None] = []  # its arrays in params
        self.other: list[dict[str, Any] | None] = []  # in the other collections
        self.children: list[set[str] | None] = []
        numbers: dict[tuple[str, ...], int] = {}
        for m, raw in enumerate(found.paths):
            arrays = found.arrays[m]
            collection, path = "params", raw
            if self.variables:
                if not raw:
                    if arrays:
                        name, array = next(iter(arrays.items()))
                        raise TypeError(
                            f"{self.fn}: {name!r} is an array ({type(array).__name__}) "
                            f"at the top of a variables mapping, where only collections "
                            f"belong. Pass variables['params'], or the collections alone."
                        )
                    self.slot.append(-1)
                    self.collection.append("")
                    continue
                collection, path = raw[0], raw[1:]
            self.collection.append(collection)
            if not found.held[m]:
                self.slot.append(-1)
                continue
            s = numbers.get(path)
            children = found.children[m]
            if s is None:
                s = numbers[path] = len(self.paths)
                self.paths.append(path)
                up = found.parent[m]
                self.parents.append(self.slot[up] if up >= 0 else -1)
                self.params.append(None)
                self.other.append(None)
                self.children.append(children)
            elif children:
                self.children[s] = children | (self.children[s] or set())
            self.slot.append(s)
            if arrays:
                if collection == "params":
                    self.params[s] = arrays
                else:
                    other = self.other[s]
                    self.other[s] = arrays if other is None else {**other, **arrays}

    def _infer_modules(self) -> list[LinenModule]:
        """The module at every numbered path. Without a trace, modules with the same
        evidence (see infer_module: their parent, key traits, arrays' names and shapes
        in each collection, submodule keys) are one object, inferred once."""
        modules: list[LinenModule] = []
        alike: dict[tuple, LinenModule] = {}
        untraced = self.trace is None
        for path, up, params, other, children in zip(
            self.paths, self.parents, self.params, self.other, self.children
        ):
            parent = modules[up] if up >= 0 else None
            evidence = None
            if untraced:
                evidence = (
                    id(parent),
                    key_traits(path[-1]) if path else -1,
                    _shapes(params),
                    _shapes(other),
                    frozenset(children) if children else _NONE,
                )
                found = alike.get(evidence)
                if found is not None:
                    modules.append(found)
                    continue
            direct = params or other or {}
            merged = {**params, **other} if params and other else direct
            found = self.infer_module(path, parent, direct, merged, children or ())
            modules.append(found)
            if evidence is not None:
                alike[evidence] = found
        return modules

    def _leaf_keys(self) -> list[int]:
        """Per leaf, a key equal only for leaves a policy cannot tell apart by owner,
        ancestors, collection, name and whether it can decay: alike blocks of a deep
        model share them. Small ints, so that the core hashes them fast."""
        owner_ids: dict[int, int] = {}  # id of a module -> its owner's id
        interned: dict[tuple, int] = {}
        key_ids: dict[tuple, int] = {}
        by_names: dict[tuple, dict[str, int]] = {}
        node_keys: list[dict[str, int] | None] = []
        modules = self.modules
        for s, collection, arrays in zip(self.slot, self.collection, self.found.arrays):
            if not arrays:
                node_keys.append(None)
                continue
            module = modules[s]
            owner_id = owner_ids.get(id(module))
            if owner_id is None:
                owner = module.absorbed_by or module
                owner_id = owner_ids[id(module)] = interned.setdefault(
                    owner_identity(owner), len(interned)
                )
            signature = (owner_id, collection, tuple(arrays), tuple(map(dtype_of, arrays.values())))
            keys = by_names.get(signature)
            if keys is None:
                keys = by_names[signature] = {
                    name: key_ids.setdefault(
                        (owner_id, collection, name, is_floating(array)), len(key_ids)
                    )
                    for name, array in arrays.items()
                }
            node_keys.append(keys)
        return [node_keys[m][name] for m, name in zip(self.found.node, self.found.name)]  # type: ignore[index]

    def _leaf_at(self, index: int) -> Leaf:
        m, name = self.found.node[index], self.found.name[index]
        s = self.slot[m]
        return self.leaf_record(
            self.collection[m],
            self.paths[s],
            name,
            self.found.arrays[m][name],  # type: ignore[index]
            self.modules[s],
            self.params[s] or {},
        )

    # The trace against the tree.

    def _unseen(self) -> list[str]:
        """Module paths holding params where the trace saw no module at all."""
        seen = self.trace.classes  # type: ignore[union-attr]
        unseen = []
        for path, params in zip(self.paths, self.params):
            if params and path and not any(path[:i] in seen for i in range(1, len(path) + 1)):
                unseen.append(path_text(path))
        return sorted(unseen)

    def _traced_param_shapes(self) -> dict[str, tuple[int, ...]]:
        traced = self.trace.variables  # type: ignore[union-attr]
        flat, _ = jax.tree_util.tree_flatten_with_path(
            traced.get("params", {}), is_leaf=is_box
        )
        shapes = {}
        for keys, value in flat:
            array = unbox(value) if is_box(value) else value
            shapes[path_text(tuple(key_name(k) for k in keys))] = tuple(array.shape)
        return shapes

    def _reading(self, traced: dict[str, tuple[int, ...]]) -> bool:
        """Whether the tree is a variables mapping, as the traced model tells."""
        if not self.variables:
            return False
        held = self._held_arrays()
        as_variables = {
            path_text(path[1:] + (name,))
            for path, arrays in held
            if path and path[0] == "params"
            for name in arrays
        }
        if as_variables == set(traced):
            return True
        as_params = {path_text(path + (name,)) for path, arrays in held for name in arrays}
        # A model with a top-level submodule named "params": its keys are modules.
        return as_params != set(traced)

    def _check_trace(self, traced: dict[str, tuple[int, ...]]) -> None:
        given = {
            path_text(path + (name,)): tuple(array.shape)
            for path, arrays in zip(self.paths, self.params)
            if arrays
            for name, array in arrays.items()
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


def _shapes(arrays: dict[str, Any] | None) -> tuple | None:
    """The names and shapes of a module's arrays, in order."""
    if arrays is None:
        return None
    return tuple(arrays), tuple(map(_shape_of, arrays.values()))


_shape_of = operator.attrgetter("shape")
_NONE: frozenset[str] = frozenset()
