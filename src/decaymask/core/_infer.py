"""What names and arrays together say a module is: one inference for every adapter.

What a module owns (the names and ranks or shapes of its arrays) is content evidence,
read on one layer's arrays: an adapter gives the rank each array has in one layer where
it knows it, or the array's shape where it does not (stacked leading axes, layout
axes). Content decides where names and content contradict (:func:`read_kind`); what
names alone say is read in :mod:`._names`.

Every table here is data: extend it and every adapter reads the same.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping

from ._names import CONTAINER_KINDS, NORM_KINDS, name_kind, says_layer_scale

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


Arrays = Mapping[str, "int | tuple[int, ...]"]
"""Name -> the rank the array has in one layer (an ``int``), or its shape (a tuple)
where the adapter does not know how many of its axes are stacked or added by a
layout."""


def _rank(found: int | tuple[int, ...]) -> int:
    return found if isinstance(found, int) else len(found)


def layout_axes(arrays: Arrays) -> dict[str, int]:
    """Axes a layout adds to arrays of known shape, by name (none listed where none).

    An Equinox-style convolution keeps its bias as ``(out, 1, ..., 1)`` beside a
    ``(out, in, *window)`` weight, to broadcast over space, and so does a Haiku
    convolution over channels-first data beside its ``(*window, in, out)`` kernel: the
    trailing axes of one are layout, and the bias is a vector as a Flax conv's
    ``(out,)`` is. A bias equal to the kernel's trailing axes (a multi-axis
    projection's output features) is not.
    """
    kernel = next((arrays[n] for n in ("weight", "kernel", "w") if n in arrays), None)
    found: dict[str, int] = {}
    if not isinstance(kernel, tuple) or len(kernel) < 3:
        return found
    for name in ("bias", "b"):
        bias = arrays.get(name)
        if (
            isinstance(bias, tuple)
            and len(bias) == len(kernel) - 1
            and bias[0] in (kernel[0], kernel[-1])
            and all(size == 1 for size in bias[1:])
            and kernel[len(kernel) - len(bias):] != bias
        ):
            found[name] = len(bias) - 1
    return found


def _ranks(arrays: Arrays) -> dict[str, int]:
    """One layer's rank of each array, layout axes not counted."""
    extra = layout_axes(arrays)
    return {name: _rank(found) - extra.get(name, 0) for name, found in arrays.items()}


def content_kind(arrays: Arrays, children: Collection[str] = ()) -> str | None:
    """The kind that the arrays a module owns directly make evident, or ``None``.

    Args:
      arrays: name -> rank in one layer (or shape, see :data:`Arrays`) of every array
        the module owns directly.
      children: the keys of its submodules that hold arrays.

    A table (``embedding``) makes an embedding; a ``kernel`` (or Haiku's ``w``) of two
    axes a linear layer, of three or more a convolution unless a multi-axis bias shows
    a multi-axis projection (a bias ``(out, 1, ..., 1)`` is a convolution's, in
    Equinox's layout); ``scale`` beside ``bias`` a layer norm, ``scale`` alone an RMS
    norm, ``mean`` and ``var`` a batch norm. Where the module also owns arrays that fit
    none of that (a fused matrix and norm), nothing is evident.
    """
    if not arrays:
        names = frozenset(children)
        if names in _GATE_SETS:
            return "recurrent"
        if _ATTENTION_CHILDREN <= names:
            return "attention"
        return None
    ranks = _ranks(arrays)
    names = frozenset(ranks)
    if names & TABLE_NAMES and names <= TABLE_NAMES | {"bias"}:
        return "embedding"
    kernel: str | None = next((n for n in ("kernel", "w") if n in ranks), None)
    if kernel is None and ranks.get("weight", 0) >= 2:
        kernel = "weight"
    if kernel is not None:
        if names & {"scale", "mean", "var", "offset"}:
            return None
        rank = ranks[kernel]
        bias = ranks.get("bias", ranks.get("b"))
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


