"""policy.verify: real models of every framework, real optax transformations, the exact
mismatches and messages."""

from __future__ import annotations

import functools
import gc
import weakref
from typing import Any

import equinox as eqx
import flax.linen as nn
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import decaymask as dm

LR, WD = 1e-3, 0.05
POLICY = dm.Policy(
    *dm.presets.standard().rules,
    dm.freeze(layer="embedding"),
    dm.lr(2.0, path="head/*"),
    dm.layer_decay(0.5),
)

# One model in each framework: an embedding (frozen), two blocks of a norm and a
# linear layer (multipliers 0.25 and 0.5), a final norm (1) and a head (2).


class EqxBlock(eqx.Module):
    norm: eqx.nn.LayerNorm
    fc: eqx.nn.Linear

    def __init__(self, key):
        self.norm = eqx.nn.LayerNorm(4)
        self.fc = eqx.nn.Linear(4, 4, key=key)


class EqxNet(eqx.Module):
    embed: eqx.nn.Embedding
    blocks: list
    norm: eqx.nn.LayerNorm
    head: eqx.nn.Linear

    def __init__(self, key):
        keys = jax.random.split(key, 4)
        self.embed = eqx.nn.Embedding(10, 4, key=keys[0])
        self.blocks = [EqxBlock(keys[1]), EqxBlock(keys[2])]
        self.norm = eqx.nn.LayerNorm(4)
        self.head = eqx.nn.Linear(4, 3, key=keys[3])


class LinenBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(4)(nn.LayerNorm()(x))


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(10, 4, name="embed")(ids)
        for i in range(2):
            x = LinenBlock(name=f"blocks_{i}")(x)
        return nn.Dense(3, name="head")(nn.LayerNorm(name="norm")(x))


class NnxBlock(nnx.Module):
    def __init__(self, rngs):
        self.norm = nnx.LayerNorm(4, rngs=rngs)
        self.fc = nnx.Linear(4, 4, rngs=rngs)


