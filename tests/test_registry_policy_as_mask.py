"""A Policy handed to optax where a mask (or labels, or Muon dims) goes: optax calls it
with the params, or would read it as one leaf that decays everything. It refuses, and
names the method to pass; that method steps exactly, in every framework."""

from __future__ import annotations

import re

import equinox as eqx
import flax.linen as nn
import haiku as hk
import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

import decaymask as dm
from helpers import WEIGHT_DECAY, assert_decays_exactly, flat_with_paths

POLICY = dm.Policy(dm.decay(layer="linear", param="weight"))
MESSAGE = re.escape(
    "a decaymask Policy was called as a function (optax calls what it is given for "
    "mask=, param_labels= and muon_weight_dimension_numbers= with the params), but a "
    "Policy is not one tree: pass the method that builds the tree asked for: "
    "mask=policy.mask, param_labels=policy.labels, muon_weight_dimension_numbers="
    "policy.muon_dims (or their for_equinox, for_flax and for_haiku forms), "
    "rates=policy.rates."
)
KEY = jax.random.key(0)
X = jnp.ones((1, 3))


def _equinox():
    return eqx.filter(eqx.nn.MLP(3, 2, 4, 1, key=KEY), eqx.is_inexact_array)


def _linen():
    return nn.Sequential([nn.Dense(4), nn.LayerNorm(), nn.Dense(2)]).init(KEY, X)["params"]


def _nnx():
    model = nnx.Sequential(
        nnx.Linear(3, 4, rngs=nnx.Rngs(0)),
        nnx.LayerNorm(4, rngs=nnx.Rngs(0)),
        nnx.Linear(4, 2, rngs=nnx.Rngs(0)),
    )
    return nnx.state(model, nnx.Param)


def _haiku():
    return hk.transform(lambda x: hk.nets.MLP([4, 2])(x)).init(KEY, X)


PARAMS = {"equinox": _equinox, "linen": _linen, "nnx": _nnx, "haiku": _haiku}


def _step(tx, params):
    state = tx.init(params)
    return tx.update(jax.tree.map(jnp.zeros_like, params), state, params)[0]


@pytest.mark.parametrize("framework", list(PARAMS))
def test_a_policy_as_the_mask_is_refused_and_its_method_steps_exactly(framework):
    params = PARAMS[framework]()
    with pytest.raises(TypeError, match=f"^{MESSAGE}$"):
        optax.adamw(1.0, weight_decay=WEIGHT_DECAY, mask=POLICY).init(params)
    with pytest.raises(TypeError, match=f"^{MESSAGE}$"):
        optax.add_decayed_weights(WEIGHT_DECAY, mask=POLICY).init(params)
    # The fix the message names.
    updates = _step(optax.adamw(1.0, weight_decay=WEIGHT_DECAY, mask=POLICY.mask), params)
    # The weight matrices of the two linear layers: Equinox's weight, Flax's kernel,
    # Haiku's w; not the biases, nor LayerNorm's scale and bias.
    decayed = {
        path: any(name in path for name in ("weight", "kernel", "'w'"))
        for path in flat_with_paths(params)
    }
    assert sum(decayed.values()) == 2
    assert_decays_exactly(params, updates, decayed)


def test_a_policy_for_labels_dims_rates_or_a_schedule_is_refused():
    params = _linen()
    with pytest.raises(TypeError, match=f"^{MESSAGE}$"):
        tx = optax.partition({"decay": optax.sgd(1.0), "no_decay": optax.sgd(0.0)}, POLICY)
        tx.init(params)
    with pytest.raises(TypeError, match=f"^{MESSAGE}$"):
        optax.contrib.muon(1.0, muon_weight_dimension_numbers=POLICY).init(params)
    with pytest.raises(TypeError, match=f"^{MESSAGE}$"):
        _step(dm.add_decayed_weights(WEIGHT_DECAY, rates=POLICY), params)
    # inject_hyperparams calls a callable hyperparameter with the step count.
    with pytest.raises(TypeError, match=f"^{MESSAGE}$"):
        optax.inject_hyperparams(optax.adamw)(1.0, weight_decay=0.1, mask=POLICY).init(params)
