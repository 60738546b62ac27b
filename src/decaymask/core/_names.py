"""What a module or class name says: its words and the layer kind they name.

Names are read as words (:func:`words`): snake_case, CamelCase and digits split, case
kept only where it carries meaning (a lone capital letter, as in a state-space ``B``).
A module name's kind is decided by its head word, read from the end past modifiers
(``pre``, ``final``, ``out``, digits): ``RobertaPreLayerNormLMHead`` is a head (a
container), ``pre_self_attention_norm`` and ``SimpleNorm2d`` are norms.

Every table here is data: extend it and every adapter reads the same.
"""

from __future__ import annotations

import functools
import re

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
NORM_KINDS = frozenset(k for k in KINDS if k.endswith("_norm"))
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
    if first_at == 0 and (first == "norm" or first in NORM_KINDS):
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
