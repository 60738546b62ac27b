"""Policies as data: dicts, TOML, JSON and YAML files."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ._bounds import check_shape
from ._imports import _WHERE, PolicyDataError, _dotted, _import, _shown, _unknown_key, check_imports
from ._regex import backtracking
from ._ladder import LayerDecay, check_layer_decay_rate, layer_decay
from ._rules import SELECTORS, Rule, _make, check_multiplier, check_rate, type_name

if TYPE_CHECKING:
    from ._policy import Policy

_RULE_KEYS = ("decay", "label", "rate", "lr", "freeze") + SELECTORS
_LAYER_DECAY_KEYS = ("rate", "blocks", "stem")
_POLICY_KEYS = ("rules", "default", "strict", "layer_decay")


# Flags a compiled pattern keeps through to_dict/from_dict, by their names in `re`.
# UNICODE is left out: every str pattern has it.
_FLAGS = ("ASCII", "IGNORECASE", "LOCALE", "MULTILINE", "DOTALL", "VERBOSE")


def _layers_from_data(value: Any, key: str, imports: bool | tuple[str, ...]) -> Any:
    items = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        if isinstance(item, str) and ("." in item or ":" in item):
            cls = _import(item, key, imports)
            if not isinstance(cls, type):
                raise PolicyDataError(
                    f"{_WHERE}: {key}: {_shown(item)} is not a class ({type_name(cls)})."
                )
            out.append(cls)
        else:
            out.append(item)
    return tuple(out) if isinstance(value, list) else out[0]


def _paths_from_data(value: Any, key: str) -> Any:
    items = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        if isinstance(item, Mapping):
            if (
                "regex" not in item
                or not set(item) <= {"regex", "flags"}
                or not isinstance(item["regex"], str)
            ):
                raise PolicyDataError(
                    f"{_WHERE}: {key}: expected a glob string or {{regex = '...'}} "
                    f"(optionally with flags = ['IGNORECASE', ...]), got {_shown(item)}."
                )
            flags = _flags_from_data(item.get("flags", []), f"{key}.flags")
            try:
                pattern = re.compile(item["regex"], flags)
            except (re.error, ValueError, RecursionError, OverflowError) as err:
                raise PolicyDataError(
                    f"{_WHERE}: {key}: bad regex {_shown(item['regex'])}: {err}."
                ) from err
            _check_backtracking(item["regex"], flags, key)
            out.append(pattern)
        else:
            out.append(item)
    return tuple(out) if isinstance(value, list) else out[0]


def _check_backtracking(regex: str, flags: int, key: str) -> None:
    """Refuses a regex whose search can take exponential time: data must never hang a
    build (Python's ``re`` has no timeout)."""
    why = backtracking(regex, flags)
    if why is not None:
        raise PolicyDataError(
            f"{_WHERE}: {key}: the regex {_shown(regex)} {why}; searched in a parameter "
            f"path it can run for hours, so policy data may not hold it. Fix: write the "
            f"path as a glob ('encoder/*/kernel'), or a simpler regex, or keep what a "
            f"repeat matched with a possessive quantifier or an atomic group ('a*+', "
            f"'\\d++', '(?>a*)*'), which never give it back."
        )


def _flags_from_data(value: Any, key: str) -> int:
    names = value if isinstance(value, list) else None
    if names is None or not all(isinstance(n, str) and n in _FLAGS for n in names):
        raise PolicyDataError(
            f"{_WHERE}: {key}: expected a list of re flag names ({', '.join(_FLAGS)}), "
            f"got {_shown(value)}."
        )
    flags = 0
    for name in names:
        flags |= getattr(re, name)
    return flags


def rule_from_data(data: Any, where: str, imports: bool | tuple[str, ...] = ()) -> Rule:
    if not isinstance(data, Mapping):
        raise PolicyDataError(
            f"{_WHERE}: {where}: expected a table of rule keys, got {type(data).__name__}."
        )
    if "layer_decay" in data:
        raise PolicyDataError(
            f"{_WHERE}: {where}: layer_decay is not a rule key; it is a key of the policy "
            f"itself, beside rules: layer_decay = {{rate = 0.75}}."
        )
    unknown = [k for k in data if k not in _RULE_KEYS]
    if unknown:
        raise _unknown_key(f"{where}: ", unknown[0], _RULE_KEYS)
    for k in _RULE_KEYS:
        if k in data and data[k] is None:
            raise PolicyDataError(
                f"{_WHERE}: {where}.{k}: null (no value); give {k} a value or leave the "
                f"key out."
            )
    decay = data.get("decay")
    label = data.get("label")
    actions = [k for k in ("decay", "label", "lr", "freeze") if k in data]
    if not actions:
        raise PolicyDataError(
            f"{_WHERE}: {where}: a rule needs decay = true/false, a label, lr = "
            f"<multiplier>, or freeze = true/false."
        )
    if len(actions) > 1 and not set(actions) <= {"decay", "label"}:
        raise PolicyDataError(
            f"{_WHERE}: {where}: {' and '.join(actions)} in one rule; an lr or freeze "
            f"rule stands alone: write one rule for each, with the same selectors."
        )
    if decay is not None and not isinstance(decay, bool):
        raise PolicyDataError(
            f"{_WHERE}: {where}.decay: expected true or false, got {_shown(decay)}."
        )
    if "rate" in data and decay is not True:
        raise PolicyDataError(
            f"{_WHERE}: {where}.rate: only decay = true rules take a rate."
            + (
                " A rate multiplies weight decay; the learning-rate multiplier is lr itself."
                if "lr" in data
                else ""
            )
        )
    lr_value = None
    if "lr" in data:
        try:
            lr_value = check_multiplier(
                data["lr"],
                where=f"{_WHERE}: {where}.lr",
                freeze="write freeze = true in place of lr (no update, no optimizer state, no decay)",
            )
        except (TypeError, ValueError) as err:
            raise PolicyDataError(str(err)) from None
    if "freeze" in data and not isinstance(data["freeze"], bool):
        raise PolicyDataError(
            f"{_WHERE}: {where}.freeze: expected true (freeze) or false (unfreeze), "
            f"got {_shown(data['freeze'])}."
        )
    selectors: dict[str, Any] = {k: data[k] for k in SELECTORS if k in data}
    for key in ("layer", "within"):
        if key in selectors:
            selectors[key] = _layers_from_data(selectors[key], f"{where}.{key}", imports)
    if "path" in selectors:
        selectors["path"] = _paths_from_data(selectors["path"], f"{where}.path")
    if "when" in selectors:
        if not isinstance(selectors["when"], str):
            raise PolicyDataError(
                f"{_WHERE}: {where}.when: expected the import path of a function, "
                f"'package.module:function', got {_shown(selectors['when'])} "
                f"({type_name(selectors['when'])})."
            )
        selectors["when"] = _import(selectors["when"], f"{where}.when", imports)
    for key in ("param", "name"):
        if isinstance(selectors.get(key), list):
            selectors[key] = tuple(selectors[key])
    from ._group_rules import freeze, lr, unfreeze

    try:
        if lr_value is not None:
            return lr(lr_value, **selectors)
        if "freeze" in data:
            return (freeze if data["freeze"] else unfreeze)(**selectors)
        fn = "label" if decay is None else ("decay" if decay else "no_decay")
        extra: dict[str, Any] = {"label": label}
        if "rate" in data:
            try:
                extra["rate"] = check_rate("decay", data["rate"])
            except TypeError as err:
                raise PolicyDataError(f"{_WHERE}: {where}.rate: {err}") from err
        return _make(fn, decay, selectors, **extra)
    except PolicyDataError:
        raise
    except (TypeError, ValueError) as err:
        raise PolicyDataError(f"{_WHERE}: {where}: {err}") from err


def _module_selectors_from_data(value: Any, key: str, imports: bool | tuple[str, ...]) -> Any:
    """``blocks``/``stem``: a kind or glob, a class as ``"package.module:Class"``, or a
    list of those."""
    items = value if isinstance(value, list) else [value]
    name = key.rpartition(".")[2]
    if not items:
        raise PolicyDataError(
            f"{_WHERE}: {key}: an empty list selects nothing; leave {name} out"
            + (" to use the one repeated stack." if name == "blocks" else ".")
        )
    out: list[str | type] = []
    for item in items:
        if not isinstance(item, str):
            raise PolicyDataError(
                f"{_WHERE}: {key}: expected a layer kind, a glob over module paths or a "
                f"class import path ('package.module:Class'), or a list of those; got "
                f"{_shown(item)} ({type_name(item)})."
            )
        if not item:
            raise PolicyDataError(
                f"{_WHERE}: {key}: an empty glob selects nothing; give a glob such as "
                f"'encoder/layers/*', or leave {name} out."
            )
        if ":" in item:
            cls = _import(item, key, imports)
            if not isinstance(cls, type):
                raise PolicyDataError(
                    f"{_WHERE}: {key}: {_shown(item)} is not a class ({type_name(cls)}); "
                    f"{name} takes module classes."
                )
            out.append(cls)
        else:
            out.append(item)
    return tuple(out) if isinstance(value, list) else out[0]


def _layer_decay_rate(value: Any, where: str) -> float:
    try:
        return check_layer_decay_rate(value, where=f"{_WHERE}: {where}")
    except (TypeError, ValueError) as err:
        raise PolicyDataError(str(err)) from None


def layer_decay_from_data(data: Any, imports: bool | tuple[str, ...]) -> LayerDecay:
    where = "layer_decay"
    if isinstance(data, (int, float)) and not isinstance(data, bool):
        # layer_decay = 0.75: the rate alone.
        return layer_decay(_layer_decay_rate(data, where))
    if not isinstance(data, Mapping):
        raise PolicyDataError(
            f"{_WHERE}: {where}: expected a table with rate (and optionally blocks, "
            f"stem), e.g. layer_decay = {{rate = 0.75}}, got {_shown(data)} "
            f"({type_name(data)})."
        )
    unknown = [k for k in data if k not in _LAYER_DECAY_KEYS]
    if unknown:
        raise _unknown_key(f"{where}: ", unknown[0], _LAYER_DECAY_KEYS)
    for key in _LAYER_DECAY_KEYS:
        if key in data and data[key] is None:
            fix = "e.g. rate = 0.75" if key == "rate" else "or leave the key out"
            raise PolicyDataError(
                f"{_WHERE}: {where}.{key}: null (no value); give {key} a value, {fix}."
            )
    if "rate" not in data:
        raise PolicyDataError(f"{_WHERE}: {where}: rate is missing, e.g. rate = 0.75.")
    rate = _layer_decay_rate(data["rate"], f"{where}.rate")
    options = {}
    for key in ("blocks", "stem"):
        if key in data:
            options[key] = _module_selectors_from_data(data[key], f"{where}.{key}", imports)
    return layer_decay(rate, **options)


def layer_decay_to_data(config: LayerDecay) -> dict[str, Any]:
    out: dict[str, Any] = {"rate": config.rate}
    for key in ("blocks", "stem"):
        value = getattr(config, key)
        if value is not None:
            items = [_dotted(v, f"layer_decay.{key}") if isinstance(v, type) else v for v in value]
            out[key] = items[0] if len(items) == 1 else items
    return out


def policy_from_data(data: Any, *, imports: Any = ()) -> tuple[list[Rule | LayerDecay], bool, bool]:
    allowed = check_imports("Policy.from_dict", imports)
    check_shape(data, _WHERE)
    if not isinstance(data, Mapping):
        raise PolicyDataError(
            f"{_WHERE}: expected a mapping with 'rules' (and optionally 'default', "
            f"'strict', 'layer_decay'), got {type(data).__name__}."
        )
    unknown = [k for k in data if k not in _POLICY_KEYS]
    if unknown:
        raise _unknown_key("", unknown[0], _POLICY_KEYS)
    rules = data.get("rules", [])
    if not isinstance(rules, list):
        raise PolicyDataError(
            f"{_WHERE}: rules: expected a list of rule tables, got {type(rules).__name__}."
        )
    flags = []
    for key in ("default", "strict"):
        value = data.get(key, False)
        if not isinstance(value, bool):
            raise PolicyDataError(
                f"{_WHERE}: {key}: expected true or false, got {_shown(value)}."
            )
        flags.append(value)
    out: list[Rule | LayerDecay] = [
        rule_from_data(r, f"rules[{i}]", allowed) for i, r in enumerate(rules)
    ]
    if "layer_decay" in data:
        out.append(layer_decay_from_data(data["layer_decay"], allowed))
    return out, flags[0], flags[1]


def _selector_to_data(key: str, value: Any, where: str) -> Any:
    def one(item: Any) -> Any:
        if isinstance(item, type):
            return _dotted(item, where)
        if isinstance(item, re.Pattern):
            flags = [name for name in _FLAGS if item.flags & getattr(re, name)]
            return {"regex": item.pattern, "flags": flags} if flags else {"regex": item.pattern}
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
        if rule.lr is not None:
            entry["lr"] = rule.lr
        if rule.frozen is not None:
            entry["freeze"] = rule.frozen
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
    out = {"default": policy.default, "strict": policy.strict, "rules": rules}
    if policy.layer_decay is not None:
        out["layer_decay"] = layer_decay_to_data(policy.layer_decay)
    return out
