"""Blocks of Haiku params read before: the keys of a module (``block_7``, ``block_7/...``)
alike to an earlier one's take the earlier one's readings, without reading a module.

By names, a Haiku module is read from its parent's reading, its own name's
:class:`~._haiku_modules.Segment` (equal for ``block_0`` and ``block_7``), its params'
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
from collections.abc import Mapping, Sequence
from typing import Any

from ._families import Families

_shape_of = operator.attrgetter("shape")
_dtype_of = operator.attrgetter("dtype")


def runs(order: Sequence[str], paths: Mapping[str, tuple[str, ...]], lo: int, hi: int,
         depth: int) -> list[tuple[int, int]]:
    """(start, end) in ``order[lo:hi]`` of every run of the keys below one module at
    ``depth`` (its own params' key and those below it: ``segments[depth]`` names it)
    that holds all of them; keys that end above ``depth`` are in none."""
    found: list[tuple[int, int]] = []
    split: set[str] = set()
    seen: set[str] = set()
    start, first = lo, None
    for i in range(lo, hi):
        segments = paths[order[i]]
        head = segments[depth] if len(segments) > depth else None
        if head != first:
            if first is not None:
                found.append((start, i))
            if head is not None:
                if head in seen:
                    split.add(head)
                seen.add(head)
            start, first = i, head
    if first is not None:
        found.append((start, hi))
    if split:
        found = [(a, b) for a, b in found if paths[order[a]][depth] not in split]
    return found


def fingerprint(tree: Mapping[str, Any], keys: Sequence[str], skip: int) -> tuple | None:
    """What a reading by names reads of the keys of one run, each without its first
    ``skip`` characters (the top-level name); ``None`` where a value is no array."""
    out = []
    try:
        for key in keys:
            direct = tree[key]
            values = direct.values()
            out.append((key[skip:], tuple(direct), tuple(map(_shape_of, values)),
                        tuple(map(_dtype_of, values))))
    except AttributeError:  # optax.MaskedNode, or another value a walk reads on its own
        return None
    return tuple(out)


class Repeats(Families):
    """The spans and keys each run of a walk made, by family (the parent's reading, the
    module's Segment, the run's length) and fingerprint (:func:`fingerprint`)."""

    __slots__ = ("tree",)

    def __init__(self, tree: Mapping[str, Any]) -> None:
        super().__init__()
        self.tree = tree

    def fingerprint(self, member: Any) -> tuple | None:
        return fingerprint(self.tree, *member)

    def find(self, family: tuple, keys: Sequence[str], skip: int) -> tuple[Any, Any]:
        """(the result of an earlier run alike to ``keys``, or ``None``; the run's
        fingerprint for :meth:`note`, where one was taken)."""
        return self._find(family, (keys, skip))

    def note(self, family: tuple, keys: Sequence[str], skip: int, result: Any, found: Any) -> None:
        """Records what reading ``keys`` made; ``found`` is what :meth:`find` returned."""
        self._note(family, (keys, skip), result, found)