class NnxNet(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(10, 4, rngs=rngs)
        self.blocks = nnx.List([NnxBlock(rngs), NnxBlock(rngs)])
        self.norm = nnx.LayerNorm(4, rngs=rngs)
        self.head = nnx.Linear(4, 3, rngs=rngs)


class HaikuBlock(hk.Module):
    def __call__(self, x):
        return hk.Linear(4, name="fc")(hk.LayerNorm(-1, True, True, name="norm")(x))


def haiku_net(ids):
    x = hk.Embed(10, 4, name="embed")(ids)
    for _ in range(2):
        x = HaikuBlock(name="block")(x)
    return hk.Linear(3, name="head")(hk.LayerNorm(-1, True, True, name="norm")(x))


IDS = jnp.zeros((2,), jnp.int32)
EQX_PARAMS = eqx.filter(EqxNet(jax.random.key(0)), eqx.is_array)
LINEN_PARAMS = LinenNet().init(jax.random.key(0), IDS)["params"]
NNX_MODEL = NnxNet(nnx.Rngs(0))
NNX_PARAMS = nnx.state(NNX_MODEL, nnx.Param)
HAIKU_PARAMS = hk.transform(haiku_net).init(jax.random.key(0), IDS)

# Each framework: its params, the options every call takes, and its canonical paths in
# the params' order, by a name common to the four models.
MODELS: dict[str, tuple[Any, dict[str, Any], list[tuple[str, str]]]] = {
    "equinox": (EQX_PARAMS, {}, [
        ("embed", "embed/weight"),
        ("b0.scale", "blocks/0/norm/weight"), ("b0.offset", "blocks/0/norm/bias"),
        ("b0.weight", "blocks/0/fc/weight"), ("b0.bias", "blocks/0/fc/bias"),
        ("b1.scale", "blocks/1/norm/weight"), ("b1.offset", "blocks/1/norm/bias"),
        ("b1.weight", "blocks/1/fc/weight"), ("b1.bias", "blocks/1/fc/bias"),
        ("scale", "norm/weight"), ("offset", "norm/bias"),
        ("head.weight", "head/weight"), ("head.bias", "head/bias"),
    ]),
    "linen": (LINEN_PARAMS, {}, [
        ("b0.bias", "blocks_0/Dense_0/bias"), ("b0.weight", "blocks_0/Dense_0/kernel"),
        ("b0.offset", "blocks_0/LayerNorm_0/bias"), ("b0.scale", "blocks_0/LayerNorm_0/scale"),
        ("b1.bias", "blocks_1/Dense_0/bias"), ("b1.weight", "blocks_1/Dense_0/kernel"),
        ("b1.offset", "blocks_1/LayerNorm_0/bias"), ("b1.scale", "blocks_1/LayerNorm_0/scale"),
        ("embed", "embed/embedding"),
        ("head.bias", "head/bias"), ("head.weight", "head/kernel"),
        ("offset", "norm/bias"), ("scale", "norm/scale"),
    ]),
    "nnx": (NNX_PARAMS, {}, [
        ("b0.bias", "blocks/0/fc/bias"), ("b0.weight", "blocks/0/fc/kernel"),
        ("b0.offset", "blocks/0/norm/bias"), ("b0.scale", "blocks/0/norm/scale"),
        ("b1.bias", "blocks/1/fc/bias"), ("b1.weight", "blocks/1/fc/kernel"),
        ("b1.offset", "blocks/1/norm/bias"), ("b1.scale", "blocks/1/norm/scale"),
        ("embed", "embed/embedding"),
        ("head.bias", "head/bias"), ("head.weight", "head/kernel"),
        ("offset", "norm/bias"), ("scale", "norm/scale"),
    ]),
    "haiku": (HAIKU_PARAMS, {"framework": "haiku"}, [
        ("b0.bias", "block/fc/b"), ("b0.weight", "block/fc/w"),
        ("b0.offset", "block/norm/offset"), ("b0.scale", "block/norm/scale"),
        ("b1.bias", "block_1/fc/b"), ("b1.weight", "block_1/fc/w"),
        ("b1.offset", "block_1/norm/offset"), ("b1.scale", "block_1/norm/scale"),
        ("embed", "embed/embeddings"),
        ("head.bias", "head/b"), ("head.weight", "head/w"),
        ("offset", "norm/offset"), ("scale", "norm/scale"),
    ]),
}
FRAMEWORKS = list(MODELS)

WRAP_HINT = (
    "Fix: wrap the optimizer, tx = policy.wrap(optax.adamw(..., mask=policy.mask)): it "
    "multiplies each update by its multiplier and gives frozen leaves no update and no "
    "state."
)
MASK_HINT = (
    "Fix: give the optimizer this policy's mask, optax.adamw(..., mask=policy.mask) (or "
    "optax.add_decayed_weights(..., mask=policy.mask))."
)
ONCE_HINT = (
    "Fix: apply the multipliers once, with policy.wrap around an optimizer that scales "
    "no leaf itself (one optax.adamw, not an optax.partition of scaled copies)."
)
UNAPPLIED = "(no multiplier applied)"


def mask_of(policy: dm.Policy, options: dict[str, Any]) -> Any:
    return functools.partial(policy.mask, **options) if options else policy.mask


def verify_error(policy: dm.Policy, tx: Any, params: Any, **options: Any) -> Any:
    with pytest.raises(dm.VerifyError) as info:
        policy.verify(tx, params, **options)
    return info.value


def found(err: dm.VerifyError) -> list[tuple[str, str, str, str]]:
    return [(m.path, m.check, m.expected, m.got) for m in err.mismatches]


def message(rows: list[tuple[str, str, str, str]], leaves: int, hint: str) -> str:
    lines = [f"  {p}: {c}: expected {e}, got {g}" for p, c, e, g in rows[:12]]
    if len(rows) > 12:
        lines.append(f"  ... and {len(rows) - 12} more")
    return (
        f"policy.verify: tx does not do what the policy says at {leaves} leaves:\n"
        + "\n".join(lines) + "\n" + hint
    )


Row = tuple[str, str, str]


def expand(framework: str, table: dict[str, list[Row]]) -> list[tuple[str, str, str, str]]:
    """``table``'s rows (by common name) in the framework's paths and params' order."""
    return [
        (path, *row) for name, path in MODELS[framework][2] for row in table.get(name, [])
    ]


def update_times(expected: str, got: str = f"1 {UNAPPLIED}") -> Row:
    return ("multiplier", f"the update times {expected}", f"the update times {got}")


def decay_times(expected: str, got: str = f"1 {UNAPPLIED}") -> Row:
    return ("decay", f"the weight decay times {expected}", f"the weight decay times {got}")


def cannot_run(cause: BaseException, hint: bool = True) -> str:
    """The message of a tx that raised ``cause`` on the params."""
    # At most 12 lines of it, each at most 300 characters.
    lines = [line.rstrip() for line in str(cause).strip().splitlines()][:12]
    text = "\n    ".join(line if len(line) <= 300 else line[:300] + "..." for line in lines)
    return f"policy.verify: tx cannot be run on params: {type(cause).__name__}: {text}" + (
        "\nIs tx built for these params? A mask, labels or Muon dimension numbers made from "
        "other params do not fit them: pass the policy's methods themselves "
        "(mask=policy.mask, muon_weight_dimension_numbers=policy.muon_dims), which build "
        "them from what optax hands them." if hint else ""
    )


# Correct setups: no report.


def correct_transformations(mask: Any) -> dict[str, Any]:
    return {
        "adamw": optax.adamw(LR, weight_decay=WD, mask=mask),
        "sgd": optax.chain(optax.add_decayed_weights(WD, mask=mask), optax.sgd(0.1)),
        "inject_hyperparams": optax.inject_hyperparams(optax.adamw, static_args=("mask",))(
            LR, weight_decay=WD, mask=mask
        ),
        "lion": optax.lion(LR, weight_decay=WD, mask=mask),
        "clip_adamw": optax.chain(
            optax.clip_by_global_norm(0.5), optax.adamw(LR, weight_decay=WD, mask=mask)
        ),
    }


KINDS = ["adamw", "sgd", "inject_hyperparams", "lion", "clip_adamw"]
CORRECT = (
    [("equinox", kind) for kind in KINDS]
    + [("nnx", kind) for kind in KINDS]
    + [("linen", "adamw"), ("haiku", "adamw")]
)


def snapshot(tree: Any) -> list[tuple[str, bytes]]:
    arrays = [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]
    return [(str(x.dtype), x.tobytes()) for x in arrays]


@pytest.mark.parametrize(("framework", "kind"), CORRECT, ids=[f"{f}-{k}" for f, k in CORRECT])
def test_a_wrapped_optimizer_with_the_policy_mask_passes_and_changes_nothing(framework, kind):
    params, options, _ = MODELS[framework]
    before = snapshot(params)
    tx = POLICY.wrap(correct_transformations(mask_of(POLICY, options))[kind], **options)
    assert POLICY.verify(tx, params, **options) is None
    assert snapshot(params) == before


# A forgotten wrap.

FORGOTTEN = {
    "embed": [
        ("frozen update", "no update", "an update of up to 0.001"),
        (
            "frozen state", "no optimizer state",
            "an array of shape (10, 4) kept at [0].mu in the state",
        ),
    ],
    "b0.scale": [update_times("0.25")],
    "b0.offset": [update_times("0.25")],
    "b0.weight": [decay_times("0.25"), update_times("0.25")],
    "b0.bias": [update_times("0.25")],
    "b1.scale": [update_times("0.5")],
    "b1.offset": [update_times("0.5")],
    "b1.weight": [decay_times("0.5"), update_times("0.5")],
    "b1.bias": [update_times("0.5")],
    "head.weight": [decay_times("2"), update_times("2")],
    "head.bias": [update_times("2")],
}


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_a_forgotten_wrap_names_the_frozen_leaf_and_every_multiplier(framework):
    params, options, _ = MODELS[framework]
    before = snapshot(params)
    tx = optax.adamw(LR, weight_decay=WD, mask=mask_of(POLICY, options))
    err = verify_error(POLICY, tx, params, **options)
    expected = expand(framework, FORGOTTEN)
    assert found(err) == expected
    assert str(err) == message(expected, 11, WRAP_HINT)
    assert snapshot(params) == before


def test_the_message_of_a_forgotten_wrap_reads_in_the_params_order():
    err = verify_error(POLICY, optax.adamw(LR, weight_decay=WD, mask=POLICY.mask), EQX_PARAMS)
    assert str(err) == (
        "policy.verify: tx does not do what the policy says at 11 leaves:\n"
        "  embed/weight: frozen update: expected no update, got an update of up to 0.001\n"
        "  embed/weight: frozen state: expected no optimizer state, got an array of shape "
        "(10, 4) kept at [0].mu in the state\n"
        "  blocks/0/norm/weight: multiplier: expected the update times 0.25, got the update "
        "times 1 (no multiplier applied)\n"
        "  blocks/0/norm/bias: multiplier: expected the update times 0.25, got the update "
        "times 1 (no multiplier applied)\n"
        "  blocks/0/fc/weight: decay: expected the weight decay times 0.25, got the weight "
        "decay times 1 (no multiplier applied)\n"
        "  blocks/0/fc/weight: multiplier: expected the update times 0.25, got the update "
        "times 1 (no multiplier applied)\n"
        "  blocks/0/fc/bias: multiplier: expected the update times 0.25, got the update "
        "times 1 (no multiplier applied)\n"
        "  blocks/1/norm/weight: multiplier: expected the update times 0.5, got the update "
        "times 1 (no multiplier applied)\n"
        "  blocks/1/norm/bias: multiplier: expected the update times 0.5, got the update "
        "times 1 (no multiplier applied)\n"
        "  blocks/1/fc/weight: decay: expected the weight decay times 0.5, got the weight "
        "decay times 1 (no multiplier applied)\n"
        "  blocks/1/fc/weight: multiplier: expected the update times 0.5, got the update "
        "times 1 (no multiplier applied)\n"
        "  blocks/1/fc/bias: multiplier: expected the update times 0.5, got the update "
        "times 1 (no multiplier applied)\n"
        "  ... and 3 more\n" + WRAP_HINT
    )


# A missing mask, and the mask of another policy.

# Every leaf decays without a mask; norm scales (ones) show it, zero biases cannot.
# Equinox's Linear biases are random, the other frameworks' zeros.
STRAY = {
    name: [("decay", "not decayed", f"decayed, the weight decay times {factor}")]
    for name, factor in [
        ("b0.scale", "0.25"), ("b1.scale", "0.5"), ("scale", "1"),
        ("b0.bias", "0.25"), ("b1.bias", "0.5"), ("head.bias", "2"),
    ]
}


def stray(framework: str) -> list[tuple[str, str, str, str]]:
    names = ["b0.scale", "b1.scale", "scale"]
    if framework == "equinox":
        names += ["b0.bias", "b1.bias", "head.bias"]
    return expand(framework, {name: STRAY[name] for name in names})


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_a_missing_mask_decays_the_leaves_the_policy_does_not(framework):
    params, options, _ = MODELS[framework]
    tx = POLICY.wrap(optax.adamw(LR, weight_decay=WD), **options)
    err = verify_error(POLICY, tx, params, **options)
    expected = stray(framework)
    assert found(err) == expected
    assert str(err) == message(expected, len(expected), MASK_HINT)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_the_mask_of_a_policy_that_decays_everything_is_a_missing_mask(framework):
    params, options, _ = MODELS[framework]
    everything = mask_of(dm.Policy(dm.decay()), options)
    tx = POLICY.wrap(optax.adamw(LR, weight_decay=WD, mask=everything), **options)
    assert found(verify_error(POLICY, tx, params, **options)) == stray(framework)


class ConvNet(eqx.Module):
    conv: eqx.nn.Conv1d
    head: eqx.nn.Linear

    def __init__(self, key):
        keys = jax.random.split(key)
        self.conv = eqx.nn.Conv1d(2, 4, 3, key=keys[0])
        self.head = eqx.nn.Linear(4, 2, key=keys[1])


def test_the_gpt_mask_leaves_a_conv_weight_the_standard_policy_decays():
    params = eqx.filter(ConvNet(jax.random.key(1)), eqx.is_array)
    standard = dm.presets.standard()
    tx = standard.wrap(optax.adamw(LR, weight_decay=WD, mask=dm.presets.gpt().mask))
    err = verify_error(standard, tx, params)
    assert found(err) == [
        ("conv/weight", "decay", "decayed", "not decayed (no move with zero gradients)")
    ]
    assert str(err) == (
        "policy.verify: tx does not do what the policy says at 1 leaf:\n"
        "  conv/weight: decay: expected decayed, got not decayed (no move with zero "
        "gradients)\n" + MASK_HINT
    )
    standard.verify(standard.wrap(optax.adamw(LR, weight_decay=WD, mask=standard.mask)), params)


# Multipliers applied where the policy does not say so.


def test_a_group_scaled_by_hand_inside_wrap_is_scaled_twice():
    groups = dm.Policy(dm.no_decay(label="rest"), dm.label("head", path="head/*"))
    by_hand = optax.partition(
        {
            "head": optax.adamw(2 * LR, weight_decay=WD, mask=POLICY.mask),
            "rest": optax.adamw(LR, weight_decay=WD, mask=POLICY.mask),
        },
        groups.labels,
    )
    err = verify_error(POLICY, POLICY.wrap(by_hand), EQX_PARAMS)
    assert found(err) == [
        ("head/weight", *decay_times("2", "4")),
        ("head/weight", *update_times("2", "4")),
        ("head/bias", *update_times("2", "4")),
    ]
    assert str(err) == (
        "policy.verify: tx does not do what the policy says at 2 leaves:\n"
        "  head/weight: decay: expected the weight decay times 2, got the weight decay "
        "times 4\n"
        "  head/weight: multiplier: expected the update times 2, got the update times 4\n"
        "  head/bias: multiplier: expected the update times 2, got the update times 4\n"
        + ONCE_HINT
    )


def test_a_trained_group_left_without_update_is_reported_however_large():
    # Most leaves get no update from their gradient: still every one is wrong.
    groups = dm.Policy(dm.no_decay(label="rest"), dm.label("head", path="head/*"))
    partial = optax.partition(
        {"head": optax.adamw(LR, weight_decay=WD, mask=POLICY.mask), "rest": optax.set_to_zero()},
        groups.labels,
    )
    err = verify_error(POLICY, POLICY.wrap(partial), EQX_PARAMS)
    def still(expected: str) -> Row:
        return ("multiplier", f"the update times {expected}", "no update from its gradient")

    undecayed = ("decay", "decayed", "not decayed (no move with zero gradients)")
    expected = {
        "b0.scale": [still("0.25")], "b0.offset": [still("0.25")],
        "b0.weight": [undecayed, still("0.25")], "b0.bias": [still("0.25")],
        "b1.scale": [still("0.5")], "b1.offset": [still("0.5")],
        "b1.weight": [undecayed, still("0.5")], "b1.bias": [still("0.5")],
        "scale": [still("1")], "offset": [still("1")],
    }
    assert found(err) == expand("equinox", expected)
    assert str(err).endswith(
        "\nFix: give the optimizer this policy's mask, optax.adamw(..., mask=policy.mask) (or "
        "optax.add_decayed_weights(..., mask=policy.mask)). Then update every leaf the policy "
        "trains: freeze leaves with dm.freeze, which policy.wrap applies, rather than "
        "optax.set_to_zero or a mask of its own."
    )


def test_a_multiplier_every_leaf_shares_is_not_reported():
    half = dm.Policy(dm.decay(), dm.lr(0.5))
    half.verify(half.wrap(optax.adamw(LR, weight_decay=WD, mask=half.mask)), EQX_PARAMS)
    # Unwrapped, it is indistinguishable from a smaller learning rate.
    half.verify(optax.adamw(LR / 2, weight_decay=WD, mask=half.mask), EQX_PARAMS)


RATED = dm.Policy(
    dm.decay(),
    dm.decay(layer="linear", param="weight", rate=0.5),
    dm.no_decay(param="bias"),
    dm.lr(2.0, path="head/*"),
)


def test_decay_rates_are_checked():
    with_rates = optax.chain(
        optax.scale_by_adam(), dm.add_decayed_weights(WD, RATED.rates), optax.scale(-LR)
    )
    RATED.verify(RATED.wrap(with_rates), EQX_PARAMS)
    plain = RATED.wrap(optax.adamw(LR, weight_decay=WD, mask=RATED.mask))
    err = verify_error(RATED, plain, EQX_PARAMS)
    assert found(err) == [
        ("blocks/0/fc/weight", *decay_times("0.5", "1")),
        ("blocks/1/fc/weight", *decay_times("0.5", "1")),
        ("head/weight", *decay_times("1", "2")),
    ]
    assert str(err).endswith(
        "\nFix: decay each leaf by its rate, with dm.add_decayed_weights(weight_decay, "
        "policy.rates) in place of the optimizer's own decay."
    )


# Optimizers whose step is not element-wise: their multipliers are not checked.


def muon(policy: dm.Policy, **kwargs: Any) -> Any:
    return optax.contrib.muon(
        LR, weight_decay=WD, muon_weight_dimension_numbers=policy.muon_dims, **kwargs
    )


def test_muon_wrapped_passes_though_its_matrices_move_by_their_own_scale():
    POLICY.verify(POLICY.wrap(muon(POLICY, weight_decay_mask=POLICY.mask)), EQX_PARAMS)
    clipped = optax.chain(
        optax.clip_by_global_norm(0.5), muon(POLICY, weight_decay_mask=POLICY.mask)
    )
    POLICY.verify(POLICY.wrap(clipped), EQX_PARAMS)


def test_muon_unwrapped_is_checked_for_decay_and_freezing_not_its_matrix_multipliers():
    err = verify_error(POLICY, muon(POLICY, weight_decay_mask=POLICY.mask), EQX_PARAMS)
    # The Muon matrices (the decayed weights) keep their decay rows, not their multipliers.
    table = {
        name: [row for row in rows if row[0] != "multiplier" or not name.endswith("weight")]
        for name, rows in FORGOTTEN.items()
    }
    table["embed"] = [
        # Muon's Adam is Nesterov's: its first step is 1.47 times the learning rate.
        ("frozen update", "no update", "an update of up to 0.00147"),
        ("frozen state", "no optimizer state", "an array of shape (10, 4) kept at "
         ".inner_states['adam'].inner_state[0].mu in the state"),
    ]
    assert found(err) == expand("equinox", table)


def test_muon_with_the_decay_mask_of_another_policy():
    head_only = dm.Policy(dm.decay(path="head/*")).mask
    err = verify_error(POLICY, POLICY.wrap(muon(POLICY, weight_decay_mask=head_only)), EQX_PARAMS)
    assert found(err) == [
        ("blocks/0/fc/weight", "decay", "decayed", "not decayed (no move with zero gradients)"),
        ("blocks/1/fc/weight", "decay", "decayed", "not decayed (no move with zero gradients)"),
    ]


class Shapes(eqx.Module):
    """Muon matrices of the shapes an orthogonalisation keeps as they are under a
    gradient of ones: 2x2, a row, a column, a stack of rows."""

    square: eqx.nn.Linear
    row: eqx.nn.Linear
    column: eqx.nn.Linear
    rows: eqx.nn.Linear
    norm: eqx.nn.LayerNorm

    def __init__(self, key):
        keys = jax.random.split(key, 4)
        self.square = eqx.nn.Linear(2, 2, key=keys[0])
        self.row = eqx.nn.Linear(4, 1, key=keys[1])
        self.column = eqx.nn.Linear(1, 4, key=keys[2])
        rows = eqx.filter_vmap(lambda k: eqx.nn.Linear(4, 1, key=k))
        self.rows = rows(jax.random.split(keys[3], 3))
        self.norm = eqx.nn.LayerNorm(4)


def test_muon_on_small_and_vector_shaped_matrices_is_never_a_false_report():
    params = eqx.filter(Shapes(jax.random.key(2)), eqx.is_array)
    policy = dm.Policy(
        *dm.presets.standard().rules,
        dm.lr(2.0, path="row/*"), dm.lr(3.0, path="column/*"), dm.lr(0.5, path="rows/*"),
    )
    policy.verify(policy.wrap(muon(policy, weight_decay_mask=policy.mask)), params)
    err = verify_error(policy, muon(policy, weight_decay_mask=policy.mask), params)
    assert found(err) == [
        ("row/weight", *decay_times("2")),
        ("row/bias", *update_times("2")),
        ("column/weight", *decay_times("3")),
        ("column/bias", *update_times("3")),
        ("rows/weight", *decay_times("0.5")),
        ("rows/bias", *update_times("0.5")),
    ]


@pytest.mark.parametrize("kind", ["lamb", "adafactor"])
def test_optimizers_that_scale_by_the_params_norm_are_not_reported(kind):
    tx = {
        "lamb": optax.lamb(LR, weight_decay=WD, mask=POLICY.mask),
        "adafactor": optax.adafactor(LR, weight_decay_rate=WD, weight_decay_mask=POLICY.mask),
    }[kind]
    POLICY.verify(POLICY.wrap(tx), EQX_PARAMS)


def test_a_global_clip_does_not_hide_a_forgotten_wrap():
    clipped = optax.chain(
        optax.clip_by_global_norm(0.5), optax.adamw(LR, weight_decay=WD, mask=POLICY.mask)
    )
    table = dict(FORGOTTEN)
    table["embed"] = [
        FORGOTTEN["embed"][0],
        (
            "frozen state", "no optimizer state",
            "an array of shape (10, 4) kept at [1][0].mu in the state",
        ),
    ]
    assert found(verify_error(POLICY, clipped, EQX_PARAMS)) == expand("equinox", table)


# Stacked layers: one multiplier per layer.


class ScanBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return x + nn.Dense(4)(nn.LayerNorm()(x)), None


class ScanNet(nn.Module):
    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(10, 4, name="embed")(ids)
        stack = nn.scan(
            ScanBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=3
        )
        x, _ = stack(name="blocks")(x, None)
        return nn.Dense(2, name="head")(nn.LayerNorm(name="norm")(x))


class EqxStack(eqx.Module):
    embed: eqx.nn.Embedding
    blocks: EqxBlock
    norm: eqx.nn.LayerNorm
    head: eqx.nn.Linear

    def __init__(self, key):
        keys = jax.random.split(key, 3)
        self.embed = eqx.nn.Embedding(10, 4, key=keys[0])
        self.blocks = eqx.filter_vmap(EqxBlock)(jax.random.split(keys[1], 3))
        self.norm = eqx.nn.LayerNorm(4)
        self.head = eqx.nn.Linear(4, 2, key=keys[2])


SCAN = ScanNet()
SCAN_OPTIONS = {"module": SCAN, "args": (jnp.zeros((1, 3), jnp.int32),)}
SCAN_PARAMS = SCAN.init(jax.random.key(0), *SCAN_OPTIONS["args"])["params"]
STACKS = {
    # Linen needs the trace to see the stack; its mask is a tree made from the params.
    "linen_scan": (SCAN_PARAMS, SCAN_OPTIONS, POLICY.mask(SCAN_PARAMS, **SCAN_OPTIONS), [
        ("blocks/Dense_0/bias", "bias"), ("blocks/Dense_0/kernel", "weight"),
        ("blocks/LayerNorm_0/bias", "offset"), ("blocks/LayerNorm_0/scale", "scale"),
        ("embed/embedding", "embed"),
        ("head/bias", "head.bias"), ("head/kernel", "head.weight"),
    ]),
    "equinox_vmap": (eqx.filter(EqxStack(jax.random.key(0)), eqx.is_array), {}, POLICY.mask, [
        ("embed/weight", "embed"),
        ("blocks/norm/weight", "scale"), ("blocks/norm/bias", "offset"),
        ("blocks/fc/weight", "weight"), ("blocks/fc/bias", "bias"),
        ("head/weight", "head.weight"), ("head/bias", "head.bias"),
    ]),
}
LAYERS = "[0.125, 0.25, 0.5]"
STACKED = {
    "embed": FORGOTTEN["embed"],
    "scale": [update_times(LAYERS)],
    "offset": [update_times(LAYERS)],
    "weight": [decay_times(LAYERS), update_times(LAYERS)],
    "bias": [update_times(LAYERS)],
    "head.weight": FORGOTTEN["head.weight"],
    "head.bias": FORGOTTEN["head.bias"],
}


@pytest.mark.parametrize("stack", list(STACKS))
def test_a_stacked_model_with_layer_decay(stack):
    params, options, mask, paths = STACKS[stack]
    wrapped = POLICY.wrap(optax.adamw(LR, weight_decay=WD, mask=mask), **options)
    POLICY.verify(wrapped, params, **options)
    err = verify_error(POLICY, optax.adamw(LR, weight_decay=WD, mask=mask), params, **options)
    assert found(err) == [(path, *row) for path, name in paths for row in STACKED[name]]


def test_a_stack_scaled_by_another_ladder_shows_each_layer_s_multiplier():
    params, options, mask, _ = STACKS["linen_scan"]
    steeper = dm.Policy(*POLICY.rules, dm.layer_decay(0.8))
    tx = steeper.wrap(optax.adamw(LR, weight_decay=WD, mask=mask), **options)
    err = verify_error(POLICY, tx, params, **options)
    got = "[0.512, 0.64, 0.8]"
    assert found(err) == [
        ("blocks/Dense_0/bias", *update_times(LAYERS, got)),
        ("blocks/Dense_0/kernel", *decay_times(LAYERS, got)),
        ("blocks/Dense_0/kernel", *update_times(LAYERS, got)),
        ("blocks/LayerNorm_0/bias", *update_times(LAYERS, got)),
        ("blocks/LayerNorm_0/scale", *update_times(LAYERS, got)),
    ]
    assert str(err).endswith("\n" + ONCE_HINT)


def test_muon_on_a_stack_keeps_its_promise():
    params, _, mask, _ = STACKS["equinox_vmap"]
    POLICY.verify(POLICY.wrap(muon(POLICY, weight_decay_mask=mask)), params)


# Leaves whose values are all zero.


def test_an_all_zero_leaf_is_no_false_report_and_still_checked_for_its_multiplier():
    everything = dm.Policy(dm.decay(), dm.lr(2.0, path="head/*"))
    assert not np.any(LINEN_PARAMS["head"]["bias"])  # zeros, decayed by this policy
    tx = optax.adamw(LR, weight_decay=WD, mask=everything.mask)
    everything.verify(everything.wrap(tx), LINEN_PARAMS)
    err = verify_error(everything, tx, LINEN_PARAMS)
    assert found(err) == [
        ("head/bias", *update_times("2")),
        ("head/kernel", *decay_times("2")),
        ("head/kernel", *update_times("2")),
    ]


# Params of a coarser dtype.


def test_bfloat16_params_are_compared_to_their_precision():
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), EQX_PARAMS)
    tx = optax.adamw(LR, weight_decay=WD, mask=POLICY.mask)
    POLICY.verify(POLICY.wrap(tx), params)
    rows = found(verify_error(POLICY, tx, params))
    expected = expand("equinox", FORGOTTEN)
    # bfloat16 rounds the learning rate the frozen leaf moves by.
    assert rows[0] == ("embed/weight", "frozen update", "no update", "an update of up to 0.000999")
    assert rows[1:] == expected[1:]


