"""Parameter groups: the same in every framework, and on stacked layers as unrolled.

1. One policy (the standard preset, the embedding frozen, attention at half the learning
   rate, layer-wise decay 0.8) on the architecture of :mod:`.models`, read every way
   decaymask reads it (Equinox; Linen by names and traced; NNX module and State; Haiku
   by names and traced): the multipliers (``lr_scales``), the trainable flags
   (``trainable``) and the layer ids (``explain``) per (module path, role) are the ones
   the spec gives, with the blocks found alone, selected by their class, and by one glob.
2. Twenty steps of ``policy.wrap(optax.adamw(..., mask=policy.mask))`` from the same
   values with the same gradients end at the same parameters in the four frameworks,
   the frozen ones bit for bit where they started.
3. With zero gradients, learning rate 1 and weight decay 0.1, one wrapped step moves
   every decayed leaf by exactly ``-0.1 * multiplier * p``, no other leaf, and adam
   keeps state for the trainable leaves only (counted in bytes).
4. Layers stacked along a leading axis (Linen ``nn.scan`` and ``nn.vmap``, NNX
   ``nnx.vmap`` and ``nnx.scan``, ``hk.layer_stack``, ``eqx.filter_vmap``) get one
   multiplier per layer, the values of the same model unrolled, and take the unrolled
   model's step.
5. How the blocks are found, on ``dm.Leaf`` records.

Values cross frameworks element by element: adamw and the multipliers act on each
element alone, so the elements a (module path, role) holds in Linen's params are copied,
in order, into the elements the other framework holds there (its layout is another
arrangement of the same numbers); after the steps they are compared the same way.
NNX's and Haiku's GRU cells hold 18 bias elements where Linen's hold 24 (no bias on the
hidden side of the candidate gate): they take the first 18.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import equinox as eqx
import flax.linen as nn
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import decaymask as dm

from . import haiku_models, models
from .test_decisions import format_rows

# The policy and what the spec says it gives.

RATE = 0.8
ATTENTION_LR = 0.5
N = models.BLOCKS


def groups_policy(rate: float = RATE, blocks: Any = None) -> dm.Policy:
    return dm.Policy(
        *dm.presets.standard().rules,
        dm.freeze(layer="embedding"),
        dm.lr(ATTENTION_LR, within="attention"),
        dm.layer_decay(rate, blocks=blocks),
    )


POLICY = groups_policy()


def spec_groups(module: str, rate: float = RATE) -> tuple[int, float, bool]:
    """(layer id, multiplier, trainable) of a parameter of the spec's ``module``.

    The embedding is the stem (id 0) and frozen; block ``i`` has id ``i + 1``; the
    rest (every other layer, the head) has id ``N + 1``. Attention learns at half rate.
    """
    if module == "embed":
        return 0, 0.0, False
    layer = int(module.split("/")[1]) + 1 if module.startswith("blocks/") else N + 1
    scale = rate ** (N + 1 - layer)
    if "/attn/" in module:
        scale *= ATTENTION_LR
    return layer, scale, True


# The readings of the spec: every way decaymask reads each framework.

READINGS = (
    "equinox",
    "linen-names",
    "linen-traced",
    "nnx-module",
    "nnx-state",
    "haiku-names",
    "haiku-traced",
)
BLOCK_CLASSES = {
    "equinox": models.EqxBlock,
    "linen-traced": models.LinenBlock,
    "nnx-module": models.NnxBlock,
    "haiku-traced": haiku_models.HkBlock,
}
"""The readings that know classes, and the block class of each framework's build."""
BLOCKS_GLOB = "blocks[/_]*"
"""``blocks/0`` (Equinox, NNX) and ``blocks_0`` (Linen, Haiku): one glob for all."""


@functools.cache
def builds() -> dict[str, Any]:
    """The spec in each framework, built once; no test changes them."""
    return {
        "equinox": models.equinox_model(),
        "linen": models.linen_variables()["params"],
        "nnx": models.nnx_model(),
        "haiku": haiku_models.haiku_params()[0],
    }


def reading_input(reading: str) -> tuple[Any, dict[str, Any]]:
    """(tree, options) of the entry points for ``reading``."""
    built = builds()
    traced_linen = {"module": models.linen_model(), "args": models.example_inputs()}
    traced_haiku = {"fn": haiku_models.haiku_transformed(), "args": models.example_inputs()}
    return {
        "equinox": (built["equinox"], {}),
        "linen-names": (built["linen"], {"framework": "linen"}),
        "linen-traced": (built["linen"], traced_linen),
        "nnx-module": (built["nnx"], {}),
        "nnx-state": (nnx.state(built["nnx"], nnx.Param), {}),
        "haiku-names": (built["haiku"], {"framework": "haiku"}),
        "haiku-traced": (built["haiku"], {"framework": "haiku", **traced_haiku}),
    }[reading]


def owner(reading: str) -> Callable[[str], str]:
    return haiku_models.module_path if reading.startswith("haiku") else models.module_path


# Trees by canonical path, and back.


def _key(entry: Any) -> str:
    for attribute in ("name", "key", "idx"):
        if hasattr(entry, attribute):
            return str(getattr(entry, attribute))
    return str(entry)


def path_text(path: tuple[Any, ...]) -> str:
    names = [_key(k) for k in path]
    if names and names[-1] == "value":  # an NNX Variable's own node
        names.pop()
    return "/".join(names)


def flat(tree: Any) -> dict[str, Any]:
    """The leaves of ``tree`` by canonical path (``None`` leaves left out)."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {path_text(path): leaf for path, leaf in leaves}


def rebuild(tree: Any, values: dict[str, Any]) -> Any:
    """``tree`` with the leaves at the paths of ``values`` replaced."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return jax.tree_util.tree_unflatten(
        treedef, [values.get(path_text(path), leaf) for path, leaf in leaves]
    )


# 1. The same groups in every reading.

Key = tuple[str, str]
"""(spec module path, role): where values are compared across frameworks."""
Table = dict[Key, frozenset]


def param_rows(report: dm.Report) -> dict[str, dm.Decision]:
    return {row.path: row for row in report if row.leaf.is_param}


def table(reading: str, rows: dict[str, dm.Decision], value: Callable[[str], Any]) -> Table:
    """``value(path)`` of every parameter, collected per (spec module, role)."""
    found: dict[Key, set] = {}
    module_of = owner(reading)
    for path, row in rows.items():
        found.setdefault((module_of(path), row.role), set()).add(value(path))
    return {key: frozenset(values) for key, values in found.items()}


def _scale(value: Any) -> float:
    """A multiplier as a comparable number (products of rates differ in the last bits)."""
    assert type(value) is float, f"an unstacked leaf's multiplier is a float, got {value!r}"
    return round(value, 12)


