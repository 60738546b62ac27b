"""What the Haiku adapter reads of one path segment, a module's name: Haiku's own
classes by the names it gives their instances (``conv2_d_transpose``), a registered
class as Haiku spells it, a default-named ``hk.layer_stack``, and what the shared name
reading says (kind, role trait, moving average), cached per name and per numbered base.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from ..core import _registry
from ..core._names import name_kind, words
from ..core._roles import owner_trait

_SNAKE = re.compile(r"((?<=[a-z0-9])[A-Z]|(?!^)[A-Z](?=[a-z]))")
_NUMBERED = re.compile(r"(.+?)_\d+\Z")
_STACK = re.compile(r"__layer_stack_(no|with)_per_layer(_\d+)?\Z")


def snake(class_name: str) -> str:
    """A class name as Haiku names its instances: ``Conv2DTranspose`` -> ``conv2_d_transpose``."""
    return _SNAKE.sub(r"_\1", class_name).lower()


# Haiku's modules by their instances' names: (class name, kind, layout of the weight).
DENSE, CONV, TRANSPOSE = "dense", "conv", "transpose"
BUILTIN: dict[str, tuple[str, str, str | None]] = {snake(c): (c, k, lay) for c, k, lay in (
    ("Linear", "linear", DENSE), ("Embed", "embedding", DENSE), ("GRU", "recurrent", DENSE),
    ("MultiHeadAttention", "attention", None), ("LSTM", "recurrent", None),
    ("VanillaRNN", "recurrent", None), ("LayerNorm", "layer_norm", None),
    ("RMSNorm", "rms_norm", None), ("BatchNorm", "batch_norm", None),
    ("GroupNorm", "group_norm", None), ("InstanceNorm", "instance_norm", None),
    *((c, "conv", CONV) for c in ("Conv1D", "Conv2D", "Conv3D", "ConvND")),
    *((c + "Transpose", "conv", TRANSPOSE) for c in ("Conv1D", "Conv2D", "Conv3D", "ConvND")),
)}
_CELLS = frozenset({"LSTM", "VanillaRNN"})  # keep their gates in Linear children


class Segment(NamedTuple):
    """What a module reading reads of one path segment (its name)."""

    stack: bool  # a default-named hk.layer_stack segment
    builtin: tuple[str, str, str | None] | None  # Haiku's module of that name, numbering removed
    registration: _registry.Registration | None
    said: str | None  # the kind the name says (name_kind)
    owner: str  # what roles read of it (owner_trait)
    ema: bool  # an exponential moving average's state
    linear: bool  # a Linear by its name, or a name Haiku gives no class


_segments: dict[str, Segment] = {}
# A numbered name's words are its base's and a number (``block_17``: ``block``, ``17``),
# and a number says no kind, role or trait: (said, owner, ema) per base, from the first
# name of that base read, for every number of it (``block_0`` .. ``block_99`` read once).
_numbered: dict[str, tuple[str | None, str, bool]] = {}
# base -> the Segment of a numbered name of it whose own name is not registered: the
# Segment of every such name of that base.
_numbered_segments: dict[str, Segment] = {}
_segments_generation = -1
_SEGMENTS_KEPT = 1 << 16


def segment(name: str) -> Segment:
    """The :class:`Segment` of a path segment, cached until the registry changes."""
    global _segments_generation
    if _segments_generation != _registry.generation or len(_segments) >= _SEGMENTS_KEPT:
        _segments.clear()
        _numbered.clear()
        _numbered_segments.clear()
        _segments_generation = _registry.generation
    found = _segments.get(name)
    if found is None:
        head, underscore, number = name.rpartition("_")
        if underscore and head and number.isascii() and number.isdigit():
            # The Segment of an earlier name of this base (``block_0`` for ``block_7``):
            # its registration is the base's, unless this very name is registered.
            first = _numbered_segments.get(head)
            if first is not None and _registry.lookup_spelled(name, snake) is None:
                _segments[name] = first
                return first
        numbered = _NUMBERED.match(name) is not None
        base = name[: name.rindex("_")] if numbered else name
        builtin = BUILTIN.get(base)
        own = _registry.lookup_spelled(name, snake)  # this very name registered
        registration = _registry.lookup_spelled(base, snake) or own
        number = name[len(base) + 1:] if numbered else ""
        family = base if number.isascii() and number.isdigit() else None
        said = _numbered.get(family) if family is not None else None
        if said is None:
            ema = name == "exponential_moving_average" or words(name)[-1:] == ("ema",)
            said = (name_kind(name), owner_trait(name), ema)
            if family is not None:
                _numbered[family] = said
        found = _segments[name] = Segment(
            bool(_STACK.match(name)), builtin, registration, *said,
            (builtin or ("Linear",))[0] == "Linear")
        if family is not None and own is None:
            _numbered_segments[family] = found
    return found
