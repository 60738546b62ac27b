"""A module's kind, roles' owner and stacking, read from its class (traced) or names,
its arrays' ranks and its submodules' keys."""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping
from typing import Any, NamedTuple, cast

from ...core import _registry
from ...core._infer import read_kind, resolve_kind
from ...core._leaf import Layer
from ...core._names import kind_from_name, name_kind
from ...core._roles import owner_trait
from ._kinds import auto_name_kind, linen_class_kind
from ._tables import (
    ATTENTION_NAMES,
    ATTENTION_PROJECTIONS,
    CELL_GATE_SETS,
    auto_class,
    fixed_ndim,
)
from ._trace import LinenTrace


@dataclasses.dataclass
class LinenModule:
    """One module path, as far as the names or the trace tell."""

    layer: Layer
    ancestors: tuple[Layer, ...]
    # Where the modules of ancestors + (layer,) stand in a params path: the number of
    # keys naming each. Alike modules the walk reuses at another path stand at the same
    # depths there (its signatures chain the parent's, one key a level).
    depths: tuple[int, ...]
    stacked: int  # lifted scan/vmap modules at or around it, by their auto names
    registration: _registry.Registration | None = None
    cell: bool = False  # a recurrent cell: owns its linear/conv gate children
    wrapper: bool = False  # WeightNorm/SpectralNorm: owns what it keeps below it
    absorbed_by: LinenModule | None = None  # the module that owns this one's arrays
    visible: bool = True  # listed among ancestors
    trusted: bool = False  # kind from a table or the registry (class or auto name)
    key: str = ""  # its own key: an embedding named for positions holds a position table
    # Stacked leading axes its own arrays prove (a bias repeating the kernel's leading
    # axes, or a layer of fixed ranks with more axes), the same sizes on each.
    batch: int | None = None
    # (array name, axes its layout adds) where its arrays decided its kind: a bias
    # (out, 1, ..., 1) beside an (out, in, *window) weight.
    layout: tuple[tuple[str, int], ...] = ()


def owner_identity(owner: LinenModule) -> tuple:
    """What a policy can read of a leaf's owner (its layer, the modules around it and
    where they stand): alike owners decide alike."""
    # What roles read of the key: a position table, a layer scale (role_from_name).
    named = owner_trait(owner.key)
    return owner.layer, owner.ancestors, owner.depths, owner.registration, named



class _Said(NamedTuple):
    """What a module's class or auto name says before its arrays are read."""

    kind: str | None  # None: no table knows it, its arrays are read with `name`
    source: str
    type_name: str | None
    registration: _registry.Registration | None
    name: str  # the name read with the arrays where no table knows the module


def _said_by_class(cls: type, key: str, auto: str | None) -> _Said:
    kind, source, registration = linen_class_kind(cls)
    # The name read with the arrays: a traced class name that says something, else the
    # auto name's class or the key.
    name = auto or key
    said = name_kind(cls.__name__)
    if said is not None and (said != "norm" or kind_from_name(key) is None):
        # The class name's head word, unless it says only "norm" where the key says
        # which (an `HFNorm` at `input_layernorm`).
        name = cls.__name__
    return _Said(kind, source, cls.__name__, registration, name)


def _said_by_auto_name(auto: str | None, key: str) -> _Said:
    kind, source, registration = auto_name_kind(auto)
    return _Said(kind, source, auto, registration, auto or key)


def _inherited(
    parent: LinenModule | None,
) -> tuple[tuple[Layer, ...], tuple[int, ...], int, LinenModule | None]:
    """(ancestors, their depths, stacked, absorbed_by) a module takes from its parent."""
    if parent is None:
        return (), (), 0, None
    if parent.visible:
        ancestors, depths = parent.ancestors + (parent.layer,), parent.depths
    else:
        ancestors, depths = parent.ancestors, parent.depths[:-1]
    absorbed_by = parent.absorbed_by or (parent if parent.wrapper else None)
    return ancestors, depths, parent.stacked, absorbed_by


