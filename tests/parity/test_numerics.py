"""The same model trained with each framework's mask gives the same parameters.

A small language model (embedding, a convolution over time, layer norm, causal
multi-head self-attention with biases, an MLP, a final layer norm, an output head) is
built in Equinox; its weights are copied into the Linen and NNX builds (kernels
transposed, attention projections split into heads). The three compute the same
logits, and 20 ``optax.adamw`` steps on the same batches, each with the mask decaymask
builds for that framework from one policy, end at the same parameters.

Made to compute the same: Equinox's attention projections get biases (Flax's have
them); every layer norm has ``eps`` 1e-5 (Flax's default is 1e-6) and Flax's compute
the variance exactly (``use_fast_variance=False``), as Equinox's do; both convolutions
pad ``"SAME"`` (Equinox's default is no padding, Flax's ``"SAME"``); the causal mask is
``(seq, seq)`` for Equinox's attention and ``(batch, 1, seq, seq)`` for Flax's; GELU is
the tanh approximation in all three. The key projection's bias gets no gradient (see
:func:`without_key_bias_gradient`).
"""

from __future__ import annotations

import functools
from typing import Any

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import decaymask as dm

from .models import LinenMLP, NnxMLP

VOCAB = 13
WIDTH = 8
HEADS = 2
HEAD_DIM = WIDTH // HEADS
FF = 16
KERNEL = 3
SEQ = 6
BATCH = 4
EPS = 1e-5
STEPS = 20
LEARNING_RATE = 1e-2
WEIGHT_DECAY = 0.1
TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}
"""For parameters after training. Measured: 5e-6 at most (the key projection's kernel,
whose gradient is small), 1e-7 for most arrays."""
FORWARD_TOLERANCE = {"rtol": 1e-6, "atol": 1e-6}

SEED = dm.Policy(dm.decay(layer="linear"), dm.decay(layer="layer_norm", param="bias"))
OTHER = dm.presets.standard()


# Equinox: one sequence at a time, channels first for the convolution.


class EqxLM(eqx.Module):
    embed: eqx.nn.Embedding
    conv: eqx.nn.Conv1d
    ln1: eqx.nn.LayerNorm
    attn: eqx.nn.MultiheadAttention
    ln2: eqx.nn.LayerNorm
    mlp: eqx.nn.MLP
    ln_f: eqx.nn.LayerNorm
    head: eqx.nn.Linear

    def __init__(self, key: jax.Array):
        keys = jax.random.split(key, 5)
        self.embed = eqx.nn.Embedding(VOCAB, WIDTH, key=keys[0])
        self.conv = eqx.nn.Conv1d(WIDTH, WIDTH, KERNEL, padding="SAME", key=keys[1])
        self.ln1 = eqx.nn.LayerNorm(WIDTH, eps=EPS)
        self.attn = eqx.nn.MultiheadAttention(
            HEADS,
            WIDTH,
            use_query_bias=True,
            use_key_bias=True,
            use_value_bias=True,
            use_output_bias=True,
            key=keys[2],
        )
        self.ln2 = eqx.nn.LayerNorm(WIDTH, eps=EPS)
        self.mlp = eqx.nn.MLP(WIDTH, WIDTH, FF, depth=1, activation=jax.nn.gelu, key=keys[3])
        self.ln_f = eqx.nn.LayerNorm(WIDTH, eps=EPS)
        self.head = eqx.nn.Linear(WIDTH, VOCAB, key=keys[4])

    def __call__(self, tokens: jax.Array) -> jax.Array:
        h = jax.vmap(self.embed)(tokens)
        h = h + self.conv(h.T).T
        x = jax.vmap(self.ln1)(h)
        causal = jnp.tril(jnp.ones((tokens.shape[0], tokens.shape[0]), bool))
        h = h + self.attn(x, x, x, mask=causal)
        h = h + jax.vmap(self.mlp)(jax.vmap(self.ln2)(h))
        return jax.vmap(self.head)(jax.vmap(self.ln_f)(h))


# Flax: a batch at a time, channels last. Exact variance, as Equinox computes it.


class LinenLM(nn.Module):
    def setup(self) -> None:
        self.embed = nn.Embed(VOCAB, WIDTH)
        self.conv = nn.Conv(WIDTH, (KERNEL,), padding="SAME")
        self.ln1 = nn.LayerNorm(epsilon=EPS, use_fast_variance=False)
        self.attn = nn.MultiHeadDotProductAttention(
            num_heads=HEADS, qkv_features=WIDTH, out_features=WIDTH
        )
        self.ln2 = nn.LayerNorm(epsilon=EPS, use_fast_variance=False)
        self.mlp = LinenMLP((WIDTH, FF, WIDTH))
        self.ln_f = nn.LayerNorm(epsilon=EPS, use_fast_variance=False)
        self.head = nn.Dense(VOCAB)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        h = self.embed(tokens)
        h = h + self.conv(h)
        h = h + self.attn(self.ln1(h), mask=nn.make_causal_mask(tokens))
        h = h + self.mlp(self.ln2(h))
        return self.head(self.ln_f(h))


