"""Haiku params: kinds by Haiku's module names and by an abstract trace of ``init``."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import warnings

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import decaymask as dm
from decaymask._check import MaskMismatchError, check_mask
from decaymask._cli import main

from helpers import assert_decays_exactly, flat_with_paths, zero_grad_updates

X = jnp.zeros((2, 3))


def every_module(x: jax.Array) -> jax.Array:
    """One of each Haiku module decaymask knows by name, applied once."""
    h = hk.nets.MLP([4, 3])(x)
    h = hk.Linear(3)(h) + hk.Linear(3)(h)
    h = hk.RMSNorm(-1)(hk.LayerNorm(-1, True, True)(h))
    seq = h[:, None]
    h = h + hk.MultiHeadAttention(2, 2, w_init=hk.initializers.VarianceScaling())(seq, seq, seq)[:, 0, :3]
    e = hk.Embed(10, 3)(jnp.zeros((2,), jnp.int32))
    images = jnp.zeros((1, 5, 5, 3))
    c = hk.Conv2DTranspose(2, 3)(hk.Conv2D(2, 3)(images))
    c = hk.InstanceNorm(True, True)(hk.GroupNorm(2)(c))
    c1 = hk.Conv1D(2, 3)(jnp.zeros((1, 5, 3))) + hk.ConvND(1, 2, 3)(jnp.zeros((1, 5, 3)))
    c3 = hk.Conv3DTranspose(2, 2)(jnp.zeros((1, 3, 3, 3, 1)))
    lstm, _ = hk.LSTM(3)(h, hk.LSTM(3).initial_state(2))
    gru, _ = hk.GRU(3)(h, hk.GRU(3).initial_state(2))
    rnn, _ = hk.VanillaRNN(3)(h, hk.VanillaRNN(3).initial_state(2))
    return h.sum() + e.sum() + c.sum() + c1.sum() + c3.sum() + lstm.sum() + gru.sum() + rnn.sum()


EVERY = hk.transform(every_module)

# path -> (kind, role, class name)
EXPECTED = {
    "conv1_d/b": ("conv", "bias", "Conv1D"),
    "conv1_d/w": ("conv", "weight", "Conv1D"),
    "conv2_d/b": ("conv", "bias", "Conv2D"),
    "conv2_d/w": ("conv", "weight", "Conv2D"),
    "conv2_d_transpose/b": ("conv", "bias", "Conv2DTranspose"),
    "conv2_d_transpose/w": ("conv", "weight", "Conv2DTranspose"),
    "conv3_d_transpose/b": ("conv", "bias", "Conv3DTranspose"),
    "conv3_d_transpose/w": ("conv", "weight", "Conv3DTranspose"),
    "conv_nd/b": ("conv", "bias", "ConvND"),
    "conv_nd/w": ("conv", "weight", "ConvND"),
    "embed/embeddings": ("embedding", "embedding", "Embed"),
    "group_norm/offset": ("group_norm", "bias", "GroupNorm"),
    "group_norm/scale": ("group_norm", "scale", "GroupNorm"),
    "gru/b": ("recurrent", "bias", "GRU"),
    "gru/w_h": ("recurrent", "weight", "GRU"),
    "gru/w_i": ("recurrent", "weight", "GRU"),
    "instance_norm/offset": ("instance_norm", "bias", "InstanceNorm"),
    "instance_norm/scale": ("instance_norm", "scale", "InstanceNorm"),
    "layer_norm/offset": ("layer_norm", "bias", "LayerNorm"),
    "layer_norm/scale": ("layer_norm", "scale", "LayerNorm"),
    "linear/b": ("linear", "bias", "Linear"),
    "linear/w": ("linear", "weight", "Linear"),
    "linear_1/b": ("linear", "bias", "Linear"),
    "linear_1/w": ("linear", "weight", "Linear"),
    "lstm/linear/b": ("recurrent", "bias", "LSTM"),
    "lstm/linear/w": ("recurrent", "weight", "LSTM"),
    "mlp/~/linear_0/b": ("linear", "bias", "Linear"),
    "mlp/~/linear_0/w": ("linear", "weight", "Linear"),
    "mlp/~/linear_1/b": ("linear", "bias", "Linear"),
    "mlp/~/linear_1/w": ("linear", "weight", "Linear"),
    **{
        f"multi_head_attention/{p}/{n}": ("linear", role, "Linear")
        for p in ("query", "key", "value", "linear")
        for n, role in (("w", "weight"), ("b", "bias"))
    },
    "rms_norm/scale": ("rms_norm", "scale", "RMSNorm"),
    "vanilla_rnn/linear/b": ("recurrent", "bias", "VanillaRNN"),
    "vanilla_rnn/linear/w": ("recurrent", "weight", "VanillaRNN"),
    "vanilla_rnn/linear_1/b": ("recurrent", "bias", "VanillaRNN"),
    "vanilla_rnn/linear_1/w": ("recurrent", "weight", "VanillaRNN"),
}

# path -> (reduction, output) of the weights in Haiku's layouts
LAYOUTS = {
    "conv1_d/w": ((0, 1), (2,)),
    "conv2_d/w": ((0, 1, 2), (3,)),
    "conv2_d_transpose/w": ((0, 1, 3), (2,)),
    "conv3_d_transpose/w": ((0, 1, 2, 4), (3,)),
    "conv_nd/w": ((0, 1), (2,)),
    "embed/embeddings": ((0,), (1,)),
    "gru/w_h": ((0,), (1,)),
    "gru/w_i": ((0,), (1,)),
    **{
        p: ((0,), (1,))
        for p, (kind, role, _) in EXPECTED.items()
        if role == "weight" and kind in ("linear", "recurrent") and not p.startswith("gru")
    },
}


def _init(transformed: hk.Transformed, *args):
    """Haiku's own init, compiled once: as eager, but one XLA program instead of one per op."""
    return jax.jit(transformed.init)(jax.random.key(0), *args)


