"""Property tests: random models in three frameworks, random policies, an oracle.

Hypothesis draws Equinox, Flax Linen and Flax NNX models from the layer table (linear,
conv, conv-transpose, embedding, the norms, attention, recurrent cells, PReLU, MLPs)
nested in random containers (lists, tuples, dicts, user modules, static and non-array
fields; Linen modules with auto and user names, ``nn.Sequential``, ``nn.scan`` and
``nn.vmap`` blocks; ``nnx.List``, ``nnx.Dict``, ``nnx.Sequential``, ``nnx.vmap``-stacked
layers; ``eqx.filter_vmap`` ensembles), and a random policy over every selector. For
each draw the mask must:

1. have exactly the structure (and container types) of the params optax is handed;
2. hold Python bools;
3. pass a real zero-gradient ``optax.adamw`` step: decayed leaves move by exactly
   ``-weight_decay * p``, the others not at all;
4. equal the decisions of an oracle (``strategies.oracle``) computed from the way the
   model was built, not from decaymask;
5. leave the input model unchanged.

Each drawn policy may first go through ``to_dict``/``from_dict`` (via JSON) or a pickle
round trip, which must give an equal policy; and the mask of a drawn policy is built now
and then from 8 threads at once, each result equal to the one built alone.

Hypothesis settings come from a profile chosen by the environment variable
``DECAYMASK_HYPOTHESIS_PROFILE``: ``ci`` (the default: few examples, derandomized, no
example database, so that a failure reproduces) or ``thorough`` (many random examples)::

    DECAYMASK_HYPOTHESIS_PROFILE=thorough python -m pytest tests/test_properties.py
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import threading
import warnings

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.core import freeze
from hypothesis import HealthCheck, assume, given, note, settings
from hypothesis import strategies as st

import decaymask as dm
from helpers import (
    WEIGHT_DECAY,
    assert_bool_leaves,
    assert_decays_exactly,
    assert_same_tree,
    flat_with_paths,
    zero_grad_updates,
)
from strategies import (
    EQX_EXTRA_CLASSES,
    LINEN_EXTRA_CLASSES,
    NNX_EXTRA_CLASSES,
    build_eqx,
    build_nnx,
    eqx_specs,
    flat_by_path,
    linen_expects,
    linen_model,
    linen_specs,
    nnx_specs,
    nonzero,
    oracle,
    policies,
)

with warnings.catch_warnings():
    # Hypothesis writes a failing example as a patch with libcst, whose import warns
    # (a DeprecationWarning from mypy_extensions); under filterwarnings=error that would
    # turn a failure into an internal error. Import it once here, quietly.
    warnings.simplefilter("ignore", DeprecationWarning)
    with contextlib.suppress(ImportError):
        import hypothesis.extra._patching  # noqa: F401

_SLOW = [HealthCheck.too_slow, HealthCheck.data_too_large]
settings.register_profile(
    "ci",
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=_SLOW,
    print_blob=True,
)
settings.register_profile(
    "thorough",
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=_SLOW,
    print_blob=True,
)
PROFILE = settings.get_profile(os.environ.get("DECAYMASK_HYPOTHESIS_PROFILE", "ci"))


@contextlib.contextmanager
def quiet():
    """decaymask warns about rules that match nothing and integer params: random
    policies do both, and those warnings are tested elsewhere."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dm.PolicyWarning)
        yield


def assert_decisions(mask, expected: dict[str, bool]) -> None:
    got = flat_by_path(mask)
    assert set(got) == set(expected), (set(got) ^ set(expected))
    wrong = {p: (got[p], d) for p, d in expected.items() if got[p] != d}
    assert not wrong, f"(mask, oracle) differ at {wrong}"


def fill(tree):
    """Concrete, distinct, nonzero arrays for every abstract leaf."""
    flat, treedef = jax.tree_util.tree_flatten(tree)
    return treedef.unflatten(
        [jnp.asarray(nonzero(s.shape, s.dtype, 3000 + i)) for i, s in enumerate(flat)]
    )


# Equinox.


def _shapes(tree):
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if eqx.is_array(x) else x, tree
    )


POLICIES_PER_MODEL = 4
"""Policies checked on each drawn model: a model costs far more to build than a policy."""


ROUND_TRIPS = {
    "as built": lambda policy: policy,
    "to_dict/from_dict": lambda policy: dm.Policy.from_dict(
        json.loads(json.dumps(policy.to_dict())), imports=True
    ),
    "pickle": lambda policy: pickle.loads(pickle.dumps(policy)),
}


