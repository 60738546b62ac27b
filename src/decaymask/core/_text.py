"""Names as output shows them: every character visible, nothing a terminal or a browser
would act on.

Paths, class names, labels and rule texts come from the user's tree and code, and a key
may hold anything: an escape sequence that recolours or clears a terminal, a carriage
return that overwrites the line before it, a newline that splits a table row, a bidi
override that shows a path reversed. Every view of a report, every warning and every
message that names them passes them through :func:`visible` first.
"""

from __future__ import annotations

import re
import unicodedata

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
