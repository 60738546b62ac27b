"""What names say, read the same in every framework: glued words, layer scales in every
spelling, additive offsets.

The models here are written from their originals' code (class names, attribute and
parameter names, shapes); each test says where the original comes from.
"""

from __future__ import annotations

import equinox as eqx
import flax.linen as nn
import haiku as hk
import jax
import jax.numpy as jnp
import pytest
from flax import nnx, traverse_util

import decaymask as dm
from decaymask.core._names import PART_WORDS, name_kind, says_layer_scale, unglued, words
from decaymask.core._roles import owner_trait, role_from_name

from helpers import assert_decays_exactly, zero_grad_updates


@pytest.fixture(autouse=True)
def _broadcasting():
    """The originals multiply a (dim,) vector into (batch, ..., dim) activations."""
    with jax.numpy_rank_promotion("allow"):
        yield


# --- words ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, expected",
    [
        # transformers' FlaxBertLayer / FlaxGPT2Block with add_cross_attention.
        ("crossattention", ("cross", "attention")),
        ("selfattention", ("self", "attention")),
        ("crossattn", ("cross", "attn")),
        ("layerscale", ("layer", "scale")),
        # A LayerScaleBlock's own parameter (a Flax port of CaiT).
        ("LayerScaleBlock", ("layer", "scale", "block")),
        # Fewest parts: a known word stays whole inside a glued one.
        ("prelayernorm", ("pre", "layernorm")),
        ("posembed_input", ("pos", "embed", "input")),
        ("lambda1", ("lambda", "1")),
    ],
)
def test_glued_words_are_split(name, expected):
    assert words(name) == expected


@pytest.mark.parametrize(
    "word",
    # Known words, words no split covers, and splits that would need a part under
    # three letters (`in`, `ln`, `bn`).
    ["layernorm", "attention", "roberta", "shortcut", "normal", "embedder", "tokenizer",
     "attentions", "downsample", "gelu", "inner", "kiln", "lnorm", "bnorm"],
)
def test_other_words_stay_whole(word):
    assert unglued(word) == (word,)


def test_every_word_roles_read_can_be_a_part():
    """A word the role tables look for is a part of glued words too (`posembed`,
    `clstoken`), so extending a table extends what glued names can say."""
    from decaymask.core import _roles

    tables = [_roles._POSITION_WORDS, _roles._TABLE_WORDS, _roles._TOKEN_WORDS,
              _roles._BUFFER_WORDS, _roles._GAIN_FIRST_WORDS, _roles._OFFSET_NAMES]
    missing = {w for table in tables for w in table if len(w) >= 3 and w not in PART_WORDS}
    assert not missing


@pytest.mark.parametrize(
    "name, kind",
    [
        ("crossattention", "attention"),
        ("selfattention", "attention"),
        ("ln_cross_attn", "layer_norm"),
        ("encoder_attn", "attention"),
        ("FlaxBertAttention", "attention"),
    ],
)
def test_glued_names_say_their_kind(name, kind):
    assert name_kind(name) == kind


# --- layer scales ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, says",
    [
        ("LayerScale", True),
        ("FlaxDinov2LayerScale", True),
        ("layer_scale1", True),
        ("layerscale", True),
        ("ls1", True),
        ("hat_ls3", True),
        ("LayerScaleBlock", True),
        # A layer kind's head word wins.
        ("layer_scale_norm", False),
        ("ls_proj_linear", False),
        ("scale", False),
        ("layers", False),
    ],
)
def test_names_that_say_layer_scale(name, says):
    assert says_layer_scale(name) is says


@pytest.mark.parametrize(
    "owner, name, role",
    [
        ("layer_scale1", "lambda1", "gain"),  # transformers' FlaxDinov2LayerScale
        ("LayerScale_0", "scale", "gain"),
        ("LayerScale_0", "lambda", "gain"),
        ("ls1", "weight", "gain"),
        ("layer_scale", "beta", "bias"),  # an additive offset stays a bias
        ("grn", "gamma", "gain"),
        ("grn", "beta", "bias"),
        ("", "gamma1", "gain"),
        ("", "lambda_2", "gain"),
        ("", "layerscale", "gain"),
        ("", "offset", "bias"),
        ("block", "beta_1", "bias"),
        ("block", "gamma_2", "gain"),
        ("block", "beta_table", "other"),
    ],
)
def test_roles_of_layer_scales_and_offsets(owner, name, role):
    assert role_from_name("unknown", name, owner) == role


