"""What policy data may import: class and function paths, resolved only where the
caller allowed it; and the error every piece of policy data raises."""

from __future__ import annotations

import difflib
import importlib
import sys
from collections.abc import Sequence
from typing import Any

from ._bounds import short_text
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


_OWN = "decaymask"
"""The package whose import paths any policy data may name."""


def _allowed(module_name: str, imports: bool | tuple[str, ...]) -> bool:
    if imports is True:
        return True
    prefixes = (_OWN, *imports)  # type: ignore[misc]
    return any(module_name == p or module_name.startswith(p + ".") for p in prefixes)


def _import(path: str, key: str, imports: bool | tuple[str, ...]) -> Any:
    """An object from ``"pkg.module:Name"`` or ``"pkg.module.Name"``.

    Only paths into decaymask and into the modules ``imports`` allows are resolved,
    whether or not the module is already imported: importing a module runs its code,
    and a ``when=`` function is called on every parameter, so data names nothing the
    caller did not allow (``"sys:exit"`` would end the process at the first build).
    """
    shown = _shown(path)
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise PolicyDataError(
            f"{_WHERE}: {key}: {shown} is not an import path; write 'package.module:Name' "
            f"or 'package.module.Name'."
        )
    if module_name.startswith("."):
        raise PolicyDataError(
            f"{_WHERE}: {key}: {shown} is a relative import path, which data cannot "
            f"resolve; write the whole module path, e.g. 'package.module:Name'."
        )
    if not _allowed(module_name, imports):
        top = _shown(module_name.split(".", 1)[0])
        why = (
            "which the caller has not allowed: policy data names classes and functions "
            "only in decaymask and in the modules given as imports=, imported or not (a "
            "when= function is called on every parameter)"
            if module_name in sys.modules
            else "which is not imported, and importing a module runs its code"
        )
        raise PolicyDataError(
            f"{_WHERE}: {key}: {shown} is in the module {_shown(module_name)}, {why}. If "
            f"you trust this data, allow it: Policy.from_dict(data, imports=({top},)) or "
            f"Policy.from_file(path, imports=({top},)) (imports=True allows any module)."
        )
    try:
        obj: Any = importlib.import_module(module_name)
    except (ImportError, TypeError, ValueError) as err:
        raise PolicyDataError(f"{_WHERE}: {key}: cannot import {shown}: {err}.") from err
    try:
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError as err:
        raise PolicyDataError(f"{_WHERE}: {key}: cannot import {shown}: {err}.") from err
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
    kind = "" if isinstance(key, str) else f" ({type_name(key)}; keys are strings)"
    return PolicyDataError(
        f"{_WHERE}: {where}unknown key {_shown(key)}{kind}. Valid keys: "
        f"{', '.join(valid)}.{hint}"
    )


def _shown(value: Any) -> str:
    """A value of policy data as its messages show it, in at most about 60 characters."""
    return short_text(value, 60)
