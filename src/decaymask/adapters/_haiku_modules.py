"""The Haiku adapter's modules: what each module path of a params dict is, read once per
distinct reading, and the stacked axes of every param.

A module is read from its name (a registered class as Haiku spells it, Haiku's own
module names, else the shared inference), its class where a trace saw it, the ranks of
the arrays it owns and, where it owns none, its submodules' names. Haiku's names are
checked against the arrays like any other name (:func:`decaymask.core._infer.resolve_kind`):
a ``Conv2D`` named ``embed`` holds a 4-D ``w`` and is a convolution. Modules alike in all
that the reading reads (the same parent reading, the same traits of their own name,
class, arrays and submodules) share one reading: the blocks of a deep model are read
once.
"""

from __future__ import annotations

import bisect
import functools
import operator
from collections.abc import Mapping, Sequence
from typing import Any

from ..core import _registry
from ..core._infer import content_kind, layout_axes, resolve_kind
from ..core._leaf import Layer
from ._haiku_segments import _CELLS, BUILTIN, DENSE, Segment, segment, snake
from ._haiku_stacks import ONE_LAYER_NDIM, lifted, module_path, proof_of, stacked_by_bias
from ._haiku_trace import LIFT, HaikuTrace
from ._stacks import Proof, agrees, lifted_at


class Module:
    """One module reading, as far as its name, its arrays or the trace tell; shared by
    the modules of a params dict alike in all it reads."""

    __slots__ = ("ancestors", "cell", "depths", "hidden", "layer", "layout", "owned_by",
                 "proof", "registration", "token", "trusted")

    def __init__(self, layer: Layer, ancestors: tuple[Layer, ...], builtin: str | None = None,
                 registration: _registry.Registration | None = None):
        # builtin: the Haiku class it is (or derives from), by the trace or its exact name
        self.layer, self.ancestors, self.registration = layer, ancestors, registration
        self.trusted = builtin is not None
        self.layout = BUILTIN[snake(builtin)][2] if builtin is not None else None
        self.cell = builtin in _CELLS
        self.owned_by: Module | None = None  # a cell owns its gates' arrays
        self.hidden = False  # a stack: not among the ancestors
        # Where the modules of ancestors + (this one,) stand in a path: the number of its
        # keys, ``~`` counted, up to each module's own name. Set by ``read``.
        self.depths: tuple[int, ...] = ()
        self.token = -1  # the reading's number in its walk
        self.proof: Proof | None = None  # by names, the stack its params prove

    @property
    def owner(self) -> Module:
        return self.owned_by if self.owned_by is not None else self


def module_id(segments: Sequence[str]) -> tuple[str, ...]:
    """A module path's segments without a trailing ``~``."""
    return tuple(segments[:-1]) if segments and segments[-1] == "~" else tuple(segments)


_NO_STACK = (0, False)
_shape_of = operator.attrgetter("shape")


class _Paths(dict[str, tuple[str, ...]]):
    """Each key's path segments, split when first asked: a walk that takes whole blocks
    from earlier ones reads few of them."""

    def __missing__(self, key: str) -> tuple[str, ...]:
        found = self[key] = tuple(key.split("/"))
        return found


class _Said(Segment):
    """A :class:`Segment` hashed and compared by identity: one per distinct value in a walk."""

    __slots__ = ()
    __hash__ = object.__hash__

    def __eq__(self, other: object) -> bool:
        return self is other

    def __ne__(self, other: object) -> bool:
        return self is not other


