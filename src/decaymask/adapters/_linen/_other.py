"""A variables mapping's collections other than ``params``: gathered before the params
are visited, since a module's kind is read off its arrays in every collection."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from ._arrays import is_floating
from ._infer import LinenModule, owner_identity
from ._nodes import AT_LEAF, AT_NODE, NodeReader

# A leaf of another collection: (module path, name, array).
Entry = tuple[tuple[str, ...], str, Any]


class OtherCollections(NodeReader):
    """The other collections of a variables mapping, by module path, and their leaves.

    Their leaves are keyed and located as they are gathered; the modules at their paths
    are those the params visit found there (``by_path``), or read off these
    collections alone where the params have none.
    """

    keys: list[int]
    key_ids: dict[tuple, int]
    owner_ids: dict[tuple, int]
    located: dict[int, tuple]
    params: Any
    base: int  # the leaves before the params', in jax's order
    other: dict[tuple[str, ...], dict[str, Any]]
    other_children: dict[tuple[str, ...], set[str]]
    other_paths: set[tuple[str, ...]]
    by_path: dict[tuple[str, ...], tuple[LinenModule, dict[str, Any]]]
    tree: Any

    def _run(self, node: Any, everything: bool) -> None:
        """Visits the params below ``node`` (:class:`LinenWalk` does)."""
        raise NotImplementedError

    def _owner_id(self, module: LinenModule) -> int:
        """A small int per distinct owner (what a policy can read of it)."""
        owner = module.absorbed_by or module
        return self.owner_ids.setdefault(owner_identity(owner), len(self.owner_ids))

    def _variables(self) -> None:
        """Gathers the other collections, visits the params, then keys the others."""
        names, values = self._items(self.tree, ())
        gathered: list[list[Entry] | None] = []
        for name in names:
            value = values[name]
            if name == "params":
                self.params = value
                gathered.append(None)
            else:
                gathered.append(self._gather(name, value))
        before = names.index("params")
        self.base = sum(len(entries or ()) for entries in gathered[:before])
        for path in self.other:
            for i in range(len(path) - 1, -1, -1):
                seen = path[:i] in self.other_paths
                self.other_children.setdefault(path[:i], set()).add(path[i])
                self.other_paths.add(path[:i])
                if seen:
                    break
            self.other_paths.add(path)
        self.keys.extend([0] * self.base)
        self._run(self.params, False)
        index = 0
        for collection, entries in zip(names, gathered):
            if entries is None:
                index = len(self.keys)
                continue
            for path, name, array in entries:
                module, direct = self._module_at(path)
                key = self.key_ids.setdefault(
                    (self._owner_id(module), collection, name, is_floating(array)),
                    len(self.key_ids),
                )
                self.located[index] = (collection, path, name, array, module, direct)
                if index < self.base:
                    self.keys[index] = key
                else:
                    self.keys.append(key)
                index += 1

    def _gather(self, collection: str, node: Any) -> list[Entry]:
        """(module path, name, array) of every leaf of a collection, in jax's order."""
        entries: list[Entry] = []
        stack: list[tuple[tuple[str, ...], Iterator[tuple[Any, Any]]]] = [
            ((), self._pairs(node, (collection,)))
        ]
        while stack:
            path, items = stack[-1]
            for name, value in items:
                kind, value = self._classify((collection, *path), name, value)
                if kind is AT_LEAF:
                    entries.append((path, name, value))
                    self.other.setdefault(path, {})[name] = value
                elif kind is AT_NODE:
                    here = path + (name,)
                    stack.append((here, self._pairs(value, (collection, *here))))
                    break
            else:
                stack.pop()
        return entries

    def _pairs(self, node: Any, where: tuple[str, ...]) -> Iterator[tuple[str, Any]]:
        names, values = self._items(node, where)
        return iter([(name, values[name]) for name in names])

    def _module_at(self, path: tuple[str, ...]) -> tuple[LinenModule, dict[str, Any]]:
        """The module at a path the params visit did not reach, and its params (none)."""
        found = self.by_path.get(path)
        if found is not None:
            return found
        todo = [path]
        while todo[-1] and todo[-1][:-1] not in self.by_path:
            todo.append(todo[-1][:-1])
        for here in reversed(todo):
            parent = self.by_path[here[:-1]][0] if here else None
            other = self.other.get(here, {})
            module = self.infer_module(
                here, parent, other, other, sorted(self.other_children.get(here, ()))
            )
            found = self.by_path[here] = (module, {})
        return found  # type: ignore[return-value]
