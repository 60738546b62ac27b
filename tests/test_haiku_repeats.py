"""A walk of Haiku params by names reads the keys under a top-level module alike to an
earlier one's (same Segment, keys below, param names, shapes and dtypes) by the earlier
one's readings: every output and every explain row must be what reading each key gives."""

from __future__ import annotations

import warnings

import haiku as hk  # noqa: F401  (Haiku params are claimed only where Haiku is imported)
import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import decaymask as dm
from decaymask import _face
from decaymask.adapters import _haiku_repeats
from helpers import assert_decays_exactly, flat_with_paths, spy, zero_grad_updates


def z(*shape, dtype=np.float32):
    return np.ones(shape, dtype)


def base():
    return {"attn/query": {"w": z(8, 8), "b": z(8)}, "attn/key": {"w": z(8, 8)},
            "mlp/~/linear_0": {"w": z(8, 16), "b": z(16)},
            "layer_norm": {"scale": z(8), "offset": z(8)}, "proj": {"w": z(8, 8)}}


def changed(block, key, value):
    return {**block, key: value}


# Blocks with the same number of keys that differ in one thing a reading reads.
VARIANTS = {
    "base": base,
    "vector w": lambda: changed(base(), "proj", {"w": z(8)}),  # not a matrix: not decayed
    "int w": lambda: changed(base(), "attn/key", {"w": z(8, 8, dtype=np.int32)}),
    "half b": lambda: changed(base(), "attn/query", {"w": z(8, 8), "b": z(8, dtype=np.float16)}),
    "other width": lambda: changed(base(), "mlp/~/linear_0", {"w": z(8, 4), "b": z(4)}),
    "stacked": lambda: changed(base(), "proj", {"w": z(3, 8, 8), "b": z(3, 8)}),
    "conv": lambda: changed(base(), "proj", {"w": z(3, 3, 8, 8)}),
    "other key": lambda: {**{k: v for k, v in base().items() if k != "proj"},
                          "gate": {"w": z(8, 8)}},
    "other name": lambda: changed(base(), "proj", {"kernel": z(8, 8)}),
    # The top-level module's own params ("block_3") beside the same keys below it.
    "own params": lambda: {**{k: v for k, v in base().items() if k != "proj"},
                           "": {"scale": z(8)}},
    "own other": lambda: {**{k: v for k, v in base().items() if k != "proj"},
                          "": {"scale": z(4)}},
}

POLICY = dm.Policy(dm.decay(layer="linear", param="weight"))


def model(variants, prefix="block"):
    params = {"embed": {"embeddings": z(32, 8)}}
    for i, variant in enumerate(variants):
        params.update({f"{prefix}_{i}/{k}".rstrip("/"): v
                       for k, v in VARIANTS[variant]().items()})
    params["final_norm"] = {"scale": z(8), "offset": z(8)}
    return params


def rows(report):
    return [(r.path, r.layer, r.layer_type, r.role, r.shape, r.dtype, r.decay, r.rule)
            for r in report]


def outputs(params):
    """The mask, labels, Muon dims and explain rows, each built anew; an error as its
    class and message."""
    _face._built.clear()
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dm.PolicyWarning)
        for build in (POLICY.for_haiku, POLICY.labels_for_haiku, POLICY.muon_dims_for_haiku,
                      lambda p: rows(POLICY.explain(p, framework="haiku"))):
            try:
                out.append(build(params))
            except ValueError as err:
                out.append((type(err), str(err)))
    return out


def unshared(params):
    """The outputs with every key read."""
    with pytest.MonkeyPatch.context() as m:
        m.setattr(_haiku_repeats.Repeats, "find",
                  lambda self, family, start, end, skip: (None, None))
        return outputs(params)


def counted(monkeypatch, params):
    """The runs (first key, length) that took an earlier run's readings."""
    order = sorted(params)
    return spy(monkeypatch, _haiku_repeats.Repeats, "find",
               lambda args, found: (order[args[1]], args[2] - args[1])
               if found[0] is not None else None)


def whole_blocks(hits, params):
    """The blocks that took an earlier block's readings whole, in order."""
    sizes = {}
    for key in params:
        sizes[key.split("/")[0]] = sizes.get(key.split("/")[0], 0) + 1
    return [key.split("/")[0] for key, length in hits if length == sizes[key.split("/")[0]]]


def test_blocks_alike_are_read_once_and_decided_as_each_is(monkeypatch):
    params = model(["base"] * 5)
    expected = unshared(params)
    hits = counted(monkeypatch, params)
    got = outputs(params)
    assert got == expected
    # In each of the four walks, the first block is read, the four others take its readings.
    assert hits == [(f"block_{i}/attn/key", 5) for i in range(1, 5)] * 4
    mask = flat_with_paths(got[0])
    assert mask["['block_4/attn/key']['w']"] is True
    assert mask["['block_4/layer_norm']['scale']"] is False


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "base"])
def test_a_block_that_differs_in_one_thing_is_read_on_its_own(monkeypatch, variant):
    params = model(["base", "base", variant, "base", variant])
    expected = unshared(params)
    hits = counted(monkeypatch, params)
    got = outputs(params)
    assert got == expected
    # Whole blocks alike to block_0 (1, 3) or to block_2 (4) are not read; parts of
    # block_2 alike to block_0's may be.
    assert whole_blocks(hits, params) == ["block_1", "block_3", "block_4"] * 4
    mask = flat_with_paths(got[0])
    differs = {"vector w": ("['block_2/proj']['w']", False),
               "int w": ("['block_2/attn/key']['w']", False),
               "conv": ("['block_2/proj']['w']", False)}
    if variant in differs:
        path, decayed = differs[variant]
        assert mask[path] is decayed
        assert mask[path.replace("block_2", "block_1")] is True


