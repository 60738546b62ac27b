"""Labels for optax.partition, per-rule decay rates, and the transformation that applies them."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import decaymask as dm
from helpers import flat_with_paths

KEY = jax.random.key(0)


class Net(eqx.Module):
    embed: eqx.nn.Embedding
    fc: eqx.nn.Linear
    norm: eqx.nn.LayerNorm
    head: eqx.nn.Linear

    def __init__(self):
        k1, k2, k3 = jax.random.split(KEY, 3)
        self.embed = eqx.nn.Embedding(5, 4, key=k1)
        self.fc = eqx.nn.Linear(4, 4, key=k2)
        self.norm = eqx.nn.LayerNorm(4)
        self.head = eqx.nn.Linear(4, 3, key=k3)


NET = Net()
PARAMS = eqx.filter(NET, eqx.is_inexact_array)


def test_labels_come_from_the_last_matching_rule():
    policy = dm.Policy(
        dm.decay(layer="linear", param="weight"),
        dm.no_decay(param="bias"),
        dm.decay(path="head/*", label="head"),
        dm.label("frozen", layer="embedding"),
    )
    labels = policy.labels_for_equinox(NET)
    assert flat_with_paths(labels) == {
        ".embed.weight": "frozen",
        ".fc.weight": "decay",
        ".fc.bias": "no_decay",
        ".norm.weight": "no_decay",
        ".norm.bias": "no_decay",
        ".head.weight": "head",
        ".head.bias": "head",
    }
    # A label rule changes no decay decision.
    assert policy.for_equinox(NET).embed.weight is False
    assert policy.for_equinox(NET).head.bias is True


def test_bool_masks_are_the_two_label_case():
    policy = dm.presets.standard()
    mask = flat_with_paths(policy.for_equinox(NET))
    labels = flat_with_paths(policy.labels_for_equinox(NET))
    assert {k: v == "decay" for k, v in labels.items()} == mask
    assert set(labels.values()) == {"decay", "no_decay"}


def test_partition_freezes_and_slows_groups():
    policy = dm.Policy(
        dm.decay(layer="linear"),
        dm.no_decay(param="bias"),
        dm.label("frozen", layer="embedding"),
        dm.label("slow", path="head/*"),
    )
    tx = optax.partition(
        {
            "decay": optax.adamw(1.0, weight_decay=0.25),
            "no_decay": optax.adam(1.0),
            "slow": optax.sgd(0.5),
            "frozen": optax.set_to_zero(),
        },
        policy.labels_for_equinox,
    )
    grads = jax.tree.map(jnp.ones_like, PARAMS)
    updates, _ = jax.jit(lambda p: tx.update(grads, tx.init(p), p))(PARAMS)
    assert np.array_equal(updates.embed.weight, np.zeros((5, 4)))
    assert np.array_equal(updates.head.weight, np.full((3, 4), -0.5, np.float32))
    # adam's first step with unit gradients is -lr * 1 / (1 + eps); adamw adds the decay.
    adam_step = -(1.0 / (1.0 + 1e-8))
    assert np.allclose(updates.fc.bias, adam_step)
    assert np.allclose(updates.fc.weight, adam_step - 0.25 * PARAMS.fc.weight)


def test_rates_tree():
    policy = dm.Policy(dm.decay(layer="linear", rate=2.0), dm.decay(path="head/*", rate=0.5), dm.no_decay(param="bias"))
    rates = policy.rates_for_equinox(NET)
    assert flat_with_paths(rates) == {
        ".embed.weight": 0.0,
        ".fc.weight": 2.0,
        ".fc.bias": 0.0,
        ".norm.weight": 0.0,
        ".norm.bias": 0.0,
        ".head.weight": 0.5,
        ".head.bias": 0.0,
    }
    assert flat_with_paths(dm.Policy(default=True).rates_for_equinox(NET))[".norm.bias"] == 1.0


def test_per_group_decay_against_a_hand_computation():
    policy = dm.Policy(dm.decay(layer="linear", rate=2.0), dm.decay(layer="embedding", rate=0.1))
    lr, wd = 0.01, 0.3
    tx = optax.chain(
        optax.scale_by_adam(),
        dm.add_decayed_weights(wd, policy.rates_for_equinox),
        optax.scale_by_learning_rate(lr),
    )
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), PARAMS)
    updates, _ = tx.update(grads, tx.init(PARAMS), PARAMS)
    adam = optax.scale_by_adam()
    adam_updates, _ = adam.update(grads, adam.init(PARAMS), PARAMS)
    # By hand: -lr * (adam's update + wd * rate * p), leaf by leaf.
    for path, rate in [("fc", 2.0), ("head", 2.0), ("embed", 0.1), ("norm", 0.0)]:
        p, u, a = (getattr(t, path).weight for t in (PARAMS, updates, adam_updates))
        expected = -lr * (a + (wd * rate) * p) if rate else -lr * a
        np.testing.assert_array_equal(u, expected)
    # A rate of zero leaves the update exactly as adam made it.
    np.testing.assert_array_equal(updates.norm.bias, -lr * adam_updates.norm.bias)


def test_add_decayed_weights_needs_params_and_float_rates():
    tx = dm.add_decayed_weights(0.1, {"w": 1.0})
    with pytest.raises(ValueError, match=r"dm.add_decayed_weights needs the params: call tx.update\(updates, state, params\)\."):
        tx.update({"w": jnp.ones(2)}, tx.init({"w": jnp.ones(2)}))
    bad = dm.add_decayed_weights(0.1, {"w": "fast"})
    with pytest.raises(TypeError, match=r"dm.add_decayed_weights: a rate must be a float, got 'fast' \(str\); build rates with policy.rates_for_\*\."):
        bad.update({"w": jnp.ones(2)}, bad.init({"w": jnp.ones(2)}), {"w": jnp.ones(2)})


def test_label_and_rate_validation():
    with pytest.raises(TypeError, match=r"label\(label=''\): expected a non-empty string naming a group of optax.partition, got str\."):
        dm.label("")
    with pytest.raises(TypeError, match=r"decay\(rate=-1\): expected a non-negative number"):
        dm.decay(rate=-1)
    with pytest.raises(TypeError, match=r"no_decay\(rate=...\): a rate multiplies weight decay, so only decay\(...\) rules take one\."):
        dm.no_decay(rate=0.5)
    assert repr(dm.decay(layer="linear", rate=0.5, label="fast")) == "decay(layer='linear', rate=0.5, label='fast')"


def test_labels_in_the_report():
    policy = dm.Policy(dm.decay(layer="linear"), dm.label("frozen", layer="embedding"))
    text = str(policy.explain(NET)).splitlines()
    assert text[0].split() == ["path", "kind", "class", "role", "shape", "decay", "label", "rule"]
    assert text[2].split()[:8] == ["embed/weight", "embedding", "Embedding", "embedding", "(5,", "4)", "no", "frozen"]
