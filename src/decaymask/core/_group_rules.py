"""Rules of parameter groups: learning-rate multipliers, and freezing.

Made by :func:`lr`, :func:`freeze` and :func:`unfreeze`; they take the selectors of
:func:`decay` and never change whether a leaf decays (a frozen leaf, never trained,
never decays).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from ._leaf import Leaf
from ._rules import Rule, _make
from ._selectors import (
    LayerSelector,
    NameSelector,
    PathSelector,
    RoleSelector,
    check_multiplier,
    checked_keywords,
    short_repr,
)


@checked_keywords("lr", (), ("multiplier",))
def lr(
    multiplier: float,
    /,
    *,
    layer: LayerSelector | None = None,
    within: LayerSelector | None = None,
    param: RoleSelector | None = None,
    name: NameSelector | None = None,
    path: PathSelector | None = None,
    min_ndim: int | None = None,
    when: Callable[[Leaf], bool] | None = None,
) -> Rule:
    """A rule: matching leaves learn ``multiplier`` times as fast.

    The last ``lr`` rule that matches a leaf gives its multiplier (1 where none does);
    :func:`layer_decay` multiplies it by the leaf's layer factor, and
    :meth:`Policy.wrap` multiplies each update by the result after the optimizer, so
    that with ``optax.adamw`` the decay term is scaled too (a PyTorch parameter
    group's ``lr``). ``lr`` rules never change whether a leaf decays. Takes the
    selectors of :func:`decay`.

    Args:
      multiplier: a finite number > 0. To stop a leaf from learning, use
        :func:`freeze`: a multiplier of 0 would keep its optimizer state and still
        let a decoupled decay move it.

    Raises:
      ValueError: a multiplier that is 0, negative, NaN, infinite or too large for a float.

    Example:
      >>> import decaymask as dm
      >>> dm.lr(0.1, layer="embedding")
      lr(0.1, layer='embedding')
    """
    selectors = dict(
        layer=layer, within=within, param=param, name=name, path=path,
        min_ndim=min_ndim, when=when,
    )
    rule = _make("lr", None, selectors)
    where = f"lr({', '.join([short_repr(multiplier)] + rule.selector_texts())})"
    freeze_fix = (
        f"use dm.freeze({', '.join(rule.selector_texts())}) instead (no update, no "
        f"optimizer state, no decay)"
    )
    return dataclasses.replace(
        rule, lr=check_multiplier(multiplier, where=where, freeze=freeze_fix)
    )


def _freezing(fn: str, frozen: bool, selectors: dict[str, Any]) -> Rule:
    return dataclasses.replace(_make(fn, None, selectors), frozen=frozen)


@checked_keywords("freeze", ())
def freeze(
    *,
    layer: LayerSelector | None = None,
    within: LayerSelector | None = None,
    param: RoleSelector | None = None,
    name: NameSelector | None = None,
    path: PathSelector | None = None,
    min_ndim: int | None = None,
    when: Callable[[Leaf], bool] | None = None,
) -> Rule:
    """A rule: matching leaves are not trained.

    A frozen leaf gets no update and keeps no optimizer state under
    :meth:`Policy.wrap`, is never decayed and never a Muon matrix, and
    ``policy.trainable(tree)`` is ``False`` there (each framework's filter, so that it
    gets no gradient either). The last ``freeze``/:func:`unfreeze` rule that matches a
    leaf decides. Takes the selectors of :func:`decay`.

    Example:
      >>> import decaymask as dm
      >>> dm.freeze(within="embedding")
      freeze(within='embedding')
    """
    selectors = dict(
        layer=layer, within=within, param=param, name=name, path=path,
        min_ndim=min_ndim, when=when,
    )
    return _freezing("freeze", True, selectors)


@checked_keywords("unfreeze", ())
def unfreeze(
    *,
    layer: LayerSelector | None = None,
    within: LayerSelector | None = None,
    param: RoleSelector | None = None,
    name: NameSelector | None = None,
    path: PathSelector | None = None,
    min_ndim: int | None = None,
    when: Callable[[Leaf], bool] | None = None,
) -> Rule:
    """A rule: matching leaves are trained again after a :func:`freeze` rule.

    Example:
      >>> import decaymask as dm
      >>> dm.unfreeze(path="head/*")
      unfreeze(path='head/*')
    """
    selectors = dict(
        layer=layer, within=within, param=param, name=name, path=path,
        min_ndim=min_ndim, when=when,
    )
    return _freezing("unfreeze", False, selectors)
