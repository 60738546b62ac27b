"""Decisions and reports: what was decided, and which rule said so."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, overload

from ._leaf import Leaf
from ._report_html import report_html

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


def _dims(row: Decision) -> str:
    if not row.decay:
        return "-"
    axes = row.leaf.muon_axes()
    if axes is None:
        return "unknown"
    reduction, output = axes
    return f"{reduction}->{output}"


def _notes(row: Decision, ranks: bool) -> str:
    """Marks where a selector reads framework-specific facts."""
    notes = ""
    leaf = row.leaf
    if ranks and leaf.ndim != len(leaf.shape):
        notes += f" [min_ndim counts {leaf.ndim} of its {len(leaf.shape)} axes]"
    if row.rule is not None and row.rule.name is not None:
        notes += " [name= is framework vocabulary]"
    return notes


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

    def summary(self) -> str:
        """One line of totals: leaves and elements decayed."""
        elements = self.num_elements
        decayed = self.num_elements_decayed
        share = f" ({100 * decayed / elements:.1f}%)" if elements else ""
        return (
            f"decayed {sum(row.decay for row in self._rows)} of {len(self)} leaves, "
            f"{decayed:,} of {elements:,} elements{share}"
        )

    def _extra_columns(self) -> tuple[bool, bool, bool]:
        rules = self.policy.rules if self.policy is not None else ()
        via = any(row.leaf.kind_source != "class" for row in self._rows)
        labels = any(rule.decay is None or rule.label is not None for rule in rules)
        rates = any(rule.rate != 1.0 for rule in rules)
        return via, labels, rates

    def table_rows(self) -> tuple[list[str], list[list[str]]]:
        """The column headers and the cells of :meth:`__str__`'s table."""
        via, labels, rates = self._extra_columns()
        header = (
            ["path", "kind"]
            + (["via"] if via else [])
            + ["class", "role", "shape", "decay"]
            + (["label"] if labels else [])
            + (["rate"] if rates else [])
            + (["muon dims"] if self.show_dims else [])
            + ["rule"]
        )
        rules = self.policy.rules if self.policy is not None else ()
        ranks = any(rule.min_ndim is not None for rule in rules)
        cells = []
        for row in self._rows:
            leaf = row.leaf
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
                + ([_dims(row)] if self.show_dims else [])
                + [row.why + _notes(row, ranks)]
            )
        return header, cells

    def to_dicts(self) -> list[dict[str, Any]]:
        """One plain dict per row (for JSON, dataframes, logs)."""
        return [
            {
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
                "rule": repr(row.rule) if row.rule is not None else None,
                "why": row.why,
            }
            for row in self._rows
        ]

    def totals(self) -> dict[str, int]:
        return {
            "leaves": len(self),
            "leaves_decayed": sum(row.decay for row in self._rows),
            "elements": self.num_elements,
            "elements_decayed": self.num_elements_decayed,
        }

    def to_json(self, **dumps_kwargs: Any) -> str:
        """The rows and the totals as JSON."""
        import json

        return json.dumps({"rows": self.to_dicts(), "totals": self.totals()}, **dumps_kwargs)

    def to_markdown(self) -> str:
        """The table as GitHub-flavoured Markdown, then the totals."""
        header, cells = self.table_rows()

        def line(items: list[str]) -> str:
            return "| " + " | ".join(c.replace("|", "\\|") for c in items) + " |"

        lines = [line(header), "| " + " | ".join("---" for _ in header) + " |"]
        lines += [line([f"`{c[0]}`"] + c[1:]) for c in cells]
        return "\n".join(lines) + f"\n\n{self.summary()}\n"

    def _repr_html_(self) -> str:
        """The notebook view: totals and warnings first, then the rows; decayed rows
        tinted and marked; a long report grouped by module, each group collapsed."""
        return report_html(self)

    def __str__(self) -> str:
        header, cells = self.table_rows()
        widths = [len(h) for h in header]
        for line in cells:
            widths = [max(w, len(c)) for w, c in zip(widths, line)]
        # The last column is left ragged: no trailing spaces.
        widths[-1] = 0

        def fmt(line: list[str]) -> str:
            return "  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip()

        lines = [fmt(header), fmt(["-" * len(h) for h in header])]
        lines += [fmt(line) for line in cells]
        lines.append(self.summary())
        lines += [f"warning: {message}" for message in self.warnings]
        return "\n".join(lines)
