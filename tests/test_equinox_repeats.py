"""The Equinox walk keys a block alike to an earlier one (same class in a field of the
same name under the same context, same treedef, same leaf types, shapes and dtypes) as
the earlier one: every output and every explain row must be what reading each gives."""

from __future__ import annotations

import re
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import decaymask as dm
from decaymask import _face
from decaymask.adapters._equinox import _repeats
from helpers import assert_decays_exactly, flat_with_paths, spy, zero_grad_updates

KEY = jax.random.key(0)


class MyLinear(eqx.nn.Linear):
    """A subclass: the same fields and shapes as a Linear, another class."""


class FooNorm(eqx.Module):
    """Known by its name only: its arrays say what it is."""

    weight: jax.Array

    def __init__(self, shape):
        self.weight = jnp.ones(shape)


class FooConv(eqx.Module):
    """Known by its name, checked against its arrays: a 2-D weight is a linear layer's."""

    weight: jax.Array

    def __init__(self, shape):
        self.weight = jnp.ones(shape)


class Block(eqx.Module):
    norm: eqx.Module
    mix: FooConv
    attn: eqx.nn.MultiheadAttention
    up: eqx.Module
    down: eqx.Module
    extra: list

    def __init__(self, variant, key):
        k = jax.random.split(key, 4)
        width = 4 if variant == "other width" else 8
        self.norm = FooNorm((8,))
        self.mix = FooConv((8, 8) if variant == "flat conv" else (1, 1, 8, 8))
        self.attn = eqx.nn.MultiheadAttention(2, 8, key=k[0])
        up = MyLinear if variant == "subclass" else eqx.nn.Linear
        self.up = up(8, width, use_bias=variant != "no bias", key=k[1])
        self.down = eqx.nn.Linear(width, 8, key=k[2])
        if variant == "weight norm":
            self.down = eqx.nn.WeightNorm(self.down)
        if variant == "int":
            self.up = eqx.tree_at(lambda m: m.weight, self.up, self.up.weight.astype(jnp.int32))
        self.extra = [eqx.nn.Dropout(0.5 if variant == "dropout" else 0.1),
                      eqx.nn.LayerNorm(8)]


class Model(eqx.Module):
    embed: eqx.nn.Embedding
    blocks: list
    head: eqx.nn.Linear

    def __init__(self, variants, key):
        keys = jax.random.split(key, len(variants) + 2)
        self.embed = eqx.nn.Embedding(16, 8, key=keys[0])
        self.blocks = [Block(v, k) for v, k in zip(variants, keys[1:])]
        self.head = eqx.nn.Linear(8, 16, key=keys[-1])


VARIANTS = ("base", "other width", "flat conv", "subclass", "no bias", "weight norm",
            "int", "dropout")
POLICY = dm.Policy(dm.decay(layer="linear", param="weight"), dm.decay(name="weight", layer="norm"))


def rows(report):
    return [(r.path, r.layer, r.layer_type, r.role, r.shape, r.dtype, r.decay, r.rule,
             r.leaf.ancestors, r.leaf.module_depths) for r in report]


def outputs(tree):
    """Mask, labels and explain rows, built anew; an error as its class and message."""
    _face._built.clear()
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dm.PolicyWarning)
        for build in (POLICY.for_equinox, POLICY.labels_for_equinox,
                      lambda t: rows(POLICY.explain(t))):
            try:
                out.append(build(tree))
            except ValueError as err:
                out.append((type(err), str(err)))
    return out


