"""Import time of decaymask in a fresh interpreter, with ``import jax`` for scale.

Each run starts a new Python process that times ``import decaymask``, records which
frameworks that import loaded (none should be: adapters load their framework on first
use), then times ``import jax`` in the same process. Median of ``--repeats`` runs after
one untimed run that warms the file system cache. ``-X importtime`` gives the slowest
modules decaymask itself pulls in.

    python benchmarks/bench_import.py
    python benchmarks/bench_import.py --repeats 51

Target: ``import decaymask`` under 50 ms.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

import _models as M

TARGET_MS = 50.0
HEAVY = ("jax", "jaxlib", "numpy", "optax", "equinox", "flax", "scipy")

CHILD = """
import json, sys, time
t = time.perf_counter()
import decaymask
t_dm = time.perf_counter() - t
loaded = sorted({m.split('.')[0] for m in sys.modules} & set(HEAVY))
t = time.perf_counter()
import jax
t_jax = time.perf_counter() - t
print(json.dumps({"decaymask": t_dm, "jax": t_jax, "loaded": loaded}))
"""


def child() -> dict:
    out = subprocess.run(
        [sys.executable, "-c", f"HEAVY = {HEAVY!r}\n{CHILD}"],
        capture_output=True, text=True, check=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def importtime(top: int):
    """The modules ``import decaymask`` itself loads (not interpreter start-up's), from
    ``-X importtime``: the slowest ``top`` by self time, their count, and the total."""
    err = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import decaymask"],
        capture_output=True, text=True, check=True,
    ).stderr
    group, groups = [], {}
    for line in err.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, cumulative_us, name = line[len("import time:"):].split("|")
        group.append((int(self_us) / 1e3, int(cumulative_us) / 1e3, name.strip()))
        # Children are printed before their parent; a top-level import closes a group.
        if not name[1:].startswith(" "):
            groups[name.strip()] = group
            group = []
    ours = groups["decaymask"]
    return sorted(ours, reverse=True)[:top], len(ours), ours[-1][1]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=21,
                        help="fresh interpreters (default: %(default)s)")
    parser.add_argument("--top", type=int, default=8,
                        help="slowest modules shown from -X importtime (default: %(default)s)")
    args = parser.parse_args(argv)

    print(f"Machine: {M.environment()}")
    child()  # warm the file system cache
    runs = [child() for _ in range(args.repeats)]
    dm = statistics.median(r["decaymask"] for r in runs) * 1e3
    jx = statistics.median(r["jax"] for r in runs) * 1e3
    loaded = sorted({m for r in runs for m in r["loaded"]})
    print(f"Median of {args.repeats} fresh interpreters.")
    print()
    print(M.table(
        ["import", "median ms", "min ms", "max ms", "target", "frameworks loaded"],
        [
            ["decaymask", f"{dm:.1f}",
             f"{min(r['decaymask'] for r in runs) * 1e3:.1f}",
             f"{max(r['decaymask'] for r in runs) * 1e3:.1f}",
             f"< {TARGET_MS:.0f} ms: {'yes' if dm < TARGET_MS else 'NO'}",
             ", ".join(loaded) or "none"],
            ["jax (after decaymask)", f"{jx:.1f}",
             f"{min(r['jax'] for r in runs) * 1e3:.1f}",
             f"{max(r['jax'] for r in runs) * 1e3:.1f}", "-", "-"],
        ],
    ))
    top, count, total = importtime(args.top)
    print()
    print(f"`python -X importtime -c 'import decaymask'`: `import decaymask` loads {count} "
          f"modules in {total:.1f} ms (one run, under the profiler's own overhead); "
          f"slowest by self time:")
    print()
    print(M.table(["module", "self ms", "cumulative ms"],
                  [[name.strip(), f"{s:.2f}", f"{c:.2f}"] for s, c, name in top]))


if __name__ == "__main__":
    main()