def draw_policies(data, expects, extra_classes):
    drawn = data.draw(
        st.lists(policies(expects, extra_classes), min_size=1, max_size=POLICIES_PER_MODEL),
        label="policies",
    )
    for policy_spec in drawn:
        built = policy_spec.build()
        how = data.draw(st.sampled_from(sorted(ROUND_TRIPS)), label="round trip")
        policy = ROUND_TRIPS[how](built)
        assert policy == built and hash(policy) == hash(built), how
        note(f"{how}: {policy!r}")
        yield policy_spec, policy


THREADS = 8


def assert_same_from_threads(data, build, expected) -> None:
    """Now and then, ``build()`` in 8 threads released at once: every result must be
    ``expected`` (the mask built alone)."""
    if not data.draw(st.booleans(), label="from 8 threads"):
        return
    barrier = threading.Barrier(THREADS)
    results: list = [None] * THREADS
    errors: list = []

    def run(i):
        try:
            barrier.wait(timeout=60)
            results[i] = build()
        except BaseException as err:  # noqa: BLE001 - raised below, in the test's thread
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(THREADS)]
    # The warning filters are global: set once here, not per thread (catch_warnings in
    # several threads at once restores them out of order).
    with quiet():
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "a build did not finish"
    if errors:
        raise errors[0]
    for result in results:
        assert jax.tree.structure(result) == jax.tree.structure(expected)
        assert flat_by_path(result) == flat_by_path(expected)


@PROFILE
@given(spec=eqx_specs(), data=st.data())
def test_equinox_mask_matches_the_oracle(spec, data):
    model, expects = build_eqx(spec)
    arrays = eqx.filter(model, eqx.is_array)
    params = eqx.filter(model, eqx.is_inexact_array)
    assert set(flat_by_path(arrays)) == {e.path for e in expects}  # the builder's own record
    floating = {e.path for e in expects if e.floating}
    leaves_before, treedef_before = jax.tree_util.tree_flatten(model)
    abstract = _shapes(model)

    for policy_spec, policy in draw_policies(data, expects, EQX_EXTRA_CLASSES):
        expected = oracle(policy_spec, expects)
        with quiet():
            mask = policy.for_equinox(model)
            abstract_mask = policy.for_equinox(abstract)
            params_mask = policy.for_equinox(params)
            report = policy.explain(model)

        assert jax.tree.structure(mask) == jax.tree.structure(arrays)
        assert_bool_leaves(mask)
        assert_decisions(mask, expected)
        assert_same_from_threads(data, lambda: policy.for_equinox(model), mask)
        assert_same_tree(abstract_mask, mask)
        assert [(row.path, row.decay) for row in report] == list(flat_by_path(mask).items())

        # The mask of the float params handed to optax: None where the model had integers.
        assert jax.tree.structure(params_mask) == jax.tree.structure(params)
        assert_decisions(params_mask, {p: d for p, d in expected.items() if p in floating})
        callable_mask = data.draw(st.booleans(), label="callable mask")
        with quiet():
            updates = zero_grad_updates(params, policy.for_equinox if callable_mask else params_mask)
        assert_decays_exactly(params, updates, flat_with_paths(params_mask))

    leaves_after, treedef_after = jax.tree_util.tree_flatten(model)
    assert treedef_after == treedef_before
    assert all(a is b for a, b in zip(leaves_after, leaves_before, strict=True))


# Flax Linen.


@PROFILE
@given(spec=linen_specs(), data=st.data())
def test_linen_mask_matches_the_oracle(spec, data):
    by_class = linen_expects(spec, traced=True)
    by_name = linen_expects(spec, traced=False)
    assume(by_class)  # a model with no params has no "params" collection at all
    module, args = linen_model(spec)
    abstract = jax.eval_shape(module.init, jax.random.key(0), *args)
    variables = fill(abstract)
    if data.draw(st.booleans(), label="FrozenDict"):
        variables = freeze(variables)
    params = variables["params"]
    assert set(flat_by_path(params)) == {e.path for e in by_class}
    leaves_before, treedef_before = jax.tree_util.tree_flatten(variables)
    for policy_spec, policy in draw_policies(data, by_class, LINEN_EXTRA_CLASSES):
        with quiet():
            traced = policy.for_flax(params, module=module, args=args)
            named = policy.for_flax(params)
            abstract_named = policy.for_flax(abstract["params"])
            whole = policy.for_flax(variables)

        for mask, expects in ((traced, by_class), (named, by_name)):
            assert jax.tree.structure(mask) == jax.tree.structure(params)
            assert_bool_leaves(mask)
            assert_decisions(mask, oracle(policy_spec, expects))
        assert_same_from_threads(data, lambda: policy.for_flax(params), named)
        # Abstract params (jax.ShapeDtypeStruct leaves) give the same mask.
        assert flat_by_path(abstract_named) == flat_by_path(named)

        # The whole variables: params as by names, every other collection never decayed.
        assert jax.tree.structure(whole) == jax.tree.structure(variables)
        assert_bool_leaves(whole)
        assert flat_by_path(whole["params"]) == flat_by_path(named)
        for collection in variables:
            if collection != "params":
                assert not any(flat_by_path(whole[collection]).values())

        which = data.draw(st.sampled_from(["traced", "named", "callable"]), label="step mask")
        tx_mask = {"traced": traced, "named": named, "callable": policy.for_flax}[which]
        with quiet():
            updates = zero_grad_updates(params, tx_mask)
        decided = traced if which == "traced" else named
        assert_decays_exactly(params, updates, flat_with_paths(decided))

    leaves_after, treedef_after = jax.tree_util.tree_flatten(variables)
    assert treedef_after == treedef_before
    assert all(a is b for a, b in zip(leaves_after, leaves_before, strict=True))


