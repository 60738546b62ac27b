"""decaymask's decisions on a zoo model, side by side with the reference."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import warnings
from typing import Any

import jax

import decaymask as dm

from . import reference as ref
from .models import Built, build

PRESETS = {
    "standard": dm.presets.standard,
    "everything_but_bias_and_norm": dm.presets.everything_but_bias_and_norm,
    "gpt": dm.presets.gpt,
    "muon": dm.presets.muon,
}


def modes(built: Built) -> list[str]:
    """Linen: names only, and traced with the module; Equinox: the model itself."""
    return ["names", "traced"] if built.framework == "linen" else ["equinox"]


def call(policy: dm.Policy, built: Built, mode: str, what: str) -> Any:
    """``policy.for_<framework>`` (``what="mask"``), ``<what>_for_<framework>`` or
    ``explain`` on the model in this mode."""
    suffix = "equinox" if mode == "equinox" else "flax"
    if what == "explain":
        fn = policy.explain
    elif what == "mask":
        fn = getattr(policy, f"for_{suffix}")
    else:
        fn = getattr(policy, f"{what}_for_{suffix}")
    if mode in ("equinox", "names"):
        return fn(built.tree)
    return fn(built.tree, module=built.module, args=built.args, kwargs=built.kwargs)


@contextlib.contextmanager
def policy_warnings_ignored():
    """Masks are compared whatever decaymask warns; the warning tests count warnings."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dm.PolicyWarning)
        yield


@functools.cache
def cached(name: str, mode: str, preset: str, what: str) -> Any:
    """``call`` with a fresh preset, PolicyWarnings ignored, computed once per run: the
    traced mode traces ``module.init`` at every call, and several tests read one result."""
    with policy_warnings_ignored():
        return call(PRESETS[preset](), build(name), mode, what)


def flat_values(tree: Any, is_leaf=None) -> dict[str, Any]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return {ref.path_text(p): v for p, v in flat}


@dataclasses.dataclass(frozen=True)
class Difference:
    path: str
    label: ref.Label
    expected: Any
    got: Any
    row: Any  # decaymask's explain row, or None

    def __str__(self) -> str:
        lab = self.label
        said = "-"
        if self.row is not None:
            r = self.row
            said = (
                f"layer={r.layer} class={r.layer_type} role={r.role} decay={r.decay} "
                f"by {r.decided_by}"
            )
        return (
            f"  {self.path}: reference {lab.kind}/{lab.role} -> {self.expected}; "
            f"decaymask -> {self.got}; explain: {said}"
        )


def _rows(name: str, mode: str, preset: str) -> dict[str, Any]:
    try:
        return {row.path: row for row in cached(name, mode, preset, "explain")}
    except Exception:  # the failure shows what the mask said even when explain cannot run
        return {}


def mask_differences(name: str, mode: str, preset: str) -> list[Difference]:
    """Every leaf where the preset's mask differs from the reference-derived mask."""
    built = build(name)
    expected = ref.expected_mask(name, built.tree, preset)
    labels = ref.labels(name, built.tree)
    got = flat_values(cached(name, mode, preset, "mask"))
    wrong = [p for p in expected if not _same_bool(got.get(p, "missing"), expected[p])]
    extra = [p for p in got if p not in expected]
    if not wrong and not extra:
        return []
    rows = _rows(name, mode, preset)
    out = [Difference(p, labels[p], expected[p], got.get(p, "missing"), rows.get(p)) for p in wrong]
    out += [Difference(p, ref.Label("-", "-"), "no leaf", got[p], rows.get(p)) for p in extra]
    return out


def _same_bool(got: Any, expected: bool) -> bool:
    return type(got) is bool and got == expected


def _axes(value: Any, ndim: int) -> tuple[int, ...]:
    axes = (value,) if isinstance(value, int) else tuple(value)
    return tuple(sorted(a % ndim for a in axes))


def muon_dims_differences(name: str, mode: str) -> list[Difference]:
    """Leaves whose Muon dimension numbers are not the reference's layout.

    Raises whatever ``muon_dims_for_*`` raises (a ValueError is allowed by the contract).
    """
    from optax.contrib import MuonDimensionNumbers

    built = build(name)
    leaves = ref.array_leaves(built.tree)
    labels = ref.labels(name, built.tree)
    dims = flat_values(
        cached(name, mode, "muon", "muon_dims"),
        is_leaf=lambda x: x is None or isinstance(x, MuonDimensionNumbers),
    )
    out = []
    for path, x in leaves.items():
        lab = labels[path]
        ndim = len(x.shape)
        selected = bool(ref.is_float(x) and ref.oracle_muon(lab))
        want = ref.muon_axes(lab.layout, ndim) if selected and lab.layout else None
        got = dims.get(path)
        if got is not None:
            got = (_axes(got.reduction_axis, ndim), _axes(got.output_axis, ndim))
        if selected and lab.layout is None:
            raise AssertionError(f"reference for {name}: weight {path} has no layout")
        if got != want:
            out.append(Difference(path, lab, _dims_text(want), _dims_text(got), None))
    if out:
        rows = _rows(name, mode, "muon")
        out = [dataclasses.replace(d, row=rows.get(d.path)) for d in out]
    return out


def _dims_text(dims: Any) -> str:
    if dims is None:
        return "not Muon"
    return f"{dims[0]}->{dims[1]}"


def report(name: str, mode: str, what: str, diffs: list[Difference]) -> str:
    return f"{name} ({mode}), {what}: {len(diffs)} leaves differ from the reference:\n" + (
        "\n".join(str(d) for d in diffs)
    )
