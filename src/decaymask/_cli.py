"""The command line (``decaymask`` or ``python -m decaymask``): the demo, and ``explain``
for a model factory.

Every mistake on the command line or in a policy file is one line on stderr and exit
status 2; only a failure inside the user's own factory shows its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import pathlib
import sys
from typing import Any, NoReturn

from ._factories import CliError, FactoryError, _factory, _is_tracer_error, _user_frames
from .core._text import visible

PRESETS = ("standard", "everything_but_bias_and_norm", "gpt", "muon", "vit_finetune", "dinov2")


def _adapters() -> dict[str, Any]:
    """The adapters whose models the CLI builds, by name: those whose factory returns
    the model first, then those whose factory returns more, each in the registry's order."""
    from . import adapters

    found = [a for a in adapters.registered() if a.factory_result]
    return {a.name: a for a in sorted(found, key=lambda a: bool(a.factory_shape))}


def adapters_all() -> list[Any]:
    """Every registered adapter, in the registry's order."""
    from . import adapters

    return list(adapters.registered())


def frameworks() -> tuple[str, ...]:
    """The choices of ``--framework``: ``auto``, then every adapter the CLI builds for."""
    return ("auto", *sorted(_adapters()))


def _prog() -> str:
    return "decaymask" if pathlib.Path(sys.argv[0]).name == "decaymask" else "python -m decaymask"


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


class _Parser(argparse.ArgumentParser):
    """Usage mistakes are one line too, pointing at ``--help``."""

    def error(self, message: str) -> NoReturn:
        shown = visible(_one_line(message))
        self.exit(2, f"{self.prog}: error: {shown} (see {self.prog} --help)\n")


def _require(framework: str) -> None:
    """Imports the framework a forced ``--framework`` needs, or says how to install it."""
    adapter = _adapters()[framework]
    if not adapter.installed():
        raise CliError(
            f"--framework {framework} needs {adapter.package}, which is not "
            f"installed: pip install 'decaymask[{adapter.extra}]'."
        )


def _kind_of(result: Any) -> str | None:
    """The framework of a factory's result, read off the classes already imported (a
    framework the factory did not import cannot have built it)."""
    for name, adapter in _adapters().items():
        if adapter.factory_model(result):
            return name
    return None


def _is_array(x: Any) -> bool:
    import jax
    import numpy as np

    return isinstance(x, (jax.Array, np.ndarray, np.generic))


def _eval_shape(factory: Any) -> Any:
    """``factory()`` under ``jax.eval_shape``: arrays come back as ``jax.ShapeDtypeStruct``,
    everything else (modules, functions, ints) as built. Needs jax alone, so it works in
    an install with only one framework."""
    import jax

    built: list[Any] = []

    def arrays_only() -> list[Any]:
        leaves, treedef = jax.tree_util.tree_flatten(factory())
        dynamic = [_is_array(x) for x in leaves]
        built.append((treedef, dynamic, [None if d else x for x, d in zip(leaves, dynamic)]))
        return [x for x, d in zip(leaves, dynamic) if d]

    arrays = iter(jax.eval_shape(arrays_only))
    treedef, dynamic, static = built[0]
    return jax.tree_util.tree_unflatten(
        treedef, [next(arrays) if d else x for d, x in zip(dynamic, static)]
    )


@dataclasses.dataclass
class Built:
    """A built model: its framework, the tree ``explain`` reads, the keyword arguments
    ``explain`` needs for it, and how it was built (``"abstract"`` or ``"concrete"``)."""

    framework: str
    tree: Any
    kwargs: dict[str, Any]
    build: str


def build(factory: Any, framework: str = "auto", concrete: bool = False) -> Built:
    """Builds the factory's model, abstractly (no parameter memory) unless ``concrete``.

    Raises:
      CliError: a forced framework is not installed or does not fit what the factory
        returned, or the result is no model decaymask reads.
    """
    if framework != "auto":
        _require(framework)
    result = factory() if concrete else _eval_shape(factory)
    found = _kind_of(result)
    known = _adapters()
    forced = known.get(framework)
    if forced is not None and forced.factory_shape and found is None:
        raise CliError(f"{forced.factory_shape}; got {type(result).__name__}.")
    if found is None:
        raise CliError(
            f"the factory returned a {type(result).__name__}; expected "
            f"{_listed([a.factory_result for a in known.values()])}."
        )
    if forced is not None and found != framework:
        raise CliError(
            f"--framework {framework}: the factory returned {known[found].factory_result}, "
            f"not {forced.factory_result}; give --framework {found} or leave --framework out."
        )
    tree, options = known[found].build_model(factory, result, concrete)
    return Built(found, tree, options, "concrete" if concrete else "abstract")