def test_an_optax_step_decays_what_each_block_says():
    params = model(["base", "conv", "base", "conv"])
    _face._built.clear()
    updates = zero_grad_updates(params, POLICY.for_haiku(params))
    decayed = {path: path.endswith("['w']") and not (
        "proj" in path and ("block_1" in path or "block_3" in path))
        for path in flat_with_paths(params)}
    assert sum(decayed.values()) == 14
    assert_decays_exactly(params, updates, decayed)


def test_a_module_whose_keys_sorting_splits_is_read_key_by_key(monkeypatch):
    # "a-b/y" sorts between "a" and "a/x": the keys of module "a" are not one run.
    params = {"a": {"w": z(8, 8)}, "a-b/y": {"w": z(8)}, "a/x": {"w": z(8, 8)},
              "c": {"w": z(8, 8)}, "c/x": {"w": z(8, 8)}}
    expected = unshared(params)
    hits = counted(monkeypatch, params)
    assert outputs(params) == expected
    assert hits == []  # "a-b" and "c" make runs, each its family's first


def test_abstract_params_alike(monkeypatch):
    params = jax.eval_shape(lambda: model(["base", "other width", "base", "other width"]))
    expected = unshared(params)
    hits = counted(monkeypatch, params)
    assert outputs(params) == expected
    assert whole_blocks(hits, params) == ["block_2", "block_3"] * 4


@settings(max_examples=25, deadline=None)
@given(st.lists(st.sampled_from(sorted(VARIANTS)), min_size=1, max_size=6),
       st.sampled_from(["block", "layer", "mlp"]))
def test_any_mix_of_blocks_reads_as_each_key_read(variants, prefix):
    params = model(variants, prefix)
    assert outputs(params) == unshared(params)


def test_a_module_with_params_of_its_own_is_no_block_without():
    # blk_0 holds a matrix of its own (a linear layer around blk_0/sub); blk_1 holds
    # none: the same keys below them, read under different parents.
    params = {"blk_0": {"w": z(8, 8)}, "blk_0/sub": {"scale": z(8)},
              "blk_1/sub": {"scale": z(8)}}
    policy = dm.Policy(dm.decay(name="scale"), dm.no_decay(within="linear"))
    _face._built.clear()
    mask = flat_with_paths(policy.for_haiku(params))
    assert mask == {"['blk_0']['w']": False, "['blk_0/sub']['scale']": False,
                    "['blk_1/sub']['scale']": True}
    report = {r.path: r for r in policy.explain(params, framework="haiku")}
    assert report["blk_1/sub/scale"].rule == policy.rules[0]
    assert report["blk_0/sub/scale"].rule == policy.rules[1]


def test_blocks_inside_one_module_are_read_once(monkeypatch):
    params = {"transformer/" + k if k != "embed" else k: v
              for k, v in model(["base", "base", "stacked", "base"]).items()}
    expected = unshared(params)
    hits = counted(monkeypatch, params)
    assert outputs(params) == expected
    whole = [key for key, length in hits if length == 5]
    assert whole == [f"transformer/block_{i}/attn/key" for i in (1, 3)] * 4


@settings(max_examples=15, deadline=None)
@given(st.lists(st.sampled_from(sorted(VARIANTS)), min_size=1, max_size=5),
       st.sampled_from(["transformer/block", "model/~/layer", "a/b/c"]))
def test_any_mix_of_nested_blocks_reads_as_each_key_read(variants, prefix):
    params = model(variants, prefix)
    assert outputs(params) == unshared(params)


def test_blocks_holding_masked_nodes_read_as_each_key_read():
    # optax.masked hands its inner transform optax.MaskedNode for the leaves outside its
    # mask: a key then holds fewer leaves than names, and the shapes the signature kept
    # do not line up with the keys; such params are read without them.
    import optax

    params = model(["base", "base", "vector w", "base"])
    params["block_1/attn/key"] = {"w": optax.MaskedNode()}
    params["block_3/proj"] = {"w": optax.MaskedNode()}
    assert outputs(params) == unshared(params)


def test_shapes_are_sliced_from_the_signature_only_where_each_value_is_one_leaf():
    import optax

    from decaymask.adapters._structure import flattened, structure_signature

    def sliced(params):
        with flattened(params):
            structure_signature(params)
            return _haiku_repeats.Repeats(params, sorted(params))._starts() is not None

    plain = model(["base", "base"])
    assert sliced(plain)
    assert not sliced({**plain, "block_1/proj": {"w": optax.MaskedNode()}})
    # Outside a build that took the signature, nothing is sliced.
    assert _haiku_repeats.Repeats(plain, sorted(plain))._starts() is None