@pytest.fixture(scope="module")
def params():
    return _init(EVERY, X)


def _rows(report):
    return {row.path: row for row in report}


@pytest.mark.parametrize("traced", [False, True], ids=["names", "classes"])
def test_every_haiku_module_has_its_kind_role_class_and_layout(params, traced):
    options = {"fn": EVERY, "args": (X,)} if traced else {}
    rows = _rows(dm.Policy(dm.decay()).explain(params, **options))
    assert {p: (r.layer, r.role, r.layer_type) for p, r in rows.items()} == EXPECTED
    assert {p: r.leaf.matrix_axes for p, r in rows.items() if r.leaf.matrix_axes} == LAYOUTS
    assert {r.leaf.kind_source for r in rows.values()} == {"class" if traced else "name"}
    attention = rows["multi_head_attention/query/w"].leaf.ancestors
    assert [a.kind for a in attention] == ["attention"]
    if traced:
        assert rows["linear/w"].leaf.layer_class is hk.Linear
        assert rows["lstm/linear/w"].leaf.layer_class is hk.LSTM
        assert attention[0].cls is hk.MultiHeadAttention
    else:
        assert all(r.leaf.layer_class is None for r in rows.values())


def test_a_zero_gradient_adamw_step_decays_exactly_the_mask(params):
    policy = dm.presets.standard()
    mask = policy.for_haiku(params)
    assert type(mask) is dict and all(type(m) is dict for m in mask.values())
    decayed = {p: row.decay for p, row in _rows(policy.explain(params)).items()}
    assert decayed["linear/w"] and decayed["conv2_d/w"] and decayed["lstm/linear/w"]
    assert not decayed["linear/b"] and not decayed["layer_norm/scale"]
    assert not decayed["embed/embeddings"]
    expected = {f"['{p.rsplit('/', 1)[0]}']['{p.rsplit('/', 1)[1]}']": d for p, d in decayed.items()}
    for given in (mask, policy.for_haiku):
        assert_decays_exactly(params, zero_grad_updates(params, given, jit=True), expected)


def test_labels_partition_and_rates(params):
    policy = dm.Policy(dm.decay(layer="linear", label="fast"), dm.decay(layer="conv", rate=0.5))
    labels = policy.labels_for_haiku(params)
    assert labels["linear"] == {"w": "fast", "b": "fast"}
    assert labels["conv2_d"] == {"w": "decay", "b": "decay"}
    assert labels["layer_norm"] == {"scale": "no_decay", "offset": "no_decay"}
    rates = policy.rates_for_haiku(params)
    assert rates["conv2_d"] == {"w": 0.5, "b": 0.5} and rates["linear"]["w"] == 1.0
    assert rates["rms_norm"] == {"scale": 0.0}
    for tx in (
        optax.partition(
            {"fast": optax.sgd(1.0), "decay": optax.sgd(0.5), "no_decay": optax.set_to_zero()},
            policy.labels_for_haiku,
        ),
        optax.multi_transform(
            {"fast": optax.sgd(1.0), "decay": optax.sgd(0.5), "no_decay": optax.set_to_zero()},
            labels,
        ),
    ):
        grads = jax.tree.map(jnp.ones_like, params)
        updates, _ = tx.update(grads, tx.init(params), params)
        assert np.all(updates["linear"]["w"] == -1.0)
        assert np.all(updates["conv2_d"]["b"] == -0.5)
        assert not np.any(updates["layer_norm"]["scale"])


def test_muon_dims_are_haiku_layouts_and_a_real_muon_step_runs(params):
    policy = dm.presets.muon()
    dims = policy.muon_dims_for_haiku(params)
    found = {
        f"{k}/{n}": (d.reduction_axis, d.output_axis)
        for k, m in dims.items()
        for n, d in m.items()
        if d is not None
    }
    # The preset selects linear and conv weights: embeddings and cells go to Adam.
    assert found == {p: a for p, a in LAYOUTS.items() if EXPECTED[p][0] in ("linear", "conv")}
    assert policy.muon_dims(params, framework="haiku") == dims
    tx = optax.contrib.muon(0.1, muon_weight_dimension_numbers=policy.muon_dims_for_haiku)
    grads = jax.tree.map(jnp.ones_like, params)
    # Compiled: one program instead of one per op and shape; the dims are read off the
    # traced params as off concrete ones.
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    assert jax.tree.map(jnp.shape, updates) == jax.tree.map(jnp.shape, params)
    assert np.all(np.isfinite(updates["conv2_d_transpose"]["w"]))


