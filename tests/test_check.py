"""check_mask: every message, and agreement with what a real optax step accepts."""

from __future__ import annotations

import collections
import re
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx
from flax.core import freeze

import decaymask as dm
from decaymask._check import MaskMismatchError, check_mask

POLICY = dm.Policy(dm.decay())

# ---------------------------------------------------------------------------- Equinox


def relu(x: jax.Array) -> jax.Array:
    return jnp.maximum(x, 0)


class Model(eqx.Module):
    """Linear layers in a list, an integer array, and a function field."""

    layers: list[eqx.nn.Linear]
    step: jax.Array
    activation: Callable

    def __init__(self, key: jax.Array, depth: int = 2, width: int = 3):
        self.layers = [eqx.nn.Linear(width, width, key=k) for k in jax.random.split(key, depth)]
        self.step = jnp.zeros((), jnp.int32)
        self.activation = relu


EQX_MODEL = Model(jax.random.key(0))
EQX_PARAMS = eqx.filter(EQX_MODEL, eqx.is_inexact_array)  # None at `step` and `activation`
EQX_ARRAYS = eqx.filter(EQX_MODEL, eqx.is_array)  # the int array `step` kept


def floating(tree: Any) -> Any:
    """A hand-made mask: True at floating arrays, False at other arrays, None elsewhere."""
    return jax.tree.map(lambda x: bool(jnp.issubdtype(x.dtype, jnp.floating)), tree)


# ---------------------------------------------------------------------------- Linen


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(4)(x)
        x = nn.BatchNorm(use_running_average=True)(x)
        return nn.Dense(2)(x)


class BoxedNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        init = nn.with_partitioning(nn.initializers.lecun_normal(), (None, "model"))
        return nn.Dense(2, kernel_init=init)(x)


LINEN_VARIABLES = LinenNet().init(jax.random.key(1), jnp.ones((1, 3)))
LINEN_PARAMS = LINEN_VARIABLES["params"]
BOXED_PARAMS = BoxedNet().init(jax.random.key(2), jnp.ones((1, 3)))["params"]
UNBOXED_PARAMS = nn.unbox(BOXED_PARAMS)


def ndim_mask(tree: Any) -> Any:
    """The usual hand recipe: decay arrays of two or more axes."""
    return jax.tree.map(lambda x: x.ndim > 1, tree)


# ---------------------------------------------------------------------------- NNX


class NnxNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.backbone = nnx.Linear(3, 4, rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)
        self.head = nnx.Linear(4, 2, rngs=rngs)


NNX_MODEL = NnxNet(nnx.Rngs(0))
NNX_PARAMS = nnx.state(NNX_MODEL, nnx.Param)
HEAD_ONLY = nnx.All(nnx.Param, nnx.PathContains("head"))


def nnx_mask(state: nnx.State) -> nnx.State:
    return nnx.map_state(lambda path, value: value.ndim > 1, state)


# ---------------------------------------------------------------------------- the oracle


def optax_accepts(mask: Any, params: Any) -> bool:
    """Whether a real adamw init + update runs with this mask on these params.

    An NNX state goes through optax as nnx.Optimizer hands it over: boxed to tx.init,
    unboxed by nnx.as_pure to tx.update.
    """
    tx = optax.adamw(1.0, weight_decay=0.1, mask=mask)
    try:
        grads = jax.tree.map(jnp.zeros_like, params)
        state = tx.init(params)
        if isinstance(params, nnx.State):
            tx.update(nnx.as_pure(grads), state, nnx.as_pure(params))
        else:
            tx.update(grads, state, params)
    except (ValueError, TypeError):
        return False
    return True


def check_accepts(mask: Any, params: Any) -> bool:
    try:
        check_mask(mask, params)
    except MaskMismatchError:
        return False
    return True


def eqx_prefix_mask() -> Any:
    mask = POLICY.for_equinox(EQX_PARAMS)
    return eqx.tree_at(lambda m: m.layers, mask, False)


def linen_prefix_mask() -> dict:
    return {"BatchNorm_0": False, "Dense_0": True, "Dense_1": {"bias": False, "kernel": True}}


