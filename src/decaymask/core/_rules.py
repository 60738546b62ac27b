"""Rules: selectors over leaves, and whether matching leaves decay.

A rule is made by :func:`decay`, :func:`no_decay` or :func:`label`; what each selector
accepts, and how it matches, is in ``_selectors``.
"""

from __future__ import annotations

import dataclasses
import pickle
import re
from collections.abc import Callable
from typing import Any

from ._leaf import Leaf
from ._selectors import SELECTORS as SELECTORS
from ._selectors import LayerSelector as LayerSelector
from ._selectors import NameSelector as NameSelector
from ._selectors import RoleSelector as RoleSelector
from ._selectors import PathSelector as PathSelector
from ._selectors import check_label, checked_keywords, layer_matches, path_matcher, rule_fields
from ._selectors import check_multiplier as check_multiplier
from ._selectors import check_rate as check_rate
from ._values import as_bool as as_bool
from ._values import importable as importable
from ._values import show_value
from ._vocab import LayerGroup, LayerKind, Role
from ._values import type_name as type_name

DECAY_LABEL = "decay"
NO_DECAY_LABEL = "no_decay"


@dataclasses.dataclass(frozen=True, repr=False)
class Rule:
    """A selection of leaves and what to do with them. Made by :func:`decay`,
    :func:`no_decay` and :func:`label`."""

    decay: bool | None
    """Whether matching leaves decay; ``None`` for a rule that only labels."""
    layer: tuple[LayerKind | LayerGroup | type, ...] | None = None
    """The ``layer=`` selector as a tuple of kinds, groups and classes; ``None`` if unset."""
    within: tuple[LayerKind | LayerGroup | type, ...] | None = None
    """The ``within=`` selector as a tuple of kinds, groups and classes; ``None`` if unset."""
    param: tuple[Role, ...] | None = None
    """The ``param=`` selector as a tuple of roles; ``None`` if unset."""
    name: tuple[str, ...] | None = None
    """The ``name=`` selector as a tuple of names; ``None`` if unset."""
    path: tuple[str | re.Pattern[str], ...] | None = None
    """The ``path=`` selector as a tuple of globs and compiled patterns; ``None`` if unset."""
    min_ndim: int | None = None
    """The ``min_ndim=`` selector; ``None`` if unset."""
    when: Callable[[Leaf], bool] | None = None
    """The ``when=`` selector; ``None`` if unset."""
    label: str | None = None
    """The label of matching leaves for ``optax.partition``; see :attr:`group`."""
    rate: float = 1.0
    """A multiplier of the weight decay of matching leaves."""
    lr: float | None = None
    """The learning-rate multiplier of matching leaves (a rule made by :func:`lr`)."""
    frozen: bool | None = None
    """``True`` for :func:`freeze`, ``False`` for :func:`unfreeze`, else ``None``."""

    @property
    def group(self) -> str:
        """The label this rule gives: its own, else ``"decay"`` or ``"no_decay"``."""
        if self.label is not None:
            return self.label
        return DECAY_LABEL if self.decay else NO_DECAY_LABEL

    @property
    def sets_decay(self) -> bool:
        """Whether the rule decides decay or a label (not an lr or freeze rule)."""
        return self.decay is not None or self.label is not None

    def __post_init__(self) -> None:
        paths = tuple(path_matcher(p) for p in self.path) if self.path else ()
        object.__setattr__(self, "_paths", paths)

    # A rule is an immutable value: a copy is the rule itself, and pickle rebuilds it
    # from its fields (the compiled path matchers are made again, not pickled).

    def __copy__(self) -> Rule:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> Rule:
        return self

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        for key in ("layer", "within", "when"):
            value = getattr(self, key)
            for item in value if isinstance(value, tuple) else (value,):
                if item is not None and not importable(item):
                    raise pickle.PicklingError(
                        f"cannot pickle {self!r}: {key}={show_value(item)} has no import path "
                        f"pickle can follow (a lambda, a local definition, or a class "
                        f"its module holds under another name). Define it at module level."
                    )
        return (Rule, tuple(getattr(self, f.name) for f in dataclasses.fields(self)))

    @property
    def per_leaf(self) -> bool:
        """Whether the rule reads more than the owner's kind, class, role and name."""
        return self.path is not None or self.min_ndim is not None or self.when is not None

    def matches(self, leaf: Leaf) -> bool:
        """Whether every selector of this rule matches ``leaf``."""
        return self.matches_key(leaf) and self.matches_rest(leaf)

    def matches_key(self, leaf: Leaf) -> bool:
        """The selectors that depend only on the owner, its ancestors, role and name."""
        if self.param is not None and leaf.role not in self.param:
            return False
        if self.name is not None and leaf.name not in self.name:
            return False
        if self.layer is not None and not layer_matches(leaf.owner, self.layer):
            return False
        if self.within is not None:
            if not layer_matches(leaf.owner, self.within) and not any(
                layer_matches(a, self.within) for a in leaf.ancestors
            ):
                return False
        return True

    def matches_rest(self, leaf: Leaf) -> bool:
        """The selectors that read the leaf itself: path, rank and ``when``."""
        if self._paths and not any(match(leaf.path) for match in self._paths):  # type: ignore[attr-defined]
            return False
        if self.min_ndim is not None and leaf.ndim < self.min_ndim:
            return False
        if self.when is not None:
            try:
                result = self.when(leaf)
            except Exception as err:
                raise RuntimeError(
                    f"{self!r}: when= raised {type(err).__name__}: {err} for the leaf "
                    f"{leaf.path!r}. Fix the callable (the error it raised is chained "
                    f"above), or narrow the rule with other selectors."
                ) from err
            decided = as_bool(result)
            if decided is None:
                raise TypeError(
                    f"{self!r}: when= returned {result!r} ({type_name(result)}) for "
                    f"{leaf.path!r}; it must return True or False."
                )
            return decided
        return True

    def selector_texts(self) -> list[str]:
        """The selectors as the call that makes the rule writes them: ``layer='linear'``."""
        parts = []
        for key in SELECTORS:
            value = getattr(self, key)
            if value is None:
                continue
            if isinstance(value, tuple):
                shown = [show_value(v) for v in value]
                text = shown[0] if len(shown) == 1 else "(" + ", ".join(shown) + ")"
            else:
                text = show_value(value)
            parts.append(f"{key}={text}")
        return parts

    def __repr__(self) -> str:
        parts = self.selector_texts()
        if self.lr is not None:
            return f"lr({', '.join([repr(self.lr)] + parts)})"
        if self.frozen is not None:
            return f"{'freeze' if self.frozen else 'unfreeze'}({', '.join(parts)})"
        if self.decay is None:
            return f"label({', '.join([repr(self.label)] + parts)})"
        if self.rate != 1.0:
            parts.append(f"rate={self.rate!r}")
        if self.label is not None:
            parts.append(f"label={self.label!r}")
        return f"{'decay' if self.decay else 'no_decay'}({', '.join(parts)})"


