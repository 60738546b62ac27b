"""Time to build a weight-decay mask: decaymask against the hand-written recipe.

For each framework and model size, the same abstract transformer is masked by the
recipe a user writes today and by decaymask's equivalent policy, in one process,
alternating, median of ``--repeats`` runs (more for fast calls, ``--min-time``) after a
warm-up. Both masks are checked to be equal leaf for leaf before anything is timed.
Also timed: ``policy.explain`` and the Muon dimension numbers of ``dm.presets.muon()``
(median of ``--aux-repeats``).

    python benchmarks/bench_build.py                 # 50 .. 100,000 leaves (NNX to 20,000)
    python benchmarks/bench_build.py --quick         # 50 .. 4,000 leaves
    python benchmarks/bench_build.py --zoo-only      # transformers' GPT-2 and BERT only
    python benchmarks/bench_build.py --frameworks nnx --sizes 100000 --nnx-max 100000
    python benchmarks/bench_build.py --no-gc         # collector off in timed calls
    python benchmarks/bench_build.py --profile       # cProfile of decaymask at 4,000 leaves
    python benchmarks/bench_build.py --first-only    # first calls only, 50 .. 4,000 leaves
    python benchmarks/bench_build.py --profile-first --frameworks linen-traced

The default run takes under 3 minutes on the machine in README.md (2 CPU cores); NNX
stops at 20,000 leaves by default because its hand recipe alone takes 10 to 20 s a call
at 100,000 (``--nnx-max 100000`` adds that size: about 2.5 more minutes).

Target: decaymask at most 1.2x the hand recipe at every size, from 50 leaves up (real
models have 50 to 1,000: transformers' 12-layer GPT-2 has 148, BERT-base 199).

A mask function is called with the same structure again and again (optax calls a
callable mask at every step), and decaymask builds an output once per policy and tree
structure: "decaymask ms" is such a repeated call, "first ms" the first call on a new
structure (the cache emptied before each run), which walks and decides the tree.

The table of first calls times each side on a structure of its own, built for that run
(new containers, leaves and modules: nothing either side could have kept from an earlier
run), decaymask with its output cache and its memoized readings of names emptied first,
best CPU time of ``--first-repeats``; the frameworks are Equinox, Linen by names, Linen
traced (``module=``, ``args=``) or recorded (``recorded=``), NNX and Haiku. Goals: at most 1.2x the hand recipe at
50 to 1,000 leaves, at most 1.0x from 4,000, and a traced Linen call at most 2x a
names-only one.

With transformers installed, the last table times the recipe transformers' Flax
example scripts use (``decay_mask_fn``: no decay for ``bias`` nor LayerNorm params,
through ``traverse_util.flatten_dict``) on 12-layer GPT-2 and BERT params, against the
decaymask policy that gives the same mask.
"""

from __future__ import annotations

import argparse
import cProfile
import sys
import time

import _models as M
from _first_calls import (
    FIRST_FRAMEWORKS, FIRST_SIZES, first_calls, profile_first,
)

import decaymask as dm

TARGET_RATIO = 1.2
TARGET_FROM_LEAVES = 50
DEFAULT_SIZES = (50, 100, 300, 1000, 4000, 20000, 100000)
QUICK_SIZES = (50, 100, 300, 1000, 4000)
FRAMEWORKS = ("equinox", "linen", "nnx", "haiku")


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
    if framework == "haiku":
        model = M.haiku_params(depth, whole=whole)
        policy = M.haiku_policy()
        return (model, lambda: M.haiku_hand_mask(model),
                lambda: policy.for_haiku(model),
                lambda: policy.explain(model, framework="haiku"),
                None)  # Muon layouts of Haiku params by names: unknown without fn=
    raise ValueError(f"unknown framework {framework!r}; expected one of {FRAMEWORKS}")


