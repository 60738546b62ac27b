"""What a tree's paths and stacked axes say about its stacks: indexed sibling modules
(``blocks/3``, ``layers_3``, Haiku's ``block``, ``block_1``) and modules stacked along a
layer axis."""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ._leaf import Leaf

if TYPE_CHECKING:
    from ._blocks import Block

_INDEXED = re.compile(r"^(.*?)_?(\d+)$")


@functools.lru_cache(maxsize=8192)
def _index(key: str) -> tuple[str | None, int] | None:
    """(stem, index) of an indexed key: ``3`` -> (None, 3), ``layers_3`` -> ("layers", 3)."""
    if key.isdigit():
        return None, int(key)
    found = _INDEXED.match(key)
    if found is None or not found.group(1):
        return None
    return found.group(1), int(found.group(2))


def _glob(stem: str | None, prefix: tuple[str, ...]) -> str:
    parent = "/".join(prefix)
    last = "*" if stem is None else f"{stem}_*"
    return f"{parent}/{last}" if parent else last


@dataclasses.dataclass
class _Group:
    """Indexed sibling modules: ``prefix/stem_<i>`` (or ``prefix/<i>``)."""

    prefix: tuple[str, ...]
    stem: str | None
    members: dict[int, str] = dataclasses.field(default_factory=dict)  # index -> key
    first: int = 0  # the first leaf in it, for the tree's order

    @property
    def glob(self) -> str:
        return _glob(self.stem, self.prefix)


def _ordered(modules: dict[tuple[str, ...], int]) -> list[tuple[str, ...]]:
    """Modules in the tree's order of stacks, each stack by its own indices.

    A bare ``block`` beside ``block_1``, ``block_2`` (and no ``block_0``) is the first
    of that stack, as Haiku names alike modules, wherever the tree's order puts it.
    """
    numbers: dict[tuple[tuple[str, ...], str | None], set[int]] = {}
    for path in modules:
        index = _index(path[-1])
        if index is not None:
            numbers.setdefault((path[:-1], index[0]), set()).add(index[1])
    stacks: dict[tuple[tuple[str, ...], str | None], int] = {}
    keyed = []
    for path, first in modules.items():
        index = _index(path[-1])
        if index is not None:
            stack, number = (path[:-1], index[0]), index[1]
        elif 0 not in numbers.get((path[:-1], path[-1]), {0}):
            stack, number = (path[:-1], path[-1]), 0
        else:
            stack, number = (path, None), 0
        stacks.setdefault(stack, first)
        keyed.append((stack, number, path))
    keyed.sort(key=lambda item: (stacks[item[0]], item[1]))
    return [path for _, _, path in keyed]


def _candidate_glob(blocks: list[Block]) -> str:
    first = blocks[0]
    if first.size or len(blocks) == 1:
        return first.text
    index = _index(first.path[-1])
    return _glob(index[0] if index else None, first.path[:-1])


def _nested_glob(outer: _Group, inner: _Group) -> str:
    """The glob of ``inner``'s level across every member of ``outer``:
    ``blocks/*/blocks/*`` for ``blocks/1/blocks/*`` inside ``blocks/*``."""
    depth = len(outer.prefix)
    parts = list(inner.prefix)
    parts[depth] = "*" if outer.stem is None else f"{outer.stem}_*"
    return _glob(inner.stem, tuple(parts))