def same(a, b):
    """Equal outputs: trees compared leaf by leaf (None kept), rows as they are."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if isinstance(x, list):
            assert x == y
        else:
            fx = flat_with_paths(x, is_leaf=lambda v: v is None)
            fy = flat_with_paths(y, is_leaf=lambda v: v is None)
            assert fx == fy
            assert jax.tree.structure(x, is_leaf=lambda v: v is None) == \
                jax.tree.structure(y, is_leaf=lambda v: v is None)


def unread(tree):
    """The outputs with every module read."""
    with pytest.MonkeyPatch.context() as m:
        m.setattr(_repeats.Repeats, "alike", lambda self, walk, family, prefix, node: False)
        return outputs(tree)


def counted(monkeypatch):
    """The key paths of the modules keyed as an earlier one."""
    return spy(monkeypatch, _repeats.Repeats, "alike",
               lambda args, found: jax.tree_util.keystr(args[2]) if found else None)


def blocks(hits):
    """The whole blocks of ``Model.blocks`` that were keyed as an earlier one."""
    return [h for h in hits if re.fullmatch(r"\.blocks\[\d+\]", h)]


def test_blocks_alike_are_keyed_once_and_decided_as_each_is(monkeypatch):
    model = Model(["base"] * 4, KEY)
    expected = unread(model)
    hits = counted(monkeypatch)
    got = outputs(model)
    same(got, expected)
    # In each of the three walks: blocks 1 to 3 as block 0 is.
    assert blocks(hits) == \
        [".blocks[1]", ".blocks[2]", ".blocks[3]"] * 3
    mask = got[0]
    assert mask.blocks[3].up.weight is True and mask.blocks[3].norm.weight is True
    assert mask.blocks[3].up.bias is False and mask.blocks[3].extra[0].p is None


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "base"])
def test_a_block_that_differs_in_one_thing_is_read_on_its_own(monkeypatch, variant):
    model = Model(["base", "base", variant, "base", variant], KEY)
    expected = unread(model)
    hits = counted(monkeypatch)
    got = outputs(model)
    same(got, expected)
    whole = blocks(hits)
    # The dropout rate is a float, not an array: a block differing only in it is alike.
    others = [".blocks[1]", ".blocks[3]", ".blocks[4]"] if variant != "dropout" else \
        [f".blocks[{i}]" for i in range(1, 5)]
    assert whole == others * 3


def test_outputs_differ_where_the_blocks_do():
    model = Model(["base", "subclass", "flat conv", "int"], KEY)
    _face._built.clear()
    with pytest.warns(dm.PolicyWarning, match=r"integer or bool arrays \(blocks/3/up/weight\)"):
        mask = POLICY.for_equinox(model)
    report = {r.path: r for r in POLICY.explain(model)}
    assert report["blocks/1/up/weight"].layer_type == "MyLinear"
    assert report["blocks/0/up/weight"].layer_type == "Linear"
    assert (report["blocks/0/mix/weight"].layer, report["blocks/2/mix/weight"].layer) == \
        ("conv", "linear")
    assert (mask.blocks[0].mix.weight, mask.blocks[2].mix.weight) == (False, True)
    assert (mask.blocks[0].up.weight, mask.blocks[3].up.weight) == (True, False)


def test_an_optax_step_decays_what_each_block_says():
    model = Model(["base", "flat conv", "base", "flat conv"], KEY)
    params = eqx.filter(model, eqx.is_inexact_array)
    _face._built.clear()
    mask = POLICY.for_equinox(params)
    decayed = flat_with_paths(mask)
    assert decayed[".blocks[0].mix.weight"] is decayed[".blocks[2].mix.weight"] is False
    assert decayed[".blocks[1].mix.weight"] is decayed[".blocks[3].mix.weight"] is True
    assert_decays_exactly(params, zero_grad_updates(params, mask), decayed)


def test_shared_arrays_in_blocks_are_read_in_each_block(monkeypatch):
    class Tied(eqx.Module):
        shared: eqx.nn.Shared

        def __init__(self, key):
            embed = eqx.nn.Embedding(10, 4, key=key)
            head = eqx.nn.Linear(4, 10, use_bias=False, key=key)
            self.shared = eqx.nn.Shared((embed, head), lambda p: p[1].weight,
                                        lambda p: p[0].weight)

    class Stack(eqx.Module):
        blocks: list

    model = Stack([Tied(KEY), Tied(KEY), Tied(KEY)])
    expected = unread(model)
    hits = counted(monkeypatch)
    same(outputs(model), expected)
    assert blocks(hits) == []


def test_blocks_holding_a_state_index_are_read_each(monkeypatch):
    class Norm(eqx.Module):
        bn: eqx.nn.BatchNorm
        lin: eqx.nn.Linear

    model = [Norm(eqx.nn.BatchNorm(3, "batch", mode="batch"), eqx.nn.Linear(3, 3, key=KEY))
             for _ in range(3)]
    model, _ = eqx.nn.make_with_state(lambda: model)()
    expected = unread(model)
    hits = counted(monkeypatch)
    got = outputs(model)
    same(got, expected)
    # A StateIndex holds a marker of its own: blocks holding one are never alike, the
    # Linears beside them are.
    assert hits == ["[1].lin", "[2].lin"] * 3
    assert [(r[0], r[3]) for r in got[2]][4:6] == [("1/bn/weight", "scale"), ("1/bn/bias", "bias")]


def test_a_layout_function_of_the_layer_reads_every_block(monkeypatch):
    class Proj(eqx.Module):
        weight: jax.Array

    dm.register_layer(Proj, "linear", matrix_axes={"weight": lambda layer: ((1,), (0,))})
    try:
        model = [Proj(jnp.ones((3, 3))) for _ in range(3)]
        hits = counted(monkeypatch)
        _face._built.clear()
        dims = dm.Policy(dm.decay(layer="linear")).muon_dims_for_equinox(model)
        assert [d.weight.reduction_axis for d in dims] == [(1,)] * 3
        assert hits == []
    finally:
        dm.unregister_layer(Proj)


@settings(max_examples=20, deadline=None)
@given(st.lists(st.sampled_from(VARIANTS), min_size=1, max_size=5), st.booleans())
def test_any_mix_of_blocks_reads_as_each_block_read(variants, abstract):
    model = eqx.filter_eval_shape(Model, variants, KEY) if abstract else Model(variants, KEY)
    same(outputs(model), unread(model))
