"""``dm.record()``: the user's own Linen init recorded, read exactly as the trace of
``module=`` reads it, with no second init."""

from __future__ import annotations

import gc
import weakref

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax import core as flax_core
from flax.linen import module as linen_module

import decaymask as dm
from helpers import assert_decays_exactly, flat_with_paths, zero_grad_updates

POLICY = dm.Policy(
    dm.decay(layer="linear"),
    dm.decay(layer="conv"),
    dm.decay(layer="layer_norm", param="bias"),
)
MATRICES = dm.Policy(dm.decay(layer="linear", param="weight"))


class Compact(nn.Module):
    @nn.compact
    def __call__(self, tok, img):
        h = nn.Embed(11, 4)(tok)
        h = nn.Dense(4)(h)
        h = nn.LayerNorm()(h)
        c = nn.Conv(3, (3, 3))(img)
        return h.sum() + c.sum()


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        h = nn.LayerNorm(name="norm")(x)
        return nn.Dense(4, name="proj")(h), None


class Scanned(nn.Module):
    outputs: int = 2

    @nn.compact
    def __call__(self, x):
        layers = nn.scan(
            Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3
        )(name="layers")
        x, _ = layers(x, None)
        return nn.Dense(self.outputs, name="head")(x)


class Mixers(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.DenseGeneral((2, 2), name="general")(x).reshape(x.shape[0], 4)
        h = nn.Einsum((4, 4), name="mix")(h, "ab,bc->ac")
        return nn.LayerNorm()(h)


class Mine(nn.Module):
    """A user's projection with its own parameter names."""

    @nn.compact
    def __call__(self, x):
        w = self.param("w", nn.initializers.lecun_normal(), (x.shape[-1], 3))
        b = self.param("b", nn.initializers.zeros, (3,))
        return x @ w + b[None, :]


class UsesMine(nn.Module):
    @nn.compact
    def __call__(self, x):
        return Mine(name="mine")(nn.LayerNorm()(x))


def _inputs(name):
    if name == "compact":
        return Compact(), (jnp.ones((2, 5), jnp.int32), jnp.ones((1, 6, 6, 2)))
    if name == "scanned":
        return Scanned(), (jnp.ones((1, 4)),)
    if name == "mixers":
        return Mixers(), (jnp.ones((1, 4)),)
    return UsesMine(), (jnp.ones((1, 4)),)


MODELS = ["compact", "scanned", "mixers", "registered"]


@pytest.fixture
def registered():
    dm.register_layer(
        Mine, "linear", roles={"w": "weight", "b": "bias"}, matrix_axes={"w": ((0,), (1,))}
    )
    try:
        yield
    finally:
        dm.unregister_layer(Mine)


def _recorded(model, args, jit=False):
    init = jax.jit(model.init) if jit else model.init
    with dm.record() as seen:
        variables = init(jax.random.key(0), *args)
    return variables, seen


def _rows(report):
    return [
        (row.path, row.leaf, row.leaf.layer_type, row.leaf.kind_source, row.decay, row.reason)
        for row in report
    ]


@pytest.mark.parametrize("name", MODELS)
def test_recorded_reads_as_the_trace(name, registered):
    model, args = _inputs(name)
    variables, seen = _recorded(model, args)
    traced = {"module": model, "args": args}
    for tree in (variables, variables["params"]):
        by_trace = POLICY.explain(tree, **traced)
        by_record = POLICY.explain(tree, recorded=seen)
        assert _rows(by_record) == _rows(by_trace)
        assert all(row.leaf.layer_type is not None for row in by_record)
        for policy, method in (
            (POLICY, "for_flax"),
            (POLICY, "labels_for_flax"),
            (POLICY, "rates_for_flax"),
            (MATRICES, "muon_dims_for_flax"),
        ):
            built = getattr(policy, method)
            assert flat_with_paths(built(tree, recorded=seen)) == flat_with_paths(
                built(tree, **traced)
            ), method
        assert flat_with_paths(POLICY.mask(tree, recorded=seen)) == flat_with_paths(
            POLICY.for_flax(tree, **traced)
        )


def test_recorded_classes_and_stacks():
    model, args = _inputs("scanned")
    variables, seen = _recorded(model, args)
    leaves = {row.path: row.leaf for row in POLICY.explain(variables, recorded=seen)}
    kernel = leaves["layers/proj/kernel"]
    assert (kernel.layer_type, kernel.kind_source, kernel.batch_axes) == ("Dense", "class", 1)
    scale = leaves["layers/norm/scale"]
    assert (scale.layer_type, scale.batch_axes, scale.ndim) == ("LayerNorm", 1, 1)
    model, args = _inputs("mixers")
    variables, seen = _recorded(model, args)
    leaves = {row.path: row.leaf for row in POLICY.explain(variables, recorded=seen)}
    assert leaves["general/kernel"].matrix_axes == ((0,), (1, 2))
    assert leaves["mix/kernel"].layer_type == "Einsum"


def test_registered_class_is_read_from_the_record(registered):
    model, args = _inputs("registered")
    variables, seen = _recorded(model, args)
    leaves = {row.path: row.leaf for row in POLICY.explain(variables, recorded=seen)}
    assert (leaves["mine/w"].layer_class, leaves["mine/w"].kind_source) == (Mine, "registered")
    assert (leaves["mine/b"].role, leaves["mine/w"].role) == ("bias", "weight")


@pytest.mark.parametrize("name", MODELS)
def test_optax_step_decays_exactly_the_recorded_mask(name, registered):
    model, args = _inputs(name)
    variables, seen = _recorded(model, args)
    params = variables["params"]
    mask = POLICY.for_flax(params, recorded=seen)
    decayed = {key: bool(value) for key, value in flat_with_paths(mask).items()}
    assert any(decayed.values()) and not all(decayed.values())
    assert_decays_exactly(params, zero_grad_updates(params, mask), decayed)


def test_init_inside_a_fresh_jit_is_recorded():
    model, args = _inputs("scanned")
    variables, seen = _recorded(model, args, jit=True)
    assert seen.inits == 1
    assert _rows(POLICY.explain(variables, recorded=seen)) == _rows(
        POLICY.explain(variables, module=model, args=args)
    )


def test_a_cached_jit_init_records_nothing_and_says_so():
    model, args = _inputs("scanned")
    init = jax.jit(model.init)
    init(jax.random.key(0), *args)  # jax has now compiled it for these inputs
    with dm.record() as seen:
        variables = init(jax.random.key(1), *args)
    assert seen.inits == 0
    with pytest.raises(ValueError, match=(
        r"^for_flax\(params, recorded=seen\): the `with dm.record\(\)` block recorded no "
        r"Linen init: call model.init\(key, x\) inside the block. A jax.jit\(model.init\), "
        r"or a model under nn.jit, that jax has already compiled for these inputs runs no Python"
    )):
        POLICY.for_flax(variables, recorded=seen)


def test_no_init_in_the_block():
    model, args = _inputs("compact")
    variables = model.init(jax.random.key(0), *args)
    with dm.record() as seen:
        pass
    with pytest.raises(ValueError, match=r"^explain\(params, recorded=seen\): the `with "
                       r"dm.record\(\)` block recorded no Linen init"):
        POLICY.explain(variables, recorded=seen)


def test_an_apply_is_not_an_init():
    model, args = _inputs("compact")
    variables = model.init(jax.random.key(0), *args)
    with dm.record() as seen:
        model.apply(variables, *args)
    assert seen.inits == 0


def test_params_of_another_init_are_refused():
    model, args = _inputs("scanned")
    _, seen = _recorded(model, args)
    other = Scanned(outputs=5).init(jax.random.key(0), *args)
    with pytest.raises(ValueError, match=(
        r"^for_flax\(params, recorded=\.\.\.\): the params do not match the recorded init: "
        r"'head/bias' has shape \(5,\) in the params and \(2,\) in the model's\. Pass "
        r"the params \(or variables\) of the init recorded"
    )):
        POLICY.for_flax(other, recorded=seen)
    mixers, mixer_args = _inputs("mixers")
    with pytest.raises(ValueError, match=r"'LayerNorm_0/bias' is in the params, not in the model's"):
        POLICY.for_flax(mixers.init(jax.random.key(0), *mixer_args), recorded=seen)


def test_two_inits_the_matching_one_is_read():
    scanned, scanned_args = _inputs("scanned")
    mixers, mixer_args = _inputs("mixers")
    with dm.record() as seen:
        a = scanned.init(jax.random.key(0), *scanned_args)
        b = mixers.init(jax.random.key(0), *mixer_args)
    assert seen.inits == 2
    for variables, model, args in ((a, scanned, scanned_args), (b, mixers, mixer_args)):
        assert _rows(POLICY.explain(variables, recorded=seen)) == _rows(
            POLICY.explain(variables, module=model, args=args)
        )
    compact, compact_args = _inputs("compact")
    with pytest.raises(ValueError, match=(
        r"^for_flax\(params, recorded=\.\.\.\): the params match none of the 2 inits "
        r"recorded; against the first: '.*' is in the params, not in the model's\. Pass "
        r"the params \(or variables\) of the init recorded"
    )):
        POLICY.for_flax(compact.init(jax.random.key(0), *compact_args), recorded=seen)


def test_recorded_with_module_is_refused():
    model, args = _inputs("compact")
    variables, seen = _recorded(model, args)
    with pytest.raises(TypeError, match=(
        r"^for_flax\(params, recorded=\.\.\., module=\.\.\.\): recorded= reads the init "
        r"recorded in a `with dm.record\(\)` block, module=/args=/kwargs= trace one more; "
        r"pass one of them"
    )):
        POLICY.for_flax(variables, recorded=seen, module=model, args=args)


@pytest.mark.parametrize("wrong", [None, "seen", {"params": {}}])
def test_recorded_of_the_wrong_type(wrong):
    model, args = _inputs("compact")
    variables = model.init(jax.random.key(0), *args)
    if wrong is None:
        wrong = dm.record  # the function, not the block's object
    with pytest.raises(TypeError, match=(
        r"^for_flax\(params, recorded=\.\.\.\): expected the object a `with dm.record\(\) "
        rf"as seen:` block gives, got {type(wrong).__name__}\."
    )):
        POLICY.for_flax(variables, recorded=wrong)


class JitBody(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, name="proj")(nn.LayerNorm(name="norm")(x))


JittedBody = nn.jit(JitBody)


class Outer(nn.Module):
    @nn.compact
    def __call__(self, x):
        return JittedBody(name="body")(nn.Dense(3, name="stem")(x))


def test_nn_jit_cached_inside_the_model_says_what_it_missed():
    x = jnp.ones((1, 3))
    model = Outer()
    model.apply(model.init(jax.random.key(0), x), x)  # jax has now cached body's call
    with dm.record() as seen:
        variables = Outer().init(jax.random.key(0), x)
    assert seen.inits == 1
    with pytest.raises(ValueError, match=(
        r"^for_flax\(params, recorded=\.\.\.\): the recorded init saw no module at "
        r"body/norm, body/proj: a call compiled by nn.jit that jax had already cached runs "
        r"no Python"
    )):
        POLICY.for_flax(variables, recorded=seen)
    # The trace of module= sees through it.
    mask = POLICY.for_flax(variables, module=Outer(), args=(x,))
    assert mask["params"]["body"]["proj"]["kernel"] is True


def test_nn_jit_cached_at_the_root_records_nothing_and_says_so():
    x = jnp.ones((1, 3))
    model = JittedBody()
    model.apply(model.init(jax.random.key(0), x), x)  # jax has now cached the call
    with dm.record() as seen:
        variables = JittedBody().init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=(
        r"^for_flax\(params, recorded=seen\): the `with dm.record\(\)` block recorded no "
        r"Linen init: .* A jax.jit\(model.init\), or a model under nn.jit, that jax has "
        r"already compiled for these inputs runs no Python"
    )):
        POLICY.for_flax(variables, recorded=seen)