class NnxLM(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(VOCAB, WIDTH, rngs=rngs)
        self.conv = nnx.Conv(WIDTH, WIDTH, (KERNEL,), padding="SAME", rngs=rngs)
        self.ln1 = nnx.LayerNorm(WIDTH, epsilon=EPS, use_fast_variance=False, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(HEADS, WIDTH, decode=False, keep_rngs=False, rngs=rngs)
        self.ln2 = nnx.LayerNorm(WIDTH, epsilon=EPS, use_fast_variance=False, rngs=rngs)
        self.mlp = NnxMLP((WIDTH, FF, WIDTH), rngs=rngs)
        self.ln_f = nnx.LayerNorm(WIDTH, epsilon=EPS, use_fast_variance=False, rngs=rngs)
        self.head = nnx.Linear(WIDTH, VOCAB, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        h = self.embed(tokens)
        h = h + self.conv(h)
        h = h + self.attn(self.ln1(h), mask=nnx.make_causal_mask(tokens))
        h = h + self.mlp(self.ln2(h))
        return self.head(self.ln_f(h))


# Weights: Equinox's, in Flax's layouts.


def flax_params(model: EqxLM, *, nnx_lists: bool) -> dict[str, Any]:
    """The Equinox model's arrays as a Flax params dict (Linen's, or NNX's pure dict).

    Equinox keeps ``(out, in)`` weights, ``(out, in, width)`` conv weights and
    ``(out, 1)`` conv biases; Flax ``(in, out)``, ``(width, in, out)`` and ``(out,)``.
    Equinox's attention projections are ``(heads * head_dim, in)`` matrices whose rows
    are grouped by head; Flax's are ``(in, heads, head_dim)`` kernels with
    ``(heads, head_dim)`` biases, and ``(heads, head_dim, out)`` for the output.
    """

    def dense(layer: eqx.nn.Linear) -> dict[str, Any]:
        return {"kernel": layer.weight.T, "bias": layer.bias}

    def heads(layer: eqx.nn.Linear) -> dict[str, Any]:
        return {
            "kernel": layer.weight.T.reshape(WIDTH, HEADS, HEAD_DIM),
            "bias": layer.bias.reshape(HEADS, HEAD_DIM),
        }

    def norm(layer: eqx.nn.LayerNorm) -> dict[str, Any]:
        return {"scale": layer.weight, "bias": layer.bias}

    attn = model.attn
    layers = [dense(layer) for layer in model.mlp.layers]
    return {
        "embed": {"embedding": model.embed.weight},
        "conv": {"kernel": model.conv.weight.transpose(2, 1, 0), "bias": model.conv.bias[:, 0]},
        "ln1": norm(model.ln1),
        "attn": {
            "query": heads(attn.query_proj),
            "key": heads(attn.key_proj),
            "value": heads(attn.value_proj),
            "out": {
                "kernel": attn.output_proj.weight.T.reshape(HEADS, HEAD_DIM, WIDTH),
                "bias": attn.output_proj.bias,
            },
        },
        "ln2": norm(model.ln2),
        "mlp": (
            {"layers": dict(enumerate(layers))}
            if nnx_lists
            else {f"layers_{i}": layer for i, layer in enumerate(layers)}
        ),
        "ln_f": norm(model.ln_f),
        "head": dense(model.head),
    }


def equinox_lm() -> EqxLM:
    """The Equinox model, its arrays drawn from a normal distribution by numpy.

    Built abstractly and filled, rather than by the layers' initialisers, which would
    each be compiled; biases and norm parameters get nonzero values, so every decayed
    array moves.
    """
    rng = np.random.default_rng(0)
    abstract = eqx.filter_eval_shape(EqxLM, jax.random.key(0))

    def fill(x: Any) -> Any:
        if isinstance(x, jax.ShapeDtypeStruct):
            return jnp.asarray(rng.normal(0.0, 0.4, x.shape).astype(x.dtype))
        return x

    return jax.tree.map(fill, abstract)


def linen_params(model: EqxLM) -> dict[str, Any]:
    params = flax_params(model, nnx_lists=False)
    abstract = jax.eval_shape(LinenLM().init, jax.random.key(0), data()[0][0])["params"]
    shapes = jax.tree.map(lambda x: x.shape, params)
    assert shapes == jax.tree.map(lambda x: x.shape, abstract), "the copy misses arrays"
    return params


def nnx_lm(model: EqxLM) -> NnxLM:
    graphdef, state = nnx.split(nnx.eval_shape(lambda: NnxLM(rngs=nnx.Rngs(0))))
    nnx.replace_by_pure_dict(state, flax_params(model, nnx_lists=True))
    return nnx.merge(graphdef, state)


@functools.cache
def data() -> tuple[jax.Array, jax.Array]:
    """(inputs, targets) of every step: next-token prediction on random sequences."""
    rng = np.random.default_rng(1)
    sequences = rng.integers(0, VOCAB, (STEPS, BATCH, SEQ + 1)).astype(np.int32)
    return jnp.asarray(sequences[:, :, :-1]), jnp.asarray(sequences[:, :, 1:])


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def adamw(mask: Any) -> optax.GradientTransformation:
    return optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY, mask=mask)


def without_key_bias_gradient(grads: Any, key_projection: str) -> Any:
    """``grads`` with the key projection's bias gradient set to exactly zero.

    Softmax is invariant to adding one number to every logit of a query, and the key
    bias adds ``q . b_k`` to all of them: its gradient is zero in exact arithmetic. In
    float32 each framework leaves different rounding noise there (about 1e-10), which
    Adam divides by its own square root plus ``eps`` (1e-8) into steps of about 2% of
    the learning rate: 2e-3 apart after 20 steps. Zeroed, the key bias moves by weight
    decay alone, which is what the comparison is about.
    """
    found = []

    def zero(path: tuple, g: Any) -> Any:
        names = [_key(k) for k in path]
        if names[-1] == "value":  # an NNX Param's own node
            names.pop()
        if names[-3:] == ["attn", key_projection, "bias"]:
            found.append(names)
            return jnp.zeros_like(g)
        return g

    grads = jax.tree_util.tree_map_with_path(zero, grads)
    assert len(found) == 1, found
    return grads


def _key(entry: Any) -> str:
    for attribute in ("name", "key", "idx"):
        if hasattr(entry, attribute):
            return str(getattr(entry, attribute))
    return str(entry)


# Training, each framework in its own idiom.


def train_equinox(model: EqxLM, policy: dm.Policy) -> EqxLM:
    tx = adamw(policy.for_equinox)

    def loss(model: EqxLM, inputs: jax.Array, targets: jax.Array) -> jax.Array:
        return cross_entropy(jax.vmap(model)(inputs), targets)

    @eqx.filter_jit
    def train(model: EqxLM, inputs: jax.Array, targets: jax.Array) -> EqxLM:
        params, static = eqx.partition(model, eqx.is_inexact_array)

        def step(carry, batch):
            params, opt_state = carry
            grads = eqx.filter_grad(loss)(eqx.combine(params, static), *batch)
            grads = without_key_bias_gradient(grads, "key_proj")
            updates, opt_state = tx.update(grads, opt_state, params)
            return (eqx.apply_updates(params, updates), opt_state), None

        (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), (inputs, targets))
        return eqx.combine(params, static)

    return train(model, *data())


def train_linen(params: dict[str, Any], mask: Any) -> dict[str, Any]:
    tx = adamw(mask)
    model = LinenLM()

    def loss(params: Any, inputs: jax.Array, targets: jax.Array) -> jax.Array:
        return cross_entropy(model.apply({"params": params}, inputs), targets)

    @jax.jit
    def train(params: Any, inputs: jax.Array, targets: jax.Array) -> Any:
        def step(carry, batch):
            params, opt_state = carry
            grads = without_key_bias_gradient(jax.grad(loss)(params, *batch), "key")
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), None

        (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), (inputs, targets))
        return params

    return train(params, *data())