class Modules:
    """The module of every path of a params dict, and the stacked axes of every param.

    Stacked axes come from the trace, else from names: one per default-named
    ``hk.layer_stack`` segment, those a module's own params prove (:meth:`proof`), and
    those of the lifted module around it (``lifted``, set by :meth:`find_lifted`) where
    the param agrees. Kinds are read before the lifted modules are known (the ranks
    they see count the axes that default names and a module's own params show), as
    they are read from Linen params.
    """

    def __init__(self, tree: Mapping[str, Any], trace: HaikuTrace | None):
        self.tree, self.trace = tree, trace
        self.lifted: dict[tuple[str, ...], Proof] = {}
        self.paths = _Paths()
        self.order = sorted(tree)  # the keys below a module are a range of it
        self._children: dict[tuple[str, ...], frozenset[str]] = {}
        self.segments: dict[str, Segment] = {}  # this walk's, without the registry check
        self.distinct: dict[Segment, Segment] = {}
        self._said: dict[int, tuple[Segment, Segment]] = {}  # id -> (Segment, its _Said)
        # Per key: its default-named stacks, and whether it names nothing else.
        self.stacks: dict[str, tuple[int, bool]] = {}
        for key in tree:
            if "__layer_stack_" in key:
                stacks = [self.segment(s).stack for s in module_id(self.paths[key])]
                self.stacks[key] = (sum(stacks), all(stacks))
        self.modules: dict[tuple[str, ...], Module] = {}
        self.readings: dict[tuple, Module] = {}
        self.proved = False  # by names, some module's params prove a stack

    def segment(self, name: str) -> Segment:
        """:func:`segment`, one Segment object for equal ones (hashed by identity, fast)."""
        found = self.segments.get(name)
        if found is None:
            value = segment(name)
            known = self._said.get(id(value))  # the numbered names of one base share one
            if known is not None and known[0] is value:
                found = known[1]
            else:
                found = self.distinct.setdefault(value, _Said(*value))
                self._said[id(value)] = (value, found)
            self.segments[name] = found
        return found

    def children(self, mid: tuple[str, ...]) -> frozenset[str]:
        """The names of the modules right below ``mid`` (through a ``~``): keys that
        start with its path are one range of the sorted keys, and each child's own
        keys below it one range of that, skipped at once."""
        found = self._children.get(mid)
        if found is not None:
            return found
        order, paths, depth = self.order, self.paths, len(mid)
        prefix = "/".join(mid) + "/"
        i = bisect.bisect_left(order, prefix)
        end = bisect.bisect_left(order, prefix[:-1] + "0", i)  # "0" sorts right after "/"
        names: set[str] = set()
        while i < end:
            segments = paths[order[i]]
            at = depth + 1 if segments[depth] == "~" else depth
            if at >= len(segments):  # the params of a constructor's modules' root (`a/~`)
                i += 1
                continue
            # Below a path that ends in `~` (`a/~`, the parent of `a/~/~/x`), a child
            # stands past a further `~`: `a/~/query` is a child of `a`.
            if segments[at] != "~" and (at > depth or mid[-1] != "~"):
                names.add(segments[at])
            if at + 1 < len(segments):  # past every key below that child at once
                i = bisect.bisect_left(order, "/".join(segments[: at + 1]) + "0", i + 1, end)
            else:
                i += 1
        found = self._children[mid] = frozenset(names)
        return found

    def of(self, mid: tuple[str, ...], key: str | None = None) -> Module:
        """The module of path segments ``mid`` (no trailing ``~``), whose params (if any)
        are at ``key``."""
        modules = self.modules
        found = modules.get(mid)
        if found is not None:
            return found
        up = mid[:-2] if len(mid) > 1 and mid[-2] == "~" else mid[:-1]
        parent = (modules.get(up) or self.of(up)) if up else None
        if key is None:
            key = "/".join(mid)
        direct = self.tree.get(key)
        trace = self.trace
        names: tuple = ()
        shapes: tuple = ()
        stacked: Any = 0
        if direct:
            names = tuple(direct)
            try:
                shapes = tuple(map(_shape_of, direct.values()))
            except AttributeError:  # optax.MaskedNode for other branches' arrays
                names = tuple(n for n, v in direct.items() if hasattr(v, "shape"))
                shapes = tuple(direct[n].shape for n in names)
            b = direct.get("b")
            if b is None or len(getattr(b, "shape", ())) < 2:
                stacks = self.stacks  # as names_batch finds
                stacked = stacks[key][0] if stacks and key in stacks else 0
            else:
                stacked = self.names_batch(key, direct)
            if trace is not None:
                stacked = tuple(self.traced_or(key, n, shape, stacked)
                                for n, shape in zip(names, shapes))
        cls = trace.classes.get(key) if trace is not None else None
        name = mid[len(mid) - 1]  # not mid[-1]: pyright takes mid for ()
        own = self.segments.get(name) or self.segment(name)
        children = None if names else self.children(mid)
        signature = (parent.token if parent is not None else -1, len(mid) - len(up),
                     own, cls, names, shapes, stacked, children)
        found = self.readings.get(signature)
        if found is None:
            arrays = tuple((n, shape, min(len(shape), stacked) if type(stacked) is int
                            else stacked[i]) for i, (n, shape) in enumerate(zip(names, shapes)))
            found = read(mid, own, cls, arrays, children or (), parent)
            found.token = len(self.readings)
            if trace is None:  # alike for every module of the reading
                found.proof = proof_of(own.linear, found, direct or {})
                self.proved = self.proved or found.proof is not None
            self.readings[signature] = found
        modules[mid] = found
        return found

    def names_batch(self, key: str, direct: Mapping[str, Any]) -> int:
        """The stacked axes names and shapes show before a module is read: its
        default-named stacks, and those a ``w`` and ``b`` repeating its leading axes show."""
        b = direct.get("b")
        by_bias = None
        if b is not None and len(getattr(b, "shape", ())) >= 2:
            by_bias = stacked_by_bias(self.segment(self.paths[key][-1]).linear, direct)
        return max(self.stacks.get(key, _NO_STACK)[0], by_bias or 0)

    def traced_or(self, key: str, name: str, shape: tuple[int, ...], stacked: int) -> int:
        """The stacked axes of a param the trace saw, else ``stacked``, at most its rank."""
        rank = self.trace.ranks.get(f"{key}/{name}") if self.trace is not None else None
        if rank is not None:
            return max(0, len(shape) - rank)
        return min(len(shape), stacked)

    def batch_of(self, key: str, name: str, shape: tuple[int, ...]) -> int:
        """The stacked leading axes of the param ``name`` of the module at ``key``."""
        rank = self.trace.ranks.get(f"{key}/{name}") if self.trace is not None else None
        if rank is not None:
            return max(0, len(shape) - rank)
        segments = self.paths[key]
        batch = self.stacks.get(key, _NO_STACK)[0]
        own = self.proof(key)
        batch = max(batch, own[0] if own is not None else 0)
        found = lifted_at(self.lifted, module_path(segments)) if self.lifted else None
        if found is not None and agrees(shape, self.one_layer_ndim(key, name), found,
                                        own and (own[0], tuple(shape[: own[0]]))):
            batch = max(batch, found[0])
        return min(len(shape), batch)

    def proof(self, key: str) -> Proof | None:
        """The stack the params of the module at ``key`` prove by names, if any."""
        module = self.module_at(key)
        return module.proof if module is not None else None

    def find_lifted(self) -> None:
        """By names, the modules that user-named stacks lift, where some params prove one
        (once every module is read: what they lift does not change a reading)."""
        if self.proved:
            self.lifted = lifted(self)

    def one_layer_ndim(self, key: str, name: str) -> int | None:
        """The rank the param ``name`` has in one layer of the module at ``key``, where
        its kind fixes it."""
        module = self.module_at(key)
        return ONE_LAYER_NDIM.get(module.layer.kind, {}).get(name) if module else None

    def module_at(self, key: str) -> Module | None:
        """The module that holds the params at ``key`` (none for the root's, ``~``)."""
        mid = module_id(self.paths[key])
        return self.of(mid) if mid else None


