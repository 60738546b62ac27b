"""What a module owns against what its name says, read on one layer's arrays.

Stacked axes (``eqx.filter_vmap``, ``nnx.vmap``, a user-named ``nn.scan``) and layout
axes (an Equinox-style conv bias ``(out, 1, ..., 1)``) are not one layer's: content
judged with them contradicts a name it agrees with. And a rule on ``min_ndim`` counts
one layer's layout-neutral rank, the same in every framework.
"""

from __future__ import annotations

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

import decaymask as dm
from decaymask.core._infer import Reading, content_kind, read_kind
from helpers import assert_decays_exactly, zero_grad_updates

# -- The shared reading -----------------------------------------------------------------


@pytest.mark.parametrize(
    "name, arrays, expected",
    [
        # Stacked: the shared leading axis removed, the arrays are what the name says.
        ("LayerNorm", {"weight": (3, 4), "bias": (3, 4)}, Reading("layer_norm", "name", 1)),
        ("MyLinear", {"kernel": (3, 4, 5)}, Reading("linear", "name", 1)),
        ("patch_embed", {"weight": (2, 7, 16)}, Reading("embedding", "name", 1)),
        # Equinox's conv layout: the bias's trailing axes are layout, not a projection's.
        ("PhysicsConv", {"weight": (8, 4, 3), "bias": (8, 1)}, Reading("conv", "name", 0, (("bias", 1),))),
        ("MyConv", {"weight": (3, 8, 4, 3, 3), "bias": (3, 8, 1, 1)}, Reading("conv", "name", 1, (("bias", 2),))),
        # A contradiction that no stack explains: content decides.
        ("FlaxConv1D", {"kernel": (6, 4), "bias": (6,)}, Reading("linear", "content")),
        ("dense", {"kernel": (3, 4, 5), "bias": (5,)}, Reading("conv", "content")),
        ("norm", {"weight": (4, 4), "bias": (4,)}, Reading("linear", "content")),
    ],
)
def test_read_kind_judges_one_layer(name, arrays, expected):
    assert read_kind(name, arrays) == expected


def test_read_kind_removes_no_axes_the_adapter_knows_are_one_layer():
    arrays = {"weight": (3, 4), "bias": (3, 4)}
    assert read_kind("LayerNorm", arrays, one_layer=True) == Reading("linear", "content")
    # Ranks alone show no stack.
    assert read_kind("LayerNorm", {"weight": 2, "bias": 2}) == Reading("linear", "content")


def test_a_bias_that_is_the_kernels_trailing_axes_is_no_conv_layout():
    # A multi-axis projection (in, heads, 1) with bias (heads, 1): linear, as before.
    assert content_kind({"kernel": (8, 8, 1), "bias": (8, 1)}) == "linear"
    assert content_kind({"weight": (8, 4, 3), "bias": (8, 1)}) == "conv"

# -- Equinox -------------------------------------------------------------------------


class LayerNorm(eqx.Module):
    """A third-party layer norm (not eqx.nn.LayerNorm): PyTorch's names and shapes."""

    weight: jax.Array
    bias: jax.Array
    eps: float = eqx.field(static=True)

    def __init__(self, dim: int, eps: float = 1e-5):
        self.weight = jnp.ones((dim,))
        self.bias = jnp.zeros((dim,))
        self.eps = eps

    def __call__(self, x):
        mean = x.mean(-1, keepdims=True)
        var = x.var(-1, keepdims=True)
        return (x - mean) / jnp.sqrt(var + self.eps) * self.weight + self.bias


class PhysicsConv(eqx.Module):
    """A convolution in Equinox's layout written without eqx.nn.Conv (pdequinox-style):
    weight (out, in, *kernel), bias (out, 1, ..., 1)."""

    num_spatial_dims: int = eqx.field(static=True)
    weight: jax.Array
    bias: jax.Array | None

    def __init__(self, num_spatial_dims, in_channels, out_channels, kernel_size, *, key):
        self.num_spatial_dims = num_spatial_dims
        kernel = (kernel_size,) * num_spatial_dims
        self.weight = jax.random.normal(key, (out_channels, in_channels, *kernel))
        self.bias = jnp.zeros((out_channels,) + (1,) * num_spatial_dims)


class Block(eqx.Module):
    norm: LayerNorm
    linear: eqx.nn.Linear

    def __init__(self, key):
        self.norm = LayerNorm(4)
        self.linear = eqx.nn.Linear(4, 4, key=key)


def _rows(report):
    return {r.path: (r.layer, r.leaf.kind_source, r.leaf.ndim, r.decay) for r in report}