def test_a_norm_says_bias_for_its_beta():
    """A norm's ``gamma``/``beta`` pair (Keras naming, Haiku's ``offset``): beta is a bias."""
    assert role_from_name("layer_norm", "gamma") == "scale"
    assert role_from_name("layer_norm", "beta") == "bias"
    assert role_from_name("batch_norm", "offset") == "bias"


def test_owner_trait():
    assert owner_trait("position_embeddings") == "position"
    assert owner_trait("layer_scale2") == "layer_scale"
    assert owner_trait("ls FlaxDinov2LayerScale") == "layer_scale"
    assert owner_trait("dense") == ""


# A Linen port of transformers' FlaxDinov2Layer: `layer_scale1` and `layer_scale2` are
# FlaxDinov2LayerScale modules whose one parameter is `lambda1`, multiplying each
# residual branch.


class Dinov2LayerScale(nn.Module):
    hidden_size: int = 8

    def setup(self):
        self.lambda1 = self.param("lambda1", nn.initializers.ones, (self.hidden_size,))

    def __call__(self, x):
        return self.lambda1 * x


class Dinov2Layer(nn.Module):
    def setup(self):
        self.norm1 = nn.LayerNorm()
        self.attention = nn.Dense(8)
        self.layer_scale1 = Dinov2LayerScale()
        self.norm2 = nn.LayerNorm()
        self.mlp = nn.Dense(8)
        self.layer_scale2 = Dinov2LayerScale()

    def __call__(self, x):
        x = self.layer_scale1(self.attention(self.norm1(x))) + x
        return self.layer_scale2(self.mlp(self.norm2(x))) + x


# A Flax LayerScale as written in jax_examples (classification/implements/layer_scale.py):
# one parameter `scale`, applied as `inputs * self.scale`, used by auto name.


class LayerScale(nn.Module):
    projection_dim: int = 8

    def setup(self):
        self.scale = self.param("scale", nn.initializers.ones, (self.projection_dim,))

    def __call__(self, inputs):
        return inputs * self.scale


# ConvNeXt-V2's global response normalization in Flax: `gamma * (x * nx) + beta + x`.


class GRN(nn.Module):
    @nn.compact
    def __call__(self, x):
        gamma = self.param("gamma", nn.initializers.zeros, (x.shape[-1],))
        beta = self.param("beta", nn.initializers.zeros, (x.shape[-1],))
        gx = jnp.linalg.norm(x, axis=(1, 2), keepdims=True)
        nx = gx / (gx.mean(axis=-1, keepdims=True) + 1e-6)
        return gamma * (x * nx) + beta + x


class ConvNeXtV2Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        y = nn.Conv(8, (3, 3), feature_group_count=8, name="dwconv")(x)
        y = nn.LayerNorm(name="norm")(y)
        y = nn.Dense(16, name="pwconv1")(y)
        y = GRN(name="grn")(y)
        y = nn.Dense(8, name="pwconv2")(y)
        return LayerScale(name="LayerScale_0")(y) + x


def _linen_paths(mask):
    return {"/".join(k): v for k, v in traverse_util.flatten_dict(mask).items()}


@pytest.mark.parametrize("traced", [False, True], ids=["names", "traced"])
def test_linen_dinov2_layer_scale_is_a_gain(traced):
    model = Dinov2Layer()
    x = jnp.ones((1, 4, 8))
    params = model.init(jax.random.key(0), x)["params"]
    policy = dm.presets.standard()
    kw = {"module": model, "args": (x,)} if traced else {}
    mask = _linen_paths(policy.for_flax(params, **kw))
    assert mask == {
        "norm1/scale": False, "norm1/bias": False,
        "attention/kernel": True, "attention/bias": False,
        "layer_scale1/lambda1": False,
        "norm2/scale": False, "norm2/bias": False,
        "mlp/kernel": True, "mlp/bias": False,
        "layer_scale2/lambda1": False,
    }
    rows = {r.path: r for r in policy.explain(params, **kw)}
    assert rows["layer_scale1/lambda1"].role == "gain"
    updates = zero_grad_updates(params, policy.for_flax(params, **kw))
    assert float(jnp.abs(updates["layer_scale2"]["lambda1"]).max()) == 0.0


