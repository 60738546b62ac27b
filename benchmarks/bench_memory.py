"""A mask for a 7B-parameter model without allocating its parameters.

Builds an abstract transformer with Llama-7B's shapes (32 layers, width 4096, MLP
11008, vocabulary 32000, untied output head: 6.74 billion parameters, 27 GB in
float32) and its decaymask mask, in Equinox (``eqx.filter_eval_shape``), Flax NNX
(``nnx.eval_shape``) and Flax Linen (``jax.eval_shape(model.init, ...)``). Each
framework runs in its own process so the peak resident memories
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) are separate: once after importing
jax, decaymask and the framework, once at the end. The peak stays in the hundreds of
megabytes, far below the parameters' 27 GB. The first mask call also imports the
framework's adapter; the second is the cost of the mask alone.

    python benchmarks/bench_memory.py
    python benchmarks/bench_memory.py --layers 80 --width 8192 --hidden 28672   # 78 B, peak 246 MiB
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

FRAMEWORKS = ("equinox", "nnx", "linen")


def equinox_llama(a):
    import equinox as eqx
    import jax

    class Attention(eqx.Module):
        q: eqx.nn.Linear
        k: eqx.nn.Linear
        v: eqx.nn.Linear
        o: eqx.nn.Linear

        def __init__(self, width, key):
            kq, kk, kv, ko = jax.random.split(key, 4)
            self.q = eqx.nn.Linear(width, width, use_bias=False, key=kq)
            self.k = eqx.nn.Linear(width, width, use_bias=False, key=kk)
            self.v = eqx.nn.Linear(width, width, use_bias=False, key=kv)
            self.o = eqx.nn.Linear(width, width, use_bias=False, key=ko)

    class MLP(eqx.Module):
        gate: eqx.nn.Linear
        up: eqx.nn.Linear
        down: eqx.nn.Linear

        def __init__(self, width, hidden, key):
            kg, ku, kd = jax.random.split(key, 3)
            self.gate = eqx.nn.Linear(width, hidden, use_bias=False, key=kg)
            self.up = eqx.nn.Linear(width, hidden, use_bias=False, key=ku)
            self.down = eqx.nn.Linear(hidden, width, use_bias=False, key=kd)

    class Layer(eqx.Module):
        attn_norm: eqx.nn.RMSNorm
        attn: Attention
        mlp_norm: eqx.nn.RMSNorm
        mlp: MLP

        def __init__(self, width, hidden, key):
            ka, km = jax.random.split(key)
            self.attn_norm = eqx.nn.RMSNorm(width, use_bias=False)
            self.attn = Attention(width, ka)
            self.mlp_norm = eqx.nn.RMSNorm(width, use_bias=False)
            self.mlp = MLP(width, hidden, km)

    class Llama(eqx.Module):
        embed: eqx.nn.Embedding
        layers: list
        norm: eqx.nn.RMSNorm
        lm_head: eqx.nn.Linear

        def __init__(self, key):
            keys = jax.random.split(key, a.layers + 2)
            self.embed = eqx.nn.Embedding(a.vocab, a.width, key=keys[0])
            self.layers = [Layer(a.width, a.hidden, k) for k in keys[2:]]
            self.norm = eqx.nn.RMSNorm(a.width, use_bias=False)
            self.lm_head = eqx.nn.Linear(a.width, a.vocab, use_bias=False, key=keys[1])

    return eqx.filter_eval_shape(Llama, jax.random.key(0))


def nnx_llama(a):
    from flax import nnx

    class Attention(nnx.Module):
        def __init__(self, width, rngs):
            self.q = nnx.Linear(width, width, use_bias=False, rngs=rngs)
            self.k = nnx.Linear(width, width, use_bias=False, rngs=rngs)
            self.v = nnx.Linear(width, width, use_bias=False, rngs=rngs)
            self.o = nnx.Linear(width, width, use_bias=False, rngs=rngs)

    class MLP(nnx.Module):
        def __init__(self, width, hidden, rngs):
            self.gate = nnx.Linear(width, hidden, use_bias=False, rngs=rngs)
            self.up = nnx.Linear(width, hidden, use_bias=False, rngs=rngs)
            self.down = nnx.Linear(hidden, width, use_bias=False, rngs=rngs)

    class Layer(nnx.Module):
        def __init__(self, width, hidden, rngs):
            self.attn_norm = nnx.RMSNorm(width, rngs=rngs)
            self.attn = Attention(width, rngs)
            self.mlp_norm = nnx.RMSNorm(width, rngs=rngs)
            self.mlp = MLP(width, hidden, rngs)

    class Llama(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(a.vocab, a.width, rngs=rngs)
            self.layers = nnx.List([Layer(a.width, a.hidden, rngs) for _ in range(a.layers)])
            self.norm = nnx.RMSNorm(a.width, rngs=rngs)
            self.lm_head = nnx.Linear(a.width, a.vocab, use_bias=False, rngs=rngs)

    return nnx.eval_shape(lambda: Llama(nnx.Rngs(0)))


def linen_llama(a):
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    class Layer(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.RMSNorm(name="attn_norm")(x)
            q, k, v = (nn.Dense(a.width, use_bias=False, name=n)(h) for n in "qkv")
            w = jax.nn.softmax(q @ jnp.swapaxes(k, -1, -2) / a.width ** 0.5)
            x = x + nn.Dense(a.width, use_bias=False, name="o")(w @ v)
            h = nn.RMSNorm(name="mlp_norm")(x)
            g = nn.Dense(a.hidden, use_bias=False, name="gate")(h)
            u = nn.Dense(a.hidden, use_bias=False, name="up")(h)
            return x + nn.Dense(a.width, use_bias=False, name="down")(jax.nn.silu(g) * u)

    class Llama(nn.Module):
        @nn.compact
        def __call__(self, tokens):
            x = nn.Embed(a.vocab, a.width, name="embed")(tokens)
            for i in range(a.layers):
                x = Layer(name=f"layers_{i}")(x)
            return nn.Dense(a.vocab, use_bias=False, name="lm_head")(nn.RMSNorm(name="norm")(x))

    tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    return jax.eval_shape(Llama().init, jax.random.key(0), tokens)["params"]


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(a) -> dict:
    import _models as M
    import jax
    import numpy as np

    import decaymask as dm

    build = {"equinox": equinox_llama, "nnx": nnx_llama, "linen": linen_llama}[a.child]
    __import__({"equinox": "equinox", "nnx": "flax.nnx", "linen": "flax.linen"}[a.child])
    after_imports = peak_mib()
    start = time.perf_counter()
    model = build(a)
    t_model = time.perf_counter() - start
    policy = dm.presets.gpt()
    if a.child == "equinox":
        make_mask, params = policy.for_equinox, model
    elif a.child == "nnx":
        from flax import nnx

        make_mask, params = policy.for_flax, nnx.state(model, nnx.Param)
    else:
        make_mask, params = policy.for_flax, model
    start = time.perf_counter()
    mask = make_mask(model)  # the first call also imports the adapter
    t_first = time.perf_counter() - start
    start = time.perf_counter()
    mask = make_mask(model)
    t_mask = time.perf_counter() - start
    leaves = [x for x in jax.tree_util.tree_leaves(params) if M.is_array_like(x)]
    decided = [m for m in jax.tree_util.tree_leaves(mask) if isinstance(m, bool)]
    assert len(decided) == len(leaves), (len(decided), len(leaves))
    n_params = M.count_params(params)
    decayed = sum(int(np.prod(x.shape)) for x, m in zip(leaves, decided) if m)
    nbytes = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in leaves)
    return {
        "framework": a.child, "params": n_params, "decayed": decayed, "leaves": len(leaves),
        "nbytes": nbytes, "t_model": t_model, "t_first": t_first, "t_mask": t_mask,
        "rss_imports": after_imports, "rss_peak": peak_mib(),
        "abstract": all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=11008)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--frameworks", nargs="+", choices=FRAMEWORKS,
                        default=list(FRAMEWORKS))
    parser.add_argument("--child", choices=FRAMEWORKS, help=argparse.SUPPRESS)
    a = parser.parse_args(argv)
    if a.child:
        print(json.dumps(child(a)))
        return

    import _models as M

    print(f"Machine: {M.environment()}")
    print(f"Model: {a.layers} layers, width {a.width}, MLP {a.hidden}, vocabulary "
          f"{a.vocab}, RMSNorm, no biases, untied head (Llama-7B shapes at the defaults); "
          f"policy dm.presets.gpt(); one process per framework.")
    rows = []
    for framework in a.frameworks:
        cmd = [sys.executable, __file__, "--child", framework, "--layers", str(a.layers),
               "--width", str(a.width), "--hidden", str(a.hidden), "--vocab", str(a.vocab)]
        r = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True)
                       .stdout.strip().splitlines()[-1])
        rows.append([
            framework, f"{r['params'] / 1e9:.2f} B", f"{r['decayed'] / 1e9:.2f} B",
            f"{r['leaves']:,}", f"{r['nbytes'] / 1e9:.1f} GB",
            "yes" if r["abstract"] else "NO",
            f"{r['t_model']:.2f}", f"{r['t_first'] * 1e3:.1f}", f"{r['t_mask'] * 1e3:.1f}",
            f"{r['rss_imports']:.0f}", f"{r['rss_peak']:.0f}",
        ])
    print()
    print(M.table(
        ["framework", "parameters", "decayed", "leaves", "float32 size", "all abstract",
         "model build s", "first mask ms", "mask ms", "RSS after imports MiB",
         "peak RSS MiB"],
        rows,
    ))


if __name__ == "__main__":
    main()