def test_equinox_filter_vmap_stacked_third_party_norm_stays_a_norm():
    keys = jax.random.split(jax.random.key(0), 3)
    blocks = eqx.filter_vmap(Block)(keys)
    assert blocks.norm.weight.shape == (3, 4)
    policy = dm.presets.standard()
    rows = _rows(policy.explain(blocks))
    assert rows["norm/weight"] == ("layer_norm", "name", 1, False)
    assert rows["norm/bias"] == ("layer_norm", "name", 1, False)
    assert rows["linear/weight"] == ("linear", "class", 2, True)
    # The stacked norm reads as the single one does.
    assert _rows(policy.explain(LayerNorm(4)))["weight"] == ("layer_norm", "name", 1, False)
    params = eqx.filter(blocks, eqx.is_inexact_array)
    updates = zero_grad_updates(params, policy.for_equinox(params))
    assert_decays_exactly(
        params,
        updates,
        {".norm.weight": False, ".norm.bias": False, ".linear.weight": True, ".linear.bias": False},
    )


def test_equinox_conv_in_equinox_layout_is_a_conv_alone_and_stacked():
    policy = dm.Policy(dm.decay(), dm.no_decay(layer="conv"))
    conv = PhysicsConv(1, 4, 8, 3, key=jax.random.key(0))
    assert (conv.weight.shape, conv.bias.shape) == ((8, 4, 3), (8, 1))
    rows = _rows(policy.explain(conv))
    # The bias (8, 1) is one vector: its trailing axis is Equinox's layout.
    assert rows == {"weight": ("conv", "name", 3, False), "bias": ("conv", "name", 1, False)}
    keys = jax.random.split(jax.random.key(1), 2)
    stacked = eqx.filter_vmap(lambda k: PhysicsConv(2, 4, 8, 3, key=k))(keys)
    assert (stacked.weight.shape, stacked.bias.shape) == ((2, 8, 4, 3, 3), (2, 8, 1, 1))
    report = policy.explain(stacked)
    assert _rows(report) == {
        "weight": ("conv", "name", 4, False),
        "bias": ("conv", "name", 1, False),
    }
    assert [r.leaf.batch_axes for r in report] == [1, 1]
    params = eqx.filter(stacked, eqx.is_inexact_array)
    updates = zero_grad_updates(params, policy.for_equinox(params))
    assert_decays_exactly(params, updates, {".weight": False, ".bias": False})


def test_equinox_contradicting_content_still_decides():
    # transformers' GPT-2 Conv1D is a linear layer: weight (in, out), bias (out,).
    class Conv1D(eqx.Module):
        weight: jax.Array
        bias: jax.Array

    rows = _rows(dm.Policy(dm.decay(layer="linear")).explain(Conv1D(jnp.ones((4, 6)), jnp.zeros(6))))
    assert rows["weight"] == ("linear", "content", 2, True)
    # A (out, in) weight and an (out,) bias share their leading axis: no stack either.
    rows = _rows(dm.Policy(dm.decay(layer="linear")).explain(Conv1D(jnp.ones((6, 4)), jnp.zeros(6))))
    assert rows["weight"] == ("linear", "content", 2, True)


# -- Flax NNX: the module walk and the State walk ---------------------------------------


class NnxLayerNorm(nnx.Module):
    def __init__(self, dim: int):
        self.weight = nnx.Param(jnp.ones((dim,)))
        self.bias = nnx.Param(jnp.zeros((dim,)))


NnxLayerNorm.__name__ = NnxLayerNorm.__qualname__ = "LayerNorm"