def _content_fits(kind: str, ranks: Mapping[str, int]) -> bool:
    """Whether arrays whose names say nothing decisive can belong to a layer of ``kind``."""
    if kind in NORM_KINDS or kind == "norm":
        return all(rank <= 1 for rank in ranks.values())
    return True


@dataclasses.dataclass(frozen=True)
class Reading:
    """What names and arrays together say of a module (:func:`read_kind`)."""

    kind: str
    evidence: str
    """``"name"`` where the name decided (content agreeing or silent), ``"content"``
    where the arrays decided."""
    stacked: int = 0
    """Leading axes every array of the module shares that are not part of one layer:
    read only where the adapter gave shapes and the name needs them removed."""
    layout: tuple[tuple[str, int], ...] = ()
    """(array name, axes its layout adds) for the arrays of one layer that have any."""

    def layout_axes(self, name: str) -> int:
        return dict(self.layout).get(name, 0)


def read_kind(
    name: str | None, arrays: Arrays, children: Collection[str] = (), *, one_layer: bool = False
) -> Reading:
    """What a module known by a name and the arrays it owns is.

    Content is read on one layer's arrays: where the adapter gives shapes and does not
    know the stacked axes, arrays that all share leading axes and, with those removed,
    are what the name says (a third-party ``LayerNorm`` stacked by ``eqx.filter_vmap``,
    its ``weight`` and ``bias`` of shape ``(n, dim)``; a user's ``Linear`` of ``(n,
    in, out)`` kernels) do not contradict the name: the name decides, and those axes are
    the reading's :attr:`~Reading.stacked` axes. The arrays overrule a name only where
    no such reading fits it (a ``FlaxConv1D`` of a 2-D kernel is linear).

    ``one_layer``: the shapes given are one layer's (the adapter knows the stacked
    axes, none is among them): only their layout axes are read.
    """
    said = name_kind(name) if name else None
    if said == "container":
        said = None
    if said is None and name and says_layer_scale(name):
        said = _LAYER_SCALE
    kind, evidence = _resolve(said, arrays, children)
    layout = _layout_of(arrays)
    given = {n: shape for n, shape in arrays.items() if isinstance(shape, tuple)}
    if one_layer or not given or len(given) != len(arrays):
        return Reading(kind, evidence, 0, layout)
    contradicted = said is not None and evidence == "content"
    # A linear layer's bias that is not its output features: layers stacked together.
    stacked_linear = kind == "linear" and not _is_one_layer(kind, given)
    if not (contradicted or stacked_linear):
        return Reading(kind, evidence, 0, layout)
    first = next(iter(given.values()))
    for k in range(1, min(len(shape) for shape in given.values()) + 1):
        if any(shape[:k] != first[:k] for shape in given.values()):
            break  # arrays stacked together share their leading sizes
        one = {n: shape[k:] for n, shape in given.items()}
        if said is not None and _stack_fits(said, one, children):
            return Reading(*_resolve(said, one, children), k, _layout_of(one))
        if said is None and content_kind(one, children) == kind and _is_one_layer(kind, one):
            return Reading(kind, evidence, k, _layout_of(one))
    return Reading(kind, evidence, 0, layout)


def _is_one_layer(kind: str, shapes: Mapping[str, tuple[int, ...]]) -> bool:
    """Whether arrays of known shape have the ranks one layer of ``kind`` gives them
    (where it fixes them): a norm's are vectors, an embedding's table a matrix, a
    linear layer's bias its output features: a ``kernel``'s (Flax, Haiku: ``(in,
    out)``, or a multi-axis projection's trailing axes) or a ``weight``'s first axis
    (PyTorch, Equinox: ``(out, in)``).

    A linear layer's bias that is neither (``(n, out)`` beside an ``(n, in, out)``
    kernel) shows layers stacked along axes its name and content cannot see alone.
    """
    extra = layout_axes(shapes)
    ranks = {name: len(shape) - extra.get(name, 0) for name, shape in shapes.items()}
    if kind in NORM_KINDS:
        return all(rank <= 1 for rank in ranks.values())
    if kind == "embedding":
        return all(rank <= 2 for rank in ranks.values())
    if kind != "linear":
        return True
    name = next((n for n in ("kernel", "w", "weight") if n in shapes), None)
    bias = shapes.get("bias", shapes.get("b"))
    if name is None or bias is None:
        return True
    kernel = shapes[name]
    if name == "weight" and len(kernel) == 2:
        return bias == kernel[:1]
    return 0 < len(bias) < len(kernel) and kernel[len(kernel) - len(bias):] == bias


