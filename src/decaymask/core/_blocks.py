"""Finding the blocks of a layer-decay ladder on :class:`Leaf` records, and the id of
every leaf: indexed sibling modules of one structure, modules stacked along a layer
axis, or the modules ``blocks=`` selects; the stem and the rest around them."""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ._ladder import _is_kind, _kind_hint
from ._leaf import Layer, Leaf
from ._names import words
from ._selectors import layer_matches
from ._stacks import (
    _candidate_glob,
    _Group,
    _indexed_groups,
    _nested_glob,
    _ordered,
    _stack_roots,
)
from ._values import show_value

if TYPE_CHECKING:
    from ._ladder import LayerDecay

_STEM_WORDS = frozenset(
    {"embed", "embeds", "embedding", "embeddings", "embedder", "emb", "stem", "wte", "wpe"}
)
_STEM_ROLES = frozenset({"position", "token"})



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


class Ladder:
    """The blocks found in a tree, and every leaf's id and multiplier."""

    config: LayerDecay
    """The rule the ladder is found for."""
    keys: list[tuple[str, ...]]
    """Each leaf's path, split into its keys."""
    leaves: Sequence[Leaf]
    stacks: dict[tuple[str, ...], tuple[int, int]]
    """The modules stacked along a layer axis: their layers and first leaf."""
    blocks: list[Block]
    """The blocks, in the ladder's order."""
    size: int
    """The number of blocks, a stacked module counting one per layer: ``n``."""

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
        found = self._modules_of(item, params, key)
        if not found:
            raise ValueError(
                f"{self.config!r}: {key}={show_value(item)} selects no module of this "
                f"tree.{_kind_hint(item)} Check it against policy.explain(tree), which "
                f"lists every path{', kind and class' if not _is_glob(item) else ''}."
            )
        return found

    def _modules_of(self, item: str | type, params: list[int], key: str) -> dict[tuple[str, ...], int]:
        """:meth:`_modules`, empty where ``item`` selects nothing."""
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


