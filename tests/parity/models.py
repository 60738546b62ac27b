"""One architecture, built in Equinox, Flax Linen and Flax NNX with the same module names.

:data:`LAYERS` and :data:`BLOCK` list the layers once: the name of each, which layer it
is, and its sizes. :func:`equinox_model`, :func:`linen_variables` (with
:func:`linen_model`) and :func:`nnx_model` build it from those lists;
:func:`module_path` maps a leaf path of any of the three to the spec module that owns
the leaf, and :data:`KINDS` says which decaymask kind each of those layers is, so that
decisions can be compared per (module path, role).

Every kind with a counterpart in all three frameworks is here: linear (also a
multi-axis ``DenseGeneral``/``LinearGeneral``), conv, conv-transpose, embedding, layer,
RMS, group and batch norm, multi-head attention, an MLP, GRU and LSTM cells, PReLU, and
a list of blocks (norm, attention, norm, MLP).

Where the frameworks differ, the builds are made to hold the same parameters:

- Multi-head attention: Flax's projections have biases, Equinox's have none by
  default: Equinox is built with ``use_query_bias``, ``use_key_bias``,
  ``use_value_bias`` and ``use_output_bias`` on.
- RMS norm: Equinox's ``RMSNorm`` has a bias by default, Flax's has none: Equinox is
  built with ``use_bias=False``.
- Epsilons: Equinox's norms default to ``1e-5``, Flax's layer, RMS and group norms to
  ``1e-6``: every norm is built with ``eps``/``epsilon`` = :data:`EPS`.
- Multi-axis linear: Flax's ``DenseGeneral(features=(2, 4))`` and NNX's
  ``LinearGeneral(out_features=(2, 4))`` have a ``(in, 2, 4)`` kernel and a ``(2, 4)``
  bias; Equinox has no multi-axis linear layer, so it is a ``Linear`` with the same total
  output size, a ``(8, in)`` weight and an ``(8,)`` bias.
- Layouts: Equinox keeps weights as ``(out, in, ...)`` and conv biases as
  ``(out, 1, 1)``; Flax keeps kernels as ``(..., in, out)`` and conv biases as
  ``(out,)``; Flax's attention kernels are ``(in, heads, head_dim)`` (query, key, value)
  and ``(heads, head_dim, out)`` (out) with ``(heads, head_dim)`` biases, where
  Equinox has ``(out, in)`` weights and ``(out,)`` biases.
- Recurrent cells hold their arrays differently: Equinox's ``GRUCell`` has
  ``weight_ih``, ``weight_hh``, ``bias`` and ``bias_n``, Linen's keeps six gate layers
  (``ir``, ``iz``, ``in`` with biases, ``hr``, ``hz`` without, ``hn`` with), NNX's two
  (``dense_i`` with a bias, ``dense_h`` without). NNX's has no bias on the hidden
  side of the candidate gate (Equinox's ``bias_n``, Linen's ``hn/bias``), and no
  option adds one: its cell holds 18 bias elements where the others hold 24 (both are
  role ``bias`` of the cell, so decisions still compare). Equinox's ``LSTMCell`` has
  ``weight_ih``, ``weight_hh`` and ``bias``, Linen's and NNX's eight gates (``ii``,
  ``if``, ``ig``, ``io`` without biases, ``hi``, ``hf``, ``hg``, ``ho`` with). The cell
  owns its gates' arrays, so they compare per (cell, role).
- PReLU: the slope is one scalar ``()`` in all three; its initial value differs
  (Equinox ``0.25``, Flax ``0.01``), which decisions do not read.
- Batch norm: Equinox keeps the running statistics behind a ``StateIndex``, Linen in the
  ``batch_stats`` collection, NNX in ``BatchStat`` variables; none is a parameter.
  Equinox's is built with ``mode="ema"``, the running averages Flax keeps (momentum
  0.99 in all three); its default ``"legacy"`` mode holds other state arrays.
- The MLP: Equinox's ``eqx.nn.MLP`` keeps its linear layers in a tuple (``layers/0``),
  the Linen build in a list attribute (named ``layers_0``), the NNX build in an
  ``nnx.List`` (``layers/0``); all three apply GELU between them, and Linen's
  ``nn.Sequential`` is not used because it would number the activation too
  (``layers_0``, ``layers_2``). The list of blocks likewise (``blocks/0``, ``blocks_0``).
- Library-internal names differ: Equinox's attention projections are ``query_proj``,
  ``key_proj``, ``value_proj``, ``output_proj``, Flax's ``query``, ``key``, ``value``,
  ``out``. :func:`module_path` maps them to the spec's names.
- Linen params without a module carry no classes: a group norm's or a batch norm's
  params (``scale`` and ``bias``) look like a layer norm's. The spec names those
  modules ``group_norm`` and ``batch_norm`` so that names alone tell the kind.
"""

