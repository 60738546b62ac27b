"""Haiku params: names read with the arrays, Haiku's FlatMap, keys that are not strings,
``fn=`` choosing Haiku, no Flax import, and alike modules read once."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import decaymask as dm
from decaymask import _face
from helpers import flat_with_paths

IMAGES = jnp.zeros((1, 8, 8, 3))


def _vit_stem(x: jax.Array) -> jax.Array:
    """A ViT's patch embedding, named as big_vision and many ports name it: ``embed``."""
    h = hk.Conv2D(8, 4, stride=4, padding="VALID", name="embed")(x)
    h = h.reshape(h.shape[0], -1, 8)
    h = hk.LayerNorm(-1, True, True)(h)
    return hk.Linear(3)(h)


def _rows(report):
    return {row.path: row for row in report}


def test_a_conv_named_embed_is_a_conv_and_decays():
    t = hk.transform(_vit_stem)
    p = t.init(jax.random.key(0), IMAGES)
    policy = dm.presets.standard()
    mask = policy.for_haiku(p)
    assert mask == {"embed": {"w": True, "b": False}, "layer_norm": {"scale": False, "offset": False},
                    "linear": {"w": True, "b": False}}
    assert mask == policy.for_haiku(p, fn=t, args=(IMAGES,))
    row = _rows(policy.explain(p, framework="haiku"))["embed/w"]
    assert (row.leaf.layer, row.leaf.kind_source, row.leaf.layer_type, row.leaf.role) == \
        ("conv", "content", None, "weight")
    # Read by its arrays, not as Haiku's Embed: no Embed layout is claimed for it.
    with pytest.raises(ValueError, match="embed/w"):
        dm.presets.muon().muon_dims_for_haiku(p)


def _misnamed(x: jax.Array) -> jax.Array:
    h = hk.Linear(4, name="conv2_d")(x)  # a Linear under a conv's name
    h = hk.Conv1D(4, 2, name="linear")(h[:, None, :])[:, 0]  # a conv under a Linear's name
    return hk.Linear(3, name="layer_norm")(h)  # a Linear under a norm's name


@pytest.mark.parametrize("path,kind", [("conv2_d/w", "linear"), ("linear/w", "conv"),
                                       ("layer_norm/w", "linear")])
def test_any_haiku_name_the_arrays_contradict_is_read_by_the_arrays(path, kind):
    t = hk.transform(_misnamed)
    p = t.init(jax.random.key(0), jnp.zeros((2, 3)))
    rows = _rows(dm.presets.standard().explain(p, framework="haiku"))
    assert (rows[path].leaf.layer, rows[path].leaf.kind_source) == (kind, "content")
    traced = _rows(dm.presets.standard().explain(p, framework="haiku", fn=t, args=(jnp.zeros((2, 3)),)))
    assert rows[path].decay == traced[path].decay is True


def _stacked(x: jax.Array) -> jax.Array:
    def block(h):
        h = hk.Linear(3, with_bias=False)(h)  # no b to show the stack: Linear's ranks do
        c = hk.Conv2D(3, 2)(jnp.zeros((1, 4, 4, 3)))  # a conv's b (n, out) is not a projection's
        return h + c.sum()

    return hk.layer_stack(4, name="blocks")(block)(x)


def test_haiku_layers_of_a_user_named_stack_keep_their_class_by_names():
    t = hk.transform(_stacked)
    x = jnp.zeros((2, 3))
    p = t.init(jax.random.key(0), x)
    policy = dm.presets.muon()
    by_names = _rows(policy.explain(p, framework="haiku"))
    traced = _rows(policy.explain(p, framework="haiku", fn=t, args=(x,)))
    found = {k: (r.leaf.layer, r.leaf.layer_type, r.leaf.batch_axes) for k, r in by_names.items()}
    assert found == {
        "blocks/conv2_d/b": ("conv", "Conv2D", 1),
        "blocks/conv2_d/w": ("conv", "Conv2D", 1),
        "blocks/linear/w": ("linear", "Linear", 1),
    }
    assert {k: (r.leaf.layer, r.leaf.layer_type, r.leaf.batch_axes)
            for k, r in traced.items()} == found
    assert policy.muon_dims_for_haiku(p)["blocks/linear"]["w"] == \
        policy.muon_dims_for_haiku(p, fn=t, args=(x,))["blocks/linear"]["w"]


def _types(tree):
    """The container type at every mapping level, by path."""
    out = {(): type(tree)}
    for key, module in tree.items():
        out[(key,)] = type(module)
    return out