def assert_spec_groups(reading: str, policy: dm.Policy, rate: float = RATE) -> None:
    tree, options = reading_input(reading)
    rows = param_rows(policy.explain(tree, **options))
    scales = flat(policy.lr_scales(tree, **options))
    trainable = flat(policy.trainable(tree, **options))
    found = {
        "layer id": table(reading, rows, lambda p: rows[p].layer_id),
        "explain lr_scale": table(reading, rows, lambda p: _scale(rows[p].lr_scale)),
        "explain trainable": table(reading, rows, lambda p: rows[p].trainable),
        "lr_scales": table(reading, rows, lambda p: _scale(scales[p])),
        "trainable": table(reading, rows, lambda p: trainable[p]),
    }
    expected = {}
    for module, role in found["layer id"]:
        layer, scale, train = spec_groups(module, rate)
        expected[(module, role)] = {
            "layer id": layer,
            "explain lr_scale": round(scale, 12),
            "explain trainable": train,
            "lr_scales": round(scale, 12),
            "trainable": train,
        }
    wrong = [
        [f"{module}", role, what, str(sorted(values)), str(expected[(module, role)][what])]
        for what, values_by_key in found.items()
        for (module, role), values in sorted(values_by_key.items())
        if values != {expected[(module, role)][what]}
    ]
    assert not wrong, f"{reading} differs from the spec:\n" + format_rows(
        ["module", "role", "output", "found", "spec"], wrong
    )
    spec_modules = set(models.LAYER_PATHS) - ({"prelu"} if reading.startswith("haiku") else set())
    assert {module for module, _ in found["layer id"]} == spec_modules


def _selector_cases() -> list[Any]:
    cases = [pytest.param(r, "found", id=f"{r}-found") for r in READINGS]
    cases += [pytest.param(r, "glob", id=f"{r}-glob") for r in READINGS]
    cases += [pytest.param(r, "class", id=f"{r}-class") for r in BLOCK_CLASSES]
    return cases


@pytest.mark.parametrize(("reading", "selector"), _selector_cases())
def test_every_reading_gives_the_specs_groups(reading, selector):
    """Layer ids, multipliers and trainable flags per (module path, role), from
    ``explain``, ``lr_scales`` and ``trainable``, with the blocks found alone (the one
    repeated stack), by the glob ``blocks[/_]*`` or by the framework's block class."""
    blocks = {"found": None, "glob": BLOCKS_GLOB}.get(selector, BLOCK_CLASSES.get(reading))
    assert_spec_groups(reading, groups_policy(blocks=blocks))


def test_the_spec_check_can_fail():
    """Another rate gives other multipliers, and the check says where."""
    with pytest.raises(AssertionError, match=r"blocks/0/attn/query .*lr_scales"):
        assert_spec_groups("linen-names", groups_policy(rate=0.9))


@pytest.mark.parametrize("reading", ["linen-names", "nnx-state", "haiku-names"])
def test_a_class_selector_needs_the_classes(reading):
    """Read by names, the leaves carry no class: a block class selects nothing, and the
    error says so rather than finding some other ladder."""
    framework = reading.split("-")[0]
    cls = {"linen": models.LinenBlock, "nnx": models.NnxBlock, "haiku": haiku_models.HkBlock}
    tree, options = reading_input(reading)
    policy = groups_policy(blocks=cls[framework])
    with pytest.raises(ValueError, match=rf"blocks={cls[framework].__name__} selects no module"):
        policy.lr_scales(tree, **options)


# 2. Twenty wrapped adamw steps: the same parameters in the four frameworks.

STEPS = 20
LEARNING_RATE = 1e-2
WEIGHT_DECAY = 0.1
TOLERANCE = {"rtol": 1e-6, "atol": 1e-7}
"""For parameters after 20 steps: the same element-wise arithmetic in every framework
(measured: bit-identical)."""
REFERENCE_TOLERANCE = {"rtol": 2e-5, "atol": 0.0}
"""Against adamw in numpy: float32 roundings in another order (measured: 4e-6)."""
SHORTER = {("gru", "bias"): 18}
"""Elements a (module, role) holds in NNX and Haiku, where Linen's holds more."""
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
"""Compiling adamw over seventy leaves costs seconds; these shorten it (measured 5.2 s
to 4.0 s on a busy machine) with the same IEEE arithmetic."""
FRAMEWORKS = ("equinox", "linen", "nnx", "haiku")
NAMES_READING = {
    "equinox": "equinox", "linen": "linen-names", "nnx": "nnx-state", "haiku": "haiku-names"
}
"""How each framework's params are read when the optimizer hands them over."""


def element_keys(reading: str) -> dict[str, Key]:
    """Canonical path -> (spec module, role) of every parameter."""
    tree, options = reading_input(reading)
    module_of = owner(reading)
    rows = param_rows(POLICY.explain(tree, **options))
    return {path: (module_of(path), row.role) for path, row in rows.items()}


def vectors(values: dict[str, Any], keys: dict[str, Key]) -> dict[Key, np.ndarray]:
    """Per (module, role), its elements in flattening order."""
    parts: dict[Key, list[np.ndarray]] = {}
    for path, value in values.items():
        if path in keys:
            parts.setdefault(keys[path], []).append(np.ravel(np.asarray(value)))
    return {key: np.concatenate(p) for key, p in parts.items()}


def copy_elements(
    template: dict[str, Any], keys: dict[str, Key], source: dict[Key, np.ndarray]
) -> dict[str, np.ndarray]:
    """Arrays for the parameters of ``template``, filled in order from ``source``."""
    used: dict[Key, int] = {}
    out = {}
    for path, leaf in template.items():
        if path not in keys:
            continue
        key = keys[path]
        start = used.get(key, 0)
        size = int(np.prod(leaf.shape))
        out[path] = source[key][start : start + size].reshape(leaf.shape).astype(leaf.dtype)
        used[key] = start + size
    for key, n in used.items():
        assert n in (len(source[key]), SHORTER.get(key)), f"{key}: {n} of {len(source[key])}"
    return out


@functools.cache
def gradients() -> list[dict[str, np.ndarray]]:
    """Linen-shaped gradients of every step, by path: uniform in [-0.5, 0.5)."""
    abstract = jax.eval_shape(lambda: builds()["linen"])
    draws = [flat(models.fill(abstract, seed=100 + t)) for t in range(STEPS)]
    return [{p: np.asarray(g) - np.float32(0.5) for p, g in draw.items()} for draw in draws]


def params_of(framework: str) -> Any:
    """The tree the optimizer is handed in each framework (fresh NNX params)."""
    built = builds()
    if framework == "equinox":
        return eqx.filter(built["equinox"], eqx.is_inexact_array)
    if framework == "nnx":
        return nnx.as_pure(nnx.state(models.nnx_model(), nnx.Param))
    return built[framework]


def wrapped_adamw(
    framework: str,
    policy: dm.Policy = POLICY,
    learning_rate: float = LEARNING_RATE,
    full: Any = None,
    **options: Any,
) -> optax.GradientTransformation:
    """``policy.wrap(optax.adamw(..., mask=policy.mask))``, the mask a callable; Linen
    and Haiku params (dicts both can read) name their framework."""
    if framework in ("linen", "haiku"):
        options = {"framework": framework, **options}
    mask = functools.partial(policy.mask, **options) if options else policy.mask
    tx = optax.adamw(learning_rate, weight_decay=WEIGHT_DECAY, mask=mask)
    return policy.wrap(tx, full=full, **options)