class NnxBlock(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.norm = NnxLayerNorm(4)
        self.dense = nnx.Linear(4, 4, use_bias=False, rngs=rngs)


@nnx.vmap(in_axes=0, out_axes=0)
def _nnx_blocks(key):
    return NnxBlock(nnx.Rngs(key))


def _nnx_rows(report):
    return [(r.path, r.layer, r.leaf.batch_axes, r.leaf.ndim, r.decay) for r in report]


def test_nnx_vmap_stacked_norm_and_bias_free_linear_agree_in_both_walks():
    model = _nnx_blocks(jax.random.split(jax.random.key(0), 3))
    assert model.dense.kernel.shape == (3, 4, 4)
    policy = dm.Policy(dm.decay(min_ndim=2), dm.no_decay(layer=("conv", "norm")))
    expected = [
        ("dense/kernel", "linear", 1, 2, True),
        ("norm/bias", "layer_norm", 1, 1, False),
        ("norm/weight", "layer_norm", 1, 1, False),
    ]
    assert _nnx_rows(policy.explain(model)) == expected
    state = nnx.state(model, nnx.Param)
    assert _nnx_rows(policy.explain(state)) == expected
    muon = dm.Policy(dm.decay(layer="linear", param="weight"))
    by_state = dict(nnx.to_flat_state(muon.muon_dims_for_flax(state)))
    by_model = dict(nnx.to_flat_state(muon.muon_dims_for_flax(model)))
    assert by_state == by_model
    assert by_state[("dense", "kernel")] == optax.contrib.MuonDimensionNumbers((1,), (2,))


def test_nnx_state_of_a_lone_stacked_kernel_no_name_speaks_for_is_ambiguous():
    @nnx.vmap(in_axes=0, out_axes=0)
    def make(key):
        return nnx.Linear(4, 4, use_bias=False, rngs=nnx.Rngs(key))

    model = make(jax.random.split(jax.random.key(0), 3))
    policy = dm.Policy(dm.decay(layer="linear"))
    assert [(r.path, r.layer, r.leaf.batch_axes) for r in policy.explain(model)] == [
        ("kernel", "linear", 1)
    ]
    # By names alone, a bias-free (k, in, out) conv kernel looks the same: said so, not
    # read silently as a conv.
    state = nnx.state(model, nnx.Param)
    rows = policy.explain(state)
    assert [(r.path, r.layer, r.leaf.kind_source) for r in rows] == [("kernel", "conv", "ambiguous")]
    with pytest.warns(dm.PolicyWarning, match=r"\(kernel\) say different kinds"):
        policy.for_flax(state)


def test_nnx_state_reads_a_conv_named_out_as_the_module_walk_does():
    class Head(nnx.Module):
        def __init__(self, rngs):
            self.out = nnx.Conv(3, 4, (3, 3), rngs=rngs)

    model = Head(nnx.Rngs(0))
    policy = dm.Policy(dm.decay(), dm.no_decay(layer="conv"))
    by_model = [(r.path, r.layer, r.decay) for r in policy.explain(model)]
    assert by_model == [("out/bias", "conv", False), ("out/kernel", "conv", False)]
    by_state = [(r.path, r.layer, r.decay) for r in policy.explain(nnx.state(model, nnx.Param))]
    assert by_state == by_model


def test_nnx_state_attention_projections_stay_linear():
    class Encoder(nnx.Module):
        def __init__(self, rngs):
            # Not a name that says attention: its projections say it.
            self.mixer = nnx.MultiHeadAttention(2, 8, qkv_features=8, decode=False, rngs=rngs)

    model = Encoder(nnx.Rngs(0))
    rows = dm.Policy(dm.decay(layer="linear")).explain(nnx.state(model, nnx.Param))
    kinds = {r.path: r.layer for r in rows}
    assert kinds["mixer/out/kernel"] == "linear"
    assert kinds["mixer/query/kernel"] == "linear"
    assert model.mixer.out.kernel.shape == (2, 4, 8)


# -- Flax Linen: a user-named nn.scan, read by names ------------------------------------


class LinenLayerNorm(nn.Module):
    @nn.compact
    def __call__(self, x):
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],))
        bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],))
        return x * jnp.broadcast_to(weight, x.shape) + jnp.broadcast_to(bias, x.shape)


LinenLayerNorm.__name__ = LinenLayerNorm.__qualname__ = "LayerNorm"


class LinenBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        x = LinenLayerNorm(name="norm")(x)
        return nn.Dense(4, use_bias=False, name="dense")(x), None


