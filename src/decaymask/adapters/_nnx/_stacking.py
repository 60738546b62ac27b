"""Stacked leading axes read off a State's arrays, where no class says the rank of a layer.

``nnx.vmap`` and ``nnx.scan`` stack a module by giving every array under it the same
extra leading axes. Layers whose arrays have a fixed rank in one layer (a linear
kernel 2 and its bias 1 or its LinearGeneral output axes, a norm's scale and bias 1, an
embedding table 2, a conv bias 1, LoRA's factors 2, PReLU's slope 0) show how many a
module has: the arrays held under one module path are read at each count of leading
axes they share, and a count survives where that reading is one layer whose ranks fit.
A module is stacked ``k`` times when every array under it agrees: the layers that show
a count all show ``k`` with the same sizes, and the others (an Einsum's kernel, a
conv's, a user's array of no known rank) admit it. Where they disagree the module is
not stacked, and the modules inside it are read again each on its own: a vmapped
expert MLP inside unrolled blocks is stacked, its blocks are not. Where nothing shows
a count, nothing is marked: names never guess one.

Names cannot tell an Einsum from a linear layer: one whose bias is not its kernel's
trailing axes (``hdk`` with a bias ``hk``, a bias per head) reads as linear layers
stacked along the axes the two share, which is what it computes; its class marks none.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

Shapes = Mapping[str, tuple[int, ...]]
Counts = Mapping[tuple, tuple[int, ...]]
"""Module path -> the counts of stacked leading axes its arrays admit."""
Leading = Mapping[tuple, tuple[int, ...]]
"""Module path -> the shape of one of its arrays (all share the stacked sizes)."""
KindOf = Callable[[tuple, dict[str, tuple[int, ...]]], str]
"""The kind names give a module at a path holding arrays of these shapes in one layer;
read from the path's names only (an index names no kind)."""

_NORM_ARRAYS = frozenset({"scale", "bias", "mean", "var"})
_FIXED = {
    "embedding": {"embedding": 2, "embeddings": 2},
    "conv": {"bias": 1},
    "lora": {"lora_a": 2, "lora_b": 2},
    "prelu": {"negative_slope": 0},
}


def _linear_fits(one: Shapes) -> bool | None:
    """Whether arrays of one layer fit a linear layer: a 2-D kernel, or a
    LinearGeneral's whose trailing axes are its bias's (the output features)."""
    kernel, bias = one.get("kernel"), one.get("bias")
    if kernel is None:
        return None
    if bias is None:
        # A kernel of more axes is a LinearGeneral's without bias, or a stack: unknown.
        return True if len(kernel) == 2 else None
    return 0 < len(bias) < len(kernel) and kernel[len(kernel) - len(bias):] == bias


def _fits(kind: str, one: Shapes) -> bool | None:
    """Whether arrays read as one layer of ``kind`` have that layer's ranks: ``None``
    where the kind fixes the rank of none of them."""
    if len(one.get("kernel", (0, 0))) < 2:
        return False  # a kernel is a matrix in every Flax layer, whatever its kind
    if kind in ("linear", "recurrent"):
        return _linear_fits(one)
    if kind.endswith("_norm"):
        ranks = [len(shape) for name, shape in one.items() if name in _NORM_ARRAYS]
        return all(rank == 1 for rank in ranks) if ranks else None
    fixed = _FIXED.get(kind)
    checked = [len(shape) == fixed[name] for name, shape in one.items() if fixed and name in fixed]
    return all(checked) if checked else None


def _counts(parent: tuple, shapes: Shapes, kind_of: KindOf) -> tuple[int, ...]:
    """The counts of stacked leading axes the arrays under ``parent`` admit, fewest
    first: every count their shapes share whose one-layer reading is not refuted."""
    admitted = []
    lowest = min(len(shape) for shape in shapes.values())
    first = next(iter(shapes.values()))
    for k in range(lowest + 1):
        if any(shape[:k] != first[:k] for shape in shapes.values()):
            break  # arrays stacked together share their leading sizes
        one = {name: shape[k:] for name, shape in shapes.items()}
        kind = kind_of(parent, one)
        if _fits(kind, one) is not False:
            admitted.append(k)
    return tuple(admitted)


class _ModulePath:
    """A module path in the State: what it holds directly, what is inside, and what
    every array under it shows."""

    __slots__ = ("parent", "inside", "shown")

    def __init__(self) -> None:
        self.parent: tuple | None = None  # its path, where it holds arrays directly
        self.inside: dict[Any, _ModulePath] = {}
        self.shown: Any = None


_CONFLICT = object()
"""What the arrays under a module show where two of them show different stackings."""


def _merge(a: Any, b: Any) -> Any:
    if a is None:
        return b
    if b is None or a == b:
        return a
    return _CONFLICT


def stacked_axes(groups: Mapping[tuple, Shapes], kind_of: KindOf) -> dict[tuple, int]:
    """The stacked leading axes of the arrays under each module path that has some.

    Args:
      groups: module path -> the shapes of the arrays it holds directly, by name (one
        entry per array; arrays holding nothing left out).
      kind_of: how names read a module's kind from its path and one layer's ranks.

    Returns:
      module path -> the count of stacked leading axes of its arrays, for the module
      paths whose arrays are stacked; the others are not listed.
    """
    counts: dict[tuple, tuple[int, ...]] = {}
    leading: dict[tuple, tuple[int, ...]] = {}
    # The blocks of an unrolled stack hold the same modules at paths differing only by
    # index: each is read once.
    read: dict[tuple, tuple[int, ...]] = {}
    root = _ModulePath()
    for parent, shapes in groups.items():
        if not shapes:
            continue
        key = (tuple(k if isinstance(k, str) else None for k in parent), tuple(shapes.items()))
        admitted = read.get(key)
        if admitted is None:
            admitted = read[key] = _counts(parent, shapes, kind_of)
        counts[parent] = admitted
        leading[parent] = next(iter(shapes.values()))
        node = root
        for part in parent:
            inner = node.inside.get(part)
            if inner is None:
                inner = node.inside[part] = _ModulePath()
            node = inner
        node.parent = parent
    _show(root, counts, leading)
    found: dict[tuple, int] = {}
    _mark(root, counts, leading, found)
    return found


def _show(node: _ModulePath, counts: Counts, leading: Leading) -> Any:
    """Sets what the arrays under ``node`` show: ``None`` (no count), one count with
    its sizes, or ``_CONFLICT``."""
    shown = None
    if node.parent is not None:
        admitted = counts[node.parent]
        if len(admitted) == 1:
            shown = (admitted[0], leading[node.parent][: admitted[0]])
    for inner in node.inside.values():
        shown = _merge(shown, _show(inner, counts, leading))
    node.shown = shown
    return shown


def _mark(node: _ModulePath, counts: Counts, leading: Leading, found: dict[tuple, int]) -> None:
    """Marks the outermost modules whose arrays agree on a count of stacked axes."""
    shown = node.shown
    if shown is None:
        return  # nothing inside shows a count: nothing is marked
    if shown is not _CONFLICT:
        k, sizes = shown
        if k == 0:
            return  # everything inside that shows a count shows none
        below = list(_parents(node))
        if all(k in counts[p] and leading[p][:k] == sizes for p in below):
            found.update(dict.fromkeys(below, k))
            return
    for inner in node.inside.values():
        _mark(inner, counts, leading, found)


def _parents(node: _ModulePath) -> Iterator[tuple]:
    if node.parent is not None:
        yield node.parent
    for inner in node.inside.values():
        yield from _parents(inner)
