"""Muon with decaymask's dimension numbers takes the same steps in Equinox, Linen and NNX.

Two models, each built in the three frameworks: an MLP (layer norm, a linear layer
from 16 features to 100, GELU, a linear layer back down) and an attention block (an
embedding, a convolution over time, a layer norm, causal multi-head self-attention with
biases, an output head). Each is built in Equinox and its weights are copied into the
Linen and NNX builds (kernels transposed, attention projections split into heads, as in
``test_numerics``); the copies compute the same outputs. Five ``optax.contrib.muon``
steps on one sequence of gradients, copied into each layout the same way, each framework
with the dimension numbers ``dm.presets.muon()`` gives for it, end at the same
parameters: the Muon branch (linear, attention and convolution weights, each in its own
layout) and the Adam branch (embedding, biases, norm scales) alike. The gradients are
drawn rather than computed from a loss, so that no model's backward pass is compiled:
what is compared is the optimizer's reading of each layout. Equinox with optax's
default dimension numbers ends elsewhere: it reads Equinox's ``(out, in)`` weights
backwards.

The last tests check a recipe for weight decay with Muon. ``optax.contrib.muon`` decays
every leaf of its Adam branch by ``adam_weight_decay``, biases and norm scales included
(that branch takes no mask). Chaining Muon without decay, ``optax.scale(-1.0)``,
``optax.add_decayed_weights`` with the policy's mask and the learning rate decays
exactly the leaves the policy selects, on both branches, and is otherwise Muon's
``weight_decay_mask`` on the Muon branch and ``optax.adamw(mask=...)`` on the Adam branch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from optax.contrib import MuonDimensionNumbers as Dims

import decaymask as dm

VOCAB = 11
WIDTH = 16
HEADS = 2
HEAD_DIM = WIDTH // HEADS
FF = 100  # the MLP's first layer maps 16 features to 100
OUT = 4
KERNEL = 3
SEQ = 5
EPS = 1e-5
STEPS = 5
LEARNING_RATE = 2e-2
WEIGHT_DECAY = 0.25
TOLERANCE = {"rtol": 1e-6, "atol": 1e-6}
"""For parameters after the steps. Measured: 1.2e-7 at most (the sums and products of
Newton-Schulz run in another order where the layouts differ)."""

MATRICES = dm.presets.muon()
FIVE_STEPS = {"ns_coeffs": ((3.4445, -4.7750, 2.0315),) * 5}
"""optax's default, five Newton-Schulz steps with its default coefficients, written as
five rows: optax then runs them in a ``lax.scan`` instead of unrolling them. The same
arithmetic, compiled once rather than five times per matrix."""
ONE_STEP = {"ns_steps": 1}
"""For the weight-decay tests: decay does not depend on the orthogonalisation."""


def _is_dims(x: Any) -> bool:
    return x is None or isinstance(x, Dims)


# The MLP.


class EqxMLP(eqx.Module):
    ln: eqx.nn.LayerNorm
    up: eqx.nn.Linear
    down: eqx.nn.Linear

    def __init__(self, key: jax.Array):
        keys = jax.random.split(key)
        self.ln = eqx.nn.LayerNorm(WIDTH, eps=EPS)
        self.up = eqx.nn.Linear(WIDTH, FF, key=keys[0])
        self.down = eqx.nn.Linear(FF, OUT, key=keys[1])

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(jax.nn.gelu(self.up(self.ln(x))))


class LinenMLP(nn.Module):
    def setup(self) -> None:
        self.ln = nn.LayerNorm(epsilon=EPS, use_fast_variance=False)
        self.up = nn.Dense(FF)
        self.down = nn.Dense(OUT)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(nn.gelu(self.up(self.ln(x))))


class NnxMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.ln = nnx.LayerNorm(WIDTH, epsilon=EPS, use_fast_variance=False, rngs=rngs)
        self.up = nnx.Linear(WIDTH, FF, rngs=rngs)
        self.down = nnx.Linear(FF, OUT, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(nnx.gelu(self.up(self.ln(x))))


# The attention block: Equinox one sequence at a time, channels first for the
# convolution; Flax a batch at a time, channels last, with exact variance as Equinox
# computes it.


class EqxBlock(eqx.Module):
    embed: eqx.nn.Embedding
    conv: eqx.nn.Conv1d
    ln: eqx.nn.LayerNorm
    attn: eqx.nn.MultiheadAttention
    head: eqx.nn.Linear

    def __init__(self, key: jax.Array):
        keys = jax.random.split(key, 4)
        self.embed = eqx.nn.Embedding(VOCAB, WIDTH, key=keys[0])
        self.conv = eqx.nn.Conv1d(WIDTH, WIDTH, KERNEL, padding="SAME", key=keys[1])
        self.ln = eqx.nn.LayerNorm(WIDTH, eps=EPS)
        self.attn = eqx.nn.MultiheadAttention(
            HEADS,
            WIDTH,
            use_query_bias=True,
            use_key_bias=True,
            use_value_bias=True,
            use_output_bias=True,
            key=keys[2],
        )
        self.head = eqx.nn.Linear(WIDTH, VOCAB, key=keys[3])

    def __call__(self, tokens: jax.Array) -> jax.Array:
        h = jax.vmap(self.embed)(tokens)
        h = h + self.conv(h.T).T
        x = jax.vmap(self.ln)(h)
        causal = jnp.tril(jnp.ones((tokens.shape[0], tokens.shape[0]), bool))
        return jax.vmap(self.head)(h + self.attn(x, x, x, mask=causal))


class LinenBlock(nn.Module):
    def setup(self) -> None:
        self.embed = nn.Embed(VOCAB, WIDTH)
        self.conv = nn.Conv(WIDTH, (KERNEL,), padding="SAME")
        self.ln = nn.LayerNorm(epsilon=EPS, use_fast_variance=False)
        self.attn = nn.MultiHeadDotProductAttention(
            num_heads=HEADS, qkv_features=WIDTH, out_features=WIDTH
        )
        self.head = nn.Dense(VOCAB)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        h = self.embed(tokens)
        h = h + self.conv(h)
        return self.head(h + self.attn(self.ln(h), mask=nn.make_causal_mask(tokens)))


class NnxBlock(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(VOCAB, WIDTH, rngs=rngs)
        self.conv = nnx.Conv(WIDTH, WIDTH, (KERNEL,), padding="SAME", rngs=rngs)
        self.ln = nnx.LayerNorm(WIDTH, epsilon=EPS, use_fast_variance=False, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(
            HEADS, WIDTH, decode=False, keep_rngs=False, rngs=rngs
        )
        self.head = nnx.Linear(WIDTH, VOCAB, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        h = self.embed(tokens)
        h = h + self.conv(h)
        return self.head(h + self.attn(self.ln(h), mask=nnx.make_causal_mask(tokens)))


# Weights: Equinox's, in Flax's layouts and names (the same for Linen and NNX here).
# Equinox keeps (out, in) weights, (out, in, width) conv weights and (out, 1) conv
# biases; Flax (in, out), (width, in, out) and (out,). Equinox's attention projections
# are (heads * head_dim, in) matrices whose rows are grouped by head; Flax's are
# (in, heads, head_dim) kernels with (heads, head_dim) biases, and (heads, head_dim, out)
# for the output.


def _dense(layer: eqx.nn.Linear) -> dict[str, Any]:
    return {"kernel": layer.weight.T, "bias": layer.bias}


def _norm(layer: eqx.nn.LayerNorm) -> dict[str, Any]:
    return {"scale": layer.weight, "bias": layer.bias}


def _heads(layer: eqx.nn.Linear) -> dict[str, Any]:
    return {
        "kernel": layer.weight.T.reshape(WIDTH, HEADS, HEAD_DIM),
        "bias": layer.bias.reshape(HEADS, HEAD_DIM),
    }


def mlp_to_flax(tree: EqxMLP) -> dict[str, Any]:
    """The arrays of an Equinox-shaped tree (the model, a gradient, an update) as a
    Flax params dict."""
    return {"ln": _norm(tree.ln), "up": _dense(tree.up), "down": _dense(tree.down)}


def block_to_flax(tree: EqxBlock) -> dict[str, Any]:
    attn = tree.attn
    return {
        "embed": {"embedding": tree.embed.weight},
        "conv": {
            "kernel": tree.conv.weight.transpose(2, 1, 0),
            "bias": tree.conv.bias[:, 0],
        },
        "ln": _norm(tree.ln),
        "attn": {
            "query": _heads(attn.query_proj),
            "key": _heads(attn.key_proj),
            "value": _heads(attn.value_proj),
            "out": {
                "kernel": attn.output_proj.weight.T.reshape(HEADS, HEAD_DIM, WIDTH),
                "bias": attn.output_proj.bias,
            },
        },
        "head": _dense(tree.head),
    }


class Spec(NamedTuple):
    equinox: type
    linen: type
    nnx: type
    to_flax: Callable[[Any], dict[str, Any]]
    example: Callable[[], jax.Array]  # one batch of inputs


def _features() -> jax.Array:
    return jnp.asarray(
        np.random.default_rng(2).normal(size=(3, WIDTH)).astype(np.float32)
    )


def _tokens() -> jax.Array:
    return jnp.asarray(
        np.random.default_rng(2).integers(0, VOCAB, (2, SEQ)).astype(np.int32)
    )


SPECS = {
    "mlp": Spec(EqxMLP, LinenMLP, NnxMLP, mlp_to_flax, _features),
    "block": Spec(EqxBlock, LinenBlock, NnxBlock, block_to_flax, _tokens),
}
MODELS = pytest.mark.parametrize("name", list(SPECS))


def _is_float_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, jax.ShapeDtypeStruct)) and jnp.issubdtype(
        x.dtype, jnp.floating
    )


def draw(tree: Any, seed: int, leading: tuple[int, ...] = ()) -> Any:
    """Normal draws in the shape of every floating array of ``tree`` (after ``leading``
    axes), ``None`` elsewhere."""
    rng = np.random.default_rng(seed)

    def one(x: Any) -> Any:
        return jnp.asarray(rng.normal(0.0, 0.4, leading + x.shape).astype(np.float32))

    return jax.tree.map(one, eqx.filter(tree, _is_float_array))


@functools.cache
def equinox_model(name: str) -> Any:
    """Built abstractly and filled by numpy (no initialiser compiles); biases and norm
    parameters are nonzero, so that every decayed array moves."""
    abstract = eqx.filter_eval_shape(SPECS[name].equinox, jax.random.key(0))
    params, static = eqx.partition(abstract, _is_float_array)
    return eqx.combine(draw(params, 0), static)


@functools.cache
def equinox_gradients(name: str) -> Any:
    """One gradient per step, stacked on a leading axis, in Equinox's layout."""
    return draw(equinox_model(name), 1, (STEPS,))


