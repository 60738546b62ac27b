"""Policies: ordered rules, the last match deciding."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from ._data import policy_from_data, policy_to_data
from ._files import read_file
from ._ladder import LayerDecay
from ._leaf import Leaf
from ._table import LeafTable, as_table
from ._report import Decision, Report
from ._rules import Rule, as_bool, type_name
from ._decide import decide_one
from ._warnings import check_decisions, find_problems

_VALUE_ATTR = {
    "mask": "decay",
    "labels": "label",
    "rates": "rate",
    "lr_scales": "lr_scale",
    "trainable": "trainable",
}


class Policy:
    """An ordered set of rules; the last rule that matches a leaf decides it."""

    __slots__ = ("rules", "default", "strict", "layer_decay", "_hash", "_asks", "_lr", "_freeze")

    rules: tuple[Rule, ...]
    """The rules in the order given; the last one that matches a leaf decides it. The
    :attr:`layer_decay` is not among them: to extend a policy, pass the policy itself,
    ``dm.Policy(policy, *more_rules)``, which keeps both."""
    layer_decay: LayerDecay | None
    """The :func:`layer_decay` given among the rules, if any."""
    default: bool
    """The decision for a floating-point parameter no rule decides."""
    strict: bool
    """Whether a rule that matches no parameter raises instead of warning."""
    _hash: int
    _asks: bool  # a rule has a when= callable, which may read anything
    _lr: bool  # an lr rule
    _freeze: bool  # a freeze or unfreeze rule

    def __init__(self, *rules: Rule | LayerDecay, default: bool = False, strict: bool = False):
        """Args:
          *rules: :class:`Rule` values from :func:`decay`, :func:`no_decay`,
            :func:`label`, :func:`lr`, :func:`freeze` and :func:`unfreeze`, at most
            one :func:`layer_decay`, and policies (a preset), whose rules and layer
            decay are taken in their place: ``dm.Policy(dm.presets.vit_finetune(),
            dm.freeze(...))``.
          default: the decision for leaves no rule matches (a numpy bool counts).
          strict: a rule that matches no parameter of a tree handed to a ``for_*``
            method raises :class:`UnmatchedRuleError` instead of a :class:`PolicyWarning`.

        Raises:
          TypeError: a rule is not a :class:`Rule`, or ``default``/``strict`` is not a bool.
          ValueError: more than one :func:`layer_decay`.
        """
        spliced: list[Any] = []
        for index, item in enumerate(rules):
            if isinstance(item, Policy):
                if item.default or item.strict:
                    raise TypeError(
                        f"Policy(...): argument {index} is a policy with "
                        f"{'default=True' if item.default else 'strict=True'}; its rules "
                        f"are taken, its flags are not. Pass default= and strict= to the "
                        f"outer Policy."
                    )
                spliced += item.rules
                if item.layer_decay is not None:
                    spliced.append(item.layer_decay)
            else:
                spliced.append(item)
        rules = tuple(spliced)
        ladders = [r for r in rules if isinstance(r, LayerDecay)]
        if len(ladders) > 1:
            raise ValueError(
                f"Policy(...): {len(ladders)} layer_decay rules ({', '.join(map(repr, ladders))}); "
                f"a policy has one ladder. To chain several stacks into it, pass them "
                f"together: dm.layer_decay(rate, blocks=(first, second))."
            )
        rules = tuple(r for r in rules if not isinstance(r, LayerDecay))
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
                    f"dm.decay(...), dm.no_decay(...), dm.lr(...), dm.freeze(...) or "
                    f"dm.layer_decay(...).{hint}"
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
        set_(self, "layer_decay", ladders[0] if ladders else None)
        set_(self, "_hash", hash((self.rules, default, strict, self.layer_decay)))
        set_(self, "_asks", any(rule.when is not None for rule in self.rules))
        set_(self, "_lr", any(rule.lr is not None for rule in self.rules))
        set_(self, "_freeze", any(rule.frozen is not None for rule in self.rules))

    def __setattr__(self, name: str, value: Any) -> None:
        raise dataclasses.FrozenInstanceError(f"Policy is immutable; cannot set {name!r}.")

    # An immutable value: a copy is the policy itself; pickle rebuilds it from its rules.

    def __copy__(self) -> Policy:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> Policy:
        return self

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (_restore, (type(self), self.rules, self.default, self.strict, self.layer_decay))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Policy):
            return NotImplemented
        return (self.rules, self.default, self.strict, self.layer_decay) == (
            other.rules,
            other.default,
            other.strict,
            other.layer_decay,
        )

    def __hash__(self) -> int:
        return self._hash

    def __repr__(self) -> str:
        parts = [repr(rule) for rule in self.rules]
        if self.layer_decay is not None:
            parts.append(repr(self.layer_decay))
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

        Each rule is a table with ``decay = true|false`` and/or ``label = "..."`` (and
        an optional ``rate``), or ``lr = <multiplier>``, or ``freeze = true|false``
        (``false`` unfreezes), and the selectors of :func:`decay`. A selector value
        that contains a dot or a colon in ``layer``/``within`` is a class import path,
        and ``when`` is always one. A top-level ``layer_decay = {rate = 0.75, blocks =
        ..., stem = ...}`` table gives the :func:`layer_decay` (classes in ``blocks``
        and ``stem`` written ``"module:Class"``).

        Importing a module runs its code and a ``when`` function is called on every
        parameter, so data (a config file someone else wrote) names nothing unless
        allowed to: an import path is resolved only into decaymask and the modules
        ``imports`` allows, whether or not the module is already imported. The data is
        bounded too: nesting (100 levels), strings (10,000 characters). A ``{regex =
        "..."}`` path whose search can backtrack without end (a repeat of a group that
        repeats, ``(a*)*``; of overlapping alternatives, ``(a|aa)+``; a backreference;
        more than four unbounded repeats) is refused: write a glob, or make the inner
        repeat possessive (``a*+``) or atomic (``(?>a*)``).

        Args:
          data: the mapping.
          imports: the modules an import path may import: ``True`` for any, or a
            tuple of module prefixes (``("mylib",)`` allows ``mylib`` and
            ``mylib.layers``). By default none: only decaymask's own.

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
          imports: the modules the file's import paths may name, as in
            :meth:`from_dict`; by default none but decaymask.

        The file is input like any other: at most 256 KiB of UTF-8 are read (a
        directory, a pipe or a device is refused unread), YAML anchors and aliases
        (which can expand a small file into billions of values) and keys given twice
        are refused, and so is data nested more than 100 levels deep.

        Raises:
          PolicyDataError: the file cannot be read or parsed (the parser's error is
            chained), has no table ``key``, or its data is not a policy.
          OSError: the file cannot be opened (e.g. ``FileNotFoundError``).
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
        items = leaves if isinstance(leaves, Sequence) else list(leaves)
        for leaf in items:
            if not isinstance(leaf, Leaf):
                raise TypeError(
                    f"Policy.decide: expected dm.Leaf records, got {type(leaf).__name__}."
                )
        return self._decide_all(items, ladder=self.layer_decay is not None)

    def _decide_all(self, leaves: Sequence[Leaf], *, ladder: bool) -> list[Decision]:
        ids: Sequence[Any] = ()
        scales: Sequence[Any] = ()
        if ladder and self.layer_decay is not None:
            found = self.layer_decay.ladder(leaves)
            ids = found.ids()
            scales = found.scales(ids)
        cache: dict[tuple[Any, ...], tuple[int, ...]] = {}
        out = []
        for i, leaf in enumerate(leaves):
            if ids:
                decision = self._decide_one(leaf, cache, ids[i], scales[i])
            else:
                decision = self._decide_one(leaf, cache)
            if leaf.shared_with:
                others = [self._decide_one(view, cache) for view in leaf.shared_with]
                conflicts = tuple(
                    d for d in others if (d.decay, d.frozen, d.lr_rule) != (decision.decay, decision.frozen, decision.lr_rule)
                )
                if conflicts:
                    decision = dataclasses.replace(decision, conflicts=conflicts)
            out.append(decision)
        return out

    def _decide_one(
        self,
        leaf: Leaf,
        cache: dict[tuple[Any, ...], tuple[int, ...]],
        layer_id: int | tuple[int, ...] | None = None,
        layer_scale: float | tuple[float, ...] = 1.0,
    ) -> Decision:
        return decide_one(self, leaf, cache, layer_id, layer_scale)

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
        ladder = self.layer_decay is not None and value == "lr_scales"
        if value == "decisions" or ladder or any(rule.per_leaf for rule in self.rules):
            decisions = self._decide_all(table, ladder=ladder)
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
        decisions = self._decide_all([table[i] for i in first.values()], ladder=False)
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


def _restore(
    cls: type[Policy],
    rules: tuple[Rule, ...],
    default: bool,
    strict: bool,
    layer_decay: LayerDecay | None = None,
) -> Policy:
    extra = (layer_decay,) if layer_decay is not None else ()
    return cls(*rules, *extra, default=default, strict=strict)
