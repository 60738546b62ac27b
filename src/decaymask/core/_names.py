"""What a module or class name says: its words and the layer kind they name.

Names are read as words (:func:`words`): snake_case, CamelCase and digits split, case
kept only where it carries meaning (a lone capital letter, as in a state-space ``B``),
and a word glued from words the readings know split into them (transformers'
``crossattention``, a ``layerscale``, a ``posembed``).
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

    A word the readings do not know that is glued from words they know is split into
    them, fewest parts first (:func:`unglued`); a known word is never split.

    >>> words("RobertaPreLayerNormLMHead")
    ('roberta', 'pre', 'layer', 'norm', 'lm', 'head')
    >>> words("conv_norm_out"), words("SimpleNorm2d"), words("A_log")
    (('conv', 'norm', 'out'), ('simple', 'norm', '2d'), ('A', 'log'))
    >>> words("crossattention"), words("ls1")
    (('cross', 'attention'), ('ls', '1'))
    """
    out: list[str] = []
    for chunk in _CHUNKS.findall(name):
        for word in _WORDS.findall(chunk):
            if len(word) == 1 and word.isupper():
                out.append(word)
            else:
                out.extend(unglued(word.lower()))
    return tuple(out)


@functools.lru_cache(maxsize=8192)
def unglued(word: str) -> tuple[str, ...]:
    """``word`` split into the known words it is glued from (``crossattention``:
    ``cross``, ``attention``), or ``(word,)`` where it is known itself or is not made of
    known words of at least three letters each (``roberta``, ``shortcut``). Of several
    splits, the one with fewest parts, then longest first part (``prelayernorm``:
    ``pre``, ``layernorm``)."""
    if word in PART_WORDS or len(word) < 2 * _MIN_PART:
        return (word,)
    # best[i]: the best split of word[i:], None where it has none.
    best: list[tuple[str, ...] | None] = [None] * (len(word) + 1)
    best[len(word)] = ()
    for i in range(len(word) - _MIN_PART, -1, -1):
        for j in range(len(word), i + _MIN_PART - 1, -1):
            rest = best[j]
            if rest is None or word[i:j] not in PART_WORDS:
                continue
            here = best[i]
            if here is None or len(rest) + 1 < len(here):
                best[i] = (word[i:j], *rest)
    split = best[0]
    return split if split is not None and len(split) > 1 else (word,)


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
# The words glued names are made of: every word a reading here or in `._roles` looks
# for, and the modifiers that stand beside them (`pre`, `cross`, `final`). Parts of a
# glued word have at least three letters, so `ln`, `bn` or `in` never split a word.
_MIN_PART = 3
PART_WORDS = frozenset(
    {w for phrase in _KIND_PHRASES for w in phrase}
    | set(_KIND_WORDS)
    | CONTAINER_WORDS
    | {"pre", "post", "final", "first", "last", "self", "cross", "multi", "inner", "outer",
       "out", "input", "output", "hidden", "global", "local", "scale", "shift", "gain",
       "gamma", "beta", "alpha", "lambda", "bias", "weight", "kernel", "proj",
       "projection", "pos", "position", "positions", "positional", "emb", "enc", "encoding",
       "table", "token", "tokens", "cls", "class", "mask", "freq", "freqs", "periods",
       "sinusoid", "sinusoidal", "coords", "offset", "word",
       "patch", "relative", "rotary", "query", "key", "value", "feed", "forward"}
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


@functools.lru_cache(maxsize=8192)
def says_layer_scale(name: str) -> bool:
    """Whether a module's name says it is a layer scale (a learned per-channel multiplier
    of a residual branch): ``LayerScale``, ``FlaxDinov2LayerScale``, ``layer_scale1``,
    ``layerscale``, timm's and equimo's ``ls1``, FasterViT's ``hat_ls3``. A name whose
    head word names a layer kind (``layer_scale_norm``, ``ls_proj``) does not."""
    ws = words(name)
    if name_kind(name) not in (None, "container"):
        return False
    if "ls" in ws:
        return True
    return any(ws[i : i + 2] == ("layer", "scale") for i in range(len(ws) - 1))


def is_generic_norm_name(name: str) -> bool:
    """Whether a name says "some norm" without saying which (``norm``, ``attn_norm``)."""
    return name_kind(name) == "norm"


_KIND_SET = frozenset(KINDS) - {"unknown"}
