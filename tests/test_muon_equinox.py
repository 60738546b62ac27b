"""Muon dimension numbers in Equinox's layouts, through real optax.contrib.muon steps."""

from __future__ import annotations

import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax.contrib import MuonDimensionNumbers as Dims

import decaymask as dm
from helpers import flat_with_paths

KEY = jax.random.key(0)
MATRICES = dm.presets.muon()


@pytest.mark.parametrize(
    "layer, expected",
    [
        (eqx.nn.Linear(3, 5, key=KEY), {".weight": Dims((1,), (0,)), ".bias": None}),
        (eqx.nn.Conv2d(3, 5, 2, key=KEY), {".weight": Dims((1, 2, 3), (0,)), ".bias": None}),
        (eqx.nn.ConvTranspose1d(3, 5, 2, key=KEY), {".weight": Dims((1, 2), (0,)), ".bias": None}),
        (eqx.nn.Embedding(7, 3, key=KEY), {".weight": None}),
        (eqx.nn.LayerNorm(3), {".weight": None, ".bias": None}),
        (
            eqx.filter_vmap(lambda k: eqx.nn.Linear(3, 5, key=k))(jax.random.split(KEY, 4)),
            {".weight": Dims((2,), (1,)), ".bias": None},
        ),
    ],
    ids=["linear", "conv2d", "conv_transpose1d", "embedding", "layer_norm", "stacked_linear"],
)
def test_dims_per_layout(layer, expected):
    with warnings.catch_warnings():
        # The preset selects nothing in an embedding or a norm: that warning is expected.
        warnings.simplefilter("ignore", dm.PolicyWarning)
        dims = MATRICES.muon_dims_for_equinox(layer)
    assert flat_with_paths(dims, is_leaf=lambda x: x is None or isinstance(x, Dims)) == expected


def test_embedding_layout_when_selected():
    dims = dm.Policy(dm.decay(layer="embedding")).muon_dims_for_equinox(eqx.nn.Embedding(7, 3, key=KEY))
    assert dims.weight == Dims((0,), (1,))


def test_attention_projections_use_linear_layout():
    attn = eqx.nn.MultiheadAttention(2, 4, use_query_bias=True, key=KEY)
    dims = MATRICES.muon_dims_for_equinox(attn)
    assert dims.query_proj.weight == Dims((1,), (0,)) and dims.query_proj.bias is None


def test_unknown_layout_is_an_error():
    class Gate(eqx.Module):
        w: jax.Array

    policy = dm.Policy(dm.decay(param="weight"))
    with pytest.raises(ValueError) as info, pytest.warns(dm.PolicyWarning, match="unknown kind"):
        policy.muon_dims_for_equinox({"gate": Gate(jnp.ones((2, 2)))})
    assert str(info.value) == (
        "muon_dims_for_equinox: gate/w (Gate, weight, shape (2, 2)) is selected by rule 1: "
        "decay(param='weight'), but its matrix layout (reduction and output axes) is "
        "unknown. Fix: leave it out with a rule, e.g. dm.no_decay(path='gate/w'), or teach "
        "the layout with dm.register_layer(cls, kind, matrix_axes={'w': ((...), (...))}), "
        "or, where it differs between the class's instances, with a function of the "
        "layer: matrix_axes={'w': lambda layer: ((...), (...))}."
    )
    dm.register_layer(Gate, "linear", matrix_axes={"w": ((0,), (1,))})
    try:
        dims = policy.muon_dims_for_equinox({"gate": Gate(jnp.ones((2, 2)))})
        assert dims["gate"].w == Dims((0,), (1,))
    finally:
        dm.unregister_layer(Gate)


def test_register_layer_checks_matrix_axes():
    with pytest.raises(ValueError, match=r"register_layer\(matrix_axes=\{'w': \(0, 0\)\}\): expected \(reduction axes, output axes\) as two disjoint tuples"):
        dm.register_layer("Thing", "linear", matrix_axes={"w": (0, 0)})


def test_explain_shows_dims():
    text = str(MATRICES.explain(eqx.nn.Linear(3, 5, key=KEY), show_dims=True)).splitlines()
    assert text[0].split() == ["path", "kind", "class", "role", "shape", "muon", "dims", "rule"]
    assert "(1,)->(0,)" in text[2] and text[3].split()[6] == "-"


class MLP(eqx.Module):
    layers: list

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.layers = [eqx.nn.Linear(16, 100, key=k1), eqx.nn.Linear(100, 4, key=k2)]