@functools.cache
def flax_gradients(name: str) -> dict[str, Any]:
    """The same gradients in Flax's layout."""
    return jax.vmap(SPECS[name].to_flax)(equinox_gradients(name))


def linen_params(name: str) -> dict[str, Any]:
    spec = SPECS[name]
    params = spec.to_flax(equinox_model(name))
    abstract = jax.eval_shape(spec.linen().init, jax.random.key(0), spec.example())[
        "params"
    ]
    assert jax.tree.map(np.shape, params) == jax.tree.map(np.shape, abstract)
    return params


@functools.cache
def _nnx_abstract(name: str) -> tuple[Any, Any]:
    return nnx.split(nnx.eval_shape(lambda: SPECS[name].nnx(nnx.Rngs(0))))


def nnx_model(name: str) -> nnx.Module:
    """A new NNX model holding the Equinox model's weights."""
    graphdef, abstract = _nnx_abstract(name)
    state = jax.tree.map(lambda x: x, abstract)  # new variables
    nnx.replace_by_pure_dict(state, SPECS[name].to_flax(equinox_model(name)))
    return nnx.merge(graphdef, state)


def linen_dims(name: str) -> dict[str, Any]:
    spec = SPECS[name]
    return MATRICES.muon_dims_for_flax(
        linen_params(name), module=spec.linen(), args=(spec.example(),)
    )


