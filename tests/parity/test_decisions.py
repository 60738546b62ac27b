"""One policy decides the same in Equinox, Flax Linen and Flax NNX, layer by layer.

The spec of :mod:`.models` is built in all three frameworks; every policy of a table is
explained on each build, and the decisions are compared per (module path, role): the
set of decisions on the parameters that module holds in that role. Linen and NNX are
read both ways decaymask can read them: by names alone (Linen params, an NNX State) and
with the exact classes (Linen ``module=`` and ``args=``, an NNX module). Every mask then
goes through a real zero-gradient ``optax.adamw`` step, and what the step decayed is
compared the same way.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import decaymask as dm

from .models import (
    BLOCKS,
    KINDS,
    LAYER_PATHS,
    equinox_model,
    example_inputs,
    linen_model,
    linen_variables,
    module_path,
    nnx_model,
)

SEED = dm.Policy(dm.decay(layer="linear"), dm.decay(layer="layer_norm", param="bias"))

POLICIES: dict[str, dm.Policy] = {
    "seed": SEED,
    "standard": dm.presets.standard(),
    "everything_but_bias_and_norm": dm.presets.everything_but_bias_and_norm(),
    "gpt": dm.presets.gpt(),
    "attention_only": dm.Policy(dm.decay(within="attention")),
    # Paths hold each framework's own names: Linen names list items `blocks_0`.
    "path": dm.Policy(dm.decay(path=("blocks/*", "blocks_*")), dm.no_decay(param="bias")),
    "min_ndim_2": dm.Policy(dm.decay(min_ndim=2)),
    "min_ndim_3": dm.Policy(dm.decay(min_ndim=3)),
    "recurrent": dm.Policy(dm.decay(layer="recurrent", param="weight")),
}

KNOWN_DIFFERENCES: dict[str, str] = {}
"""Policies the frameworks still decide differently, with why; empty since every
adapter counts a layer's logical rank."""

WEIGHT_DECAY = 0.25
"""Of the zero-gradient steps: a power of two, so a decayed update ``-0.25 * p`` is exact."""

FRAMEWORKS = ("equinox", "linen", "nnx")
MODES = ("names", "classes")
"""How Linen and NNX are read: names alone (Linen params, an NNX State) or with the
exact classes (Linen params with module= and args=, an NNX module)."""


def _cases(names: Iterable[str]) -> list[Any]:
    cases = []
    for name in names:
        for mode in MODES:
            marks = []
            if name in KNOWN_DIFFERENCES:
                marks.append(
                    pytest.mark.xfail(
                        strict=True, raises=AssertionError, reason=KNOWN_DIFFERENCES[name]
                    )
                )
            cases.append(pytest.param(name, mode, marks=marks, id=f"{name}-{mode}"))
    return cases


# The three builds, made once: nothing here changes them.


@functools.cache
def _builds() -> tuple[Any, Any, Any]:
    return equinox_model(), linen_variables(), nnx_model()


def explain(policy: dm.Policy, framework: str, mode: str) -> dm.Report:
    """``policy.explain`` on one build, read as ``mode`` says."""
    eqx_model, variables, nnx_model_ = _builds()
    if framework == "equinox":
        return policy.explain(eqx_model)
    if framework == "linen":
        if mode == "classes":
            return policy.explain(variables["params"], module=linen_model(), args=example_inputs())
        return policy.explain(variables["params"])
    if mode == "classes":
        return policy.explain(nnx_model_)
    return policy.explain(nnx.state(nnx_model_, nnx.Param))


# Tables: per (module path, role), the set of values of the parameters there.

Table = dict[tuple[str, str], frozenset]


def table(report: dm.Report, value: Callable[[dm.Decision], Any]) -> Table:
    """``value`` of every parameter row, collected per (spec module path, role).

    State (batch norm statistics) is left out: it is never a parameter.
    """
    found: dict[tuple[str, str], set] = {}
    for row in report:
        if row.leaf.is_param:
            found.setdefault((module_path(row.path), row.role), set()).add(value(row))
    return {key: frozenset(values) for key, values in found.items()}


