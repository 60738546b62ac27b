"""The Flax NNX adapter, end to end through real optax steps and nnx.Optimizer."""

from __future__ import annotations

import doctest
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import flax.linen as nn
from flax import nnx

import decaymask as dm
from decaymask.adapters import _nnx
from helpers import (
    assert_depths_fit_paths,
    WEIGHT_DECAY,
    assert_bool_leaves,
    assert_decays_exactly,
    assert_same_tree,
    flat_with_paths,
    zero_grad_updates,
)

# Every test here builds its own models: nnx.Optimizer updates a model in place.

UNMATCHED = "ignore:.*matched no parameter:decaymask.PolicyWarning"


def nonzero(model):
    """Every param set to a distinct value in [0.5, 1.5): zero-initialised biases would
    look the same decayed or not."""
    params = nnx.to_flat_state(nnx.state(model, nnx.Param))
    for index, (_, variable) in enumerate(params):
        value = variable.get_value()
        if value is not None:
            draw = np.random.default_rng(index).uniform(0.5, 1.5, value.shape)
            variable.set_value(jnp.asarray(draw, value.dtype))
    return model


def key_of(part: str) -> str | int:
    return int(part) if part.isdigit() else part


def state_of(decays: dict[str, bool]) -> nnx.State:
    """The expected mask: an nnx.State of bools from canonical paths."""
    return nnx.from_flat_state(
        {tuple(key_of(part) for part in path.split("/")): value for path, value in decays.items()}
    )


def values_of(model: nnx.Module, wrt=nnx.Param) -> dict[str, np.ndarray]:
    return {
        "/".join(map(str, path)): np.asarray(variable.get_value())
        for path, variable in nnx.to_flat_state(nnx.state(model, wrt))
        if variable.get_value() is not None
    }


def assert_optimizer_decays(model, mask, decays: dict[str, bool], wrt=nnx.Param) -> None:
    """One nnx.Optimizer step with zero gradients: decayed params become exactly
    ``p + -(wd * p)``, the others stay as they were."""
    before = values_of(model, wrt)
    optimizer = nnx.Optimizer(
        model, optax.adamw(1.0, weight_decay=WEIGHT_DECAY, mask=mask), wrt=wrt
    )
    optimizer.update(model, jax.tree.map(jnp.zeros_like, nnx.state(model, wrt)))
    after = values_of(model, wrt)
    wrong = []
    for path, p in before.items():
        expected = p + -(WEIGHT_DECAY * p) if decays[path] else p
        if not np.array_equal(after[path], expected):
            wrong.append(f"{path}: decay={decays[path]}")
    assert not wrong, "nnx.Optimizer moved params against the mask:\n" + "\n".join(wrong)


def state_at_keys(model: nnx.Module, decays: dict[str, bool], wrt=nnx.Param) -> nnx.State:
    """The expected mask at the model's own keys (a key that is not a string, such as a
    WeightNorm's ``('kernel',)``, is written as its text in a canonical path)."""
    flat = nnx.to_flat_state(nnx.state(model, wrt))
    return nnx.from_flat_state([(p, decays["/".join(map(str, p))]) for p, _ in flat])


def assert_optax_decays(model, mask, decays: dict[str, bool], *, jit: bool = False) -> None:
    """A zero-gradient optax.adamw step on the raw arrays of nnx.state(model, nnx.Param)."""
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    updates = zero_grad_updates(params, mask, jit=jit)
    assert_decays_exactly(params, updates, flat_with_paths(state_at_keys(model, decays)))


def decays_of(report) -> dict[str, bool]:
    return {row.path: row.decay for row in report}


# Every NNX row of the kind table, one layer at a time.

TABLE = dm.Policy(
    dm.decay(param=("weight", "embedding")),
    dm.decay(layer=("lora", "prelu")),
    dm.decay(layer="layer_norm", param="bias"),
)


ROLE = {"bias": "bias", "kernel": "weight"}


def _recurrent(cls: str, gates: dict[str, tuple[str, ...]]) -> list[tuple]:
    return [
        (f"{gate}/{name}", "recurrent", cls, ROLE[name], name == "kernel")
        for gate, names in gates.items()
        for name in names
    ]


_LSTM_GATES = {
    **{g: ("bias", "kernel") for g in ("hf", "hg", "hi", "ho")},
    **{g: ("kernel",) for g in ("if_", "ig", "ii", "io")},
}

LAYERS = [
    ("linear", lambda r: nnx.Linear(3, 4, rngs=r), [
        ("bias", "linear", "Linear", "bias", False),
        ("kernel", "linear", "Linear", "weight", True),
    ]),
    ("linear_general", lambda r: nnx.LinearGeneral(3, (2, 2), rngs=r), [
        ("bias", "linear", "LinearGeneral", "bias", False),
        ("kernel", "linear", "LinearGeneral", "weight", True),
    ]),
    ("einsum", lambda r: nnx.Einsum("ab,bc->ac", (3, 4), (4,), rngs=r), [
        ("bias", "linear", "Einsum", "bias", False),
        ("kernel", "linear", "Einsum", "weight", True),
    ]),
    ("lora_linear", lambda r: nnx.LoRALinear(3, 4, lora_rank=2, rngs=r), [
        ("bias", "linear", "LoRALinear", "bias", False),
        ("kernel", "linear", "LoRALinear", "weight", True),
        ("lora/lora_a", "lora", "LoRA", "other", True),
        ("lora/lora_b", "lora", "LoRA", "other", True),
    ]),
    ("conv", lambda r: nnx.Conv(2, 3, kernel_size=(3, 3), rngs=r), [
        ("bias", "conv", "Conv", "bias", False),
        ("kernel", "conv", "Conv", "weight", True),
    ]),
    ("conv_transpose", lambda r: nnx.ConvTranspose(2, 3, kernel_size=(3,), rngs=r), [
        ("bias", "conv", "ConvTranspose", "bias", False),
        ("kernel", "conv", "ConvTranspose", "weight", True),
    ]),
    ("embed", lambda r: nnx.Embed(5, 3, rngs=r), [
        ("embedding", "embedding", "Embed", "embedding", True),
    ]),
    ("layer_norm", lambda r: nnx.LayerNorm(3, rngs=r), [
        ("bias", "layer_norm", "LayerNorm", "bias", True),
        ("scale", "layer_norm", "LayerNorm", "scale", False),
    ]),
    ("rms_norm", lambda r: nnx.RMSNorm(3, rngs=r), [
        ("scale", "rms_norm", "RMSNorm", "scale", False),
    ]),
    ("group_norm", lambda r: nnx.GroupNorm(4, num_groups=2, rngs=r), [
        ("bias", "group_norm", "GroupNorm", "bias", False),
        ("scale", "group_norm", "GroupNorm", "scale", False),
    ]),
    ("batch_norm", lambda r: nnx.BatchNorm(3, rngs=r), [
        ("bias", "batch_norm", "BatchNorm", "bias", False),
        ("scale", "batch_norm", "BatchNorm", "scale", False),
    ]),
    ("instance_norm", lambda r: nnx.InstanceNorm(3, rngs=r), [
        ("bias", "instance_norm", "InstanceNorm", "bias", False),
        ("scale", "instance_norm", "InstanceNorm", "scale", False),
    ]),
    ("multi_head_attention", lambda r: nnx.MultiHeadAttention(
        num_heads=2, in_features=4, qkv_features=4, decode=False, rngs=r
    ), [
        (f"{proj}/{name}", "linear", "LinearGeneral", role, name == "kernel")
        for proj in ("key", "out", "query", "value")
        for name, role in (("bias", "bias"), ("kernel", "weight"))
    ]),
    ("gru_cell", lambda r: nnx.GRUCell(2, 3, rngs=r),
     _recurrent("GRUCell", {"dense_h": ("kernel",), "dense_i": ("bias", "kernel")})),
    ("lstm_cell", lambda r: nnx.LSTMCell(2, 3, rngs=r), _recurrent("LSTMCell", _LSTM_GATES)),
    ("optimized_lstm_cell", lambda r: nnx.OptimizedLSTMCell(2, 3, rngs=r),
     _recurrent("OptimizedLSTMCell", {"dense_h": ("bias", "kernel"), "dense_i": ("kernel",)})),
    ("simple_cell", lambda r: nnx.SimpleCell(2, 3, rngs=r),
     _recurrent("SimpleCell", {"dense_h": ("kernel",), "dense_i": ("bias", "kernel")})),
    ("prelu", lambda r: nnx.PReLU(), [
        ("negative_slope", "prelu", "PReLU", "other", True),
    ]),
    ("lora", lambda r: nnx.LoRA(3, 2, 4, rngs=r), [
        ("lora_a", "lora", "LoRA", "other", True),
        ("lora_b", "lora", "LoRA", "other", True),
    ]),
    # Wrappers and RNN: the wrapped layer or the cell owns the arrays.
    ("weight_norm", lambda r: nnx.WeightNorm(nnx.Linear(3, 4, rngs=r), rngs=r), [
        ("layer_instance/bias", "linear", "Linear", "bias", False),
        ("layer_instance/kernel", "linear", "Linear", "weight", True),
    ]),
    ("rnn", lambda r: nnx.RNN(nnx.SimpleCell(2, 3, rngs=r)),
     [(f"cell/{p}", *rest) for p, *rest in
      _recurrent("SimpleCell", {"dense_h": ("kernel",), "dense_i": ("bias", "kernel")})]),
]