def train_nnx(model: NnxLM, policy: dm.Policy) -> NnxLM:
    optimizer = nnx.Optimizer(model, adamw(policy.for_flax(model)), wrt=nnx.Param)

    def loss(model: NnxLM, inputs: jax.Array, targets: jax.Array) -> jax.Array:
        return cross_entropy(model(inputs), targets)

    @nnx.jit
    def step(model: NnxLM, optimizer: nnx.Optimizer, inputs: jax.Array, targets: jax.Array):
        grads = nnx.grad(loss)(model, inputs, targets)
        optimizer.update(model, without_key_bias_gradient(grads, "key"))

    for inputs, targets in zip(*data()):
        step(model, optimizer, inputs, targets)
    return model


@functools.cache
def start() -> EqxLM:
    return equinox_lm()


@functools.cache
def trained_equinox() -> dict[str, Any]:
    """The Equinox model trained with the seed policy, in Flax's layouts (Linen names)."""
    return flax_params(train_equinox(start(), SEED), nnx_lists=False)


def linen_names(state: Any) -> dict[str, Any]:
    """An NNX State (of params or of a mask) as a pure dict with Linen's names for the
    MLP's layers (``layers_0`` for ``layers/0``)."""
    pure = nnx.to_pure_dict(state)
    pure["mlp"] = {f"layers_{i}": layer for i, layer in pure["mlp"]["layers"].items()}
    return pure


