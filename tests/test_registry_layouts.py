"""Muon layouts that differ between instances of one class: an einsum's equation decides
which kernel axes contract. Each instance's layout is read off the instance, a
registration may be a function of the layer, and a layout registered for the class
that contradicts an instance is refused when the mask is built."""

from __future__ import annotations

import re

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx
from optax.contrib import MuonDimensionNumbers as Dims

import decaymask as dm

FEATURES, HEADS, HEAD_DIM = 8, 2, 4
POLICY = dm.presets.muon()


def flat(tree):
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None or isinstance(x, Dims))[0]
    return {"/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path): v for path, v in leaves}


def muon_step(model):
    """One real optax.contrib.muon step, traced, with the dims read off the model (its
    State alone holds no layer instance to ask)."""
    params = nnx.state(model, nnx.Param)
    dims = POLICY.muon_dims_for_flax(model)
    tx = optax.contrib.muon(1e-2, muon_weight_dimension_numbers=dims)
    updates = jax.eval_shape(lambda p: tx.update(p, tx.init(p), p)[0], params)
    assert jax.tree.structure(updates) == jax.tree.structure(params)


class NnxAttention(nnx.Module):
    """The projections of Gemma's attention, as Flax's own Einsum layers."""

    def __init__(self, rngs: nnx.Rngs):
        self.q_einsum = nnx.Einsum("BTD,NDH->BTNH", (HEADS, FEATURES, HEAD_DIM), rngs=rngs)
        self.attn_vec_einsum = nnx.Einsum("BTNH,NHD->BTD", (HEADS, HEAD_DIM, FEATURES), rngs=rngs)


EXPECTED = {
    "q_einsum/kernel": Dims(reduction_axis=(1,), output_axis=(0, 2)),
    "attn_vec_einsum/kernel": Dims(reduction_axis=(0, 1), output_axis=(2,)),
}


def test_each_nnx_einsum_is_read_by_its_own_equation():
    model = NnxAttention(nnx.Rngs(0))
    dims = flat(POLICY.muon_dims_for_flax(model))
    assert {k: v for k, v in dims.items() if k.endswith("kernel")} == EXPECTED
    muon_step(model)


def test_a_layout_registered_for_the_class_that_an_instance_contradicts_is_refused():
    model = NnxAttention(nnx.Rngs(0))
    # The layout of the q projection, registered for every Einsum.
    dm.register_layer(nnx.Einsum, "linear", matrix_axes={"kernel": ((1,), (0, 2))})
    try:
        for build in (POLICY.muon_dims_for_flax, POLICY.for_flax):
            with pytest.raises(ValueError) as info:
                build(model)
            assert str(info.value).endswith(
                "attn_vec_einsum/kernel (Einsum) has the layout registered for "
                "Einsum.kernel, reduction (1,) and output (0, 2), but its equation "
                "'BTNH,NHD->BTD' gives reduction (0, 1) and output (2,). A layout "
                "registered for a class holds for every instance of it. Fix: "
                "dm.unregister_layer(Einsum), and decaymask reads each instance's layout; "
                "or register a function of the layer: matrix_axes={'kernel': lambda "
                "layer: ((...), (...))}."
            )
    finally:
        dm.unregister_layer(nnx.Einsum)


class Einsum(nnx.Module):
    """Gemma's own Einsum layer (its NNX modules): the equation is kept, the weight is ``w``."""

    def __init__(self, einsum_str: str, shape: tuple, *, rngs: nnx.Rngs):
        self.einsum_str = einsum_str
        self.w = nnx.Param(nnx.initializers.normal()(rngs.params(), shape))

    def __call__(self, x):
        return jnp.einsum(self.einsum_str, x, self.w.value)


class GemmaAttention(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.q_einsum = Einsum("BTD,NDH->BTNH", (HEADS, FEATURES, HEAD_DIM), rngs=rngs)
        self.attn_vec_einsum = Einsum("BTNH,NHD->BTD", (HEADS, HEAD_DIM, FEATURES), rngs=rngs)


LAYOUTS = {"BTD,NDH->BTNH": ((1,), (0, 2)), "BTNH,NHD->BTD": ((0, 1), (2,))}


def test_a_registration_may_be_a_function_of_the_layer():
    model = GemmaAttention(nnx.Rngs(0))
    dm.register_layer(Einsum, "linear", matrix_axes={"w": lambda layer: LAYOUTS[layer.einsum_str]})
    try:
        dims = flat(POLICY.muon_dims_for_flax(model))
        assert dims == {
            "q_einsum/w": EXPECTED["q_einsum/kernel"],
            "attn_vec_einsum/w": EXPECTED["attn_vec_einsum/kernel"],
        }
        muon_step(model)
    finally:
        dm.unregister_layer(Einsum)


def test_a_static_layout_for_a_layer_that_keeps_its_equation_is_checked_against_it():
    model = GemmaAttention(nnx.Rngs(0))
    dm.register_layer(Einsum, "linear", matrix_axes={"w": ((1,), (0, 2))})
    try:
        with pytest.raises(ValueError, match=re.escape(
            "attn_vec_einsum/w (Einsum) has the layout registered for Einsum.w, reduction "
            "(1,) and output (0, 2), but its equation 'BTNH,NHD->BTD' gives reduction "
            "(0, 1) and output (2,)."
        )):
            POLICY.muon_dims_for_flax(model)
    finally:
        dm.unregister_layer(Einsum)


def test_a_function_that_fails_or_returns_no_layout_is_named():
    model = GemmaAttention(nnx.Rngs(0))
    dm.register_layer(Einsum, "linear", matrix_axes={"w": lambda layer: layer.equation})
    try:
        with pytest.raises(ValueError, match=re.escape(
            "register_layer: the matrix_axes function of Einsum.w raised AttributeError: "
        )) as info:
            POLICY.muon_dims_for_flax(model)
        assert isinstance(info.value.__cause__, AttributeError)
        dm.register_layer(Einsum, "linear", matrix_axes={"w": lambda layer: (0, 0)})
        with pytest.raises(ValueError, match=re.escape(
            "the matrix_axes function of Einsum.w returned (0, 0): expected (reduction "
            "axes, output axes) as two disjoint tuples of non-negative ints"
        )):
            POLICY.muon_dims_for_flax(model)
    finally:
        dm.unregister_layer(Einsum)


class EqxEinsum(eqx.Module):
    """An Equinox layer that keeps its equation."""

    equation: str = eqx.field(static=True)
    weight: jax.Array

    def __call__(self, x):
        return jnp.einsum(self.equation, x, self.weight)


def test_an_equinox_registration_may_be_a_function_of_the_layer():
    model = [
        EqxEinsum("BTD,NDH->BTNH", jnp.ones((HEADS, FEATURES, HEAD_DIM))),
        EqxEinsum("BTNH,NHD->BTD", jnp.ones((HEADS, HEAD_DIM, FEATURES))),
    ]
    dm.register_layer(EqxEinsum, "linear", matrix_axes={"weight": lambda layer: LAYOUTS[layer.equation]})
    try:
        dims = POLICY.muon_dims_for_equinox(model)
        assert [d.weight for d in dims] == list(EXPECTED.values())
    finally:
        dm.unregister_layer(EqxEinsum)


class EqxEinsumField(eqx.Module):
    """The equation as a field that is not static: a leaf of the tree, not its structure."""

    weight: jax.Array
    equation: str


def test_outputs_read_through_a_function_of_the_layer_are_never_served_from_the_cache():
    weight = jnp.ones((HEADS, 4, 4))
    q = [EqxEinsumField(weight, "BTD,NDH->BTNH")]
    out = [EqxEinsumField(weight, "BTNH,NHD->BTD")]
    dm.register_layer(
        EqxEinsumField, "linear", matrix_axes={"weight": lambda layer: LAYOUTS[layer.equation]}
    )
    try:
        assert POLICY.muon_dims_for_equinox(q)[0].weight == EXPECTED["q_einsum/kernel"]
        assert POLICY.muon_dims_for_equinox(out)[0].weight == EXPECTED["attn_vec_einsum/kernel"]
    finally:
        dm.unregister_layer(EqxEinsumField)
