"""The parameter-group rules (`lr`, `freeze`, `unfreeze`, `layer_decay`) as values, as
data, their bad input, and the warnings they give."""

from __future__ import annotations

import copy
import dataclasses
import json
import pickle
import re
import sys
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import decaymask as dm
from decaymask._cli import main

KEY = jax.random.key(0)


def big(leaf: dm.Leaf) -> bool:
    return leaf.size > 4


class Block:
    """A block class with an import path: rules and ladders holding it pickle by reference."""


# Rules as values: the checks, messages, repr, copies, pickling and equality of
# decay rules.

MAKERS = {
    "lr": lambda **selectors: dm.lr(0.1, **selectors),
    "freeze": dm.freeze,
    "unfreeze": dm.unfreeze,
}


def _error(make, **kwargs) -> tuple[type, str]:
    with pytest.raises((TypeError, ValueError)) as info:
        make(**kwargs)
    return type(info.value), str(info.value)


@pytest.mark.parametrize("fn", list(MAKERS))
@pytest.mark.parametrize(
    "selectors",
    [{"layr": "linear"}, {"parm": "bias"}, {"layer": "layernorm"}, {"param": "kernel"},
     {"within": "atention"}, {"layer": 3}, {"path": b"x"}, {"min_ndim": -1},
     {"when": "big"}, {"name": ()}],
    ids=["layr", "parm", "kind", "role", "within_kind", "layer_type", "path_type",
         "min_ndim", "when", "empty"],
)
def test_selector_mistakes_give_the_decay_message(fn, selectors):
    """The same checks and the same words as dm.decay, under the rule's own name."""
    error, message = _error(dm.decay, **selectors)
    assert message.startswith("decay(")
    assert _error(MAKERS[fn], **selectors) == (error, fn + message[len("decay"):])


def test_misspelt_selectors_suggest_the_nearest():
    with pytest.raises(TypeError, match=r"^freeze\(\) got unknown selector 'layr' \(did you mean 'layer'\?\)\. Valid selectors: layer= a layer kind"):
        dm.freeze(layr="linear")  # type: ignore[call-arg]
    with pytest.raises(TypeError, match=r"^lr\(\) got unknown selector 'parm' \(did you mean 'param'\?\)\. Valid selectors: "):
        dm.lr(0.1, parm="bias")  # type: ignore[call-arg]
    with pytest.raises(ValueError, match=r"^unfreeze\(layer='layernorm'\): unknown layer kind 'layernorm'\. Did you mean 'layer_norm'\?"):
        dm.unfreeze(layer="layernorm")
    with pytest.raises(ValueError, match=r"^lr\(param='biases'\): unknown parameter role 'biases'\. Did you mean 'bias'\?"):
        dm.lr(2.0, param="biases")


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: dm.lr(0.1, rate=2), "lr(rate=...): a rate multiplies weight decay, so only decay(...) rules take one. To scale the learning rate, give the multiplier first: lr(0.1, ...)."),
        (lambda: dm.freeze(rate=0.5), "freeze(rate=...): a rate multiplies weight decay, so only decay(...) rules take one."),
        (lambda: dm.lr(0.1, label="slow"), "lr(label=...): a label names a group for optax.partition, so only decay(...), no_decay(...) and label(...) rules give one."),
        (lambda: dm.unfreeze(label="head"), "unfreeze(label=...): a label names a group for optax.partition, so only decay(...), no_decay(...) and label(...) rules give one."),
        (lambda: dm.lr(multiplier=0.1), "lr(multiplier=0.1): the multiplier is given by position, first: lr(0.1, layer=...)."),
        (lambda: dm.freeze("embedding"), "freeze('embedding'): selectors are given by keyword, e.g. freeze(layer='embedding'). Valid selectors: layer, within, param, name, path, min_ndim, when."),
        (lambda: dm.unfreeze("bias"), "unfreeze('bias'): selectors are given by keyword, e.g. unfreeze(param='bias'). Valid selectors: layer, within, param, name, path, min_ndim, when."),
        (lambda: dm.lr(0.1, "head"), "lr(0.1, 'head'): selectors are given by keyword, e.g. lr(0.1, path='head/*'). Valid selectors: layer, within, param, name, path, min_ndim, when."),
        (lambda: dm.freeze(Block), "freeze(Block): selectors are given by keyword, e.g. freeze(layer=Block) for the layer itself, or freeze(within=Block) for everything inside it. Valid selectors: layer, within, param, name, path, min_ndim, when."),
        (lambda: dm.layer_decay(0.75, block="encoder/*"), "layer_decay() got unknown keyword 'block' (did you mean 'blocks'?). It takes the rate, then blocks= (a module class, a layer kind or a glob over module paths, or a tuple of those; by default the one repeated stack) and stem= (modules outside the blocks that also get id 0, in the same forms)."),
        (lambda: dm.layer_decay(0.75, rate=0.5), "layer_decay(0.75, rate=0.5): the rate is given twice; give it once, first: layer_decay(0.75, blocks=...)."),
        (lambda: dm.layer_decay(0.75, "encoder/*"), "layer_decay(0.75, 'encoder/*'): blocks and stem are given by keyword: layer_decay(0.75, blocks='encoder/*')."),
    ],
    ids=["lr_rate", "freeze_rate", "lr_label", "unfreeze_label", "lr_multiplier_keyword",
         "freeze_kind_by_position", "unfreeze_role_by_position", "lr_path_by_position",
         "freeze_class_by_position", "layer_decay_block", "layer_decay_rate_twice",
         "layer_decay_blocks_by_position"],
)
def test_wrong_keywords_and_positions(call, message):
    with pytest.raises(TypeError) as info:
        call()
    assert str(info.value) == message


