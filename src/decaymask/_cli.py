"""``python -m decaymask``: the demo, and ``explain`` for a model factory."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any

PRESETS = ("standard", "everything_but_bias_and_norm", "gpt", "muon")
FRAMEWORKS = ("auto", "equinox", "linen", "nnx")


class CliError(Exception):
    """A command-line mistake: printed without a traceback, exit status 2."""


def _factory(spec: str) -> Any:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise CliError(
            f"expected the model factory as PKG.MODULE:FACTORY, e.g. "
            f"decaymask._demo:equinox_model; got {spec!r}."
        )
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise CliError(f"cannot import {module_name!r}: {err}") from err
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise CliError(f"{module_name!r} has no attribute {attr!r}.")
        obj = getattr(obj, part)
    if not callable(obj):
        raise CliError(f"{spec!r} is not callable: it must build and return the model.")
    return obj


def _is_linen_pair(result: Any) -> bool:
    import flax.linen as nn

    return isinstance(result, tuple) and len(result) in (2, 3) and isinstance(result[0], nn.Module)


def build_abstract(factory: Any, framework: str) -> tuple[str, Any, dict[str, Any]]:
    """The model as abstract arrays (no parameter memory), its framework, and the
    keyword arguments ``explain`` needs for it."""
    import equinox as eqx

    if framework == "nnx":
        from flax import nnx

        return "nnx", nnx.eval_shape(factory), {}
    result = eqx.filter_eval_shape(factory)
    if framework == "auto":
        if _is_linen_pair(result):
            framework = "linen"
        elif isinstance(result, eqx.Module):
            framework = "equinox"
        else:
            from flax import nnx

            if isinstance(result, nnx.Module):
                return "nnx", nnx.eval_shape(factory), {}
            raise CliError(
                f"the factory returned a {type(result).__name__}; expected an Equinox "
                f"module, an NNX module, or a Linen (module, args) pair."
            )
    if framework == "linen":
        import jax

        if not _is_linen_pair(result):
            raise CliError(
                f"for Linen the factory must return (module, args) or (module, args, "
                f"kwargs) with example inputs; got {type(result).__name__}."
            )
        module, args, *rest = result
        kwargs = rest[0] if rest else {}
        variables = jax.eval_shape(
            lambda: module.init(jax.random.key(0), *args, **kwargs)
        )
        return "linen", variables, {"module": module, "args": tuple(args), "kwargs": kwargs}
    return framework, result, {}


def _policy(args: argparse.Namespace) -> Any:
    import decaymask as dm

    if args.policy and args.preset:
        raise CliError("give --policy FILE or --preset NAME, not both.")
    if args.policy:
        return dm.Policy.from_file(args.policy, key=args.policy_key)
    return getattr(dm.presets, args.preset or "standard")()


def explain(args: argparse.Namespace) -> int:
    policy = _policy(args)
    framework, tree, kwargs = build_abstract(_factory(args.factory), args.framework)
    report = policy.explain(tree, show_dims=args.dims, **kwargs)
    if args.format == "json":
        print(report.to_json(indent=2))
    elif args.format == "markdown":
        print(report.to_markdown(), end="")
    else:
        print(f"{framework}: {args.factory}\n{policy!r}\n")
        print(report)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m decaymask",
        description="One weight-decay policy, a correct optax mask for Equinox and Flax.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="the same policy on an Equinox, a Linen and an NNX model, with adamw steps"
    )
    demo.add_argument("--steps", type=int, default=5, help="adamw steps to run (default 5)")
    ex = commands.add_parser(
        "explain",
        help="build a model abstractly (no parameter memory) and print what the policy decides",
    )
    ex.add_argument(
        "factory",
        help="PKG.MODULE:FACTORY, a function returning an Equinox module, an NNX module, "
        "or a Linen (module, args) pair",
    )
    ex.add_argument("--policy", help="a .toml, .json, .yaml or .yml file holding the policy")
    ex.add_argument("--policy-key", help="the dotted key of the policy's table in that file")
    ex.add_argument("--preset", choices=PRESETS, help="a preset policy (default: standard)")
    ex.add_argument("--framework", choices=FRAMEWORKS, default="auto")
    ex.add_argument("--format", choices=("table", "markdown", "json"), default="table")
    ex.add_argument("--dims", action="store_true", help="show Muon dimension numbers")
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            from ._demo import run

            run(steps=args.steps)
            return 0
        return explain(args)
    except CliError as err:
        print(f"python -m decaymask {args.command}: error: {err}", file=sys.stderr)
        return 2
