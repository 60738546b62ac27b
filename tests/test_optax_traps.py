"""optax.inject_hyperparams and masks: the trap, the error that names it, the fix."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
import pytest

import decaymask as dm
from helpers import WEIGHT_DECAY, assert_decays_exactly, flat_with_paths

POLICY = dm.Policy(dm.decay(layer="linear", param="weight"))
MODEL = eqx.nn.MLP(2, 2, 4, 1, key=jax.random.key(0))
PARAMS = eqx.filter(MODEL, eqx.is_inexact_array)
EXPECTED = {k: k.endswith(".weight") for k in flat_with_paths(PARAMS)}


def _step(tx):
    state = tx.init(PARAMS)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, PARAMS), state, PARAMS)
    return updates


@pytest.mark.parametrize(
    "mask", [POLICY.for_equinox, POLICY.for_equinox(PARAMS)], ids=["callable", "mask_tree"]
)
def test_static_mask_is_the_documented_fix(mask):
    tx = optax.inject_hyperparams(optax.adamw, static_args=("mask",))(
        learning_rate=1.0, weight_decay=WEIGHT_DECAY, mask=mask
    )
    assert_decays_exactly(PARAMS, _step(tx), EXPECTED)


def test_callable_mask_without_static_args_is_an_error_not_silence():
    # Without static_args optax would call the mask with the step count and switch
    # decay off everywhere; decaymask recognises the call and says how to fix it.
    tx = optax.inject_hyperparams(optax.adamw)(
        learning_rate=1.0, weight_decay=WEIGHT_DECAY, mask=POLICY.for_equinox
    )
    with pytest.raises(TypeError) as info:
        tx.init(PARAMS)
    assert str(info.value) == (
        "for_equinox was called with a scalar int32, not params: this is the step count "
        "optax.inject_hyperparams hands a callable hyperparameter, which it treats as a "
        "schedule. Fix: mark the mask static, optax.inject_hyperparams(optax.adamw, "
        "static_args=('mask',))(..., mask=policy.for_equinox)."
    )


def test_equinox_shaped_mask_without_static_args_crashes_in_optax():
    # The mask tree of an MLP is an MLP, hence callable: optax calls it as a schedule.
    tx = optax.inject_hyperparams(optax.adamw)(
        learning_rate=1.0, weight_decay=WEIGHT_DECAY, mask=POLICY.for_equinox(PARAMS)
    )
    with pytest.raises(ValueError, match="matmul"):
        tx.init(PARAMS)
