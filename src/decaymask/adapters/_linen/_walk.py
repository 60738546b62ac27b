"""The walk of any Linen mapping, with or without a trace: one flatten, modules by path."""

from __future__ import annotations

import reprlib
from typing import Any

import jax

from ...core._leaf import Leaf
from ...core._table import LeafTable
from .._common import key_name, path_text
from ._arrays import is_array_leaf, is_box, is_floating, str_keys, unbox
from ._infer import LinenModule, owner_identity
from ._leaf import LinenReader
from ._trace import LinenTrace, trace_init, wanted_names, warn_unseen
from ._variables import check_not_equinox, looks_like_variables, undecidable_error


class LinenTreeWalk(LinenReader):
    """Any Linen mapping, with or without a trace: one flatten, modules by path.

    Variables mappings (a module's arrays spread over collections) and traced models
    take this walk; names-only params take :class:`LinenNamesWalk`, which gives the same
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
        flat, self.treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_box)
        if len(flat) == 1 and flat[0][1] is tree:
            raise TypeError(
                f"{fn}: expected a Linen params or variables mapping (dict or FrozenDict), "
                f"got {type(tree).__name__}, which jax treats as a single leaf."
            )
        check_not_equinox(fn, tree, flat)
        keyed = [(str_keys(keys), value) for keys, value in flat]
        reading = looks_like_variables(tree)
        if reading is None and module is None:
            raise undecidable_error(fn, tree)
        # Undecided: the trace decides (_reading).
        self.variables = reading is not False
        self.trace: LinenTrace | None = None
        traced_shapes: dict[str, tuple[int, ...]] = {}
        if module is not None:
            wanted = wanted_names(keyed, self.variables)
            self.trace = trace_init(fn, module, args, kwargs, wanted)
            traced_shapes = self._traced_param_shapes()
            self.variables = self._reading(keyed, traced_shapes)
        entries = self._entries(keyed)
        if self.trace is not None:
            self._check_trace(entries, traced_shapes)
            if self._unseen():
                self.trace = trace_init(fn, module, args, kwargs, wanted, eager=True)
                unseen = self._unseen()
                if unseen:
                    warn_unseen(fn, type(module).__name__, unseen)
        self.children: dict[tuple[str, ...], set[str]] = {}
        for path in list(self.direct) + list(self.direct_other):
            for i in range(len(path) - 1, -1, -1):
                seen = path[:i] in self.children
                self.children.setdefault(path[:i], set()).add(path[i])
                if seen:
                    break
        self.modules: dict[tuple[str, ...], LinenModule] = {}
        # One leaf per flat position: a result is the treedef unflattened over them.
        self.leaves = LeafTable(self._leaf_keys(entries), lambda i: self._entry_leaf(*entries[i]))

    def _leaf_keys(self, entries: list) -> list[int]:
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
                module = self.module_at(path)
                owner = module.absorbed_by or module
                owner_id = owner_ids[path] = interned.setdefault(
                    owner_identity(owner), len(interned)
                )
            keys.append(
                key_ids.setdefault(
                    (owner_id, collection, key, is_floating(array)), len(key_ids)
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
            array = unbox(value) if is_box(value) else value
            if not is_array_leaf(array) or not rest:
                raise TypeError(
                    f"{self.fn}: leaf {path_text(names)!r} is {reprlib.repr(array)} "
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
        return self.leaf_record(
            collection, path, key, array, self.module_at(path), self.direct.get(path, {})
        )

    # The trace against the tree.

    def _unseen(self) -> list[str]:
        """Module paths holding params where the trace saw no module at all."""
        seen = self.trace.classes  # type: ignore[union-attr]
        unseen = []
        for path in self.direct:
            if path and not any(path[:i] in seen for i in range(1, len(path) + 1)):
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

    def _reading(self, keyed: list, traced: dict[str, tuple[int, ...]]) -> bool:
        """Whether the tree is a variables mapping, as the traced model tells."""
        if not self.variables:
            return False
        as_variables = {
            path_text(names[1:]) for names, _ in keyed if names and names[0] == "params"
        }
        if as_variables == set(traced):
            return True
        as_params = {path_text(names) for names, _ in keyed}
        # A model with a top-level submodule named "params": its keys are modules.
        return as_params != set(traced)

    def _check_trace(self, entries: list, traced: dict[str, tuple[int, ...]]) -> None:
        given = {
            path_text(entry[1] + (entry[2],)): tuple(entry[3].shape)
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

    def module_at(self, path: tuple[str, ...]) -> LinenModule:
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
            found = self.infer_module(here, parent, direct, merged, self.children.get(here, ()))
            self.modules[here] = found
        return found  # type: ignore[return-value]
