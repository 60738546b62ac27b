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

from ._bounds import short_text
from ._leaf import Layer
from ._values import show_value, type_name
from ._vocab import GROUPS, KINDS, ROLES, check_kind, check_role, kind_in
from ._vocab import LayerSelector as LayerSelector
from ._vocab import RoleSelector as RoleSelector

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


NameSelector = Union[str, Sequence[str]]
"""A ``name=`` value: one string or several."""
PathSelector = Union[str, "re.Pattern[str]", Sequence[Union[str, "re.Pattern[str]"]]]
"""A ``path=`` value: a glob, a compiled ``str`` pattern, or several of those."""


def _as_tuple(value: Any) -> tuple[Any, ...]:
    if isinstance(value, (tuple, list)):
        return tuple(value)
    return (value,)


def _bad_selector(fn: str, key: str, value: Any) -> TypeError:
    return TypeError(
        f"{fn}({key}={short_repr(value, 60)}): expected {_SELECTOR_FORMS[key]}; "
        f"got {type_name(value)}."
    )


def _coerce_layers(fn: str, key: str, value: Any) -> tuple[str | type, ...]:
    """The one place that turns a ``layer=`` or ``within=`` value into kinds and classes."""
    items = _as_tuple(value)
    if not items:
        raise ValueError(f"{fn}({key}=()): an empty tuple matches nothing; leave {key} out.")
    for item in items:
        if isinstance(item, str):
            check_kind(item, where=f"{fn}({key}={short_repr(item, 60)})")
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
            check_role(item, where=f"{fn}({key}={short_repr(item, 60)})")
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
            f"{fn}(label={short_repr(value, 60)}): expected a non-empty string naming a group of "
            f"optax.partition, got {type_name(value)}."
        )
    return value


def short_repr(value: Any, width: int = 24) -> str:
    """A value as a message shows it: its repr in about ``width`` characters, with the
    middle of a long one (a number such as ``10**400``) left out. Bounded whatever the
    value: a list shows a few items, an int too long to write out its number of digits.

    Example:
      >>> short_repr(0.5), short_repr(10**40), short_repr(10**5000)
      ('0.5', '1000000000...0000000000', '<an int of 5001 digits>')
    """
    return short_text(value, width)


def as_float(value: Any) -> float | None:
    """A real number as a float; ``None`` where it is too large for one (an int such as
    ``10**400``), which ``float()`` would raise ``OverflowError`` for."""
    try:
        return float(value)
    except OverflowError:
        return None


def check_rate(fn: str, value: Any) -> float:
    """A rate as a float; it must be a finite number >= 0.

    Raises:
      TypeError: anything else; an infinite or NaN rate would turn every decayed weight
        into inf or NaN at the first step.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{fn}(rate={short_repr(value, 60)}): expected a non-negative number that "
            f"multiplies the weight decay of the matching leaves, got {type_name(value)}."
        )
    number = as_float(value)
    if number is None or not (math.isfinite(number) and number >= 0):
        shown = short_repr(value)
        raise TypeError(
            f"{fn}(rate={shown}): expected a non-negative number that multiplies the "
            f"weight decay of the matching leaves, finite (inf or nan would turn every "
            f"decayed weight into inf or nan), got {shown}."
        )
    return number


def check_multiplier(value: Any, *, where: str, freeze: str) -> float:
    """A learning-rate multiplier as a float: a finite number > 0.

    Args:
      value: the multiplier given.
      where: the rule or the key it was given to, for the messages (``"lr(0)"``).
      freeze: how to freeze the same leaves instead, where that is what a multiplier
        of 0 or less most likely meant.

    Raises:
      TypeError: not a real number (a bool is not one).
      ValueError: 0 (the message points at freezing), negative, NaN, infinite, or too
        large for a float.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        hint = (
            f" True and False are not multipliers; to stop leaves from learning, {freeze}."
            if isinstance(value, bool)
            else ""
        )
        raise TypeError(
            f"{where}: expected a learning-rate multiplier, a number > 0 (e.g. 0.1), "
            f"got {short_repr(value, 60)} ({type_name(value)}).{hint}"
        )
    number = as_float(value)
    shown = short_repr(value)
    if number == 0:
        raise ValueError(
            f"{where}: a multiplier of 0 still keeps the optimizer state of the matching "
            f"leaves, and a decoupled weight decay still moves them. To stop them from "
            f"learning, {freeze}."
        )
    if value < 0:
        raise ValueError(
            f"{where}: expected a learning-rate multiplier > 0, got {shown}: a negative "
            f"multiplier moves the matching leaves up the gradient. To stop them from "
            f"learning, {freeze}."
        )
    if number is None:
        raise ValueError(
            f"{where}: the multiplier {shown} is too large for a float; expected a finite "
            f"number > 0 (e.g. 0.1 or 10)."
        )
    if not math.isfinite(number):
        raise ValueError(
            f"{where}: expected a finite learning-rate multiplier > 0, got {shown}: it "
            f"would turn the matching leaves into {'nan' if number != number else 'inf or nan'} "
            f"at the first step."
        )
    return number