def test_layer_stack_adds_batch_axes_by_default_names_and_by_the_trace():
    def f(x):
        x = hk.layer_stack(4)(lambda z: hk.Linear(3)(z))(x)
        x = hk.layer_stack(2)(hk.layer_stack(3)(lambda z: hk.LayerNorm(-1, True, True)(z)))(x)
        return hk.layer_stack(2, name="blocks")(lambda z: hk.Linear(3)(z))(x)

    t = hk.transform(f)
    p = t.init(jax.random.key(0), X)
    assert set(p) == {
        "__layer_stack_no_per_layer/linear",
        "__layer_stack_no_per_layer_1/__layer_stack_no_per_layer/layer_norm",
        "blocks/linear",
    }
    policy = dm.presets.muon()
    for options in ({}, {"fn": t, "args": (X,)}):
        rows = _rows(policy.explain(p, framework="haiku", **options))
        batch = {path: row.leaf.batch_axes for path, row in rows.items()}
        assert batch == {
            "__layer_stack_no_per_layer/linear/b": 1,
            "__layer_stack_no_per_layer/linear/w": 1,
            "__layer_stack_no_per_layer_1/__layer_stack_no_per_layer/layer_norm/offset": 2,
            "__layer_stack_no_per_layer_1/__layer_stack_no_per_layer/layer_norm/scale": 2,
            "blocks/linear/b": 1,
            "blocks/linear/w": 1,
        }, options
        assert all(row.leaf.ndim == (2 if row.leaf.name == "w" else 1) for row in rows.values())
        # Names alone see a module `blocks` around the stacked Linear; the trace sees
        # the stack, which is looked through.
        ancestors = [a.kind for a in rows["blocks/linear/w"].leaf.ancestors]
        assert ancestors == ([] if options else ["unknown"])
    dims = policy.muon_dims_for_haiku(p, fn=t, args=(X,))
    assert dims["blocks/linear"]["w"].reduction_axis == (1,)
    assert dims["__layer_stack_no_per_layer/linear"]["w"].output_axis == (2,)


def _stacked_block(h: jax.Array) -> jax.Array:
    """A block of layers: a Linear and an Embed by Haiku's names, a Linear and a conv
    by the user's, a layer norm, and a param of its own whose one-layer rank names do
    not tell."""
    h = hk.Linear(3)(hk.LayerNorm(-1, True, True, name="ln")(h))
    h = hk.Linear(3, name="fc")(h) * hk.get_parameter("gate", (3,), init=jnp.ones)[None]
    h = h + hk.Conv1D(3, 2, name="conv")(h[:, None, :])[:, 0, :]
    return h + hk.Embed(5, 3)(jnp.zeros((2,), jnp.int32))


class _StackedBlock(hk.Module):
    def __call__(self, h: jax.Array) -> jax.Array:
        return _stacked_block(h)


def _named_stack(how: str) -> hk.Transformed:
    def f(x):
        if how == "functions":
            x = hk.layer_stack(4, name="blocks")(_stacked_block)(x)
        elif how == "modules":
            x = hk.layer_stack(4, name="blocks")(lambda h: _StackedBlock(name="block")(h))(x)
        else:  # a stack of 4 around a stack of 2
            x = hk.layer_stack(4, name="blocks")(hk.layer_stack(2, name="inner")(_stacked_block))(x)
        return hk.Linear(5, name="head")(hk.LayerNorm(-1, True, True, name="ln_f")(x))

    return hk.transform(f)


NAMED_STACKS = ["functions", "modules", "nested"]


@pytest.fixture(scope="module")
def named_stacks():
    return {how: (t := _named_stack(how), _init(t, X)) for how in NAMED_STACKS}


def _named_stack_axes(how: str) -> dict[str, int]:
    inside, stacked = {"functions": ("blocks", 1), "modules": ("blocks/block", 1),
                       "nested": ("blocks/inner", 2)}[how]
    layers = ["conv/b", "conv/w", "embed/embeddings", "fc/b", "fc/w", "linear/b", "linear/w",
              "ln/offset", "ln/scale"]
    gate = "blocks/block/gate" if how == "modules" else f"{inside}/~/gate"
    return {**{f"{inside}/{p}": stacked for p in layers}, gate: stacked,
            "head/b": 0, "head/w": 0, "ln_f/offset": 0, "ln_f/scale": 0}


@pytest.mark.parametrize("how", NAMED_STACKS)
def test_every_param_of_a_user_named_layer_stack_is_stacked_by_names(named_stacks, how):
    """By names, the linear and embed (more axes than one layer has) and the fc and conv
    (a b repeating its w's leading axes) prove the stack; the layer norm and the gate
    beside them have the same leading sizes: every param of the stacked module is
    stacked, as the trace says, and layer decay by names is the traced one."""
    t, p = named_stacks[how]
    expected = _named_stack_axes(how)
    policy = dm.Policy(dm.layer_decay(0.5))
    for options in ({}, {"fn": t, "args": (X,)}):
        rows = _rows(policy.explain(p, framework="haiku", **options))
        assert {path: row.leaf.batch_axes for path, row in rows.items()} == expected, options
    with warnings.catch_warnings():
        # The gate is owned by no layer: said alike in both readings.
        warnings.simplefilter("ignore", dm.PolicyWarning)
        by_names = policy.lr_scales(p, framework="haiku")
        traced = policy.lr_scales(p, framework="haiku", fn=t, args=(X,))
    per_layer = np.float32([0.5**4, 0.5**3, 0.5**2, 0.5])
    for key, module in by_names.items():
        for name, scale in module.items():
            if key.startswith("blocks/"):
                assert scale.dtype == np.float32 and scale.shape[0] == 4, (key, name, scale)
                np.testing.assert_array_equal(scale.ravel(), per_layer, err_msg=f"{key}/{name}")
            else:
                assert scale == 1.0, (key, name, scale)
            np.testing.assert_array_equal(traced[key][name], scale, err_msg=f"{key}/{name}")


