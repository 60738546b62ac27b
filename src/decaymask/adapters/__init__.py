"""One adapter per framework, imported on first use.

An adapter turns a framework object into :class:`decaymask.Leaf` records and turns the
core's decisions back into a mask of exactly the structure optax will be handed.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Mapping
from types import ModuleType
from typing import Any

_ADAPTERS = {
    # name: (module, the framework it needs, the extra that installs it)
    "equinox": ("decaymask.adapters._equinox", "equinox", "equinox"),
    "flax": ("decaymask.adapters._flax", "flax", "flax"),
}


_NO_TREE = object()


def load(name: str, tree: Any = _NO_TREE, method: str | None = None) -> ModuleType:
    """The adapter module for ``name``, importing its framework on first use.

    Args:
      name: the adapter.
      tree: what the entry point was given, if any: a tree of the other framework is
        named as such rather than blamed on the missing framework.
      method: the entry point, for the message.

    Raises:
      ImportError: the framework is not installed; the message names the extra.
      TypeError: the framework is not installed and ``tree`` belongs to the other one;
        the message names the method to use.
    """
    module_name, framework, extra = _ADAPTERS[name]
    module = sys.modules.get(module_name)
    if module is not None:
        return module
    try:
        importlib.import_module(framework)
    except ImportError as err:
        wrong = _other_framework(name, tree, method) if tree is not _NO_TREE else None
        if wrong is not None:
            raise TypeError(wrong) from err
        raise ImportError(
            f"decaymask needs {framework} for this: pip install 'decaymask[{extra}]'"
        ) from err
    return importlib.import_module(module_name)


def _installed(framework: str) -> bool:
    try:
        importlib.import_module(framework)
    except ImportError:
        return False
    return True


def _other_framework(name: str, tree: Any, method: str | None) -> str | None:
    """The message the other framework's entry point would be named in, where ``tree``
    plainly belongs to it (the same messages as with both frameworks installed)."""
    method = method or f"for_{name}"
    if name == "flax" and _holds_equinox_module(tree):
        return (
            f"{method}: got an Equinox {type(tree).__name__}; use "
            f"policy.{method.replace('flax', 'equinox')}(model) for Equinox models and "
            f"their params."
        )
    if name == "equinox":
        flax_method = method.replace("equinox", "flax")
        if type(tree).__module__.startswith("flax."):
            return (
                f"{method}: got a {type(tree).__name__} from Flax; use "
                f"policy.{flax_method}(...) for Flax params, variables, nnx.Module or "
                f"nnx.State."
            )
        if isinstance(tree, Mapping) and _installed("flax"):
            return (
                f"{method}: got a {type(tree).__name__} that holds no Equinox module, "
                f"which looks like Flax Linen params; use policy.{flax_method}(params). "
                f"For a pytree of Equinox modules, pass the modules themselves."
            )
    return None


def _holds_equinox_module(tree: Any) -> bool:
    eqx = sys.modules.get("equinox")
    if eqx is None:
        return False
    import jax

    return any(
        isinstance(x, eqx.Module)
        for x in jax.tree_util.tree_leaves(tree, is_leaf=lambda x: isinstance(x, eqx.Module))
    )


def adapter_for(tree: Any) -> ModuleType:
    """The adapter that fits ``tree``: Flax for NNX objects and Linen mappings, else Equinox."""
    eqx = sys.modules.get("equinox")
    if eqx is not None and isinstance(tree, eqx.Module):
        return load("equinox")
    nnx = sys.modules.get("flax.nnx")
    if nnx is not None and isinstance(tree, (nnx.Module, nnx.State)):
        return load("flax")
    if isinstance(tree, Mapping) and not _holds_equinox_module(tree):
        return load("flax")
    return load("equinox")
