"""What Linen's own classes and names say: kinds, wrappers, cells' gates, one layer's
ranks and kernel layouts."""

from __future__ import annotations

import functools
import re

import flax.linen as nn

from ...core._leaf import Layer

# Base classes: subclasses count as the base kind.
KIND_TABLE: dict[type, str] = {
    nn.Dense: "linear",
    nn.DenseGeneral: "linear",
    nn.Einsum: "linear",
    nn.Conv: "conv",
    nn.ConvTranspose: "conv",
    nn.ConvLocal: "conv",
    nn.Embed: "embedding",
    nn.LayerNorm: "layer_norm",
    nn.RMSNorm: "rms_norm",
    nn.GroupNorm: "group_norm",
    nn.BatchNorm: "batch_norm",
    nn.InstanceNorm: "instance_norm",
    nn.MultiHeadDotProductAttention: "attention",
    nn.MultiHeadAttention: "attention",
    nn.SelfAttention: "attention",
    nn.GRUCell: "recurrent",
    nn.LSTMCell: "recurrent",
    nn.OptimizedLSTMCell: "recurrent",
    nn.MGUCell: "recurrent",
    nn.SimpleCell: "recurrent",
    nn.ConvLSTMCell: "recurrent",
    nn.PReLU: "prelu",
}
# OptimizedLSTMCell keeps its gates in this Dense look-alike.
_DENSE_PARAMS: type | None = getattr(nn.recurrent, "DenseParams", None)
if _DENSE_PARAMS is not None:
    KIND_TABLE[_DENSE_PARAMS] = "linear"

# Wrappers keep arrays for the layer they wrap: they own them as a layer of its kind.
WRAPPERS: tuple[type, ...] = (nn.WeightNorm, nn.SpectralNorm)

# Containers whose class is known not to be a layer: never guessed from their name.
LINEN_CONTAINERS: tuple[type, ...] = (nn.Sequential, nn.RNN, nn.Bidirectional, nn.Dropout)

KIND_BY_NAME: dict[str, str] = {cls.__name__: kind for cls, kind in KIND_TABLE.items()}
WRAPPER_NAMES = frozenset(cls.__name__ for cls in WRAPPERS)
ATTENTION_NAMES = frozenset(n for n, k in KIND_BY_NAME.items() if k == "attention")
ATTENTION_PROJECTIONS = frozenset({"query", "key", "value", "out"})

# Lifted transforms name their class `<Transform><Class>`; scan and vmap stack arrays.
_LIFT_PREFIXES = ("Scan", "Vmap", "Checkpoint", "Remat", "Jit", "Map_variables")
_STACKING_PREFIXES = frozenset({"Scan", "Vmap"})
AUTO_NAME = re.compile(r"([A-Z]\w*)_\d+")

# The gate submodules of Linen's cells, for cells under a name of the user's choosing.
_CELL_GATES = (
    frozenset({"ir", "iz", "in", "hr", "hz", "hn"}),  # GRUCell
    frozenset({"ii", "if", "ig", "io", "hi", "hf", "hg", "ho"}),  # (Optimized)LSTMCell
    frozenset({"if", "in", "hf", "hn"}),  # MGUCell
    frozenset({"i", "h"}),  # SimpleCell
    frozenset({"ih", "hh"}),  # ConvLSTMCell
)

CELL_GATE_SETS = frozenset(_CELL_GATES)

# The rank one layer gives an array, where only names are known: under a lifted
# scan/vmap ancestor, leading axes beyond it are stacked axes. Layers whose ranks
# depend on their configuration (Einsum, DenseGeneral, ConvLocal) are left out.
_NORM_NDIM = {"scale": 1, "bias": 1, "weight": 1, "mean": 1, "var": 1}
_NATURAL_NDIM: dict[str, dict[str, int]] = {
    "linear": {"kernel": 2, "weight": 2, "bias": 1},
    "conv": {"bias": 1},
    "embedding": {"embedding": 2, "weight": 2},
    "recurrent": {"kernel": 2, "bias": 1},
    "prelu": {"negative_slope": 0},
    **{kind: _NORM_NDIM for kind in ("layer_norm", "rms_norm", "group_norm", "batch_norm",
                                     "instance_norm")},
}
_FREE_NDIM = frozenset({"Einsum", "DenseGeneral", "ConvLocal"})
# MultiHeadDotProductAttention's DenseGeneral children: (kernel, bias) ranks.
_ATTENTION_NDIM = {"query": (3, 2), "key": (3, 2), "value": (3, 2), "out": (3, 1)}