def test_float16_adam_with_an_eps_it_rounds_to_zero_is_not_finite():
    params = jax.tree.map(lambda x: x.astype(jnp.float16), EQX_PARAMS)
    tx = POLICY.wrap(optax.adamw(LR, weight_decay=WD, mask=POLICY.mask))
    err = verify_error(POLICY, tx, params)
    assert str(err) == (
        "policy.verify: tx's updates are not finite at blocks/0/norm/weight, "
        "blocks/0/norm/bias, blocks/0/fc/weight and 9 more, so there is nothing to compare. "
        "With zero gradients, an optimizer dividing by a second moment divides 0 by its eps, "
        "and 1e-8 is 0 in float16: pass a larger eps, or verify the optimizer on float32 "
        "params."
    )
    # With an eps float16 holds, no false report: its decays, below its smallest normal
    # number, keep too few digits to be compared.
    POLICY.verify(POLICY.wrap(optax.adamw(LR, eps=1e-4, weight_decay=WD, mask=POLICY.mask)), params)


# Nothing is changed, nothing is kept.


def test_verify_leaves_an_nnx_model_s_variables_as_they_are():
    variables = nnx.state(NNX_MODEL)
    before = snapshot(variables)
    kernel = NNX_MODEL.head.kernel
    tx = POLICY.wrap(optax.adamw(LR, weight_decay=WD, mask=POLICY.mask))
    POLICY.verify(tx, nnx.state(NNX_MODEL, nnx.Param))
    assert snapshot(nnx.state(NNX_MODEL)) == before
    assert NNX_MODEL.head.kernel is kernel


