"""verify: one probe of an optimizer against what a policy says it should do.

The probe runs ``tx.update`` three times from ``tx.init(params)``:

- zero gradients at ``p``: an optimizer moves a leaf only by its weight decay, so the
  update is ``-c * f * p`` where the policy decays the leaf (``c`` common to every
  leaf, ``f`` its multiplier times its decay rate) and zero elsewhere;
- gradients of ones at ``p``: minus the first, what the gradient alone does. An
  element-wise optimizer treats every element alike: one value per leaf (per layer for a
  stacked leaf), the same for every leaf once divided by its multiplier;
- random signs ``s`` at ``2 * p``: an element-wise optimizer odd in the gradient (sgd,
  adam, lion...) whose step does not depend on the params' scale gives ``s`` times the
  second probe's gradient part plus twice the first probe's decay. Where it does not
  (Muon orthogonalises the matrix, LAMB and Adafactor scale by the params' norm), the
  leaf's multiplier cannot be read from the probe and is left unchecked.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ._groups import check_transformation

if TYPE_CHECKING:
    from ._face import Policy

# Relative tolerance of the probe's comparisons: float32 rounding of a few products.
_TOLERANCE = 1e-3
# Mismatches shown in the message; ``VerifyError.mismatches`` holds them all.
_SHOWN = 12
# Order of the checks within one leaf in the message.
_CHECKS = ("frozen update", "frozen state", "decay", "multiplier")


@dataclasses.dataclass(frozen=True)
class Mismatch:
    """One leaf where the optimizer does not do what the policy says."""

    path: str
    """The leaf's canonical path, as ``policy.explain`` names it."""
    check: str
    """``"decay"``, ``"multiplier"``, ``"frozen update"`` or ``"frozen state"``."""
    expected: str
    """What the policy says, e.g. ``"decayed"``, ``"the update times 0.5"``."""
    got: str
    """What the probe found, e.g. ``"not decayed"``, ``"the update times 1"``."""

    def __str__(self) -> str:
        return f"{self.path}: {self.check}: expected {self.expected}, got {self.got}"


class VerifyError(ValueError):
    """The optimizer does not do what the policy says; :attr:`mismatches` lists where."""

    def __init__(self, message: str, mismatches: Sequence[Mismatch] = ()):
        super().__init__(message)
        self.mismatches: tuple[Mismatch, ...] = tuple(mismatches)
        """Every mismatch, in the params' order (the message shows the first few)."""


# Per-layer statistics the jitted measurement returns for each leaf, in this order.
_STATS = (
    "u0",  # max |update| with zero gradients
    "u1",  # max |update| with gradients of ones
    "u2",  # max |update| with signs at 2p
    "p",  # max |p|
    "rmin",  # min of -u0 / p over nonzero p (the decay per unit of p)
    "rmax",
    "dmin",  # min of u1 - u0 (the gradient's effect)
    "dmax",
    "odd",  # max |u2 - 2 u0 - s (u1 - u0)|: zero for an element-wise optimizer
    "finite",  # 1 where every probe is finite
)
_AT = {name: i for i, name in enumerate(_STATS)}


@dataclasses.dataclass
class _Leaf:
    """One leaf's measurements, one value per layer (one layer unless stacked)."""

    row: Any
    stats: Any  # float64 numpy array (len(_STATS), layers)

    def __getattr__(self, name: str) -> Any:
        if name not in _AT:
            raise AttributeError(name)
        return self.stats[_AT[name]]


