"""Haiku layers stacked by a user-named ``hk.layer_stack``, read by names alone: what a
module's params prove, and the lifted module around them (``adapters/_stacks.py``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ._haiku_trace import is_array_like
from ._stacks import Proof, lifted_modules


# The rank a param has in one layer of a kind, where known by names; a norm's params
# have the input's rank with param_axis, a conv's bias with channels first.
_NORM_NDIM = {"scale": 1, "offset": 1}
ONE_LAYER_NDIM: dict[str, dict[str, int]] = {
    "linear": {"w": 2, "b": 1},
    "embedding": {"embeddings": 2},
    **{kind: _NORM_NDIM for kind in ("layer_norm", "rms_norm", "group_norm", "instance_norm")},
}
# The ranks that prove a stack: Haiku's Linear and Embed make them whatever their
# configuration.
_FIXED_NDIM: dict[str, dict[str, int]] = {
    "Linear": {"w": 2, "b": 1},
    "Embed": {"embeddings": 2},
}


def stacked_by_bias(linear: bool, direct: Mapping[str, Any]) -> int | None:
    """The stacked axes a ``w`` and a ``b`` of two or more axes prove: ``b``'s leading
    axes repeat ``w``'s, and ``b`` ends as ``w`` does (a stacked linear's ``w`` (4, 3, 5)
    and ``b`` (4, 5), a stacked conv's ``w`` (4, 2, 3, 5) and ``b`` (4, 5)). Not where
    ``b`` is ``w``'s last axes too (one layer from 3 inputs to (3, 5) outputs reads the
    same), nor for Haiku's modules other than Linear (a conv's bias may have the
    input's rank)."""
    if not linear:
        return None
    w, b = getattr(direct.get("w"), "shape", None), getattr(direct.get("b"), "shape", None)
    if w is None or b is None or len(b) < 2 or len(w) < len(b):
        return None
    extra = len(b) - 1
    stack = tuple(w[:extra]) == tuple(b[:extra]) and w[-1] == b[-1]
    general = tuple(w[-len(b):]) == tuple(b)
    return extra if stack and not general else None


def proof_of(linear: bool, module: Any, direct: Mapping[str, Any]) -> Proof | None:
    """(stacked axes, their sizes) that a module's params prove by names: a stacked
    linear's ``w`` and ``b``, or a Linear or Embed with more axes than one layer has."""
    arrays = {n: tuple(v.shape) for n, v in direct.items() if is_array_like(v)}
    stacked = None
    if module is None:
        return None
    if module.registration is None:
        stacked = stacked_by_bias(linear, direct)
    fixed = _FIXED_NDIM.get(module.layer.type_name or "", {}) if module.trusted else {}
    for name, shape in arrays.items():
        if name in fixed:
            extra = len(shape) - fixed[name]
            if extra < 1 or stacked not in (None, extra):
                return None
            stacked = extra
    if not stacked:
        return None
    w, b = arrays.get("w"), arrays.get("b")
    if w is not None and b is not None and (not b[stacked:] or w[-1] != b[-1]):
        return None  # one layer's b is w's output axis: stacked along another axis
    sizes = {shape[:stacked] for shape in arrays.values()}
    return (stacked, sizes.pop()) if len(sizes) == 1 else None


def lifted(modules: Any) -> dict[tuple[str, ...], Proof]:
    """The lifted modules of user-named stacks (``hk.layer_stack(n, name=...)``): see
    :func:`decaymask.adapters._stacks.lifted_modules`."""
    arrays = []
    for key, direct in modules.tree.items():
        own = modules.proof(key)
        for name, value in direct.items():
            if is_array_like(value):
                shape = tuple(value.shape)
                arrays.append((module_path(modules.paths[key]), shape,
                               modules.one_layer_ndim(key, name),
                               own and (own[0], shape[: own[0]])))
    return lifted_modules(arrays)


def module_path(segments: tuple[str, ...]) -> tuple[str, ...]:
    """A params key's module path without ``~``: a constructor's modules belong to the
    module that made them."""
    return tuple(s for s in segments if s != "~")