@pytest.mark.parametrize("how", NAMED_STACKS)
def test_muon_dims_of_a_user_named_layer_stack_by_names_are_the_traced_ones(named_stacks, how):
    """The Linear's and Embed's layouts come from Haiku's names, their stacked axes from
    the stack: the dims skip them as the trace's do, and a real Muon step runs."""
    from optax.contrib import MuonDimensionNumbers, muon

    t, p = named_stacks[how]
    inside, stacked = {"functions": ("blocks", 1), "modules": ("blocks/block", 1),
                       "nested": ("blocks/inner", 2)}[how]
    policy = dm.Policy(dm.decay(path=f"{inside}/linear/w"), dm.decay(path=f"{inside}/embed/*"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dm.PolicyWarning)
        dims = policy.muon_dims_for_haiku(p)
        assert dims == policy.muon_dims_for_haiku(p, fn=t, args=(X,))
    found = {f"{k}/{n}": d for k, m in dims.items() for n, d in m.items() if d is not None}
    assert found == {
        f"{inside}/linear/w": MuonDimensionNumbers((stacked,), (stacked + 1,)),
        f"{inside}/embed/embeddings": MuonDimensionNumbers((stacked,), (stacked + 1,)),
    }
    tx = muon(0.1, muon_weight_dimension_numbers=dims)
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, p), tx.init(p), p)
    w = updates[f"{inside}/linear"]["w"]
    assert w.shape == p[f"{inside}/linear"]["w"].shape
    assert np.all(np.isfinite(w)) and np.any(w != 0)


_STACKED_FC = {"w": jnp.ones((4, 3, 5)), "b": jnp.ones((4, 5))}


@pytest.mark.parametrize(
    ("norm", "axes"),
    [
        ({"scale": jnp.ones((5, 3)), "offset": jnp.ones((5, 3))}, 0),
        ({"scale": jnp.ones((4, 2, 3)), "offset": jnp.ones((4, 2, 3))}, 0),
        ({"scale": jnp.ones((4, 3)), "offset": jnp.ones((4, 3))}, 1),
    ],
    ids=["leading-sizes-disagree", "one-layer-rank-wrong", "agree"],
)
def test_params_beside_a_proven_stack_are_stacked_only_where_they_agree(norm, axes):
    """A stacked fc beside a layer norm under ``blocks``: the norm is stacked only where
    its leading size is the fc's and its scale is then 1-D; otherwise it stays unmarked
    (never a guess), and layer decay says the stack is known only in part where the
    sizes fit."""
    p = {"blocks/fc": _STACKED_FC, "blocks/ln": norm, "head": {"w": jnp.ones((5, 2))}}
    rows = _rows(dm.Policy().explain(p, framework="haiku"))
    assert {path: row.leaf.batch_axes for path, row in rows.items()} == {
        "blocks/fc/b": 1, "blocks/fc/w": 1, "blocks/ln/offset": axes, "blocks/ln/scale": axes,
        "head/w": 0,
    }
    policy = dm.Policy(dm.layer_decay(0.5))
    if norm["scale"].shape[0] == 4 and not axes:
        with pytest.raises(ValueError, match="blocks/fc is stacked 4 times, but beside it in blocks"):
            policy.lr_scales(p, framework="haiku")
    elif axes:
        scales = policy.lr_scales(p, framework="haiku")
        np.testing.assert_array_equal(scales["blocks/ln"]["scale"].ravel(), [0.0625, 0.125, 0.25, 0.5])


def test_a_w_and_b_that_also_read_as_one_layer_prove_no_stack():
    # w (4, 4, 4) and b (4, 4): 4 stacked (4, 4) layers, or one layer from 4 inputs to
    # (4, 4) outputs. Neither reading settles it: nothing is marked.
    p = {"blocks/fc": {"w": jnp.ones((4, 4, 4)), "b": jnp.ones((4, 4))},
         "blocks/ln": {"scale": jnp.ones((4, 4)), "offset": jnp.ones((4, 4))}}
    rows = _rows(dm.Policy().explain(p, framework="haiku"))
    assert {path: row.leaf.batch_axes for path, row in rows.items()} == dict.fromkeys(
        ("blocks/fc/b", "blocks/fc/w", "blocks/ln/offset", "blocks/ln/scale"), 0
    )


class MyProj(hk.Module):
    def __call__(self, x):
        m = hk.get_parameter("matrix", (x.shape[-1], 3), init=jnp.ones)
        return x @ m + hk.get_parameter("shift", (3,), init=jnp.zeros)[None]


def _projections(x):
    return MyProj()(x) + MyProj()(x)


