"""First calls: decaymask cold (no output cache, no memoized name readings) on
structures it has never seen, against the hand recipes; the table and a profile.
Used by ``bench_build.py``."""

from __future__ import annotations

import cProfile
import sys
import time

import _models as M

FIRST_SIZES = (50, 100, 300, 1000, 4000)
FIRST_FRAMEWORKS = ("equinox", "linen", "linen-traced", "linen-recorded", "nnx", "haiku")
FIRST_TARGETS = ((50, 1000, 1.2), (4000, None, 1.0))  # (from, to leaves, at most)
TRACED_TARGET = 2.0  # a traced Linen first call, at most this many times a names-only one


def forget() -> None:
    """Empties decaymask's cache of built outputs."""
    from decaymask import _face

    _face._built.clear()



def cold() -> None:
    """Forgets everything decaymask keeps between calls: its built outputs, its
    memoized readings of names (functools caches and the name tables of the Haiku and
    NNX adapters), so the next call costs what a process's first call costs."""
    forget()
    for name, module in list(sys.modules.items()):
        if name != "decaymask" and not name.startswith("decaymask."):
            continue
        for value in list(vars(module).values()):
            if getattr(value, "__module__", None) == name and hasattr(value, "cache_clear"):
                value.cache_clear()
    for name, table in (("decaymask.adapters._haiku_segments", "_segments"),
                        ("decaymask.adapters._haiku_segments", "_numbered"),
                        ("decaymask.adapters._haiku_segments", "_numbered_segments"),
                        ("decaymask.adapters._nnx._by_name", "_name_layers"),
                        ("decaymask.adapters._linen._signature", "traits_of")):
        found = getattr(sys.modules.get(name), table, None)
        if found is not None:
            found.clear()


def first_case(framework: str, leaves: int, whole: bool = False):
    """``make`` (a new structure, never seen: new containers, new leaves, new modules),
    the hand recipe and decaymask's call, both taking what ``make`` returns."""
    depth = M.depth_for(leaves)
    if framework == "equinox":
        policy = M.equinox_policy()
        return (lambda: M.equinox_model(depth, whole=whole), M.equinox_hand_mask,
                policy.for_equinox)
    if framework == "nnx":
        policy = M.nnx_policy()
        return lambda: M.nnx_model(depth, whole=whole), M.nnx_hand_mask, policy.for_flax
    if framework == "haiku":
        base = M.haiku_params(depth, whole=whole)
        policy = M.haiku_policy()
        return lambda: M._fresh(base), M.haiku_hand_mask, policy.for_haiku
    base = M.linen_params(depth, whole=whole)
    policy = M.linen_policy()
    if framework == "linen":
        return lambda: M._fresh(base), M.linen_hand_mask, policy.for_flax
    if framework == "linen-traced":
        import jax.numpy as jnp

        tokens = jnp.zeros((1, 4), jnp.int32)
        return (lambda: (M._fresh(base), M.linen_module(depth)),
                lambda made: M.linen_hand_mask(made[0]),
                lambda made: policy.for_flax(made[0], module=made[1], args=(tokens,)))
    if framework == "linen-recorded":
        seen = _recording(depth)
        return (lambda: (M._fresh(base), seen),
                lambda made: M.linen_hand_mask(made[0]),
                lambda made: policy.for_flax(made[0], recorded=made[1]))
    raise ValueError(f"unknown framework {framework!r}; expected one of {FIRST_FRAMEWORKS}")


def _recording(depth: int):
    """A ``dm.record()`` block around the model's own (abstract) init: what a program
    that records the init it runs anyway hands ``recorded=``."""
    import jax
    import jax.numpy as jnp

    import decaymask as dm

    tokens = jnp.zeros((1, 4), jnp.int32)
    with dm.record() as seen:
        jax.eval_shape(M.linen_module(depth).init, jax.random.key(0), tokens)
    return seen


def cpu_timed(fn) -> float:
    """CPU seconds of one call, after a full collection (the collector stays on)."""
    import gc

    gc.collect()
    start = time.process_time()
    fn()
    return time.process_time() - start


def first_pair(make, hand, ours, repeats: int) -> tuple[float, float, float]:
    """Best CPU seconds of the hand recipe, of decaymask cold, and of decaymask with
    only its output cache emptied (the names met before still known), each on a
    structure of its own made for that run; alternating."""
    t_hand, t_cold, t_named = [], [], []
    for i in range(repeats):
        a, b, c = make(), make(), make()
        runs = [lambda: t_hand.append(cpu_timed(lambda: hand(a))),
                lambda: (cold(), t_cold.append(cpu_timed(lambda: ours(b)))),
                lambda: (forget(), t_named.append(cpu_timed(lambda: ours(c))))]
        for one in (runs if i % 2 == 0 else runs[::-1]):
            one()
    return min(t_hand), min(t_cold), min(t_named)


