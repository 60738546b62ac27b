"""The probe of :func:`decaymask.Policy.verify`: ``tx.update`` run three times from one
``tx.init``, and what each run did to each leaf, measured."""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

# Relative tolerance of the probe's comparisons: float32 rounding of a few products.
# Params of a coarser dtype get a few of its epsilons (bfloat16: 3%).
_TOLERANCE = 1e-3


_EPSILONS = 4


def _untraceable() -> tuple[type[BaseException], ...]:
    import jax

    return (
        jax.errors.ConcretizationTypeError,
        jax.errors.TracerArrayConversionError,
        jax.errors.TracerIntegerConversionError,
    )


@dataclasses.dataclass(frozen=True)
class Mismatch:
    """One leaf where the optimizer does not do what the policy says."""

    path: str
    """The leaf's canonical path, as ``policy.explain`` names it."""
    check: str
    """``"decay"``, ``"multiplier"``, ``"frozen update"`` or ``"frozen state"``."""
    expected: str
    """What the policy says, e.g. ``"decayed"`` or ``"the update times 0.5"``."""
    got: str
    """What the probe found, e.g. ``"not decayed (no move with zero gradients)"``."""

    def __str__(self) -> str:
        return f"{self.path}: {self.check}: expected {self.expected}, got {self.got}"


class VerifyError(ValueError):
    """The optimizer does not do what the policy says; :attr:`mismatches` lists where."""

    def __init__(self, message: str, mismatches: Sequence[Mismatch] = ()):
        super().__init__(message)
        self.mismatches: tuple[Mismatch, ...] = tuple(mismatches)
        """Every mismatch, in the params' order (the message shows the first few);
        empty where ``tx`` could not be probed at all."""


# What the measurement gives for each leaf, one value per layer, in this order.
_STATS = (
    "u0",  # max |update| with zero gradients
    "u1",  # max |update| with gradients of ones
    "u2",  # max |update| with the signs at 2p
    "p",  # max |p|
    "rmin",  # min of -u0 / p over p != 0 (and u0 a normal number): the decay per unit of p
    "rmax",
    "dmin",  # min of d = u1 - u0: what the gradient of ones does
    "dmax",
    "qmin",  # min of (u2 - 2 u0) / (s d) over |s| = 1 and d != 0: 1 for element-wise
    "qmax",
    "qstray",  # max |u2 - 2 u0| over |s| = 1 and d = 0: 0 for element-wise
    "finite",  # 1 where every probe is finite
)


_AT = {name: i for i, name in enumerate(_STATS)}


@dataclasses.dataclass
class _Leaf:
    """One leaf's decision and measurements."""

    row: Any
    stats: Any  # float64 array (len(_STATS), layers)

    def __getattr__(self, name: str) -> Any:
        if name not in _AT:
            raise AttributeError(name)
        return self.stats[_AT[name]]

    def most(self, *names: str) -> float:
        return max(float(getattr(self, name).max()) for name in names)


def _run(
    tx: Any, params: Any, leaves: list[Any], report: Any
) -> tuple[Any, list[list[Any]], list[Any]]:
    """``tx.init(params)``, and the updates of the three probes from that state (three
    lists of leaves in the params' order); and the signs of the third probe."""
    import jax

    # As nnx.Optimizer does: tx.init sees the State of Variables, tx.update bare arrays.
    treedef = jax.tree_util.tree_structure(_pure(params))

    def tree(values: list[Any]) -> Any:
        return jax.tree_util.tree_unflatten(treedef, values)

    zero, one, signs, doubled = _probes(leaves, [row.trainable for row in report])
    try:
        state = tx.init(params)
        pure_state = _pure(state)
        step = _stepper(tx, tree(zero), pure_state, tree(leaves))
        updates = [
            _aligned(step(tree(grads), pure_state, tree(at)), treedef, report)
            for grads, at in ((zero, leaves), (one, leaves), (signs, doubled))
        ]
    except VerifyError:
        raise
    except Exception as err:  # the user's optimizer, or a tree built for other params
        raise _failed(err) from err
    return state, updates, signs


def _stepper(tx: Any, grads: Any, state: Any, params: Any) -> Any:
    """``tx.update``'s updates as the probes run it: compiled once for the three where
    it holds loops (run op by op, Muon compiles its Newton-Schulz iterations again at
    every call), op by op otherwise (each op compiles once per shape, and a model
    repeats a few shapes: faster than compiling the whole step)."""
    import jax

    def update(grads: Any, state: Any, params: Any) -> Any:
        return tx.update(grads, state, params)[0]

    try:
        traced = jax.jit(update).trace(grads, state, params)
    except _untraceable():
        return update  # a step that reads the values it is handed
    return traced.lower().compile() if _has_loops(traced.jaxpr.jaxpr) else update