def _cell_owner(parent: LinenModule | None, kind: str) -> LinenModule | None:
    """The recurrent cell that owns a module's arrays as its gates, if any."""
    if parent is not None and parent.cell and kind in ("linear", "conv"):
        return parent
    return None


def _projection_type_name(
    said: _Said, traced: bool, kind: str, key: str, parent: LinenModule | None
) -> str | None:
    if (
        not traced
        and kind == "linear"
        and key in ATTENTION_PROJECTIONS
        and parent is not None
        and parent.layer.type_name in ATTENTION_NAMES
    ):
        # An attention layer's projections by name are its DenseGeneral children.
        return "DenseGeneral"
    return said.type_name


def _stacked_by_bias(
    name: str,
    ranks: dict[str, int],
    children: Collection[str],
    kernel: Any,
    bias: Any,
    stacked: int,
) -> tuple[int | None, str | None]:
    """(stacked axes, ambiguous kind) that a kernel and a bias of two or more axes show.

    A bias whose leading axes repeat the kernel's shows layers stacked by a user-named
    ``nn.scan``/``nn.vmap``; one equal to the kernel's last axes, a ``DenseGeneral``.
    Where both fit and the readings make different kinds, that kind is ambiguous.
    """
    k, b = kernel.shape[stacked:], bias.shape[stacked:]
    if not (len(b) >= 2 and len(k) > len(b) - 1):
        return None, None
    # Either reading makes a linear layer where the kernel is 3-D; a deeper kernel
    # under a stack reads as a stacked conv.
    general = tuple(k[-len(b) :]) == tuple(b)
    stack = tuple(k[: len(b) - 1]) == tuple(b[:-1]) and k[-1] == b[-1]
    if stack and not general:
        return len(b) - 1, None
    if stack and general:
        as_stack = resolve_kind(
            name, {n: max(0, r - len(b) + 1) for n, r in ranks.items()}, children
        )
        as_general = resolve_kind(name, ranks, children)
        if as_stack[0] != as_general[0]:
            return None, as_general[0]
    return None, None


def _stacked_by_rank(layer: Layer, key: str, direct: Mapping[str, Any]) -> int | None:
    """Stacked axes that the arrays of a layer of fixed ranks prove (:func:`fixed_ndim`).

    Each array of a fixed rank has the same number of axes more than one layer's, every
    array of the layer the same sizes on them, and the bias behind them the kernel's
    output axes: a ``Dense_0`` kernel ``(4, 3, 5)`` and bias ``(4, 5)`` are 4 stacked
    layers.
    """
    fixed = {name: fixed_ndim(layer, key, name) for name in direct}
    if not any(rank is not None for rank in fixed.values()):
        return None  # shapes unread: alike modules of any shapes share one reading
    # get: the walk notes it, and keys the module by its shapes.
    shapes = {name: tuple(cast(Any, direct.get(name)).shape) for name in direct}
    extra = {len(shapes[name]) - rank for name, rank in fixed.items() if rank is not None}
    if len(extra) != 1 or min(extra) < 1:
        return None
    (stacked,) = extra
    if len({shape[:stacked] for shape in shapes.values()}) != 1:
        return None
    kernel, bias = shapes.get("kernel"), shapes.get("bias")
    if kernel is not None and bias is not None:
        # One layer's bias is the kernel's output axes: not so where the layers are
        # stacked along another axis (variable_axes={"params": 1}).
        one = bias[stacked:]
        if not one or kernel[len(kernel) - len(one) :] != one:
            return None
    return stacked


