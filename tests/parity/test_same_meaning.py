"""The same rule means the same on the same layer in every framework.

Each test builds one small model in the frameworks that have its layers (Equinox, Flax
Linen read by names and traced, Flax NNX as a module and as a State, Haiku by names and
traced) and explains one policy on each: the decisions must agree.
"""

from __future__ import annotations

import re

import equinox as eqx
import flax.linen as nn
import haiku as hk
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import decaymask as dm

KEY = jax.random.key(0)


def decided(policy: dm.Policy, tree, **options) -> dict[str, tuple[str, bool]]:
    """path -> (layer kind, decayed) of every parameter."""
    return {row.path: (row.leaf.layer, row.decay) for row in policy.explain(tree, **options)}


MIN_NDIM_2 = dm.Policy(dm.decay(min_ndim=2))


# A norm over several axes keeps one gain per feature: a vector in every framework.


class LinenNorms(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.LayerNorm(feature_axes=(-2, -1), name="norm")(x)
        return nn.RMSNorm(feature_axes=(-2, -1), name="rms")(x)


class EquinoxNorms(eqx.Module):
    norm: eqx.nn.LayerNorm
    rms: eqx.nn.RMSNorm

    def __init__(self):
        self.norm = eqx.nn.LayerNorm((3, 4))
        self.rms = eqx.nn.RMSNorm((3, 4), use_bias=False)


def haiku_norms(x):
    x = hk.LayerNorm(axis=(-2, -1), create_scale=True, create_offset=True,
                     param_axis=(-2, -1), name="norm")(x)
    return hk.RMSNorm(axis=(-2, -1), param_axis=(-2, -1), name="rms")(x)


def test_a_norm_over_several_axes_holds_vectors_in_every_framework():
    x = jnp.ones((2, 3, 4))
    expected = {
        "norm/scale": ("layer_norm", False),
        "norm/bias": ("layer_norm", False),
        "rms/scale": ("rms_norm", False),
    }
    linen = LinenNorms()
    variables = linen.init(KEY, x)
    assert decided(MIN_NDIM_2, variables) == expected
    assert decided(MIN_NDIM_2, variables, module=linen, args=(x,)) == expected
    assert decided(MIN_NDIM_2, EquinoxNorms()) == {
        "norm/weight": ("layer_norm", False),
        "norm/bias": ("layer_norm", False),
        "rms/weight": ("rms_norm", False),
    }
    transformed = hk.transform(haiku_norms)
    params = transformed.init(KEY, x)
    haiku = {"norm/scale": ("layer_norm", False), "norm/offset": ("layer_norm", False),
             "rms/scale": ("rms_norm", False)}
    assert decided(MIN_NDIM_2, params, framework="haiku") == haiku
    assert decided(MIN_NDIM_2, params, fn=transformed, args=(x,)) == haiku


def test_a_prelu_slope_is_one_scalar_in_every_framework():
    # Equinox keeps a slope given as an array in that array's shape: (1,) is one slope
    # broadcast over the input, as Flax's () is.
    class LinenAct(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.PReLU(name="act")(x)

    class NnxAct(nnx.Module):
        def __init__(self):
            self.act = nnx.PReLU()

    class EquinoxAct(eqx.Module):
        act: eqx.nn.PReLU

    policy = dm.Policy(dm.decay(min_ndim=1))
    expected = {"act/negative_slope": ("prelu", False)}
    x = jnp.ones((2, 4))
    linen = LinenAct()
    variables = linen.init(KEY, x)
    assert decided(policy, variables) == expected
    assert decided(policy, variables, module=linen, args=(x,)) == expected
    assert decided(policy, NnxAct()) == expected
    assert decided(policy, nnx.state(NnxAct(), nnx.Param)) == expected
    assert decided(policy, EquinoxAct(eqx.nn.PReLU(jnp.array([0.25])))) == expected
    assert decided(policy, EquinoxAct(eqx.nn.PReLU())) == expected
    # A slope per channel stays a vector.
    per_channel = EquinoxAct(eqx.nn.PReLU(jnp.full((4, 1, 1), 0.25)))
    assert decided(policy, per_channel) == {"act/negative_slope": ("prelu", True)}


def test_a_channels_first_haiku_conv_is_a_conv_and_its_bias_a_vector():
    # Haiku keeps the bias of a conv over NCHW data as (out, 1, 1), as Equinox does.
    def haiku_conv(x):
        return hk.Conv2D(5, 3, data_format="NCHW", name="conv")(x)

    class EquinoxConv(eqx.Module):
        conv: eqx.nn.Conv2d

    x = jnp.ones((1, 2, 6, 6))
    transformed = hk.transform(haiku_conv)
    params = transformed.init(KEY, x)
    assert params["conv"]["b"].shape == (5, 1, 1)
    expected = {"conv/w": ("conv", True), "conv/b": ("conv", False)}
    assert decided(MIN_NDIM_2, params, framework="haiku") == expected
    assert decided(MIN_NDIM_2, params, fn=transformed, args=(x,)) == expected
    equinox = EquinoxConv(eqx.nn.Conv2d(2, 5, 3, key=KEY))
    assert decided(MIN_NDIM_2, equinox) == {"conv/weight": ("conv", True),
                                            "conv/bias": ("conv", False)}


# A layer scale holds gains: its lone `scale` does not make it a norm.

NORMS_SPARED = dm.Policy(dm.no_decay(layer="norm"), dm.decay())


class LinenLayerScale(nn.Module):
    @nn.compact
    def __call__(self, x):
        return x * self.param("scale", nn.initializers.ones, (x.shape[-1],))[None]


class LinenBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        return LinenLayerScale(name="ls1")(x)


class EquinoxLayerScale(eqx.Module):
    scale: jax.Array


class EquinoxBlock(eqx.Module):
    ls1: EquinoxLayerScale


class NnxLayerScale(nnx.Module):
    def __init__(self, dim):
        self.scale = nnx.Param(jnp.ones(dim))


class NnxBlock(nnx.Module):
    def __init__(self, dim):
        self.ls1 = NnxLayerScale(dim)


class HaikuLayerScale(hk.Module):
    def __call__(self, x):
        return x * hk.get_parameter("scale", (x.shape[-1],), init=jnp.ones)[None]


def haiku_block(x):
    return HaikuLayerScale(name="ls1")(x)


def test_a_layer_scale_is_not_a_norm_in_any_framework():
    x = jnp.ones((2, 4))
    expected = {"ls1/scale": ("unknown", True)}
    linen = LinenBlock()
    variables = linen.init(KEY, x)
    assert decided(NORMS_SPARED, variables) == expected
    assert decided(NORMS_SPARED, variables, module=linen, args=(x,)) == expected
    assert decided(NORMS_SPARED, EquinoxBlock(EquinoxLayerScale(jnp.ones(4)))) == expected
    assert decided(NORMS_SPARED, NnxBlock(4)) == expected
    assert decided(NORMS_SPARED, nnx.state(NnxBlock(4), nnx.Param)) == expected
    transformed = hk.transform(haiku_block)
    params = transformed.init(KEY, x)
    assert decided(NORMS_SPARED, params, framework="haiku") == expected
    assert decided(NORMS_SPARED, params, fn=transformed, args=(x,)) == expected
    roles = {row.leaf.role for row in NORMS_SPARED.explain(params, framework="haiku")}
    assert roles == {"gain"}


# An einsum layer's kernel layout is read off its equation wherever the layer is known.


class LinenMixer(nn.Module):
    equation: str | None = "btd,dnh->btnh"
    at_call: str | None = None

    @nn.compact
    def __call__(self, x):
        mix = nn.Einsum((4, 2, 3), self.equation, name="mix")
        return mix(x) if self.at_call is None else mix(x, einsum_str=self.at_call)


class NnxMixer(nnx.Module):
    def __init__(self):
        self.mix = nnx.Einsum("btd,dnh->btnh", (4, 2, 3), rngs=nnx.Rngs(0))


def test_an_einsum_layout_is_its_equation_in_linen_traced_as_in_nnx():
    policy = dm.presets.muon()
    x = jnp.ones((1, 5, 4))
    nnx_dims = policy.muon_dims(NnxMixer())
    expected = nnx_dims["mix"]["kernel"]
    assert (expected.reduction_axis, expected.output_axis) == ((0,), (1, 2))
    for linen in (LinenMixer(), LinenMixer(equation=None, at_call="btd,dnh->btnh")):
        variables = linen.init(KEY, x)
        dims = policy.muon_dims(variables, module=linen, args=(x,))
        assert dims["params"]["mix"]["kernel"] == expected
        assert dims["params"]["mix"]["bias"] is None
    # By names there is no equation: the error says to give the classes, and offers no
    # function of the layer (with no layer to call it on).
    variables = LinenMixer().init(KEY, x)
    with pytest.raises(ValueError, match=re.escape(
        "give the layer classes (Linen params: module=model, args=(x,); an NNX State: the "
        "model itself), or teach the layout with dm.register_layer(cls, kind, "
        "matrix_axes={'kernel': ((...), (...))}).")) as info:
        policy.muon_dims(variables)
    assert "lambda layer" not in str(info.value)


# A layer decaymask does not know is unknown because nothing said a kind: "via class"
# would claim decaymask knows the class.


class EquinoxProjection(eqx.Module):
    gate: jax.Array


class EquinoxHolder(eqx.Module):
    proj: EquinoxProjection
    body: eqx.nn.Sequential


class NnxProjection(nnx.Module):
    def __init__(self):
        self.gate = nnx.Param(jnp.ones((3, 4, 2)))


class NnxHolder(nnx.Module):
    def __init__(self):
        self.proj = NnxProjection()


class LinenProjection(nn.Module):
    @nn.compact
    def __call__(self, x):
        return jnp.einsum("bi,iho->bho", x, self.param("gate", nn.initializers.ones, (4, 2, 3)))


class LinenHolder(nn.Module):
    @nn.compact
    def __call__(self, x):
        return LinenProjection(name="proj")(x)


class HaikuProjection(hk.Module):
    def __call__(self, x):
        gate = hk.get_parameter("gate", (4, 2, 3), init=jnp.ones)
        return jnp.einsum("bi,iho->bho", x, gate)


def haiku_holder(x):
    return HaikuProjection(name="proj")(x)


def test_an_unknown_class_is_unknown_via_what_was_read_in_every_framework():
    everything = dm.Policy(dm.decay())

    def sources(tree, **options):
        return {row.path: (row.leaf.layer, row.leaf.kind_source)
                for row in everything.explain(tree, **options)}

    linear = eqx.nn.Linear(2, 2, key=KEY)
    equinox = EquinoxHolder(EquinoxProjection(jnp.ones((3, 4, 2))), eqx.nn.Sequential([linear]))
    assert sources(equinox) == {
        "proj/gate": ("unknown", "name"),
        "body/layers/0/weight": ("linear", "class"),
        "body/layers/0/bias": ("linear", "class"),
    }
    assert sources(NnxHolder()) == {"proj/gate": ("unknown", "name")}
    # Where the arrays were read too (by names, or a traced class no table knows), they
    # fit no kind: unknown via content, alike in NNX, Linen and Haiku.
    read = {"proj/gate": ("unknown", "content")}
    assert sources(nnx.state(NnxHolder(), nnx.Param)) == read
    x = jnp.ones((2, 4))
    linen = LinenHolder()
    variables = linen.init(KEY, x)
    assert sources(variables) == read
    assert sources(variables, module=linen, args=(x,)) == read
    transformed = hk.transform(haiku_holder)
    params = transformed.init(KEY, x)
    assert sources(params, framework="haiku") == read
    assert sources(params, fn=transformed, args=(x,)) == read
