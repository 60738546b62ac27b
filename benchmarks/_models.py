"""Transformer-shaped models for the benchmarks, in Equinox, Flax Linen and Flax NNX.

Every model is a token embedding, ``depth`` pre-norm blocks (LayerNorm, multi-head
attention with biased query/key/value/output projections, LayerNorm, a two-layer MLP)
and a final LayerNorm. A block owns 16 parameter leaves in each framework, the
embedding one and the final norm two, so ``depth`` sets the leaf count:
``leaves = 16 * depth + 3``.

The models are abstract (``jax.ShapeDtypeStruct`` leaves): building them allocates no
parameter memory, so the benchmarks scale to any size. Building a deep model under one
``eval_shape`` is slow (NNX: quadratic in the depth), so by default one block is built
under ``eval_shape`` and copied; ``check_assembled`` proves that gives the same model.
The hand-written mask recipes a user would write today live here too, next to the
decaymask policies they are compared against.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

LEAVES_PER_BLOCK = 16
EXTRA_LEAVES = 3  # embedding table, final norm scale and bias


def depth_for(leaves: int) -> int:
    """The number of blocks whose model has about ``leaves`` parameter leaves."""
    return max(1, round((leaves - EXTRA_LEAVES) / LEAVES_PER_BLOCK))


ARRAY_TYPES = (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct)


def is_array_like(x: Any) -> bool:
    return isinstance(x, ARRAY_TYPES)


# --------------------------------------------------------------------------- Equinox


@functools.cache
def _equinox_classes():
    import equinox as eqx

    class Block(eqx.Module):
        ln1: eqx.nn.LayerNorm
        attn: eqx.nn.MultiheadAttention
        ln2: eqx.nn.LayerNorm
        fc1: eqx.nn.Linear
        fc2: eqx.nn.Linear

        def __init__(self, width, heads, hidden, *, key):
            k1, k2, k3 = jax.random.split(key, 3)
            self.ln1 = eqx.nn.LayerNorm(width)
            self.attn = eqx.nn.MultiheadAttention(
                heads,
                width,
                use_query_bias=True,
                use_key_bias=True,
                use_value_bias=True,
                use_output_bias=True,
                key=k1,
            )
            self.ln2 = eqx.nn.LayerNorm(width)
            self.fc1 = eqx.nn.Linear(width, hidden, key=k2)
            self.fc2 = eqx.nn.Linear(hidden, width, key=k3)

    class Transformer(eqx.Module):
        embed: eqx.nn.Embedding
        blocks: list
        ln_f: eqx.nn.LayerNorm

        def __init__(self, embed, blocks, ln_f):
            self.embed = embed
            self.blocks = list(blocks)
            self.ln_f = ln_f

    return Block, Transformer


def _fresh(tree: Any) -> Any:
    """A copy of an abstract tree with new containers and new leaves."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if is_array_like(x) else x, tree
    )


def equinox_model(depth: int, width: int = 8, heads: int = 2, hidden: int = 16,
                  vocab: int = 32, *, whole: bool = False, concrete: bool = False) -> Any:
    """An abstract Equinox transformer built by ``eqx.filter_eval_shape``.

    With ``whole=True`` the whole constructor runs under one ``eqx.filter_eval_shape``
    (about 35 s at 100,000 leaves); by default one block is built abstractly and copied,
    which gives the same structure and abstract leaves in a fraction of the time.
    ``concrete=True`` builds the real model, with arrays.
    """
    import equinox as eqx

    Block, Transformer = _equinox_classes()

    def parts(n, key):
        keys = jax.random.split(key, n + 1)
        embed = eqx.nn.Embedding(vocab, width, key=keys[0])
        blocks = [Block(width, heads, hidden, key=k) for k in keys[1:]]
        return embed, blocks, eqx.nn.LayerNorm(width)

    if concrete:
        return Transformer(*parts(depth, jax.random.key(0)))
    if whole:
        return eqx.filter_eval_shape(lambda k: Transformer(*parts(depth, k)),
                                     jax.random.key(0))
    embed, (block,), ln_f = eqx.filter_eval_shape(lambda k: parts(1, k), jax.random.key(0))
    return Transformer(embed, [block] + [_fresh(block) for _ in range(depth - 1)], ln_f)