def recording(tx: Any, seen: list[Any]) -> Any:
    """``tx``, keeping a weak reference to every array of its states and updates."""

    def init(params):
        state = tx.init(params)
        seen.extend(weakref.ref(x) for x in jax.tree_util.tree_leaves(state))
        return state

    def update(updates, state, params=None):
        new, state = tx.update(updates, state, params)
        seen.extend(weakref.ref(x) for x in jax.tree_util.tree_leaves((new, state)))
        return new, state

    return optax.GradientTransformation(init, update)


def test_verify_keeps_no_state_nor_update():
    seen: list[Any] = []
    tx = optax.adamw(LR, weight_decay=WD, mask=POLICY.mask)
    POLICY.verify(recording(POLICY.wrap(tx), seen), EQX_PARAMS)
    verify_error(POLICY, recording(tx, seen), EQX_PARAMS)
    gc.collect()
    assert len(seen) > 20
    assert [ref for ref in seen if ref() is not None] == []


# What cannot be probed.


def test_a_mask_built_from_other_params_names_the_cause_and_chains_optax_s_error():
    other = eqx.filter(eqx.nn.MLP(4, 3, 8, 2, key=jax.random.key(1)), eqx.is_array)
    tx = POLICY.wrap(optax.adamw(LR, weight_decay=WD, mask=dm.Policy(dm.decay()).mask(other)))
    err = verify_error(POLICY, tx, EQX_PARAMS)
    cause = err.__cause__
    # jax's own words for the mismatch differ between releases; the message quotes them.
    assert type(cause) is ValueError and "MLP" in str(cause)
    assert str(err) == cannot_run(cause)
    assert err.mismatches == ()


