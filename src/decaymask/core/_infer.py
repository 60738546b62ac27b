"""Kinds and roles read off names, for layers no table knows."""

from __future__ import annotations

import functools
import re

# Order matters: the specific norms come before the generic "norm" patterns.
_NAME_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern, re.IGNORECASE), kind)
    for pattern, kind in (
        (r"rms_?norm", "rms_norm"),
        (r"layer_?norm|(^|_)ln(_|\d|$)|(^|_)ln_?f$", "layer_norm"),
        (r"group_?norm", "group_norm"),
        (r"batch_?norm|(^|_)bn(_|\d|$)", "batch_norm"),
        (r"instance_?norm", "instance_norm"),
        (r"multi_?head|self_?attention|attention$|(^|_)attn$", "attention"),
        (r"embedd?ing|(^|_)embed(_|\d|$)|^wte$|^wpe$", "embedding"),
        (r"lstm|gru|mgu|rnn_?cell|simple_?cell", "recurrent"),
        (r"prelu", "prelu"),
        (r"^lora$", "lora"),
        (r"conv", "conv"),
        (r"dense|linear|einsum", "linear"),
    )
)


@functools.lru_cache(maxsize=4096)
def kind_from_name(name: str) -> str | None:
    """The layer kind a class or module name makes evident, or ``None``.

    ``LlamaRMSNorm`` and ``final_rmsnorm`` are ``rms_norm``, ``FlaxBertLayerNorm``,
    ``input_layernorm`` and ``ln_f`` are ``layer_norm``, ``Dense_3`` is ``linear``.
    A bare ``norm`` (``attn_norm``, ``final_norm``) says only that it is a norm: the
    caller decides which one from the arrays it owns.
    """
    for pattern, kind in _NAME_PATTERNS:
        if pattern.search(name):
            return kind
    return None


_GENERIC_NORM = re.compile(r"(^|_)norm(_?\d+)?$|norm$", re.IGNORECASE)


def is_generic_norm_name(name: str) -> bool:
    """Whether a name says "some norm" without saying which (``norm``, ``attn_norm``)."""
    return bool(_GENERIC_NORM.search(name))


_WEIGHT_NAMES = frozenset({"weight", "kernel", "w", "weight_ih", "weight_hh"})
_BIAS_NAMES = frozenset({"bias", "b", "bias_n", "bias_ih", "bias_hh"})
_SCALE_NAMES = frozenset({"scale", "gamma", "alpha_scale"})
_EMBED_NAMES = frozenset({"embedding", "embeddings", "embedding_table"})


@functools.lru_cache(maxsize=4096)
def role_from_name(kind: str, name: str) -> str:
    """The role of an array called ``name`` in a layer of ``kind``.

    One function for every framework: Equinox says ``weight`` where Flax says
    ``kernel``, ``scale`` or ``embedding`` depending on the layer, so the layer kind
    decides what ``weight`` means.
    """
    lowered = name.lower()
    if lowered in _BIAS_NAMES or lowered.startswith("bias"):
        return "bias"
    if kind.endswith("_norm"):
        if lowered in _SCALE_NAMES or lowered == "weight":
            return "scale"
        return "other"
    if kind == "embedding":
        if lowered in _EMBED_NAMES or lowered == "weight":
            return "embedding"
        return "other"
    if kind in ("prelu", "lora"):
        return "other"
    if lowered in _WEIGHT_NAMES or lowered.startswith(("weight", "kernel")):
        return "weight"
    if lowered in _SCALE_NAMES:
        return "scale"
    if lowered in _EMBED_NAMES:
        return "embedding"
    return "other"
