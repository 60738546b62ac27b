"""What the input mapping is: params or a variables mapping, and no Equinox inside."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

from .._common import path_text
from ._arrays import DictKey
from ._tables import AUTO_NAME

# Flax's own collections: a top-level key among these names a collection.
_COLLECTIONS = frozenset(
    {"params", "batch_stats", "cache", "intermediates", "losses", "perturbations"}
)
# Arrays by these names are parameters: a top-level key holding them is a module.
_PARAM_NAMES = frozenset({"kernel", "bias", "scale", "embedding"})


def looks_like_variables(tree: Mapping) -> bool | None:
    """Whether a mapping is a variables mapping (``True``) or params (``False``);
    ``None`` where its keys and arrays cannot tell.

    Variables have a ``params`` key and only mappings at the top. Every other top-level
    key must look like a collection: one of Flax's (``batch_stats``, ``cache``, ...),
    or a mapping that holds no array named like a parameter (a ``counter`` collection).
    A key that holds parameters (``head`` with a ``kernel``) or is an auto name is a
    module beside a submodule named ``params``; one that holds parameters in
    submodules the ``params`` tree also has could be either (a copy of the params kept
    in a collection of its own).
    """
    if "params" not in tree:
        return False
    others = []
    for key, value in tree.items():
        if not isinstance(value, Mapping):
            return False
        if key == "params":
            continue
        if not isinstance(key, str) or AUTO_NAME.fullmatch(key):
            return False
        if key not in _COLLECTIONS:
            others.append(key)
    if not others:
        return True
    readings = set()
    for key in others:
        if not _holds_param_names(tree[key]):
            readings.add("collection")
        elif (paths := _module_paths(tree[key])) != {()} and paths <= _module_paths(
            tree["params"]
        ):
            readings.add("either")
        else:
            readings.add("module")
    if readings == {"collection"}:
        return True
    if readings == {"module"}:
        return False
    return None


def _holds_param_names(tree: Mapping) -> bool:
    for key, value in tree.items():
        if isinstance(value, Mapping):
            if _holds_param_names(value):
                return True
        elif key in _PARAM_NAMES:
            return True
    return False


def _module_paths(tree: Mapping, path: tuple = ()) -> set[tuple]:
    """The paths of the mappings in ``tree`` that hold arrays directly."""
    found: set[tuple] = set()
    for key, value in tree.items():
        if isinstance(value, Mapping):
            found |= _module_paths(value, path + (key,))
        else:
            found.add(path)
    return found


def undecidable_error(fn: str, tree: Mapping) -> ValueError:
    others = sorted(str(k) for k in tree if k != "params")
    return ValueError(
        f"{fn}: cannot tell whether this mapping is a variables mapping (collections "
        f"'params', {', '.join(map(repr, others))}) or params whose top-level modules "
        f"include one named 'params': the arrays fit both. Fix: pass the model, "
        f"policy.{fn}(tree, module=model, args=(x,)), so that its trace decides, or "
        f"pass variables['params'] alone."
    )


def check_not_equinox(fn: str, tree: Mapping, flat: list) -> None:
    """Equinox modules in a mapping are flattened by their fields: read as Linen
    names they would decide wrongly, so they are turned away.

    Raises:
      TypeError: a value of ``tree`` is an Equinox module.
    """
    eqx = sys.modules.get("equinox")
    if eqx is None:
        return
    for keys, _ in flat:
        if keys and type(keys[-1]) is DictKey and type(keys[0]) is DictKey:
            # Fields of a module (GetAttrKey) and list items end or start a path.
            continue
        for i, entry in enumerate(keys):
            if type(entry) is DictKey:
                continue
            node: Any = tree
            for parent in keys[:i]:
                node = node[parent.key]
            if isinstance(node, eqx.Module):
                where = path_text(tuple(str(k.key) for k in keys[:i]))
                raise TypeError(
                    f"{fn}: {where!r} is an Equinox {type(node).__name__}, not Linen "
                    f"params. Use policy.{fn.replace('flax', 'equinox')}(tree) for "
                    f"Equinox models, and for mappings of them."
                )
            break

