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
