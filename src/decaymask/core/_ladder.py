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
import functools
import numbers
import pickle
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ParamSpec, Union

from ._leaf import Leaf
from ._selectors import as_float, short_repr
from ._values import importable, show_value, type_name
from ._vocab import GROUPS, KINDS

if TYPE_CHECKING:
    from ._blocks import Ladder

BlockSelector = Union[str, type, Sequence[Union[str, type]]]
"""A ``blocks=`` or ``stem=`` value: a module class, a layer kind, a glob over module
paths, or a tuple of those."""

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
        from ._blocks import Ladder

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
