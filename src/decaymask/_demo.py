"""The demo behind ``python -m decaymask demo``, and its models for the ``explain`` command.

One tiny language model (embedding, a block of layer norm, self-attention and MLP, a final
layer norm, an output head), written three times with the same submodule names: in
Equinox, in Flax Linen and in Flax NNX.
"""

from __future__ import annotations

import functools

import decaymask as dm

SEED_POLICY = dm.Policy(
    dm.decay(layer="linear"),  # every parameter of every linear layer
    dm.decay(layer="layer_norm", param="bias"),  # and the bias of layer norms
)
VOCAB, WIDTH, HEADS, SEQ = 16, 8, 2, 12


def equinox_model():
    """The tiny LM in Equinox."""
    import jax

    return _equinox_class()(jax.random.key(0))


@functools.cache
def _equinox_class():
    # Built once: two models of one factory must share their classes (and treedefs).
    import equinox as eqx
    import jax

    class Block(eqx.Module):
        norm: eqx.nn.LayerNorm
        attn: eqx.nn.MultiheadAttention
        mlp: eqx.nn.MLP

        def __init__(self, key):
            k1, k2 = jax.random.split(key)
            self.norm = eqx.nn.LayerNorm(WIDTH)
            self.attn = eqx.nn.MultiheadAttention(HEADS, WIDTH, key=k1)
            self.mlp = eqx.nn.MLP(WIDTH, WIDTH, 2 * WIDTH, 1, activation=jax.nn.gelu, key=k2)

        def __call__(self, x):
            h = jax.vmap(self.norm)(x)
            x = x + self.attn(h, h, h)
            return x + jax.vmap(self.mlp)(jax.vmap(self.norm)(x))

    class TinyLM(eqx.Module):
        embed: eqx.nn.Embedding
        block: Block
        final_norm: eqx.nn.LayerNorm
        head: eqx.nn.Linear

        def __init__(self, key):
            k1, k2, k3 = jax.random.split(key, 3)
            self.embed = eqx.nn.Embedding(VOCAB, WIDTH, key=k1)
            self.block = Block(k2)
            self.final_norm = eqx.nn.LayerNorm(WIDTH)
            self.head = eqx.nn.Linear(WIDTH, VOCAB, key=k3)

        def __call__(self, tokens):
            x = self.block(jax.vmap(self.embed)(tokens))
            return jax.vmap(self.head)(jax.vmap(self.final_norm)(x))

    return TinyLM


def linen_model():
    """The tiny LM in Flax Linen: ``(module, example_args)``."""
    import jax.numpy as jnp

    return _linen_class()(), (jnp.zeros((SEQ,), jnp.int32),)


@functools.cache
def _linen_class():
    import flax.linen as nn

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            norm = nn.LayerNorm(name="norm")
            h = norm(x)
            x = x + nn.MultiHeadDotProductAttention(num_heads=HEADS, name="attn")(h)
            h = norm(x)
            h = nn.Dense(2 * WIDTH, name="mlp_in")(h)
            return x + nn.Dense(WIDTH, name="mlp_out")(nn.gelu(h))

    class TinyLM(nn.Module):
        @nn.compact
        def __call__(self, tokens):
            x = nn.Embed(VOCAB, WIDTH, name="embed")(tokens)
            x = Block(name="block")(x)
            return nn.Dense(VOCAB, name="head")(nn.LayerNorm(name="final_norm")(x))

    return TinyLM


def nnx_model():
    """The tiny LM in Flax NNX."""
    from flax import nnx

    return _nnx_class()(nnx.Rngs(0))


@functools.cache
def _nnx_class():
    from flax import nnx

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.norm = nnx.LayerNorm(WIDTH, rngs=rngs)
            self.attn = nnx.MultiHeadAttention(HEADS, WIDTH, decode=False, rngs=rngs)
            self.mlp_in = nnx.Linear(WIDTH, 2 * WIDTH, rngs=rngs)
            self.mlp_out = nnx.Linear(2 * WIDTH, WIDTH, rngs=rngs)

        def __call__(self, x):
            h = self.norm(x)
            x = x + self.attn(h)
            return x + self.mlp_out(nnx.gelu(self.mlp_in(self.norm(x))))

    class TinyLM(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(VOCAB, WIDTH, rngs=rngs)
            self.block = Block(rngs)
            self.final_norm = nnx.LayerNorm(WIDTH, rngs=rngs)
            self.head = nnx.Linear(WIDTH, VOCAB, rngs=rngs)

        def __call__(self, tokens):
            return self.head(self.final_norm(self.block(self.embed(tokens))))

    return TinyLM


def _data():
    import jax
    import jax.numpy as jnp

    tokens = jax.random.randint(jax.random.key(1), (SEQ,), 0, VOCAB)
    return tokens, jnp.roll(tokens, -1)


def _loss(logits, targets):
    import optax

    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def _run_equinox(steps: int) -> list[float]:
    import equinox as eqx
    import optax

    model = equinox_model()
    print("Equinox: policy.explain(model)\n")
    print(SEED_POLICY.explain(model))
    tokens, targets = _data()
    tx = optax.adamw(1e-2, weight_decay=0.1, mask=SEED_POLICY.for_equinox)
    opt_state = tx.init(eqx.filter(model, eqx.is_array))

    @eqx.filter_jit
    def step(model, opt_state):
        loss, grads = eqx.filter_value_and_grad(lambda m: _loss(m(tokens), targets))(model)
        updates, opt_state = tx.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), opt_state, loss

    losses = []
    for _ in range(steps):
        model, opt_state, loss = step(model, opt_state)
        losses.append(float(loss))
    return losses


def _run_linen(steps: int) -> list[float]:
    import jax
    import optax

    module, args = linen_model()
    params = module.init(jax.random.key(0), *args)["params"]
    print("Flax Linen: policy.explain(params, module=model, args=(tokens,))\n")
    print(SEED_POLICY.explain(params, module=module, args=args))
    tokens, targets = _data()
    tx = optax.adamw(1e-2, weight_decay=0.1, mask=SEED_POLICY.for_flax(params))
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state):
        loss, grads = jax.value_and_grad(
            lambda p: _loss(module.apply({"params": p}, tokens), targets)
        )(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    for _ in range(steps):
        params, opt_state, loss = step(params, opt_state)
        losses.append(float(loss))
    return losses


def _run_nnx(steps: int) -> list[float]:
    import optax
    from flax import nnx

    model = nnx_model()
    print("Flax NNX: policy.explain(model)\n")
    print(SEED_POLICY.explain(model))
    tokens, targets = _data()
    tx = optax.adamw(1e-2, weight_decay=0.1, mask=SEED_POLICY.for_flax(model))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: _loss(m(tokens), targets))(model)
        optimizer.update(model, grads)
        return loss

    return [float(step(model, optimizer)) for _ in range(steps)]


def run(steps: int = 5) -> None:
    """Prints the seed policy, its explain table in each framework, and real adamw steps."""
    print("policy:", SEED_POLICY, sep="\n")
    runs = []
    for name, runner in (("Equinox", _run_equinox), ("Linen", _run_linen), ("NNX", _run_nnx)):
        print()
        runs.append((name, runner(steps)))
    print(f"\n{steps} optax.adamw steps with each framework's mask (loss per step):")
    for name, losses in runs:
        print(f"  {name:8}" + "".join(f" {loss:.4f}" for loss in losses))