def _make(
    fn: str,
    decay: bool | None,
    selectors: dict[str, Any],
    *,
    label: str | None = None,
    rate: float = 1.0,
) -> Rule:
    """The rule ``fn(...)`` makes from its selectors, each checked and normalised."""
    return Rule(decay, **rule_fields(fn, selectors, label=label, rate=rate))


@checked_keywords("decay", ("rate", "label"))
def decay(
    *,
    layer: LayerSelector | None = None,
    within: LayerSelector | None = None,
    param: RoleSelector | None = None,
    name: NameSelector | None = None,
    path: PathSelector | None = None,
    min_ndim: int | None = None,
    when: Callable[[Leaf], bool] | None = None,
    rate: float = 1.0,
    label: str | None = None,
) -> Rule:
    """A rule: leaves matching every given selector are decayed.

    Selectors, all optional and combined with AND; a tuple or list means "any of these",
    and ``None`` leaves a selector out.

    Args:
      layer: the kind or group of the owning layer (``"linear"``, ``"norm"``), or a
        layer class (subclasses match).
      within: a kind, group or class of the owning layer or of any module around it
        (``within="attention"``, ``within=MyBlock``).
      param: the role of the array, one of ``dm.ROLES``: ``weight``, ``bias``,
        ``scale``, ``embedding``, ``position``, ``token``, ``gain``, ``buffer``,
        ``other``.
      name: the framework's own attribute or key name (``"kernel"``, ``"weight"``);
        this is framework vocabulary, so prefer ``param`` for policies shared across
        frameworks.
      path: a glob over the canonical path (``"encoder/*"``), matched against the
        whole path, or a compiled ``str`` pattern (``re.Pattern``), searched anywhere
        in it. A ``/`` or ``%`` inside one key is written ``%2F`` or ``%25`` in the
        path.
      min_ndim: the array has at least this many axes in one layer, counted alike in
        every framework (:attr:`Leaf.ndim`): stacked axes and the axes a layout adds do
        not count (an Equinox conv bias ``(out, 1, 1)`` or WeightNorm gain ``(out, 1)``
        is a vector, as Flax's ``(out,)`` is).
      when: a hashable callable taking a :class:`Leaf` and returning a bool (a numpy
        bool counts).
      rate: multiplies the weight decay of the matching leaves, for
        :func:`decaymask.add_decayed_weights` (a plain mask ignores it); a
        finite number >= 0.
      label: the group of the matching leaves in ``policy.labels_for_*`` (default
        ``"decay"``).

    Returns:
      A frozen, hashable :class:`Rule`.

    Raises:
      TypeError: an unknown selector keyword or a value of the wrong type.
      ValueError: an unknown layer kind or role (the nearest valid name is suggested).

    Example:
      >>> import decaymask as dm
      >>> dm.decay(layer="linear", param="weight")
      decay(layer='linear', param='weight')
    """
    selectors = dict(
        layer=layer, within=within, param=param, name=name, path=path,
        min_ndim=min_ndim, when=when,
    )
    return _make("decay", True, selectors, label=label, rate=rate)