from __future__ import annotations

import itertools
import math
import re
from typing import Any

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

WIDTH = 8
HEADS = 2
FF = 16
VOCAB = 11
HIDDEN = 6
CHANNELS = 3
FEATURE_MAPS = 4
GROUPS = 2
GENERAL = (2, 4)  # the output axes of the multi-axis linear layer
EPS = 1e-5
BLOCKS = 2
SEQ = 5
IMAGE = 6

# (name, layer, sizes): the top-level layers, in order. `layer` names what each
# framework's builder makes (`linear_general` is DenseGeneral/LinearGeneral); KINDS
# gives decaymask's kind.
LAYERS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("embed", "embedding", {"num": VOCAB, "features": WIDTH}),
    ("dense", "linear", {"in": WIDTH, "out": WIDTH}),
    ("dense_general", "linear_general", {"in": WIDTH, "out": GENERAL}),
    ("conv", "conv", {"in": CHANNELS, "out": FEATURE_MAPS, "kernel": (3, 3)}),
    ("conv_transpose", "conv_transpose", {"in": FEATURE_MAPS, "out": CHANNELS, "kernel": (3, 3)}),
    ("layer_norm", "layer_norm", {"features": WIDTH}),
    ("rms_norm", "rms_norm", {"features": WIDTH}),
    ("group_norm", "group_norm", {"features": FEATURE_MAPS, "groups": GROUPS}),
    ("batch_norm", "batch_norm", {"features": FEATURE_MAPS}),
    ("gru", "gru", {"in": WIDTH, "hidden": HIDDEN}),
    ("lstm", "lstm", {"in": WIDTH, "hidden": HIDDEN}),
    ("prelu", "prelu", {}),
    ("blocks", "blocks", {"count": BLOCKS}),
    ("head", "linear", {"in": WIDTH, "out": VOCAB}),
)

# (name, layer, sizes): the layers of one block.
BLOCK: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("ln1", "layer_norm", {"features": WIDTH}),
    ("attn", "attention", {"features": WIDTH, "heads": HEADS}),
    ("ln2", "layer_norm", {"features": WIDTH}),
    ("mlp", "mlp", {"sizes": (WIDTH, FF, WIDTH)}),
)

PROJECTIONS = ("query", "key", "value", "out")

_KIND_OF_LAYER = {
    "linear_general": "linear",
    "conv_transpose": "conv",
    "gru": "recurrent",
    "lstm": "recurrent",
}


