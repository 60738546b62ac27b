"""Outputs are built once per (policy, entry point, registry, tree structure): a callable
mask is called with the same structure at every optax step. The cache must key on
everything a walk and a rule can read, and give what an uncached build gives."""

from __future__ import annotations

import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import decaymask as dm
from decaymask import _face

KEY = jax.random.key(0)


@pytest.fixture(autouse=True)
def _empty_cache():
    _face._built.clear()
    yield
    _face._built.clear()


def _linen(dtype=jnp.float32):
    return {"Proj_0": {"w": jnp.ones((2, 3), dtype), "b": jnp.zeros(3, dtype)}}


def test_a_repeated_build_is_cached_and_fresh():
    policy = dm.Policy(dm.decay(param="weight"))
    model = eqx.nn.MLP(2, 3, 4, 1, key=KEY)
    first = policy.for_equinox(model)
    assert len(_face._built) == 1
    second = policy.for_equinox(model)
    assert first is not second and first.layers[0] is not second.layers[0]
    assert jax.tree.structure(first) == jax.tree.structure(second)
    assert jax.tree.leaves(first) == jax.tree.leaves(second) == [True, False, True, False]
    params = {"Dense_0": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}
    mask = policy.for_flax(params)
    mask["Dense_0"]["kernel"] = "changed by the user"
    assert policy.for_flax(params) == {"Dense_0": {"kernel": True, "bias": False}}


def test_a_registration_between_builds_is_seen():
    policy = dm.Policy(dm.decay(layer="recurrent"))
    assert policy.for_flax(_linen()) == {"Proj_0": {"w": False, "b": False}}
    dm.register_layer("Proj", "recurrent", roles={"w": "weight", "b": "bias"})
    try:
        assert policy.for_flax(_linen()) == {"Proj_0": {"w": True, "b": True}}
    finally:
        dm.unregister_layer("Proj")
    assert policy.for_flax(_linen()) == {"Proj_0": {"w": False, "b": False}}


def test_dtypes_and_shapes_are_part_of_the_key():
    policy = dm.Policy(dm.decay(min_ndim=2), default=False)
    assert policy.for_flax(_linen()) == {"Proj_0": {"w": True, "b": False}}
    with pytest.warns(dm.PolicyWarning, match="integer or bool arrays"):
        assert policy.for_flax(_linen(jnp.int32)) == {"Proj_0": {"w": False, "b": False}}
    wide = {"Proj_0": {"w": jnp.ones((2, 3)), "b": jnp.zeros((1, 3))}}
    assert policy.for_flax(wide) == {"Proj_0": {"w": True, "b": True}}


def test_equal_policies_share_entries_and_different_ones_do_not():
    model = eqx.nn.Linear(2, 3, key=KEY)
    assert dm.presets.standard().for_equinox(model).weight is True
    assert dm.presets.standard().for_equinox(model).weight is True
    assert len(_face._built) == 1
    assert dm.Policy(dm.decay(param="bias")).for_equinox(model).weight is False
    assert dm.presets.standard().labels_for_equinox(model).weight == "decay"
    assert len(_face._built) == 3


def test_warnings_are_given_at_every_build():
    policy = dm.Policy(dm.decay(path="nothing/*"))
    model = eqx.nn.Linear(2, 3, key=KEY)
    for _ in range(2):
        with pytest.warns(dm.PolicyWarning, match="matched no parameter") as record:
            policy.for_equinox(model)
        assert record[0].filename == __file__


def test_a_when_callable_is_asked_at_every_build():
    calls = []

    def big(leaf):
        calls.append(leaf.path)
        return leaf.size >= 6

    policy = dm.Policy(dm.decay(when=big))
    model = eqx.nn.Linear(2, 3, key=KEY)
    policy.for_equinox(model)
    policy.for_equinox(model)
    assert calls == ["weight", "bias", "weight", "bias"] and not _face._built


def test_which_leaves_are_one_array_is_part_of_the_key():
    policy = dm.Policy(dm.decay(param="weight"))
    linear = eqx.nn.Linear(3, 3, key=KEY)
    other = jnp.ones((3, 3))

    def model(table):
        return (linear, eqx.nn.Embedding(weight=table))

    # The same structure once with two arrays, once with one array in both places.
    apart = policy.for_equinox(model(other))
    tied = policy.for_equinox(model(linear.weight))
    assert jax.tree.leaves(apart) == jax.tree.leaves(tied) == [True, False, False]
    assert len(_face._built) == 2


def test_a_cached_callable_mask_steps_like_a_fresh_one():
    model = eqx.filter(eqx.nn.MLP(2, 3, 4, 1, key=KEY), eqx.is_inexact_array)
    policy = dm.presets.standard()
    tx = optax.adamw(1.0, weight_decay=0.5, mask=policy.for_equinox)
    state = tx.init(model)
    zeros = jax.tree.map(jnp.zeros_like, model)
    for _ in range(2):
        updates, state = tx.update(zeros, state, model)
        moved = jax.tree.map(lambda u, p: bool(np.allclose(u, -0.5 * p)), updates, model)
        still = jax.tree.map(lambda u: bool(np.all(u == 0)), updates)
        assert jax.tree.leaves(moved) == [True, False, True, False]
        assert jax.tree.leaves(still) == [False, True, False, True]