@functools.cache
def trajectory(framework: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict]:
    """(start, end, element keys) of 20 wrapped adamw steps in ``framework``, from
    Linen's values with Linen's gradients copied element by element."""
    keys = element_keys(NAMES_READING[framework])
    linen_keys = element_keys("linen-names")
    template = params_of(framework)
    start_flat = {p: np.asarray(v) for p, v in flat(template).items()}
    start_flat.update(copy_elements(start_flat, keys, vectors(flat(builds()["linen"]), linen_keys)))
    grads = []
    for g in gradients():
        copied = copy_elements(start_flat, keys, vectors(g, linen_keys))
        grads.append({p: copied.get(p, np.zeros_like(v)) for p, v in start_flat.items()})
    params = rebuild(template, start_flat)
    stacked = rebuild(template, {p: np.stack([g[p] for g in grads]) for p in start_flat})
    tx = wrapped_adamw(framework)

    def step(params: Any, grads: Any) -> tuple[Any, None]:
        params, state = params
        updates, state = tx.update(grads, state, params)
        return (optax.apply_updates(params, updates), state), None

    def run(params: Any, state: Any, grads: Any) -> Any:
        return jax.lax.scan(step, (params, state), grads)[0][0]

    run = jax.jit(run, compiler_options=FAST_COMPILE)
    end = run(params, tx.init(params), stacked)
    return start_flat, {p: np.asarray(v) for p, v in flat(end).items()}, keys


def differences(actual: dict, expected: dict) -> list[list[str]]:
    out = []
    for key, a in sorted(actual.items()):
        e = expected[key][: len(a)]
        if not np.allclose(a, e, **TOLERANCE):
            out.append([*key, f"{np.abs(a - e).max():.3g}"])
    return out


@pytest.mark.parametrize("framework", ["equinox", "nnx", "haiku"])
def test_twenty_wrapped_steps_end_where_linens_do(framework):
    start, end, keys = trajectory(framework)
    _, linen_end, linen_keys = trajectory("linen")
    wrong = differences(vectors(end, keys), vectors(linen_end, linen_keys))
    header = ["module", "role", "max |diff|"]
    assert not wrong, f"{framework} ends elsewhere:\n" + format_rows(header, wrong)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_twenty_steps_leave_frozen_leaves_bit_identical_and_move_the_rest(framework):
    start, end, keys = trajectory(framework)
    frozen = [p for p in start if p not in keys or keys[p][0] == "embed"]
    assert frozen and all(np.array_equal(end[p], start[p]) for p in frozen), frozen
    still = [p for p in start if p not in frozen and np.array_equal(end[p], start[p])]
    assert not still, f"trainable leaves that did not move: {still}"
    if framework == "equinox":
        # Batch norm's running statistics ride along as arrays: not parameters.
        assert sum(p not in keys for p in start) == 2


def adamw_reference(
    start: np.ndarray, grads: list[np.ndarray], decayed: bool, scale: float
) -> np.ndarray:
    """optax.adamw's arithmetic in numpy (float32), each update times ``scale``."""
    b1, b2, eps = np.float32(0.9), np.float32(0.999), np.float32(1e-8)
    p, mu, nu = start.copy(), np.zeros_like(start), np.zeros_like(start)
    for t, g in enumerate(grads, 1):
        mu = (1 - b1) * g + b1 * mu
        nu = (1 - b2) * g * g + b2 * nu
        count = np.float32(t)
        u = (mu / (1 - b1**count)) / (np.sqrt(nu / (1 - b2**count)) + eps)
        if decayed:
            u = u + np.float32(WEIGHT_DECAY) * p
        p = p + np.float32(-LEARNING_RATE) * u * np.float32(scale)
    return p


def reference_differences(rate: float) -> list[list[str]]:
    """Where Linen's 20 steps are not adamw with the spec's multipliers at ``rate``."""
    start, end, keys = trajectory("linen")
    tree, options = reading_input("linen-names")
    rows = param_rows(POLICY.explain(tree, **options))
    decayed: dict[Key, set[bool]] = {}
    for path, key in keys.items():
        decayed.setdefault(key, set()).add(rows[path].decay)
    starts, ends = vectors(start, keys), vectors(end, keys)
    grads = [vectors(g, keys) for g in gradients()]
    out = []
    for key, first in sorted(starts.items()):
        (decays,) = decayed[key]
        _, scale, trainable = spec_groups(key[0], rate)
        expected = first
        if trainable:
            expected = adamw_reference(first, [g[key] for g in grads], decays, scale)
        if not np.allclose(ends[key], expected, **REFERENCE_TOLERANCE):
            out.append([*key, f"{np.abs(ends[key] - expected).max():.3g}"])
    return out


def test_linens_twenty_steps_are_adamw_times_the_multipliers():
    """Against adamw written out in numpy: every update times the spec's multiplier
    (decay term included), the embedding not at all. With the multipliers of another
    rate the blocks, and only they, end elsewhere: the comparisons can fail."""
    wrong = reference_differences(RATE)
    assert not wrong, format_rows(["module", "role", "max |diff|"], wrong)
    keys = set(trajectory("linen")[2].values())
    other = reference_differences(0.9)
    blocks = {key for key in keys if key[0].startswith("blocks/")}
    assert {(module, role) for module, role, _ in other} == blocks


# 3. Exact steps: zero gradients, learning rate 1, weight decay 0.1.

EXACT_RATE = 0.5
"""Every multiplier a power of two (blocks 0.25 and 0.5, their attention 0.125 and 0.25),
so ``-0.1 * multiplier * p`` has one rounding, that of ``0.1 * p``, in any order: the
new parameters are compared with ``np.testing.assert_array_equal`` against
``p + (-(0.1 * p) * multiplier)`` in float32, the step's own addition rounded once."""
EXACT = groups_policy(rate=EXACT_RATE)
EXACT_READINGS = ("equinox", "linen-names", "nnx-module", "haiku-names")


@functools.cache
def exact_step(reading: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], Any]:
    """(params, params after one step, optimizer state) of a zero-gradient step."""
    framework = reading.split("-")[0]
    tx = wrapped_adamw(framework, EXACT, learning_rate=1.0)
    if framework == "nnx":
        model = models.nnx_model()
        before = {p: np.asarray(v) for p, v in flat(nnx.state(model, nnx.Param)).items()}
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
        grads = jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param))
        graphdef, state = nnx.split((model, optimizer))

        def update(state: Any, grads: Any) -> Any:
            model, optimizer = nnx.merge(graphdef, state)
            optimizer.update(model, grads)
            return nnx.state((model, optimizer))

        nnx.update((model, optimizer), jax.jit(update, compiler_options=FAST_COMPILE)(state, grads))
        after = {p: np.asarray(v) for p, v in flat(nnx.state(model, nnx.Param)).items()}
        return before, after, optimizer.opt_state
    params = params_of(framework)

    def step(params: Any) -> tuple[Any, Any]:
        return tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)

    updates, state = jax.jit(step, compiler_options=FAST_COMPILE)(params)
    before = {p: np.asarray(v) for p, v in flat(params).items()}
    after = {p: np.asarray(v) for p, v in flat(optax.apply_updates(params, updates)).items()}
    return before, after, state


