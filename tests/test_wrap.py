"""``policy.wrap`` in real training steps, and freezing in each framework's own idiom.

Every wrapped step runs beside the plain transformation on the same params and
gradients (the frozen gradients zeroed for the plain one, as if they were not there):
a frozen leaf gets exactly a zero update and no state, every other update is the plain
update times the leaf's multiplier, step after step.
"""

from __future__ import annotations

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

STANDARD = dm.presets.standard().rules
STEPS = 3


# Paths, flattening and the side-by-side run.


def slash(path: tuple[Any, ...]) -> str:
    """A jax key path as ``blocks/0/lin/weight``."""
    parts = []
    for key in path:
        for attr in ("name", "key", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def is_masked(x: Any) -> bool:
    return isinstance(x, optax.MaskedNode)


def flat(tree: Any) -> dict[str, Any]:
    """Every leaf of ``tree`` by its slash path, ``MaskedNode``s included; NNX's
    trailing ``value`` key is dropped."""
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_masked)[0]
    out = {}
    for path, leaf in leaves:
        key = slash(path)
        out[key.removesuffix("/value")] = leaf
    return out


def multipliers(table: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """Each param's multiplier: the value of the first prefix of ``table`` its path
    starts with; a tuple (one per layer) becomes a float32 array of shape
    ``(n, 1, ..., 1)``."""
    out = {}
    for path, leaf in params.items():
        for prefix, value in table.items():
            if path == prefix or path.startswith(prefix + "/"):
                if isinstance(value, tuple):
                    shape = (len(value),) + (1,) * (leaf.ndim - 1)
                    value = np.asarray(value, np.float32).reshape(shape)
                out[path] = value
                break
        else:
            raise AssertionError(f"no multiplier in the table for {path}")
    return out


def assert_scales(actual: Any, expected: dict[str, Any]) -> None:
    """``policy.lr_scales`` gave exactly ``expected``: floats, and float32 arrays of the
    same shape and values."""
    got = flat(actual)
    assert got.keys() == expected.keys(), set(got) ^ set(expected)
    for path, want in expected.items():
        if isinstance(want, np.ndarray):
            assert isinstance(got[path], np.ndarray) and got[path].dtype == np.float32, path
            assert got[path].shape == want.shape, (path, got[path].shape)
            np.testing.assert_array_equal(got[path], want, err_msg=path)
        else:
            assert type(got[path]) is float and got[path] == want, (path, got[path], want)


def zero_where_frozen(grads: Any, frozen: set[str]) -> Any:
    return jax.tree_util.tree_map_with_path(
        lambda path, g: np.zeros_like(g) if slash(path) in frozen else g, grads
    )


def grads_like(params: Any, step: int, scale: float = 1.0) -> Any:
    """Gradients of every shape and dtype of ``params``, different at every step (numpy
    arrays: nothing to compile)."""
    rng = np.random.default_rng(step)
    return jax.tree.map(
        lambda x: (scale * rng.standard_normal(x.shape)).astype(x.dtype), params
    )


def assert_scaled(updates: Any, plain: Any, expected: dict[str, Any], dtypes: dict[str, Any]) -> None:
    """Frozen (multiplier 0) updates are exactly zero; the others exactly the plain
    update times the multiplier, in the param's dtype."""
    got, ref = flat(updates), flat(plain)
    assert set(got) == set(expected), set(got) ^ set(expected)
    wrong = []
    for path, scale in expected.items():
        u = np.asarray(got[path])
        if u.dtype != dtypes[path]:
            wrong.append(f"{path}: dtype {u.dtype}, expected {dtypes[path]}")
            continue
        if isinstance(scale, float) and scale == 0.0:
            want = np.zeros(u.shape, u.dtype)
        else:
            plain_update = np.asarray(ref[path])
            want = plain_update * np.asarray(scale, dtype=plain_update.dtype)
            assert want.dtype == u.dtype and np.any(want != 0), path
        if not np.array_equal(u, want):
            wrong.append(f"{path}: multiplier {scale}")
    assert not wrong, "updates differ from plain x multiplier:\n" + "\n".join(wrong)


def run_side_by_side(
    wrapped: Any, plain: Any, params: Any, expected: dict[str, Any], *,
    grad_scale: float = 1.0, between=None, jit: bool = True,
) -> tuple[Any, Any]:
    """``STEPS`` steps (jitted unless ``jit=False``) of both transformations on the
    same params and gradients; returns both final states. ``between(wrapped_state,
    plain_state)`` may change the states before the second step."""
    frozen = {path for path, s in expected.items() if isinstance(s, float) and s == 0.0}
    dtypes = {path: leaf.dtype for path, leaf in flat(params).items()}

    def step(params, w_state, p_state, grads, zeroed):
        updates, w_state = wrapped.update(grads, w_state, params)
        reference, p_state = plain.update(zeroed, p_state, params)
        return updates, reference, optax.apply_updates(params, updates), w_state, p_state

    if jit:
        step = jax.jit(step)
    w_state, p_state = wrapped.init(params), plain.init(params)
    for i in range(STEPS):
        if between is not None and i == 1:
            w_state, p_state = between(w_state, p_state)
        grads = grads_like(params, i, grad_scale)
        updates, reference, params, w_state, p_state = step(
            params, w_state, p_state, grads, zero_where_frozen(grads, frozen)
        )
        assert_scaled(updates, reference, expected, dtypes)
    return w_state, p_state


def assert_no_state_for(state: Any, frozen: set[str], masked: int | None = None) -> None:
    """No array of ``state`` belongs to a frozen leaf, and (where ``masked`` is given)
    exactly ``masked`` ``MaskedNode``s stand for each frozen leaf."""
    leaves = flat(state)
    for path in frozen:
        holding = [k for k, v in leaves.items() if k.endswith("/" + path) and not is_masked(v)]
        assert not holding, f"state arrays for frozen {path}: {holding}"
        nodes = [k for k, v in leaves.items() if k.endswith("/" + path) and is_masked(v)]
        assert masked is None or len(nodes) == masked, (path, nodes)


# Equinox: the model, its policy and its multipliers.


class EqxBlock(eqx.Module):
    lin: eqx.nn.Linear
    norm: eqx.nn.LayerNorm

    def __init__(self, width: int, key: Any):
        self.lin = eqx.nn.Linear(width, width, key=key)
        self.norm = eqx.nn.LayerNorm(width)

    def __call__(self, x):
        return x + jax.nn.gelu(self.lin(self.norm(x)))


class EqxNet(eqx.Module):
    embed: eqx.nn.Embedding
    blocks: list
    norm: eqx.nn.LayerNorm
    head: eqx.nn.Linear

    def __init__(self, key: Any):
        k = jax.random.split(key, 3)
        self.embed = eqx.nn.Embedding(5, 4, key=k[0])
        self.blocks = [EqxBlock(4, kk) for kk in jax.random.split(k[1], 2)]
        self.norm = eqx.nn.LayerNorm(4)
        self.head = eqx.nn.Linear(4, 3, key=k[2])

    def __call__(self, tokens):
        x = jax.vmap(self.embed)(tokens)
        for block in self.blocks:
            x = jax.vmap(block)(x)
        return jax.vmap(self.head)(jax.vmap(self.norm)(x))


EQX_POLICY = dm.Policy(
    *STANDARD,
    dm.freeze(layer="embedding"),
    dm.freeze(path="blocks/0/lin/weight"),  # a 2-D decayed weight: a Muon matrix if trained
    dm.lr(2.0, path="head/*"),
    dm.layer_decay(0.5),
)
# Multipliers are powers of two so that jitted steps compare exactly: XLA may fold a
# multiplier into the optimizer's own constants, which moves other values by an ulp
# (the eager test below takes multipliers that are not).
# Two blocks: ids 1 and 2, the stem 0, norm and head 3; scale 0.5 ** (3 - id).
EQX_TABLE = {
    "embed": 0.0,
    "blocks/0/lin/weight": 0.0,
    "blocks/0": 0.25,
    "blocks/1": 0.5,
    "norm": 1.0,
    "head": 2.0,
}
EQX_FROZEN = {"embed/weight", "blocks/0/lin/weight"}


@pytest.fixture(scope="module")
def eqx_params():
    return eqx.filter(EqxNet(jax.random.key(0)), eqx.is_array)


@pytest.fixture(scope="module")
def eqx_expected(eqx_params):
    expected = multipliers(EQX_TABLE, flat(eqx_params))
    assert_scales(EQX_POLICY.lr_scales(eqx_params), expected)
    return expected


def adamw(policy_mask: Any) -> optax.GradientTransformation:
    return optax.adamw(0.1, weight_decay=0.5, mask=policy_mask)


# wrap around each kind of transformation, jitted.


def test_adamw_jitted_equinox(eqx_params, eqx_expected):
    tx = adamw(EQX_POLICY.mask)
    state, _ = run_side_by_side(EQX_POLICY.wrap(tx), tx, eqx_params, eqx_expected)
    assert isinstance(state, optax.MaskedState)
    adam = state.inner_state[0]
    assert flat(adam.mu).keys() == eqx_expected.keys()
    assert {k for k, v in flat(adam.mu).items() if is_masked(v)} == EQX_FROZEN
    assert {k for k, v in flat(adam.nu).items() if is_masked(v)} == EQX_FROZEN
    assert_no_state_for(state, EQX_FROZEN, masked=2)


def test_eager_steps_with_any_multiplier(eqx_params):
    policy = dm.Policy(
        *STANDARD, dm.freeze(layer="embedding"), dm.lr(0.3, path="head/*"), dm.layer_decay(0.75)
    )
    expected = multipliers(
        {"embed": 0.0, "blocks/0": 0.75**2, "blocks/1": 0.75, "norm": 1.0, "head": 0.3},
        flat(eqx_params),
    )
    assert_scales(policy.lr_scales(eqx_params), expected)
    tx = adamw(policy.mask)
    state, _ = run_side_by_side(policy.wrap(tx), tx, eqx_params, expected, jit=False)
    assert_no_state_for(state, {"embed/weight"}, masked=2)


def test_zero_gradients_decay_by_the_multiplier(eqx_params, eqx_expected):
    # lr 1, zero gradients: a decayed leaf moves by -wd * multiplier * p, others not at all.
    wrapped = EQX_POLICY.wrap(optax.adamw(1.0, weight_decay=0.5, mask=EQX_POLICY.mask))
    zeros = jax.tree.map(jnp.zeros_like, eqx_params)
    updates, _ = jax.jit(wrapped.update)(zeros, wrapped.init(eqx_params), eqx_params)
    decayed = flat(EQX_POLICY.mask(eqx_params))
    assert {k for k, v in decayed.items() if v} == {"blocks/1/lin/weight", "head/weight"}
    for path, p in flat(eqx_params).items():
        want = -0.5 * eqx_expected[path] * p if decayed[path] else jnp.zeros_like(p)
        np.testing.assert_array_equal(flat(updates)[path], want, err_msg=path)


def test_inject_hyperparams_and_a_new_learning_rate(eqx_params, eqx_expected):
    tx = optax.inject_hyperparams(optax.adamw, static_args=("mask",))(
        learning_rate=0.1, weight_decay=0.5, mask=EQX_POLICY.mask
    )
    def retune(w_state, p_state):
        lr = jnp.asarray(0.02, jnp.float32)
        return (
            optax.tree_utils.tree_set(w_state, learning_rate=lr),
            optax.tree_utils.tree_set(p_state, learning_rate=lr),
        )

    state, _ = run_side_by_side(EQX_POLICY.wrap(tx), tx, eqx_params, eqx_expected, between=retune)
    assert float(optax.tree_utils.tree_get(state, "learning_rate")) == np.float32(0.02)
    assert {k for k, v in flat(state.inner_state.inner_state[0].mu).items() if is_masked(v)} == EQX_FROZEN


def test_a_changed_learning_rate_changes_the_step(eqx_params):
    # The hyperparameter in the wrapped state is the one the step uses.
    tx = EQX_POLICY.wrap(optax.inject_hyperparams(optax.sgd)(learning_rate=1.0))
    state = tx.init(eqx_params)
    grads = grads_like(eqx_params, 0)
    fast, _ = tx.update(grads, state, eqx_params)
    slow, _ = tx.update(grads, optax.tree_utils.tree_set(state, learning_rate=0.5), eqx_params)
    for path, u in flat(fast).items():
        np.testing.assert_array_equal(flat(slow)[path], u * 0.5, err_msg=path)


def test_muon_never_sees_a_frozen_matrix(eqx_params, eqx_expected):
    handed = []

    def dims(tree):
        handed.append(tree)
        return EQX_POLICY.muon_dims(tree)

    def muon(dims):
        return optax.contrib.muon(
            0.05, weight_decay=0.5, weight_decay_mask=EQX_POLICY.mask,
            muon_weight_dimension_numbers=dims,
        )

    wrapped, plain = EQX_POLICY.wrap(muon(dims)), muon(EQX_POLICY.muon_dims)
    state, _ = run_side_by_side(wrapped, plain, eqx_params, eqx_expected)
    # optax hands Muon the masked tree: the frozen leaves are MaskedNodes there, and
    # the policy's dimension numbers make none of them a Muon matrix.
    tree = handed[0]
    assert {k for k, v in flat(tree).items() if is_masked(v)} == EQX_FROZEN
    is_dims = lambda x: isinstance(x, optax.contrib.MuonDimensionNumbers)  # noqa: E731
    numbers = {
        slash(path): v for path, v in jax.tree_util.tree_flatten_with_path(
            EQX_POLICY.muon_dims(tree), is_leaf=lambda x: is_dims(x) or is_masked(x)
        )[0]
    }
    matrices = {k for k, v in numbers.items() if is_dims(v)}
    assert matrices == {"blocks/1/lin/weight", "head/weight"}
    assert {k for k, v in numbers.items() if is_masked(v)} == EQX_FROZEN
    # Trained, the frozen weight would be one.
    assert is_dims(dm.Policy(*STANDARD).muon_dims(eqx_params).blocks[0].lin.weight)
    # The frozen weight is in neither branch's state: no Muon momentum, no Adam moments.
    branches = state.inner_state.inner_states
    muon_mu = flat(branches["muon"].inner_state[0].mu)
    assert {k for k, v in muon_mu.items() if not is_masked(v)} == matrices
    adam = branches["adam"].inner_state[0]
    trained = {k for k, s in eqx_expected.items() if s != 0.0}
    for moment in (adam.mu, adam.nu):
        assert {k for k, v in flat(moment).items() if not is_masked(v)} == trained - matrices
    assert_no_state_for(state, EQX_FROZEN)


def test_tree_map_params_reads_the_wrapped_state(eqx_params):
    # optax's own way to place an optimizer state (shardings, dtypes) by its params.
    wrapped = EQX_POLICY.wrap(adamw(EQX_POLICY.mask))
    state = wrapped.init(eqx_params)
    shown = optax.tree_utils.tree_map_params(
        wrapped,
        lambda v: "masked" if is_masked(v) else f"{v.dtype}{list(v.shape)}",
        state,
        is_leaf=is_masked,
        transform_non_params=lambda _: None,
    )
    want = {
        k: "masked" if k in EQX_FROZEN else f"{v.dtype}{list(v.shape)}"
        for k, v in flat(eqx_params).items()
    }
    assert flat(shown.inner_state[0].mu) == flat(shown.inner_state[0].nu) == want
    assert shown.inner_state[0].count is None


def test_a_frozen_gradient_is_computed_only_where_it_is_taken():
    # wrap's zero update for a frozen leaf depends on its gradient (so that jit keeps
    # the gradient's sharding): the frozen embedding's gradient (a scatter into its
    # table) is computed when the full gradient is taken, and not when only the
    # trainable part is differentiated (eqx.partition by policy.trainable).
    class Lookup(eqx.Module):
        embed: eqx.nn.Embedding
        head: eqx.nn.Linear

        def __init__(self, key):
            k1, k2 = jax.random.split(key)
            self.embed = eqx.nn.Embedding(50, 4, key=k1)
            self.head = eqx.nn.Linear(4, 3, key=k2)

        def __call__(self, tokens):
            return jax.vmap(lambda t: self.head(self.embed(t)))(tokens)

    model = Lookup(jax.random.key(5))
    params = eqx.filter(model, eqx.is_array)
    policy = dm.Policy(*STANDARD, dm.freeze(layer="embedding"))

    def compiled(tx, params, rest):
        def step(params, state):
            grads = jax.grad(lambda p: jnp.sum(eqx.combine(p, rest)(TOKENS) ** 2))(params)
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        return jax.jit(step).lower(params, tx.init(params)).compile().as_text()

    assert "scatter" in compiled(adamw(policy.mask), params, model)
    assert "scatter" in compiled(policy.wrap(adamw(policy.mask)), params, model)
    trained, frozen = eqx.partition(model, policy.trainable(model))
    trained = eqx.filter(trained, eqx.is_array)
    tx = policy.wrap(adamw(policy.mask), full=model)
    assert "scatter" not in compiled(tx, trained, frozen)


def test_clipping_inside_sees_only_trained_gradients(eqx_params, eqx_expected):
    # A large eps keeps Adam from normalising the clip away: counting the frozen
    # gradients in the global norm would change every update.
    tx = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(0.1, eps=0.5, weight_decay=0.5, mask=EQX_POLICY.mask),
    )
    state, _ = run_side_by_side(EQX_POLICY.wrap(tx), tx, eqx_params, eqx_expected, grad_scale=10.0)
    assert_no_state_for(state, EQX_FROZEN, masked=2)
    grads = grads_like(eqx_params, 0, 10.0)
    trained = float(optax.tree.norm(zero_where_frozen(grads, EQX_FROZEN)))
    assert 1.0 < trained < float(optax.tree.norm(grads))