@checked_keywords("no_decay", ("label",))
def no_decay(
    *,
    layer: LayerSelector | None = None,
    within: LayerSelector | None = None,
    param: RoleSelector | None = None,
    name: NameSelector | None = None,
    path: PathSelector | None = None,
    min_ndim: int | None = None,
    when: Callable[[Leaf], bool] | None = None,
    label: str | None = None,
) -> Rule:
    """A rule: leaves matching every given selector are not decayed.

    Takes the same selectors as :func:`decay`, and ``label`` (default ``"no_decay"``).

    Example:
      >>> import decaymask as dm
      >>> dm.no_decay(layer="norm")
      no_decay(layer='norm')
    """
    selectors = dict(
        layer=layer, within=within, param=param, name=name, path=path,
        min_ndim=min_ndim, when=when,
    )
    return _make("no_decay", False, selectors, label=label)


@checked_keywords("label", (), ("group",))
def label(
    group: str,
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
    """A rule that only labels: matching leaves go to the group ``group``.

    Labels feed ``optax.partition`` through ``policy.labels_for_equinox`` and
    ``policy.labels_for_flax``. A label rule does not change whether a leaf decays: the
    mask is decided by the decay rules alone, and the label by the last rule of any kind.
    Takes the same selectors as :func:`decay`.

    Example:
      >>> import decaymask as dm
      >>> dm.label("frozen", layer="embedding")
      label('frozen', layer='embedding')
    """
    selectors = dict(
        layer=layer, within=within, param=param, name=name, path=path,
        min_ndim=min_ndim, when=when,
    )
    return _make("label", None, selectors, label=check_label("label", group))