REPRS = [
    (dm.lr(0.1, layer="embedding"), "lr(0.1, layer='embedding')"),
    (dm.lr(2, layer=("linear", "conv"), param="weight"), "lr(2.0, layer=('linear', 'conv'), param='weight')"),
    (dm.lr(0.5, within=Block, path=re.compile("attn"), min_ndim=2), "lr(0.5, within=Block, path=re.compile('attn'), min_ndim=2)"),
    (dm.freeze(), "freeze()"),
    (dm.freeze(name=("kernel", "bias"), when=big), "freeze(name=('kernel', 'bias'), when=big)"),
    (dm.unfreeze(path=("head/*", "ln/*")), "unfreeze(path=('head/*', 'ln/*'))"),
    (dm.layer_decay(0.75), "layer_decay(0.75)"),
    (dm.layer_decay(1, blocks=(Block, "decoder/layers/*"), stem="embedding"), "layer_decay(1.0, blocks=(Block, 'decoder/layers/*'), stem='embedding')"),
]
NAMESPACE = {
    "lr": dm.lr, "freeze": dm.freeze, "unfreeze": dm.unfreeze, "layer_decay": dm.layer_decay,
    "re": re, "Block": Block, "big": big,
}


@pytest.mark.parametrize("rule, text", REPRS, ids=[t for _, t in REPRS])
def test_repr_is_the_call_that_makes_the_rule(rule, text):
    assert repr(rule) == text
    again = eval(repr(rule), dict(NAMESPACE))
    assert again == rule and hash(again) == hash(rule)


@pytest.mark.parametrize("rule", [r for r, _ in REPRS], ids=[t for _, t in REPRS])
def test_copies_are_the_rule_and_pickle_round_trips(rule):
    assert copy.copy(rule) is rule
    assert copy.deepcopy(rule) is rule
    again = pickle.loads(pickle.dumps(rule))
    assert again == rule and hash(again) == hash(rule) and repr(again) == repr(rule)


class PatchEmbed:
    """A module class outside the blocks, for ``stem=``."""


ROOT = dm.Layer("unknown", "Net", None, "class")
BLOCK = dm.Layer("unknown", "Block", Block, "class")
PATCH = dm.Layer("unknown", "PatchEmbed", PatchEmbed, "class")


def leaf(path: str, layer: str, role: str, shape: tuple, *around: tuple[int, dm.Layer]) -> dm.Leaf:
    """A leaf owned by the module one key above it, inside the root and the modules
    ``around`` it (each with the number of path keys that name it)."""
    depths = (0,) + tuple(d for d, _ in around) + (path.count("/"),)
    ancestors = (ROOT,) + tuple(m for _, m in around)
    return dm.Leaf(path, layer=layer, role=role, shape=shape, ancestors=ancestors, module_depths=depths)


LEAVES = [
    leaf("embed/embedding", "embedding", "embedding", (10, 4)),
    dm.Leaf("pos_embed", role="position", shape=(3, 4), module_depths=(0,)),
    leaf("patch/proj/kernel", "linear", "weight", (4, 4), (1, PATCH)),
    leaf("encoder/layer/0/fc/kernel", "linear", "weight", (4, 4), (3, BLOCK)),
    leaf("encoder/layer/0/fc/bias", "linear", "bias", (4,), (3, BLOCK)),
    leaf("encoder/layer/1/fc/kernel", "linear", "weight", (4, 4), (3, BLOCK)),
    leaf("encoder/layer/1/fc/bias", "linear", "bias", (4,), (3, BLOCK)),
    leaf("adapter/kernel", "linear", "weight", (4, 4)),
    leaf("head/kernel", "linear", "weight", (4, 2)),
    leaf("head/bias", "linear", "bias", (2,)),
]
GROUPS_POLICY = dm.Policy(
    dm.decay(layer="linear", param="weight"),
    dm.lr(0.1, layer="embedding"),
    dm.freeze(path="head/*"),
    dm.unfreeze(path="head/bias"),
    dm.lr(2.0, path=re.compile("layer/1/"), when=big),
    dm.layer_decay(0.5, blocks="encoder/layer/*"),
)
# (path, decay, layer id, lr scale, frozen) of every leaf of LEAVES under GROUPS_POLICY:
# two blocks, so the stem learns 0.5 ** 3, block 1 0.5 ** 2, block 2 0.5, the rest 1.
DECIDED = [
    ("embed/embedding", False, 0, 0.125 * 0.1, False),
    ("pos_embed", False, 0, 0.125, False),
    ("patch/proj/kernel", True, 3, 1.0, False),
    ("encoder/layer/0/fc/kernel", True, 1, 0.25, False),
    ("encoder/layer/0/fc/bias", False, 1, 0.25, False),
    ("encoder/layer/1/fc/kernel", True, 2, 0.5 * 2.0, False),
    ("encoder/layer/1/fc/bias", False, 2, 0.5, False),
    ("adapter/kernel", True, 3, 1.0, False),
    ("head/kernel", False, 3, 0.0, True),
    ("head/bias", False, 3, 1.0, False),
]


def decided(policy: dm.Policy) -> list[tuple]:
    return [(d.path, d.decay, d.layer_id, d.lr_scale, d.frozen) for d in policy.decide(LEAVES)]


def test_the_groups_policy_decides_as_written():
    assert decided(GROUPS_POLICY) == DECIDED
    report = GROUPS_POLICY.report(LEAVES)
    assert [(row.lr_rule, row.freeze_rule) for row in report][7:] == [
        (None, None),
        (None, dm.freeze(path="head/*")),
        (None, dm.unfreeze(path="head/bias")),
    ]


