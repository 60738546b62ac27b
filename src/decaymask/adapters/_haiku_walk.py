"""The walk of Haiku params: checks, one reading per distinct module, and a leaf table
whose keys let a policy decide once per distinct owner, name and role. By names, the
keys of a module alike to an earlier one's take its readings (``_haiku_repeats``).

The result is jax's treedef of the params unflattened over one value per array, so it
has exactly the params' containers (``dict``, Haiku's ``FlatMap``) and keeps other
values (``optax.MaskedNode``) as they are.
"""

from __future__ import annotations

import operator
from bisect import bisect_right
from collections.abc import Callable, Mapping
from itertools import accumulate, chain
from typing import Any

from ..core._leaf import Layer, Leaf
from ..core._roles import role_from_name
from ..core._table import LeafTable
from ._contract import TreedefRebuild
from ._haiku_modules import Module, Modules
from ._haiku_repeats import Repeats, runs
from ._haiku_segments import CONV, DENSE
from ._haiku_trace import HaikuTrace, is_array_like
from ._structure import treedef_of

ACCEPTS = "a Haiku params dict (module path -> {param name: array})"
_ARRAY_TYPES: dict[type, bool] = {}  # type -> whether its values are arrays
_ARRAY_KINDS: set[type] = set()  # the types _ARRAY_TYPES holds True for
_DTYPES: dict[Any, tuple[str, bool]] = {}  # dtype -> (its name, whether it can decay)


def _is_array(value: Any) -> bool:
    kind = type(value)
    found = _ARRAY_TYPES.get(kind)
    if found is None:
        found = _ARRAY_TYPES[kind] = is_array_like(value)
        if found:
            _ARRAY_KINDS.add(kind)
    return found


def _dtype(value: Any) -> tuple[str, bool]:
    """(dtype name, whether it is floating) of an array, cached per dtype."""
    found = _DTYPES.get(value.dtype)
    if found is None:
        from ._common import dtype_name

        name = dtype_name(value)
        found = _DTYPES[value.dtype] = (name, Leaf("x", dtype=name).floating)
    return found


_STR = frozenset({str})
_DICT = frozenset({dict})
_dtype_of = operator.attrgetter("dtype")
_names_of = operator.itemgetter(1)


def check(tree: Any, method: str, params_and_state: str | None) -> None:
    """Raises a ``TypeError`` naming the first key or value that is not Haiku's."""
    if params_and_state:
        raise TypeError(params_and_state)
    if not isinstance(tree, Mapping) or type(tree).__module__.startswith("flax."):
        raise TypeError(f"{method}: expected {ACCEPTS}, as hk.transform(f).init returns; got "
                        f"{type(tree).__name__}.")
    arrays = _ARRAY_TYPES
    if type(tree) is not dict:
        _check_node(tree, "the params", method)
    elif _STR.issuperset(map(type, tree)) and _DICT.issuperset(map(type, tree.values())) and \
            _STR.issuperset(map(type, chain.from_iterable(tree.values()))) and \
            _ARRAY_KINDS.issuperset(map(type, chain.from_iterable(map(dict.values, tree.values())))):
        return  # string keys, dicts of string names and arrays of known types: all Haiku's
    for key, module in tree.items():
        if type(key) is not str and not isinstance(key, str):
            raise TypeError(_key_error(method, repr(key), key, "a module path"))
        if type(module) is not dict and not isinstance(module, Mapping):
            raise TypeError(f"{method}: expected {ACCEPTS}; {key!r} holds a "
                            f"{type(module).__name__}, not a dict of params.")
        if type(module) is not dict:
            _check_node(module, repr(key), method)
        elif _STR.issuperset(map(type, module)) and \
                _ARRAY_KINDS.issuperset(map(type, module.values())):
            continue  # string names, arrays of known types: nothing to refuse
        for name, value in module.items():
            if type(name) is not str and not isinstance(name, str):
                raise TypeError(_key_error(method, f"{key}/{name!r}", name, "a param name"))
            # optax.MaskedNode (an empty NamedTuple) stands for other branches' leaves.
            if not (arrays.get(type(value)) or _is_array(value)) and value != ():
                raise TypeError(f"{method}: {key}/{name} is a {type(value).__name__}, not an "
                                f"array; Haiku params hold arrays, one level below each module.")


