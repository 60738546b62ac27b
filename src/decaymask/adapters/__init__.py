"""Framework adapters, and the registry every entry point finds them through.

An adapter turns a framework object into :class:`decaymask.Leaf` records and turns the
core's decisions back into a tree of exactly the structure optax will be handed. Each
module of this package whose name has no leading underscore defines one, as ``ADAPTER``;
other packages call :func:`register`. The contract is :class:`Adapter`; ``README.md``
beside this file is its design note. Nothing here imports a framework: adapters claim
trees by what is already loaded, and import their framework on the first walk.
"""

from __future__ import annotations

import importlib
import pkgutil
import threading
from collections.abc import Sequence
from typing import Any

from ._contract import Adapter as Adapter
from ._contract import PytreeAdapter as PytreeAdapter
from ._contract import Claim as Claim
from ._contract import Rebuild as Rebuild
from ._contract import TreedefRebuild as TreedefRebuild
from ._contract import FACES as FACES
from ._contract import call as call
from ._contract import entry_point as entry_point

__all__ = [
    "FACES", "Adapter", "Claim", "PytreeAdapter", "Rebuild", "TreedefRebuild", "call", "choose",
    "entry_point", "names", "register", "registered", "unregister",
]

_lock = threading.Lock()
_adapters: tuple[Adapter, ...] | None = None
_added: list[Adapter] = []
# A framework or face -> (the registered adapters, those of that name or face).
_candidates: dict[str, tuple[Sequence[Adapter], list[Adapter]]] = {}


def register(adapter: Adapter) -> Adapter:
    """Makes ``adapter`` known to every entry point, the CLI and ``check_mask``.

    Raises:
      TypeError: ``adapter`` is not an :class:`Adapter` instance.
      ValueError: another adapter already has its ``name``.
    """
    global _adapters
    if isinstance(adapter, type) and issubclass(adapter, Adapter):
        raise TypeError(
            f"register: got the class {adapter.__name__}; pass an instance: "
            f"register({adapter.__name__}())."
        )
    if not isinstance(adapter, Adapter):
        raise TypeError(
            f"register: expected an instance of decaymask.adapters.Adapter, got "
            f"{type(adapter).__name__}."
        )
    with _lock:
        known = _discover() if _adapters is None else _adapters
        if any(a.name == adapter.name for a in known):
            raise ValueError(f"register: an adapter named {adapter.name!r} is already registered.")
        _added.append(adapter)
        _adapters = (*known, adapter)
    return adapter


def unregister(name: str) -> None:
    """Forgets the adapter :func:`register` was given under ``name``.

    Raises:
      ValueError: no adapter was registered under ``name`` (this package's own adapters
        cannot be removed).
    """
    global _adapters
    with _lock:
        found = [a for a in _added if a.name == name]
        if not found:
            raise ValueError(f"unregister: no adapter named {name!r} was registered.")
        _added.remove(found[0])
        if _adapters is not None:
            _adapters = tuple(a for a in _adapters if a is not found[0])


def registered() -> tuple[Adapter, ...]:
    """Every adapter: this package's, in module-name order, then those registered."""
    global _adapters
    found = _adapters
    if found is None:
        with _lock:
            if _adapters is None:
                _adapters = _discover()
            found = _adapters
    return found


def _discover() -> tuple[Adapter, ...]:
    found = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        adapter = getattr(module, "ADAPTER", None)
        if isinstance(adapter, Adapter):
            found.append(adapter)
    return (*found, *_added)


def names() -> tuple[str, ...]:
    """The names ``framework=`` and ``--framework`` accept, faces included."""
    out: list[str] = []
    for adapter in registered():
        for name in (adapter.name, adapter.face):
            if name not in out:
                out.append(name)
    return tuple(out)