def _cell(values: frozenset | None) -> str:
    if values is None:
        return "-"
    if all(type(v) is bool for v in values):
        return {frozenset({True}): "yes", frozenset({False}): "no"}.get(values, "mixed")
    return ",".join(str(v) for v in sorted(values))


def differing_rows(tables: Mapping[str, Table]) -> list[list[str]]:
    """(module path, role, one cell per framework) wherever the frameworks differ."""
    rows = []
    for key in sorted(set().union(*tables.values())):
        cells = [_cell(t.get(key)) for t in tables.values()]
        if len(set(cells)) > 1:
            rows.append([*key, *cells])
    return rows


def format_rows(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(line[i]) for line in [header, *rows]) for i in range(len(header))]
    lines = [header, ["-" * len(h) for h in header], *rows]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def assert_parity(tables: Mapping[str, Table], what: str) -> None:
    rows = differing_rows(tables)
    if rows:
        raise AssertionError(
            f"{what} differ across frameworks:\n"
            + format_rows(["module path", "role", *tables], rows)
        )


def _decay(row: dm.Decision) -> bool:
    return row.decay


# The spec and its normalisation.


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_every_parameter_belongs_to_one_layer_of_the_spec(framework, mode):
    report = explain(SEED, framework, mode)
    owners = {module_path(row.path) for row in report if row.leaf.is_param}
    assert owners == set(LAYER_PATHS), (
        f"spec layers without parameters: {sorted(set(LAYER_PATHS) - owners)}; "
        f"parameters mapped to no layer: {sorted(owners - set(LAYER_PATHS))}"
    )


def test_module_path_normalises_each_frameworks_names():
    assert module_path("blocks/1/attn/output_proj/weight") == "blocks/1/attn/out"
    assert module_path("blocks_1/attn/out/kernel") == "blocks/1/attn/out"
    assert module_path("blocks_0/mlp/layers_1/bias") == "blocks/0/mlp/layers/1"
    assert module_path("gru/hn/kernel") == "gru"
    assert module_path("lstm/if_/kernel") == "lstm"
    assert module_path("conv_transpose/bias") == "conv_transpose"
    with pytest.raises(KeyError, match="in no spec module"):
        module_path("decoder/kernel")


@pytest.mark.parametrize("mode", MODES)
def test_kinds_agree(mode):
    """What each array is, before any policy: the kind of its owner per (module, role),
    beside the kind the spec says that layer is."""
    tables = {f: table(explain(SEED, f, mode), lambda row: row.layer) for f in FRAMEWORKS}
    keys = set().union(*tables.values())
    spec = {key: frozenset({KINDS[key[0]]}) for key in keys}
    assert_parity({"spec": spec, **tables}, "kinds")


@pytest.mark.parametrize("mode", MODES)
def test_the_same_arrays_exist(mode):
    """Elements per (module, role): the builds hold the same parameters, except NNX's
    GRU cell, which has no bias on the hidden side of its candidate gate."""
    sizes = {}
    for framework in FRAMEWORKS:
        total: dict[tuple[str, str], int] = {}
        for row in explain(SEED, framework, mode):
            if row.leaf.is_param:
                key = (module_path(row.path), row.role)
                total[key] = total.get(key, 0) + row.leaf.size
        sizes[framework] = {key: frozenset({n}) for key, n in total.items()}
    rows = differing_rows(sizes)
    assert rows == [["gru", "bias", "24", "24", "18"]], format_rows(
        ["module path", "role", *FRAMEWORKS], rows
    )


