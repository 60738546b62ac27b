"""Rules: selectors over leaves, and whether matching leaves decay."""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import math
import numbers
import pickle
import re
import sys
import types
from collections.abc import Callable, Sequence
from typing import Any, ParamSpec, Union

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


LayerSelector = Union[str, type, Sequence[Union[str, type]]]
"""A ``layer=`` or ``within=`` value: a kind, a group, a class, or several of those."""
NameSelector = Union[str, Sequence[str]]
"""A ``param=`` or ``name=`` value: one string or several."""
PathSelector = Union[str, "re.Pattern[str]", Sequence[Union[str, "re.Pattern[str]"]]]
"""A ``path=`` value: a glob, a compiled ``str`` pattern, or several of those."""


def type_name(value: Any) -> str:
    """The type of ``value`` as an error message names it: ``int``, ``numpy.bool``."""
    cls = type(value)
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


def as_bool(value: Any) -> bool | None:
    """``value`` as a Python bool if it is one or a numpy bool, else ``None``.

    The core imports no numpy: a numpy bool is recognised by its type's module and name.
    """
    if type(value) is bool:
        return value
    cls = type(value)
    if cls.__module__ == "numpy" and cls.__name__ in ("bool", "bool_"):
        return bool(value)
    return None


def _as_tuple(value: Any) -> tuple[Any, ...]:
    if isinstance(value, (tuple, list)):
        return tuple(value)
    return (value,)


def _bad_value(fn: str, key: str, value: Any) -> TypeError:
    return TypeError(
        f"{fn}({key}={value!r}): expected {_SELECTOR_FORMS[key]}; "
        f"got {type_name(value)}."
    )


def _coerce_layers(fn: str, key: str, value: Any) -> tuple[str | type, ...]:
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


def _coerce_paths(fn: str, value: Any) -> tuple[str | re.Pattern[str], ...]:
    items = _as_tuple(value)
    if not items:
        raise ValueError(f"{fn}(path=()): an empty tuple matches nothing; leave path out.")
    for item in items:
        if not isinstance(item, (str, re.Pattern)):
            raise _bad_value(fn, "path", item)
        if isinstance(item, re.Pattern) and not isinstance(item.pattern, str):
            raise TypeError(
                f"{fn}(path={_show(item)}): a bytes pattern cannot search a canonical "
                f"path, which is a str. Compile a str pattern instead, e.g. "
                f"re.compile({item.pattern.decode('latin-1')!r})."
            )
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
    layer: tuple[str | type, ...] | None = None
    """The ``layer=`` selector as a tuple of kinds, groups and classes; ``None`` if unset."""
    within: tuple[str | type, ...] | None = None
    """The ``within=`` selector as a tuple of kinds, groups and classes; ``None`` if unset."""
    param: tuple[str, ...] | None = None
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

    @property
    def group(self) -> str:
        """The label this rule gives: its own, else ``"decay"`` or ``"no_decay"``."""
        if self.label is not None:
            return self.label
        return DECAY_LABEL if self.decay else NO_DECAY_LABEL

    def __post_init__(self) -> None:
        paths = tuple(_compile_path(p) for p in self.path) if self.path else ()
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
                        f"cannot pickle {self!r}: {key}={_show(item)} has no import path "
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


def importable(obj: Any) -> bool:
    """Whether pickle can find a class or function by its import path.

    Other objects (callable instances, partials, strings) are pickled by value, and
    pickle says itself where it cannot.
    """
    if not isinstance(obj, (type, types.FunctionType)):
        return True
    qualname = obj.__qualname__
    if "<" in qualname:
        return False
    module = sys.modules.get(obj.__module__ or "")
    if module is None:
        return True
    found: Any = module
    for part in qualname.split("."):
        found = getattr(found, part, None)
    return found is obj


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
            f"optax.partition, got {type_name(value)}."
        )
    return value


def check_rate(fn: str, value: Any) -> float:
    """A rate as a float; it must be a finite number >= 0.

    Raises:
      TypeError: anything else; an infinite or NaN rate would turn every decayed weight
        into inf or NaN at the first step.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{fn}(rate={value!r}): expected a non-negative number that multiplies the "
            f"weight decay of the matching leaves, got {type_name(value)}."
        )
    if not (math.isfinite(value) and float(value) >= 0):
        raise TypeError(
            f"{fn}(rate={value!r}): expected a non-negative number that multiplies the "
            f"weight decay of the matching leaves, finite (inf or nan would turn every "
            f"decayed weight into inf or nan), got {value!r}."
        )
    return float(value)


def _check_keywords(fn: str, keys: Sequence[str]) -> None:
    """A rate where none is taken, or an unknown selector: the error listing every
    valid selector (Python's own names only the bad keyword)."""
    if "rate" in keys:
        raise TypeError(
            f"{fn}(rate=...): a rate multiplies weight decay, so only decay(...) rules "
            f"take one."
        )
    unknown = [key for key in keys if key not in SELECTORS]
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


_P = ParamSpec("_P")


def _checked_keywords(
    fn: str, extra: tuple[str, ...]
) -> Callable[[Callable[_P, Rule]], Callable[_P, Rule]]:
    """Gives a misspelt keyword of ``fn`` the message of :func:`_check_keywords`; the
    signature stays what type checkers read."""

    def wrap(make: Callable[_P, Rule]) -> Callable[_P, Rule]:
        @functools.wraps(make)
        def checked(*args: _P.args, **kwargs: _P.kwargs) -> Rule:
            if any(key not in SELECTORS and key not in extra for key in kwargs):
                _check_keywords(fn, [key for key in kwargs if key not in extra])
            return make(*args, **kwargs)

        return checked

    return wrap


def _make(
    fn: str,
    decay: bool | None,
    selectors: dict[str, Any],
    *,
    label: str | None = None,
    rate: float = 1.0,
) -> Rule:
    _check_keywords(fn, list(selectors))
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
        try:
            hash(when)
        except TypeError:
            raise TypeError(
                f"{fn}(when={_show(when)}): the callable is not hashable "
                f"({type_name(when)}), and a rule is a hashable value (policies are "
                f"compared and used as cache keys). Pass a function, or give the class "
                f"a __hash__ (e.g. a frozen dataclass)."
            ) from None
        fields["when"] = when
    if label is not None:
        fields["label"] = _check_label(fn, label)
    if rate != 1.0:
        fields["rate"] = check_rate(fn, rate)
    return Rule(decay, **fields)


@_checked_keywords("decay", ("rate", "label"))
def decay(
    *,
    layer: LayerSelector | None = None,
    within: LayerSelector | None = None,
    param: NameSelector | None = None,
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
      min_ndim: the array has at least this many axes, not counting stacked axes.
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


@_checked_keywords("no_decay", ("label",))
def no_decay(
    *,
    layer: LayerSelector | None = None,
    within: LayerSelector | None = None,
    param: NameSelector | None = None,
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


@_checked_keywords("label", ())
def label(
    group: str,
    /,
    *,
    layer: LayerSelector | None = None,
    within: LayerSelector | None = None,
    param: NameSelector | None = None,
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
    return _make("label", None, selectors, label=_check_label("label", group))
