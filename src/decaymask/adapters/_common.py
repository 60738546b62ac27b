"""Pieces every adapter shares: path keys, array tests, dtypes."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from ..core import _registry
from ..core._infer import is_generic_norm_name, kind_from_name
from ..core._leaf import Layer

_KEY_TYPES = (
    jax.tree_util.GetAttrKey,
    jax.tree_util.DictKey,
    jax.tree_util.SequenceKey,
    jax.tree_util.FlattenedIndexKey,
)


def key_name(entry: Any) -> str:
    """One path entry as a plain string: the one place key types are normalised."""
    if isinstance(entry, jax.tree_util.GetAttrKey):
        return entry.name
    if isinstance(entry, jax.tree_util.DictKey):
        return str(entry.key)
    if isinstance(entry, jax.tree_util.SequenceKey):
        return str(entry.idx)
    if isinstance(entry, jax.tree_util.FlattenedIndexKey):
        return str(entry.key)
    return str(entry)


ARRAY_TYPES = (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct)
"""What counts as an array leaf: concrete, traced and abstract arrays alike."""


def is_array_like(x: Any) -> bool:
    return isinstance(x, ARRAY_TYPES)


def dtype_name(x: Any) -> str:
    try:
        return np.dtype(x.dtype).name
    except TypeError:
        # Extended dtypes (jax PRNG keys, ``key<fry>``) are not numpy dtypes.
        return str(x.dtype)


def shape_of(x: Any) -> tuple[int, ...]:
    return tuple(x.shape)


def check_not_a_step_count(tree: Any, method: str) -> None:
    """A scalar integer is the step count ``optax.inject_hyperparams`` hands a schedule.

    ``inject_hyperparams`` takes every callable hyperparameter for a schedule, so a
    callable mask is called with the step count and its result (no decay anywhere) is
    used silently. Nothing else hands a mask builder one integer scalar.
    """
    if (
        is_array_like(tree)
        and tuple(tree.shape) == ()
        and np.issubdtype(np.dtype(tree.dtype), np.integer)
    ):
        raise TypeError(
            f"{method} was called with a scalar {dtype_name(tree)}, not params: this is "
            f"the step count optax.inject_hyperparams hands a callable hyperparameter, "
            f"which it treats as a schedule. Fix: mark the mask static, "
            f"optax.inject_hyperparams(optax.adamw, static_args=('mask',))(..., "
            f"mask=policy.{method})."
        )


def muon_dimension_numbers(decision: Any, method: str) -> Any:
    """The ``MuonDimensionNumbers`` of a decided leaf, ``None`` where it is not selected."""
    if not decision.decay:
        return None
    axes = decision.leaf.muon_axes()
    if axes is None:
        leaf = decision.leaf
        raise ValueError(
            f"{method}: {leaf.path} ({leaf.layer_type or leaf.layer}, {leaf.role}, shape "
            f"{leaf.shape}) is selected by {decision.decided_by}, but its matrix layout "
            f"(reduction and output axes) is unknown. Fix: leave it out with a rule, e.g. "
            f"dm.no_decay(path={leaf.path!r}), or teach the layout with "
            f"dm.register_layer(cls, kind, matrix_axes={{{leaf.name!r}: ((...), (...))}})."
        )
    try:
        from optax.contrib import MuonDimensionNumbers
    except ImportError as err:
        import optax

        raise ImportError(
            f"{method}: Muon dimension numbers need optax >= 0.2.6 "
            f"(optax.contrib.MuonDimensionNumbers); optax {optax.__version__} is "
            f"installed. Fix: pip install 'optax>=0.2.6'."
        ) from err

    reduction, output = axes
    return MuonDimensionNumbers(reduction_axis=reduction, output_axis=output)


def holds_masked_node(tree: Any) -> bool:
    """Whether ``tree`` is one branch's view of the params inside ``optax.partition``
    (or ``optax.contrib.muon``): the other branches' leaves are ``optax.MaskedNode``."""
    import sys

    optax = sys.modules.get("optax")
    if optax is None:
        return False
    masked = optax.MaskedNode
    return any(
        isinstance(x, masked)
        for x in jax.tree_util.tree_leaves(tree, is_leaf=lambda x: isinstance(x, masked))
    )


class ClassKinds:
    """The layer kind of a module class, as every adapter finds it.

    The registry first (subclasses of a registered class count), then the framework's
    kind table along the class's bases, then its name (``LlamaRMSNorm``). A wrapper
    (WeightNorm) is ``"wrapper"`` and a bare ``...Norm`` name ``"norm"``: both are
    resolved per instance by the adapter. Cached per class until the registry changes.
    """

    def __init__(
        self,
        table: dict[type, str],
        wrappers: tuple[type, ...] = (),
        containers: tuple[type, ...] = (),
    ):
        self.table = table
        self.wrappers = wrappers
        self.containers = containers
        self._kinds: dict[type, tuple[str, str, _registry.Registration | None]] = {}
        self._layers: dict[type, Layer] = {}
        self._generation = -1

    def __call__(self, cls: type) -> tuple[str, str, _registry.Registration | None]:
        """(kind, how it was found, registration)."""
        if self._generation != _registry.generation:
            self._kinds.clear()
            self._layers.clear()
            self._generation = _registry.generation
        found = self._kinds.get(cls)
        if found is None:
            found = self._kinds[cls] = self._resolve(cls)
        return found

    def layer(self, cls: type) -> Layer | None:
        """The :class:`Layer` of every instance of ``cls``; ``None`` where it depends on
        the instance (wrappers, bare norm names)."""
        kind, source, _ = self(cls)
        if kind in ("wrapper", "norm"):
            return None
        layer = self._layers.get(cls)
        if layer is None:
            layer = self._layers[cls] = Layer(kind, cls.__name__, cls, source)
        return layer

    def _resolve(self, cls: type) -> tuple[str, str, _registry.Registration | None]:
        registration = _registry.lookup_class(cls)
        if registration is not None:
            return registration.kind, "registered", registration
        for base in cls.__mro__:
            kind = self.table.get(base)
            if kind is not None:
                return kind, "class", None
            if base in self.wrappers:
                # The wrapped layer decides; the name ("WeightNorm") would read as a norm.
                return "wrapper", "class", None
            if base in self.containers:
                return "unknown", "class", None
        guessed = kind_from_name(cls.__name__)
        if guessed is not None:
            return guessed, "name", None
        if is_generic_norm_name(cls.__name__):
            return "norm", "name", None
        return "unknown", "class", None
