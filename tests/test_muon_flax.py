"""Muon dimension numbers in Flax's layouts, Linen and NNX, through real optax.contrib.muon steps.

Flax keeps kernels as ``(in, out)``, ``(*window, in, out)`` and, in attention,
``(in, heads, head_dim)`` / ``(heads, head_dim, out)``. The expected dimension numbers
below are written by hand from those layouts, and every real optax step is compared
with the same step taken with the hand-written tree.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from optax.contrib import MuonDimensionNumbers as Dims

import decaymask as dm

MATRICES = dm.presets.muon()
EMBEDDINGS = dm.Policy(dm.decay(layer="embedding"))
VOCAB = 7
LEARNING_RATE = 0.1
ONE_STEP = {"ns_steps": 1}
"""One Newton-Schulz iteration: these steps check which axes Muon reads, not how well it
orthogonalises, and one iteration compiles in half the time."""

IN_OUT = Dims((0,), (1,))  # Dense, Embed: (in, out)
TO_HEADS = Dims(
    (0,), (1, 2)
)  # query/key/value, DenseGeneral((2, 3)): (in, heads, head_dim)
FROM_HEADS = Dims(
    (0, 1), (2,)
)  # out, DenseGeneral(axis=(-2, -1)): (heads, head_dim, out)
CONV_2D = Dims((0, 1, 2), (3,))  # (height, width, in, out): the window is input
STACKED_IN_OUT = Dims((1,), (2,))  # (layers, in, out): the stacked axis is a batch axis
STACKED_CONV_1D = Dims((1, 2), (3,))  # (layers, width, in, out)
PRESET_RULE = "rule 1: decay(layer=('linear', 'conv'), param='weight')"


def _is_dims(x: Any) -> bool:
    return x is None or isinstance(x, Dims)


def _key(entry: Any) -> str:
    for attribute in ("key", "name", "idx"):
        if hasattr(entry, attribute):
            return str(getattr(entry, attribute))
    return str(entry)


def flat(tree: Any) -> dict[str, Dims | None]:
    """The dimension numbers of a Linen mapping or an NNX State, keyed ``a/b/kernel``."""
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_dims)[0]
    return {"/".join(_key(k) for k in path): leaf for path, leaf in leaves}


def nested(flat_dims: dict[str, Any]) -> dict:
    """A hand-written dims tree from ``{"a/b/kernel": dims}``."""
    tree: dict = {}
    for path, dims in flat_dims.items():
        *modules, name = path.split("/")
        node = tree
        for key in modules:
            node = node.setdefault(key, {})
        node[name] = dims
    return tree


def filled(tree: Any, seed: int) -> Any:
    """``tree`` with every array or ``jax.ShapeDtypeStruct`` replaced by normal draws."""
    rng = np.random.default_rng(seed)

    def one(x: Any) -> Any:
        return jnp.asarray(rng.normal(0.0, 1.0, x.shape).astype(x.dtype))

    return jax.tree.map(one, tree)


def muon_step(params: Any, grads: Any, dims: Any) -> Any:
    """``params`` after one real, jitted ``optax.contrib.muon`` step."""
    tx = optax.contrib.muon(
        LEARNING_RATE, muon_weight_dimension_numbers=dims, **ONE_STEP
    )

    @jax.jit
    def step(params: Any, grads: Any) -> Any:
        updates, _ = tx.update(grads, tx.init(params), params)
        return optax.apply_updates(params, updates)

    return step(params, grads)


def trace_muon(params: Any, **kwargs: Any) -> None:
    """Traces one ``optax.contrib.muon`` step (no compile): runs every callable argument
    as optax runs it."""
    tx = optax.contrib.muon(LEARNING_RATE, **kwargs, **ONE_STEP)
    jax.eval_shape(lambda params: tx.update(params, tx.init(params), params), params)


def assert_trees_close(actual: Any, expected: Any) -> None:
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, e, rtol=1e-6, atol=1e-6)


def unknown_layout(
    path: str, owner: str, shape: tuple, rule: str, name: str, by_name: bool = False
) -> str:
    traced = (
        "give the layer classes (Linen params: module=model, args=(x,); an NNX State: "
        "the model itself), "
    )
    # Known by names, there is no instance for a function of the layer to read.
    per_instance = "" if by_name else (
        f", or, where it differs between the class's instances, with a function of the "
        f"layer: matrix_axes={{{name!r}: lambda layer: ((...), (...))}}"
    )
    return (
        f"muon_dims_for_flax: {path} ({owner}, weight, shape {shape}) is selected by {rule}, "
        f"but its matrix layout (reduction and output axes) is unknown. Fix: leave it out "
        f"with a rule, e.g. dm.no_decay(path={path!r}), {traced if by_name else ''}or "
        f"teach the layout with dm.register_layer(cls, kind, matrix_axes={{{name!r}: "
        f"((...), (...))}}){per_instance}."
    )


# Flax Linen: auto names, so that names alone tell each layer's class.


class LinenZoo(nn.Module):
    @nn.compact
    def __call__(self, tokens, x, image, series):
        nn.Embed(VOCAB, 4)(tokens)
        h = nn.Dense(6)(x)
        h = nn.DenseGeneral((2, 3))(h)
        h = nn.DenseGeneral(5, axis=(-2, -1))(h)
        h = nn.LayerNorm()(h)
        nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=4)(h[:, None])
        nn.ConvTranspose(2, (2, 2))(nn.Conv(4, (3, 3))(image))
        nn.ConvLocal(4, (3,), padding="VALID")(series)


LINEN_ARGS = (
    jnp.zeros((1,), jnp.int32),
    jnp.zeros((1, 4)),
    jnp.zeros((1, 5, 5, 3)),
    jnp.zeros((1, 5, 3)),
)
ATTENTION = "MultiHeadDotProductAttention_0"
PROJECTIONS = ("query", "key", "value", "out")
LINEN_ZOO = {
    "ConvLocal_0/bias": None,
    "ConvLocal_0/kernel": Dims((1,), (2,)),  # (out positions, window * in, out)
    "ConvTranspose_0/bias": None,
    "ConvTranspose_0/kernel": CONV_2D,
    "Conv_0/bias": None,
    "Conv_0/kernel": CONV_2D,
    "DenseGeneral_0/bias": None,
    "DenseGeneral_0/kernel": TO_HEADS,
    "DenseGeneral_1/bias": None,
    "DenseGeneral_1/kernel": FROM_HEADS,
    "Dense_0/bias": None,
    "Dense_0/kernel": IN_OUT,
    "Embed_0/embedding": None,
    "LayerNorm_0/bias": None,
    "LayerNorm_0/scale": None,
    **{f"{ATTENTION}/{p}/bias": None for p in ("key", "out", "query", "value")},
    **{f"{ATTENTION}/{p}/kernel": TO_HEADS for p in ("key", "query", "value")},
    f"{ATTENTION}/out/kernel": FROM_HEADS,
}
LINEN_ZOO = dict(sorted(LINEN_ZOO.items()))

BY_CLASS = pytest.mark.parametrize("by_class", [False, True], ids=["names", "classes"])


def linen_params(module: nn.Module, *args: Any) -> dict:
    return jax.eval_shape(module.init, jax.random.key(0), *args)["params"]


def linen_kwargs(by_class: bool, module: nn.Module, *args: Any) -> dict:
    return {"module": module, "args": args} if by_class else {}


@BY_CLASS
def test_linen_dims_per_layout(by_class):
    params = linen_params(LinenZoo(), *LINEN_ARGS)
    dims = MATRICES.muon_dims_for_flax(
        params, **linen_kwargs(by_class, LinenZoo(), *LINEN_ARGS)
    )
    assert type(dims) is dict
    assert flat(dims) == LINEN_ZOO


@BY_CLASS
def test_linen_embedding_layout_when_selected(by_class):
    params = linen_params(LinenZoo(), *LINEN_ARGS)
    dims = EMBEDDINGS.muon_dims_for_flax(
        params, **linen_kwargs(by_class, LinenZoo(), *LINEN_ARGS)
    )
    assert flat(dims) == {**dict.fromkeys(LINEN_ZOO), "Embed_0/embedding": IN_OUT}


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _=None):
        h = nn.LayerNorm()(nn.Dense(4)(x))
        return nn.Dense(4, name="proj")(h), None


class Stacked(nn.Module):
    @nn.compact
    def __call__(self, x):
        scan = nn.scan(
            Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=2
        )
        x, _ = scan()(x)
        vmap = nn.vmap(
            Block, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=0
        )
        y, _ = vmap()(jnp.stack([x, x, x]))
        return y


@BY_CLASS
def test_linen_stacked_layers_keep_the_stacked_axis_as_a_batch_axis(by_class):
    x = jnp.zeros((1, 4))
    params = linen_params(Stacked(), x)
    assert params["ScanBlock_0"]["Dense_0"]["kernel"].shape == (2, 4, 4)
    assert params["VmapBlock_0"]["proj"]["kernel"].shape == (3, 4, 4)
    kwargs = linen_kwargs(by_class, Stacked(), x)
    policy = MATRICES
    if not by_class:
        # By names alone, a user-named Dense has no known layout: never guessed.
        with pytest.raises(ValueError, match=r"ScanBlock_0/proj/kernel .*module=model"):
            MATRICES.muon_dims_for_flax(params)
        policy = dm.presets.muon(exclude="*/proj/*")
    dims = policy.muon_dims_for_flax(params, **kwargs)
    expected = {}
    for stack in ("ScanBlock_0", "VmapBlock_0"):
        for layer in ("Dense_0", "proj"):
            expected |= {
                f"{stack}/{layer}/bias": None,
                f"{stack}/{layer}/kernel": STACKED_IN_OUT
                if by_class or layer != "proj"
                else None,
            }
        expected |= {
            f"{stack}/LayerNorm_0/bias": None,
            f"{stack}/LayerNorm_0/scale": None,
        }
    assert flat(dims) == dict(sorted(expected.items()))


class ConvBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _=None):
        h = nn.DenseGeneral((2, 2))(nn.Conv(4, (3,))(x))
        return h.reshape(h.shape[:-2] + (4,)), None


class ScannedConv(nn.Module):
    @nn.compact
    def __call__(self, x):
        scan = nn.scan(
            ConvBlock,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=2,
        )
        return scan()(x)[0]


def test_linen_scanned_conv_needs_the_classes():
    # Under a Scan auto name the conv's bias proves the stacked axis, so names give the
    # conv's layout; a DenseGeneral's kernel (layers, in, 2, 2) could hold its output
    # axes in any split of its trailing axes, which names cannot tell.
    x = jnp.zeros((1, 5, 4))
    params = linen_params(ScannedConv(), x)
    with pytest.raises(ValueError) as info:
        MATRICES.muon_dims_for_flax(params)
    assert str(info.value) == unknown_layout(
        "ScanConvBlock_0/DenseGeneral_0/kernel", "DenseGeneral", (2, 4, 2, 2), PRESET_RULE,
        "kernel", by_name=True,
    )
    dims = MATRICES.muon_dims_for_flax(params, module=ScannedConv(), args=(x,))
    assert flat(dims) == {
        "ScanConvBlock_0/Conv_0/bias": None,
        "ScanConvBlock_0/Conv_0/kernel": STACKED_CONV_1D,
        "ScanConvBlock_0/DenseGeneral_0/bias": None,
        "ScanConvBlock_0/DenseGeneral_0/kernel": Dims((1,), (2, 3)),
    }


class BiasFree(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.DenseGeneral((2, 3), use_bias=False)(x)
        return nn.DenseGeneral(5, axis=(-2, -1), use_bias=False)(h)


def test_linen_bias_free_dense_general_needs_the_classes():
    # Without a bias, nothing in the params says which kernel axes are the outputs.
    x = jnp.zeros((1, 4))
    params = linen_params(BiasFree(), x)
    with pytest.raises(ValueError) as info:
        MATRICES.muon_dims_for_flax(params)
    assert str(info.value) == unknown_layout(
        "DenseGeneral_0/kernel", "DenseGeneral", (4, 2, 3), PRESET_RULE, "kernel", by_name=True
    )
    dims = MATRICES.muon_dims_for_flax(params, module=BiasFree(), args=(x,))
    assert flat(dims) == {
        "DenseGeneral_0/kernel": TO_HEADS,
        "DenseGeneral_1/kernel": FROM_HEADS,
    }


class Mixer(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Einsum((2, 4, 3), "bi,hio->bho")(x)


class Gate(nn.Module):
    """A user layer that owns a matrix under a name no vocabulary knows."""

    @nn.compact
    def __call__(self, x):
        return x @ self.param("w", nn.initializers.ones, (4, 4))


class Gated(nn.Module):
    @nn.compact
    def __call__(self, x):
        return Gate(name="gate")(x)


@BY_CLASS
def test_linen_unknown_layout_is_an_error(by_class):
    x = jnp.zeros((1, 4))
    params = linen_params(Mixer(), x)
    if by_class:
        # Traced, the Einsum's equation says which kernel axes contract, as NNX's does.
        dims = MATRICES.muon_dims_for_flax(params, **linen_kwargs(by_class, Mixer(), x))
        assert flat(dims) == {"Einsum_0/bias": None, "Einsum_0/kernel": Dims((1,), (0, 2))}
    else:
        # By names the equation is unknown: the fix is to trace (a function of the
        # layer would have no layer to read).
        with pytest.raises(ValueError) as info:
            MATRICES.muon_dims_for_flax(params)
        assert str(info.value) == unknown_layout(
            "Einsum_0/kernel", "Einsum", (2, 4, 3), PRESET_RULE, "kernel", by_name=True
        )
        # The fix the message names: leave it to Adam.
        dims = dm.presets.muon(exclude="Einsum_0/*").muon_dims_for_flax(params)
        assert flat(dims) == {"Einsum_0/bias": None, "Einsum_0/kernel": None}

    params = linen_params(Gated(), x)
    # A 2-D `w` makes a linear layer by its content; its layout is still not known.
    with pytest.raises(ValueError) as info:
        dm.Policy(dm.decay()).muon_dims_for_flax(
            params, **linen_kwargs(by_class, Gated(), x)
        )
    owner = "Gate" if by_class else "linear"
    assert str(info.value) == unknown_layout(
        "gate/w", owner, (4, 4), "rule 1: decay()", "w", by_name=not by_class
    )


def test_linen_registered_layout():
    x = jnp.zeros((1, 4))
    params = linen_params(Gated(), x)
    dm.register_layer(
        Gate, "linear", roles={"w": "weight"}, matrix_axes={"w": ((1,), (0,))}
    )
    try:
        dims = MATRICES.muon_dims_for_flax(params, module=Gated(), args=(x,))
    finally:
        dm.unregister_layer(Gate)
    assert flat(dims) == {"gate/w": Dims((1,), (0,))}


# Flax NNX


class NnxZoo(nnx.Module):
    """Layers whose layouts their names tell too: an nnx.State gives the same dims."""

    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(VOCAB, 4, rngs=rngs)
        self.linear = nnx.Linear(4, 6, rngs=rngs)
        self.norm = nnx.LayerNorm(6, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(
            2, 6, qkv_features=4, decode=False, rngs=rngs
        )
        self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)
        self.conv_transpose = nnx.ConvTranspose(4, 2, (2, 2), rngs=rngs)


NNX_ZOO = {
    **{f"attn/{p}/bias": None for p in PROJECTIONS},
    **{f"attn/{p}/kernel": TO_HEADS for p in ("query", "key", "value")},
    "attn/out/kernel": FROM_HEADS,
    "conv/bias": None,
    "conv/kernel": CONV_2D,
    "conv_transpose/bias": None,
    "conv_transpose/kernel": CONV_2D,
    "embed/embedding": None,
    "linear/bias": None,
    "linear/kernel": IN_OUT,
    "norm/bias": None,
    "norm/scale": None,
}
NNX_ZOO = dict(sorted(NNX_ZOO.items()))


def abstract_nnx_zoo() -> NnxZoo:
    return nnx.eval_shape(lambda: NnxZoo(nnx.Rngs(0)))


def test_nnx_dims_per_layout():
    model = abstract_nnx_zoo()
    dims = MATRICES.muon_dims_for_flax(model)
    assert isinstance(dims, nnx.State)
    assert flat(dims) == NNX_ZOO
    state_dims = MATRICES.muon_dims_for_flax(nnx.state(model, nnx.Param))
    assert isinstance(state_dims, nnx.State)
    assert flat(state_dims) == NNX_ZOO


def test_nnx_embedding_layout_when_selected():
    model = abstract_nnx_zoo()
    expected = {**dict.fromkeys(NNX_ZOO), "embed/embedding": IN_OUT}
    assert flat(EMBEDDINGS.muon_dims_for_flax(model)) == expected
    assert flat(EMBEDDINGS.muon_dims_for_flax(nnx.state(model, nnx.Param))) == expected


class NnxGeneral(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.general = nnx.LinearGeneral(6, (2, 3), rngs=rngs)
        self.general_in = nnx.LinearGeneral((2, 3), 5, axis=(-2, -1), rngs=rngs)


def test_nnx_linear_general_layouts():
    model = nnx.eval_shape(lambda: NnxGeneral(nnx.Rngs(0)))
    assert flat(MATRICES.muon_dims_for_flax(model)) == {
        "general/bias": None,
        "general/kernel": TO_HEADS,
        "general_in/bias": None,
        "general_in/kernel": FROM_HEADS,
    }


class Stackable(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.linear = nnx.Linear(2, 4, rngs=rngs)
        self.norm = nnx.LayerNorm(4, rngs=rngs)
        self.conv = nnx.Conv(2, 3, kernel_size=(3,), rngs=rngs)


def nnx_stacked() -> Stackable:
    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
        return Stackable(rngs)

    return nnx.eval_shape(lambda: make(nnx.Rngs(0)))


def test_nnx_vmap_stacked_layers_keep_the_stacked_axis_as_a_batch_axis():
    model = nnx_stacked()
    assert model.conv.kernel.shape == (3, 3, 2, 3)
    assert flat(MATRICES.muon_dims_for_flax(model)) == {
        "conv/bias": None,
        "conv/kernel": STACKED_CONV_1D,
        "linear/bias": None,
        "linear/kernel": STACKED_IN_OUT,
        "norm/bias": None,
        "norm/scale": None,
    }
    # A State read by names: every layer agrees on one leading axis of 3, which its
    # fixed one-layer ranks prove stacked, so it gives the module's dims.
    assert flat(MATRICES.muon_dims_for_flax(nnx.state(model, nnx.Param))) == flat(
        MATRICES.muon_dims_for_flax(model)
    )


class NnxMixer(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        # An ellipsis: which kernel axes contract depends on the input's rank.
        self.mix = nnx.Einsum("...i,hio->...ho", (2, 4, 3), rngs=rngs)


class NnxGate(nnx.Module):
    def __init__(self):
        self.w = nnx.Param(jnp.ones((4, 4)))


class NnxGated(nnx.Module):
    def __init__(self):
        self.gate = NnxGate()


def test_nnx_unknown_layout_is_an_error():
    with pytest.raises(ValueError) as info:
        MATRICES.muon_dims_for_flax(nnx.eval_shape(lambda: NnxMixer(nnx.Rngs(0))))
    assert str(info.value) == unknown_layout(
        "mix/kernel", "Einsum", (2, 4, 3), PRESET_RULE, "kernel"
    )
    model = NnxGated()
    with (
        pytest.raises(ValueError) as info,
        pytest.warns(dm.PolicyWarning, match="layers of unknown kind own parameters"),
    ):
        dm.Policy(dm.decay()).muon_dims_for_flax(model)
    assert str(info.value) == unknown_layout("gate/w", "NnxGate", (4, 4), "rule 1: decay()", "w")
    # By names, a 2-D ``w`` reads as a linear layer's matrix (content evidence), but
    # names never prove a layout.
    with pytest.raises(ValueError) as info:
        dm.Policy(dm.decay()).muon_dims_for_flax(nnx.state(model, nnx.Param))
    assert str(info.value) == unknown_layout(
        "gate/w", "linear", (4, 4), "rule 1: decay()", "w", by_name=True
    )


# The preset


def test_muon_preset_excludes_the_head():
    x = jnp.zeros((1, 4))

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3, name="head")(nn.Dense(4)(x))

    params = linen_params(Model(), x)
    both = {"Dense_0/bias": None, "Dense_0/kernel": IN_OUT, "head/bias": None}
    # The user-named head's layout comes from its class: traced.
    assert flat(
        dm.presets.muon().muon_dims_for_flax(params, module=Model(), args=(x,))
    ) == {
        **both,
        "head/kernel": IN_OUT,
    }
    excluded = dm.presets.muon(exclude="head/*").muon_dims_for_flax(params)
    assert flat(excluded) == {**both, "head/kernel": None}

    model = abstract_nnx_zoo()
    assert flat(dm.presets.muon(exclude="attn/*").muon_dims_for_flax(model)) == {
        **NNX_ZOO,
        **{f"attn/{p}/kernel": None for p in PROJECTIONS},
    }


# Real optax steps


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, tokens, image):
        h = nn.Embed(VOCAB, 6)(tokens)
        h = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=4)(
            nn.LayerNorm()(h)
        )
        return nn.Dense(3)(h), nn.Conv(4, (3, 3))(image)


NET_ARGS = (jnp.zeros((1, 2), jnp.int32), jnp.zeros((1, 5, 5, 3)))
LINEN_NET = {
    **{path: dims for path, dims in LINEN_ZOO.items() if path.startswith(ATTENTION)},
    "Conv_0/bias": None,
    "Conv_0/kernel": CONV_2D,
    "Dense_0/bias": None,
    "Dense_0/kernel": IN_OUT,
    "Embed_0/embedding": None,
    "LayerNorm_0/bias": None,
    "LayerNorm_0/scale": None,
}
LINEN_NET = dict(sorted(LINEN_NET.items()))


def test_linen_real_muon_step():
    abstract = linen_params(LinenNet(), *NET_ARGS)
    params, grads = filled(abstract, 0), filled(abstract, 1)
    value = MATRICES.muon_dims_for_flax(params, module=LinenNet(), args=NET_ARGS)
    assert value == nested(LINEN_NET)  # the hand-written tree, containers and all
    expected = muon_step(params, grads, value)
    assert_trees_close(muon_step(params, grads, MATRICES.muon_dims_for_flax), expected)
    # Adam's first step moves every element of a leaf by the same amount; Muon's does not.
    for path, dims in LINEN_NET.items():
        *modules, name = path.split("/")
        before, after = params, expected
        for key in modules:
            before, after = before[key], after[key]
        moved = np.abs(np.asarray(after[name]) - np.asarray(before[name]))
        assert (np.ptp(moved) > 1e-3) == (dims is not None), path


def nnx_zoo() -> NnxZoo:
    graphdef, state = nnx.split(abstract_nnx_zoo())
    return nnx.merge(graphdef, filled(state, 0))


@functools.cache
def nnx_gradients() -> dict:
    return filled(nnx.to_pure_dict(nnx.state(abstract_nnx_zoo(), nnx.Param)), 1)


@functools.cache
def nnx_expected_step() -> dict:
    """The zoo's params after the step, taken by optax on plain dicts with hand-written dims."""
    params = nnx.to_pure_dict(nnx.state(nnx_zoo(), nnx.Param))
    return muon_step(params, nnx_gradients(), nested(NNX_ZOO))


