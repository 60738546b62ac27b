"""Policy files: TOML, JSON and YAML read into policy data."""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping
from typing import Any

from ._imports import PolicyDataError


def read_file(path: str | pathlib.Path, key: str | None) -> Any:
    path = pathlib.Path(path)
    suffix = path.suffix.lower()
    text = path.read_text()
    where = f"Policy.from_file({str(path)!r})"
    if suffix == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            try:
                import tomli as tomllib  # type: ignore[no-redef,import-not-found,unused-ignore]
            except ImportError as err:
                raise ImportError(f"{where}: reading TOML on Python 3.10 needs: pip install tomli") from err
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise PolicyDataError(f"{where}: the file is not valid TOML: {err}.") from err
    elif suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise PolicyDataError(f"{where}: the file is not valid JSON: {err}.") from err
    elif suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as err:
            raise ImportError(f"{where}: reading YAML needs PyYAML: pip install 'decaymask[yaml]'") from err
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            # safe_load also refuses tags such as !!python/object, which would run code.
            # YAML's own message quotes the offending lines: its problem and place suffice.
            problem, mark = getattr(err, "problem", None), getattr(err, "problem_mark", None)
            said = f"{problem} (at line {mark.line + 1}, column {mark.column + 1})" if problem and mark else str(err)
            raise PolicyDataError(f"{where}: the file is not valid (safe) YAML: {said}.") from err
    else:
        raise PolicyDataError(
            f"{where}: unknown file type {suffix!r}; expected .toml, .json, .yaml or .yml."
        )
    if key:
        for part in key.split("."):
            if not isinstance(data, Mapping) or part not in data:
                raise PolicyDataError(f"{where}: no table {key!r} in the file (missing {part!r}).")
            data = data[part]
    return data