@pytest.mark.parametrize("reading", EXACT_READINGS)
def test_one_zero_gradient_step_is_exactly_the_multiplied_decay(reading):
    before, after, state = exact_step(reading)
    tree, options = reading_input(reading)
    rows = param_rows(EXACT.explain(tree, **options))
    module_of = owner(reading)
    seen = set()
    for path, p in before.items():
        if path not in rows:  # Equinox batch norm's running statistics
            np.testing.assert_array_equal(after[path], p, err_msg=path)
            continue
        _, scale, trainable = spec_groups(module_of(path), EXACT_RATE)
        if trainable and rows[path].decay:
            update = -(np.float32(WEIGHT_DECAY) * p) * np.float32(scale)
            seen.add(scale)
        else:
            update = np.zeros_like(p)
        # p + update, rounded once: the step's own addition.
        np.testing.assert_array_equal(after[path], p + update, err_msg=path)
    assert seen == {0.125, 0.25, 0.5, 1.0}, "decayed leaves at every multiplier"


def _is_state(path: str) -> bool:
    return "state_index" in path  # Equinox keeps batch norm's statistics there


@pytest.mark.parametrize("reading", EXACT_READINGS)
def test_adam_keeps_state_for_the_trainable_leaves_only(reading):
    """Two float32 moments per trainable element, and the step count (an int32)."""
    before, _, state = exact_step(reading)
    module_of = owner(reading)
    trainable = sum(
        p.size for path, p in before.items() if not _is_state(path) and module_of(path) != "embed"
    )
    frozen = sum(p.size for path, p in before.items() if module_of(path) == "embed")
    assert frozen == models.VOCAB * models.WIDTH
    nbytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves(state))
    assert nbytes == 2 * 4 * trainable + 4


# 4. Stacked layers are their unrolled model.

LAYERS = 4
W = 3  # features, not LAYERS: a leading axis of 4 is the layer axis
V = 5  # vocabulary
STACK_RATE = 0.5
STACK_POLICY = dm.Policy(*dm.presets.standard().rules, dm.layer_decay(STACK_RATE))
PER_LAYER = tuple(STACK_RATE ** (LAYERS - i) for i in range(LAYERS))
"""The multipliers of blocks 0 to 3: 1/16, 1/8, 1/4, 1/2."""
TOKENS = jnp.zeros((2, 3), jnp.int32)


def stack_policy(blocks: Any = None) -> dm.Policy:
    return dm.Policy(*dm.presets.standard().rules, dm.layer_decay(STACK_RATE, blocks=blocks))


# Equinox


class EqxStackBlock(eqx.Module):
    ln: eqx.nn.LayerNorm
    fc: eqx.nn.Linear

    def __init__(self, key: jax.Array):
        self.ln = eqx.nn.LayerNorm(W)
        self.fc = eqx.nn.Linear(W, W, key=key)


class EqxStackModel(eqx.Module):
    embed: eqx.nn.Embedding
    blocks: Any
    ln_f: eqx.nn.LayerNorm
    head: eqx.nn.Linear

    def __init__(self, stacked: bool):
        keys = jax.random.split(jax.random.key(0), 3)
        self.embed = eqx.nn.Embedding(V, W, key=keys[0])
        layer_keys = jax.random.split(keys[1], LAYERS)
        if stacked:
            self.blocks = eqx.filter_vmap(EqxStackBlock)(layer_keys)
        else:
            self.blocks = tuple(EqxStackBlock(k) for k in layer_keys)
        self.ln_f = eqx.nn.LayerNorm(W)
        self.head = eqx.nn.Linear(W, V, key=keys[2])


# Linen


class LinenStackBlock(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array, _: Any = None) -> tuple[jax.Array, None]:
        return x + nn.Dense(W, name="fc")(nn.LayerNorm(name="ln")(x)), None


class LinenStackModel(nn.Module):
    stacking: str  # "scan", "vmap" or "unrolled"
    named: bool = True  # the lifted module named "blocks", else its auto name

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        h = nn.Embed(V, W, name="embed")(tokens)
        name = {"name": "blocks"} if self.named else {}
        lifted = {"variable_axes": {"params": 0}, "split_rngs": {"params": True}}
        if self.stacking == "scan":
            h, _ = nn.scan(LinenStackBlock, length=LAYERS, **lifted)(**name)(h, None)
        elif self.stacking == "vmap":
            out, _ = nn.vmap(
                LinenStackBlock, in_axes=(None, None), out_axes=0, axis_size=LAYERS, **lifted
            )(**name)(h, None)
            h = out.sum(0)
        else:
            for i in range(LAYERS):
                h, _ = LinenStackBlock(name=f"blocks_{i}")(h)
        return nn.Dense(V, name="head")(nn.LayerNorm(name="ln_f")(h))


def linen_stack_params(model: LinenStackModel) -> Any:
    return models.fill(jax.eval_shape(model.init, jax.random.key(0), TOKENS), seed=3)["params"]


# NNX


class NnxStackBlock(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.ln = nnx.LayerNorm(W, rngs=rngs)
        self.fc = nnx.Linear(W, W, rngs=rngs)


class NnxStackModel(nnx.Module):
    def __init__(self, stacking: str, rngs: nnx.Rngs):
        self.embed = nnx.Embed(V, W, rngs=rngs)
        if stacking == "vmap":
            # The pattern of the NNX docs: split the keys, vmap the constructor.
            @nnx.split_rngs(splits=LAYERS)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def make(rngs: nnx.Rngs) -> NnxStackBlock:
                return NnxStackBlock(rngs)

            self.blocks = make(rngs)
        elif stacking == "scan":

            @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))
            def grow(carry: int, key: jax.Array) -> tuple[int, NnxStackBlock]:
                return carry, NnxStackBlock(nnx.Rngs(key))

            _, self.blocks = grow(0, jax.random.split(jax.random.key(1), LAYERS))
        else:
            self.blocks = nnx.List([NnxStackBlock(rngs) for _ in range(LAYERS)])
        self.ln_f = nnx.LayerNorm(W, rngs=rngs)
        self.head = nnx.Linear(W, V, rngs=rngs)


# Haiku


class HkStackBlock(hk.Module):
    def __call__(self, h: jax.Array) -> jax.Array:
        return _hk_block(h)


def _hk_block(h: jax.Array) -> jax.Array:
    return h + hk.Linear(W, name="fc")(hk.LayerNorm(-1, True, True, name="ln")(h))


