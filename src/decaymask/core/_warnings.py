"""Warnings for policies that most likely do not do what their author meant."""

from __future__ import annotations

import dataclasses
import sys
import threading
import warnings
from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING, Any

from ._leaf import Leaf
from ._names import CONTAINER_KINDS
from ._report import Decision
from ._roles import is_index_name
from ._text import visible

if TYPE_CHECKING:
    from ._policy import Policy
    from ._rules import Rule


class PolicyWarning(UserWarning):
    """A policy or a params tree that most likely is not what was meant.

    Each is shown once per cause and tree: a callable mask, which optax calls at
    ``init`` and at every ``update``, warns at its first call only. Changing the warning
    filters (``warnings.catch_warnings``, ``simplefilter``) shows it again, and under the
    ``"always"`` action every call shows it.
    """


class UnmatchedRuleError(ValueError):
    """A rule of a ``strict=True`` policy matched no parameter of the tree."""


_SHOWN = 3


def _some(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_SHOWN])
    return shown + (f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else "")


def unmatched_rules(policy: Policy, leaves: Sequence[Leaf], decisions: Sequence[Decision]) -> list[int]:
    """Indices of the rules that match no decidable leaf."""
    deciding = {id(d.rule) for d in decisions if d.rule is not None}
    views = [view for leaf in leaves for view in (leaf, *leaf.shared_with)]
    candidates = [leaf for leaf in views if leaf.is_param and leaf.floating]
    return [
        i
        for i, rule in enumerate(policy.rules)
        if id(rule) not in deciding and not any(rule.matches(leaf) for leaf in candidates)
    ]


# The entry points that read the whole model to set freezing up. Every other build may
# be handed only the trainable part of it (eqx.partition by policy.trainable, the NNX
# state policy.trainable_filter selects, policy.split's first half), where a rule that
# selects only frozen parameters rightly matches nothing; the whole model's build
# reports it.
_WHOLE_TREE_METHODS = frozenset({"trainable", "trainable_filter", "split", "explain"})


def _maybe_trainable_part(policy: Policy, decisions: Sequence[Decision]) -> bool:
    """Whether the tree may be the trainable part of a model the policy freezes some of:
    the policy has a freeze rule, and no leaf of the tree is frozen."""
    return any(rule.frozen for rule in policy.rules) and not any(d.frozen for d in decisions)


def all_frozen(decisions: Sequence[Decision]) -> str:
    """The rules that freeze every floating-point parameter, as a message lists them
    (``"rule 2 freeze()"``); empty where something is trained, or there is nothing to
    train."""
    params = [d for d in decisions if d.leaf.is_param and d.leaf.floating]
    if not params or not all(d.frozen for d in params):
        return ""
    # A frozen leaf's reason is "rule N", N the freeze rule's place in the policy.
    named = {d.reason: f"{d.reason} {d.freeze_rule!r}" for d in params}
    return ", ".join(named[r] for r in sorted(named, key=lambda r: int(r.rpartition(" ")[2])))


# `layer=` for a kind whose arrays are owned by layers inside it (CONTAINER_KINDS) is a
# likely misunderstanding of `within=`.


def _typo_prone(rule: Rule) -> bool:
    """Whether a rule that matches nothing is a likely typo or misunderstanding.

    Paths, framework names, classes and enclosing modules are the user's own words
    about this tree; kinds and roles are the vocabulary, which a tree may simply lack
    (no biases in a Llama, no embedding in a CNN).
    """
    if rule.path is not None or rule.name is not None or rule.within is not None:
        return True
    return any(not isinstance(item, str) for item in rule.layer or ())


def _within_would_match(rule: Rule, leaves: Sequence[Leaf]) -> bool:
    """Whether the rule would match something with its ``layer=`` read as ``within=``."""
    if rule.layer is None or rule.within is not None:
        return False
    if not all(isinstance(item, str) and item in CONTAINER_KINDS for item in rule.layer):
        return False
    moved = dataclasses.replace(rule, layer=None, within=rule.layer)
    return any(moved.matches(leaf) for leaf in leaves if leaf.is_param and leaf.floating)


# Roles whose meaning does not depend on the owner's kind: an unknown layer holding
# only these is decided by role as well as any known layer.
_SELF_EVIDENT_ROLES = frozenset({"bias", "scale", "embedding", "position", "token", "gain", "buffer"})


