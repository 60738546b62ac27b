"""What names and arrays together say a module is: one inference for every adapter.

What a module owns (the names and ranks of its arrays) is content evidence, and content
decides where names and content contradict (:func:`resolve_kind`); what names alone say
is read in :mod:`._names`.

Every table here is data: extend it and every adapter reads the same.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

from ._names import CONTAINER_KINDS, NORM_KINDS, name_kind

# Content: what the arrays a module owns directly say, by their names and the rank each
# has in one layer (stacked axes removed where the adapter knows them).

TABLE_NAMES = frozenset({"embedding", "embeddings", "embedding_table"})
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
    if names & TABLE_NAMES and names <= TABLE_NAMES | {"bias"}:
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
    if kind in NORM_KINDS or kind == "norm":
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
    if said == seen or (said == "norm" and seen in NORM_KINDS):
        return seen, "name"
    if said in NORM_KINDS and seen in NORM_KINDS:
        # The arrays say "a norm"; the name says which (a group norm holds scale and
        # bias like a layer norm does).
        return said, "name"
    if said == "attention" and seen in ("linear", "conv"):
        # A projection of an attention layer known by the attention's name.
        return seen, "content"
    return seen, "content"