@pytest.mark.filterwarnings(UNMATCHED)
@pytest.mark.parametrize(
    "make, expected", [(m, e) for _, m, e in LAYERS], ids=[i for i, _, _ in LAYERS]
)
def test_every_layer_kind_role_and_mask(make, expected):
    model = nonzero(make(nnx.Rngs(0)))
    report = TABLE.explain(model)
    held = {path[0] for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    if isinstance(model, nnx.WeightNorm) and "scales" in held:
        # Newer Flax (0.12.12) keeps WeightNorm's gain as a param at init: a gain of the
        # wrapped layer, never decayed.
        expected = expected + [("scales/('kernel',)", "linear", "WeightNorm", "gain", False)]
    assert [(r.path, r.layer, r.layer_type, r.role, r.decay) for r in report] == expected
    assert {r.leaf.kind_source for r in report} == {"class"}
    decays = decays_of(report)
    mask = TABLE.for_flax(model)
    assert_bool_leaves(mask)
    assert_same_tree(mask, state_at_keys(model, decays))
    assert_optax_decays(model, mask, decays)
    assert_optimizer_decays(model, mask, decays)


def test_layer_attributes_give_the_rank_and_layout_of_one_layer():
    r = nnx.Rngs(0)
    rows = {
        (kind, row.leaf.name): (row.leaf.ndim, row.leaf.batch_axes, row.leaf.matrix_axes)
        for kind, layer in [
            ("linear", nnx.Linear(3, 4, rngs=r)),
            ("general", nnx.LinearGeneral((3, 2), (2, 2), axis=(-2, -1), rngs=r)),
            ("conv", nnx.Conv(2, 3, kernel_size=(3, 3), rngs=r)),
            ("transposed", nnx.ConvTranspose(2, 3, kernel_size=3, transpose_kernel=True, rngs=r)),
            ("embed", nnx.Embed(5, 3, rngs=r)),
            ("lora", nnx.LoRA(3, 2, 4, rngs=r)),
            ("prelu", nnx.PReLU()),
            ("einsum", nnx.Einsum("ab,bc->ac", (3, 4), (4,), rngs=r)),
        ]
        for row in dm.Policy().explain(layer)
    }
    assert rows == {
        ("linear", "bias"): (1, 0, None),
        ("linear", "kernel"): (2, 0, ((0,), (1,))),
        # Logical ranks: a LinearGeneral kernel is one matrix, its bias one vector.
        ("general", "bias"): (1, 0, None),
        ("general", "kernel"): (2, 0, ((0, 1), (2, 3))),
        ("conv", "bias"): (1, 0, None),
        ("conv", "kernel"): (4, 0, ((0, 1, 2), (3,))),
        ("transposed", "bias"): (1, 0, None),
        ("transposed", "kernel"): (3, 0, ((0, 2), (1,))),
        ("embed", "embedding"): (2, 0, ((0,), (1,))),
        ("lora", "lora_a"): (2, 0, ((0,), (1,))),
        ("lora", "lora_b"): (2, 0, ((0,), (1,))),
        ("prelu", "negative_slope"): (0, 0, None),
        ("einsum", "bias"): (1, 0, None),
        ("einsum", "kernel"): (2, 0, ((0,), (1,))),  # read off "ab,bc->ac"
    }


# A model with every layer, containers, and names that let the name reading succeed
# or fail.


class Block(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.ln = nnx.LayerNorm(4, rngs=rngs)
        self.mlp = nnx.Sequential(
            nnx.Linear(4, 8, rngs=rngs), nnx.relu, nnx.Linear(8, 4, rngs=rngs)
        )


class Zoo(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(6, 4, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(
            num_heads=2, in_features=4, qkv_features=4, decode=False, rngs=rngs
        )
        self.blocks = nnx.List([Block(rngs), Block(rngs)])
        self.proj_general = nnx.LinearGeneral(4, (2, 2), rngs=rngs)
        self.ein = nnx.Einsum("ab,bc->ac", (4, 4), (4,), rngs=rngs)
        self.conv = nnx.Conv(4, 4, kernel_size=(3,), rngs=rngs)
        self.up = nnx.ConvTranspose(4, 4, kernel_size=(3,), rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)
        self.gn = nnx.GroupNorm(4, num_groups=2, rngs=rngs)
        self.inorm = nnx.InstanceNorm(4, rngs=rngs)
        self.gru = nnx.GRUCell(4, 4, rngs=rngs)
        self.cell = nnx.SimpleCell(4, 4, rngs=rngs)
        self.lora_linear = nnx.LoRALinear(4, 4, lora_rank=2, rngs=rngs)
        self.act = nnx.PReLU()
        self.drop = nnx.Dropout(0.1, rngs=rngs)
        self.final_norm = nnx.RMSNorm(4, rngs=rngs)
        self.head = nnx.Linear(4, 6, rngs=rngs)


SEED = dm.Policy(
    dm.decay(layer=("linear", "conv", "recurrent"), param="weight"),
    dm.decay(layer="embedding"),
    dm.decay(layer="layer_norm", param="bias"),
)

_W = {"kernel": True, "bias": False}
ZOO_DECAYS = {
    "act/negative_slope": False,
    **{f"attn/{p}/{n}": d for p in ("key", "out", "query", "value") for n, d in _W.items()},
    "bn/bias": False,
    "bn/scale": False,
    **{
        f"blocks/{i}/{path}": d
        for i in (0, 1)
        for path, d in {
            "ln/bias": True,
            "ln/scale": False,
            **{f"mlp/layers/{j}/{n}": d for j in (0, 2) for n, d in _W.items()},
        }.items()
    },
    "cell/dense_h/kernel": True,
    "cell/dense_i/bias": False,
    "cell/dense_i/kernel": True,
    **{f"conv/{n}": d for n, d in _W.items()},
    "ein/bias": False,
    "ein/kernel": True,
    "embed/embedding": True,
    "final_norm/scale": False,
    "gn/bias": False,
    "gn/scale": False,
    "gru/dense_h/kernel": True,
    "gru/dense_i/bias": False,
    "gru/dense_i/kernel": True,
    **{f"head/{n}": d for n, d in _W.items()},
    "inorm/bias": False,
    "inorm/scale": False,
    **{f"lora_linear/{n}": d for n, d in _W.items()},
    "lora_linear/lora/lora_a": False,
    "lora_linear/lora/lora_b": False,
    **{f"proj_general/{n}": d for n, d in _W.items()},
    **{f"up/{n}": d for n, d in _W.items()},
}


def test_zoo_mask_is_an_nnx_state_of_bools_shaped_as_the_params():
    model = nonzero(Zoo(nnx.Rngs(0)))
    mask = SEED.for_flax(model)
    assert type(mask) is nnx.State
    assert_bool_leaves(mask)
    assert_same_tree(mask, state_of(ZOO_DECAYS))
    params = nnx.state(model, nnx.Param)
    assert jax.tree.structure(mask) == jax.tree.structure(nnx.map_state(lambda p, v: 0, params))
    # One report row per mask entry, in the mask's flattening order.
    report = SEED.explain(model)
    flat = jax.tree_util.tree_flatten_with_path(mask)[0]
    order = ["/".join(str(k.key) for k in path) for path, _ in flat]
    assert [row.path for row in report] == order
    assert decays_of(report) == ZOO_DECAYS


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_zoo_mask_through_optax(jit):
    model = nonzero(Zoo(nnx.Rngs(0)))
    assert_optax_decays(model, SEED.for_flax(model), ZOO_DECAYS, jit=jit)


def test_zoo_mask_through_nnx_optimizer():
    model = nonzero(Zoo(nnx.Rngs(0)))
    assert_optimizer_decays(model, SEED.for_flax(model), ZOO_DECAYS)


def test_containers_are_ancestors():
    model = nonzero(Zoo(nnx.Rngs(0)))
    rows = {row.path: row.leaf for row in SEED.explain(model)}

    def ancestry(path):
        return [(a.kind, a.type_name, a.source) for a in rows[path].ancestors]

    assert ancestry("blocks/1/mlp/layers/2/kernel") == [
        ("unknown", "Zoo", "name"),
        ("unknown", "List", "class"),
        ("unknown", "Block", "name"),
        ("unknown", "Sequential", "class"),
        ("unknown", "List", "class"),
    ]
    assert ancestry("attn/query/kernel") == [
        ("unknown", "Zoo", "name"),
        ("attention", "MultiHeadAttention", "class"),
    ]
    # The LoRA inside a LoRALinear: its own kind, the LoRALinear around it.
    assert ancestry("lora_linear/lora/lora_a")[-1] == ("linear", "LoRALinear", "class")
    # A cell owns its gates: no Linear between the cell and the model.
    assert (rows["gru/dense_h/kernel"].layer_type, ancestry("gru/dense_h/kernel")) == (
        "GRUCell",
        [("unknown", "Zoo", "name")],
    )
    within = dm.Policy(
        dm.decay(within=Block, param="weight"),
        dm.decay(within="attention", name="kernel"),
        dm.decay(layer="recurrent", param="weight"),
    )
    decayed = {path for path, d in decays_of(within.explain(model)).items() if d}
    assert decayed == {
        *(f"blocks/{i}/mlp/layers/{j}/kernel" for i in (0, 1) for j in (0, 2)),
        *(f"attn/{p}/kernel" for p in ("key", "out", "query", "value")),
        "gru/dense_h/kernel",
        "gru/dense_i/kernel",
        "cell/dense_h/kernel",
        "cell/dense_i/kernel",
    }
    # The cell's gates are not linear layers of their own.
    assert not dm.Policy(dm.decay(within=nnx.Linear)).explain(model.gru).decayed


class Holder(nnx.Module):
    def __init__(self):
        self.kernels = nnx.List([nnx.Param(jnp.ones((2, 3))), nnx.Param(jnp.ones((3, 2)))])
        self.gates = nnx.Dict(up=nnx.Param(jnp.ones(3)))


def test_variables_held_in_an_nnx_list_belong_to_the_module_holding_it():
    rows = dm.Policy(dm.decay(layer=Holder, param="weight")).explain(Holder())
    seen = [(r.path, r.leaf.name, r.layer_type, r.role, r.leaf.ancestors, r.decay) for r in rows]
    assert seen == [
        ("gates/up", "up", "Holder", "other", (), False),
        ("kernels/0", "kernels", "Holder", "weight", (), True),
        ("kernels/1", "kernels", "Holder", "weight", (), True),
    ]


# Stacked layers.


class Stackable(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.linear = nnx.Linear(2, 4, rngs=rngs)
        self.norm = nnx.LayerNorm(4, rngs=rngs)
        self.conv = nnx.Conv(2, 3, kernel_size=(3,), rngs=rngs)
        self.general = nnx.LinearGeneral(2, (2, 2), rngs=rngs)


def stacked(layers: int) -> Stackable:
    @nnx.split_rngs(splits=layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
        return Stackable(rngs)

    return nonzero(make(nnx.Rngs(0)))


def test_vmap_stacked_layers_have_batch_axes():
    model = stacked(3)
    rows = dm.Policy().explain(model)
    seen = [(r.path, r.shape, r.leaf.batch_axes, r.leaf.ndim, r.leaf.muon_axes()) for r in rows]
    assert seen == [
        ("conv/bias", (3, 3), 1, 1, None),
        ("conv/kernel", (3, 3, 2, 3), 1, 3, ((1, 2), (3,))),
        ("general/bias", (3, 2, 2), 1, 1, None),
        ("general/kernel", (3, 2, 2, 2), 1, 2, ((1,), (2, 3))),
        ("linear/bias", (3, 4), 1, 1, None),
        ("linear/kernel", (3, 2, 4), 1, 2, ((1,), (2,))),
        ("norm/bias", (3, 4), 1, 1, None),
        ("norm/scale", (3, 4), 1, 1, None),
    ]


def test_min_ndim_counts_one_layer_of_a_stack_by_classes_and_by_names():
    model = stacked(3)
    policy = dm.Policy(dm.decay(min_ndim=2))
    by_class = decays_of(policy.explain(model))
    assert by_class == {
        "conv/bias": False,
        "conv/kernel": True,
        "general/bias": False,  # a LinearGeneral's (2, 2) bias is one vector
        "general/kernel": True,
        "linear/bias": False,
        "linear/kernel": True,
        "norm/bias": False,
        "norm/scale": False,
    }
    # A State's arrays show the stack: every layer under the root agrees on one
    # leading axis of 3 (the LinearGeneral's arrays alone could be stacked once or
    # twice; its neighbours settle it).
    state = nnx.state(model, nnx.Param)
    assert decays_of(policy.explain(state)) == by_class
    assert {r.path: r.leaf.batch_axes for r in policy.explain(state)} == dict.fromkeys(by_class, 1)
    assert_optimizer_decays(model, policy.for_flax(model), by_class)
    assert_optimizer_decays(model, policy.for_flax, by_class)
    # Muon sees the layer axis as a batch axis either way.
    muon = dm.Policy(dm.decay(param="weight"))
    dims = dict(nnx.to_flat_state(muon.muon_dims_for_flax(state)))
    assert dims == dict(nnx.to_flat_state(muon.muon_dims_for_flax(model)))
    assert dims[("linear", "kernel")] == optax.contrib.MuonDimensionNumbers((1,), (2,))
    assert dims[("general", "kernel")] == optax.contrib.MuonDimensionNumbers((1,), (2, 3))


# Stacked blocks in a State (what nnx.Optimizer hands optax): the names' reading must
# find the stacking the module's classes show.

FEATURES, DEPTH = 3, 4  # a leading axis of 4 is the layer axis, never a feature axis


def vmapped(make_block, count: int, rngs: nnx.Rngs):
    """The NNX docs' pattern: split the rngs, vmap the block constructor."""

    @nnx.split_rngs(splits=count)
    @nnx.vmap(in_axes=0, out_axes=0)
    def make(rngs):
        return make_block(rngs)

    return make(rngs)


class StackBlock(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.ln = nnx.LayerNorm(FEATURES, rngs=rngs)
        self.fc = nnx.Linear(FEATURES, FEATURES, rngs=rngs)


class Expert(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.up = nnx.Linear(FEATURES, 5, rngs=rngs)
        self.down = nnx.Linear(5, FEATURES, rngs=rngs)


class ExpertBlock(nnx.Module):
    """An unrolled block holding a vmapped MLP: only the experts are stacked."""

    def __init__(self, rngs: nnx.Rngs):
        self.ln = nnx.LayerNorm(FEATURES, rngs=rngs)
        self.router = nnx.Linear(FEATURES, DEPTH, rngs=rngs)
        self.experts = vmapped(Expert, DEPTH, rngs)


class AttentionBlock(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.norm = nnx.RMSNorm(8, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=8, decode=False, rngs=rngs)
        self.up = nnx.LoRALinear(8, 16, lora_rank=2, rngs=rngs)
        self.mix = nnx.Einsum("ab,bc->ac", (8, 8), (8,), rngs=rngs)
        self.act = nnx.PReLU()


class StackNet(nnx.Module):
    def __init__(self, stacking: str, rngs: nnx.Rngs):
        self.embed = nnx.Embed(5, FEATURES, rngs=rngs)
        if stacking == "vmap":
            self.blocks = vmapped(StackBlock, DEPTH, rngs)
        elif stacking == "scan":

            @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))
            def grow(carry, key):
                return carry, StackBlock(nnx.Rngs(key))

            _, self.blocks = grow(0, jax.random.split(jax.random.key(1), DEPTH))
        elif stacking == "experts":
            self.blocks = nnx.List([ExpertBlock(rngs) for _ in range(2)])
        else:
            self.blocks = nnx.List([StackBlock(rngs) for _ in range(DEPTH)])
        self.ln_f = nnx.LayerNorm(FEATURES, rngs=rngs)
        self.head = nnx.Linear(FEATURES, 5, rngs=rngs)


def _parity_model():
    from parity import models

    return models.nnx_model()


def _blocks(path: str) -> bool:
    return path.startswith("blocks/")


def _experts(path: str) -> bool:
    return "/experts/" in path


# name -> (model factory, which paths are stacked)
STACKED_MODELS = {
    "vmap": (lambda: StackNet("vmap", nnx.Rngs(0)), _blocks),
    "scan": (lambda: StackNet("scan", nnx.Rngs(0)), _blocks),
    "experts": (lambda: StackNet("experts", nnx.Rngs(0)), _experts),
    "attention": (lambda: vmapped(AttentionBlock, DEPTH, nnx.Rngs(0)), lambda path: True),
    "stackable": (lambda: stacked(3), lambda path: True),
    "unrolled": (lambda: StackNet("unrolled", nnx.Rngs(0)), lambda path: False),
    "zoo": (lambda: Zoo(nnx.Rngs(0)), lambda path: False),
    "tower": (lambda: Tower(nnx.Rngs(0)), lambda path: False),
    "parity": (_parity_model, lambda path: False),
}
_built: dict[str, nnx.Module] = {}


def built(name: str) -> nnx.Module:
    """The model of ``STACKED_MODELS``, abstract (shapes are all a reading needs),
    built once."""
    if name not in _built:
        _built[name] = nnx.eval_shape(STACKED_MODELS[name][0])
    return _built[name]


NAMES_SAY_TOO_LITTLE = {
    "cell/dense_h/kernel", "cell/dense_i/bias", "cell/dense_i/kernel", "inorm/bias", "inorm/scale",
}
"""Zoo's arrays whose kinds names cannot tell (see the test comparing names and classes)."""


@pytest.mark.parametrize("name", list(STACKED_MODELS))
def test_state_reads_the_stacked_axes_the_module_reads(name):
    """The State's reading by names marks the arrays the module's classes mark, with
    the same count of stacked axes, and no others: for these models, every array."""
    model = built(name)
    by_class = _nnx.leaves(model)
    by_name = _nnx.leaves(nnx.state(model, nnx.Param))
    assert [leaf.path for leaf in by_name] == [leaf.path for leaf in by_class]
    assert [leaf.batch_axes for leaf in by_name] == [leaf.batch_axes for leaf in by_class]
    is_stacked = STACKED_MODELS[name][1]
    assert {leaf.path: leaf.batch_axes for leaf in by_name} == {
        leaf.path: int(is_stacked(leaf.path)) for leaf in by_class
    }
    # Kinds and roles are read from one layer's ranks: a stacked layer norm is a layer
    # norm (its scale is 2-D), a stacked linear layer no convolution (its kernel 3-D).
    # Only where names say too little (see the test above) do they differ.
    differ = {
        leaf.path
        for leaf, other in zip(by_name, by_class)
        if (leaf.layer, leaf.role, leaf.ndim) != (other.layer, other.role, other.ndim)
    }
    assert differ == (NAMES_SAY_TOO_LITTLE if name == "zoo" else set())


def _arrays(tree: dict) -> nnx.State:
    """A State of abstract arrays from nested dicts of shapes."""
    return nnx.State(
        jax.tree.map(
            lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32),
            tree,
            is_leaf=lambda x: isinstance(x, tuple),
        )
    )


def _batch_axes(state: nnx.State) -> dict[str, int]:
    return {leaf.path: leaf.batch_axes for leaf in _nnx.leaves(state)}


NORM = {"scale": (DEPTH, FEATURES), "bias": (DEPTH, FEATURES)}


@pytest.mark.parametrize(
    "tree, expected",
    [
        # Arrays of no known rank (a user's "w") are stacked with the layers they sit
        # among, where their leading sizes are the layers'.
        ({"blocks": {"norm": NORM, "mix": {"w": (DEPTH, 2, 2)}}},
         {"blocks/mix/w": 1, "blocks/norm/bias": 1, "blocks/norm/scale": 1}),
        # ... and not where they are not: the norm alone still shows its own stack.
        ({"blocks": {"norm": NORM, "mix": {"w": (5, 2, 2)}}},
         {"blocks/mix/w": 0, "blocks/norm/bias": 1, "blocks/norm/scale": 1}),
        # A layer whose arrays disagree shows nothing, and keeps the module around it
        # from agreeing: the array of no known rank beside it stays unmarked.
        ({"blocks": {"norm": {"scale": (DEPTH, FEATURES), "bias": (FEATURES,)},
                     "mix": {"w": (DEPTH, 2, 2)}}},
         {"blocks/mix/w": 0, "blocks/norm/bias": 0, "blocks/norm/scale": 0}),
        # Two stackings inside one module: each is its own (a norm per layer, a
        # vmapped expert pair per layer).
        ({"blocks": {"norm": NORM, "experts": {"kernel": (DEPTH, 2, 3, 5), "bias": (DEPTH, 2, 5)}}},
         {"blocks/experts/bias": 2, "blocks/experts/kernel": 2, "blocks/norm/bias": 1,
          "blocks/norm/scale": 1}),
        # A kernel (4, 4, 3) beside a bias (4, 3) is 4 stacked Linear(4, 3) or one
        # LinearGeneral(4, (4, 3)): names alone do not tell, and guess nothing ...
        ({"fc": {"kernel": (DEPTH, DEPTH, FEATURES), "bias": (DEPTH, FEATURES)}},
         {"fc/bias": 0, "fc/kernel": 0}),
        # ... but a layer norm beside it in one block settles it.
        ({"blocks": {"fc": {"kernel": (DEPTH, DEPTH, FEATURES), "bias": (DEPTH, FEATURES)},
                     "norm": NORM}},
         {"blocks/fc/bias": 1, "blocks/fc/kernel": 1, "blocks/norm/bias": 1, "blocks/norm/scale": 1}),
        # One layer's ranks, unstacked: a table, a linear layer, a conv and a norm.
        ({"embed": {"embedding": (5, FEATURES)}, "fc": {"kernel": (FEATURES, FEATURES), "bias": (FEATURES,)},
          "conv": {"kernel": (3, 2, FEATURES), "bias": (FEATURES,)}, "norm": {"scale": (FEATURES,)}},
         {"conv/bias": 0, "conv/kernel": 0, "embed/embedding": 0, "fc/bias": 0, "fc/kernel": 0,
          "norm/scale": 0}),
    ],
    ids=["unknown-rank-agrees", "unknown-rank-differs", "layer-disagrees", "nested-stacks",
         "linear-or-general", "settled-by-a-norm", "unstacked"],
)
def test_state_marks_a_module_stacked_only_where_its_arrays_agree(tree, expected):
    assert _batch_axes(_arrays(tree)) == expected


def test_state_leaves_a_stack_its_names_cannot_tell_unmarked():
    """Four stacked Linear(4, 3) alone: the module knows it is a stack, names see a
    LinearGeneral's arrays as well, and mark nothing."""
    model = nnx.eval_shape(lambda: vmapped(lambda r: nnx.Linear(DEPTH, FEATURES, rngs=r), DEPTH, nnx.Rngs(0)))
    assert _batch_axes(nnx.state(model, nnx.Param)) == {"bias": 0, "kernel": 0}
    assert {leaf.path: leaf.batch_axes for leaf in _nnx.leaves(model)} == {"bias": 1, "kernel": 1}


LADDER = dm.Policy(*dm.presets.standard().rules, dm.layer_decay(0.5))


@pytest.mark.parametrize("name", ["vmap", "scan", "experts", "unrolled"])
def test_layer_decay_of_a_state_of_stacked_blocks_is_the_modules(name):
    """What nnx.Optimizer hands optax (a State) gets the module's multipliers, leaf by
    leaf: one per layer along the stacked axis."""
    model = built(name)
    by_class = dict(nnx.to_flat_state(LADDER.lr_scales(model)))
    by_name = dict(nnx.to_flat_state(LADDER.lr_scales(nnx.state(model, nnx.Param))))
    assert by_name.keys() == by_class.keys()
    for path, scale in by_class.items():
        assert type(by_name[path]) is type(scale), path
        if isinstance(scale, np.ndarray):
            assert by_name[path].dtype == scale.dtype == np.float32, path
            np.testing.assert_array_equal(by_name[path], scale, err_msg=str(path))
        else:
            assert by_name[path] == scale, path
    if name in ("vmap", "scan"):
        # Blocks 0 to 3 of 4, then the final norm and head at 1, the embedding below.
        assert by_name[("blocks", "fc", "kernel")].shape == (DEPTH, 1, 1)
        np.testing.assert_array_equal(by_name[("blocks", "ln", "scale")].ravel(), np.float32([0.0625, 0.125, 0.25, 0.5]))
        assert (by_name[("embed", "embedding")], by_name[("head", "kernel")]) == (0.03125, 1.0)


@pytest.mark.parametrize("name", ["vmap", "scan"])
def test_wrapped_adamw_steps_stacked_blocks_through_nnx_optimizer(name):
    """policy.wrap(optax.adamw(..., mask=policy.mask)) in nnx.Optimizer, with no full=:
    it initialises on the State it is handed, and one zero-gradient step moves each
    decayed array by exactly -weight_decay * multiplier * p, each layer of the stack by
    its own multiplier; the others not at all."""
    model = nonzero(STACKED_MODELS[name][0]())
    scales = dict(nnx.to_flat_state(LADDER.lr_scales(model)))
    decays = {row.path: row.decay for row in LADDER.explain(model)}
    before = values_of(model)
    tx = LADDER.wrap(optax.adamw(1.0, weight_decay=WEIGHT_DECAY, mask=LADDER.mask))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    optimizer.update(model, jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param)))
    after = values_of(model)
    wrong = []
    for path, p in before.items():
        scale = scales[tuple(key_of(part) for part in path.split("/"))]
        expected = p + -(WEIGHT_DECAY * p) * scale if decays[path] else p
        if not np.array_equal(after[path], expected):
            wrong.append(path)
    assert not wrong, wrong
    # The stacked kernel decays, each layer by its own multiplier.
    assert decays["blocks/fc/kernel"]
    np.testing.assert_array_equal(
        scales[("blocks", "fc", "kernel")].ravel(), np.float32([0.0625, 0.125, 0.25, 0.5])
    )


# Shared variables.


class Tied(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, head: str = "head"):
        self.embed = nnx.Embed(4, 4, rngs=rngs)
        setattr(self, head, nnx.Linear(4, 4, use_bias=False, rngs=rngs))
        getattr(self, head).kernel = self.embed.embedding


def test_tied_variable_is_listed_once_with_the_other_view_shared():
    model = nonzero(Tied(nnx.Rngs(0)))
    assert nnx.find_duplicates(model) == [[("embed", "embedding"), ("head", "kernel")]]
    policy = dm.Policy(dm.decay(param=("weight", "embedding")))
    [row] = policy.explain(model)
    assert (row.path, row.layer, row.role, row.decay, row.conflicts) == (
        "embed/embedding", "embedding", "embedding", True, ()
    )
    [view] = row.leaf.shared_with
    assert (view.path, view.layer, view.layer_type, view.role) == (
        "head/kernel", "linear", "Linear", "weight"
    )
    mask = policy.for_flax(model)
    assert_same_tree(mask, state_of({"embed/embedding": True}))
    assert_optax_decays(model, mask, {"embed/embedding": True})
    assert_optimizer_decays(model, mask, {"embed/embedding": True})


def test_tied_variable_with_disagreeing_owners_is_reported():
    model = nonzero(Tied(nnx.Rngs(0)))
    policy = dm.Policy(dm.decay(layer="embedding"))
    [row] = policy.explain(model)
    [conflict] = row.conflicts
    assert (row.decay, conflict.path, conflict.decay, conflict.reason) == (
        True, "head/kernel", False, "default"
    )
    assert "[shared with head/kernel, where default would say no decay]" in row.why
    with pytest.warns(dm.PolicyWarning, match="embed/embedding is shared with head/kernel"):
        mask = policy.for_flax(model)
    # The array follows its first path.
    assert_same_tree(mask, state_of({"embed/embedding": True}))
    assert_optimizer_decays(model, mask, {"embed/embedding": True})


def test_tied_variable_is_decided_at_its_first_path():
    # "a_head" sorts before "embed": nnx.state lists the array as the head's kernel.
    model = nonzero(Tied(nnx.Rngs(0), head="a_head"))
    policy = dm.Policy(dm.decay(layer="embedding"))
    [row] = policy.explain(model)
    assert (row.path, row.layer, row.decay) == ("a_head/kernel", "linear", False)
    assert [(v.path, v.layer) for v in row.leaf.shared_with] == [("embed/embedding", "embedding")]
    with pytest.warns(dm.PolicyWarning, match="a_head/kernel is shared with embed/embedding"):
        mask = policy.for_flax(model)
    assert_same_tree(mask, state_of({"a_head/kernel": False}))


def test_shared_module_gives_a_view_of_each_of_its_variables():
    class Twice(nnx.Module):
        def __init__(self, rngs):
            self.first = nnx.Linear(2, 2, rngs=rngs)
            self.second = self.first
            self.back = self  # a cycle: walked once

    model = Twice(nnx.Rngs(0))
    leaves = _nnx.leaves(model)
    assert [(x.path, [v.path for v in x.shared_with]) for x in leaves] == [
        ("first/bias", ["second/bias"]),
        ("first/kernel", ["second/kernel"]),
    ]
    mask = dm.Policy(dm.decay(param="weight")).for_flax(model)
    assert_same_tree(mask, state_of({"first/bias": False, "first/kernel": True}))


# State, other variables, other selections.


class Normed(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.linear = nnx.Linear(3, 4, rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)


def test_batch_stats_and_rng_state_in_the_selection_are_never_decayed():
    model = nonzero(Normed(nnx.Rngs(0)))
    everything = dm.Policy(default=True)
    report = everything.explain(model, wrt=nnx.Variable)
    assert [(r.path, r.layer, r.dtype, r.decay, r.reason) for r in report] == [
        ("bn/bias", "batch_norm", "float32", True, "default"),
        ("bn/mean", "batch_norm", "float32", False, "state: never decayed"),
        ("bn/scale", "batch_norm", "float32", True, "default"),
        ("bn/var", "batch_norm", "float32", False, "state: never decayed"),
        ("drop/rngs/count", "unknown", "uint32", False, "state: never decayed"),
        ("drop/rngs/key", "unknown", "key<fry>", False, "state: never decayed"),
        ("linear/bias", "linear", "float32", True, "default"),
        ("linear/kernel", "linear", "float32", True, "default"),
    ]
    wrt = (nnx.Param, nnx.BatchStat)
    mask = everything.for_flax(model, wrt=wrt)
    decays = {
        "bn/bias": True, "bn/mean": False, "bn/scale": True, "bn/var": False,
        "linear/bias": True, "linear/kernel": True,
    }
    assert_same_tree(mask, state_of(decays))
    assert_optimizer_decays(model, mask, decays, wrt=wrt)
    # A callable mask sees raw arrays at update: running statistics are known by name.
    raw = nnx.as_pure(nnx.state(model, wrt))
    assert [r.path for r in everything.explain(raw) if not r.leaf.is_param] == ["bn/mean", "bn/var"]
    assert_optimizer_decays(nonzero(Normed(nnx.Rngs(0))), everything.for_flax, decays, wrt=wrt)


def test_lora_params_only():
    model = nonzero(Zoo(nnx.Rngs(0)))
    policy = dm.Policy(dm.decay(layer="lora"))
    mask = policy.for_flax(model, wrt=nnx.LoRAParam)
    decays = {"lora_linear/lora/lora_a": True, "lora_linear/lora/lora_b": True}
    assert_same_tree(mask, state_of(decays))
    assert jax.tree.structure(mask) == jax.tree.structure(
        nnx.map_state(lambda p, v: 0, nnx.state(model, nnx.LoRAParam))
    )
    kernel = np.asarray(model.lora_linear.kernel.get_value())
    assert_optimizer_decays(model, mask, decays, wrt=nnx.LoRAParam)
    assert_optimizer_decays(model, policy.for_flax, decays, wrt=nnx.LoRAParam)
    assert np.array_equal(model.lora_linear.kernel.get_value(), kernel)


def test_default_selection_counts_lora_params_as_params():
    model = nnx.LoRALinear(3, 4, lora_rank=2, rngs=nnx.Rngs(0))
    assert [r.path for r in _nnx.leaves(model)] == ["bias", "kernel", "lora/lora_a", "lora/lora_b"]


@pytest.mark.filterwarnings(UNMATCHED)
def test_path_filters_select_like_nnx_state():
    model = nonzero(Zoo(nnx.Rngs(0)))
    wrt = nnx.All(nnx.Param, nnx.PathContains("blocks"))
    mask = SEED.for_flax(model, wrt=wrt)
    decays = {p: d for p, d in ZOO_DECAYS.items() if p.startswith("blocks/")}
    assert_same_tree(mask, state_of(decays))
    assert_optimizer_decays(model, mask, decays, wrt=wrt)


def test_abstract_model_gives_the_real_models_mask():
    abstract = nnx.eval_shape(lambda: Zoo(nnx.Rngs(0)))
    assert isinstance(abstract.head.kernel.get_value(), jax.ShapeDtypeStruct)
    real = nonzero(Zoo(nnx.Rngs(0)))
    assert_same_tree(SEED.for_flax(abstract), SEED.for_flax(real))

    def rows(model):
        return [
            (r.path, r.layer, r.layer_type, r.role, r.shape, r.dtype, r.decay)
            for r in SEED.explain(model)
        ]

    assert rows(abstract) == rows(real)


def test_variable_holding_none_gets_false():
    class Optional(nnx.Module):
        def __init__(self, rngs):
            self.linear = nnx.Linear(2, 2, rngs=rngs)
            self.extra = nnx.Param(None)

    model = nonzero(Optional(nnx.Rngs(0)))
    policy = dm.Policy(default=True)
    row = policy.explain(model)[0]
    assert (row.path, row.shape, row.decay, row.reason, row.leaf.size) == (
        "extra", (0,), False, "state: never decayed", 0
    )
    mask = policy.for_flax(model)
    decays = {"extra": False, "linear/bias": True, "linear/kernel": True}
    assert_same_tree(mask, state_of(decays))
    assert policy.labels_for_flax(model)["extra"] == "no_decay"
    assert_optimizer_decays(model, mask, decays)


# Callable masks: what optax and nnx.Optimizer hand them.


def test_callable_mask_sees_variables_at_init_and_raw_arrays_at_update():
    model = nonzero(Zoo(nnx.Rngs(0)))
    handed = []

    def recording(tree):
        handed.append(tree)
        return SEED.for_flax(tree)

    # optax hands over no classes: a callable mask reads names (see the comparison below).
    by_name = decays_of(SEED.explain(nnx.state(model, nnx.Param)))
    assert by_name != ZOO_DECAYS
    assert_optimizer_decays(model, recording, by_name)
    init, update = handed
    assert type(init) is nnx.State and type(update) is nnx.State
    init_paths = jax.tree_util.tree_flatten_with_path(init)[0]
    assert all(path[-1] == jax.tree_util.GetAttrKey("value") for path, _ in init_paths)
    boxes = jax.tree.leaves(init, is_leaf=lambda x: isinstance(x, nnx.Variable))
    assert {type(v) for v in boxes} == {nnx.Param, nnx.LoRAParam}
    update_paths = jax.tree_util.tree_flatten_with_path(update)[0]
    assert all(isinstance(path[-1], jax.tree_util.DictKey) for path, _ in update_paths)
    assert all(isinstance(v, jax.Array) for v in jax.tree.leaves(update))
    # Both are read by name, and agree with each other.
    assert_same_tree(SEED.for_flax(init), SEED.for_flax(update))


def test_callable_mask_under_nnx_jit():
    model = nonzero(Zoo(nnx.Rngs(0)))
    optimizer = nnx.Optimizer(
        model, optax.adamw(1.0, weight_decay=WEIGHT_DECAY, mask=SEED.for_flax), wrt=nnx.Param
    )
    before = values_of(model)

    @nnx.jit
    def step(model, optimizer):
        optimizer.update(model, jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param)))

    step(model, optimizer)
    after = values_of(model)
    for path, decayed in decays_of(SEED.explain(nnx.state(model, nnx.Param))).items():
        p = before[path]
        assert np.array_equal(after[path], p + -(WEIGHT_DECAY * p) if decayed else p), path


def test_callable_mask_on_raw_arrays_through_optax():
    model = nonzero(Zoo(nnx.Rngs(0)))
    by_name = decays_of(SEED.explain(nnx.state(model, nnx.Param)))
    assert_optax_decays(model, SEED.for_flax, by_name)
    assert_optax_decays(model, SEED.for_flax, by_name, jit=True)


# Names only (a State) against classes (the module).


def test_names_agree_with_classes_except_where_a_name_says_too_little():
    model = nonzero(Zoo(nnx.Rngs(0)))
    by_class = {r.path: (r.layer, r.role, r.decay) for r in SEED.explain(model)}
    state_report = SEED.explain(nnx.state(model, nnx.Param))
    by_name = {r.path: (r.layer, r.role, r.decay) for r in state_report}
    assert {r.leaf.kind_source for r in state_report} == {"name", "content"}
    assert {r.layer_type for r in state_report} == {None}
    assert by_name.keys() == by_class.keys()
    differ = {p: (by_class[p], by_name[p]) for p in by_class if by_class[p] != by_name[p]}
    assert differ == {
        # "inorm" says nothing: scale beside bias reads as a layer norm ("gn" says
        # group norm).
        "inorm/bias": (("instance_norm", "bias", False), ("layer_norm", "bias", True)),
        "inorm/scale": (("instance_norm", "scale", False), ("layer_norm", "scale", False)),
        # "cell" does not name a recurrent cell: its gates read as linear layers
        # (the GRUCell named "gru" is recognised).
        "cell/dense_h/kernel": (("recurrent", "weight", True), ("linear", "weight", True)),
        "cell/dense_i/bias": (("recurrent", "bias", False), ("linear", "bias", False)),
        "cell/dense_i/kernel": (("recurrent", "weight", True), ("linear", "weight", True)),
    }
    # Everything else, 44 of 49 arrays, agrees on kind, role and decision.
    assert len(by_class) - len(differ) == 44


def test_state_mask_keeps_the_states_containers():
    model = nonzero(Zoo(nnx.Rngs(0)))
    params = nnx.state(model, nnx.Param)
    for tree in (params, nnx.as_pure(params)):
        mask = SEED.for_flax(tree)
        assert_bool_leaves(mask)
        assert jax.tree.structure(mask) == jax.tree.structure(nnx.map_state(lambda p, v: 0, tree))
    # A State's own nesting, even one nnx.state would not make, comes back unchanged.
    nested = nnx.State({"outer": nnx.State({"dense": {"kernel": jnp.ones((2, 2))}})})
    mask = dm.Policy(dm.decay(layer="linear")).for_flax(nested)
    assert jax.tree.structure(mask) == jax.tree.structure(jax.tree.map(lambda _: True, nested))
    assert mask["outer"]["dense"]["kernel"] is True


# Layers decaymask does not know.


def test_unknown_module_and_names_evident_classes():
    class Scaler(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.ones((2, 2)))
            self.offset = nnx.Param(jnp.zeros(2))

    class LlamaRMSNorm(nnx.Module):
        def __init__(self):
            self.scale = nnx.Param(jnp.ones(2))

    class FinalNorm(nnx.Module):
        def __init__(self):
            self.scale = nnx.Param(jnp.ones(2))
            self.bias = nnx.Param(jnp.zeros(2))

    class MyLayerNorm(nnx.LayerNorm):
        pass

    model = nonzero(
        nnx.List([Scaler(), LlamaRMSNorm(), FinalNorm(), MyLayerNorm(2, rngs=nnx.Rngs(0))])
    )
    policy = dm.Policy(dm.decay(param="weight"), dm.decay(layer="layer_norm", param="bias"))
    rows = policy.explain(model)
    assert [(r.path, r.layer, r.layer_type, r.leaf.kind_source, r.role, r.decay) for r in rows] == [
        ("0/offset", "unknown", "Scaler", "name", "bias", False),
        ("0/w", "unknown", "Scaler", "name", "weight", True),
        ("1/scale", "rms_norm", "LlamaRMSNorm", "name", "scale", False),
        ("2/bias", "layer_norm", "FinalNorm", "name", "bias", True),
        ("2/scale", "layer_norm", "FinalNorm", "name", "scale", False),
        ("3/bias", "layer_norm", "MyLayerNorm", "class", "bias", True),
        ("3/scale", "layer_norm", "MyLayerNorm", "class", "scale", False),
    ]
    unknown = "layers of unknown kind own parameters (Scaler: 0/offset, 0/w)"
    with pytest.warns(dm.PolicyWarning, match=re.escape(unknown)):
        mask = policy.for_flax(model)
    assert_optimizer_decays(model, mask, decays_of(rows))


def test_registered_classes_take_precedence():
    class Projection(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.ones((2, 3)))
            self.offset = nnx.Param(jnp.zeros(3))

    class FancyLinear(nnx.Linear):
        pass

    model = nnx.Dict(proj=Projection(), fancy=FancyLinear(2, 2, rngs=nnx.Rngs(0)))
    dm.register_layer(
        Projection, "linear", roles={"offset": "bias"}, matrix_axes={"w": ((0,), (1,))}
    )
    dm.register_layer(FancyLinear, "conv")
    try:
        rows = SEED.explain(model)
        seen = [
            (r.path, r.layer, r.leaf.kind_source, r.role, r.leaf.matrix_axes, r.decay)
            for r in rows
        ]
        assert seen == [
            ("fancy/bias", "conv", "registered", "bias", None, False),
            ("fancy/kernel", "conv", "registered", "weight", None, True),
            ("proj/offset", "linear", "registered", "bias", None, False),
            ("proj/w", "linear", "registered", "weight", ((0,), (1,)), True),
        ]
    finally:
        dm.unregister_layer(Projection)
        dm.unregister_layer(FancyLinear)
    # Unregistered, Projection is a class decaymask does not know: unknown via its name.
    assert [r.leaf.kind_source for r in SEED.explain(model)] == ["class", "class", "name", "name"]


# Errors.


def test_error_for_a_filter_that_is_not_one():
    model = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match=re.escape(
        "for_flax(..., wrt=3): expected a Variable type (nnx.Param, nnx.LoRAParam, "
        "nnx.BatchStat, ...), a tag string, nnx.PathContains(...), nnx.All/Any/Not(...), "
        "a callable (path, value) -> bool, ..., True/False, or a tuple of those; got int."
    )):
        SEED.for_flax(model, wrt=3)
    with pytest.raises(TypeError, match=re.escape("for_flax(..., wrt=3.5): expected a Variable")):
        SEED.for_flax(model, wrt=(nnx.Param, 3.5))


def test_error_for_a_module_class_as_filter():
    model = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match=re.escape(
        "for_flax(..., wrt=Linear): Linear is a module class, but wrt= selects variables. "
        "Select the variable type it holds (wrt=nnx.Param) or its path "
        "(wrt=nnx.PathContains('name'))."
    )):
        SEED.for_flax(model, wrt=nnx.Linear)


def test_error_for_a_filter_with_a_state():
    state = nnx.state(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), nnx.Param)
    with pytest.raises(ValueError, match=re.escape(
        "for_flax(state, wrt=<class 'flax.nnx.variablelib.Param'>): an nnx.State is already "
        "a selection of variables, so wrt= does not apply to it. Pass the module, "
        "for_flax(model, wrt=...), or select first: for_flax(nnx.state(model, ...))."
    )):
        SEED.for_flax(state, wrt=nnx.Param)


