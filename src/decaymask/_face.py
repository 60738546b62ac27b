"""``decaymask.Policy``: the core's policy with the entry points that read framework trees.

Each entry point finds its adapter through :mod:`decaymask.adapters`' registry, walks
the tree into leaves, has the core decide them, and has the adapter put one value per
leaf back. The generic methods take any framework's tree; the ``for_<framework>``
methods are the same with the framework named.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeVar, overload

from . import _output_cache, adapters
from ._output_cache import _built as _built
from ._face_groups import GroupsFace
from ._needs import needs
from .adapters._structure import flattened
from .core._policy import Policy as _CorePolicy
from .core._collector import collector_paused
from .core._report import Report
from .core._table import LeafTable
from .core._text import VISIBLE_ERRORS, visible_errors
from .core._warnings import warn_again

if TYPE_CHECKING:
    from flax import nnx

T = TypeVar("T")
"""Any tree: an output has the type of its input (its containers, or its module classes)."""
M = TypeVar("M", bound=Mapping[Any, Any])
"""A params mapping (dict, ``FrozenDict``, ``nnx.State``): an output has its type."""

adapters.FACES.update(("equinox", "flax", "haiku"))

def _per_layer_arrays(values: list[Any], leaves: Any) -> list[Any]:
    """A stacked leaf's multipliers (one per layer) as an array that broadcasts against
    the leaf: shape ``(n, 1, ..., 1)``."""
    if not any(type(v) is tuple for v in values):
        return values
    import numpy as np

    out = list(values)
    for i, v in enumerate(values):
        if type(v) is tuple:
            ndim = len(leaves[i].shape)
            out[i] = np.asarray(v, dtype=np.float32).reshape((len(v),) + (1,) * (ndim - 1))
    return out


class Policy(GroupsFace, _CorePolicy):
    """An ordered set of rules; the last rule that matches a leaf decides it.

    Every output (mask, labels, rates, multipliers, Muon dims) has the type of the tree
    it is built from, with its own values at the leaves; an ``nnx.Module``'s is an
    ``nnx.State``.
    """

    __slots__ = ()

    @visible_errors
    def _build(self, value: str, tree: Any, framework: str | None, method: str, options: dict[str, Any]) -> Any:
        if value == "muon":
            needs(method, "optax")  # its MuonDimensionNumbers
        adapter = adapters.choose(tree, framework, method, options)
        # A build allocates a few containers per leaf and frees them all before the
        # collector is back on (the one cycle, a walk and its table, is broken below):
        # collections triggered meanwhile would scan every object of the process (the
        # model included) for nothing. Measured at 20,000 Equinox leaves: a third of the
        # time went to the collector.
        with collector_paused(), flattened(tree):
            key = signature = None
            if not self._asks:
                # A when= callable may read anything: only policies without one are cached.
                # The signature's flatten is kept for the walk of this build.
                signature = adapter.signature(tree, options)
                if signature is not None:
                    key = _output_cache.key_of(self, value, method, adapter, signature)
                    built = _output_cache.lookup(key)
                    if built is _output_cache.UNCACHED:
                        key = None
                    elif built is not None:
                        out, messages = built
                        warn_again(messages)
                        return out
            found, rebuild = adapter.walk(tree, method=method, **options)
            values, messages = self.values(
                found,
                "decisions" if value == "muon" else value,
                method=method,
                non_floating_fix=adapter.non_floating_fix,
                partial_view=lambda: adapter.is_partial(tree),
            )
            if value == "lr_scales":
                values = _per_layer_arrays(values, found)
            if isinstance(found, LeafTable):
                # Freed now, while the collector is paused, rather than traced by it.
                found.release()
            del found
            if value == "muon":
                values = adapter.muon_dims(values, method)
            elif value == "trainable" and isinstance(rebuild, adapters.TreedefRebuild):
                # A filter spec (eqx.partition's) holds a bool at every leaf: what is
                # not an array is not trained.
                rebuild = rebuild.filled(False)
            out = rebuild(values)
            if key is not None:
                _output_cache.remember(key, out, values, rebuild, messages)
            return out

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Refused: a Policy is not a mask.

        optax takes a callable for ``mask=``, ``param_labels=`` and
        ``muon_weight_dimension_numbers=`` and calls it with the params, and each of
        those asks for another tree (bools, labels, dimension numbers); as a tree a
        Policy would be one leaf, read as ``True`` for every parameter. Pass the method
        that builds the tree asked for.

        Raises:
          TypeError: always; the message names the methods to pass.
        """
        raise TypeError(
            "a decaymask Policy was called as a function (optax calls what it is given "
            "for mask=, param_labels= and muon_weight_dimension_numbers= with the params), "
            "but a Policy is not one tree: pass the method that builds the tree asked "
            "for: mask=policy.mask, param_labels=policy.labels, "
            "muon_weight_dimension_numbers=policy.muon_dims (or their for_equinox, "
            "for_flax and for_haiku forms), rates=policy.rates."
        )

    # The generic entry points.

    @overload
    def mask(self, tree: nnx.Module, *, framework: str | None = None, **options: Any) -> nnx.State[Any, Any]: ...
    @overload
    def mask(self, tree: T, *, framework: str | None = None, **options: Any) -> T: ...
    def mask(self, tree: Any, *, framework: str | None = None, **options: Any) -> Any:
        """The optax mask for ``tree``, of any framework decaymask has an adapter for.

        Args:
          tree: an Equinox model or params, Linen params or variables, an NNX module or
            State, Haiku params...
          framework: the adapter's name (``"equinox"``, ``"linen"``, ``"nnx"``,
            ``"haiku"``) or face (``"flax"``), where more than one could read ``tree``.
          **options: the adapter's options, as the ``for_<framework>`` method takes them.

        Raises:
          ValueError: several adapters could read ``tree``; the message names them.
          TypeError: no adapter reads ``tree``, or it belongs to another framework than
            ``framework``; the message names the entry point to use.
        """
        return self._build("mask", tree, framework, "mask", options)

    @overload
    def labels(self, tree: nnx.Module, *, framework: str | None = None, **options: Any) -> nnx.State[Any, Any]: ...
    @overload
    def labels(self, tree: T, *, framework: str | None = None, **options: Any) -> T: ...
    def labels(self, tree: Any, *, framework: str | None = None, **options: Any) -> Any:
        """A label per parameter for ``optax.partition``, as :meth:`mask` finds the
        framework; see :meth:`labels_for_equinox`."""
        return self._build("labels", tree, framework, "labels", options)

    @overload
    def rates(self, tree: nnx.Module, *, framework: str | None = None, **options: Any) -> nnx.State[Any, Any]: ...
    @overload
    def rates(self, tree: T, *, framework: str | None = None, **options: Any) -> T: ...
    def rates(self, tree: Any, *, framework: str | None = None, **options: Any) -> Any:
        """The weight-decay multiplier of every parameter, as :meth:`mask` finds the
        framework; see :meth:`rates_for_equinox`."""
        return self._build("rates", tree, framework, "rates", options)

    @overload
    def lr_scales(self, tree: nnx.Module, *, framework: str | None = None, **options: Any) -> nnx.State[Any, Any]: ...
    @overload
    def lr_scales(self, tree: T, *, framework: str | None = None, **options: Any) -> T: ...
    def lr_scales(self, tree: Any, *, framework: str | None = None, **options: Any) -> Any:
        """The learning-rate multiplier of every parameter, in :meth:`mask`'s structure.

        A leaf's multiplier is its :func:`layer_decay` factor times the multiplier of
        the last :func:`lr` rule that matches it (1 where none does), and 0 where it is
        frozen or not a floating-point parameter. A leaf stacked along a layer axis
        (``nn.scan``, ``nnx.vmap``, ``hk.layer_stack``, an ``eqx.filter_vmap`` stack)
        gets a float32 array of shape ``(n, 1, ..., 1)``: each layer's multiplier, the
        values the same model unrolled gets. :meth:`wrap` applies them.

        Raises:
          ValueError: the layer-decay blocks cannot be found uniquely, or ``blocks=``
            selects nothing; the message names the candidates and the fix.
        """
        return self._build("lr_scales", tree, framework, "lr_scales", options)

    @overload
    def trainable(self, tree: nnx.Module, *, framework: str | None = None, **options: Any) -> nnx.State[Any, Any]: ...
    @overload
    def trainable(self, tree: T, *, framework: str | None = None, **options: Any) -> T: ...
    def trainable(self, tree: Any, *, framework: str | None = None, **options: Any) -> Any:
        """``True`` at every parameter the optimizer trains, in :meth:`mask`'s structure.

        ``False`` where a :func:`freeze` rule (not undone by :func:`unfreeze`) matches,
        and at state and arrays that are not floating point. For Equinox it is a
        ``filter_spec``: ``eqx.partition(model, policy.trainable(model))`` splits the
        model so that frozen leaves get no gradient; where the mask has ``None`` (a
        leaf that is not an array: an activation function, an int) it has ``False``. For NNX see
        :meth:`trainable_filter`, for Linen and Haiku params :meth:`split`.
        """
        return self._build("trainable", tree, framework, "trainable", options)

    @overload
    def muon_dims(self, tree: nnx.Module, *, framework: str | None = None, **options: Any) -> nnx.State[Any, Any]: ...
    @overload
    def muon_dims(self, tree: T, *, framework: str | None = None, **options: Any) -> T: ...
    def muon_dims(self, tree: Any, *, framework: str | None = None, **options: Any) -> Any:
        """Muon dimension numbers in the framework's layouts, as :meth:`mask` finds the
        framework; see :meth:`muon_dims_for_equinox`."""
        return self._build("muon", tree, framework, "muon_dims", options)

    def explain(
        self, tree: Any, *, framework: str | None = None, show_dims: bool = False, **options: Any
    ) -> Report:
        """A :class:`Report` of every decision on ``tree``, one row per array leaf.

        Takes the same arguments as the ``for_*`` method that fits ``tree``, and
        ``framework=`` as :meth:`mask` does. ``show_dims=True`` adds the Muon reduction
        and output axes of each decayed leaf.

        Example:
          >>> import decaymask as dm, equinox as eqx, jax
          >>> model = eqx.nn.Linear(3, 2, key=jax.random.key(0))
          >>> report = dm.Policy(dm.decay(param="weight")).explain(model)
          >>> [(row.path, row.decay) for row in report]
          [('weight', True), ('bias', False)]
        """
        with VISIBLE_ERRORS:
            adapter = adapters.choose(tree, framework, "explain", options)
            leaves, _ = adapter.walk(tree, method="explain", **options)
            return self.report_on(
                leaves, non_floating_fix=adapter.non_floating_fix, show_dims=show_dims
            )

    # Equinox.

    def for_equinox(self, tree: T) -> T:
        """The optax mask for an Equinox model or any pytree holding Equinox modules.

        Bools at every array leaf (jax and numpy arrays, ``jax.ShapeDtypeStruct``),
        ``None`` elsewhere, in the structure of ``eqx.filter(tree, eqx.is_array)``. Works
        on the model, on its filtered params, on an abstract model from
        ``eqx.filter_eval_shape``, and as a callable mask (``mask=policy.for_equinox``).

        Example:
          >>> import decaymask as dm, equinox as eqx, jax
          >>> model = eqx.nn.Linear(3, 2, key=jax.random.key(0))
          >>> mask = dm.Policy(dm.decay(param="weight")).for_equinox(model)
          >>> mask.weight, mask.bias
          (True, False)
        """
        return self._build("mask", tree, "equinox", "for_equinox", {})

    def labels_for_equinox(self, tree: T) -> T:
        """A label per array leaf for ``optax.partition``, in :meth:`for_equinox`'s structure.

        The label of a leaf is the label of the last rule that matches it: rules made
        with ``label=`` or :func:`label` give theirs, other decay rules ``"decay"``,
        other no-decay rules ``"no_decay"``; the default gives one of those two.
        Pass the method itself (``param_labels=policy.labels_for_equinox``): an
        Equinox-shaped label tree is callable, and optax would call it.
        """
        return self._build("labels", tree, "equinox", "labels_for_equinox", {})

    def rates_for_equinox(self, tree: T) -> T:
        """The weight-decay multiplier of every array leaf: the deciding rule's ``rate``
        where it decays, ``0.0`` where it does not; for :func:`add_decayed_weights`."""
        return self._build("rates", tree, "equinox", "rates_for_equinox", {})

    def muon_dims_for_equinox(self, tree: T) -> T:
        """Muon dimension numbers in Equinox's layouts where the policy decides True.

        An ``optax.contrib.MuonDimensionNumbers`` at every leaf the policy selects (its
        reduction and output axes in Equinox's ``(out, in, ...)`` layouts, stacked
        leading axes left as batch axes), ``None`` everywhere else, so those leaves go
        to Adam. Pass the method itself: ``muon_weight_dimension_numbers=
        policy.muon_dims_for_equinox``.

        Raises:
          ValueError: a selected leaf whose layout is unknown; the message names it.
        """
        return self._build("muon", tree, "equinox", "muon_dims_for_equinox", {})

    # Flax: Linen and NNX.

    @overload
    def for_flax(self, tree: nnx.Module, **kwargs: Any) -> nnx.State[Any, Any]: ...
    @overload
    def for_flax(self, tree: M, **kwargs: Any) -> M: ...
    def for_flax(self, tree: Any, **kwargs: Any) -> Any:
        """The optax mask for Flax, with the container types of its input.

        Args:
          tree: a Linen params or variables mapping (``dict`` or ``FrozenDict``), an
            ``nnx.Module``, or an ``nnx.State``.
          **kwargs: Linen: ``module=``, ``args=``, ``kwargs=`` to recover the exact layer
            classes by an abstract trace of ``module.init``, or ``recorded=seen`` to
            read them from the init run inside ``with dm.record() as seen:`` (no
            second init; see :func:`decaymask.record`). NNX: ``wrt=`` (default
            ``nnx.Param``), the filter of the params the optimizer updates.

        Returns:
          Linen: a mapping of the input's container types with a bool at every param
          (``False`` throughout non-``params`` collections). NNX: an ``nnx.State`` of
          plain bools with the structure of ``nnx.state(model, wrt)``.
        """
        return self._build("mask", tree, "flax", "for_flax", kwargs)

    @overload
    def labels_for_flax(self, tree: nnx.Module, **kwargs: Any) -> nnx.State[Any, Any]: ...
    @overload
    def labels_for_flax(self, tree: M, **kwargs: Any) -> M: ...
    def labels_for_flax(self, tree: Any, **kwargs: Any) -> Any:
        """A label per param for ``optax.partition``, in :meth:`for_flax`'s structure."""
        return self._build("labels", tree, "flax", "labels_for_flax", kwargs)

    @overload
    def rates_for_flax(self, tree: nnx.Module, **kwargs: Any) -> nnx.State[Any, Any]: ...
    @overload
    def rates_for_flax(self, tree: M, **kwargs: Any) -> M: ...
    def rates_for_flax(self, tree: Any, **kwargs: Any) -> Any:
        """:meth:`rates_for_equinox` for Flax inputs, in :meth:`for_flax`'s structure."""
        return self._build("rates", tree, "flax", "rates_for_flax", kwargs)

    @overload
    def muon_dims_for_flax(self, tree: nnx.Module, **kwargs: Any) -> nnx.State[Any, Any]: ...
    @overload
    def muon_dims_for_flax(self, tree: M, **kwargs: Any) -> M: ...
    def muon_dims_for_flax(self, tree: Any, **kwargs: Any) -> Any:
        """:meth:`muon_dims_for_equinox` in Flax's ``(in, out)`` layouts and containers."""
        return self._build("muon", tree, "flax", "muon_dims_for_flax", kwargs)

    # Haiku.

    def for_haiku(self, params: M, **kwargs: Any) -> M:
        """The optax mask for Haiku params (``module/~/path -> {name: array}``), in the
        same dicts.

        Args:
          params: the params of ``hk.transform(f).init(...)``. Haiku state is never
            decayed; pass the params alone.
          **kwargs: ``fn=`` (the transformed function, or the function it wraps) and
            ``args=``/``kwargs=`` (example inputs) recover the exact module classes by
            an abstract trace of ``init``.
        """
        return self._build("mask", params, "haiku", "for_haiku", kwargs)

    def labels_for_haiku(self, params: M, **kwargs: Any) -> M:
        """A label per param for ``optax.partition``, in :meth:`for_haiku`'s structure."""
        return self._build("labels", params, "haiku", "labels_for_haiku", kwargs)

    def rates_for_haiku(self, params: M, **kwargs: Any) -> M:
        """:meth:`rates_for_equinox` for Haiku params, in :meth:`for_haiku`'s structure."""
        return self._build("rates", params, "haiku", "rates_for_haiku", kwargs)

    def muon_dims_for_haiku(self, params: M, **kwargs: Any) -> M:
        """:meth:`muon_dims_for_equinox` in Haiku's layouts (``Linear`` ``w`` is
        ``(in, out)``, ``ConvND`` ``w`` is ``(*kernel, in, out)``)."""
        return self._build("muon", params, "haiku", "muon_dims_for_haiku", kwargs)