def read(mid: tuple[str, ...], own: Segment, cls: type | None, found: tuple, children: Any,
         parent: Module | None) -> Module:
    """The module of path segments ``mid``, of class ``cls`` where a trace saw it, owning
    ``found``: (name, shape, stacked axes) of each array."""
    # One layer's ranks, a conv bias (out, 1, ..., 1) over channels-first data a vector.
    extra = layout_axes({name: tuple(shape[stacked:]) for name, shape, stacked in found})
    arrays = {name: len(shape) - stacked - extra.get(name, 0) for name, shape, stacked in found}
    ancestors = () if parent is None else \
        parent.ancestors if parent.hidden else (*parent.ancestors, parent.layer)
    # Aligned with ancestors + (the module,): a hidden parent's own depth is dropped as it is.
    above = () if parent is None else parent.depths[:-1] if parent.hidden else parent.depths
    depths = (*above, len(mid))
    if own.stack or (cls is not None and cls.__module__.startswith(LIFT)):
        # A stack (or lift) is looked through: its layers are the modules below it.
        module = Module(Layer("unknown", None, cls, "class" if cls else "name"), ancestors)
        module.hidden = True
        module.depths = depths
        return module
    if cls is not None:
        kinds = _class_kinds()
        kind, source, registration = kinds(cls)
        base = next((b for b in cls.__mro__ if b in kinds.table), None)
        if source == "name" or (kind == "unknown" and not issubclass(cls, kinds.containers)):
            layer = kinds.content_layer(cls, arrays, children)  # never worse than names
        else:
            layer = Layer(kind, cls.__name__, cls, source)
        builtin = base.__name__ if base is not None and registration is None else None
        module = Module(layer, ancestors, builtin, registration)
    elif own.registration is not None:
        module = Module(Layer(own.registration.kind, None, None, "registered"), ancestors, None,
                        own.registration)
    elif own.builtin is not None:
        module = _named(own.builtin[0], mid[-1], found, children, ancestors)
    elif parent is not None and parent.trusted and parent.layer.kind == "attention":
        # MultiHeadAttention's query, key, value and output are Linears.
        module = _named("Linear", "linear", found, children, ancestors)
    else:
        kind, source = resolve_kind(mid[-1], arrays, children)
        module = Module(Layer(kind, None, None, source), ancestors)
    if parent is not None and parent.cell and module.layer.kind == "linear":
        module.owned_by = parent
        module.layout = DENSE if module.trusted else None
    module.depths = depths
    return module