class LinenInference:
    """A module's kind from the trace, its names and its arrays.

    Subclasses set ``fn`` (the entry point, for messages) and ``trace``.
    """

    fn: str
    trace: LinenTrace | None

    def infer_module(
        self,
        path: tuple[str, ...],
        parent: LinenModule | None,
        direct: Mapping[str, Any],
        merged: Mapping[str, Any],
        children: Collection[str],
    ) -> LinenModule:
        """The module at ``path``.

        Args:
          path: the module path.
          parent: the module at ``path[:-1]``; ``None`` at the root.
          direct: the arrays the module owns in ``params`` (in another collection where
            it owns none there), by name.
          merged: the arrays it owns in every collection, by name.
          children: the keys of its submodules that hold arrays, in any collection.

        Without a trace, the result depends on ``path`` only through the last key's
        :func:`key_traits` and its length (the module's depth, one more than the
        parent's): the walk relies on that to infer once per distinct (parent, traits,
        arrays, children), a parent standing at one depth wherever it is reused.
        """
        key = path[-1] if path else ""
        ancestors, depths, stacked, absorbed_by = _inherited(parent)
        auto, stacked_here = auto_class(key)
        stacked += stacked_here
        cls = self.trace.classes.get(path) if self.trace is not None else None
        if cls is None and self._nested_in_layer(parent):
            # Not a module: arrays nested inside a known layer's own variable.
            parent = cast(LinenModule, parent)
            # Its depths stay the parent's: the parent (or what absorbs it) owns these.
            return dataclasses.replace(parent, absorbed_by=absorbed_by or parent, visible=False)
        said = _said_by_class(cls, key, auto) if cls is not None else _said_by_auto_name(auto, key)
        kind, source, batch, layout = self._settled_kind(
            said, path, parent, direct, merged, children, stacked, cls is not None
        )
        type_name = _projection_type_name(said, cls is not None, kind, key, parent)
        trusted = said.kind is not None
        layer = Layer(kind, type_name, cls, source)
        if batch is None and self.trace is None and path:
            batch = _stacked_by_rank(layer, key, direct)
        return LinenModule(
            layer=layer,
            ancestors=ancestors,
            depths=depths + (len(path),),
            stacked=stacked,
            registration=said.registration,
            cell=kind == "recurrent" and (trusted or frozenset(children) in CELL_GATE_SETS),
            wrapper=said.kind == "wrapper",
            absorbed_by=absorbed_by if absorbed_by is not None else _cell_owner(parent, kind),
            # Without a trace the root is anonymous: nothing to match it by.
            visible=bool(path) or self.trace is not None,
            trusted=trusted,
            key=key,
            batch=batch,
            layout=layout,
        )

    def _nested_in_layer(self, parent: LinenModule | None) -> bool:
        """Whether an untraced path is arrays nested in a traced layer's own variable."""
        return (
            self.trace is not None
            and parent is not None
            and parent.trusted
            and parent.layer.kind != "unknown"
        )

    def _settled_kind(
        self,
        said: _Said,
        path: tuple[str, ...],
        parent: LinenModule | None,
        direct: Mapping[str, Any],
        merged: Mapping[str, Any],
        children: Collection[str],
        stacked: int,
        traced: bool,
    ) -> tuple[str, str, int | None, tuple[tuple[str, int], ...]]:
        """(kind, source, stacked axes the arrays prove, layout axes the arrays show):
        what the tables said, the wrapped layer's kind for a wrapper, else what the
        names and arrays say."""
        if said.kind == "wrapper":
            return (*self._wrapped_kind(path, said.source, merged, children), None, ())
        if said.kind is not None:
            return said.kind, said.source, None, ()
        kind, source, batch, layout = self._read_kind(
            path, said.name, parent, direct, children, stacked
        )
        # Unknown, the evidence says what was read: the name alone (no arrays of its
        # own) or arrays that fit no kind, as in every adapter.
        return kind, source, batch, layout

    def _read_kind(
        self,
        path: tuple[str, ...],
        name: str,
        parent: LinenModule | None,
        direct: Mapping[str, Any],
        children: Collection[str],
        stacked: int,
    ) -> tuple[str, str, int | None, tuple[tuple[str, int], ...]]:
        """(kind, evidence, stacked axes the arrays prove, layout axes they show) of a
        module no table knows.

        Names and content are read together (:func:`resolve_kind`), with what only
        Linen shows: the rank each array has in one layer (from the trace, or past the
        axes a ``Scan``/``Vmap`` auto name stacks), a bias whose leading axes repeat
        the kernel's (layers stacked by a user-named ``nn.scan``/``nn.vmap``) or whose
        shape is the kernel's last axes (a ``DenseGeneral``), and the projections of an
        attention layer.
        """
        key = path[-1] if path else ""
        if (
            key in ATTENTION_PROJECTIONS
            and parent is not None
            and parent.layer.kind == "attention"
            and ("kernel" in direct or "weight" in direct)
        ):
            # An attention layer's query/key/value/out are its projections, however
            # many axes their DenseGeneral kernels have.
            return "linear", "name", None, ()
        shapes = self._shapes(path, direct, stacked)
        ranks = {n: len(shape) for n, shape in shapes.items()}
        batch = None
        kernel, bias = direct.get("kernel"), direct.get("bias")
        if self.trace is None and kernel is not None and bias is not None:
            batch, ambiguous = _stacked_by_bias(name, ranks, children, kernel, bias, stacked)
            if ambiguous is not None:
                return ambiguous, "ambiguous", None, ()
            if batch is not None:
                shapes = {n: shape[min(batch, len(shape)):] for n, shape in shapes.items()}
        # Where neither the trace nor the arrays proved the stacked axes, those the
        # arrays share and the name needs removed are stacked (a user-named nn.scan).
        one_layer = self.trace is not None or batch is not None or stacked > 0
        reading = read_kind(name, shapes, children, one_layer=one_layer)
        if reading.stacked:
            batch = reading.stacked
        if batch is not None:
            batch += stacked  # with the axes an auto name stacks: all of them
        return reading.kind, reading.evidence, batch, reading.layout

    def _shapes(
        self, path: tuple[str, ...], direct: Mapping[str, Any], stacked: int
    ) -> dict[str, tuple[int, ...]]:
        """The shape of each array a module owns in one layer, as far as is known: its
        trailing axes of the rank the trace saw, or past the axes a ``Scan``/``Vmap``
        auto name stacks."""
        shapes = {}
        ndims = self.trace.ndims if self.trace is not None else None
        for name in direct:
            # get: the walk notes it, and keys the module by its shapes.
            shape = tuple(cast(Any, direct.get(name)).shape)
            inner = None
            if ndims is not None:
                for collection in self.trace.collections:  # type: ignore[union-attr]
                    inner = ndims.get((collection, path + (name,)))
                    if inner is not None:
                        break
            shapes[name] = shape[max(0, len(shape) - inner):] if inner is not None else shape[stacked:]
        return shapes

    def _wrapped_kind(
        self,
        path: tuple[str, ...],
        source: str,
        merged: Mapping[str, Any],
        children: Collection[str],
    ) -> tuple[str, str]:
        """The kind of the layer a WeightNorm or SpectralNorm at ``path`` wraps."""
        if self.trace is not None:
            inner = self.trace.wrapped.get(path)
            if inner is not None:
                kind, inner_source, _ = linen_class_kind(inner)
                if kind not in (None, "norm", "wrapper"):
                    return kind, inner_source
            return "unknown", source
        # WeightNorm keeps `Dense_0/kernel/scale`: one key naming the wrapped layer.
        inside = set(children)
        inside.update(k.split("/", 1)[0] for k in merged if "/" in k)
        if len(inside) == 1:
            (child,) = inside
            auto, _ = auto_class(child)
            kind = auto_name_kind(auto)[0]
            if kind in (None, "wrapper"):
                kind = kind_from_name(child)
            if kind is not None:
                return kind, source
        return "unknown", source

