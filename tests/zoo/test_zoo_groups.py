"""Layer-wise learning-rate decay and freezing on models nobody here wrote.

Each model's expected layer ids, multipliers and trainable leaves come from
``groups_reference``: the model's paths renamed as its checkpoint converters do, then the
fine-tuning recipe's own rule (MAE, BEiT, DINOv3, ELECTRA; MAE's linear probe and partial
fine-tuning, BitFit, MoCo v3, big_vision's schedule). decaymask's answers (``explain``
rows, ``lr_scales``, ``trainable``, a ``wrap``-ped optax step) are compared leaf by leaf;
a failure lists every leaf that differs, with the recipe's name for it, the reference's
value and decaymask's explain row.

The scanned model is a ViT written here with big_vision's module structure
(``big_vision/models/vit.py``: ``embedding``, ``pos_embedding``, ``cls``,
``Transformer/encoderblock_<i>`` or, with ``scan=True``, one ``Transformer/encoderblock``
under ``nn.scan(nn.remat(Encoder1DBlock), variable_axes={"params": 0},
split_rngs={"params": True}, length=depth)``, ``Transformer/encoder_norm``, ``MAPHead_0``
and ``head``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import decaymask as dm

from . import compare
from . import groups_reference as gref
from . import models
from . import reference as ref
from .models import Built

RATE = 0.75  # MAE's default layer_decay


@pytest.fixture(autouse=True)
def _policy_warnings_ignored():
    # Values are compared here (MAPHead's probe and big_vision's bare `cls` warn as
    # arrays of no known layer); which models warn is test_zoo's concern.
    with compare.policy_warnings_ignored():
        yield


# --- a ViT with big_vision's structure -------------------------------------------------------


class _MlpBlock(nn.Module):
    mlp_dim: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        x = nn.gelu(nn.Dense(self.mlp_dim)(x))
        return nn.Dense(width)(x)


class _Encoder1DBlock(nn.Module):
    mlp_dim: int
    num_heads: int

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> tuple[jax.Array, None]:
        y = nn.LayerNorm()(x)
        attention = nn.MultiHeadDotProductAttention(
            num_heads=self.num_heads, deterministic=deterministic
        )
        y = attention(y, y)
        x = x + y
        y = nn.LayerNorm()(x)
        x = x + _MlpBlock(self.mlp_dim, name="MlpBlock_0")(y)
        return x, None  # the carry and the (empty) per-layer output nn.scan stacks


class _Encoder(nn.Module):
    depth: int
    mlp_dim: int
    num_heads: int
    scan: bool

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        if self.scan:
            block = nn.remat(_Encoder1DBlock, prevent_cse=False, static_argnums=(2,))
            x, _ = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=nn.broadcast,
                length=self.depth,
            )(name="encoderblock", mlp_dim=self.mlp_dim, num_heads=self.num_heads)(x, deterministic)
        else:
            for i in range(self.depth):
                x, _ = _Encoder1DBlock(
                    name=f"encoderblock_{i}", mlp_dim=self.mlp_dim, num_heads=self.num_heads
                )(x, deterministic)
        return nn.LayerNorm(name="encoder_norm")(x)


class MAPHead(nn.Module):  # not underscored: Linen names it MAPHead_0, as big_vision's
    mlp_dim: int
    num_heads: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n, _, width = x.shape
        probe = self.param("probe", nn.initializers.xavier_uniform(), (1, 1, width), x.dtype)
        x = nn.MultiHeadDotProductAttention(num_heads=self.num_heads)(jnp.tile(probe, [n, 1, 1]), x)
        y = nn.LayerNorm()(x)
        x = x + _MlpBlock(self.mlp_dim, name="MlpBlock_0")(y)
        return x[:, 0]


class _BigVisionViT(nn.Module):
    depth: int
    pool: str  # "map" (SigLIP's MAP head) or "tok" (a class token)
    scan: bool
    width: int = 8
    mlp_dim: int = 16
    num_heads: int = 2
    patch: int = 4
    num_classes: int = 3

    @nn.compact
    def __call__(self, image: jax.Array, *, train: bool = False) -> jax.Array:
        p = (self.patch, self.patch)
        x = nn.Conv(self.width, p, strides=p, padding="VALID", name="embedding")(image)
        n, h, w, c = x.shape
        x = x.reshape(n, h * w, c)
        x = x + self.param("pos_embedding", nn.initializers.normal(0.02), (1, h * w, c), x.dtype)
        if self.pool == "tok":
            cls = self.param("cls", nn.initializers.zeros, (1, 1, c), x.dtype)
            x = jnp.concatenate([jnp.tile(cls, [n, 1, 1]), x], axis=1)
        x = _Encoder(self.depth, self.mlp_dim, self.num_heads, self.scan, name="Transformer")(
            x, not train
        )
        x = MAPHead(self.mlp_dim, self.num_heads)(x) if self.pool == "map" else x[:, 0]
        return nn.Dense(self.num_classes, name="head")(x)


BV_DEPTH = 3


def _big_vision(pool: str, scan: bool) -> Built:
    module = _BigVisionViT(BV_DEPTH, pool, scan)
    image = jnp.zeros((1, 8, 8, 3))
    variables = jax.eval_shape(lambda: module.init(jax.random.key(0), image))
    return Built(f"big_vision_{pool}{'_scan' if scan else ''}", "linen",
                 dict(variables["params"]), module, (image,), {})


# --- the cases -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    build: Callable[[], Built]
    ladder: gref.Ladder
    freezings: tuple[gref.Freezing, ...] = ()
    spellings: dict[str, tuple[Any, ...]] = dataclasses.field(default_factory=dict)
    """decaymask's rules for each freezing recipe, by the recipe's name."""
    modes: tuple[str, ...] = ("names", "traced")


_BV_PROBE = (dm.freeze(), dm.unfreeze(path="head/*"))
_BV_PATCH = (dm.freeze(path="embedding/*"),)

CASES: dict[str, Case] = {
    "bert": Case(
        models.bert_classifier,
        gref.bert_ladder(2),
        tuple(gref.bert_freezings(2)),
        {
            "bitfit": (dm.freeze(), dm.unfreeze(param="bias"), dm.unfreeze(path="classifier/*")),
            "embeddings_and_first_layer": (
                dm.freeze(path="bert/embeddings/*"),
                dm.freeze(path="bert/encoder/layer/0/*"),
            ),
        },
    ),
    "vit": Case(
        lambda: models.build("vit"),
        gref.vit_ladder(2),
        tuple(gref.vit_freezings(2)),
        {
            "linear_probe": (dm.freeze(), dm.unfreeze(path="classifier/*")),
            "last_block": (
                dm.freeze(path="vit/embeddings/*"),
                dm.freeze(path="vit/encoder/layer/0/*"),
            ),
        },
    ),
    "beit_shared_bias": Case(models.beit_shared_bias, gref.beit_shared_bias_ladder(2)),
    "equimo_vit": Case(
        lambda: models.build("equimo_vit"),
        gref.equimo_vit_ladder([2]),
        tuple(gref.equimo_vit_freezings([2])),
        {
            "frozen_patch_projection": (dm.freeze(path="patch_embed/*"),),
            "linear_probe": (dm.freeze(), dm.unfreeze(path="head/*")),
        },
        ("equinox",),
    ),
    "big_vision": Case(
        lambda: _big_vision("map", scan=False),
        gref.big_vision_ladder(BV_DEPTH, scan=False, pool="map"),
        tuple(gref.big_vision_freezings(BV_DEPTH, scan=False, pool="map")),
        {"linear_probe": _BV_PROBE, "frozen_patch_projection": _BV_PATCH},
    ),
    # By names alone the scan's layer axis shows in its Dense biases: see the tests
    # further down.
    "big_vision_scan": Case(
        lambda: _big_vision("map", scan=True),
        gref.big_vision_ladder(BV_DEPTH, scan=True, pool="map"),
        tuple(gref.big_vision_freezings(BV_DEPTH, scan=True, pool="map")),
        {"linear_probe": _BV_PROBE, "frozen_patch_projection": _BV_PATCH},
        ("names", "traced"),
    ),
    "big_vision_tok": Case(
        lambda: _big_vision("tok", scan=False),
        gref.big_vision_ladder(BV_DEPTH, scan=False, pool="tok"),
    ),
    "equimo_vit_chunked": Case(
        models.equimo_vit_chunked, gref.equimo_vit_ladder([2, 2]), modes=("equinox",)
    ),
    "equimo_vit_uneven_chunks": Case(
        lambda: models.equimo_vit_chunked((1, 2)), gref.equimo_vit_ladder([1, 2]),
        modes=("equinox",),
    ),
}

KNOWN_DEFECTS: dict[str, str] = {}
"""Models decaymask is known to get wrong, with why: each case is a strict xfail."""

NESTED = {"equimo_vit_chunked", "equimo_vit_uneven_chunks"}
"""Stacks inside stacks (equimo's chunks of blocks): the blocks are found only when
named (the recipe's choice of level), and finding them alone is an error."""


def _params(names: list[str]) -> list[Any]:
    out = []
    for name in names:
        for mode in CASES[name].modes:
            marks = ()
            if name in KNOWN_DEFECTS:
                marks = (pytest.mark.xfail(strict=True, reason=KNOWN_DEFECTS[name]),)
            out.append(pytest.param(name, mode, id=f"{name}-{mode}", marks=marks))
    return out


LADDER_CASES = _params([name for name in CASES if name not in NESTED])
FREEZE_CASES = [
    pytest.param(name, freezing.name, mode, id=f"{name}-{freezing.name}-{mode}")
    for name, case in CASES.items()
    for freezing in case.freezings
    for mode in case.modes
]


@functools.cache
def built(name: str) -> Built:
    with jax.numpy_rank_promotion("allow"):
        return CASES[name].build()


def _options(b: Built, mode: str) -> dict[str, Any]:
    if mode == "traced":
        return {"module": b.module, "args": b.args, "kwargs": b.kwargs or {}}
    return {}


def run(policy: dm.Policy, name: str, mode: str, method: str) -> Any:
    """``policy.<method>(tree)`` on the case's model, traced with its module in the
    traced mode."""
    b = built(name)
    return getattr(policy, method)(b.tree, **_options(b, mode))


def by_path(out: Any, tree: Any) -> dict[str, Any]:
    """An output's values at the tree's array leaves, by path (an optax ``MaskedNode``,
    which has no leaves of its own, included)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(
        out, is_leaf=lambda x: isinstance(x, optax.MaskedNode)
    )
    values = {ref.path_text(p): v for p, v in flat}
    return {path: values.get(path, "missing") for path in ref.array_leaves(tree)}


def rows(policy: dm.Policy, name: str, mode: str) -> dict[str, Any]:
    return {row.path: row for row in run(policy, name, mode, "explain")}


@functools.cache
def ladder_rows(name: str, mode: str) -> dict[str, Any]:
    """The explain rows of ``layer_decay(RATE)`` alone, computed once per run (a traced
    explain traces ``module.init``)."""
    return rows(dm.Policy(dm.layer_decay(RATE)), name, mode)


# --- reporting -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Mismatch:
    path: str
    name: Any  # the recipe's name of the leaf (a tuple for a stacked leaf)
    expected: Any
    got: Any
    row: Any  # decaymask's explain row

    def __str__(self) -> str:
        said = "-"
        if self.row is not None:
            r = self.row
            said = (
                f"layer_id={r.layer_id} lr_scale={r.lr_scale} frozen={r.frozen} "
                f"layer={r.layer} class={r.layer_type} role={r.role}"
            )
            if r.freeze_rule is not None:
                said += f" freeze by {r.freeze_rule!r}"
        name = self.name if isinstance(self.name, str) else f"{self.name[0]}, ..."
        return (
            f"  {self.path} (recipe's name {name}): reference {self.expected}; "
            f"decaymask {self.got}; explain: {said}"
        )


def report(title: str, name: str, mode: str, source: str, mismatches: list[Mismatch]) -> str:
    return (
        f"{title} on {name} ({mode}) differs from {source} at {len(mismatches)} leaves:\n"
        + "\n".join(str(m) for m in mismatches)
    )


def _fail(title: str, name: str, mode: str, source: str, mismatches: list[Mismatch]) -> None:
    if mismatches:
        pytest.fail(report(title, name, mode, source, mismatches), pytrace=False)


def _source(ladder: gref.Ladder) -> str:
    return f"{ladder.recipe} on names renamed by {ladder.rename.source}"


def _scale_matches(got: Any, want: float | tuple[float, ...], ndim: int) -> bool:
    """A float for a leaf, a float32 array of shape (n, 1, ..., 1) for a stacked one."""
    if isinstance(want, tuple):
        return (
            isinstance(got, np.ndarray)
            and got.dtype == np.float32
            and got.shape == (len(want),) + (1,) * (ndim - 1)
            and np.array_equal(got.ravel(), np.asarray(want, dtype=np.float32))
        )
    return type(got) is float and got == want


# --- layer ids and multipliers ---------------------------------------------------------------


@pytest.mark.parametrize(("name", "mode"), LADDER_CASES)
def test_layer_ids_follow_the_recipe(name, mode):
    """``dm.layer_decay`` gives every leaf the id the recipe's rule gives its name, but
    where ``gref.DIFFERENCES`` documents why decaymask's ladder differs."""
    case = CASES[name]
    tree = built(name).tree
    names = case.ladder.names(tree)
    want = case.ladder.ids(tree)
    got = ladder_rows(name, mode)
    wrong = [Mismatch(p, "-", "no leaf", got[p].layer_id, got[p]) for p in got if p not in want]
    for p, i in want.items():
        row = got.get(p)
        if row is None:
            wrong.append(Mismatch(p, names[p], i, "no row", None))
        elif row.layer_id != i and not gref.documented(
            names[p], i, row.layer_id, case.ladder.blocks
        ):
            wrong.append(Mismatch(p, names[p], i, row.layer_id, row))
    _fail("layer ids of layer_decay", name, mode, _source(case.ladder), wrong)


@pytest.mark.parametrize(("name", "mode"), LADDER_CASES)
def test_lr_scales_follow_the_recipe(name, mode):
    """``policy.lr_scales`` and each explain row's ``lr_scale`` are ``rate ** (n + 1 -
    id)``: a float, or for a leaf stacked along the scan's axis a float32 array of shape
    (n, 1, ..., 1) (a tuple in the row)."""
    case = CASES[name]
    tree = built(name).tree
    leaves = ref.array_leaves(tree)
    names = case.ladder.names(tree)
    ids = case.ladder.ids(tree)
    want = case.ladder.scales(tree, RATE)
    policy = dm.Policy(dm.layer_decay(RATE))
    got = by_path(run(policy, name, mode, "lr_scales"), tree)
    explained = ladder_rows(name, mode)
    wrong = []
    for p, scale in want.items():
        row = explained[p]
        if _scale_matches(got[p], scale, len(leaves[p].shape)) and row.lr_scale == scale:
            continue
        if not gref.documented(names[p], ids[p], row.layer_id, case.ladder.blocks):
            wrong.append(Mismatch(p, names[p], scale, got[p], row))
    _fail("lr_scales of layer_decay", name, mode, _source(case.ladder), wrong)


# --- freezing --------------------------------------------------------------------------------


def _freezing(name: str, recipe: str) -> gref.Freezing:
    (found,) = [f for f in CASES[name].freezings if f.name == recipe]
    return found


def test_every_freezing_recipe_has_a_spelling():
    for name, case in CASES.items():
        assert {f.name for f in case.freezings} == set(case.spellings), name


@pytest.mark.parametrize(("name", "recipe", "mode"), FREEZE_CASES)
def test_freezing_follows_the_recipe(name, recipe, mode):
    """The recipe's freeze rules with ``layer_decay``: ``trainable`` is the recipe's
    trainable set; every leaf keeps the id the unfrozen model's recipe gives it (frozen
    leaves and frozen blocks shift no id and do not change n); ``lr_scales`` and the
    explain rows say 0 where frozen and ``rate ** (n + 1 - id)`` elsewhere."""
    case = CASES[name]
    freezing = _freezing(name, recipe)
    tree = built(name).tree
    leaves = ref.array_leaves(tree)
    names = case.ladder.names(tree)
    trains = freezing.trainable(tree)
    assert any(trains.values()) and not all(trains.values()), "the recipe must freeze some leaves"
    ids = case.ladder.ids(tree)
    scales = case.ladder.scales(tree, RATE)
    policy = dm.Policy(*case.spellings[recipe], dm.layer_decay(RATE))
    source = f"{freezing.recipe} and {_source(case.ladder)}"
    explained = rows(policy, name, mode)

    trainable = by_path(run(policy, name, mode, "trainable"), tree)
    _fail(f"trainable of {recipe}", name, mode, source, [
        Mismatch(p, names[p], f"trained={trains[p]}", f"trained={trainable[p]}", explained.get(p))
        for p in leaves
        if trainable[p] is not trains[p] or explained[p].frozen is trains[p]
        or explained[p].trainable is not trains[p]
    ])
    _fail(f"layer ids with {recipe}", name, mode, source, [
        Mismatch(p, names[p], ids[p], explained[p].layer_id, explained[p])
        for p in leaves
        if explained[p].layer_id != ids[p]
    ])
    # A frozen leaf's multiplier is 0.0, a float even for a stacked leaf.
    expected = {p: scales[p] if trains[p] else 0.0 for p in leaves}
    got = by_path(run(policy, name, mode, "lr_scales"), tree)
    _fail(f"lr_scales with {recipe}", name, mode, source, [
        Mismatch(p, names[p], expected[p], got[p], explained[p])
        for p in leaves
        if not _scale_matches(got[p], expected[p], len(leaves[p].shape))
        or explained[p].lr_scale != expected[p]
    ])


def test_bert_embeddings_frozen_by_their_class():
    """``model.bert.embeddings`` spelled by its class (traced) freezes what the recipe
    freezes; the kind ``within="embedding"`` is not that recipe: it selects the three
    ``nn.Embed`` tables and leaves the embeddings' LayerNorm trained."""
    from transformers.models.bert.modeling_flax_bert import FlaxBertEmbeddings

    case = CASES["bert"]
    tree = built("bert").tree
    trains = _freezing("bert", "embeddings_and_first_layer").trainable(tree)
    first_layer = dm.freeze(path="bert/encoder/layer/0/*")
    by_class = dm.Policy(dm.freeze(within=FlaxBertEmbeddings), first_layer, dm.layer_decay(RATE))
    got = by_path(run(by_class, "bert", "traced", "trainable"), tree)
    assert got == trains
    by_kind = dm.Policy(dm.freeze(within="embedding"), first_layer, dm.layer_decay(RATE))
    got = by_path(run(by_kind, "bert", "traced", "trainable"), tree)
    assert sorted(p for p in got if got[p] is not trains[p]) == [
        "bert/embeddings/LayerNorm/bias", "bert/embeddings/LayerNorm/scale"
    ]
    assert {r.path: r.layer_id for r in run(by_class, "bert", "traced", "explain")} == (
        case.ladder.ids(tree)
    )


def _concrete(b: Built) -> Any:
    """The model's params as arrays of ones (Equinox: the model, arrays only)."""
    ones = jax.tree.map(
        lambda x: jnp.ones(x.shape, x.dtype) if isinstance(x, jax.ShapeDtypeStruct) else x, b.tree
    )
    if b.framework == "equinox":
        import equinox as eqx

        return eqx.filter(ones, eqx.is_array)
    return ones


WRAP_CASES = [
    pytest.param(name, recipe, id=f"{name}-{recipe}")
    for name, recipe in [
        ("vit", "last_block"),
        ("equimo_vit", "frozen_patch_projection"),
        ("big_vision_scan", "frozen_patch_projection"),
    ]
]


@pytest.mark.parametrize(("name", "recipe"), WRAP_CASES)
def test_wrapped_step_follows_the_recipe(name, recipe):
    """One real step of ``policy.wrap(optax.sgd(1, momentum=0.9))`` with gradients of
    ones: each trained leaf moves by exactly ``-rate ** (n + 1 - id)`` (per layer along a
    scan's axis), each frozen leaf not at all and keeps no momentum (a ``MaskedNode``)."""
    case = CASES[name]
    b = built(name)
    mode = case.modes[0]
    leaves = ref.array_leaves(b.tree)
    names = case.ladder.names(b.tree)
    trains = _freezing(name, recipe).trainable(b.tree)
    scales = case.ladder.scales(b.tree, RATE)
    policy = dm.Policy(*case.spellings[recipe], dm.layer_decay(RATE))
    params = _concrete(b)
    tx = policy.wrap(optax.sgd(1.0, momentum=0.9), **_options(b, mode))
    state = jax.jit(tx.init)(params)
    updates, state = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, params), state, params)
    moved = by_path(updates, b.tree)
    trace = by_path(optax.tree_utils.tree_get(state, "trace"), b.tree)
    wrong = []
    for p, leaf in leaves.items():
        s = scales[p] if trains[p] else 0.0
        want = -np.broadcast_to(
            np.asarray(s, np.float32).reshape((-1,) + (1,) * (len(leaf.shape) - 1))
            if isinstance(s, tuple) else np.float32(s),
            leaf.shape,
        )
        got = np.asarray(moved[p])
        kept = not isinstance(trace[p], optax.MaskedNode)
        if got.shape != leaf.shape or not np.array_equal(got, want) or kept is not trains[p]:
            shown = np.unique(got).tolist()
            wrong.append(Mismatch(p, names[p], f"update {np.unique(want).tolist()}, momentum "
                                  f"{'kept' if trains[p] else 'none'}",
                                  f"update {shown}, momentum {'kept' if kept else 'none'}", None))
    if wrong:
        explained = rows(policy, name, mode)
        wrong = [dataclasses.replace(m, row=explained.get(m.path)) for m in wrong]
    _fail(f"a wrap-ped sgd step with {recipe}", name, mode, _source(case.ladder), wrong)


