"""Decisions and reports: what was decided, and which rule said so."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, overload

from html import escape

from ._leaf import Leaf

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


_HTML_CLASS = "decaymask-report"
_HTML_FLAT_ROWS = 40  # longer reports are grouped by module, each group collapsed
_MARK = {True: "&#10003;", False: "&middot;"}
# Scoped to the report's class and specific enough to win over a notebook's own table
# styles (JupyterLab right-aligns every cell); colours are tints, readable on light and
# dark themes alike.
_HTML_STYLE = """<style>
.decaymask-report table { border-collapse: collapse; margin: 0.25em 0 0.75em 0; }
.decaymask-report th, .decaymask-report td {
  text-align: left; padding: 0.15em 0.8em 0.15em 0.4em; vertical-align: top;
  white-space: nowrap; }
.decaymask-report td:last-child { white-space: normal; }
.decaymask-report th { border-bottom: 1px solid rgba(128, 128, 128, 0.6); }
.decaymask-report th.dm-num, .decaymask-report td.dm-num { text-align: right; }
.decaymask-report tr.dm-yes td { background: rgba(46, 160, 67, 0.16); }
.decaymask-report tr.dm-yes td:first-child { box-shadow: inset 4px 0 0 #2ea043; }
.decaymask-report tr.dm-no td { opacity: 0.75; }
.decaymask-report td.dm-mark { font-weight: bold; }
.decaymask-report tr.dm-yes td.dm-mark { color: #1a7f37; }
.decaymask-report .dm-summary { margin: 0.25em 0; }
.decaymask-report .dm-legend { font-size: 0.9em; opacity: 0.85; }
.decaymask-report .dm-swatch { padding: 0 0.4em; }
.decaymask-report .dm-swatch.dm-yes { background: rgba(46, 160, 67, 0.16);
  box-shadow: inset 4px 0 0 #2ea043; }
.decaymask-report .dm-warnings { border-left: 4px solid #d29922;
  background: rgba(210, 153, 34, 0.14); padding: 0.3em 0.6em; margin: 0.4em 0; }
.decaymask-report .dm-warnings ul { margin: 0.2em 0 0 0; padding-left: 1.2em; }
.decaymask-report details { margin: 0.15em 0; }
.decaymask-report details details { margin-left: 1.4em; }
.decaymask-report .dm-bar { display: inline-block; width: 4em; height: 0.7em;
  margin-right: 0.5em; background: rgba(128, 128, 128, 0.25); vertical-align: middle; }
.decaymask-report .dm-bar span { display: block; height: 100%; background: #2ea043; }
.decaymask-report summary { cursor: pointer; }
</style>"""


def _share_bar(decayed: int, total: int) -> str:
    width = round(100 * decayed / total) if total else 0
    return f'<span class="dm-bar"><span style="width: {width}%"></span></span>'


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
        header, cells = self.table_rows()
        warnings = list(self.warnings)
        parts = [f'<div class="{_HTML_CLASS}">', _HTML_STYLE]
        parts.append(
            f'<p class="dm-summary"><b>{escape(self.summary())}</b>'
            f'<span class="dm-legend"> &nbsp; <span class="dm-swatch dm-yes">'
            f"{_MARK[True]} decays</span> <span class=\"dm-swatch\">{_MARK[False]} no decay"
            f"</span></span></p>"
        )
        if warnings:
            items = "".join(f"<li>{escape(text)}</li>" for text in warnings)
            parts.append(
                f'<div class="dm-warnings"><b>&#9888; {len(warnings)} '
                f"warning{'s' if len(warnings) != 1 else ''}</b><ul>{items}</ul></div>"
            )
        if len(cells) <= _HTML_FLAT_ROWS:
            parts.append(self._html_table(header, cells, range(len(cells))))
        else:
            parts.append(self._html_groups(header, cells, list(range(len(cells))), 0))
        parts.append("</div>")
        return "".join(parts)

    def _html_groups(
        self, header: list[str], cells: list[list[str]], indices: list[int], depth: int
    ) -> str:
        """The rows below one module path, by the next path component: arrays of the
        module itself in a table, each submodule a collapsed group with its totals
        (subdivided again while it holds more than a screenful)."""
        paths = {i: self._rows[i].path.split("/") for i in indices}
        own = [i for i in indices if len(paths[i]) <= depth + 1]
        children: dict[str, list[int]] = {}
        for i in indices:
            if len(paths[i]) > depth + 1:
                children.setdefault("/".join(paths[i][: depth + 1]), []).append(i)
        if not own and len(children) == 1:  # one submodule only: show its children
            return self._html_groups(header, cells, indices, depth + 1)
        parts = [self._html_table(header, cells, own)] if own else []
        for name, members in children.items():
            rows = [self._rows[i] for i in members]
            n_decay = sum(row.decay for row in rows)
            elements = sum(row.leaf.size for row in rows)
            decayed = sum(row.leaf.size for row in rows if row.decay)
            inner = (
                self._html_table(header, cells, members)
                if len(members) <= _HTML_FLAT_ROWS
                else self._html_groups(header, cells, members, depth + 1)
            )
            parts.append(
                f"<details><summary>{_share_bar(decayed, elements)}<code>{escape(name)}</code>"
                f" &nbsp; {n_decay} of {len(rows)} leaves decay, {decayed:,} of "
                f"{elements:,} elements</summary>{inner}</details>"
            )
        return "".join(parts)

    def _html_table(self, header: list[str], cells: list[list[str]], indices: Any) -> str:
        decay_col = header.index("decay")
        numeric = {i for i, h in enumerate(header) if h == "rate"}
        head = "".join(
            f'<th class="dm-num">{escape(h)}</th>' if i in numeric else f"<th>{escape(h)}</th>"
            for i, h in enumerate(header)
        )
        body = []
        for index in indices:
            row = cells[index]
            yes = self._rows[index].decay
            tds = []
            for i, c in enumerate(row):
                if i == 0:
                    tds.append(f"<td><code>{escape(c)}</code></td>")
                elif i == decay_col:
                    tds.append(f'<td class="dm-mark">{_MARK[yes]} {escape(c)}</td>')
                elif i in numeric:
                    tds.append(f'<td class="dm-num">{escape(c)}</td>')
                else:
                    tds.append(f"<td>{escape(c)}</td>")
            body.append(f'<tr class="{"dm-yes" if yes else "dm-no"}">{"".join(tds)}</tr>')
        return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"

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
