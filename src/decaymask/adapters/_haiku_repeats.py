"""Blocks of Haiku params read before: the keys of a module (``block_7``, ``block_7/...``)
alike to an earlier one's take the earlier one's readings, without reading a module.

By names, a Haiku module is read from its parent's reading, its own name's
:class:`~._haiku_segments.Segment` (equal for ``block_0`` and ``block_7``), its params'
names and shapes and, where it has none, its submodules' names; a param's key adds its
name and dtype. So two modules of one parent reading and one Segment whose keys below
them are the same, in the same order, holding params of the same names, shapes and
dtypes, are read alike, module for module: the second one's spans are the first one's
with its own keys.

A run is the keys of one module (``block_7`` for its own params, then ``block_7/...``),
consecutive in sorted order; a run alike to no earlier one is read as runs one level
further in. A name whose keys sorting splits (``a``, ``a-b/y``, ``a/x``), and a
constructor's modules (``~``), are read key by key. A family is one parent reading, one
Segment and one run length (``_families``).
"""

from __future__ import annotations

import operator
from bisect import bisect_left
from collections.abc import Mapping, Sequence
from itertools import accumulate, chain
from typing import Any

from ._families import Families
from ._structure import described_of, treedef_of

_shape_of = operator.attrgetter("shape")
_values = operator.methodcaller("values")
_dtype_of = operator.attrgetter("dtype")
_DICT = frozenset({dict})


def runs(order: Sequence[str], paths: Mapping[str, tuple[str, ...]], lo: int, hi: int,
         depth: int) -> list[tuple[int, int]]:
    """(start, end) in ``order[lo:hi]`` of every run of the keys below one module at
    ``depth`` (its own params' key and those below it: ``segments[depth]`` names it)
    that holds all of them; keys that end above ``depth`` are in none.

    ``order[lo:hi]`` is sorted and shares its first ``depth`` segments, so the keys
    below a module ``P`` are one range (``P/`` up to ``P0``: ``0`` sorts right after
    ``/``), found by bisection; only keys such as ``P-b`` sort between ``P`` and ``P/``,
    and split a module's keys in two.
    """
    found: list[tuple[int, int]] = []
    split: set[str] = set()
    i = lo
    while i < hi:
        key = order[i]
        segments = paths[key]
        if len(segments) <= depth:
            i += 1
            continue
        if len(segments) == depth + 1:  # the module's own params: `P`, then `P/...`
            below = bisect_left(order, key + "/", i + 1, hi)
            end = bisect_left(order, key + "0", below, hi)
            if below == end:
                found.append((i, i + 1))
            elif below == i + 1:
                found.append((i, end))
            else:  # `P`, `P-b/...`, `P/...`: read key by key
                split.add(key)
            i += 1 if below != i + 1 else end - i
            continue
        head = key[: sum(map(len, segments[: depth + 1])) + depth]
        end = bisect_left(order, head + "0", i + 1, hi)
        if head not in split:
            found.append((i, end))
        i = end
    return found


def fingerprint(tree: Mapping[str, Any], keys: Sequence[str], skip: int) -> tuple | None:
    """What a reading by names reads of the keys of one run, each without its first
    ``skip`` characters (the top-level name); ``None`` where a value is no array."""
    direct = list(map(tree.__getitem__, keys))
    values = list(chain.from_iterable(map(_values, direct)))
    try:
        return (tuple([key[skip:] for key in keys]), tuple(map(len, direct)),
                tuple(chain.from_iterable(direct)), tuple(map(_shape_of, values)),
                tuple(map(_dtype_of, values)))
    except AttributeError:  # optax.MaskedNode, or another value a walk reads on its own
        return None


class Repeats(Families):
    """The spans and keys each run of a walk made, by family (the parent's reading, the
    module's Segment, the run's length) and fingerprint (:func:`fingerprint`).

    Where the params are a dict of dicts whose signature this build took, one leaf per
    value, a run's shapes and dtypes are slices of the signature's (``described``, in
    jax's order: keys sorted, names sorted), from each key's first leaf (``starts``);
    both are found at the first fingerprint, so params without repeated blocks pay
    nothing for them."""

    __slots__ = ("checked", "described", "order", "starts", "tree")

    def __init__(self, tree: Mapping[str, Any], order: Sequence[str]) -> None:
        super().__init__()
        self.tree, self.order = tree, order
        self.described: tuple[tuple, tuple, tuple] | None = None
        self.starts: list[int] | None = None
        self.checked = False  # whether _starts looked

    def _starts(self) -> list[int] | None:
        """Where each key's leaves start in the signature's; ``None`` where a value is
        not one leaf (optax.MaskedNode, a pytree of several arrays: then there are fewer
        leaves, or more nodes, than values) or no signature was taken."""
        if self.checked:
            return self.starts
        self.checked = True
        tree, order = self.tree, self.order
        if type(tree) is not dict or not _DICT.issuperset(map(type, tree.values())):
            return None
        described = described_of(tree)
        if described is None:
            return None
        starts = list(accumulate(map(len, map(tree.__getitem__, order)), initial=0))
        nodes = treedef_of(tree).num_nodes  # type: ignore[attr-defined, unused-ignore]
        if starts[-1] == len(described[1]) and nodes == 1 + len(order) + starts[-1]:
            self.described, self.starts = described, starts
        return self.starts

    def fingerprint(self, member: Any) -> tuple | None:
        start, end, skip = member
        keys = self.order[start:end]
        starts = self._starts()
        if starts is None:
            return fingerprint(self.tree, keys, skip)
        direct = list(map(self.tree.__getitem__, keys))
        a, b = starts[start], starts[end]
        _, shapes, dtypes = self.described  # type: ignore[misc]
        return (tuple([key[skip:] for key in keys]), tuple(map(len, direct)),
                tuple(chain.from_iterable(direct)), shapes[a:b], dtypes[a:b])

    def find(self, family: tuple, start: int, end: int, skip: int) -> tuple[Any, Any]:
        """(the result of an earlier run alike to ``order[start:end]``, or ``None``; the
        run's fingerprint for :meth:`note`, where one was taken)."""
        return self._find(family, (start, end, skip))

    def note(self, family: tuple, start: int, end: int, skip: int, result: Any,
             found: Any) -> None:
        """Records what reading ``order[start:end]`` made; ``found`` is what
        :meth:`find` returned."""
        self._note(family, (start, end, skip), result, found)
