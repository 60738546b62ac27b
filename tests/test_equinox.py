"""The Equinox adapter, end to end through real optax steps."""

from __future__ import annotations

import re
import warnings
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optax
import pytest

import decaymask as dm
from helpers import (
    WEIGHT_DECAY,
    assert_decays_exactly,
    assert_same_tree,
    flat_with_paths,
    zero_grad_updates,
)

SEED = dm.Policy(dm.decay(layer="linear"), dm.decay(layer="layer_norm", param="bias"))


class Block(eqx.Module):
    norm1: eqx.nn.LayerNorm
    attn: eqx.nn.MultiheadAttention
    norm2: eqx.nn.LayerNorm
    mlp: eqx.nn.MLP
    heads: int

    def __init__(self, width: int, key: jax.Array):
        k1, k2 = jax.random.split(key)
        self.norm1 = eqx.nn.LayerNorm(width)
        self.attn = eqx.nn.MultiheadAttention(2, width, key=k1)
        self.norm2 = eqx.nn.LayerNorm(width)
        self.mlp = eqx.nn.MLP(width, width, 2 * width, 1, activation=jax.nn.gelu, key=k2)
        self.heads = 2


class Model(eqx.Module):
    """Attention, MLPs, embeddings, norms, convolutions and non-array fields."""

    embed: eqx.nn.Embedding
    conv: eqx.nn.Conv1d
    blocks: list[Block]
    final_norm: eqx.nn.RMSNorm
    head: eqx.nn.Linear
    activation: object
    depth: int

    def __init__(self, key: jax.Array, width: int = 8, vocab: int = 11):
        keys = jax.random.split(key, 5)
        self.embed = eqx.nn.Embedding(vocab, width, key=keys[0])
        self.conv = eqx.nn.Conv1d(width, width, 3, padding=1, key=keys[1])
        self.blocks = [Block(width, k) for k in jax.random.split(keys[2], 2)]
        self.final_norm = eqx.nn.RMSNorm(width)
        self.head = eqx.nn.Linear(width, vocab, key=keys[3])
        self.activation = jax.nn.relu
        self.depth = 2


@pytest.fixture(scope="module")
def model() -> Model:
    return Model(jax.random.key(0))


def classic_mask(params):
    """The hand-written recipe: every Linear parameter, the bias of every LayerNorm."""

    def set_mask(x):
        if isinstance(x, eqx.nn.Linear):
            return jtu.tree_map(lambda _: True, x)
        if isinstance(x, eqx.nn.LayerNorm):
            return eqx.tree_at(lambda m: (m.weight, m.bias), x, (False, True))
        return False

    return jtu.tree_map(
        set_mask, params, is_leaf=lambda x: isinstance(x, (eqx.nn.Linear, eqx.nn.LayerNorm))
    )


def expected_decay(params) -> dict[str, bool]:
    return {k: v for k, v in flat_with_paths(classic_mask(params)).items()}


@pytest.mark.parametrize(
    "filter_spec", [eqx.is_array, eqx.is_inexact_array], ids=["is_array", "is_inexact_array"]
)
def test_seed_policy_equals_classic_recipe(model, filter_spec):
    params = eqx.filter(model, filter_spec)
    assert_same_tree(SEED.for_equinox(params), classic_mask(params))
    # On the model itself: the same tree, `None` at every non-array field.
    assert_same_tree(SEED.for_equinox(model), classic_mask(params))


def test_mask_is_none_at_non_array_fields(model):
    mask = SEED.for_equinox(model)
    assert mask.activation is None and mask.depth is None and mask.blocks[0].heads is None
    assert mask.blocks[0].mlp.activation is None
    assert mask.head.weight is True and mask.head.bias is True
    assert mask.blocks[1].norm2.weight is False and mask.blocks[1].norm2.bias is True
    assert mask.embed.weight is False and mask.conv.weight is False


def test_abstract_model_gives_the_same_mask(model):
    abstract = eqx.filter_eval_shape(Model, jax.random.key(0))
    assert isinstance(abstract.head.weight, jax.ShapeDtypeStruct)
    assert_same_tree(SEED.for_equinox(abstract), SEED.for_equinox(model))
    assert [tuple(r) for r in _rows(SEED.explain(abstract))] == [
        tuple(r) for r in _rows(SEED.explain(model))
    ]


def _rows(report):
    return [(r.path, r.layer, r.layer_type, r.role, r.shape, r.dtype, r.decay) for r in report]


@pytest.mark.parametrize("callable_mask", [False, True], ids=["mask_tree", "callable"])
def test_zero_gradient_adamw_step_eager(model, callable_mask):
    params = eqx.filter(model, eqx.is_inexact_array)
    mask = SEED.for_equinox if callable_mask else SEED.for_equinox(params)
    updates = zero_grad_updates(params, mask)
    assert_decays_exactly(params, updates, expected_decay(params))


