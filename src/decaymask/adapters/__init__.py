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
from collections.abc import Mapping, Sequence
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
# Moves at every register and unregister: outputs cached under an adapter's name are
# not served once another adapter has that name.
generation: int = 0
# A framework or face -> (the registered adapters, those of that name or face).
_candidates: dict[
    str, tuple[Sequence[Adapter], list[Adapter], list[Adapter], list[Adapter]]
] = {}


def register(adapter: Adapter) -> Adapter:
    """Makes ``adapter`` known to every entry point, the CLI and ``check_mask``.

    A registered adapter never changes how an entry point of this package's adapters
    reads the trees they read: ``policy.for_flax`` (or ``framework="flax"``) asks an
    adapter registered under the face ``"flax"`` only about a tree Linen and NNX both
    refuse. Its :meth:`~Adapter.claim` must not raise: one that does makes every call
    that asks it a ``RuntimeError`` naming the adapter, its exception chained.

    Raises:
      TypeError: ``adapter`` is not an :class:`Adapter` instance, or its class lacks a
        part of the contract (a class attribute such as ``name``, or a method); the
        message names them all.
      ValueError: another adapter already has its ``name``.
    """
    global _adapters, generation
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
    _check_contract(adapter)
    with _lock:
        known = _discover() if _adapters is None else _adapters
        if any(a.name == adapter.name for a in known):
            raise ValueError(f"register: an adapter named {adapter.name!r} is already registered.")
        _added.append(adapter)
        _adapters = (*known, adapter)
        generation += 1
    return adapter


# The class attributes the contract requires, and those whose value must not be empty.
_REQUIRED = ("name", "face", "title", "requires", "extra", "accepts", "usage", "non_floating_fix")
_NOT_EMPTY = ("name", "face", "title", "requires")


def _check_contract(adapter: Adapter) -> None:
    cls = type(adapter)
    missing = [
        attribute
        for attribute in _REQUIRED
        if not isinstance(getattr(adapter, attribute, None), str)
        or (attribute in _NOT_EMPTY and not getattr(adapter, attribute))
    ]
    methods = [m for m in ("claim", "walk") if not callable(getattr(adapter, m, None))]
    if not missing and not methods:
        return
    parts = []
    if missing:
        parts.append(f"the class attributes {', '.join(missing)} (non-empty strings)")
    if methods:
        parts.append(f"the methods {', '.join(methods)}")
    raise TypeError(
        f"register: the adapter {cls.__module__}.{cls.__qualname__} lacks "
        f"{' and '.join(parts)}, which the contract decaymask.adapters.Adapter requires. "
        f"Fix: define them on the class; see the Adapter docstring for what each one is."
    )


def unregister(name: str) -> None:
    """Forgets the adapter :func:`register` was given under ``name``.

    Raises:
      ValueError: no adapter was registered under ``name`` (this package's own adapters
        cannot be removed).
    """
    global _adapters, generation
    with _lock:
        found = [a for a in _added if a.name == name]
        if not found:
            raise ValueError(f"unregister: no adapter named {name!r} was registered.")
        _added.remove(found[0])
        if _adapters is not None:
            _adapters = tuple(a for a in _adapters if a is not found[0])
        generation += 1


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


