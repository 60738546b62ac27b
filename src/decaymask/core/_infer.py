"""What names and arrays say a module or an array is: one inference for every adapter.

Names are read as words (:func:`words`): snake_case, CamelCase and digits split, case
kept only where it carries meaning (a lone capital letter, as in a state-space ``B``).
A module name's kind is decided by its head word, read from the end past modifiers
(``pre``, ``final``, ``out``, digits): ``RobertaPreLayerNormLMHead`` is a head (a
container), ``pre_self_attention_norm`` and ``SimpleNorm2d`` are norms. What a module
owns (the names and ranks of its arrays) is content evidence, and content decides where
names and content contradict (:func:`resolve_kind`). Array roles come from the array's
name, the owner's kind and the owner's name (:func:`role_from_name`).

Every table here is data: extend it and every adapter reads the same.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Collection, Mapping

from ._vocab import KINDS

_CHUNKS = re.compile(r"[A-Za-z0-9]+")
_WORDS = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|\d+[dD](?![a-z])|\d+")


@functools.lru_cache(maxsize=8192)
def words(name: str) -> tuple[str, ...]:
    """The words of a name, lower case except a lone capital letter.

    >>> words("RobertaPreLayerNormLMHead")
    ('roberta', 'pre', 'layer', 'norm', 'lm', 'head')
    >>> words("conv_norm_out"), words("SimpleNorm2d"), words("A_log")
    (('conv', 'norm', 'out'), ('simple', 'norm', '2d'), ('A', 'log'))
    """
    out: list[str] = []
    for chunk in _CHUNKS.findall(name):
        for word in _WORDS.findall(chunk):
            out.append(word if len(word) == 1 and word.isupper() else word.lower())
    return tuple(out)


# Module kinds by word or phrase. Phrases are matched first, longest first.
_KIND_PHRASES: dict[tuple[str, ...], str] = {
    ("layer", "norm"): "layer_norm",
    ("rms", "norm"): "rms_norm",
    ("group", "norm"): "group_norm",
    ("batch", "norm"): "batch_norm",
    ("instance", "norm"): "instance_norm",
    ("multi", "head", "attention"): "attention",
    ("self", "attention"): "attention",
    ("cross", "attention"): "attention",
    ("simple", "cell"): "recurrent",
    ("rnn", "cell"): "recurrent",
    ("conv", "transpose"): "conv",
}
_KIND_WORDS: dict[str, str] = {
    "layernorm": "layer_norm",
    "ln": "layer_norm",
    "rmsnorm": "rms_norm",
    "groupnorm": "group_norm",
    "gn": "group_norm",
    "batchnorm": "batch_norm",
    "bn": "batch_norm",
    "instancenorm": "instance_norm",
    "norm": "norm",
    "normalization": "norm",
    "conv": "conv",
    "convolution": "conv",
    "deconv": "conv",
    "dense": "linear",
    "linear": "linear",
    "einsum": "linear",
    "embed": "embedding",
    "embeds": "embedding",
    "embedding": "embedding",
    "embeddings": "embedding",
    "wte": "embedding",
    "wpe": "embedding",
    "attention": "attention",
    "attn": "attention",
    "lstm": "recurrent",
    "gru": "recurrent",
    "mgu": "recurrent",
    "rnn": "recurrent",
    "prelu": "prelu",
    "lora": "lora",
}
# Words that name a module holding other modules: the name says no layer kind.
CONTAINER_WORDS = frozenset(
    {"head", "heads", "block", "blocks", "layer", "layers", "encoder", "decoder", "model",
     "stage", "stages", "stem", "backbone", "mlp", "ffn", "network", "net", "tower",
     "module", "modules", "sequential", "stack", "trunk", "pooler", "classifier"}
)
_NORM_KINDS = frozenset(k for k in KINDS if k.endswith("_norm"))
# Kinds whose modules hold other modules (the gates of a cell, the projections of an
# attention layer): a name may say so of a module that owns no arrays itself.
CONTAINER_KINDS = frozenset({"attention", "recurrent"})


@functools.lru_cache(maxsize=8192)
def name_kind(name: str) -> str | None:
    """What a module or class name says the module is.

    A kind from ``KINDS``, ``"norm"`` for a name that says only "some norm",
    ``"container"`` for a name whose head word is a container word (``LMHead``,
    ``EncoderLayer``), or ``None`` where the name says nothing. The head word decides:
    the last word that is a kind or container word (``FlaxRobertaPreLayerNormSelfAttention``
    is attention, ``...LayerNormLMHead`` a container), except that a name starting with
    a norm word names a norm (``norm_final_attn``: a norm applied after the final
    attention).
    """
    ws = words(name)
    found: list[tuple[int, str]] = []
    i = 0
    while i < len(ws):
        for size in (3, 2):
            kind = _KIND_PHRASES.get(ws[i : i + size])
            if kind is not None:
                found.append((i, kind))
                i += size
                break
        else:
            word = ws[i]
            kind = _KIND_WORDS.get(word)
            if kind is None and word in CONTAINER_WORDS:
                kind = "container"
            if kind is not None:
                found.append((i, kind))
            i += 1
    if not found:
        return None
    first_at, first = found[0]
    if first_at == 0 and (first == "norm" or first in _NORM_KINDS):
        return first
    return found[-1][1]


def kind_from_name(name: str) -> str | None:
    """The specific layer kind a name makes evident, or ``None`` (see :func:`name_kind`)."""
    kind = name_kind(name)
    return kind if kind in _KIND_SET else None


def is_generic_norm_name(name: str) -> bool:
    """Whether a name says "some norm" without saying which (``norm``, ``attn_norm``)."""
    return name_kind(name) == "norm"


_KIND_SET = frozenset(KINDS) - {"unknown"}


# Content: what the arrays a module owns directly say, by their names and the rank each
# has in one layer (stacked axes removed where the adapter knows them).

_TABLE_NAMES = frozenset({"embedding", "embeddings", "embedding_table"})
_KERNEL_NAMES = frozenset({"kernel", "w"})
_NORM_ARRAY_NAMES = frozenset({"scale", "bias", "weight", "offset", "mean", "var", "gamma", "beta"})
_GATE_SETS = (
    frozenset({"ir", "iz", "in", "hr", "hz", "hn"}),  # GRU
    frozenset({"ii", "if", "ig", "io", "hi", "hf", "hg", "ho"}),  # LSTM
    frozenset({"if", "in", "hf", "hn"}),  # MGU
    frozenset({"i", "h"}),  # simple cell
    frozenset({"ih", "hh"}),  # conv LSTM
)
_ATTENTION_CHILDREN = frozenset({"query", "key", "value", "out"})


def content_kind(arrays: Mapping[str, int], children: Collection[str] = ()) -> str | None:
    """The kind that the arrays a module owns directly make evident, or ``None``.

    Args:
      arrays: name -> rank in one layer of every array the module owns directly.
      children: the keys of its submodules that hold arrays.

    A table (``embedding``) makes an embedding; a ``kernel`` (or Haiku's ``w``) of two
    axes a linear layer, of three or more a convolution unless a multi-axis bias shows
    a multi-axis projection; ``scale`` beside ``bias`` a layer norm, ``scale`` alone an
    RMS norm, ``mean`` and ``var`` a batch norm. Where the module also owns arrays that
    fit none of that (a fused matrix and norm), nothing is evident.
    """
    if not arrays:
        names = frozenset(children)
        if names in _GATE_SETS:
            return "recurrent"
        if _ATTENTION_CHILDREN <= names:
            return "attention"
        return None
    names = frozenset(arrays)
    if names & _TABLE_NAMES and names <= _TABLE_NAMES | {"bias"}:
        return "embedding"
    kernel = next((n for n in ("kernel", "w") if n in arrays), None)
    if kernel is None and arrays.get("weight", 0) >= 2:
        kernel = "weight"
    if kernel is not None:
        if names & {"scale", "mean", "var", "offset"}:
            return None
        rank = arrays[kernel]
        bias = arrays.get("bias", arrays.get("b"))
        if rank < 2:
            return None  # not a matrix: a kernel of one axis says no layer
        if rank == 2:
            return "linear"
        return "linear" if bias is not None and bias >= 2 else "conv"
    if "scale" in names and names <= {"scale", "bias", "offset"}:
        return "layer_norm" if names & {"bias", "offset"} else "rms_norm"
    if {"mean", "var"} <= names:
        return "batch_norm"
    if names == {"negative_slope"}:
        return "prelu"
    if names & {"lora_a", "lora_b"}:
        return "lora"
    return None


def _content_fits(kind: str, arrays: Mapping[str, int]) -> bool:
    """Whether arrays whose names say nothing decisive can belong to a layer of ``kind``."""
    if kind in _NORM_KINDS or kind == "norm":
        return all(rank <= 1 for rank in arrays.values())
    return True


def resolve_kind(
    name: str | None, arrays: Mapping[str, int], children: Collection[str] = ()
) -> tuple[str, str]:
    """(kind, evidence) of a module known by a name and what it owns.

    The evidence is ``"name"`` where the name decided (content agreeing or silent),
    ``"content"`` where the arrays decided (the name silent or contradicted: a
    ``FlaxConv1D`` whose kernel is 2-D is linear, a ``patch_embeddings`` holding a 4-D
    kernel a convolution, a ``norm_final_attn`` holding a scale a norm). A name that
    says norm, embedding, linear or conv of a module that owns no arrays of its own
    (``Wav2Vec2EncoderStableLayerNorm``) says nothing: the module is a container.

    Returns ``("unknown", ...)`` where neither says anything.
    """
    said = name_kind(name) if name else None
    if said == "container":
        said = None
    seen = content_kind(arrays, children)
    if not arrays:
        if said in CONTAINER_KINDS:
            return said, "name"
        if seen is not None:
            return seen, "content"
        return "unknown", "name"
    if seen is None:
        if said is None or not _content_fits(said, arrays):
            return "unknown", "content"
        if said == "norm":
            return ("layer_norm" if "bias" in arrays else "rms_norm"), "name"
        return said, "name"
    if said is None:
        return seen, "content"
    if said == "embedding" and seen == "linear" and set(arrays) == {"weight"} and arrays["weight"] == 2:
        # A lone 2-D `weight` is a table as well as a matrix (Equinox's Embedding holds
        # one): the name settles it (`LearnedPosEmbed`).
        return said, "name"
    if said == seen or (said == "norm" and seen in _NORM_KINDS):
        return seen, "name"
    if said in _NORM_KINDS and seen in _NORM_KINDS:
        # The arrays say "a norm"; the name says which (a group norm holds scale and
        # bias like a layer norm does).
        return said, "name"
    if said == "attention" and seen in ("linear", "conv"):
        # A projection of an attention layer known by the attention's name.
        return seen, "content"
    return seen, "content"


# Roles.

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
    if kind in _NORM_KINDS:
        if name in _SCALE_NAMES:
            return "scale"
        return "bias" if name == "offset" else "other"
    if kind in ("embedding", "unknown") and (name in _TABLE_NAMES or name == "weight"):
        # The table of a module whose own name says position (`position_embeddings`,
        # GPT-2's `wpe`, BART's `embed_positions`, a `LearnedPosEmbed`).
        if owner_says_position(owner_name):
            return "position"
    if kind == "embedding":
        if name in _TABLE_NAMES or name == "weight":
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
    if name in _TABLE_NAMES:
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
