"""The values users pass, described for messages and checked for pickling: type
names, numpy bools (the core imports no numpy), import paths."""

from __future__ import annotations

import re
import sys
import types
from typing import Any

from ._text import visible


def type_name(value: Any) -> str:
    """The type of ``value`` as an error message names it: ``int``, ``numpy.bool``.

    Example:
      >>> type_name(3), type_name("kernel")
      ('int', 'str')
    """
    cls = type(value)
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return visible(f"{cls.__module__}.{cls.__qualname__}")


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


def show_value(value: Any) -> str:
    """A selector value as a rule's repr and its error messages write it: a class by
    its name, a compiled pattern as the call that makes it, a function by its name.

    Example:
      >>> show_value(re.compile("attn")), show_value(int), show_value("norm")
      ("re.compile('attn')", 'int', "'norm'")
    """
    if isinstance(value, type):
        return visible(value.__qualname__)
    if isinstance(value, re.Pattern):
        return f"re.compile({value.pattern!r})"
    if callable(value):
        return visible(getattr(value, "__qualname__", None) or repr(value))
    return visible(repr(value))
