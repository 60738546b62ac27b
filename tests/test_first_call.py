"""A first build (nothing cached) reuses the flatten its cache signature made, keys a
tree of plain static data without reading every node, and checks Haiku params per
module where it can: the same outputs and errors as before, and nothing kept alive."""

from __future__ import annotations

import gc
import weakref

import jax
import jax.numpy as jnp
import pytest

import decaymask as dm
from decaymask import _face
from decaymask.adapters import _structure


@pytest.fixture(autouse=True)
def _empty_cache():
    _face._built.clear()
    yield
    _face._built.clear()


class Params(dict):
    """A dict jax flattens as one, that a weak reference can watch."""


jax.tree_util.register_pytree_node(
    Params,
    lambda d: (tuple(d[k] for k in sorted(d)), tuple(sorted(d))),
    lambda keys, values: Params(zip(keys, values)),
)


def _linen(cls=dict):
    return cls({"Dense_0": {"kernel": jnp.ones((2, 3)), "bias": jnp.zeros(3)},
                "LayerNorm_0": {"scale": jnp.ones(3), "bias": jnp.zeros(3)}})


def test_a_build_keeps_no_reference_to_the_tree_it_walked():
    policy = dm.Policy(dm.decay(param="weight"))
    params = _linen(Params)
    watch = weakref.ref(params)
    assert policy.for_flax(params) == {"Dense_0": {"kernel": True, "bias": False},
                                       "LayerNorm_0": {"scale": False, "bias": False}}
    assert getattr(_structure._flattened, "last", None) is None
    del params
    gc.collect()
    assert watch() is None


def test_a_failed_walk_keeps_no_reference_either():
    policy = dm.Policy(dm.decay(param="weight"))
    bad = {"Dense_0": {"kernel": jnp.ones((2, 3)), "bias": "zeros"}}
    with pytest.raises(TypeError):
        policy.for_flax(bad)
    assert getattr(_structure._flattened, "last", None) is None


def test_the_reused_treedef_is_the_trees_own():
    policy = dm.Policy(dm.decay(param="weight"))
    params = _linen()
    with _structure.flattened(params):
        signature = _structure.structure_signature(params)
        assert _structure.treedef_of(params) is signature[0].treedef
        other = _linen()
        assert _structure.treedef_of(other) == jax.tree_util.tree_structure(other)
    assert getattr(_structure._flattened, "last", None) is None
    assert policy.for_flax(params) == policy.for_flax(_linen())


def test_the_flatten_with_paths_of_the_signature_is_the_walks():
    import equinox as eqx

    model = eqx.nn.MLP(3, 2, 4, 1, key=jax.random.key(0))
    with _structure.flattened(model):
        signature = _structure.structure_signature(model, paths=True)
        flat, treedef = _structure.flat_with_path_of(model)
        assert treedef is signature[0].treedef
        assert flat is _structure.flat_with_path_of(model)[0]
        expected = jax.tree_util.tree_flatten_with_path(model)
        assert [(jax.tree_util.keystr(k), v) for k, v in flat] == [
            (jax.tree_util.keystr(k), v) for k, v in expected[0]]
        other = eqx.nn.MLP(3, 2, 4, 1, key=jax.random.key(1))
        assert _structure.flat_with_path_of(other)[0] is not flat
    assert _structure.flat_with_path_of(model)[0] is not flat
    mask = dm.Policy(dm.decay(layer="linear", param="weight")).for_equinox(model)
    assert [x for x in jax.tree_util.tree_leaves(mask)] == [True, False, True, False]


@pytest.mark.parametrize("tree", [
    _linen(),
    {"a": [1.0, (jnp.ones(2), None)], "b": {"c": jnp.zeros(3)}},
    {"mlp/~/linear_0": {"w": jnp.ones((2, 2)), "b": jnp.zeros(2)}},
])
def test_the_structure_of_plain_static_data_is_keyed_as_the_full_reading_keys_it(
        tree, monkeypatch):
    treedef = jax.tree_util.tree_structure(tree)
    fast = _structure.structure_of(treedef)
    monkeypatch.setattr(_structure, "_holds_nothing_held", lambda referents: False)
    full = _structure.structure_of(treedef)
    assert fast is not None and full is not None
    assert fast == full and hash(fast) == hash(full)
    assert fast.key == full.key and fast.held == full.held == ()


def test_static_data_holding_an_object_is_still_held_weakly():
    class Tag:
        def __init__(self, name):
            self.name = name

    tag = Tag("a")
    jax.tree_util.register_pytree_node(
        Tag, lambda t: ((), tag), lambda aux, children: aux)
    structure = _structure.structure_of(jax.tree_util.tree_structure({"a": tag}))
    assert structure is not None and structure.held == (tag,)


