"""The Flax Linen adapter, on real Linen models: names alone, and classes by trace."""

from __future__ import annotations

import functools
import re
import types
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import FrozenDict, freeze

import decaymask as dm
from decaymask.adapters import _linen
from helpers import (
    assert_depths_fit_paths,
    assert_bool_leaves,
    assert_decays_exactly,
    assert_same_tree,
    flat_with_paths,
    zero_grad_updates,
)

SEED = dm.Policy(dm.decay(layer="linear"), dm.decay(layer="layer_norm", param="bias"))
LINEAR = dm.Policy(dm.decay(layer="linear"))
CLASSIC = dm.Policy(dm.decay(), dm.no_decay(param=("bias", "scale", "embedding")))

ROLE_OF = {
    "kernel": "weight",
    "bias": "bias",
    "scale": "scale",
    "embedding": "embedding",
    "negative_slope": "other",
    "mean": "other",
    "var": "other",
}


# Models: tiny shapes, every Linen row of the kind table.


def _along_last(w, x):
    """``w`` over the last axis of ``x``, broadcast explicitly (rank promotion raises)."""
    return w.reshape((1,) * (x.ndim - w.ndim) + w.shape)


class Zoo(nn.Module):
    @nn.compact
    def __call__(self, x, tok, img):
        h = nn.Dense(4)(x)
        h = nn.DenseGeneral((2, 2))(h).reshape(x.shape[0], 4)
        h = nn.Einsum((4, 4), "ab,bc->ac")(h)
        h = nn.LayerNorm()(h)
        h = nn.RMSNorm()(h)
        h = nn.GroupNorm(num_groups=2)(h)
        h = nn.BatchNorm(use_running_average=False)(h)
        h = nn.PReLU()(h)
        e = nn.Embed(5, 4)(tok)
        e = nn.MultiHeadDotProductAttention(num_heads=2)(e)
        e = nn.MultiHeadAttention(num_heads=2)(e)
        c = nn.Conv(2, (3, 3))(img)
        c = nn.ConvTranspose(2, (3, 3))(c)
        c = nn.ConvLocal(2, (3, 3))(c)
        c = nn.InstanceNorm()(c)
        key = jax.random.key(0)
        for cell in (
            nn.GRUCell(2),
            nn.LSTMCell(2),
            nn.OptimizedLSTMCell(2),
            nn.MGUCell(2),
            nn.SimpleCell(2),
        ):
            cell(cell.initialize_carry(key, h.shape), h)
        conv_cell = nn.ConvLSTMCell(2, (3, 3))
        conv_cell(conv_cell.initialize_carry(key, img.shape), img)
        return h


ZOO_ARGS = (jnp.ones((1, 4)), jnp.ones((1, 3), jnp.int32), jnp.ones((1, 4, 4, 2)))

# Owner module -> (kind, class name). A leaf's owner is its longest listed prefix.
ZOO_OWNERS = {
    "Dense_0": ("linear", "Dense"),
    "DenseGeneral_0": ("linear", "DenseGeneral"),
    "Einsum_0": ("linear", "Einsum"),
    "LayerNorm_0": ("layer_norm", "LayerNorm"),
    "RMSNorm_0": ("rms_norm", "RMSNorm"),
    "GroupNorm_0": ("group_norm", "GroupNorm"),
    "BatchNorm_0": ("batch_norm", "BatchNorm"),
    "PReLU_0": ("prelu", "PReLU"),
    "Embed_0": ("embedding", "Embed"),
    "Conv_0": ("conv", "Conv"),
    "ConvTranspose_0": ("conv", "ConvTranspose"),
    "ConvLocal_0": ("conv", "ConvLocal"),
    "InstanceNorm_0": ("instance_norm", "InstanceNorm"),
    "GRUCell_0": ("recurrent", "GRUCell"),
    "LSTMCell_0": ("recurrent", "LSTMCell"),
    "OptimizedLSTMCell_0": ("recurrent", "OptimizedLSTMCell"),
    "MGUCell_0": ("recurrent", "MGUCell"),
    "SimpleCell_0": ("recurrent", "SimpleCell"),
    "ConvLSTMCell_0": ("recurrent", "ConvLSTMCell"),
}
for _attention in ("MultiHeadDotProductAttention_0", "MultiHeadAttention_0"):
    for _child in ("query", "key", "value", "out"):
        ZOO_OWNERS[f"{_attention}/{_child}"] = ("linear", "DenseGeneral")


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _=None):
        h = nn.Dense(3)(x)
        h = nn.LayerNorm()(h)
        return nn.Dense(3, name="proj")(h), None


class Stacked(nn.Module):
    @nn.compact
    def __call__(self, x):
        scan = nn.scan(
            Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=2
        )
        x, _ = scan()(x)
        x, _ = nn.remat(Block)()(x)
        vmap = nn.vmap(
            Block, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=0
        )
        y, _ = vmap()(jnp.stack([x, x]))
        return y


class HFNorm(nn.Module):
    """A norm in the Hugging Face style: one `weight`, no bias."""

    @nn.compact
    def __call__(self, x):
        return x * _along_last(self.param("weight", nn.initializers.ones, (x.shape[-1],)), x)


class Tied(nn.Module):
    """Setup style: a tied embedding, user-named layers, a custom parameter."""

    def setup(self):
        self.embed = nn.Embed(7, 3)
        self.proj = nn.Dense(3, name="proj")
        self.w = self.param("w", nn.initializers.ones, (3,))
        self.ln_f = nn.LayerNorm()
        self.final = nn.RMSNorm()
        self.input_layernorm = HFNorm()

    def __call__(self, tok):
        x = self.input_layernorm(self.embed(tok))
        x = self.proj(x)
        x = self.final(self.ln_f(x * _along_last(self.w, x)))
        return self.embed.attend(x)


TIED_ROWS = [
    # path, kind, role, class name when traced
    ("embed/embedding", "embedding", "embedding", "Embed"),
    ("final/scale", "rms_norm", "scale", "RMSNorm"),
    ("input_layernorm/weight", "layer_norm", "scale", "HFNorm"),
    ("ln_f/bias", "layer_norm", "bias", "LayerNorm"),
    ("ln_f/scale", "layer_norm", "scale", "LayerNorm"),
    ("proj/bias", "linear", "bias", "Dense"),
    ("proj/kernel", "linear", "weight", "Dense"),
    ("w", "unknown", "weight", "Tied"),
]


class Temperature(nn.Module):
    @nn.compact
    def __call__(self, x):
        return x * _along_last(self.param("temperature", nn.initializers.ones, ()), x)


