"""One policy decides the same on Haiku params as on Linen params, layer by layer.

The spec of :mod:`.models` is built in Haiku (:mod:`.haiku_models`, without PReLU);
every policy of :data:`.test_decisions.POLICIES` is explained on the Haiku params and on
the Linen params, each read by names alone and with the exact classes (Haiku ``fn=`` and
``args=``, Linen ``module=`` and ``args=``), and the decisions are compared per (spec
module path, role). Then one real ``optax.adamw`` step, with the Haiku params and
gradients copied from Linen's, gives the same updates array by array.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import numpy as np
import optax
import pytest

import decaymask as dm

from . import haiku_models
from .models import KINDS, LAYER_PATHS, example_inputs, fill, linen_model, linen_variables
from .models import module_path as linen_module_path
from .test_decisions import MODES, POLICIES, Table, assert_parity, format_rows

SEED = POLICIES["seed"]


@functools.cache
def _builds() -> tuple[Any, Any, Any]:
    params, state = haiku_models.haiku_params()
    return params, state, linen_variables()["params"]


def explain(policy: dm.Policy, framework: str, mode: str) -> dm.Report:
    params, _, linen = _builds()
    if framework == "haiku":
        options = {"fn": haiku_models.haiku_transformed(), "args": example_inputs()}
        return policy.explain(params, framework="haiku", **(options if mode == "classes" else {}))
    if mode == "classes":
        return policy.explain(linen, module=linen_model(), args=example_inputs())
    return policy.explain(linen)


def table(report: dm.Report, framework: str, value: Any) -> Table:
    owner = haiku_models.module_path if framework == "haiku" else linen_module_path
    found: dict[tuple[str, str], set] = {}
    for row in report:
        path = owner(row.path)
        if row.leaf.is_param and path != "prelu":
            found.setdefault((path, row.role), set()).add(value(row))
    return {key: frozenset(values) for key, values in found.items()}


def tables(policy: dm.Policy, mode: str, value: Any) -> dict[str, Table]:
    return {f: table(explain(policy, f, mode), f, value) for f in ("linen", "haiku")}


@pytest.mark.parametrize("mode", MODES)
def test_every_haiku_parameter_belongs_to_one_layer_of_the_spec(mode):
    owners = {haiku_models.module_path(row.path) for row in explain(SEED, "haiku", mode)}
    assert owners == set(LAYER_PATHS) - {"prelu"}


@pytest.mark.parametrize("mode", MODES)
def test_kinds_and_ranks_agree(mode):
    kinds = tables(SEED, mode, lambda row: row.layer)
    spec = {key: frozenset({KINDS[key[0]]}) for key in kinds["haiku"]}
    assert_parity({"spec": spec, **kinds}, "kinds")
    assert_parity(tables(SEED, mode, lambda row: row.leaf.ndim), "ranks")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("policy_name", POLICIES)
def test_decisions_agree_with_linen(policy_name, mode):
    assert_parity(tables(POLICIES[policy_name], mode, lambda row: row.decay),
                  f"decisions of {policy_name} ({mode})")


@pytest.mark.parametrize("mode", MODES)
def test_batch_norm_statistics_are_state(mode):
    _, state, _ = _builds()
    options = {"fn": haiku_models.haiku_transformed(), "args": example_inputs()}
    report = dm.Policy(dm.decay()).explain(
        state, framework="haiku", **(options if mode == "classes" else {})
    )
    assert {haiku_models.module_path(row.path) for row in report} == {"batch_norm"}
    assert not any(row.decay or row.leaf.is_param for row in report)


def _flat(tree: Any) -> dict[str, Any]:
    return {f"{k}/{n}": v for k, m in tree.items() for n, v in m.items()}


@pytest.mark.parametrize("mode", MODES)
def test_one_adamw_step_gives_linens_updates(mode):
    """Params and gradients copied from Linen's, each framework's own mask: after one
    real step, every Haiku update is the Linen update in Haiku's layout, and it differs
    from a step without decay exactly where ``explain`` says the leaf decays."""
    _, _, linen = _builds()
    linen = jax.tree.map(np.asarray, linen)
    grads = jax.tree.map(np.asarray, fill(jax.eval_shape(lambda: linen), seed=1))
    params, haiku_grads = haiku_models.from_linen(linen), haiku_models.from_linen(grads)
    fn = haiku_models.haiku_transformed()
    plain = optax.adam(0.5)
    undecayed = _flat(plain.update(haiku_grads, plain.init(params), params)[0])
    wrong = []
    for name, policy in POLICIES.items():
        if mode == "classes":
            haiku_mask = policy.for_haiku(params, fn=fn, args=example_inputs())
            linen_mask = policy.for_flax(linen, module=linen_model(), args=example_inputs())
        else:
            haiku_mask, linen_mask = policy.for_haiku, policy.for_flax
        updates = {}
        for label, p, g, mask in (("haiku", params, haiku_grads, haiku_mask),
                                  ("linen", linen, grads, linen_mask)):
            tx = optax.adamw(0.5, weight_decay=0.25, mask=mask)
            updates[label] = tx.update(g, tx.init(p), p)[0]
        expected = _flat(haiku_models.from_linen(jax.tree.map(np.asarray, updates["linen"])))
        decays = {row.path: row.decay for row in explain(policy, "haiku", mode)}
        for path, update in _flat(updates["haiku"]).items():
            if not np.allclose(update, expected[path], rtol=1e-6, atol=1e-7):
                wrong.append([name, path, "differs from Linen's"])
            if decays[path] == np.allclose(update, undecayed[path], rtol=1e-6, atol=1e-7):
                wrong.append([name, path, f"explain says decay={decays[path]}"])
    assert not wrong, format_rows(["policy", "path", "update"], wrong)
