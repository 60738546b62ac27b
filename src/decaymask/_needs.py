"""What an entry point needs beyond decaymask itself, said in one line with the extra
that installs it, rather than as a bare ``ModuleNotFoundError`` from deep inside."""

from __future__ import annotations

import importlib

# The extras of pyproject.toml that bring each module.
_EXTRAS = {
    "jax": ("equinox", "flax", "haiku"),
    "optax": ("equinox", "flax", "haiku"),
    "flax": ("flax",),
    "equinox": ("equinox",),
    "haiku": ("haiku",),
}


def _install(extras: tuple[str, ...]) -> str:
    named = [f"'decaymask[{e}]'" for e in extras]
    if len(named) == 1:
        return f"pip install {named[0]}"
    return f"pip install {', '.join(named[:-1])} or {named[-1]} (whichever framework you use)"


def needs(what: str, *modules: str) -> None:
    """Imports each of ``modules``; raises an ``ImportError`` naming ``what`` needs the
    missing ones and the extra that installs them.

    Only a module that is not installed is reported so: one that is installed but fails
    to import raises its own error.
    """
    missing: list[str] = []
    cause: ModuleNotFoundError | None = None
    for module in modules:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            # A framework missing, or one that the module needs (optax without jax).
            found = "jax" if err.name == "jaxlib" else (err.name or "").split(".")[0]
            if found not in _EXTRAS and found != module.split(".")[0]:
                raise  # installed, but missing a dependency no extra of decaymask brings
            if found not in missing:
                missing.append(found)
            cause = cause or err
    if not missing:
        return
    extras = tuple(e for e in _EXTRAS["jax"] if all(e in _EXTRAS.get(m, (m,)) for m in missing))
    raise ImportError(
        f"{what} needs {' and '.join(missing)}, which "
        f"{'is' if len(missing) == 1 else 'are'} not installed: {_install(extras or ('all',))}."
    ) from cause