def test_real_muon_step_with_callable_dims():
    params = eqx.filter(MLP(KEY), eqx.is_inexact_array)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.1), params)

    def first_update(**kwargs):
        tx = optax.contrib.muon(1.0, **kwargs)
        return jax.jit(lambda p: tx.update(grads, tx.init(p), p)[0])(params)

    ours = first_update(muon_weight_dimension_numbers=MATRICES.muon_dims_for_equinox)
    default = first_update()
    assert jax.tree.structure(ours) == jax.tree.structure(params)
    # Muon scales an update by sqrt(max(1, fan_out / fan_in)). The first layer maps 16
    # inputs to 100 outputs; stored (out, in), optax's default dims read it as 100 -> 16.
    ratio = np.linalg.norm(ours.layers[0].weight) / np.linalg.norm(default.layers[0].weight)
    np.testing.assert_allclose(ratio, 2.5, rtol=1e-4)
    # Biases go to Adam either way.
    np.testing.assert_array_equal(ours.layers[0].bias, default.layers[0].bias)


class Named(eqx.Module):
    """A named array: the array, and its axis names as static data."""

    array: jax.Array
    axes: tuple = eqx.field(static=True)


class NamedProj(eqx.Module):
    weight: Named
    bias: Named


def test_dims_of_named_arrays_follow_the_field_holding_them():
    proj = NamedProj(Named(jnp.ones((4, 3)), ("out", "in")), Named(jnp.ones(4), ("out",)))
    policy = dm.Policy(dm.decay(param="weight"))
    dm.register_layer(NamedProj, "linear", matrix_axes={"weight": ((1,), (0,))})
    try:
        dims = policy.muon_dims_for_equinox(proj)
        rows = policy.explain(proj)
    finally:
        dm.unregister_layer(NamedProj)
    assert [(r.path, r.role, r.decay) for r in rows] == [
        ("weight/array", "weight", True),
        ("bias/array", "bias", False),
    ]
    assert dims.weight.array == Dims((1,), (0,)) and dims.bias.array is None


class Projection(eqx.Module):
    w: jax.Array
    b: jax.Array

    def __init__(self, key):
        self.w = jax.random.normal(key, (3, 5))  # (in, out)
        self.b = jnp.zeros(5)


def test_registered_layout_is_shifted_past_stacked_axes():
    stack = eqx.filter_vmap(Projection)(jax.random.split(KEY, 4))
    policy = dm.Policy(dm.decay(param="weight"))
    dm.register_layer(Projection, "linear", roles={"w": "weight", "b": "bias"}, matrix_axes={"w": ((0,), (1,))})
    try:
        dims = policy.muon_dims_for_equinox(stack)
        rows = policy.explain(stack)
        params = eqx.filter(stack, eqx.is_inexact_array)
        grads = jax.tree.map(lambda p: jax.random.normal(KEY, p.shape), params)

        def update(dims):
            tx = optax.contrib.muon(1.0, muon_weight_dimension_numbers=dims)
            return tx.update(grads, tx.init(params), params)[0]

        ours = update(policy.muon_dims_for_equinox)
    finally:
        dm.unregister_layer(Projection)
    assert [(r.path, r.shape, r.leaf.batch_axes, r.leaf.ndim) for r in rows] == [
        ("w", (4, 3, 5), 1, 2),
        ("b", (4, 5), 1, 1),
    ]
    assert dims.w == Dims((1,), (2,)) and dims.b is None
    # Each layer of the stack is orthogonalised on its own, as hand-written dims say.
    by_hand = update(eqx.tree_at(lambda p: (p.w, p.b), params, (Dims((1,), (2,)), None), is_leaf=lambda x: x is None))
    np.testing.assert_array_equal(ours.w, by_hand.w)


def test_registered_layout_of_another_rank_is_a_clear_error():
    class Flat(eqx.Module):
        w: jax.Array

    policy = dm.Policy(dm.decay(param="weight"))
    dm.register_layer(Flat, "linear", matrix_axes={"w": ((0,), (2,))})
    try:
        with pytest.raises(ValueError) as info:
            policy.muon_dims_for_equinox({"proj": Flat(jnp.ones((3, 5)))})
    finally:
        dm.unregister_layer(Flat)
    assert str(info.value) == (
        "muon_dims_for_equinox: proj/w has shape (3, 5), but the matrix axes of Flat.w, "
        "reduction (0,) and output (2,), name an axis that one layer's array of 2 axes "
        "does not have. Fix: register the layout of one layer's array, with axes below 2: "
        "dm.register_layer(Flat, 'linear', matrix_axes={'w': ((...), (...))}), or leave "
        "it out with dm.no_decay(path='proj/w')."
    )


def test_weight_norm_gain_is_never_a_muon_matrix():
    for inner in (eqx.nn.Linear(3, 4, key=KEY), eqx.nn.Conv2d(3, 4, 3, key=KEY)):
        wn = eqx.nn.WeightNorm(inner)
        rows = MATRICES.explain(wn)
        assert [(r.path, r.role, r.decay) for r in rows if r.path == "g"] == [("g", "gain", False)]
        dims = MATRICES.muon_dims_for_equinox(wn)
        assert dims.g is None and isinstance(dims.layer.weight, Dims)
