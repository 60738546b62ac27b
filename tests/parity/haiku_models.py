"""The architecture of :mod:`.models`, built in Haiku with the same module names.

:func:`haiku_transformed` builds every layer of :data:`.models.LAYERS` and
:data:`.models.BLOCK` except PReLU, which Haiku has no module for. Where Haiku differs:

- Haiku names what a module makes by its own names: the MLP's layers are
  ``mlp/~/linear_0`` (``~``: made by the MLP's constructor), the attention output
  projection is ``attn/linear``, the LSTM keeps its gates in one ``lstm/linear`` and the
  GRU its arrays directly (``w_i``, ``w_h``, ``b``). :func:`module_path` maps these to
  the spec's modules.
- No multi-axis linear layer: ``dense_general`` is a ``Linear`` of the same total output
  size, ``(8, 8)`` where Flax's kernel is ``(8, 2, 4)``, and the attention projections are
  ``(in, heads * head_dim)`` where Flax's are ``(in, heads, head_dim)``.
- ``Conv2DTranspose`` keeps ``(*kernel, out, in)`` where Flax keeps ``(*kernel, in, out)``;
  ``BatchNorm`` keeps its scale and offset in the input's rank, ``(1, 1, 1, C)``.
- Haiku's GRU has one bias per gate on the input side (18 elements); Linen's also has
  one on the hidden side of the candidate gate (``hn/bias``).

:func:`from_linen` builds Haiku params from Linen params, array by array, so that one
optimizer step can be compared across the two.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from . import models
from .models import BATCH, BLOCK, EPS, LAYERS


def _layer(name: str, layer: str, sizes: dict[str, Any]) -> Any:
    if layer == "embedding":
        return hk.Embed(sizes["num"], sizes["features"], name=name)
    if layer == "linear":
        return hk.Linear(sizes["out"], name=name)
    if layer == "linear_general":
        return hk.Linear(math.prod(sizes["out"]), name=name)
    if layer == "conv":
        return hk.Conv2D(sizes["out"], sizes["kernel"], name=name)
    if layer == "conv_transpose":
        return hk.Conv2DTranspose(sizes["out"], sizes["kernel"], name=name)
    if layer == "layer_norm":
        return hk.LayerNorm(-1, create_scale=True, create_offset=True, eps=EPS, name=name)
    if layer == "rms_norm":
        return hk.RMSNorm(-1, eps=EPS, name=name)
    if layer == "group_norm":
        return hk.GroupNorm(sizes["groups"], eps=EPS, name=name)
    if layer == "batch_norm":
        return hk.BatchNorm(True, True, 0.99, eps=EPS, name=name)
    if layer == "gru":
        return hk.GRU(sizes["hidden"], name=name)
    if layer == "lstm":
        return hk.LSTM(sizes["hidden"], name=name)
    if layer == "attention":
        heads = sizes["heads"]
        return hk.MultiHeadAttention(
            heads, sizes["features"] // heads, w_init=hk.initializers.VarianceScaling(),
            model_size=sizes["features"], name=name,
        )
    if layer == "mlp":
        return hk.nets.MLP(sizes["sizes"][1:], activation=jax.nn.gelu, name=name)
    raise ValueError(layer)


class HkBlock(hk.Module):
    def __call__(self, x: jax.Array) -> jax.Array:
        layers = {name: _layer(name, layer, sizes) for name, layer, sizes in BLOCK}
        h = layers["ln1"](x)
        x = x + layers["attn"](h, h, h)
        return x + layers["mlp"](layers["ln2"](x))


def _forward(tokens: jax.Array, images: jax.Array) -> jax.Array:
    layers = {name: (layer, sizes) for name, layer, sizes in LAYERS if layer != "prelu"}
    make = {name: (lambda n=name: _layer(n, *layers[n])) for name in layers if name != "blocks"}
    h = make["embed"]()(tokens)
    for i in range(layers["blocks"][1]["count"]):
        h = HkBlock(name=f"blocks_{i}")(h)
    h = make["rms_norm"]()(make["layer_norm"]()(h))
    h = make["dense"]()(h)
    h = h + make["dense_general"]()(h)
    gru = make["gru"]()
    lstm = make["lstm"]()
    g, _ = gru(h[:, 0], gru.initial_state(BATCH))
    cell, _ = lstm(h[:, 0], lstm.initial_state(BATCH))
    c = make["batch_norm"]()(make["group_norm"]()(make["conv"]()(images)), is_training=True)
    c = make["conv_transpose"]()(c)
    return make["head"]()(h).sum() + g.sum() + cell.sum() + c.sum()


def haiku_transformed() -> hk.TransformedWithState:
    return hk.transform_with_state(_forward)


def haiku_params(seed: int = 0) -> tuple[Any, Any]:
    """(params, state) of :func:`haiku_transformed`, filled by :func:`.models.fill`."""
    init = haiku_transformed().init
    params, state = jax.eval_shape(lambda: init(jax.random.key(0), *models.example_inputs()))
    return models.fill(params, seed), models.fill(state, seed)


_BLOCK = re.compile(r"blocks_(\d+)\Z")
_MLP_LAYER = re.compile(r"linear_(\d+)\Z")


def module_path(path: str) -> str:
    """The spec module that owns the Haiku leaf at ``path`` (a canonical path)."""
    keys: list[str] = []
    for key in path.split("/"):
        block = _BLOCK.fullmatch(key)
        layer = _MLP_LAYER.fullmatch(key)
        if key == "~":
            continue
        if block is not None:
            keys += ["blocks", block.group(1)]
        elif layer is not None and keys[-1:] == ["mlp"]:
            keys += ["layers", layer.group(1)]
        elif key == "linear" and keys[-1:] == ["attn"]:
            keys.append("out")
        else:
            keys.append(key)
    return models.module_path("/".join(keys))


# Linen params -> Haiku params, one array (or a few gates) at a time.

_LINEN_NAMES = {"w": "kernel", "b": "bias", "offset": "bias", "scale": "scale", "embeddings": "embedding"}


def _gates(cell: Any, rows: tuple[tuple[str, ...], ...], bias: tuple[str, ...]) -> dict[str, Any]:
    return {
        "w": [jnp.concatenate([cell[g]["kernel"] for g in row], axis=1) for row in rows],
        "b": jnp.concatenate([cell[g]["bias"] for g in bias]),
    }


def linen_source(path: str, linen: Any) -> Any:
    """The array of Linen params ``linen`` that the Haiku leaf at ``path`` holds, in
    Haiku's layout (``None`` for none)."""
    module, name = path.rsplit("/", 1)
    if module == "lstm/linear":
        # Haiku's LSTM: [x; h] @ w, gates in the order i, g, f, o; Linen's hidden gates
        # hold the biases.
        cell = _gates(linen["lstm"], (("ii", "ig", "if", "io"), ("hi", "hg", "hf", "ho")),
                      ("hi", "hg", "hf", "ho"))
        return jnp.concatenate(cell["w"], axis=0) if name == "w" else cell["b"]
    if module == "gru":
        # Haiku's GRU: gates in the order z, r, candidate; biases on the input side.
        cell = _gates(linen["gru"], (("iz", "ir", "in"), ("hz", "hr", "hn")), ("iz", "ir", "in"))
        return {"w_i": cell["w"][0], "w_h": cell["w"][1], "b": cell["b"]}[name]
    keys = module_path(path).split("/")
    node = linen
    for i, key in enumerate(keys):
        if key.isdigit():
            continue
        linen_key = f"{key}_{keys[i + 1]}" if i + 1 < len(keys) and keys[i + 1].isdigit() else key
        node = node[linen_key]
    array = node[_LINEN_NAMES[name]]
    return _TO_HAIKU.get(keys[-1], lambda a: a)(array)


def _flatten_heads(a: Any) -> Any:
    return a.reshape(a.shape[0], -1) if a.ndim == 3 else a.reshape(-1)


_TO_HAIKU: dict[Any, Callable[[Any], Any]] = {
    "dense_general": _flatten_heads,
    "query": _flatten_heads,
    "key": _flatten_heads,
    "value": _flatten_heads,
    "out": lambda a: a.reshape(-1, a.shape[-1]) if a.ndim == 3 else a,
    "conv_transpose": lambda a: a.transpose(0, 1, 3, 2) if a.ndim == 4 else a,
    "batch_norm": lambda a: a.reshape(1, 1, 1, -1),
}


def from_linen(linen_params: Any) -> dict[str, dict[str, Any]]:
    """Haiku params of :func:`haiku_transformed` holding the arrays of ``linen_params``."""
    params, _ = haiku_params()
    return {
        module: {name: np.asarray(linen_source(f"{module}/{name}", linen_params)) for name in arrays}
        for module, arrays in params.items()
    }