# Muon steps, each framework in its own idiom. Each returns the params after the steps
# and the update of the first step.


def muon(dims: Any = None) -> optax.GradientTransformation:
    if dims is None:
        return optax.contrib.muon(LEARNING_RATE, **FIVE_STEPS)
    return optax.contrib.muon(
        LEARNING_RATE, muon_weight_dimension_numbers=dims, **FIVE_STEPS
    )


def steps_equinox(name: str, dims: Any) -> tuple[Any, Any]:
    tx = muon(dims)

    @eqx.filter_jit
    def run(model: Any, gradients: Any) -> tuple[Any, Any]:
        params, static = eqx.partition(model, eqx.is_inexact_array)

        def step(carry, grads):
            params, opt_state = carry
            updates, opt_state = tx.update(grads, opt_state, params)
            return (eqx.apply_updates(params, updates), opt_state), updates

        (params, _), updates = jax.lax.scan(step, (params, tx.init(params)), gradients)
        return eqx.combine(params, static), jax.tree.map(lambda u: u[0], updates)

    return run(equinox_model(name), equinox_gradients(name))


def steps_linen(name: str, dims: Any) -> tuple[dict, dict]:
    tx = muon(dims)

    @jax.jit
    def run(params: Any, gradients: Any) -> tuple[Any, Any]:
        def step(carry, grads):
            params, opt_state = carry
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), updates

        (params, _), updates = jax.lax.scan(step, (params, tx.init(params)), gradients)
        return params, jax.tree.map(lambda u: u[0], updates)

    return run(linen_params(name), flax_gradients(name))