def test_policies_with_groups_copy_pickle_and_compare():
    for again in (copy.copy(GROUPS_POLICY), copy.deepcopy(GROUPS_POLICY),
                  pickle.loads(pickle.dumps(GROUPS_POLICY))):
        assert again == GROUPS_POLICY and hash(again) == hash(GROUPS_POLICY)
        assert decided(again) == DECIDED
    # The ladder is part of the value.
    other = dm.Policy(*GROUPS_POLICY.rules, dm.layer_decay(0.6, blocks="encoder/layer/*"))
    assert other != GROUPS_POLICY
    assert dm.Policy(*GROUPS_POLICY.rules) != GROUPS_POLICY


def test_equality_and_hashing():
    assert dm.lr(1) == dm.lr(1.0) and hash(dm.lr(1)) == hash(dm.lr(1.0))
    assert dm.lr(0.1) != dm.lr(0.2)
    assert dm.freeze(layer=["linear", "conv"]) == dm.freeze(layer=("linear", "conv"))
    assert dm.freeze() != dm.unfreeze()
    assert dm.freeze(layer="linear") != dm.no_decay(layer="linear")
    assert dm.lr(0.5, layer="linear") != dm.decay(layer="linear")
    assert len({dm.lr(0.1, param="bias"), dm.lr(0.1, param=("bias",)), dm.freeze(param="bias")}) == 2
    assert dm.layer_decay(0.75, blocks=["a/*", Block]) == dm.layer_decay(0.75, blocks=("a/*", Block))
    assert hash(dm.layer_decay(0.75, stem="x")) == hash(dm.layer_decay(0.75, stem=("x",)))
    assert dm.layer_decay(0.75) != dm.layer_decay(0.75, blocks="a/*")
    assert type(dm.lr(np.float32(0.5)).lr) is float and dm.lr(np.float32(0.5)).lr == 0.5
    assert type(dm.layer_decay(np.float64(0.5)).rate) is float
    with pytest.raises(dataclasses.FrozenInstanceError):
        dm.lr(0.1).lr = 0.2  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        dm.layer_decay(0.5).rate = 0.6  # type: ignore[misc]


def test_rules_without_an_import_path_name_themselves_when_pickled():
    class Local:
        pass

    cases = [
        (dm.lr(0.1, when=lambda leaf: True), r"lr\(0\.1, when=.*<lambda>\): when=.*<lambda>"),
        (dm.freeze(layer=Local), r"freeze\(layer=.*Local\): layer=.*Local"),
        (dm.unfreeze(within=Local), r"unfreeze\(within=.*Local\): within=.*Local"),
    ]
    for rule, shown in cases:
        with pytest.raises(pickle.PicklingError, match=r"^cannot pickle " + shown + r" has no import path pickle can follow \(a lambda, a local definition, or a class its module holds under another name\)\. Define it at module level\.$"):
            pickle.dumps(dm.Policy(rule))
        assert copy.deepcopy(dm.Policy(rule)) == dm.Policy(rule)
    for ladder, key in [(dm.layer_decay(0.5, blocks=Local), "blocks"), (dm.layer_decay(0.5, stem=("x/*", Local)), "stem")]:
        with pytest.raises(pickle.PicklingError) as info:
            pickle.dumps(dm.Policy(ladder))
        qualname = Local.__qualname__
        assert str(info.value) == (
            f"cannot pickle {ladder!r}: {key}={qualname} has no import path pickle can "
            f"follow (a local definition, or a class its module holds under another "
            f"name). Define it at module level."
        )


# Bad input: each a clear error naming the rule and the fix.

FREEZE_FIX = "use dm.freeze() instead (no update, no optimizer state, no decay)"
RATE_MEANING = (
    "Each block learns rate times as fast as the block above it: 0.65 for ViT-B, 0.75 "
    "for ViT-L in BEiT/MAE fine-tuning; 1 turns layer decay off."
)
TOO_LARGE = "1000000000...0000000000"  # 10**400, shortened


@pytest.mark.parametrize(
    "value, error, message",
    [
        (0, ValueError, f"lr(0): a multiplier of 0 still keeps the optimizer state of the matching leaves, and a decoupled weight decay still moves them. To stop them from learning, {FREEZE_FIX}."),
        (0.0, ValueError, f"lr(0.0): a multiplier of 0 still keeps the optimizer state of the matching leaves, and a decoupled weight decay still moves them. To stop them from learning, {FREEZE_FIX}."),
        (-0.5, ValueError, f"lr(-0.5): expected a learning-rate multiplier > 0, got -0.5: a negative multiplier moves the matching leaves up the gradient. To stop them from learning, {FREEZE_FIX}."),
        (float("nan"), ValueError, "lr(nan): expected a finite learning-rate multiplier > 0, got nan: it would turn the matching leaves into nan at the first step."),
        (float("inf"), ValueError, "lr(inf): expected a finite learning-rate multiplier > 0, got inf: it would turn the matching leaves into inf or nan at the first step."),
        (10**400, ValueError, f"lr({TOO_LARGE}): the multiplier {TOO_LARGE} is too large for a float; expected a finite number > 0 (e.g. 0.1 or 10)."),
        (-(10**400), ValueError, f"lr(-100000000...0000000000): expected a learning-rate multiplier > 0, got -100000000...0000000000: a negative multiplier moves the matching leaves up the gradient. To stop them from learning, {FREEZE_FIX}."),
        (True, TypeError, f"lr(True): expected a learning-rate multiplier, a number > 0 (e.g. 0.1), got True (bool). True and False are not multipliers; to stop leaves from learning, {FREEZE_FIX}."),
        ("0.1", TypeError, "lr('0.1'): expected a learning-rate multiplier, a number > 0 (e.g. 0.1), got '0.1' (str)."),
        (None, TypeError, "lr(None): expected a learning-rate multiplier, a number > 0 (e.g. 0.1), got None (NoneType)."),
    ],
    ids=["zero", "zero_float", "negative", "nan", "inf", "too_large", "too_negative", "bool", "str", "none"],
)
def test_bad_multipliers(value, error, message):
    with pytest.raises(error) as info:
        dm.lr(value)
    assert type(info.value) is error  # never an OverflowError
    assert str(info.value) == message