def _module_paths() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(every module path, the paths of the modules that enclose others)."""
    paths, containers = [], []
    for name, layer, sizes in LAYERS:
        if layer != "blocks":
            paths.append(name)
            continue
        paths.append(name)
        containers.append(name)
        for i in range(sizes["count"]):
            prefix = f"{name}/{i}"
            paths.append(prefix)
            containers.append(prefix)
            for inner, inner_layer, inner_sizes in BLOCK:
                path = f"{prefix}/{inner}"
                paths.append(path)
                if inner_layer == "attention":
                    containers.append(path)
                    paths += [f"{path}/{p}" for p in PROJECTIONS]
                if inner_layer == "mlp":
                    containers.append(path)
                    count = len(inner_sizes["sizes"]) - 1
                    paths += [f"{path}/layers/{j}" for j in range(count)]
    return tuple(paths), tuple(containers)


MODULE_PATHS, CONTAINER_PATHS = _module_paths()
"""Every module of the spec in the spec's own names (``blocks/0/attn/query``), and those
that only enclose other modules (``blocks/0/attn``)."""
LAYER_PATHS = tuple(p for p in MODULE_PATHS if p not in CONTAINER_PATHS)
"""The modules that own arrays: every leaf maps to one of these."""


def _kinds() -> dict[str, str]:
    kinds = {}
    for name, layer, _ in LAYERS:
        if layer != "blocks":
            kinds[name] = _KIND_OF_LAYER.get(layer, layer)
    for path in LAYER_PATHS:
        if path.startswith("blocks/"):
            # ln1, ln2; attention projections and MLP layers are linear layers.
            inner = {n: layer for n, layer, _ in BLOCK}[path.split("/")[2]]
            kinds[path] = "layer_norm" if inner == "layer_norm" else "linear"
    return kinds


KINDS: dict[str, str] = _kinds()
"""The decaymask kind of every layer of the spec, by module path."""

# Library-internal names, mapped to the spec's.
_RENAMES = {
    "query_proj": "query",
    "key_proj": "key",
    "value_proj": "value",
    "output_proj": "out",
}
# Linen names the items of a list attribute `<attribute>_<index>`.
_LIST_ITEM = re.compile(r"([a-z][a-z_]*?)_(\d+)")


def module_path(path: str) -> str:
    """The spec module that owns the leaf at ``path``, a canonical path of any framework.

    Keys are normalised (``blocks_0`` -> ``blocks/0``, ``query_proj`` -> ``query``), then
    the longest spec module path that prefixes the result is the owner: a recurrent
    cell's gate layers (Linen's ``ir``, NNX's ``dense_i``) map to the cell.
    """
    keys: list[str] = []
    for key in path.split("/"):
        item = _LIST_ITEM.fullmatch(key)
        if item is not None:
            keys += [item.group(1), item.group(2)]
        else:
            keys.append(_RENAMES.get(key, key))
    for end in range(len(keys), 0, -1):
        candidate = "/".join(keys[:end])
        if candidate in MODULE_PATHS:
            return candidate
    raise KeyError(f"{path!r} (normalised {'/'.join(keys)!r}) is in no spec module")


def fill(tree: Any, seed: int = 0) -> Any:
    """``tree`` with every ``jax.ShapeDtypeStruct`` replaced by an array of its shape.

    Floating arrays get numbers drawn uniformly from ``[0.5, 1.5)`` (never zero, so a
    decayed array always moves), other arrays zeros. The models are built abstractly
    and filled so, rather than by their layers' initialisers: compiling thirty random
    initialisers (orthogonal ones for the recurrent cells) takes seconds on a CPU, and
    no test reads initial values.
    """
    rng = np.random.default_rng(seed)

    def one(x: Any) -> Any:
        if not isinstance(x, jax.ShapeDtypeStruct):
            return x
        if jnp.issubdtype(x.dtype, jnp.floating):
            return jnp.asarray(rng.uniform(0.5, 1.5, x.shape).astype(x.dtype))
        return jnp.asarray(np.zeros(x.shape, x.dtype))

    return jax.tree.map(one, tree)


# Example inputs, one batch of them.

BATCH = 2


def example_inputs() -> tuple[jax.Array, jax.Array]:
    """(tokens, images): what the Linen model is initialised and traced with."""
    tokens = jnp.zeros((BATCH, SEQ), jnp.int32)
    images = jnp.zeros((BATCH, IMAGE, IMAGE, CHANNELS), jnp.float32)
    return tokens, images


# Equinox


class EqxBlock(eqx.Module):
    ln1: eqx.nn.LayerNorm
    attn: eqx.nn.MultiheadAttention
    ln2: eqx.nn.LayerNorm
    mlp: eqx.nn.MLP


class EqxModel(eqx.Module):
    embed: eqx.nn.Embedding
    dense: eqx.nn.Linear
    dense_general: eqx.nn.Linear
    conv: eqx.nn.Conv2d
    conv_transpose: eqx.nn.ConvTranspose2d
    layer_norm: eqx.nn.LayerNorm
    rms_norm: eqx.nn.RMSNorm
    group_norm: eqx.nn.GroupNorm
    batch_norm: eqx.nn.BatchNorm
    gru: eqx.nn.GRUCell
    lstm: eqx.nn.LSTMCell
    prelu: eqx.nn.PReLU
    blocks: tuple[EqxBlock, ...]
    head: eqx.nn.Linear


def _eqx_layer(layer: str, sizes: dict[str, Any], key: jax.Array) -> Any:
    if layer == "embedding":
        return eqx.nn.Embedding(sizes["num"], sizes["features"], key=key)
    if layer == "linear":
        return eqx.nn.Linear(sizes["in"], sizes["out"], key=key)
    if layer == "linear_general":
        # No multi-axis linear layer in Equinox: the same total output size.
        return eqx.nn.Linear(sizes["in"], math.prod(sizes["out"]), key=key)
    if layer == "conv":
        return eqx.nn.Conv2d(sizes["in"], sizes["out"], sizes["kernel"], padding="SAME", key=key)
    if layer == "conv_transpose":
        return eqx.nn.ConvTranspose2d(
            sizes["in"], sizes["out"], sizes["kernel"], padding="SAME", key=key
        )
    if layer == "layer_norm":
        return eqx.nn.LayerNorm(sizes["features"], eps=EPS)
    if layer == "rms_norm":
        return eqx.nn.RMSNorm(sizes["features"], eps=EPS, use_bias=False)
    if layer == "group_norm":
        return eqx.nn.GroupNorm(sizes["groups"], sizes["features"], eps=EPS)
    if layer == "batch_norm":
        return eqx.nn.BatchNorm(sizes["features"], axis_name="batch", eps=EPS, mode="ema")
    if layer == "gru":
        return eqx.nn.GRUCell(sizes["in"], sizes["hidden"], key=key)
    if layer == "lstm":
        return eqx.nn.LSTMCell(sizes["in"], sizes["hidden"], key=key)
    if layer == "prelu":
        return eqx.nn.PReLU()
    if layer == "attention":
        return eqx.nn.MultiheadAttention(
            sizes["heads"],
            sizes["features"],
            use_query_bias=True,
            use_key_bias=True,
            use_value_bias=True,
            use_output_bias=True,
            key=key,
        )
    if layer == "mlp":
        first, width, last = sizes["sizes"]
        return eqx.nn.MLP(first, last, width, depth=1, activation=jax.nn.gelu, key=key)
    raise ValueError(layer)


def equinox_model(seed: int = 0) -> EqxModel:
    """The spec in Equinox, its arrays filled by :func:`fill`."""
    return fill(eqx.filter_eval_shape(_equinox_model), seed)


def _equinox_model() -> EqxModel:
    keys = iter(jax.random.split(jax.random.key(0), 64))
    fields: dict[str, Any] = {}
    for name, layer, sizes in LAYERS:
        if layer == "blocks":
            fields[name] = tuple(
                EqxBlock(**{n: _eqx_layer(k, s, next(keys)) for n, k, s in BLOCK})
                for _ in range(sizes["count"])
            )
        else:
            fields[name] = _eqx_layer(layer, sizes, next(keys))
    return EqxModel(**fields)


# Flax Linen


class LinenMLP(nn.Module):
    sizes: tuple[int, ...]

    def setup(self) -> None:
        self.layers = [nn.Dense(n) for n in self.sizes[1:]]

    def __call__(self, x: jax.Array) -> jax.Array:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = nn.gelu(x)
        return x


class LinenBlock(nn.Module):
    def setup(self) -> None:
        for name, layer, sizes in BLOCK:
            setattr(self, name, _linen_layer(layer, sizes))

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


def _linen_layer(layer: str, sizes: dict[str, Any]) -> Any:
    if layer == "embedding":
        return nn.Embed(sizes["num"], sizes["features"])
    if layer == "linear":
        return nn.Dense(sizes["out"])
    if layer == "linear_general":
        return nn.DenseGeneral(sizes["out"])
    if layer == "conv":
        return nn.Conv(sizes["out"], sizes["kernel"])
    if layer == "conv_transpose":
        return nn.ConvTranspose(sizes["out"], sizes["kernel"])
    if layer == "layer_norm":
        return nn.LayerNorm(epsilon=EPS)
    if layer == "rms_norm":
        return nn.RMSNorm(epsilon=EPS)
    if layer == "group_norm":
        return nn.GroupNorm(num_groups=sizes["groups"], epsilon=EPS)
    if layer == "batch_norm":
        return nn.BatchNorm(use_running_average=True, epsilon=EPS)
    if layer == "gru":
        return nn.GRUCell(sizes["hidden"])
    if layer == "lstm":
        return nn.LSTMCell(sizes["hidden"])
    if layer == "prelu":
        return nn.PReLU()
    if layer == "attention":
        return nn.MultiHeadDotProductAttention(
            num_heads=sizes["heads"], qkv_features=sizes["features"]
        )
    if layer == "mlp":
        return LinenMLP(sizes["sizes"])
    if layer == "blocks":
        return [LinenBlock() for _ in range(sizes["count"])]
    raise ValueError(layer)


class LinenModel(nn.Module):
    """Every layer of the spec; ``__call__`` runs each once so that all params exist."""

    def setup(self) -> None:
        for name, layer, sizes in LAYERS:
            setattr(self, name, _linen_layer(layer, sizes))

    def __call__(self, tokens: jax.Array, images: jax.Array) -> jax.Array:
        h = self.embed(tokens)
        for block in self.blocks:
            h = block(h)
        h = self.rms_norm(self.layer_norm(h))
        h = self.prelu(self.dense(h))
        h = h + self.dense_general(h).reshape(h.shape)
        carry = jnp.zeros((h.shape[0], HIDDEN), h.dtype)
        gru, _ = self.gru(carry, h[:, 0])
        (_, lstm), _ = self.lstm((carry, carry), h[:, 0])
        c = self.batch_norm(self.group_norm(self.conv(images)))
        c = self.conv_transpose(c)
        return self.head(h).sum() + gru.sum() + lstm.sum() + c.sum()


def linen_model() -> LinenModel:
    return LinenModel()


def linen_variables(seed: int = 0) -> Any:
    """The variables of :func:`linen_model` (``params`` and ``batch_stats``), filled."""
    abstract = jax.eval_shape(linen_model().init, jax.random.key(0), *example_inputs())
    return fill(abstract, seed)


# Flax NNX


class NnxMLP(nnx.Module):
    def __init__(self, sizes: tuple[int, ...], *, rngs: nnx.Rngs):
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in itertools.pairwise(sizes)])

    def __call__(self, x: jax.Array) -> jax.Array:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = nnx.gelu(x)
        return x


class NnxBlock(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
        for name, layer, sizes in BLOCK:
            setattr(self, name, _nnx_layer(layer, sizes, rngs))


def _nnx_layer(layer: str, sizes: dict[str, Any], rngs: nnx.Rngs) -> Any:
    if layer == "embedding":
        return nnx.Embed(sizes["num"], sizes["features"], rngs=rngs)
    if layer == "linear":
        return nnx.Linear(sizes["in"], sizes["out"], rngs=rngs)
    if layer == "linear_general":
        return nnx.LinearGeneral(sizes["in"], sizes["out"], rngs=rngs)
    if layer == "conv":
        return nnx.Conv(sizes["in"], sizes["out"], sizes["kernel"], rngs=rngs)
    if layer == "conv_transpose":
        return nnx.ConvTranspose(sizes["in"], sizes["out"], sizes["kernel"], rngs=rngs)
    if layer == "layer_norm":
        return nnx.LayerNorm(sizes["features"], epsilon=EPS, rngs=rngs)
    if layer == "rms_norm":
        return nnx.RMSNorm(sizes["features"], epsilon=EPS, rngs=rngs)
    if layer == "group_norm":
        return nnx.GroupNorm(sizes["features"], num_groups=sizes["groups"], epsilon=EPS, rngs=rngs)
    if layer == "batch_norm":
        return nnx.BatchNorm(sizes["features"], epsilon=EPS, rngs=rngs)
    if layer == "gru":
        return nnx.GRUCell(sizes["in"], sizes["hidden"], rngs=rngs)
    if layer == "lstm":
        return nnx.LSTMCell(sizes["in"], sizes["hidden"], rngs=rngs)
    if layer == "prelu":
        return nnx.PReLU()
    if layer == "attention":
        # No dropout, so no random state kept: the other two keep none either.
        return nnx.MultiHeadAttention(
            sizes["heads"], sizes["features"], decode=False, keep_rngs=False, rngs=rngs
        )
    if layer == "mlp":
        return NnxMLP(sizes["sizes"], rngs=rngs)
    if layer == "blocks":
        return nnx.List([NnxBlock(rngs=rngs) for _ in range(sizes["count"])])
    raise ValueError(layer)


class NnxModel(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
        for name, layer, sizes in LAYERS:
            setattr(self, name, _nnx_layer(layer, sizes, rngs))


def nnx_model(seed: int = 0) -> NnxModel:
    """The spec in NNX, its arrays filled by :func:`fill`."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: NnxModel(rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, fill(state, seed))
