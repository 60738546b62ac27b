"""Outputs built once per (policy, output, entry point, adapter, registries, tree
signature): a callable mask is called with the same structure at every optax step.

The key holds everything a build reads: the policy (its rules), the adapter (its name
and the adapter registry's count, so an adapter registered anew under a name is never
served another's outputs), the layer registry's count, and the tree's signature. An
entry holds the output's values (bools, labels, rates, dims), and its treedef only
where that holds nothing but plain values: never the user's tree, nor an object one of
its static fields holds (see :mod:`decaymask.adapters._structure`).
"""

from __future__ import annotations

import enum
import threading
from typing import Any, Final, Literal

from . import adapters
from .adapters._structure import Structure, structure_of
from .core import _registry

_BUILT_MAX = 256
# key -> (the output's treedef, or None for the tree's own; its leaves; the warnings;
# weak references that drop the entry once an object of its key is gone).
_built: dict[Any, tuple[Any, list[Any], list[str], tuple[Any, ...]]] = {}
_lock = threading.Lock()
_dead: list[Any] = []  # keys whose objects are gone; appended from weakref callbacks


class _Miss(enum.Enum):
    UNCACHED = 0


UNCACHED: Final = _Miss.UNCACHED
"""What :func:`lookup` returns for a key that cannot be hashed."""


def key_of(policy: Any, value: str, method: str, adapter: Any, signature: Any) -> Any:
    """The key of one build."""
    return (
        policy, value, method, adapter.name, adapters.generation, _registry.generation, signature
    )


def _structure(signature: Any) -> Structure | None:
    if type(signature) is tuple and signature and isinstance(signature[0], Structure):
        return signature[0]
    return None


def _drop_dead() -> None:
    while _dead:
        _built.pop(_dead.pop(), None)


def lookup(key: Any) -> tuple[Any, list[str]] | None | Literal[_Miss.UNCACHED]:
    """The output kept under ``key`` and the warnings its build gave; ``None`` where
    there is none; :data:`UNCACHED` where ``key`` cannot be hashed."""
    with _lock:
        if _dead:
            _drop_dead()
        try:
            built = _built.get(key)
        except TypeError:  # a signature that is not hashable
            return UNCACHED
    if built is None:
        return None
    treedef, leaves, messages, _ = built
    if treedef is None:
        structure = _structure(key[-1])
        assert structure is not None
        treedef = structure.treedef
    return treedef.unflatten(leaves), messages


def remember(key: Any, out: Any, values: list[Any], rebuild: Any, messages: list[str]) -> None:
    """Keeps the output of the build of ``key``, unless keeping it would keep an
    object of the user's tree alive."""
    if isinstance(rebuild, adapters.TreedefRebuild):
        # The output is that treedef over these leaves: no flatten needed.
        treedef, leaves = rebuild.treedef, rebuild.leaves(values)
    else:
        import jax

        leaves, treedef = jax.tree_util.tree_flatten(out)
    signature = key[-1]
    structure = _structure(signature)
    if structure is not None and treedef == structure.treedef:
        treedef = None  # the tree's own: a hit unflattens with the caller's treedef
    else:
        output = structure_of(treedef)
        if output is None or output.held:
            return  # the output's structure holds objects of the user's
    refs: tuple[Any, ...] = ()
    kept = structure.kept() if structure is not None else None
    if structure is not None and kept is not structure:
        key = (*key[:-1], (kept, *signature[1:]))
        dead_key = key
        refs = structure.watch(lambda: _dead.append(dead_key))
    with _lock:
        if _dead:
            _drop_dead()
        if len(_built) >= _BUILT_MAX:
            _built.pop(next(iter(_built)))
        _built[key] = (treedef, leaves, messages, refs)