def test_a_linen_mask_of_other_params():
    other = {"Dense_0": {"kernel": jnp.ones((2, 2)), "bias": jnp.zeros(2)}}
    mask = dm.Policy(dm.decay()).mask(other, framework="linen")
    tx = POLICY.wrap(optax.adamw(LR, weight_decay=WD, mask=mask))
    err = verify_error(POLICY, tx, LINEN_PARAMS)
    assert type(err.__cause__) is ValueError
    assert str(err) == cannot_run(err.__cause__)


def test_an_error_of_decaymask_inside_tx_keeps_its_own_fix():
    tx = optax.inject_hyperparams(optax.adamw)(LR, weight_decay=WD, mask=POLICY.mask)
    err = verify_error(POLICY, POLICY.wrap(tx), EQX_PARAMS)
    assert type(err.__cause__) is TypeError
    assert str(err) == cannot_run(err.__cause__, hint=False)
    assert str(err) == (
        "policy.verify: tx cannot be run on params: TypeError: mask was called with a "
        "scalar int32, not params: this is the step count optax.inject_hyperparams hands a "
        "callable hyperparameter, which it treats as a schedule. Fix: mark the mask static, "
        "optax.inject_hyperparams(optax.adamw, static_args=('mask',))(..., mask=policy.mask)."
    )


