"""Names as output shows them: every character visible, nothing a terminal or a browser
would act on.

Paths, class names, labels and rule texts come from the user's tree and code, and a key
may hold anything: an escape sequence that recolours or clears a terminal, a carriage
return that overwrites the line before it, a newline that splits a table row, a bidi
override that shows a path reversed. Every view of a report, every warning and every
message that names them passes them through :func:`visible` first.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Callable
from types import TracebackType
from typing import Any, Literal, TypeVar, cast

F = TypeVar("F", bound=Callable[..., Any])

# Unicode's control (Cc), format (Cf: bidi overrides and isolates, zero-width
# characters, the byte order mark), line and paragraph separator (Zl, Zp) and lone
# surrogate (Cs: printing one raises) categories.
_HIDDEN = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})
_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(char: str) -> str:
    if unicodedata.category(char) not in _HIDDEN:
        return char
    code = ord(char)
    if char in _SHORT:
        return _SHORT[char]
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def visible(text: str) -> str:
    """``text`` with every control, format and separator character written as its
    Python escape (``\\x1b``, ``\\n``, ``\\u202e``), as ``repr`` writes it; other
    text unchanged.

    Example:
      >>> print(visible("blocks/0\\x1b[31m/w\\n"))
      blocks/0\\x1b[31m/w\\n
    """
    if text.isprintable():  # the common case, and a fast one
        return text
    return "".join(map(_escape, text))


def visible_message(text: str) -> str:
    """A message made visible line by line: its own line breaks kept, every other
    control, format and separator character escaped as :func:`visible` does."""
    if text.isprintable():
        return text
    return "\n".join(visible(line) for line in text.split("\n"))


class _VisibleErrors:
    """A ``with`` block whose errors leave with visible messages (see
    :func:`visible_errors`)."""

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> Literal[False]:
        if isinstance(error, Exception):
            make_visible(error)
        return False


VISIBLE_ERRORS = _VisibleErrors()
"""``with VISIBLE_ERRORS:``: the block's errors leave with visible messages."""


def visible_errors(fn: F) -> F:
    """An entry point whose errors leave with visible messages.

    A message names paths, keys, classes and labels taken from the user's tree, and
    most messages are written where a name is at hand; here, where an error leaves the
    entry point, an exception whose text holds a control or format character gets its
    message (``args[0]``) rewritten by :func:`visible_message`, the same exception
    object re-raised with its traceback. Canonical paths themselves (what rules match)
    are untouched: only the text shown is. The wrapper lives in decaymask, so warnings
    still point at the caller's line.
    """

    @functools.wraps(fn)
    def entry(*args: Any, **kwargs: Any) -> Any:
        with VISIBLE_ERRORS:
            return fn(*args, **kwargs)

    return cast(F, entry)


def make_visible(error: Exception) -> Exception:
    """``error`` with its message made visible in place (see :func:`visible_errors`)."""
    args = error.args
    if not args or type(args[0]) is not str:
        return error
    try:
        text = str(error)
    except Exception:  # an exception whose text cannot be made: left as it is
        return error
    if visible_message(text) != text:
        try:
            error.args = (visible_message(args[0]), *args[1:])
        except (AttributeError, TypeError):  # an exception type whose args are fixed
            pass
    return error


def shorten(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters, ``...`` marking the cut."""
    return text if len(text) <= width else text[: max(width - 3, 0)] + "..."


def markdown_code(text: str) -> str:
    """``text`` as a Markdown code span: fenced by more backticks than it holds in a
    row, with a space inside where it starts or ends with one."""
    runs = [len(run) for run in re.findall(r"`+", text)]
    fence = "`" * (max(runs, default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def markdown_text(text: str) -> str:
    """``text`` for a Markdown table cell outside a code span: ``<`` cannot open a
    tag. (``|`` is escaped by the table itself.)"""
    return text.replace("<", "\\<")
