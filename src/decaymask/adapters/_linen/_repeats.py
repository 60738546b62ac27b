"""Subtrees a walk of params has read before: a block of a deep model alike in every
respect to an earlier one gets the earlier one's keys, without a visit.

A walk by names (not traced, not a variables mapping) reads a module from its parent's
reading, the traits of its key (:func:`~._signature.key_traits`), and what is below it:
keys, container types, leaf types, shapes and dtypes. Two subtrees of the same parent
reading under keys of the same traits, with equal treedefs (which hold every key and
container type below them) and leaves of equal types, shapes and dtypes, are read
alike, leaf for leaf: the keys the first one's visit appended are the second one's.
A traced walk reads what the trace says of each path too (``trace_facts``): there the
two subtrees' facts, path by path below them, must be equal as well.

Only a family's second member is checked at all: the first one of each (parent
reading, key traits) is visited with nothing added, and flattened only once a second
one comes, so a model without repeated blocks pays nothing.
"""

from __future__ import annotations

import operator
from typing import Any

import jax

_shape_of = operator.attrgetter("shape")
_dtype_of = operator.attrgetter("dtype")


def fingerprint(node: Any, facts: Any = ()) -> tuple | None:
    """What a walk reads below ``node`` (with ``facts``, what a trace says of the paths
    below it); ``None`` where a leaf is no array."""
    leaves, treedef = jax.tree_util.tree_flatten(node)
    try:
        return (treedef, tuple(map(type, leaves)), tuple(map(_shape_of, leaves)),
                tuple(map(_dtype_of, leaves)), facts)
    except AttributeError:
        return None


class Repeats:
    """The keys of the subtrees visited, by family (parent reading, key traits) and
    fingerprint. Holds the first member of each family until a second one comes: the
    walk drops it when it is done."""

    __slots__ = ("families",)

    def __init__(self) -> None:
        # family -> [its first subtree or None, that subtree's keys, {fingerprint: keys}
        # once a second member came, else None]
        self.families: dict[tuple[int, int], list[Any]] = {}

    def find(
        self, family: tuple[int, int], node: Any, facts: Any = ()
    ) -> tuple[tuple[int, ...] | None, Any]:
        """(the keys of an earlier subtree alike to ``node`` (of whose paths a trace
        says ``facts``), or ``None``; the fingerprint of ``node`` for :meth:`note`,
        where one was taken)."""
        entry = self.families.get(family)
        if entry is None:
            return None, None
        table = entry[2]
        if table is None:
            table = entry[2] = {}
            first = fingerprint(*entry[0])
            if first is not None:
                table[first] = entry[1]
            entry[0] = None
        found = fingerprint(node, facts)
        if found is None:
            return None, None
        return table.get(found), found

    def note(
        self, family: tuple[int, int], node: Any, keys: tuple[int, ...], found: Any,
        facts: Any = (),
    ) -> None:
        """Records the keys a visit of ``node`` appended; ``found`` is what
        :meth:`find` returned for it."""
        entry = self.families.get(family)
        if entry is None:
            self.families[family] = [(node, facts), keys, None]
        elif found is not None and entry[2] is not None:
            entry[2][found] = keys