def test_updates_of_another_structure_or_shape():
    listed = optax.GradientTransformation(
        lambda params: optax.EmptyState(),
        lambda updates, state, params=None: (jax.tree_util.tree_leaves(updates), state),
    )
    err = verify_error(POLICY, listed, EQX_PARAMS)
    assert str(err) == (
        "policy.verify: tx.update returned updates of another structure than the params it "
        "was handed: a list of 13 leaves, for params of type EqxNet (13 leaves). An optax "
        "transformation returns its updates in the params' structure."
    )
    assert isinstance(err.__cause__, ValueError)
    summed = optax.GradientTransformation(
        lambda params: optax.EmptyState(),
        lambda updates, state, params=None: (jax.tree.map(jnp.sum, updates), state),
    )
    assert str(verify_error(POLICY, summed, EQX_PARAMS)) == (
        "policy.verify: tx.update returned an update of shape () for embed/weight, of shape "
        "(10, 4). An optax transformation returns one update of each param's shape."
    )


@pytest.mark.parametrize("kind", ["multi_steps", "warmup_from_zero"])
def test_a_transformation_that_moves_nothing_at_its_first_step(kind):
    inner = POLICY.wrap(optax.adamw(
        optax.linear_schedule(0.0, LR, 10) if kind == "warmup_from_zero" else LR,
        weight_decay=WD, mask=POLICY.mask,
    ))
    tx = optax.MultiSteps(inner, every_k_schedule=2) if kind == "multi_steps" else inner
    err = verify_error(POLICY, tx, EQX_PARAMS)
    assert str(err) == (
        "policy.verify: tx moved no leaf, with zero gradients, gradients of ones or random "
        "signs, so there is nothing to compare: its learning rate is 0 at the first step (a "
        "warmup from 0?), or it accumulates gradients before its first update "
        "(optax.MultiSteps). Verify the same optimizer with a constant learning rate, or "
        "the transformation inside optax.MultiSteps."
    )
    assert err.mismatches == ()


