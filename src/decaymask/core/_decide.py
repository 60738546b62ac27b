"""What one leaf gets: the last matching rule of each kind, and the layer-decay factor."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._leaf import Leaf
from ._report import Decision
from ._rules import DECAY_LABEL, NO_DECAY_LABEL

if TYPE_CHECKING:
    from ._policy import Policy

FROZEN_LABEL = "frozen"
NOT_A_PARAM = "state: never decayed"
NOT_FLOATING = "not floating point: never decayed"
DEFAULT = "default"


def decide_one(
    policy: Policy,
    leaf: Leaf,
    cache: dict[tuple[Any, ...], tuple[int, ...]],
    layer_id: int | tuple[int, ...] | None = None,
    layer_scale: float | tuple[float, ...] = 1.0,
) -> Decision:
    """The decision on ``leaf``: decay, label and rate from the last decay or label
    rule that matches, the multiplier from the last :func:`lr` rule times
    ``layer_scale``, frozen from the last :func:`freeze`/:func:`unfreeze` rule.

    ``cache`` keeps, per (owner, ancestors, role, name), the rules that can match,
    last first.
    """
    key = (leaf.owner, leaf.ancestors, leaf.role, leaf.name)
    candidates = cache.get(key)
    if candidates is None:
        # The rules whose owner/role/name selectors match, last first: a leaf with
        # this key can only be decided by one of them.
        rules = policy.rules
        candidates = tuple(
            i for i in range(len(rules) - 1, -1, -1) if rules[i].matches_key(leaf)
        )
        cache[key] = candidates
    decidable = leaf.is_param and leaf.floating
    label: str | None = None
    decided: int | None = None
    lr_at: int | None = None
    freeze_at: int | None = None
    want_lr, want_freeze = policy._lr, policy._freeze
    for i in candidates:
        rule = policy.rules[i]
        if rule.lr is not None:
            if lr_at is None and (not rule.per_leaf or rule.matches_rest(leaf)):
                lr_at = i
        elif rule.frozen is not None:
            if freeze_at is None and (not rule.per_leaf or rule.matches_rest(leaf)):
                freeze_at = i
        elif decided is None:
            if rule.per_leaf and not rule.matches_rest(leaf):
                continue
            if label is None and (decidable or rule.decay is None):
                label = rule.group
            if rule.decay is not None and decidable:
                decided = i
        if (
            decided is not None
            and (lr_at is not None or not want_lr)
            and (freeze_at is not None or not want_freeze)
        ):
            break
    lr_rule = policy.rules[lr_at] if lr_at is not None else None
    freeze_rule = policy.rules[freeze_at] if freeze_at is not None else None
    groups: dict[str, Any] = {"layer_id": layer_id, "lr_rule": lr_rule, "freeze_rule": freeze_rule}
    if not leaf.is_param:
        return Decision(leaf, False, None, NOT_A_PARAM, label=label or NO_DECAY_LABEL, lr_scale=0.0, **groups)
    if not leaf.floating:
        return Decision(leaf, False, None, NOT_FLOATING, label=label or NO_DECAY_LABEL, lr_scale=0.0, **groups)
    if freeze_rule is not None and freeze_rule.frozen:
        return Decision(
            leaf, False, freeze_rule, f"rule {freeze_at + 1}",  # type: ignore[operator]
            label=FROZEN_LABEL, lr_scale=0.0, frozen=True, **groups,
        )
    multiplier = lr_rule.lr if lr_rule is not None and lr_rule.lr is not None else 1.0
    if type(layer_scale) is tuple:
        lr_scale: float | tuple[float, ...] = tuple(s * multiplier for s in layer_scale)
    else:
        lr_scale = layer_scale * multiplier  # type: ignore[operator]
    if decided is not None:
        rule = policy.rules[decided]
        rate = rule.rate if rule.decay else 0.0
        return Decision(
            leaf, bool(rule.decay), rule, f"rule {decided + 1}", label=label or rule.group,
            rate=rate, lr_scale=lr_scale, **groups,
        )
    default_label = DECAY_LABEL if policy.default else NO_DECAY_LABEL
    return Decision(
        leaf,
        policy.default,
        None,
        DEFAULT,
        label=label or default_label,
        rate=1.0 if policy.default else 0.0,
        lr_scale=lr_scale,
        **groups,
    )