def test_the_interceptor_stack_is_left_as_it_was():
    before = list(linen_module._global_interceptor_stack)
    model, args = _inputs("compact")
    with dm.record():
        assert len(list(linen_module._global_interceptor_stack)) == len(before) + 1
        model.init(jax.random.key(0), *args)
    assert list(linen_module._global_interceptor_stack) == before
    with pytest.raises(TypeError):
        with dm.record() as seen:
            model.init(jax.random.key(0), jnp.ones((2, 5), jnp.int32))  # img missing
    assert list(linen_module._global_interceptor_stack) == before
    assert seen.inits == 0
    with pytest.raises(RuntimeError, match=r"already used for a block"):
        with seen:
            pass
    assert list(linen_module._global_interceptor_stack) == before


def test_the_record_keeps_shapes_not_arrays():
    model, args = _inputs("scanned")

    class Holder:
        pass

    with dm.record() as seen:
        holder = Holder()
        holder.variables = model.init(jax.random.key(0), *args)
    alive = weakref.ref(holder)
    kernel = holder.variables["params"]["head"]["kernel"]
    del holder
    gc.collect()
    assert alive() is None
    (trace,) = seen._linen.traces
    leaves = jax.tree_util.tree_leaves(trace.variables)
    assert leaves and all(type(leaf) is jax.ShapeDtypeStruct for leaf in leaves)
    assert trace.variables["params"]["head"]["kernel"].shape == kernel.shape


