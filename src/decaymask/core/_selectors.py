"""Selectors: what each keyword of a rule accepts, checked with the fix in the message
(and the nearest valid name where one was misspelt), the normalised form a rule stores,
and how a layer or path selector matches."""

from __future__ import annotations

import fnmatch
import functools
import math
import numbers
import re
from collections.abc import Callable, Sequence
from typing import Any, ParamSpec, TypeVar, Union

from ._leaf import Layer
from ._values import show_value, type_name
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


def _as_tuple(value: Any) -> tuple[Any, ...]:
    if isinstance(value, (tuple, list)):
        return tuple(value)
    return (value,)


def _bad_selector(fn: str, key: str, value: Any) -> TypeError:
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
            raise _bad_selector(fn, key, item)
    return items


def _coerce_strings(fn: str, key: str, value: Any) -> tuple[str, ...]:
    items = _as_tuple(value)
    if not items:
        raise ValueError(f"{fn}({key}=()): an empty tuple matches nothing; leave {key} out.")
    for item in items:
        if not isinstance(item, str):
            raise _bad_selector(fn, key, item)
        if key == "param":
            check_role(item, where=f"{fn}({key}={item!r})")
    return items


def _coerce_paths(fn: str, value: Any) -> tuple[str | re.Pattern[str], ...]:
    items = _as_tuple(value)
    if not items:
        raise ValueError(f"{fn}(path=()): an empty tuple matches nothing; leave path out.")
    for item in items:
        if not isinstance(item, (str, re.Pattern)):
            raise _bad_selector(fn, "path", item)
        if isinstance(item, re.Pattern) and not isinstance(item.pattern, str):
            raise TypeError(
                f"{fn}(path={show_value(item)}): a bytes pattern cannot search a canonical "
                f"path, which is a str. Compile a str pattern instead, e.g. "
                f"re.compile({item.pattern.decode('latin-1')!r})."
            )
    return items


def _coerce_min_ndim(fn: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _bad_selector(fn, "min_ndim", value)
    return value


def _coerce_when(fn: str, value: Any) -> Callable[..., Any]:
    if not callable(value):
        raise _bad_selector(fn, "when", value)
    try:
        hash(value)
    except TypeError:
        raise TypeError(
            f"{fn}(when={show_value(value)}): the callable is not hashable "
            f"({type_name(value)}), and a rule is a hashable value (policies are "
            f"compared and used as cache keys). Pass a function, or give the class "
            f"a __hash__ (e.g. a frozen dataclass)."
        ) from None
    return value


def check_label(fn: str, value: Any) -> str:
    """A label as given; it must be a non-empty string."""
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


def check_multiplier(fn: str, value: Any) -> float:
    """A learning-rate multiplier as a float: a finite number > 0.

    Raises:
      TypeError: not a real number.
      ValueError: 0 (the message points at ``dm.freeze``), negative, NaN, infinite, or
        too large for a float.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{fn}({value!r}): expected a learning-rate multiplier, a number > 0, got "
            f"{type_name(value)}."
        )
    try:
        number = float(value)
    except OverflowError:
        raise ValueError(
            f"{fn}({show_value(value)}): the multiplier is too large for a float; "
            f"expected a finite number > 0."
        ) from None
    if number == 0:
        raise ValueError(
            f"{fn}(0): a multiplier of 0 still keeps the optimizer state of the matching "
            f"leaves, and a decoupled weight decay still moves them. To stop them from "
            f"learning, use dm.freeze(...) with the same selectors."
        )
    if not math.isfinite(number) or number < 0:
        raise ValueError(
            f"{fn}({value!r}): expected a finite learning-rate multiplier > 0, got "
            f"{value!r}."
        )
    return number


def check_keywords(fn: str, keys: Sequence[str]) -> None:
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
_R = TypeVar("_R")


def checked_keywords(
    fn: str, extra: tuple[str, ...]
) -> Callable[[Callable[_P, _R]], Callable[_P, _R]]:
    """Gives a misspelt keyword of ``fn`` the message of :func:`check_keywords`; the
    signature stays what type checkers read."""

    def wrap(make: Callable[_P, _R]) -> Callable[_P, _R]:
        @functools.wraps(make)
        def checked(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            if any(key not in SELECTORS and key not in extra for key in kwargs):
                check_keywords(fn, [key for key in kwargs if key not in extra])
            return make(*args, **kwargs)

        return checked

    return wrap


def rule_fields(
    fn: str, selectors: dict[str, Any], *, label: str | None = None, rate: float = 1.0
) -> dict[str, Any]:
    """The fields of a rule, each selector checked and normalised; selectors left out
    (``None``), the default label and the rate 1 are not among them.

    Example:
      >>> rule_fields("decay", dict(layer="linear", param=("weight", "bias"), name=None))
      {'layer': ('linear',), 'param': ('weight', 'bias')}
    """
    check_keywords(fn, list(selectors))
    fields: dict[str, Any] = {}
    for key in ("layer", "within"):
        if selectors.get(key) is not None:
            fields[key] = _coerce_layers(fn, key, selectors[key])
    for key in ("param", "name"):
        if selectors.get(key) is not None:
            fields[key] = _coerce_strings(fn, key, selectors[key])
    if selectors.get("path") is not None:
        fields["path"] = _coerce_paths(fn, selectors["path"])
    if selectors.get("min_ndim") is not None:
        fields["min_ndim"] = _coerce_min_ndim(fn, selectors["min_ndim"])
    if selectors.get("when") is not None:
        fields["when"] = _coerce_when(fn, selectors["when"])
    if label is not None:
        fields["label"] = check_label(fn, label)
    if rate != 1.0:
        fields["rate"] = check_rate(fn, rate)
    return fields


def layer_matches(layer: Layer, wanted: tuple) -> bool:
    """Whether ``layer`` has one of the ``wanted`` kinds, groups or classes."""
    for item in wanted:
        if isinstance(item, str):
            if kind_in(layer.kind, item):
                return True
        elif layer.matches_class(item):
            return True
    return False


def path_matcher(item: str | re.Pattern) -> Callable[[str], bool]:
    """A test of a canonical path: a glob matches the whole path, a compiled pattern is
    searched in it."""
    if isinstance(item, re.Pattern):
        return lambda path: item.search(path) is not None
    pattern = re.compile(fnmatch.translate(item))
    return lambda path: pattern.match(path) is not None