def _layout_of(arrays: Arrays) -> tuple[tuple[str, int], ...]:
    return tuple(sorted(layout_axes(arrays).items()))


def _stack_fits(
    said: str, one: Mapping[str, tuple[int, ...]], children: Collection[str]
) -> bool:
    """Whether one layer's arrays are positively what a name says: content agreeing
    with it, or (content silent) vectors of the norm it names."""
    kind, evidence = _resolve(said, one, children)
    if evidence != "name" or kind == "unknown" or not _is_one_layer(kind, one):
        return False
    if content_kind(one, children) is not None:
        return True
    return (said in NORM_KINDS or said == "norm") and all(r == 1 for r in _ranks(one).values())


def resolve_kind(
    name: str | None, arrays: Arrays, children: Collection[str] = ()
) -> tuple[str, str]:
    """(kind, evidence) of a module known by a name and what it owns: :func:`read_kind`.

    The evidence is ``"name"`` where the name decided (content agreeing or silent),
    ``"content"`` where the arrays decided (the name silent or contradicted: a
    ``FlaxConv1D`` whose kernel is 2-D is linear, a ``patch_embeddings`` holding a 4-D
    kernel a convolution, a ``norm_final_attn`` holding a scale a norm). A name that
    says norm, embedding, linear or conv of a module that owns no arrays of its own
    (``Wav2Vec2EncoderStableLayerNorm``) says nothing: the module is a container.

    Returns ``("unknown", ...)`` where neither says anything.
    """
    reading = read_kind(name, arrays, children)
    return reading.kind, reading.evidence


_LAYER_SCALE = "layer scale"
"""What :func:`read_kind` takes a name to say where it says layer scale (``LayerScale``,
``ls1``): no kind, but not a norm either, whatever its lone ``scale`` looks like."""


def _resolve(said: str | None, arrays: Arrays, children: Collection[str]) -> tuple[str, str]:
    """(kind, evidence) of what a name says (``said``) and the arrays as given."""
    seen = content_kind(arrays, children)
    if said == _LAYER_SCALE:
        if seen in NORM_KINDS:
            # A layer scale's gains look like a norm's scale: the name says they are not.
            return "unknown", "name"
        said = None
    if not arrays:
        if said in CONTAINER_KINDS:
            return said, "name"
        if seen is not None:
            return seen, "content"
        return "unknown", "name"
    ranks = _ranks(arrays)
    if seen is None:
        if said is None or not _content_fits(said, ranks):
            return "unknown", "content"
        if said == "norm":
            return ("layer_norm" if "bias" in ranks else "rms_norm"), "name"
        return said, "name"
    if said is None:
        return seen, "content"
    if said == "embedding" and seen == "linear" and set(ranks) == {"weight"} and ranks["weight"] == 2:
        # A lone 2-D `weight` is a table as well as a matrix (Equinox's Embedding holds
        # one): the name settles it (`LearnedPosEmbed`).
        return said, "name"
    if said == seen or (said == "norm" and seen in NORM_KINDS):
        return seen, "name"
    if said in NORM_KINDS and seen in NORM_KINDS:
        # The arrays say "a norm"; the name says which (a group norm holds scale and
        # bias like a layer norm does).
        return said, "name"
    return seen, "content"
