"""Rules: selectors over leaves, and whether matching leaves decay."""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections.abc import Callable
from typing import Any

from ._leaf import Layer, Leaf
from ._vocab import check_kind, check_role, kind_in

SELECTORS = ("layer", "within", "param", "name", "path", "min_ndim", "when")
"""The keywords :func:`decay` and :func:`no_decay` accept, combined with AND."""

_SELECTOR_FORMS = {
    "layer": "a layer kind or group (e.g. 'linear', 'norm'), a layer class, "
    "or a tuple of those",
    "within": "a layer kind or group, a module class, or a tuple of those",
    "param": "a role ('weight', 'bias', 'scale', 'embedding', 'other') or a tuple of roles",
    "name": "the framework's own attribute or key name (e.g. 'kernel'), "
    "or a tuple of names",
    "path": "a glob over the canonical path (e.g. 'encoder/*/kernel'), a compiled "
    "re.Pattern (searched), or a tuple of those",
    "min_ndim": "a non-negative int",
    "when": "a callable taking a dm.Leaf and returning a bool",
}


def _as_tuple(value: Any) -> tuple:
    if isinstance(value, (tuple, list)):
        return tuple(value)
    return (value,)


def _bad_value(fn: str, key: str, value: Any) -> TypeError:
    return TypeError(
        f"{fn}({key}={value!r}): expected {_SELECTOR_FORMS[key]}; "
        f"got {type(value).__name__}."
    )


def _coerce_layers(fn: str, key: str, value: Any) -> tuple:
    """The one place that turns a ``layer=`` or ``within=`` value into kinds and classes."""
    items = _as_tuple(value)
    if not items:
        raise ValueError(f"{fn}({key}=()): an empty tuple matches nothing; leave {key} out.")
    for item in items:
        if isinstance(item, str):
            check_kind(item, where=f"{fn}({key}={item!r})")
        elif not isinstance(item, type):
            raise _bad_value(fn, key, item)
    return items


def _coerce_strings(fn: str, key: str, value: Any) -> tuple[str, ...]:
    items = _as_tuple(value)
    if not items:
        raise ValueError(f"{fn}({key}=()): an empty tuple matches nothing; leave {key} out.")
    for item in items:
        if not isinstance(item, str):
            raise _bad_value(fn, key, item)
        if key == "param":
            check_role(item, where=f"{fn}({key}={item!r})")
    return items


def _coerce_paths(fn: str, value: Any) -> tuple:
    items = _as_tuple(value)
    if not items:
        raise ValueError(f"{fn}(path=()): an empty tuple matches nothing; leave path out.")
    for item in items:
        if not isinstance(item, (str, re.Pattern)):
            raise _bad_value(fn, "path", item)
    return items


def _layer_matches(layer: Layer, wanted: tuple) -> bool:
    for item in wanted:
        if isinstance(item, str):
            if kind_in(layer.kind, item):
                return True
        elif layer.matches_class(item):
            return True
    return False


def _compile_path(item: str | re.Pattern) -> Callable[[str], bool]:
    if isinstance(item, re.Pattern):
        return lambda path: item.search(path) is not None
    pattern = re.compile(fnmatch.translate(item))
    return lambda path: pattern.match(path) is not None


DECAY_LABEL = "decay"
NO_DECAY_LABEL = "no_decay"