def _has_loops(jaxpr: Any) -> bool:
    from jax.extend.core import subjaxprs

    return any(eqn.primitive.name in ("while", "scan") for eqn in jaxpr.eqns) or any(
        _has_loops(sub) for sub in subjaxprs(jaxpr)
    )


def _pure(tree: Any) -> Any:
    """``tree`` without NNX's Variable boxes, as ``nnx.Optimizer`` hands it to
    ``tx.update``; any other tree as it is."""
    if "flax.nnx" not in sys.modules:
        return tree
    from flax import nnx

    return nnx.as_pure(tree)


def _layers(row: Any) -> int:
    """How many layers a leaf is stacked along: its multipliers' count, else 1."""
    return len(row.lr_scale) if isinstance(row.lr_scale, tuple) else 1


def _probes(leaves: list[Any], trained: list[bool]) -> tuple[list[Any], ...]:
    """Zero gradients, gradients of ones, signs (see :func:`_sign_arrays`), and the
    params doubled.

    Made op by op: jax compiles each op once per shape, and the optimizer's own ops
    meet the same shapes, where a function compiled over every leaf would take
    seconds on a model of a few hundred leaves."""
    import jax
    import jax.numpy as jnp

    inexact = [jnp.issubdtype(x.dtype, jnp.inexact) for x in leaves]
    shapes = [tuple(x.shape) if wanted else None for x, wanted in zip(leaves, inexact)]
    zero, one, signs, doubled = [], [], [], []
    for x, wanted, s in zip(leaves, inexact, _sign_arrays(shapes, trained)):
        if wanted:
            zero.append(jnp.zeros_like(x))
            one.append(jnp.ones_like(x))
            signs.append(jnp.asarray(s, x.dtype))
            doubled.append(x * 2)
            continue
        # Integers, bools, keys: not trained; the gradient jax gives them is zero.
        z = x if jnp.issubdtype(x.dtype, jax.dtypes.extended) else jnp.zeros_like(x)
        zero.append(z)
        one.append(z)
        signs.append(z)
        doubled.append(x)
    return zero, one, signs, doubled


