"""Policies: ordered rules, the last match deciding."""

from __future__ import annotations

import dataclasses
import gc
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from ._data import policy_from_data, policy_to_data, read_file
from ._leaf import Leaf
from ._table import LeafTable, as_table
from ._report import Decision, Report
from ._rules import DECAY_LABEL, NO_DECAY_LABEL, Rule, as_bool, type_name
from ._warnings import check_decisions, find_problems

_VALUE_ATTR = {"mask": "decay", "labels": "label", "rates": "rate"}
NOT_A_PARAM = "state: never decayed"
NOT_FLOATING = "not floating point: never decayed"
DEFAULT = "default"


class Policy:
    """An ordered set of rules; the last rule that matches a leaf decides it."""

    __slots__ = ("rules", "default", "strict", "_hash", "_asks")

    rules: tuple[Rule, ...]
    """The rules in the order given; the last one that matches a leaf decides it."""
    default: bool
    """The decision for a floating-point parameter no rule decides."""
    strict: bool
    """Whether a rule that matches no parameter raises instead of warning."""
    _hash: int
    _asks: bool  # a rule has a when= callable, which may read anything

    def __init__(self, *rules: Rule, default: bool = False, strict: bool = False):
        """Args:
          *rules: :class:`Rule` values from :func:`decay` and :func:`no_decay`.
          default: the decision for leaves no rule matches (a numpy bool counts).
          strict: a rule that matches no parameter of a tree handed to a ``for_*``
            method raises :class:`UnmatchedRuleError` instead of a :class:`PolicyWarning`.

        Raises:
          TypeError: a rule is not a :class:`Rule`, or ``default``/``strict`` is not a bool.
        """
        for index, rule in enumerate(rules):
            if not isinstance(rule, Rule):
                hint = (
                    " Pass the rules themselves, not a list: dm.Policy(*rules)."
                    if isinstance(rule, (list, tuple))
                    else ""
                )
                raise TypeError(
                    f"Policy(...): argument {index} is {rule!r} "
                    f"({type(rule).__name__}), not a rule. Make rules with "
                    f"dm.decay(...) or dm.no_decay(...).{hint}"
                )
        flags = []
        for key, value in (("default", default), ("strict", strict)):
            flag = as_bool(value)
            if flag is None:
                raise TypeError(
                    f"Policy({key}={value!r}): expected True or False, "
                    f"got {type_name(value)}."
                )
            flags.append(flag)
        default, strict = flags
        set_ = object.__setattr__
        set_(self, "rules", tuple(rules))
        set_(self, "default", default)
        set_(self, "strict", strict)
        set_(self, "_hash", hash((self.rules, default, strict)))
        set_(self, "_asks", any(rule.when is not None for rule in self.rules))

    def __setattr__(self, name: str, value: Any) -> None:
        raise dataclasses.FrozenInstanceError(f"Policy is immutable; cannot set {name!r}.")

    # An immutable value: a copy is the policy itself; pickle rebuilds it from its rules.

    def __copy__(self) -> Policy:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> Policy:
        return self

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (_restore, (type(self), self.rules, self.default, self.strict))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Policy):
            return NotImplemented
        return (self.rules, self.default, self.strict) == (
            other.rules,
            other.default,
            other.strict,
        )

    def __hash__(self) -> int:
        return self._hash

    def __repr__(self) -> str:
        parts = [repr(rule) for rule in self.rules]
        if self.default:
            parts.append("default=True")
        if self.strict:
            parts.append("strict=True")
        if len(parts) <= 1:
            return f"Policy({', '.join(parts)})"
        return "Policy(\n" + "".join(f"    {part},\n" for part in parts) + ")"

    # Policies as data.

    def to_dict(self) -> dict[str, Any]:
        """The policy as plain data (for TOML, JSON or YAML configs).

        Classes and ``when=`` callables are written as ``"module:QualName"`` import
        paths, compiled patterns as ``{"regex": "..."}`` (with ``"flags": [...]``,
        e.g. ``["IGNORECASE"]``, where they have any).

        Raises:
          PolicyDataError: a class or callable has no import path (a lambda, a local class).

        Example:
          >>> import decaymask as dm
          >>> dm.Policy(dm.decay(layer="linear"), dm.no_decay(param=("bias", "scale"))).to_dict()
          {'default': False, 'strict': False, 'rules': [{'decay': True, 'layer': 'linear'}, {'decay': False, 'param': ['bias', 'scale']}]}
        """
        return policy_to_data(self)

    @classmethod
    def from_dict(cls, data: Any, *, imports: bool | Sequence[str] = ()) -> Policy:
        """The policy :meth:`to_dict` wrote, or one written by hand in the same form.

        Each rule is a table with ``decay = true|false`` and/or ``label = "..."``, an
        optional ``rate``, and the selectors of :func:`decay`. A selector value that
        contains a dot or a colon in ``layer``/``within`` is a class import path, and
        ``when`` is always one.

        Importing a module runs its code, so data (a config file someone else wrote)
        imports nothing unless asked to: an import path into a module that is already
        imported is resolved (that runs no code), any other is refused.

        Args:
          data: the mapping.
          imports: the modules an import path may import: ``True`` for any, or a
            tuple of module prefixes (``("mylib",)`` allows ``mylib`` and
            ``mylib.layers``). By default none: only modules already imported.

        Raises:
          PolicyDataError: (a ``ValueError``) the data does not describe a policy, or
            names a module it may not import; the message names the key, e.g.
            ``rules[1].layer``.
        """
        rules, default, strict = policy_from_data(data, imports=imports)
        return cls(*rules, default=default, strict=strict)

    @classmethod
    def from_file(
        cls, path: Any, key: str | None = None, *, imports: bool | Sequence[str] = ()
    ) -> Policy:
        """The policy in a ``.toml``, ``.json``, ``.yaml`` or ``.yml`` file.

        Args:
          path: the file.
          key: a dotted key of the table that holds the policy, e.g.
            ``"optimizer.weight_decay"``; the whole file if ``None``.
          imports: the modules the file's import paths may import, as in
            :meth:`from_dict`; by default none.

        Raises:
          PolicyDataError: the file cannot be parsed (the parser's error is chained),
            has no table ``key``, or its data is not a policy.
        """
        return cls.from_dict(read_file(path, key), imports=imports)

    # The core.

    def decide(self, leaves: Iterable[Leaf]) -> list[Decision]:
        """Decides every leaf: the core of decaymask, on leaves from any source.

        Args:
          leaves: :class:`Leaf` records, e.g. from a new framework's adapter.

        Returns:
          One :class:`Decision` per leaf, in order.

        Example:
          >>> import decaymask as dm
          >>> policy = dm.Policy(dm.decay(layer="linear", param="weight"))
          >>> [d.decay for d in policy.decide([
          ...     dm.Leaf("fc/kernel", layer="linear", role="weight", shape=(4, 2)),
          ...     dm.Leaf("fc/bias", layer="linear", role="bias", shape=(2,)),
          ... ])]
          [True, False]
        """
        cache: dict[tuple[Any, ...], tuple[int, ...]] = {}
        out = []
        for leaf in leaves:
            if not isinstance(leaf, Leaf):
                raise TypeError(
                    f"Policy.decide: expected dm.Leaf records, got {type(leaf).__name__}."
                )
            decision = self._decide_one(leaf, cache)
            if leaf.shared_with:
                others = [self._decide_one(view, cache) for view in leaf.shared_with]
                conflicts = tuple(d for d in others if d.decay != decision.decay)
                if conflicts:
                    decision = dataclasses.replace(decision, conflicts=conflicts)
            out.append(decision)
        return out

    def _decide_one(self, leaf: Leaf, cache: dict[tuple[Any, ...], tuple[int, ...]]) -> Decision:
        key = (leaf.owner, leaf.ancestors, leaf.role, leaf.name)
        candidates = cache.get(key)
        if candidates is None:
            # The rules whose owner/role/name selectors match, last first: a leaf with
            # this key can only be decided by one of them.
            rules = self.rules
            candidates = tuple(
                i for i in range(len(rules) - 1, -1, -1) if rules[i].matches_key(leaf)
            )
            cache[key] = candidates
        decidable = leaf.is_param and leaf.floating
        label: str | None = None
        for i in candidates:
            rule = self.rules[i]
            if rule.per_leaf and not rule.matches_rest(leaf):
                continue
            if label is None and (decidable or rule.decay is None):
                label = rule.group
            if rule.decay is not None and decidable:
                rate = rule.rate if rule.decay else 0.0
                return Decision(leaf, rule.decay, rule, f"rule {i + 1}", label=label or rule.group, rate=rate)
        if not leaf.is_param:
            return Decision(leaf, False, None, NOT_A_PARAM, label=label or NO_DECAY_LABEL)
        if not leaf.floating:
            return Decision(leaf, False, None, NOT_FLOATING, label=label or NO_DECAY_LABEL)
        default_label = DECAY_LABEL if self.default else NO_DECAY_LABEL
        return Decision(
            leaf,
            self.default,
            None,
            DEFAULT,
            label=label or default_label,
            rate=1.0 if self.default else 0.0,
        )

    def decide_for_mask(
        self, leaves: Sequence[Leaf], *, method: str, non_floating_fix: str
    ) -> list[Decision]:
        """:meth:`decide`, then the warnings (or the strict error) for a mask in the making.

        For adapters: a report shows everything, a mask hides it, so only masks warn.
        """
        decisions = self.decide(leaves)
        check_decisions(
            self, leaves, decisions, method=method, non_floating_fix=non_floating_fix
        )
        return decisions

    def report(self, leaves: Iterable[Leaf]) -> Report:
        """The decisions on ``leaves`` as a :class:`Report`."""
        return Report(self.decide(leaves), policy=self)

    # For the entry points: what a walked tree's leaves get, and the report on them.

    def values(
        self,
        leaves: Sequence[Leaf],
        value: str,
        *,
        method: str,
        non_floating_fix: str,
        partial_view: Callable[[], bool] | None = None,
    ) -> tuple[list[Any], list[str]]:
        """One value per leaf, and the warnings it gave (a strict policy's unmatched
        rules raise instead), as a mask gives them.

        Args:
          leaves: the walked leaves, a :class:`LeafTable` where the adapter made one.
          value: ``"mask"``, ``"labels"``, ``"rates"``, or ``"decisions"`` (the
            :class:`Decision` records, e.g. for Muon dimension numbers).
          method: the user's entry point, for messages.
          non_floating_fix: the adapter's fix for integer or bool leaves.
          partial_view: whether the tree is one branch's view of the params.
        """
        table = leaves if isinstance(leaves, LeafTable) else as_table(leaves)
        if value == "decisions" or any(rule.per_leaf for rule in self.rules):
            decisions = self.decide(table)
            messages = check_decisions(
                self, table, decisions, method=method, non_floating_fix=non_floating_fix,
                partial_view=partial_view,
            )
            if value == "decisions":
                return list(decisions), messages
            return [getattr(d, _VALUE_ATTR[value]) for d in decisions], messages
        # Every rule reads only what a key stands for: decide once per key.
        first = table.representatives()
        keys = list(first)
        decisions = self.decide([table[i] for i in first.values()])
        messages = check_decisions(
            self,
            [d.leaf for d in decisions],
            decisions,
            method=method,
            non_floating_fix=non_floating_fix,
            # Only warnings that list paths ask, and only for their few keys.
            paths_like=lambda r: [table[i].path for i in table.indices_of({keys[r]})],
            partial_view=partial_view,
        )
        attr = _VALUE_ATTR[value]
        by_key = {key: getattr(d, attr) for key, d in zip(keys, decisions)}
        return [by_key[key] for key in table.keys], messages

    def report_on(
        self, leaves: Sequence[Leaf], *, non_floating_fix: str, show_dims: bool = False
    ) -> Report:
        """The :class:`Report` ``explain`` gives: every decision, and the warnings a
        mask would give (a strict policy's unmatched rules listed first, not raised)."""
        decisions = self.decide(leaves)
        messages, strict_error = find_problems(
            self, leaves, decisions, method="explain", non_floating_fix=non_floating_fix
        )
        if strict_error is not None:
            messages.insert(0, strict_error)
        return Report(decisions, policy=self, show_dims=show_dims, warnings=messages)


def _restore(cls: type[Policy], rules: tuple[Rule, ...], default: bool, strict: bool) -> Policy:
    return cls(*rules, default=default, strict=strict)


_paused = 0
_paused_lock = threading.Lock()
_was_enabled = False


class _CollectorPaused:
    """Pauses the cyclic garbage collector while any thread builds; the first build to
    start records whether it was on, and the last one to end turns it back on."""

    __slots__ = ()

    def __enter__(self) -> None:
        global _paused, _was_enabled
        with _paused_lock:
            if _paused == 0:
                _was_enabled = gc.isenabled()
                gc.disable()
            _paused += 1

    def __exit__(self, *exc: object) -> None:
        global _paused
        with _paused_lock:
            _paused -= 1
            if _paused == 0 and _was_enabled:
                gc.enable()


_COLLECTOR_PAUSED = _CollectorPaused()


def collector_paused() -> _CollectorPaused:
    """A context manager that pauses the cyclic garbage collector while any thread
    builds (see :class:`_CollectorPaused`)."""
    return _COLLECTOR_PAUSED