def verify(
    policy: Policy, tx: Any, params: Any, *, framework: str | None = None, **options: Any
) -> None:
    """See :meth:`decaymask.Policy.verify`."""
    check_transformation(tx, "verify")
    import jax
    import numpy as np

    report = policy.explain(params, framework=framework, **options)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    if len(leaves) != len(report):
        raise VerifyError(
            f"policy.verify: params hold {len(leaves)} leaves but {len(report)} arrays; "
            f"pass what tx.init is handed (e.g. eqx.filter(model, eqx.is_array) or "
            f"nnx.state(model, nnx.Param))."
        )
    # NNX: tx.init sees the State of Variables, tx.update the bare arrays, as
    # nnx.Optimizer hands them (nnx.as_pure).
    pure = _pure(params)
    pure_def = jax.tree_util.tree_structure(pure)
    layers = tuple(_layers(row) for row in report)
    zero, one, signs, doubled = jax.jit(_probes)(leaves)

    def run(grads: list[Any], at: list[Any]) -> list[Any]:
        updates, _ = tx.update(pure_def.unflatten(grads), _pure(state), pure_def.unflatten(at))
        return _aligned(updates, pure_def, len(leaves))

    try:
        state = tx.init(params)
        u0 = run(zero, leaves)
        u1 = run(one, leaves)
        u2 = run(signs, doubled)
    except VerifyError:
        raise
    except Exception as err:  # the user's optimizer, or a tree built for other params
        raise _failed(err) from err
    measured = jax.device_get(jax.jit(_measure, static_argnums=5)(leaves, u0, u1, u2, signs, layers))
    found = [_Leaf(row, np.asarray(m, np.float64)) for row, m in zip(report, measured)]

    trained = [leaf for leaf in found if leaf.row.trainable]
    if trained and not any(
        np.any(leaf.u0 > 0) or np.any(leaf.u1 > 0) or np.any(leaf.u2 > 0) for leaf in trained
    ):
        raise VerifyError(
            "policy.verify: tx updated no leaf at all, with zero gradients, gradients of "
            "ones nor random signs, so there is nothing to compare: its learning rate is 0 "
            "at the first step (a warmup from 0?) or it accumulates gradients before its "
            "first update (optax.MultiSteps). Verify the same optimizer with a constant "
            "learning rate, or the transformation inside optax.MultiSteps."
        )

    mismatches: list[Mismatch] = []
    decays: list[tuple[_Leaf, Any]] = []  # leaf, expected decay factor per layer
    moves: list[tuple[_Leaf, Any]] = []  # leaf, expected multiplier per layer
    for leaf in found:
        row = leaf.row
        if row.frozen:
            moved = max(float(np.max(leaf.u0)), float(np.max(leaf.u1)), float(np.max(leaf.u2)))
            if moved > 0 or not np.all(leaf.finite):
                mismatches.append(Mismatch(
                    row.path, "frozen update", "no update", f"an update of up to {moved:.3g}"
                ))
            continue
        if not row.trainable or not np.all(leaf.finite):
            continue  # not a parameter the optimizer trains, or nothing to read
        scale = _per_layer(row.lr_scale, leaf)
        wise = _element_wise(leaf)
        if row.decay:
            if not np.any(leaf.p > 0):
                pass  # an all-zero leaf cannot show decay
            elif not np.any(leaf.u0 > 0):
                mismatches.append(Mismatch(
                    row.path, "decay", "decayed", "not decayed (no move with zero gradients)"
                ))
            elif wise or _near(float(np.min(leaf.rmin)), float(np.max(leaf.rmax))):
                decays.append((leaf, scale * row.rate))
            # else: the decay went through a step that is not element-wise.
        elif np.any(leaf.u0 > 0):
            mismatches.append(Mismatch(
                row.path, "decay", "not decayed",
                f"decayed (moved by up to {float(np.max(leaf.u0)):.3g} with zero gradients)",
            ))
        if wise:
            moves.append((leaf, scale))
    mismatches += _compare(decays, "decay", "the weight decay", "rmin", "rmax")
    mismatches += _compare(moves, "multiplier", "the update", "dmin", "dmax")
    mismatches += _state_of_frozen(report, params, state)
    if mismatches:
        order = {row.path: i for i, row in enumerate(report)}
        mismatches.sort(key=lambda m: (order[m.path], _CHECKS.index(m.check)))
        raise VerifyError(_message(mismatches), mismatches)


def _pure(tree: Any) -> Any:
    """``tree`` without NNX's Variable boxes (as ``nnx.Optimizer`` hands it to
    ``tx.update``); any other tree as it is."""
    nnx_loaded = "flax.nnx" in sys.modules
    if not nnx_loaded:
        return tree
    from flax import nnx

    return nnx.as_pure(tree)


def _layers(row: Any) -> int:
    """The number of layers a leaf is stacked along: its multipliers' count, else 1."""
    return len(row.lr_scale) if isinstance(row.lr_scale, tuple) else 1