def _hk_forward(stacking: str) -> hk.Transformed:
    def forward(tokens: jax.Array) -> jax.Array:
        h = hk.Embed(V, W, name="embed")(tokens)
        if stacking == "layer_stack":
            h = hk.layer_stack(LAYERS, name="blocks")(_hk_block)(h)
        elif stacking == "layer_stack_of_modules":
            h = hk.layer_stack(LAYERS, name="blocks")(lambda h: HkStackBlock(name="block")(h))(h)
        else:
            for i in range(LAYERS):
                h = HkStackBlock(name=f"blocks_{i}")(h)
        return hk.Linear(V, name="head")(hk.LayerNorm(-1, True, True, name="ln_f")(h))

    return hk.transform(forward)


def hk_stack_params(stacking: str) -> Any:
    transformed = _hk_forward(stacking)
    return models.fill(jax.eval_shape(transformed.init, jax.random.key(0), TOKENS), seed=3)


# The cases: how each is built, read and stepped.


@dataclasses.dataclass(frozen=True)
class Stack:
    """A model of 4 stacked blocks and the same model unrolled, in one framework."""

    name: str
    framework: str  # how its params are stepped: "equinox", "linen", "nnx", "haiku"
    build: Callable[[], tuple[Any, Any]]  # (stacked, unrolled), unrolled of any values
    options: Callable[[], tuple[dict[str, Any], dict[str, Any]]]
    root: str  # the stacked module's path
    inner: str = ""  # keys between the root and a block's contents in the stacked paths
    unrolled_key: str = "blocks_{}"
    block_class: type | None = None

    def unrolled_path(self, path: str, i: int) -> str:
        rest = path[len(self.root) + 1 + (len(self.inner) + 1 if self.inner else 0):]
        return f"{self.unrolled_key.format(i)}/{rest}"


def _eqx_build() -> tuple[Any, Any]:
    return (
        models.fill(eqx.filter_eval_shape(EqxStackModel, True), seed=3),
        eqx.filter_eval_shape(EqxStackModel, False),
    )


def _linen_build(stacking: str, named: bool) -> Callable[[], tuple[Any, Any]]:
    return lambda: (
        linen_stack_params(LinenStackModel(stacking, named)),
        linen_stack_params(LinenStackModel("unrolled")),
    )


def _linen_options(stacking: str, named: bool, traced: bool) -> Callable[[], tuple[dict, dict]]:
    def options() -> tuple[dict, dict]:
        if not traced:
            return {"framework": "linen"}, {"framework": "linen"}
        return (
            {"module": LinenStackModel(stacking, named), "args": (TOKENS,)},
            {"module": LinenStackModel("unrolled"), "args": (TOKENS,)},
        )

    return options


def _nnx_build(stacking: str, state: bool) -> Callable[[], tuple[Any, Any]]:
    def build() -> tuple[Any, Any]:
        stacked = NnxStackModel(stacking, nnx.Rngs(0))
        unrolled = NnxStackModel("unrolled", nnx.Rngs(0))
        if state:
            return nnx.state(stacked, nnx.Param), nnx.state(unrolled, nnx.Param)
        return stacked, unrolled

    return build


def _hk_options(traced: bool, stacking: str) -> Callable[[], tuple[dict, dict]]:
    def options() -> tuple[dict, dict]:
        if not traced:
            return {"framework": "haiku"}, {"framework": "haiku"}
        return (
            {"framework": "haiku", "fn": _hk_forward(stacking), "args": (TOKENS,)},
            {"framework": "haiku", "fn": _hk_forward("unrolled"), "args": (TOKENS,)},
        )

    return options


def _no_options() -> tuple[dict, dict]:
    return {}, {}


STACKS = [
    Stack("equinox-filter_vmap", "equinox", _eqx_build, _no_options, "blocks",
          unrolled_key="blocks/{}", block_class=EqxStackBlock),
    Stack("linen-scan-traced", "linen", _linen_build("scan", True),
          _linen_options("scan", True, True), "blocks", block_class=LinenStackBlock),
    Stack("linen-scan-names", "linen", _linen_build("scan", False),
          _linen_options("scan", False, False), "ScanLinenStackBlock_0"),
    Stack("linen-scan-named-by-names", "linen", _linen_build("scan", True),
          _linen_options("scan", True, False), "blocks"),
    Stack("linen-vmap-traced", "linen", _linen_build("vmap", True),
          _linen_options("vmap", True, True), "blocks", block_class=LinenStackBlock),
    Stack("linen-vmap-names", "linen", _linen_build("vmap", False),
          _linen_options("vmap", False, False), "VmapLinenStackBlock_0"),
    Stack("linen-vmap-named-by-names", "linen", _linen_build("vmap", True),
          _linen_options("vmap", True, False), "blocks"),
    Stack("nnx-vmap", "nnx", _nnx_build("vmap", False), _no_options, "blocks",
          unrolled_key="blocks/{}", block_class=NnxStackBlock),
    Stack("nnx-scan", "nnx", _nnx_build("scan", False), _no_options, "blocks",
          unrolled_key="blocks/{}", block_class=NnxStackBlock),
    Stack("nnx-vmap-state", "nnx", _nnx_build("vmap", True), _no_options, "blocks",
          unrolled_key="blocks/{}"),
    Stack("haiku-layer_stack-traced", "haiku",
          lambda: (hk_stack_params("layer_stack"), hk_stack_params("unrolled")),
          _hk_options(True, "layer_stack"), "blocks"),
    Stack("haiku-layer_stack_of_modules-traced", "haiku",
          lambda: (hk_stack_params("layer_stack_of_modules"), hk_stack_params("unrolled")),
          _hk_options(True, "layer_stack_of_modules"), "blocks", inner="block",
          block_class=HkStackBlock),
    Stack("haiku-layer_stack-names", "haiku",
          lambda: (hk_stack_params("layer_stack"), hk_stack_params("unrolled")),
          _hk_options(False, "layer_stack"), "blocks"),
]
FAILS_TO_FIND: dict[str, str] = {}
"""Readings whose adapter does not mark the stacked arrays: no ladder is found."""


def _stack_cases(with_class: bool, fails: dict[str, str]) -> list[Any]:
    cases = []
    for stack in STACKS:
        marks = []
        if stack.name in fails:
            reason = fails[stack.name]
            marks.append(pytest.mark.xfail(strict=True, raises=ValueError, reason=reason))
        cases.append(pytest.param(stack, None, marks=marks, id=f"{stack.name}-found"))
        if with_class and stack.block_class is not None:
            cases.append(pytest.param(stack, "class", marks=marks, id=f"{stack.name}-class"))
    return cases


@functools.cache
def stack_trees(stack: Stack) -> tuple[Any, Any]:
    """(stacked, unrolled) with the unrolled blocks holding the stacked layers' values."""
    stacked, unrolled = stack.build()
    if stack.framework == "nnx" and isinstance(stacked, nnx.Module):
        values = _unrolled_values(stack, flat(nnx.state(stacked, nnx.Param)))
        state = nnx.state(unrolled, nnx.Param)
        nnx.update(unrolled, rebuild(state, values))
        return stacked, unrolled
    return stacked, rebuild(unrolled, _unrolled_values(stack, flat(stacked)))