@pytest.mark.parametrize("registered", [MyProj, "MyProj"], ids=["class", "name"])
def test_a_registered_module_is_found_by_its_snake_case_name(registered):
    t = hk.transform(_projections)
    p = t.init(jax.random.key(0), X)
    assert set(p) == {"my_proj", "my_proj_1"}
    policy = dm.Policy(dm.decay(layer="linear", param="weight"))
    with pytest.warns(dm.PolicyWarning, match="arrays outside any layer"):
        assert policy.for_haiku(p) == {k: {"matrix": False, "shift": False} for k in p}
    dm.register_layer(
        registered, "linear", roles={"matrix": "weight", "shift": "bias"},
        matrix_axes={"matrix": ((0,), (1,))},
    )
    try:
        for options in ({}, {"fn": t, "args": (X,)}):
            rows = _rows(policy.explain(p, framework="haiku", **options))
            assert {(r.path, r.layer, r.role, r.leaf.kind_source) for r in rows.values()} == {
                (f"{k}/{n}", "linear", role, "registered")
                for k in p for n, role in (("matrix", "weight"), ("shift", "bias"))
            }
            assert policy.for_haiku(p, **options) == {k: {"matrix": True, "shift": False} for k in p}
            assert policy.muon_dims_for_haiku(p, **options)["my_proj_1"]["matrix"].output_axis == (1,)
    finally:
        dm.unregister_layer(registered)


def test_user_named_modules_read_by_the_shared_inference():
    def f(x):
        h = hk.Linear(4, name="encoder_proj")(x)
        h = hk.LayerNorm(-1, True, True, name="final_norm")(h)
        return hk.Linear(3, name="lm_head")(h)

    t = hk.transform(f)
    p = t.init(jax.random.key(0), X)
    rows = _rows(dm.presets.muon().explain(p, framework="haiku"))
    assert {k: (r.layer, r.leaf.kind_source, r.leaf.matrix_axes) for k, r in rows.items()} == {
        "encoder_proj/w": ("linear", "content", None),
        "encoder_proj/b": ("linear", "content", None),
        "final_norm/scale": ("layer_norm", "name", None),
        "final_norm/offset": ("layer_norm", "name", None),
        "lm_head/w": ("linear", "content", None),
        "lm_head/b": ("linear", "content", None),
    }
    fix = "give the layer classes (for Haiku params: fn=transformed, args=(x,))"
    with pytest.raises(ValueError, match=re.escape(fix)):
        dm.presets.muon().muon_dims_for_haiku(p)
    traced = dm.presets.muon().muon_dims_for_haiku(p, fn=t, args=(X,))
    assert traced["lm_head"]["w"].reduction_axis == (0,)


def test_state_is_never_decayed():
    def f(x, train):
        return hk.BatchNorm(True, True, 0.9)(hk.Linear(3)(x), is_training=train)

    t = hk.transform_with_state(f)
    p, s = t.init(jax.random.key(0), X, True)
    everything = dm.Policy(dm.decay())
    for options in ({}, {"fn": t, "args": (X, True)}, {"fn": f, "args": (X, True)}):
        report = everything.explain(s, framework="haiku", **options)
        assert {r.path for r in report} == {
            f"batch_norm/~/{ema}/{n}" for ema in ("mean_ema", "var_ema")
            for n in ("average", "counter", "hidden")
        }
        assert not any(r.decay or r.leaf.is_param for r in report)
        assert all(r.decay and r.leaf.is_param for r in everything.explain(p, framework="haiku", **options))
    message = (
        "for_haiku: got a tuple of two dicts, which looks like the (params, state) of "
        "hk.transform_with_state's init; pass the params alone: policy.for_haiku(params). "
        "Haiku state is never decayed and optax does not see it."
    )
    with pytest.raises(TypeError, match=re.escape(message)):
        everything.for_haiku((p, s))
    # BatchNorm keeps scale and offset in the input's rank: one layer's array is 1-D.
    assert [r.leaf.ndim for r in everything.explain(p, framework="haiku") if r.layer == "batch_norm"] == [1, 1]