@pytest.mark.parametrize("form", ["state", "callable"])
def test_nnx_optimizer_step(form):
    model = nnx_zoo()
    grads = jax.tree.map(lambda x: x, nnx.state(model, nnx.Param))  # new variables
    nnx.replace_by_pure_dict(grads, nnx_gradients())
    dims = (
        MATRICES.muon_dims_for_flax(model)
        if form == "state"
        else MATRICES.muon_dims_for_flax
    )
    tx = optax.contrib.muon(
        LEARNING_RATE, muon_weight_dimension_numbers=dims, **ONE_STEP
    )
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    nnx.jit(lambda optimizer, model, grads: optimizer.update(model, grads))(
        optimizer, model, grads
    )
    assert_trees_close(
        nnx.to_pure_dict(nnx.state(model, nnx.Param)), nnx_expected_step()
    )


def test_explain_shows_dims():
    params = linen_params(LinenZoo(), *LINEN_ARGS)
    report = str(
        MATRICES.explain(params, show_dims=True, module=LinenZoo(), args=LINEN_ARGS)
    )
    header, *lines = report.splitlines()
    assert header.split()[-4:] == ["shape", "muon", "dims", "rule"]
    rows = {line.split()[0]: line for line in lines}
    assert "yes   (0,)->(1, 2)" in rows[f"{ATTENTION}/query/kernel"]
    assert "yes   (0, 1)->(2,)" in rows[f"{ATTENTION}/out/kernel"]
    assert "yes   (0, 1, 2)->(3,)" in rows["Conv_0/kernel"]
    assert " no    -  " in rows["Dense_0/bias"]
    assert "muon" not in str(MATRICES.explain(params))

    model = abstract_nnx_zoo()
    for tree in (model, nnx.state(model, nnx.Param)):
        rows = {
            line.split()[0]: line
            for line in str(MATRICES.explain(tree, show_dims=True)).splitlines()
        }
        assert "yes   (0,)->(1,)" in rows["linear/kernel"]
        assert "yes   (0, 1)->(2,)" in rows["attn/out/kernel"]
        assert " no    -  " in rows["embed/embedding"]