@pytest.mark.parametrize("callable_mask", [False, True], ids=["mask_tree", "callable"])
def test_zero_gradient_adamw_step_under_filter_jit(model, callable_mask):
    mask = SEED.for_equinox if callable_mask else SEED.for_equinox(model)
    tx = optax.adamw(1.0, weight_decay=WEIGHT_DECAY, mask=mask)
    opt_state = tx.init(eqx.filter(model, eqx.is_array))

    @eqx.filter_jit
    def step(model, opt_state):
        params = eqx.filter(model, eqx.is_array)
        grads = jax.tree.map(jnp.zeros_like, params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return eqx.apply_updates(model, updates), updates

    new_model, updates = step(model, opt_state)
    params = eqx.filter(model, eqx.is_array)
    assert_decays_exactly(params, updates, expected_decay(params))
    # The model really moved: decayed leaves to p - wd * p, the rest unchanged.
    assert np.array_equal(
        new_model.head.weight, model.head.weight + -(WEIGHT_DECAY * model.head.weight)
    )
    assert np.array_equal(new_model.embed.weight, model.embed.weight)


KEY = jax.random.key(1)
LAYERS = [
    ("linear", eqx.nn.Linear(3, 4, key=KEY), {"weight": ("linear", "weight"), "bias": ("linear", "bias")}),
    ("conv1d", eqx.nn.Conv1d(2, 3, 3, key=KEY), {"weight": ("conv", "weight"), "bias": ("conv", "bias")}),
    ("conv3d", eqx.nn.Conv3d(2, 3, 1, key=KEY), {"weight": ("conv", "weight"), "bias": ("conv", "bias")}),
    ("conv_transpose2d", eqx.nn.ConvTranspose2d(2, 3, 2, key=KEY), {"weight": ("conv", "weight"), "bias": ("conv", "bias")}),
    ("embedding", eqx.nn.Embedding(5, 3, key=KEY), {"weight": ("embedding", "embedding")}),
    ("layer_norm", eqx.nn.LayerNorm(3), {"weight": ("layer_norm", "scale"), "bias": ("layer_norm", "bias")}),
    ("rms_norm", eqx.nn.RMSNorm(3), {"weight": ("rms_norm", "scale"), "bias": ("rms_norm", "bias")}),
    ("group_norm", eqx.nn.GroupNorm(2, 4), {"weight": ("group_norm", "scale"), "bias": ("group_norm", "bias")}),
    ("gru", eqx.nn.GRUCell(2, 3, key=KEY), {"weight_ih": ("recurrent", "weight"), "weight_hh": ("recurrent", "weight"), "bias": ("recurrent", "bias"), "bias_n": ("recurrent", "bias")}),
    ("lstm", eqx.nn.LSTMCell(2, 3, key=KEY), {"weight_ih": ("recurrent", "weight"), "weight_hh": ("recurrent", "weight"), "bias": ("recurrent", "bias")}),
    ("prelu", eqx.nn.PReLU(), {"negative_slope": ("prelu", "other")}),
]


@pytest.mark.parametrize("layer, expected", [(l, e) for _, l, e in LAYERS], ids=[i for i, _, _ in LAYERS])
def test_kinds_and_roles_of_every_layer(layer, expected):
    rows = dm.Policy().explain(layer)
    assert {r.path: (r.layer, r.role) for r in rows} == expected
    assert {r.layer_type for r in rows} == {type(layer).__name__}


def test_attention_projections_are_linear_within_attention():
    attn = eqx.nn.MultiheadAttention(2, 4, use_query_bias=True, key=KEY)
    report = dm.Policy(dm.decay(within="attention", param="weight")).explain(attn)
    assert [(r.path, r.layer, r.role, r.decay) for r in report] == [
        ("query_proj/weight", "linear", "weight", True),
        ("query_proj/bias", "linear", "bias", False),
        ("key_proj/weight", "linear", "weight", True),
        ("value_proj/weight", "linear", "weight", True),
        ("output_proj/weight", "linear", "weight", True),
    ]
    # `layer=` is the owner only: the projections are owned by Linear layers, and the
    # warning says to use within=.
    with pytest.warns(dm.PolicyWarning) as record:
        mask = dm.Policy(dm.decay(layer="attention")).for_equinox(attn)
    assert not any(jax.tree.leaves(mask))
    assert str(record[0].message) == (
        "for_equinox: rule 1 decay(layer='attention') matched no parameter of this tree. "
        "Check the kind, role, name or path it selects against policy.explain(tree), "
        "which lists what every array is. Rule 1: layer= selects the layer that owns an "
        "array, and these arrays are owned by layers inside it; within= selects those. "
        "(strict=True makes this an error.)"
    )


def test_batch_norm_state_is_never_decayed():
    bn = eqx.nn.BatchNorm(3, "batch", mode="batch")
    report = dm.Policy(dm.decay()).explain(bn)
    assert [(r.path, r.role, r.decay, r.why) for r in report] == [
        ("weight", "scale", True, "rule 1: decay()"),
        ("bias", "bias", True, "rule 1: decay()"),
        ("batch_counter/init", "other", False, "state: never decayed"),
        ("batch_state_index/init/0", "other", False, "state: never decayed"),
        ("batch_state_index/init/1", "other", False, "state: never decayed"),
    ]


def test_non_floating_arrays_are_never_decayed():
    class Counter(eqx.Module):
        steps: jax.Array
        table: np.ndarray
        weight: jax.Array

    tree = Counter(jnp.zeros((), jnp.int32), np.ones((2,), np.bool_), jnp.ones((2, 2)))
    report = dm.Policy(dm.decay()).explain(tree)
    assert [(r.path, r.decay, r.why) for r in report] == [
        ("steps", False, "not floating point: never decayed"),
        ("table", False, "not floating point: never decayed"),
        ("weight", True, "rule 1: decay()"),
    ]


class MyLinear(eqx.nn.Linear):
    pass


def test_subclasses_count_as_their_base_kind():
    row = dm.Policy(dm.decay(layer="linear")).explain(MyLinear(2, 2, key=KEY))[0]
    assert (row.layer, row.layer_type, row.leaf.kind_source, row.decay) == (
        "linear",
        "MyLinear",
        "class",
        True,
    )


def test_class_selectors_match_subclasses_only():
    tree = [eqx.nn.Linear(2, 2, key=KEY), MyLinear(2, 2, key=KEY)]
    assert dm.Policy(dm.decay(layer=MyLinear)).for_equinox(tree)[0].weight is False
    assert dm.Policy(dm.decay(layer=MyLinear)).for_equinox(tree)[1].weight is True
    assert dm.Policy(dm.decay(layer=eqx.nn.Linear)).for_equinox(tree)[0].weight is True


def test_weight_norm_is_looked_through():
    wn = eqx.nn.WeightNorm(eqx.nn.Linear(3, 2, key=KEY))
    report = SEED.explain(wn)
    assert [(r.path, r.layer, r.layer_type, r.role, r.decay) for r in report] == [
        ("layer/weight", "linear", "Linear", "weight", True),
        ("layer/bias", "linear", "Linear", "bias", True),
        ("g", "linear", "WeightNorm", "gain", True),
    ]
    weights_only = dm.Policy(dm.decay(layer="linear", param="weight")).for_equinox(wn)
    assert (weights_only.layer.weight, weights_only.g) == (True, False)


def test_spectral_norm_state_is_not_decayed():
    sn = eqx.nn.SpectralNorm(eqx.nn.Linear(3, 2, key=KEY), "weight", key=KEY)
    report = dm.Policy(dm.decay()).explain(sn)
    assert [(r.path, r.layer, r.decay) for r in report] == [
        ("layer/weight", "linear", True),
        ("layer/bias", "linear", True),
        ("uv_index/init/0", "linear", False),
        ("uv_index/init/1", "linear", False),
    ]


def test_shared_embedding_and_head():
    class Tied(eqx.Module):
        shared: eqx.nn.Shared

        def __init__(self):
            embed = eqx.nn.Embedding(5, 3, key=KEY)
            head = eqx.nn.Linear(3, 5, use_bias=False, key=KEY)
            self.shared = eqx.nn.Shared(
                (embed, head), lambda pair: pair[1].weight, lambda pair: pair[0].weight
            )

    tied = Tied()
    policy = dm.Policy(dm.decay(layer="embedding"))
    report = policy.explain(tied)
    # The head's weight is replaced by a placeholder: the embedding is the one array.
    assert [(r.path, r.layer, r.role, r.decay) for r in report] == [
        ("shared/pytree/0/weight", "embedding", "embedding", True)
    ]
    params = eqx.filter(tied, eqx.is_inexact_array)
    updates = zero_grad_updates(params, policy.for_equinox)
    assert_decays_exactly(params, updates, {".shared.pytree[0].weight": True})


def test_unknown_module_owning_arrays():
    class Scaler(eqx.Module):
        w: jax.Array
        offset: jax.Array

    tree = Scaler(jnp.ones((2, 2)), jnp.zeros((2,)))
    report = dm.Policy(dm.decay(layer="unknown", param="weight")).explain(tree)
    assert [(r.path, r.layer, r.layer_type, r.role, r.decay) for r in report] == [
        ("w", "unknown", "Scaler", "weight", True),
        ("offset", "unknown", "Scaler", "bias", False),
    ]


def test_register_layer_teaches_kind_and_roles():
    class Projection(eqx.Module):
        w: jax.Array
        offset: jax.Array

    tree = {"proj": Projection(jnp.ones((2, 2)), jnp.zeros((2,)))}
    dm.register_layer(Projection, "linear", roles={"offset": "bias"})
    try:
        report = SEED.explain(tree)
        assert [(r.path, r.layer, r.leaf.kind_source, r.role, r.decay) for r in report] == [
            ("proj/w", "linear", "registered", "weight", True),
            ("proj/offset", "linear", "registered", "bias", True),
        ]
    finally:
        dm.unregister_layer(Projection)
    assert SEED.explain(tree)[0].layer == "unknown"


def test_kind_read_off_an_evident_class_name():
    class LlamaRMSNorm(eqx.Module):
        weight: jax.Array

    class FinalNorm(eqx.Module):
        weight: jax.Array
        bias: jax.Array

    rows = dm.Policy().explain([LlamaRMSNorm(jnp.ones(3)), FinalNorm(jnp.ones(3), jnp.zeros(3))])
    assert [(r.path, r.layer, r.leaf.kind_source, r.role) for r in rows] == [
        ("0/weight", "rms_norm", "name", "scale"),
        ("1/weight", "layer_norm", "name", "scale"),
        ("1/bias", "layer_norm", "name", "bias"),
    ]


def test_within_matches_classes_of_enclosing_modules(model):
    mask = dm.Policy(dm.decay(within=Block, param="weight")).for_equinox(model)
    assert mask.blocks[0].attn.query_proj.weight is True
    assert mask.blocks[0].mlp.layers[0].weight is True
    assert mask.blocks[0].norm1.weight is False  # role scale, not weight
    assert mask.head.weight is False


def test_path_glob_regex_min_ndim_and_when(model):
    by_glob = dm.Policy(dm.decay(path="blocks/1/*")).for_equinox(model)
    assert by_glob.blocks[1].mlp.layers[1].bias is True and by_glob.blocks[0].mlp.layers[1].bias is False
    by_regex = dm.Policy(dm.decay(path=re.compile(r"proj/weight$"))).for_equinox(model)
    assert by_regex.blocks[0].attn.key_proj.weight is True and by_regex.head.weight is False
    by_rank = dm.Policy(dm.decay(min_ndim=2)).for_equinox(model)
    assert by_rank.embed.weight is True and by_rank.head.bias is False
    big = dm.Policy(dm.decay(when=lambda leaf: leaf.size > 64)).explain(model)
    assert {r.path for r in big.decayed} == {
        r.path for r in big if int(np.prod(r.shape)) > 64
    }


def test_stacked_layers_have_batch_axes():
    ensemble = eqx.filter_vmap(lambda k: eqx.nn.Linear(3, 2, key=k))(jax.random.split(KEY, 4))
    rows = dm.Policy(dm.decay(min_ndim=2)).explain(ensemble)
    assert [(r.path, r.shape, r.leaf.batch_axes, r.leaf.ndim, r.decay) for r in rows] == [
        ("weight", (4, 2, 3), 1, 2, True),
        ("bias", (4, 2), 1, 1, False),
    ]


def test_mask_for_a_plain_pytree_of_modules():
    tree = {"a": eqx.nn.Linear(2, 2, key=KEY), "extra": (jnp.ones(2), 3)}
    with pytest.warns(dm.PolicyWarning) as record:
        mask = dm.Policy(dm.decay(layer="linear")).for_equinox(tree)
    assert mask["a"].weight is True and mask["extra"] == (False, None)
    assert [str(w.message) for w in record] == [
        "for_equinox: arrays outside any layer (extra/0); rules on layer kinds never "
        "match them. Select them by param=, name= or path=."
    ]
    # An array whose name says what it is (a bias, a position table) needs no kind.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dm.Policy(dm.decay(layer="linear")).for_equinox({"a": tree["a"], "pos_embed": jnp.ones((4, 2))})


def test_explain_table_text():
    lin = eqx.nn.Linear(3, 2, key=KEY)
    assert str(SEED.explain({"fc": lin, "ln": eqx.nn.LayerNorm(2)})) == "\n".join(
        [
            "path       kind        class      role    shape   decay  rule",
            "----       ----        -----      ----    -----   -----  ----",
            "fc/weight  linear      Linear     weight  (2, 3)  yes    rule 1: decay(layer='linear')",
            "fc/bias    linear      Linear     bias    (2,)    yes    rule 1: decay(layer='linear')",
            "ln/weight  layer_norm  LayerNorm  scale   (2,)    no     default",
            "ln/bias    layer_norm  LayerNorm  bias    (2,)    yes    rule 2: decay(layer='layer_norm', param='bias')",
            "decayed 3 of 4 leaves, 10 of 12 elements (83.3%)",
        ]
    )


def test_conv_bias_counts_as_one_dimensional():
    conv = eqx.nn.Conv2d(2, 4, 3, key=KEY)
    stacked = eqx.filter_vmap(lambda k: eqx.nn.Conv2d(2, 4, 3, key=k))(jax.random.split(KEY, 3))
    policy = dm.Policy(dm.decay(min_ndim=2), dm.no_decay(name="weight"))
    rows = [(r.path, r.shape, r.leaf.ndim, r.decay) for r in policy.explain([conv, stacked])]
    assert rows == [
        ("0/weight", (4, 2, 3, 3), 4, False),
        ("0/bias", (4, 1, 1), 1, False),
        ("1/weight", (3, 4, 2, 3, 3), 4, False),
        ("1/bias", (3, 4, 1, 1), 1, False),
    ]
    text = str(policy.explain(conv)).splitlines()
    assert text[2].endswith("rule 2: no_decay(name='weight') [name= is framework vocabulary]")
    assert text[3].endswith("default [min_ndim counts 1 of its 3 axes]")


def test_prng_key_arrays_are_never_decayed():
    class Noisy(eqx.Module):
        key: jax.Array
        weight: jax.Array

    report = dm.Policy(dm.decay()).explain(Noisy(jax.random.key(0), jnp.ones((2, 2))))
    assert [(r.path, r.dtype, r.decay, r.why) for r in report] == [
        ("key", "key<fry>", False, "not floating point: never decayed"),
        ("weight", "float32", True, "rule 1: decay()"),
    ]


# Hostile but fair trees.


@pytest.mark.parametrize(
    "params",
    [jnp.array([0.6, 0.7, 0.8]), jnp.float32(0.9), np.array([[0.6, 0.7]], np.float32)],
    ids=["vector", "scalar", "numpy"],
)
def test_a_single_array_gets_one_bool(params):
    policy = dm.Policy(dm.decay(param="other"))
    outside = pytest.warns(dm.PolicyWarning, match=r"arrays outside any layer")
    with outside:
        assert policy.for_equinox(params) is True
    with outside:
        assert dm.Policy().for_equinox(params) is False
    [row] = policy.explain(params)
    assert (row.path, row.decay, row.layer) == ("", True, "unknown")
    with outside:
        updates = zero_grad_updates(params, policy.for_equinox)
    assert_decays_exactly(params, updates, {"": True})


def test_flax_modules_are_sent_to_for_flax():
    import flax.linen as nn
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self):
            self.lin = nnx.Linear(2, 3, rngs=nnx.Rngs(0))

    for tree, name in [(Net(), "Net"), (nnx.Linear(2, 3, rngs=nnx.Rngs(0)), "Linear"),
                       (nn.Dense(3), "Dense")]:
        with pytest.raises(TypeError) as info:
            SEED.for_equinox(tree)
        assert str(info.value) == (
            f"for_equinox: got a {name} from Flax; use policy.for_flax(...) for Flax "
            f"params, variables, nnx.Module or nnx.State."
        )
    with pytest.raises(TypeError, match=r"^labels_for_equinox: got a Net from Flax; use policy.labels_for_flax\(...\)"):
        SEED.labels_for_equinox(Net())


