"""What an array's name says it is in its layer: one reading of roles for every adapter.

The role of an array comes from its own name, its owner's kind and its owner's name
(:func:`role_from_name`). Every table here is data: extend it and every adapter reads
the same.
"""

from __future__ import annotations

import functools

from ._infer import TABLE_NAMES
from ._names import NORM_KINDS, words

_POSITION_WORDS = frozenset({"pos", "position", "positions", "positional"})
_TABLE_WORDS = frozenset({"embed", "embeds", "embedding", "embeddings", "emb", "table", "bias", "encoding", "enc"})
# big_vision's ViT keeps its class token as `cls`.
_TOKEN_NAMES = frozenset({"masked_spec_embed", "cls"})
_TOKEN_WORDS = frozenset({"token", "tokens"})
_GAIN_NAMES = frozenset({"gamma", "g", "weight_g", "ls1", "ls2", "alpha", "logit_scale",
                         "layer_scale", "D", "A_log"})
_GAIN_PREFIXES = ("lambda_", "gamma_", "ls_")
_BUFFER_WORDS = frozenset({"freqs", "freq", "periods", "sinusoidal", "sinusoid", "coords"})
_BUFFER_NAMES = frozenset({"freqs", "inv_freq", "periods", "freqs_cis", "cos_cached",
                           "sin_cached", "sinusoidal_table"})
_WEIGHT_NAMES = frozenset({"weight", "kernel", "w", "weight_ih", "weight_hh", "weight_v",
                           "w_i", "w_h", "in_proj_weight"})
_BIAS_NAMES = frozenset({"b", "b_i", "b_h"})
_SCALE_NAMES = frozenset({"scale", "gamma", "weight"})


@functools.lru_cache(maxsize=8192)
def role_from_name(kind: str, name: str, owner_name: str = "") -> str:
    """The role of an array called ``name`` in a layer of ``kind`` named ``owner_name``.

    One function for every framework: Equinox says ``weight`` where Flax says
    ``kernel``, ``scale`` or ``embedding`` depending on the layer, so the layer kind
    decides what ``weight`` means. Biases are read by their last word (``in_proj_bias``,
    ``dt_bias``), position tables and learned tokens by their words (``pos_embed``,
    ``relative_position_bias_table``, ``cls_token``), and an embedding layer whose own
    name says position (``position_embeddings``, ``wpe``, ``embed_positions``) holds
    a position table. ``owner_name`` may be the owner's key or its class name, or both
    joined by a space.
    """
    ws = words(name)
    if name in _BUFFER_NAMES or _BUFFER_WORDS & set(ws):
        return "buffer"
    if _POSITION_WORDS & set(ws) and set(ws) & _TABLE_WORDS:
        return "position"
    if name in _TOKEN_NAMES or (ws and ws[-1] in _TOKEN_WORDS):
        return "token"
    if len(ws) == 2 and ws[0] in ("cls", "class") and ws[1] in ("embed", "embedding"):
        # CLIP's `class_embedding`: one learned vector, concatenated before the patches.
        return "token"
    if name in _BIAS_NAMES or (ws and ws[-1] in ("bias", "biases")) or (ws and ws[0] == "bias"):
        return "bias"
    if kind in NORM_KINDS:
        if name in _SCALE_NAMES:
            return "scale"
        return "bias" if name == "offset" else "other"
    if kind in ("embedding", "unknown") and (name in TABLE_NAMES or name == "weight"):
        # The table of a module whose own name says position (`position_embeddings`,
        # GPT-2's `wpe`, BART's `embed_positions`, a `LearnedPosEmbed`).
        if owner_says_position(owner_name):
            return "position"
    if kind == "embedding":
        if name in TABLE_NAMES or name == "weight":
            return "embedding"
        return "other"
    if kind in ("prelu", "lora"):
        return "other"
    if name in _GAIN_NAMES or name.startswith(_GAIN_PREFIXES):
        return "gain"
    if name in _WEIGHT_NAMES or (ws and ws[-1] in ("weight", "weights", "kernel", "kernels") and ws[0] != "bias"):
        return "weight"
    if name == "scale":
        return "scale"
    if name in TABLE_NAMES:
        return "embedding"
    return "other"


@functools.lru_cache(maxsize=8192)
def owner_says_position(owner_name: str) -> bool:
    """Whether a module's name says it holds a position table (``position_embeddings``,
    ``wpe``, ``embed_positions``): the only way :func:`role_from_name` reads an owner's
    name, so adapters that decide once per key need only this bit of it."""
    owner = set(words(owner_name)) if owner_name else set()
    return bool((_POSITION_WORDS & owner and owner & _TABLE_WORDS) or "wpe" in owner)


_INDEX_WORDS = frozenset({"index", "indices", "idx", "ids"})


def is_index_name(name: str) -> bool:
    """Whether an array's name says it holds indices (``relative_position_index``,
    ``position_ids``): an integer array so named is a buffer, never a parameter."""
    ws = words(name)
    return bool(ws) and ws[-1] in _INDEX_WORDS
