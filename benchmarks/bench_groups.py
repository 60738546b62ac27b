"""Parameter groups: learning-rate multipliers, layer decay and freezing by decaymask
against the recipes written by hand.

Three tables:

1. Building the multipliers: ``policy.lr_scales(tree)`` for a policy with
   ``dm.layer_decay(0.75)``, one ``dm.lr`` rule and one ``dm.freeze`` rule, against the
   timm/MAE-style recipe (a regex over each leaf's name gives its layer id, the layer id
   its scale, over ``jax.tree_util.tree_map_with_path``), on the abstract transformers of
   ``_models.py``, per framework, 50 to 20,000 parameter leaves: repeated calls and first
   calls (decaymask's output cache emptied). Both give the same float at every leaf,
   which is checked before anything is timed.
2. A jitted training step: ``policy.wrap(optax.adamw(..., mask=policy.mask))`` against
   plain ``optax.adamw(..., mask=policy.mask)`` (no multipliers, no freezing) and against
   ``optax.partition`` with one ``optax.adamw`` per distinct multiplier (the recipe
   written today: a label per multiplier, ``adamw(lr * m)`` for each, ``set_to_zero``
   for the frozen). wrap and partition are checked to give the same step.
3. Optimizer state bytes with half the blocks frozen: ``tx.init(params)`` of wrap(adamw),
   plain adamw and the partition recipe, ``nbytes`` summed over the state's arrays.

    python benchmarks/bench_groups.py
    python benchmarks/bench_groups.py --quick                  # 50 .. 1,000 leaves, fewer steps
    python benchmarks/bench_groups.py --tables step state --depth 24 --width 256
    python benchmarks/bench_groups.py --profile                # cProfile of the build, and of
                                                               # tracing each step

Goals: building the multipliers at most 1.2x the hand recipe (as for masks); a wrapped
step within 5% of plain adamw and no slower than the partition recipe; wrap's state the
trainable share of adamw's (half the blocks frozen: about half).
"""

from __future__ import annotations

import argparse
import cProfile
import re
import statistics
import sys
import time

import _models as M
import jax
import jax.numpy as jnp
import numpy as np
import optax

import decaymask as dm

RATE = 0.75  # layer decay
ATTN_LR = 0.5  # the dm.lr rule: attention layers learn half as fast
LR = 1e-3
WEIGHT_DECAY = 0.05
BUILD_TARGET = 1.2
STEP_TARGET = 1.05
DEFAULT_SIZES = (50, 100, 300, 1000, 4000, 20000)
QUICK_SIZES = (50, 100, 300, 1000)
FRAMEWORKS = ("equinox", "linen", "nnx")
TABLES = ("build", "step", "state")


# --------------------------------------------------------------------------- policies


def group_policy(*freeze: dm.Rule) -> dm.Policy:
    """The decay rules of bench_build's Equinox policy, layer decay 0.75, attention at
    half the learning rate and ``freeze`` (by default: the token embedding frozen)."""
    return dm.Policy(
        *M.equinox_policy().rules,
        dm.layer_decay(RATE),
        dm.lr(ATTN_LR, within="attention"),
        *(freeze or (dm.freeze(layer="embedding"),)),
    )