@pytest.mark.parametrize("mode", MODES)
def test_batch_norm_statistics_are_state_everywhere(mode):
    """Given everything (Linen variables, every NNX variable), the running statistics
    are the only state, and even a policy that decays everything leaves them alone."""
    everything = dm.Policy(dm.decay())
    eqx_model, variables, nnx_model_ = _builds()
    if mode == "classes":
        linen = everything.explain(variables, module=linen_model(), args=example_inputs())
        nnx_ = everything.explain(nnx_model_, wrt=nnx.Variable)
    else:
        linen = everything.explain(variables)
        nnx_ = everything.explain(nnx.state(nnx_model_))
    reports = {"equinox": everything.explain(eqx_model), "linen": linen, "nnx": nnx_}
    for framework, report in reports.items():
        state = [row for row in report if not row.leaf.is_param]
        assert {module_path(row.path.removeprefix("batch_stats/")) for row in state} == {
            "batch_norm"
        }, framework
        assert not any(row.decay for row in state), framework
        assert all(row.decay for row in report if row.leaf.is_param), framework


@pytest.mark.parametrize("mode", MODES)
def test_logical_ranks_agree(mode):
    """``Leaf.ndim``, the rank ``min_ndim`` reads, is one layer's logical rank everywhere."""
    reports = {f: explain(SEED, f, mode) for f in FRAMEWORKS}
    assert_parity({f: table(r, lambda row: row.leaf.ndim) for f, r in reports.items()}, "ranks")


# Decisions.


@pytest.mark.parametrize(("policy_name", "mode"), _cases(POLICIES))
def test_decisions_agree(policy_name, mode):
    policy = POLICIES[policy_name]
    tables = {f: table(explain(policy, f, mode), _decay) for f in FRAMEWORKS}
    assert_parity(tables, f"decisions of {policy!r} ({mode})")


# Through optax: a zero-gradient adamw step decays exactly the masked parameters.


def _key(entry: Any) -> str:
    for attribute in ("name", "key", "idx"):
        if hasattr(entry, attribute):
            return str(getattr(entry, attribute))
    return str(entry)


