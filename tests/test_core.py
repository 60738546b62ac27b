"""The framework-neutral core: rules, policies, decisions and reports on plain leaves."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

import decaymask as dm

FC_W = dm.Leaf("fc/kernel", layer="linear", role="weight", shape=(4, 2))
FC_B = dm.Leaf("fc/bias", layer="linear", role="bias", shape=(2,))
LN_S = dm.Leaf("ln/scale", layer="layer_norm", role="scale", shape=(2,))
LN_B = dm.Leaf("ln/bias", layer="layer_norm", role="bias", shape=(2,))
EMB = dm.Leaf("embed/embedding", layer="embedding", role="embedding", shape=(10, 2))
LEAVES = [FC_W, FC_B, LN_S, LN_B, EMB]


def decisions(policy, leaves=LEAVES):
    return [d.decay for d in policy.decide(leaves)]


def test_last_matching_rule_wins():
    policy = dm.Policy(dm.decay(), dm.no_decay(param="bias"), dm.decay(layer="norm"))
    assert decisions(policy) == [True, False, True, True, True]
    assert [d.reason for d in policy.decide(LEAVES)] == [
        "rule 1",
        "rule 2",
        "rule 3",
        "rule 3",
        "rule 1",
    ]


def test_default_decides_unmatched_leaves():
    assert decisions(dm.Policy(default=True)) == [True] * 5
    decided = dm.Policy(dm.no_decay(layer="embedding"), default=True).decide(LEAVES)
    assert [(d.decay, d.rule, d.reason) for d in decided][-2:] == [
        (True, None, "default"),
        (False, dm.no_decay(layer="embedding"), "rule 1"),
    ]


@pytest.mark.parametrize(
    "rule, expected",
    [
        (dm.decay(layer="linear"), [True, True, False, False, False]),
        (dm.decay(layer=("norm", "embedding")), [False, False, True, True, True]),
        (dm.decay(param="weight"), [True, False, False, False, False]),
        (dm.decay(name="bias"), [False, True, False, True, False]),
        (dm.decay(path="ln/*"), [False, False, True, True, False]),
        (dm.decay(path="*kernel"), [True, False, False, False, False]),
        (dm.decay(path=re.compile("b")), [False, True, False, True, True]),
        (dm.decay(min_ndim=2), [True, False, False, False, True]),
        (dm.decay(when=lambda leaf: leaf.size == 2), [False, True, True, True, False]),
        (dm.decay(layer="linear", param="bias"), [False, True, False, False, False]),
    ],
    ids=lambda x: repr(x) if isinstance(x, dm.Rule) else "",
)
def test_selectors(rule, expected):
    assert decisions(dm.Policy(rule)) == expected


def test_within_matches_the_owner_and_every_ancestor():
    block = dm.Layer("unknown", "Block", None, "name")
    attn = dm.Layer("attention", "MultiHeadDotProductAttention", None, "name")
    q = dm.Leaf("b/attn/q/kernel", layer="linear", role="weight", ancestors=(block, attn))
    mlp = dm.Leaf("b/mlp/kernel", layer="linear", role="weight", ancestors=(block,))
    assert decisions(dm.Policy(dm.decay(within="attention")), [q, mlp]) == [True, False]
    assert decisions(dm.Policy(dm.decay(within="linear")), [q, mlp]) == [True, True]
    assert decisions(dm.Policy(dm.decay(layer="attention")), [q, mlp]) == [False, False]

    class Block:
        pass

    # A module known only by name matches a class of that name.
    assert decisions(dm.Policy(dm.decay(within=Block)), [q, mlp]) == [True, True]


def test_class_selectors_use_issubclass():
    class Base:
        pass

    class Child(Base):
        pass

    leaf = dm.Leaf("x/w", layer="linear", role="weight", layer_type="Child", layer_class=Child)
    assert decisions(dm.Policy(dm.decay(layer=Base)), [leaf]) == [True]
    assert decisions(dm.Policy(dm.decay(layer=int)), [leaf]) == [False]


def test_state_and_integer_leaves_never_decay():
    state = dm.Leaf("bn/mean", layer="batch_norm", is_param=False)
    step = dm.Leaf("count", dtype="int32")
    decided = dm.Policy(dm.decay(), default=True).decide([state, step])
    assert [(d.decay, d.rule, d.reason) for d in decided] == [
        (False, None, "state: never decayed"),
        (False, None, "not floating point: never decayed"),
    ]


def test_shared_leaf_conflicts_are_reported():
    head = dm.Leaf("head/kernel", layer="linear", role="weight", shape=(10, 2))
    tied = dataclasses.replace(EMB, shared_with=(head,))
    [decision] = dm.Policy(dm.decay(layer="linear")).decide([tied])
    assert decision.decay is False
    assert [c.path for c in decision.conflicts] == ["head/kernel"]
    assert decision.why == (
        "default [shared with head/kernel, where rule 1: decay(layer='linear') would say decay]"
    )
    [agreeing] = dm.Policy().decide([tied])
    assert agreeing.conflicts == ()


def test_rules_and_policies_are_frozen_hashable_and_readable():
    rule = dm.decay(layer=("linear", "conv"), param="weight")
    assert rule == dm.decay(layer=["linear", "conv"], param="weight")
    assert hash(rule) == hash(dm.decay(layer=("linear", "conv"), param="weight"))
    assert repr(rule) == "decay(layer=('linear', 'conv'), param='weight')"
    assert repr(dm.no_decay(path=re.compile("x$"), min_ndim=2)) == (
        "no_decay(path=re.compile('x$'), min_ndim=2)"
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        rule.layer = ("conv",)  # type: ignore[misc]
    policy = dm.Policy(rule, dm.no_decay(layer="norm"), default=True)
    assert policy == dm.Policy(rule, dm.no_decay(layer="norm"), default=True)
    assert len({policy, dm.Policy(rule, dm.no_decay(layer="norm"), default=True)}) == 1
    assert repr(policy) == (
        "Policy(\n"
        "    decay(layer=('linear', 'conv'), param='weight'),\n"
        "    no_decay(layer='norm'),\n"
        "    default=True,\n"
        ")"
    )
    assert repr(dm.Policy()) == "Policy()"
    with pytest.raises(dataclasses.FrozenInstanceError, match="Policy is immutable"):
        policy.default = False  # type: ignore[misc]


def test_unknown_kind_lists_valid_names_and_suggests():
    with pytest.raises(ValueError) as info:
        dm.decay(layer="layernorm")
    assert str(info.value) == (
        "decay(layer='layernorm'): unknown layer kind 'layernorm'. Did you mean "
        "'layer_norm'? Valid kinds: linear, conv, embedding, layer_norm, rms_norm, "
        "group_norm, batch_norm, instance_norm, attention, recurrent, prelu, lora, "
        "unknown; groups: norm. Teach decaymask a new layer class with "
        "dm.register_layer(cls, kind)."
    )


def test_unknown_role_suggests_and_points_at_name():
    with pytest.raises(ValueError) as info:
        dm.no_decay(param="kernel")
    assert str(info.value) == (
        "no_decay(param='kernel'): unknown parameter role 'kernel'. Valid roles: weight, "
        "bias, scale, embedding, other. To match the framework's own attribute name "
        "instead, use name='kernel'."
    )
    with pytest.raises(ValueError, match=r"unknown parameter role 'biases'\. Did you mean 'bias'\?"):
        dm.decay(param="biases")


def test_unknown_selector_keyword():
    with pytest.raises(TypeError) as info:
        dm.decay(layers="linear")
    message = str(info.value)
    assert message.startswith(
        "decay() got unknown selector 'layers' (did you mean 'layer'?). Valid selectors: "
        "layer= a layer kind or group (e.g. 'linear', 'norm'), a layer class, or a tuple "
        "of those; within= "
    )
    assert "min_ndim= a non-negative int; when= a callable taking a dm.Leaf" in message


@pytest.mark.parametrize(
    "selectors, message",
    [
        ({"layer": 3}, "decay(layer=3): expected a layer kind or group (e.g. 'linear', 'norm'), a layer class, or a tuple of those; got int."),
        ({"param": None, "name": 1}, "decay(name=1): expected the framework's own attribute or key name (e.g. 'kernel'), or a tuple of names; got int."),
        ({"path": b"x"}, "decay(path=b'x'): expected a glob over the canonical path (e.g. 'encoder/*/kernel'), a compiled re.Pattern (searched), or a tuple of those; got bytes."),
        ({"min_ndim": -1}, "decay(min_ndim=-1): expected a non-negative int; got int."),
        ({"min_ndim": True}, "decay(min_ndim=True): expected a non-negative int; got bool."),
        ({"when": "big"}, "decay(when='big'): expected a callable taking a dm.Leaf and returning a bool; got str."),
    ],
    ids=["layer", "name", "path", "min_ndim", "min_ndim_bool", "when"],
)
def test_bad_selector_values(selectors, message):
    with pytest.raises(TypeError) as info:
        dm.decay(**selectors)
    assert str(info.value) == message


def test_empty_selector_tuple():
    with pytest.raises(ValueError, match=r"decay\(layer=\(\)\): an empty tuple matches nothing; leave layer out\."):
        dm.decay(layer=())


def test_when_must_return_a_bool():
    policy = dm.Policy(dm.decay(when=lambda leaf: leaf.size))
    with pytest.raises(TypeError, match=r"when= returned 8 \(int\) for 'fc/kernel'; it must return True or False\."):
        policy.decide([FC_W])


def test_policy_rejects_non_rules():
    with pytest.raises(TypeError) as info:
        dm.Policy([dm.decay()])
    assert str(info.value) == (
        "Policy(...): argument 0 is [decay()] (list), not a rule. Make rules with "
        "dm.decay(...) or dm.no_decay(...). Pass the rules themselves, not a list: "
        "dm.Policy(*rules)."
    )
    with pytest.raises(TypeError, match=r"Policy\(default=1\): expected True or False, got int\."):
        dm.Policy(default=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"Policy.decide: expected dm.Leaf records, got dict\."):
        dm.Policy().decide([{}])


def test_leaf_validates_kind_and_role():
    with pytest.raises(ValueError, match=r"Leaf\('x', layer=...\): unknown layer kind 'dense'"):
        dm.Leaf("x", layer="dense")
    with pytest.raises(ValueError, match=r"Leaf\('x', layer=...\): unknown layer kind 'norm'"):
        dm.Leaf("x", layer="norm")  # a group is not a kind
    with pytest.raises(ValueError, match=r"Leaf\('x', role=...\): unknown parameter role 'w'"):
        dm.Leaf("x", role="w")
    leaf = dm.Leaf("a/b/kernel", shape=[2, 3], dtype="bfloat16", batch_axes=1)
    assert (leaf.name, leaf.shape, leaf.ndim, leaf.size, leaf.floating) == ("kernel", (2, 3), 1, 6, True)


def test_register_layer_validates():
    with pytest.raises(ValueError, match=r"register_layer\(kind=...\): unknown layer kind 'norm'"):
        dm.register_layer("Thing", "norm")
    with pytest.raises(ValueError, match=r"register_layer\(roles=\{'w': ...\}\): unknown parameter role 'kernel'"):
        dm.register_layer("Thing", "linear", roles={"w": "kernel"})
    with pytest.raises(TypeError, match=r"register_layer: expected a layer class or a class name, got 3 \(int\)\."):
        dm.register_layer(3, "linear")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"register_layer\(roles=...\): expected a mapping"):
        dm.register_layer("Thing", "linear", roles=[("w", "weight")])  # type: ignore[arg-type]
    with pytest.raises(KeyError, match="unregister_layer: 'Nothing' is not registered."):
        dm.unregister_layer("Nothing")


def test_report_table_and_totals():
    report = dm.Policy(dm.decay(layer="linear", param="weight")).report(LEAVES)
    assert len(report) == 5 and report[0].decay and not report[1].decay
    assert [r.path for r in report.decayed] == ["fc/kernel"]
    assert (report.num_elements, report.num_elements_decayed) == (34, 8)
    assert report.summary() == "decayed 1 of 5 leaves, 8 of 34 elements (23.5%)"
    assert repr(report) == "<Report: decayed 1 of 5 leaves, 8 of 34 elements (23.5%)>"
    assert str(report).splitlines()[:3] == [
        "path             kind        via    class  role       shape    decay  rule",
        "----             ----        ---    -----  ----       -----    -----  ----",
        "fc/kernel        linear      given  -      weight     (4, 2)   yes    rule 1: decay(layer='linear', param='weight')",
    ]


def test_vocabulary():
    assert dm.KINDS[-1] == "unknown" and "norm" in dm.GROUPS
    assert dm.GROUPS["norm"] == ("layer_norm", "rms_norm", "group_norm", "batch_norm", "instance_norm")
    assert dm.ROLES == (
        "weight", "bias", "scale", "embedding", "position", "token", "gain", "buffer", "other"
    )


def test_report_markdown_json_and_html():
    policy = dm.Policy(dm.decay(layer="linear", param="weight", rate=0.5), dm.label("frozen", layer="embedding"))
    report = policy.report(LEAVES)
    assert report.to_markdown().splitlines()[:3] == [
        "| path | kind | via | class | role | shape | decay | label | rate | rule |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        "| `fc/kernel` | linear | given | - | weight | (4, 2) | yes | decay | 0.5 | rule 1: decay(layer='linear', param='weight', rate=0.5) |",
    ]
    assert report.to_markdown().endswith("\n\ndecayed 1 of 5 leaves, 8 of 34 elements (23.5%)\n")
    data = json.loads(report.to_json())
    assert data["totals"] == {"leaves": 5, "leaves_decayed": 1, "elements": 34, "elements_decayed": 8}
    assert data["rows"][4] == {
        "path": "embed/embedding", "kind": "embedding", "via": "given", "class": None,
        "role": "embedding", "shape": [10, 2], "dtype": "float32", "decay": False,
        "label": "frozen", "rate": 0.0, "rule": None, "why": "default",
    }
    html = report._repr_html_()
    assert html.startswith('<div class="decaymask-report"><style>')
    assert '<p class="dm-summary"><b>decayed 1 of 5 leaves, 8 of 34 elements (23.5%)</b>' in html
    assert "<table><thead><tr><th>path</th><th>kind</th>" in html
    assert '<tr class="dm-yes"><td><code>fc/kernel</code></td>' in html
    assert '<td class="dm-mark">&#10003; yes</td>' in html and html.endswith("</table></div>")
    hostile = dm.Policy().report([dm.Leaf("a/<b>&c", layer="linear")])
    assert "<td><code>a/&lt;b&gt;&amp;c</code></td>" in hostile._repr_html_()