def test_a_callable_equinox_root_is_never_called():
    mlp = eqx.nn.MLP(3, 2, 8, depth=3, key=jax.random.key(1))
    params = eqx.filter(mlp, eqx.is_array)
    assert callable(params)
    policy = dm.Policy(
        *STANDARD, dm.freeze(path="layers/0/*"), dm.layer_decay(0.5, blocks="layers/*")
    )
    # Four Linear layers are the blocks, ids 1..4; scale 0.5 ** (5 - id).
    expected = multipliers(
        {"layers/0": 0.0, "layers/1": 0.125, "layers/2": 0.25, "layers/3": 0.5}, flat(params)
    )
    assert_scales(policy.lr_scales(params), expected)
    # The inner mask, precomputed, is an MLP too: a callable tree.
    mask = policy.mask(params)
    assert callable(mask)
    tx = adamw(mask)
    state, _ = run_side_by_side(policy.wrap(tx), tx, params, expected)
    assert_no_state_for(state, {"layers/0/weight", "layers/0/bias"}, masked=2)


# NNX: nnx.Optimizer over the wrapped transformation.


class NnxBlock(nnx.Module):
    def __init__(self, width: int, rngs: nnx.Rngs):
        self.norm = nnx.LayerNorm(width, rngs=rngs)
        self.lin = nnx.Linear(width, width, rngs=rngs)

    def __call__(self, x):
        return x + nnx.gelu(self.lin(self.norm(x)))


class NnxNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(5, 4, rngs=rngs)
        self.blocks = nnx.List([NnxBlock(4, rngs) for _ in range(3)])
        self.norm = nnx.LayerNorm(4, rngs=rngs)
        self.head = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


NNX_POLICY = dm.Policy(
    *STANDARD,
    dm.freeze(layer="embedding"),
    dm.freeze(path="blocks/0/lin/kernel"),
    dm.lr(2.0, path="head/*"),
    dm.layer_decay(0.5),
)
# Three blocks: ids 1..3, norm and head 4; scale 0.5 ** (4 - id).
NNX_TABLE = {
    "embed": 0.0,
    "blocks/0/lin/kernel": 0.0,
    "blocks/0": 0.125,
    "blocks/1": 0.25,
    "blocks/2": 0.5,
    "norm": 1.0,
    "head": 2.0,
}
TOKENS = jnp.array([0, 1, 2, 4])
TARGET = jnp.linspace(-1.0, 1.0, 12).reshape(4, 3)


def nnx_loss(model, tokens, target):
    return jnp.mean((model(tokens) - target) ** 2)


def test_nnx_optimizer_over_wrap():
    model = NnxNet(nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    expected = multipliers(NNX_TABLE, flat(params))
    assert_scales(NNX_POLICY.lr_scales(model), expected)
    frozen = {k for k, s in expected.items() if s == 0.0}
    tx = adamw(NNX_POLICY.mask)
    optimizer = nnx.Optimizer(model, NNX_POLICY.wrap(tx), wrt=nnx.Param)
    plain_state = tx.init(nnx.as_pure(params))
    before = {k: np.asarray(v) for k, v in flat(params).items()}

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(nnx_loss)(model, TOKENS, TARGET)
        params = nnx.as_pure(nnx.state(model, nnx.Param))
        return loss, nnx.as_pure(grads), params, optimizer.update(model, grads)

    plain_update = jax.jit(tx.update)
    losses = []
    for _ in range(STEPS):
        loss, grads, params, updates = step(model, optimizer)
        losses.append(float(loss))
        reference, plain_state = plain_update(zero_where_frozen(grads, frozen), plain_state, params)
        dtypes = {k: v.dtype for k, v in flat(params).items()}
        assert_scaled(updates, reference, expected, dtypes)
    assert losses[-1] < losses[0]
    after = flat(nnx.state(model, nnx.Param))
    for path in frozen:
        np.testing.assert_array_equal(after[path], before[path], err_msg=path)
    adam = optimizer.opt_state.inner_state[0]
    assert {k for k, v in flat(adam.mu).items() if is_masked(v)} == frozen
    assert_no_state_for(optimizer.opt_state, frozen, masked=2)


# What wrap refuses.


@pytest.mark.parametrize(
    ("tx", "got"),
    [
        (
            optax.adamw,
            "the function optax._src.alias.adamw. It is callable: if it makes a "
            "transformation (optax.adamw itself, or an inject_hyperparams factory), call "
            "it with its hyperparameters first.",
        ),
        (
            optax.GradientTransformation,
            "the class optax._src.base.GradientTransformation. It is a class: pass an "
            "instance.",
        ),
        (3, "3 (int)."),
    ],
    ids=["the-adamw-function", "a-class", "an-int"],
)
def test_wrap_refuses_what_is_not_a_transformation(tx, got):
    with pytest.raises(TypeError) as error:
        EQX_POLICY.wrap(tx)
    assert str(error.value) == (
        "policy.wrap(tx): expected an optax.GradientTransformation (with init and "
        "update), e.g. optax.adamw(1e-3, weight_decay=0.05, mask=policy.mask); got " + got
    )


def test_a_ladder_not_found_fails_at_init():
    policy = dm.Policy(*STANDARD, dm.layer_decay(0.5))
    params = eqx.filter(eqx.nn.Linear(3, 2, key=jax.random.key(0)), eqx.is_array)
    wrapped = policy.wrap(adamw(policy.mask))  # built without the params: no error yet
    with pytest.raises(ValueError) as direct:
        policy.lr_scales(params)
    with pytest.raises(ValueError, match="found no repeated stack of blocks") as at_init:
        wrapped.init(params)
    assert str(at_init.value) == str(direct.value)


class Scaled(eqx.Module):
    lin: eqx.nn.Linear
    alpha: float

    def __init__(self, key: Any):
        self.lin = eqx.nn.Linear(2, 2, key=key)
        self.alpha = 0.5


def test_wrap_refuses_params_that_are_not_arrays():
    # eqx.is_inexact_array_like keeps the Python float: optax.masked would pass its
    # update through, unscaled and never frozen.
    params = eqx.filter(Scaled(jax.random.key(0)), eqx.is_inexact_array_like)
    wrapped = dm.Policy(*STANDARD, dm.lr(0.5, layer="linear")).wrap(optax.sgd(0.1))
    with pytest.raises(ValueError) as error:
        wrapped.init(params)
    assert str(error.value) == (
        "policy.wrap: the params hold leaves that are not arrays (alpha: float); the "
        "policy decides arrays only, and optax would update the others unscaled. Fix: "
        "keep them out of the params and the updates, e.g. eqx.filter(model, "
        "eqx.is_inexact_array) rather than eqx.is_inexact_array_like, or mark the field "
        "static."
    )
    arrays = eqx.filter(params, eqx.is_array)
    state = wrapped.init(arrays)
    updates_message = r"^policy.wrap: the updates hold leaves that are not arrays \(alpha: float\)"
    with pytest.raises(ValueError, match=updates_message):
        wrapped.update(params, state)


# Frozen leaves get no gradient, in each framework's idiom.

FREEZE = (dm.freeze(layer="embedding"), dm.freeze(layer="norm"), dm.lr(2.0, path="head/*"))
TRAIN_STEPS = 5


def paths_of(tree: Any) -> set[str]:
    return set(flat(tree))


def assert_trained(
    losses: list[float], before: dict[str, Any], after: dict[str, Any], frozen: set[str]
) -> None:
    """The loss went down, frozen params are bit for bit what they were, the others moved."""
    assert losses[-1] < losses[0], losses
    assert before.keys() == after.keys()
    for path, value in before.items():
        same = np.array_equal(np.asarray(after[path]), np.asarray(value))
        assert same is (path in frozen), (path, "unchanged" if same else "changed")


def test_equinox_partition_trains_only_the_trainable_half():
    policy = dm.Policy(*STANDARD, *FREEZE, dm.layer_decay(0.5))
    model = EqxNet(jax.random.key(3))
    spec = policy.trainable(model)
    diff, static = eqx.partition(model, spec)
    frozen = {"embed/weight", "norm/weight", "norm/bias"} | {
        f"blocks/{i}/norm/{p}" for i in range(2) for p in ("weight", "bias")
    }
    every = paths_of(eqx.filter(model, eqx.is_array))
    assert paths_of(eqx.filter(static, eqx.is_array)) == frozen
    assert paths_of(diff) == every - frozen
    tx = policy.wrap(adamw(policy.mask), full=model)
    state = tx.init(diff)

    def loss(diff, static):
        return jnp.mean((eqx.combine(diff, static)(TOKENS) - TARGET) ** 2)

    @eqx.filter_jit
    def step(diff, state):
        value, grads = eqx.filter_value_and_grad(loss)(diff, static)
        updates, state = tx.update(grads, state, diff)
        return eqx.apply_updates(diff, updates), state, value, grads

    losses = []
    for _ in range(TRAIN_STEPS):
        diff, state, value, grads = step(diff, state)
        losses.append(float(value))
        assert paths_of(grads) == every - frozen
    before = flat(eqx.filter(model, eqx.is_array))
    assert_trained(losses, before, flat(eqx.filter(eqx.combine(diff, static), eqx.is_array)), frozen)
    held = flat(state)
    assert not any(is_masked(v) for v in held.values())
    assert not [k for k in held if any(k.endswith("/" + f) for f in frozen)]
    assert paths_of(state.inner_state[0].mu) == every - frozen


def test_nnx_diff_state_and_optimizer_wrt_the_trainable_filter():
    policy = dm.Policy(*STANDARD, *FREEZE, dm.layer_decay(0.5))
    model = NnxNet(nnx.Rngs(3))
    trainable = policy.trainable_filter(model)
    every = paths_of(nnx.state(model, nnx.Param))
    frozen = {"embed/embedding", "norm/scale", "norm/bias"} | {
        f"blocks/{i}/norm/{p}" for i in range(3) for p in ("scale", "bias")
    }
    assert paths_of(nnx.state(model, trainable)) == every - frozen
    assert paths_of(nnx.state(model, nnx.All(nnx.Param, nnx.Not(trainable)))) == frozen
    optimizer = nnx.Optimizer(model, policy.wrap(adamw(policy.mask), full=model), wrt=trainable)
    before = {k: np.asarray(v) for k, v in flat(nnx.state(model, nnx.Param)).items()}

    @nnx.jit
    def step(model, optimizer):
        grad = nnx.value_and_grad(nnx_loss, argnums=nnx.DiffState(0, trainable))
        value, grads = grad(model, TOKENS, TARGET)
        optimizer.update(model, grads)
        return value, grads

    losses = []
    for _ in range(TRAIN_STEPS):
        value, grads = step(model, optimizer)
        losses.append(float(value))
        assert paths_of(grads) == every - frozen
    assert_trained(losses, before, flat(nnx.state(model, nnx.Param)), frozen)
    held = flat(optimizer.opt_state)
    assert not any(is_masked(v) for v in held.values())
    assert not [k for k in held if any(k.endswith("/" + f) for f in frozen)]
    assert paths_of(optimizer.opt_state.inner_state[0].mu) == every - frozen


class LinenBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        return x + nn.gelu(nn.Dense(4)(nn.LayerNorm()(x)))


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(5, 4)(tokens)
        for i in range(3):
            x = LinenBlock(name=f"blocks_{i}")(x)
        return nn.Dense(3, name="head")(nn.LayerNorm(name="norm")(x))


class HaikuBlock(hk.Module):
    def __call__(self, x):
        return x + jax.nn.gelu(hk.Linear(4)(hk.LayerNorm(-1, True, True)(x)))


def haiku_net(tokens):
    x = hk.Embed(5, 4)(tokens)
    for i in range(3):
        x = HaikuBlock(name=f"block_{i}")(x)
    return hk.Linear(3, name="head")(hk.LayerNorm(-1, True, True, name="norm")(x))


def train_split(apply, params, trainable, frozen, tx):
    """``TRAIN_STEPS`` steps on the trainable half, the frozen half merged in inside the
    loss; returns the losses, the trained half and the optimizer state."""

    def loss(trainable):
        return jnp.mean((apply(dm.merge(trainable, frozen), TOKENS) - TARGET) ** 2)

    @jax.jit
    def step(trainable, state):
        value, grads = jax.value_and_grad(loss)(trainable)
        updates, state = tx.update(grads, state, trainable)
        return optax.apply_updates(trainable, updates), state, value, grads

    state = tx.init(trainable)
    losses = []
    for _ in range(TRAIN_STEPS):
        trainable, state, value, grads = step(trainable, state)
        losses.append(float(value))
        assert paths_of(grads) == paths_of(trainable)
    return losses, trainable, state


def test_linen_split_and_merge():
    policy = dm.Policy(*STANDARD, *FREEZE, dm.layer_decay(0.5))
    net = LinenNet()
    params = net.init(jax.random.key(3), TOKENS)["params"]
    trainable, frozen = policy.split(params)
    # Exactly these keys, holding the params' own arrays (dict == compares them by identity).
    assert frozen == {
        "Embed_0": {"embedding": params["Embed_0"]["embedding"]},
        **{f"blocks_{i}": {"LayerNorm_0": params[f"blocks_{i}"]["LayerNorm_0"]} for i in range(3)},
        "norm": params["norm"],
    }
    assert paths_of(trainable) == paths_of(params) - paths_of(frozen)
    assert jax.tree.structure(dm.merge(trainable, frozen)) == jax.tree.structure(params)

    def apply(params, tokens):
        return net.apply({"params": params}, tokens)

    tx = policy.wrap(adamw(policy.mask), full=params)
    losses, trained, state = train_split(apply, params, trainable, frozen, tx)
    after = flat(dm.merge(trained, frozen))
    assert_trained(losses, flat(params), after, paths_of(frozen))
    held = flat(state)
    assert not any(is_masked(v) for v in held.values())
    assert not [k for k in held if any(k.endswith("/" + f) for f in paths_of(frozen))]
    assert paths_of(state.inner_state[0].mu) == paths_of(trainable)


def test_haiku_split_with_a_plain_optimizer_on_the_trainable_half():
    policy = dm.Policy(*STANDARD, *FREEZE)
    net = hk.without_apply_rng(hk.transform(haiku_net))
    params = net.init(jax.random.key(3), TOKENS)
    trainable, frozen = policy.split(params, framework="haiku")
    # Exactly these keys, holding the params' own arrays (dict == compares them by identity).
    assert frozen == {
        "embed": params["embed"],
        **{f"block_{i}/layer_norm": params[f"block_{i}/layer_norm"] for i in range(3)},
        "norm": params["norm"],
    }
    assert sorted(trainable) == ["block_0/linear", "block_1/linear", "block_2/linear", "head"]
    tx = adamw(policy.for_haiku)
    losses, trained, state = train_split(net.apply, params, trainable, frozen, tx)
    assert_trained(losses, flat(params), flat(dm.merge(trained, frozen)), paths_of(frozen))
    held = flat(state)
    assert not [k for k in held if any(k.endswith("/" + f) for f in paths_of(frozen))]
    assert paths_of(state[0].mu) == paths_of(trainable)
    # Only the trained half's weights decay: the head's and the blocks' linear kernels.
    assert {k for k, v in flat(policy.for_haiku(trainable)).items() if v} == {
        "head/w", *(f"block_{i}/linear/w" for i in range(3))
    }


# A stacked model: one multiplier per layer, in the params' dtype.


class EqxStacked(eqx.Module):
    embed: eqx.nn.Embedding
    blocks: EqxBlock
    head: eqx.nn.Linear

    def __init__(self, key: Any):
        k = jax.random.split(key, 3)
        self.embed = eqx.nn.Embedding(5, 4, key=k[0])
        self.blocks = eqx.filter_vmap(lambda k: EqxBlock(4, k))(jax.random.split(k[1], 3))
        self.head = eqx.nn.Linear(4, 3, key=k[2])


@pytest.fixture(scope="module")
def stacked():
    return eqx.filter(EqxStacked(jax.random.key(4)), eqx.is_array)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_a_stacked_model_steps_each_layer_by_its_multiplier(stacked, dtype):
    params = jax.tree.map(lambda x: x.astype(dtype), stacked)
    policy = dm.Policy(
        *STANDARD, dm.freeze(layer="embedding"), dm.lr(2.0, path="head/*"), dm.layer_decay(0.5)
    )
    # Three layers stacked: ids 1..3, the head 4; scale 0.5 ** (4 - id).
    expected = multipliers({"embed": 0.0, "blocks": (0.125, 0.25, 0.5), "head": 2.0}, flat(params))
    assert expected["blocks/lin/weight"].shape == (3, 1, 1)
    assert expected["blocks/lin/bias"].shape == (3, 1)
    assert_scales(policy.lr_scales(params), expected)
    tx = adamw(policy.mask)
    state, _ = run_side_by_side(policy.wrap(tx), tx, params, expected)
    assert_no_state_for(state, {"embed/weight"}, masked=2)
    assert {v.dtype for v in flat(state.inner_state[0].mu).values() if not is_masked(v)} == {
        jnp.dtype(dtype)
    }


# What a trainable half cannot tell wrap: the frozen leaves it no longer holds.


PART_MESSAGE = (
    "policy.wrap: tx.init was handed params that no freeze rule of the policy matches: "
    "they look like the trainable part alone (eqx.partition, policy.split, "
    "trainable_filter), and layer decay numbers the blocks of the whole model: ids worked "
    "out on a part would shift. Fix: give the whole model or params, policy.wrap(tx, "
    "full=model) (full=params where these are the whole model)."
)


def test_a_frozen_block_keeps_its_place_in_the_ladder_of_the_trainable_half():
    policy = dm.Policy(*STANDARD, dm.freeze(path="blocks_1/*"), dm.layer_decay(0.5))
    params = LinenNet().init(jax.random.key(3), TOKENS)["params"]
    full = flat(policy.lr_scales(params))
    trainable, _ = policy.split(params)
    # The trainable half alone would number two blocks, not three: refused.
    with pytest.raises(ValueError) as info:
        policy.wrap(optax.sgd(1.0)).init(trainable)
    assert str(info.value) == PART_MESSAGE
    tx = policy.wrap(optax.sgd(1.0), full=params)
    ones = jax.tree.map(jnp.ones_like, trainable)
    updates, _ = tx.update(ones, tx.init(trainable), trainable)
    # Three blocks, the second frozen: the first keeps 0.5 ** 2, the stem 0.5 ** 4.
    assert full["blocks_0/Dense_0/kernel"] == 0.125 and full["Embed_0/embedding"] == 0.0625
    assert {k: -float(v.ravel()[0]) for k, v in flat(updates).items()} == {
        k: full[k] for k in flat(trainable)
    }


def test_a_freeze_rule_by_path_is_quiet_on_the_trainable_half():
    # It matches nothing there, rightly: warnings are errors in this suite.
    policy = dm.Policy(*STANDARD, dm.freeze(path="head/*"))
    params = LinenNet().init(jax.random.key(3), TOKENS)["params"]
    trainable, frozen = policy.split(params)
    assert list(frozen) == ["head"]
    state = policy.wrap(adamw(policy.mask)).init(trainable)
    assert paths_of(state.inner_state[0].mu) == paths_of(trainable)


def test_a_partly_frozen_block_is_still_a_block_of_the_equinox_partition():
    policy = dm.Policy(
        *STANDARD,
        dm.freeze(layer="embedding"),
        dm.freeze(path="blocks/0/lin/weight"),
        dm.layer_decay(0.5),
    )
    model = EqxNet(jax.random.key(0))
    diff, _ = eqx.partition(model, policy.trainable(model))
    with pytest.raises(ValueError) as info:
        policy.wrap(adamw(policy.mask)).init(diff)
    assert str(info.value) == PART_MESSAGE
    tx = policy.wrap(optax.sgd(1.0), full=model)
    params = eqx.filter(diff, eqx.is_array)
    ones = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(ones, tx.init(params), params)
    whole = {row.path: row.lr_scale for row in policy.explain(model) if row.trainable}
    moved = {
        row.path: -float(u.ravel()[0])
        for row, u in zip(dm.Policy(*policy.rules).explain(params), jax.tree.leaves(updates))
    }
    assert moved == whole