def test_flat_map_params_get_outputs_in_flat_maps_and_a_real_step():
    t = hk.transform(_vit_stem)
    params = hk.data_structures.to_immutable_dict(t.init(jax.random.key(0), IMAGES))
    flat_map = type(params)
    assert flat_map.__name__ == "FlatMap"
    policy = dm.presets.standard()
    outputs = [policy.for_haiku(params), policy.for_haiku(params),  # the second from the cache
               policy.labels_for_haiku(params), policy.rates_for_haiku(params),
               policy.mask(params), policy.for_haiku(params, fn=t, args=(IMAGES,))]
    for out in outputs:
        assert set(_types(out).values()) == {flat_map}
        assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(params)
    dims = dm.presets.muon().muon_dims_for_haiku(params, fn=t, args=(IMAGES,))
    assert set(_types(dims).values()) == {flat_map}
    assert policy.for_haiku(params)["embed"]["w"] is True
    tx = optax.chain(dm.add_decayed_weights(0.5, policy.rates_for_haiku(params)), optax.sgd(1.0))
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    assert type(updates) is flat_map
    for key, module in params.items():
        for name, value in module.items():
            decayed = policy.for_haiku(params)[key][name]
            expected = -0.5 * value if decayed else jnp.zeros_like(value)
            np.testing.assert_allclose(updates[key][name], expected, err_msg=f"{key}/{name}")


@pytest.mark.parametrize(
    "params,message",
    [
        ({"linear": {0: jnp.zeros((2, 3))}},
         "for_haiku: the params key linear/0 is a int, where Haiku keys a param name by a "
         "string; expected a Haiku params dict (module path -> {param name: array}), as "
         "hk.transform(f).init returns. Fix: key it by a string ('0'), or pass the params "
         "hk.transform(f).init returned."),
        ({("mlp", "linear"): {"w": jnp.zeros((2, 3))}},
         "for_haiku: the params key ('mlp', 'linear') is a tuple, where Haiku keys a module "
         "path by a string; expected a Haiku params dict (module path -> {param name: array}), "
         "as hk.transform(f).init returns. Fix: key it by a string (\"('mlp', 'linear')\"), or "
         "pass the params hk.transform(f).init returned."),
    ],
    ids=["param-name", "module-path"],
)
def test_keys_that_are_not_strings_are_named_with_the_fix(params, message):
    with pytest.raises(TypeError) as err:
        dm.presets.standard().for_haiku(params)
    assert str(err.value) == message


def test_fn_a_transformed_function_makes_generic_entry_points_read_haiku():
    def f(x):
        return hk.Linear(3)(hk.LayerNorm(-1, True, True)(x))

    t = hk.transform(f)
    x = jnp.zeros((2, 3))
    p = t.init(jax.random.key(0), x)  # no `~`: Haiku and Linen could both have made it
    policy = dm.presets.standard()
    expected = [(r.path, r.decay, r.leaf.layer_type)
                for r in policy.explain(p, framework="haiku", fn=t, args=(x,))]
    assert expected == [("layer_norm/offset", False, "LayerNorm"), ("layer_norm/scale", False, "LayerNorm"),
                        ("linear/b", False, "Linear"), ("linear/w", True, "Linear")]
    for fn in (t, hk.transform_with_state(f), hk.without_apply_rng(t), t.init):
        assert [(r.path, r.decay, r.leaf.layer_type)
                for r in policy.explain(p, fn=fn, args=(x,))] == expected
    assert policy.mask(p, fn=t, args=(x,)) == policy.for_haiku(p)
    # Parameter groups too: the linear's updates at half the learning rate.
    tx = dm.Policy(dm.lr(0.5, layer="linear")).wrap(optax.sgd(1.0), fn=t, args=(x,))
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, p), tx.init(p), p)
    assert jax.tree.map(lambda u: float(u.ravel()[0]), updates) == {
        "layer_norm": {"offset": -1.0, "scale": -1.0}, "linear": {"b": -0.5, "w": -0.5}}
    with pytest.raises(TypeError, match=r"got the apply function of a transformed function, "
                                        r"which cannot make params; pass the transformed "
                                        r"function itself: fn=transformed"):
        policy.explain(p, fn=t.apply, args=(x,))
    # Without fn=, the message does not suggest the call that just failed.
    with pytest.raises(ValueError) as err:
        policy.explain(p)
    assert str(err.value).startswith("explain: a dict that Haiku and Flax Linen could have made; ")
    assert "policy.explain(" not in str(err.value)


