"""Every output is built from the decisions explain shows, on trees that hide arrays.

Random Equinox models hold their arrays in fields of any name, directly, in lists and
tuples, inside custom pytree nodes (a named-array type holding each array, as Haliax
does) and inside standard layers; a random policy over names, roles, paths and ranks
decides them. The mask, the labels and the rates must equal explain's rows, leaf by
leaf: a cache that decides alike leaves once may only merge leaves that every rule
reads alike.
"""

from __future__ import annotations

import warnings
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import decaymask as dm


@jax.tree_util.register_pytree_node_class
class NamedArray:
    """An array with axis names, flattened to its one array (keyed by index 0)."""

    def __init__(self, array: Any, axes: tuple[str, ...]):
        self.array = array
        self.axes = axes

    def tree_flatten(self):
        return (self.array,), self.axes

    @classmethod
    def tree_unflatten(cls, axes, children):
        return cls(children[0], axes)


class Holder(eqx.Module):
    """A user module: its fields are set per draw."""

    fields: dict
    layer: Any


_NAMES = ("weight", "weights", "bias", "biases", "b", "B", "gamma", "pos_embed", "cls_token",
          "table", "kernel", "freqs", "scale")
_SHAPES = ((3,), (2, 3), (4, 2, 3))


@st.composite
def holders(draw):
    names = draw(st.lists(st.sampled_from(_NAMES), min_size=1, max_size=5, unique=True))
    fields = {}
    seed = 0
    for name in names:
        how = draw(st.sampled_from(("bare", "list", "tuple", "named")))
        count = 1 if how in ("bare", "named") else draw(st.integers(1, 3))
        arrays = []
        for _ in range(count):
            seed += 1
            shape = draw(st.sampled_from(_SHAPES))
            arrays.append(jnp.full(shape, float(seed)))
        if how == "bare":
            fields[name] = arrays[0]
        elif how == "named":
            fields[name] = NamedArray(arrays[0], tuple(f"a{i}" for i in range(arrays[0].ndim)))
        else:
            fields[name] = arrays if how == "list" else tuple(arrays)
    layer = draw(st.sampled_from(("linear", "named_linear", "none")))
    if layer == "none":
        inner = None
    else:
        inner = eqx.nn.Linear(3, 2, key=jax.random.key(seed))
        if layer == "named_linear":
            # Haliax-style: the layer's own arrays wrapped in named-array nodes.
            inner = eqx.tree_at(
                lambda l: (l.weight, l.bias),
                inner,
                (NamedArray(inner.weight, ("out", "in")), NamedArray(inner.bias, ("out",))),
            )
    return Holder(fields, inner)


def _selectors(model: Holder):
    paths = [row.path for row in dm.Policy().explain(model)]
    return st.one_of(
        st.builds(lambda r: {"param": r}, st.sampled_from(dm.ROLES)),
        st.builds(lambda n: {"name": n}, st.sampled_from(_NAMES)),
        st.builds(lambda p: {"path": p}, st.sampled_from(paths) if paths else st.just("x")),
        st.builds(lambda k: {"layer": k}, st.sampled_from(("linear", "unknown"))),
        st.builds(lambda d: {"min_ndim": d}, st.integers(1, 3)),
    )


@st.composite
def models_and_policies(draw):
    model = draw(holders())
    rules = []
    for i in range(draw(st.integers(1, 4))):
        selectors = draw(_selectors(model))
        kind = draw(st.sampled_from(("decay", "no_decay", "label", "lr", "freeze", "unfreeze")))
        if kind == "decay":
            rules.append(dm.decay(rate=draw(st.sampled_from((1.0, 0.5))), **selectors))
        elif kind == "no_decay":
            rules.append(dm.no_decay(**selectors))
        elif kind == "lr":
            rules.append(dm.lr(draw(st.sampled_from((0.1, 2.0))), **selectors))
        elif kind == "freeze":
            rules.append(dm.freeze(**selectors))
        elif kind == "unfreeze":
            rules.append(dm.unfreeze(**selectors))
        else:
            rules.append(dm.label(f"group{i}", **selectors))
    return model, dm.Policy(*rules, default=draw(st.booleans()))


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(models_and_policies())
def test_mask_labels_and_rates_equal_explain(drawn):
    model, policy = drawn
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dm.PolicyWarning)
        report = policy.explain(model)
        mask = policy.for_equinox(model)
        labels = policy.labels_for_equinox(model)
        rates = policy.rates_for_equinox(model)
        scales = policy.lr_scales(model)
        trainable = policy.trainable(model)
    assert jax.tree.leaves(mask) == [row.decay for row in report]
    assert jax.tree.leaves(labels) == [row.label for row in report]
    assert jax.tree.leaves(rates) == [row.rate for row in report]
    assert jax.tree.leaves(scales) == [row.lr_scale for row in report]
    assert jax.tree.leaves(trainable) == [row.trainable for row in report]
    for row in report:
        # Frozen leaves are never decayed nor trained; the others learn at their rule's pace.
        assert row.trainable == (not row.frozen)
        if row.frozen:
            assert (row.decay, row.lr_scale, row.label) == (False, 0.0, "frozen")
        else:
            assert row.lr_scale == (row.lr_rule.lr if row.lr_rule is not None else 1.0)


