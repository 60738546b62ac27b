"""What Flax NNX classes are: layer kinds, wrappers, containers, and their layouts.

Everything the walk asks of a module's class is worked out once per class (and again
after the registry changes) into one :class:`NnxClass` record.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from flax import nnx

from ...core import _registry
from ...core._infer import Reading
from ...core._leaf import Layer
from .._common import ClassKinds, RegistryCache, instance_layer
from ._layouts import Layout, nnx_layout

# Base classes, first match along the MRO wins: subclasses count as the base kind.
NNX_KINDS: dict[type, str] = {
    nnx.Linear: "linear",  # and LoRALinear, a subclass
    nnx.LinearGeneral: "linear",
    nnx.Einsum: "linear",
    nnx.Conv: "conv",
    nnx.ConvTranspose: "conv",
    nnx.Embed: "embedding",
    nnx.LayerNorm: "layer_norm",
    nnx.RMSNorm: "rms_norm",
    nnx.GroupNorm: "group_norm",
    nnx.BatchNorm: "batch_norm",
    nnx.InstanceNorm: "instance_norm",
    nnx.MultiHeadAttention: "attention",
    # GRUCell, LSTMCell, OptimizedLSTMCell, SimpleCell and user cells share this base.
    nnx.RNNCellBase: "recurrent",
    nnx.PReLU: "prelu",
    nnx.LoRA: "lora",
}

# Wrappers reparametrise one inner layer (``layer_instance``): the inner layer owns its
# arrays, and the wrapper counts as a layer of the inner layer's kind.
NNX_WRAPPERS: tuple[type, ...] = (nnx.WeightNorm, nnx.SpectralNorm)

# Containers whose class is known not to be a layer: kind "unknown", not read off the name.
NNX_CONTAINERS: tuple[type, ...] = (
    nnx.Sequential,
    nnx.List,
    nnx.Dict,
    nnx.RNN,
    nnx.Bidirectional,
    nnx.Dropout,
)

# Sequence and mapping containers enclose the modules they hold but own no arrays: a
# variable held directly in an ``nnx.List`` belongs to the module holding the list,
# as an array in a list field of an Equinox module does.
NNX_NON_OWNING: tuple[type, ...] = (nnx.List, nnx.Dict)

# Random-number state, not a layer: looked through.
NNX_TRANSPARENT: tuple[type, ...] = (nnx.Rngs, nnx.RngStream)

nnx_class_kind = ClassKinds(NNX_KINDS, NNX_WRAPPERS, NNX_CONTAINERS)

@dataclasses.dataclass(frozen=True, slots=True)
class NnxClass:
    """What the walk needs to know of one module class."""

    source: str
    """How its kind was found (:class:`~decaymask.adapters._common.ClassKinds`)."""
    registration: _registry.Registration | None
    layout: Layout | None
    """Its entry in the layout table, if any: to be used only where a layer's kind
    came from its class (``source == "class"``)."""
    non_owning: bool
    """An ``nnx.List`` or ``nnx.Dict``."""


_nnx_classes = RegistryCache()  # class -> NnxClass


def nnx_class(cls: type) -> NnxClass:
    """The :class:`NnxClass` of ``cls``, cached."""
    table = _nnx_classes.table()
    found = table.get(cls)
    if found is None:
        _, source, registration = nnx_class_kind(cls)
        found = table[cls] = NnxClass(
            source, registration, nnx_layout(cls), issubclass(cls, NNX_NON_OWNING)
        )
    return found


def nnx_layer(module: Any) -> Layer:
    """The layer an NNX module is."""
    return nnx_reading(module)[0]


def nnx_reading(module: Any) -> tuple[Layer, Reading | None]:
    """The layer an NNX module is, and how its arrays were read where they decided it
    (their stacked and layout axes: :func:`~decaymask.core._infer.read_kind`)."""
    return instance_layer(nnx_class_kind, module, _nnx_inner, _nnx_content)


def _nnx_inner(module: Any) -> Any:
    return module.layer_instance


def _nnx_content(module: Any) -> tuple[dict[str, tuple[int, ...]], list[str]]:
    """The shape of every array a module owns directly (its variables and raw array
    attributes), and the attributes that hold modules."""
    arrays: dict[str, tuple[int, ...]] = {}
    children: list[str] = []
    for name, value in vars(module).items():
        if isinstance(value, nnx.Variable):
            value = value.get_raw_value()
        if isinstance(value, nnx.Pytree):
            if not isinstance(value, NNX_TRANSPARENT):
                children.append(name)
            continue
        shape = getattr(value, "shape", None)
        if shape is not None and getattr(value, "dtype", None) is not None:
            arrays[name] = tuple(shape)
    return arrays, children