def _key_error(method: str, path: str, key: Any, what: str) -> str:
    return (f"{method}: the params key {path} is a {type(key).__name__}, where Haiku keys "
            f"{what} by a string; expected {ACCEPTS}, as hk.transform(f).init returns. Fix: "
            f"key it by a string ({str(key)!r}), or pass the params hk.transform(f).init "
            f"returned.")


class HaikuWalk:
    """The leaves of Haiku params (a :class:`LeafTable`) and their rebuild."""

    def __init__(self, tree: Mapping[str, Any], method: str, trace: HaikuTrace | None):
        from ._common import registered_batch_axes

        self.registered_batch_axes = registered_batch_axes
        self.tree, self.trace = tree, trace
        self.modules = modules = Modules(tree, trace)
        # (key, its arrays' names in jax's order, its module or None for the root's)
        self.spans: list[tuple[str, tuple[str, ...], Module | None]] = []
        self._starts: list[int] | None = None  # each span's first leaf
        keys: list[int] = []
        key_ids: dict[tuple, int] = {}
        # (module reading, name, dtype) -> key: what a key reads is the reading's.
        known: dict[tuple, int] = {}
        # (module reading, names, dtypes) -> (names in jax's order, their keys): the
        # arrays of modules alike, read once.
        alike: dict[tuple, tuple[tuple[str, ...], list[int]]] = {}
        roots: dict[int, Module] = {}
        state = trace is not None and trace.state
        paths, stacks, span, extend = modules.paths, modules.stacks, self.spans.append, keys.extend
        of, readings = modules.of, modules.modules

        def one(key: str) -> None:
            segments = paths[key]
            mid = segments[:-1] if segments[-1] == "~" else segments  # module_id
            module = (readings.get(mid) or of(mid, key)) if mid else None  # a stack's too
            if module is not None and key in stacks and stacks[key][1]:
                module = None
            last = segments[-1]
            if module is not None:
                owner = module.owner
                reading: Any = module.token
            else:  # no module: the owner stands for the path's parent, the key
                owner = roots.get(len(segments)) or self._root(roots, len(segments))
                reading = (owner.token, last)
            direct = tree[key]
            try:
                alike_key: tuple | None = \
                    (reading, tuple(direct), tuple(map(_dtype_of, direct.values())))
            except AttributeError:  # optax.MaskedNode: another branch's array
                alike_key = None
            done = alike.get(alike_key) if alike_key is not None else None
            if done is not None:
                span((key, done[0], module))
                extend(done[1])
                return
            names: list[str] = []
            ids: list[int] = []
            for name in sorted(direct):
                value = direct[name]
                if isinstance(value, tuple):  # optax.MaskedNode: another branch's array
                    continue
                found = known.get((reading, name, value.dtype))
                if found is None:
                    registration = owner.registration
                    role = (registration.role_of(name) if registration is not None else None) \
                        or role_from_name(owner.layer.kind, name, last)
                    ema = trace is None and modules.segment(last).ema
                    is_param = not state and not (ema and name in ("average", "hidden", "counter"))
                    signature = (owner.token, name, role, _dtype(value)[1], is_param)
                    found = known[reading, name, value.dtype] = \
                        key_ids.setdefault(signature, len(key_ids))
                names.append(name)
                ids.append(found)
            span((key, tuple(names), module))
            extend(ids)
            if alike_key is not None:
                alike[alike_key] = (tuple(names), ids)

        order = modules.order
        if trace is not None or modules.stacks:
            for key in order:
                one(key)
        else:  # by names: a block alike to an earlier one takes its readings
            self._runs(order, one, Repeats(tree, order), keys, 0, len(order), 0, -1)
        modules.find_lifted()
        self.leaves = LeafTable(keys, self._leaf)
        treedef = treedef_of(tree)
        # mypy cannot resolve jaxlib's PyTreeDef
        flattened = treedef.num_leaves  # type: ignore[attr-defined, unused-ignore]
        if flattened != len(keys):
            raise RuntimeError(f"{method}: decaymask read {len(keys)} arrays where jax flattens "
                               f"{flattened} leaves; this is a bug in decaymask, please report "
                               f"it with the params' structure.")
        self.rebuild = TreedefRebuild(treedef)
        self.roots = roots

    def _runs(self, order: list[str], one: Callable[[str], None], repeats: Repeats,
              keys: list[int], lo: int, hi: int, depth: int, parent: int) -> None:
        """Reads ``order[lo:hi]``, the keys below a module at ``depth`` (of reading
        ``parent``), run by run: a run alike to an earlier one takes its readings, any
        other is read as runs one level further in."""
        paths, done = self.modules.paths, lo
        for start, end in runs(order, paths, lo, hi, depth):
            for key in order[done:start]:
                one(key)
            done, run = end, order[start:end]
            segments = paths[run[0]]
            head = segments[depth]
            if head == "~":  # a constructor's modules stand a level further in
                for key in run:
                    one(key)
                continue
            family = (parent, self.modules.segment(head), end - start)
            skip = sum(map(len, segments[: depth + 1])) + depth
            result, found = repeats.find(family, start, end, skip)
            if result is not None:
                span = self.spans.append
                for key, (_, names, module) in zip(run, result[0]):
                    span((key, names, module))
                keys.extend(result[1])
                continue
            first_span, first_key = len(self.spans), len(keys)
            module = self.modules.of(segments[: depth + 1])
            self._runs(order, one, repeats, keys, start, end, depth + 1, module.token)
            repeats.note(family, start, end, skip, (self.spans[first_span:], keys[first_key:]),
                         found)
        for key in order[done:hi]:
            one(key)

    @staticmethod
    def _root(roots: dict[int, Module], depth: int) -> Module:
        owner = roots[depth] = Module(Layer("unknown", None, None, "name"), ())
        owner.depths, owner.token = (depth,), -1 - depth
        return owner

    def _leaf(self, index: int) -> Leaf:
        from ._common import path_text

        starts = self._starts
        if starts is None:  # a policy builds the leaves of a few keys: found by bisection
            starts = self._starts = list(accumulate(map(len, map(_names_of, self.spans)),
                                                    initial=0))
        at = bisect_right(starts, index) - 1
        key, names, module = self.spans[at]
        name = names[index - starts[at]]
        modules, trace = self.modules, self.trace
        segments = modules.paths[key]
        owner = module.owner if module is not None else self.roots[len(segments)]
        layer, registration = owner.layer, owner.registration
        value = self.tree[key][name]
        shape = tuple(value.shape)
        batch = modules.batch_of(key, name, shape)
        role, axes = (registration.role_of(name), registration.matrix_axes_of(name)) \
            if registration is not None else (None, None)
        if axes is not None and (trace is None or f"{key}/{name}" not in trace.ranks):
            batch = max(batch, self.registered_batch_axes(registration, self.tree[key].get) or 0)
        elif registration is None and module is not None:
            axes = _layout(module, name, len(shape) - batch)
        layout_axes = 0
        if layer.kind == "batch_norm" and name in ("scale", "offset"):
            # BatchNorm keeps them in the input's rank, reduced axes of size 1.
            ones = sum(1 for d in shape[batch:] if d == 1)
            layout_axes = min(ones, max(0, len(shape) - batch - 1))
        ema = trace is None and modules.segment(segments[-1]).ema
        return Leaf(
            path=path_text((*segments, name)), layer=layer.kind, name=name,
            role=role or role_from_name(layer.kind, name, segments[-1]),
            shape=shape, dtype=_dtype(value)[0], layer_type=layer.type_name,
            layer_class=layer.cls, ancestors=owner.ancestors, module_depths=owner.depths,
            is_param=not (trace is not None and trace.state) and
            not (ema and name in ("average", "hidden", "counter")),
            kind_source=layer.source, batch_axes=batch, layout_axes=layout_axes,
            matrix_axes=axes,
        )


def _check_node(node: Mapping, where: str, method: str) -> None:
    """Raises a ``TypeError`` where jax does not flatten a mapping other than a dict (it
    is not a registered pytree): optax would take it for one array."""
    import jax

    if jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(node)):
        raise TypeError(f"{method}: {where} is a {type(node).__name__}, which jax does not "
                        f"flatten (it is not a registered pytree), so optax would take it for "
                        f"one array; pass dicts, as hk.transform(f).init returns them "
                        f"(or Haiku's FlatMap).")


def _layout(module: Module, name: str, rank: int) -> \
        tuple[tuple[int, ...], tuple[int, ...]] | None:
    """(reduction, output) axes of a weight in Haiku's layouts, where the class is known."""
    layout = module.layout
    if layout is None or name not in ("w", "w_i", "w_h", "embeddings") or rank < 2:
        return None
    if layout == DENSE:
        return ((0,), (1,)) if rank == 2 else None
    # ConvND: (*kernel, in, out); ConvNDTranspose: (*kernel, out, in).
    out = rank - 1 if layout == CONV else rank - 2
    return tuple(a for a in range(rank) if a != out), (out,)