class Block(eqx.Module):
    """A block of a random stack: a norm, a linear layer and a gain of its own."""

    norm: eqx.nn.LayerNorm
    fc: eqx.nn.Linear
    gamma: jax.Array

    def __init__(self, key: Any):
        self.norm = eqx.nn.LayerNorm(3)
        self.fc = eqx.nn.Linear(3, 3, key=key)
        self.gamma = jnp.full((3,), 0.5)


class Stacked(eqx.Module):
    """A stem, a list of blocks, a stack of blocks made by filter_vmap, and a head."""

    pos_embed: jax.Array
    blocks: list
    head: eqx.nn.Linear


@st.composite
def stacked_models_and_policies(draw):
    stacked = draw(st.booleans())
    depth = draw(st.integers(1 if stacked else 2, 4))
    keys = jax.random.split(jax.random.key(draw(st.integers(0, 9))), depth + 1)
    if stacked:
        # The block's own gain has no rank decaymask knows: the stacked module is named.
        blocks: Any = eqx.filter_vmap(Block)(keys[:depth])
    else:
        blocks = [Block(k) for k in keys[:depth]]
    model = Stacked(jnp.ones((2, 3)), blocks, eqx.nn.Linear(3, 2, key=keys[-1]))
    selectors = st.one_of(
        st.builds(lambda r: {"param": r}, st.sampled_from(("weight", "bias", "scale", "gain", "position"))),
        st.builds(lambda k: {"layer": k}, st.sampled_from(("linear", "layer_norm"))),
        st.builds(lambda p: {"path": p}, st.sampled_from(("head/*", "blocks/*", "blocks/0/*"))),
    )
    rules: list[Any] = list(dm.presets.standard().rules)
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(("lr", "freeze", "unfreeze")))
        chosen = draw(selectors)
        if kind == "lr":
            rules.append(dm.lr(draw(st.sampled_from((0.5, 3.0))), **chosen))
        else:
            rules.append((dm.freeze if kind == "freeze" else dm.unfreeze)(**chosen))
    rate = draw(st.sampled_from((0.5, 0.8, 1.0)))
    ladder = dm.layer_decay(rate, blocks="blocks" if stacked else None)
    return model, dm.Policy(*rules, ladder), rate, depth


@settings(max_examples=25, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(stacked_models_and_policies())
def test_multipliers_trainable_and_steps_equal_explain_on_stacks(drawn):
    import numpy as np
    import optax

    model, policy, rate, depth = drawn
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dm.PolicyWarning)
        report = policy.explain(model)
        scales = jax.tree.leaves(policy.lr_scales(model))
        trainable = jax.tree.leaves(policy.trainable(model))
    assert [bool(t) for t in trainable] == [row.trainable for row in report]
    for row, scale in zip(report, scales):
        rule = row.lr_rule.lr if row.lr_rule is not None else 1.0
        ids = row.layer_id if isinstance(row.layer_id, tuple) else (row.layer_id,)
        expected = [0.0 if row.frozen else rule * rate ** (depth + 1 - i) for i in ids]
        if row.frozen:
            assert scale == 0.0
        elif isinstance(row.layer_id, tuple):
            # A stacked leaf: one multiplier per layer, broadcasting against the leaf.
            assert scale.shape == (depth,) + (1,) * (len(row.shape) - 1)
            np.testing.assert_allclose(scale.ravel(), expected, rtol=1e-6)
            assert ids == tuple(range(1, depth + 1))
        else:
            assert scale == row.lr_scale
            assert scale == expected[0] or abs(scale - expected[0]) < 1e-12
    # One step with zero gradients and lr=1: a decayed leaf moves by -0.1 * m * p, the
    # others not at all; frozen leaves keep no adam state.
    params = eqx.filter(model, eqx.is_array)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dm.PolicyWarning)
        # full=: a drawn freeze rule may match nothing, which wrap would take for a part.
        tx = policy.wrap(optax.adamw(1.0, weight_decay=0.1, mask=policy.mask), full=model)
        state = tx.init(params)
        updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
    flat_p = jax.tree.leaves(params)
    for row, scale, p, u in zip(report, scales, flat_p, jax.tree.leaves(updates)):
        expected = -0.1 * np.asarray(scale) * np.asarray(p) if row.decay else np.zeros(p.shape)
        np.testing.assert_allclose(np.asarray(u), expected, rtol=1e-6, atol=0, err_msg=row.path)
    held = sum(x.size for x in jax.tree.leaves(state) if hasattr(x, "size") and x.ndim > 0)
    assert held == 2 * sum(row.leaf.size for row in report if row.trainable)


def test_a_named_array_takes_the_name_of_the_field_holding_it():
    inner = eqx.nn.Linear(3, 2, key=jax.random.key(0))
    inner = eqx.tree_at(
        lambda l: (l.weight, l.bias),
        inner,
        (NamedArray(inner.weight, ("out", "in")), NamedArray(inner.bias, ("out",))),
    )
    policy = dm.presets.everything_but_bias_and_norm()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mask = policy.for_equinox(inner)
    assert (mask.weight.array, mask.bias.array) == (True, False)
    rows = policy.explain(inner)
    assert [(r.layer, r.role, r.decay) for r in rows] == [
        ("linear", "weight", True),
        ("linear", "bias", False),
    ]