_NOT_SELECTORS = {
    "rate": "a rate multiplies weight decay, so only decay(...) rules take one",
    "label": "a label names a group for optax.partition, so only decay(...), "
    "no_decay(...) and label(...) rules give one",
}


def check_keywords(fn: str, keys: Sequence[str]) -> None:
    """A keyword ``fn`` does not take: the error that says why, or, for an unknown
    selector, lists every valid selector and the nearest one (Python's own message
    names only the bad keyword)."""
    for key in keys:
        if key in _NOT_SELECTORS:
            hint = (
                " To scale the learning rate, give the multiplier first: lr(0.1, ...)."
                if fn == "lr" and key == "rate"
                else ""
            )
            raise TypeError(f"{fn}({key}=...): {_NOT_SELECTORS[key]}.{hint}")
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


def _check_call(fn: str, positional: tuple[str, ...], args: tuple, kwargs: dict) -> None:
    """A positional argument given by keyword, or a selector given by position: the
    call written the way ``fn`` takes it."""
    for key in positional:
        if key in kwargs:
            raise TypeError(
                f"{fn}({key}={show_value(kwargs[key])}): the {key} is given by position, "
                f"first: {fn}({show_value(kwargs[key])}, layer=...)."
            )
    if len(args) <= len(positional):
        return
    lead = "".join(show_value(a) + ", " for a in args[: len(positional)])
    first = args[len(positional)]
    shown = show_value(first)
    if isinstance(first, type):
        examples = (
            f"{fn}({lead}layer={shown}) for the layer itself, or {fn}({lead}within={shown}) "
            f"for everything inside it"
        )
    elif isinstance(first, str) and (first in KINDS or first in GROUPS):
        examples = f"{fn}({lead}layer={shown})"
    elif isinstance(first, str) and first in ROLES:
        examples = f"{fn}({lead}param={shown})"
    elif isinstance(first, str) and first:
        glob = first if any(c in first for c in "*?[") else first.rstrip("/") + "/*"
        examples = f"{fn}({lead}path={glob!r})"
    else:
        examples = f"{fn}({lead}layer='linear')"
    given = lead + ", ".join(show_value(a) for a in args[len(positional):])
    raise TypeError(
        f"{fn}({given}): selectors are given by keyword, e.g. {examples}. Valid "
        f"selectors: {', '.join(SELECTORS)}."
    )


_P = ParamSpec("_P")
_R = TypeVar("_R")


def checked_keywords(
    fn: str, extra: tuple[str, ...], positional: tuple[str, ...] = ()
) -> Callable[[Callable[_P, _R]], Callable[_P, _R]]:
    """Gives a misspelt keyword of ``fn`` the message of :func:`check_keywords`, and a
    selector given by position (or a positional argument given by keyword) the form
    ``fn`` takes; the signature stays what type checkers read.

    Args:
      fn: the rule's function, for the messages.
      extra: the keywords ``fn`` takes besides the selectors.
      positional: the names of ``fn``'s positional-only arguments.
    """

    def wrap(make: Callable[_P, _R]) -> Callable[_P, _R]:
        @functools.wraps(make)
        def checked(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            if len(args) != len(positional) or any(key not in SELECTORS for key in kwargs):
                _check_call(fn, positional, args, kwargs)
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
    # Checked before it is compared: a Decimal signalling NaN raises on comparison.
    number = check_rate(fn, rate)
    if number != 1.0:
        fields["rate"] = number
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