# --- scanned and unrolled --------------------------------------------------------------------


def _unrolled_path(path: str, layer: int) -> str:
    return path.replace("Transformer/encoderblock/", f"Transformer/encoderblock_{layer}/", 1)


@pytest.mark.parametrize("unrolled_mode", ["names", "traced"])
def test_scanned_leaves_get_the_unrolled_multipliers(unrolled_mode):
    """The scanned model's stacked leaves get, along their layer axis, exactly the
    multipliers of the unrolled model's blocks (by names and traced), with a freeze rule
    too; the unstacked leaves the same multipliers as in the unrolled model."""
    scanned, unrolled = built("big_vision_scan"), built("big_vision")
    for rules in [(), _BV_PATCH]:
        policy = dm.Policy(*rules, dm.layer_decay(RATE))
        got = by_path(run(policy, "big_vision_scan", "traced", "lr_scales"), scanned.tree)
        flat = by_path(run(policy, "big_vision", unrolled_mode, "lr_scales"), unrolled.tree)
        stacked = [p for p in got if p.startswith("Transformer/encoderblock/")]
        assert len(stacked) == len([p for p in flat if p.startswith("Transformer/encoderblock_0/")])
        wrong = []
        for p, value in got.items():
            if p in stacked:
                want = tuple(flat[_unrolled_path(p, k)] for k in range(BV_DEPTH))
                ndim = len(ref.array_leaves(scanned.tree)[p].shape)
                ok = _scale_matches(value, want, ndim)
            else:
                want, ok = flat[p], value == flat[p] and type(value) is float
            if not ok:
                wrong.append(f"  {p}: scanned {value}, unrolled {want}")
        assert not wrong, f"with {rules}:\n" + "\n".join(wrong)


