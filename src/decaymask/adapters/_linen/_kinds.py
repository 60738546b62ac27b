"""The kind of a module known by its class (traced) or by its auto name only, from the
registry, then from Linen's tables; cached until the registry changes."""

from __future__ import annotations

from ...core import _registry
from .._common import RegistryCache
from ._tables import KIND_BY_NAME, KIND_TABLE, LINEN_CONTAINERS, WRAPPER_NAMES, WRAPPERS

Said = tuple[str | None, str, _registry.Registration | None]

# A class, or a class name read off an auto name -> (kind, source, registration). The
# two never collide as keys (a class is not equal to any string).
_kinds = RegistryCache()


def linen_class_kind(cls: type) -> Said:
    """(kind, how it was found, registration) for a module class; kind ``None`` where
    neither the registry nor :data:`KIND_TABLE` knows it (its name is then read with
    its arrays).

    The kind is ``"wrapper"`` for :data:`WRAPPERS`.
    """
    table = _kinds.table()
    found = table.get(cls)
    if found is None:
        found = table[cls] = _resolve_class(cls)
    return found


def _resolve_class(cls: type) -> Said:
    registration = _registry.lookup_class(cls)
    if registration is not None:
        return registration.kind, "registered", registration
    if issubclass(cls, WRAPPERS):
        return "wrapper", "class", None
    for base in cls.__mro__:
        kind = KIND_TABLE.get(base)
        if kind is not None:
            return kind, "class", None
        if base in LINEN_CONTAINERS:
            return "unknown", "class", None
    # Neither table nor registry: the class name is read with the arrays, per module.
    return None, "class", None


def auto_name_kind(auto: str | None) -> Said:
    """(kind, source, registration) for a class known by its auto name only.

    The kind is ``None`` where neither the registry nor :data:`KIND_TABLE` knows the
    class name, and ``"wrapper"`` for :data:`WRAPPERS`.
    """
    table = _kinds.table()
    found = table.get(auto)
    if found is None:
        found = table[auto] = _resolve_name(auto)
    return found


def _resolve_name(auto: str | None) -> Said:
    registration = _registry.lookup_name(auto) if auto is not None else None
    if registration is not None:
        return registration.kind, "registered", registration
    if auto in WRAPPER_NAMES:
        return "wrapper", "name", None
    return KIND_BY_NAME.get(auto), "name", None  # type: ignore[arg-type]