def steps_nnx(name: str) -> dict[str, Any]:
    model = nnx_model(name)
    optimizer = nnx.Optimizer(
        model, muon(MATRICES.muon_dims_for_flax(model)), wrt=nnx.Param
    )
    update = nnx.jit(lambda optimizer, model, grads: optimizer.update(model, grads))
    gradients = flax_gradients(name)
    for i in range(STEPS):
        grads = jax.tree.map(lambda x: x, nnx.state(model, nnx.Param))  # new variables
        nnx.replace_by_pure_dict(grads, jax.tree.map(lambda g, i=i: g[i], gradients))
        update(optimizer, model, grads)
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


@functools.cache
def equinox_result(name: str) -> tuple[dict, dict]:
    """Equinox with ``dm.presets.muon()``'s dims: (params, first update) in Flax's layout."""
    model, first = steps_equinox(name, MATRICES.muon_dims_for_equinox)
    to_flax = SPECS[name].to_flax
    return to_flax(model), to_flax(first)


@functools.cache
def linen_result(name: str) -> tuple[dict, dict]:
    return steps_linen(name, linen_dims(name))


def differences(actual: Any, expected: Any) -> dict[str, float]:
    """The largest absolute difference of every array, keyed by path."""
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    flat = jax.tree_util.tree_flatten_with_path(actual)[0]
    return {
        jax.tree_util.keystr(path): float(np.abs(np.asarray(a) - np.asarray(e)).max())
        for (path, a), e in zip(flat, jax.tree.leaves(expected))
    }


def assert_params_close(actual: Any, expected: Any, what: str) -> None:
    assert jax.tree.structure(actual) == jax.tree.structure(expected), what
    flat = jax.tree_util.tree_flatten_with_path(actual)[0]
    wrong = [
        f"{jax.tree_util.keystr(path)}: max |difference| {np.abs(np.asarray(a) - np.asarray(e)).max():.3g}"
        for (path, a), e in zip(flat, jax.tree.leaves(expected))
        if not np.allclose(a, e, **TOLERANCE)
    ]
    assert not wrong, f"{what} differ from Equinox's:\n" + "\n".join(wrong)


def muon_paths(dims: Any) -> list[str]:
    return sorted(
        jax.tree_util.keystr(path)
        for path, d in jax.tree_util.tree_flatten_with_path(dims, is_leaf=_is_dims)[0]
        if d is not None
    )


# The tests.


@MODELS
def test_copied_weights_compute_the_same_outputs(name):
    spec = SPECS[name]
    model, x = equinox_model(name), spec.example()
    expected = eqx.filter_jit(lambda model, x: jax.vmap(model)(x))(model, x)
    linen = jax.jit(spec.linen().apply)({"params": linen_params(name)}, x)
    np.testing.assert_allclose(linen, expected, rtol=1e-6, atol=1e-6)
    nnx_ = nnx.jit(lambda model, x: model(x))(nnx_model(name), x)
    np.testing.assert_allclose(nnx_, expected, rtol=1e-6, atol=1e-6)