class Boxed(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(
            4, kernel_init=nn.with_partitioning(nn.initializers.lecun_normal(), (None, "m"))
        )(x)
        x = nn.LayerNorm(scale_init=nn.with_partitioning(nn.initializers.ones, ("m",)))(x)
        return Temperature()(x)


class Wrapped(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.WeightNorm(nn.Dense(3))(x)
        return nn.SpectralNorm(nn.Dense(3))(x, update_stats=True)


MODELS = {
    "zoo": (Zoo, ZOO_ARGS),
    "stacked": (Stacked, (jnp.ones((1, 3)),)),
    "tied": (Tied, (jnp.ones((1, 2), jnp.int32),)),
    "boxed": (Boxed, (jnp.ones((1, 3)),)),
    "wrapped": (Wrapped, (jnp.ones((1, 3)),)),
}


def _fill(abstract):
    """Concrete, distinct, nonzero arrays of the abstract shapes (no model.init run)."""

    def one(s):
        size = max(1, int(np.prod(s.shape)))
        return jnp.asarray(np.arange(1, size + 1).reshape(s.shape) / size, s.dtype)

    return jax.tree.map(one, abstract)


@functools.cache
def variables_of(name: str):
    cls, args = MODELS[name]
    return _fill(jax.eval_shape(cls().init, jax.random.key(0), *args))


def traced(name: str) -> dict:
    cls, args = MODELS[name]
    return {"module": cls(), "args": args}


def expected_mask(tree, decide):
    """A mask built independently of decaymask: ``decide(path)`` at every array."""

    def one(keys, _):
        return decide("/".join(str(k.key) for k in keys))

    boxed = lambda x: isinstance(x, nn.Partitioned)  # noqa: E731
    return jax.tree_util.tree_map_with_path(one, tree, is_leaf=boxed)


def decayed_by_path(params, mask) -> dict[str, bool]:
    """The mask broadcast to every array of ``params``, keyed as the helpers key it."""
    full = jax.tree.map(lambda m, p: jax.tree.map(lambda _: m, p), mask, params)
    return flat_with_paths(full)


def check_step(params, mask, *, jit=False):
    """One real adamw step: exactly the masked leaves decay (``mask`` may be callable)."""
    updates = zero_grad_updates(params, mask, jit=jit)
    tree = mask(params) if callable(mask) else mask
    assert_decays_exactly(params, updates, decayed_by_path(params, tree))


def zoo_owner(path: str) -> tuple[str, str]:
    parts = path.split("/")
    for i in range(len(parts) - 1, 0, -1):
        found = ZOO_OWNERS.get("/".join(parts[:i]))
        if found is not None:
            return found
    raise KeyError(path)


# The kind table.


@pytest.mark.parametrize("by_class", [False, True], ids=["names", "classes"])
def test_zoo_every_row(by_class):
    variables = variables_of("zoo")
    kwargs = traced("zoo") if by_class else {}
    leaves = _linen.leaves(variables, **kwargs)
    assert len(leaves) == len(jax.tree.leaves(variables))
    for leaf in leaves:
        path = leaf.path.removeprefix("batch_stats/")
        kind, type_name = zoo_owner(path)
        assert (leaf.layer, leaf.layer_type, leaf.role) == (
            kind,
            type_name,
            ROLE_OF[leaf.name],
        ), leaf
        assert leaf.is_param == (not leaf.path.startswith("batch_stats/")), leaf
        assert leaf.batch_axes == 0, leaf
        if by_class:
            assert leaf.kind_source == "class", leaf
            assert leaf.layer_class.__name__ == type_name, leaf
        else:
            assert leaf.kind_source == "name", leaf
            assert leaf.layer_class is None, leaf
        if "/query/" in leaf.path or "/out/" in leaf.path:
            assert leaf.ancestors[-1].kind == "attention", leaf


@pytest.mark.parametrize("by_class", [False, True], ids=["names", "classes"])
def test_zoo_seed_mask_exact_and_through_adamw(by_class):
    variables = variables_of("zoo")
    params = variables["params"]
    kwargs = traced("zoo") if by_class else {}
    mask = SEED.for_flax(params, **kwargs)

    def decide(path):
        kind, _ = zoo_owner(path)
        return kind == "linear" or (kind == "layer_norm" and path.endswith("/bias"))

    assert_same_tree(mask, expected_mask(params, decide))
    assert_bool_leaves(mask)
    check_step(params, mask, jit=by_class)


ZOO_MATRIX_AXES = {
    "Dense_0/kernel": ((0,), (1,)),
    "DenseGeneral_0/kernel": ((0,), (1, 2)),
    "Conv_0/kernel": ((0, 1, 2), (3,)),
    "ConvTranspose_0/kernel": ((0, 1, 2), (3,)),
    "ConvLocal_0/kernel": ((2,), (3,)),
    "Embed_0/embedding": ((0,), (1,)),
    "ConvLSTMCell_0/ih/kernel": ((0, 1, 2), (3,)),
    "ConvLSTMCell_0/hh/kernel": ((0, 1, 2), (3,)),
}


@pytest.mark.parametrize("by_class", [False, True], ids=["names", "classes"])
def test_zoo_matrix_layouts(by_class):
    """Muon's (reduction, output) axes in Linen's (in, out) layouts; None where unknown."""
    params = variables_of("zoo")["params"]
    kwargs = traced("zoo") if by_class else {}
    for leaf in _linen.leaves(params, **kwargs):
        expected = ZOO_MATRIX_AXES.get(leaf.path)
        if expected is None and leaf.name == "kernel":
            module = leaf.path.split("/")[-2]
            if module in ("query", "key", "value"):
                expected = ((0,), (1, 2))
            elif module == "out":
                expected = ((0, 1), (2,))
            elif leaf.layer == "recurrent":
                expected = ((0,), (1,))
        if by_class and leaf.path == "Einsum_0/kernel":
            # Traced, the equation it was called with ("ab,bc->ac"); by names, unknown.
            expected = ((0,), (1,))
        assert leaf.matrix_axes == expected, leaf


def test_muon_dims_keep_stacked_axes_as_batch_axes():
    from optax.contrib import MuonDimensionNumbers

    params = freeze(variables_of("stacked")["params"])
    policy = dm.Policy(dm.decay(layer="linear", param="weight"))
    names_only = dm.Policy(
        dm.decay(layer="linear", param="weight"), dm.no_decay(path="*/proj/*")
    )
    for policy, kwargs in ((names_only, {}), (policy, traced("stacked"))):
        dims = policy.muon_dims_for_flax(params, **kwargs)
        assert type(dims) is FrozenDict
        assert dims["ScanBlock_0"]["Dense_0"]["kernel"] == MuonDimensionNumbers((1,), (2,))
        assert dims["ScanBlock_0"]["Dense_0"]["bias"] is None
    # A user-named Dense: its layout is known from its class only.
    dims = policy.muon_dims_for_flax(params, **traced("stacked"))
    assert dims["CheckpointBlock_0"]["proj"]["kernel"] == MuonDimensionNumbers((0,), (1,))
    with pytest.raises(ValueError, match=r"CheckpointBlock_0/proj/kernel .*module="):
        policy.muon_dims_for_flax(params)


def test_recurrent_cells_own_their_gates():
    """`layer="recurrent"` selects a Linen cell's gate kernels, as Equinox's weight_ih."""
    params = variables_of("zoo")["params"]
    policy = dm.Policy(dm.decay(layer="recurrent", param="weight"))
    report = policy.explain(params)
    decayed = {row.path for row in report if row.decay}
    assert decayed == {
        path
        for path in (row.path for row in report)
        if path.split("/")[0].endswith("Cell_0") and path.endswith("/kernel")
    }
    assert "LSTMCell_0/ii/kernel" in decayed and "ConvLSTMCell_0/ih/kernel" in decayed
    row = next(r for r in report if r.path == "GRUCell_0/ir/kernel")
    assert (row.layer, row.layer_type, row.role) == ("recurrent", "GRUCell", "weight")
    # The gates are looked through: they are not ancestors of their arrays.
    assert row.leaf.ancestors == ()


def test_self_attention_is_attention():
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="SelfAttention will be deprecated", category=DeprecationWarning
        )
        module = nn.SelfAttention(num_heads=2)
        x = jnp.ones((1, 2, 4))
        params = jax.eval_shape(module.init, jax.random.key(0), x)["params"]
        by_class = _linen.leaves(params, module=module, args=(x,))
    for leaf in by_class + _linen.leaves(params):
        assert (leaf.layer, leaf.role) == ("linear", ROLE_OF[leaf.name]), leaf
    assert by_class[0].ancestors[0].cls is nn.SelfAttention


# Names against classes.

PARITY = ["zoo", "stacked", "tied", "boxed", "wrapped", "third_party"]


@pytest.mark.parametrize("name", PARITY, ids=PARITY)
def test_names_agree_with_classes(name):
    variables = variables_of(name)
    by_name = _linen.leaves(variables)
    by_class = _linen.leaves(variables, **traced(name))
    assert [leaf.path for leaf in by_name] == [leaf.path for leaf in by_class]
    for a, b in zip(by_name, by_class):
        assert (a.layer, a.role, a.is_param, a.batch_axes) == (
            b.layer,
            b.role,
            b.is_param,
            b.batch_axes,
        ), (a, b)
        # Muon layouts are never guessed: by names, only Flax's auto names (a class of
        # the table) give one, and the trace's classes give the same.
        if a.matrix_axes is not None:
            assert a.matrix_axes == b.matrix_axes, (a, b)
        assert b.kind_source in ("class", "name", "content"), b
    for policy in (SEED, CLASSIC):
        with warnings.catch_warnings():
            # Some models own arrays of unknown kind or miss a rule's layer: not the
            # point here, and said the same way for both.
            warnings.simplefilter("ignore", dm.PolicyWarning)
            by_name = policy.for_flax(variables)
            by_class = policy.for_flax(variables, **traced(name))
        assert_same_tree(by_name, by_class)
        check_step(variables, by_class)


def test_tied_setup_model_rows():
    params = variables_of("tied")["params"]
    for by_class in (False, True):
        report = CLASSIC.explain(params, **(traced("tied") if by_class else {}))
        rows = [(r.path, r.layer, r.role) for r in report]
        assert rows == [row[:3] for row in TIED_ROWS]
        if by_class:
            assert [r.layer_type for r in report] == [row[3] for row in TIED_ROWS]
        decayed = {r.path for r in report if r.decay}
        # Embed.attend ties the output to the embedding: it stays an embedding.
        assert decayed == {"proj/kernel", "w"}
    with pytest.warns(dm.PolicyWarning, match=re.escape("arrays outside any layer (w)")):
        mask = CLASSIC.for_flax(params)
    check_step(params, mask)


def test_custom_param_is_unknown_with_role_from_name():
    params = variables_of("boxed")["params"]
    leaf = next(x for x in _linen.leaves(params) if x.name == "temperature")
    assert (leaf.layer, leaf.role, leaf.layer_type) == ("unknown", "other", "Temperature")
    leaf = next(
        x for x in _linen.leaves(params, **traced("boxed")) if x.name == "temperature"
    )
    assert (leaf.layer, leaf.role, leaf.layer_class) == ("unknown", "other", Temperature)
    # A class no table knows is read by its name and arrays: its array fits no kind.
    assert leaf.kind_source == "content"


# Lifted transforms.


@pytest.mark.parametrize("by_class", [False, True], ids=["names", "classes"])
def test_scan_vmap_remat_keep_kinds_and_count_stacked_axes(by_class):
    params = variables_of("stacked")["params"]
    kwargs = traced("stacked") if by_class else {}
    leaves = {leaf.path: leaf for leaf in _linen.leaves(params, **kwargs)}
    for lift, stacked in (("ScanBlock_0", 1), ("CheckpointBlock_0", 0), ("VmapBlock_0", 1)):
        modules = (("Dense_0", "linear"), ("LayerNorm_0", "layer_norm"), ("proj", "linear"))
        for module, kind in modules:
            for name, leaf in leaves.items():
                if name.startswith(f"{lift}/{module}/"):
                    assert (leaf.layer, leaf.batch_axes) == (kind, stacked), leaf
                    # The lifted wrapper is skipped: the user's class encloses the layer.
                    assert leaf.ancestors[-1].type_name == "Block", leaf
                    assert not leaf.ancestors[-1].type_name.startswith("Scan")
    assert leaves["ScanBlock_0/LayerNorm_0/scale"].shape == (2, 3)
    assert leaves["ScanBlock_0/LayerNorm_0/scale"].ndim == 1
    # Rules on rank see one layer's rank: stacked norm scales are not matrices.
    mask = dm.Policy(dm.decay(min_ndim=2)).for_flax(params, **kwargs)
    assert mask["ScanBlock_0"]["LayerNorm_0"]["scale"] is False
    assert mask["ScanBlock_0"]["Dense_0"]["kernel"] is True
    assert mask["ScanBlock_0"]["Dense_0"]["bias"] is False
    # within=Block matches Block_0-style names and the traced class alike.
    within = dm.Policy(dm.decay(within=Block, param="weight")).for_flax(params, **kwargs)
    assert_same_tree(within, expected_mask(params, lambda p: p.endswith("/kernel")))
    check_step(params, mask)
    check_step(params, within)


# Containers: dict or FrozenDict, params or variables.


@pytest.mark.parametrize("container", [dict, FrozenDict], ids=["dict", "FrozenDict"])
@pytest.mark.parametrize("whole", [False, True], ids=["params", "variables-traced"])
def test_containers_come_back_the_same(container, whole):
    variables = variables_of("zoo")
    tree = variables if whole else variables["params"]
    tree = freeze(tree) if container is FrozenDict else tree
    mask = SEED.for_flax(tree, **(traced("zoo") if whole else {}))
    assert jax.tree.structure(mask) == jax.tree.structure(tree)
    assert type(mask) is container
    if container is FrozenDict:
        inner = mask["params"] if whole else mask
        assert type(inner["Dense_0"]) is FrozenDict
        assert type(inner["MultiHeadAttention_0"]["query"]) is FrozenDict
    if whole:
        assert mask["batch_stats"]["BatchNorm_0"] == {"mean": False, "var": False}
        assert mask["params"]["Dense_0"]["kernel"] is True
    check_step(tree, mask)


def test_mixed_containers_are_mirrored():
    kernel = jnp.ones((2, 2))
    tree = {"Dense_0": FrozenDict({"kernel": kernel}), "Dense_1": {"kernel": kernel}}
    mask = LINEAR.for_flax(tree)
    assert type(mask) is dict
    assert type(mask["Dense_0"]) is FrozenDict and type(mask["Dense_1"]) is dict
    assert jax.tree.structure(mask) == jax.tree.structure(tree)
    check_step(tree, mask)


def test_variables_paths_and_state():
    variables = variables_of("zoo")
    report = SEED.explain(variables)
    stats = [row for row in report if row.path.startswith("batch_stats/")]
    assert [row.path for row in stats] == [
        "batch_stats/BatchNorm_0/mean",
        "batch_stats/BatchNorm_0/var",
    ]
    assert all(not row.leaf.is_param and not row.decay for row in stats)
    assert all(row.reason == "state: never decayed" for row in stats)
    assert "Dense_0/kernel" in [row.path for row in report]
    # A path glob written for params works on variables too.
    policy = dm.Policy(dm.decay(path="Dense_0/*"), dm.decay(path="BatchNorm_0/*"))
    on_params = policy.for_flax(variables["params"])
    on_variables = policy.for_flax(variables)
    assert_same_tree(on_variables["params"], on_params)
    assert on_params["Dense_0"] == {"kernel": True, "bias": True}
    assert on_params["BatchNorm_0"] == {"scale": True, "bias": True}
    assert on_variables["batch_stats"]["BatchNorm_0"] == {"mean": False, "var": False}
    check_step(variables, on_variables)


def test_variables_detection_rule():
    kernel = jnp.ones((2, 2))
    # Only "params": a variables mapping of a model without state.
    report = SEED.explain({"params": {"Dense_0": {"kernel": kernel}}})
    assert [row.path for row in report] == ["Dense_0/kernel"]
    # An auto-named sibling shows "params" is a submodule.
    report = SEED.explain({"params": {"kernel": kernel}, "Dense_0": {"kernel": kernel}})
    assert [row.path for row in report] == ["Dense_0/kernel", "params/kernel"]


class NamedParams(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2, name="head")(nn.Dense(2, name="params")(x))


def test_trace_tells_a_submodule_named_params_from_variables():
    x = jnp.ones((1, 2))
    params = _fill(jax.eval_shape(NamedParams().init, jax.random.key(0), x))["params"]
    assert set(params) == {"params", "head"}
    report = SEED.explain(params, module=NamedParams(), args=(x,))
    assert [row.path for row in report] == [
        "head/bias",
        "head/kernel",
        "params/bias",
        "params/kernel",
    ]
    assert all(row.decay for row in report)
    variables = {"params": params}
    report = SEED.explain(variables, module=NamedParams(), args=(x,))
    assert [row.path for row in report][-1] == "params/kernel"


# Boxed params.


@pytest.mark.parametrize("by_class", [False, True], ids=["names", "classes"])
def test_boxed_mask_is_a_prefix_optax_accepts(by_class):
    params = variables_of("boxed")["params"]
    assert isinstance(params["Dense_0"]["kernel"], nn.Partitioned)
    kwargs = traced("boxed") if by_class else {}
    unknown = re.escape("layers of unknown kind own parameters (Temperature: ")
    with pytest.warns(dm.PolicyWarning, match=unknown):
        mask = SEED.for_flax(params, **kwargs)
    assert mask == {
        "Dense_0": {"kernel": True, "bias": True},
        "LayerNorm_0": {"scale": False, "bias": True},
        "Temperature_0": {"temperature": False},
    }
    leaves = {leaf.path: leaf for leaf in _linen.leaves(params, **kwargs)}
    assert leaves["Dense_0/kernel"].shape == (3, 4)
    assert leaves["LayerNorm_0/scale"].role == "scale"
    check_step(params, mask, jit=True)
    # One bool per box: the same mask fits the unboxed params too.
    unboxed = nn.unbox(params)
    with pytest.warns(dm.PolicyWarning, match=unknown):
        assert_same_tree(SEED.for_flax(unboxed, **kwargs), mask)
    check_step(unboxed, mask)


# Wrappers.


@pytest.mark.parametrize("by_class", [False, True], ids=["names", "classes"])
def test_weight_norm_and_spectral_norm_own_as_the_wrapped_kind(by_class):
    variables = variables_of("wrapped")
    kwargs = traced("wrapped") if by_class else {}
    rows = {row.path: row for row in SEED.explain(variables, **kwargs)}
    # Flax names the gain by a path inside one key: its "/" is escaped.
    scale = rows["WeightNorm_0/Dense_0%2Fkernel%2Fscale"]
    # The gain WeightNorm keeps (Equinox's WeightNorm.g): not a norm's scale.
    assert (scale.layer, scale.layer_type, scale.role) == ("linear", "WeightNorm", "gain")
    assert scale.leaf.name == "scale"
    u = rows["batch_stats/SpectralNorm_0/Dense_1%2Fkernel%2Fu"]
    assert (u.layer, u.leaf.is_param, u.decay) == ("linear", False, False)


# Names that make kinds evident, and registered layers.


class LlamaRMSNorm(nn.Module):
    @nn.compact
    def __call__(self, x):
        return x * _along_last(self.param("weight", nn.initializers.ones, (x.shape[-1],)), x)


class FlaxBertLayerNorm(nn.Module):
    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],))
        return x * _along_last(scale, x) + _along_last(bias, x)