def test_recording_has_a_plain_repr():
    model, args = _inputs("compact")
    _, seen = _recorded(model, args)
    assert repr(seen) == "<decaymask Recording: 1 init(s), closed>"
    assert isinstance(seen, dm.Recording)


def test_a_generic_method_knows_recorded_params_are_linen(registered):
    class Named(nn.Module):
        @nn.compact
        def __call__(self, x):
            return Mine(name="proj")(x)

    pytest.importorskip("haiku")  # a second framework that could have made the dict
    x = jnp.ones((1, 3))
    with dm.record() as seen:
        params = Named().init(jax.random.key(0), x)["params"]
    with pytest.raises(ValueError, match=r"Haiku and Flax Linen could have made"):
        POLICY.mask(params)  # Linen or Haiku params: the names alone do not say
    assert flat_with_paths(POLICY.mask(params, recorded=seen)) == flat_with_paths(
        POLICY.for_flax(params, module=Named(), args=(x,))
    )


NO_FLAX_YET = """
import sys
import decaymask as dm
with dm.record() as seen:
    loaded = [m for m in ("jax", "flax", "haiku") if m in sys.modules]
    import flax.linen as nn, jax, jax.numpy as jnp
    variables = nn.Dense(2).init(jax.random.key(0), jnp.ones((1, 3)))
print(loaded, seen.inits)
try:
    dm.Policy(dm.decay()).for_flax(variables, recorded=seen)
except ValueError as err:
    print(err)
"""