@pytest.mark.parametrize("argument", ["dims", "weight_decay_mask"])
def test_callables_handed_one_branch_do_not_warn(argument):
    """optax.contrib.muon calls a callable dims tree and a callable weight_decay_mask on
    the Muon branch's view of the params, every Adam leaf an optax.MaskedNode: a rule
    that selects only Adam leaves matches nothing there, and must not warn."""
    x = jnp.zeros((1, 4))

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3, name="head")(nn.LayerNorm()(nn.Dense(4)(x)))

    params = filled(linen_params(Model(), x), 0)
    if argument == "dims":
        trace_muon(
            params,
            muon_weight_dimension_numbers=dm.presets.muon(
                exclude="head/*"
            ).muon_dims_for_flax,
        )
    else:
        decay = dm.Policy(
            dm.decay(), dm.no_decay(param="bias"), dm.no_decay(layer="norm")
        )
        trace_muon(params, weight_decay=0.1, weight_decay_mask=decay.for_flax)


# Known problems


@pytest.mark.xfail(
    strict=True,
    raises=ValueError,
    reason=(
        "optax.contrib.muon calls callable dims on the Muon branch's view of the params, "
        "where the biases (Adam leaves) are optax.MaskedNode; by names alone a "
        "DenseGeneral's output axes are read off its bias, so the callable fails there"
    ),
)
def test_linen_callable_dims_for_a_dense_general():
    x = jnp.zeros((1, 4))

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.DenseGeneral((2, 3))(x)

    params = filled(linen_params(Model(), x), 0)
    assert (
        flat(MATRICES.muon_dims_for_flax(params))["DenseGeneral_0/kernel"] == TO_HEADS
    )
    trace_muon(params, muon_weight_dimension_numbers=MATRICES.muon_dims_for_flax)