# Flax NNX.


def _values(model) -> dict[str, np.ndarray]:
    return {
        "/".join(map(str, path)): np.array(variable.get_value())
        for path, variable in nnx.to_flat_state(nnx.state(model))
        if isinstance(variable.get_value(), jax.Array)
    }


def _optimizer_step(model, mask) -> None:
    """One nnx.Optimizer step with zero gradients on a copy of ``model``: decayed params
    become exactly ``p + -(wd * p)``, the others stay as they were."""
    clone = nnx.clone(model)
    before = _values(clone)
    optimizer = nnx.Optimizer(clone, optax.adamw(1.0, weight_decay=WEIGHT_DECAY, mask=mask),
                              wrt=nnx.Param)
    optimizer.update(clone, jax.tree.map(jnp.zeros_like, nnx.state(clone, nnx.Param)))
    after = _values(clone)
    decided = flat_by_path(mask)
    wrong = []
    for path, value in before.items():
        if path in decided:
            expected = value + -(WEIGHT_DECAY * value) if decided[path] else value
            if not np.array_equal(after[path], expected):
                wrong.append(f"{path}: decay={decided[path]}")
    assert not wrong, "nnx.Optimizer moved params against the mask:\n" + "\n".join(wrong)


@PROFILE
@given(spec=nnx_specs(), data=st.data())
def test_nnx_mask_matches_the_oracle(spec, data):
    model, expects = build_nnx(spec)
    state = nnx.state(model, nnx.Param)
    pure = nnx.as_pure(state)
    assert set(flat_by_path(pure)) == {e.path for e in expects}
    shape = jax.tree.structure(nnx.map_state(lambda path, value: 0, state))
    before = _values(model)
    graphdef_before = nnx.graphdef(model)

    for policy_spec, policy in draw_policies(data, expects, NNX_EXTRA_CLASSES):
        with quiet():
            mask = policy.for_flax(model)
            state_mask = policy.for_flax(nnx.state(model, nnx.Param))
            report = policy.explain(model)
            labels = policy.labels_for_flax(model)
            rates = policy.rates_for_flax(model)

        # Every output is what explain shows.
        assert {row.path: row.decay for row in report} == flat_by_path(mask)
        assert {row.path: row.label for row in report} == flat_by_path(labels)
        assert {row.path: row.rate for row in report} == flat_by_path(rates)
        for each in (mask, state_mask):
            assert type(each) is nnx.State
            assert jax.tree.structure(each) == shape
            assert_bool_leaves(each)
        assert_decisions(mask, oracle(policy_spec, expects))
        assert_same_from_threads(data, lambda: policy.for_flax(model), mask)

        if data.draw(st.booleans(), label="nnx.Optimizer"):
            _optimizer_step(model, mask)
        else:
            with quiet():
                updates = zero_grad_updates(pure, mask)
            assert_decays_exactly(pure, updates, flat_with_paths(mask))

    after = _values(model)
    assert set(after) == set(before)
    assert all(np.array_equal(after[p], before[p]) for p in before)
    assert nnx.graphdef(model) == graphdef_before


# Smallest examples of what the properties once found.


@pytest.mark.parametrize("traced", [False, True], ids=["names", "classes"])
def test_linen_attention_bias_counts_one_axis(traced):
    attention = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=4)
    args = (jnp.ones((1, 2, 4)),)
    params = jax.eval_shape(attention.init, jax.random.key(0), *args)["params"]
    kwargs = {"module": attention, "args": args} if traced else {}
    with quiet():
        mask = flat_by_path(dm.Policy(dm.decay(min_ndim=2)).for_flax(params, **kwargs))
    assert (mask["query/bias"], mask["query/kernel"]) == (False, True)