def test_scanned_step_moves_each_layer_as_unrolled():
    """One wrapped sgd step moves layer i of each scanned leaf exactly as the unrolled
    model's block i moves."""
    scanned, unrolled = built("big_vision_scan"), built("big_vision")
    policy = dm.Policy(dm.layer_decay(RATE))

    def step(b: Built, mode: str) -> dict[str, Any]:
        params = _concrete(b)
        tx = policy.wrap(optax.sgd(1.0), **_options(b, mode))
        state = jax.jit(tx.init)(params)
        updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, params), state, params)
        return by_path(updates, b.tree)

    got, flat = step(scanned, "traced"), step(unrolled, "names")
    for p, value in got.items():
        if p.startswith("Transformer/encoderblock/"):
            for k in range(BV_DEPTH):
                np.testing.assert_array_equal(value[k], flat[_unrolled_path(p, k)], err_msg=p)
        else:
            np.testing.assert_array_equal(value, flat[p], err_msg=p)
    assert float(got["Transformer/encoderblock/LayerNorm_0/scale"][0, 0]) == -(RATE ** BV_DEPTH)


def test_scanned_by_names_is_right_or_a_clear_error():
    """By names alone (no trace) the scan's layer axis is invisible: the auto-found ladder
    must be the recipe's or a ValueError that says how to name the blocks."""
    case = CASES["big_vision_scan"]
    tree = built("big_vision_scan").tree
    policy = dm.Policy(dm.layer_decay(RATE))
    try:
        got = by_path(policy.lr_scales(tree), tree)
    except ValueError as err:
        assert "blocks=" in str(err), err
        return
    want = case.ladder.scales(tree, RATE)
    leaves = ref.array_leaves(tree)
    assert all(_scale_matches(got[p], want[p], len(leaves[p].shape)) for p in want)