def test_a_zero_multiplier_names_the_rule_and_the_freeze_with_its_selectors():
    with pytest.raises(ValueError) as info:
        dm.lr(0, layer="embedding", path="embed/*")
    assert str(info.value) == (
        "lr(0, layer='embedding', path='embed/*'): a multiplier of 0 still keeps the "
        "optimizer state of the matching leaves, and a decoupled weight decay still moves "
        "them. To stop them from learning, use dm.freeze(layer='embedding', "
        "path='embed/*') instead (no update, no optimizer state, no decay)."
    )


def test_good_multipliers_and_rates():
    assert dm.lr(1e-3).lr == 1e-3 and dm.lr(10).lr == 10.0
    assert dm.layer_decay(1).rate == 1.0 and dm.layer_decay(1e-9).rate == 1e-9


@pytest.mark.parametrize(
    "value, error, message",
    [
        (0, ValueError, f"layer_decay(0): expected a rate in (0, 1], got 0, which gives every layer below the top a multiplier of 0. {RATE_MEANING} To stop layers from learning, use dm.freeze(...)."),
        (1.5, ValueError, f"layer_decay(1.5): expected a rate in (0, 1], got 1.5: above 1, lower blocks would learn faster than the blocks above them. {RATE_MEANING}"),
        (-0.1, ValueError, f"layer_decay(-0.1): expected a rate in (0, 1], got -0.1: a negative rate turns every other block's updates around. {RATE_MEANING}"),
        (float("nan"), ValueError, f"layer_decay(nan): expected a rate in (0, 1], got nan. {RATE_MEANING}"),
        (float("inf"), ValueError, f"layer_decay(inf): expected a rate in (0, 1], got inf. {RATE_MEANING}"),
        (10**400, ValueError, f"layer_decay({TOO_LARGE}): expected a rate in (0, 1], got {TOO_LARGE}, a number too large for a float. {RATE_MEANING}"),
        ("0.75", TypeError, f"layer_decay('0.75'): expected a rate in (0, 1], a number, got '0.75' (str). {RATE_MEANING}"),
        (True, TypeError, f"layer_decay(True): expected a rate in (0, 1], a number, got True (bool). {RATE_MEANING}"),
    ],
    ids=["zero", "above_one", "negative", "nan", "inf", "too_large", "str", "bool"],
)
def test_bad_layer_decay_rates(value, error, message):
    with pytest.raises(error) as info:
        dm.layer_decay(value)
    assert type(info.value) is error
    assert str(info.value) == message


KIND_LIST = "linear, conv, embedding, layer_norm, rms_norm, group_norm, batch_norm, instance_norm, attention, recurrent, prelu, lora"


@pytest.mark.parametrize(
    "options, error, message",
    [
        ({"blocks": 3}, TypeError, f"layer_decay(blocks=3): expected a module class, a layer kind (one of {KIND_LIST}) or a glob over module paths (e.g. 'encoder/layers/*'), or a tuple of those; got int."),
        ({"stem": ("x/*", re.compile("x"))}, TypeError, f"layer_decay(stem=re.compile('x')): expected a module class, a layer kind (one of {KIND_LIST}) or a glob over module paths (e.g. 'encoder/layers/*'), or a tuple of those; got re.Pattern."),
        ({"blocks": ()}, ValueError, "layer_decay(blocks=()): an empty tuple selects nothing; leave blocks out to use the one repeated stack."),
        ({"stem": []}, ValueError, "layer_decay(stem=()): an empty tuple selects nothing; leave stem out."),
        ({"blocks": ""}, ValueError, "layer_decay(blocks=''): an empty glob selects nothing; give a glob such as 'encoder/layers/*', or leave blocks out to use the one repeated stack."),
    ],
    ids=["blocks_int", "stem_pattern", "blocks_empty", "stem_empty_list", "blocks_empty_glob"],
)
def test_bad_blocks_and_stem(options, error, message):
    with pytest.raises(error) as info:
        dm.layer_decay(0.75, **options)
    assert str(info.value) == message


def test_blocks_that_select_nothing_say_what_was_most_likely_meant():
    cases = [
        (dm.layer_decay(0.5, blocks="linaer"), "blocks='linaer' selects no module of this tree. Did you mean the layer kind 'linear'? Check it against policy.explain(tree), which lists every path."),
        (dm.layer_decay(0.5, blocks="equinox.nn.Linear"), "blocks='equinox.nn.Linear' selects no module of this tree. A string is a glob over module paths; to select a class, pass the class itself (in a policy file, write it as 'equinox.nn:Linear'). Check it against policy.explain(tree), which lists every path."),
        (dm.layer_decay(0.5, blocks="encoder/layer/*", stem="embedings"), "stem='embedings' selects no module of this tree. Did you mean the layer kind 'embedding'? Check it against policy.explain(tree), which lists every path."),
    ]
    for ladder, message in cases:
        with pytest.raises(ValueError) as info:
            dm.Policy(ladder).decide(LEAVES)
        assert str(info.value) == f"{ladder!r}: {message}"


def test_two_layer_decays_in_one_policy():
    with pytest.raises(ValueError) as info:
        dm.Policy(dm.layer_decay(0.7), dm.decay(), dm.layer_decay(0.8, blocks="encoder/*"))
    assert str(info.value) == (
        "Policy(...): 2 layer_decay rules (layer_decay(0.7), layer_decay(0.8, "
        "blocks='encoder/*')); a policy has one ladder. To chain several stacks into it, "
        "pass them together: dm.layer_decay(rate, blocks=(first, second))."
    )