def _sign_arrays(shapes: list[tuple[int, ...] | None], trained: list[bool]) -> list[Any]:
    """The third probe's gradient of each leaf of ``shapes`` (``None`` where none).

    ``+-1`` from a hash of each element's index, with a 2x2 minor of full rank over the
    first two and over the last two axes: an orthogonalising optimizer (Muon) turns a
    rank-one gradient into a multiple of itself, as an element-wise one does, and the
    minor tells them apart on the smallest matrices too. A matrix with an axis of size 1
    is a vector, which Muon turns into a multiple of itself over its norm: one of its
    elements (one per layer, axis 0, of a stack) is 2, to change that norm. As many
    elements of other leaves are 0 as keep the gradient's global norm that of the
    ones, so that a global clip scales both alike. Both only in ``trained`` leaves:
    ``policy.wrap`` hides the others from a clip inside it.
    """
    import numpy as np

    out: list[Any] = []
    extra = 0  # the squared norm the 2s add
    for seed, (shape, adjust) in enumerate(zip(shapes, trained)):
        if shape is None:
            out.append(None)
            continue
        s = _signs(shape, seed)
        if adjust and len(shape) >= 2 and 1 in shape and s.size >= 2:
            flat = s.reshape(-1)
            slices = shape[0] if len(shape) >= 3 else 1
            ends = np.arange(1, slices + 1) * (s.size // slices) - 1
            flat[ends] *= 2
            extra += 3 * len(ends)
        out.append(s)
    donors = sorted(
        (
            i for i, s in enumerate(out)
            if s is not None and trained[i] and not np.any(np.abs(s) == 2)
        ),
        key=lambda i: -out[i].size,
    )
    for i in donors:
        if not extra:
            break
        take = min(extra, out[i].size // 2)  # the last elements, far from the minors
        if take:
            out[i].reshape(-1)[out[i].size - take :] = 0
            extra -= take
    return out


def _signs(shape: tuple[int, ...], seed: int) -> Any:
    """``+-1`` of ``shape`` from a hash of each element's index and ``seed``, with the
    2x2 minors of :func:`_sign_arrays`."""
    import numpy as np

    h = np.arange(math.prod(shape), dtype=np.uint32) + np.uint32((seed * 0x9E3779B9) % 2**32)
    with np.errstate(over="ignore"):
        for shift, factor in ((16, 0x7FEB352D), (15, 0x846CA68B)):  # an integer hash
            h = (h ^ (h >> np.uint32(shift))) * np.uint32(factor)
    h ^= h >> np.uint32(16)
    s = np.where(h >> np.uint32(31) == 0, 1.0, -1.0).astype(np.float32).reshape(shape)
    if len(shape) >= 2:
        for first in sorted({0, len(shape) - 2}):
            if shape[first] >= 2 and shape[first + 1] >= 2:
                at: list[Any] = [0] * len(shape)
                at[first] = at[first + 1] = slice(0, 2)
                s[tuple(at)] = [[1.0, 1.0], [1.0, -1.0]]
    return s


def _measure(p: Any, u0: Any, u1: Any, u2: Any, s: Any, layers: int) -> Any:
    """The statistics named in ``_STATS`` of one leaf, one column per layer, read on
    the host (nothing to compile)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    if not jnp.issubdtype(p.dtype, jnp.inexact):
        return np.zeros((len(_STATS), layers))
    # Below the smallest normal number an update keeps few digits (float16: 6e-5).
    tiny = float(jnp.finfo(u0.dtype).tiny) if jnp.issubdtype(u0.dtype, jnp.inexact) else 0.0

    def rows(x: Any) -> Any:
        return np.asarray(jax.device_get(x)).astype(np.float64).reshape(layers, -1)

    p, u0, u1, u2, s = rows(p), rows(u0), rows(u1), rows(u2), rows(s)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        d = u1 - u0
        nonzero = (p != 0) & (np.abs(u0) >= tiny)
        ratio = -u0 / np.where(nonzero, p, 1.0)
        unit = np.abs(s) == 1
        gradient = u2 - 2 * u0
        seen = unit & (d != 0)
        q = gradient / np.where(seen, s * d, 1.0)
        finite = np.isfinite(u0) & np.isfinite(u1) & np.isfinite(u2)

        def biggest(x: Any, where: Any = True) -> Any:
            return np.max(np.abs(x), axis=1, initial=0.0, where=where)

        return np.stack([
            biggest(u0),
            biggest(u1),
            biggest(u2),
            biggest(p),
            np.min(ratio, axis=1, initial=np.inf, where=nonzero),
            np.max(ratio, axis=1, initial=-np.inf, where=nonzero),
            np.min(d, axis=1, initial=np.inf),
            np.max(d, axis=1, initial=-np.inf),
            np.min(q, axis=1, initial=np.inf, where=seen),
            np.max(q, axis=1, initial=-np.inf, where=seen),
            biggest(gradient, unit & (d == 0)),
            np.all(finite, axis=1).astype(np.float64),
        ])


def _tolerance(leaves: list[Any]) -> float:
    """The relative tolerance of the comparisons, from the coarsest float dtype."""
    import jax.numpy as jnp

    epsilons = [
        float(jnp.finfo(x.dtype).eps) for x in leaves if jnp.issubdtype(x.dtype, jnp.inexact)
    ]
    return max([_TOLERANCE] + [_EPSILONS * eps for eps in epsilons])


def _aligned(tree: Any, treedef: Any, report: Any) -> list[Any]:
    """The leaves of an update, in the params' order, each of its param's shape."""
    import jax

    leaves, other = jax.tree_util.tree_flatten(tree)
    if other != treedef:
        try:
            leaves = treedef.flatten_up_to(tree)
        except (ValueError, TypeError) as err:
            raise VerifyError(
                f"policy.verify: tx.update returned updates of another structure than the "
                f"params it was handed: a {type(tree).__name__} of {len(leaves)} leaves, "
                f"for {_container(treedef, len(report))}. An optax transformation returns "
                f"its updates in the params' structure."
            ) from err
    for row, update in zip(report, leaves):
        shape = tuple(getattr(update, "shape", ()))
        if shape != tuple(row.shape):
            raise VerifyError(
                f"policy.verify: tx.update returned an update of shape {shape} for "
                f"{row.path}, of shape {tuple(row.shape)}. An optax transformation returns "
                f"one update of each param's shape."
            )
    return leaves


def _container(treedef: Any, count: int) -> str:
    data = treedef.node_data()
    return f"params of type {data[0].__name__} ({count} leaves)" if data else "one array"


def _lines(err: BaseException, most: int = 12) -> str:
    """``err``'s message, its lines indented, at most ``most`` of them."""
    lines = [line.rstrip() for line in str(err).strip().splitlines()][:most]
    lines = [line if len(line) <= 300 else line[:300] + "..." for line in lines]
    return "\n    ".join(lines) if lines else "(no message)"


def _failed(err: BaseException) -> VerifyError:
    """The error of a ``tx`` that cannot run on the params."""
    head = f"policy.verify: tx cannot be run on params: {type(err).__name__}: {_lines(err)}"
    if _raised_here(err):
        return VerifyError(head)  # decaymask's own errors name their fix
    return VerifyError(
        f"{head}\nIs tx built for these params? A mask, labels or Muon dimension numbers "
        f"made from other params do not fit them: pass the policy's methods themselves "
        f"(mask=policy.mask, muon_weight_dimension_numbers=policy.muon_dims), which "
        f"build them from what optax hands them."
    )


def _raised_here(err: BaseException) -> bool:
    """Whether ``err`` was raised by decaymask's own code."""
    tb = err.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(here + os.sep)
