"""Regexes from policy data, refused where their shape can backtrack without end.

Python's ``re`` backtracks and has no timeout: ``(a*)*b`` searched in a path of thirty
``a``\\ s tries every way of splitting them between the two repeats, and a build hangs.
A policy file is data, so its ``{regex = "..."}`` paths are read by shape, at load
time, before they are compiled: :func:`backtracking` walks the stdlib's own parse of a
pattern and names the first shape that can take exponential time (or a polynomial of
high degree), or returns ``None``.

The shapes refused:

- a repeat (``*``, ``+``, ``{m,n}`` with more than one pass, greedy or lazy) whose body
  holds a repeat of varying count (``(a*)*``, ``(x+x+)+``, ``(\\w+/)*``): the body's
  matches can be cut up in exponentially many ways;
- such a repeat over an alternation whose branches can start with the same character,
  or of which one can match nothing (``(a|aa)+``, ``(\\w|\\d)+``);
- a backreference or a conditional group (``\\1``, ``(?P=name)``, ``(?(1)a|b)``);
- more than :data:`MAX_OPEN_REPEATS` unbounded repeats in one pattern (``.*a.*a.*a...``):
  each adds a factor of the path's length to a failing search;
- groups nested too deeply for the parser, and repeated alternatives whose character
  sets take too long to compare: reading a pattern is bounded as well.

A possessive quantifier (``a*+``) or an atomic group (``(?>a*)``) never gives back what
it matched, so a repeat inside one is not revisited: both are the fix offered, beside a
glob path.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable, Iterable
from typing import Any

try:  # Python 3.11+
    from re import _constants as _c  # type: ignore[attr-defined]
    from re import _parser as _p  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - older Pythons
    import sre_constants as _c
    import sre_parse as _p

MAX_OPEN_REPEATS = 4
"""The most unbounded, non-possessive repeats (``*``, ``+``, ``{m,}``) one pattern may hold."""

_UNBOUNDED = _c.MAXREPEAT
_REPEATS = (_c.MAX_REPEAT, _c.MIN_REPEAT)
_COMMITTED = tuple(
    op for op in (getattr(_c, "POSSESSIVE_REPEAT", None), getattr(_c, "ATOMIC_GROUP", None))
    if op is not None
)
_REFERENCES = tuple(
    getattr(_c, name)
    for name in ("GROUPREF", "GROUPREF_EXISTS", "GROUPREF_IGNORE", "GROUPREF_UNI_IGNORE",
                 "GROUPREF_LOC_IGNORE")
    if hasattr(_c, name)
)
# The characters tried when asking whether two branches can start alike: Latin, the
# characters a pattern names itself (range ends included, so overlapping ranges meet).
_BASE = [chr(i) for i in range(0x250)]

_CATEGORIES: dict[Any, Callable[[str], bool]] = {
    _c.CATEGORY_DIGIT: str.isdecimal,
    _c.CATEGORY_NOT_DIGIT: lambda ch: not ch.isdecimal(),
    _c.CATEGORY_SPACE: str.isspace,
    _c.CATEGORY_NOT_SPACE: lambda ch: not ch.isspace(),
    _c.CATEGORY_WORD: lambda ch: ch.isalnum() or ch == "_",
    _c.CATEGORY_NOT_WORD: lambda ch: not (ch.isalnum() or ch == "_"),
}

Test = Callable[[str], bool]


def backtracking(pattern: str, flags: int = 0) -> str | None:
    """Why searching with ``pattern`` can take exponential time, or ``None``.

    The reason completes "the regex ...": e.g. ``"repeats a group that holds a repeat of
    its own"``. A pattern that does not parse is left to ``re.compile`` to refuse.
    """
    try:
        parsed = _p.parse(pattern, flags)
    except (re.error, OverflowError, ValueError):
        return None
    except RecursionError:
        return "nests groups too deeply to be read"
    walk = _Walk(pattern, bool(parsed.state.flags & re.IGNORECASE))
    try:
        return walk.items(parsed, False) or walk.too_many()
    except RecursionError:
        return "nests groups too deeply to be read"
    except _TooComplex:
        return "has too many character sets in repeated alternatives to be read"


_BUDGET = 2_000_000  # characters tried across a pattern's sets before it is refused


class _TooComplex(Exception):
    """A pattern whose sets take too long to read; refused as a whole."""


_CASELESS = re.compile(r"\(\?[aiLmsux-]*i")  # an inline flag group that sets IGNORECASE


class _Walk:
    def __init__(self, pattern: str, ignore_case: bool) -> None:
        self.universe = frozenset(_BASE) | frozenset(pattern)
        # Read caselessly throughout where any part of the pattern is.
        self.ignore_case = ignore_case or _CASELESS.search(pattern) is not None
        self.forms: dict[str, set[str]] = {}  # a character: the universe's that match it
        for ch in self.universe:
            for form in {ch, ch.lower(), ch.upper()} if self.ignore_case else (ch,):
                self.forms.setdefault(form, set()).add(ch)
        self.codes = sorted(map(ord, self.universe))
        self.firsts: dict[int, tuple[frozenset[str], bool]] = {}
        self.budget = _BUDGET
        self.open_repeats = 0

    def too_many(self) -> str | None:
        if self.open_repeats <= MAX_OPEN_REPEATS:
            return None
        return (
            f"holds {self.open_repeats} unbounded repeats (at most {MAX_OPEN_REPEATS}; "
            f"each multiplies a failing search by the path's length)"
        )

    def items(self, items: Any, repeated: bool) -> str | None:
        """The first risky shape in ``items``; ``repeated``: they are the body (or part of
        it) of a repeat of more than one pass that may give back what it matched."""
        for op, av in items:
            found = self.item(op, av, repeated)
            if found:
                return found
        return None

    def item(self, op: Any, av: Any, repeated: bool) -> str | None:
        if op in _REFERENCES:
            return "uses a backreference or a conditional group, which can backtrack without end"
        if op in _REPEATS:
            low, high, body = av
            if high == _UNBOUNDED:
                self.open_repeats += 1
            if repeated and low != high:
                return "repeats a group that holds a repeat of its own (as (a*)* or (x+x+)+ do)"
            return self.items(body, repeated or high == _UNBOUNDED or high > 1)
        if op in _COMMITTED:
            # Possessive and atomic: what they matched is never given back; their own
            # body is read on its own.
            return self.items(av[-1] if op != getattr(_c, "ATOMIC_GROUP", None) else av, False)
        if op is _c.SUBPATTERN:
            return self.items(av[-1], repeated)
        if op in (_c.ASSERT, _c.ASSERT_NOT):  # lookarounds are atomic in Python's re
            return self.items(av[1], False)
        if op is _c.BRANCH:
            branches = av[1]
            if repeated and self._overlap(branches):
                return (
                    "repeats an alternation whose branches can match the same text "
                    "(as (a|aa)+ does)"
                )
            for branch in branches:
                found = self.items(branch, repeated)
                if found:
                    return found
        return None

    def _overlap(self, branches: list[Any]) -> bool:
        """Whether two branches can start with the same character, or one can be empty."""
        seen: set[str] = set()
        for branch in branches:
            chars, empty = self.first(branch)
            if empty or not chars.isdisjoint(seen):
                return True
            seen |= chars
        return False

    def first(self, items: Any) -> tuple[frozenset[str], bool]:
        """The characters (of the universe) a match of ``items`` can start with, and
        whether it can match nothing; each node read once."""
        known = self.firsts.get(id(items))
        if known is not None:
            return known
        chars: set[str] = set()
        empty = True
        for op, av in items:
            more, can = self._first_of(op, av)
            chars |= more
            if not can:
                empty = False
                break
        self.firsts[id(items)] = found = (frozenset(chars), empty)
        return found

    def _first_of(self, op: Any, av: Any) -> tuple[frozenset[str] | set[str], bool]:
        if op is _c.LITERAL:
            return self.forms.get(chr(av), set()), False
        if op is _c.NOT_LITERAL:
            return self.universe - self.forms.get(chr(av), set()), False
        if op is _c.IN:
            return self._in(av), False
        if op is _c.AT or op in (_c.ASSERT, _c.ASSERT_NOT):
            return set(), True
        if op is _c.SUBPATTERN:
            return self.first(av[-1])
        if op is getattr(_c, "ATOMIC_GROUP", None):
            return self.first(av)
        if op in _REPEATS or op is getattr(_c, "POSSESSIVE_REPEAT", None):
            chars, empty = self.first(av[2])
            return chars, empty or av[0] == 0
        if op is _c.BRANCH:
            union: set[str] = set()
            empty = False
            for branch in av[1]:
                more, can = self.first(branch)
                union |= more
                empty = empty or can
            return union, empty
        return self.universe, True  # ANY, references, anything else: assume the worst

    def _in(self, items: list[tuple[Any, Any]]) -> set[str]:
        """The universe's characters a set (``[...]``) matches: read item by item where
        it lists characters and narrow ranges, else tested on each character."""
        chars: set[str] = set()
        for op, av in items:
            if op is _c.LITERAL:
                chars |= self.forms.get(chr(av), set())
            elif op is _c.RANGE:
                start, stop = (bisect.bisect_left(self.codes, av[0]),
                               bisect.bisect_right(self.codes, av[1]))
                self._spend(stop - start)
                for code in self.codes[start:stop]:
                    chars |= self.forms.get(chr(code), set())
            else:  # a negation, a category
                self._spend(len(self.universe))
                test = _in_test(items)
                return {ch for ch in self.universe if self._matches(test, ch)}
        return chars

    def _spend(self, work: int) -> None:
        self.budget -= work
        if self.budget < 0:
            raise _TooComplex

    def _matches(self, test: Test, ch: str) -> bool:
        forms = {ch, ch.lower(), ch.upper()} if self.ignore_case else (ch,)
        return any(test(form) for form in forms)


def _anything(ch: str) -> bool:
    return True


def _is(char: str) -> Test:
    return lambda ch: ch == char


def _is_not(char: str) -> Test:
    return lambda ch: ch != char


def _between(low: int, high: int) -> Test:
    return lambda ch: low <= ord(ch) <= high


def _in_test(items: list[tuple[Any, Any]]) -> Test:
    negate = any(op is _c.NEGATE for op, _ in items)
    parts: list[Test] = []
    for op, av in items:
        if op is _c.LITERAL:
            parts.append(_is(chr(av)))
        elif op is _c.RANGE:
            parts.append(_between(av[0], av[1]))
        elif op is _c.CATEGORY:
            parts.append(_CATEGORIES.get(av, _anything))
        elif op is not _c.NEGATE:
            parts.append(_anything)
    if negate:
        if _anything in parts:
            return _anything
        return lambda ch: not any(part(ch) for part in parts)
    return lambda ch: any(part(ch) for part in parts)
