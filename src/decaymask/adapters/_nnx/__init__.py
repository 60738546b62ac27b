"""The Flax NNX adapter: a module graph or a State -> leaves -> an ``nnx.State`` of bools.

A module is walked once, in the order ``nnx.state`` flattens it (``_graph``), so the
walk sees the same variables at the same paths as ``nnx.state(model, wrt)`` and knows
the class of every module on the way (``_classes``, ``_layouts``). A State carries no
classes: kinds come from its keys and the arrays each key holds, read by the shared
inference (``_by_name``), and stacked axes from the ranks the arrays under a module agree
on (``_stacking``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ...core._leaf import Leaf
from ._by_name import state_walk
from ._graph import NnxWalk
from ._input import is_state, wrt_predicate

NON_FLOATING_FIX = (
    "Keep integer and bool arrays out of nnx.Param: hold them in another Variable type "
    "(nnx.Variable, or a subclass of it) that the optimizer's wrt= does not select."
)


def walk(
    tree: Any, *, wrt: Any = None, method: str = "for_flax", **unexpected: Any
) -> tuple[list[Leaf], Callable[[list[Any]], Any]]:
    """The leaves of an NNX module or State, and the function that puts one value per
    leaf back, as an ``nnx.State`` shaped as ``nnx.state(tree, wrt)``.

    For a State the values go back in the State's own containers, in place of its
    variables or arrays. Arguments as :func:`leaves`; ``method`` names the entry point
    in error messages.

    Raises:
      TypeError: as :func:`leaves`, and for Linen's ``module=``/``args=``/``kwargs=``.
    """
    if is_state(method, tree, wrt, unexpected):
        return state_walk(tree, method)
    state = NnxWalk(tree, wrt_predicate(method, wrt), method)
    return state.leaves, state.rebuild


def leaves(tree: Any, *, wrt: Any = None) -> list[Leaf]:
    """The :class:`Leaf` records of the arrays ``nnx.state(tree, wrt)`` holds, in order.

    From a module, kinds come from the classes in the module graph: the nearest
    enclosing module owns an array, and the modules around it are its ancestors
    (``nnx.List``/``nnx.Dict`` never own: a variable held directly in one belongs to
    the module holding it). Recurrent cells own the arrays of their gate layers.
    The variables of an ``nnx.bridge.ToNNX`` carry Linen's names, not classes: they
    are read as a State's are. Raw array attributes the selection holds (``wrt=...``)
    are decided like params. From a State, kinds come from its keys and sibling arrays
    alone (``kind_source`` ``"name"`` or ``"content"``, ``"ambiguous"`` where they
    contradict); a module's arrays are stacked (``nnx.vmap``, ``nnx.scan``) where the
    layers of a fixed rank under it agree on their extra leading axes, as the module's
    classes would say, and nowhere else. In a State of raw arrays, which carries no
    variable types, every array is a parameter but a batch norm's ``mean`` and ``var``.

    Args:
      tree: an ``nnx.Module`` (abstract ones from ``nnx.eval_shape`` too) or an
        ``nnx.State``, of variables or of raw arrays.
      wrt: for a module, the NNX filter of the variables the optimizer updates;
        ``nnx.Param`` (and its subclasses, such as ``nnx.LoRAParam``) by default.
        Variables it selects that are not ``nnx.Param`` (``nnx.BatchStat``, ...) are
        state, never decayed.

    Returns:
      One leaf per entry of the State, in its flattening order. A variable reachable
      from several modules appears once, at its first path; the other owners' views
      of it are in ``Leaf.shared_with``. A variable holding ``None`` gets a leaf of
      shape ``(0,)`` that is never decayed.

    Raises:
      TypeError: ``tree`` is neither a module nor a State, ``wrt`` is not an NNX
        filter, or a selected variable holds something other than an array.
      ValueError: ``wrt`` given with a State.

    Example:
      >>> from flax import nnx
      >>> from decaymask.adapters import _nnx
      >>> rngs = nnx.Rngs(0)
      >>> model = nnx.Sequential(nnx.Linear(3, 4, rngs=rngs), nnx.LayerNorm(4, rngs=rngs))
      >>> [(x.path, x.layer, x.role) for x in _nnx.leaves(model)]  # doctest: +NORMALIZE_WHITESPACE
      [('layers/0/bias', 'linear', 'bias'), ('layers/0/kernel', 'linear', 'weight'),
       ('layers/1/bias', 'layer_norm', 'bias'), ('layers/1/scale', 'layer_norm', 'scale')]
    """
    return walk(tree, wrt=wrt, method="leaves")[0]