def zero_dim_mask(tree: Any) -> Any:
    """Bools as 0-d jax arrays, as a jitted mask builder returns them."""
    return jax.tree.map(lambda x: jnp.array(x.ndim > 1), tree)


def elementwise_mask(tree: Any) -> Any:
    """One bool per element: a mask of the wrong granularity."""
    return jax.tree.map(lambda x: jnp.ones_like(x, bool), tree)


# (id, mask builder, params builder, whether optax takes it); built inside the test.
AGREEMENT = [
    ("eqx_exact", lambda: POLICY.for_equinox(EQX_PARAMS), lambda: EQX_PARAMS, True),
    ("eqx_callable", lambda: POLICY.for_equinox, lambda: EQX_PARAMS, True),
    ("eqx_prefix_subtree", eqx_prefix_mask, lambda: EQX_PARAMS, True),
    ("eqx_prefix_root", lambda: True, lambda: EQX_PARAMS, True),
    # A bool over a None of the params: the whole-model mask on inexact params is valid.
    ("eqx_model_mask_on_inexact", lambda: floating(EQX_ARRAYS), lambda: EQX_PARAMS, True),
    ("eqx_inexact_mask_on_arrays", lambda: floating(EQX_PARAMS), lambda: EQX_ARRAYS, False),
    ("eqx_unfiltered_model", lambda: floating(EQX_ARRAYS), lambda: EQX_MODEL, False),
    (
        "eqx_sequence_length",
        lambda: floating(eqx.filter(Model(jax.random.key(0), depth=3), eqx.is_array)),
        lambda: EQX_PARAMS,
        False,
    ),
    (
        "eqx_static_fields",
        lambda: floating(eqx.filter(Model(jax.random.key(0), width=4), eqx.is_array)),
        lambda: EQX_PARAMS,
        False,
    ),
    ("linen_exact", lambda: ndim_mask(LINEN_PARAMS), lambda: LINEN_PARAMS, True),
    ("linen_prefix", linen_prefix_mask, lambda: LINEN_PARAMS, True),
    ("linen_zero_dim_arrays", lambda: zero_dim_mask(LINEN_PARAMS), lambda: LINEN_PARAMS, True),
    ("linen_variables_mask", lambda: ndim_mask(LINEN_VARIABLES), lambda: LINEN_PARAMS, False),
    ("linen_variables_params", lambda: ndim_mask(LINEN_PARAMS), lambda: LINEN_VARIABLES, False),
    ("frozen_both", lambda: freeze(ndim_mask(LINEN_PARAMS)), lambda: freeze(LINEN_PARAMS), True),
    ("dict_mask_frozen_params", lambda: ndim_mask(LINEN_PARAMS), lambda: freeze(LINEN_PARAMS),
     False),
    ("frozen_mask_dict_params", lambda: freeze(ndim_mask(LINEN_PARAMS)), lambda: LINEN_PARAMS,
     False),
    ("elementwise_mask", lambda: elementwise_mask(LINEN_PARAMS), lambda: LINEN_PARAMS, False),
    ("boxed_both", lambda: ndim_mask(BOXED_PARAMS), lambda: BOXED_PARAMS, True),
    ("unboxed_mask_boxed_params", lambda: ndim_mask(UNBOXED_PARAMS), lambda: BOXED_PARAMS, True),
    ("boxed_mask_unboxed_params", lambda: ndim_mask(BOXED_PARAMS), lambda: UNBOXED_PARAMS,
     False),
    ("callable_wrong_tree", lambda: lambda p: {"Dense_0": True}, lambda: LINEN_PARAMS, False),
    ("tree_of_functions", lambda: {"Dense_0": len}, lambda: LINEN_PARAMS, False),
    ("no_mask", lambda: None, lambda: LINEN_PARAMS, True),
    ("tuple_mask_list_params", lambda: (True, False), lambda: [jnp.ones(2), jnp.ones(2)], False),
    ("list_prefix_of_tuples", lambda: [True, (False, True)],
     lambda: [(jnp.ones(2),), (jnp.ones(2), jnp.ones(2))], True),
    ("nnx_exact", lambda: nnx_mask(NNX_PARAMS), lambda: NNX_PARAMS, True),
    ("nnx_callable", lambda: nnx_mask, lambda: NNX_PARAMS, True),
    ("nnx_prefix", lambda: nnx.State({"backbone": True, "bn": False, "head": True}),
     lambda: NNX_PARAMS, True),
    ("nnx_param_boxes", lambda: ndim_mask(NNX_PARAMS), lambda: NNX_PARAMS, False),
    ("nnx_wrt_superset", lambda: nnx_mask(NNX_PARAMS),
     lambda: nnx.state(NNX_MODEL, HEAD_ONLY), False),
    ("nnx_wrt_subset", lambda: nnx_mask(nnx.state(NNX_MODEL, HEAD_ONLY)),
     lambda: NNX_PARAMS, False),
]