@pytest.mark.parametrize("traced", [False, True], ids=["names", "traced"])
def test_linen_grn_offset_and_layer_scale(traced):
    model = ConvNeXtV2Block()
    x = jnp.ones((1, 4, 4, 8))
    params = model.init(jax.random.key(0), x)["params"]
    policy = dm.presets.standard()
    kw = {"module": model, "args": (x,)} if traced else {}
    rows = {r.path: r for r in policy.explain(params, **kw)}
    roles = {path: (row.role, row.decay) for path, row in rows.items()}
    assert roles == {
        "dwconv/kernel": ("weight", True), "dwconv/bias": ("bias", False),
        "norm/scale": ("scale", False), "norm/bias": ("bias", False),
        "pwconv1/kernel": ("weight", True), "pwconv1/bias": ("bias", False),
        "grn/gamma": ("gain", False), "grn/beta": ("bias", False),
        "pwconv2/kernel": ("weight", True), "pwconv2/bias": ("bias", False),
        "LayerScale_0/scale": ("gain", False),
    }
    # `decay(param="bias")` reaches GRN's offset as it reaches every other bias.
    biases = _linen_paths(dm.Policy(dm.decay(param="bias")).for_flax(params, **kw))
    assert biases["grn/beta"] is True


# An Equinox port of transformers' Dinov2Layer (`layer_scale1.lambda1`) and of timm's
# ConvNeXt-V2 block (`grn.gamma`, `grn.beta` shaped (1, 1, dim)).


class EqxDinov2LayerScale(eqx.Module):
    lambda1: jax.Array

    def __init__(self, dim):
        self.lambda1 = jnp.ones((dim,))


class EqxGRN(eqx.Module):
    gamma: jax.Array
    beta: jax.Array

    def __init__(self, dim):
        self.gamma = jnp.zeros((1, 1, dim))
        self.beta = jnp.zeros((1, 1, dim))


class EqxBlock(eqx.Module):
    norm1: eqx.nn.LayerNorm
    mlp: eqx.nn.Linear
    layer_scale1: EqxDinov2LayerScale
    grn: EqxGRN

    def __init__(self, key):
        self.norm1 = eqx.nn.LayerNorm(8)
        self.mlp = eqx.nn.Linear(8, 8, key=key)
        self.layer_scale1 = EqxDinov2LayerScale(8)
        self.grn = EqxGRN(8)


def test_equinox_layer_scale_and_offset():
    model = EqxBlock(jax.random.key(0))
    policy = dm.presets.standard()
    mask = policy.for_equinox(model)
    assert mask.layer_scale1.lambda1 is False
    assert mask.grn.gamma is False
    assert mask.grn.beta is False
    assert mask.mlp.weight is True
    rows = {r.path: r.role for r in policy.explain(model)}
    assert rows["layer_scale1/lambda1"] == "gain"
    assert rows["grn/beta"] == "bias"
    params = eqx.filter(model, eqx.is_array)
    updates = zero_grad_updates(params, mask)
    assert float(jnp.abs(updates.layer_scale1.lambda1).max()) == 0.0


# NNX: a LayerScale as DINOv3's Flax ports write it, with DINOv2's `lambda1`.


class NnxLayerScale(nnx.Module):
    def __init__(self, dim):
        self.lambda1 = nnx.Param(jnp.full((dim,), 1e-5))

    def __call__(self, x):
        return x * self.lambda1[...]


class NnxBlock(nnx.Module):
    def __init__(self, rngs):
        self.norm = nnx.LayerNorm(8, rngs=rngs)
        self.fc = nnx.Linear(8, 8, rngs=rngs)
        self.ls1 = NnxLayerScale(8)


def test_nnx_layer_scale_is_a_gain():
    model = NnxBlock(nnx.Rngs(0))
    policy = dm.presets.standard()
    rows = {r.path: (r.role, r.decay) for r in policy.explain(model)}
    assert rows["ls1/lambda1"] == ("gain", False)
    assert rows["fc/kernel"] == ("weight", True)


# Haiku: a layer scale module (default name `layer_scale`) with a parameter `scale`.


class HkLayerScale(hk.Module):
    def __call__(self, x):
        scale = hk.get_parameter("scale", (x.shape[-1],), init=jnp.ones)
        return x * scale


def test_haiku_layer_scale_is_a_gain():
    def forward(x):
        return HkLayerScale(name="layer_scale")(hk.Linear(8)(x))

    fn = hk.transform(forward)
    x = jnp.ones((1, 8))
    params = fn.init(jax.random.key(0), x)
    policy = dm.presets.standard()
    for kw in ({}, {"fn": fn, "args": (x,)}):
        rows = {r.path: (r.layer, r.role, r.decay)
                for r in policy.explain(params, framework="haiku", **kw)}
        assert rows["layer_scale/scale"][1:] == ("gain", False), kw
    updates = zero_grad_updates(params, policy.for_haiku(params, fn=fn, args=(x,)))
    assert_decays_exactly(params, updates, {
        "['layer_scale']['scale']": False,
        "['linear']['b']": False,
        "['linear']['w']": True,
    })