@MODELS
def test_each_framework_sends_the_same_arrays_to_muon(name):
    model = equinox_model(name)
    linen = linen_dims(name)
    assert nnx.to_pure_dict(MATRICES.muon_dims_for_flax(nnx_model(name))) == linen
    # Equinox's dims carried through the weight copy: a bool spread over each array.
    spread = jax.tree.map(
        lambda dims, x: None if x is None else np.full(x.shape, dims is not None),
        MATRICES.muon_dims_for_equinox(model),
        eqx.filter(model, eqx.is_array),
        is_leaf=_is_dims,
    )
    equinox = jax.tree.map(lambda x: bool(np.all(x)), SPECS[name].to_flax(spread))
    assert equinox == jax.tree.map(lambda d: d is not None, linen, is_leaf=_is_dims)
    expected = {
        "mlp": ["['down']['kernel']", "['up']['kernel']"],
        "block": [
            *(f"['attn']['{p}']['kernel']" for p in ("key", "out", "query", "value")),
            "['conv']['kernel']",
            "['head']['kernel']",
        ],
    }
    assert muon_paths(linen) == expected[name]


@MODELS
def test_linen_matches_equinox(name):
    assert_params_close(linen_result(name)[0], equinox_result(name)[0], "Linen params")


@MODELS
def test_nnx_matches_equinox(name):
    assert_params_close(steps_nnx(name), equinox_result(name)[0], "NNX params")


@MODELS
def test_the_steps_moved_every_array(name):
    """The agreement above is not the start agreeing with itself."""
    moved = differences(
        equinox_result(name)[0], SPECS[name].to_flax(equinox_model(name))
    )
    assert min(moved.values()) > 1e-3, moved


def test_optax_default_dims_do_not_match():
    """Without dims, optax sends every 2-D array to Muon read as (in, out): Equinox's
    (out, in) weights are read backwards, so the 16 -> 100 layer's update is 2.5x too
    small (Muon scales an update by sqrt(max(1, fan_out / fan_in)))."""
    model, first = steps_equinox("mlp", None)
    default, default_first = mlp_to_flax(model), mlp_to_flax(first)
    linen, linen_first = linen_result("mlp")
    ratio = np.linalg.norm(linen_first["up"]["kernel"]) / np.linalg.norm(
        default_first["up"]["kernel"]
    )
    np.testing.assert_allclose(ratio, 2.5, rtol=1e-4)
    assert differences(default, linen)["['up']['kernel']"] > 1e-3
    # With decaymask's dims, Equinox's first update is Linen's.
    assert max(differences(equinox_result("mlp")[1], linen_first).values()) < 1e-6


# Weight decay on both branches.

DECAY = dm.presets.gpt()
"""Decays linear weights (attention projections and the head) and the embedding: on
Muon's branch the convolution kernel is spared; on Adam's branch the embedding decays,
the biases and norm scales do not."""

DECAYED = {
    "['embed']['embedding']": True,
    "['conv']['kernel']": False,
    "['conv']['bias']": False,
    "['ln']['scale']": False,
    "['ln']['bias']": False,
    **{f"['attn']['{p}']['kernel']": True for p in ("query", "key", "value", "out")},
    **{f"['attn']['{p}']['bias']": False for p in ("query", "key", "value", "out")},
    "['head']['kernel']": True,
    "['head']['bias']": False,
}


def decayed_muon(
    learning_rate: float, dims: Any, mask: Any
) -> optax.GradientTransformation:
    """Muon whose two branches both decay the leaves ``mask`` selects, and only those."""
    return optax.chain(
        optax.contrib.muon(1.0, muon_weight_dimension_numbers=dims, **ONE_STEP),
        optax.scale(-1.0),  # undo muon's descent sign: the raw Muon and Adam directions
        optax.add_decayed_weights(WEIGHT_DECAY, mask),
        optax.scale_by_learning_rate(learning_rate),
    )


def one_update(tx: optax.GradientTransformation, params: Any, grads: Any) -> Any:
    return jax.jit(lambda params, grads: tx.update(grads, tx.init(params), params)[0])(
        params, grads
    )


def assert_only_decay(params: dict, updates: dict, decayed: dict[str, bool]) -> None:
    """Zero gradients, learning rate 1: decayed leaves move by ``-weight_decay * p``,
    the others not at all."""
    p = {
        jax.tree_util.keystr(k): np.asarray(v)
        for k, v in jax.tree_util.tree_flatten_with_path(params)[0]
    }
    u = {
        jax.tree_util.keystr(k): np.asarray(v)
        for k, v in jax.tree_util.tree_flatten_with_path(updates)[0]
    }
    assert set(p) == set(u) == set(decayed)
    wrong = []
    for key, value in p.items():
        expected = -WEIGHT_DECAY * value if decayed[key] else np.zeros_like(value)
        if not np.allclose(u[key], expected, rtol=1e-6, atol=0):
            wrong.append(f"{key}: decay={decayed[key]}")
    assert not wrong, "updates differ from the policy's decay:\n" + "\n".join(wrong)