def find_problems(
    policy: Policy,
    leaves: Sequence[Leaf],
    decisions: Sequence[Decision],
    *,
    method: str,
    non_floating_fix: str,
    paths_like: Callable[[int], list[str]] | None = None,
    partial_view: Callable[[], bool] | None = None,
) -> tuple[list[str], str | None]:
    """The warnings a tree and its decisions call for, and the strict error if any.

    Args:
      policy: the policy that decided.
      leaves: the leaves it decided.
      decisions: its decisions, in the same order.
      method: the entry point the user called, for the messages (``"for_equinox"``).
      non_floating_fix: how to keep integer and bool arrays out of the params in this
        framework.
      paths_like: where ``leaves`` stand for groups of alike leaves (one per key), the
        paths of every leaf alike to ``leaves[i]``; by default just its own.
      partial_view: whether the tree is one branch's view of the params (optax hands
        ``optax.partition`` branches the params with the other branches' leaves
        masked out); a rule may then rightly match nothing here.

    Returns:
      (warning messages, the message of an :class:`UnmatchedRuleError` for a strict
      policy with a rule that matches nothing, or ``None``), every character visible.
    """
    if paths_like is None:
        paths_like = lambda i: [leaves[i].path]  # noqa: E731
    messages: list[str] = []
    strict_error = None
    unmatched = unmatched_rules(policy, leaves, decisions)
    if unmatched and partial_view is not None and partial_view():
        unmatched = []
    if unmatched and method not in _WHOLE_TREE_METHODS and _maybe_trainable_part(policy, decisions):
        unmatched = []
    if unmatched:
        check = "Check the kind, role, name or path it selects against policy.explain(tree), which lists what every array is."
        if policy.strict:
            lines = "; ".join(f"rule {i + 1} {policy.rules[i]!r}" for i in unmatched)
            strict_error = f"{method}: {lines} matched no parameter of this tree. {check}"
        hinted = [i for i in unmatched if _within_would_match(policy.rules[i], leaves)]
        shown = [i for i in unmatched if _typo_prone(policy.rules[i]) or i in hinted]
        if shown and not policy.strict:
            lines = "; ".join(f"rule {i + 1} {policy.rules[i]!r}" for i in shown)
            message = f"{method}: {lines} matched no parameter of this tree. {check}"
            for i in hinted:
                message += (
                    f" Rule {i + 1}: layer= selects the layer that owns an array, and "
                    f"these arrays are owned by layers inside it; within= selects those."
                )
            messages.append(message + " (strict=True makes this an error.)")

    frozen = all_frozen(decisions)
    if frozen and not (partial_view is not None and partial_view()):
        messages.append(
            f"{method}: every parameter of this tree is frozen (by {frozen}), so the "
            f"optimizer trains nothing. If that is not what you meant, narrow what "
            f"freezing selects, or add dm.unfreeze(...) for what should train."
        )

    # Integer arrays named as indices (`relative_position_index`) are buffers a model
    # keeps on purpose; other integer params most likely reach optax by mistake.
    integers = [
        path
        for i, leaf in enumerate(leaves)
        if leaf.is_param and not leaf.floating and not is_index_name(leaf.name)
        for path in paths_like(i)
    ]
    if integers:
        messages.append(
            f"{method}: the params hold integer or bool arrays ({_some(integers)}); the "
            f"mask leaves them undecayed, but optax's other transformations still update "
            f"them. {non_floating_fix}"
        )

    for decision in decisions:
        if decision.conflicts:
            other = decision.conflicts[0]
            messages.append(
                f"{method}: {decision.path} is shared with {other.path}, and the policy "
                f"decides them differently ({decision.path}: {decision.decided_by}; "
                f"{other.path}: {other.decided_by}). The shared array follows {decision.path}. "
                f"Add a rule that selects both views, e.g. by path."
            )

    unknown: dict[str | None, list[str]] = {}
    unclear: set[str | None] = set()
    ambiguous: dict[tuple[str, str | None], list[str]] = {}
    for i, leaf in enumerate(leaves):
        if not (leaf.is_param and leaf.floating):
            continue
        if leaf.layer == "unknown":
            unknown.setdefault(leaf.layer_type, []).extend(paths_like(i))
            if leaf.role not in _SELF_EVIDENT_ROLES:
                unclear.add(leaf.layer_type)
        if leaf.kind_source == "ambiguous":
            ambiguous.setdefault((leaf.layer, leaf.layer_type), []).extend(paths_like(i))
    for type_name, paths in unknown.items():
        if type_name not in unclear:
            continue
        if type_name is None:
            messages.append(
                f"{method}: arrays outside any layer ({_some(paths)}); rules on layer "
                f"kinds never match them. Select them by param=, name= or path=."
            )
        else:
            messages.append(
                f"{method}: layers of unknown kind own parameters ({type_name}: "
                f"{_some(paths)}); rules on layer kinds never match them. Teach "
                f"decaymask the layer with dm.register_layer({type_name}, kind, "
                f"roles={{...}}), or select these by param=, name= or path=."
            )
    for (kind, type_name), paths in ambiguous.items():
        what = type_name or "a module"
        messages.append(
            f"{method}: the names and the arrays of {what} ({_some(paths)}) say different "
            f"kinds; it is read as {kind} from its arrays. If that is wrong, teach "
            f"decaymask the layer with dm.register_layer({type_name or 'cls'}, kind), "
            f"or select these by path=."
        )
    # Paths and class names are the tree's own: a key may hold a terminal's escape
    # sequence, a newline or a bidi override.
    return [visible(m) for m in messages], (visible(strict_error) if strict_error else None)