class MyProj(nn.Module):
    @nn.compact
    def __call__(self, x):
        w = self.param("w", nn.initializers.ones, (x.shape[-1], 2))
        y = x @ w
        return y + _along_last(self.param("b", nn.initializers.zeros, (2,)), y)


class ThirdParty(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = LlamaRMSNorm()(x)
        x = FlaxBertLayerNorm()(x)
        x = nn.RMSNorm(name="attn_norm")(x)
        x = nn.LayerNorm(name="final_norm")(x)
        x = nn.Conv(3, (1,), name="patch_embed")(x[:, None, :])[:, 0]
        return MyProj()(x)


THIRD_PARTY_ROWS = [
    ("FlaxBertLayerNorm_0/bias", "layer_norm", "bias"),
    ("FlaxBertLayerNorm_0/scale", "layer_norm", "scale"),
    ("LlamaRMSNorm_0/weight", "rms_norm", "scale"),
    ("MyProj_0/b", "linear", "bias"),
    ("MyProj_0/w", "linear", "weight"),
    ("attn_norm/scale", "rms_norm", "scale"),
    ("final_norm/bias", "layer_norm", "bias"),
    ("final_norm/scale", "layer_norm", "scale"),
    ("patch_embed/bias", "conv", "bias"),
    ("patch_embed/kernel", "conv", "weight"),
]


MODELS["third_party"] = (ThirdParty, (jnp.ones((1, 3)),))


def third_party_params():
    return MODELS["third_party"][1][0], variables_of("third_party")["params"]


@pytest.mark.parametrize("by_class", [False, True], ids=["names", "classes"])
def test_evident_names_need_no_registration(by_class):
    x, params = third_party_params()
    kwargs = {"module": ThirdParty(), "args": (x,)} if by_class else {}
    rows = [(leaf.path, leaf.layer, leaf.role) for leaf in _linen.leaves(params, **kwargs)]
    assert rows == THIRD_PARTY_ROWS
    sources = {leaf.path: leaf.kind_source for leaf in _linen.leaves(params, **kwargs)}
    assert sources["LlamaRMSNorm_0/weight"] == "name"
    # A 2-D `w` beside a `b`: a linear layer by its arrays, whatever its class is called.
    assert sources["MyProj_0/w"] == "content"
    assert sources["attn_norm/scale"] == ("class" if by_class else "name")


@pytest.mark.parametrize(
    "registered", ["MyProj", MyProj], ids=["by-class-name", "by-class"]
)
@pytest.mark.parametrize("by_class", [False, True], ids=["names", "classes"])
def test_registered_layers(registered, by_class):
    x, params = third_party_params()
    kwargs = {"module": ThirdParty(), "args": (x,)} if by_class else {}
    dm.register_layer(registered, "linear", roles={"b": "bias"})
    try:
        leaves = {leaf.path: leaf for leaf in _linen.leaves(params, **kwargs)}
        mask = SEED.for_flax(params, **kwargs)
    finally:
        dm.unregister_layer(registered)
    for name, role in (("w", "weight"), ("b", "bias")):
        leaf = leaves[f"MyProj_0/{name}"]
        assert (leaf.layer, leaf.role, leaf.kind_source) == ("linear", role, "registered")
        assert leaf.layer_type == "MyProj"
        assert leaf.layer_class is (MyProj if by_class else None)
    assert mask["MyProj_0"] == {"w": True, "b": True}
    check_step(params, mask)
    # Unregistered again: back to what its arrays say.
    leaves = {leaf.path: leaf for leaf in _linen.leaves(params, **kwargs)}
    assert (leaves["MyProj_0/w"].layer, leaves["MyProj_0/w"].kind_source) == (
        "linear",
        "content",
    )


def test_user_named_modules_by_name():
    kernel, bias = jnp.ones((3, 4)), jnp.ones((4,))
    params = {
        "proj": {"kernel": kernel, "bias": bias},
        "ln_f": {"scale": bias, "bias": bias},
        "final": {"scale": bias},
        "input_layernorm": {"weight": bias},
        "stem": {"kernel": jnp.ones((3, 3, 2, 4)), "bias": bias},
        "attention": {"qkv": {"kernel": jnp.ones((4, 2, 2)), "bias": jnp.ones((2, 2))}},
        "mlp": {"wi": {"kernel": jnp.ones((4, 2, 2)), "bias": jnp.ones((2, 2))}},
        "cell": {gate: {"kernel": kernel} for gate in ("ir", "iz", "in", "hr", "hz", "hn")},
    }
    rows = {leaf.path: (leaf.layer, leaf.role) for leaf in _linen.leaves(params)}
    assert rows == {
        "attention/qkv/bias": ("linear", "bias"),
        "attention/qkv/kernel": ("linear", "weight"),
        **{f"cell/{g}/kernel": ("recurrent", "weight") for g in sorted(params["cell"])},
        "final/scale": ("rms_norm", "scale"),
        "input_layernorm/weight": ("layer_norm", "scale"),
        "ln_f/bias": ("layer_norm", "bias"),
        "ln_f/scale": ("layer_norm", "scale"),
        "mlp/wi/bias": ("linear", "bias"),
        "mlp/wi/kernel": ("linear", "weight"),
        "proj/bias": ("linear", "bias"),
        "proj/kernel": ("linear", "weight"),
        "stem/bias": ("conv", "bias"),
        "stem/kernel": ("conv", "weight"),
    }


def test_report_rows_and_callable_mask():
    params = variables_of("tied")["params"]
    report = SEED.explain(params)
    assert [
        (r.path, r.layer, r.layer_type, r.role, r.shape, r.dtype, r.decay) for r in report
    ] == [
        ("embed/embedding", "embedding", None, "embedding", (7, 3), "float32", False),
        ("final/scale", "rms_norm", None, "scale", (3,), "float32", False),
        ("input_layernorm/weight", "layer_norm", None, "scale", (3,), "float32", False),
        ("ln_f/bias", "layer_norm", None, "bias", (3,), "float32", True),
        ("ln_f/scale", "layer_norm", None, "scale", (3,), "float32", False),
        ("proj/bias", "linear", None, "bias", (3,), "float32", True),
        ("proj/kernel", "linear", None, "weight", (3, 3), "float32", True),
        ("w", "unknown", None, "weight", (3,), "float32", False),
    ]
    assert report[3].rule is SEED.rules[1]
    assert "decayed 3 of 8 leaves" in str(report)
    # optax calls the mask with the params: the names path, as a callable.
    with pytest.warns(dm.PolicyWarning, match=re.escape("arrays outside any layer (w)")):
        check_step(params, SEED.for_flax)


def test_non_floating_arrays_never_decay():
    params = {"Dense_0": {"kernel": jnp.ones((2, 2), jnp.int32), "bias": jnp.ones(2)}}
    with pytest.warns(dm.PolicyWarning, match="integer or bool arrays"):
        mask = dm.Policy(dm.decay()).for_flax(params)
    assert mask == {"Dense_0": {"kernel": False, "bias": True}}
    assert dm.Policy(dm.decay()).explain(params)[1].reason == "not floating point: never decayed"


# Errors.


def test_error_not_a_mapping():
    with pytest.raises(
        TypeError,
        match=re.escape(
            "leaves: expected a Linen params or variables mapping (dict or FrozenDict), "
            "got list."
        ),
    ):
        _linen.leaves([jnp.ones(2)])


def test_error_non_array_param():
    with pytest.raises(
        TypeError,
        match=re.escape(
            "for_flax: leaf 'Dense_0/kernel' is 'oops' (str); expected a jax or numpy "
            "array, or an nn.Partitioned (flax AxisMetadata) box around one. Remove "
            "non-array entries from the tree before building the mask."
        ),
    ):
        SEED.for_flax({"Dense_0": {"kernel": "oops"}})
    with pytest.raises(TypeError, match=re.escape("leaf 'batch_stats/BatchNorm_0/n' is 3 (int)")):
        SEED.for_flax({"params": {}, "batch_stats": {"BatchNorm_0": {"n": 3}}})


@pytest.mark.parametrize(
    "inputs",
    [{"args": (jnp.ones(1),)}, {"args": jnp.ones(1)}, {"kwargs": {"train": False}}],
    ids=["args", "bare-array", "kwargs"],
)
def test_error_args_without_module(inputs):
    with pytest.raises(
        TypeError,
        match=re.escape(
            "for_flax(params, args=..., kwargs=...): these are example inputs for "
            "tracing module=, but no module= was given. Pass the model too: "
            "policy.for_flax(params, module=model, args=(x,))."
        ),
    ):
        SEED.for_flax(variables_of("tied")["params"], **inputs)


@pytest.mark.parametrize(
    "call, method",
    [(SEED.for_flax, "for_flax"), (SEED.explain, "explain"), (SEED.labels_for_flax, "labels_for_flax")],
    ids=["for_flax", "explain", "labels_for_flax"],
)
def test_error_module_without_args(call, method):
    with pytest.raises(
        TypeError,
        match=re.escape(
            f"{method}(..., module=Tied(...)): Tied.__call__ needs tok, but no args= were "
            f"given. Pass example inputs: policy.{method}(params, module=model, "
            f"args=(x,)). They are traced abstractly, so only their shapes and dtypes "
            f"matter."
        ),
    ):
        call(variables_of("tied")["params"], module=Tied())


def test_error_args_not_a_tuple():
    with pytest.raises(
        TypeError,
        match=re.escape(
            "for_flax(..., module=Tied(...), args=...): expected a tuple of example "
            "inputs, got ArrayImpl. Write args=(x,) for a single input."
        ),
    ):
        SEED.for_flax(variables_of("tied")["params"], module=Tied(), args=jnp.ones((1, 2)))


def test_error_kwargs_not_a_mapping():
    with pytest.raises(
        TypeError,
        match=re.escape(
            "for_flax(..., module=Tied(...), kwargs=...): expected a mapping of keyword "
            "inputs, got list. Write kwargs={'train': False}."
        ),
    ):
        SEED.for_flax(
            variables_of("tied")["params"], module=Tied(), args=(1,), kwargs=["train"]
        )


def test_error_mapping_jax_cannot_flatten():
    with pytest.raises(
        TypeError,
        match=re.escape(
            "for_flax: expected a Linen params or variables mapping (dict or FrozenDict), "
            "got mappingproxy, which jax treats as a single leaf."
        ),
    ):
        SEED.for_flax(types.MappingProxyType({"kernel": jnp.ones(2)}))


def test_error_module_not_linen():
    with pytest.raises(
        TypeError,
        match=re.escape(
            "for_flax(..., module='Tied'): expected a flax.linen.Module, got str. Pass the "
            "Linen model the params belong to; for an NNX model pass the model itself as "
            "the tree: policy.for_flax(model)."
        ),
    ):
        SEED.for_flax(variables_of("tied")["params"], module="Tied", args=(1,))


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda p: {**p, "extra": {"kernel": jnp.ones((2, 2))}},
            "'extra/kernel' is in the params, not in the model's",
        ),
        (
            lambda p: {k: v for k, v in p.items() if k != "w"},
            "'w' is in the model's params, not in these",
        ),
        (
            lambda p: {**p, "w": jnp.ones((5,))},
            "'w' has shape (5,) in the params and (3,) in the model's",
        ),
    ],
    ids=["extra", "missing", "shape"],
)
def test_error_params_do_not_match_the_model(edit, message):
    params = edit(dict(variables_of("tied")["params"]))
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"for_flax(params, module=...): the params do not match the traced model: "
            f"{message}. Pass the module that made these params"
        ),
    ):
        SEED.for_flax(params, **traced("tied"))


