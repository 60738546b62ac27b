"""Masks on sharded params: a jitted masked adamw step keeps every sharding."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    import decaymask as dm

    assert jax.device_count() == 8, jax.devices()
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    model = eqx.nn.MLP(8, 4, 16, 2, key=jax.random.key(0))
    params = eqx.filter(model, eqx.is_inexact_array)
    policy = dm.Policy(dm.decay(layer="linear", param="weight"))

    def spec(leaf):
        # Weights (out, in) split over "model" on out where it divides, biases replicated.
        if leaf.ndim == 2 and leaf.shape[0] % 2 == 0:
            return NamedSharding(mesh, P("model", None))
        return NamedSharding(mesh, P())

    shardings = jax.tree.map(spec, params)
    sharded = jax.device_put(params, shardings)
    x = jax.device_put(jnp.ones((8, 8)), NamedSharding(mesh, P("data", None)))
    tx = optax.adamw(1e-2, weight_decay=0.5, mask=policy.for_equinox)

    def loss(p, x):
        m = eqx.combine(p, model)
        return jnp.mean(jax.vmap(m)(x) ** 2)

    def step(p, state, x, tx=tx):
        grads = jax.grad(loss)(p, x)
        updates, state = tx.update(grads, state, p)
        return optax.apply_updates(p, updates), state

    state = tx.init(sharded)
    # optax's state follows the params' shardings.
    for leaf, mu in zip(jax.tree.leaves(sharded), jax.tree.leaves(state[0].mu)):
        assert mu.sharding.is_equivalent_to(leaf.sharding, leaf.ndim)
    pinned = jax.jit(step, out_shardings=(shardings, None))
    new, _ = pinned(sharded, state, x)
    for before, after in zip(jax.tree.leaves(sharded), jax.tree.leaves(new)):
        assert after.sharding.is_equivalent_to(before.sharding, after.ndim), (
            before.sharding, after.sharding)
    assert sum(len(leaf.sharding.device_set) == 8 for leaf in jax.tree.leaves(new)) == 6

    # Left to propagation, the step places every output as the same step with a
    # hand-written mask does: the mask changes nothing about sharding.
    hand = jax.tree.map(lambda leaf: leaf.ndim == 2, params)
    tx_hand = optax.adamw(1e-2, weight_decay=0.5, mask=hand)
    free, _ = jax.jit(step)(sharded, state, x)
    free_hand, _ = jax.jit(lambda p, s, x: step(p, s, x, tx_hand))(sharded, tx_hand.init(sharded), x)
    for a, b in zip(jax.tree.leaves(free), jax.tree.leaves(free_hand)):
        assert a.sharding.is_equivalent_to(b.sharding, a.ndim), (a.sharding, b.sharding)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    single = jax.device_put(params, jax.devices()[0])
    x1 = jax.device_put(jnp.ones((8, 8)), jax.devices()[0])
    expected, _ = jax.jit(step)(single, tx.init(single), x1)
    for got, want in zip(jax.tree.leaves(new), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-7)
    print("OK", len(jax.tree.leaves(new)))
    """
)


def test_sharded_params_keep_their_sharding_and_match_one_device():
    # Eight CPU devices, beside the suite's own XLA flags (tests/conftest.py).
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    env = dict(os.environ, XLA_FLAGS=flags.strip(), JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "OK 6"