def choose(tree: Any, framework: str | None, method: str) -> Adapter:
    """The adapter that reads ``tree`` for ``method``.

    With ``framework``, the adapter of that name or face that claims ``tree`` most
    surely; where it only possibly does and another adapter certainly does, it may send
    the user there (:meth:`Adapter.refusal`); where none of them claims it, it refuses
    in favour of an adapter that does, or its walk says what it expected. Without, the one adapter that
    certainly claims it, else the one that possibly does.

    Raises:
      TypeError: ``tree`` is another framework's (the message names its entry point),
        or no adapter reads it.
      ValueError: ``framework`` is unknown, or several adapters could read ``tree``.
      ImportError: the chosen adapter's framework is not installed.
    """
    adapters = registered()
    _check_not_a_step_count(tree, method)
    if framework is not None:
        chosen = _explicit(tree, framework, method, adapters)
    else:
        chosen = _inferred(tree, method, adapters)
    if not chosen.installed():
        raise ImportError(
            f"decaymask needs {chosen.package} for this: pip install 'decaymask[{chosen.extra}]'"
        )
    return chosen


def _explicit(tree: Any, framework: str, method: str, adapters: Sequence[Adapter]) -> Adapter:
    found = _candidates.get(framework)
    if found is None or found[0] is not adapters:
        found = _candidates[framework] = (
            adapters, [a for a in adapters if framework in (a.name, a.face)]
        )
    candidates = found[1]
    if not candidates:
        raise ValueError(
            f"{method}(framework={framework!r}): unknown framework; expected one of "
            f"{', '.join(map(repr, names()))}."
        )
    best, refusing = Claim.NO, candidates[0]
    for candidate in candidates:
        claim = candidate.claim(tree)
        if claim is Claim.CERTAINLY:
            return candidate
        if claim > best:
            best, refusing = claim, candidate
    others = [(a.claim(tree), a) for a in adapters if a not in candidates]
    if best is Claim.POSSIBLY:
        # A tree this adapter could read, which another framework certainly made: the
        # adapter may send the user there, or read it (its walk may say more).
        for claim, other in others:
            if claim is Claim.CERTAINLY:
                message = refusing.refusal(tree, method, other, claim)
                if message is not None:
                    raise TypeError(message)
        return refusing
    # A tree no framework in this process made claims little: only name a framework
    # that is installed, or that certainly made the tree.
    others = [
        (claim, a)
        for claim, a in others
        if claim is Claim.CERTAINLY or (claim is Claim.POSSIBLY and a.installed())
    ]
    for claim, other in sorted(others, key=lambda c: -c[0]):
        message = refusing.refusal(tree, method, other, claim)
        if message is not None:
            raise TypeError(message)
    return refusing  # its walk says what it expected


def _inferred(tree: Any, method: str, adapters: Sequence[Adapter]) -> Adapter:
    claims = [(a.claim(tree), a) for a in adapters]
    for level in (Claim.CERTAINLY, Claim.POSSIBLY):
        found = [a for claim, a in claims if claim is level]
        if len(found) == 1:
            return found[0]
        if found:
            options = " or ".join(f"framework={a.name!r}" for a in found)
            raise ValueError(
                f"{method}: a {type(tree).__name__} that {_both(found)} could have made; "
                f"pass {options}, or call {_calls(found, method)}."
            )
    accepted = "; ".join(f"{a.title}: {a.accepts}" for a in adapters)
    raise TypeError(
        f"{method}: no framework decaymask knows reads a {type(tree).__name__}. "
        f"Expected {accepted}."
    )


def _both(found: Sequence[Adapter]) -> str:
    titles = [a.title for a in found]
    return " and ".join(titles) if len(titles) == 2 else ", ".join(titles)


def _calls(found: Sequence[Adapter], method: str) -> str:
    calls = [call(a, method, "...") for a in found]
    if all(c == calls[0] for c in calls):
        return calls[0]
    return " or ".join(calls)


def _check_not_a_step_count(tree: Any, method: str) -> None:
    shape, dtype = getattr(tree, "shape", None), getattr(tree, "dtype", None)
    if shape is not None and tuple(shape) == () and getattr(dtype, "kind", None) in ("i", "u"):
        from ._common import check_not_a_step_count

        check_not_a_step_count(tree, method)