def test_scanned_by_names_with_blocks_is_right_or_a_clear_error():
    case = CASES["big_vision_scan"]
    tree = built("big_vision_scan").tree
    leaves = ref.array_leaves(tree)
    policy = dm.Policy(dm.layer_decay(RATE, blocks="Transformer/encoderblock"))
    try:
        got = by_path(policy.lr_scales(tree), tree)
    except ValueError as err:
        assert "encoderblock" in str(err), err
        return
    want = case.ladder.scales(tree, RATE)
    explained = {r.path: r for r in policy.explain(tree)}
    wrong = [
        Mismatch(p, case.ladder.names(tree)[p], want[p], got[p], explained[p])
        for p in want
        if not _scale_matches(got[p], want[p], len(leaves[p].shape))
    ]
    _fail("lr_scales of layer_decay(blocks='Transformer/encoderblock')", "big_vision_scan",
          "names", _source(case.ladder), wrong)


@pytest.mark.parametrize("name", sorted(NESTED))
def test_chunked_blocks_found_alone_are_an_error_naming_both_levels(name):
    tree = built(name).tree
    with pytest.raises(ValueError) as info:
        dm.Policy(dm.layer_decay(RATE)).explain(tree)
    assert str(info.value) == (
        f"layer_decay({RATE!r}): this tree has stacks inside stacks (blocks/* holds "
        f"blocks/*/blocks/*), and which level holds the layers is the recipe's to say, "
        f"not decaymask's to guess. Fix: name the blocks, e.g. dm.layer_decay({RATE!r}, "
        f"blocks='blocks/*/blocks/*') for the inner level, or blocks='blocks/*' for the "
        f"outer."
    )


