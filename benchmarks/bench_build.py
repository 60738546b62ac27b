"""Time to build a weight-decay mask: decaymask against the hand-written recipe.

For each framework and model size, the same abstract transformer is masked by the
recipe a user writes today and by decaymask's equivalent policy, in one process,
alternating, median of ``--repeats`` runs (more for fast calls, ``--min-time``) after a
warm-up. Both masks are checked to be equal leaf for leaf before anything is timed.
Also timed: ``policy.explain`` and the Muon dimension numbers of ``dm.presets.muon()``
(median of ``--aux-repeats``).

    python benchmarks/bench_build.py                 # 100 .. 100,000 leaves (NNX to 20,000)
    python benchmarks/bench_build.py --quick         # 100 .. 4,000 leaves
    python benchmarks/bench_build.py --frameworks nnx --sizes 100000 --nnx-max 100000
    python benchmarks/bench_build.py --no-gc         # collector off in timed calls
    python benchmarks/bench_build.py --profile       # cProfile of decaymask at 4,000 leaves

The default run takes under 3 minutes on the machine in README.md (2 CPU cores); NNX
stops at 20,000 leaves by default because its hand recipe alone takes 10 to 20 s a call
at 100,000 (``--nnx-max 100000`` adds that size: about 2.5 more minutes).

Target: decaymask at most 1.2x the hand recipe from 4,000 leaves up.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time

import _models as M

import decaymask as dm

TARGET_RATIO = 1.2
TARGET_FROM_LEAVES = 4000
DEFAULT_SIZES = (100, 1000, 4000, 20000, 100000)
QUICK_SIZES = (100, 1000, 4000)
FRAMEWORKS = ("equinox", "linen", "nnx")


def case(framework: str, leaves: int, whole: bool = False):
    """The abstract model, the hand recipe, the decaymask call and the aux calls."""
    depth = M.depth_for(leaves)
    muon = dm.presets.muon()
    if framework == "equinox":
        model = M.equinox_model(depth, whole=whole)
        policy = M.equinox_policy()
        return (model, lambda: M.equinox_hand_mask(model),
                lambda: policy.for_equinox(model),
                lambda: policy.explain(model),
                lambda: muon.muon_dims_for_equinox(model))
    if framework == "linen":
        model = M.linen_params(depth, whole=whole)
        policy = M.linen_policy()
        return (model, lambda: M.linen_hand_mask(model),
                lambda: policy.for_flax(model),
                lambda: policy.explain(model),
                lambda: muon.muon_dims_for_flax(model))
    if framework == "nnx":
        model = M.nnx_model(depth, whole=whole)
        policy = M.nnx_policy()
        return (model, lambda: M.nnx_hand_mask(model),
                lambda: policy.for_flax(model),
                lambda: policy.explain(model),
                lambda: muon.muon_dims_for_flax(model))
    raise ValueError(f"unknown framework {framework!r}; expected one of {FRAMEWORKS}")


RECIPES = {
    "equinox": "jtu.tree_map(set_mask, model, is_leaf=Linear|LayerNorm)",
    "linen": "traverse_util.path_aware_map(path[-1] == 'kernel')",
    "nnx": "nnx.iter_graph types + nnx.map_state(nnx.state(model, nnx.Param))",
}
POLICIES = {
    "equinox": "Policy(decay(layer='linear'), decay(layer='layer_norm', param='bias'))",
    "linen": "Policy(decay(layer='linear', param='weight'))",
    "nnx": "Policy(decay(layer='linear'), decay(layer='layer_norm', param='bias'))",
}


def run(args) -> None:
    print(f"Machine: {M.environment()}")
    print(f"Median of {args.repeats} runs or more (fast calls: about {args.min_time:g} s "
          f"of runs each) after {args.warmup} warm-up "
          f"(explain and Muon dims: {args.aux_repeats} runs), garbage collector "
          f"{'off' if args.no_gc else 'on'} inside timed calls; abstract models, "
          f"{M.LEAVES_PER_BLOCK} parameter leaves per transformer block.")
    start = time.perf_counter()
    if not args.whole:
        M.check_assembled()
    for framework in args.frameworks:
        rows = []
        sizes = [s for s in args.sizes if framework != "nnx" or s <= args.nnx_max]
        for size in sizes:
            t0 = time.perf_counter()
            model, hand, ours, explain, dims = case(framework, size, args.whole)
            built = time.perf_counter() - t0
            M.assert_same_mask(ours(), hand(), f"{framework} at {size} leaves")
            leaves = len(explain())
            t_hand, t_ours = M.median_pair(hand, ours, args.repeats, args.warmup,
                                           args.min_time)
            t_explain = M.median(explain, args.aux_repeats, warmup=0)
            t_dims = M.median(dims, args.aux_repeats, warmup=0)
            ratio = t_ours / t_hand
            if leaves >= TARGET_FROM_LEAVES:
                target = "yes" if ratio <= TARGET_RATIO else "NO"
            else:
                target = "-"
            rows.append([
                f"{leaves:,}", f"{t_hand * 1e3:.1f}", f"{t_ours * 1e3:.1f}",
                f"{ratio:.2f}x", f"{t_hand / leaves * 1e6:.1f}",
                f"{t_ours / leaves * 1e6:.1f}", f"{t_explain * 1e3:.1f}",
                f"{t_dims * 1e3:.1f}", target,
            ])
            print(f"  [{framework} {leaves} leaves: model built in {built:.1f} s, "
                  f"{time.perf_counter() - start:.0f} s so far]", file=sys.stderr,
                  flush=True)
            del model, hand, ours, explain, dims
        print()
        print(f"### {framework}")
        print()
        print(f"hand: `{RECIPES[framework]}`; decaymask: `{POLICIES[framework]}`; "
              f"masks asserted equal at every size.")
        print()
        print(M.table(
            ["leaves", "hand ms", "decaymask ms", "ratio", "hand us/leaf",
             "decaymask us/leaf", "explain ms", "muon dims ms",
             f"<= {TARGET_RATIO}x"],
            rows,
        ), flush=True)
    print()
    print(f"Total {time.perf_counter() - start:.0f} s.")


def profile(args) -> None:
    print(f"Machine: {M.environment()}")
    for framework in args.frameworks:
        _, _, ours, _, _ = case(framework, args.profile_leaves, args.whole)
        ours()
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(args.repeats):
            ours()
        profiler.disable()
        out = io.StringIO()
        stats = pstats.Stats(profiler, stream=out).strip_dirs()
        stats.sort_stats("tottime").print_stats(args.profile_top)
        stats.sort_stats("cumulative").print_stats(args.profile_top)
        print(f"\n### {framework}: {args.repeats} calls of decaymask at "
              f"{args.profile_leaves} leaves\n")
        print(out.getvalue())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES),
                        help="approximate parameter leaf counts (default: %(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help=f"sizes {', '.join(map(str, QUICK_SIZES))} only")
    parser.add_argument("--frameworks", nargs="+", choices=FRAMEWORKS,
                        default=list(FRAMEWORKS))
    parser.add_argument("--repeats", type=int, default=7,
                        help="timed runs per measurement (default: %(default)s)")
    parser.add_argument("--min-time", type=float, default=2.0,
                        help="more runs for fast calls, until each side has taken about "
                             "this many seconds, the gc.collect() before each run "
                             "included; at most 200 runs (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed runs first (default: %(default)s)")
    parser.add_argument("--aux-repeats", type=int, default=3,
                        help="timed runs of explain and Muon dims (default: %(default)s)")
    parser.add_argument("--nnx-max", type=int, default=20000,
                        help="largest NNX size; the NNX hand recipe alone takes 10 to 20 s "
                             "a call at 100,000 leaves (default: %(default)s)")
    parser.add_argument("--no-gc", action="store_true",
                        help="keep the garbage collector off inside timed calls, as timeit "
                             "does (default: on, as in real use)")
    parser.add_argument("--whole", action="store_true",
                        help="build each model in one eval_shape (slow; NNX quadratic) "
                             "instead of one block copied")
    parser.add_argument("--profile", action="store_true",
                        help="print a cProfile of decaymask's call instead of the table")
    parser.add_argument("--profile-leaves", type=int, default=4000)
    parser.add_argument("--profile-top", type=int, default=20)
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes = list(QUICK_SIZES)
    M.COLLECT_DURING_RUNS = not args.no_gc
    (profile if args.profile else run)(args)


if __name__ == "__main__":
    main()