def test_keys_holding_a_slash_give_distinct_escaped_paths():
    keys = jax.random.split(jax.random.key(1), 3)
    tree = {"a/b": eqx.nn.Linear(2, 2, key=keys[0]), "a": {"b": eqx.nn.Linear(2, 2, key=keys[1])},
            "50%": eqx.nn.Linear(2, 2, key=keys[2])}
    paths = [row.path for row in SEED.explain(tree)]
    assert sorted(paths) == ["50%25/bias", "50%25/weight", "a%2Fb/bias", "a%2Fb/weight",
                             "a/b/bias", "a/b/weight"]
    nested = dm.Policy(dm.decay(path="a/b/*")).for_equinox(tree)
    assert nested["a"]["b"].weight and not nested["a/b"].weight
    slashed = dm.Policy(dm.decay(path=re.compile(r"^a%2Fb/"))).for_equinox(tree)
    assert slashed["a/b"].weight and not slashed["a"]["b"].weight


def test_masks_built_from_threads_while_layers_are_registered():
    from helpers import build_while_registering

    class Projection(eqx.Module):
        w: jax.Array

    class Spare(eqx.Module):
        w: jax.Array

    tree = {"proj": Projection(jnp.ones((2, 2))), "model": Model(jax.random.key(2))}
    plain = SEED.for_equinox
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dm.PolicyWarning)
        expected = plain(tree)
        dm.register_layer(Projection, "linear")
        registered = plain(tree)
        dm.unregister_layer(Projection)

        def churn():
            dm.register_layer(Projection, "linear")
            dm.register_layer(Spare, "conv")
            dm.unregister_layer(Projection)
            dm.unregister_layer(Spare)

        results = build_while_registering(lambda: plain(tree), churn)
        after = plain(tree)
    assert not expected["proj"].w and registered["proj"].w
    same = lambda a, b: jax.tree.leaves(a) == jax.tree.leaves(b)  # noqa: E731
    assert results and all(same(m, expected) or same(m, registered) for m in results)
    assert same(after, expected)