def _named(class_name: str, name: str, found: tuple, children: Any,
           ancestors: tuple[Layer, ...]) -> Module:
    """A module that Haiku's name for ``class_name`` names, as its arrays allow: where
    they say another kind (a ``Conv2D`` named ``embed``, its ``w`` 4-D), they decide, and
    the class (and its layout) is not taken. Arrays that all share leading sizes and,
    those axes removed, are positively the class's (a ``Linear`` with no bias in a
    user-named ``hk.layer_stack``) do not contradict it: its stack is proven later."""
    kind = BUILTIN[snake(class_name)][1]
    shapes = {n: tuple(shape[stacked:]) for n, shape, stacked in found}
    # A conv bias (out, 1, ..., 1) over channels-first data is a vector: its rank in one
    # layer does not count the layout's trailing axes.
    extra = layout_axes(shapes)
    arrays = {n: len(shape) - extra.get(n, 0) for n, shape in shapes.items()}
    said, source = resolve_kind(name, arrays, children)
    for k in range(1, min(arrays.values(), default=0) + 1):
        if said == kind or len({shape[:k] for shape in shapes.values()}) != 1:
            break
        one = {n: rank - k for n, rank in arrays.items()}
        if content_kind(one, children) is not None and \
                resolve_kind(name, one, children) == (kind, "name"):
            said = kind
    if said == kind:
        return Module(Layer(kind, class_name, None, "name"), ancestors, class_name)
    return Module(Layer(said, None, None, source), ancestors)


@functools.cache
def _class_kinds() -> Any:
    """Haiku's classes for :class:`ClassKinds` (which drops its answers as the registry changes)."""
    import haiku as hk

    from ._common import ClassKinds

    table = {getattr(hk, cls): kind for cls, kind, _ in BUILTIN.values()}
    return ClassKinds(table, containers=(hk.nets.MLP, hk.Sequential, hk.DeepRNN))
