"""verify: one probe of an optimizer against what a policy says it should do."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ._groups import check_transformation

if TYPE_CHECKING:
    from ._face import Policy

# Relative tolerance of the probe's comparisons: float32 rounding of a few products.
_TOLERANCE = 1e-3


@dataclasses.dataclass(frozen=True)
class Mismatch:
    """One leaf where the optimizer does not do what the policy says."""

    path: str
    """The leaf's canonical path, as ``policy.explain`` names it."""
    check: str
    """``"decay"``, ``"multiplier"``, ``"frozen update"`` or ``"frozen state"``."""
    expected: str
    got: str

    def __str__(self) -> str:
        return f"{self.path}: {self.check}: expected {self.expected}, got {self.got}"


class VerifyError(ValueError):
    """The optimizer does not do what the policy says; :attr:`mismatches` lists where."""

    def __init__(self, message: str, mismatches: Sequence[Mismatch] = ()):
        super().__init__(message)
        self.mismatches: tuple[Mismatch, ...] = tuple(mismatches)


_SHOWN = 12


def verify(
    policy: Policy, tx: Any, params: Any, *, framework: str | None = None, **options: Any
) -> None:
    """See :meth:`decaymask.Policy.verify`."""
    check_transformation(tx, "verify")
    import jax
    import jax.numpy as jnp
    import numpy as np

    report = policy.explain(params, framework=framework, **options)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    if len(leaves) != len(report):
        raise VerifyError(
            f"policy.verify: params hold {len(leaves)} arrays but the policy reads "
            f"{len(report)}; pass what tx.init is handed (e.g. eqx.filter(model, "
            f"eqx.is_array) or nnx.state(model, nnx.Param))."
        )

    def probe(fill: float) -> Any:
        grads = treedef.unflatten([jnp.full_like(x, fill) for x in leaves])
        state = tx.init(params)
        updates, _ = tx.update(grads, state, params)
        return state, updates

    try:
        state, zero = probe(0.0)
        _, one = probe(1.0)
    except Exception as err:  # the user's optimizer, built for another tree
        raise VerifyError(
            f"policy.verify: running tx on params raised {type(err).__name__}: "
            f"{_first_line(err)}. Does tx fit these params? Build its mask and labels "
            f"from the same params (mask=policy.mask, the function, builds them from "
            f"what optax is handed)."
        ) from err
    zero_leaves = _aligned(zero, treedef, "the zero-gradient update")
    one_leaves = _aligned(one, treedef, "the unit-gradient update")

    scales = []
    for row in report:
        scale = row.lr_scale
        if isinstance(scale, tuple):
            shape = (len(scale),) + (1,) * (len(row.shape) - 1)
            scales.append(np.asarray(scale, np.float32).reshape(shape))
        else:
            scales.append(np.float32(scale if row.trainable else 1.0))
    measured = jax.device_get(jax.jit(_measure)(leaves, zero_leaves, one_leaves, scales))

    mismatches: list[Mismatch] = []
    decays: list[tuple[int, float, float, float, float]] = []
    moves: list[tuple[int, float, float, float, float]] = []
    for i, row in enumerate(report):
        u0max, u1max, rmin, rmax, dmin, dmax, big, raw_rmin, raw_rmax, raw_dmin, raw_dmax = (
            float(v) for v in measured[i]
        )
        if not row.trainable:
            if row.frozen and (u0max or u1max):
                mismatches.append(Mismatch(
                    row.path, "frozen update", "no update",
                    f"an update of up to {max(u0max, u1max):.3g}",
                ))
            continue
        if row.decay:
            if big == 0:
                pass  # an all-zero leaf cannot show decay
            elif u0max == 0:
                mismatches.append(Mismatch(row.path, "decay", "decayed", "not decayed"))
            else:
                decays.append((i, rmin, rmax, raw_rmin, raw_rmax))
        elif u0max != 0:
            mismatches.append(Mismatch(
                row.path, "decay", "not decayed",
                f"moved by up to {u0max:.3g} with zero gradients (decayed)",
            ))
        if abs(dmax - dmin) <= _TOLERANCE * max(abs(dmax), abs(dmin)):
            moves.append((i, dmin, dmax, raw_dmin, raw_dmax))
    mismatches += _consistent(report, decays, "decay", "the weight decay")
    mismatches += _consistent(report, moves, "multiplier", "the update")
    mismatches += _state_of_frozen(report, params, state)
    if mismatches:
        lines = "\n".join(f"  {m}" for m in mismatches[:_SHOWN])
        more = f"\n  ... and {len(mismatches) - _SHOWN} more" if len(mismatches) > _SHOWN else ""
        raise VerifyError(
            f"policy.verify: tx does not do what the policy says at {len(mismatches)} "
            f"leaves:\n{lines}{more}\n{_hint(mismatches)}",
            mismatches,
        )