@pytest.mark.parametrize("name", sorted(NESTED))
def test_chunked_blocks_named_by_glob_follow_the_recipe(name):
    """The fix the error gives: the blocks named by a glob over both levels, each
    chunk's blocks in order."""
    case = CASES[name]
    tree = built(name).tree
    want = case.ladder.ids(tree)
    policy = dm.Policy(dm.layer_decay(RATE, blocks="blocks/*/blocks/*"))
    got = {r.path: r for r in policy.explain(tree)}
    names = case.ladder.names(tree)
    _fail("layer ids of layer_decay(blocks='blocks/*/blocks/*')", name, "equinox",
          _source(case.ladder),
          [Mismatch(p, names[p], want[p], got[p].layer_id, got[p]) for p in want
           if got[p].layer_id != want[p]])


# --- the references themselves ---------------------------------------------------------------


def test_documented_differences_occur():
    """Each documented difference shows on some model: a stale one is an error."""
    seen = set()
    for name, case in CASES.items():
        if name in KNOWN_DEFECTS or name in NESTED:
            continue
        tree = built(name).tree
        names, want = case.ladder.names(tree), case.ladder.ids(tree)
        for mode in case.modes:
            for p, row in ladder_rows(name, mode).items():
                if row.layer_id != want[p]:
                    reason = gref.documented(names[p], want[p], row.layer_id, case.ladder.blocks)
                    if reason is not None:
                        seen.add(reason)
    assert seen == {reason for reason, _ in gref.DIFFERENCES}


