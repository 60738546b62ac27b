"""Conformance of the presets on real third-party models, leaf by leaf.

Every model is built abstractly from a tiny config; its reference (``reference.py``) is
written from the model's own code. A failure lists every leaf where decaymask's mask
differs from the reference, with what the reference says and what ``explain`` says.
"""

from __future__ import annotations

import functools
import sys
import warnings

import pytest

import decaymask as dm

from . import compare, recipes
from . import reference as ref
from .models import EQUIMO, MODELS, TRANSFORMERS, build

MODEL_MODES = [
    (name, mode)
    for name in MODELS
    for mode in (["names", "traced"] if name in TRANSFORMERS else ["equinox"])
]
IDS = [f"{name}-{mode}" for name, mode in MODEL_MODES]


@pytest.mark.parametrize("name", list(MODELS))
def test_reference_covers_every_leaf_once(name):
    built = build(name)
    labels = ref.labels(name, built.tree)
    assert list(labels) == list(ref.array_leaves(built.tree))
    for path, lab in labels.items():
        assert lab.kind in dm.KINDS, f"{path}: kind {lab.kind!r} is not in the vocabulary"
        assert lab.role in dm.ROLES, f"{path}: role {lab.role!r} is not in the vocabulary"


def test_the_models_are_the_intended_ones():
    """Guards the builders: the arrays that make these models worth testing exist."""
    want = {
        "gpt2": "transformer/h/0/attn/c_attn/kernel",
        "roberta_prelayernorm": "roberta_prelayernorm/encoder/layer/0/attention/LayerNorm/scale",
        "bart": "final_logits_bias",
        "beit": "beit/encoder/layer/0/lambda_1",
        "clip": "logit_scale",
        "wav2vec2": "wav2vec2/encoder/pos_conv_embed/conv/weight_g",
        "resnet": "resnet/encoder/stages/1/layers/0/shortcut/normalization/scale",
        "dinov2": "dinov2/encoder/layer/0/layer_scale1/lambda1",
        "bert_decoder": "bert/encoder/layer/0/crossattention/self/query/kernel",
        "bert2gpt2": "decoder/transformer/h/0/crossattention/q_attn/kernel",
        "equimo_vit": "reg_tokens",
        "equimo_vssd": "blocks/0/blocks/0/attn/A_log",
        "equimo_fastervit": "blocks/2/blocks/0/hat_ls3/gamma",
        "equimo_mobilenet": "layers/0/se_conv/fc1/weight",
    }
    missing = {
        n: p for n, p in want.items() if n in MODELS and p not in ref.array_leaves(build(n).tree)
    }
    assert not missing, f"models lack the arrays they were built for: {missing}"
    assert set(TRANSFORMERS) | set(EQUIMO) == set(MODELS) or sys.version_info < (3, 11)


@pytest.mark.parametrize("preset", list(compare.PRESETS))
@pytest.mark.parametrize(("name", "mode"), MODEL_MODES, ids=IDS)
def test_preset_mask_matches_reference(name, mode, preset):
    diffs = compare.mask_differences(name, mode, preset)
    if diffs:
        pytest.fail(compare.report(name, mode, f"presets.{preset}()", diffs), pytrace=False)


WITH_ATTENTION = [(n, m) for n, m in MODEL_MODES if n in ref.ATTENTION]


@pytest.mark.parametrize(("name", "mode"), WITH_ATTENTION,
                         ids=[f"{n}-{m}" for n, m in WITH_ATTENTION])
def test_within_attention_matches_reference(name, mode):
    """``within="attention"`` selects exactly the arrays of the model's attention layers,
    by names alone as by the trace (a glued ``crossattention`` included)."""
    built = build(name)
    expected = ref.within_attention(name, built.tree)
    policy = dm.Policy(dm.decay(within="attention"))
    with compare.policy_warnings_ignored():
        got = compare.flat_values(compare.call(policy, built, mode, "mask"))
    wrong = [p for p in expected if got.get(p) != expected[p]]
    assert not wrong, (
        f"{name} ({mode}): within='attention' differs from the reference on "
        + ", ".join(f"{p} (reference {expected[p]})" for p in wrong)
    )


@pytest.mark.parametrize(("name", "mode"), MODEL_MODES, ids=IDS)
def test_muon_dims_are_right_or_a_clear_error(name, mode):
    """Under ``presets.muon()``: the reference's axes on every weight, or a ValueError
    naming the leaf it cannot lay out; never wrong axes."""
    try:
        diffs = compare.muon_dims_differences(name, mode)
    except ValueError as err:
        leaves = ref.array_leaves(build(name).tree)
        named = [p for p in leaves if p in str(err)]
        assert named, f"{name} ({mode}): the ValueError names no leaf of the model: {err}"
        return
    if diffs:
        pytest.fail(compare.report(name, mode, "muon dims", diffs), pytrace=False)