def test_a_model_with_other_leaves_than_arrays():
    mlp = eqx.nn.MLP(3, 2, 4, 1, key=jax.random.key(0))
    err = verify_error(dm.presets.standard(), optax.adamw(LR), mlp)
    assert str(err) == (
        "policy.verify: params hold 6 leaves, of which 4 are arrays; pass what tx.init is "
        "handed, the arrays alone (e.g. eqx.filter(model, eqx.is_array), or "
        "nnx.state(model, nnx.Param))."
    )


@pytest.mark.parametrize(
    ("tx", "got"),
    [
        (optax.adamw, "the function optax._src.alias.adamw. It is callable: if it makes a "
         "transformation (optax.adamw itself, or an inject_hyperparams factory), call it "
         "with its hyperparameters first."),
        (None, "None (NoneType)."),
        (optax.GradientTransformation, "the class optax._src.base.GradientTransformation. "
         "It is a class: pass an instance."),
    ],
    ids=["factory", "none", "class"],
)
def test_a_tx_that_is_not_a_transformation(tx, got):
    with pytest.raises(TypeError) as info:
        POLICY.verify(tx, EQX_PARAMS)
    assert str(info.value) == (
        "policy.verify(tx): expected an optax.GradientTransformation (with init and "
        "update), e.g. optax.adamw(1e-3, weight_decay=0.05, mask=policy.mask); got " + got
    )


