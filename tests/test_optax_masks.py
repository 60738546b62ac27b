"""Every optax optimizer and wrapper that takes a mask, in every framework, with the mask
as a tree and as the method itself: one real step with zero gradients moves exactly the
parameters the policy decays (the README's table of them is checked here too)."""

from __future__ import annotations

import functools
import pathlib

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import decaymask as dm

ROOT = pathlib.Path(__file__).resolve().parents[1]
WD = 0.1
POLICY = dm.presets.everything_but_bias_and_norm()
MATRICES = dm.presets.muon()


# One small model per framework: an embedding, a linear layer, a layer norm, a head.


class EqxNet(eqx.Module):
    embed: eqx.nn.Embedding
    fc: eqx.nn.Linear
    norm: eqx.nn.LayerNorm
    head: eqx.nn.Linear

    def __init__(self, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.embed = eqx.nn.Embedding(10, 4, key=k1)
        self.fc = eqx.nn.Linear(4, 8, key=k2)
        self.norm = eqx.nn.LayerNorm(8)
        self.head = eqx.nn.Linear(8, 3, key=k3)

    def __call__(self, tokens):
        return jax.vmap(lambda t: self.head(self.norm(self.fc(self.embed(t)))))(tokens)


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(10, 4, name="embed")(tokens)
        x = nn.LayerNorm(name="norm")(nn.Dense(8, name="fc")(x))
        return nn.Dense(3, name="head")(x)


class NnxNet(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(10, 4, rngs=rngs)
        self.fc = nnx.Linear(4, 8, rngs=rngs)
        self.norm = nnx.LayerNorm(8, rngs=rngs)
        self.head = nnx.Linear(8, 3, rngs=rngs)


# What the policy decays, and what Muon takes, named per framework.
DECAYED = {
    "equinox": {"embed/weight", "fc/weight", "head/weight"},
    "linen": {"embed/embedding", "fc/kernel", "head/kernel"},
    "nnx": {"embed/embedding", "fc/kernel", "head/kernel"},
}
MUON = {
    "equinox": {"fc/weight", "head/weight"},
    "linen": {"fc/kernel", "head/kernel"},
    "nnx": {"fc/kernel", "head/kernel"},
}

# name: (build(mask, framework forms) -> GradientTransformation, which leaves move).
OPTIMIZERS = {
    "adamw": (lambda m, f: optax.adamw(1.0, weight_decay=WD, mask=m), "decayed"),
    "nadamw": (lambda m, f: optax.nadamw(1.0, weight_decay=WD, mask=m), "decayed"),
    "lamb": (lambda m, f: optax.lamb(1.0, weight_decay=WD, mask=m), "decayed"),
    "lars": (
        lambda m, f: optax.lars(1.0, weight_decay=WD, weight_decay_mask=m, trust_ratio_mask=m),
        "decayed",
    ),
    "adafactor": (
        lambda m, f: optax.adafactor(1.0, weight_decay_rate=WD, weight_decay_mask=m),
        "decayed",
    ),
    "lion": (lambda m, f: optax.lion(1.0, weight_decay=WD, mask=m), "decayed"),
    "adan": (lambda m, f: optax.adan(1.0, weight_decay=WD, mask=m), "decayed"),
    "contrib.muon": (
        lambda m, f: optax.contrib.muon(
            1.0, weight_decay=WD, weight_decay_mask=m, muon_weight_dimension_numbers=f["dims"]
        ),
        "muon",  # weight_decay_mask applies on the Muon branch only
    ),
    "masked": (lambda m, f: optax.masked(optax.add_decayed_weights(WD), m), "decayed"),
    "add_decayed_weights": (lambda m, f: optax.add_decayed_weights(WD, mask=m), "decayed"),
    "partition": (
        lambda m, f: optax.partition(
            {"decay": optax.add_decayed_weights(WD), "no_decay": optax.set_to_zero()},
            f["labels"],
        ),
        "decayed",
    ),
}


@functools.cache
def _equinox(form: str):
    model = EqxNet(jax.random.key(0))
    params = eqx.filter(model, eqx.is_array)
    forms = {
        "tree": POLICY.for_equinox(model),
        "callable": POLICY.for_equinox,
        # An Equinox-shaped label tree is a callable module, which optax.partition
        # calls as a model (see the test below): labels go in as the method.
        "labels": POLICY.labels_for_equinox,
        "dims": MATRICES.muon_dims_for_equinox,
    }
    return params, forms


@functools.cache
def _linen(form: str):
    model, x = LinenNet(), jnp.zeros((2,), jnp.int32)
    params = model.init(jax.random.key(0), x)["params"]
    exact = {"module": model, "args": (x,)}
    forms = {
        "tree": POLICY.for_flax(params, **exact),
        "callable": POLICY.for_flax,
        "labels": POLICY.labels_for_flax(params, **exact) if form == "tree" else POLICY.labels_for_flax,
        "dims": MATRICES.muon_dims_for_flax(params, **exact),
    }
    return params, forms


def _moved(before, after) -> set[str]:
    flat_b = jax.tree_util.tree_flatten_with_path(before)[0]
    flat_a = jax.tree_util.tree_leaves(after)
    moved = set()
    for (path, b), a in zip(flat_b, flat_a):
        name = "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
        name = name.removesuffix("/value")
        if not np.array_equal(np.asarray(a), np.asarray(b)):
            moved.add(name)
    return moved


def _step_pytree(params, tx):
    state = tx.init(params)
    grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(grads, state, params)
    return _moved(params, optax.apply_updates(params, updates))


def _step_nnx(make, form):
    model = NnxNet(nnx.Rngs(0))
    forms = {
        "tree": POLICY.for_flax(model),
        "callable": POLICY.for_flax,
        "labels": POLICY.labels_for_flax(model) if form == "tree" else POLICY.labels_for_flax,
        "dims": MATRICES.muon_dims_for_flax(model),
    }
    optimizer = nnx.Optimizer(model, make(forms[form], forms), wrt=nnx.Param)
    before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    optimizer.update(model, jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param)))
    return _moved(before, jax.tree.map(np.asarray, nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("form", ["tree", "callable"])
@pytest.mark.parametrize("framework", ["equinox", "linen", "nnx"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_each_masked_optimizer_moves_exactly_the_decayed_parameters(name, framework, form):
    make, moves = OPTIMIZERS[name]
    if framework == "nnx":
        moved = _step_nnx(make, form)
    else:
        params, forms = (_equinox if framework == "equinox" else _linen)(form)
        moved = _step_pytree(params, make(forms[form], forms))
    expected = DECAYED[framework] & MUON[framework] if moves == "muon" else DECAYED[framework]
    assert moved == expected


def test_readme_table_lists_every_tested_optimizer():
    text = (ROOT / "README.md").read_text()
    table = text.split("### Optimizers that take a mask", 1)[1].split("\n#", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| `optax.")]
    named = [row.split("`")[1].removeprefix("optax.").split("(")[0] for row in rows]
    assert named == list(OPTIMIZERS)


def test_an_equinox_label_tree_is_called_as_a_model_by_optax_partition():
    params, _ = _equinox("tree")
    labels = POLICY.labels_for_equinox(EqxNet(jax.random.key(0)))
    assert callable(labels)  # the trap: an Equinox module with __call__
    tx = optax.partition(
        {"decay": optax.add_decayed_weights(WD), "no_decay": optax.set_to_zero()}, labels
    )
    with pytest.raises(ValueError, match="vmap got inconsistent sizes"):
        tx.init(params)  # EqxNet.__call__(params): the params as the model's input


@pytest.mark.parametrize("framework", ["equinox", "linen"])
def test_selective_transform_takes_a_freeze_tree_not_a_callable(framework):
    """``freeze_mask`` is only ever read as a tree: a tree from a policy freezes exactly
    what it selects, the method itself (truthy, never called) freezes everything."""
    freeze = dm.Policy(dm.decay(layer="embedding"))  # True = freeze, here
    params, _ = (_equinox if framework == "equinox" else _linen)("tree")
    embed = "embed/weight" if framework == "equinox" else "embed/embedding"
    method = freeze.for_equinox if framework == "equinox" else freeze.for_flax
    sgd = optax.sgd(1.0)
    grads = jax.tree.map(jnp.ones_like, params)

    def moved(tx):
        updates, _ = tx.update(grads, tx.init(params), params)
        return _moved(params, optax.apply_updates(params, updates))

    everything = {name for name in _moved(params, jax.tree.map(lambda x: x + 1, params))}
    assert moved(optax.selective_transform(sgd, freeze_mask=method(params))) == everything - {embed}
    assert moved(optax.selective_transform(sgd, freeze_mask=method)) == set()  # all frozen