def _per_layer(scale: Any, leaf: _Leaf) -> Any:
    import numpy as np

    return np.broadcast_to(np.asarray(scale, np.float64), leaf.u0.shape)


def _probes(leaves: list[Any]) -> tuple[list[Any], ...]:
    """Zero gradients, gradients of ones, random signs, and the params doubled.

    The signs are ``+-1`` drawn with a fixed key, with a 2x2 minor of full rank forced
    over the first two and the last two axes: an orthogonalising optimizer (Muon) turns
    a rank-one gradient into a multiple of itself, as an element-wise one does, and a
    full-rank minor tells them apart on the smallest matrices too."""
    import jax
    import jax.numpy as jnp

    zero, one, signs, doubled = [], [], [], []
    key = jax.random.key(0)
    for i, x in enumerate(leaves):
        if not jnp.issubdtype(x.dtype, jnp.inexact):
            # Integers, bools, keys: not trained; the gradient jax gives them is zero.
            keep = x if jnp.issubdtype(x.dtype, jax.dtypes.extended) else jnp.zeros_like(x)
            for probe in (zero, one, signs):
                probe.append(keep)
            doubled.append(x)
            continue
        s = jax.random.rademacher(jax.random.fold_in(key, i), x.shape, x.dtype)
        if x.ndim >= 2:
            minor = jnp.asarray([[1, 1], [1, -1]], x.dtype)
            for first in (0, x.ndim - 2):
                if x.shape[first] >= 2 and x.shape[first + 1] >= 2:
                    at = [0] * x.ndim
                    at[first] = at[first + 1] = slice(0, 2)
                    s = s.at[tuple(at)].set(minor)
        zero.append(jnp.zeros_like(x))
        one.append(jnp.ones_like(x))
        signs.append(s)
        doubled.append(x * 2)
    return zero, one, signs, doubled


def _measure(
    params: list[Any], zero: list[Any], one: list[Any], two: list[Any], signs: list[Any],
    layers: tuple[int, ...],
) -> list[Any]:
    """Per leaf and layer, the statistics named in ``_STATS``."""
    import jax.numpy as jnp

    out = []
    for p, u0, u1, u2, s, n in zip(params, zero, one, two, signs, layers):
        if not jnp.issubdtype(p.dtype, jnp.inexact):
            out.append(jnp.zeros((len(_STATS), n), jnp.float32))
            continue

        def rows(x: Any) -> Any:
            return jnp.reshape(jnp.asarray(x, jnp.float32), (n, -1))

        p, u0, u1, u2, s = rows(p), rows(u0), rows(u1), rows(u2), rows(s)
        d = u1 - u0
        nonzero = p != 0
        ratio = -u0 / jnp.where(nonzero, p, 1.0)
        finite = jnp.isfinite(u0) & jnp.isfinite(u1) & jnp.isfinite(u2)

        def biggest(x: Any) -> Any:
            return jnp.max(jnp.abs(x), axis=1, initial=0.0)

        out.append(jnp.stack([
            biggest(u0),
            biggest(u1),
            biggest(u2),
            biggest(p),
            jnp.min(jnp.where(nonzero, ratio, jnp.inf), axis=1, initial=jnp.inf),
            jnp.max(jnp.where(nonzero, ratio, -jnp.inf), axis=1, initial=-jnp.inf),
            jnp.min(d, axis=1, initial=jnp.inf),
            jnp.max(d, axis=1, initial=-jnp.inf),
            biggest(u2 - 2 * u0 - s * d),
            jnp.all(finite, axis=1).astype(jnp.float32),
        ]))
    return out


def _element_wise(leaf: _Leaf) -> bool:
    """Whether the probes show an element-wise step: every element of a layer moved
    alike under gradients of ones, and the signs moved the elements by as much, each
    its way, whatever the params' scale."""
    import numpy as np

    size = max(float(np.max(leaf.u0)) * 2, float(np.max(leaf.u1)), float(np.max(leaf.u2)))
    if float(np.max(leaf.odd)) > _TOLERANCE * size:
        return False
    return all(_near(lo, hi) for lo, hi in zip(leaf.dmin, leaf.dmax))


