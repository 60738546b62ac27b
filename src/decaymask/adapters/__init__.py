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


def load(name: str) -> ModuleType:
    """The adapter module for ``name``, importing its framework on first use.

    Raises:
      ImportError: the framework is not installed; the message names the extra.
    """
    module_name, framework, extra = _ADAPTERS[name]
    module = sys.modules.get(module_name)
    if module is not None:
        return module
    try:
        importlib.import_module(framework)
    except ImportError as err:
        raise ImportError(
            f"decaymask needs {framework} for this: pip install 'decaymask[{extra}]'"
        ) from err
    return importlib.import_module(module_name)


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