def equinox_policy():
    import decaymask as dm

    return dm.Policy(dm.decay(layer="linear"), dm.decay(layer="layer_norm", param="bias"))


def equinox_hand_mask(model: Any) -> Any:
    """The classic recipe: every parameter of every Linear, the bias of every LayerNorm.

    Non-array leaves (the float rate and bool flag of attention dropout) get ``None``,
    as in ``eqx.filter(model, eqx.is_array)``, so the result is comparable leaf for
    leaf with decaymask's.
    """
    import equinox as eqx
    import jax.tree_util as jtu

    def set_mask(x):
        if isinstance(x, eqx.nn.Linear):
            return jtu.tree_map(lambda _: True, x)
        if isinstance(x, eqx.nn.LayerNorm):
            return eqx.tree_at(lambda n: n.bias, jtu.tree_map(lambda _: False, x), True)
        return False if is_array_like(x) else None

    return jtu.tree_map(
        set_mask, model, is_leaf=lambda x: isinstance(x, (eqx.nn.Linear, eqx.nn.LayerNorm))
    )


# --------------------------------------------------------------------------- Linen


@functools.cache
def _linen_classes():
    import flax.linen as nn

    class Block(nn.Module):
        width: int
        heads: int
        hidden: int

        @nn.compact
        def __call__(self, x):
            x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads)(nn.LayerNorm()(x))
            h = nn.Dense(self.hidden)(nn.LayerNorm()(x))
            return x + nn.Dense(self.width)(jax.nn.gelu(h))

    class Transformer(nn.Module):
        depth: int
        width: int
        heads: int
        hidden: int
        vocab: int

        @nn.compact
        def __call__(self, tokens):
            x = nn.Embed(self.vocab, self.width)(tokens)
            for _ in range(self.depth):
                x = Block(self.width, self.heads, self.hidden)(x)
            return nn.LayerNorm()(x)

    return Block, Transformer


def linen_module(depth: int, width: int = 8, heads: int = 2, hidden: int = 16,
                 vocab: int = 32) -> Any:
    _, Transformer = _linen_classes()
    return Transformer(depth, width, heads, hidden, vocab)


def linen_params(depth: int, width: int = 8, heads: int = 2, hidden: int = 16,
                 vocab: int = 32, *, whole: bool = False) -> Any:
    """Abstract Linen params, from ``jax.eval_shape`` of ``init``.

    With ``whole=True``, ``jax.eval_shape(model.init, ...)["params"]`` of the whole model
    (about 150 s at 100,000 leaves: the trace runs every block's forward pass); by
    default the params of one block come from ``jax.eval_shape(Block(...).init, ...)``
    and are copied under ``Block_0`` .. ``Block_{depth-1}``, which gives the same dict.
    """
    import flax.linen as nn

    key = jax.random.key(0)
    tokens = jax.ShapeDtypeStruct((1, 4), jnp.int32)
    if whole:
        module = linen_module(depth, width, heads, hidden, vocab)
        return jax.eval_shape(module.init, key, tokens)["params"]
    Block, _ = _linen_classes()
    x = jax.ShapeDtypeStruct((1, 4, width), jnp.float32)
    block = jax.eval_shape(Block(width, heads, hidden).init, key, x)["params"]
    embed = jax.eval_shape(nn.Embed(vocab, width).init, key, tokens)["params"]
    ln_f = jax.eval_shape(nn.LayerNorm().init, key, x)["params"]
    params = {"Embed_0": embed}
    params.update({f"Block_{i}": _fresh(block) for i in range(depth)})
    params["LayerNorm_0"] = ln_f
    return params