def first_target(leaves: int) -> float | None:
    for low, high, at_most in FIRST_TARGETS:
        if leaves >= low and (high is None or leaves <= high):
            return at_most
    return None


def first_calls(args) -> None:
    """The table of first calls: cold decaymask on structures it has never seen."""
    rows = []
    start = time.perf_counter()
    names_only: dict[int, float] = {}
    frameworks = [f for f in FIRST_FRAMEWORKS
                  if f in args.frameworks or (f.startswith("linen-") and "linen" in args.frameworks)]
    for framework in frameworks:
        for size in args.first_sizes:
            make, hand, ours = first_case(framework, size, args.whole)
            sample = make()
            cold()
            M.assert_same_mask(ours(sample), hand(sample), f"{framework} at {size} leaves")
            tree = sample[0] if framework.startswith("linen-") else sample
            leaves = M.count_leaves(tree if framework != "nnx" else _nnx_params(tree))
            del sample, tree
            t_hand, t_ours, t_named = first_pair(make, hand, ours, args.first_repeats)
            ratio = t_ours / t_hand
            target = first_target(leaves)
            met = "-" if target is None else ("yes" if ratio <= target else "NO")
            traced = init = "-"
            if framework == "linen":
                names_only[size] = t_ours
            elif framework.startswith("linen-"):
                if framework == "linen-traced":
                    init = f"{init_trace(size, args.first_repeats) * 1e3:.1f}"
                if size in names_only:
                    over = t_ours / names_only[size]
                    traced = f"{over:.1f}x ({'yes' if over <= TRACED_TARGET else 'NO'})"
            rows.append([framework, f"{leaves:,}", f"{t_hand * 1e3:.1f}",
                         f"{t_ours * 1e3:.1f}", f"{ratio:.2f}x",
                         f"{t_named * 1e3:.1f} ({t_named / t_hand:.2f}x)",
                         "-" if target is None else f"{target:.1f}x", met, traced, init])
            print(f"  [first calls, {framework} {leaves} leaves: "
                  f"{time.perf_counter() - start:.0f} s so far]", file=sys.stderr, flush=True)
    print()
    print("### first calls")
    print()
    print(f"Best CPU time of {args.first_repeats} runs, each side on a structure of its "
          f"own built for that run (new containers, leaves and modules), decaymask's "
          f"output cache and name caches emptied before each of its runs. Hand recipes "
          f"as above; linen-traced is `for_flax(params, module=model, args=(tokens,))` "
          f"and linen-recorded `for_flax(params, recorded=seen)` after a `dm.record()` "
          f"block around the model's own init, against the same hand recipe, their "
          f"\"traced / names-only\" column against the names-only first "
          f"call (goal: at most {TRACED_TARGET:g}x); \"names known\" is decaymask with "
          f"only its output cache emptied: the module and key names read in earlier runs "
          f"still known, as in a process that has built a mask before; \"init trace ms\" is "
          f"`jax.eval_shape(model.init, key, tokens)` alone, which the traced call runs.")
    print()
    print(M.table(["framework", "leaves", "hand ms", "decaymask ms", "ratio",
                   "names known ms", "goal",
                   "met", "traced / names-only", "init trace ms"], rows), flush=True)


def init_trace(leaves: int, repeats: int) -> float:
    """Best CPU seconds of Flax's own abstract ``init`` of a new Linen model."""
    import jax
    import jax.numpy as jnp

    tokens = jnp.zeros((1, 4), jnp.int32)
    depth = M.depth_for(leaves)
    return min(
        cpu_timed(lambda: jax.eval_shape(M.linen_module(depth).init, jax.random.key(0), tokens))
        for _ in range(repeats)
    )


def _nnx_params(model):
    from flax import nnx

    return nnx.state(model, nnx.Param)


def profile_first(args) -> None:
    print(f"Machine: {M.environment()}")
    for framework in args.frameworks:
        make, _, ours = first_case(framework, args.profile_leaves, args.whole)
        made = [make() for _ in range(args.repeats)]
        profiler = cProfile.Profile()
        for one in made:
            cold()
            profiler.enable()
            ours(one)
            profiler.disable()
        M.print_profile(profiler, args.profile_top,
                        f"{framework}: {args.repeats} first calls of decaymask at "
                        f"{args.profile_leaves} leaves")