# Arrays in lists, tuples and custom pytree nodes: the mask is what explain shows.


class ListMLP(eqx.Module):
    weights: list
    biases: list


def _list_mlp() -> ListMLP:
    return ListMLP([jnp.ones((4, 3)), jnp.ones((2, 4))], [jnp.ones(4), jnp.ones(2)])


def test_arrays_in_list_fields_are_decided_by_their_field():
    mlp = _list_mlp()
    policy = dm.Policy(dm.decay(), dm.no_decay(param="bias"))
    rows = policy.explain(mlp)
    assert [(r.path, r.leaf.name, r.role, r.decay) for r in rows] == [
        ("weights/0", "weights", "weight", True),
        ("weights/1", "weights", "weight", True),
        ("biases/0", "biases", "bias", False),
        ("biases/1", "biases", "bias", False),
    ]
    with pytest.warns(dm.PolicyWarning) as record:
        mask = dm.presets.everything_but_bias_and_norm().for_equinox(mlp)
    assert any("unknown kind" in str(w.message) for w in record)
    assert jax.tree.leaves(mask) == [True, True, False, False]
    with pytest.warns(dm.PolicyWarning, match="unknown kind"):
        mask = policy.for_equinox(mlp)
    assert jax.tree.leaves(mask) == [r.decay for r in rows]
    params = eqx.filter(mlp, eqx.is_inexact_array)
    with pytest.warns(dm.PolicyWarning, match="unknown kind"):
        updates = zero_grad_updates(params, policy.for_equinox(mlp))
    assert_decays_exactly(
        params,
        updates,
        {".weights[0]": True, ".weights[1]": True, ".biases[0]": False, ".biases[1]": False},
    )


