"""The model factory the command line is given: found, imported and called, with the
user's own errors told apart from command-line mistakes."""

from __future__ import annotations

import importlib
import pathlib
import sys
from typing import Any


class CliError(Exception):
    """A command-line mistake: printed without a traceback, exit status 2."""


class FactoryError(Exception):
    """The user's own code raised (their module, or their factory): shown as theirs,
    with their traceback, then one line saying where; exit status 2."""

    def __init__(self, where: str, error: BaseException):
        super().__init__(where)
        self.where = where
        self.error = error


def _user_frames(err: BaseException) -> Any:
    """``err``'s traceback from the first frame outside decaymask and importlib."""
    tb = err.__traceback__
    while tb is not None:
        name = tb.tb_frame.f_globals.get("__name__", "")
        if not (name.startswith(("decaymask.", "importlib")) or name in ("decaymask", "__main__")):
            break
        tb = tb.tb_next
    return tb


def _module_of(spec: str, module_name: str) -> Any:
    """The module a factory lives in: a module name (the current directory first on
    the path, as ``python -m`` has it) or a file path ending in ``.py``."""
    if module_name.endswith(".py") or "/" in module_name or "\\" in module_name:
        path = pathlib.Path(module_name)
        if not path.is_file():
            raise CliError(f"{spec!r}: no file {module_name!r}.")
        from importlib import util

        name = path.stem
        spec_ = util.spec_from_file_location(name, path)
        if spec_ is None or spec_.loader is None:
            raise CliError(f"{spec!r}: {module_name!r} is not a Python file.")
        module = util.module_from_spec(spec_)
        sys.modules[name] = module
        try:
            spec_.loader.exec_module(module)
        except BaseException as err:
            sys.modules.pop(name, None)
            if isinstance(err, (KeyboardInterrupt, SystemExit)):
                raise
            raise FactoryError(f"importing {module_name}", err) from err
        return module
    if module_name.startswith("."):
        bare = module_name.lstrip(".")
        raise CliError(
            f"{spec!r}: a relative module name has no package to be relative to; write "
            f"{bare}:{spec.partition(':')[2]} (a module on the path or in the current "
            f"directory) or a file path, ./{bare.replace('.', '/')}.py:{spec.partition(':')[2]}."
        )
    here = str(pathlib.Path.cwd())
    if here not in sys.path and "" not in sys.path:
        sys.path.insert(0, here)
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and module_name.startswith(err.name):
            raise CliError(
                f"no module {module_name!r} (looked in the current directory and on the "
                f"Python path); give the module of the factory, or a file path such as "
                f"./my_models.py:{spec.partition(':')[2]}."
            ) from err
        raise FactoryError(f"importing {module_name}", err) from err
    except Exception as err:  # the module's own code: a syntax error, a name error
        raise FactoryError(f"importing {module_name}", err) from err


def _factory(spec: str) -> Any:
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise CliError(
            f"expected the model factory as PKG.MODULE:FACTORY or path/to/file.py:FACTORY, "
            f"e.g. decaymask._demo:equinox_model; got {spec!r}."
        )
    obj: Any = _module_of(spec, module_name)
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise CliError(f"{module_name!r} has no attribute {attr!r}.")
        obj = getattr(obj, part)
    if not callable(obj):
        raise CliError(f"{spec!r} is not callable: it must build and return the model.")
    import inspect

    try:
        inspect.signature(obj).bind()
    except TypeError:
        raise CliError(
            f"{spec!r} takes arguments {inspect.signature(obj)}; the factory is called "
            f"with none. Give a function that builds the model by itself (e.g. one that "
            f"calls this one with its arguments)."
        ) from None
    except ValueError:  # no signature to read (a builtin): call it and see
        pass
    return _Reported(spec, obj)


class _Reported:
    """A factory whose own exceptions are reported as the user's."""

    def __init__(self, spec: str, fn: Any):
        self.spec = spec
        self.fn = fn

    def __call__(self) -> Any:
        try:
            return self.fn()
        except Exception as err:
            if isinstance(err, ImportError) or _is_tracer_error(err):
                # A framework that is not installed has its own message; a concrete
                # step is retried outside the abstract build.
                raise
            raise FactoryError(f"calling {self.spec}", err) from err


def _is_tracer_error(err: BaseException) -> bool:
    errors = sys.modules.get("jax.errors")
    if errors is None:
        return False
    kinds = tuple(
        getattr(errors, name)
        for name in (
            "TracerArrayConversionError",
            "ConcretizationTypeError",
            "TracerBoolConversionError",
            "TracerIntegerConversionError",
        )
        if hasattr(errors, name)
    )
    return isinstance(err, kinds)
