"""What the output cache keys a pytree on: its structure, its leaves' types, shapes and
dtypes, and which leaves are one array; never the user's objects.

A jax treedef holds the static data of the tree's nodes: an Equinox module's static
fields, a dict's keys. Kept as a cache key, it would keep those objects (a function, a
config, anything a static field holds) alive as long as the entry lives. A structure
whose static data is plain values (strings, numbers, ``None``, classes, tuples of them)
is keyed by its treedef, exactly; any other object in it is held by a weak reference
that compares as the object does while it lives, and an entry whose object has died is
dropped and never served. An object that holds nothing and compares by identity (a
sentinel, as every Equinox module's static data holds) is read by its class alone.
"""

from __future__ import annotations

import contextlib
import gc
import operator
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any


_PLAIN = frozenset({type(None), bool, int, float, complex, str, bytes, type(Ellipsis)})
_shape_of = operator.attrgetter("shape")
_dtype_of = operator.attrgetter("dtype")


class Structure:
    """A tree's structure as a cache key, and (not part of the key) its treedef.

    Equal to another exactly when their treedefs are equal, where the static data is
    plain; otherwise when their treedefs hash alike (node kinds, arities, classes and
    static data all enter jax's hash), have as many nodes and leaves, and hold equal
    plain values and the same objects, in the same places.
    """

    __slots__ = ("_hash", "held", "key", "treedef")

    def __init__(self, key: Any, held: tuple[Any, ...], treedef: Any, hashed: int) -> None:
        self.key = key
        self.held = held  # the objects of the static data that are held weakly
        self.treedef = treedef
        self._hash = hashed

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Structure) and self.key == other.key

    def __hash__(self) -> int:
        return self._hash

    def kept(self) -> Structure:
        """The key as a cache keeps it: without the treedef and the objects, where the
        treedef holds objects (the key is then not the treedef)."""
        return self if self.key is self.treedef else Structure(self.key, (), None, self._hash)

    def watch(self, dropped: Callable[[], None]) -> tuple[Any, ...]:
        """Weak references to the objects held weakly, which call ``dropped`` once one
        of them is gone; a cache keeps them beside its entry."""
        return tuple(weakref.ref(x, lambda _: dropped()) for x in self.held)


_flattened = threading.local()  # .last: [tree, treedef, flatten with paths, described]


@contextlib.contextmanager
def flattened(tree: Any) -> Iterator[None]:
    """Within one build of ``tree``: the flatten its signature
    (:func:`structure_signature`) does is kept, and :func:`treedef_of` and
    :func:`flat_with_path_of` return it rather than flattening the tree again. Nothing
    is kept after the block."""
    outer = getattr(_flattened, "last", None)
    _flattened.last = [tree, None, None, None]
    try:
        yield
    finally:
        _flattened.last = outer


def _kept(tree: Any) -> list[Any] | None:
    last = getattr(_flattened, "last", None)
    return last if last is not None and last[0] is tree else None


def treedef_of(tree: Any) -> Any:
    """``jax.tree_util.tree_structure(tree)``: the one already computed for this tree
    in this build where there is one."""
    kept = _kept(tree)
    if kept is not None and kept[1] is not None:
        return kept[1]
    import jax

    return jax.tree_util.tree_structure(tree)


def flat_with_path_of(tree: Any) -> tuple[list[tuple[Any, Any]], Any]:
    """``jax.tree_util.tree_flatten_with_path(tree)``: the one already computed for
    this tree in this build where there is one."""
    kept = _kept(tree)
    if kept is not None and kept[2] is not None:
        return kept[2], kept[1]
    import jax

    return jax.tree_util.tree_flatten_with_path(tree)


def described_of(tree: Any) -> tuple[tuple, tuple, tuple] | None:
    """The types, shapes and dtypes of ``tree``'s leaves in jax's order, where its
    signature was taken in this build and every leaf is an array; else ``None``."""
    kept = _kept(tree)
    return kept[3] if kept is not None else None


def structure_signature(tree: Any, paths: bool = False) -> tuple[Structure, Any, Any] | None:
    """The tree's structure (node types, keys, static fields), each leaf's type, shape
    and dtype, and which leaves are one array: everything a walk by names reads.
    ``None`` where the structure holds an object that cannot be keyed without being kept
    alive, or that cannot be hashed. Within a :func:`flattened` block of the same tree,
    its flatten (``paths``: with key paths, for a walk that reads them) is kept for the
    walk."""
    import jax  # only once a tree is read: `import decaymask` loads no framework

    kept = _kept(tree)
    if paths:
        flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
        leaves = [leaf for _, leaf in flat]
        if kept is not None:
            kept[1], kept[2] = treedef, flat
    else:
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        if kept is not None:
            kept[1] = treedef
    structure = structure_of(treedef)
    if structure is None:
        return None
    # Three tuples, not one per leaf: a call that hits the output cache allocates little.
    types = tuple(map(type, leaves))
    objects = leaves
    try:
        described = (types, tuple(map(_shape_of, leaves)), tuple(map(_dtype_of, leaves)))
        if kept is not None:
            kept[3] = described
    except AttributeError:  # a leaf that is not an array: a Python scalar, a string
        described = (
            types,
            tuple([getattr(x, "shape", None) for x in leaves]),
            tuple([getattr(x, "dtype", None) for x in leaves]),
        )
        # The same Python scalar at several leaves (every dropout rate of 0.0) is no
        # sharing: only the other leaves' identities are read.
        objects = [x for x, kind in zip(leaves, types) if kind not in _PLAIN]
    # Which leaves are the same array object: a walk reads that as sharing.
    shared: tuple[int, ...] = ()
    if len(set(map(id, objects))) != len(objects):
        first: dict[int, int] = {}
        shared = tuple(
            -1 if kind in _PLAIN else first.setdefault(id(x), n)
            for n, (x, kind) in enumerate(zip(leaves, types))
        )
    return (structure, described, shared)