class LinenModel(nn.Module):
    @nn.compact
    def __call__(self, x):
        scan = nn.scan(LinenBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
        return scan(name="blocks")(x, None)[0]


def test_linen_user_named_scan_norm_and_bias_free_dense_read_by_names():
    model, x = LinenModel(), jnp.ones((2, 4))
    params = model.init(jax.random.key(0), x)["params"]
    assert params["blocks"]["dense"]["kernel"].shape == (3, 4, 4)
    policy = dm.Policy(dm.decay(min_ndim=2), dm.no_decay(layer=("conv", "norm")))
    expected = [
        ("blocks/dense/kernel", "linear", 1, 2, True),
        ("blocks/norm/bias", "layer_norm", 1, 1, False),
        ("blocks/norm/weight", "layer_norm", 1, 1, False),
    ]
    assert _nnx_rows(policy.explain(params)) == expected
    assert _nnx_rows(policy.explain(params, module=model, args=(x,))) == expected
    updates = zero_grad_updates(params, policy.for_flax(params))
    assert_decays_exactly(
        params,
        updates,
        {
            "['blocks']['dense']['kernel']": True,
            "['blocks']['norm']['bias']": False,
            "['blocks']['norm']['weight']": False,
        },
    )


# -- min_ndim: one layer's layout-neutral rank in every framework -----------------------


def test_min_ndim_reads_weight_norm_gains_alike_across_frameworks():
    policy = dm.Policy(dm.decay(min_ndim=2))
    wrapped = eqx.nn.WeightNorm(eqx.nn.Linear(3, 4, key=jax.random.key(0)))
    assert wrapped.g.shape == (4, 1)
    rows = {r.path: (r.role, r.leaf.ndim, r.decay) for r in policy.explain(wrapped)}
    assert rows["g"] == ("gain", 1, False)
    assert rows["layer/weight"] == ("weight", 2, True)
    params = eqx.filter(wrapped, eqx.is_inexact_array)
    updates = zero_grad_updates(params, policy.for_equinox(params))
    assert_decays_exactly(
        params, updates, {".layer.weight": True, ".layer.bias": False, ".g": False}
    )
    # A stacked WeightNorm: the gain is still one vector a layer.
    stacked = eqx.filter_vmap(
        lambda k: eqx.nn.WeightNorm(eqx.nn.Conv2d(2, 4, 3, key=k))
    )(jax.random.split(jax.random.key(1), 2))
    assert stacked.g.shape == (2, 4, 1, 1, 1)
    rows = {r.path: (r.leaf.batch_axes, r.leaf.ndim, r.decay) for r in policy.explain(stacked)}
    assert rows["g"] == (1, 1, False)
    assert rows["layer/bias"] == (1, 1, False)
    assert rows["layer/weight"] == (1, 4, True)

    class Linen(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.WeightNorm(nn.Dense(4))(x)

    variables = Linen().init(jax.random.key(0), jnp.ones((1, 3)))
    linen = {r.leaf.name: (r.role, r.leaf.ndim, r.decay) for r in policy.explain(variables)}
    assert linen["scale"] == ("gain", 1, False)
    assert linen["kernel"] == ("weight", 2, True)


@pytest.mark.parametrize("spatial", [1, 2, 3])
def test_min_ndim_reads_conv_biases_alike_across_frameworks(spatial):
    policy = dm.Policy(dm.decay(min_ndim=2))
    conv = eqx.nn.Conv(spatial, 2, 4, 3, key=jax.random.key(0))
    equinox = {r.leaf.name: (r.leaf.ndim, r.decay) for r in policy.explain(conv)}
    flax = nn.Conv(4, (3,) * spatial)
    variables = flax.init(jax.random.key(0), jnp.ones((1,) + (5,) * spatial + (2,)))
    linen = {r.leaf.name: (r.leaf.ndim, r.decay) for r in policy.explain(variables)}
    assert equinox == {"weight": (spatial + 2, True), "bias": (1, False)}
    assert linen == {"kernel": (spatial + 2, True), "bias": (1, False)}


def test_min_ndim_reads_a_norm_over_several_axes_as_one_gain_per_feature():
    norm = eqx.nn.LayerNorm((3, 4))
    rows = {r.path: (r.leaf.ndim, r.decay) for r in dm.Policy(dm.decay(min_ndim=2)).explain(norm)}
    assert rows == {"weight": (1, False), "bias": (1, False)}


def test_stacked_arrays_agreeing_with_the_name_still_count_one_layer():
    # A user's Linear stacked by eqx.filter_vmap: weight (n, out, in), bias (n, out). The
    # bias's two axes read as a projection's, which agrees with the name; one layer's
    # are a matrix and a vector all the same.
    assert read_kind("Linear", {"weight": (3, 8, 4), "bias": (3, 8)}) == Reading("linear", "name", 1)
    # A multi-axis projection: its bias is its kernel's trailing axes, one layer.
    assert read_kind("Dense", {"kernel": (4, 2, 8), "bias": (2, 8)}) == Reading("linear", "name")
    # Without a name, the same bias shows the stack.
    assert read_kind("thing", {"kernel": (3, 4, 8), "bias": (3, 8)}) == Reading("linear", "content", 1)
    # A norm's scale of two axes beside its bias may be a norm over two axes: agreeing
    # with the name, no stack is read into it.
    assert read_kind("ln", {"scale": (3, 4), "bias": (3, 4)}) == Reading("layer_norm", "name")
    # Layers stacked along another axis (in, n, out) with a bias (out, n): no guess.
    assert read_kind("dense", {"kernel": (3, 4, 3), "bias": (3, 4)}) == Reading("linear", "name")

    class Linear(eqx.Module):
        weight: jax.Array
        bias: jax.Array

    stacked = eqx.filter_vmap(lambda k: Linear(jax.random.normal(k, (8, 4)), jnp.zeros(8)))(
        jax.random.split(jax.random.key(0), 3)
    )
    rows = _rows(dm.Policy(dm.decay(min_ndim=2)).explain(stacked))
    assert rows == {"weight": ("linear", "name", 2, True), "bias": ("linear", "name", 1, False)}