def linen_policy():
    import decaymask as dm

    return dm.Policy(dm.decay(layer="linear", param="weight"))


def linen_hand_mask(params: Any) -> Any:
    """The usual Linen recipe: decay every ``kernel``, by key name."""
    from flax import traverse_util

    return traverse_util.path_aware_map(lambda path, _: path[-1] == "kernel", params)


# --------------------------------------------------------------------------- NNX


@functools.cache
def _nnx_classes():
    from flax import nnx

    class Block(nnx.Module):
        def __init__(self, width, heads, hidden, *, rngs):
            self.ln1 = nnx.LayerNorm(width, rngs=rngs)
            self.attn = nnx.MultiHeadAttention(heads, width, decode=False, rngs=rngs)
            self.ln2 = nnx.LayerNorm(width, rngs=rngs)
            self.fc1 = nnx.Linear(width, hidden, rngs=rngs)
            self.fc2 = nnx.Linear(hidden, width, rngs=rngs)

    class Transformer(nnx.Module):
        def __init__(self, embed, blocks, ln_f):
            self.embed = embed
            self.blocks = nnx.List(blocks)
            self.ln_f = ln_f

    return Block, Transformer


def nnx_model(depth: int, width: int = 8, heads: int = 2, hidden: int = 16,
              vocab: int = 32, *, whole: bool = False, concrete: bool = False) -> Any:
    """An abstract NNX transformer built under ``nnx.eval_shape``.

    With ``whole=True`` the whole constructor runs in one ``nnx.eval_shape``. That costs
    time quadratic in the depth (flax 0.12.8 on jax 0.10.2: every ``rngs()`` call under
    the trace updates the counter variable, whose ``set_value`` asks the traced value
    for its ``sharding``, and the error message jax builds for that walks the whole
    jaxpr traced so far): 64 blocks take about 11 s, 250 blocks about 8 minutes. By
    default one block is built by ``nnx.eval_shape`` and cloned (``nnx.clone``) ``depth``
    times, which gives a model of the same structure, types and abstract leaves in time
    linear in the depth. ``concrete=True`` builds the real model, with arrays.
    """
    from flax import nnx

    Block, Transformer = _nnx_classes()

    def parts(n, seed=0):
        rngs = nnx.Rngs(seed)
        embed = nnx.Embed(vocab, width, rngs=rngs)
        blocks = [Block(width, heads, hidden, rngs=rngs) for _ in range(n)]
        return embed, blocks, nnx.LayerNorm(width, rngs=rngs)

    if concrete:
        return Transformer(*parts(depth))
    if whole:
        return nnx.eval_shape(lambda: Transformer(*parts(depth)))
    embed, (block,), ln_f = nnx.eval_shape(lambda: parts(1))
    blocks = [block] + [nnx.clone(block) for _ in range(depth - 1)]
    return Transformer(embed, blocks, ln_f)


def check_assembled(depth: int = 3) -> None:
    """Raises unless the assembled abstract models equal the ones built in one piece:
    same structure, same static parts, same shapes and dtypes."""
    from flax import nnx

    def described(tree):
        leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
        return treedef, [(p, getattr(x, "shape", x), getattr(x, "dtype", None))
                         for p, x in leaves]

    def same(a, b, what):
        if described(a) != described(b):
            raise AssertionError(f"{what}: the assembled model differs from the whole one")

    same(equinox_model(depth), equinox_model(depth, whole=True), "equinox")
    same(linen_params(depth), linen_params(depth, whole=True), "linen")
    a, b = nnx_model(depth), nnx_model(depth, whole=True)
    if nnx.graphdef(a) != nnx.graphdef(b):
        raise AssertionError("nnx: the assembled model's graph differs from the whole one")
    same(nnx.state(a), nnx.state(b), "nnx")
    same(haiku_params(depth), haiku_params(depth, whole=True), "haiku")


def nnx_policy():
    return equinox_policy()


