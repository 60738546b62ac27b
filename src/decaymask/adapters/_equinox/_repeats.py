"""Modules the Equinox walk has read before: a block alike to an earlier one gets the
earlier one's keys, without reading a module of it.

A leaf's key holds what its owner and the modules around it are (each read from its
class, its field name and, for a class known by its name, its arrays' shapes), whether
it is state, and its own name and dtype. A module's context follows from its parent's
context key, the field holding it and its own subtree. So two modules of one class in
fields of one name under contexts of one key, whose subtrees have equal treedefs (every
class, field and static value below them) and leaves of equal types, shapes and dtypes,
key their leaves alike, leaf for leaf: the second one's keys are the first one's.

Only a family's second member is checked at all (the first one of each family, parent
context key, field and class, is read with nothing added); a member alike to no earlier
one is read, and the later ones may be alike to it. A block holding an
``eqx.nn.Shared`` is read on its own (its views are found while its modules are read).
The contexts of a block not read are made when a leaf of it is built (for a report).
"""

from __future__ import annotations

import bisect
from typing import Any

import jax


def fingerprint(node: Any) -> tuple:
    """What the walk reads below ``node``: its treedef and every leaf's type, shape and
    dtype (``None`` for a leaf that has none)."""
    leaves, treedef = jax.tree_util.tree_flatten(node)
    return (treedef, tuple(map(type, leaves)),
            tuple([getattr(x, "shape", None) for x in leaves]),
            tuple([getattr(x, "dtype", None) for x in leaves]))


NEVER = ("never",)
"""What :meth:`Repeats._template` gives for a member no later one may take after."""


class Repeats:
    """The families of modules met in one walk, and the blocks alike to their first."""

    __slots__ = ("families", "flat", "hit")

    def __init__(self, flat: list[tuple[tuple, Any]]) -> None:
        self.flat = flat
        # family -> [members not yet made templates: (prefix, node, index of a leaf
        # below it, fingerprint or None), {fingerprint: template}]
        self.families: dict[tuple, list[Any]] = {}
        # The block alike to an earlier one that _context met: (prefix, template).
        self.hit: tuple[tuple, tuple] | None = None

    def met(self, family: tuple, prefix: tuple, node: Any, at: int) -> None:
        """Notes a module whose context was made, if it is its family's first."""
        if family not in self.families:
            self.families[family] = [[(prefix, node, at, None)], {}]

    def alike(self, walk: Any, family: tuple, prefix: tuple, node: Any) -> bool:
        """Whether the module ``node`` at ``prefix`` is alike to a member of its family
        walked before (then :attr:`hit` says how to key its leaves); if not, it is
        noted as a member."""
        entry = self.families.get(family)
        if entry is None:
            return False
        pending, table = entry
        if pending:
            left = []
            for member in pending:
                template = self._template(walk, *member[:3])
                if template is None:
                    left.append(member)  # not walked to its end yet
                elif template is not NEVER:
                    table.setdefault(member[3] or fingerprint(member[1]), template)
            entry[0] = pending = left
        found = fingerprint(node)
        template = table.get(found)
        if template is None:
            pending.append((prefix, node, walk.at, found))
            return False
        self.hit = (prefix, template)
        return True

    def _template(self, walk: Any, prefix: tuple, node: Any, at: int) -> tuple | None:
        """(its leaves' count, and per array below it: its offset among them, its
        name, its key) of a member, once all of its leaves are walked (``None``
        before); :data:`NEVER` for a member no later one may take after."""
        flat, size = self.flat, len(prefix)
        if any(p[:size] == prefix for p, _ in walk.shared):
            return NEVER  # a Shared inside: its views are found while it is read
        start, end = _span(flat, prefix, at)
        if end > walk.at:
            return None  # not walked to its end yet (a later member is inside it)
        positions = walk.positions
        lo, hi = bisect.bisect_left(positions, start), bisect.bisect_left(positions, end)
        return (end - start, tuple(p - start for p in positions[lo:hi]),
                tuple(entry[3] for entry in walk.entries[lo:hi]), tuple(walk.keys[lo:hi]))

    def apply(self, walk: Any, at: int) -> int:
        """Keys the leaves of the block :attr:`hit` names, from the flat index ``at`` of
        its first array; the flat index after its last leaf."""
        assert self.hit is not None
        prefix, (count, offsets, names, keys) = self.hit
        self.hit = None
        flat = self.flat
        start = _span(flat, prefix, at)[0]
        walk.positions.extend([start + offset for offset in offsets])
        walk.entries.extend([(*flat[start + offset], None, name)
                             for offset, name in zip(offsets, names)])
        walk.keys.extend(keys)
        return start + count


def _span(flat: list[tuple[tuple, Any]], prefix: tuple, at: int) -> tuple[int, int]:
    """The flat indices [start, end) of the leaves below ``prefix``; ``at`` is one."""
    size, start, end = len(prefix), at, at + 1
    while start > 0 and flat[start - 1][0][:size] == prefix:
        start -= 1
    while end < len(flat) and flat[end][0][:size] == prefix:
        end += 1
    return start, end