def test_a_stateless_sentinel_in_static_data_is_read_by_its_class_and_not_kept():
    eqx = pytest.importorskip("equinox")

    class Sentinel:
        pass

    class Block(eqx.Module):
        linear: eqx.nn.Linear
        tag: Sentinel = eqx.field(static=True)

    policy = dm.Policy(dm.decay(param="weight"))
    first, second = Sentinel(), Sentinel()
    watch = weakref.ref(first)
    linear = eqx.nn.Linear(2, 2, key=jax.random.key(0))
    a, b = Block(linear, first), Block(linear, second)
    structure = _structure.structure_of(jax.tree_util.tree_structure(a))
    assert structure is not None and structure.held == ()
    # Keyed by what it reads, not by the treedef (which holds the sentinel).
    assert structure.kept().treedef is None
    assert structure == _structure.structure_of(jax.tree_util.tree_structure(b))
    assert policy.for_equinox(a).linear.weight is True
    assert len(_face._built) == 1
    assert policy.for_equinox(b).linear.weight is True
    assert len(_face._built) == 1  # the same entry: the sentinels differ in nothing read
    del a, first, structure
    gc.collect()
    assert watch() is None


def test_haiku_params_with_a_bad_value_are_refused_after_good_ones_were_read():
    pytest.importorskip("haiku")
    policy = dm.Policy(dm.decay(param="weight"))
    good = {"linear": {"w": jnp.ones((2, 2)), "b": jnp.zeros(2)}}
    assert policy.for_haiku(good) == {"linear": {"w": True, "b": False}}
    bad = {"linear": {"w": jnp.ones((2, 2)), "b": [0.0, 0.0]}}
    with pytest.raises(TypeError, match=r"linear/b is a list, not an array"):
        policy.for_haiku(bad)


def test_equinox_static_data_read_once_per_tuple_keys_as_every_tuple_read():
    eqx = pytest.importorskip("equinox")
    key = jax.random.key(0)

    def structure(model):
        return _structure.structure_of(jax.tree_util.tree_structure(model))

    a = eqx.nn.MLP(2, 3, 4, 3, key=key)
    b = eqx.nn.MLP(2, 3, 4, 3, key=jax.random.key(1))
    wider = eqx.nn.MLP(2, 3, 5, 3, key=key)
    biasless = eqx.nn.MLP(2, 3, 4, 3, use_bias=False, key=key)
    assert structure(a) == structure(b)
    assert structure(a) != structure(wider)
    assert structure(a) != structure(biasless)
    # Nothing is held. Where Equinox's static data holds its flatten's sentinel in every
    # module (newer Equinox), it is read by its class and the key is not the treedef
    # (which holds it); older Equinox's static data is plain values, keyed by the treedef.
    assert structure(a).held == structure(biasless).held == ()
    treedef = jax.tree_util.tree_structure(a)
    sentinel = any(type(x).__name__ == "_Missing" for node in gc.get_referents(treedef)
                   if type(node) is tuple for x in node)
    assert (structure(a).kept().treedef is None) == sentinel


def test_the_same_python_scalar_at_several_leaves_is_no_sharing():
    rate = 0.5
    same = [jnp.ones(3), rate, jnp.ones(3), rate]
    distinct = [jnp.ones(3), rate, jnp.ones(3), float("0.5")]
    assert same[1] is same[3] and distinct[1] is not distinct[3]
    assert _structure.structure_signature(same) == _structure.structure_signature(distinct)
    # The same array at two leaves is sharing, and keys apart.
    w = jnp.ones(3)
    assert _structure.structure_signature([w, rate, w, rate]) != _structure.structure_signature(same)


def test_plain_dicts_of_arrays_hold_no_equinox_module_and_anything_else_is_looked_into():
    eqx = pytest.importorskip("equinox")
    from decaymask.adapters.equinox import holds_module

    linear = eqx.nn.Linear(2, 2, key=jax.random.key(0))
    params = {"block": {"dense": {"kernel": jnp.ones((2, 2))}, "scale": jnp.ones(2)}}
    assert not holds_module(params)
    assert holds_module({"block": {"dense": linear}})
    assert holds_module({"block": {"dense": [linear]}})
    assert holds_module({"block": ({"dense": linear},)})
    assert not holds_module({"block": {"rate": 0.5, "w": jnp.ones(2)}})
    # Every entry point reads such a dict as the framework that claims it.
    policy = dm.Policy(dm.decay(param="weight"))
    assert policy.mask({"block": {"dense": linear}})["block"]["dense"].weight is True