def test_error_for_linen_arguments():
    model = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match=re.escape(
        "for_flax(..., module=..., args=...): an nnx.Module or nnx.State takes only wrt= "
        "(the filter of the variables the optimizer updates); module=, args= and kwargs= "
        "are for Linen params."
    )):
        SEED.for_flax(model, module=model, args=(jnp.ones((1, 2)),))


def test_error_for_something_else():
    with pytest.raises(TypeError, match=re.escape(
        "leaves: expected an nnx.Module or an nnx.State, got list. For Linen params pass "
        "the params mapping; for an Equinox model use policy.for_equinox(model)."
    )):
        _nnx.leaves([nnx.Linear(2, 2, rngs=nnx.Rngs(0))])


def test_error_for_a_variable_holding_no_array():
    model = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
    model.tag = nnx.Param("abc")
    with pytest.raises(TypeError, match=re.escape(
        "for_flax: 'tag' is an nnx.Param holding 'abc' (str); expected an array, a "
        "jax.ShapeDtypeStruct, a Python number or None. Keep other values out of the "
        "selected variables: a plain attribute, or a Variable type that wrt= does not select."
    )):
        SEED.for_flax(model)
    # Not selected, not read.
    assert len(_nnx.leaves(model, wrt=nnx.PathContains("kernel"))) == 1
    with pytest.raises(TypeError, match=re.escape("for_flax: 'layer/tag' is a leaf holding 'abc'")):
        SEED.for_flax(nnx.State({"layer": {"tag": "abc"}}))