def structure_of(treedef: Any) -> Structure | None:
    """The :class:`Structure` of a treedef; ``None`` where it cannot be a key."""
    try:
        hashed = hash(treedef)
    except TypeError:  # a static field that is not hashable
        return None
    atoms: list[Any] = []
    held: list[Any] = []
    opaque = False  # an object read by its class only: the treedef is no key
    # The treedef's references: its class, the registry, then the static data of its nodes.
    referents = gc.get_referents(treedef)
    if _holds_nothing_held(referents):
        # Only plain values and classes (a dict tree's keys): keyed by the treedef, as
        # the walk below would find.
        return Structure(treedef, (), treedef, hashed)
    pending = [x for x in referents if not _is_machinery(x, treedef)]
    pending.reverse()
    # Tuples of the same objects read alike (every module of a class holds its field
    # names and static values): read once, by their items' ids, then copied.
    read: dict[tuple[int, ...], tuple[list[Any], list[Any]]] = {}
    opened: set[int] = set()
    while pending:
        x = pending.pop()
        kind = type(x)
        if kind in _PLAIN or isinstance(x, type):
            atoms.append(x)
        elif kind is _Read:
            read[x.ids] = (atoms[x.atoms:], held[x.held:])
        elif kind is tuple:
            ids = tuple(map(id, x))
            known = read.get(ids)
            if known is not None:
                atoms.extend(known[0])
                held.extend(known[1])
                continue
            pending.append(_Read(ids, len(atoms), len(held)))
            atoms.append((kind, len(x)))
            pending.extend(reversed(x))
        elif kind is list or isinstance(x, tuple):
            atoms.append((kind, len(x)))
            pending.extend(reversed(x))
        elif kind is dict:
            atoms.append((dict, len(x)))
            for k, v in reversed(list(x.items())):
                pending.extend((v, k))
        elif kind is frozenset and all(type(v) in _PLAIN for v in x):
            atoms.append(x)
        elif _stateless(kind, x):
            # A sentinel (Equinox's in every module's static data): nothing but its
            # class to read, and no reason to keep it.
            atoms.append((_Stateless, kind))
            opaque = True
        else:
            try:
                ref = weakref.ref(x)
            except TypeError:
                if not gc.is_tracked(x):
                    atoms.append(x)  # holds no object the collector tracks (object())
                    continue
                # An object that cannot be held weakly (older Equinox keeps a module's
                # static data in one): read as what it holds, as a tuple is; one seen
                # twice (a cycle) leaves the structure uncached.
                if id(x) in opened:
                    return None
                opened.add(id(x))
                inner = gc.get_referents(x)
                atoms.append((kind, len(inner)))
                pending.extend(reversed(inner))
                continue
            atoms.append(ref)
            held.append(x)
    if not held and not opaque:
        return Structure(treedef, (), treedef, hashed)
    key = (hashed, treedef.num_nodes, treedef.num_leaves, tuple(atoms))
    try:
        hash(key)
    except TypeError:
        return None
    return Structure(key, tuple(held), treedef, hashed)


class _Stateless:
    """Marks an object read by its class alone in :func:`structure_of`'s atoms."""


_stateless_kinds: dict[type, bool] = {}


def _stateless(kind: type, x: Any) -> bool:
    """Whether ``x`` holds nothing (an empty ``__dict__``, no slots) and compares and
    hashes by identity: two such objects of one class differ in nothing a walk reads."""
    plain = _stateless_kinds.get(kind)
    if plain is None:
        plain = _stateless_kinds[kind] = (
            kind.__eq__ is object.__eq__
            and kind.__hash__ is object.__hash__
            and all(not vars(c).get("__slots__") for c in kind.__mro__)
            and "__dict__" in dir(kind)
        )
    # Its references, not its __dict__ (reading that from several threads at once can
    # crash CPython 3.11's collector): its class, and an empty dict once one was made.
    return plain and all(r is kind or (type(r) is dict and not r) for r in gc.get_referents(x))


class _Read:
    """Marks the end of a tuple's items in :func:`structure_of`'s stack."""

    __slots__ = ("atoms", "held", "ids")

    def __init__(self, ids: tuple[int, ...], atoms: int, held: int) -> None:
        self.ids, self.atoms, self.held = ids, atoms, held


def _holds_nothing_held(referents: list[Any]) -> bool:
    """Whether a treedef's references are plain values, classes and jax's own objects
    only: nothing :func:`structure_of` would hold weakly or refuse."""
    kinds = set(map(type, referents))
    kinds.difference_update(_PLAIN)
    return all(issubclass(kind, type) or kind.__name__ == "PyTreeRegistry" for kind in kinds)


def _is_machinery(x: Any, treedef: Any) -> bool:
    return x is type(treedef) or type(x).__name__ == "PyTreeRegistry"
