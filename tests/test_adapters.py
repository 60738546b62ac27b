"""The adapter registry: a framework is one adapter, found by every entry point.

A toy framework (``Bag``: named arrays with a kind per name) is taught to decaymask
from outside the package, the way a new framework's adapter would be."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import decaymask as dm
from decaymask import adapters
from decaymask.adapters import Adapter, Claim


@dataclasses.dataclass
class Bag:
    arrays: dict
    kinds: dict


class BagAdapter(Adapter):
    name = "bags"
    face = "bags"
    title = "Bags"
    requires = "numpy"
    extra = "bags"
    accepts = "a Bag"
    usage = "policy.mask(bag, framework='bags') for Bags"
    non_floating_fix = "Keep integer arrays out of the bag."

    def __init__(self, plain_dicts: bool = False):
        self.plain_dicts = plain_dicts

    def claim(self, tree):
        if isinstance(tree, Bag):
            return Claim.CERTAINLY
        if self.plain_dicts and isinstance(tree, Mapping):
            return Claim.POSSIBLY
        return Claim.NO

    def walk(self, tree, *, method, **options):
        if isinstance(tree, Mapping):  # a plain dict, read as one bag of one layer
            tree = Bag(dict(tree), {})
        names = sorted(tree.arrays)
        leaves = [
            dm.Leaf(name, layer=tree.kinds.get(name, "unknown"),
                    role="weight" if np.ndim(tree.arrays[name]) == 2 else "bias",
                    shape=tuple(np.shape(tree.arrays[name])))
            for name in names
        ]
        return leaves, lambda values: Bag(dict(zip(names, values)), dict(tree.kinds))


BAG = Bag({"w": np.ones((2, 3)), "b": np.zeros(3)}, {"w": "linear", "b": "linear"})
POLICY = dm.Policy(dm.decay(layer="linear", param="weight"))


@pytest.fixture
def bags():
    adapter = adapters.register(BagAdapter())
    yield adapter
    adapters.unregister("bags")


def test_a_registered_adapter_reads_its_trees_everywhere(bags):
    assert bags in adapters.registered()
    assert POLICY.mask(BAG).arrays == {"b": False, "w": True}
    assert POLICY.mask(BAG, framework="bags").arrays == {"b": False, "w": True}
    assert POLICY.labels(BAG).arrays == {"b": "no_decay", "w": "decay"}
    assert POLICY.rates(BAG).arrays == {"b": 0.0, "w": 1.0}
    assert [(r.path, r.decay) for r in POLICY.explain(BAG)] == [("b", False), ("w", True)]


def test_another_entry_point_sends_its_trees_to_it(bags):
    with pytest.raises(TypeError) as info:
        POLICY.for_flax(BAG)
    assert str(info.value) == (
        "for_flax: got a Bag from Bags; use policy.mask(bag, framework='bags') for Bags."
    )


def test_unregistered_it_is_unknown():
    with pytest.raises(ValueError) as info:
        POLICY.mask(BAG, framework="bags")
    assert str(info.value) == (
        "mask(framework='bags'): unknown framework; expected one of "
        + ", ".join(map(repr, adapters.names())) + "."
    )
    assert {"equinox", "linen", "nnx", "flax"} <= set(adapters.names())
    with pytest.raises(TypeError, match=r"^mask: no framework decaymask knows reads a Bag\. Expected Equinox: an Equinox module, "):
        POLICY.mask(BAG)


def test_adding_an_adapter_changes_no_explicit_reading_and_asks_where_two_could_read():
    # Three levels of plain dicts with no name only Linen gives: Linen params, or a Bag.
    params = {"block": {"layer": {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}}}
    before = POLICY.for_flax(params)
    assert POLICY.mask(params) == before
    adapters.register(BagAdapter(plain_dicts=True))
    try:
        assert POLICY.for_flax(params) == before
        with pytest.raises(ValueError) as info:
            POLICY.mask(params)
        assert str(info.value) == (
            "mask: a dict that Flax Linen and Bags could have made; pass "
            "framework='linen' or framework='bags', or call policy.for_flax(...) or "
            "policy.mask(..., framework='bags')."
        )
        assert POLICY.mask(params, framework="linen") == before
        # Names only Linen gives still decide alone.
        linen = {"Dense_0": {"kernel": jnp.ones((2, 3)), "bias": jnp.zeros(3)}}
        assert POLICY.mask(linen) == {"Dense_0": {"kernel": True, "bias": False}}
    finally:
        adapters.unregister("bags")


def test_every_framework_of_the_package_is_found_and_claims_its_own():
    names = [a.name for a in adapters.registered()]
    assert {"equinox", "linen", "nnx"} <= set(names)
    by_name = {a.name: a for a in adapters.registered()}
    eqx_model = eqx.nn.Linear(2, 3, key=jax.random.key(0))
    nnx_model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
    linen = {"Dense_0": {"kernel": jnp.ones((2, 3))}}
    claims = {
        "equinox model": (eqx_model, {"equinox": Claim.CERTAINLY}),
        "nnx model": (nnx_model, {"nnx": Claim.CERTAINLY}),
        "nnx state": (nnx.state(nnx_model), {"nnx": Claim.CERTAINLY}),
        "linen auto names": (linen, {"linen": Claim.CERTAINLY}),
        "plain dict": ({"a": {"w": jnp.ones(2)}}, {"linen": Claim.POSSIBLY}),
        "list of arrays": ([jnp.ones(2)], {"equinox": Claim.POSSIBLY}),
        "dict of modules": ({"enc": eqx_model}, {"equinox": Claim.CERTAINLY, "linen": Claim.POSSIBLY}),
    }
    for what, (tree, expected) in claims.items():
        got = {n: by_name[n].claim(tree) for n in ("equinox", "linen", "nnx")}
        assert {n: c for n, c in got.items() if c is not Claim.NO} == expected, what


def test_register_checks_what_it_is_given(bags):
    with pytest.raises(TypeError, match=r"^register: got the class BagAdapter; pass an instance: register\(BagAdapter\(\)\)\.$"):
        adapters.register(BagAdapter)
    with pytest.raises(TypeError, match=r"^register: expected an instance of decaymask\.adapters\.Adapter, got dict\.$"):
        adapters.register({})
    with pytest.raises(ValueError, match=r"^register: an adapter named 'bags' is already registered\.$"):
        adapters.register(BagAdapter())
    with pytest.raises(ValueError, match=r"^unregister: no adapter named 'equinox' was registered\.$"):
        adapters.unregister("equinox")


def test_a_missing_framework_is_named_with_its_extra():
    class Missing(BagAdapter):
        name = "missing"
        requires = "decaymask_no_such_framework.core"
        extra = "missing"

    adapters.register(Missing())
    try:
        with pytest.raises(ImportError, match=re.escape(
            "decaymask needs decaymask_no_such_framework for this: pip install 'decaymask[missing]'"
        )):
            POLICY.mask(BAG, framework="missing")
    finally:
        adapters.unregister("missing")


class FlaxDicts(BagAdapter):
    """A registered adapter of the face "flax" that claims every plain dict certainly."""

    name = "flax-dicts"
    face = "flax"

    def claim(self, tree):
        return Claim.CERTAINLY if isinstance(tree, (Bag, Mapping)) else Claim.NO


class AllDicts(FlaxDicts):
    name = "all-dicts"
    face = "all-dicts"


def test_a_registered_adapter_of_a_face_never_takes_over_its_entry_points():
    params = {"block": {"layer": {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}}}
    model = eqx.nn.Linear(2, 3, key=jax.random.key(0))
    before, labels = POLICY.for_flax(params), POLICY.labels_for_flax(params)
    for adapter in (FlaxDicts(), AllDicts()):
        adapters.register(adapter)
        try:
            assert POLICY.for_flax(params) == before
            assert POLICY.labels_for_flax(params) == labels
            assert POLICY.mask(params, framework="flax") == before
            assert POLICY.for_equinox(model).weight is True
            # Asked by its own name, it reads the tree.
            assert POLICY.mask(params, framework=adapter.name).arrays == {"block": False}
        finally:
            adapters.unregister(adapter.name)
    # A tree the face's own adapters refuse goes to the registered one.
    adapters.register(FlaxDicts())
    try:
        assert POLICY.for_flax(BAG).arrays == {"b": False, "w": True}
    finally:
        adapters.unregister("flax-dicts")


class Raising(BagAdapter):
    name = "raising"
    face = "raising"

    def claim(self, tree):
        raise KeyError("arrays")


def test_an_adapter_whose_claim_raises_is_named_with_its_exception():
    adapters.register(Raising())
    model = eqx.nn.Linear(2, 3, key=jax.random.key(0))
    try:
        # Entry points whose own adapters read the tree never ask it.
        assert POLICY.for_equinox(model).weight is True
        assert POLICY.for_flax({"Dense_0": {"kernel": jnp.ones((2, 3))}}) == {
            "Dense_0": {"kernel": True}
        }
        with pytest.raises(RuntimeError) as info:
            POLICY.mask(model)
        assert str(info.value) == (
            f"mask: the adapter 'raising' ({__name__}.Raising) raised KeyError in "
            "claim() on a Linear: 'arrays'. claim() must answer Claim.NO for a tree it does "
            "not know, not raise. Fix the adapter's claim, or remove it: "
            "decaymask.adapters.unregister('raising')."
        )
        assert isinstance(info.value.__cause__, KeyError)
        # check_mask asks every adapter which entry point a mismatched mapping has.
        with pytest.raises(RuntimeError, match=r"^check_mask: the adapter 'raising' "):
            dm.check_mask({"Dense_0": {"kernel": True}}, {"Dense_0": {"bias": jnp.ones(3)}})
    finally:
        adapters.unregister("raising")
    assert POLICY.mask(model).weight is True


def test_an_incomplete_adapter_is_refused_with_what_it_lacks():
    class Incomplete(Adapter):
        name = "incomplete"
        face = "incomplete"
        title = "Incomplete"
        requires = "numpy"

        def claim(self, tree):
            return Claim.NO

        def walk(self, tree, *, method, **options):
            return [], list

    with pytest.raises(TypeError) as info:
        adapters.register(Incomplete())
    assert str(info.value) == (
        f"register: the adapter {__name__}.test_an_incomplete_adapter_is_refused_"
        "with_what_it_lacks.<locals>.Incomplete lacks the class attributes extra, accepts, "
        "usage, non_floating_fix (non-empty strings), which the contract "
        "decaymask.adapters.Adapter requires. Fix: define them on the class; see the "
        "Adapter docstring for what each one is."
    )
    assert "incomplete" not in adapters.names()

    class NoWalk(BagAdapter):
        name = "no-walk"
        walk = None

    with pytest.raises(TypeError, match=r"lacks the methods walk, which the contract"):
        adapters.register(NoWalk())