def test_adam_weight_decay_decays_every_adam_leaf():
    params = linen_params("block")
    mask = DECAY.for_flax(params, module=LinenBlock(), args=(SPECS["block"].example(),))
    tx = optax.contrib.muon(
        1.0,
        weight_decay=WEIGHT_DECAY,
        weight_decay_mask=mask,
        adam_weight_decay=WEIGHT_DECAY,
        muon_weight_dimension_numbers=linen_dims("block"),
        **ONE_STEP,
    )
    updates = one_update(tx, params, jax.tree.map(jnp.zeros_like, params))
    # The Muon branch follows the mask (the conv kernel is spared); the Adam branch
    # decays the embedding, and also every bias and norm scale.
    muon_leaves = set(muon_paths(linen_dims("block")))
    assert_only_decay(
        params,
        updates,
        {k: v if k in muon_leaves else True for k, v in DECAYED.items()},
    )


def test_decay_recipe_equinox():
    model = equinox_model("block")
    params = eqx.filter(model, eqx.is_inexact_array)
    tx = decayed_muon(1.0, MATRICES.muon_dims_for_equinox, DECAY.for_equinox)
    updates = one_update(tx, params, jax.tree.map(jnp.zeros_like, params))
    assert_only_decay(block_to_flax(params), block_to_flax(updates), DECAYED)


def test_decay_recipe_linen():
    params = linen_params("block")
    mask = DECAY.for_flax(params, module=LinenBlock(), args=(SPECS["block"].example(),))
    tx = decayed_muon(1.0, linen_dims("block"), mask)
    assert_only_decay(
        params, one_update(tx, params, jax.tree.map(jnp.zeros_like, params)), DECAYED
    )


def test_decay_recipe_nnx():
    model = nnx_model("block")
    before = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    tx = decayed_muon(1.0, MATRICES.muon_dims_for_flax(model), DECAY.for_flax(model))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    grads = jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param))
    nnx.jit(lambda optimizer, model, grads: optimizer.update(model, grads))(
        optimizer, model, grads
    )
    after = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    assert_only_decay(before, jax.tree.map(jnp.subtract, after, before), DECAYED)


def test_decay_recipe_is_muon_and_adamw_each_with_the_mask():
    """With nonzero gradients, the recipe's update is, leaf for leaf, Muon's own
    ``weight_decay_mask`` on the Muon branch and ``optax.adamw(mask=...)`` (with Muon's
    Nesterov momentum) on the Adam branch."""
    params = linen_params("block")
    grads = jax.tree.map(lambda g: g[0], flax_gradients("block"))
    dims = linen_dims("block")
    mask = DECAY.for_flax(params, module=LinenBlock(), args=(SPECS["block"].example(),))
    rate = LEARNING_RATE

    @jax.jit
    def updates(params: Any, grads: Any) -> tuple[Any, Any, Any]:
        def one(tx: optax.GradientTransformation) -> Any:
            return tx.update(grads, tx.init(params), params)[0]

        return (
            one(decayed_muon(rate, dims, mask)),
            one(
                optax.contrib.muon(
                    rate,
                    weight_decay=WEIGHT_DECAY,
                    weight_decay_mask=mask,
                    muon_weight_dimension_numbers=dims,
                    **ONE_STEP,
                )
            ),
            one(optax.adamw(rate, weight_decay=WEIGHT_DECAY, mask=mask, nesterov=True)),
        )

    recipe, muon_only, adamw = updates(params, grads)
    muon_leaves = set(muon_paths(dims))
    gaps = {}
    for (path, r), m, a in zip(
        jax.tree_util.tree_flatten_with_path(recipe)[0],
        jax.tree.leaves(muon_only),
        jax.tree.leaves(adamw),
    ):
        key = jax.tree_util.keystr(path)
        gaps[key] = float(
            np.abs(np.asarray(r) - np.asarray(m if key in muon_leaves else a)).max()
        )
    assert max(gaps.values()) < 1e-7, gaps
    # And the decay did something: without it the Adam branch's embedding moves less.
    assert (
        np.abs(
            np.asarray(recipe["embed"]["embedding"])
            - np.asarray(muon_only["embed"]["embedding"])
        ).max()
        > 1e-4
    )