def test_error_in_the_model_names_the_trace():
    with pytest.raises(TypeError) as info:
        SEED.for_flax(variables_of("tied")["params"], module=Tied(), args=(1, 2))
    assert any("traced Tied.init" in note for note in getattr(info.value, "__notes__", []))


# Hostile but fair trees.


def _dense(features_in=2, features_out=3, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "kernel": jnp.asarray(rng.uniform(0.5, 1.5, (features_in, features_out)), jnp.float32),
        "bias": jnp.asarray(rng.uniform(0.5, 1.5, (features_out,)), jnp.float32),
    }


def test_int_and_tuple_keys_work_and_are_named():
    params = {"blocks": {0: {"Dense_0": _dense(seed=1)}, 1: {"Dense_0": _dense(seed=2)}}}
    mask = LINEAR.for_flax(params)
    assert mask == {"blocks": {0: {"Dense_0": {"kernel": True, "bias": True}},
                               1: {"Dense_0": {"kernel": True, "bias": True}}}}
    assert [row.path for row in CLASSIC.explain(params)] == [
        "blocks/0/Dense_0/bias", "blocks/0/Dense_0/kernel",
        "blocks/1/Dense_0/bias", "blocks/1/Dense_0/kernel",
    ]
    selected = dm.Policy(dm.decay(path="blocks/1/*")).for_flax(params)
    assert selected["blocks"][1]["Dense_0"]["kernel"] and not selected["blocks"][0]["Dense_0"]["kernel"]
    updates = zero_grad_updates(params, LINEAR.for_flax)
    assert_decays_exactly(params, updates, flat_with_paths(mask))

    tupled = {("head", 1): _dense(seed=3), ("head", 2): _dense(seed=4)}
    rows = {row.path: row for row in CLASSIC.explain(tupled)}
    assert set(rows) == {"('head', 1)/kernel", "('head', 1)/bias", "('head', 2)/kernel",
                         "('head', 2)/bias"}
    assert rows["('head', 1)/kernel"].decay and not rows["('head', 1)/bias"].decay
    mask = CLASSIC.for_flax(tupled)
    assert mask == {key: {"kernel": True, "bias": False} for key in tupled}
    assert_decays_exactly(tupled, zero_grad_updates(tupled, mask), flat_with_paths(mask))


def test_lists_tuples_none_and_empty_mappings_keep_their_places():
    # Layers kept in a list (a hand-rolled stack), a tuple pair, and values jax holds
    # as nodes without leaves: None and empty dicts.
    ln = {"scale": jnp.full(3, 2.0), "bias": jnp.full(3, 3.0)}
    params = {
        "layers": [{"Dense_0": _dense(seed=1)}, {"Dense_0": _dense(seed=2), "LayerNorm_0": ln}],
        "pair": (_dense(seed=3), None),
        "empty": {},
        "Dense_9": {**_dense(seed=4), "unused": None},
    }
    mask = SEED.for_flax(params)
    assert mask == {
        "layers": [{"Dense_0": {"kernel": True, "bias": True}},
                   {"Dense_0": {"kernel": True, "bias": True},
                    "LayerNorm_0": {"scale": False, "bias": True}}],
        "pair": ({"kernel": True, "bias": True}, None),
        "empty": {},
        "Dense_9": {"kernel": True, "bias": True, "unused": None},
    }
    rows = {row.path: row for row in CLASSIC.explain(params)}
    assert set(rows) == {
        "layers/0/Dense_0/bias", "layers/0/Dense_0/kernel", "layers/1/Dense_0/bias",
        "layers/1/Dense_0/kernel", "layers/1/LayerNorm_0/bias", "layers/1/LayerNorm_0/scale",
        "pair/0/bias", "pair/0/kernel", "Dense_9/bias", "Dense_9/kernel",
    }
    # A pair element with a kernel and a bias is a linear layer by its arrays.
    assert rows["pair/0/kernel"].layer == "linear" and rows["pair/0/kernel"].decay
    updates = zero_grad_updates(params, mask)
    assert_decays_exactly(params, updates, flat_with_paths(mask))


def test_a_mapping_of_empty_mappings_is_not_a_submodule():
    # A block's children say what it is: one holding no array is not among them.
    block = {"query": _dense(seed=1), "key": _dense(seed=2), "value": _dense(seed=3)}
    plain = {"Block": dict(block)}
    padded = {"Block": {**block, "out": {"kernel": {}, "bias": {"x": None}}}}
    rows = {row.path: (row.layer, row.leaf.ancestors, row.decay) for row in SEED.explain(plain)}
    padded_rows = {
        row.path: (row.layer, row.leaf.ancestors, row.decay) for row in SEED.explain(padded)
    }
    assert padded_rows == rows
    assert SEED.for_flax(padded)["Block"]["out"] == {"kernel": {}, "bias": {"x": None}}


