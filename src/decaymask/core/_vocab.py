"""The framework-neutral vocabulary: layer kinds, groups and parameter roles."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Literal, Union, get_args

LayerKind = Literal[
    "linear",
    "conv",
    "embedding",
    "layer_norm",
    "rms_norm",
    "group_norm",
    "batch_norm",
    "instance_norm",
    "attention",
    "recurrent",
    "prelu",
    "lora",
    "unknown",
]
"""A layer kind, as ``layer=``, ``within=`` and :func:`register_layer` take it: one of
:data:`KINDS`. Type checkers reject a misspelt kind."""

LayerGroup = Literal["norm"]
"""A name that stands for several kinds at once, as ``layer=`` and ``within=`` take
it: a key of :data:`GROUPS` (``"norm"``: every kind whose name ends in ``_norm``)."""

Role = Literal[
    "weight",
    "bias",
    "scale",
    "embedding",
    "position",
    "token",
    "gain",
    "buffer",
    "other",
]
"""A parameter role, as ``param=`` takes it: one of :data:`ROLES`."""

KINDS: tuple[LayerKind, ...] = get_args(LayerKind)
"""Every layer kind a leaf's owner or an enclosing module can have."""

GROUPS: dict[str, tuple[LayerKind, ...]] = {
    group: tuple(k for k in KINDS if k.endswith("_" + group)) for group in get_args(LayerGroup)
}
"""Names that stand for several kinds at once."""

ROLES: tuple[Role, ...] = get_args(Role)
"""What an array is for, whatever the framework calls it.

``weight``: the matrix or kernel of a linear, convolution or recurrent layer.
``bias``: an additive vector (any name whose last word is ``bias``).
``scale``: a norm's multiplier. ``embedding``: a lookup table.
``position``: a learned position embedding or position bias table.
``token``: a learned token (class, register, mask, distillation tokens).
``gain``: a multiplier that is not a norm scale (LayerScale, a weight-norm gain).
``buffer``: a float array that is not trained (RoPE frequencies, sinusoidal tables).
``other``: anything else.
"""

LayerSelector = Union[LayerKind, LayerGroup, type, Sequence[Union[LayerKind, LayerGroup, type]]]
"""A ``layer=`` or ``within=`` value: a kind, a group, a class, or several of those."""
RoleSelector = Union[Role, Sequence[Role]]
"""A ``param=`` value: one role or several."""

_KIND_SET = frozenset(KINDS)
_ROLE_SET = frozenset(ROLES)


def _suggest(word: str, valid: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(word, valid, n=1, cutoff=0.5)
    return f" Did you mean {close[0]!r}?" if close else ""


def check_kind(kind: object, *, where: str, groups: bool = True) -> str:
    """Returns ``kind`` if it names a kind (or a group), else raises with the valid names."""
    if not isinstance(kind, str):
        raise TypeError(
            f"{where}: expected a layer kind as a string, got {kind!r} "
            f"({type(kind).__name__})."
        )
    if kind in _KIND_SET or (groups and kind in GROUPS):
        return kind
    valid = KINDS + (tuple(GROUPS) if groups else ())
    raise ValueError(
        f"{where}: unknown layer kind {kind!r}.{_suggest(kind, valid)} "
        f"Valid kinds: {', '.join(KINDS)}"
        + (f"; groups: {', '.join(GROUPS)}." if groups else ".")
        + " Teach decaymask a new layer class with dm.register_layer(cls, kind)."
    )


# Framework names people write for a role: the suggestion beats spelling likeness.
_ROLE_ALIASES = {
    "kernel": "weight",
    "w": "weight",
    "matrix": "weight",
    "b": "bias",
    "offset": "bias",
    "embeddings": "embedding",
    "table": "embedding",
    "pos_embed": "position",
    "positional": "position",
    "cls_token": "token",
    "gamma": "gain",
    "layer_scale": "gain",
    "freqs": "buffer",
}


def check_role(role: object, *, where: str) -> str:
    """Returns ``role`` if it names a role, else raises with the valid names."""
    if not isinstance(role, str):
        raise TypeError(
            f"{where}: expected a parameter role as a string, got {role!r} "
            f"({type(role).__name__})."
        )
    if role in _ROLE_SET:
        return role
    raise ValueError(
        f"{where}: unknown parameter role {role!r}."
        + (f" Did you mean {_ROLE_ALIASES[role]!r}?" if role in _ROLE_ALIASES else _suggest(role, ROLES))
        + " "
        f"Valid roles: {', '.join(ROLES)}. To match the framework's own attribute "
        f"name instead, use name={role!r}."
    )


def kind_in(kind: str, wanted: str) -> bool:
    """Whether ``kind`` is ``wanted`` or belongs to the group ``wanted``."""
    return kind == wanted or kind in GROUPS.get(wanted, ())
