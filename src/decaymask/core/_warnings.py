"""Warnings for policies that most likely do not do what their author meant."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from ._leaf import Leaf
from ._report import Decision

if TYPE_CHECKING:
    from ._policy import Policy
    from ._rules import Rule


class PolicyWarning(UserWarning):
    """A policy or a params tree that most likely is not what was meant."""


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


def _within_would_match(rule: Rule, leaves: Sequence[Leaf]) -> bool:
    """Whether the rule would match something with its ``layer=`` read as ``within=``."""
    if rule.layer is None or rule.within is not None:
        return False
    moved = dataclasses.replace(rule, layer=None, within=rule.layer)
    return any(moved.matches(leaf) for leaf in leaves if leaf.is_param and leaf.floating)


def check_decisions(
    policy: Policy,
    leaves: Sequence[Leaf],
    decisions: Sequence[Decision],
    *,
    method: str,
    non_floating_fix: str,
    paths_like: Callable[[int], list[str]] | None = None,
    partial_view: Callable[[], bool] | None = None,
) -> None:
    """Warns (or raises, for a strict policy) where the user most likely made a mistake.

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
    """
    if paths_like is None:
        paths_like = lambda i: [leaves[i].path]  # noqa: E731
    unmatched = unmatched_rules(policy, leaves, decisions)
    if unmatched and partial_view is not None and partial_view():
        unmatched = []
    if unmatched:
        lines = "; ".join(f"rule {i + 1} {policy.rules[i]!r}" for i in unmatched)
        message = (
            f"{method}: {lines} matched no parameter of this tree. Check the kind, role, "
            f"name or path it selects against policy.explain(tree), which lists what "
            f"every array is."
        )
        for i in unmatched:
            if _within_would_match(policy.rules[i], leaves):
                message += (
                    f" Rule {i + 1}: layer= selects the layer that owns an array, and "
                    f"these arrays are owned by layers inside it; within= selects those."
                )
        if policy.strict:
            raise UnmatchedRuleError(message)
        warnings.warn(message + " (strict=True makes this an error.)", PolicyWarning, stacklevel=4)

    integers = [
        path
        for i, leaf in enumerate(leaves)
        if leaf.is_param and not leaf.floating
        for path in paths_like(i)
    ]
    if integers:
        warnings.warn(
            f"{method}: the params hold integer or bool arrays ({_some(integers)}); the "
            f"mask leaves them undecayed, but optax's other transformations still update "
            f"them. {non_floating_fix}",
            PolicyWarning,
            stacklevel=4,
        )

    for decision in decisions:
        if decision.conflicts:
            other = decision.conflicts[0]
            warnings.warn(
                f"{method}: {decision.path} is shared with {other.path}, and the policy "
                f"decides them differently ({decision.path}: {decision.decided_by}; "
                f"{other.path}: {other.decided_by}). The shared array follows {decision.path}. "
                f"Add a rule that selects both views, e.g. by path.",
                PolicyWarning,
                stacklevel=4,
            )

    unknown: dict[str | None, list[str]] = {}
    for i, leaf in enumerate(leaves):
        if leaf.layer == "unknown" and leaf.is_param and leaf.floating:
            unknown.setdefault(leaf.layer_type, []).extend(paths_like(i))
    for type_name, paths in unknown.items():
        if type_name is None:
            message = (
                f"{method}: arrays outside any layer ({_some(paths)}); rules on layer "
                f"kinds never match them. Select them by param=, name= or path=."
            )
        else:
            message = (
                f"{method}: layers of unknown kind own parameters ({type_name}: "
                f"{_some(paths)}); rules on layer kinds never match them. Teach "
                f"decaymask the layer with dm.register_layer({type_name}, kind, "
                f"roles={{...}}), or select these by param=, name= or path=."
            )
        warnings.warn(message, PolicyWarning, stacklevel=4)
