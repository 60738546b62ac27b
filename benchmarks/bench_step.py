"""A jitted optax.adamw step with decaymask's mask against the same mask written by hand.

The mask is decided once, at trace time, so a step with decaymask's mask must compile to
exactly the program a hand-written mask gives. For each framework this script lowers
both steps, compares the StableHLO text (``jax.jit(step).lower(...).as_text()``) and
times both compiled steps (median of ``--repeats`` runs, alternating, each run waiting
on its result with ``block_until_ready``). As a control, a step without a mask (decay
everywhere) must lower to a different program, or the comparison would prove nothing.

    python benchmarks/bench_step.py
    python benchmarks/bench_step.py --depth 8 --width 256 --repeats 500

Equinox and Linen hand decaymask's callable mask to ``optax.adamw`` (``mask=
policy.for_equinox`` / ``policy.for_flax``, the form the README recommends); the hand
mask is a tree. NNX steps go through ``nnx.Optimizer`` with ``mask=policy.for_flax(model)``
(an ``nnx.State`` of bools) against the hand recipe's ``nnx.map_state`` mask.
"""

from __future__ import annotations

import argparse
import difflib
import statistics
import time

import _models as M
import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from flax import nnx


def adamw(mask):
    return optax.adamw(1e-3, weight_decay=0.1, mask=mask)


def optax_step(tx):
    """One update with ``tx``; a fresh function object per optimizer, same name."""

    def step(params, grads, opt_state):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return step


def equinox_case(args):
    model = M.equinox_model(args.depth, args.width, args.heads, 4 * args.width, args.vocab,
                            concrete=True)
    params = eqx.filter(model, eqx.is_array)
    policy = M.equinox_policy()
    M.assert_same_mask(policy.for_equinox(params), M.equinox_hand_mask(params), "equinox")
    out = {}
    for name, mask in (("hand", M.equinox_hand_mask(params)), ("decaymask", policy.for_equinox),
                       ("control", None)):
        tx = adamw(mask)
        out[name] = (optax_step(tx), (params, _grads(params), tx.init(params)))
    return out, M.count_leaves(params), M.count_params(params)


def linen_case(args):
    module = M.linen_module(args.depth, args.width, args.heads, 4 * args.width, args.vocab)
    params = module.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    policy = M.linen_policy()
    M.assert_same_mask(policy.for_flax(params), M.linen_hand_mask(params), "linen")
    out = {}
    for name, mask in (("hand", M.linen_hand_mask(params)), ("decaymask", policy.for_flax),
                       ("control", None)):
        tx = adamw(mask)
        out[name] = (optax_step(tx), (params, _grads(params), tx.init(params)))
    return out, M.count_leaves(params), M.count_params(params)


def nnx_case(args):
    def new_model():
        return M.nnx_model(args.depth, args.width, args.heads, 4 * args.width, args.vocab,
                           concrete=True)

    policy = M.nnx_policy()
    probe = new_model()
    M.assert_same_mask(policy.for_flax(probe), M.nnx_hand_mask(probe), "nnx")
    out = {}
    for name in ("hand", "decaymask", "control"):
        model = new_model()
        mask = {"hand": M.nnx_hand_mask, "decaymask": policy.for_flax,
                "control": lambda _: None}[name](model)
        optimizer = nnx.Optimizer(model, adamw(mask), wrt=nnx.Param)
        graphdef, state = nnx.split((model, optimizer))
        grads = _grads(nnx.state(model, nnx.Param))  # Param nodes kept, as nnx.grad gives

        def step(state, grads, graphdef=graphdef):
            model, optimizer = nnx.merge(graphdef, state)
            optimizer.update(model, grads)
            return nnx.state((model, optimizer))

        out[name] = (step, (state, grads))
    params = nnx.state(probe, nnx.Param)
    return out, M.count_leaves(params), M.count_params(params)


def _grads(params):
    return jax.tree.map(lambda x: jnp.full_like(x, 0.01), params)


CASES = {"equinox": equinox_case, "linen": linen_case, "nnx": nnx_case}


def hlo_check(texts: dict[str, str]) -> str:
    hand, ours = texts["hand"], texts["decaymask"]
    if hand == ours:
        return "identical"
    diff = list(difflib.unified_diff(hand.splitlines(), ours.splitlines(), lineterm="", n=0))
    changed = sum(1 for line in diff if line[:1] in "+-" and line[:3] not in ("+++", "---"))
    return f"DIFFERENT ({changed} changed lines; first: {diff[3] if len(diff) > 3 else ''})"


def time_steps(compiled: dict, inputs: dict, repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in compiled}
    order = list(compiled)
    for name in order:  # warm-up
        jax.block_until_ready(compiled[name](*inputs[name]))
    for i in range(repeats):
        for name in order if i % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            jax.block_until_ready(compiled[name](*inputs[name]))
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frameworks", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--depth", type=int, default=4, help="transformer blocks")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=300,
                        help="timed steps per mask (default: %(default)s)")
    args = parser.parse_args(argv)

    print(f"Machine: {M.environment()}")
    print(f"Model: {args.depth} blocks, width {args.width}, MLP {4 * args.width}, "
          f"vocab {args.vocab}; optax.adamw(1e-3, weight_decay=0.1, mask=...); median of "
          f"{args.repeats} steps each, alternating.")
    rows = []
    for framework in args.frameworks:
        steps, leaves, n_params = CASES[framework](args)
        texts, compiled, inputs = {}, {}, {}
        for name, (step, step_inputs) in steps.items():
            lowered = jax.jit(step).lower(*step_inputs)
            texts[name] = lowered.as_text()
            compiled[name] = lowered.compile()
            inputs[name] = step_inputs
        check = hlo_check(texts)
        # A step that decays everything must lower differently, or the check proves nothing.
        control = "differs" if texts.pop("control") != texts["hand"] else "SAME (check is blind)"
        del compiled["control"], inputs["control"]
        times = time_steps(compiled, inputs, args.repeats)
        rows.append([
            framework, f"{leaves:,}", f"{n_params:,}", check, control,
            f"{len(texts['hand'].splitlines()):,}",
            f"{times['hand'] * 1e3:.3f}", f"{times['decaymask'] * 1e3:.3f}",
            f"{times['decaymask'] / times['hand']:.3f}x",
        ])
    print()
    print(M.table(
        ["framework", "leaves", "parameters", "HLO hand vs decaymask",
         "HLO no mask vs hand", "HLO lines", "hand step ms",
         "decaymask step ms", "ratio"],
        rows,
    ))


if __name__ == "__main__":
    main()