def nnx_hand_mask(model: Any) -> Any:
    """The NNX recipe: walk the graph for the layer types, then map the Param state.

    ``nnx.iter_graph`` gives each module with its path; the linear layers' and layer
    norms' paths are collected, then ``nnx.map_state`` over ``nnx.state(model,
    nnx.Param)`` decides each parameter by its owner's path and its own name.
    """
    from flax import nnx

    linear = set()
    norm = set()
    for path, node in nnx.iter_graph(model):
        if isinstance(node, (nnx.Linear, nnx.LinearGeneral)):
            linear.add(tuple(path))
        elif isinstance(node, nnx.LayerNorm):
            norm.add(tuple(path))

    def set_mask(path, _):
        owner = tuple(path[:-1])
        return owner in linear or (owner in norm and path[-1] == "bias")

    return nnx.map_state(set_mask, nnx.state(model, nnx.Param))


# --------------------------------------------------------------------------- Haiku


def _haiku_block(x, width, heads, hidden, name):
    import haiku as hk

    with hk.experimental.name_scope(name):
        ln1 = hk.LayerNorm(-1, True, True, name="ln1")
        attn = hk.MultiHeadAttention(heads, width // heads, model_size=width,
                                     w_init=hk.initializers.VarianceScaling(), name="attn")
        h = ln1(x)
        x = x + attn(h, h, h)
        h = hk.Linear(hidden, name="fc1")(hk.LayerNorm(-1, True, True, name="ln2")(x))
        return x + hk.Linear(width, name="fc2")(jax.nn.gelu(h))


def haiku_transformed(depth: int, width: int = 8, heads: int = 2, hidden: int = 16,
                      vocab: int = 32) -> Any:
    """``hk.transform`` of the transformer: ``embed``, ``block_<i>/...``, ``ln_f``."""
    import haiku as hk

    def f(tokens):
        x = hk.Embed(vocab, width, name="embed")(tokens)
        for i in range(depth):
            x = _haiku_block(x, width, heads, hidden, f"block_{i}")
        return hk.LayerNorm(-1, True, True, name="ln_f")(x)

    return hk.transform(f)


def haiku_params(depth: int, width: int = 8, heads: int = 2, hidden: int = 16,
                 vocab: int = 32, *, whole: bool = False) -> Any:
    """Abstract Haiku params from ``jax.eval_shape`` of ``init``: with ``whole=True``
    of the whole model, by default of a one-block model whose block is copied under
    ``block_0`` .. ``block_{depth-1}`` (the same dict)."""
    key = jax.random.key(0)
    tokens = jax.ShapeDtypeStruct((1, 4), jnp.int32)
    if whole:
        return jax.eval_shape(haiku_transformed(depth, width, heads, hidden, vocab).init,
                              key, tokens)
    one = jax.eval_shape(haiku_transformed(1, width, heads, hidden, vocab).init, key, tokens)
    params = {"embed": one["embed"]}
    block = {k: v for k, v in one.items() if k.startswith("block_0/")}
    for i in range(depth):
        params.update({f"block_{i}/" + k[len("block_0/"):]: _fresh(v)
                       for k, v in block.items()})
    params["ln_f"] = one["ln_f"]
    return params


def haiku_policy():
    return linen_policy()


def haiku_hand_mask(params: Any) -> Any:
    """The usual Haiku recipe: decay every ``w``, by name."""
    import haiku as hk

    return hk.data_structures.map(lambda module, name, _: name == "w", params)


# --------------------------------------------------------------------------- checks