def _measure(params: list[Any], zero: list[Any], one: list[Any], scales: list[Any]) -> list[Any]:
    """Per leaf: the largest update of each probe, the range of the zero-gradient
    update over ``-p * multiplier``, the range of the unit gradient's effect over the
    multiplier, and the largest ``|p|``."""
    import jax.numpy as jnp

    out = []
    for p, u0, u1, s in zip(params, zero, one, scales):
        p32 = p.astype(jnp.float32)
        u0 = u0.astype(jnp.float32)
        raw_d = u1.astype(jnp.float32) - u0
        d = raw_d / s
        nonzero = p32 != 0
        raw = -u0 / jnp.where(nonzero, p32, 1.0)
        ratio = raw / s
        out.append(jnp.stack([
            jnp.max(jnp.abs(u0), initial=0.0),
            jnp.max(jnp.abs(u1), initial=0.0),
            jnp.min(jnp.where(nonzero, ratio, jnp.inf), initial=jnp.inf),
            jnp.max(jnp.where(nonzero, ratio, -jnp.inf), initial=-jnp.inf),
            jnp.min(d, initial=jnp.inf),
            jnp.max(d, initial=-jnp.inf),
            jnp.max(jnp.abs(p32), initial=0.0),
            jnp.min(jnp.where(nonzero, raw, jnp.inf), initial=jnp.inf),
            jnp.max(jnp.where(nonzero, raw, -jnp.inf), initial=-jnp.inf),
            jnp.min(raw_d, initial=jnp.inf),
            jnp.max(raw_d, initial=-jnp.inf),
        ]))
    return out


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    line = text[0] if text else ""
    return line if len(line) <= 300 else line[:300] + "..."


def _aligned(tree: Any, treedef: Any, what: str) -> list[Any]:
    import jax

    leaves, other = jax.tree_util.tree_flatten(tree)
    if other != treedef:
        try:
            leaves = treedef.flatten_up_to(tree)
        except (ValueError, TypeError) as err:
            raise VerifyError(
                f"policy.verify: {what} does not have the structure of params ({err})."
            ) from err
    return leaves


def _near(x: float, y: float) -> bool:
    return abs(x - y) <= _TOLERANCE * max(abs(x), abs(y), 1e-30)


def _consistent(
    report: Any, found: list[tuple[int, float, float, float, float]], check: str, what: str
) -> list[Mismatch]:
    """Leaves whose value per unit of multiplier is not the common one.

    ``found`` holds (leaf index, min, max, raw min, raw max): the range of a value that
    should be one constant for every leaf once divided by its multiplier, and the same
    range undivided. Where the undivided values are all alike, the optimizer applies
    no multiplier at all; otherwise the common value is the one most leaves share
    (ties go to leaves of multiplier 1).
    """
    out: list[Mismatch] = []
    if not found:
        return out
    raws = [(lo, hi) for _, _, _, lo, hi in found]
    if all(_near(lo, raws[0][0]) and _near(hi, raws[0][0]) for lo, hi in raws):
        for i, *_ in found:
            row = report[i]
            if not _all_one(row.lr_scale):
                out.append(Mismatch(
                    row.path, check, f"{what} times {_show_scale(row.lr_scale)}",
                    f"{what} times 1 (as every leaf: no multiplier applied)",
                ))
        return out
    values = [(lo + hi) / 2 for _, lo, hi, _, _ in found]
    ones = [_all_one(report[i].lr_scale) for i, *_ in found]

    def support(v: float) -> tuple[int, int]:
        agree = [k for k, w in enumerate(values) if _near(v, w)]
        return len(agree), sum(ones[k] for k in agree)

    best = max(values, key=support)
    for i, lo, hi, _, _ in found:
        if _near(lo, best) and _near(hi, best):
            continue
        row = report[i]
        if best == 0:
            got = "no effect"
        elif _near(lo, hi):
            got = _show_scale(_times(row.lr_scale, lo / best))
        else:
            got = (
                f"{_show_scale(_times(row.lr_scale, lo / best))} to "
                f"{_show_scale(_times(row.lr_scale, hi / best))}"
            )
        out.append(Mismatch(row.path, check, f"{what} times {_show_scale(row.lr_scale)}", f"{what} times {got}"))
    return out


def _all_one(scale: Any) -> bool:
    return all(s == 1.0 for s in scale) if isinstance(scale, tuple) else scale == 1.0


def _times(scale: Any, factor: float) -> Any:
    if isinstance(scale, tuple):
        return tuple(s * factor for s in scale)
    return scale * factor


def _show_scale(scale: Any) -> str:
    if isinstance(scale, tuple):
        return "[" + ", ".join(f"{s:.4g}" for s in scale) + "]"
    return f"{scale:.4g}"


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
                    out[name] = Mismatch(name, "frozen state", "no optimizer state", f"an array of shape {hit[0]} at {where} in the state")
    return list(out.values())


def _hint(mismatches: list[Mismatch]) -> str:
    checks = {m.check for m in mismatches}
    hints = []
    if "frozen update" in checks or "frozen state" in checks or "multiplier" in checks:
        hints.append("wrap the optimizer: tx = policy.wrap(optax.adamw(..., mask=policy.mask))")
    if "decay" in checks:
        hints.append("give the optimizer this policy's mask: optax.adamw(..., mask=policy.mask)")
    return "Fix: " + "; ".join(hints) + "."