QUIET = [(n, m) for n, m in MODEL_MODES if n in ("llama", "gpt2", "bert", "equimo_mobilenet")]


@functools.cache
def _fresh(name):
    """A second build of the model, so no result computed for another test is reused."""
    return MODELS[name]()


@pytest.mark.parametrize("preset", list(compare.PRESETS))
@pytest.mark.parametrize(("name", "mode"), QUIET, ids=[f"{n}-{m}" for n, m in QUIET])
def test_presets_raise_no_warning(name, mode, preset):
    built = _fresh(name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compare.call(compare.PRESETS[preset](), built, mode, "mask")
    policy_warnings = [w for w in caught if issubclass(w.category, dm.PolicyWarning)]
    if policy_warnings:
        pytest.fail(
            f"presets.{preset}() on {name} ({mode}) warned:\n"
            + "\n".join(f"  {w.message}" for w in policy_warnings),
            pytrace=False,
        )


@pytest.mark.parametrize(("name", "recipe"), list(recipes.RECIPES), ids=[
    f"{n}-{r}" for n, r in recipes.RECIPES
])
def test_recipe_agrees_with_reference(name, recipe):
    """The model's own training recipe gives the reference-derived mask of its preset,
    except where ``recipes.DIFFERENCES`` documents why the preset differs."""
    fn, preset = recipes.RECIPES[(name, recipe)]
    tree = build(name).tree
    labels = ref.labels(name, tree)
    by_recipe = fn(tree)
    by_preset = ref.expected_mask(name, tree, preset)
    assert set(by_recipe) == set(by_preset)
    unexplained = []
    for path, decayed in by_recipe.items():
        if decayed == by_preset[path]:
            continue
        lab = labels[path]
        if not any(applies(lab, path, decayed, by_preset[path])
                   for _, applies in recipes.DIFFERENCES):
            unexplained.append(
                f"  {path}: {lab.kind}/{lab.role}: recipe {decayed}, "
                f"presets.{preset}() by the reference {by_preset[path]}"
            )
    if unexplained:
        pytest.fail(
            f"{recipe} on {name} disagrees with the reference:\n" + "\n".join(unexplained),
            pytrace=False,
        )


def test_every_documented_difference_occurs():
    """A documented reason no model shows is stale."""
    seen = set()
    for (name, recipe), (fn, preset) in recipes.RECIPES.items():
        tree = build(name).tree
        labels = ref.labels(name, tree)
        by_preset = ref.expected_mask(name, tree, preset)
        for path, decayed in fn(tree).items():
            if decayed != by_preset[path]:
                for reason, applies in recipes.DIFFERENCES:
                    if applies(labels[path], path, decayed, by_preset[path]):
                        seen.add(reason)
    stale = [reason for reason, _ in recipes.DIFFERENCES if reason not in seen]
    assert not stale, f"documented differences no recipe shows: {stale}"


@pytest.mark.parametrize(("name", "mode"), MODEL_MODES, ids=IDS)
def test_masks_are_accepted_by_optax(name, mode):
    """Each preset's mask goes through ``optax.add_decayed_weights`` (the masked step of
    ``optax.adamw``), init and update, abstractly."""
    import equinox as eqx
    import jax
    import optax

    built = build(name)
    params = built.tree
    if mode == "equinox":
        params = eqx.filter(params, lambda x: isinstance(x, jax.ShapeDtypeStruct))
    for preset in compare.PRESETS:
        mask = compare.cached(name, mode, preset, "mask")
        tx = optax.add_decayed_weights(0.25, mask=mask)
        updates = jax.eval_shape(lambda p: tx.update(p, tx.init(p), p)[0], params)
        assert jax.tree.structure(updates) == jax.tree.structure(params)


def test_the_comparison_can_fail():
    """A policy that decays everything differs from standard() exactly on the leaves the
    reference spares, and the failure report names each of them."""
    built = build("llama")
    expected = ref.expected_mask("llama", built.tree, "standard")
    spared = [p for p, decayed in expected.items() if not decayed]
    assert spared and len(spared) < len(expected)
    got = compare.flat_values(dm.Policy(dm.decay()).for_flax(built.tree))
    differ = [p for p in expected if got[p] != expected[p]]
    assert differ == spared
    labels = ref.labels("llama", built.tree)
    diffs = [compare.Difference(p, labels[p], False, True, None) for p in differ]
    text = compare.report("llama", "names", "decay()", diffs)
    assert all(p in text for p in spared)
