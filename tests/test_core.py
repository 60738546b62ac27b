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
        "no_decay(param='kernel'): unknown parameter role 'kernel'. Did you mean 'weight'? "
        "Valid roles: weight, bias, scale, embedding, position, token, gain, buffer, other. To match the framework's own attribute name "
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
        "dm.decay(...), dm.no_decay(...), dm.lr(...), dm.freeze(...) or "
        "dm.layer_decay(...). Pass the rules themselves, not a list: "
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
    # Every cell carries its alignment inline (test_report_html.py); read without it.
    html = report._repr_html_().replace(' style="text-align: left"', "")
    assert html.startswith('<div class="decaymask-report"><style>')
    assert '<p class="dm-summary"><b>decayed 1 of 5 leaves, 8 of 34 elements (23.5%)</b>' in html
    assert "<table><thead><tr><th>path</th><th>kind</th>" in html
    assert '<tr class="dm-yes"><td><code>fc/kernel</code></td>' in html
    assert '<td class="dm-mark">&#10003; yes</td>' in html and html.endswith("</table></div>")
    hostile = dm.Policy().report([dm.Leaf("a/<b>&c", layer="linear")])
    assert '<td style="text-align: left"><code>a/&lt;b&gt;&amp;c</code></td>' in hostile._repr_html_()


# Hostile but fair input: every case a clear answer.


def big(leaf: dm.Leaf) -> bool:
    return leaf.size > 4


