"""What policy data may import: class and function paths, resolved only where the
caller allowed it; and the error every piece of policy data raises."""

from __future__ import annotations

import difflib
import importlib
import sys
from collections.abc import Sequence
from typing import Any

from ._values import importable, type_name

_WHERE = "Policy.from_dict"


class PolicyDataError(ValueError):
    """Policy data that does not describe a policy; the message names the key."""


def check_imports(fn: str, imports: Any) -> bool | tuple[str, ...]:
    """The ``imports=`` argument as ``True`` or a tuple of module prefixes."""
    if imports is True:
        return True
    if imports is False or imports is None:
        return ()
    if isinstance(imports, Sequence) and not isinstance(imports, str):
        if all(isinstance(p, str) and p and not p.startswith(".") for p in imports):
            return tuple(imports)
    raise TypeError(
        f"{fn}(imports={imports!r}): expected True (import any module) or a tuple of "
        f"module prefixes, e.g. ('mylib',), got {type_name(imports)}."
    )


def _allowed(module_name: str, imports: bool | tuple[str, ...]) -> bool:
    if imports is True:
        return True
    return any(module_name == p or module_name.startswith(p + ".") for p in imports)  # type: ignore[union-attr]


def _import(path: str, key: str, imports: bool | tuple[str, ...]) -> Any:
    """An object from ``"pkg.module:Name"`` or ``"pkg.module.Name"``.

    A module already imported is looked up, which runs no code; any other is imported
    only where ``imports`` allows it.
    """
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise PolicyDataError(
            f"{_WHERE}: {key}: {path!r} is not an import path; write 'package.module:Name' "
            f"or 'package.module.Name'."
        )
    if module_name.startswith("."):
        raise PolicyDataError(
            f"{_WHERE}: {key}: {path!r} is a relative import path, which data cannot "
            f"resolve; write the whole module path, e.g. 'package.module:Name'."
        )
    obj: Any = sys.modules.get(module_name)
    if obj is None:
        if not _allowed(module_name, imports):
            top = module_name.split(".", 1)[0]
            raise PolicyDataError(
                f"{_WHERE}: {key}: {path!r} is in the module {module_name!r}, which is "
                f"not imported, and importing a module runs its code. If you trust this "
                f"data, allow it: Policy.from_dict(data, imports=({top!r},)) or "
                f"Policy.from_file(path, imports=({top!r},)) (imports=True allows any "
                f"module); or import {module_name} before loading the policy."
            )
        try:
            obj = importlib.import_module(module_name)
        except (ImportError, TypeError, ValueError) as err:
            raise PolicyDataError(f"{_WHERE}: {key}: cannot import {path!r}: {err}.") from err
    try:
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError as err:
        raise PolicyDataError(f"{_WHERE}: {key}: cannot import {path!r}: {err}.") from err
    return obj


def _dotted(obj: Any, key: str) -> str:
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", "")
    if not module or not qualname or "<" in qualname:
        raise PolicyDataError(
            f"Policy.to_dict: {key}: {obj!r} has no import path (a lambda or a local "
            f"definition); define it at module level to write the policy as data."
        )
    if not importable(obj):
        # Its module holds another object (or nothing) under that name: the path would
        # read back as something else.
        raise PolicyDataError(
            f"Policy.to_dict: {key}: {obj!r} is not what its import path "
            f"{module}:{qualname} names; define it at module level under its own name "
            f"to write the policy as data."
        )
    return f"{module}:{qualname}"


def _unknown_key(where: str, key: Any, valid: tuple[str, ...]) -> PolicyDataError:
    close = difflib.get_close_matches(key, valid, n=1) if isinstance(key, str) else []
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return PolicyDataError(
        f"{_WHERE}: {where}unknown key {_shown(key)}. Valid keys: {', '.join(valid)}.{hint}"
    )


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:40] + "..." + text[-10:]
