"""The Equinox adapter: module tree -> leaves -> a mask of the tree's own structure.

``_classes`` says what a node's class is (layer kind, module, state, array wrapper),
``_layouts`` the layouts of Equinox's own layers, ``_walk`` walks the tree once and
keys every leaf, ``_input`` refuses what is not an Equinox tree.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ...core._leaf import Leaf
from ...core._table import LeafTable
from ._input import _check_input as _check_input
from ._walk import EquinoxWalk

METHOD = "for_equinox"

NON_FLOATING_FIX = (
    "Hand optax eqx.filter(model, eqx.is_inexact_array) and build the mask from that "
    "(or pass mask=policy.for_equinox)."
)


def leaves(tree: Any) -> list[Leaf]:
    """The :class:`Leaf` records of every array in ``tree``, in flattening order."""
    return list(walk(tree, method="leaves")[0])


def walk(tree: Any, *, method: str = METHOD) -> tuple[LeafTable, Callable[[list[Any]], Any]]:
    """The leaves of ``tree``, and a function that puts one value per leaf back in place.

    The rebuilt tree has the structure of ``tree`` with ``None`` at every non-array
    leaf: the structure of ``eqx.filter(tree, eqx.is_array)``.
    """
    _check_input(tree, method)
    state = EquinoxWalk(tree)
    return state.table, state.rebuild
