"""Subtrees a walk of params has read before: a block of a deep model alike in every
respect to an earlier one gets the earlier one's keys, without a visit.

A walk of params (not of a variables mapping) reads a module from its parent's
reading, the traits of its key (:func:`~._signature.key_traits`), and what is below
it: keys, container types, leaf types, shapes and dtypes. Two subtrees of the same parent
reading under keys of the same traits, with equal treedefs (which hold every key and
container type below them) and leaves of equal types, shapes and dtypes, are read
alike, leaf for leaf: the keys the first one's visit appended are the second one's.
A traced walk reads what the trace says of each path too (``trace_facts``): there the
two subtrees' facts, path by path below them, must be equal as well.

A family is one parent reading and one set of key traits (``.._families``).
"""

from __future__ import annotations

import operator
from typing import Any

import jax

from .._families import Families

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


class Repeats(Families):
    """The keys of the subtrees visited, by family (parent reading, key traits) and
    fingerprint (:func:`fingerprint`)."""

    __slots__ = ()

    def fingerprint(self, member: Any) -> tuple | None:
        return fingerprint(*member)

    def find(
        self, family: tuple[int, int], node: Any, facts: Any = ()
    ) -> tuple[tuple[int, ...] | None, Any]:
        """(the keys of an earlier subtree alike to ``node`` (of whose paths a trace
        says ``facts``), or ``None``; the fingerprint of ``node`` for :meth:`note`,
        where one was taken)."""
        return self._find(family, (node, facts))

    def note(
        self, family: tuple[int, int], node: Any, keys: tuple[int, ...], found: Any,
        facts: Any = (),
    ) -> None:
        """Records the keys a visit of ``node`` appended; ``found`` is what
        :meth:`find` returned for it."""
        self._note(family, (node, facts), keys, found)
