"""Bounds on policy data, and values shown at a bounded length.

A policy file or dict may come from someone else. Neither reading it nor saying what is
wrong with it may take unbounded time or memory: a message shows a value shortened
(a few items of a list, a few levels of nesting, the ends of a long string or number),
never its whole repr, which for shared or huge data can run to gigabytes.
"""

from __future__ import annotations

import reprlib
from collections.abc import Mapping
from typing import Any

from ._text import visible

MAX_FILE_BYTES = 256 * 1024
"""The largest policy file read: policies are a few kilobytes."""
MAX_DEPTH = 100
"""The deepest nesting of tables and lists in policy data; a policy is about six deep."""
MAX_STRING = 10_000
"""The longest string (a key or a value) in policy data."""


def int_text(value: int) -> str:
    """An int as a message shows it, however large: Python refuses to write out an int
    of more than ~4300 digits, and counting them needs no string."""
    bits = abs(value).bit_length()
    if bits < 13_000:  # under 4000 digits: repr works, whatever the interpreter's limit
        try:
            return repr(value)
        except ValueError:  # a lower limit set by sys.set_int_max_str_digits
            pass
    digits = max(1, int((bits - 1) * 0.30102999566398120) + 1)
    if abs(value) >= 10**digits:
        digits += 1
    return f"<an int of {digits} digits>"


class _Short(reprlib.Repr):
    """``reprlib`` with few items per level and few levels, ints of any size, and the
    subclasses of dict, list and tuple shortened like their bases."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel = 3
        self.maxtuple = self.maxlist = self.maxarray = self.maxdict = 4
        self.maxset = self.maxfrozenset = self.maxdeque = 4
        self.maxstring = 200
        self.maxother = 200

    def repr1(self, x: Any, level: int) -> str:
        if isinstance(x, int) and not isinstance(x, bool):
            return int_text(x)
        if isinstance(x, Mapping) and type(x) is not dict:
            return self.repr_dict(x, level)  # type: ignore[arg-type]
        for base in (str, list, tuple):
            if isinstance(x, base) and type(x) is not base:
                shorten: Any = getattr(self, f"repr_{base.__name__}")
                return str(shorten(base(x), level))
        return super().repr1(x, level)


_SHORT = _Short()


def short_text(value: Any, width: int) -> str:
    """``value``'s repr in at most about ``width`` characters: a long one keeps its start
    and its last ten characters."""
    try:
        text = visible(_SHORT.repr(value))  # a repr of the caller's class may hold anything
    except Exception:  # a repr that raises: say what the value is instead
        text = f"<{type(value).__name__} object>"
    if len(text) <= width:
        return text
    return text[: max(10, width - 20)] + "..." + text[-10:]


def _render(path: Any) -> str:
    """A path kept as ``(parent, part)`` pairs, written as ``rules[0].layer``; a long
    one keeps its first and last parts."""
    parts: list[str] = []
    while path is not None:
        path, part = path
        parts.append(part)
    parts.reverse()
    if parts:
        parts[0] = parts[0].lstrip(".")
    if sum(map(len, parts)) <= 80:
        return "".join(parts)
    head: list[str] = []
    tail: list[str] = []
    while sum(map(len, head)) + len(parts[len(head)]) <= 45:
        head.append(parts[len(head)])
    while sum(map(len, tail)) + len(parts[-1 - len(tail)]) <= 25:
        tail.append(parts[-1 - len(tail)])
    return "".join(head) + "..." + "".join(reversed(tail))


def too_deep(where: str, at: str = "") -> str:
    """The message for data nested deeper than :data:`MAX_DEPTH`."""
    place = f" (at {at})" if at else ""
    return (
        f"{where}: the data is nested more than {MAX_DEPTH} levels deep{place}; a policy "
        f"is a few levels deep (a table of rules, each a table of keys and values), so "
        f"this is not a policy: check that it is the data (and the key) you meant."
    )


def check_shape(data: Any, where: str) -> None:
    """Raises if ``data`` nests deeper than :data:`MAX_DEPTH` or holds a string longer
    than :data:`MAX_STRING`; walks it without recursion, each shared table or list once.

    Raises:
      PolicyDataError: naming the key, e.g. ``rules[0].layer``.
    """
    from ._imports import PolicyDataError

    seen: set[int] = set()
    stack: list[tuple[Any, int, Any]] = [(data, 0, None)]
    while stack:
        value, depth, path = stack.pop()
        if isinstance(value, str):
            if len(value) > MAX_STRING:
                at = _render(path) or "the data"
                raise PolicyDataError(
                    f"{where}: {at}: a string of {len(value):,} characters "
                    f"({short_text(value, 60)}); no kind, role, name, label, glob, pattern "
                    f"or import path comes near {MAX_STRING:,}: check the data."
                )
            continue
        if isinstance(value, Mapping):
            items: Any = value.items()
            mapping = True
        elif isinstance(value, (list, tuple)):
            items = enumerate(value)
            mapping = False
        else:
            continue
        if id(value) in seen:
            continue
        seen.add(id(value))
        if depth >= MAX_DEPTH:
            raise PolicyDataError(too_deep(where, _render(path)))
        for key, item in items:
            if mapping:
                if isinstance(key, str) and len(key) > MAX_STRING:
                    raise PolicyDataError(
                        f"{where}: {_render(path) or 'the data'}: a key of {len(key):,} "
                        f"characters ({short_text(key, 60)}); no key of a policy comes "
                        f"near {MAX_STRING:,}: check the data."
                    )
                name = key if isinstance(key, str) else short_text(key, 30)
                part = "." + (name if len(name) <= 40 else name[:20] + "..." + name[-10:])
            else:
                part = f"[{key}]"
            stack.append((item, depth + 1, (path, part)))