def _listed(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + ", or " + items[-1]


def build_abstract(factory: Any, framework: str) -> tuple[str, Any, dict[str, Any]]:
    """The model as abstract arrays (no parameter memory), its framework, and the
    keyword arguments ``explain`` needs for it."""
    built = build(factory, framework)
    return built.framework, built.tree, built.kwargs


def _policy(args: argparse.Namespace) -> Any:
    import decaymask as dm

    if args.policy and args.preset:
        raise CliError("give --policy FILE or --preset NAME, not both.")
    if args.policy_key and not args.policy:
        raise CliError(
            f"--policy-key {args.policy_key} names a table in a policy file: give the file "
            f"with --policy FILE."
        )
    if not args.policy:
        return getattr(dm.presets, args.preset or "standard")()
    path = pathlib.Path(args.policy)
    if not path.is_file():
        raise CliError(
            f"no policy file {args.policy!r} "
            f"({'it is a directory' if path.is_dir() else 'not found'}); expected a .toml, "
            f".json, .yaml or .yml file."
        )
    try:
        return dm.Policy.from_file(path, key=args.policy_key, imports=tuple(args.imports or ()))
    except (dm.PolicyDataError, ImportError) as err:
        message = _one_line(str(err))
        if args.policy not in message:
            message = f"{args.policy}: {message}"
        if "If you trust this data, allow it" in message:
            message += " On the command line: --imports PACKAGE."
        raise CliError(message) from err
    except Exception as err:  # the file's own syntax: TOML, JSON or YAML errors
        raise CliError(
            f"cannot read the policy file {args.policy!r}: {type(err).__name__}: "
            f"{_syntax_error(err)}"
        ) from err


def _syntax_error(err: Exception) -> str:
    # YAML's messages quote the offending lines; its problem and position are enough.
    problem, mark = getattr(err, "problem", None), getattr(err, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} (at line {mark.line + 1}, column {mark.column + 1})"
    return _one_line(str(err))


def _missing(spec: str, err: ImportError) -> str:
    from . import adapters

    top = (err.name or "").split(".")[0]
    extra = next((a.extra for a in adapters.registered() if a.package == top), None)
    fix = f": pip install 'decaymask[{extra}]'" if extra else ""
    return f"the factory {spec} imports {top or 'a module'}, which is not installed{fix} ({err})"


def explain(args: argparse.Namespace) -> int:
    # The model's module first: a policy file may name classes of the modules it imports.
    factory = _factory(args.factory)
    policy = _policy(args)
    try:
        built = build(factory, args.framework, concrete=args.concrete)
    except ImportError as err:
        raise CliError(_missing(args.factory, err)) from err
    except Exception as err:
        if args.concrete or not _is_tracer_error(err):
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        print(
            f"{_prog()} explain: note: the abstract build failed ({type(err).__name__}: "
            f"{visible(first)}); building concretely instead, with parameter memory. Give "
            f"--concrete to skip the abstract attempt.",
            file=sys.stderr,
        )
        built = build(factory, args.framework, concrete=True)
    try:
        report = policy.explain(
            built.tree, framework=built.framework, show_dims=args.dims, **built.kwargs
        )
    except (ImportError, ValueError) as err:
        # The policy's own errors (a file, a strict rule, layer-decay blocks that
        # cannot be found) say what to fix in one message.
        raise CliError(_one_line(str(err))) from err
    if args.format == "json":
        print(report.to_json(indent=2))
    elif args.format == "markdown":
        print(report.to_markdown(), end="")
    else:
        how = " (built concretely)" if built.build == "concrete" else ""
        print(f"{built.framework}: {args.factory}{how}\n{policy!r}\n")
        print(report)
    return 0


def _demo(steps: int) -> int:
    for name in ("equinox", "flax"):
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise CliError(
                f"the demo runs one model in Equinox, Linen and NNX and needs both "
                f"frameworks; {name} is not installed: pip install 'decaymask[all]'. "
                f"'explain' works with either one alone."
            ) from err
    from ._demo import run

    run(steps=steps)
    return 0


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    prog = _prog()
    parser = _Parser(
        prog=prog,
        description="One weight-decay policy, a correct optax mask for "
        + _listed([a.title for a in adapters_all()]).replace(", or ", " and ")
        + ".",
    )
    parser.add_argument("--version", action="version", version=f"decaymask {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
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
        help="PKG.MODULE:FACTORY, a function returning "
        + _listed([a.factory_result for a in _adapters().values()]),
    )
    ex.add_argument("--policy", help="a .toml, .json, .yaml or .yml file holding the policy")
    ex.add_argument("--policy-key", help="the dotted key of the policy's table in that file")
    ex.add_argument(
        "--imports",
        action="append",
        metavar="PACKAGE",
        help="a package whose modules the policy file's class paths may import (importing "
        "runs its code; repeat for several)",
    )
    ex.add_argument("--preset", choices=PRESETS, help="a preset policy (default: standard)")
    ex.add_argument(
        "--framework",
        choices=frameworks(),
        default="auto",
        help="the framework the factory's result must be (default: read off the result)",
    )
    ex.add_argument("--format", choices=("table", "markdown", "json"), default="table")
    ex.add_argument("--dims", action="store_true", help="show Muon dimension numbers")
    ex.add_argument(
        "--concrete",
        action="store_true",
        help="build the model for real (parameter memory allocated) instead of abstractly; "
        "used by itself, with a note, where the abstract build fails",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "demo":
            return _demo(args.steps)
        return explain(args)
    except CliError as err:
        # A policy file's keys and a tree's names may hold escape sequences.
        print(f"{_prog()} {args.command}: error: {visible(str(err))}", file=sys.stderr)
        return 2
    except FactoryError as err:
        import traceback

        error = err.error
        traceback.print_exception(type(error), error, _user_frames(error), file=sys.stderr)
        print(
            f"{_prog()} {args.command}: error: {visible(str(err.where))} raised "
            f"{type(error).__name__} (its traceback is above): fix the model code.",
            file=sys.stderr,
        )
        return 2