def choose(
    tree: Any, framework: str | None, method: str, options: Mapping[str, Any] | None = None
) -> Adapter:
    """The adapter that reads ``tree`` for ``method``.

    With ``framework``, the adapter of that name or face that claims ``tree`` most
    surely; where it only possibly does and another adapter certainly does, it may send
    the user there (:meth:`Adapter.refusal`); where none of them claims it, it refuses
    in favour of an adapter that does, or its walk says what it expected. Without, the one adapter that
    certainly claims it, else the one that possibly does; of several that possibly do,
    the one the entry point's ``options`` name (:meth:`Adapter.owns_options`).

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
        chosen = _inferred(tree, method, adapters, options or {})
    if not chosen.installed():
        raise ImportError(_not_installed(tree, method, chosen, adapters))
    return chosen


def _not_installed(tree: Any, method: str, chosen: Adapter, adapters: Sequence[Adapter]) -> str:
    """The message for a tree whose adapter's framework is not installed: where an
    installed framework reads the tree, its entry point comes first."""
    install = f"pip install 'decaymask[{chosen.extra}]'"
    for other in adapters:
        if other.face != chosen.face and _claim(other, tree, method) is not Claim.NO and other.installed():
            return (
                f"{method}: got {other.describe(tree)}, and {chosen.package} is not "
                f"installed; use {other.usage.format(method=entry_point(other, method))}. "
                f"For {chosen.title}: {install}."
            )
    return f"decaymask needs {chosen.package} for this: {install}"


def _explicit(tree: Any, framework: str, method: str, adapters: Sequence[Adapter]) -> Adapter:
    found = _candidates.get(framework)
    if found is None or found[0] is not adapters:
        added = tuple(_added)
        own = [a for a in adapters if a not in added]
        found = _candidates[framework] = (
            adapters,
            [a for a in own if framework in (a.name, a.face)],
            [a for a in added if framework in (a.name, a.face)],
            own,
        )
    _, own_candidates, added_candidates, own = found
    if not own_candidates and not added_candidates:
        raise ValueError(
            f"{method}(framework={framework!r}): unknown framework; expected one of "
            f"{', '.join(map(repr, names()))}."
        )
    if own_candidates:
        # This package's adapters of that name or face read the tree as they would with
        # no adapter registered: a registered one is asked only about a tree they refuse.
        chosen = _among(tree, method, own_candidates, own, reading_only=True)
        if chosen is not None:
            return chosen
    chosen = _among(tree, method, [*own_candidates, *added_candidates], adapters)
    assert chosen is not None
    return chosen


def _among(
    tree: Any,
    method: str,
    candidates: Sequence[Adapter],
    adapters: Sequence[Adapter],
    reading_only: bool = False,
) -> Adapter | None:
    """The candidate that reads ``tree``, or the one that refuses it in favour of another
    of ``adapters``; with ``reading_only``, ``None`` where no candidate claims it."""
    best, refusing = Claim.NO, candidates[0]
    for candidate in candidates:
        claim = _claim(candidate, tree, method)
        if claim is Claim.CERTAINLY:
            return candidate
        if claim > best:
            best, refusing = claim, candidate
    if best is Claim.NO and reading_only:
        return None
    others = [(_claim(a, tree, method), a) for a in adapters if a not in candidates]
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
    # that certainly made the tree, or one that is installed (asked only where it would
    # be named: importing a framework may take seconds).
    for claim, other in sorted(others, key=lambda c: -c[0]):
        if claim is Claim.NO:
            continue
        message = refusing.refusal(tree, method, other, claim)
        if message is not None and (claim is Claim.CERTAINLY or other.installed()):
            raise TypeError(message)
    return refusing  # its walk says what it expected


def _claim(adapter: Adapter, tree: Any, method: str) -> Claim:
    """``adapter.claim(tree)``; an adapter whose claim raises is named, not let through
    as a bare exception from deep inside another framework's call."""
    try:
        return adapter.claim(tree)
    except Exception as err:
        cls = type(adapter)
        removal = (
            f", or remove it: decaymask.adapters.unregister({adapter.name!r})"
            if adapter in _added
            else ""
        )
        raise RuntimeError(
            f"{method}: the adapter {adapter.name!r} ({cls.__module__}.{cls.__qualname__}) "
            f"raised {type(err).__name__} in claim() on a {type(tree).__name__}: {err}. "
            f"claim() must answer Claim.NO for a tree it does not know, not raise. "
            f"Fix the adapter's claim{removal}."
        ) from err


def _inferred(
    tree: Any, method: str, adapters: Sequence[Adapter], options: Mapping[str, Any]
) -> Adapter:
    claims = [(_claim(a, tree, method), a) for a in adapters]
    for level in (Claim.CERTAINLY, Claim.POSSIBLY):
        found = [a for claim, a in claims if claim is level]
        if len(found) == 1:
            return found[0]
        named = [a for a in found if options and a.owns_options(options)]
        if len(named) == 1:
            return named[0]
        if found:
            frameworks = " or ".join(f"framework={a.name!r}" for a in found)
            calls = _calls(found, method)
            other = "" if calls == f"policy.{method}(...)" else f", or call {calls}"
            raise ValueError(
                f"{method}: a {type(tree).__name__} that {_both(found)} could have made; "
                f"pass {frameworks}{other}."
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