# A build frees what it allocated before the collector is back on.


def _frameworks():
    import flax.linen as nn
    import haiku as hk
    from flax import nnx

    x = jnp.ones((1, 3))
    linen = nn.Sequential([nn.Dense(4), nn.LayerNorm()])
    variables = linen.init(KEY, x)
    nnx_model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.LayerNorm(4, rngs=nnx.Rngs(0)))
    nnx_state = nnx.state(nnx_model, nnx.Param)
    mlp = hk.transform(lambda x: hk.nets.MLP([4, 3])(x))
    haiku_params = mlp.init(KEY, x)
    muon = dm.presets.muon()
    mlp_model = eqx.nn.MLP(3, 2, 4, 2, key=KEY)
    return {
        "equinox": lambda p: p.for_equinox(mlp_model),
        "linen params": lambda p: p.for_flax(variables["params"]),
        "linen variables": lambda p: p.labels_for_flax(variables),
        "linen traced": lambda p: p.rates_for_flax(variables["params"], module=linen, args=(x,)),
        "linen muon": lambda p: muon.muon_dims_for_flax(variables["params"], module=linen, args=(x,)),
        "nnx module": lambda p: p.for_flax(nnx_model),
        "nnx state": lambda p: p.for_flax(nnx_state),
        "haiku": lambda p: p.for_haiku(haiku_params),
    }


def _decaymasks(x: object) -> bool:
    """Whether ``x`` is decaymask's: an instance of its classes, or a frame, function or
    generator of its code."""
    if type(x).__module__.startswith("decaymask"):
        return True
    code = getattr(x, "f_code", None) or getattr(x, "gi_code", None) or getattr(x, "__code__", None)
    return code is not None and "decaymask" in code.co_filename


@pytest.mark.parametrize("name", list(_frameworks()))
def test_a_build_leaves_no_cyclic_garbage(name):
    import collections
    import gc

    build = _frameworks()[name]
    policy = dm.Policy(dm.decay(layer="linear", param="weight"))
    # A first build, not served from an entry an earlier test made, fills what is read
    # once per process (class facts, name readings).
    _face._built.clear()
    build(policy)
    _face._built.clear()
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        build(policy)
        gc.collect()
        # Everything the build allocated was freed by reference counting: walks, their
        # tables and records; no cycle the collector finds holds anything of decaymask's.
        # (What the collector finds may be another thread's: the suite's workers run
        # notebook kernels and subprocess pipes.)
        kinds = collections.Counter(type(x).__name__ for x in gc.garbage)
        assert not any(map(_decaymasks, gc.garbage)), kinds.most_common(20)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


def test_a_signature_that_cannot_be_hashed_is_not_cached_and_the_walk_speaks():
    class Listed:
        """Not an array, with a shape jax's leaves may have but a key cannot."""

        shape = [2, 3]
        dtype = np.dtype("float32")

    policy = dm.Policy(dm.decay(layer="linear"))
    with pytest.raises(TypeError, match=re.escape("for_flax: leaf 'Dense_0/kernel' is")):
        policy.for_flax({"Dense_0": {"kernel": Listed(), "bias": jnp.ones(3)}})
    assert not _face._built


class _Waiting(dm.adapters.Adapter):
    """Reads a list of arrays, one linear layer each, and waits in its walk until told."""

    name = face = "waiting"
    title = "Waiting"
    requires = "numpy"
    extra = "waiting"
    accepts = "a Waiting list"
    usage = "policy.mask(tree, framework='waiting')"
    non_floating_fix = "-"

    def __init__(self):
        import threading

        self.walking, self.go = threading.Event(), threading.Event()

    def claim(self, tree):
        return dm.adapters.Claim.NO

    def walk(self, tree, *, method, **options):
        self.walking.set()
        assert self.go.wait(30)
        leaves = [
            dm.Leaf(str(i), layer="linear", role="weight", shape=x.shape)
            for i, x in enumerate(tree)
        ]
        return leaves, list


def test_a_build_never_switches_the_collector_another_thread_switched():
    import gc
    import threading

    adapter = dm.adapters.register(_Waiting())
    policy = dm.Policy(dm.decay())
    out = []
    builder = threading.Thread(
        target=lambda: out.append(policy.mask([np.ones(2)], framework="waiting"))
    )
    try:
        builder.start()
        assert adapter.walking.wait(30)
        gc.disable()  # this thread's choice, while the other one builds
        adapter.go.set()
        builder.join(30)
        assert out == [[True]]
        assert not gc.isenabled()
    finally:
        gc.enable()
        adapter.go.set()
        dm.adapters.unregister("waiting")