def _near(x: float, y: float) -> bool:
    return abs(x - y) <= _TOLERANCE * max(abs(x), abs(y), 1e-30)


def _compare(
    found: list[tuple[_Leaf, Any]], check: str, what: str, lo_name: str, hi_name: str
) -> list[Mismatch]:
    """Leaves whose value per unit of factor is not the common one.

    Each leaf's value (the decay per unit of p, or the gradient's effect) divided by the
    factor the policy gives it should be one constant ``c`` for every leaf and layer.
    Where the undivided values are all alike while the factors differ, the optimizer
    applies no factor at all. Otherwise ``c`` is the value most layers share (ties go to
    factor 1), and each leaf that differs is reported with the factor it got, its
    value over ``c``. Where every factor is the same, it is indistinguishable from the
    learning rate or the weight decay itself: nothing is reported.
    """
    import numpy as np

    if not found:
        return []
    units = []  # (leaf number, layer, raw low, raw high, factor)
    for k, (leaf, factor) in enumerate(found):
        lows, highs = getattr(leaf, lo_name), getattr(leaf, hi_name)
        for j in range(len(lows)):
            units.append((k, j, float(lows[j]), float(highs[j]), float(factor[j])))
    factors = [u[4] for u in units]
    if all(_near(f, factors[0]) for f in factors):
        return []
    raw = units[0][2]
    if all(_near(lo, raw) and _near(hi, raw) for _, _, lo, hi, _ in units):
        out = []
        for leaf, factor in found:
            if not np.all(factor == 1.0):
                out.append(Mismatch(
                    leaf.row.path, check, f"{what} times {_show(_factor(leaf.row, check))}",
                    f"{what} times 1 (no multiplier applied)",
                ))
        return out
    values = [(lo + hi) / 2 / f if f else math.inf for _, _, lo, hi, f in units]
    ones = [f == 1.0 for *_, f in units]

    def support(v: float) -> tuple[int, int]:
        agree = [i for i, w in enumerate(values) if _near(v, w)]
        return len(agree), sum(ones[i] for i in agree)

    common = max(values, key=support)
    wrong: dict[int, list[int]] = {}
    for (k, j, lo, hi, f) in units:
        if not (_near(lo, common * f) and _near(hi, common * f)):
            wrong.setdefault(k, []).append(j)
    out = []
    for k in sorted(wrong):
        leaf, factor = found[k]
        lows, highs = getattr(leaf, lo_name), getattr(leaf, hi_name)
        if common == 0:
            got = f"{what} where no other leaf moves"
        else:
            got = f"{what} times " + _show_got(lows / common, highs / common)
        out.append(Mismatch(
            leaf.row.path, check, f"{what} times {_show(_factor(leaf.row, check))}", got
        ))
    return out


def _factor(row: Any, check: str) -> Any:
    """What the policy multiplies the update (or the decay) of ``row`` by."""
    if check == "multiplier" or row.rate == 1.0:
        return row.lr_scale
    if isinstance(row.lr_scale, tuple):
        return tuple(s * row.rate for s in row.lr_scale)
    return row.lr_scale * row.rate


def _show(factor: Any) -> str:
    if isinstance(factor, tuple):
        return "[" + ", ".join(_number(s) for s in factor) + "]"
    return _number(factor)


def _show_got(lows: Any, highs: Any) -> str:
    parts = [
        _number(lo) if _near(lo, hi) else f"{_number(lo)} to {_number(hi)}"
        for lo, hi in zip(lows, highs)
    ]
    return parts[0] if len(parts) == 1 else "[" + ", ".join(parts) + "]"


def _number(x: float) -> str:
    return f"{float(x):.4g}"


def _aligned(tree: Any, treedef: Any, count: int) -> list[Any]:
    """The leaves of an update, in the params' order."""
    import jax

    leaves, other = jax.tree_util.tree_flatten(tree)
    if other != treedef:
        try:
            leaves = treedef.flatten_up_to(tree)
        except (ValueError, TypeError) as err:
            raise VerifyError(
                f"policy.verify: tx.update returned updates of another structure than "
                f"the params it was handed: {_lines(err)}"
            ) from err
    if len(leaves) != count:
        raise VerifyError(
            f"policy.verify: tx.update returned {len(leaves)} updates for {count} params."
        )
    return leaves