def test_a_decay_rate_too_large_for_a_float_is_no_overflow_error():
    with pytest.raises(TypeError) as info:
        dm.decay(rate=10**400)
    assert str(info.value) == (
        f"decay(rate={TOO_LARGE}): expected a non-negative number that multiplies the "
        f"weight decay of the matching leaves, finite (inf or nan would turn every "
        f"decayed weight into inf or nan), got {TOO_LARGE}."
    )


# Policies as data.

TOML = """
rules = [
  {decay = true, layer = "linear", param = "weight"},
  {lr = 0.1, layer = "embedding"},
  {freeze = true, path = "head/*"},
  {freeze = false, path = "head/bias"},
  {lr = 2, path = {regex = "layer/1/"}, when = "test_groups_rules:big"},
]
layer_decay = {rate = 0.5, blocks = "encoder/layer/*", stem = ["test_groups_rules:PatchEmbed", "adapt*"]}
"""
FROM_TOML = dm.Policy(
    *GROUPS_POLICY.rules,
    dm.layer_decay(0.5, blocks="encoder/layer/*", stem=(PatchEmbed, "adapt*")),
)


def test_toml_file_with_groups(tmp_path):
    (tmp_path / "p.toml").write_text(TOML)
    policy = dm.Policy.from_file(tmp_path / "p.toml", imports=("test_groups_rules",))
    assert policy == FROM_TOML
    # The stem now holds the patch embedding (by class) and the adapter (by glob).
    stem = {"patch/proj/kernel": (True, 0, 0.125, False), "adapter/kernel": (True, 0, 0.125, False)}
    assert decided(policy) == [(p, *stem[p]) if p in stem else (p, *rest) for p, *rest in DECIDED]


def test_round_trips_through_dicts_json_and_yaml(tmp_path):
    import yaml

    data = FROM_TOML.to_dict()
    assert data == {
        "default": False,
        "strict": False,
        "rules": [
            {"decay": True, "layer": "linear", "param": "weight"},
            {"lr": 0.1, "layer": "embedding"},
            {"freeze": True, "path": "head/*"},
            {"freeze": False, "path": "head/bias"},
            {"lr": 2.0, "path": {"regex": "layer/1/"}, "when": "test_groups_rules:big"},
        ],
        "layer_decay": {"rate": 0.5, "blocks": "encoder/layer/*", "stem": ["test_groups_rules:PatchEmbed", "adapt*"]},
    }
    here = ("test_groups_rules",)  # the module of the when= function and the stem class
    assert dm.Policy.from_dict(json.loads(json.dumps(data)), imports=here) == FROM_TOML
    (tmp_path / "p.json").write_text(json.dumps(data))
    assert dm.Policy.from_file(tmp_path / "p.json", imports=here) == FROM_TOML
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(data))
    assert dm.Policy.from_file(tmp_path / "p.yaml", imports=here) == FROM_TOML
    # A ladder of chained stacks, a rate alone, and a class among the blocks.
    for ladder in (dm.layer_decay(0.75, blocks=("encoder/*", Block)), dm.layer_decay(0.9)):
        policy = dm.Policy(dm.decay(), ladder)
        assert dm.Policy.from_dict(json.loads(json.dumps(policy.to_dict())), imports=here) == policy
    assert dm.Policy.from_dict({"layer_decay": 0.9}) == dm.Policy(dm.layer_decay(0.9))


TOO_LARGE_JSON = json.loads("1" + "0" * 400)
DATA_FREEZE_FIX = "write freeze = true in place of lr (no update, no optimizer state, no decay)"
IMPORT_REFUSED = (
    "'nowhere:Block' is in the module 'nowhere', which is not imported, and importing a "
    "module runs its code. If you trust this data, allow it: "
    "Policy.from_dict(data, imports=('nowhere',)) or Policy.from_file(path, "
    "imports=('nowhere',)) (imports=True allows any module)."
)


