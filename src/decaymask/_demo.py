"""The demo behind ``python -m decaymask demo``."""

from __future__ import annotations

import decaymask as dm

SEED_POLICY = dm.Policy(
    dm.decay(layer="linear"),  # every parameter of every linear layer
    dm.decay(layer="layer_norm", param="bias"),  # and the bias of layer norms
)


def _equinox_model(key):
    import equinox as eqx
    import jax

    class Block(eqx.Module):
        norm: eqx.nn.LayerNorm
        attn: eqx.nn.MultiheadAttention
        mlp: eqx.nn.MLP

        def __init__(self, width, key):
            k1, k2 = jax.random.split(key)
            self.norm = eqx.nn.LayerNorm(width)
            self.attn = eqx.nn.MultiheadAttention(2, width, key=k1)
            self.mlp = eqx.nn.MLP(width, width, 2 * width, 1, activation=jax.nn.gelu, key=k2)

        def __call__(self, x):
            h = jax.vmap(self.norm)(x)
            x = x + self.attn(h, h, h)
            return x + jax.vmap(self.mlp)(jax.vmap(self.norm)(x))

    class TinyLM(eqx.Module):
        embed: eqx.nn.Embedding
        block: Block
        final_norm: eqx.nn.LayerNorm
        head: eqx.nn.Linear

        def __init__(self, vocab, width, key):
            k1, k2, k3 = jax.random.split(key, 3)
            self.embed = eqx.nn.Embedding(vocab, width, key=k1)
            self.block = Block(width, k2)
            self.final_norm = eqx.nn.LayerNorm(width)
            self.head = eqx.nn.Linear(width, vocab, key=k3)

        def __call__(self, tokens):
            x = self.block(jax.vmap(self.embed)(tokens))
            return jax.vmap(self.head)(jax.vmap(self.final_norm)(x))

    return TinyLM(vocab=16, width=8, key=key)


def run(steps: int = 5) -> None:
    """Prints the seed policy, its explain table on a tiny Equinox LM, and real adamw steps."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import optax

    print("policy:", SEED_POLICY, sep="\n")
    model = _equinox_model(jax.random.key(0))
    print("\nEquinox: policy.explain(model)\n")
    print(SEED_POLICY.explain(model))

    tokens = jax.random.randint(jax.random.key(1), (12,), 0, 16)
    targets = jnp.roll(tokens, -1)
    tx = optax.adamw(1e-2, weight_decay=0.1, mask=SEED_POLICY.for_equinox)
    opt_state = tx.init(eqx.filter(model, eqx.is_array))

    @eqx.filter_jit
    def step(model, opt_state):
        def loss_fn(model):
            logits = model(tokens)
            return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

        loss, grads = eqx.filter_value_and_grad(loss_fn)(model)
        params = eqx.filter(model, eqx.is_array)
        updates, opt_state = tx.update(grads, opt_state, params)
        return eqx.apply_updates(model, updates), opt_state, loss

    print(f"\n{steps} optax.adamw steps, mask=policy.for_equinox:")
    for i in range(steps):
        model, opt_state, loss = step(model, opt_state)
        print(f"  step {i + 1}: loss {float(loss):.4f}")
