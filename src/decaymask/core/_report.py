"""Decisions and reports: what was decided, and which rule said so."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, overload

from ._leaf import Leaf
from ._report_html import report_html
from ._report_layers import _LAYER_HEADER, LayerRow, _plural, layer_rows_of
from ._report_table import dicts, markdown_view, table, text_view, words_of
from ._text import visible

if TYPE_CHECKING:
    from ._policy import Policy
    from ._rules import Rule


@dataclasses.dataclass(frozen=True)
class Decision:
    """The decision on one leaf."""

    leaf: Leaf
    decay: bool
    rule: Rule | None
    """The deciding rule; ``None`` where the default or a built-in guard decided."""
    reason: str
    """``"rule N"`` (1-based), ``"default"``, or why the leaf can never decay."""
    conflicts: tuple[Decision, ...] = ()
    """Decisions on other views of a shared array that came out differently; the
    array itself follows this decision (the first view in flattening order)."""
    label: str = "no_decay"
    """The group for ``optax.partition``: the label of the last matching rule."""
    rate: float = 0.0
    """The multiplier of the weight decay: the deciding rule's rate, 0 if not decayed."""
    lr_scale: float | tuple[float, ...] = 1.0
    """The learning-rate multiplier: the layer-decay factor times the last matching
    :func:`lr` rule's multiplier; 0 where the leaf is not trained. A tuple, one per
    layer, for a leaf stacked along a layer axis."""
    frozen: bool = False
    """Whether a :func:`freeze` rule (not undone by a later :func:`unfreeze`) matched."""
    layer_id: int | tuple[int, ...] | None = None
    """The leaf's id in the layer-decay ladder (0 the stem, 1 to n the blocks, n + 1
    the rest), a tuple for a stacked leaf; ``None`` without :func:`layer_decay`."""
    lr_rule: Rule | None = None
    """The :func:`lr` rule that gave the multiplier; ``None`` where none matched."""
    freeze_rule: Rule | None = None
    """The last :func:`freeze` or :func:`unfreeze` rule that matched, if any."""

    @property
    def trainable(self) -> bool:
        """Whether the optimizer updates the leaf: a floating-point parameter not frozen."""
        return self.leaf.is_param and self.leaf.floating and not self.frozen

    @property
    def path(self) -> str:
        return self.leaf.path

    @property
    def layer(self) -> str:
        return self.leaf.layer

    @property
    def layer_type(self) -> str | None:
        return self.leaf.layer_type

    @property
    def role(self) -> str:
        return self.leaf.role

    @property
    def shape(self) -> tuple[int, ...]:
        return self.leaf.shape

    @property
    def dtype(self) -> str:
        return self.leaf.dtype

    @property
    def decided_by(self) -> str:
        """The deciding rule as text (``"rule 2: decay(...)"``), or why no rule decided."""
        return f"{self.reason}: {self.rule!r}" if self.rule is not None else self.reason

    @property
    def why(self) -> str:
        """:attr:`decided_by`, and the disagreeing views of a shared array."""
        text = self.decided_by
        for other in self.conflicts:
            text += (
                f" [shared with {other.path}, where {other.decided_by} would say "
                f"{'decay' if other.decay else 'no decay'}]"
            )
        return text

    def __repr__(self) -> str:
        """The path, the decision and what decided it, as a report row reads:
        ``<Decision fc/kernel: decay, rule 1: decay(layer='linear')>``."""
        decision = "decay" if self.decay else "no decay"
        if self.frozen:
            decision += ", frozen"
        return f"<Decision {visible(self.path)}: {decision}, {visible(self.why)}>"