def test_labels_and_rates_of_arrays_in_tuple_fields():
    class Pair(eqx.Module):
        kernels: tuple
        bias: tuple

    pair = Pair((jnp.ones((2, 2)), jnp.ones((2, 2))), (jnp.ones(2), jnp.ones(2)))
    policy = dm.Policy(
        dm.decay(rate=0.5, label="matrices"), dm.no_decay(param="bias", label="vectors")
    )
    with pytest.warns(dm.PolicyWarning, match="unknown kind"):
        labels = policy.labels_for_equinox(pair)
    with pytest.warns(dm.PolicyWarning, match="unknown kind"):
        rates = policy.rates_for_equinox(pair)
    rows = policy.explain(pair)
    assert jax.tree.leaves(labels) == [r.label for r in rows] == ["matrices"] * 2 + ["vectors"] * 2
    assert jax.tree.leaves(rates) == [r.rate for r in rows] == [0.5, 0.5, 0.0, 0.0]


class NamedModule(eqx.Module):
    """A named array as an Equinox module: the array, and its axis names as static data."""

    array: jax.Array
    axes: tuple = eqx.field(static=True)


class NamedNode:
    """A named array as a registered pytree class whose one child is keyed 0."""

    def __init__(self, array, axes):
        self.array = array
        self.axes = axes