class Messages(list[str]):
    """The warning messages of one build, and the tree they are about."""

    tree: Hashable = None
    """The entry point and the paths of the leaves the build decided (for most
    policies, one leaf of each kind the tree holds): the same at every call with one
    tree, as optax makes them with a callable mask."""


def check_decisions(
    policy: Policy,
    leaves: Sequence[Leaf],
    decisions: Sequence[Decision],
    **options: Any,
) -> Messages:
    """Warns (or raises, for a strict policy) where the user most likely made a mistake.

    Takes the arguments of :func:`find_problems`; returns the messages it warned with.
    """
    found, strict_error = find_problems(policy, leaves, decisions, **options)
    if strict_error is not None:
        raise UnmatchedRuleError(strict_error)
    messages = Messages(found)
    if messages:
        messages.tree = (options.get("method"), tuple(leaf.path for leaf in leaves))
        _show(messages)
    return messages


def warn_again(messages: Sequence[str]) -> None:
    """The warnings a build gave, for the same build from a cache: shown where they
    were not yet (the warning filters changed since, or say ``"always"``)."""
    if messages:
        _show(messages)


# What was shown, as (tree, message), under the warning filters of the time: the
# filters list itself and a copy of its entries. catch_warnings swaps the list, and
# simplefilter, filterwarnings and resetwarnings change its entries; either way what
# was shown before may now be shown, recorded, raised or ignored differently.
_shown: set[tuple[Hashable, str]] = set()
_shown_under: tuple[Any, list[Any]] = (None, [])
_shown_lock = threading.Lock()
_SHOWN_MAX = 4096


def _show(messages: Sequence[str]) -> None:
    """Warns with each message not already shown for the same tree."""
    global _shown_under
    level = user_stacklevel()
    frame = sys._getframe(level - 1)  # the user's frame, as warnings.warn finds it
    tree = getattr(messages, "tree", None)
    for message in messages:
        key = (tree, message)
        with _shown_lock:
            filters = warnings.filters
            if _shown_under[0] is not filters or _shown_under[1] != filters:
                _shown.clear()
                _shown_under = (filters, list(filters))
            seen = key in _shown
        if seen and _action(message, frame) != "always":
            continue
        warnings.warn(message, PolicyWarning, stacklevel=level)
        # Not reached where the filters make the warning an error: it raises each time.
        with _shown_lock:
            if len(_shown) >= _SHOWN_MAX:
                _shown.clear()
            _shown.add(key)


def _action(message: str, frame: Any) -> str:
    """The action the warning filters take on ``message`` warned from ``frame``."""
    module = frame.f_globals.get("__name__", "") if frame is not None else ""
    line = frame.f_lineno if frame is not None else 0
    for action, text, category, module_pattern, lineno in warnings.filters:
        if (
            (text is None or text.match(message))
            and issubclass(PolicyWarning, category)
            and (module_pattern is None or module_pattern.match(module))
            and (lineno == 0 or lineno == line)
        ):
            return str(action)
    return str(getattr(warnings, "defaultaction", "default"))


# Frames of these packages are never the user's line: a callable mask is called by
# optax inside jax transformations.
_LIBRARY_PREFIXES = ("decaymask.", "optax.", "jax.", "jaxlib.", "equinox.", "flax.", "haiku.")


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning point at the first frame outside
    decaymask and the libraries it is called from."""
    frame = sys._getframe(1)
    level = 1
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if not (name + ".").startswith(_LIBRARY_PREFIXES) and name != "decaymask":
            return level
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    return 1