def test_docstring_examples_run():
    result = doctest.testmod(_nnx, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def test_keys_holding_a_slash_give_distinct_escaped_paths():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.layers = nnx.Dict({"a/b": nnx.Linear(2, 2, rngs=rngs),
                                    "5%": nnx.Linear(2, 2, rngs=rngs)})
            self.a = nnx.Dict({"b": nnx.Linear(2, 2, rngs=rngs)})

    model = Net(nnx.Rngs(0))
    policy = dm.Policy(dm.decay(param="weight"))
    expected = ["a/b/bias", "a/b/kernel", "layers/5%25/bias", "layers/5%25/kernel",
                "layers/a%2Fb/bias", "layers/a%2Fb/kernel"]
    assert sorted(row.path for row in policy.explain(model)) == expected
    assert sorted(row.path for row in policy.explain(nnx.state(model, nnx.Param))) == expected
    mask = dm.Policy(dm.decay(path="layers/a%2Fb/*")).for_flax(model)
    assert mask["layers"]["a/b"]["kernel"] and not mask["layers"]["5%"]["kernel"]
    assert not mask["a"]["b"]["kernel"]


# Kinds read off class names are checked against what the instance owns.


class SimpleNorm2d(nnx.Module):
    def __init__(self):
        self.weight = nnx.Param(jnp.ones(4))


class Conv1D(nnx.Module):
    """Named as a convolution, but its weight is an (out, in) matrix."""

    def __init__(self):
        self.weight = nnx.Param(jnp.ones((4, 3)))
        self.bias = nnx.Param(jnp.ones(4))


class EncoderStableLayerNorm(nnx.Module):
    def __init__(self):
        self.conv = Conv1D()
        self.norm = SimpleNorm2d()


def test_class_name_kinds_are_checked_against_content():
    model = nonzero(EncoderStableLayerNorm())
    policy = dm.Policy(dm.decay(layer="linear", param="weight"), dm.no_decay(within="layer_norm"))
    rows = policy.explain(model)
    assert [
        (r.path, r.layer, r.leaf.kind_source, r.role, [a.type_name for a in r.leaf.ancestors], r.decay)
        for r in rows
    ] == [
        # A conv by name, a linear layer by its 2-D weight.
        ("conv/bias", "linear", "content", "bias", ["EncoderStableLayerNorm"], False),
        ("conv/weight", "linear", "content", "weight", ["EncoderStableLayerNorm"], True),
        # A norm by name, its weight a scale.
        ("norm/weight", "rms_norm", "name", "scale", ["EncoderStableLayerNorm"], False),
    ]
    # The outer module owns only submodules: its name does not make it a norm.
    assert rows[0].leaf.ancestors[0].kind == "unknown"
    with pytest.warns(dm.PolicyWarning, match=r"no_decay\(within='layer_norm'\) matched no parameter"):
        mask = policy.for_flax(model)
    assert_optimizer_decays(model, mask, decays_of(rows))
    with pytest.raises(ValueError, match="matrix layout"):
        dm.presets.muon().muon_dims_for_flax(model)


# A State: names and ranks read by the shared inference.


def test_state_names_are_checked_against_the_arrays_they_hold():
    state = nnx.State(
        {
            # A ViT's patch embedding is a convolution: its kernel is 4-D.
            "patch_embeddings": {"kernel": jnp.ones((4, 4, 3, 8)), "bias": jnp.ones(8)},
            "position_embeddings": {"embedding": jnp.ones((5, 8))},
            # A fused Linear + BatchNorm block: a matrix beside a scale is no layer norm.
            "block": {"w": jnp.ones((8, 8)), "b": jnp.ones(8), "scale": jnp.ones(8), "bias": jnp.ones(8)},
            "final_norm": {"scale": jnp.ones(8)},
        }
    )
    policy = dm.presets.standard()
    rows = policy.explain(state)
    assert [(r.path, r.layer, r.leaf.kind_source, r.role, r.decay) for r in rows] == [
        ("block/b", "unknown", "content", "bias", False),
        ("block/bias", "unknown", "content", "bias", False),
        ("block/scale", "unknown", "content", "scale", False),
        ("block/w", "unknown", "content", "weight", True),
        ("final_norm/scale", "rms_norm", "name", "scale", False),
        ("patch_embeddings/bias", "conv", "content", "bias", False),
        ("patch_embeddings/kernel", "conv", "content", "weight", True),
        ("position_embeddings/embedding", "embedding", "name", "position", False),
    ]
    with pytest.warns(dm.PolicyWarning, match="block/b"):
        mask = policy.for_flax(state)
    assert jax.tree.leaves(mask) == [r.decay for r in rows]
    with pytest.warns(dm.PolicyWarning, match="block/b"):
        dims = nnx.to_flat_state(dm.Policy(dm.decay(layer="conv", param="weight")).muon_dims_for_flax(state))
    assert dict(dims)[("patch_embeddings", "kernel")] == optax.contrib.MuonDimensionNumbers((0, 1, 2), (3,))


def test_state_kernel_named_linear_with_conv_rank_is_ambiguous():
    # A bias of one layer's rank beside the kernel: no stack of linear layers.
    state = nnx.State({"dense": {"kernel": jnp.ones((3, 4, 5)), "bias": jnp.ones((5,))}})
    rows = dm.Policy(dm.decay(param="weight")).explain(state)
    assert [(r.path, r.layer, r.leaf.kind_source) for r in rows] == [
        ("dense/bias", "conv", "ambiguous"),
        ("dense/kernel", "conv", "ambiguous"),
    ]
    # No layout is guessed for it (a warning about the contradiction may come too).
    with pytest.raises(ValueError, match="matrix layout"), warnings.catch_warnings():
        warnings.simplefilter("ignore", dm.PolicyWarning)
        dm.Policy(dm.decay(param="weight")).muon_dims_for_flax(state)


# A Linen module bridged into NNX, raw arrays, and the two NNX paths side by side.


class LinenTower(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(10, 8)(tokens)
        x = nn.LayerNorm()(x)
        return nn.Dense(4)(x)


def test_bridged_linen_module_is_read_by_its_linen_names():
    model = nnx.bridge.ToNNX(LinenTower(), rngs=nnx.Rngs(0))
    nnx.bridge.lazy_init(model, jnp.zeros((1, 3), jnp.int32))
    nonzero(model)
    policy = dm.presets.standard()
    rows = policy.explain(model)
    assert [(r.path, r.layer, r.leaf.kind_source, r.role, r.decay) for r in rows] == [
        ("Dense_0/bias", "linear", "name", "bias", False),
        ("Dense_0/kernel", "linear", "name", "weight", True),
        ("Embed_0/embedding", "embedding", "name", "embedding", False),
        ("LayerNorm_0/bias", "layer_norm", "name", "bias", False),
        ("LayerNorm_0/scale", "layer_norm", "name", "scale", False),
    ]
    assert {tuple(a.type_name for a in r.leaf.ancestors) for r in rows} == {("ToNNX",)}
    # The State path reads the same names: both decide alike.
    state_rows = policy.explain(nnx.state(model, nnx.Param))
    assert [(r.path, r.layer, r.role, r.decay) for r in state_rows] == [
        (r.path, r.layer, r.role, r.decay) for r in rows
    ]
    # No warning (no register_layer(ToNNX, ...) hint): every rule matches.
    mask = policy.for_flax(model)
    assert_optimizer_decays(model, mask, decays_of(rows))


class WithRawArray(nnx.Module):
    def __init__(self, rngs):
        self.linear = nnx.Linear(3, 3, rngs=rngs)
        self.mix = jnp.full((3, 3), 0.5)  # a raw array attribute, no Variable type


def test_raw_array_attributes_selected_by_wrt_are_decided_like_params():
    model = WithRawArray(nnx.Rngs(0))
    policy = dm.Policy(dm.decay(), dm.no_decay(param="bias"))
    rows = policy.explain(model, wrt=...)
    assert [(r.path, r.role, r.leaf.is_param, r.decay) for r in rows] == [
        ("linear/bias", "bias", True, False),
        ("linear/kernel", "weight", True, True),
        ("mix", "other", True, True),
    ]
    # The State of the same selection decides the same.
    assert [r.decay for r in policy.explain(nnx.state(model, ...))] == [r.decay for r in rows]
    with pytest.warns(dm.PolicyWarning, match=re.escape("(WithRawArray: mix)")):
        mask = policy.for_flax(model, wrt=...)
    before = np.asarray(model.mix)
    optimizer = nnx.Optimizer(model, optax.adamw(1.0, weight_decay=WEIGHT_DECAY, mask=mask), wrt=...)
    optimizer.update(model, jax.tree.map(jnp.zeros_like, nnx.state(model, ...)))
    np.testing.assert_array_equal(np.asarray(model.mix), before - WEIGHT_DECAY * before)


class Gate(nnx.Module):
    def __init__(self):
        self.w = nnx.Param(jnp.ones((4, 4)))
        self.offset = nnx.Param(jnp.zeros(4))


class TowerBlock(nnx.Module):
    def __init__(self, rngs):
        self.attn_norm = nnx.RMSNorm(8, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=8, decode=False, rngs=rngs)
        self.mlp_norm = nnx.LayerNorm(8, rngs=rngs)
        self.up = nnx.LoRALinear(8, 16, lora_rank=2, rngs=rngs)
        self.down = nnx.Linear(16, 8, rngs=rngs)


class Tower(nnx.Module):
    def __init__(self, rngs):
        self.tok = nnx.Embed(11, 8, rngs=rngs)
        self.stem = nnx.Conv(3, 8, kernel_size=(3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.gn = nnx.GroupNorm(8, num_groups=2, rngs=rngs)
        self.blocks = nnx.List([TowerBlock(rngs) for _ in range(2)])
        self.gate = Gate()
        self.final_norm = nnx.RMSNorm(8, rngs=rngs)
        self.lm_head = nnx.Linear(8, 11, rngs=rngs)


@pytest.mark.filterwarnings("ignore:.*unknown kind own parameters:decaymask.PolicyWarning")
@pytest.mark.filterwarnings("ignore:.*arrays outside any layer:decaymask.PolicyWarning")
@pytest.mark.filterwarnings(UNMATCHED)
@pytest.mark.parametrize("preset", ["standard", "gpt", "everything_but_bias_and_norm"])
def test_module_and_state_paths_decide_alike(preset):
    model = nonzero(Tower(nnx.Rngs(0)))
    policy = getattr(dm.presets, preset)()
    by_class = policy.explain(model)
    by_name = policy.explain(nnx.state(model, nnx.Param))
    assert [(r.path, r.layer, r.role, r.decay) for r in by_name] == [
        (r.path, r.layer, r.role, r.decay) for r in by_class
    ]
    # The mask of the module and the callable on the State agree, through nnx.Optimizer.
    assert jax.tree.leaves(policy.for_flax(model)) == jax.tree.leaves(
        policy.for_flax(nnx.state(model, nnx.Param))
    ) == [r.decay for r in by_class]
    assert_optimizer_decays(model, policy.for_flax, decays_of(by_class))
    # Where the State has less evidence (no classes), the report says what decided.
    assert {r.leaf.kind_source for r in by_class} == {"class", "name"}
    assert {r.layer_type for r in by_name} == {None}
    content = {r.path for r in by_name if r.leaf.kind_source == "content"}
    assert content == {
        *(f"blocks/{i}/{layer}/{name}" for i in (0, 1)
          for layer in ("attn/key", "attn/out", "attn/query", "attn/value", "down", "up")
          for name in ("bias", "kernel")),
        "gate/offset", "gate/w", "lm_head/bias", "lm_head/kernel", "stem/bias",
        "stem/kernel", "tok/embedding",
    }
    assert {r.leaf.kind_source for r in by_name if r.path not in content} == {"name"}


def test_bridged_linen_module_with_every_variable_selected():
    model = nnx.bridge.ToNNX(LinenTower(), rngs=nnx.Rngs(0))
    nnx.bridge.lazy_init(model, jnp.zeros((1, 3), jnp.int32))
    policy = dm.Policy(dm.decay(), dm.no_decay(layer=("norm", "embedding")))
    mask = policy.for_flax(model, wrt=...)
    assert jax.tree.structure(mask) == jax.tree.structure(
        nnx.map_state(lambda p, v: 0, nnx.state(model, ...))
    )
    decided = {"/".join(map(str, p)): v for p, v in nnx.to_flat_state(mask)}
    assert decided["Dense_0/kernel"] is True and decided["Embed_0/embedding"] is False
    assert decided["LayerNorm_0/scale"] is False
    # The bridge's random state is selected too, and never decayed.
    assert {p: v for p, v in decided.items() if p.startswith("to_nnx__rngs")} and not any(
        v for p, v in decided.items() if p.startswith("to_nnx__rngs")
    )


# Where each module stands in a leaf's path.


class DepthInner(nnx.Module):
    def __init__(self, rngs):
        self.proj = nnx.Linear(3, 3, rngs=rngs)


class DepthBlock(nnx.Module):
    def __init__(self, rngs):
        self.linear = nnx.Linear(3, 3, rngs=rngs)
        self.norm = nnx.LayerNorm(3, rngs=rngs)
        self.inner = DepthInner(rngs)


class DepthLinen(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(x)


class DepthNet(nnx.Module):
    def __init__(self, rngs):
        self.stem = nnx.Linear(3, 3, rngs=rngs)
        self.blocks = nnx.List([DepthBlock(rngs) for _ in range(3)])
        # A plain list and dict are no modules: their keys only lead to the ones inside.
        self.plain = nnx.data([DepthBlock(rngs)])
        self.heads = nnx.data({"a": nnx.Linear(3, 3, rngs=rngs)})
        self.shared = self.blocks[0].inner
        self.cell = nnx.LSTMCell(3, 3, rngs=rngs)
        self.wn = nnx.WeightNorm(nnx.Linear(3, 3, rngs=rngs), rngs=rngs)
        self.bn = nnx.BatchNorm(3, rngs=rngs)
        self.bridge = nnx.bridge.ToNNX(DepthLinen(), rngs=rngs)
        nnx.bridge.lazy_init(self.bridge, jnp.ones((1, 3)))
        self.gain = nnx.Param(jnp.ones(3))


# Path -> module_depths read from the module (classes) and from nnx.state (names).
DEPTH_ROWS = {
    "gain": ((0,), (0,)),
    "stem/kernel": ((0, 1), (1,)),
    # DepthNet, the nnx.List, the block, the layer.
    "blocks/1/linear/kernel": ((0, 1, 2, 3), (1, 2, 3)),
    "blocks/2/norm/scale": ((0, 1, 2, 3), (1, 2, 3)),
    "blocks/2/inner/proj/bias": ((0, 1, 2, 3, 4), (1, 2, 3, 4)),
    # By classes a plain list or dict is no module; by names every key is one.
    "plain/0/norm/scale": ((0, 2, 3), (1, 2, 3)),
    "plain/0/inner/proj/kernel": ((0, 2, 3, 4), (1, 2, 3, 4)),
    "heads/a/kernel": ((0, 2), (1, 2)),
    # A cell owns its gates: it stands where its own key ends.
    "cell/ii/kernel": ((0, 1), (1, 2)),
    "cell/hf/bias": ((0, 1), (1, 2)),
    "wn/layer_instance/kernel": ((0, 1, 2), (1, 2)),
    # A bridged Linen module is read by its Linen names below the bridge.
    "bridge/Dense_0/kernel": ((0, 1, 2), (1, 2)),
}


@pytest.mark.parametrize("as_state", [False, True], ids=["module", "state"])
def test_module_depths_say_where_each_module_stands(as_state):
    model = DepthNet(nnx.Rngs(0))
    tree = nnx.state(model, nnx.Param) if as_state else model
    leaves = {row.path: row.leaf for row in dm.Policy(dm.decay()).explain(tree)}
    for path, depths in DEPTH_ROWS.items():
        assert leaves[path].module_depths == depths[as_state], path
    views = [view for leaf in leaves.values() for view in leaf.shared_with]
    assert_depths_fit_paths([*leaves.values(), *views])
    if not as_state:
        # The inner module shared by the first block and the model: its view from the
        # model stands where the model's key leads.
        [view] = leaves["blocks/0/inner/proj/kernel"].shared_with
        assert (view.path, view.module_depths) == ("shared/proj/kernel", (0, 1, 2))
        assert [a.type_name for a in view.ancestors] == ["DepthNet", "DepthInner"]
        # Classes give the type at each depth.
        leaf = leaves["blocks/2/inner/proj/bias"]
        assert [a.type_name for a in leaf.ancestors] == [
            "DepthNet",
            "List",
            "DepthBlock",
            "DepthInner",
        ]


def test_module_depths_of_state_and_selections_beyond_params():
    model = DepthNet(nnx.Rngs(0))
    leaves = {leaf.path: leaf for leaf in _nnx.leaves(model, wrt=nnx.Variable)}
    assert leaves["bn/mean"].module_depths == (0, 1)
    assert not leaves["bn/mean"].is_param
    assert_depths_fit_paths(list(leaves.values()))
    # A bridged Linen module as the root: the bridge stands at no key, its Linen
    # modules one key in.
    bridge = nnx.bridge.ToNNX(DepthLinen(), rngs=nnx.Rngs(0))
    nnx.bridge.lazy_init(bridge, jnp.ones((1, 3)))
    [bias, kernel] = _nnx.leaves(bridge)
    assert (kernel.path, kernel.module_depths) == ("Dense_0/kernel", (0, 1))
    assert [a.type_name for a in kernel.ancestors] == ["ToNNX"]