@pytest.mark.parametrize(
    "data, message",
    [
        ({"rules": [{"decay": True}, {"decay": False, "param": "bias"}, {"lr": 0, "layer": "embedding"}]}, f"rules[2].lr: a multiplier of 0 still keeps the optimizer state of the matching leaves, and a decoupled weight decay still moves them. To stop them from learning, {DATA_FREEZE_FIX}."),
        ({"rules": [{"lr": -1}]}, f"rules[0].lr: expected a learning-rate multiplier > 0, got -1: a negative multiplier moves the matching leaves up the gradient. To stop them from learning, {DATA_FREEZE_FIX}."),
        ({"rules": [{"lr": "0.1"}]}, "rules[0].lr: expected a learning-rate multiplier, a number > 0 (e.g. 0.1), got '0.1' (str)."),
        ({"rules": [{"lr": True}]}, f"rules[0].lr: expected a learning-rate multiplier, a number > 0 (e.g. 0.1), got True (bool). True and False are not multipliers; to stop leaves from learning, {DATA_FREEZE_FIX}."),
        ({"rules": [{"lr": float("nan")}]}, "rules[0].lr: expected a finite learning-rate multiplier > 0, got nan: it would turn the matching leaves into nan at the first step."),
        ({"rules": [{"lr": TOO_LARGE_JSON}]}, f"rules[0].lr: the multiplier {TOO_LARGE} is too large for a float; expected a finite number > 0 (e.g. 0.1 or 10)."),
        ({"rules": [{"lr": None}]}, "rules[0].lr: null (no value); give lr a value or leave the key out."),
        ({"rules": [{"lr": 0.1, "decay": True}]}, "rules[0]: decay and lr in one rule; an lr or freeze rule stands alone: write one rule for each, with the same selectors."),
        ({"rules": [{"freeze": True, "lr": 0.1}]}, "rules[0]: lr and freeze in one rule; an lr or freeze rule stands alone: write one rule for each, with the same selectors."),
        ({"rules": [{"freeze": True, "label": "frozen"}]}, "rules[0]: label and freeze in one rule; an lr or freeze rule stands alone: write one rule for each, with the same selectors."),
        ({"rules": [{"lr": 0.1, "rate": 2}]}, "rules[0].rate: only decay = true rules take a rate. A rate multiplies weight decay; the learning-rate multiplier is lr itself."),
        ({"rules": [{"freeze": True, "rate": 0.5}]}, "rules[0].rate: only decay = true rules take a rate."),
        ({"rules": [{"freeze": "yes"}]}, "rules[0].freeze: expected true (freeze) or false (unfreeze), got 'yes'."),
        ({"rules": [{"freeze": 1}]}, "rules[0].freeze: expected true (freeze) or false (unfreeze), got 1."),
        ({"rules": [{"freeze": True, "layer": "linaer"}]}, "rules[0]: freeze(layer='linaer'): unknown layer kind 'linaer'. Did you mean 'linear'?"),
        ({"rules": [{"lr": 0.5, "parm": "bias"}]}, "rules[0]: unknown key 'parm'. Valid keys: decay, label, rate, lr, freeze, layer, within, param, name, path, min_ndim, when. Did you mean 'param'?"),
        ({"rules": [{"freeze": False, "layer": "nowhere:Block"}]}, f"rules[0].layer: {IMPORT_REFUSED}"),
        ({"rules": [{"decay": True, "layer_decay": 0.75}]}, "rules[0]: layer_decay is not a rule key; it is a key of the policy itself, beside rules: layer_decay = {rate = 0.75}."),
        ({"layer_decay": {"rate": 0.75, "block": "encoder/*"}}, "layer_decay: unknown key 'block'. Valid keys: rate, blocks, stem. Did you mean 'blocks'?"),
        ({"layer_decay": {"blocks": "encoder/*"}}, "layer_decay: rate is missing, e.g. rate = 0.75."),
        ({"layer_decay": {"rate": 1.5}}, f"layer_decay.rate: expected a rate in (0, 1], got 1.5: above 1, lower blocks would learn faster than the blocks above them. {RATE_MEANING}"),
        ({"layer_decay": {"rate": 0}}, f"layer_decay.rate: expected a rate in (0, 1], got 0, which gives every layer below the top a multiplier of 0. {RATE_MEANING} To stop layers from learning, use dm.freeze(...)."),
        ({"layer_decay": {"rate": "0.75"}}, f"layer_decay.rate: expected a rate in (0, 1], a number, got '0.75' (str). {RATE_MEANING}"),
        ({"layer_decay": {"rate": TOO_LARGE_JSON}}, f"layer_decay.rate: expected a rate in (0, 1], got {TOO_LARGE}, a number too large for a float. {RATE_MEANING}"),
        ({"layer_decay": {"rate": None}}, "layer_decay.rate: null (no value); give rate a value, e.g. rate = 0.75."),
        ({"layer_decay": 2}, f"layer_decay: expected a rate in (0, 1], got 2: above 1, lower blocks would learn faster than the blocks above them. {RATE_MEANING}"),
        ({"layer_decay": "0.75"}, "layer_decay: expected a table with rate (and optionally blocks, stem), e.g. layer_decay = {rate = 0.75}, got '0.75' (str)."),
        ({"layer_decay": {"rate": 0.75, "blocks": 3}}, "layer_decay.blocks: expected a layer kind, a glob over module paths or a class import path ('package.module:Class'), or a list of those; got 3 (int)."),
        ({"layer_decay": {"rate": 0.75, "blocks": []}}, "layer_decay.blocks: an empty list selects nothing; leave blocks out to use the one repeated stack."),
        ({"layer_decay": {"rate": 0.75, "stem": ["x/*", ""]}}, "layer_decay.stem: an empty glob selects nothing; give a glob such as 'encoder/layers/*', or leave stem out."),
        ({"layer_decay": {"rate": 0.75, "blocks": None}}, "layer_decay.blocks: null (no value); give blocks a value, or leave the key out."),
        ({"layer_decay": {"rate": 0.75, "stem": "json:dumps"}}, "layer_decay.stem: 'json:dumps' is not a class (function); stem takes module classes."),
        ({"layer_decay": {"rate": 0.75, "blocks": "test_groups_rules:Nope"}}, "layer_decay.blocks: cannot import 'test_groups_rules:Nope': module 'test_groups_rules' has no attribute 'Nope'."),
        ({"layer_decay": {"rate": 0.75, "blocks": "nowhere:Block"}}, f"layer_decay.blocks: {IMPORT_REFUSED}"),
    ],
    ids=["lr_zero", "lr_negative", "lr_str", "lr_bool", "lr_nan", "lr_too_large", "lr_null",
         "lr_and_decay", "lr_and_freeze", "freeze_and_label", "lr_rate", "freeze_rate",
         "freeze_str", "freeze_int", "freeze_kind", "lr_key", "freeze_class_import",
         "layer_decay_in_a_rule", "ld_key", "ld_no_rate", "ld_above_one", "ld_zero",
         "ld_str", "ld_too_large", "ld_null_rate", "ld_number_above_one", "ld_not_a_table",
         "ld_blocks_int", "ld_blocks_empty", "ld_stem_empty_glob", "ld_null_blocks",
         "ld_stem_function", "ld_missing_class", "ld_import_refused"],
)
def test_invalid_group_data_names_the_key(data, message):
    with pytest.raises(dm.PolicyDataError) as info:
        dm.Policy.from_dict(data, imports=("json", "test_groups_rules"))
    assert str(info.value).startswith(f"Policy.from_dict: {message}")
    if "unknown layer kind" not in message:
        assert str(info.value) == f"Policy.from_dict: {message}"


