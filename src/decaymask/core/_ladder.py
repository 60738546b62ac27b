"""Layer-wise learning-rate decay: which block holds each leaf, and its multiplier.

The ladder follows BEiT and MAE fine-tuning: the blocks are one repeated stack, block
``i`` (counting from 0) has id ``i + 1``, the stem (embeddings, position embeddings and
learned tokens outside the blocks) has id 0, everything else (the final norm, a pooler,
the head) has id ``n + 1``, and a leaf of id ``k`` learns ``rate ** (n + 1 - k)`` times
as fast. A leaf stacked along a layer axis (``nn.scan``, ``nn.vmap``,
``hk.layer_stack``, an ``eqx.filter_vmap`` stack, ``nnx.vmap``) holds one block per
index of that axis, and gets one id per block.

Everything here reads :class:`Leaf` records: paths, roles, kinds, stacked axes and
:attr:`Leaf.module_depths`. It never guesses: where the blocks cannot be found, or
``blocks=`` selects nothing, it raises with the candidates and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import functools
import numbers
import pickle
import re
from collections.abc import Callable, Sequence
from typing import Any, ParamSpec, Union

from ._infer import words
from ._leaf import Layer, Leaf
from ._selectors import as_float, layer_matches, short_repr
from ._values import importable, show_value, type_name
from ._vocab import GROUPS, KINDS

BlockSelector = Union[str, type, Sequence[Union[str, type]]]
"""A ``blocks=`` or ``stem=`` value: a module class, a layer kind, a glob over module
paths, or a tuple of those."""

_INDEXED = re.compile(r"^(.*?)_?(\d+)$")
_STEM_WORDS = frozenset(
    {"embed", "embeds", "embedding", "embeddings", "embedder", "emb", "stem", "wte", "wpe"}
)
_STEM_ROLES = frozenset({"position", "token"})


_RATE_MEANING = (
    "Each block learns rate times as fast as the block above it: 0.65 for ViT-B, 0.75 "
    "for ViT-L in BEiT/MAE fine-tuning; 1 turns layer decay off."
)


def check_layer_decay_rate(value: Any, *, where: str | None = None) -> float:
    """A layer-decay rate as a float in (0, 1].

    Args:
      value: the rate given.
      where: the call or the key it was given to, for the messages; by default
        ``layer_decay(<value>)``.

    Raises:
      TypeError: not a real number (a bool is not one).
      ValueError: outside (0, 1], NaN, or too large for a float.
    """
    shown = short_repr(value)
    if where is None:
        where = f"layer_decay({shown})"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{where}: expected a rate in (0, 1], a number, got {shown} "
            f"({type_name(value)}). {_RATE_MEANING}"
        )
    rate = as_float(value)
    if rate is None:
        why = ", a number too large for a float"
    elif rate != rate or rate in (float("inf"), float("-inf")):
        why = ""
    elif rate == 0:
        raise ValueError(
            f"{where}: expected a rate in (0, 1], got 0, which gives every layer below "
            f"the top a multiplier of 0. {_RATE_MEANING} To stop layers from learning, "
            f"use dm.freeze(...)."
        )
    elif rate < 0:
        why = ": a negative rate turns every other block's updates around"
    elif rate > 1:
        why = ": above 1, lower blocks would learn faster than the blocks above them"
    else:
        return rate
    raise ValueError(f"{where}: expected a rate in (0, 1], got {shown}{why}. {_RATE_MEANING}")


_KEYWORDS = ("blocks", "stem")
_KEYWORD_FORMS = (
    "blocks= (a module class, a layer kind or a glob over module paths, or a tuple "
    "of those; by default the one repeated stack) and stem= (modules outside the "
    "blocks that also get id 0, in the same forms)"
)


_P = ParamSpec("_P")


def _checked_call(make: Callable[_P, LayerDecay]) -> Callable[_P, LayerDecay]:
    """Gives a misspelt keyword, or blocks given by position, a message with the fix;
    the signature stays what type checkers read."""

    @functools.wraps(make)
    def checked(*args: _P.args, **kwargs: _P.kwargs) -> LayerDecay:
        for key in kwargs:
            if key not in _KEYWORDS and key != "rate":
                close = difflib.get_close_matches(key, _KEYWORDS, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise TypeError(
                    f"layer_decay() got unknown keyword {key!r}{hint}. It takes the rate, "
                    f"then {_KEYWORD_FORMS}."
                )
        if args and "rate" in kwargs:
            raise TypeError(
                f"layer_decay({short_repr(args[0])}, rate={short_repr(kwargs['rate'])}): "
                f"the rate is given twice; give it once, first: "
                f"layer_decay({short_repr(args[0])}, blocks=...)."
            )
        if len(args) > 1:
            given = ", ".join(show_value(a) for a in args)
            raise TypeError(
                f"layer_decay({given}): blocks and stem are given by keyword: "
                f"layer_decay({show_value(args[0])}, blocks={show_value(args[1])})."
            )
        return make(*args, **kwargs)

    return checked


def _module_selectors(fn: str, key: str, value: Any) -> tuple[str | type, ...]:
    items = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    leave_out = (
        "leave blocks out to use the one repeated stack" if key == "blocks" else "leave stem out"
    )
    if not items:
        raise ValueError(f"{fn}({key}=()): an empty tuple selects nothing; {leave_out}.")
    for item in items:
        if not isinstance(item, (str, type)):
            raise TypeError(
                f"{fn}({key}={show_value(item)}): expected a module class, a layer kind "
                f"(one of {', '.join(KINDS[:-1])}) or a glob over module paths (e.g. "
                f"'encoder/layers/*'), or a tuple of those; got {type_name(item)}."
            )
        if isinstance(item, str) and not item:
            raise ValueError(
                f"{fn}({key}=''): an empty glob selects nothing; give a glob such as "
                f"'encoder/layers/*', or {leave_out}."
            )
    return items


def _is_kind(item: str | type) -> bool:
    return isinstance(item, str) and (item in KINDS or item in GROUPS)


def _kind_hint(item: str | type) -> str:
    """What a glob that selects nothing most likely meant: a layer kind it is close to,
    or a class written as a dotted path."""
    if not isinstance(item, str) or any(c in item for c in "*?[/:"):
        return ""
    if "." in item and all(part.isidentifier() for part in item.split(".")):
        module, _, name = item.rpartition(".")
        return (
            f" A string is a glob over module paths; to select a class, pass the class "
            f"itself (in a policy file, write it as {module + ':' + name!r})."
        )
    close = difflib.get_close_matches(item, KINDS[:-1] + tuple(GROUPS), n=1, cutoff=0.6)
    return f" Did you mean the layer kind {close[0]!r}?" if close else ""


@dataclasses.dataclass(frozen=True, repr=False)
class LayerDecay:
    """Layer-wise learning-rate decay, made by :func:`layer_decay`."""

    rate: float
    """Each block learns ``rate`` times as fast as the block above it."""
    blocks: tuple[str | type, ...] | None = None
    """Selectors of the blocks, chained in order; ``None``: the one repeated stack."""
    stem: tuple[str | type, ...] | None = None
    """Selectors of modules outside the blocks that get id 0 besides the embeddings."""

    def __copy__(self) -> LayerDecay:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> LayerDecay:
        return self

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        for key in ("blocks", "stem"):
            for item in getattr(self, key) or ():
                if isinstance(item, type) and not importable(item):
                    raise pickle.PicklingError(
                        f"cannot pickle {self!r}: {key}={show_value(item)} has no import "
                        f"path pickle can follow (a local definition, or a class its "
                        f"module holds under another name). Define it at module level."
                    )
        return (LayerDecay, (self.rate, self.blocks, self.stem))

    def __repr__(self) -> str:
        parts = [repr(self.rate)]
        for key in ("blocks", "stem"):
            value = getattr(self, key)
            if value is None:
                continue
            shown = [show_value(v) for v in value]
            parts.append(f"{key}=" + (shown[0] if len(shown) == 1 else "(" + ", ".join(shown) + ")"))
        return f"layer_decay({', '.join(parts)})"

    def ladder(self, leaves: Sequence[Leaf]) -> Ladder:
        """The blocks of ``leaves`` and the id of every leaf."""
        return Ladder(self, leaves)


@_checked_call
def layer_decay(
    rate: float, *, blocks: BlockSelector | None = None, stem: BlockSelector | None = None
) -> LayerDecay:
    """Layer-wise learning-rate decay (BEiT, MAE, ConvNeXt fine-tuning).

    The blocks of the model are numbered 1 to ``n``; the stem (embeddings, position
    embeddings, learned tokens and the patch embedding outside the blocks, plus what
    ``stem`` selects) is 0; everything else (the final norm, a pooler, the head) is
    ``n + 1``. A leaf of id ``k`` learns ``rate ** (n + 1 - k)`` times as fast, times
    the multiplier of its :func:`lr` rule. Frozen leaves keep their ids.

    Args:
      rate: in (0, 1]: 0.65 for ViT-B and 0.75 for ViT-L/H in BEiT and MAE
        fine-tuning; 0.7 to 0.8 for ConvNeXt.
      blocks: by default the one repeated stack of the model: indexed sibling modules
        of one structure (``blocks/3``, ``layers_3``, ``Block_3``, ``encoder/layer/3``)
        or one module stacked along a layer axis. Else a module class, a layer kind,
        or a glob over module paths (``"encoder/layers/*"``): every module it selects
        is a block, numbered by its own index (``layers_10`` after ``layers_9``),
        separate stacks in the tree's order. A tuple chains stacks in the order given
        (an encoder, then a decoder).
      stem: module classes, kinds or path globs outside the blocks that also get id 0.

    Raises:
      TypeError: a rate that is not a number, a ``blocks``/``stem`` value of the wrong
        type, or an unknown keyword (the nearest one is suggested).
      ValueError: a rate outside (0, 1] (or NaN, or too large for a float), or an
        empty ``blocks``/``stem``.

    Example:
      >>> import decaymask as dm
      >>> dm.layer_decay(0.75, blocks="encoder/layer/*")
      layer_decay(0.75, blocks='encoder/layer/*')
    """
    checked = check_layer_decay_rate(rate)
    return LayerDecay(
        checked,
        None if blocks is None else _module_selectors("layer_decay", "blocks", blocks),
        None if stem is None else _module_selectors("layer_decay", "stem", stem),
    )


@dataclasses.dataclass(frozen=True)
class Block:
    """One entry of the ladder: a module, or a module stacked ``size`` times."""

    path: tuple[str, ...]
    size: int = 0
    """The length of the stacked layer axis; 0 for a module that is one block."""

    @property
    def text(self) -> str:
        return "/".join(self.path)


def _keys(leaf: Leaf) -> tuple[str, ...]:
    return tuple(leaf.path.split("/"))


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


class Ladder:
    """The blocks found in a tree, and every leaf's id and multiplier."""

    def __init__(self, config: LayerDecay, leaves: Sequence[Leaf]):
        self.config = config
        self.keys = [_keys(leaf) for leaf in leaves]
        self.leaves = leaves
        params = [i for i, leaf in enumerate(leaves) if leaf.is_param]
        self.stacks = _stack_roots(leaves, self.keys, params)
        if config.blocks is None:
            self.blocks = self._found(params)
        else:
            self.blocks = self._selected(params)
        self.size = sum(block.size or 1 for block in self.blocks)

    # The blocks.

    def _found(self, params: list[int]) -> list[Block]:
        groups, every = _indexed_groups(self.keys, params)
        self._check_nesting(groups, every)
        candidates: list[tuple[str, list[Block], int]] = []
        for group in groups:
            blocks = [Block(group.prefix + (group.members[i],)) for i in sorted(group.members)]
            candidates.append((f"{group.glob} ({len(blocks)} blocks)", blocks, group.first))
        for root, (size, first) in self.stacks.items():
            self._check_whole(root, size, params)
            text = "/".join(root) or "the root"
            candidates.append((f"{text} (stacked {size} times)", [Block(root, size)], first))
        # A candidate inside another's block is part of that block (an MLP's layers).
        tops = [
            c for c in candidates
            if not any(
                other is not c and any(_inside(b.path, ob.path) for b in c[1] for ob in other[1])
                for other in candidates
            )
        ]
        if len(tops) == 1:
            return tops[0][1]
        tops.sort(key=lambda c: c[2])
        if not tops:
            raise ValueError(
                f"{self.config!r}: found no repeated stack of blocks in this tree "
                f"(indexed sibling modules of one structure such as blocks/3, layers_3 "
                f"or encoder/layer/3, or one module stacked along a layer axis). Fix: "
                f"name the blocks, e.g. dm.layer_decay({self.config.rate!r}, "
                f"blocks='path/to/blocks/*') or blocks=BlockClass; policy.explain(tree) "
                f"lists the paths."
            )
        names = "; ".join(c[0] for c in tops)
        globs = tuple(_candidate_glob(c[1]) for c in tops)
        raise ValueError(
            f"{self.config!r}: this tree has {len(tops)} candidate stacks of blocks "
            f"({names}), and layer decay needs one ladder. Fix: say which, e.g. "
            f"dm.layer_decay({self.config.rate!r}, blocks={globs[0]!r}), or chain them in "
            f"order, blocks={globs!r}."
        )

    def _check_nesting(self, groups: list[_Group], every: list[_Group]) -> None:
        """Raises where indexed modules hold indexed modules (chunks of blocks, stages
        of blocks): which level holds the layers is the recipe's choice, not a reading."""
        for inner in groups:
            for outer in every:
                if outer is inner:
                    continue
                for key in outer.members.values():
                    member = outer.prefix + (key,)
                    if _inside(inner.prefix, member):
                        levels = (outer.glob, _nested_glob(outer, inner))
                        raise ValueError(
                            f"{self.config!r}: this tree has stacks inside stacks "
                            f"({levels[0]} holds {levels[1]}), and which level holds the "
                            f"layers is the recipe's to say, not decaymask's to guess. "
                            f"Fix: name the blocks, e.g. dm.layer_decay("
                            f"{self.config.rate!r}, blocks={levels[1]!r}) for the inner "
                            f"level, or blocks={levels[0]!r} for the outer."
                        )

    def _check_whole(self, root: tuple[str, ...], size: int, params: list[int]) -> None:
        """Raises where a stacked module's siblings look stacked but are not marked so.

        Every other array of the module holding ``root`` has ``size`` in front and no
        stacked axis: the leaves were likely read without seeing the stacking (by
        names), which marked only the layers whose arrays prove it. Taking ``root``
        alone for the stack would give the rest of each layer the head's multiplier.
        """
        parent = root[:-1]
        if not parent:
            return  # beside a top-level stack are the embeddings and the head
        others = [
            i for i in params
            if _inside(self.keys[i], parent) and not _inside(self.keys[i], root)
        ]
        if not others or not all(
            self.leaves[i].batch_axes == 0 and self.leaves[i].shape[:1] == (size,) for i in others
        ):
            return
        where = "/".join(parent)
        example = self.leaves[others[0]]
        raise ValueError(
            f"{self.config!r}: {'/'.join(root)} is stacked {size} times, but beside it in "
            f"{where} the arrays not marked stacked all have {size} in front too (e.g. "
            f"{example.path}, shape {example.shape}): the tree was likely read without "
            f"seeing the stacking, and only part of each layer is known to be stacked. "
            f"Fix: read the model with its classes (Linen module= and args=, the NNX "
            f"module rather than a State, Haiku fn= and args=), or name the stacked "
            f"module: dm.layer_decay({self.config.rate!r}, blocks={where!r})."
        )

    def _selected(self, params: list[int]) -> list[Block]:
        out: list[Block] = []
        seen: dict[tuple[str, ...], str | type] = {}
        for item in self.config.blocks or ():
            modules = self._modules(item, params, "blocks")
            if not modules:
                raise ValueError(
                    f"{self.config!r}: blocks={show_value(item)} selects no module of this "
                    f"tree.{_kind_hint(item)} Check it against policy.explain(tree), which "
                    f"lists every path{', kind and class' if not _is_glob(item) else ''}."
                )
            for module in _ordered(modules):
                block = self._block(module)
                path = block.path
                if path in seen:
                    if seen[path] is item:
                        continue  # several parts of one stacked layer: one block
                    raise ValueError(
                        f"{self.config!r}: the module {'/'.join(path)} is selected by both "
                        f"{show_value(seen[path])} and {show_value(item)}; each block "
                        f"belongs to one stack."
                    )
                seen[path] = item
                out.append(block)
        return out

    def _modules(self, item: str | type, params: list[int], key: str) -> dict[tuple[str, ...], int]:
        """The outermost modules ``item`` selects, each with its first leaf."""
        found: dict[tuple[str, ...], int] = {}
        if _is_glob(item):
            match = re.compile(fnmatch.translate(str(item))).match
            for i in params:
                keys = self.keys[i]
                for end in range(1, len(keys)):
                    if match("/".join(keys[:end])):
                        found.setdefault(keys[:end], i)
                        break
            return found
        for i in params:
            leaf = self.leaves[i]
            chain: tuple[Layer, ...] = leaf.ancestors + (leaf.owner,)
            if not leaf.module_depths:
                raise ValueError(
                    f"{self.config!r}: {key}={show_value(item)} selects modules by "
                    f"{'kind' if isinstance(item, str) else 'class'}, but the leaves do "
                    f"not say where their modules are ({leaf.path} has no "
                    f"module_depths). Fix: select the {key} by a glob over their paths, "
                    f"e.g. {key}='encoder/layers/*'."
                )
            for layer, depth in zip(chain, leaf.module_depths):
                if layer_matches(layer, (item,)):
                    found.setdefault(self.keys[i][:depth], i)
                    break
        return found

    def _block(self, path: tuple[str, ...]) -> Block:
        """The block a selected module makes.

        A module inside a stacked root (the block class of an ``hk.layer_stack``, one
        layer of an ``nn.scan``) is part of every layer of that stack: the block is
        the stacked root, one id per layer. A module that holds a stacked root is
        stacked as that root is.
        """
        for root, (size, _) in self.stacks.items():
            if _inside(path, root):
                return Block(root, size)
            if _inside(root, path):
                return Block(path, size)
        return Block(path)

    # The ids.

    def ids(self) -> list[int | tuple[int, ...]]:
        """The id of every leaf, a tuple of one per layer for a stacked leaf."""
        starts: list[tuple[tuple[str, ...], int, int]] = []
        k = 1
        for block in self.blocks:
            starts.append((block.path, k, block.size))
            k += block.size or 1
        by_path = {path: (start, size) for path, start, size in starts}
        depths = sorted({len(path) for path in by_path})
        stem = self._stem()
        out: list[int | tuple[int, ...]] = []
        for i, keys in enumerate(self.keys):
            found = None
            for depth in depths:
                if depth < len(keys) and keys[:depth] in by_path:
                    found = by_path[keys[:depth]]
                    break
            if found is not None:
                start, size = found
                if size:
                    if self.leaves[i].is_param:
                        # State need not be stacked: it takes no multiplier.
                        self._check_stacked(i, size, keys)
                    out.append(tuple(range(start, start + size)))
                else:
                    out.append(start)
            elif i in stem:
                out.append(0)
            else:
                out.append(self.size + 1)
        return out

    def _check_stacked(self, i: int, size: int, keys: tuple[str, ...]) -> None:
        leaf = self.leaves[i]
        if not leaf.shape or leaf.shape[0] != size:
            raise ValueError(
                f"{self.config!r}: {leaf.path} (shape {leaf.shape}) is in a block stacked "
                f"{size} times, but its leading axis is not {size}. Fix: select the blocks "
                f"by path, e.g. blocks='...', so that each holds one layer."
            )

    def _stem(self) -> set[int]:
        out = set()
        extra: dict[tuple[str, ...], int] = {}
        params = list(range(len(self.leaves)))
        for item in self.config.stem or ():
            modules = self._modules(item, params, "stem")
            if not modules:
                raise ValueError(
                    f"{self.config!r}: stem={show_value(item)} selects no module of this "
                    f"tree.{_kind_hint(item)} Check it against policy.explain(tree), which "
                    f"lists every path{', kind and class' if not _is_glob(item) else ''}."
                )
            extra.update(modules)
        for i, leaf in enumerate(self.leaves):
            keys = self.keys[i]
            if (
                leaf.role in _STEM_ROLES
                or leaf.layer == "embedding"
                or any(a.kind == "embedding" for a in leaf.ancestors)
                or any(_STEM_WORDS.intersection(words(key)) for key in keys[:-1])
                or any(keys[:d] in extra for d in range(1, len(keys)))
            ):
                out.add(i)
        return out

    def scales(self, ids: Sequence[int | tuple[int, ...]]) -> list[float | tuple[float, ...]]:
        """The multiplier of each id: ``rate ** (n + 1 - id)``."""
        top = self.size + 1
        rate = self.config.rate
        powers = [rate ** (top - k) for k in range(top + 1)]
        return [
            tuple(powers[k] for k in i) if isinstance(i, tuple) else powers[i] for i in ids
        ]