def test_record_imports_no_framework_and_says_when_flax_came_late():
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", NO_FLAX_YET], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out == [
        "[] 0",
        "for_flax(params, recorded=seen): flax.linen was not imported when the `with "
        "dm.record()` block began, so no Linen init was recorded. Import flax.linen before "
        "entering the block, and call model.init inside it.",
    ]


def test_a_lifted_root_is_read_as_the_user_s_class():
    class Body(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3, name="proj")(nn.LayerNorm(name="norm")(x))

    lifted = nn.jit(Body)  # a fresh class: jax has compiled nothing of it yet
    x = jnp.ones((1, 3))
    with dm.record() as seen:
        variables = lifted().init(jax.random.key(0), x)
    recorded = POLICY.explain(variables, recorded=seen)
    assert _rows(recorded) == _rows(POLICY.explain(variables, module=lifted(), args=(x,)))
    kernel = {row.path: row.leaf for row in recorded}["proj/kernel"]
    assert [layer.type_name for layer in kernel.ancestors] == ["Body"]


@pytest.mark.parametrize("name", MODELS)
def test_params_exactly_recorded_are_read_as_key_by_key(name, registered, monkeypatch):
    # The recorded params (and a FrozenDict of them, read key by key) give the trace
    # that reading them key by key gives, without it.
    from decaymask.adapters._linen import _traced

    model, args = _inputs(name)
    variables, seen = _recorded(model, args)
    taken = []
    exactly = _traced._exactly_recorded

    def noted(*a):
        found = exactly(*a)
        taken.append(found is not None)
        return found

    monkeypatch.setattr(_traced, "_exactly_recorded", noted)
    params = variables["params"]
    trees = (params, jax.tree.map(jnp.zeros_like, params), flax_core.freeze(params))
    fast = [_rows(POLICY.explain(tree, recorded=seen)) for tree in trees]
    assert taken == [True, True, False]  # a FrozenDict is not the recorded dict
    monkeypatch.setattr(_traced, "_exactly_recorded", lambda *a: None)
    assert fast == [_rows(POLICY.explain(tree, recorded=seen)) for tree in trees]
