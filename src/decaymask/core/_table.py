"""Leaves an adapter builds on demand, each with a cheap key."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any, overload

from ._leaf import Leaf


class LeafTable(Sequence[Leaf]):
    """A sequence of :class:`Leaf` records that an adapter builds only when asked.

    Building a mask reads, for most policies, nothing but a leaf's owner, ancestors,
    role, name and whether it can decay at all; many leaves share those (every block of
    a deep model). An adapter gives each leaf a hashable key that is equal only for
    leaves that agree on all of that, and a function that builds the full record; the
    policy then decides once per key and builds records only where a rule reads a
    path, a rank or ``when=``, where a warning names paths, or for a report.

    Keys must be unique for a leaf with :attr:`Leaf.shared_with` views.
    """

    __slots__ = ("keys", "_build", "_built")

    def __init__(self, keys: Sequence[Hashable], build: Callable[[int], Leaf]):
        self.keys = keys
        self._build = build
        self._built: dict[int, Leaf] = {}

    def __len__(self) -> int:
        return len(self.keys)

    @overload
    def __getitem__(self, index: int) -> Leaf: ...
    @overload
    def __getitem__(self, index: slice) -> list[Leaf]: ...
    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self.keys)
        leaf = self._built.get(index)
        if leaf is None:
            if not 0 <= index < len(self.keys):
                raise IndexError(index)
            leaf = self._built[index] = self._build(index)
        return leaf

    def __iter__(self) -> Iterator[Leaf]:
        return (self[i] for i in range(len(self.keys)))

    def release(self) -> None:
        """Drops the records and the function that builds them. An adapter's walk
        usually holds its table, and the table its walk's method: releasing the table
        breaks that cycle, so that the walk is freed as soon as it is dropped, without
        waiting for the cyclic garbage collector."""
        self._build = _released
        self._built = {}

    def representatives(self) -> dict[Hashable, int]:
        """The first index of every distinct key, in order."""
        first: dict[Hashable, int] = {}
        for i, key in enumerate(self.keys):
            if key not in first:
                first[key] = i
        return first

    def indices_of(self, wanted: set[Hashable]) -> list[int]:
        return [i for i, key in enumerate(self.keys) if key in wanted]


def _released(index: int) -> Leaf:
    raise RuntimeError("this LeafTable was released: its leaves can no longer be built")


def as_table(leaves: Sequence[Leaf]) -> LeafTable:
    """A table over ready-made leaves: every leaf its own key."""
    items = list(leaves)
    return LeafTable(list(range(len(items))), items.__getitem__)