def _is_glob(item: str | type) -> bool:
    return isinstance(item, str) and not _is_kind(item)


def _inside(path: tuple[str, ...], outer: tuple[str, ...]) -> bool:
    """Whether the module ``path`` is ``outer`` or inside it."""
    return len(path) >= len(outer) and path[: len(outer)] == outer


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
    structure: dict[tuple[str, ...], set[tuple[str, ...]]] = {}  # module -> what it holds
    for i in params:
        path = keys[i]
        for j in range(len(path) - 1):
            key = path[j]
            member = path[: j + 1]
            index = _index(key)
            if index is None:
                bare.setdefault((path[:j], key), i)
            else:
                group = groups.get((path[:j], index[0]))
                if group is None:
                    group = groups[(path[:j], index[0])] = _Group(path[:j], index[0], first=i)
                group.members[index[1]] = key
            structure.setdefault(member, set()).add(path[j + 1 :])
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
    total: dict[tuple[str, ...], int] = {}
    stacked: dict[tuple[str, ...], int] = {}
    sizes: dict[tuple[str, ...], set[int]] = {}
    any_stacked = False
    for i in params:
        path = keys[i]
        s = leaves[i].batch_axes > 0
        any_stacked = any_stacked or s
        for end in range(len(path)):
            prefix = path[:end]
            total[prefix] = total.get(prefix, 0) + 1
            if s:
                stacked[prefix] = stacked.get(prefix, 0) + 1
                sizes.setdefault(prefix, set()).add(leaves[i].shape[0])
    roots: dict[tuple[str, ...], tuple[int, int]] = {}
    if not any_stacked:
        return roots
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