class Cutoff:
    """A callable class with an import path: rules holding it pickle by reference."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Cutoff)

    def __hash__(self) -> int:
        return 1

    def __call__(self, leaf: dm.Leaf) -> bool:
        return leaf.size > 4


@pytest.mark.parametrize("rate", [float("inf"), float("-inf"), float("nan"), -0.5])
def test_rates_must_be_finite_and_non_negative(rate):
    with pytest.raises(TypeError, match=r"decay\(rate=[-a-z0-9.]+\): expected a non-negative number .*, got "):
        dm.decay(rate=rate)


def test_numpy_rates_are_numbers():
    np = pytest.importorskip("numpy")
    assert dm.decay(rate=np.float32(0.5)).rate == 0.5
    assert type(dm.decay(rate=np.float32(0.5)).rate) is float


def test_bytes_patterns_are_refused_at_the_rule():
    with pytest.raises(TypeError) as info:
        dm.no_decay(path=re.compile(b"bias"))
    assert str(info.value) == (
        "no_decay(path=re.compile(b'bias')): a bytes pattern cannot search a canonical "
        "path, which is a str. Compile a str pattern instead, e.g. re.compile('bias')."
    )


def test_unhashable_when_is_refused_at_the_rule():
    class Threshold:
        __hash__ = None  # type: ignore[assignment]

        def __call__(self, leaf):
            return True

    with pytest.raises(TypeError, match=r"^decay\(when=<.*Threshold object at .*>\): the callable is not hashable \(test_core\..*Threshold\), and a rule is a hashable value"):
        dm.decay(when=Threshold())
    with pytest.raises(TypeError, match=r"^no_decay\(when=.*\): the callable is not hashable"):
        dm.no_decay(when=Threshold())


def test_an_error_inside_when_names_the_rule_and_the_leaf():
    def broken(leaf):
        raise ValueError("user bug")

    policy = dm.Policy(dm.no_decay(layer="linear", when=broken))
    with pytest.raises(RuntimeError) as info:
        policy.decide(LEAVES)
    assert str(info.value).startswith(
        "no_decay(layer='linear', when=test_an_error_inside_when_names_the_rule_and_the_leaf."
        "<locals>.broken): when= raised ValueError: user bug for the leaf 'fc/kernel'."
    )
    assert isinstance(info.value.__cause__, ValueError)


def test_numpy_bools_count_as_bools():
    np = pytest.importorskip("numpy")
    policy = dm.Policy(dm.decay(when=lambda leaf: np.prod(leaf.shape) > 2))
    assert decisions(policy) == [True, False, False, False, True]
    assert dm.Policy(default=np.True_) == dm.Policy(default=True)
    assert dm.Policy(strict=np.False_).strict is False
    assert type(dm.Policy(default=np.True_).default) is bool
    with pytest.raises(TypeError, match=r"when= returned array\(\[1\]\) \(numpy\.ndarray\) for 'fc/kernel'; it must return True or False\."):
        dm.Policy(dm.decay(when=lambda leaf: np.array([1]))).decide([FC_W])
    with pytest.raises(TypeError, match=r"Policy\(default=np\.float64\(1\.0\)\): expected True or False, got numpy\.float64\."):
        dm.Policy(default=np.float64(1.0))  # type: ignore[arg-type]


def test_selectors_are_keyword_only_parameters():
    import inspect

    for make in (dm.decay, dm.no_decay, dm.label):
        parameters = inspect.signature(make).parameters
        for key in dm.SELECTORS:
            assert parameters[key].kind is inspect.Parameter.KEYWORD_ONLY, (make, key)
            assert parameters[key].default is None
    with pytest.raises(TypeError, match=r"^no_decay\(\) got unknown selector 'layr' \(did you mean 'layer'\?\)\. Valid selectors: layer= "):
        dm.no_decay(layr="linear")  # type: ignore[call-arg]
    with pytest.raises(TypeError, match=r"^label\(\) got unknown selector 'parm' \(did you mean 'param'\?\)"):
        dm.label("frozen", parm="bias")  # type: ignore[call-arg]
    with pytest.raises(TypeError, match=r"label\(rate=...\): a rate multiplies weight decay"):
        dm.label("frozen", rate=0.5)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        dm.decay("linear")  # type: ignore[misc]
    # The label's own name is positional, so the name= selector is free.
    assert dm.label("kernels", name="kernel").name == ("kernel",)


def _rules_for_pickling() -> list:
    return [
        dm.decay(layer=("linear", "conv"), param="weight", rate=0.5, label="fast"),
        dm.no_decay(path=(re.compile("BIAS$", re.IGNORECASE), "ln/*"), min_ndim=1),
        dm.label("frozen", layer="embedding"),
        dm.decay(when=big),
        dm.decay(when=Cutoff(), within=dm.Layer),
    ]


@pytest.mark.parametrize(
    "how",
    ["copy", "deepcopy", "pickle"],
)
def test_rules_policies_and_reports_copy_and_pickle(how):
    import copy
    import pickle

    duplicate = {
        "copy": copy.copy,
        "deepcopy": copy.deepcopy,
        "pickle": lambda x: pickle.loads(pickle.dumps(x)),
    }[how]
    policy = dm.Policy(*_rules_for_pickling(), default=True, strict=True)
    for rule in policy.rules:
        again = duplicate(rule)
        assert again == rule and hash(again) == hash(rule)
    again = duplicate(policy)
    assert again == policy and hash(again) == hash(policy)
    assert [d.decay for d in again.decide(LEAVES)] == [d.decay for d in policy.decide(LEAVES)]
    # The compiled path matchers are made again, flags and all.
    assert decisions(duplicate(dm.Policy(dm.decay(path=re.compile("BIAS$", re.I))))) == [False, True, False, True, False]
    report = policy.report(LEAVES)
    copied = duplicate(report)
    assert copied.policy == policy
    assert [(r.path, r.decay, r.rule, r.why) for r in copied] == [
        (r.path, r.decay, r.rule, r.why) for r in report
    ]
    assert str(copied) == str(report)


def test_rules_without_an_import_path_name_themselves_when_pickled():
    import copy
    import pickle

    class Local:
        pass

    for rule, shown in [
        (dm.decay(when=lambda leaf: True), r"decay\(when=.*<lambda>\): when=.*<lambda>"),
        (dm.no_decay(layer=Local), r"no_decay\(layer=.*Local\): layer=.*Local"),
    ]:
        with pytest.raises(pickle.PicklingError, match=r"^cannot pickle " + shown + r" has no import path pickle can follow \(a lambda, a local definition, or a class its module holds under another name\)\. Define it at module level\."):
            pickle.dumps(dm.Policy(rule))
        # Copies need no import path.
        assert copy.deepcopy(dm.Policy(rule)) == dm.Policy(rule)


@pytest.mark.parametrize("how", ["copy", "deepcopy", "pickle", "replace"])
def test_a_layer_copied_or_loaded_hashes_as_an_equal_one(how):
    import copy
    import dataclasses
    import pickle

    layer = dm.Layer("attention", "MultiHeadDotProductAttention", None, "name")
    again = {
        "copy": copy.copy,
        "deepcopy": copy.deepcopy,
        "pickle": lambda x: pickle.loads(pickle.dumps(x)),
        "replace": dataclasses.replace,
    }[how](layer)
    assert again == layer and hash(again) == hash(layer) and {layer: 1}[again] == 1
    # The hash is not part of what is pickled: another process hashes strings otherwise.
    assert layer.__getstate__() == {"kind": "attention", "type_name": "MultiHeadDotProductAttention",
                                     "cls": None, "source": "name"}
    other = dataclasses.replace(layer, kind="linear")
    assert other != layer and hash(other) == hash(("linear", layer.type_name, None, "name"))