jtu.register_pytree_node(NamedNode, lambda n: ((n.array,), n.axes), lambda axes, c: NamedNode(c[0], axes))


class NamedKeyed:
    """A named array as a registered pytree class whose one child is keyed ``array``."""

    def __init__(self, array, axes):
        self.array = array
        self.axes = axes


jtu.register_pytree_with_keys(
    NamedKeyed,
    lambda n: (((jtu.GetAttrKey("array"), n.array),), n.axes),
    lambda axes, c: NamedKeyed(c[0], axes),
)


class NamedLinear(eqx.Module):
    weight: Any
    bias: Any


class NamedLayerNorm(eqx.Module):
    weight: Any
    bias: Any


class NamedNet(eqx.Module):
    layers: list
    norm: NamedLayerNorm


def _named_net(named) -> NamedNet:
    def linear(n_in, n_out):
        return NamedLinear(named(jnp.ones((n_out, n_in)), ("out", "in")), named(jnp.ones(n_out), ("out",)))

    return NamedNet(
        [linear(3, 4), linear(4, 2)],
        NamedLayerNorm(named(jnp.ones(2), ("out",)), named(jnp.zeros(2), ("out",))),
    )


NAMED_TYPES = pytest.mark.parametrize(
    "named", [NamedModule, NamedNode, NamedKeyed], ids=["module", "keyed_0", "keyed_array"]
)


@NAMED_TYPES
def test_named_arrays_are_named_by_the_field_holding_them(named):
    net = _named_net(named)
    policy = dm.presets.everything_but_bias_and_norm()
    rows = policy.explain(net)
    inner = "0" if named is NamedNode else "array"
    assert [(r.path, r.leaf.name, r.layer, r.layer_type, r.role, r.decay) for r in rows] == [
        (f"layers/0/weight/{inner}", "weight", "linear", "NamedLinear", "weight", True),
        (f"layers/0/bias/{inner}", "bias", "linear", "NamedLinear", "bias", False),
        (f"layers/1/weight/{inner}", "weight", "linear", "NamedLinear", "weight", True),
        (f"layers/1/bias/{inner}", "bias", "linear", "NamedLinear", "bias", False),
        (f"norm/weight/{inner}", "weight", "layer_norm", "NamedLayerNorm", "scale", False),
        (f"norm/bias/{inner}", "bias", "layer_norm", "NamedLayerNorm", "bias", False),
    ]
    assert {tuple(a.type_name for a in r.leaf.ancestors) for r in rows} == {("NamedNet",)}
    # No warning: the bias rule matches the biases.
    mask = policy.for_equinox(net)
    assert jax.tree.leaves(mask) == [r.decay for r in rows]
    labels = policy.labels_for_equinox(net)
    assert jax.tree.leaves(labels) == [r.label for r in rows]
    params = eqx.filter(net, eqx.is_inexact_array)
    updates = zero_grad_updates(params, policy.for_equinox)
    assert jax.tree.leaves(
        jax.tree.map(lambda p, u: bool(np.any(u != 0)), params, updates)
    ) == [True, False, True, False, False, False]


