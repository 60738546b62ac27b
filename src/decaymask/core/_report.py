"""Decisions and reports: what was decided, and which rule said so."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, overload

from ._leaf import Leaf
from ._report_html import report_html
from ._report_layers import (
    _LAYER_HEADER,
    _LAYER_NUMERIC,
    LayerRow,
    _ids_text,
    _markdown_table,
    _plural,
    _rule_text,
    _scale_text,
    _text_table,
    layer_rows_of,
    _dims,
    _notes,
)

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
        """One line of totals: leaves and elements decayed, and frozen where the
        policy freezes anything."""
        elements = self.num_elements
        decayed = self.num_elements_decayed
        share = f" ({100 * decayed / elements:.1f}%)" if elements else ""
        text = (
            f"decayed {sum(row.decay for row in self._rows)} of {len(self)} leaves, "
            f"{decayed:,} of {elements:,} elements{share}"
        )
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

    def _groups_why(self, row: Decision) -> str:
        """The lr and freeze/unfreeze rules that matched a trained leaf, after its
        decay reason: ``"; lr: rule 4: lr(0.1, layer='embedding')"``. A frozen leaf's
        freeze rule is its decay reason already."""
        if not (row.leaf.is_param and row.leaf.floating):
            return ""
        rules = self.policy.rules if self.policy is not None else ()
        text = ""
        if row.lr_rule is not None:
            text += f"; lr: {_rule_text(row.lr_rule, rules)}"
        if row.freeze_rule is not None and not row.frozen:
            text += f"; freeze: {_rule_text(row.freeze_rule, rules)}"
        return text

    def table_rows(self) -> tuple[list[str], list[list[str]]]:
        """The column headers and the cells of :meth:`__str__`'s table.

        Where the policy sets them, ``layer id`` (with :func:`layer_decay`), ``lr``
        (with an :func:`lr` rule or :func:`layer_decay`) and ``frozen`` (with a
        :func:`freeze` or :func:`unfreeze` rule) follow ``decay``; a leaf stacked
        along the layer axis shows its ids as runs (``1-12``) and its multipliers as
        their range (``0.0317-0.75``). ``lr`` and ``frozen`` are ``-`` for leaves
        that are never trained (state, integer arrays)."""
        via, labels, rates = self._extra_columns()
        ids, lrs, frozen = self._group_columns()
        header = (
            ["path", "kind"]
            + (["via"] if via else [])
            + ["class", "role", "shape", "decay"]
            + (["label"] if labels else [])
            + (["rate"] if rates else [])
            + (["layer id"] if ids else [])
            + (["lr"] if lrs else [])
            + (["frozen"] if frozen else [])
            + (["muon dims"] if self.show_dims else [])
            + ["rule"]
        )
        rules = self.policy.rules if self.policy is not None else ()
        ranks = any(rule.min_ndim is not None for rule in rules)
        groups = ids or lrs or frozen
        cells = []
        for row in self._rows:
            leaf = row.leaf
            trained = leaf.is_param and leaf.floating
            cells.append(
                [leaf.path, leaf.layer]
                + ([leaf.kind_source] if via else [])
                + [
                    leaf.layer_type or "-",
                    leaf.role,
                    str(leaf.shape),
                    "yes" if row.decay else "no",
                ]
                + ([row.label] if labels else [])
                + ([f"{row.rate:g}"] if rates else [])
                + ([_ids_text(row.layer_id)] if ids else [])
                + ([_scale_text(row.lr_scale) if trained else "-"] if lrs else [])
                + ([("yes" if row.frozen else "no") if trained else "-"] if frozen else [])
                + ([_dims(row)] if self.show_dims else [])
                + [row.why + _notes(row, ranks) + (self._groups_why(row) if groups else "")]
            )
        return header, cells

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
        ids, lrs, frozen = self._group_columns()
        has_lr_rules = self.policy is not None and any(
            rule.lr is not None for rule in self.policy.rules
        )
        out = []
        for row in self._rows:
            entry: dict[str, Any] = {
                "path": row.path,
                "kind": row.layer,
                "via": row.leaf.kind_source,
                "class": row.layer_type,
                "role": row.role,
                "shape": list(row.shape),
                "dtype": row.dtype,
                "decay": row.decay,
                "label": row.label,
                "rate": row.rate,
            }
            if ids:
                layer_id = row.layer_id
                entry["layer_id"] = list(layer_id) if isinstance(layer_id, tuple) else layer_id
            if lrs:
                scale = row.lr_scale
                entry["lr"] = list(scale) if isinstance(scale, tuple) else scale
            if frozen:
                entry["frozen"] = row.frozen
            entry["rule"] = repr(row.rule) if row.rule is not None else None
            if has_lr_rules:
                entry["lr_rule"] = repr(row.lr_rule) if row.lr_rule is not None else None
            if frozen:
                entry["freeze_rule"] = (
                    repr(row.freeze_rule) if row.freeze_rule is not None else None
                )
            entry["why"] = row.why + (self._groups_why(row) if ids or lrs or frozen else "")
            out.append(entry)
        return out

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
        header, cells = self.table_rows()
        lines = _markdown_table(header, [[f"`{c[0]}`"] + c[1:] for c in cells])
        text = "\n".join(lines) + f"\n\n{self.summary()}\n"
        if self._shows_layers():
            text += "\n**per layer**\n\n" + "\n".join(_markdown_table(*self.layer_rows())) + "\n"
        return text

    def _repr_html_(self) -> str:
        """The notebook view: totals and warnings first, then the rows; decayed rows
        tinted and marked; a long report grouped by module, each group collapsed."""
        return report_html(self)

    def __str__(self) -> str:
        lines = _text_table(*self.table_rows())
        lines.append(self.summary())
        if self._shows_layers():
            lines += ["", "per layer"] + _text_table(*self.layer_rows(), right=_LAYER_NUMERIC)
        lines += [f"warning: {message}" for message in self.warnings]
        return "\n".join(lines)
