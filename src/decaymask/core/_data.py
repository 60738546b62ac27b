"""Policies as data: dicts, TOML, JSON and YAML files."""

from __future__ import annotations

import importlib
import json
import pathlib
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ._rules import SELECTORS, Rule, _make

if TYPE_CHECKING:
    from ._policy import Policy

_RULE_KEYS = ("decay", "label", "rate") + SELECTORS
_WHERE = "Policy.from_dict"


class PolicyDataError(ValueError):
    """Policy data that does not describe a policy; the message names the key."""


def _import(path: str, key: str) -> Any:
    """An object from ``"pkg.module:Name"`` or ``"pkg.module.Name"``."""
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise PolicyDataError(
            f"{_WHERE}: {key}: {path!r} is not an import path; write 'package.module:Name' "
            f"or 'package.module.Name'."
        )
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as err:
        raise PolicyDataError(f"{_WHERE}: {key}: cannot import {path!r}: {err}.") from err
    return obj


def _dotted(obj: Any, key: str) -> str:
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", "")
    if not module or not qualname or "<" in qualname:
        raise PolicyDataError(
            f"Policy.to_dict: {key}: {obj!r} has no import path (a lambda or a local "
            f"definition); define it at module level to write the policy as data."
        )
    return f"{module}:{qualname}"


def _layers_from_data(value: Any, key: str) -> Any:
    items = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        if isinstance(item, str) and ("." in item or ":" in item):
            cls = _import(item, key)
            if not isinstance(cls, type):
                raise PolicyDataError(f"{_WHERE}: {key}: {item!r} is not a class.")
            out.append(cls)
        else:
            out.append(item)
    return tuple(out) if isinstance(value, list) else out[0]


def _paths_from_data(value: Any, key: str) -> Any:
    items = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        if isinstance(item, Mapping):
            if set(item) != {"regex"} or not isinstance(item["regex"], str):
                raise PolicyDataError(
                    f"{_WHERE}: {key}: expected a glob string or {{regex = '...'}}, got "
                    f"{dict(item)!r}."
                )
            try:
                out.append(re.compile(item["regex"]))
            except re.error as err:
                raise PolicyDataError(f"{_WHERE}: {key}: bad regex {item['regex']!r}: {err}.") from err
        else:
            out.append(item)
    return tuple(out) if isinstance(value, list) else out[0]


def rule_from_data(data: Any, where: str) -> Rule:
    if not isinstance(data, Mapping):
        raise PolicyDataError(
            f"{_WHERE}: {where}: expected a table of rule keys, got {type(data).__name__}."
        )
    unknown = [k for k in data if k not in _RULE_KEYS]
    if unknown:
        raise PolicyDataError(
            f"{_WHERE}: {where}: unknown key {unknown[0]!r}. Valid keys: "
            f"{', '.join(_RULE_KEYS)}."
        )
    decay = data.get("decay")
    label = data.get("label")
    if decay is None and label is None:
        raise PolicyDataError(
            f"{_WHERE}: {where}: a rule needs decay = true/false, or a label."
        )
    if decay is not None and not isinstance(decay, bool):
        raise PolicyDataError(
            f"{_WHERE}: {where}.decay: expected true or false, got {decay!r}."
        )
    selectors: dict[str, Any] = {k: data[k] for k in SELECTORS if k in data}
    for key in ("layer", "within"):
        if key in selectors:
            selectors[key] = _layers_from_data(selectors[key], f"{where}.{key}")
    if "path" in selectors:
        selectors["path"] = _paths_from_data(selectors["path"], f"{where}.path")
    if "when" in selectors:
        selectors["when"] = _import(str(selectors["when"]), f"{where}.when")
    for key in ("param", "name"):
        if isinstance(selectors.get(key), list):
            selectors[key] = tuple(selectors[key])
    fn = "label" if decay is None else ("decay" if decay else "no_decay")
    extra: dict[str, Any] = {"label": label}
    if "rate" in data:
        if decay is not True:
            raise PolicyDataError(f"{_WHERE}: {where}.rate: only decay = true rules take a rate.")
        extra["rate"] = data["rate"]
    try:
        return _make(fn, decay, selectors, **extra)
    except (TypeError, ValueError) as err:
        raise PolicyDataError(f"{_WHERE}: {where}: {err}") from err


def policy_from_data(data: Any) -> tuple[list[Rule], bool, bool]:
    if not isinstance(data, Mapping):
        raise PolicyDataError(
            f"{_WHERE}: expected a mapping with 'rules' (and optionally 'default', "
            f"'strict'), got {type(data).__name__}."
        )
    unknown = [k for k in data if k not in ("rules", "default", "strict")]
    if unknown:
        raise PolicyDataError(
            f"{_WHERE}: unknown key {unknown[0]!r}. Valid keys: rules, default, strict."
        )
    rules = data.get("rules", [])
    if not isinstance(rules, list):
        raise PolicyDataError(
            f"{_WHERE}: rules: expected a list of rule tables, got {type(rules).__name__}."
        )
    flags = []
    for key in ("default", "strict"):
        value = data.get(key, False)
        if not isinstance(value, bool):
            raise PolicyDataError(f"{_WHERE}: {key}: expected true or false, got {value!r}.")
        flags.append(value)
    return [rule_from_data(r, f"rules[{i}]") for i, r in enumerate(rules)], flags[0], flags[1]


def _selector_to_data(key: str, value: Any, where: str) -> Any:
    def one(item: Any) -> Any:
        if isinstance(item, type):
            return _dotted(item, where)
        if isinstance(item, re.Pattern):
            return {"regex": item.pattern}
        if callable(item):
            return _dotted(item, where)
        return item

    if isinstance(value, tuple):
        return one(value[0]) if len(value) == 1 else [one(v) for v in value]
    return one(value)


def policy_to_data(policy: Policy) -> dict[str, Any]:
    rules = []
    for i, rule in enumerate(policy.rules):
        entry: dict[str, Any] = {}
        if rule.decay is not None:
            entry["decay"] = rule.decay
        if rule.label is not None:
            entry["label"] = rule.label
        for key in SELECTORS:
            value = getattr(rule, key)
            if value is not None:
                entry[key] = _selector_to_data(key, value, f"rules[{i}].{key}")
        if rule.rate != 1.0:
            entry["rate"] = rule.rate
        rules.append(entry)
    return {"default": policy.default, "strict": policy.strict, "rules": rules}


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
                import tomli as tomllib  # type: ignore[no-redef]
            except ImportError as err:
                raise ImportError(f"{where}: reading TOML on Python 3.10 needs: pip install tomli") from err
        data = tomllib.loads(text)
    elif suffix == ".json":
        data = json.loads(text)
    elif suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as err:
            raise ImportError(f"{where}: reading YAML needs PyYAML: pip install pyyaml") from err
        data = yaml.safe_load(text)
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