# Kinds read off class names are checked against what the instance owns.


class EncoderStableLayerNorm(eqx.Module):
    layers: list


class SimpleNorm2d(eqx.Module):
    weight: jax.Array


class Conv1D(eqx.Module):
    """Named as a convolution, but its weight is an (out, in) matrix."""

    weight: jax.Array
    bias: jax.Array


def test_class_name_kinds_are_checked_against_content():
    model = EncoderStableLayerNorm(
        [Conv1D(jnp.ones((4, 3)), jnp.ones(4)), SimpleNorm2d(jnp.ones(4))]
    )
    policy = dm.Policy(dm.decay(layer="linear", param="weight"), dm.no_decay(within="layer_norm"))
    rows = policy.explain(model)
    assert [
        (r.path, r.layer, r.leaf.kind_source, r.role, [a.kind for a in r.leaf.ancestors], r.decay)
        for r in rows
    ] == [
        # A conv by name, a linear layer by its 2-D weight.
        ("layers/0/weight", "linear", "content", "weight", ["unknown"], True),
        ("layers/0/bias", "linear", "content", "bias", ["unknown"], False),
        # A norm by name, its weight a scale.
        ("layers/1/weight", "rms_norm", "name", "scale", ["unknown"], False),
    ]
    # The outer module owns only submodules: its name does not make it a norm.
    assert rows[0].leaf.ancestors[0].type_name == "EncoderStableLayerNorm"
    params = eqx.filter(model, eqx.is_inexact_array)
    with pytest.warns(dm.PolicyWarning, match=r"no_decay\(within='layer_norm'\) matched no parameter"):
        mask = policy.for_equinox(model)
    updates = zero_grad_updates(params, mask)
    assert_decays_exactly(
        params,
        updates,
        {".layers[0].weight": True, ".layers[0].bias": False, ".layers[1].weight": False},
    )
    # Muon never takes a layout from a name: the content-read linear layer has none.
    with pytest.raises(ValueError, match="matrix layout"):
        dm.presets.muon().muon_dims_for_equinox(model)


# Arrays tied with eqx.nn.Shared: every owner is asked.


class TiedLM(eqx.Module):
    shared: eqx.nn.Shared

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        embed = eqx.nn.Embedding(10, 4, key=k1)
        head = eqx.nn.Linear(4, 10, use_bias=False, key=k2)
        self.shared = eqx.nn.Shared((embed, head), lambda p: p[1].weight, lambda p: p[0].weight)