def test_for_haiku_imports_neither_flax_nor_haiku_for_a_walk_by_names():
    code = textwrap.dedent("""
        import json, sys
        import numpy as np
        import decaymask as dm
        params = {"mlp/~/linear_0": {"w": np.ones((3, 4), np.float32),
                                     "b": np.ones((4,), np.float32)},
                  "layer_norm": {"scale": np.ones((4,), np.float32),
                                 "offset": np.ones((4,), np.float32)}}
        mask = dm.presets.standard().for_haiku(params)
        print(json.dumps([mask, sorted(m for m in ("flax", "haiku") if m in sys.modules)]))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    mask, imported = json.loads(out.stdout.strip().splitlines()[-1])
    assert mask == {"mlp/~/linear_0": {"w": True, "b": False},
                    "layer_norm": {"scale": False, "offset": False}}
    assert imported == []


class _Block(hk.Module):
    def __call__(self, x):
        y = hk.LayerNorm(-1, True, True)(x)
        y = hk.MultiHeadAttention(2, 2, w_init=hk.initializers.VarianceScaling())(y, y, y)
        return x + hk.nets.MLP([8, 4])(hk.LayerNorm(-1, True, True)(x + y))


def _deep(depth):
    def f(x):
        for _ in range(depth):
            x = _Block()(x)
        return x

    return hk.transform(f)


def test_alike_blocks_are_read_once_and_decided_once():
    from decaymask.adapters._haiku_walk import HaikuWalk

    x = jnp.zeros((1, 3, 4))
    counts = []
    for depth in (2, 12):
        t = _deep(depth)
        p = jax.eval_shape(t.init, jax.random.key(0), x)
        walked = HaikuWalk(p, "for_haiku", None)
        counts.append((len(walked.modules.readings), len(set(walked.leaves.keys))))
        policy = dm.Policy(dm.decay(layer="linear", param="weight"), dm.layer_decay(0.5))
        assert policy.for_haiku(p) == policy.for_haiku(p, fn=t, args=(x,))
        assert [r.path for r in policy.explain(p, framework="haiku")] == \
            [f"{k}/{n}" for k in sorted(p) for n in sorted(p[k])]
    # Every block reads as the first: as many readings and leaf keys at any depth.
    assert counts[0] == counts[1] == (8, 10)


class _Params(dict):
    """A dict subclass no one registered with jax: jax takes it for one leaf."""


def test_a_mapping_jax_does_not_flatten_is_refused_not_masked_as_one_array():
    w = np.ones((2, 3), np.float32)
    with pytest.raises(TypeError) as err:
        dm.presets.standard().for_haiku({"linear": _Params(w=w, b=np.ones((3,), np.float32))})
    assert str(err.value) == (
        "for_haiku: 'linear' is a _Params, which jax does not flatten (it is not a registered "
        "pytree), so optax would take it for one array; pass dicts, as hk.transform(f).init "
        "returns them (or Haiku's FlatMap).")
    with pytest.raises(TypeError, match=r"^for_haiku: the params is a _Params, which jax does not"):
        dm.presets.standard().for_haiku(_Params(linear={"w": w}))


# Numbered names as Haiku makes them (a module's default name counted up, ``block_{i}``
# by hand) and names whose words say a kind, a trait or a moving average.
_NUMBERED_NAMES = ["block_0", "block_17", "linear_1", "linear_12", "layer_norm_3", "ln_2",
                   "ls_1", "ls_12", "layer_scale_3", "pos_embed_1", "wpe_4", "conv2_d_3",
                   "x_ema_1", "ema_2", "mlp_1_2", "mlp_1_3", "__layer_stack_no_per_layer_1",
                   "__layer_stack_no_per_layer_1_2", "block_\u0661", "attn_norm_5"]


def test_every_number_of_a_name_reads_as_that_name_alone():
    """The words of a numbered name are read once per base name; each name's reading
    is the one its own words give, in either order of first sight."""
    from decaymask.adapters import _haiku_segments as hm
    from decaymask.core._names import name_kind, words
    from decaymask.core._roles import owner_trait

    def forget():
        hm._segments.clear()
        hm._numbered.clear()
        hm._numbered_segments.clear()

    alone = {}
    for name in _NUMBERED_NAMES:
        forget()
        alone[name] = hm.segment(name)
    for names in (_NUMBERED_NAMES, _NUMBERED_NAMES[::-1]):
        forget()
        for name in names:
            said = hm.segment(name)
            assert said == alone[name], name
            assert (said.said, said.owner, said.ema) == (
                name_kind(name), owner_trait(name),
                name == "exponential_moving_average" or words(name)[-1:] == ("ema",)), name
            assert said.stack == bool(hm._STACK.match(name)), name


# A module whose path ends in a constructor's `~` (the parent of `a/~/~/x`) has as its
# submodules only those past a further `~`: `a/~/query` is a submodule of `a`.
ATTENTION_NAMES = ("query", "key", "value", "out")


@pytest.mark.parametrize("prefix, own", [("a/~/", {"a": {"scale": np.ones(4, np.float32)}}),
                                         ("~/", {})])
def test_a_tilde_module_has_no_siblings_of_its_own_as_submodules(prefix, own):
    params = {**own, **{prefix + n: {"w": np.ones((4, 4), np.float32)} for n in ATTENTION_NAMES},
              prefix + "~/x": {"w": np.ones((4, 5), np.float32)}}
    policy = dm.Policy(dm.decay(param="weight"), dm.no_decay(within="attention"))
    _face._built.clear()
    # No module holds query/key/value/out as its submodules, so nothing is within an
    # attention layer: every weight decays, and the rule on attention matched nothing.
    with pytest.warns(dm.PolicyWarning, match=r"no_decay\(within='attention'\) matched no"):
        mask = flat_with_paths(policy.for_haiku(params))
    assert mask[f"['{prefix}~/x']['w']"] is True
    assert all(mask[f"['{prefix}{n}']['w']"] is True for n in ATTENTION_NAMES)
    report = {r.path: r for r in policy.explain(params, framework="haiku")}
    assert report[f"{prefix}~/x/w"].rule == policy.rules[0]