def _flat(tree: Any) -> dict[str, Any]:
    """Leaves by canonical path: keys joined with ``/``."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {"/".join(_key(k) for k in path): leaf for path, leaf in flat}


def _zero_grad_steps(params: Any, masks: list[Any]) -> list[dict[str, bool]]:
    """For each mask, which leaves one zero-gradient ``optax.adamw`` step decayed.

    All the steps run in one compiled function. With zero gradients and learning rate
    1, a decayed leaf's update is exactly ``-weight_decay * p`` and any other's is zero;
    anything else fails.
    """

    def steps(params: Any) -> list[Any]:
        out = []
        for mask in masks:
            tx = optax.adamw(1.0, weight_decay=WEIGHT_DECAY, mask=mask)
            grads = jax.tree.map(jnp.zeros_like, params)
            updates, _ = tx.update(grads, tx.init(params), params)
            out.append(updates)
        return out

    values = {path: np.asarray(p) for path, p in _flat(params).items()}
    moved = []
    for updates in jax.jit(steps)(params):
        decayed = {}
        for path, update in _flat(updates).items():
            update, value = np.asarray(update), values[path]
            if np.array_equal(update, -(WEIGHT_DECAY * value)):
                decayed[path] = True
            elif not update.any():
                decayed[path] = False
            else:
                raise AssertionError(f"{path}: a zero-gradient step gave {update}")
        moved.append(decayed)
    return moved


@functools.cache
def _decayed_by_optax(framework: str, mode: str) -> dict[str, dict[str, bool]]:
    """Policy name -> canonical path -> decayed by a zero-gradient step with its mask.

    Masks are handed to optax as their entry points are meant to be used: Equinox and
    names-only Flax as the callable method (optax calls it on the params and on the
    updates), class-aware Flax as the mask tree.
    """
    eqx_model, variables, nnx_model_ = _builds()
    policies = list(POLICIES.values())
    if framework == "equinox":
        params = eqx.filter(eqx_model, eqx.is_inexact_array)
        masks = [policy.for_equinox for policy in policies]
    elif framework == "linen":
        params = variables["params"]
        if mode == "classes":
            model, args = linen_model(), example_inputs()
            masks = [policy.for_flax(params, module=model, args=args) for policy in policies]
        else:
            masks = [policy.for_flax for policy in policies]
    else:
        params = nnx.as_pure(nnx.state(nnx_model_, nnx.Param))
        if mode == "classes":
            masks = [policy.for_flax(nnx_model_) for policy in policies]
        else:
            masks = [policy.for_flax for policy in policies]
    return dict(zip(POLICIES, _zero_grad_steps(params, masks)))


@pytest.mark.parametrize("mode", MODES)
def test_adamw_decays_what_explain_says(mode):
    """In each framework, the mask optax applied is the one ``explain`` describes."""
    wrong = []
    for framework in FRAMEWORKS:
        moved = _decayed_by_optax(framework, mode)
        for name, policy in POLICIES.items():
            for row in explain(policy, framework, mode):
                if row.leaf.is_param and moved[name][row.path] != row.decay:
                    wrong.append(f"{framework} {name}: {row.path} explain={row.decay}")
    assert not wrong, "adamw and explain disagree:\n" + "\n".join(wrong)


@pytest.mark.parametrize(("policy_name", "mode"), _cases(POLICIES))
def test_adamw_steps_agree(policy_name, mode):
    tables = {}
    for framework in FRAMEWORKS:
        moved = _decayed_by_optax(framework, mode)[policy_name]
        report = explain(POLICIES[policy_name], framework, mode)
        tables[framework] = table(report, lambda row, moved=moved: moved[row.path])
    assert_parity(tables, f"zero-gradient adamw steps with {policy_name} masks ({mode})")


# Framework vocabulary: name= and path= mean what each framework calls things.

NAME_POLICY = dm.Policy(dm.decay(name=("weight", "kernel")))


@pytest.mark.parametrize("mode", MODES)
def test_name_selector_is_framework_vocabulary(mode):
    """``name="weight"`` is also an Equinox norm's scale and embedding's table, and
    Flax's recurrent gates say ``kernel`` where Equinox says ``weight_ih``: the
    decisions differ there, and the report marks every row the name rule decided."""
    reports = {f: explain(NAME_POLICY, f, mode) for f in FRAMEWORKS}
    rows = differing_rows({f: table(r, _decay) for f, r in reports.items()})
    norms = ["layer_norm", "rms_norm", "group_norm", "batch_norm"]
    norms += [f"blocks/{i}/{ln}" for i in range(BLOCKS) for ln in ("ln1", "ln2")]
    expected = [[norm, "scale", "yes", "no", "no"] for norm in norms]
    expected.append(["embed", "embedding", "yes", "no", "no"])
    expected += [[cell, "weight", "no", "yes", "yes"] for cell in ("gru", "lstm")]
    assert rows == sorted(expected), format_rows(["module path", "role", *FRAMEWORKS], rows)
    for framework, report in reports.items():
        lines = str(report).splitlines()[2:-1]
        for row, line in zip(report, lines, strict=True):
            marked = "[name= is framework vocabulary]" in line
            assert marked == (row.rule is not None), f"{framework}: {line}"
        assert any(row.rule is not None for row in report), framework


def test_path_on_internal_names_is_framework_vocabulary():
    """A glob on Equinox's own submodule names selects nothing in Flax, and says so."""
    policy = dm.Policy(dm.decay(path="*/query_proj/*"))
    eqx_model, variables, nnx_model_ = _builds()
    decayed = {module_path(row.path) for row in policy.explain(eqx_model) if row.decay}
    assert decayed == {"blocks/0/attn/query", "blocks/1/attn/query"}
    unmatched = re.escape("rule 1 decay(path='*/query_proj/*') matched no parameter")
    for tree in (variables["params"], nnx_model_):
        with pytest.warns(dm.PolicyWarning, match=unmatched):
            mask = policy.for_flax(tree)
        assert not any(jax.tree.leaves(mask))