def test_an_ordered_dict_keeps_its_order_and_type():
    import collections

    params = collections.OrderedDict([("Dense_1", _dense(seed=1)), ("Dense_0", _dense(seed=2))])
    mask = LINEAR.for_flax(params)
    assert type(mask) is collections.OrderedDict and list(mask) == ["Dense_1", "Dense_0"]
    assert [row.path for row in CLASSIC.explain(params)] == [
        "Dense_1/bias", "Dense_1/kernel", "Dense_0/bias", "Dense_0/kernel",
    ]
    assert_decays_exactly(params, zero_grad_updates(params, mask), flat_with_paths(mask))


@pytest.mark.parametrize("frozen", [False, True], ids=["dict", "FrozenDict"])
def test_variables_read_a_module_off_every_collection(frozen):
    wrap = freeze if frozen else (lambda d: d)
    variables = wrap({
        "batch_stats": {"Block_0": {"BatchNorm_0": {"mean": jnp.zeros(3), "var": jnp.ones(3)}},
                        "Stats_0": {"count": jnp.ones(())}},
        "params": {"Block_0": {"BatchNorm_0": {"scale": jnp.ones(3), "bias": jnp.ones(3)},
                               "Dense_0": _dense(seed=1)}},
    })
    policy = dm.Policy(dm.decay(layer="linear", param="weight"), dm.decay(layer="batch_norm"))
    mask = policy.for_flax(variables)
    assert type(mask) is type(variables)
    rows = {row.path: row for row in policy.explain(variables)}
    assert [row.path for row in policy.explain(variables)] == [
        "batch_stats/Block_0/BatchNorm_0/mean", "batch_stats/Block_0/BatchNorm_0/var",
        "batch_stats/Stats_0/count", "Block_0/BatchNorm_0/bias", "Block_0/BatchNorm_0/scale",
        "Block_0/Dense_0/bias", "Block_0/Dense_0/kernel",
    ]
    # State is read as the module's but never decayed; a module only state holds is
    # still a module of the tree.
    assert rows["batch_stats/Block_0/BatchNorm_0/mean"].layer == "batch_norm"
    assert not rows["batch_stats/Block_0/BatchNorm_0/mean"].decay
    assert rows["batch_stats/Stats_0/count"].layer == "unknown"
    assert rows["Block_0/BatchNorm_0/scale"].decay and rows["Block_0/Dense_0/kernel"].decay
    assert not rows["Block_0/Dense_0/bias"].decay
    assert mask["batch_stats"]["Block_0"]["BatchNorm_0"] == {"mean": False, "var": False}


class _TwoKeysAlike:
    """A pytree node whose two children have keys that read as the same text."""

    def __init__(self, first, second):
        self.first, self.second = first, second


jax.tree_util.register_pytree_with_keys(
    _TwoKeysAlike,
    lambda node: (((jax.tree_util.GetAttrKey("w"), node.first),
                   (jax.tree_util.DictKey("w"), node.second)), None),
    lambda _, children: _TwoKeysAlike(*children),
)


def test_error_keys_that_read_as_one_path():
    params = {"Dense_0": _TwoKeysAlike(jnp.ones((2, 3)), jnp.ones(3))}
    with pytest.raises(
        TypeError,
        match=re.escape(
            "for_flax: the keys of 'Dense_0' read as the same text ('w'), so their paths "
            "would be one. Give them keys that differ as strings."
        ),
    ):
        SEED.for_flax(params)


def test_keys_holding_a_slash_give_distinct_escaped_paths():
    params = {"a/b": {"Dense_0": _dense(seed=1)}, "a": {"b": {"Dense_0": _dense(seed=2)}},
              "100%": {"Dense_0": _dense(seed=3)}}
    paths = [row.path for row in LINEAR.explain(params)]
    assert sorted(paths) == [
        "100%25/Dense_0/bias", "100%25/Dense_0/kernel",
        "a%2Fb/Dense_0/bias", "a%2Fb/Dense_0/kernel",
        "a/b/Dense_0/bias", "a/b/Dense_0/kernel",
    ]
    # A glob matches the escaped text: each rule selects one of the two.
    nested = dm.Policy(dm.decay(path="a/b/*")).for_flax(params)
    slashed = dm.Policy(dm.decay(path="a%2Fb/*")).for_flax(params)
    assert nested["a"]["b"]["Dense_0"]["kernel"] and not nested["a/b"]["Dense_0"]["kernel"]
    assert slashed["a/b"]["Dense_0"]["kernel"] and not slashed["a"]["b"]["Dense_0"]["kernel"]
    variables = {"params": params, "batch_stats": {"a/b": {"mean": jnp.ones(2)}}}
    assert "batch_stats/a%2Fb/mean" in {row.path for row in LINEAR.explain(variables)}


def _nested(depth: int, frozen: bool) -> dict:
    # Built from the inside out: FrozenDict(...) of a deep dict recurses itself.
    wrap = (lambda d: FrozenDict(d, __unsafe_skip_copy__=True)) if frozen else dict
    params = wrap({"Dense_0": wrap(_dense(seed=depth))})
    for level in range(depth):
        params = wrap({f"Block_{level % 2}": params})
    return params


@pytest.mark.parametrize("frozen", [False, True], ids=["dict", "FrozenDict"])
def test_depth_is_not_limited_by_the_python_stack(frozen):
    params = _nested(500, frozen)
    mask = LINEAR.for_flax(params)
    assert type(mask) is type(params)
    assert jax.tree.structure(mask) == jax.tree.structure(params)
    assert jax.tree.leaves(mask) == [True, True]
    [kernel] = [row for row in CLASSIC.explain(params) if row.leaf.name == "kernel"]
    assert kernel.path.count("/") == 501 and kernel.layer == "linear"
    updates = zero_grad_updates(params, mask)
    assert_decays_exactly(params, updates, flat_with_paths(mask))


def test_masks_built_from_threads_while_layers_are_registered():
    from helpers import build_while_registering

    class Proj(nn.Module):
        pass

    class Spare(nn.Module):
        pass

    params = {f"Proj_{i}": _dense(seed=i) for i in range(8)}
    params.update({f"LayerNorm_{i}": {"scale": jnp.ones(3), "bias": jnp.ones(3)} for i in range(8)})
    expected = SEED.for_flax(params)
    # Many registered classes: a lookup by class name reads all of them.
    padding = [type(f"Padding{i}", (nn.Module,), {}) for i in range(500)]
    for cls in padding:
        dm.register_layer(cls, "linear")
    try:

        def churn():
            dm.register_layer(Proj, "linear")
            dm.register_layer(Spare, "conv")
            dm.unregister_layer(Proj)
            dm.unregister_layer(Spare)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", dm.PolicyWarning)
            results = build_while_registering(lambda: SEED.for_flax(params), churn)
    finally:
        for cls in padding:
            dm.unregister_layer(cls)
    assert results and all(mask == expected for mask in results)
    assert SEED.for_flax(params) == expected


# Names read as words, checked against what each module owns.


class FlaxConv1D(nn.Module):
    """GPT-2's linear layer as transformers writes it: the kernel is (out, in)."""

    features: int

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.ones, (self.features, x.shape[-1]))
        y = x @ kernel.T
        return y + _along_last(self.param("bias", nn.initializers.zeros, (self.features,)), y)


class FlaxRobertaPreLayerNormSelfAttention(nn.Module):
    @nn.compact
    def __call__(self, x):
        q, k, v = (nn.Dense(4, name=n)(x) for n in ("query", "key", "value"))
        return q * k * v


class FlaxRobertaPreLayerNormLMHead(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm(name="layer_norm")(nn.Dense(4, name="dense")(x))
        return h + _along_last(self.param("bias", nn.initializers.zeros, (4,)), h)


class SimpleNorm2d(nn.Module):
    @nn.compact
    def __call__(self, x):
        return x * _along_last(self.param("weight", nn.initializers.ones, (x.shape[-1],)), x)


class ProjNorm(nn.Module):
    """Its name ends in "Norm", but it owns a projection's kernel and bias."""

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.ones, (x.shape[-1], 4))
        y = x @ kernel
        return y + _along_last(self.param("bias", nn.initializers.zeros, (4,)), y)


class Words(nn.Module):
    @nn.compact
    def __call__(self, x, tok):
        h = FlaxConv1D(4)(x)
        h = FlaxRobertaPreLayerNormSelfAttention()(h)
        h = FlaxRobertaPreLayerNormLMHead()(h)
        h = ProjNorm()(SimpleNorm2d()(h))
        for name in ("position_embeddings", "wpe", "embed_positions", "wte"):
            h = h + nn.Embed(6, 4, name=name)(tok).sum(axis=1)
        return h


MODELS["words"] = (Words, (jnp.ones((1, 3)), jnp.ones((1, 2), jnp.int32)))

WORDS_ROWS = {
    # path: (kind, role, evidence by names, evidence by classes)
    "FlaxConv1D_0/bias": ("linear", "bias", "content", "content"),
    "FlaxConv1D_0/kernel": ("linear", "weight", "content", "content"),
    "FlaxRobertaPreLayerNormLMHead_0/bias": ("unknown", "bias", "content", "content"),
    "FlaxRobertaPreLayerNormLMHead_0/dense/bias": ("linear", "bias", "name", "class"),
    "FlaxRobertaPreLayerNormLMHead_0/dense/kernel": ("linear", "weight", "name", "class"),
    "FlaxRobertaPreLayerNormLMHead_0/layer_norm/bias": ("layer_norm", "bias", "name", "class"),
    "FlaxRobertaPreLayerNormLMHead_0/layer_norm/scale": ("layer_norm", "scale", "name", "class"),
    **{
        f"FlaxRobertaPreLayerNormSelfAttention_0/{p}/{n}": (
            "linear", ROLE_OF[n], "name", "class"
        )
        for p in ("key", "query", "value")
        for n in ("bias", "kernel")
    },
    "ProjNorm_0/bias": ("linear", "bias", "content", "content"),
    "ProjNorm_0/kernel": ("linear", "weight", "content", "content"),
    "SimpleNorm2d_0/weight": ("rms_norm", "scale", "name", "name"),
    "embed_positions/embedding": ("embedding", "position", "name", "class"),
    "position_embeddings/embedding": ("embedding", "position", "name", "class"),
    "wpe/embedding": ("embedding", "position", "name", "class"),
    "wte/embedding": ("embedding", "embedding", "name", "class"),
}


