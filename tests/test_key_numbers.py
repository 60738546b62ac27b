"""Module keys that differ only in their numbers are read alike, so a deep model's blocks
are read once: no reading of a name may tell ``blocks_3`` from ``blocks_0``."""

from __future__ import annotations

import re

import jax.numpy as jnp
import pytest

import decaymask as dm
from decaymask.adapters._linen import _signature
from decaymask.adapters._linen._tables import auto_class
from decaymask.core._names import name_kind
from decaymask.core._roles import owner_trait

# Keys from Flax's own auto names, transformers' Flax models, equimo and timm-style
# models: blocks, projections, norms, layer scales, position tables, convs.
KEYS = [
    "Dense", "Conv", "LayerNorm", "Block", "ScanBlock", "VmapDense", "Embed", "h", "layer",
    "layers", "blocks", "block", "fc", "c_fc", "c_attn", "c_proj", "attn", "q_proj",
    "query", "key", "value", "out", "ls", "layer_scale", "lambda", "gamma", "norm", "ln",
    "ln_f", "conv", "conv_dw", "pos_embed", "position_embeddings", "wpe", "wte", "cls_token",
    "embeddings", "stage", "stages", "downsample", "mlp", "w", "stem", "patch_embed",
]


def _traits(key: str) -> tuple:
    auto, stacked = auto_class(key)
    return (auto, stacked, name_kind(key), owner_trait(key), key in {"query", "key", "value", "out"})


@pytest.mark.parametrize("stem", KEYS)
def test_numbers_at_the_end_of_a_key_change_nothing_a_reading_sees(stem):
    for suffix in ("_0", "_3", "_17", "0", "1", "2", "12"):
        key = stem + suffix
        first = re.sub(r"\d+$", "0", key)
        assert _traits(key) == _traits(first), key
        assert _signature.key_traits(key) == _signature.key_traits(first), key


def test_blocks_read_by_their_numberless_key_decide_as_each_block_alone():
    def block():
        return {"ln_1": {"scale": jnp.ones(4), "bias": jnp.zeros(4)},
                "attn": {"c_attn": {"kernel": jnp.ones((4, 12)), "bias": jnp.zeros(12)}},
                "ls1": {"lambda1": jnp.ones(4)}}

    params = {"h": {str(i): block() for i in range(12)}, "ln_f": {"scale": jnp.ones(4)}}
    policy = dm.presets.standard()
    mask = policy.for_flax(params)
    for i in range(12):
        one = policy.for_flax({"h": {str(i): block()}, "ln_f": {"scale": jnp.ones(4)}})
        assert mask["h"][str(i)] == one["h"][str(i)]
    assert mask["h"]["11"] == {"ln_1": {"scale": False, "bias": False},
                               "attn": {"c_attn": {"kernel": True, "bias": False}},
                               "ls1": {"lambda1": False}}
