"""A walk of Linen params by names reads a block alike to an earlier one (same parent,
key traits, keys, leaf types, shapes and dtypes) by the earlier one's keys: every
output and every explain row must be what a visit of each block gives."""

from __future__ import annotations

import warnings

import jax
import numpy as np
import pytest
from flax.core import freeze
from hypothesis import given, settings
from hypothesis import strategies as st

import decaymask as dm
from decaymask import _face
from decaymask.adapters._linen import _repeats

from helpers import assert_decays_exactly, flat_with_paths, spy, zero_grad_updates


def z(*shape, dtype=np.float32):
    return np.ones(shape, dtype)


# Blocks alike in their keys and structure that differ in one thing a reading reads.
BASE = lambda: {"Dense_0": {"kernel": z(8, 16), "bias": z(16)},  # noqa: E731
                "LayerNorm_0": {"scale": z(8), "bias": z(8)},
                "x": {"w": z(8, 8)}}
VARIANTS = {
    "base": lambda b: b,
    "vector w": lambda b: {**b, "x": {"w": z(8)}},  # a weight matrix no more: not decayed
    "int kernel": lambda b: {**b, "Dense_0": {"kernel": z(8, 16, dtype=np.int32), "bias": z(16)}},
    "half bias": lambda b: {**b, "Dense_0": {"kernel": z(8, 16), "bias": z(16, dtype=np.float16)}},
    "other width": lambda b: {**b, "Dense_0": {"kernel": z(8, 4), "bias": z(4)}},
    "stacked": lambda b: {**b, "x": {"w": z(3, 8, 8), "b": z(3, 8)}},
    "extra key": lambda b: {**b, "extra": {"kernel": z(8, 8)}},
}

POLICY = dm.Policy(dm.decay(layer="linear", param="weight"))


def rows(report):
    return [(r.path, r.layer, r.layer_type, r.role, r.shape, r.dtype, r.decay) for r in report]


def outputs(params):
    """The mask, labels and explain rows, each built anew (not from the output cache)."""
    _face._built.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dm.PolicyWarning)
        return POLICY.for_flax(params), POLICY.labels(params), rows(POLICY.explain(params))


def unshared(monkeypatch, params):
    """The outputs with every block visited."""
    with monkeypatch.context() as m:
        m.setattr(_repeats.Repeats, "find", lambda self, family, node, facts=(): (None, None))
        return outputs(params)


def counted(monkeypatch):
    """Whether each subtree checked took an earlier one's keys."""
    return spy(monkeypatch, _repeats.Repeats, "find", lambda args, found: found[0] is not None)


def model(variants):
    params = {"Embed_0": {"embedding": z(32, 8)}}
    for i, variant in enumerate(variants):
        params[f"Block_{i}"] = VARIANTS[variant](BASE())
    params["LayerNorm_0"] = {"scale": z(8), "bias": z(8)}
    return params


def as_dict(tree):
    return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_blocks_alike_are_read_once_and_decided_as_each_is(monkeypatch):
    params = model(["base"] * 6)
    expected = unshared(monkeypatch, params)
    hits = counted(monkeypatch)
    got = outputs(params)
    assert got == expected
    # Three walks (mask, labels, explain); in each, the first block is visited and the
    # five others take its keys.
    assert hits == [False, True, True, True, True, True] * 3
    mask = as_dict(got[0])
    assert mask["['Block_5']['x']['w']"] is True
    assert mask["['Block_5']['LayerNorm_0']['scale']"] is False


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "base"])
def test_a_block_that_differs_in_one_thing_is_read_on_its_own(monkeypatch, variant):
    params = model(["base", "base", variant, "base", variant])
    expected = unshared(monkeypatch, params)
    hits = counted(monkeypatch)
    got = outputs(params)
    assert got == expected
    assert hits == [False, True, False, True, True] * 3
    mask = as_dict(got[0])
    differs = {"vector w": ("['Block_2']['x']['w']", False),
               "int kernel": ("['Block_2']['Dense_0']['kernel']", False),
               "stacked": ("['Block_2']['x']['w']", True)}
    if variant in differs:
        path, decayed = differs[variant]
        assert mask[path] is decayed
        assert mask[path.replace("Block_2", "Block_1")] is True


def test_an_optax_step_decays_what_each_block_says():
    params = model(["base", "vector w", "base", "vector w"])
    _face._built.clear()
    with pytest.warns(dm.PolicyWarning, match=r"outside any layer \(Block_1/x/w, Block_3/x/w\)"):
        mask = POLICY.for_flax(params)
    updates = zero_grad_updates(params, mask)
    decayed = {path: path.endswith("['Dense_0']['kernel']")
               or (path.endswith("['x']['w']") and ("Block_0" in path or "Block_2" in path))
               for path in flat_with_paths(params)}
    assert sum(decayed.values()) == 6
    assert_decays_exactly(params, updates, decayed)


def test_frozen_dict_and_abstract_blocks_alike(monkeypatch):
    params = freeze(model(["base", "other width", "base", "other width"]))
    abstract = jax.eval_shape(lambda: model(["base", "other width", "base", "other width"]))
    for tree in (params, abstract):
        expected = unshared(monkeypatch, tree)
        hits = counted(monkeypatch)
        assert outputs(tree) == expected
        assert hits == [False, False, True, True] * 3
        monkeypatch.undo()