@pytest.mark.parametrize(
    "make_mask, make_params, valid",
    [case[1:] for case in AGREEMENT],
    ids=[case[0] for case in AGREEMENT],
)
def test_agrees_with_a_real_adamw_step(make_mask, make_params, valid):
    mask, params = make_mask(), make_params()
    assert optax_accepts(mask, params) is valid
    assert check_accepts(mask, params) is valid


def test_nnx_optimizer_agrees_on_boxed_and_plain_masks():
    # The oracle's boxed-init / unboxed-update split is what nnx.Optimizer itself does.
    model = NnxNet(nnx.Rngs(0))
    grads = nnx.state(model, nnx.Param)
    for mask, valid in [(nnx_mask(NNX_PARAMS), True), (ndim_mask(NNX_PARAMS), False)]:
        optimizer = nnx.Optimizer(model, optax.adamw(1.0, weight_decay=0.1, mask=mask),
                                  wrt=nnx.Param)
        try:
            optimizer.update(model, grads)
            ran = True
        except ValueError:
            ran = False
        assert ran is valid
        assert check_accepts(mask, NNX_PARAMS) is valid


# ---------------------------------------------------------------------------- messages


def raises_exactly(mask: Any, params: Any, message: str) -> None:
    with pytest.raises(MaskMismatchError, match=f"^{re.escape(message)}$"):
        check_mask(mask, params)


FIX_EQUINOX = (
    "Fix: build the mask from the params you hand optax, mask = policy.for_equinox(params), "
    "or pass mask=policy.for_equinox (the function) so that optax builds it from what it gets."
)


def test_equinox_mask_from_other_filter():
    raises_exactly(
        floating(EQX_PARAMS),
        EQX_ARRAYS,
        "mask does not match params at step:\n"
        "  mask has None\n"
        "  params have an int32[] jax.Array\n" + FIX_EQUINOX,
    )


def test_equinox_unfiltered_model_as_params():
    raises_exactly(
        floating(EQX_ARRAYS),
        EQX_MODEL,
        "mask does not match params at activation:\n"
        "  mask has None\n"
        "  params have a function (relu)\n"
        "Fix: hand optax the arrays only, params = eqx.filter(model, eqx.is_inexact_array), "
        "and build the mask from those params: policy.for_equinox(params), or pass "
        "mask=policy.for_equinox.",
    )


def test_equinox_sequence_length():
    deeper = eqx.filter(Model(jax.random.key(0), depth=3), eqx.is_array)
    raises_exactly(
        floating(deeper),
        EQX_PARAMS,
        "mask does not match params at layers:\n"
        "  mask has a list of length 3\n"
        "  params have a list of length 2\n" + FIX_EQUINOX,
    )


def test_equinox_static_fields():
    wider = eqx.filter(Model(jax.random.key(0), width=4), eqx.is_inexact_array)
    raises_exactly(
        POLICY.for_equinox(wider),
        EQX_PARAMS,
        "mask does not match params at layers/0:\n"
        "  mask has an eqx.nn.Linear module\n"
        "  params have an eqx.nn.Linear module\n"
        "  static fields differ: in_features (mask 4, params 3), out_features (mask 4, "
        "params 3)\n" + FIX_EQUINOX,
    )


