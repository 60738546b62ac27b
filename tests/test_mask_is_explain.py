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
        kind = draw(st.sampled_from(("decay", "no_decay", "label")))
        if kind == "decay":
            rules.append(dm.decay(rate=draw(st.sampled_from((1.0, 0.5))), **selectors))
        elif kind == "no_decay":
            rules.append(dm.no_decay(**selectors))
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
    assert jax.tree.leaves(mask) == [row.decay for row in report]
    assert jax.tree.leaves(labels) == [row.label for row in report]
    assert jax.tree.leaves(rates) == [row.rate for row in report]


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