# (batch_dims, axis, features) axis counts of MultiHeadDotProductAttention's
# DenseGeneral children, for their matrix layouts by name.
ATTENTION_LAYOUT = {"query": (0, 1, 2), "key": (0, 1, 2), "value": (0, 1, 2), "out": (0, 2, 1)}

# Linen's kernel layouts, most specific class first (DenseGeneral is not a Dense).
_LAYOUT_CLASSES: tuple[tuple[type, str], ...] = (
    (nn.Einsum, "Einsum"),
    (nn.DenseGeneral, "DenseGeneral"),
    (nn.Dense, "Dense"),
    *(((_DENSE_PARAMS, "Dense"),) if _DENSE_PARAMS is not None else ()),
    (nn.ConvLocal, "ConvLocal"),
    (nn.Conv, "Conv"),
    (nn.ConvTranspose, "Conv"),
    (nn.Embed, "Embed"),
)
_LAYOUT_NAMES = {cls.__name__: base for cls, base in _LAYOUT_CLASSES}


def layout_base(layer: Layer) -> str | None:
    """Which Linen matrix layout a layer's kernel has, by class or auto name."""
    if layer.cls is not None:
        for cls, base in _LAYOUT_CLASSES:
            if issubclass(layer.cls, cls):
                return base
        return None
    return _LAYOUT_NAMES.get(layer.type_name) if layer.type_name is not None else None


# The ranks one layer's arrays have whatever the layer's configuration: more axes can
# only be layers stacked in front (by a user-named nn.scan or nn.vmap), which proves the
# stack. A norm's scale is left out: LayerNorm(feature_axes=(-2, -1)) makes it 2-D.
_FIXED_NDIM: dict[str, dict[str, int]] = {
    "Dense": {"kernel": 2, "bias": 1},
    "Embed": {"embedding": 2},
}


def fixed_ndim(layer: Layer, module_key: str, name: str) -> int | None:
    """The rank ``name`` has in one layer of any configuration, or ``None``: Dense and
    Embed (by auto name), attention projections, and a conv's bias (but ConvLocal's)."""
    if layer.type_name == "DenseGeneral" and module_key in _ATTENTION_NDIM:
        kernel, bias = _ATTENTION_NDIM[module_key]
        return kernel if name == "kernel" else bias if name == "bias" else None
    if layer.kind == "conv" and layer.type_name != "ConvLocal":
        return 1 if name == "bias" else None
    return _FIXED_NDIM.get(layer.type_name or "", {}).get(name)


def natural_ndim(layer: Layer, module_key: str, name: str) -> int | None:
    """The rank ``name`` has in one layer known by name only, or ``None``."""
    if layer.type_name == "DenseGeneral" and module_key in _ATTENTION_NDIM:
        kernel, bias = _ATTENTION_NDIM[module_key]
        return kernel if name == "kernel" else bias if name == "bias" else None
    if layer.type_name in _FREE_NDIM:
        return None
    if layer.type_name == "ConvLSTMCell" and name == "kernel":
        return None
    return _NATURAL_NDIM.get(layer.kind, {}).get(name)



@functools.lru_cache(maxsize=4096)
def auto_class(key: str) -> tuple[str | None, int]:
    """The class name in a Flax auto name, lift prefixes dropped, and how many stack."""
    match = AUTO_NAME.fullmatch(key)
    if match is None:
        return None, 0
    name = match.group(1)
    stacked = 0
    stripped = True
    while stripped:
        stripped = False
        for prefix in _LIFT_PREFIXES:
            rest = name[len(prefix) :]
            if name.startswith(prefix) and rest[:1].isupper():
                stacked += prefix in _STACKING_PREFIXES
                name = rest
                stripped = True
    return name, stacked