def test_linen_variables_mask_on_params():
    raises_exactly(
        ndim_mask(LINEN_VARIABLES),
        LINEN_PARAMS,
        "mask does not match params at <root>:\n"
        "  mask has a dict with 2 keys\n"
        "  params have a dict with 3 keys\n"
        "  keys only in the mask (2): 'batch_stats', 'params'\n"
        "  keys only in params (3): 'BatchNorm_0', 'Dense_0', 'Dense_1'\n"
        'Fix: build the mask from the params collection alone: '
        'policy.for_flax(variables["params"]).',
    )


def test_linen_params_mask_on_variables():
    raises_exactly(
        ndim_mask(LINEN_PARAMS),
        LINEN_VARIABLES,
        "mask does not match params at <root>:\n"
        "  mask has a dict with 3 keys\n"
        "  params have a dict with 2 keys\n"
        "  keys only in the mask (3): 'BatchNorm_0', 'Dense_0', 'Dense_1'\n"
        "  keys only in params (2): 'batch_stats', 'params'\n"
        'Fix: hand optax the params collection alone, tx.init(variables["params"]), and build '
        'the mask from the same tree: policy.for_flax(variables["params"]).',
    )


FIX_CONTAINER = (
    "Fix: build the mask from the same object you hand optax (decaymask returns the container "
    "type it was given), or make both the same type with flax.core.unfreeze (dicts) or "
    "flax.core.freeze (FrozenDicts)."
)


def test_dict_mask_on_frozen_params():
    raises_exactly(
        ndim_mask(LINEN_PARAMS),
        freeze(LINEN_PARAMS),
        "mask does not match params at <root>:\n"
        "  mask has a dict with 3 keys\n"
        "  params have a FrozenDict with 3 keys\n" + FIX_CONTAINER,
    )


def test_frozen_node_inside_a_dict_mask():
    mask = ndim_mask(LINEN_PARAMS)
    mask["Dense_1"] = freeze(mask["Dense_1"])
    raises_exactly(
        mask,
        LINEN_PARAMS,
        "mask does not match params at Dense_1:\n"
        "  mask has a FrozenDict with 2 keys\n"
        "  params have a dict with 2 keys\n" + FIX_CONTAINER,
    )


FIX_WRT = (
    "Fix: build the mask with the filter the optimizer uses: policy.for_flax(model, wrt=F) "
    "for nnx.Optimizer(model, tx, wrt=F)."
)


def test_nnx_mask_from_a_wider_wrt():
    raises_exactly(
        nnx_mask(NNX_PARAMS),
        nnx.state(NNX_MODEL, HEAD_ONLY),
        "mask does not match params at <root>:\n"
        "  mask has an nnx.State with 3 keys\n"
        "  params have an nnx.State with 1 key\n"
        "  keys only in the mask (2): 'backbone', 'bn'\n" + FIX_WRT,
    )


def test_nnx_mask_from_a_narrower_wrt():
    raises_exactly(
        nnx_mask(NNX_PARAMS),
        nnx.state(NNX_MODEL, (nnx.Param, nnx.BatchStat)),
        "mask does not match params at bn:\n"
        "  mask has a dict with 2 keys\n"
        "  params have a dict with 4 keys\n"
        "  keys only in params (2): 'mean', 'var'\n" + FIX_WRT,
    )


def test_nnx_model_in_place_of_its_state():
    raises_exactly(
        nnx_mask(NNX_PARAMS),
        NNX_MODEL,
        "mask does not match params at <root>:\n"
        "  mask has an nnx.State with 3 keys\n"
        "  params have a NnxNet module\n"
        "Fix: check the mask against the state optax is handed, check_mask(mask, "
        "nnx.state(model, F)) for nnx.Optimizer(model, tx, wrt=F).",
    )


def test_other_container_type():
    pair = collections.namedtuple("Pair", "first second")
    raises_exactly(
        pair(True, False),
        (jnp.ones(2), jnp.ones(2)),
        "mask does not match params at <root>:\n"
        "  mask has a Pair of length 2\n"
        "  params have a tuple of length 2\n"
        "Fix: build the mask from the same tree you hand optax, or pass a function "
        "(mask=lambda params: ...) so that optax builds it from what it gets.",
    )


