"""Masks of abstract models (no parameter memory) equal the masks of the real models."""

from __future__ import annotations

import equinox as eqx
import jax
import pytest
from flax import nnx

import decaymask as dm
from decaymask import _demo
from helpers import assert_same_tree

POLICIES = [_demo.SEED_POLICY, dm.presets.standard(), dm.presets.gpt()]
IDS = ["seed", "standard", "gpt"]


def _rows(report):
    return [(r.path, r.layer, r.layer_type, r.role, r.shape, r.dtype, r.decay) for r in report]


@pytest.mark.parametrize("policy", POLICIES, ids=IDS)
def test_equinox_filter_eval_shape(policy):
    real, abstract = _demo.equinox_model(), eqx.filter_eval_shape(_demo.equinox_model)
    assert_same_tree(policy.for_equinox(abstract), policy.for_equinox(real))
    assert _rows(policy.explain(abstract)) == _rows(policy.explain(real))


@pytest.mark.parametrize("policy", POLICIES, ids=IDS)
def test_linen_eval_shape_of_init(policy):
    module, args = _demo.linen_model()
    real = module.init(jax.random.key(0), *args)
    abstract = jax.eval_shape(module.init, jax.random.key(0), *args)
    assert isinstance(jax.tree.leaves(abstract)[0], jax.ShapeDtypeStruct)
    for kwargs in ({}, {"module": module, "args": args}):
        assert policy.for_flax(abstract["params"], **kwargs) == policy.for_flax(real["params"], **kwargs)
        assert _rows(policy.explain(abstract, **kwargs)) == _rows(policy.explain(real, **kwargs))


@pytest.mark.parametrize("policy", POLICIES, ids=IDS)
def test_nnx_eval_shape(policy):
    real, abstract = _demo.nnx_model(), nnx.eval_shape(_demo.nnx_model)
    assert isinstance(abstract.head.kernel.get_value(), jax.ShapeDtypeStruct)
    assert_same_tree(policy.for_flax(abstract), policy.for_flax(real))
    assert _rows(policy.explain(abstract)) == _rows(policy.explain(real))
