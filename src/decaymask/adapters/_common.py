"""Pieces every adapter shares: path keys, array tests, dtypes."""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

import jax
import numpy as np

from ..core import _registry
from ..core._infer import Arrays, Reading, read_kind
from ..core._leaf import Layer, Leaf
from ..core._names import is_generic_norm_name, kind_from_name

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


def escape_key(key: str) -> str:
    """One key as the canonical path writes it: a ``/`` inside it becomes ``%2F`` (and a
    ``%`` becomes ``%25``), so that ``{"a/b": x}`` and ``{"a": {"b": x}}`` differ."""
    if "/" in key or "%" in key:
        return key.replace("%", "%25").replace("/", "%2F")
    return key


def path_text(keys: Any) -> str:
    """The canonical path of a sequence of keys (strings, ints, tuples, or jax key-path
    entries): each key as :func:`key_name` writes it, escaped, joined with ``/``."""
    return "/".join(escape_key(k if type(k) is str else key_name(k)) for k in keys)


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


def muon_dimension_numbers(decision: Any, method: str, layout_fix: str = "") -> Any:
    """The ``MuonDimensionNumbers`` of a decided leaf, ``None`` where it is not selected.

    ``layout_fix`` says how this framework's user gives the layer classes (a trace), for
    the error on a leaf whose layout names alone cannot prove."""
    if not decision.decay:
        return None
    check_matrix_axes(decision.leaf, method)
    axes = decision.leaf.muon_axes()
    if axes is None:
        leaf = decision.leaf
        traced = (
            f"give the layer classes ({layout_fix}), "
            if layout_fix and leaf.layer_class is None
            else ""
        )
        # A function of the layer needs the instance: a leaf known by names has none.
        per_instance = (
            f", or, where it differs between the class's instances, with a function of "
            f"the layer: matrix_axes={{{leaf.name!r}: lambda layer: ((...), (...))}}"
            if not traced
            else ""
        )
        raise ValueError(
            f"{method}: {leaf.path} ({leaf.layer_type or leaf.layer}, {leaf.role}, shape "
            f"{leaf.shape}) is selected by {decision.decided_by}, but its matrix layout "
            f"(reduction and output axes) is unknown. Fix: leave it out with a rule, e.g. "
            f"dm.no_decay(path={leaf.path!r}), {traced}or teach the layout with "
            f"dm.register_layer(cls, kind, matrix_axes={{{leaf.name!r}: ((...), (...))}})"
            f"{per_instance}."
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


def layout_rank(axes: tuple[tuple[int, ...], tuple[int, ...]]) -> int:
    """The rank of one layer's array that a (reduction, output) layout names."""
    return max(axes[0] + axes[1]) + 1


def registered_batch_axes(
    registration: Any, array_of: Callable[[str], Any], layer: Any = None
) -> int | None:
    """The stacked leading axes of a registered layer's arrays, or ``None`` if unknown.

    A layer stacked by ``eqx.filter_vmap`` or ``nnx.vmap`` keeps its registered layout
    for one layer: the axes an array has beyond the rank its registered matrix axes
    name are stacked axes, the same for every array of the layer. ``array_of`` gives
    the layer's array of a name (``None`` where it has none); ``layer``, the instance a
    registered function of the layer is asked about.
    """
    for name, _ in registration.matrix_axes:
        axes = registration.matrix_axes_of(name, layer)
        array = array_of(name)
        shape = getattr(array, "shape", None)
        if axes is not None and shape is not None:
            return max(0, len(shape) - layout_rank(axes))
    return None


def check_matrix_axes(leaf: Leaf, method: str) -> None:
    """Raises if a leaf's matrix axes name an axis its array does not have.

    Registered layouts are the user's: one written for another layout (or for a stack)
    would reach optax as axes it cannot use, and optax's own error ("reduction axes and
    output axes must be disjoint", or an index error) does not say which array or why.
    """
    axes = leaf.matrix_axes
    if axes is None:
        return
    rank = len(leaf.shape) - leaf.batch_axes
    if max(axes[0] + axes[1]) < rank:
        return
    stacked = f" past {leaf.batch_axes} stacked leading axes" if leaf.batch_axes else ""
    where = leaf.layer_type or leaf.layer
    raise ValueError(
        f"{method}: {leaf.path} has shape {leaf.shape}, but the matrix axes of "
        f"{where}.{leaf.name}, reduction {axes[0]} and output {axes[1]}, name an axis "
        f"that one layer's array of {rank} axes{stacked} does not have. Fix: register "
        f"the layout of one layer's array, with axes below {rank}: "
        f"dm.register_layer({where}, {leaf.layer!r}, matrix_axes={{{leaf.name!r}: "
        f"((...), (...))}}), or leave it out with dm.no_decay(path={leaf.path!r})."
    )


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


class RegistryCache:
    """Answers that depend on the registry, dropped whenever it changes.

    Safe while other threads build masks or register layers: :meth:`table` hands out
    the table of the registry's current generation, and a change of generation brings
    a new table rather than clearing the old one, so an answer worked out from the old
    registry lands only in a table no one reads any more.
    """

    def __init__(self) -> None:
        self._state: tuple[int, dict] = (-1, {})

    def table(self) -> dict:
        # The generation is read before any answer is worked out from the registry,
        # which moves it only after its tables are updated.
        generation = _registry.generation
        state = self._state
        if state[0] != generation:
            state = self._state = (generation, {})
        return state[1]


class ClassKinds:
    """The layer kind of a module class, as every adapter finds it.

    The registry first (subclasses of a registered class count), then the framework's
    kind table along the class's bases, then its name (``LlamaRMSNorm``). A wrapper
    (WeightNorm) is ``"wrapper"``, resolved per instance by the adapter. A kind read
    off the class name is checked per instance against what the instance owns
    (:meth:`content_layer`): the name alone never decides. A class none of these knows
    is ``("unknown", "name")``: its name is all that was read. Cached per class until
    the registry changes.
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
        self._kinds = RegistryCache()  # class -> (kind, source, registration)
        self._layers = RegistryCache()  # class -> Layer
        # (class, arrays, children) -> (Layer, Reading): only classes whose kind their
        # name says, which a registration would take out of this path.
        self._content: dict[tuple, tuple[Layer, Reading]] = {}

    def __call__(self, cls: type) -> tuple[str, str, _registry.Registration | None]:
        """(kind, how it was found, registration)."""
        kinds = self._kinds.table()
        found = kinds.get(cls)
        if found is None:
            found = kinds[cls] = self._resolve(cls)
        return found

    def layer(self, cls: type) -> Layer | None:
        """The :class:`Layer` of every instance of ``cls``; ``None`` where it depends on
        the instance (wrappers, kinds read off the class name)."""
        layers = self._layers.table()
        layer = layers.get(cls)
        if layer is None:
            kind, source, _ = self(cls)
            if kind == "wrapper" or (source == "name" and kind != "unknown"):
                return None
            layer = layers[cls] = Layer(kind, cls.__name__, cls, source)
        return layer

    def content_layer(
        self, cls: type, arrays: Arrays, children: Collection[str] = ()
    ) -> Layer:
        """The :class:`Layer` of an instance of a class whose kind its name says, checked
        against what the instance owns: ``arrays`` maps the name of every array it owns
        directly to its rank in one layer, or to its shape where the stacked and layout
        axes are unknown (:func:`~decaymask.core._infer.read_kind`); ``children`` names
        its submodules. The evidence that decided (``"name"`` or ``"content"``) is the
        layer's source.
        """
        return self.content_reading(cls, arrays, children)[0]

    def content_reading(
        self, cls: type, arrays: Arrays, children: Collection[str] = ()
    ) -> tuple[Layer, Reading]:
        """:meth:`content_layer` with the reading it came from: the stacked leading axes
        and layout axes its arrays were read with."""
        key = (cls, tuple(sorted(arrays.items())), frozenset(children))
        found = self._content.get(key)
        if found is None:
            reading = read_kind(cls.__name__, arrays, children)
            layer = Layer(reading.kind, cls.__name__, cls, reading.evidence)
            found = self._content[key] = (layer, reading)
        return found

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
        # Neither table nor registry knows the class, and its name says no kind.
        return "unknown", "name", None


def instance_layer(
    kinds: ClassKinds,
    node: Any,
    inner: Callable[[Any], Any],
    content: Callable[[Any], tuple[dict[str, Any], list[str]]],
) -> tuple[Layer, Reading | None]:
    """The :class:`Layer` of one module instance, as every adapter with classes finds it,
    and the reading of its arrays where they decided it (``None`` elsewhere).

    The class's layer where that decides (:meth:`ClassKinds.layer`); a wrapper is a
    layer of the kind of the layer ``inner`` gives (its own arrays follow that layer's
    layout, no reading of theirs); a kind read off the class name is checked against
    the ``content`` of the instance (:meth:`ClassKinds.content_reading`), which says
    too which axes of its arrays are stacked or layout axes.
    """
    cls = type(node)
    layer = kinds.layer(cls)
    if layer is not None:
        return layer, None
    kind, _, _ = kinds(cls)
    if kind == "wrapper":
        wrapped, _ = instance_layer(kinds, inner(node), inner, content)
        return Layer(wrapped.kind, cls.__name__, cls, wrapped.source), None
    arrays, children = content(node)
    return kinds.content_reading(cls, arrays, children)


MatrixAxes = tuple[tuple[int, ...], tuple[int, ...]]
"""The (reduction, output) axes of one layer's weight matrix."""

UNOWNED = Layer("unknown", None, None, "class")
"""The owner of an array no module owns."""

floating_dtypes: dict[Any, bool] = {}
"""dtype -> whether an array of it can decay at all; filled by :func:`is_floating`."""


def is_floating(array: Any) -> bool:
    """Whether the array can decay at all (as :attr:`Leaf.floating`), once per dtype."""
    from ..core._leaf import _FLOATING_PREFIXES

    dtype = array.dtype
    floating = floating_dtypes.get(dtype)
    if floating is None:
        floating = floating_dtypes[dtype] = dtype_name(array).startswith(_FLOATING_PREFIXES)
    return floating
