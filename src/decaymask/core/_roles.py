"""What an array's name says it is in its layer: one reading of roles for every adapter.

The role of an array comes from its own name, its owner's kind and its owner's name
(:func:`role_from_name`). Every table here is data: extend it and every adapter reads
the same.
"""

from __future__ import annotations

import functools

from ._infer import TABLE_NAMES
from ._names import NORM_KINDS, words
from ._names import says_layer_scale as _says_layer_scale

_POSITION_WORDS = frozenset({"pos", "position", "positions", "positional"})
_TABLE_WORDS = frozenset({"embed", "embeds", "embedding", "embeddings", "emb", "table", "bias", "encoding", "enc"})
# big_vision's ViT keeps its class token as `cls`.
_TOKEN_NAMES = frozenset({"masked_spec_embed", "cls"})
_TOKEN_WORDS = frozenset({"token", "tokens"})
# Multipliers that are not norm scales, by name: weight norm's `g`, DyT's `alpha`, CLIP's
# `logit_scale`, Mamba's `D` and `A_log`.
_GAIN_NAMES = frozenset({"g", "weight_g", "alpha", "logit_scale", "D", "A_log"})
# A layer scale's own names, by first word with or without an index: BEiT's `lambda_1`,
# DINOv2's `lambda1`, timm's `gamma_1` and `ls1`, ConvNeXt's `gamma`, `layer_scale`.
_GAIN_FIRST_WORDS = frozenset({"gamma", "lambda", "ls"})
# Additive offsets, with or without an index: the `beta` of a `gamma`, Haiku's `offset`,
# a `shift`.
_OFFSET_NAMES = frozenset({"beta", "offset", "shift"})
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
    a position table. Additive offsets (``beta``, ``offset``, ``shift``) are biases in
    every layer. A module whose own name says it is a layer scale (``layer_scale1``,
    ``ls1``, ``LayerScale_0``) holds gains whatever they are called, and so does an
    array named as one (``gamma``, ``gamma_1``, ``lambda1``, ``ls1``, ``layerscale``).
    ``owner_name`` may be the owner's key or its class name, or both joined by a space.
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
    if (
        name in _BIAS_NAMES
        or (ws and ws[0] in _OFFSET_NAMES and all(w.isdigit() for w in ws[1:]))
        or (ws and ws[-1] in ("bias", "biases"))
        or (ws and ws[0] == "bias")
    ):
        return "bias"
    if (kind == "unknown" or kind in NORM_KINDS) and owner_trait(owner_name) == "layer_scale":
        # A layer scale holds gains whatever they are called (content may read a lone
        # `scale` as an RMS norm's).
        return "gain"
    if kind in NORM_KINDS:
        return "scale" if name in _SCALE_NAMES else "other"
    if kind in ("embedding", "unknown") and (name in TABLE_NAMES or name == "weight"):
        # The table of a module whose own name says position (`position_embeddings`,
        # GPT-2's `wpe`, BART's `embed_positions`, a `LearnedPosEmbed`).
        if owner_trait(owner_name) == "position":
            return "position"
    if kind == "embedding":
        if name in TABLE_NAMES or name == "weight":
            return "embedding"
        return "other"
    if kind in ("prelu", "lora"):
        return "other"
    if name in _GAIN_NAMES or (ws and ws[0] in _GAIN_FIRST_WORDS) or _says_layer_scale(name):
        return "gain"
    if name in _WEIGHT_NAMES or (ws and ws[-1] in ("weight", "weights", "kernel", "kernels") and ws[0] != "bias"):
        return "weight"
    if name == "scale":
        return "scale"
    if name in TABLE_NAMES:
        return "embedding"
    return "other"


@functools.lru_cache(maxsize=8192)
def owner_trait(owner_name: str) -> str:
    """What :func:`role_from_name` reads of an owner's name, and all it reads of it:
    ``"position"`` for a module whose name says it holds a position table
    (``position_embeddings``, ``wpe``, ``embed_positions``), ``"layer_scale"`` for one
    whose name says it is a layer scale (``layer_scale1``, ``ls1``, ``LayerScale``),
    else ``""``. Adapters that decide once per owner key need only this of its name.

    ``owner_name`` may be the owner's key or its class name, or both joined by a space."""
    if not owner_name:
        return ""
    owner = set(words(owner_name))
    if (_POSITION_WORDS & owner and owner & _TABLE_WORDS) or "wpe" in owner:
        return "position"
    if any(_says_layer_scale(part) for part in owner_name.split()):
        return "layer_scale"
    return ""


_INDEX_WORDS = frozenset({"index", "indices", "idx", "ids"})


def is_index_name(name: str) -> bool:
    """Whether an array's name says it holds indices (``relative_position_index``,
    ``position_ids``): an integer array so named is a buffer, never a parameter."""
    ws = words(name)
    return bool(ws) and ws[-1] in _INDEX_WORDS