@pytest.mark.parametrize("by_class", [False, True], ids=["names", "classes"])
def test_names_are_read_as_words_against_content(by_class):
    params = variables_of("words")["params"]
    kwargs = traced("words") if by_class else {}
    leaves = _linen.leaves(params, **kwargs)
    rows = {leaf.path: (leaf.layer, leaf.role, leaf.kind_source) for leaf in leaves}
    expected = {
        path: (kind, role, by_classes if by_class else by_names)
        for path, (kind, role, by_names, by_classes) in WORDS_ROWS.items()
    }
    assert rows == expected
    # GPT-2's (out, in) kernel: a linear layer whose layout nothing proves.
    conv1d = next(leaf for leaf in leaves if leaf.path == "FlaxConv1D_0/kernel")
    assert conv1d.matrix_axes is None
    # The head's own bias belongs to a module of no known kind, but its role says what
    # it is: no warning (pytest turns one into an error).
    with pytest.raises(ValueError, match=re.escape("FlaxConv1D_0/kernel (FlaxConv1D, weight")):
        dm.presets.muon(exclude="*embed*").muon_dims_for_flax(params, **kwargs)
    mask = dm.presets.gpt().for_flax(params, **kwargs)
    assert mask["FlaxConv1D_0"]["kernel"] is True
    assert mask["SimpleNorm2d_0"]["weight"] is False
    assert mask["wpe"]["embedding"] is False
    check_step(params, mask)


# Layers stacked by a user-named nn.scan or nn.vmap.


class QProjLayer(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return nn.Dense(8, name="q_proj")(x), None


class UserNamedStacks(nn.Module):
    @nn.compact
    def __call__(self, x):
        layers = nn.scan(
            QProjLayer,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=4,
        )(name="layers")
        x, _ = layers(x, None)
        experts = nn.vmap(
            nn.Dense,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=None,
            axis_size=3,
        )(4, name="experts")
        return experts(x)


MODELS["user_stacks"] = (UserNamedStacks, (jnp.ones((1, 8)),))


@pytest.mark.parametrize("by_class", [False, True], ids=["names", "classes"])
def test_user_named_stacks_of_dense_are_linear(by_class):
    params = variables_of("user_stacks")["params"]
    assert params["layers"]["q_proj"]["kernel"].shape == (4, 8, 8)
    assert params["experts"]["kernel"].shape == (3, 8, 4)
    kwargs = traced("user_stacks") if by_class else {}
    leaves = {leaf.path: leaf for leaf in _linen.leaves(params, **kwargs)}
    for path in ("layers/q_proj", "experts"):
        kernel, bias = leaves[f"{path}/kernel"], leaves[f"{path}/bias"]
        assert (kernel.layer, kernel.role, kernel.batch_axes) == ("linear", "weight", 1)
        assert (bias.layer, bias.role, bias.batch_axes, bias.ndim) == ("linear", "bias", 1, 1)
        # A layout from the class only: names prove the stack, not the kernel's layout.
        assert kernel.matrix_axes == (((0,), (1,)) if by_class else None)
    for policy in (LINEAR, dm.presets.gpt()):
        with warnings.catch_warnings():
            # gpt()'s embedding rule on a model without embeddings: not the point here.
            warnings.filterwarnings(
                "ignore", r".*rule 2 decay\(layer='embedding'", dm.PolicyWarning
            )
            mask = policy.for_flax(params, **kwargs)
        assert mask["layers"]["q_proj"]["kernel"] is True
        assert mask["experts"]["kernel"] is True
        check_step(params, mask)


def test_stack_or_dense_general_is_linear_either_way():
    # (8, 8, 8) with a bias (8, 8): 8 stacked (8, 8) Dense layers, or one DenseGeneral
    # from 8 inputs to (8, 8) outputs. Both are linear; which axes are stacked is not
    # known, so neither stacked axes nor a layout are claimed.
    params = {"layers": {"q_proj": {"kernel": jnp.ones((8, 8, 8)), "bias": jnp.ones((8, 8))}}}
    leaves = {leaf.path: leaf for leaf in _linen.leaves(params)}
    kernel = leaves["layers/q_proj/kernel"]
    assert (kernel.layer, kernel.batch_axes, kernel.matrix_axes) == ("linear", 0, None)
    assert kernel.kind_source == "content"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r".*rule 2 decay\(layer='embedding'", dm.PolicyWarning)
        mask = dm.presets.gpt().for_flax(params)
    assert mask == {"layers": {"q_proj": {"kernel": True, "bias": False}}}
    check_step(params, mask)


# The lifted module of a user-named nn.scan or nn.vmap, read by names alone.


class LiftedGate(nn.Module):
    """A layer no table knows: one layer's rank of its array is not known by names."""

    @nn.compact
    def __call__(self, x):
        return x * _along_last(self.param("gate", nn.initializers.ones, (x.shape[-1],)), x)


class LiftedBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _=None):
        h = nn.Dense(3)(nn.LayerNorm(name="ln")(x))
        h = nn.Dense(3, name="fc")(h)
        h = nn.Conv(3, (2,), name="conv")(h[:, None, :])[:, 0, :]
        return x + LiftedGate(name="gate")(h), None


_LIFT = {"variable_axes": {"params": 0}, "split_rngs": {"params": True}}


class LiftedInner(nn.Module):
    @nn.compact
    def __call__(self, x, _=None):
        x, _ = nn.scan(LiftedBlock, length=2, **_LIFT)(name="inner")(x, None)
        return x, None


class NamedLift(nn.Module):
    """4 blocks under a lifted module named by the user, the head outside."""

    stacking: str  # "scan", "vmap", or "nested": a scan of 4 around a scan of 2

    @nn.compact
    def __call__(self, x):
        if self.stacking == "scan":
            x, _ = nn.scan(LiftedBlock, length=4, **_LIFT)(name="blocks")(x, None)
        elif self.stacking == "vmap":
            vmap = nn.vmap(LiftedBlock, in_axes=(None, None), out_axes=0, axis_size=4, **_LIFT)
            y, _ = vmap(name="blocks")(x, None)
            x = y.sum(0)
        else:
            x, _ = nn.scan(LiftedInner, length=4, **_LIFT)(name="blocks")(x, None)
        return nn.Dense(5, name="head")(nn.LayerNorm(name="ln_f")(x))


LIFTINGS = ["scan", "vmap", "nested"]
for _stacking in LIFTINGS:
    MODELS[f"named_{_stacking}"] = (functools.partial(NamedLift, _stacking), (jnp.ones((2, 3)),))
PARITY += [f"named_{stacking}" for stacking in LIFTINGS]

LIFTED_LEAVES = [
    "Dense_0/bias", "Dense_0/kernel", "conv/bias", "conv/kernel", "fc/bias", "fc/kernel",
    "gate/gate", "ln/bias", "ln/scale",
]