@settings(max_examples=25, deadline=None)
@given(st.lists(st.sampled_from(sorted(VARIANTS)), min_size=1, max_size=7),
       st.booleans())
def test_any_mix_of_blocks_reads_as_each_block_visited(variants, nested):
    params = model(variants)
    if nested:  # the blocks one level further in, under numbered groups
        params = {"Stage_0": params, "Stage_1": model(list(reversed(variants)))}
    with pytest.MonkeyPatch.context() as m:
        expected = unshared(m, params)
    assert outputs(params) == expected


# A traced model's modules alike in everything a reading reads are read once too: what
# the trace says of each path (its class, the class it wraps, its arrays' ranks in one
# layer) is part of that.

import flax.linen as nn  # noqa: E402
import jax.numpy as jnp  # noqa: E402


class Gate(nn.Module):
    """A Dense by another name: the same params, another class."""

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.ones, (x.shape[-1], 8))
        return x @ kernel + self.param("bias", nn.initializers.zeros, (8,))[None]


class Thing(nn.Module):
    one: bool = False  # a vector per layer (scanned three times), else a (3, 8) matrix

    @nn.compact
    def __call__(self, x, _=None):
        w = self.param("w", nn.initializers.ones, (8,) if self.one else (3, 8))
        return x + w.sum(), None


class Traced(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(8, name="layer_0")(x)
        x = Gate(name="layer_1")(x)
        x, _ = Thing(name="thing_0")(x)
        scanned = nn.scan(Thing, variable_axes={"params": 0}, split_rngs={"params": True},
                          length=3)
        x, _ = scanned(one=True, name="thing_1")(x, None)
        return x


class Wrapping(nn.Module):
    inner: type

    @nn.compact
    def __call__(self, x):
        inner = self.inner(8, name="inner") if self.inner is nn.Dense else self.inner(name="inner")
        return nn.WeightNorm(inner, name="wn", variable_filter={"kernel"})(x)


class TwoWrapped(nn.Module):
    @nn.compact
    def __call__(self, x):
        return Wrapping(Gate, name="Block_1")(Wrapping(nn.Dense, name="Block_0")(x))


@pytest.mark.parametrize("model", [Traced(), TwoWrapped()], ids=["classes-ranks", "wrapped"])
def test_traced_modules_that_differ_only_in_what_the_trace_says_are_read_apart(model):
    x = jnp.ones((1, 8))
    params = model.init(jax.random.key(0), x)["params"]
    _face._built.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dm.PolicyWarning)
        report = {r.path: (r.layer, r.layer_type, r.decay, r.leaf.batch_axes)
                  for r in POLICY.explain(params, module=model, args=(x,))}
        with dm.record() as seen:
            model.init(jax.random.key(0), x)
        recorded = {r.path: (r.layer, r.layer_type, r.decay, r.leaf.batch_axes)
                    for r in POLICY.explain(params, recorded=seen)}
    assert recorded == report
    if isinstance(model, Traced):
        assert report["layer_0/kernel"] == ("linear", "Dense", True, 0)
        assert report["layer_1/kernel"] == ("linear", "Gate", True, 0)
        assert report["thing_0/w"] == ("linear", "Thing", True, 0)
        assert report["thing_1/w"] == ("unknown", "Thing", False, 1)
    else:
        assert report["Block_0/wn/inner%2Fkernel%2Fscale"][:2] == ("linear", "WeightNorm")
        assert report["Block_1/wn/inner%2Fkernel%2Fscale"][:2] == ("unknown", "WeightNorm")


class Block(nn.Module):
    inner: str  # "dense" or "gate": the same params, another class

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(8, name="proj")(x)
        return (nn.Dense(8, name="inner") if self.inner == "dense" else Gate(name="inner"))(x)


class Stack(nn.Module):
    inners: tuple

    @nn.compact
    def __call__(self, x):
        for i, inner in enumerate(self.inners):
            x = Block(inner, name=f"Block_{i}")(x)
        return x


def traced_outputs(params, **how):
    _face._built.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dm.PolicyWarning)
        return (flat_with_paths(POLICY.for_flax(params, **how)),
                flat_with_paths(POLICY.labels_for_flax(params, **how)),
                [(r.path, r.layer, r.layer_type, r.role, r.decay, r.rule)
                 for r in POLICY.explain(params, **how)])


@settings(max_examples=10, deadline=None)
@given(st.lists(st.sampled_from(["dense", "gate"]), min_size=2, max_size=5))
def test_traced_blocks_alike_but_for_a_class_are_read_apart(inners):
    model, x = Stack(tuple(inners)), jnp.ones((1, 8))
    dm.register_layer(Gate, "embedding")  # a Gate's kernel is a table: not decayed
    try:
        with dm.record() as seen:
            params = model.init(jax.random.key(0), x)["params"]
        for how in ({"module": model, "args": (x,)}, {"recorded": seen}):
            got = traced_outputs(params, **how)
            with pytest.MonkeyPatch.context() as m:
                m.setattr(_repeats.Repeats, "find", lambda self, family, node, facts=(): (None, None))
                assert got == traced_outputs(params, **how)
            mask = got[0]
            for i, inner in enumerate(inners):
                assert mask[f"['Block_{i}']['inner']['kernel']"] is (inner == "dense")
    finally:
        dm.unregister_layer(Gate)
