"""Checks shared by the test modules: every mask goes through a real optax step."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

WEIGHT_DECAY = 0.25


def flat_with_paths(tree: Any, is_leaf=None) -> dict[str, Any]:
    """Leaves keyed by their jax key path string, to compare trees path by path."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return {jax.tree_util.keystr(path): leaf for path, leaf in flat}


def assert_same_tree(actual: Any, expected: Any) -> None:
    """Same structure and equal leaves; a failure names every differing path."""
    actual_def = jax.tree_util.tree_structure(actual)
    expected_def = jax.tree_util.tree_structure(expected)
    assert actual_def == expected_def, f"structures differ:\n{actual_def}\n!=\n{expected_def}"
    a, e = flat_with_paths(actual), flat_with_paths(expected)
    diff = [f"{k}: {a[k]!r} != {e[k]!r}" for k in e if not np.array_equal(a[k], e[k])]
    assert not diff, "leaves differ:\n" + "\n".join(diff)


def assert_bool_leaves(mask: Any) -> None:
    bad = {k: type(v).__name__ for k, v in flat_with_paths(mask).items() if type(v) is not bool}
    assert not bad, f"mask leaves that are not Python bools: {bad}"


def zero_grad_updates(params: Any, mask: Any, *, jit: bool = False) -> Any:
    """One real ``optax.adamw`` update with zero gradients and learning rate 1."""
    tx = optax.adamw(1.0, weight_decay=WEIGHT_DECAY, mask=mask)

    def step(params):
        state = tx.init(params)
        grads = jax.tree.map(jnp.zeros_like, params)
        updates, _ = tx.update(grads, state, params)
        return updates

    return jax.jit(step)(params) if jit else step(params)


def assert_decays_exactly(params: Any, updates: Any, decayed: dict[str, bool]) -> None:
    """Decayed leaves moved by exactly ``-weight_decay * p``, the others not at all.

    ``decayed`` maps each leaf's key path string (as ``flat_with_paths`` writes it) to
    whether it should decay.
    """
    p, u = flat_with_paths(params), flat_with_paths(updates)
    assert set(p) == set(u) == set(decayed), (set(p) ^ set(decayed)) or (set(u) ^ set(p))
    wrong = []
    for key, value in p.items():
        expected = -(WEIGHT_DECAY * np.asarray(value)) if decayed[key] else np.zeros_like(value)
        if not np.array_equal(np.asarray(u[key]), expected):
            wrong.append(f"{key}: decay={decayed[key]}")
    assert not wrong, "updates differ from the zero-gradient rule:\n" + "\n".join(wrong)


def build_while_registering(build, churn, *, threads: int = 8, seconds: float = 1.5) -> list:
    """Calls ``build`` in ``threads`` threads at once, for about ``seconds``, while one
    more thread calls ``churn`` (which registers and unregisters layers) in a loop.

    The interpreter switches threads far more often than by default, so that a build
    reading the registry or a cache meets a write in the middle. Returns every build's
    result; the first error of any thread is raised.
    """
    import sys
    import threading
    import time

    stop = threading.Event()
    errors: list[BaseException] = []
    results: list = []

    def loop(fn, keep):
        try:
            while not stop.is_set():
                value = fn()
                if keep:
                    results.append(value)
        except BaseException as err:  # noqa: BLE001 - handed to the test below
            errors.append(err)
            stop.set()

    workers = [threading.Thread(target=loop, args=(build, True)) for _ in range(threads)]
    workers.append(threading.Thread(target=loop, args=(churn, False)))
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for worker in workers:
            worker.start()
        stop.wait(seconds)
        stop.set()
        for worker in workers:
            worker.join(timeout=60)
    finally:
        sys.setswitchinterval(interval)
    assert not any(worker.is_alive() for worker in workers), "a thread did not finish"
    if errors:
        raise errors[0]
    return results


def assert_depths_fit_paths(leaves):
    """``module_depths`` line up with ``ancestors + (owner,)``, outermost first, inside
    the keys of the path that lead to a module; the keys at a listed depth name one
    module (one layer wherever they are read), which every leaf below lists (but the
    root, which by names owns the arrays it holds and encloses nothing)."""
    listed = {}
    for leaf in leaves:
        keys = tuple(leaf.path.split("/"))
        depths = leaf.module_depths
        assert len(depths) == len(leaf.ancestors) + 1, leaf
        assert list(depths) == sorted(depths), leaf
        assert 0 <= depths[0] and depths[-1] <= len(keys) - 1, leaf
        for depth, layer in zip(depths, (*leaf.ancestors, leaf.owner)):
            assert listed.setdefault(keys[:depth], layer) == layer, (leaf, depth)
    for leaf in leaves:
        keys = tuple(leaf.path.split("/"))
        below = {d for d in range(1, len(keys)) if keys[:d] in listed}
        assert below == set(leaf.module_depths) - {0}, leaf


def spy(monkeypatch, cls, name: str, note) -> list:
    """Wraps the method ``cls.name`` for the test: every call goes through, and
    ``note(args, result)`` (None to skip) is appended to the list returned."""
    seen: list = []
    method = getattr(cls, name)

    def spied(self, *args):
        result = method(self, *args)
        noted = note(args, result)
        if noted is not None:
            seen.append(noted)
        return result

    monkeypatch.setattr(cls, name, spied)
    return seen