def test_missing_keys_are_counted_past_a_handful():
    params = {f"Dense_{i}": {"kernel": jnp.ones((2, 2))} for i in range(8)}
    raises_exactly(
        {"Dense_0": True},
        params,
        "mask does not match params at <root>:\n"
        "  mask has a dict with 1 key\n"
        "  params have a dict with 8 keys\n"
        "  keys only in params (7): 'Dense_1', 'Dense_2', 'Dense_3', 'Dense_4', 'Dense_5', "
        "... (2 more)\n"
        "Fix: build the mask from the same tree you hand optax, mask = policy.for_flax(params) "
        "for tx.init(params), or pass mask=policy.for_flax so that optax builds it from what "
        "it gets.",
    )


def test_nnx_param_boxes_left_by_tree_map():
    raises_exactly(
        ndim_mask(NNX_PARAMS),
        NNX_PARAMS,
        "mask does not match params at backbone/bias:\n"
        "  mask has an nnx.Param holding False\n"
        "  params have a float32[4] jax.Array\n"
        "  (at tx.update: nnx.Optimizer hands optax nnx.as_pure(state), the arrays without "
        "their nnx.Variable boxes)\n"
        "Fix: build the mask as an nnx.State of plain bools, policy.for_flax(model) or "
        "nnx.map_state(lambda path, value: ..., state); jax.tree.map over nnx.state(...) keeps "
        "the nnx.Variable boxes, which fit tx.init but not tx.update.",
    )


def test_elementwise_array_leaf():
    raises_exactly(
        elementwise_mask(LINEN_PARAMS),
        LINEN_PARAMS,
        "mask does not match params at BatchNorm_0/bias:\n"
        "  mask has a bool[4] jax.Array\n"
        "  params have a float32[4] jax.Array\n"
        "  a mask leaf must be True or False: optax tests it with `if`, which fails for an "
        "array of 4 elements\n"
        "Fix: use policy.for_flax(params), or return bool(...) from the function you map over "
        "the params.",
    )


def test_nnx_array_leaf():
    mask = nnx.map_state(lambda path, value: jnp.full(value.shape, value.ndim > 1), NNX_PARAMS)
    raises_exactly(
        mask,
        NNX_PARAMS,
        "mask does not match params at backbone/bias:\n"
        "  mask has a bool[4] jax.Array\n"
        "  params have an nnx.Param holding a float32[4] jax.Array\n"
        "  a mask leaf must be True or False: optax tests it with `if`, which fails for an "
        "array of 4 elements\n"
        "Fix: build the mask as an nnx.State of plain bools: policy.for_flax(model), or "
        "nnx.map_state(lambda path, value: ..., state) returning True or False.",
    )


def test_non_bool_leaves_stricter_than_optax():
    # optax reads any truthy leaf as True; an int or a string there is almost never meant.
    mask = {"Dense_0": 1, "Dense_1": "no", "BatchNorm_0": False}
    assert optax_accepts(mask, LINEN_PARAMS)
    raises_exactly(
        mask,
        LINEN_PARAMS,
        "mask does not match params at Dense_0:\n"
        "  mask has the int 1\n"
        "  params have a dict with 2 keys\n"
        "  a mask leaf must be True or False: optax tests it with `if` and would read this "
        "one as True\n"
        "Fix: use policy.for_flax(params), or return bool(...) from the function you map over "
        "the params.",
    )


def test_traced_leaf():
    params = {"kernel": jnp.ones((2, 2))}

    def build_and_check(flag):
        check_mask({"kernel": flag}, params)
        return flag

    with pytest.raises(MaskMismatchError, match=re.escape("this one is traced; build the mask "
                                                          "outside jax.jit")):
        jax.jit(build_and_check)(jnp.array(True))


class Undecidable:
    def __bool__(self):
        raise RuntimeError("no truth value")


