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