def _unrolled_values(stack: Stack, stacked: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for path, value in stacked.items():
        if path.startswith(stack.root + "/"):
            for i in range(LAYERS):
                out[stack.unrolled_path(path, i)] = np.asarray(value)[i]
        else:
            out[path] = np.asarray(value)
    return out


def param_values(stack: Stack, tree: Any) -> dict[str, Any]:
    if isinstance(tree, nnx.Module):
        return flat(nnx.state(tree, nnx.Param))
    if stack.framework == "equinox":
        return flat(eqx.filter(tree, eqx.is_inexact_array))
    return flat(tree)


@pytest.mark.parametrize(("stack", "selector"), _stack_cases(True, FAILS_TO_FIND))
def test_stacked_multipliers_are_the_unrolled_ones(stack, selector):
    """On every stacked leaf a float32 array of shape (4, 1, ..., 1) holding the
    multipliers of blocks 0 to 3 of the unrolled model; every other leaf the unrolled
    model's float."""
    stacked, unrolled = stack_trees(stack)
    stacked_options, unrolled_options = stack.options()
    blocks = stack.block_class if selector == "class" else None
    scales = flat(stack_policy(blocks).lr_scales(stacked, **stacked_options))
    unrolled_scales = flat(STACK_POLICY.lr_scales(unrolled, **unrolled_options))
    shapes = {p: np.shape(v) for p, v in param_values(stack, stacked).items()}
    inside = [p for p in scales if p.startswith(stack.root + "/")]
    assert len(inside) == 4, inside  # the layer norm's scale and bias, the linear's two
    for path, scale in scales.items():
        if path in inside:
            assert isinstance(scale, np.ndarray) and scale.dtype == np.float32, (path, scale)
            assert scale.shape == (LAYERS,) + (1,) * (len(shapes[path]) - 1), (path, scale.shape)
            expected = [unrolled_scales[stack.unrolled_path(path, i)] for i in range(LAYERS)]
            assert expected == list(PER_LAYER), expected
            np.testing.assert_array_equal(scale.ravel(), np.float32(expected), err_msg=path)
        else:
            assert type(scale) is float and scale == unrolled_scales[path], (path, scale)
    assert {scales[p] for p in scales if p not in inside} == {STACK_RATE ** (LAYERS + 1), 1.0}


def _stack_step(
    stack: Stack, tree: Any, options: dict[str, Any], grads: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """The parameters after one wrapped adamw step with ``grads`` (by path)."""
    if isinstance(tree, nnx.Module):
        # nnx.Optimizer hands tx an nnx.State: full= gives the multipliers of the module.
        tx = wrapped_adamw("nnx", STACK_POLICY, full=tree)
        optimizer = nnx.Optimizer(tree, tx, wrt=nnx.Param)
        optimizer.update(tree, rebuild(nnx.state(tree, nnx.Param), grads))
        return {p: np.asarray(v) for p, v in flat(nnx.state(tree, nnx.Param)).items()}
    params = eqx.filter(tree, eqx.is_inexact_array) if stack.framework == "equinox" else tree
    options = {k: v for k, v in options.items() if k != "framework"}
    tx = wrapped_adamw(stack.framework, STACK_POLICY, **options)
    updates, _ = tx.update(rebuild(params, grads), tx.init(params), params)
    return {p: np.asarray(v) for p, v in flat(optax.apply_updates(params, updates)).items()}


@pytest.mark.parametrize(("stack", "selector"), _stack_cases(False, FAILS_TO_FIND))
def test_a_wrapped_step_on_stacked_layers_is_the_unrolled_step(stack, selector):
    """One ``policy.wrap(optax.adamw(...))`` step with the same gradients: each layer of
    the stack ends where its unrolled block does, bit for bit, and every leaf moved.
    NNX steps through ``nnx.Optimizer`` with ``wrap(tx, full=model)``: the optimizer
    hands ``tx`` a State, where NNX's names do not show the stacking."""
    stacked, unrolled = stack_trees(stack)
    if isinstance(stacked, nnx.Module):
        stacked, unrolled = nnx.clone(stacked), nnx.clone(unrolled)
    stacked_options, unrolled_options = stack.options()
    values = param_values(stack, stacked)
    rng = np.random.default_rng(7)
    grads = {p: rng.uniform(-1, 1, np.shape(v)).astype(np.float32) for p, v in values.items()}
    after = _stack_step(stack, stacked, stacked_options, grads)
    unrolled_after = _stack_step(stack, unrolled, unrolled_options, _unrolled_values(stack, grads))
    expected = _unrolled_values(stack, after)
    assert set(expected) == set(unrolled_after)
    for path, value in unrolled_after.items():
        np.testing.assert_array_equal(value, expected[path], err_msg=path)
    moved = [p for p in values if not np.array_equal(after[p], np.asarray(values[p]))]
    assert len(moved) == len(values)


def test_a_stack_of_a_conv_and_a_norm_read_by_names_is_the_modules():
    """An NNX State of vmap-built blocks holding a conv and a layer norm: by names the
    conv's bias proves the stack and the norm agrees with it, so the State's ladder is
    the module's."""

    class Block(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.conv = nnx.Conv(W, W, (3,), rngs=rngs)
            self.norm = nnx.LayerNorm(W, rngs=rngs)

    class Model(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.embed = nnx.Embed(V, W, rngs=rngs)
            keys = jax.random.split(jax.random.key(1), LAYERS)
            self.blocks = nnx.vmap(lambda k: Block(nnx.Rngs(k)), in_axes=0, out_axes=0)(keys)
            self.head = nnx.Linear(W, V, rngs=rngs)

    model = Model(nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    batch_axes = {row.path: row.leaf.batch_axes for row in dm.Policy().explain(state)}
    assert batch_axes["blocks/conv/kernel"] == 1 and batch_axes["blocks/norm/scale"] == 1
    found = flat(dm.Policy(dm.layer_decay(STACK_RATE)).lr_scales(model))
    read = flat(dm.Policy(dm.layer_decay(STACK_RATE)).lr_scales(state))
    assert set(read) == set(found)
    for path, scale in found.items():
        np.testing.assert_array_equal(read[path], scale, err_msg=path)
    np.testing.assert_array_equal(found["blocks/norm/scale"].ravel(), np.float32(PER_LAYER))


def test_a_stack_partly_marked_is_an_error_with_the_fix():
    """Where only part of each layer is known to be stacked (a conv whose bias proves it,
    a norm beside it left unmarked), taking the conv alone for the stack would give
    every layer's norm the head's multiplier: the ladder refuses, with the fix."""
    leaves = [
        leaf("embed/embedding", "embedding", shape=(V, W)),
        leaf("blocks/conv/kernel", "conv", shape=(LAYERS, 3, W, W), batch_axes=1),
        leaf("blocks/conv/bias", "conv", role="bias", shape=(LAYERS, W), batch_axes=1),
        leaf("blocks/norm/scale", "layer_norm", shape=(LAYERS, W)),
        leaf("head/kernel", shape=(W, V)),
    ]
    partly = r"blocks/conv is stacked 4 times, but beside it in blocks .*blocks='blocks'\)"
    with pytest.raises(ValueError, match=partly):
        dm.Policy(dm.layer_decay(STACK_RATE)).decide(leaves)
    named = dm.Policy(dm.layer_decay(STACK_RATE, blocks="blocks")).decide(leaves)
    assert [d.layer_id for d in named] == [0, (1, 2, 3, 4), (1, 2, 3, 4), (1, 2, 3, 4), 5]


# 5. Finding the blocks, on Leaf records.


def leaf(path: str, layer: str = "linear", role: str | None = None, **fields: Any) -> dm.Leaf:
    roles = {"linear": "weight", "layer_norm": "scale", "embedding": "embedding", "conv": "weight"}
    shape = fields.pop("shape", (2, 2))
    return dm.Leaf(path, layer=layer, role=role or roles[layer], shape=shape, **fields)


INNER = ("attn/query/kernel", "mlp/fc/kernel")
"""What each block holds: modules inside it, so that it is a block, not a layer."""


def block_leaves(names: list[str]) -> list[dm.Leaf]:
    return [leaf(f"{name}/{rest}") for name in names for rest in INNER]


STEM = [leaf("embed/embedding", "embedding")]
TOP = [leaf("norm/scale", "layer_norm"), leaf("head/kernel")]


def ids(leaves: list[dm.Leaf], *rules: Any, **ladder: Any) -> dict[str, Any]:
    """Path -> layer id, decided by a policy of ``rules`` and ``layer_decay(0.5, **ladder)``."""
    policy = dm.Policy(*rules, dm.layer_decay(0.5, **ladder))
    return {d.leaf.path: d.layer_id for d in policy.decide(leaves)}


def _module(path: str) -> str:
    for inner in ("/attn/", "/mlp/"):
        if inner in path:
            return path.split(inner)[0]
    return path.rsplit("/", 1)[0]


def block_ids(leaves: list[dm.Leaf], **ladder: Any) -> dict[str, Any]:
    """The id of each block, and of the stem, the norm and the head, by module."""
    out: dict[str, Any] = {}
    for path, layer_id in ids(leaves, **ladder).items():
        module = _module(path)
        assert out.setdefault(module, layer_id) == layer_id, (path, out[module], layer_id)
    return out


@pytest.mark.parametrize(
    "names",
    [
        [f"blocks/{i}" for i in range(3)],
        [f"layers_{i}" for i in range(3)],
        [f"Block_{i}" for i in range(3)],
        [f"block_{i}" for i in range(3)],
        [f"encoder/layer/{i}" for i in range(3)],
        ["block", "block_1", "block_2"],
    ],
    ids=["blocks/3", "layers_3", "Block_3", "block_3", "encoder/layer/3", "haiku-block"],
)
def test_indexed_sibling_modules_are_the_blocks(names):
    expected = {"embed": 0, **{name: i + 1 for i, name in enumerate(names)}, "norm": 4, "head": 4}
    assert block_ids(STEM + block_leaves(names) + TOP) == expected


def test_haiku_names_in_any_order():
    """The unsuffixed first of Haiku's alike modules is block 1 wherever the tree puts
    it, found or selected by a glob."""
    leaves = STEM + block_leaves(["block_1", "block", "block_2"]) + TOP
    expected = {"embed": 0, "block": 1, "block_1": 2, "block_2": 3, "norm": 4, "head": 4}
    assert block_ids(leaves) == expected
    assert block_ids(leaves, blocks="block*") == expected


def test_indices_are_numbers():
    """``layers_10`` after ``layers_9``, found or selected, whatever order the tree has."""
    order = [0, 1, 10, 11, 2, 3, 4, 5, 6, 7, 8, 9]
    leaves = STEM + block_leaves([f"layers_{i}" for i in order]) + TOP
    expected = {"embed": 0, **{f"layers_{i}": i + 1 for i in range(12)}, "norm": 13, "head": 13}
    assert block_ids(leaves) == expected
    assert block_ids(leaves, blocks="layers_*") == expected


def test_an_mlps_layers_inside_each_block_are_not_a_stack():
    leaves = list(STEM)
    for i in range(2):
        leaves.append(leaf(f"blocks_{i}/ln/scale", "layer_norm"))
        leaves += [leaf(f"blocks_{i}/mlp/layers_{j}/kernel") for j in range(2)]
    found = ids(leaves + TOP)
    mlp = [found[f"blocks_{i}/mlp/layers_{j}/kernel"] for i in range(2) for j in range(2)]
    assert mlp == [1, 1, 2, 2]
    assert found["head/kernel"] == 3


def test_an_mlp_alone_is_no_stack():
    """Layers that own their arrays are not blocks: the error asks for them by name."""
    leaves = STEM + [leaf(f"mlp/layers_{i}/kernel") for i in range(3)] + TOP
    with pytest.raises(ValueError, match=r"found no repeated stack of blocks"):
        ids(leaves)


ENCODER_DECODER = (
    STEM
    + block_leaves([f"encoder/layers_{i}" for i in range(2)])
    + block_leaves([f"decoder/layers_{i}" for i in range(3)])
    + TOP
)


def test_two_stacks_are_an_error_naming_both():
    with pytest.raises(ValueError) as info:
        ids(ENCODER_DECODER)
    message = str(info.value)
    assert "encoder/layers_* (2 blocks); decoder/layers_* (3 blocks)" in message
    assert "blocks=('encoder/layers_*', 'decoder/layers_*')" in message


def test_a_tuple_of_stacks_chains_them_in_the_order_given():
    expected = {
        "embed": 0,
        **{f"encoder/layers_{i}": i + 1 for i in range(2)},
        **{f"decoder/layers_{i}": i + 3 for i in range(3)},
        "norm": 6,
        "head": 6,
    }
    assert block_ids(ENCODER_DECODER, blocks=("encoder/layers_*", "decoder/layers_*")) == expected
    reverse = block_ids(ENCODER_DECODER, blocks=("decoder/layers_*", "encoder/layers_*"))
    assert [reverse[f"decoder/layers_{i}"] for i in range(3)] == [1, 2, 3]
    assert [reverse[f"encoder/layers_{i}"] for i in range(2)] == [4, 5]


def stacked(path: str, layers: int, **fields: Any) -> dm.Leaf:
    return leaf(path, shape=(layers, 2, 2), batch_axes=1, **fields)


def test_stacked_stacks_of_two_lengths_are_two_candidates():
    """An encoder of 2 layers and a decoder of 3, each stacked, in one module holding
    nothing else: two stacks, not one whose arrays disagree on the number of layers."""
    parts = (("encoder", 2), ("decoder", 3))
    leaves = STEM + [stacked(f"core/{part}/{rest}", n) for part, n in parts for rest in INNER] + TOP
    both = r"core/encoder \(stacked 2 times\); core/decoder \(stacked 3 times\)"
    with pytest.raises(ValueError, match=both):
        ids(leaves)
    found = ids(leaves, blocks=("core/encoder", "core/decoder"))
    assert found["core/encoder/attn/query/kernel"] == (1, 2)
    assert found["core/decoder/mlp/fc/kernel"] == (3, 4, 5)
    assert found["head/kernel"] == 6


def test_a_stack_known_in_part_is_an_error():
    """The linear of each stacked block is marked stacked, the norm beside it is not
    but has the stack's length in front: taking the linear alone for the stack would
    give every layer's norm the head's id. Named, the stacked module is the stack."""
    leaves = STEM + [
        stacked("blocks/fc/kernel", 4),
        leaf("blocks/ln/scale", "layer_norm", shape=(4, 2)),
    ] + TOP
    partly = r"blocks/fc is stacked 4 times, but beside it in blocks .* blocks='blocks'\)"
    with pytest.raises(ValueError, match=partly):
        ids(leaves)
    named = ids(leaves, blocks="blocks")
    assert named["blocks/fc/kernel"] == named["blocks/ln/scale"] == (1, 2, 3, 4)
    assert named["head/kernel"] == 5


def test_a_stacked_layer_beside_other_layers_is_the_stack():
    """A stacked module next to arrays of other lengths (an input projection): the stack."""
    leaves = STEM + [leaf("mlp/in/kernel", shape=(2, 5)), stacked("mlp/layers/kernel", 4)] + TOP
    found = ids(leaves)
    assert found["mlp/layers/kernel"] == (1, 2, 3, 4)
    assert found["mlp/in/kernel"] == found["head/kernel"] == 5


class Block:
    """A block class, as an adapter names it."""


class Attention:
    """A module class inside each block."""


class Decoder:
    """A class no module of :data:`CLASSED` has."""


def classed(
    path: str, depths: tuple[int, ...], ancestors: tuple[str, ...], **fields: Any
) -> dm.Leaf:
    """A leaf whose enclosing modules are named classes at the given path depths."""
    chain = tuple(dm.Layer("unknown", name) for name in ancestors)
    return leaf(path, ancestors=chain, module_depths=depths, **fields)


CLASSED = (
    [classed("embed/embedding", (0, 1), ("Model",), layer="embedding")]
    + [
        classed(f"encoder/layer/{i}/attention/query/kernel", (0, 1, 3, 4, 5),
                ("Model", "Encoder", "Block", "Attention"))
        for i in range(3)
    ]
    + [classed("pooler/dense/kernel", (0, 1, 2), ("Model", "Pooler"))]
)


def test_a_class_selector_reads_module_depths():
    for cls in (Block, Attention):
        found = ids(CLASSED, blocks=cls)
        assert [found[f"encoder/layer/{i}/attention/query/kernel"] for i in range(3)] == [1, 2, 3]
        assert found["embed/embedding"] == 0 and found["pooler/dense/kernel"] == 4


def test_a_class_selector_without_module_depths_is_an_error():
    leaves = [leaf(f"blocks/{i}/fc/kernel") for i in range(2)]
    with pytest.raises(ValueError, match=r"blocks/0/fc/kernel has no module_depths"):
        ids(leaves, blocks=Block)


def test_a_glob_that_selects_nothing_is_an_error():
    leaves = STEM + block_leaves([f"blocks/{i}" for i in range(2)]) + TOP
    with pytest.raises(ValueError, match=r"blocks='decoder/\*' selects no module of this tree"):
        ids(leaves, blocks="decoder/*")


def test_a_class_that_selects_nothing_is_an_error():
    with pytest.raises(ValueError, match=r"blocks=Decoder selects no module of this tree"):
        ids(CLASSED, blocks=Decoder)


def test_frozen_leaves_keep_every_id():
    """Freezing the stem and the first block changes no id and no other multiplier."""
    leaves = STEM + block_leaves([f"blocks/{i}" for i in range(3)]) + TOP
    free = dm.Policy(dm.layer_decay(0.5)).decide(leaves)
    freeze = dm.freeze(path=("embed/*", "blocks/0/*"))
    frozen = dm.Policy(freeze, dm.layer_decay(0.5)).decide(leaves)
    assert [d.layer_id for d in frozen] == [d.layer_id for d in free] == [0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert [d.lr_scale for d in frozen] == [0.0, 0.0, 0.0] + [d.lr_scale for d in free[3:]]
    assert sum(d.frozen for d in frozen) == 3


@pytest.mark.parametrize(
    ("stem_leaf", "ladder"),
    [
        (leaf("cls_token", "unknown", role="token", shape=(1, 2)), {}),
        (leaf("pos_embed", "unknown", role="position", shape=(4, 2)), {}),
        (leaf("wte/embedding", "embedding"), {}),
        (leaf("patch_embed/proj/kernel", "conv", shape=(3, 3, 2, 2)), {}),
        (leaf("embeddings/patch_embeddings/projection/kernel", "conv", shape=(3, 3, 2, 2)), {}),
        (leaf("stem/conv/kernel", "conv", shape=(3, 3, 2, 2)), {}),
        (leaf("patchify/kernel", "conv", shape=(3, 3, 2, 2)), {"stem": "patchify"}),
    ],
    ids=["token", "position", "wte", "patch_embed", "embeddings", "stem", "stem="],
)
def test_the_stem_is_zero(stem_leaf, ladder):
    leaves = [stem_leaf] + block_leaves([f"blocks/{i}" for i in range(2)]) + TOP
    found = ids(leaves, **ladder)
    assert found[stem_leaf.path] == 0
    assert found["head/kernel"] == found["norm/scale"] == 3


def test_everything_else_is_above_the_blocks():
    """Modules outside the blocks and the stem (a patchify no stem= names, a pooler,
    the final norm, the head) get n + 1."""
    leaves = [leaf("patchify/kernel", "conv", shape=(3, 3, 2, 2)), leaf("pooler/kernel")]
    found = ids(leaves + block_leaves([f"blocks/{i}" for i in range(2)]) + TOP)
    above = ("patchify/kernel", "pooler/kernel", "norm/scale", "head/kernel")
    assert {found[p] for p in above} == {3}


def test_a_selected_module_inside_a_stacked_root_is_each_layer():
    """``hk.layer_stack`` of a block class: the class is one level inside the stacked
    root, and selecting it (or a glob inside the root) numbers every layer, as the
    root found alone does."""
    leaves = [
        classed("embed/embedding", (0, 1), ("Model",), layer="embedding"),
        *(
            classed(f"blocks/block/{rest}", (0, 2, 3), ("Model", "Block"),
                    shape=(4, 2, 2), batch_axes=1)
            for rest in INNER
        ),
        classed("head/kernel", (0, 1), ("Model",)),
    ]
    found = ids(leaves)
    assert found["blocks/block/attn/query/kernel"] == (1, 2, 3, 4)
    assert ids(leaves, blocks=Block) == found
    assert ids(leaves, blocks="blocks/block/*") == found