def test_a_trace_of_other_params_is_an_error():
    t = hk.transform(lambda x: hk.Linear(3)(x))
    p = t.init(jax.random.key(0), X)
    message = (
        "for_haiku(params, fn=...): the params do not match the traced function: "
        "'linear/w' has shape (3, 3) in the params and (5, 3) in the model's. Pass the "
        "function that made these params, and args= with the input shapes they were "
        "made with."
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        dm.presets.standard().for_haiku(p, fn=t, args=(jnp.zeros((2, 5)),))
    with pytest.raises(TypeError, match=re.escape(
        "for_haiku(params, fn=...): expected hk.transform(f) (or the function f it wraps), "
        "got dict."
    )):
        dm.presets.standard().for_haiku(p, fn=p, args=(X,))
    with pytest.raises(TypeError, match=re.escape("for_haiku: Haiku params take fn=, args= and kwargs=; got module=.")):
        dm.presets.standard().for_haiku(p, module=t)
    with pytest.raises(TypeError, match=re.escape(
        "for_haiku(params, fn=..., args=...): expected a tuple of example inputs, got "
        "ArrayImpl. Write args=(x,) for one input."
    )):
        dm.presets.standard().for_haiku(p, fn=t, args=X)
    with pytest.raises(TypeError, match=re.escape(
        "for_haiku(params, args=..., kwargs=...): these are example inputs for tracing fn=, "
        "but no fn= was given. Pass the transformed function too: "
        "policy.for_haiku(params, fn=transformed, args=(x,))."
    )):
        dm.presets.standard().for_haiku(p, args=(X,))


# Claims: which adapter reads a tree.

LINEAR = {"linear": {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}}


def test_generic_entry_points_pick_haiku_linen_or_ask(params):
    policy = dm.presets.standard()
    assert policy.mask(params) == policy.for_haiku(params)
    assert policy.labels(params) == policy.labels_for_haiku(params)
    assert policy.rates(params) == policy.rates_for_haiku(params)
    assert [r.path for r in policy.explain(params)] == sorted(EXPECTED)
    linen = {"Dense_0": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}
    assert policy.mask(linen) == {"Dense_0": {"kernel": True, "bias": False}}
    message = (
        "mask: a dict that Haiku and Flax Linen could have made; pass framework='haiku' or "
        "framework='linen', or call policy.for_haiku(...) or policy.for_flax(...)."
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        policy.mask(LINEAR)
    assert policy.mask(LINEAR, framework="haiku") == {"linear": {"w": True, "b": False}}
    assert policy.for_haiku(LINEAR) == {"linear": {"w": True, "b": False}}


def test_entry_points_send_other_frameworks_trees_where_they_belong(params):
    policy = dm.presets.standard()
    with pytest.raises(TypeError, match=re.escape(
        "for_flax: got Haiku params (module paths such as 'mlp/~/linear_0'); use "
        "policy.for_haiku(params) for Haiku params."
    )):
        policy.for_flax(params)
    with pytest.raises(TypeError, match=re.escape(
        "labels_for_flax: got Haiku params (module paths such as 'mlp/~/linear_0'); use "
        "policy.labels_for_haiku(params) for Haiku params."
    )):
        policy.labels_for_flax(params)
    with pytest.raises(TypeError, match=re.escape(
        "for_equinox: got a dict that holds no Equinox module, which looks like Haiku "
        "params; use policy.for_haiku(params)."
    )):
        policy.for_equinox(params)
    linen = {"Dense_0": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}
    with pytest.raises(TypeError, match=re.escape(
        "for_haiku: got a dict from Flax; use policy.for_flax(...) for Flax params"
    )):
        policy.for_haiku(linen)
    from flax.core import freeze

    for flax_tree, kind in (({"params": linen}, "dict"), (freeze(linen), "FrozenDict")):
        with pytest.raises(TypeError, match=re.escape(
            f"for_haiku: got a {kind} from Flax; use policy.for_flax(...) for Flax params"
        )):
            policy.for_haiku(flax_tree)
    # A Haiku module's own param called `bias` is Linen's word too: still Haiku.
    custom = {"mlp/~/linear_0": {"w": jnp.ones((2, 2)), "bias": jnp.ones(2)}}
    assert policy.for_haiku(custom) == {"mlp/~/linear_0": {"w": True, "bias": False}}
    assert dm.adapters.Claim.NO == next(
        a for a in dm.adapters.registered() if a.name == "haiku"
    ).claim({"a": {"b": {"c": jnp.ones(2)}}})


def test_check_mask_names_for_haiku(params):
    mask = dm.presets.standard().for_haiku(params)
    mask["linear"] = {"w": True}
    with pytest.raises(MaskMismatchError, match=re.escape(
        "keys only in params (1): 'b'\nFix: build the mask from the same tree you hand "
        "optax, mask = policy.for_haiku(params) for tx.init(params), or pass "
        "mask=policy.for_haiku so that optax builds it from what it gets."
    )):
        check_mask(mask, params)


# The command line.

FACTORY = '''
import haiku as hk
import jax.numpy as jnp

def haiku_model():
    def f(x):
        h = hk.Linear(8, name="proj")(x)
        return hk.Linear(2, name="head")(hk.LayerNorm(-1, True, True)(h))
    return hk.transform(f), (jnp.zeros((1, 4)),)
'''


def test_cli_explains_a_haiku_factory(capsys, tmp_path, monkeypatch):
    (tmp_path / "haiku_factory.py").write_text(textwrap.dedent(FACTORY))
    monkeypatch.syspath_prepend(str(tmp_path))
    code = main(["explain", "haiku_factory:haiku_model", "--framework", "haiku", "--format",
                 "json", "--preset", "muon", "--dims"])
    out, err = capsys.readouterr()
    assert code == 0, err
    rows = {row["path"]: row for row in json.loads(out)["rows"]}
    assert {p: (r["kind"], r["via"], r["decay"]) for p, r in rows.items()} == {
        "head/b": ("linear", "class", False),
        "head/w": ("linear", "class", True),
        "layer_norm/offset": ("layer_norm", "class", False),
        "layer_norm/scale": ("layer_norm", "class", False),
        "proj/b": ("linear", "class", False),
        "proj/w": ("linear", "class", True),
    }
    code = main(["explain", "haiku_factory:haiku_model"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.splitlines()[0] == "haiku: haiku_factory:haiku_model"
    assert out.rstrip().endswith("decayed 2 of 6 leaves, 48 of 74 elements (64.9%)")
    code = main(["explain", "haiku_factory:haiku_model", "--framework", "nnx"])
    out, err = capsys.readouterr()
    assert (code, out) == (2, "")
    assert err == (
        "python -m decaymask explain: error: --framework nnx: the factory returned a Haiku "
        "(transformed, args) pair, not an NNX module; give --framework haiku or leave "
        "--framework out.\n"
    )


# Adding the adapter changes no other adapter's readings.

OTHERS = '''
import json, sys
if sys.argv[1] == "blocked":
    sys.modules["haiku"] = None
else:
    import haiku
import flax.linen as nn, jax, jax.numpy as jnp
import decaymask as dm
from tests.parity import models

variables = models.linen_variables()
trees = {
    "linen": variables["params"],
    "linen_variables": variables,
    "nnx": models.nnx_model(),
    "equinox": models.equinox_model(),
    "user_named": {"proj": {"w": jnp.ones((3, 4)), "b": jnp.ones(4)},
                   "norm": {"scale": jnp.ones(4), "bias": jnp.ones(4)}},
    "user_kernel": {"encoder": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones(4)}},
    "user_plain": {"proj": {"w": jnp.ones((3, 4))}, "gate": {"w": jnp.ones((4, 4))}},
}
def flat(tree):
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [(jax.tree_util.keystr(k), v) for k, v in leaves]

out = {}
for policy_name in ("standard", "gpt", "muon"):
    policy = getattr(dm.presets, policy_name)()
    for name, tree in trees.items():
        # Dicts of user-named modules go through the Flax entry points: a generic call on
        # one that Linen only possibly made (user_plain) asks for framework= once Haiku
        # could have made it too, as it should.
        face = {"framework": "flax"} if name.startswith("user") else {}
        calls = {"explain": lambda: [(r.path, r.layer, r.role, r.decay, r.leaf.kind_source)
                                     for r in policy.explain(tree, **face)],
                 "mask": lambda: flat(policy.mask(tree, **face))}
        if name.startswith("user"):
            calls["for_flax"] = lambda: flat(policy.for_flax(tree))
        for call, fn in calls.items():
            try:
                value = fn()
            except Exception as err:
                value = f"{type(err).__name__}: {err}"
            out[f"{policy_name} {name} {call}"] = value
print(json.dumps(out, default=str))
'''


def test_other_adapters_read_alike_with_haiku_loaded_or_blocked():
    results = {}
    for how in ("loaded", "blocked"):
        done = subprocess.run(
            [sys.executable, "-W", "ignore", "-c", OTHERS, how],
            capture_output=True, text=True, check=False,
            cwd=str(__import__("pathlib").Path(__file__).parent.parent),
        )
        assert done.returncode == 0, done.stderr
        results[how] = json.loads(done.stdout)
    assert results["loaded"] == results["blocked"]
    assert len(results["loaded"]) == 3 * (7 * 2 + 3)
    assert "haiku" not in json.dumps(results["loaded"]).lower()


def test_paths_are_haiku_module_paths_escaped():
    tree = {"m/~/lin": {"w": jnp.ones((2, 2))}, "m/lin": {"w": jnp.ones((2, 2)), "a%b": jnp.ones(2)}}
    paths = [r.path for r in dm.Policy(dm.decay(path="m/~/*")).explain(tree, framework="haiku")]
    assert paths == ["m/lin/a%25b", "m/lin/w", "m/~/lin/w"]
    assert flat_with_paths(dm.Policy(dm.decay(path="m/~/*")).for_haiku(tree)) == {
        "['m/lin']['a%b']": False, "['m/lin']['w']": False, "['m/~/lin']['w']": True,
    }


def test_a_callable_mask_inside_optax_partition_reads_one_branch():
    """optax.partition hands the inner adamw's mask a tree whose other branch's leaves
    are optax.MaskedNode: the mask covers the branch's arrays and keeps the rest."""
    t = hk.transform(lambda x: hk.nets.MLP([4, 3])(hk.LayerNorm(-1, True, True)(x)))
    p = jax.tree.map(jnp.ones_like, t.init(jax.random.key(0), X))
    labels = {k: {n: "mlp" if k.startswith("mlp") else "other" for n in m} for k, m in p.items()}
    policy = dm.presets.standard()
    tx = optax.partition(
        {"mlp": optax.adamw(1.0, weight_decay=0.25, mask=policy.for_haiku), "other": optax.sgd(1.0)},
        labels,
    )
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, p), tx.init(p), p)
    moved = {f"{k}/{n}": float(u.ravel()[0]) for k, m in updates.items() for n, u in m.items()}
    assert moved == {
        "layer_norm/offset": 0.0, "layer_norm/scale": 0.0,
        "mlp/~/linear_0/b": 0.0, "mlp/~/linear_0/w": -0.25,
        "mlp/~/linear_1/b": 0.0, "mlp/~/linear_1/w": -0.25,
    }


# Where every leaf's modules stand in its path: ``~`` counts as a key.


class DepthAttention(hk.Module):
    def __call__(self, x):
        return hk.Linear(3, name="query")(x) + hk.Linear(3, name="value")(x)


class DepthBlock(hk.Module):
    def __init__(self, name=None):
        super().__init__(name=name)
        self.attn = DepthAttention(name="attn")
        self.norm = hk.LayerNorm(-1, True, True)

    def __call__(self, x):
        x = self.norm(x + self.attn(x))
        return x + hk.nets.MLP([4, 3])(x)


class DepthEncoder(hk.Module):
    def __init__(self, name=None):
        super().__init__(name=name)
        self.blocks = [DepthBlock(name="block") for _ in range(2)]

    def __call__(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def _depth_model(x):
    x = DepthEncoder(name="encoder")(x)
    x = x * hk.get_parameter("gain", (1, 3), init=jnp.ones)  # no module: key "~"
    x = hk.layer_stack(2, name="stack")(lambda z: DepthBlock(name="block")(z))(x)
    return hk.layer_stack(2)(lambda z: DepthBlock(name="block")(z))(x)


DEPTHS = hk.transform(_depth_model)


def _assert_haiku_module_depths_consistent(leaves, classes=None):
    """One depth per module of ancestors + (owner,); the first d keys of the path end at
    that module's own name, and name the same module for every leaf; every leaf of one
    params key reads the same modules at the same depths. ``classes`` maps a module's
    full name to its class, as a trace saw it."""
    at: dict[tuple[str, ...], set] = {}
    of_key: dict[str, set] = {}
    for leaf in leaves:
        keys = leaf.path.split("/")
        depths = leaf.module_depths
        assert len(depths) == len(leaf.ancestors) + 1, leaf.path
        assert all(1 <= d <= len(keys) - 1 for d in depths), (leaf.path, depths)
        assert list(depths) == sorted(depths), (leaf.path, depths)
        for module, d in zip((*leaf.ancestors, leaf.owner), depths):
            prefix = tuple(keys[:d])
            if prefix[-1] == "~":  # no module owns the array: the path's parent
                assert not leaf.ancestors and d == len(keys) - 1, leaf.path
            elif classes is not None:
                # Inside a layer_stack the trace names modules from the stack down.
                name = "/".join(prefix)
                seen = classes.get(name) or classes["/".join(prefix[1:])]
                assert seen is module.cls, (leaf.path, d)
            at.setdefault(prefix, set()).add(module)
        of_key.setdefault("/".join(keys[:-1]), set()).add((leaf.ancestors, leaf.owner, depths))
    assert all(len(found) == 1 for found in at.values()), at
    assert all(len(found) == 1 for found in of_key.values()), of_key


def _traced_classes(fn, *args):
    classes = {}

    def interceptor(next_fun, a, kw, context):
        out = next_fun(*a, **kw)
        classes.setdefault(context.module.module_name, type(context.module))
        return out

    with hk.intercept_methods(interceptor):
        # An abstract init calls every module as a concrete one does. A new function, so
        # that JAX traces it now rather than reuse an earlier trace of fn.init.
        jax.eval_shape(lambda *a: fn.init(*a), jax.random.key(0), *args)
    return classes


@pytest.fixture(scope="module")
def depths_params():
    return _init(DEPTHS, X)


@pytest.mark.parametrize("traced", [False, True], ids=["names", "classes"])
def test_module_depths_say_where_each_module_stands_in_the_path(traced, depths_params):
    p = depths_params
    options = {"fn": DEPTHS, "args": (X,)} if traced else {}
    leaves = [row.leaf for row in dm.Policy(dm.decay()).explain(p, framework="haiku", **options)]
    depths = {leaf.path: leaf.module_depths for leaf in leaves}
    assert depths["encoder/~/block/~/attn/query/w"] == (1, 3, 5, 6)
    assert depths["encoder/~/block_1/~/attn/value/b"] == (1, 3, 5, 6)
    assert depths["encoder/~/block_1/mlp/~/linear_0/w"] == (1, 3, 4, 6)
    assert depths["encoder/~/block/~/layer_norm/scale"] == (1, 3, 5)
    assert depths["~/gain"] == (1,)
    # hk.layer_stack is looked through: a default-named stack always, a named one where
    # the trace shows it (names alone read ``stack`` as a module).
    assert depths["__layer_stack_no_per_layer/block/~/attn/query/w"] == (2, 4, 5)
    assert depths["__layer_stack_no_per_layer/block/~/layer_norm/offset"] == (2, 4)
    assert depths["stack/block/~/attn/query/w"] == ((2, 4, 5) if traced else (1, 2, 4, 5))
    assert depths["stack/block/mlp/~/linear_1/b"] == ((2, 3, 5) if traced else (1, 2, 3, 5))
    if traced:
        owners = {leaf.path: [m.type_name for m in (*leaf.ancestors, leaf.owner)]
                  for leaf in leaves}
        assert owners["encoder/~/block/~/attn/query/w"] == [
            "DepthEncoder", "DepthBlock", "DepthAttention", "Linear"]
        assert owners["stack/block/mlp/~/linear_1/b"] == ["DepthBlock", "MLP", "Linear"]
    classes = _traced_classes(DEPTHS, X) if traced else None
    _assert_haiku_module_depths_consistent(leaves, classes)
    # An LSTM owns its gates' arrays: the LSTM's depth, not its Linear's.
    t = hk.transform(lambda x: hk.LSTM(3)(x, hk.LSTM(3).initial_state(2))[0])
    lstm_options = {"fn": t, "args": (X,)} if traced else {}
    lstm_params = _init(t, X)
    lstm = [row.leaf for row in dm.Policy(dm.decay()).explain(
        lstm_params, framework="haiku", **lstm_options)]
    assert {leaf.path: leaf.module_depths for leaf in lstm} == {
        "lstm/linear/b": (1,), "lstm/linear/w": (1,)}
    _assert_haiku_module_depths_consistent(lstm)