def test_the_recipes_read_the_names_they_should():
    """Spot checks of each rename and rule against the originals' own examples."""
    assert gref.mae_layer_id("cls_token", 13) == 0
    assert gref.mae_layer_id("patch_embed.proj.weight", 13) == 0
    assert gref.mae_layer_id("blocks.11.mlp.fc2.bias", 13) == 12
    assert gref.mae_layer_id("fc_norm.weight", 13) == 13
    assert gref.beit_layer_id("rel_pos_bias.relative_position_bias_table", 14) == 13
    assert gref.beit_layer_id("mask_token", 14) == 0
    # DINOv3 reads the index after `.blocks.`; with chunks, the third field.
    assert gref.dinov3_layer_id("backbone.blocks.3.attn.qkv.weight", 12, False) == 4
    assert gref.dinov3_layer_id("blocks.1.7.attn.qkv.weight", 12, True) == 8
    assert gref.dinov3_layer_id("storage_tokens", 12, True) == 0
    assert gref.electra_depth("electra/encoder/layer_11/output/dense/kernel", 12) == 12
    assert gref.electra_depth("electra/embeddings/word_embeddings", 12) == 0
    vit = gref.vit_ladder(2).names(built("vit").tree)
    assert vit["vit/embeddings/patch_embeddings/projection/kernel"] == "patch_embed.proj.weight"
    assert vit["vit/encoder/layer/1/layernorm_before/scale"] == "blocks.1.layernorm_before.weight"
    assert vit["classifier/kernel"] == "head.weight"
    chunked = gref.equimo_vit_ladder([2, 2]).names(built("equimo_vit_chunked").tree)
    assert chunked["blocks/1/blocks/0/attn/qkv/weight"] == "blocks.1.2.attn.qkv.weight"
    assert chunked["reg_tokens"] == "storage_tokens"
    scanned = gref.big_vision_ladder(BV_DEPTH, scan=True, pool="map")
    scan = scanned.names(built("big_vision_scan").tree)
    assert scan["Transformer/encoderblock/LayerNorm_0/scale"] == (
        "blocks.0.LayerNorm_0.weight", "blocks.1.LayerNorm_0.weight", "blocks.2.LayerNorm_0.weight"
    )
    assert scan["MAPHead_0/probe"] == "attn_pool.latent"