def assert_same_mask(ours: Any, theirs: Any, what: str) -> None:
    """Raises if the two masks differ in structure or in any leaf, naming the path."""
    a, tree_a = jax.tree_util.tree_flatten_with_path(ours, is_leaf=lambda x: x is None)
    b, tree_b = jax.tree_util.tree_flatten_with_path(theirs, is_leaf=lambda x: x is None)
    if len(a) != len(b):
        raise AssertionError(f"{what}: {len(a)} leaves in decaymask's mask, {len(b)} by hand")
    for (path_a, x), (path_b, y) in zip(a, b):
        if jax.tree_util.keystr(path_a) != jax.tree_util.keystr(path_b) or x != y:
            raise AssertionError(
                f"{what}: decaymask {jax.tree_util.keystr(path_a)}={x!r}, "
                f"by hand {jax.tree_util.keystr(path_b)}={y!r}"
            )
    if tree_a != tree_b:
        raise AssertionError(f"{what}: same leaves, different structure:\n{tree_a}\n{tree_b}")


def count_leaves(tree: Any) -> int:
    return sum(1 for x in jax.tree_util.tree_leaves(tree) if is_array_like(x))


def count_params(tree: Any) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree)
               if is_array_like(x))


# --------------------------------------------------------------------------- running


COLLECT_DURING_RUNS = True
"""Whether the garbage collector may run inside a timed call. On by default: the
collections a call's allocations trigger are part of what it costs (``timeit`` turns
them off; ``--no-gc`` does the same here)."""


def timed(fn: Any) -> float:
    """Seconds one call of ``fn`` takes, after a full collection so that no run pays
    for the garbage of the one before."""
    import gc
    import time

    gc.collect()
    if not COLLECT_DURING_RUNS:
        gc.disable()
    try:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    finally:
        gc.enable()


def median_pair(a: Any, b: Any, repeats: int, warmup: int = 1,
                min_time: float = 0.0) -> tuple[float, float]:
    """Median seconds of ``a`` and of ``b``, run alternately so drift hits both alike.

    At least ``repeats`` runs each, more for fast calls: enough that each side takes
    about ``min_time`` seconds in all, the collection before each run included (at
    most 200 runs), so a burst of load on a shared machine cannot move the median of a
    call of a few milliseconds.
    """
    import gc
    import math
    import statistics
    import time

    slowest = 0.0
    for _ in range(warmup):
        slowest = max(slowest, timed(a), timed(b))
    start = time.perf_counter()
    gc.collect()
    per_run = slowest + time.perf_counter() - start
    if per_run > 0:
        repeats = max(repeats, min(200, math.ceil(min_time / per_run)))
    ta, tb = [], []
    for i in range(repeats):
        if i % 2:
            tb.append(timed(b))
            ta.append(timed(a))
        else:
            ta.append(timed(a))
            tb.append(timed(b))
    return statistics.median(ta), statistics.median(tb)


def median(fn: Any, repeats: int, warmup: int = 1) -> float:
    import statistics

    for _ in range(warmup):
        fn()
    return statistics.median(timed(fn) for _ in range(repeats))


def environment() -> str:
    """One line naming the machine and the versions the numbers were measured with."""
    import os
    import platform
    import subprocess
    from importlib.metadata import version

    try:
        with open("/proc/meminfo") as f:
            kib = int(f.readline().split()[1])
        memory = f"{kib / 2**20:.0f} GiB"
    except OSError:
        memory = "? GiB"
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        commit = subprocess.run(
            ["git", "-C", here, "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", here, "status", "--porcelain", "--", "../src"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
        commit += "+local changes" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "?"
    libs = ", ".join(
        f"{name} {version(name)}" for name in ("decaymask", "jax", "optax", "equinox", "flax")
    )
    return (
        f"{os.cpu_count()} CPU cores, {memory}, {jax.default_backend()} backend, "
        f"Python {platform.python_version()}; {libs}; decaymask at {commit}"
    )


def table(header: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table, columns padded so it also reads as plain text."""
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def line(r):
        return "| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |"

    sep = "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def print_profile(profiler: Any, top: int, heading: str) -> None:
    """The ``top`` lines of a cProfile by own and by cumulative time, under a heading."""
    import io
    import pstats

    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out).strip_dirs()
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    print(f"\n### {heading}\n")
    print(out.getvalue())