def by_path(tree, is_leaf=None) -> dict[str, object]:
    """Leaves keyed by their ``/``-joined keys, as decaymask writes paths."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return {"/".join(str(key.key) for key in path): leaf for path, leaf in flat}


def lifted_batch_axes(stacking: str) -> dict[str, int]:
    inside, stacked = ("blocks/inner", 2) if stacking == "nested" else ("blocks", 1)
    return {
        **{f"{inside}/{leaf}": stacked for leaf in LIFTED_LEAVES},
        **{f"{head}/{name}": 0 for head, name in (
            ("head", "bias"), ("head", "kernel"), ("ln_f", "bias"), ("ln_f", "scale"))},
    }


@pytest.mark.parametrize("stacking", LIFTINGS)
def test_every_array_of_a_user_named_lift_is_stacked_by_names(stacking):
    """By names, the Dense_0 (a kernel of 3 axes) and the fc and conv (a bias repeating
    the kernel's leading axes) prove the stack; the layer norm, the conv's kernel and the
    gate of unknown rank beside them have the same leading sizes: every array of the
    lifted module is stacked, as the trace says."""
    params = variables_of(f"named_{stacking}")["params"]
    expected = lifted_batch_axes(stacking)
    by_names = {leaf.path: leaf.batch_axes for leaf in _linen.leaves(params)}
    assert by_names == expected
    traced_axes = {
        leaf.path: leaf.batch_axes for leaf in _linen.leaves(params, **traced(f"named_{stacking}"))
    }
    assert traced_axes == expected


@pytest.mark.parametrize("stacking", LIFTINGS)
def test_layer_decay_by_names_of_a_user_named_lift_is_the_traced_one(stacking):
    params = variables_of(f"named_{stacking}")["params"]
    policy = dm.Policy(dm.layer_decay(0.5))
    with warnings.catch_warnings():
        # The gate is a layer of unknown kind: said alike in both readings.
        warnings.simplefilter("ignore", dm.PolicyWarning)
        by_names = by_path(policy.lr_scales(params))
        by_class = by_path(policy.lr_scales(params, **traced(f"named_{stacking}")))
    assert set(by_names) == set(by_class) == set(lifted_batch_axes(stacking))
    per_layer = np.float32([0.5**4, 0.5**3, 0.5**2, 0.5])
    for path, scale in by_names.items():
        if path.startswith("blocks/"):
            assert scale.dtype == np.float32 and scale.shape[0] == 4, (path, scale)
            np.testing.assert_array_equal(scale.ravel(), per_layer, err_msg=path)
            np.testing.assert_array_equal(by_class[path], scale, err_msg=path)
        else:
            assert scale == by_class[path] == 1.0, path


@pytest.mark.parametrize("stacking", LIFTINGS)
def test_muon_dims_of_a_user_named_lift_by_names_are_the_traced_ones(stacking):
    """Dense_0's layout comes from its auto name; its stacked axes from the lift: the
    dims optax gets skip them, as the trace's do, and a real Muon step runs."""
    from optax.contrib import MuonDimensionNumbers, muon

    params = variables_of(f"named_{stacking}")["params"]
    policy = dm.Policy(dm.decay(path="*/Dense_0/kernel"))
    with warnings.catch_warnings():
        # The gate is a layer of unknown kind: said alike in both readings.
        warnings.simplefilter("ignore", dm.PolicyWarning)
        dims = policy.muon_dims_for_flax(params)
        assert dims == policy.muon_dims_for_flax(params, **traced(f"named_{stacking}"))
    inside, stacked = (dims["blocks"]["inner"], 2) if stacking == "nested" else (dims["blocks"], 1)
    assert inside["Dense_0"]["kernel"] == MuonDimensionNumbers((stacked,), (stacked + 1,))
    leaf = lambda x: x is None or isinstance(x, MuonDimensionNumbers)  # noqa: E731
    found = [p for p, d in by_path(dims, is_leaf=leaf).items() if d is not None]
    assert found == [f"{'blocks/inner' if stacking == 'nested' else 'blocks'}/Dense_0/kernel"]
    tx = muon(0.1, muon_weight_dimension_numbers=dims)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    kernel = by_path(updates)[found[0]]
    assert kernel.shape == by_path(params)[found[0]].shape
    assert np.all(np.isfinite(kernel)) and np.any(kernel != 0)


STACKED_DENSE = {"kernel": jnp.ones((4, 3, 5)), "bias": jnp.ones((4, 5))}


@pytest.mark.parametrize(
    ("norm", "axes"),
    [
        ({"scale": jnp.ones((5, 3)), "bias": jnp.ones((5, 3))}, 0),
        ({"scale": jnp.ones((4, 2, 3)), "bias": jnp.ones((4, 2, 3))}, 0),
        ({"scale": jnp.ones((4, 3)), "bias": jnp.ones((4, 3))}, 1),
    ],
    ids=["leading-sizes-disagree", "one-layer-rank-wrong", "agree"],
)
def test_arrays_beside_a_proven_stack_are_stacked_only_where_they_agree(norm, axes):
    """A stacked Dense_0 beside a layer norm under ``blocks``: the norm is stacked only
    where its leading size is the Dense's and its scale is then 1-D; otherwise it stays
    unmarked (never a guess), and layer decay says the stack is known only in part where
    the sizes fit."""
    params = {"blocks": {"Dense_0": STACKED_DENSE, "ln": norm}, "head": {"kernel": jnp.ones((5, 2))}}
    rows = {leaf.path: leaf.batch_axes for leaf in _linen.leaves(params)}
    assert rows == {
        "blocks/Dense_0/bias": 1,
        "blocks/Dense_0/kernel": 1,
        "blocks/ln/bias": axes,
        "blocks/ln/scale": axes,
        "head/kernel": 0,
    }
    policy = dm.Policy(dm.layer_decay(0.5))
    if norm["scale"].shape[0] == 4 and not axes:
        with pytest.raises(ValueError, match=r"blocks/Dense_0 is stacked 4 times, but beside it in blocks"):
            policy.lr_scales(params)
    elif axes:
        scales = by_path(policy.lr_scales(params))
        np.testing.assert_array_equal(scales["blocks/ln/scale"].ravel(), [0.0625, 0.125, 0.25, 0.5])


def test_a_dense_stacked_along_another_axis_proves_no_stack():
    # variable_axes={"params": 1}: kernel (in, layers, out), bias (out, layers). The
    # bias is no longer the kernel's output axis: nothing shows which axis is stacked.
    params = {"blocks": {"Dense_0": {"kernel": jnp.ones((3, 4, 3)), "bias": jnp.ones((3, 4))},
                         "ln": {"scale": jnp.ones((3, 4)), "bias": jnp.ones((3, 4))}}}
    leaves = _linen.leaves(params)
    assert [(leaf.path, leaf.batch_axes, leaf.matrix_axes) for leaf in leaves] == [
        ("blocks/Dense_0/bias", 0, None),
        ("blocks/Dense_0/kernel", 0, None),
        ("blocks/ln/bias", 0, None),
        ("blocks/ln/scale", 0, None),
    ]


# Muon layouts: never guessed.


def test_scanned_layout_by_names_is_not_a_conv_layout():
    # A maxtext-style scanned MLP (param_scan_axis=1): kernels (embed, layers, mlp). By
    # names alone nothing shows which axis is stacked: no layout, a clear error.
    params = {
        "decoder": {
            "layers": {
                "mlp": {
                    "wi": {"kernel": jnp.ones((8, 2, 16))},
                    "wo": {"kernel": jnp.ones((16, 2, 8))},
                }
            }
        }
    }
    leaves = _linen.leaves(params)
    assert [leaf.matrix_axes for leaf in leaves] == [None, None]
    with pytest.raises(
        ValueError,
        match=re.escape("decoder/layers/mlp/wi/kernel (conv, weight, shape (8, 2, 16))"),
    ) as info:
        dm.Policy(dm.decay(param="weight")).muon_dims_for_flax(params)
    assert "module=model, args=(x,)" in str(info.value)
    assert "dm.register_layer(cls, kind, matrix_axes=" in str(info.value)


class Proj(nn.Module):
    @nn.compact
    def __call__(self, x):
        return x @ self.param("w", nn.initializers.ones, (x.shape[-1], 4))


class ProjStack(nn.Module):
    @nn.compact
    def __call__(self, x):
        stacked = nn.vmap(
            Proj,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=None,
            axis_size=3,
        )()
        return stacked(x).sum(axis=0) + Proj()(x)


MODELS["proj_stack"] = (ProjStack, (jnp.ones((1, 4)),))


@pytest.mark.parametrize("by_class", [False, True], ids=["names", "classes"])
def test_registered_layouts_shift_past_stacked_axes(by_class):
    from optax.contrib import MuonDimensionNumbers

    params = variables_of("proj_stack")["params"]
    assert params["VmapProj_0"]["w"].shape == (3, 4, 4)
    kwargs = traced("proj_stack") if by_class else {}
    dm.register_layer(Proj, "linear", matrix_axes={"w": ((0,), (1,))})
    try:
        leaves = {leaf.path: leaf for leaf in _linen.leaves(params, **kwargs)}
        dims = dm.presets.muon().muon_dims_for_flax(params, **kwargs)
    finally:
        dm.unregister_layer(Proj)
    stacked = leaves["VmapProj_0/w"]
    assert (stacked.batch_axes, stacked.matrix_axes, stacked.kind_source) == (
        1,
        ((0,), (1,)),
        "registered",
    )
    assert dims["VmapProj_0"]["w"] == MuonDimensionNumbers((1,), (2,))
    assert dims["Proj_0"]["w"] == MuonDimensionNumbers((0,), (1,))


@pytest.mark.parametrize("by_class", [False, True], ids=["names", "classes"])
def test_registered_layouts_are_checked_against_the_rank(by_class):
    params = variables_of("proj_stack")["params"]
    kwargs = traced("proj_stack") if by_class else {}
    dm.register_layer(Proj, "linear", matrix_axes={"w": ((0,), (1, 2))})
    try:
        with pytest.raises(ValueError) as info:
            dm.presets.muon().muon_dims_for_flax(params, **kwargs)
    finally:
        dm.unregister_layer(Proj)
    assert str(info.value) == (
        "muon_dims_for_flax: Proj_0/w has shape (4, 4), but its layer was registered "
        "with matrix_axes ((0,), (1, 2)), which name axis 2 of one layer's array. Fix: "
        "register the (reduction axes, output axes) of one layer's array of rank 2, e.g. "
        "dm.register_layer(cls, kind, matrix_axes={'w': ((0,), (1,))}) for an (in, out) "
        "matrix."
    )


def test_weight_norm_gains_decide_alike_across_frameworks():
    import equinox as eqx

    class Normed(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.WeightNorm(nn.Dense(4))(x)

    x = jnp.ones((1, 3))
    params = _fill(jax.eval_shape(Normed().init, jax.random.key(0), x))["params"]
    equinox = eqx.nn.WeightNorm(eqx.nn.Linear(3, 4, key=jax.random.key(0)))
    policy = dm.Policy(dm.decay(), dm.no_decay(param=("bias", "gain")))
    for kwargs in ({}, {"module": Normed(), "args": (x,)}):
        rows = {r.path: (r.layer, r.role, r.decay) for r in policy.explain(params, **kwargs)}
        assert rows["WeightNorm_0/Dense_0%2Fkernel%2Fscale"] == ("linear", "gain", False)
        assert rows["Dense_0/kernel"] == ("linear", "weight", True)
        mask = policy.for_flax(params, **kwargs)
        assert mask["WeightNorm_0"]["Dense_0/kernel/scale"] is False
        check_step(params, mask)
    rows = {r.path: (r.layer, r.role, r.decay) for r in policy.explain(equinox)}
    assert rows["g"] == ("linear", "gain", False)


# Which mappings are variables, and which are not Linen at all.


def test_equinox_modules_in_a_mapping_are_turned_away():
    import equinox as eqx

    tree = {"enc": eqx.nn.LayerNorm(4)}
    with pytest.raises(TypeError, match=re.escape("'enc' is an Equinox LayerNorm")) as info:
        SEED.for_flax(tree)
    assert "policy.for_equinox(tree)" in str(info.value)
    with pytest.raises(TypeError, match="policy.labels_for_equinox"):
        SEED.labels_for_flax({"a": {"enc": eqx.nn.Linear(2, 2, key=jax.random.key(0))}})


def test_a_submodule_named_params_is_not_a_collection():
    kernel, bias = jnp.ones((2, 2)), jnp.ones((2,))
    # Nothing but parameters: a params tree whose modules include one named "params".
    params = {"params": {"kernel": kernel, "bias": bias}, "head": {"kernel": kernel, "bias": bias}}
    report = LINEAR.explain(params)
    assert [(row.path, row.leaf.is_param, row.decay) for row in report] == [
        ("head/bias", True, True),
        ("head/kernel", True, True),
        ("params/bias", True, True),
        ("params/kernel", True, True),
    ]
    mask = LINEAR.for_flax(params)
    linear = {"kernel": True, "bias": True}
    assert mask == {"params": linear, "head": linear}
    check_step(params, mask)
    # A collection of the user's (no parameter names in it) beside params: variables.
    variables = {"params": {"Dense_0": {"kernel": kernel}}, "counter": {"count": bias}}
    rows = [(row.path, row.leaf.is_param) for row in LINEAR.explain(variables)]
    assert rows == [("counter/count", False), ("Dense_0/kernel", True)]
    # Parameters at the params' own module paths under another key: either reading fits.
    either = {"params": {"Dense_0": {"kernel": kernel}}, "ema": {"Dense_0": {"kernel": kernel}}}
    with pytest.raises(ValueError) as info:
        LINEAR.for_flax(either)
    assert str(info.value) == (
        "for_flax: cannot tell whether this mapping is a variables mapping (collections "
        "'params', 'ema') or params whose top-level modules include one named 'params': "
        "the arrays fit both. Fix: pass the model, policy.for_flax(tree, module=model, "
        "args=(x,)), so that its trace decides, or pass variables['params'] alone."
    )


NORM_NAMES = [
    "conv_norm_out",
    "pre_self_attention_norm",
    "norm_final_attn",
    "mm_soft_embedding_norm",
]


@pytest.mark.parametrize("name", NORM_NAMES, ids=NORM_NAMES)
@pytest.mark.parametrize("with_bias", [False, True], ids=["scale", "scale+bias"])
def test_norm_names_holding_another_kinds_word_are_norms(name, with_bias):
    scale = jnp.ones((4,))
    norm = {"scale": scale, **({"bias": scale} if with_bias else {})}
    params = {name: norm, "Dense_0": {"kernel": jnp.ones((4, 4)), "bias": scale}}
    kind = "layer_norm" if with_bias else "rms_norm"
    rows = {leaf.path: (leaf.layer, leaf.role) for leaf in _linen.leaves(params)}
    assert rows[f"{name}/scale"] == (kind, "scale")
    mask = dm.presets.everything_but_bias_and_norm().for_flax(params)
    assert mask[name]["scale"] is False
    check_step(params, mask)


# Traces that see less than the params hold.


class JitBody(nn.Module):
    @nn.compact
    def __call__(self, x):
        return MyProj(name="mix")(nn.LayerNorm(name="norm")(nn.Dense(3, name="proj")(x)))


JittedBody = nn.jit(JitBody)


def test_nn_jit_cached_call_is_traced_through():
    x = jnp.ones((1, 3))
    model = JittedBody()
    variables = model.init(jax.random.key(0), x)
    model.apply(variables, x)  # jax has now cached the compiled call
    params = variables["params"]
    kwargs = {"module": JittedBody(), "args": (x,)}
    dm.register_layer(MyProj, "linear", roles={"w": "weight", "b": "bias"})
    try:
        leaves = {leaf.path: leaf for leaf in _linen.leaves(params, **kwargs)}
    finally:
        dm.unregister_layer(MyProj)
    assert leaves["proj/kernel"].layer_class is nn.Dense
    assert leaves["norm/scale"].layer_class is nn.LayerNorm
    assert (leaves["mix/w"].layer_class, leaves["mix/w"].kind_source) == (MyProj, "registered")
    mask = SEED.for_flax(params, **kwargs)
    check_step(params, mask)


class NestedParam(nn.Module):
    """Owns one parameter whose value is a mapping: no module holds those arrays."""

    @nn.compact
    def __call__(self, x):
        init = lambda key: {"kernel": jnp.ones((3, 3))}  # noqa: E731
        return x @ self.param("block", init)["kernel"]


def test_a_trace_that_sees_no_module_says_so():
    x = jnp.ones((1, 3))
    params = jax.eval_shape(NestedParam().init, jax.random.key(0), x)["params"]
    with pytest.warns(dm.PolicyWarning) as record:
        leaves = _linen.leaves(params, module=NestedParam(), args=(x,))
    assert str(record[0].message).startswith(
        "leaves(params, module=NestedParam(...)): the trace of NestedParam.init saw no "
        "module at block, so names decided there, not classes or registrations."
    )
    assert record[0].filename == __file__
    assert [(leaf.path, leaf.layer) for leaf in leaves] == [("block/kernel", "linear")]


def test_stacked_conv_or_dense_general_is_ambiguous():
    # (4, 3, 4, 4) with a bias (4, 4): 4 stacked 1-D convs (window 3, 4 -> 4), or one
    # DenseGeneral from (4, 3) inputs to (4, 4) outputs. Neither reading settles it.
    params = {"blocks": {"mix": {"kernel": jnp.ones((4, 3, 4, 4)), "bias": jnp.ones((4, 4))}}}
    leaves = {leaf.path: leaf for leaf in _linen.leaves(params)}
    kernel = leaves["blocks/mix/kernel"]
    assert (kernel.layer, kernel.kind_source, kernel.batch_axes, kernel.matrix_axes) == (
        "linear",
        "ambiguous",
        0,
        None,
    )


def test_a_conv_inside_a_module_named_attention_is_a_conv():
    # Squeeze-excitation blocks (RegNet) keep 1x1 convs under a key named "attention".
    conv = {"kernel": jnp.ones((1, 1, 8, 2)), "bias": jnp.ones((2,))}
    expand = {"kernel": jnp.ones((1, 1, 2, 8)), "bias": jnp.ones((8,))}
    params = {"attention": {"reduce": conv, "expand": expand}}
    rows = {leaf.path: leaf.layer for leaf in _linen.leaves(params)}
    assert rows == {
        "attention/expand/bias": "conv",
        "attention/expand/kernel": "conv",
        "attention/reduce/bias": "conv",
        "attention/reduce/kernel": "conv",
    }


# Where each module stands in a leaf's path.


class DepthInner(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, name="proj")(x)


class DepthBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _=None):
        h = nn.Dense(3)(x)
        h = nn.LayerNorm()(h)
        h = nn.BatchNorm(use_running_average=False)(h)
        return DepthInner(name="inner")(h), None


class DepthEncoder(nn.Module):
    def setup(self):
        self.layers = [DepthBlock() for _ in range(3)]

    def __call__(self, x):
        for layer in self.layers:
            x, _ = layer(x)
        return x


class DepthModel(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(3, name="stem")(x)
        # The same block class at depth 1 (here) and at depth 2 (in the encoder).
        x, _ = DepthBlock()(x)
        x = DepthEncoder(name="encoder")(x)
        axes = {"params": 0, "batch_stats": 0}
        scan = nn.scan(DepthBlock, variable_axes=axes, split_rngs={"params": True}, length=2)
        x, _ = scan(name="scanned")(x)
        x, _ = nn.scan(DepthBlock, variable_axes=axes, split_rngs={"params": True}, length=2)()(x)
        cell = nn.OptimizedLSTMCell(3)
        _, x = cell(cell.initialize_carry(jax.random.key(0), x.shape), x)
        return nn.WeightNorm(nn.Dense(3))(x)


MODELS["depths"] = (DepthModel, (jnp.ones((1, 3)),))

# Path -> module_depths by names (the root is no module there) and traced.
DEPTH_ROWS = {
    "stem/kernel": ((1,), (0, 1)),
    "DepthBlock_0/Dense_0/kernel": ((1, 2), (0, 1, 2)),
    "DepthBlock_0/inner/proj/bias": ((1, 2, 3), (0, 1, 2, 3)),
    "encoder/layers_0/Dense_0/kernel": ((1, 2, 3), (0, 1, 2, 3)),
    "encoder/layers_2/LayerNorm_0/scale": ((1, 2, 3), (0, 1, 2, 3)),
    "encoder/layers_2/inner/proj/kernel": ((1, 2, 3, 4), (0, 1, 2, 3, 4)),
    "scanned/inner/proj/kernel": ((1, 2, 3), (0, 1, 2, 3)),
    "ScanDepthBlock_0/LayerNorm_0/bias": ((1, 2), (0, 1, 2)),
    # A cell owns its gates: it stands where its own key ends, not the gate's.
    "OptimizedLSTMCell_0/ii/kernel": ((1,), (0, 1)),
    "OptimizedLSTMCell_0/hf/bias": ((1,), (0, 1)),
    # WeightNorm's gain, named by one key holding the wrapped layer's path.
    "WeightNorm_0/Dense_0%2Fkernel%2Fscale": ((1,), (0, 1)),
}

# Other collections keep their name as the first key: every module but the root
# stands one key further in.
DEPTH_STATE_ROWS = {
    "batch_stats/DepthBlock_0/BatchNorm_0/mean": ((2, 3), (0, 2, 3)),
    "batch_stats/encoder/layers_1/BatchNorm_0/var": ((2, 3, 4), (0, 2, 3, 4)),
    "batch_stats/scanned/BatchNorm_0/mean": ((2, 3), (0, 2, 3)),
}


def module_classes(model, *args):
    """The class of the module at every path, seen by a trace of ``model.init``."""
    classes = {}

    def record(next_fun, call_args, call_kwargs, context):
        # The first call at a path is its module's: lifted transforms and WeightNorm
        # also call copies at the root's path.
        classes.setdefault(tuple(context.module.scope.path), type(context.module))
        return next_fun(*call_args, **call_kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(model.init, jax.random.key(0), *args)
    return classes


@pytest.mark.parametrize("whole", [False, True], ids=["params", "variables"])
@pytest.mark.parametrize("by_class", [False, True], ids=["names", "classes"])
def test_module_depths_say_where_each_module_stands(by_class, whole):
    variables = variables_of("depths")
    tree = variables if whole else variables["params"]
    kwargs = traced("depths") if by_class else {}
    leaves = {row.path: row.leaf for row in CLASSIC.explain(tree, **kwargs)}
    rows = {**DEPTH_ROWS, **(DEPTH_STATE_ROWS if whole else {})}
    for path, depths in rows.items():
        assert leaves[path].module_depths == depths[by_class], path
    assert not any(path.startswith("batch_stats/") for path in leaves) or whole
    # Blocks read once and reused at other paths stand at their own depths there.
    for i in range(3):
        leaf = leaves[f"encoder/layers_{i}/inner/proj/kernel"]
        assert leaf.module_depths == DEPTH_ROWS["encoder/layers_2/inner/proj/kernel"][by_class]
    assert_depths_fit_paths(list(leaves.values()))
    if by_class:
        # The keys at each depth name a module of the class the leaf lists there.
        classes = module_classes(kwargs["module"], *kwargs["args"])
        for path, leaf in leaves.items():
            keys = tuple(path.split("/"))
            start = 0 if leaf.is_param else 1
            for depth, layer in zip(leaf.module_depths, (*leaf.ancestors, leaf.owner)):
                module = keys[start:depth] if depth else ()
                assert classes[module].__name__ == layer.type_name, (path, depth)


@pytest.mark.parametrize("whole", [False, True], ids=["params", "variables"])
@pytest.mark.parametrize("by_class", [False, True], ids=["names", "classes"])
@pytest.mark.parametrize("name", ["zoo", "stacked", "tied", "boxed", "wrapped"])
def test_module_depths_fit_the_paths_of_every_model(name, by_class, whole):
    variables = variables_of(name)
    tree = variables if whole else variables["params"]
    leaves = _linen.leaves(tree, **(traced(name) if by_class else {}))
    assert_depths_fit_paths(leaves)
    # Traced, the root is listed and stands at no key; by names it is no module, and
    # only owns the arrays it holds itself.
    for leaf in leaves:
        held = leaf.path.count("/") == (0 if leaf.is_param else 1)
        assert (leaf.module_depths[0] == 0) == (by_class or held), leaf


@pytest.mark.parametrize("by_class", [False, True], ids=["names", "classes"])
def test_module_depths_agree_however_leaves_are_built(by_class):
    variables = variables_of("depths")
    kwargs = traced("depths") if by_class else {}
    table, _ = _linen.walk(variables, **kwargs)
    # Each key's first leaf is located by the first visit, the others by a second one.
    firsts = {i: table[i].module_depths for i in table.representatives().values()}
    every = [leaf.module_depths for leaf in table]
    assert all(every[i] == depths for i, depths in firsts.items())
    # Leaves of one key (the blocks of the encoder) stand at the same depths.
    by_key = {}
    for key, depths in zip(table.keys, every):
        assert by_key.setdefault(key, depths) == depths
    assert len(set(table.keys)) < len(table)


def test_module_depths_tell_the_root_from_a_module_alike_by_names():
    # By names the root is no module, and "block" is no more than a name: alike owners,
    # at different depths.
    params = {"w": jnp.ones((3,)), "block": {"w": jnp.ones((3,))}}
    table, _ = _linen.walk(params)
    leaves = {leaf.path: leaf for leaf in table}
    assert (leaves["w"].ancestors, leaves["w"].module_depths) == ((), (0,))
    assert (leaves["block/w"].ancestors, leaves["block/w"].module_depths) == ((), (1,))
    assert leaves["w"].owner == leaves["block/w"].owner
    assert len(set(table.keys)) == 2
