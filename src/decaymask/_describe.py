"""How check_mask's messages describe what each tree holds: types, values, keys."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Mapping
from typing import Any, TypeGuard

from .core._text import shorten, visible

_SHOWN = 5  # keys listed per side in a message; the rest are counted


def _static_differences(mask: Any, params: Any) -> str:
    """The static dataclass fields (Equinox's ``field(static=True)``) that differ, named."""
    if not dataclasses.is_dataclass(mask):
        return ""
    names = [
        f.name
        for f in dataclasses.fields(mask)
        if f.metadata.get("static")
        and not _same_data(getattr(mask, f.name, None), getattr(params, f.name, None))
    ]
    return ", ".join(
        f"{name} (mask {_short(getattr(mask, name, None))}, "
        f"params {_short(getattr(params, name, None))})"
        for name in names[:_SHOWN]
    )


def _same_data(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # static data holding arrays has no single truth value
        return a is b


def _is_bool(x: Any) -> bool:
    import jax
    import jax.core
    import numpy as np

    if isinstance(x, (bool, np.bool_)):
        return True
    if isinstance(x, jax.core.Tracer):
        return False
    if isinstance(x, (np.ndarray, jax.Array)):
        return x.dtype == np.bool_ and x.size == 1
    return False


def _leaf_trouble(x: Any) -> str:
    import jax
    import jax.core
    import numpy as np

    if isinstance(x, jax.core.Tracer):
        return "this one is traced; build the mask outside jax.jit"
    if isinstance(x, (jax.Array, np.ndarray)) and x.size != 1:
        return f"optax tests it with `if`, which fails for an array of {x.size} elements"
    try:
        read = bool(x)
    except Exception:
        return "optax tests it with `if`, which fails for this value"
    return f"optax tests it with `if` and would read this one as {read}"


def _is_array(x: Any) -> bool:
    import jax
    import numpy as np

    return isinstance(x, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct))


def _loaded_class(dotted: str) -> type | None:
    module_name, _, name = dotted.rpartition(".")
    module = sys.modules.get(module_name)
    return getattr(module, name, None) if module is not None else None


def _is_variable(t: type | None) -> bool:
    variable = _loaded_class("flax.nnx.Variable")
    return t is not None and variable is not None and issubclass(t, variable)


def _is_axis_box(t: type | None) -> bool:
    box = _loaded_class("flax.core.meta.AxisMetadata")
    return t is not None and box is not None and issubclass(t, box)


def _is_nnx_module(t: type | None) -> bool:
    module = _loaded_class("flax.nnx.Module")
    return t is not None and module is not None and issubclass(t, module)


def _is_nnx(x: Any) -> bool:
    state = _loaded_class("flax.nnx.State")
    return (state is not None and isinstance(x, state)) or _is_variable(type(x))


def _is_equinox(t: type) -> bool:
    module = _loaded_class("equinox.Module")
    return module is not None and issubclass(t, module)


def _is_mapping(t: type | None) -> TypeGuard[type]:
    return t is not None and issubclass(t, Mapping)


def _type_name(t: type) -> str:
    module = getattr(t, "__module__", "") or ""
    name = visible(t.__qualname__)
    if module.startswith("flax.nnx"):
        return f"nnx.{name}"
    if module.startswith(("flax.linen", "flax.core.meta")):
        return f"nn.{name}"
    if module.startswith("equinox.nn"):
        return f"eqx.nn.{name}"
    return name


def _a(phrase: str) -> str:
    # Spoken, not spelled: "an nnx.State", "a uint8[3] jax.Array", "an int32[] jax.Array".
    low = phrase.lower()
    vowel = low[:1] in "aeiou" and not low.startswith(("uint", "uni", "use", "eu", "one"))
    vowel = vowel or low.startswith(("nn.", "nnx.", "eqx."))
    return f"{'an' if vowel else 'a'} {phrase}"


def _describe(x: Any, depth: int = 0) -> str:
    """What sits at one place of a tree, in a few words (type, length, keys, dtype),
    every character visible."""
    return visible(_words(x, depth))


def _words(x: Any, depth: int) -> str:
    import jax
    import numpy as np

    if x is None:
        return "None"
    if isinstance(x, (bool, np.bool_)):
        return repr(bool(x))
    if _is_array(x):
        kind = (
            "jax.Array" if isinstance(x, jax.Array) else
            "jax.ShapeDtypeStruct" if isinstance(x, jax.ShapeDtypeStruct) else
            "numpy array"
        )
        dims = ",".join(str(d) for d in x.shape)
        return _a(f"{np.dtype(x.dtype).name}[{dims}] {kind}")
    if isinstance(x, (int, float, complex, str, bytes)):
        return f"the {type(x).__name__} {x!r}"
    t = type(x)
    name = _type_name(t)
    if isinstance(x, Mapping):
        return _a(f"{name} with {_count(len(x), 'key')}")
    if isinstance(x, (list, tuple)):
        return _a(f"{name} of length {len(x)}")
    if _is_variable(t) or _is_axis_box(t):
        inner = x.get_raw_value() if _is_variable(t) else x.value
        return _a(f"{name} holding {_describe(inner, depth + 1)}") if depth == 0 else _a(name)
    if _is_equinox(t) or _is_nnx_module(t):
        return _a(f"{name} module")
    if callable(x) and hasattr(x, "__name__"):
        return _a(f"{name} ({visible(str(x.__name__))})")
    return _a(name)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _some(keys: list[Any]) -> str:
    shown = ", ".join(visible(repr(k)) for k in keys[:_SHOWN])
    return shown + (f", ... ({len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else "")


def _short(data: Any, limit: int = 80) -> str:
    return shorten(visible(repr(data)), limit)