def test_leaf_without_a_truth_value():
    raises_exactly(
        {"kernel": Undecidable()},
        {"kernel": jnp.ones(2)},
        "mask does not match params at kernel:\n"
        "  mask has an Undecidable\n"
        "  params have a float32[2] jax.Array\n"
        "  a mask leaf must be True or False: optax tests it with `if`, which fails for this "
        "value\n"
        "Fix: use policy.for_flax(params), or return bool(...) from the function you map over "
        "the params.",
    )


FIX_BOXED = (
    "Fix: build the mask from the tree you hand optax, boxed or unboxed alike: both from "
    "params or both from nn.unbox(params)."
)


def test_boxed_mask_on_unboxed_params():
    raises_exactly(
        ndim_mask(BOXED_PARAMS),
        UNBOXED_PARAMS,
        "mask does not match params at Dense_0/kernel:\n"
        "  mask has an nn.Partitioned holding True\n"
        "  params have a float32[3,2] jax.Array\n" + FIX_BOXED,
    )


def test_boxes_with_other_axis_names():
    other = BoxedNet().init(jax.random.key(2), jnp.ones((1, 3)))["params"]
    other = jax.tree.map(
        lambda x: x.replace(names=(None, "data")) if isinstance(x, nn.Partitioned) else x,
        other,
        is_leaf=lambda x: isinstance(x, nn.Partitioned),
    )
    raises_exactly(
        ndim_mask(other),
        BOXED_PARAMS,
        "mask does not match params at Dense_0/kernel:\n"
        "  mask has an nn.Partitioned holding True\n"
        "  params have an nn.Partitioned holding a float32[3,2] jax.Array\n"
        "  same type, different static data: mask ((None, 'data'), None), params "
        "((None, 'model'), None)\n" + FIX_BOXED,
    )


def test_callable_mask_result_is_checked():
    raises_exactly(
        lambda params: [True, False],
        [jnp.ones(2)],
        "mask (as returned by the mask function) does not match params at <root>:\n"
        "  mask has a list of length 2\n"
        "  params have a list of length 1\n"
        "Fix: build the mask from the same tree you hand optax, or pass a function "
        "(mask=lambda params: ...) so that optax builds it from what it gets.",
    )


def test_tree_of_functions_is_called_by_optax():
    raises_exactly(
        {"Dense_0": len},
        LINEN_PARAMS,
        "mask does not match params at <root>:\n"
        "  mask has a dict with 1 key whose every leaf is a function\n"
        "  params have a dict with 3 keys\n"
        "  optax then calls the mask itself with the params, and it cannot be called\n"
        "Fix: pass one function of the params (mask=policy.for_equinox or "
        "mask=policy.for_flax), or a tree of bools.",
    )


def test_error_is_a_value_error():
    assert issubclass(MaskMismatchError, ValueError)


# ---------------------------------------------------------------------------- good masks


GOOD = [
    ("equinox_mask", lambda: POLICY.for_equinox(EQX_PARAMS), lambda: EQX_PARAMS),
    ("equinox_callable", lambda: POLICY.for_equinox, lambda: EQX_PARAMS),
    ("linen_dict", lambda: ndim_mask(LINEN_PARAMS), lambda: LINEN_PARAMS),
    ("linen_frozen", lambda: freeze(ndim_mask(LINEN_PARAMS)), lambda: freeze(LINEN_PARAMS)),
    ("linen_boxed", lambda: ndim_mask(BOXED_PARAMS), lambda: BOXED_PARAMS),
    ("nnx_state", lambda: nnx_mask(NNX_PARAMS), lambda: NNX_PARAMS),
    ("nnx_pure_state", lambda: nnx_mask(NNX_PARAMS), lambda: nnx.as_pure(NNX_PARAMS)),
    ("nnx_callable", lambda: nnx_mask, lambda: NNX_PARAMS),
]


@pytest.mark.parametrize(
    "make_mask, make_params", [case[1:] for case in GOOD], ids=[case[0] for case in GOOD]
)
def test_good_mask_passes_silently(make_mask, make_params):
    assert check_mask(make_mask(), make_params()) is None


def test_module_imports_no_jax():
    code = (
        "import sys\n"
        "from decaymask._check import MaskMismatchError\n"
        "print('jax' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