def test_a_rename_must_fit_its_model():
    """A rename that misses a leaf, or keeps a rule no leaf uses, is an error."""
    rename = gref.Rename("test", ((r"vit/(.+)", r"\1"), (r"nothing", "x")))
    with pytest.raises(ref.ReferenceError) as err:
        rename.names(built("vit").tree)
    text = str(err.value)
    assert "classifier/kernel: no rename rule covers it" in text
    assert "rename rule covers no leaf: 'nothing'" in text


def test_the_comparison_can_fail():
    """A recipe that put the final norm in the last block differs from decaymask exactly
    there, and the report names each such leaf with both ids and the explain row."""
    good = gref.vit_ladder(2)
    rules = tuple((p, "blocks/1/norm/\\1") if p.startswith("vit/layernorm") else (p, r)
                  for p, r in good.rename.rules)
    wrong = dataclasses.replace(good, rename=dataclasses.replace(good.rename, rules=rules))
    tree = built("vit").tree
    want, names = wrong.ids(tree), wrong.names(tree)
    got = ladder_rows("vit", "names")
    mismatches = [Mismatch(p, names[p], want[p], got[p].layer_id, got[p])
                  for p in want if got[p].layer_id != want[p]]
    assert [m.path for m in mismatches] == ["vit/layernorm/bias", "vit/layernorm/scale"]
    text = report("layer ids", "vit", "names", _source(wrong), mismatches)
    assert (
        "  vit/layernorm/bias (recipe's name blocks.1.norm.bias): reference 2; decaymask 3; "
        "explain: layer_id=3 lr_scale=1.0 frozen=False layer=layer_norm class=None role=bias"
    ) in text
