"""Families of blocks a walk reads alike: the members of one family (one parent reading
and one name, as an adapter defines it) whose fingerprints (what the walk reads below
them) are equal are read alike, so the later ones take the first one's result.

The first member of each family is read with nothing added and fingerprinted only once
a second one comes, so a model without repeated blocks pays nothing.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any


class Families:
    """What each member of each family made, by fingerprint; an adapter gives
    :meth:`fingerprint` of its members. Holds the first member of a family until a
    second one comes: a walk drops the whole table when it is done."""

    __slots__ = ("families",)

    def __init__(self) -> None:
        # family -> [its first member or None, that member's result, {fingerprint:
        # result} once a second member came, else None]
        self.families: dict[Hashable, list[Any]] = {}

    def fingerprint(self, member: Any) -> Hashable | None:
        """What a walk reads of ``member``; ``None`` where it cannot say (the member is
        then read on its own)."""
        raise NotImplementedError

    def _find(self, family: Hashable, member: Any) -> tuple[Any, Any]:
        """(the result of an earlier member alike to ``member``, or ``None``; its
        fingerprint for :meth:`_note`, where one was taken)."""
        entry = self.families.get(family)
        if entry is None:
            return None, None
        table = entry[2]
        if table is None:
            table = entry[2] = {}
            first = self.fingerprint(entry[0])
            if first is not None:
                table[first] = entry[1]
            entry[0] = None
        found = self.fingerprint(member)
        if found is None:
            return None, None
        return table.get(found), found

    def _note(self, family: Hashable, member: Any, result: Any, found: Any) -> None:
        """Records what reading ``member`` made; ``found`` is what :meth:`_find` gave."""
        entry = self.families.get(family)
        if entry is None:
            self.families[family] = [member, result, None]
        elif found is not None and entry[2] is not None:
            entry[2][found] = result
