"""What the walk keeps per distinct module: its signature's parts and the
:class:`ResolvedModule` record."""

from __future__ import annotations

import re
from typing import Any

from ...core._names import name_kind
from ...core._roles import owner_trait
from ._infer import LinenModule
from ._tables import ATTENTION_PROJECTIONS, auto_class


# Module keys by what names-only inference reads of them (see key_traits). The ids
# are never reused, so that a walk's cache stays valid while the key map is cleared.
traits_of: dict[str, int] = {}
_trait_ids: dict[tuple, int] = {}
_TRAITS_KEPT = 1 << 16
_NUMBER_AT_END = re.compile(r"\d+$")


def key_traits(key: str) -> int:
    """An id equal for module keys that names-only inference cannot tell apart.

    :meth:`LinenReader.infer_module` reads a key only through its auto name, the kind
    its name makes evident, what roles read of it (a position table, a layer scale),
    whether it says "norm", whether it names an attention
    projection, and whether it is empty: ``Block_0`` and ``Block_7`` share an id, and so do
    ``Dense_0`` and ``Dense_1``.

    """
    found = traits_of.get(key)
    if found is None and key[-1:].isdigit():
        # No reading of a name tells its numbers apart (``blocks_3`` is ``blocks_0``):
        # the blocks of a deep model are read once.
        indexed = _NUMBER_AT_END.sub("0", key)
        if indexed != key:
            found = key_traits(indexed)
            traits_of[key] = found
    if found is None:
        auto, stacked = auto_class(key)
        traits = (
            auto,
            stacked,
            name_kind(key),
            owner_trait(key),
            key in ATTENTION_PROJECTIONS,
            bool(key),
        )
        found = _trait_ids.setdefault(traits, len(_trait_ids))
        if len(traits_of) >= _TRAITS_KEPT:
            traits_of.clear()
        traits_of[key] = found
    return found


def trace_facts(trace: Any, path: tuple[str, ...], arrays: Any) -> tuple:
    """What a trace says of the module at ``path`` that its reading reads: its class,
    the class it wraps, and the rank of each of its ``arrays`` in one layer. In a
    traced module's signature in place of its path, so that alike modules of a traced
    model are read once, as by names."""
    ndims = trace.ndims
    return (trace.classes.get(path), trace.wrapped.get(path),
            tuple([ndims.get((collection, path + (name,)))
                   for name in arrays for collection in trace.collections]))


def facts_below(trace: Any, path: tuple[str, ...]) -> tuple:
    """What the trace says of ``path`` and every path below it, each relative to it:
    classes, wrapped classes and one-layer ranks, in the order the trace met them.
    Subtrees whose facts and arrays are equal are read alike (``_repeats``)."""
    below = trace.below
    if below is None:
        found: dict[tuple[str, ...], list] = {}
        for kind, table in (("class", trace.classes), ("wraps", trace.wrapped)):
            for at, value in table.items():
                for i in range(len(at) + 1):
                    found.setdefault(at[:i], []).append((kind, at[i:], value))
        for (collection, at), rank in trace.ndims.items():
            for i in range(len(at)):
                found.setdefault(at[:i], []).append((collection, at[i:], rank))
        below = trace.below = {at: tuple(facts) for at, facts in found.items()}
    return below.get(path, ())


class WatchedArrays(dict):
    """The arrays of a module, noting whether inference looked at one (its shape)."""

    looked = False

    def get(self, key: Any, default: Any = None) -> Any:
        self.looked = True
        return super().get(key, default)


class ResolvedModule:
    """What every module of one signature shares: its module, its arrays' keys, and
    the layout of its mapping."""

    __slots__ = ("emitted", "keys", "layout", "module", "names", "token")

    def __init__(
        self,
        module: LinenModule,
        token: int,
        keys: tuple[int, ...],
        names: tuple[str, ...],
        layout: tuple[tuple[str, int], ...] | None,
    ):
        self.module = module
        self.token = token
        self.keys = keys  # one per array the module owns, in key order
        self.names = names  # the names of those arrays, in key order
        # Every key in order with AT_LEAF, AT_NODE or AT_CONST; None for a layer
        # (arrays only, in their own order).
        self.layout = layout
        self.emitted = False  # every one of its keys has a located first leaf