def test_owners_of_a_shared_array_that_disagree_warn():
    model = TiedLM(KEY)
    policy = dm.presets.standard()
    with pytest.warns(dm.PolicyWarning) as record:
        mask = policy.for_equinox(model)
    assert [str(w.message) for w in record] == [
        "for_equinox: shared/pytree/0/weight is shared with shared/pytree/1/weight, and the "
        "policy decides them differently (shared/pytree/0/weight: rule 4: "
        "no_decay(layer='embedding'); shared/pytree/1/weight: rule 1: decay()). The shared "
        "array follows shared/pytree/0/weight. Add a rule that selects both views, e.g. by path."
    ]
    assert jax.tree.leaves(mask) == [False]
    [row] = policy.explain(model)
    assert [(v.path, v.layer, v.role) for v in row.leaf.shared_with] == [
        ("shared/pytree/1/weight", "linear", "weight")
    ]
    assert row.why.endswith("[shared with shared/pytree/1/weight, where rule 1: decay() would say decay]")
    # Owners that agree, and the documented fix, are silent; so is the abstract model.
    agreeing = dm.Policy(dm.decay(layer=("linear", "embedding")))
    fixed = dm.Policy(*policy.rules, dm.no_decay(path="shared/pytree/1/weight"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert jax.tree.leaves(agreeing.for_equinox(model)) == [True]
        assert jax.tree.leaves(fixed.for_equinox(model)) == [False]
        abstract = eqx.filter_eval_shape(TiedLM, KEY)
        assert jax.tree.leaves(agreeing.for_equinox(abstract)) == [True]
    with pytest.warns(dm.PolicyWarning, match="is shared with"):
        policy.for_equinox(eqx.filter_eval_shape(TiedLM, KEY))


# Where every leaf's modules stand in its path.


class DepthAttention(eqx.Module):
    qkv: eqx.nn.Linear
    out: eqx.nn.Linear

    def __init__(self, width: int, key: jax.Array):
        k1, k2 = jax.random.split(key)
        self.qkv = eqx.nn.Linear(width, 3 * width, key=k1)
        self.out = eqx.nn.Linear(width, width, key=k2)


class DepthBlock(eqx.Module):
    attn: DepthAttention
    norm: eqx.nn.LayerNorm

    def __init__(self, width: int, key: jax.Array):
        self.attn = DepthAttention(width, key)
        self.norm = eqx.nn.LayerNorm(width)


class DepthNet(eqx.Module):
    blocks: list[DepthBlock]
    norm: eqx.nn.LayerNorm
    scale: jax.Array
    mlp: eqx.nn.MLP

    def __init__(self, key: jax.Array, width: int = 4):
        k1, k2 = jax.random.split(key)
        self.blocks = [DepthBlock(width, k) for k in jax.random.split(k1, 3)]
        self.norm = eqx.nn.LayerNorm(width)
        self.scale = jnp.ones(width)
        self.mlp = eqx.nn.MLP(width, width, 8, 2, key=k2)


def _node_at(root: Any, keys: list[str]) -> Any:
    node = root
    for key in keys:
        if isinstance(node, (list, tuple)):
            node = node[int(key)]
        elif isinstance(node, dict):
            node = node[key]
        else:
            node = getattr(node, key)
    return node


def _assert_module_depths_consistent(root: Any, leaves: list[dm.Leaf]) -> None:
    """Every leaf has one depth per module of ancestors + (owner,), each naming that
    module's node in the tree: the first d keys of the path lead to it, the same keys for
    every leaf in that module. An array no module owns stands for its path's parent."""
    prefixes: dict[int, set[tuple[str, ...]]] = {}
    for leaf in leaves:
        keys = leaf.path.split("/")
        depths = leaf.module_depths
        assert len(depths) == len(leaf.ancestors) + 1, leaf.path
        assert all(0 <= d <= len(keys) - 1 for d in depths), (leaf.path, depths)
        assert list(depths) == sorted(depths), (leaf.path, depths)
        for module, d in zip((*leaf.ancestors, leaf.owner), depths):
            node = _node_at(root, keys[:d])
            if module.cls is None:  # no module owns the array
                assert not isinstance(node, eqx.Module), leaf.path
                assert d == len(keys) - 1, leaf.path
            else:
                assert type(node) is module.cls, (leaf.path, d, type(node), module)
            prefixes.setdefault(id(node), set()).add(tuple(keys[:d]))
    assert all(len(found) == 1 for found in prefixes.values()), prefixes


def test_module_depths_say_where_each_module_stands_in_the_path():
    model = DepthNet(KEY)
    leaves = [row.leaf for row in dm.Policy(dm.decay()).explain(model)]
    depths = {leaf.path: leaf.module_depths for leaf in leaves}
    assert depths["blocks/0/attn/qkv/weight"] == (0, 2, 3, 4)
    assert depths["blocks/2/attn/out/bias"] == (0, 2, 3, 4)
    assert depths["blocks/1/norm/weight"] == (0, 2, 3)
    assert depths["norm/bias"] == (0, 1)
    assert depths["scale"] == (0,)  # the root owns it
    assert depths["mlp/layers/1/weight"] == (0, 1, 3)
    owners = {leaf.path: [m.type_name for m in (*leaf.ancestors, leaf.owner)] for leaf in leaves}
    assert owners["blocks/0/attn/qkv/weight"] == [
        "DepthNet", "DepthBlock", "DepthAttention", "Linear"]
    assert owners["mlp/layers/1/weight"] == ["DepthNet", "MLP", "Linear"]
    _assert_module_depths_consistent(model, leaves)
    # The same block in every list entry: the depths leave the leaves' keys as they were.
    adapter = {a.name: a for a in dm.adapters.registered()}["equinox"]
    table, _ = adapter.walk(model, method="explain")
    paths = [leaf.path for leaf in table]
    key_of = dict(zip(paths, table.keys))
    assert key_of["blocks/0/attn/qkv/weight"] == key_of["blocks/2/attn/qkv/weight"]
    assert key_of["blocks/0/norm/bias"] == key_of["blocks/1/norm/bias"]


def test_module_depths_of_unowned_arrays_and_shared_views():
    # A plain pytree: an array no module holds stands for its path's parent.
    head = eqx.nn.Linear(2, 2, key=KEY)
    tree = [DepthNet(KEY), jnp.ones(2), {"head": head, "raw": (jnp.ones(3),)}]
    leaves = [row.leaf for row in dm.Policy(dm.decay()).explain(tree)]
    depths = {leaf.path: leaf.module_depths for leaf in leaves}
    assert depths["0/blocks/1/attn/qkv/weight"] == (1, 3, 4, 5)
    assert depths["1"] == (0,)
    assert depths["2/head/weight"] == (2,)
    assert depths["2/raw/0"] == (2,)
    assert {leaf.path: leaf.ancestors for leaf in leaves}["2/raw/0"] == ()
    _assert_module_depths_consistent(tree, leaves)
    # eqx.nn.Shared: the view of the tied array stands where its own owner does.
    model = TiedLM(KEY)
    [row] = dm.Policy(dm.decay()).explain(model)
    assert row.leaf.module_depths == (0, 1, 3)
    [view] = row.leaf.shared_with
    assert (view.path, view.module_depths) == ("shared/pytree/1/weight", (0, 1, 3))
    assert [m.type_name for m in (*view.ancestors, view.owner)] == ["TiedLM", "Shared", "Linear"]
    _assert_module_depths_consistent(model, [row.leaf, view])