def half_frozen_policy(framework: str, depth: int) -> dm.Policy:
    """The group policy with the first half of the blocks frozen instead of the embedding."""
    block = "Block_{}/*" if framework == "linen" else "blocks/{}/*"
    return group_policy(dm.freeze(path=tuple(block.format(i) for i in range(depth // 2))))


POLICY_TEXT = (f"Policy(decay(layer='linear'), decay(layer='layer_norm', param='bias'), "
               f"layer_decay({RATE}), lr({ATTN_LR}, within='attention'), "
               f"freeze(layer='embedding'))")


# --------------------------------------------------------------------------- hand recipes
#
# The recipe of timm's and MAE's fine-tuning scripts, written for each framework's names:
# a leaf's dotted name gives its layer id (embedding 0, block i -> i + 1, the rest
# depth + 1), the id its scale rate ** (depth + 1 - id), times the attention multiplier;
# the frozen embedding gets 0.


def _name(path) -> str:
    return jax.tree_util.keystr(path, simple=True, separator=".")


def _scale_fn(num_layers: int, block: str, embed: str, attn: str):
    block_re = re.compile(block)

    def layer_id(name: str) -> int:
        if name.startswith(embed):
            return 0
        m = block_re.match(name)
        if m:
            return int(m.group(1)) + 1
        return num_layers

    def scale(name: str) -> float:
        if name.startswith(embed):
            return 0.0  # frozen
        s = RATE ** (num_layers - layer_id(name))
        if attn in name:
            s *= ATTN_LR
        return s

    return scale


def equinox_hand_scales(model):
    scale = _scale_fn(len(model.blocks) + 1, r"blocks[/.](\d+)", "embed.", ".attn.")

    def leaf(path, x):
        return scale(_name(path)) if M.is_array_like(x) else None

    return jax.tree_util.tree_map_with_path(leaf, model)


def linen_hand_scales(params):
    depth = sum(1 for k in params if k.startswith("Block_"))
    scale = _scale_fn(depth + 1, r"Block_(\d+)", "Embed_0.", ".MultiHeadDotProductAttention_")
    return jax.tree_util.tree_map_with_path(lambda path, _: scale(_name(path)), params)


def nnx_hand_scales(model):
    from flax import nnx

    scale = _scale_fn(len(model.blocks) + 1, r"blocks[/.](\d+)", "embed.", ".attn.")
    return jax.tree_util.tree_map_with_path(lambda path, _: scale(_name(path)),
                                            nnx.state(model, nnx.Param))


HAND = {"equinox": equinox_hand_scales, "linen": linen_hand_scales, "nnx": nnx_hand_scales}


def _named_leaves(tree) -> list[tuple[str, object]]:
    """(dotted name, value) of every leaf, None included; an NNX Variable's ``.value``
    key dropped, so a tree of Params and a State of raw values compare."""
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)[0]
    return [(_name(p).removesuffix(".value"), x) for p, x in leaves]


def assert_same_scales(ours, theirs, what: str) -> None:
    a, b = _named_leaves(ours), _named_leaves(theirs)
    if len(a) != len(b):
        raise AssertionError(f"{what}: {len(a)} leaves from decaymask, {len(b)} by hand")
    for (pa, x), (pb, y) in zip(a, b):
        if pa != pb or x != y:
            raise AssertionError(f"{what}: decaymask {pa}={x!r}, by hand {pb}={y!r}")


# --------------------------------------------------------------------------- table 1


def forget() -> None:
    """Empties decaymask's cache of built outputs: the next call walks the tree."""
    from decaymask import _face

    _face._built.clear()


def build_model(framework: str, depth: int):
    return {"equinox": M.equinox_model, "linen": M.linen_params,
            "nnx": M.nnx_model}[framework](depth)


def build_row(framework: str, size: int, policy: dm.Policy, args) -> list[str]:
    model = build_model(framework, M.depth_for(size))
    hand = lambda: HAND[framework](model)  # noqa: E731
    ours = lambda: policy.lr_scales(model)  # noqa: E731
    assert_same_scales(ours(), hand(), f"{framework} at {size} leaves")
    leaves = len(policy.explain(model))
    t_hand, t_ours = M.median_pair(hand, ours, args.repeats, args.warmup, args.min_time)
    t_first = M.median(lambda: (forget(), ours()), args.aux_repeats, warmup=0)
    ratio, first_ratio = t_ours / t_hand, t_first / t_hand
    print(f"  [build {framework} {leaves} leaves done]", file=sys.stderr, flush=True)
    return [
        framework, f"{leaves:,}", f"{t_hand * 1e3:.2f}", f"{t_ours * 1e3:.2f}",
        f"{ratio:.2f}x", f"{t_first * 1e3:.2f}", f"{first_ratio:.2f}x",
        "yes" if ratio <= BUILD_TARGET else "NO",
        "yes" if first_ratio <= BUILD_TARGET else "NO",
    ]


def build_table(args) -> None:
    policy = group_policy()
    print()
    print("### Building the multipliers")
    print()
    print(f"decaymask: `{POLICY_TEXT}`, `policy.lr_scales(tree)`; hand: the timm/MAE recipe "
          f"(`re.match(r'blocks[/.](\\d+)', name)` -> layer id -> "
          f"`{RATE} ** (depth + 1 - id)`, x{ATTN_LR} under attention, 0 for the embedding) "
          f"over `jax.tree_util.tree_map_with_path` (NNX: over `nnx.state(model, "
          f"nnx.Param)`); the same float at every leaf, asserted. \"decaymask ms\" is a "
          f"repeated call (the output cache; NNX has none), \"first ms\" a call after "
          f"emptying it; ratios against the hand recipe. Goal, as for masks "
          f"(bench_build.py): at most {BUILD_TARGET}x the hand recipe.")
    print()
    rows = [
        build_row(framework, size, policy, args)
        for framework in args.frameworks
        for size in args.sizes
        if framework != "nnx" or size <= args.nnx_max
    ]
    print(M.table(["framework", "leaves", "hand ms", "decaymask ms", "ratio", "first ms",
                   "first ratio", f"repeated <= {BUILD_TARGET}x",
                   f"first <= {BUILD_TARGET}x"], rows), flush=True)


# --------------------------------------------------------------------------- tables 2, 3


def concrete_params(framework: str, args):
    """(model, params, depth) of a real transformer: the params the optimizer sees."""
    hidden = 4 * args.width
    if framework == "equinox":
        import equinox as eqx

        model = M.equinox_model(args.depth, args.width, args.heads, hidden, args.vocab,
                                concrete=True)
        return model, eqx.filter(model, eqx.is_array)
    if framework == "linen":
        module = M.linen_module(args.depth, args.width, args.heads, hidden, args.vocab)
        params = module.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
        return params, params
    from flax import nnx

    model = M.nnx_model(args.depth, args.width, args.heads, hidden, args.vocab, concrete=True)
    return model, nnx.state(model, nnx.Param)


def adamw(lr=LR, mask=None):
    return optax.adamw(lr, weight_decay=WEIGHT_DECAY, mask=mask)


def partition_recipe(scales, decay_mask, framework: str):
    """The hand recipe: a label per distinct multiplier, ``optax.adamw(lr * m)`` for each,
    ``optax.set_to_zero()`` for the frozen (multiplier 0)."""
    leaves = [s for s in jax.tree_util.tree_leaves(scales)]
    groups = sorted(set(leaves))
    label_of = {m: ("frozen" if m == 0.0 else f"lr_x{m:g}") for m in groups}
    if framework == "nnx":
        from flax import nnx

        labels = nnx.map_state(lambda _, s: label_of[s], scales)
    else:
        labels = jax.tree.map(lambda s: label_of[s], scales)
    # Each adamw sees the params with the other groups' leaves masked out: the decay
    # mask is handed over as a tree (the callable policy.mask would be called on that
    # masked tree).
    transforms = {
        label: optax.set_to_zero() if m == 0.0
        else adamw(LR * m, mask=lambda _, t=decay_mask: t)
        for m, label in label_of.items()
    }
    return optax.partition(transforms, lambda _: labels), len(groups)


def optimizers(policy: dm.Policy, framework: str, params, hand=None):
    """The three optimizers of the step and state tables, and how many groups the
    partition recipe has. Its labels come from decaymask's multipliers, first checked
    equal to ``hand`` (the hand recipe's) when given."""
    scales = policy.lr_scales(params)
    if hand is not None:
        assert_same_scales(scales, hand, framework)
    partition, groups = partition_recipe(scales, policy.mask(params), framework)
    return {
        "adamw": adamw(mask=policy.mask),
        "wrap": policy.wrap(adamw(mask=policy.mask)),
        "partition": partition,
    }, groups


def _grads(params):
    return jax.tree.map(lambda x: jnp.full_like(x, 0.01), params)


def step_case(framework: str, policy: dm.Policy, args):
    """For each optimizer: a step function and its inputs, ready to jit."""
    model, params = concrete_params(framework, args)
    txs, groups = optimizers(policy, framework, params, HAND[framework](model))
    out = {}
    if framework != "nnx":
        for name, tx in txs.items():
            def step(params, grads, state, tx=tx):
                updates, state = tx.update(grads, state, params)
                return optax.apply_updates(params, updates), state

            out[name] = (step, (params, _grads(params), tx.init(params)))
        return out, params, groups
    from flax import nnx

    for name, tx in txs.items():
        model = M.nnx_model(args.depth, args.width, args.heads, 4 * args.width, args.vocab,
                            concrete=True)
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
        graphdef, state = nnx.split((model, optimizer))
        grads = _grads(nnx.state(model, nnx.Param))

        def step(state, grads, graphdef=graphdef):
            model, optimizer = nnx.merge(graphdef, state)
            optimizer.update(model, grads)
            return nnx.state((model, optimizer))

        out[name] = (step, (state, grads))
    return out, params, groups


def _new_params(framework: str, result):
    if framework != "nnx":
        return result[0]
    from flax import nnx

    return result.filter(nnx.Param)


def check_same_step(framework: str, results: dict) -> str:
    """wrap and partition must move every parameter alike (to float32 rounding); plain
    adamw must not, or the check could not fail."""
    a = jax.tree_util.tree_leaves(_new_params(framework, results["wrap"]))
    b = jax.tree_util.tree_leaves(_new_params(framework, results["partition"]))
    c = jax.tree_util.tree_leaves(_new_params(framework, results["adamw"]))
    if len(a) != len(b) or not all(np.allclose(x, y, rtol=1e-6, atol=1e-9)
                                   for x, y in zip(a, b)):
        raise AssertionError(f"{framework}: wrap and the partition recipe step differently")
    if all(np.allclose(x, y, rtol=1e-6, atol=1e-9) for x, y in zip(a, c)):
        raise AssertionError(f"{framework}: wrap steps like plain adamw: the check is blind")
    return "same"


def pytree_seconds(inputs, outputs, repeats: int = 20) -> float:
    """Median seconds to flatten a step's inputs and unflatten its outputs: the Python
    side of every call of a jitted function, which grows with the state's structure."""
    leaves, treedef = jax.tree_util.tree_flatten(outputs)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.tree_util.tree_flatten(inputs)
        treedef.unflatten(leaves)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_steps(compiled: dict, inputs: dict, repeats: int) -> dict[str, float]:
    """Median seconds per step, the optimizers alternating, each step awaited."""
    times: dict[str, list[float]] = {name: [] for name in compiled}
    order = list(compiled)
    for _ in range(3):  # warm-up
        for name in order:
            jax.block_until_ready(compiled[name](*inputs[name]))
    for i in range(repeats):
        for name in order if i % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            jax.block_until_ready(compiled[name](*inputs[name]))
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def step_table(args) -> None:
    policy = group_policy()
    rows = []
    for framework in args.step_frameworks:
        steps, params, groups = step_case(framework, policy, args)
        compiled, inputs, results, compile_s, lines = {}, {}, {}, {}, {}
        for name, (step, step_inputs) in steps.items():
            start = time.perf_counter()
            lowered = jax.jit(step).lower(*step_inputs)
            compiled[name] = lowered.compile()
            compile_s[name] = time.perf_counter() - start
            lines[name] = len(lowered.as_text().splitlines())
            inputs[name] = step_inputs
            results[name] = compiled[name](*step_inputs)
        same = check_same_step(framework, results)
        pytree = {name: pytree_seconds(inputs[name], results[name]) for name in steps}
        del results
        t = time_steps(compiled, inputs, args.steps)
        rows.append([
            framework, f"{M.count_leaves(params):,}", f"{M.count_params(params):,}",
            str(groups), same,
            f"{t['adamw'] * 1e3:.2f}", f"{t['wrap'] * 1e3:.2f}", f"{t['partition'] * 1e3:.2f}",
            f"{t['wrap'] / t['adamw']:.3f}x", f"{t['wrap'] / t['partition']:.3f}x",
            "yes" if t["wrap"] <= STEP_TARGET * t["adamw"] else "NO",
            "yes" if t["wrap"] <= t["partition"] else "NO",
            f"{compile_s['adamw']:.2f} / {compile_s['wrap']:.2f} / "
            f"{compile_s['partition']:.2f}",
            f"{lines['adamw']:,} / {lines['wrap']:,} / {lines['partition']:,}",
            f"{pytree['adamw'] * 1e3:.1f} / {pytree['wrap'] * 1e3:.1f} / "
            f"{pytree['partition'] * 1e3:.1f}",
        ])
        print(f"  [step {framework} done]", file=sys.stderr, flush=True)
        del steps, compiled, inputs
    print()
    print("### A jitted step")
    print()
    print(f"Model: {args.depth} blocks, width {args.width}, MLP {4 * args.width}, vocabulary "
          f"{args.vocab} (the embedding, {args.vocab * args.width:,} parameters, frozen by "
          f"the policy); constant gradients. adamw: `optax.adamw({LR:g}, weight_decay="
          f"{WEIGHT_DECAY}, mask=policy.mask)`, every leaf trained at lr x1; wrap: "
          f"`policy.wrap(` that `)`; partition: `optax.partition` with one "
          f"`optax.adamw({LR:g} * m, ...)` per distinct multiplier m and `set_to_zero()` for "
          f"the frozen (\"groups\"). \"step\": wrap and partition give the same parameters "
          f"after one step (rtol 1e-6), plain adamw other ones. Median of {args.steps} "
          f"steps each after 3 warm-ups, alternating. Goal: wrap within 5% of adamw "
          f"(<= {STEP_TARGET}x) and ahead of partition. The last three columns are "
          f"adamw / wrap / partition: `jax.jit(step).lower(...)` plus `.compile()` in "
          f"seconds, lines of the lowered program, and the pytree traffic of one call "
          f"(flattening its inputs plus unflattening its outputs, median of 20, in ms; "
          f"part of the step time).")
    print()
    print(M.table(["framework", "leaves", "parameters", "groups", "step", "adamw ms",
                   "wrap ms", "partition ms", "wrap / adamw", "wrap / partition",
                   f"<= {STEP_TARGET}x adamw", "<= partition", "lower+compile s",
                   "HLO lines", "pytree ms"],
                  rows), flush=True)


def state_bytes(state) -> int:
    return sum(int(x.nbytes) for x in jax.tree_util.tree_leaves(state)
               if isinstance(x, (jax.Array, np.ndarray)))


def state_table(args) -> None:
    rows = []
    for framework in args.step_frameworks:
        policy = half_frozen_policy(framework, args.depth)
        model, params = concrete_params(framework, args)
        txs, _ = optimizers(policy, framework, params)
        n_params = M.count_params(params)
        frozen = sum(int(np.prod(r.shape)) for r in policy.explain(params) if r.frozen)
        trainable_share = (n_params - frozen) / n_params
        nbytes = {name: state_bytes(tx.init(params)) for name, tx in txs.items()}
        ratio = nbytes["wrap"] / nbytes["adamw"]
        rows.append([
            framework, f"{n_params:,}", f"{frozen:,}", f"{trainable_share:.3f}",
            f"{nbytes['adamw']:,}", f"{nbytes['wrap']:,}", f"{nbytes['partition']:,}",
            f"{ratio:.3f}x", f"{nbytes['partition'] / nbytes['adamw']:.3f}x",
            "yes" if ratio <= trainable_share + 1e-3 else "NO",
        ])
        del model, params, txs
    print()
    print("### Optimizer state with half the blocks frozen")
    print()
    print(f"Same model; the policy freezes blocks 0 to {args.depth // 2 - 1} of {args.depth} "
          f"(`dm.freeze(path=('blocks/0/*', ...))`, Linen `Block_0/*`...) instead of the "
          f"embedding. Bytes: `nbytes` summed over the array leaves of `tx.init(params)`. "
          f"Goal: wrap's state is adamw's times the trainable share of the parameters "
          f"(half the blocks frozen; the embedding and final norm stay trained).")
    print()
    print(M.table(["framework", "parameters", "frozen", "trainable share", "adamw bytes",
                   "wrap bytes", "partition bytes", "wrap / adamw", "partition / adamw",
                   "wrap <= share"], rows), flush=True)


# --------------------------------------------------------------------------- profile


def profile(args) -> None:
    print(f"Machine: {M.environment()}")
    policy = group_policy()
    for framework in args.frameworks:
        model = build_model(framework, M.depth_for(args.profile_leaves))
        for label, fn in (("first calls", lambda: (forget(), policy.lr_scales(model))),
                          ("repeated calls", lambda: policy.lr_scales(model))):
            fn()
            _profiled(fn, args, f"{framework}: {args.repeats} {label} of lr_scales at "
                                f"{args.profile_leaves} leaves")
    for framework in args.step_frameworks:
        steps, _, _ = step_case(framework, policy, args)
        for name in ("wrap", "partition"):
            step, step_inputs = steps[name]
            _profiled(lambda: jax.jit(step).lower(*step_inputs), args,
                      f"{framework}: tracing and lowering the {name} step", runs=1)


def _profiled(fn, args, title: str, runs: int | None = None) -> None:
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(runs or args.repeats):
        fn()
    profiler.disable()
    M.print_profile(profiler, args.profile_top, title)


# --------------------------------------------------------------------------- main


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tables", nargs="+", choices=TABLES, default=list(TABLES))
    parser.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES),
                        help="approximate parameter leaf counts of the build table "
                             "(default: %(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help=f"build sizes {', '.join(map(str, QUICK_SIZES))}, 100 steps")
    parser.add_argument("--frameworks", nargs="+", choices=FRAMEWORKS,
                        default=list(FRAMEWORKS), help="frameworks of the build table")
    parser.add_argument("--step-frameworks", nargs="*", choices=FRAMEWORKS,
                        default=list(FRAMEWORKS),
                        help="frameworks of the step and state tables")
    parser.add_argument("--repeats", type=int, default=7,
                        help="timed builds per measurement (default: %(default)s)")
    parser.add_argument("--min-time", type=float, default=2.0,
                        help="more runs for fast builds, until each side has taken about "
                             "this many seconds; at most 200 runs (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--aux-repeats", type=int, default=3,
                        help="timed first calls (cache emptied) per size (default: "
                             "%(default)s)")
    parser.add_argument("--nnx-max", type=int, default=20000,
                        help="largest NNX build size (default: %(default)s)")
    parser.add_argument("--depth", type=int, default=12, help="blocks of the step model")
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--steps", type=int, default=300,
                        help="timed steps per optimizer (default: %(default)s)")
    parser.add_argument("--no-gc", action="store_true",
                        help="collector off inside timed builds, as timeit does")
    parser.add_argument("--profile", action="store_true",
                        help="print cProfiles of lr_scales and of tracing the steps")
    parser.add_argument("--profile-leaves", type=int, default=4000)
    parser.add_argument("--profile-top", type=int, default=20)
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes = list(QUICK_SIZES)
        args.steps = 100
    M.COLLECT_DURING_RUNS = not args.no_gc
    if args.profile:
        profile(args)
        return
    print(f"Machine: {M.environment()}")
    print(f"Build: median of {args.repeats} runs or more (about {args.min_time:g} s of runs "
          f"each) after {args.warmup} warm-up, first calls median of {args.aux_repeats}; "
          f"garbage collector {'off' if args.no_gc else 'on'} inside timed calls.")
    start = time.perf_counter()
    if "build" in args.tables:
        build_table(args)
    if "step" in args.tables:
        step_table(args)
    if "state" in args.tables:
        state_table(args)
    print()
    print(f"Total {time.perf_counter() - start:.0f} s.")


if __name__ == "__main__":
    main()