def test_a_build_alone_leaves_the_collector_as_it_found_it():
    import gc

    policy = dm.Policy(dm.decay(param="weight"))
    model = eqx.nn.Linear(2, 3, key=KEY)
    assert gc.isenabled()
    policy.for_equinox(model)
    assert gc.isenabled()
    _face._built.clear()
    gc.disable()
    try:
        policy.for_equinox(model)
        assert not gc.isenabled()
    finally:
        gc.enable()


# The key holds everything a build reads, and never the user's objects.


@jax.tree_util.register_pytree_node_class
class Pouch:
    """A pytree of named arrays that only the adapters below read."""

    def __init__(self, arrays):
        self.arrays = arrays

    def tree_flatten(self):
        names = tuple(sorted(self.arrays))
        return [self.arrays[n] for n in names], names

    @classmethod
    def tree_unflatten(cls, names, values):
        return cls(dict(zip(names, values)))


def _pouch_adapter(kind):
    class PouchAdapter(dm.adapters.PytreeAdapter):
        name = face = "pouches"
        title = "Pouches"
        requires = "numpy"
        extra = "pouches"
        accepts = "a Pouch"
        usage = "policy.mask(pouch, framework='pouches')"
        non_floating_fix = "-"

        def claim(self, tree):
            return dm.adapters.Claim.CERTAINLY if isinstance(tree, Pouch) else dm.adapters.Claim.NO

        def walk(self, tree, *, method, **options):
            leaves, treedef = jax.tree_util.tree_flatten(tree)
            names = treedef.node_data()[1]
            found = [dm.Leaf(n, layer=kind, role="weight", shape=x.shape) for n, x in zip(names, leaves)]
            return found, dm.adapters.TreedefRebuild(treedef)

    return PouchAdapter()


def test_an_adapter_registered_anew_under_a_name_is_never_served_the_old_ones_outputs():
    policy = dm.Policy(dm.decay(layer="linear"))
    pouch = Pouch({"w": jnp.ones((2, 2))})
    dm.adapters.register(_pouch_adapter("linear"))
    try:
        assert policy.mask(pouch).arrays == {"w": True}
        assert policy.mask(pouch).arrays == {"w": True}
        assert len(_face._built) == 1
    finally:
        dm.adapters.unregister("pouches")
    dm.adapters.register(_pouch_adapter("layer_norm"))
    try:
        assert policy.mask(pouch).arrays == {"w": False}
    finally:
        dm.adapters.unregister("pouches")


class Held:
    """An object a static field holds: a config, a tokenizer, a callback."""

    def __init__(self, name: str = "config") -> None:
        self.name = name


class WithStatic(eqx.Module):
    linear: eqx.nn.Linear
    held: Held = eqx.field(static=True)


def test_the_cache_never_keeps_an_object_of_a_static_field_alive():
    import gc
    import weakref

    policy = dm.Policy(dm.decay(param="weight"))
    held = Held()
    model = WithStatic(eqx.nn.Linear(2, 3, key=KEY), held)
    params = eqx.filter(model, eqx.is_inexact_array)
    first = policy.for_equinox(model)
    assert jax.tree.leaves(first) == [True, False]
    # Cached: the params (the same static field) are served from the entry.
    assert policy.for_equinox(params).held is held
    assert len(_face._built) == 1
    assert jax.tree.leaves(policy.for_equinox(params)) == [True, False]
    assert len(_face._built) == 1
    alive = weakref.ref(held)
    del held, model, params, first
    gc.collect()
    assert alive() is None
    # The entry went with it; another object gets its own.
    again = WithStatic(eqx.nn.Linear(2, 3, key=KEY), Held())
    assert jax.tree.leaves(policy.for_equinox(again)) == [True, False]
    assert len(_face._built) == 1


def test_equal_static_values_hit_and_other_objects_do_not():
    policy = dm.Policy(dm.decay(param="weight"))
    linear = eqx.nn.Linear(2, 3, key=KEY)
    one, other = Held(), Held()
    policy.for_equinox(WithStatic(linear, one))
    policy.for_equinox(WithStatic(linear, one))
    assert len(_face._built) == 1
    assert policy.for_equinox(WithStatic(linear, other)).held is other
    assert len(_face._built) == 2


class Sentinel:
    """An object that holds nothing and compares by identity (a "missing" marker)."""


class WithSentinel(eqx.Module):
    linear: eqx.nn.Linear
    marker: Sentinel = eqx.field(static=True)


def test_sentinels_that_hold_nothing_share_an_entry_and_are_not_kept():
    import gc
    import weakref

    policy = dm.Policy(dm.decay(param="weight"))
    linear = eqx.nn.Linear(2, 3, key=KEY)
    one, other = Sentinel(), Sentinel()
    assert jax.tree.leaves(policy.for_equinox(WithSentinel(linear, one))) == [True, False]
    served = policy.for_equinox(WithSentinel(linear, other))
    assert len(_face._built) == 1
    assert served.marker is other and jax.tree.leaves(served) == [True, False]
    alive = weakref.ref(one)
    del one
    gc.collect()
    assert alive() is None