def test_a_block_class_in_a_module_not_imported_needs_an_opt_in(tmp_path, monkeypatch):
    package = tmp_path / "fresh_blocks_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "layers.py").write_text("class Block:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tmp_path / "p.toml"
    path.write_text('layer_decay = {rate = 0.75, blocks = "fresh_blocks_pkg.layers:Block"}\n')
    with pytest.raises(dm.PolicyDataError, match=r"^Policy.from_dict: layer_decay.blocks: 'fresh_blocks_pkg.layers:Block' is in the module 'fresh_blocks_pkg.layers', which is not imported.*imports=\('fresh_blocks_pkg',\)"):
        dm.Policy.from_file(path)
    assert "fresh_blocks_pkg.layers" not in sys.modules
    policy = dm.Policy.from_file(path, imports=("fresh_blocks_pkg",))
    monkeypatch.delitem(sys.modules, "fresh_blocks_pkg.layers")
    monkeypatch.delitem(sys.modules, "fresh_blocks_pkg")
    [block] = policy.layer_decay.blocks
    assert isinstance(block, type) and block.__module__ == "fresh_blocks_pkg.layers"


CLI_POLICY = """rules = [
  {decay = true, layer = "linear", param = "weight"},
  {lr = 0.1, layer = "embedding"},
  {freeze = true, path = "head/*"},
  {freeze = false, path = "head/bias"},
]
layer_decay = {rate = 0.75, blocks = "block", stem = ["embedding", "final_norm"]}
"""


def test_the_cli_reads_group_rules_from_a_policy_file(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "groups.toml").write_text(CLI_POLICY)
    code = main(["explain", "decaymask._demo:equinox_model", "--policy", "groups.toml", "--format", "json"])
    out, err = capsys.readouterr()
    assert (code, err) == (0, "")
    rows = {row["path"]: row for row in json.loads(out)["rows"]}
    # Frozen leaves are never decayed; the unfrozen bias and the other weights are as ruled.
    assert [rows[p]["decay"] for p in ("head/weight", "head/bias", "block/mlp/layers/0/weight", "embed/weight")] == [False, False, True, False]
    (tmp_path / "bad.toml").write_text('rules = [{decay = true}, {decay = true}, {lr = 0, layer = "embedding"}]\n')
    code = main(["explain", "decaymask._demo:equinox_model", "--policy", "bad.toml"])
    out, err = capsys.readouterr()
    assert (code, out) == (2, "")
    assert err == (
        "python -m decaymask explain: error: bad.toml: Policy.from_dict: rules[2].lr: a "
        "multiplier of 0 still keeps the optimizer state of the matching leaves, and a "
        "decoupled weight decay still moves them. To stop them from learning, "
        f"{DATA_FREEZE_FIX}.\n"
    )
    (tmp_path / "ladder.toml").write_text('rules = []\nlayer_decay = {rate = 0.75, blockz = "block"}\n')
    code = main(["explain", "decaymask._demo:equinox_model", "--policy", "ladder.toml"])
    out, err = capsys.readouterr()
    assert (code, out) == (2, "")
    assert err == (
        "python -m decaymask explain: error: ladder.toml: Policy.from_dict: layer_decay: "
        "unknown key 'blockz'. Valid keys: rate, blocks, stem. Did you mean 'blocks'?\n"
    )


# Warnings, on one real Equinox model.


class Net(eqx.Module):
    embed: eqx.nn.Embedding
    fc: eqx.nn.Linear
    norm: eqx.nn.LayerNorm

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.embed = eqx.nn.Embedding(5, 3, key=k1)
        self.fc = eqx.nn.Linear(3, 3, key=k2)
        self.norm = eqx.nn.LayerNorm(3)


MODEL = Net(KEY)
PATHS = ["embed/weight", "fc/weight", "fc/bias", "norm/weight", "norm/bias"]
CHECK = (
    "Check the kind, role, name or path it selects against policy.explain(tree), which "
    "lists what every array is."
)


def _flat(tree) -> list:
    return jax.tree.leaves(tree)


def _warnings_of(fn, *args) -> list[str]:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fn(*args)
    assert all(w.category is dm.PolicyWarning for w in record), [w.category for w in record]
    return [str(w.message) for w in record]


def _frozen_message(method: str, rules: str) -> str:
    return (
        f"{method}: every parameter of this tree is frozen (by {rules}), so the optimizer "
        f"trains nothing. If that is not what you meant, narrow what freezing selects, or "
        f"add dm.unfreeze(...) for what should train."
    )


def test_freezing_every_parameter_warns_from_the_mask_trainable_and_explain():
    policy = dm.Policy(*dm.presets.standard().rules, dm.freeze())
    with pytest.warns(dm.PolicyWarning) as record:
        mask = policy.mask(MODEL)
    assert [str(w.message) for w in record] == [_frozen_message("mask", "rule 5 freeze()")]
    assert record[0].filename == __file__  # the user's line, not decaymask's
    assert _flat(mask) == [False] * 5  # frozen leaves are never decayed
    with pytest.warns(dm.PolicyWarning) as record:
        trainable = policy.trainable(MODEL)
    assert [str(w.message) for w in record] == [_frozen_message("trainable", "rule 5 freeze()")]
    assert _flat(trainable) == [False] * 5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = policy.explain(MODEL)
    assert report.warnings == (_frozen_message("explain", "rule 5 freeze()"),)
    # Freezing by several rules names each of them, in the policy's order.
    two = dm.Policy(dm.freeze(within="linear"), dm.decay(), dm.freeze(path=("embed/*", "norm/*")))
    assert _warnings_of(two.trainable, MODEL) == [
        _frozen_message("trainable", "rule 1 freeze(within='linear'), rule 3 freeze(path=('embed/*', 'norm/*'))")
    ]