class NamedScan(nn.Module):
    @nn.compact
    def __call__(self, x):
        scan = nn.scan(
            ConvBlock,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=2,
        )
        return scan(name="layers")(x)[0]


CONV_WEIGHTS = dm.Policy(dm.decay(layer="conv", param="weight"))


def stacked_conv_dims(dims_of) -> Dims | None:
    """The dims names give a stacked conv kernel: right, or an error; never a window
    widened by the stacked axis."""
    try:
        return dims_of()
    except ValueError:
        return STACKED_CONV_1D


@pytest.mark.parametrize("framework", ["linen", "nnx_state"])
def test_names_never_fold_a_stacked_axis_into_a_conv_window(framework):
    if framework == "linen":
        x = jnp.zeros((1, 5, 4))
        params = linen_params(NamedScan(), x)
        assert params["layers"]["Conv_0"]["bias"].shape == (2, 4)
        path = "layers/Conv_0/kernel"
        dims = stacked_conv_dims(
            lambda: flat(CONV_WEIGHTS.muon_dims_for_flax(params))[path]
        )
    else:
        state = nnx.state(nnx_stacked(), nnx.Param)
        assert state["conv"]["bias"].shape == (3, 3)
        dims = stacked_conv_dims(
            lambda: flat(CONV_WEIGHTS.muon_dims_for_flax(state))["conv/kernel"]
        )
    assert dims == STACKED_CONV_1D