RECIPES = {
    "equinox": "jtu.tree_map(set_mask, model, is_leaf=Linear|LayerNorm)",
    "linen": "traverse_util.path_aware_map(path[-1] == 'kernel')",
    "nnx": "nnx.iter_graph types + nnx.map_state(nnx.state(model, nnx.Param))",
    "haiku": "hk.data_structures.map(name == 'w')",
}
POLICIES = {
    "equinox": "Policy(decay(layer='linear'), decay(layer='layer_norm', param='bias'))",
    "linen": "Policy(decay(layer='linear', param='weight'))",
    "nnx": "Policy(decay(layer='linear'), decay(layer='layer_norm', param='bias'))",
    "haiku": "Policy(decay(layer='linear', param='weight'))",
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
            t_first = M.median(lambda: (forget(), ours()), args.aux_repeats, warmup=0)
            t_explain = M.median(explain, args.aux_repeats, warmup=0)
            t_dims = M.median(dims, args.aux_repeats, warmup=0) if dims else None
            ratio = t_ours / t_hand
            if leaves >= TARGET_FROM_LEAVES:
                target = "yes" if ratio <= TARGET_RATIO else "NO"
            else:
                target = "-"
            rows.append([
                f"{leaves:,}", f"{t_hand * 1e3:.1f}", f"{t_ours * 1e3:.1f}",
                f"{ratio:.2f}x", f"{t_first * 1e3:.1f}", f"{t_hand / leaves * 1e6:.1f}",
                f"{t_ours / leaves * 1e6:.1f}", f"{t_explain * 1e3:.1f}",
                "-" if t_dims is None else f"{t_dims * 1e3:.1f}", target,
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
            ["leaves", "hand ms", "decaymask ms", "ratio", "first ms", "hand us/leaf",
             "decaymask us/leaf", "explain ms", "muon dims ms",
             f"<= {TARGET_RATIO}x"],
            rows,
        ), flush=True)
    first_calls(args)
    zoo(args)
    print()
    print(f"Total {time.perf_counter() - start:.0f} s.")


def forget() -> None:
    """Empties decaymask's cache of built outputs: the next call walks the tree."""
    from decaymask import _face

    _face._built.clear()


def transformers_decay_mask_fn(params):
    """The mask of transformers' Flax example scripts: no decay for ``bias``, nor for
    the params of modules whose path names a layer norm."""
    from flax import traverse_util

    flat = traverse_util.flatten_dict(params)
    marks = ("layernorm", "layer_norm", "ln")
    norms = {path[-2:] for path in flat if any(m in "".join(path).lower() for m in marks)}
    return traverse_util.unflatten_dict(
        {path: path[-1] != "bias" and path[-2:] not in norms for path in flat}
    )


def zoo_models():
    """12-layer GPT-2 and BERT-base Flax params (tiny widths), abstract."""
    import jax
    import jax.numpy as jnp
    from transformers import BertConfig, FlaxBertModel, FlaxGPT2LMHeadModel, GPT2Config

    ids = jnp.zeros((1, 8), jnp.int32)
    positions = jnp.arange(8)[None]
    configs = {
        "GPT-2": (FlaxGPT2LMHeadModel, GPT2Config(vocab_size=64, n_positions=16, n_embd=16,
                                                  n_layer=12, n_head=2),
                  (ids, jnp.ones_like(ids), positions)),
        "BERT": (FlaxBertModel, BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=12,
                                           num_attention_heads=2, intermediate_size=32,
                                           max_position_embeddings=16),
                 (ids, jnp.ones_like(ids), jnp.zeros_like(ids), positions, jnp.ones((12, 2)))),
    }
    for name, (cls, config, args) in configs.items():
        with jax.numpy_rank_promotion("allow"):
            module = cls(config, _do_init=False).module
            variables = jax.eval_shape(module.init, jax.random.key(0), *args)
        yield name, dict(variables["params"])


def zoo(args) -> None:
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("\n(transformers is not installed: no rows for real models)")
        return
    policy = dm.Policy(dm.no_decay(param="bias"), dm.no_decay(layer="norm"), default=True)
    rows = []
    for name, params in zoo_models():
        ours = lambda: policy.for_flax(params)  # noqa: E731
        hand = lambda: transformers_decay_mask_fn(params)  # noqa: E731
        M.assert_same_mask(ours(), hand(), name)
        leaves = len(policy.explain(params))
        t_hand, t_ours = M.median_pair(hand, ours, args.repeats, args.warmup, args.min_time)
        t_first = M.median(lambda: (forget(), ours()), args.aux_repeats, warmup=0)
        ratio = t_ours / t_hand
        rows.append([name, f"{leaves:,}", f"{t_hand * 1e3:.2f}", f"{t_ours * 1e3:.2f}",
                     f"{ratio:.2f}x", f"{t_first * 1e3:.2f}",
                     "yes" if ratio <= TARGET_RATIO else "NO"])
    print()
    print("### transformers' Flax models")
    print()
    print("hand: transformers' `decay_mask_fn`; decaymask: `Policy(no_decay(param='bias'), "
          "no_decay(layer='norm'), default=True)`; masks asserted equal.")
    print()
    print(M.table(["model", "leaves", "hand ms", "decaymask ms", "ratio", "first ms",
                   f"<= {TARGET_RATIO}x"], rows), flush=True)


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
        M.print_profile(profiler, args.profile_top,
                        f"{framework}: {args.repeats} calls of decaymask at "
                        f"{args.profile_leaves} leaves")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES),
                        help="approximate parameter leaf counts (default: %(default)s)")
    parser.add_argument("--zoo-only", action="store_true",
                        help="only the table of transformers' models")
    parser.add_argument("--quick", action="store_true",
                        help=f"sizes {', '.join(map(str, QUICK_SIZES))} only")
    parser.add_argument("--frameworks", nargs="+", choices=FIRST_FRAMEWORKS,
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
    parser.add_argument("--first-only", action="store_true",
                        help="only the table of first calls")
    parser.add_argument("--first-sizes", type=int, nargs="+",
                        default=list(FIRST_SIZES),
                        help="leaf counts of the first-call table (default: %(default)s)")
    parser.add_argument("--first-repeats", type=int, default=5,
                        help="runs per first-call measurement, best kept "
                             "(default: %(default)s)")
    parser.add_argument("--profile-first", action="store_true",
                        help="print a cProfile of decaymask's first calls instead of "
                             "the table (--frameworks may name linen-traced or linen-recorded)")
    parser.add_argument("--profile", action="store_true",
                        help="print a cProfile of decaymask's call instead of the table")
    parser.add_argument("--profile-leaves", type=int, default=4000)
    parser.add_argument("--profile-top", type=int, default=20)
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes = list(QUICK_SIZES)
    M.COLLECT_DURING_RUNS = not args.no_gc
    if args.zoo_only:
        zoo(args)
        return
    if args.first_only:
        print(f"Machine: {M.environment()}")
        first_calls(args)
        return
    if args.profile_first:
        profile_first(args)
        return
    args.frameworks = [f for f in args.frameworks if f in FRAMEWORKS]
    (profile if args.profile else run)(args)


if __name__ == "__main__":
    main()