def _lines(err: BaseException, most: int = 12) -> str:
    lines = [line.rstrip() for line in str(err).strip().splitlines()]
    lines = [line if len(line) <= 300 else line[:300] + "..." for line in lines[:most]]
    return "\n    ".join(lines) if lines else type(err).__name__


def _failed(err: BaseException) -> VerifyError:
    """The error of a ``tx`` that cannot run on the params."""
    head = f"policy.verify: tx cannot be run on params: {type(err).__name__}: {_lines(err)}"
    if _raised_by_decaymask(err):
        # decaymask's own errors (a mask called on the wrong thing) carry their fix.
        return VerifyError(head)
    return VerifyError(
        f"{head}\nIs tx built for these params? A mask, labels or Muon dimension numbers "
        f"made from other params do not fit them: pass the policy's functions "
        f"(mask=policy.mask, muon_weight_dimension_numbers=policy.muon_dims), which "
        f"build them from what optax is handed."
    )


def _raised_by_decaymask(err: BaseException) -> bool:
    import os

    tb = err.__traceback__
    last = None
    while tb is not None:
        last = tb
        tb = tb.tb_next
    if last is None:
        return False
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.abspath(last.tb_frame.f_code.co_filename).startswith(here + os.sep)


def _state_of_frozen(report: Any, params: Any, state: Any) -> list[Mismatch]:
    """Frozen leaves under whose path the optimizer's state keeps an array of their shape."""
    import jax

    frozen: dict[tuple[Any, ...], tuple[tuple[int, ...], str]] = {}
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    for (path, leaf), row in zip(flat, report):
        if row.frozen:
            frozen[tuple(path)] = (tuple(getattr(leaf, "shape", ())), row.path)
    if not frozen:
        return []
    lengths = sorted({len(p) for p in frozen})
    out: dict[str, Mismatch] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        path = tuple(path)
        for n in lengths:
            if n > len(path):
                break
            hit = frozen.get(path[len(path) - n :])
            if hit is not None and tuple(getattr(leaf, "shape", ())) == hit[0]:
                name = hit[1]
                if name not in out:
                    where = jax.tree_util.keystr(path[: len(path) - n]) or "the root"
                    out[name] = Mismatch(
                        name, "frozen state", "no optimizer state",
                        f"an array of shape {hit[0]} kept at {where} in the state",
                    )
    return list(out.values())


def _message(mismatches: list[Mismatch]) -> str:
    count = len({m.path for m in mismatches})
    lines = "\n".join(f"  {m}" for m in mismatches[:_SHOWN])
    more = f"\n  ... and {len(mismatches) - _SHOWN} more" if len(mismatches) > _SHOWN else ""
    leaves = "1 leaf" if count == 1 else f"{count} leaves"
    return (
        f"policy.verify: tx does not do what the policy says at {leaves}:\n"
        f"{lines}{more}\n{_hint(mismatches)}"
    )


def _hint(mismatches: list[Mismatch]) -> str:
    """The fix, from what went wrong."""
    none_applied = any(m.got.endswith("(no multiplier applied)") for m in mismatches)
    frozen = any(m.check.startswith("frozen") for m in mismatches)
    masked = any(m.check == "decay" and m.expected in ("decayed", "not decayed") for m in mismatches)
    wrong = any(
        m.check in ("decay", "multiplier") and m.expected not in ("decayed", "not decayed")
        and not m.got.endswith("(no multiplier applied)")
        for m in mismatches
    )
    hints = []
    if none_applied or frozen:
        hints.append(
            "wrap the optimizer, tx = policy.wrap(optax.adamw(..., mask=policy.mask)): it "
            "multiplies each update by its multiplier and gives frozen leaves no update "
            "and no state."
        )
    if masked:
        hints.append(
            "give the optimizer this policy's mask, optax.adamw(..., mask=policy.mask) "
            "(or optax.add_decayed_weights(..., mask=policy.mask))."
        )
    if wrong:
        hints.append(
            "apply the multipliers once, with policy.wrap around an optimizer that scales "
            "no leaf itself (one optax.adamw, not an optax.partition of scaled copies)."
        )
    return "Fix: " + " Then ".join(hints)
