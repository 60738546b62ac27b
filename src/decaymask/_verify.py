"""verify: one probe of an optimizer against what a policy says it should do.

The probe calls ``tx.init(params)`` once and ``tx.update`` three times from that state:

- zero gradients at ``p``: an optimizer moves a leaf only by its weight decay, so the
  update is ``-c * f * p`` where the policy decays the leaf (``c`` common to every
  leaf, ``f`` its multiplier times its decay rate) and zero elsewhere;
- gradients of ones at ``p``: minus the first, what a gradient does. An element-wise
  optimizer moves every element of a layer alike, by a value that is the same for
  every leaf once divided by its multiplier;
- signs ``s`` at ``2 * p`` (of the ones' global norm; a few elements are 2 or 0): an
  element-wise optimizer whose step does not depend on the params' scale (sgd, adam,
  lion, with or without a global clip) moves each element of magnitude 1 by ``s``
  times what the ones moved it, plus twice the first probe's decay. Where a leaf does
  not (Muon orthogonalises its matrices and normalises its vectors, LAMB and Adafactor
  scale by the params' norm), its multiplier cannot be read from the probe and is
  left unchecked.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from ._groups import check_transformation, check_whole
from ._probe import Mismatch, VerifyError, _layers, _Leaf, _measure, _run, _tolerance

if TYPE_CHECKING:
    from ._face import Policy


# Mismatches shown in the message; ``VerifyError.mismatches`` holds them all.
_SHOWN = 12
# The order of one leaf's checks in the message.
_CHECKS = ("frozen update", "frozen state", "decay", "multiplier")
_DECAYED = ("decayed", "not decayed")
_UNAPPLIED = "(no multiplier applied)"
_STILL = "no update from its gradient"


def verify(
    policy: Policy,
    tx: Any,
    params: Any,
    *,
    full: Any = None,
    framework: str | None = None,
    **options: Any,
) -> None:
    """See :meth:`decaymask.Policy.verify`."""
    check_transformation(tx, "verify")
    import jax
    import numpy as np

    if full is None:
        refused = check_whole(policy, params, framework, options, "verify")
        if refused is not None:
            raise VerifyError(refused)
        report = policy.explain(params, framework=framework, **options)
    else:
        report = _part_of(policy, params, full, framework, options)
    leaves = jax.tree_util.tree_leaves(params)
    if len(leaves) != len(report):
        raise VerifyError(
            f"policy.verify: params hold {len(leaves)} leaves, of which {len(report)} "
            f"are arrays; pass what tx.init is handed, the arrays alone (e.g. "
            f"eqx.filter(model, eqx.is_array), or nnx.state(model, nnx.Param))."
        )
    state, updates, signs = _run(tx, params, leaves, report)
    found = [
        _Leaf(row, _measure(p, u0, u1, u2, s, _layers(row)))
        for row, p, u0, u1, u2, s in zip(report, leaves, *updates, signs)
    ]
    broken = [leaf.row.path for leaf in found if leaf.row.trainable and not np.all(leaf.finite)]
    if broken:
        shown = ", ".join(broken[:3]) + (f" and {len(broken) - 3} more" if len(broken) > 3 else "")
        raise VerifyError(
            f"policy.verify: tx's updates are not finite at {shown}, so there is "
            f"nothing to compare. With zero gradients, an optimizer dividing by a second "
            f"moment divides 0 by its eps, and 1e-8 is 0 in float16: pass a larger eps, "
            f"or verify the optimizer on float32 params."
        )
    trained = [leaf for leaf in found if leaf.row.trainable]
    if trained and not any(leaf.most("u0", "u1", "u2") > 0 for leaf in trained):
        raise VerifyError(
            "policy.verify: tx moved no leaf, with zero gradients, gradients of ones or "
            "random signs, so there is nothing to compare: its learning rate is 0 at the "
            "first step (a warmup from 0?), or it accumulates gradients before its first "
            "update (optax.MultiSteps). Verify the same optimizer with a constant "
            "learning rate, or the transformation inside optax.MultiSteps."
        )
    mismatches = [
        Mismatch(
            leaf.row.path, "frozen update", "no update",
            f"an update of up to {leaf.most('u0', 'u1', 'u2'):.3g}",
        )
        for leaf in found
        if leaf.row.frozen and (leaf.most("u0", "u1", "u2") > 0 or not np.all(leaf.finite))
    ]
    mismatches += _decay_and_multipliers(trained, _tolerance(leaves))
    mismatches += _state_of_frozen(report, params, state)
    if mismatches:
        order = {row.path: i for i, row in enumerate(report)}
        mismatches.sort(key=lambda m: (order[m.path], _CHECKS.index(m.check)))
        rated = {row.path for row in report if row.decay and row.rate != 1.0}
        raise VerifyError(_message(mismatches, rated), mismatches)


def _decay_and_multipliers(trained: list[_Leaf], tol: float) -> list[Mismatch]:
    """The decay and multiplier checks of the trained leaves, to a relative tolerance
    ``tol``."""
    import numpy as np

    mismatches: list[Mismatch] = []
    wise = _element_wise(trained, tol)
    decays: list[tuple[_Leaf, Any]] = []  # with the decay factor per layer
    moves: list[tuple[_Leaf, Any]] = []  # with the multiplier per layer
    stray: list[_Leaf] = []  # decayed where the policy says not
    for leaf in trained:
        row = leaf.row
        scale = np.broadcast_to(np.asarray(row.lr_scale, np.float64), leaf.u0.shape)
        if row.decay:
            if not np.any(leaf.p > 0):
                pass  # an all-zero leaf cannot show decay
            elif not np.any(leaf.u0 > 0):
                mismatches.append(Mismatch(
                    row.path, "decay", "decayed", "not decayed (no move with zero gradients)"
                ))
            elif id(leaf) in wise or all(
                _near(lo, hi, tol) for lo, hi in zip(leaf.rmin, leaf.rmax)
            ):
                decays.append((leaf, scale * row.rate))
            # else: a decay passed through a step that is not element-wise.
        elif np.any(leaf.u0 > 0):
            stray.append(leaf)
        if id(leaf) in wise:
            moves.append((leaf, scale))
    wrong, decay = _compare(decays, "decay", "the weight decay", "rmin", "rmax", tol)
    mismatches += wrong
    for leaf in stray:
        got = "decayed (it moves with zero gradients)"
        if decay and np.all(np.isfinite(leaf.rmin)) and np.all(np.isfinite(leaf.rmax)):
            factor = _show_got(leaf.rmin / decay, leaf.rmax / decay, tol)
            got = f"decayed, the weight decay times {factor}"
        mismatches.append(Mismatch(leaf.row.path, "decay", "not decayed", got))
    mismatches += _compare(moves, "multiplier", "the update", "dmin", "dmax", tol)[0]
    return mismatches


def _element_wise(trained: list[_Leaf], tol: float) -> set[int]:
    """The ids of the leaves the probes show an element-wise step on: every element of
    a layer moved alike under gradients of ones, and under the signs each element of
    magnitude 1 moved by as much, each its way."""
    out = set()
    for leaf in trained:
        size = max(2 * leaf.most("u0"), leaf.most("u1", "u2"))
        if leaf.most("qstray") > tol * size:
            continue  # an element the ones left still moved under the signs
        if not all(_near(lo, hi, tol) for lo, hi in zip(leaf.dmin, leaf.dmax)):
            continue  # the elements of a layer moved differently
        # Layers without a value have one element, or did not move: nothing to tell.
        if all(
            _near(lo, 1.0, tol) and _near(hi, 1.0, tol)
            for lo, hi in zip(leaf.qmin, leaf.qmax)
            if math.isfinite(lo)
        ):
            out.add(id(leaf))
    return out


def _near(x: float, y: float, tol: float) -> bool:
    return abs(x - y) <= tol * max(abs(x), abs(y), 1e-30)


def _compare(
    found: list[tuple[_Leaf, Any]], check: str, what: str, lo_name: str, hi_name: str,
    tol: float,
) -> tuple[list[Mismatch], float]:
    """Leaves whose value per unit of factor is not the common one.

    Each leaf's value (the decay per unit of p, or what the gradient of ones does)
    divided by the factor the policy gives it should be one constant ``c`` for every
    leaf and layer. Where the undivided values are all alike while the factors differ,
    the optimizer applies no factor at all. Otherwise ``c`` is the value most layers
    share (ties go to factor 1), and each leaf that differs is reported with the factor
    it got: its value over ``c``. A value of 0 is always reported, as the policy's
    factors are positive. (A factor every leaf shares cannot be told from the
    learning rate.)

    Returns the mismatches and ``c`` (0 where there is none).
    """
    import numpy as np

    units = []  # (leaf number, raw low, raw high, factor), one per layer
    for k, (leaf, factor) in enumerate(found):
        lows, highs = getattr(leaf, lo_name), getattr(leaf, hi_name)
        for j in range(len(lows)):
            if math.isfinite(lows[j]) and math.isfinite(highs[j]):  # else all zero
                units.append((k, float(lows[j]), float(highs[j]), float(factor[j])))
    moving = [i for i, (_, lo, hi, _) in enumerate(units) if lo != 0 or hi != 0]
    raws = [units[i][1:3] for i in moving]
    unapplied: set[int] = set()
    if (
        len({units[i][3] for i in moving}) > 1
        and all(_near(lo, raws[0][0], tol) and _near(hi, raws[0][0], tol) for lo, hi in raws)
    ):
        # Alike before the factors: none is applied.
        common = raws[0][0]
        agree = {i for i in moving if units[i][3] == 1.0}
        unapplied = {units[i][0] for i in moving if i not in agree}
    else:
        common, shared = _most_shared(
            [(units[i][1] + units[i][2]) / 2 / units[i][3] for i in moving],
            [units[i][3] == 1.0 for i in moving],
            tol,
        )
        agree = {moving[i] for i in shared}
    wrong = sorted({
        k for i, (k, lo, hi, f) in enumerate(units)
        if i not in agree
        and not (common and _near(lo, common * f, tol) and _near(hi, common * f, tol))
    })
    out = []
    for k in wrong:
        leaf, _ = found[k]
        lows, highs = getattr(leaf, lo_name), getattr(leaf, hi_name)
        if k in unapplied:
            got = f"{what} times 1 {_UNAPPLIED}"
        elif not common or not (np.any(lows) or np.any(highs)):
            got = "no weight decay" if check == "decay" else _STILL
        else:
            got = f"{what} times " + _show_got(lows / common, highs / common, tol)
        out.append(Mismatch(
            leaf.row.path, check, f"{what} times {_show(_factor(leaf.row, check))}", got
        ))
    return out, common


def _most_shared(values: list[float], ones: list[bool], tol: float) -> tuple[float, set[int]]:
    """The value most of ``values`` share (within the tolerance), ties going to the
    value more of the ``ones`` share, and the indices that share it; 0 and none for
    no values."""
    order = sorted(range(len(values)), key=values.__getitem__)
    best: list[int] = []
    best_support = (0, 0)
    start = 0
    while start < len(order):
        end = start + 1
        while end < len(order) and _near(values[order[end]], values[order[start]], tol):
            end += 1
        group = order[start:end]
        support = (len(group), sum(ones[i] for i in group))
        if support > best_support:
            best, best_support = group, support
        start = end
    if not best:
        return 0.0, set()
    return values[best[len(best) // 2]], set(best)


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


def _show_got(lows: Any, highs: Any, tol: float) -> str:
    parts = [
        _number(lo) if _near(lo, hi, tol) else f"{_number(lo)} to {_number(hi)}"
        for lo, hi in zip(lows, highs)
    ]
    return parts[0] if len(parts) == 1 else "[" + ", ".join(parts) + "]"


def _number(x: float) -> str:
    return f"{float(x):.4g}"


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


def _message(mismatches: list[Mismatch], rated: set[str]) -> str:
    count = len({m.path for m in mismatches})
    lines = "\n".join(f"  {m}" for m in mismatches[:_SHOWN])
    more = f"\n  ... and {len(mismatches) - _SHOWN} more" if len(mismatches) > _SHOWN else ""
    leaves = "1 leaf" if count == 1 else f"{count} leaves"
    return (
        f"policy.verify: tx does not do what the policy says at {leaves}:\n"
        f"{lines}{more}\n{_hint(mismatches, rated)}"
    )


def _hint(mismatches: list[Mismatch], rated: set[str]) -> str:
    """The fix, from what went wrong; ``rated`` are the paths of leaves whose decay
    rate is not 1."""
    unapplied = any(m.got.endswith(_UNAPPLIED) for m in mismatches)
    frozen = any(m.check.startswith("frozen") for m in mismatches)
    still = any(m.got == _STILL for m in mismatches)
    factors = [
        m for m in mismatches
        if m.check in ("decay", "multiplier") and m.expected not in _DECAYED
        and not m.got.endswith(_UNAPPLIED) and m.got != _STILL
    ]
    hints = []
    if unapplied or frozen:
        hints.append(
            "wrap the optimizer, tx = policy.wrap(optax.adamw(..., mask=policy.mask)): it "
            "multiplies each update by its multiplier and gives frozen leaves no update "
            "and no state."
        )
    if any(m.check == "decay" and m.expected in _DECAYED for m in mismatches):
        hints.append(
            "give the optimizer this policy's mask, optax.adamw(..., mask=policy.mask) "
            "(or optax.add_decayed_weights(..., mask=policy.mask))."
        )
    if still:
        hints.append(
            "update every leaf the policy trains: freeze leaves with dm.freeze, which "
            "policy.wrap applies, rather than optax.set_to_zero or a mask of its own."
        )
    if any(m.check == "decay" and m.path in rated for m in factors):
        hints.append(
            "decay each leaf by its rate, with dm.add_decayed_weights(weight_decay, "
            "policy.rates) in place of the optimizer's own decay."
        )
    elif factors:
        hints.append(
            "apply the multipliers once, with policy.wrap around an optimizer that "
            "scales no leaf itself (one optax.adamw, not an optax.partition of scaled "
            "copies)."
        )
    return "Fix: " + " Then ".join(hints)


def _part_of(
    policy: Policy, params: Any, full: Any, framework: str | None, options: dict[str, Any]
) -> Any:
    """The report on ``params``, a part of ``full``: decided as usual, with the layer
    ids and multipliers of the whole model, looked up by path."""
    import dataclasses

    from .core._report import Report

    whole = {row.path: row for row in policy.explain(full, framework=framework, **options)}
    plain = type(policy)(*policy.rules, default=policy.default, strict=policy.strict)
    rows = []
    for row in plain.explain(params, framework=framework, **options):
        found = whole.get(row.path)
        if found is None:
            raise VerifyError(
                f"policy.verify(tx, params, full=...): params hold {row.path}, which the "
                f"full tree does not; pass the whole model or params the trained part "
                f"was cut from."
            )
        scale = found.lr_scale if row.trainable else row.lr_scale
        rows.append(dataclasses.replace(row, layer_id=found.layer_id, lr_scale=scale))
    return Report(rows, policy=policy)