def test_verify_error_is_a_value_error_and_a_mismatch_reads_as_a_line():
    assert issubclass(dm.VerifyError, ValueError)
    mismatch = dm.Mismatch("head/w", "multiplier", "the update times 2", "the update times 1")
    assert str(mismatch) == (
        "head/w: multiplier: expected the update times 2, got the update times 1"
    )


class _PartBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        return x + nn.Dense(4)(nn.LayerNorm()(x))


class _PartNet(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(5, 4)(tokens)
        for i in range(3):
            x = _PartBlock(name=f"blocks_{i}")(x)
        return nn.Dense(3, name="head")(x)


def test_a_trained_part_is_verified_against_the_whole_model():
    params = _PartNet().init(jax.random.key(0), jnp.array([1]))["params"]
    policy = dm.Policy(*dm.presets.standard().rules, dm.freeze(path="blocks_1/*"), dm.layer_decay(0.5))
    trainable, _ = policy.split(params)
    tx = policy.wrap(optax.adamw(1e-2, weight_decay=0.1, mask=policy.mask), full=params)
    # The part alone would number two blocks, not three: refused with the fix.
    with pytest.raises(dm.VerifyError) as info:
        policy.verify(tx, trainable)
    assert str(info.value) == (
        "policy.verify: it was handed params that no freeze rule of the policy matches: "
        "they look like the trainable part alone (eqx.partition, policy.split, "
        "trainable_filter), and layer decay numbers the blocks of the whole model: ids "
        "worked out on a part would shift. Fix: give the whole model or params, "
        "policy.verify(tx, params, full=model) (full=params where these are the whole model)."
    )
    policy.verify(tx, trainable, full=params)
    # A wrap whose multipliers were worked out on the part is caught against the whole.
    shifted = policy.wrap(optax.adamw(1e-2, weight_decay=0.1, mask=policy.mask), full=trainable)
    with pytest.raises(dm.VerifyError) as info:
        policy.verify(shifted, trainable, full=params)
    assert {m.path for m in info.value.mismatches} >= {"blocks_0/Dense_0/kernel", "Embed_0/embedding"}
