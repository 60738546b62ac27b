"""Prints the zoo table: per model and mode, the leaves and, per preset, how many leaves
decaymask decides differently from the reference (and the first few of them).

Run from the repository root: ``python -m tests.zoo.table [--show N] [model ...]``.
"""

from __future__ import annotations

import argparse
import warnings

import jax

import decaymask as dm

from . import compare
from . import reference as ref
from .models import MODELS, build


def _cell(fn, show: int) -> tuple[str, list[str]]:
    try:
        diffs = fn()
    except Exception as err:  # the table reports an error instead of stopping
        return "error", [f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"]
    return str(len(diffs)), [
        f"{d.path} (ref {d.label.kind}/{d.label.role}: {d.expected}, got {d.got})"
        for d in diffs[:show]
    ]


def _warning_counts(name: str, mode: str) -> str:
    """PolicyWarnings of each preset's mask, as std/ebbn/gpt/muon."""
    counts = []
    for preset in compare.PRESETS.values():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                compare.call(preset(), build(name), mode, "mask")
            except Exception:
                pass
        counts.append(sum(issubclass(w.category, dm.PolicyWarning) for w in caught))
    return "/".join(map(str, counts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=list(MODELS))
    parser.add_argument("--show", type=int, default=3, help="differing paths shown per cell")
    args = parser.parse_args()

    presets = list(compare.PRESETS)
    short = {"standard": "std", "everything_but_bias_and_norm": "ebbn", "gpt": "gpt",
             "muon": "muon"}
    header = ["model", "mode", "leaves", *[short[p] for p in presets], "muon dims", "warnings"]
    rows, notes = [], []
    with jax.numpy_rank_promotion("allow"):
        for name in args.models:
            built = build(name)
            leaves = len(ref.array_leaves(built.tree))
            for mode in compare.modes(built):
                cells = []
                for preset in presets:
                    count, shown = _cell(
                        lambda: compare.mask_differences(name, mode, preset), args.show
                    )
                    cells.append(count)
                    notes += [f"{name} {mode} {short[preset]}: {s}" for s in shown]
                count, shown = _cell(lambda: compare.muon_dims_differences(name, mode), args.show)
                cells.append(count)
                notes += [f"{name} {mode} dims: {s}" for s in shown]
                rows.append([name, mode, str(leaves), *cells, _warning_counts(name, mode)])

    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    print()
    print(f"std = standard, ebbn = everything_but_bias_and_norm; cells count leaves whose "
          f"decision differs from the reference (muon dims: leaves whose dimension numbers "
          f"differ, or the error); warnings = PolicyWarnings of each preset's mask "
          f"(std/ebbn/gpt/muon). First {args.show} differences per cell:")
    for note in notes:
        print("  " + note)


if __name__ == "__main__":
    main()
