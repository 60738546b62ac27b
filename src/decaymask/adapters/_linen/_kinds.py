"""The kind of a module known by its class (traced) or by its auto name only, from the
registry, then from Linen's tables; cached until the registry changes."""

from __future__ import annotations

from ...core import _registry
from .._common import RegistryCache
from ._tables import KIND_BY_NAME, KIND_TABLE, LINEN_CONTAINERS, WRAPPER_NAMES, WRAPPERS

# Per-class answers, dropped whenever the registry changes.
_class_cache = RegistryCache()  # class -> (kind, source)


def linen_class_kind(cls: type) -> tuple[str | None, str]:
    """(kind, how it was found) for a module class; kind ``None`` where neither the
    registry nor :data:`KIND_TABLE` knows it (its name is then read with its arrays).

    The kind is ``"wrapper"`` for :data:`WRAPPERS`.
    """
    table = _class_cache.table()
    found = table.get(cls)
    if found is None:
        found = table[cls] = _resolve_linen_class_kind(cls)
    return found


def _resolve_linen_class_kind(cls: type) -> tuple[str | None, str]:
    registration = _registry.lookup_class(cls)
    if registration is not None:
        return registration.kind, "registered"
    if issubclass(cls, WRAPPERS):
        return "wrapper", "class"
    for base in cls.__mro__:
        kind = KIND_TABLE.get(base)
        if kind is not None:
            return kind, "class"
        if base in LINEN_CONTAINERS:
            return "unknown", "class"
    # Neither table nor registry: the class name is read with the arrays, per module.
    return None, "class"


_auto_cache = RegistryCache()  # auto name -> (kind, source, registration)


def auto_name_kind(auto: str | None) -> tuple[str | None, str, _registry.Registration | None]:
    """(kind, source, registration) for a class known by its auto name only.

    The kind is ``None`` where neither the registry nor :data:`KIND_TABLE` knows the
    class name, and ``"wrapper"`` for :data:`WRAPPERS`.
    """
    table = _auto_cache.table()
    found = table.get(auto)
    if found is None:
        registration = _registry.lookup_name(auto) if auto is not None else None
        if registration is not None:
            found = (registration.kind, "registered", registration)
        elif auto in WRAPPER_NAMES:
            found = ("wrapper", "name", None)
        else:
            found = (KIND_BY_NAME.get(auto), "name", None)  # type: ignore[arg-type]
        table[auto] = found
    return found