def _indexed_groups(
    keys: list[tuple[str, ...]], params: list[int]
) -> tuple[list[_Group], list[_Group]]:
    """Groups of two or more indexed sibling modules that each hold submodules: those
    all of one structure (candidate stacks), and all of them (to tell stacks inside
    stacks, such as chunks of blocks)."""
    groups: dict[tuple[tuple[str, ...], str | None], _Group] = {}
    bare: dict[tuple[tuple[str, ...], str], int] = {}
    # Module paths are few beside leaves: each is looked at once.
    modules: dict[tuple[str, ...], int] = {}
    for i in params:
        path = keys[i]
        for j in range(1, len(path)):
            modules.setdefault(path[:j], i)
    for member, i in modules.items():
        key = member[-1]
        index = _index(key)
        if index is None:
            bare.setdefault((member[:-1], key), i)
        else:
            group = groups.get((member[:-1], index[0]))
            if group is None:
                group = groups[(member[:-1], index[0])] = _Group(member[:-1], index[0], first=i)
            group.members[index[1]] = key
            group.first = min(group.first, i)
    # What each member of a group of two or more holds, relative to it.
    wanted: dict[tuple[str, ...], int] = {}
    for (prefix, stem), group in groups.items():
        names = list(group.members.values())
        if stem is not None and 0 not in group.members and (prefix, stem) in bare:
            names.append(stem)
        if len(names) >= 2:
            for name in names:
                wanted[prefix + (name,)] = len(prefix) + 1
    structure: dict[tuple[str, ...], set[tuple[str, ...]]] = {m: set() for m in wanted}
    if wanted:
        depths = sorted(set(wanted.values()))
        for i in params:
            path = keys[i]
            for d in depths:
                if d < len(path):
                    held = structure.get(path[:d])
                    if held is not None:
                        held.add(path[d:])
    out: list[_Group] = []
    every: list[_Group] = []
    for (prefix, stem), group in groups.items():
        if stem is not None and 0 not in group.members and (prefix, stem) in bare:
            # Haiku names the first of several alike modules without a suffix.
            group.members[0] = stem
            group.first = min(group.first, bare[(prefix, stem)])
        if len(group.members) < 2:
            continue
        shapes = [structure[prefix + (key,)] for key in group.members.values()]
        if not all(any(len(rest) >= 2 for rest in s) for s in shapes):
            continue  # layers that own their arrays (an MLP's linears), not blocks
        every.append(group)
        if any(s != shapes[0] for s in shapes[1:]):
            continue
        out.append(group)
    return out, every


def _stack_roots(
    leaves: Sequence[Leaf], keys: list[tuple[str, ...]], params: list[int]
) -> dict[tuple[str, ...], tuple[int, int]]:
    """The modules stacked along a layer axis: the outermost modules all of whose
    parameters are stacked along one layer axis, each with its number of layers and
    its first leaf. A module holding stacks of different lengths side by side (an
    encoder of 4 layers and a decoder of 2) is not one: each of its stacks is."""
    roots: dict[tuple[str, ...], tuple[int, int]] = {}
    if not any(leaves[i].batch_axes > 0 for i in params):
        return roots
    total: dict[tuple[str, ...], int] = {}
    stacked: dict[tuple[str, ...], int] = {}
    sizes: dict[tuple[str, ...], set[int]] = {}
    for i in params:
        path = keys[i]
        s = leaves[i].batch_axes > 0
        for end in range(len(path)):
            prefix = path[:end]
            total[prefix] = total.get(prefix, 0) + 1
            if s:
                stacked[prefix] = stacked.get(prefix, 0) + 1
                sizes.setdefault(prefix, set()).add(leaves[i].shape[0])
    for i in params:
        if leaves[i].batch_axes == 0:
            continue
        path = keys[i]
        for end in range(len(path)):
            prefix = path[:end]
            if stacked.get(prefix, 0) != total[prefix]:
                continue
            if len(sizes[prefix]) > 1 and end < len(path) - 1:
                continue  # stacks of different lengths side by side: each is a root
            size = leaves[i].shape[0]
            if prefix not in roots:
                roots[prefix] = (size, i)
            elif roots[prefix][0] != size:
                raise ValueError(
                    f"layer_decay: the arrays stacked under {'/'.join(prefix) or 'the root'} "
                    f"disagree on the number of layers ({roots[prefix][0]} and {size} at "
                    f"{leaves[i].path}). Fix: select the blocks by path with blocks=."
                )
            break
    return roots