@dataclasses.dataclass(frozen=True, repr=False)
class Rule:
    """A selection of leaves and what to do with them. Made by :func:`decay`,
    :func:`no_decay` and :func:`label`."""

    decay: bool | None
    """Whether matching leaves decay; ``None`` for a rule that only labels."""
    layer: tuple | None = None
    within: tuple | None = None
    param: tuple[str, ...] | None = None
    name: tuple[str, ...] | None = None
    path: tuple | None = None
    min_ndim: int | None = None
    when: Callable[[Leaf], bool] | None = None
    label: str | None = None
    """The label of matching leaves for ``optax.partition``; see :attr:`group`."""
    rate: float = 1.0
    """A multiplier of the weight decay of matching leaves."""

    @property
    def group(self) -> str:
        """The label this rule gives: its own, else ``"decay"`` or ``"no_decay"``."""
        if self.label is not None:
            return self.label
        return DECAY_LABEL if self.decay else NO_DECAY_LABEL

    def __post_init__(self) -> None:
        paths = tuple(_compile_path(p) for p in self.path) if self.path else ()
        object.__setattr__(self, "_paths", paths)

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
        if self.layer is not None and not _layer_matches(leaf.owner, self.layer):
            return False
        if self.within is not None:
            if not _layer_matches(leaf.owner, self.within) and not any(
                _layer_matches(a, self.within) for a in leaf.ancestors
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
            result = self.when(leaf)
            if not isinstance(result, bool):
                raise TypeError(
                    f"{self!r}: when= returned {result!r} ({type(result).__name__}) for "
                    f"{leaf.path!r}; it must return True or False."
                )
            return result
        return True

    def __repr__(self) -> str:
        parts = []
        for key in SELECTORS:
            value = getattr(self, key)
            if value is None:
                continue
            if isinstance(value, tuple):
                shown = [_show(v) for v in value]
                text = shown[0] if len(shown) == 1 else "(" + ", ".join(shown) + ")"
            else:
                text = _show(value)
            parts.append(f"{key}={text}")
        if self.decay is None:
            return f"label({', '.join([repr(self.label)] + parts)})"
        if self.rate != 1.0:
            parts.append(f"rate={self.rate!r}")
        if self.label is not None:
            parts.append(f"label={self.label!r}")
        return f"{'decay' if self.decay else 'no_decay'}({', '.join(parts)})"


def _show(value: Any) -> str:
    if isinstance(value, type):
        return value.__qualname__
    if isinstance(value, re.Pattern):
        return f"re.compile({value.pattern!r})"
    if callable(value):
        return getattr(value, "__qualname__", None) or repr(value)
    return repr(value)


def _check_label(fn: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise TypeError(
            f"{fn}(label={value!r}): expected a non-empty string naming a group of "
            f"optax.partition, got {type(value).__name__}."
        )
    return value


def _check_rate(fn: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise TypeError(
            f"{fn}(rate={value!r}): expected a non-negative number that multiplies the "
            f"weight decay of the matching leaves, got {type(value).__name__}."
        )
    return float(value)


def _make(
    fn: str,
    decay: bool | None,
    selectors: dict[str, Any],
    *,
    label: str | None = None,
    rate: float = 1.0,
) -> Rule:
    if "rate" in selectors:
        raise TypeError(
            f"{fn}(rate=...): a rate multiplies weight decay, so only decay(...) rules "
            f"take one."
        )
    unknown = [key for key in selectors if key not in SELECTORS]
    if unknown:
        import difflib

        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, SELECTORS, n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise TypeError(
            f"{fn}() got unknown selector {', '.join(hints)}. Valid selectors: "
            + "; ".join(f"{k}= {_SELECTOR_FORMS[k]}" for k in SELECTORS)
            + "."
        )
    fields: dict[str, Any] = {}
    for key in ("layer", "within"):
        if selectors.get(key) is not None:
            fields[key] = _coerce_layers(fn, key, selectors[key])
    for key in ("param", "name"):
        if selectors.get(key) is not None:
            fields[key] = _coerce_strings(fn, key, selectors[key])
    if selectors.get("path") is not None:
        fields["path"] = _coerce_paths(fn, selectors["path"])
    min_ndim = selectors.get("min_ndim")
    if min_ndim is not None:
        if isinstance(min_ndim, bool) or not isinstance(min_ndim, int) or min_ndim < 0:
            raise _bad_value(fn, "min_ndim", min_ndim)
        fields["min_ndim"] = min_ndim
    when = selectors.get("when")
    if when is not None:
        if not callable(when):
            raise _bad_value(fn, "when", when)
        fields["when"] = when
    if label is not None:
        fields["label"] = _check_label(fn, label)
    if rate != 1.0:
        fields["rate"] = _check_rate(fn, rate)
    return Rule(decay, **fields)


def decay(*, rate: float = 1.0, label: str | None = None, **selectors: Any) -> Rule:
    """A rule: leaves matching every given selector are decayed.

    Selectors, all optional and combined with AND; a tuple or list means "any of these":

    - ``layer``: the kind or group of the owning layer (``"linear"``, ``"norm"``), or a
      layer class (subclasses match).
    - ``within``: a kind, group or class of the owning layer or of any module around it
      (``within="attention"``, ``within=MyBlock``).
    - ``param``: the role of the array: ``weight``, ``bias``, ``scale``, ``embedding``,
      ``other``.
    - ``name``: the framework's own attribute or key name (``"kernel"``, ``"weight"``);
      this is framework vocabulary, so prefer ``param`` for policies shared across
      frameworks.
    - ``path``: a glob over the canonical path (``"encoder/*"``), matched against the
      whole path, or a compiled ``re.Pattern``, searched anywhere in it.
    - ``min_ndim``: the array has at least this many axes, not counting stacked axes.
    - ``when``: a callable taking a :class:`Leaf` and returning a bool.

    Args:
      rate: multiplies the weight decay of the matching leaves, for
        :func:`decaymask.optax.add_decayed_weights` (a plain mask ignores it).
      label: the group of the matching leaves in ``policy.labels_for_*`` (default
        ``"decay"``).
      **selectors: the selectors above.

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
    return _make("decay", True, selectors, label=label, rate=rate)


def no_decay(*, label: str | None = None, **selectors: Any) -> Rule:
    """A rule: leaves matching every given selector are not decayed.

    Takes the same selectors as :func:`decay`, and ``label`` (default ``"no_decay"``).

    Example:
      >>> import decaymask as dm
      >>> dm.no_decay(layer="norm")
      no_decay(layer='norm')
    """
    return _make("no_decay", False, selectors, label=label)


def label(name: str, **selectors: Any) -> Rule:
    """A rule that only labels: matching leaves go to the group ``name``.

    Labels feed ``optax.partition`` through ``policy.labels_for_equinox`` and
    ``policy.labels_for_flax``. A label rule does not change whether a leaf decays: the
    mask is decided by the decay rules alone, and the label by the last rule of any kind.

    Example:
      >>> import decaymask as dm
      >>> dm.label("frozen", layer="embedding")
      label('frozen', layer='embedding')
    """
    return _make("label", None, selectors, label=_check_label("label", name))