class Report(Sequence[Decision]):
    """The decisions on every array leaf of a tree, in flattening order."""

    def __init__(
        self,
        decisions: Sequence[Decision],
        policy: Policy | None = None,
        *,
        show_dims: bool = False,
        warnings: Sequence[str] = (),
    ):
        """Args:
          decisions: the rows, in the tree's flattening order.
          policy: the policy that decided them.
          show_dims: the report explains ``muon_dims``: the leaves decided True go to
            Muon, and every view says so (a ``muon`` column, ``"3 of 9 leaves go to
            Muon"``) and adds each one's Muon axes.
          warnings: what the mask built from the same tree would warn about.
        """
        self._rows = tuple(decisions)
        self.policy = policy
        self.show_dims = show_dims
        self.warnings: tuple[str, ...] = tuple(warnings)
        """What the mask built from the same tree would warn about, one message each."""

    @overload
    def __getitem__(self, index: int) -> Decision: ...
    @overload
    def __getitem__(self, index: slice) -> Report: ...
    def __getitem__(self, index: Any) -> Any:
        """One :class:`Decision` for an int; a :class:`Report` of those rows for a slice."""
        if isinstance(index, slice):
            return self._with_rows(self._rows[index])
        return self._rows[index]

    def _with_rows(self, rows: Any) -> Report:
        # A copy keeps every attribute of the report (policy, show_dims, warnings, ...).
        report = copy.copy(self)
        report._rows = tuple(rows)
        return report

    def filter(self, predicate: Callable[[Decision], bool]) -> Report:
        """The rows for which ``predicate(decision)`` is true, as a :class:`Report`.

        Example:
          >>> import decaymask as dm
          >>> report = dm.Policy(dm.decay(param="weight")).report([
          ...     dm.Leaf("fc/kernel", layer="linear", role="weight", shape=(4, 2)),
          ...     dm.Leaf("fc/bias", layer="linear", role="bias", shape=(2,)),
          ... ])
          >>> print(report.filter(lambda row: row.role == "bias").summary())
          decayed 0 of 1 leaves, 0 of 2 elements (0.0%)
        """
        return self._with_rows(row for row in self._rows if predicate(row))

    def __len__(self) -> int:
        return len(self._rows)

    def __iter__(self) -> Iterator[Decision]:
        return iter(self._rows)

    def __repr__(self) -> str:
        return f"<Report: {self.summary()}>"

    @property
    def decayed(self) -> Report:
        """The rows that decay, as a :class:`Report`."""
        return self._with_rows(row for row in self._rows if row.decay)

    @property
    def not_decayed(self) -> Report:
        """The rows that do not decay, as a :class:`Report`."""
        return self._with_rows(row for row in self._rows if not row.decay)

    @property
    def num_elements(self) -> int:
        return sum(row.leaf.size for row in self._rows)

    @property
    def num_elements_decayed(self) -> int:
        return sum(row.leaf.size for row in self._rows if row.decay)

    @property
    def num_frozen(self) -> int:
        """How many leaves are frozen."""
        return sum(row.frozen for row in self._rows)

    @property
    def num_elements_frozen(self) -> int:
        return sum(row.leaf.size for row in self._rows if row.frozen)

    def summary(self) -> str:
        """One line of totals: leaves and elements decayed (with ``show_dims``, that go
        to Muon), and frozen where the policy freezes anything."""
        elements = self.num_elements
        decayed = self.num_elements_decayed
        share = f" ({100 * decayed / elements:.1f}%)" if elements else ""
        taken = words_of(self).taken.format(n=sum(row.decay for row in self._rows), total=len(self))
        text = f"{taken}, {decayed:,} of {elements:,} elements{share}"
        if self._group_columns()[2]:
            text += (
                f"; frozen {_plural(self.num_frozen, 'leaf', 'leaves')}, "
                f"{_plural(self.num_elements_frozen, 'element', 'elements')}"
            )
        return text

    def _extra_columns(self) -> tuple[bool, bool, bool]:
        rules = self.policy.rules if self.policy is not None else ()
        via = any(row.leaf.kind_source != "class" for row in self._rows)
        # Only rules that name a group: lr and freeze rules leave the label alone.
        labels = any(rule.label is not None for rule in rules)
        rates = any(rule.rate != 1.0 for rule in rules)
        return via, labels, rates

    def _group_columns(self) -> tuple[bool, bool, bool]:
        """Whether the policy gives layer ids, lr multipliers and frozen leaves."""
        policy = self.policy
        if policy is None:
            return False, False, False
        ladder = getattr(policy, "layer_decay", None) is not None
        lr = ladder or any(rule.lr is not None for rule in policy.rules)
        frozen = any(rule.frozen is not None for rule in policy.rules)
        return ladder, lr, frozen

    def table_rows(self) -> tuple[list[str], list[list[str]]]:
        """The column headers and the cells of :meth:`__str__`'s table.

        Where the policy sets them, ``layer id`` (with :func:`layer_decay`), ``lr``
        (with an :func:`lr` rule or :func:`layer_decay`) and ``frozen`` (with a
        :func:`freeze` or :func:`unfreeze` rule) follow ``decay``; a leaf stacked
        along the layer axis shows its ids as runs (``1-12``) and its multipliers as
        their range (``0.0317-0.75``). ``lr`` and ``frozen`` are ``-`` for leaves
        that are never trained (state, integer arrays). With ``show_dims`` the
        decision's column is ``muon`` and ``dims`` gives the Muon axes.

        Every cell is one line of visible text: control and format characters in a
        name (an escape sequence, a newline, a bidi override) are written as their
        escapes (``\\x1b``). A rule text longer than 90 characters is cut (``...``);
        ``str(report)`` and :meth:`to_markdown` give it in full below the table."""
        found = table(self)
        return found.header, found.cells

    def layers(self) -> tuple[LayerRow, ...]:
        """The rows per layer of the layer-decay ladder, in id order (0 to n + 1).

        Each :class:`LayerRow` holds the layer's id, its leaves and elements (a leaf
        stacked along the layer axis counts once in each of its layers, with its size
        over the number of layers), its learning-rate multiplier (a float, or
        ``(min, max)`` where :func:`lr` rules make it differ inside the layer; over the
        trained leaves, 0 where all are frozen) and how many of its leaves are frozen.
        Empty for a policy without :func:`layer_decay`.

        Example:
          >>> import decaymask as dm
          >>> blocks = [
          ...     dm.Leaf(f"blocks/{i}/fc/kernel", layer="linear", role="weight", shape=(2, 2))
          ...     for i in range(2)
          ... ]
          >>> head = dm.Leaf("head/kernel", layer="linear", role="weight", shape=(2, 3))
          >>> report = dm.Policy(dm.layer_decay(0.5)).report([*blocks, head])
          >>> [(row.id, row.parameters, row.multiplier) for row in report.layers()]
          [(1, 4, 0.25), (2, 4, 0.5), (3, 6, 1.0)]
        """
        return layer_rows_of(self._rows)

    def layer_rows(self) -> tuple[list[str], list[list[str]]]:
        """The column headers and the cells of the per-layer table (:meth:`layers`)."""
        return list(_LAYER_HEADER), [row.cells() for row in self.layers()]

    def _shows_layers(self) -> bool:
        return self._group_columns()[0]

    def to_dicts(self) -> list[dict[str, Any]]:
        """One plain dict per row (for JSON, dataframes, logs).

        Where the policy sets them, ``layer_id`` (an int, or a list for a stacked leaf),
        ``lr`` (a float or a list), ``frozen`` (a bool) and the matching ``lr_rule`` and
        ``freeze_rule`` join each row, and ``why`` names those rules too."""
        return dicts(self)

    def totals(self) -> dict[str, int]:
        """Leaves and elements, decayed, and frozen where the policy freezes anything."""
        out = {
            "leaves": len(self),
            "leaves_decayed": sum(row.decay for row in self._rows),
            "elements": self.num_elements,
            "elements_decayed": self.num_elements_decayed,
        }
        if self._group_columns()[2]:
            out["leaves_frozen"] = self.num_frozen
            out["elements_frozen"] = self.num_elements_frozen
        return out

    def to_json(self, **dumps_kwargs: Any) -> str:
        """The rows and the totals as JSON, and the ``layers`` (:meth:`layers`) with
        :func:`layer_decay`."""
        import json

        data: dict[str, Any] = {"rows": self.to_dicts(), "totals": self.totals()}
        if self._shows_layers():
            data["layers"] = [row.to_dict() for row in self.layers()]
        return json.dumps(data, **dumps_kwargs)

    def to_markdown(self) -> str:
        """The table as GitHub-flavoured Markdown, then the totals (and the per-layer
        table with :func:`layer_decay`)."""
        return markdown_view(self)

    def _repr_html_(self) -> str:
        """The notebook view: totals and warnings first, then the rows; decayed rows
        tinted and marked; a long report grouped by module, each group collapsed."""
        return report_html(self)

    def __str__(self) -> str:
        return text_view(self)
