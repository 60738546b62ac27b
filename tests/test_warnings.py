"""Warnings where the user most likely made a mistake, and the strict mode."""

from __future__ import annotations

import dataclasses
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest

import decaymask as dm

KEY = jax.random.key(0)


class Counted(eqx.Module):
    fc: eqx.nn.Linear
    steps: jax.Array


def test_rule_matching_nothing_warns_where_a_typo_is_plausible():
    policy = dm.Policy(dm.decay(layer="linear"), dm.no_decay(path="embed/*"))
    with pytest.warns(dm.PolicyWarning) as record:
        policy.for_equinox(eqx.nn.Linear(2, 2, key=KEY))
    assert [str(w.message) for w in record] == [
        "for_equinox: rule 2 no_decay(path='embed/*') matched no parameter of this "
        "tree. Check the kind, role, name or path it selects against "
        "policy.explain(tree), which lists what every array is. (strict=True makes "
        "this an error.)"
    ]
    # The warning points at the caller's line, not at decaymask.
    assert record[0].filename == __file__


@pytest.mark.parametrize(
    "rule",
    [dm.no_decay(path="nothing/*"), dm.no_decay(name="w_q"), dm.decay(within="attention"),
     dm.decay(layer=eqx.nn.Embedding), dm.decay(within=eqx.nn.MLP)],
    ids=["path", "name", "within-kind", "layer-class", "within-class"],
)
def test_selectors_of_the_users_own_words_warn_when_they_match_nothing(rule):
    with pytest.warns(dm.PolicyWarning, match=r"matched no parameter of this tree"):
        dm.Policy(dm.decay(layer="linear"), rule).for_equinox(eqx.nn.Linear(2, 2, key=KEY))


