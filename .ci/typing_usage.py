"""A user's code, type-checked in CI and never run: what a checker must accept, and
what it must reject (each rejection carries an ignore that fails when unused)."""
# pyright: reportUnnecessaryTypeIgnoreComment=true

from typing import Any, assert_type

import equinox as eqx
import jax
import optax
from flax import nnx

import decaymask as dm

policy = dm.Policy(dm.decay(layer="linear", param="weight"), dm.no_decay(path="*/bias"))
assert_type(policy.rules, tuple[dm.Rule, ...])
assert_type(policy.default, bool)
assert_type(policy.strict, bool)
assert_type(policy.rules[0].decay, bool | None)
assert_type(policy.rules[0].rate, float)
assert_type(policy.rules[0].group, str)
assert_type(dm.presets.standard(), dm.Policy)
assert_type(dm.presets.muon(), dm.Policy)
assert_type(dm.label("head", layer="linear"), dm.Rule)

report = policy.explain({})
assert_type(report, dm.Report)
assert_type(report[0], dm.Decision)
assert_type(report[:3], dm.Report)
assert_type(report[0].decay, bool)
assert_type(report[0].leaf, dm.Leaf)
assert_type(report[0].leaf.path, str)

# Kinds, groups and roles are Literal types, the names dm.KINDS, dm.GROUPS and dm.ROLES
# hold: a checker (and an editor) accepts them, a layer class, and tuples of those...
assert_type(dm.KINDS, tuple[dm.LayerKind, ...])
assert_type(dm.ROLES, tuple[dm.Role, ...])
dm.decay(layer=("linear", "norm"), param=("weight", "bias"))
dm.no_decay(layer=eqx.nn.LayerNorm, within=[nnx.MultiHeadAttention, "attention"])
dm.freeze(param=["embedding", "position"])
kind: dm.LayerKind = "conv"
dm.lr(0.1, layer=kind)
dm.register_layer(eqx.nn.Linear, "linear", roles={"weight": "weight"})

# ...and rejects a misspelt one, which at run time is a ValueError naming the valid names.
dm.decay(layer="liner")  # type: ignore[arg-type]
dm.no_decay(within=("attention", "nrom"))  # type: ignore[arg-type]
dm.decay(param="kernel")  # type: ignore[arg-type]
dm.freeze(param=["bias", "weights"])  # type: ignore[list-item]
dm.lr(0.1, layer="embeding")  # type: ignore[arg-type]
dm.label("head", param="biases")  # type: ignore[arg-type]
dm.register_layer(eqx.nn.Linear, "dense")  # type: ignore[arg-type]


def from_config(kind: str) -> dm.Rule:
    # A str read from elsewhere is checked at run time: annotate it dm.LayerKind.
    return dm.decay(layer=kind)  # type: ignore[arg-type]


# Masks, labels, rates, multipliers and Muon dims have the type of the tree they are
# built from (its containers, its module classes); an nnx.Module's is an nnx.State.
eqx_model = eqx.nn.Linear(2, 3, key=jax.random.key(0))
assert_type(policy.for_equinox(eqx_model), eqx.nn.Linear)
assert_type(policy.labels_for_equinox(eqx_model), eqx.nn.Linear)
assert_type(policy.mask(eqx_model), eqx.nn.Linear)
assert_type(policy.trainable(eqx_model), eqx.nn.Linear)
nnx_model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
assert_type(policy.for_flax(nnx_model), nnx.State[Any, Any])
assert_type(policy.lr_scales(nnx_model), nnx.State[Any, Any])
assert_type(policy.for_flax(nnx.state(nnx_model, nnx.Param)), nnx.State[Any, Any])
linen_params: dict[str, dict[str, jax.Array]] = {}
assert_type(policy.for_flax(linen_params), dict[str, dict[str, jax.Array]])
assert_type(policy.rates_for_haiku(linen_params), dict[str, dict[str, jax.Array]])
assert_type(policy.split(linen_params), tuple[dict[str, dict[str, jax.Array]], dict[str, dict[str, jax.Array]]])
assert_type(policy.wrap(optax.adamw(1e-3, mask=policy.mask)), optax.GradientTransformationExtraArgs)
assert_type(dm.add_decayed_weights(0.1, policy.rates_for_equinox), optax.GradientTransformation)

# An Equinox model handed to a Flax or Haiku entry point.
policy.for_flax(eqx_model)  # type: ignore[call-overload]
policy.for_haiku(eqx_model)  # type: ignore[type-var]

# A misspelt selector, a selector of the wrong type, a positional selector.
dm.decay(layr="linear")  # type: ignore[call-arg]
dm.no_decay(min_ndim="2")  # type: ignore[arg-type]
dm.decay("linear")  # type: ignore[call-arg]