def assert_params_close(actual: Any, expected: Any, what: str) -> None:
    """Same structure, every array within ``TOLERANCE``; names every array that is not."""
    assert jax.tree.structure(actual) == jax.tree.structure(expected), what
    flat_actual = jax.tree_util.tree_flatten_with_path(actual)[0]
    wrong = []
    for (path, a), e in zip(flat_actual, jax.tree.leaves(expected)):
        a, e = np.asarray(a), np.asarray(e)
        if not np.allclose(a, e, **TOLERANCE):
            wrong.append(
                f"{jax.tree_util.keystr(path)}: max |difference| {np.abs(a - e).max():.3g}"
            )
    assert not wrong, f"{what} differ from Equinox's:\n" + "\n".join(wrong)


# The tests.


def test_copied_weights_compute_the_same_logits():
    model = start()
    inputs = data()[0][0]
    expected = eqx.filter_jit(lambda model, x: jax.vmap(model)(x))(model, inputs)
    linen = jax.jit(LinenLM().apply)({"params": linen_params(model)}, inputs)
    np.testing.assert_allclose(linen, expected, **FORWARD_TOLERANCE)
    nnx_ = nnx.jit(lambda model, x: model(x))(nnx_lm(model), inputs)
    np.testing.assert_allclose(nnx_, expected, **FORWARD_TOLERANCE)


def test_masks_decay_the_same_arrays():
    """The seed policy's three masks, carried to Flax's names, are one mask."""
    model = start()
    expected = {
        "embed": {"embedding": False},
        "conv": {"kernel": False, "bias": False},
        **{n: {"scale": False, "bias": True} for n in ("ln1", "ln2", "ln_f")},
        "attn": {p: {"kernel": True, "bias": True} for p in ("query", "key", "value", "out")},
        "mlp": {f"layers_{i}": {"kernel": True, "bias": True} for i in range(2)},
        "head": {"kernel": True, "bias": True},
    }
    # Equinox's mask through the weight copy: each bool spread over its array's shape.
    spread = jax.tree.map(
        lambda decay, x: np.full(x.shape, decay),
        SEED.for_equinox(model),
        eqx.filter(model, eqx.is_array),
    )
    equinox = jax.tree.map(bool, jax.tree.map(np.all, flax_params(spread, nnx_lists=False)))
    assert equinox == expected
    linen = SEED.for_flax(linen_params(model), module=LinenLM(), args=(data()[0][0],))
    assert linen == expected
    assert linen_names(SEED.for_flax(nnx_lm(model))) == expected


def test_linen_trained_with_its_mask_matches_equinox():
    model = start()
    params = linen_params(model)
    mask = SEED.for_flax(params, module=LinenLM(), args=(data()[0][0],))
    assert_params_close(train_linen(params, mask), trained_equinox(), "Linen params")


def test_nnx_trained_with_its_mask_matches_equinox():
    trained = train_nnx(nnx_lm(start()), SEED)
    assert_params_close(linen_names(nnx.state(trained, nnx.Param)), trained_equinox(), "NNX params")


def test_training_moved_the_params():
    """The agreement above is not the start agreeing with itself."""
    start_params = flax_params(start(), nnx_lists=False)
    with pytest.raises(AssertionError, match="differ from Equinox's"):
        assert_params_close(start_params, trained_equinox(), "untrained params")


def test_another_policy_in_one_framework_breaks_the_agreement():
    """The comparison can fail: Linen trained with a different policy's mask ends
    elsewhere, first of all in the arrays whose decay differs."""
    params = linen_params(start())
    mask = OTHER.for_flax(params, module=LinenLM(), args=(data()[0][0],))
    trained = train_linen(params, mask)
    with pytest.raises(AssertionError, match="differ from Equinox's") as info:
        assert_params_close(trained, trained_equinox(), "Linen params")
    # Decayed by the seed policy, not by the other: the layer norm biases.
    assert "['ln_f']['bias']" in str(info.value)