def test_a_kind_or_role_the_tree_lacks_is_not_a_mistake():
    # A bias-free model under a policy that spares biases, a CNN without embeddings.
    model = eqx.nn.Linear(2, 2, use_bias=False, key=KEY)
    policy = dm.Policy(dm.decay(), dm.no_decay(param="bias"), dm.no_decay(layer="embedding"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert policy.for_equinox(model).weight is True
    for preset in (dm.presets.standard(), dm.presets.everything_but_bias_and_norm(),
                   dm.presets.gpt(), dm.presets.muon()):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            preset.for_equinox(model)
    # strict=True asks to hear of every rule that matches nothing.
    with pytest.raises(dm.UnmatchedRuleError, match=r"rule 2 no_decay\(param='bias'\)"):
        dm.Policy(*policy.rules, strict=True).for_equinox(model)


def test_explain_reports_the_warnings_a_mask_would_give():
    model = Counted(eqx.nn.Linear(2, 2, key=KEY), jnp.zeros((), jnp.int32))
    policy = dm.Policy(dm.decay(layer="linear"), dm.no_decay(path="typo/*"))
    with pytest.warns(dm.PolicyWarning) as record:
        policy.for_equinox(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = policy.explain(model)
    assert [m.replace("explain:", "for_equinox:") for m in report.warnings] == [
        str(w.message) for w in record
    ]
    assert len(report.warnings) == 2
    assert str(report).splitlines()[-2:] == [f"warning: {m}" for m in report.warnings]
    strict = dm.Policy(*policy.rules, strict=True)
    assert strict.explain(model).warnings[0].startswith(
        "explain: rule 2 no_decay(path='typo/*') matched no parameter"
    )


def test_rule_overridden_everywhere_still_counts_as_matching():
    policy = dm.Policy(dm.decay(param="bias"), dm.no_decay(layer="linear"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        policy.for_equinox(eqx.nn.Linear(2, 2, key=KEY))


def test_strict_policy_raises():
    policy = dm.Policy(dm.decay(layer="linear"), dm.decay(param="scale"), strict=True)
    with pytest.raises(dm.UnmatchedRuleError) as info:
        policy.for_equinox(eqx.nn.Linear(2, 2, key=KEY))
    assert isinstance(info.value, ValueError)
    assert str(info.value) == (
        "for_equinox: rule 2 decay(param='scale') matched no parameter of this tree. "
        "Check the kind, role, name or path it selects against policy.explain(tree), "
        "which lists what every array is."
    )
    # explain shows every row instead of failing.
    assert len(policy.explain(eqx.nn.Linear(2, 2, key=KEY))) == 2


def test_integer_arrays_in_params_warn():
    model = Counted(eqx.nn.Linear(2, 2, key=KEY), jnp.zeros((), jnp.int32))
    policy = dm.Policy(dm.decay(layer="linear"))
    with pytest.warns(dm.PolicyWarning) as record:
        mask = policy.for_equinox(model)
    assert mask.steps is False
    assert [str(w.message) for w in record] == [
        "for_equinox: the params hold integer or bool arrays (steps); the mask leaves "
        "them undecayed, but optax's other transformations still update them. Hand "
        "optax eqx.filter(model, eqx.is_inexact_array) and build the mask from that (or "
        "pass mask=policy.for_equinox)."
    ]
    # The documented fix is silent.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        policy.for_equinox(eqx.filter(model, eqx.is_inexact_array))


def test_unknown_layer_owning_parameters_warns():
    class Gate(eqx.Module):
        w: jax.Array
        b: jax.Array

    with pytest.warns(dm.PolicyWarning) as record:
        dm.Policy(dm.decay(param="weight")).for_equinox({"gate": Gate(jnp.ones((2, 2)), jnp.ones(2))})
    assert [str(w.message) for w in record] == [
        "for_equinox: layers of unknown kind own parameters (Gate: gate/w, gate/b); "
        "rules on layer kinds never match them. Teach decaymask the layer with "
        "dm.register_layer(Gate, kind, roles={...}), or select these by param=, name= "
        "or path=."
    ]


def test_shared_parameter_whose_owners_disagree_warns():
    head = dm.Leaf("head/kernel", layer="linear", role="weight", shape=(4, 2))
    embed = dm.Leaf("embed/embedding", layer="embedding", role="embedding", shape=(4, 2))
    tied = dataclasses.replace(embed, shared_with=(head,))
    policy = dm.Policy(dm.decay(layer="linear"))
    with pytest.warns(dm.PolicyWarning) as record:
        [decision] = policy.decide_for_mask([tied], method="for_flax", non_floating_fix="")
    assert decision.decay is False
    assert [str(w.message) for w in record] == [
        "for_flax: embed/embedding is shared with head/kernel, and the policy decides "
        "them differently (embed/embedding: default; head/kernel: rule 1: "
        "decay(layer='linear')). The shared array follows embed/embedding. Add a rule "
        "that selects both views, e.g. by path."
    ]


def test_for_equinox_rejects_flax_input():
    with pytest.raises(TypeError) as info:
        dm.Policy().for_equinox({"Dense_0": {"kernel": jnp.ones((2, 2))}})
    assert str(info.value) == (
        "for_equinox: got a dict that holds no Equinox module, which looks like Flax "
        "Linen params; use policy.for_flax(params). For a pytree of Equinox modules, "
        "pass the modules themselves."
    )
    from flax.core import FrozenDict

    with pytest.raises(TypeError, match=r"^for_equinox: got a FrozenDict from Flax; use policy\.for_flax\(\.\.\.\) for Flax params, variables, nnx\.Module or nnx\.State\.$"):
        dm.Policy().for_equinox(FrozenDict({"Dense_0": {"kernel": jnp.ones((2, 2))}}))


def test_for_flax_rejects_equinox_input():
    with pytest.raises(TypeError) as info:
        dm.Policy().for_flax(eqx.nn.Linear(2, 2, key=KEY))
    assert str(info.value) == (
        "for_flax: got an Equinox Linear; use policy.for_equinox(model) for Equinox "
        "models and their params."
    )
    with pytest.raises(TypeError, match=r"^for_flax: expected a Linen params or variables mapping"):
        dm.Policy().for_flax([1, 2])


def test_a_partition_branch_view_does_not_warn_about_rules_of_other_branches():
    import optax

    model = eqx.nn.Linear(2, 2, key=KEY)
    params = eqx.filter(model, eqx.is_inexact_array)
    # What optax.partition hands the branch that owns only the weight.
    view = eqx.tree_at(lambda m: m.bias, params, optax.MaskedNode())
    policy = dm.Policy(dm.decay(param="weight"), dm.no_decay(param="bias"), strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mask = policy.for_equinox(view)
    assert mask.weight is True and mask.bias == optax.MaskedNode()
    with pytest.raises(dm.UnmatchedRuleError):
        policy.for_equinox({"w": eqx.nn.Linear(2, 2, use_bias=False, key=KEY)})


class Gate(eqx.Module):
    w: jax.Array

    def __init__(self, n: int = 3):
        self.w = jnp.ones((n, n))


def _gated(n: int = 3, *, norm: bool = False) -> dict:
    model = {"fc": eqx.nn.Linear(n, n, key=KEY), "gate": Gate(n)}
    if norm:
        model["norm"] = eqx.nn.LayerNorm(n)
    return eqx.filter(model, eqx.is_array)


def _train(policy: dm.Policy, params, steps: int = 3) -> None:
    """A real optax.adamw with the callable mask: init, a jitted update and an eager one."""
    import optax

    tx = optax.adamw(1e-3, weight_decay=0.1, mask=policy.for_equinox)
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    step = jax.jit(tx.update)
    for _ in range(steps):
        _, state = step(grads, state, params)
    tx.update(grads, state, params)


UNKNOWN_GATE = "for_equinox: layers of unknown kind own parameters (Gate: gate/w)"


def _policy_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, dm.PolicyWarning)]


def test_a_callable_mask_warns_once_per_cause_under_the_default_filters():
    policy = dm.Policy(dm.decay(layer="linear", param="weight"))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("default")
        _train(policy, _gated())
    messages = _policy_warnings(record)
    assert len(messages) == 1 and messages[0].startswith(UNKNOWN_GATE)
    assert record[0].filename == __file__  # at the user's tx.init line
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("default")
        _train(policy, _gated())
        policy.for_equinox(_gated(4))  # the same tree structure and cause: shown already
        # Another tree structure, and another cause on the same tree, are shown.
        policy.for_equinox(_gated(norm=True))
        dm.Policy(dm.decay(layer="linear"), dm.no_decay(path="typo/*")).for_equinox(_gated())
    messages = _policy_warnings(record)
    assert len(messages) == 3
    assert messages[0].startswith(UNKNOWN_GATE) and messages[1].startswith(UNKNOWN_GATE)
    assert messages[2].startswith("for_equinox: rule 2 no_decay(path='typo/*') matched no parameter")


def test_always_shows_every_call_and_error_raises_at_every_call():
    policy = dm.Policy(dm.decay(layer="linear", param="weight"))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _train(policy, _gated(), steps=1)
    # init, the jitted update's trace, the eager update.
    assert len(_policy_warnings(record)) == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            with pytest.raises(dm.PolicyWarning, match="layers of unknown kind"):
                policy.for_equinox(_gated())