def test_freezing_all_but_one_parameter_is_silent():
    policy = dm.Policy(dm.freeze(), dm.unfreeze(path="fc/bias"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _flat(policy.trainable(MODEL)) == [False, False, True, False, False]
        policy.mask(MODEL)
        assert policy.explain(MODEL).warnings == ()


def test_an_ordinary_policy_with_groups_is_silent():
    policy = dm.Policy(*dm.presets.standard().rules, dm.lr(0.5, layer="embedding"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _flat(policy.mask(MODEL)) == [False, True, False, False, False]
        assert _flat(policy.trainable(MODEL)) == [True] * 5
        assert _flat(policy.lr_scales(MODEL)) == [0.5, 1.0, 1.0, 1.0, 1.0]
        assert policy.explain(MODEL).warnings == ()
    # Rules selecting kinds and roles the model lacks are no mistake either.
    lacking = dm.Policy(dm.lr(0.5, layer="conv"), dm.freeze(param="token"), dm.unfreeze(layer="attention"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lacking.mask(MODEL)
        lacking.trainable(MODEL)


@pytest.mark.parametrize(
    "rule",
    [dm.lr(0.5, path="nope/*"), dm.lr(0.5, name="w_q"), dm.lr(2.0, within=eqx.nn.MLP),
     dm.lr(2.0, layer=eqx.nn.Conv2d), dm.unfreeze(path="nope/*"), dm.unfreeze(within="attention"),
     dm.freeze(name="w_q"), dm.freeze(layer=eqx.nn.Conv2d)],
    ids=["lr_path", "lr_name", "lr_within_class", "lr_layer_class", "unfreeze_path",
         "unfreeze_within_kind", "freeze_name", "freeze_layer_class"],
)
def test_group_rules_matching_nothing_warn_like_decay_rules(rule):
    policy = dm.Policy(dm.decay(layer="linear"), rule)
    expected = f"rule 2 {rule!r} matched no parameter of this tree. {CHECK}"
    assert _warnings_of(policy.trainable, MODEL) == [f"trainable: {expected} (strict=True makes this an error.)"]
    assert policy.explain(MODEL).warnings == (f"explain: {expected} (strict=True makes this an error.)",)
    # A mask may be built on the trainable part of the model alone (below), where a
    # freeze rule rightly matches nothing: with nothing frozen, only the whole
    # model's builds report it.
    assert _warnings_of(policy.mask, MODEL) == (
        [] if rule.frozen else [f"mask: {expected} (strict=True makes this an error.)"]
    )
    strict = dm.Policy(*policy.rules, strict=True)
    with pytest.raises(dm.UnmatchedRuleError) as info:
        strict.trainable(MODEL)
    assert str(info.value) == f"trainable: {expected}"
    # Where something is frozen the tree is a whole model, and a mask reports it too.
    frozen = dm.Policy(dm.decay(layer="linear"), rule, dm.freeze(path="norm/*"))
    assert _warnings_of(frozen.mask, MODEL) == [f"mask: {expected} (strict=True makes this an error.)"]


def test_the_trainable_part_of_a_model_through_wrap_is_silent_and_steps_exactly():
    """The Equinox freezing recipe: split by policy.trainable, hand optax the trainable
    part. A strict policy whose freeze rule selects by path accepts it."""
    policy = dm.Policy(
        dm.decay(layer="linear", param="weight"),
        dm.lr(0.5, layer="linear"),
        dm.freeze(path="embed/*"),
        strict=True,
    )
    trainable, frozen = eqx.partition(MODEL, policy.trainable(MODEL))
    assert frozen.embed.weight is MODEL.embed.weight and trainable.embed.weight is None
    params = eqx.filter(trainable, eqx.is_inexact_array)
    tx = policy.wrap(optax.adamw(1.0, weight_decay=0.25, mask=policy.mask))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        state = tx.init(params)
        updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
    # Zero gradients, lr 1: the decayed weight moves by exactly -0.25 * 0.5 * p.
    np.testing.assert_array_equal(updates.fc.weight, -0.25 * 0.5 * params.fc.weight)
    for leaf in (updates.fc.bias, updates.norm.weight, updates.norm.bias):
        np.testing.assert_array_equal(leaf, jnp.zeros_like(leaf))
    # The same policy on the whole model still catches a typo in a freeze path.
    typo = dm.Policy(*policy.rules[:2], dm.freeze(path="embd/*"), strict=True)
    with pytest.raises(dm.UnmatchedRuleError, match=r"^trainable: rule 3 freeze\(path='embd/\*'\) matched no parameter"):
        typo.trainable(MODEL)


def test_unmatched_group_rules_are_found_on_leaf_records():
    from decaymask.core._warnings import find_problems, unmatched_rules

    policy = dm.Policy(
        dm.lr(0.5, layer="embedding"), dm.freeze(path="head/*"), dm.unfreeze(name="nothing"),
        dm.lr(2.0, path="nowhere/*"), dm.freeze(layer="conv"),
    )
    decisions = policy.decide(LEAVES)
    assert unmatched_rules(policy, LEAVES, decisions) == [2, 3, 4]
    messages, strict_error = find_problems(policy, LEAVES, decisions, method="explain", non_floating_fix="")
    assert strict_error is None
    assert messages == [
        "explain: rule 3 unfreeze(name='nothing'); rule 4 lr(2.0, path='nowhere/*') matched "
        f"no parameter of this tree. {CHECK} (strict=True makes this an error.)"
    ]