class NnxProjection(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.w = nnx.Param(jax.random.normal(rngs.params(), (3, 5)))  # (in, out)
        self.b = nnx.Param(jnp.zeros(5))


def test_nnx_registered_layout_is_shifted_past_stacked_axes():
    @nnx.vmap(in_axes=0, out_axes=0)
    def make(key):
        return NnxProjection(nnx.Rngs(key))

    stack = make(jax.random.split(jax.random.key(0), 4))
    policy = dm.Policy(dm.decay(param="weight"))
    dm.register_layer(NnxProjection, "linear", roles={"w": "weight", "b": "bias"}, matrix_axes={"w": ((0,), (1,))})
    try:
        dims = flat(policy.muon_dims_for_flax(stack))
        rows = policy.explain(stack)
    finally:
        dm.unregister_layer(NnxProjection)
    assert [(r.path, r.shape, r.leaf.batch_axes, r.leaf.ndim) for r in rows] == [
        ("b", (4, 5), 1, 1),
        ("w", (4, 3, 5), 1, 2),
    ]
    assert dims == {"b": None, "w": STACKED_IN_OUT}


def test_nnx_registered_layout_of_another_rank_is_a_clear_error():
    dm.register_layer(NnxGate, "linear", matrix_axes={"w": ((0, 1), (2,))})
    try:
        with pytest.raises(ValueError) as info:
            dm.Policy(dm.decay(param="weight")).muon_dims_for_flax(NnxGated())
    finally:
        dm.unregister_layer(NnxGate)
    assert str(info.value) == (
        "muon_dims_for_flax: gate/w has shape (4, 4), but the matrix axes of NnxGate.w, "
        "reduction (0, 1) and output (2,), name an axis that one layer's array of 2 axes "
        "does not have. Fix: register the layout of one layer's array, with axes below 2: "
        "dm.register_layer(NnxGate, 'linear', matrix_axes={'w': ((...), (...))}), or leave "
        "it out with dm.no_decay(path='gate/w')."
    )


def test_nnx_weight_norm_scales_are_gains_never_muon_matrices():
    model = nnx.WeightNorm(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(0))
    rows = MATRICES.explain(model, wrt=...)
    assert [(r.path, r.role, r.decay) for r in rows] == [
        ("layer_instance/bias", "bias", False),
        ("layer_instance/kernel", "weight", True),
        ("scales/('kernel',)", "gain", False),
    ]
    dims = nnx.to_flat_state(MATRICES.muon_dims_for_flax(model, wrt=...))
    assert [(path, value) for path, value in dims] == [
        (("layer_instance", "bias"), None),
        (("layer_instance", "kernel"), IN_OUT),
        (("scales", ("kernel",)), None),
    ]
