"""Command line: ``python -m decaymask demo``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m decaymask",
        description="One weight-decay policy, a correct optax mask for Equinox and Flax.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="show a policy, its explain table, real adamw steps")
    demo.add_argument("--steps", type=int, default=5, help="adamw steps to run (default 5)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from ._demo import run

        run(steps=args.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
