"""A report's rows as its views show them: the columns, each cell's text (every name
made visible, long rule texts cut and given in full below the table), and the words
for what the report explains (weight decay, or the Muon matrices)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from ._report_layers import (
    _LAYER_NUMERIC,
    _dims,
    _ids_text,
    _markdown_table,
    _notes,
    _scale_text,
    _text_table,
)
from ._text import markdown_code, markdown_text, shorten, visible

if TYPE_CHECKING:
    from ._report import Decision, Report
    from ._rules import Rule

RULE_WIDTH = 90
"""The longest rule text a table cell shows; a longer one is cut there, and the table
is followed by the rule in full."""


@dataclasses.dataclass(frozen=True)
class Words:
    """How a report names its decision: what the column, the totals and the legend say."""

    column: str
    """The header of the decision's column."""
    yes: str
    no: str
    """What a row with the decision True, or False, gets (e.g. in a shared array's note)."""
    taken: str
    """The totals' phrase: ``"decayed {n} of {total} leaves"``."""
    share: str
    """A module's line in the notebook view: ``"{n} of {total} leaves decay"``."""
    legend: tuple[str, str]
    """The notebook view's legend of the marks for True and False."""


DECAY = Words(
    "decay", "decay", "no decay", "decayed {n} of {total} leaves", "{n} of {total} leaves decay",
    ("decays", "no decay"),
)
MUON = Words(
    "muon", "Muon", "not Muon", "{n} of {total} leaves go to Muon",
    "{n} of {total} leaves go to Muon", ("Muon", "not Muon"),
)


def words_of(report: Report) -> Words:
    """What ``report`` explains: with ``show_dims`` the leaves that go to Muon (the
    decisions behind ``muon_dims``), else the weight decay."""
    return MUON if report.show_dims else DECAY


@dataclasses.dataclass(frozen=True)
class Table:
    """The cells of a report's table, and what they cut short."""

    header: list[str]
    cells: list[list[str]]
    why: list[str]
    """Each row's rule text in full (visible), where its cell shows it cut."""
    notes: list[tuple[str, str]]
    """``("rule N", "<rule>")`` in full for every rule text a cell cuts, in rule order."""


class _RuleTexts:
    """Rule texts as ``"rule N: <rule>"``: for a table, visible and cut at ``width``;
    for data (``width=None``, ``show=None``), as ``repr`` gives them."""

    def __init__(self, report: Report, width: int | None = None, show: Any = None):
        self.rules = report.policy.rules if report.policy is not None else ()
        self.width = width
        self.show = show or (lambda text: text)
        self.cut: dict[str, str] = {}  # "rule N" -> the rule's text

    def text(self, reason: str, rule: Rule) -> str:
        rule_text = self.show(repr(rule))
        if self.width is None or len(rule_text) <= self.width:
            return f"{self.show(reason)}: {rule_text}"
        self.cut[reason] = rule_text
        return f"{self.show(reason)}: {shorten(rule_text, self.width)}"

    def of_policy(self, rule: Rule) -> str:
        """A rule of the policy (the last one that is it) as ``"rule N: <rule>"``."""
        for index in range(len(self.rules) - 1, -1, -1):
            if self.rules[index] is rule:
                return self.text(f"rule {index + 1}", rule)
        return self.show(repr(rule))

    def decided_by(self, row: Decision) -> str:
        return self.text(row.reason, row.rule) if row.rule is not None else self.show(row.reason)

    def notes(self) -> list[tuple[str, str]]:
        def order(reason: str) -> tuple[int, str]:
            number = reason.rpartition(" ")[2]
            return (int(number), reason) if number.isdigit() else (0, reason)

        return [(self.show(reason), self.cut[reason]) for reason in sorted(self.cut, key=order)]


def groups_why(row: Decision, texts: _RuleTexts) -> str:
    """The lr and freeze/unfreeze rules that matched a trained leaf, after its decay
    reason: ``"; lr: rule 4: lr(0.1, layer='embedding')"``. A frozen leaf's freeze
    rule is its decay reason already."""
    if not (row.leaf.is_param and row.leaf.floating):
        return ""
    text = ""
    if row.lr_rule is not None:
        text += f"; lr: {texts.of_policy(row.lr_rule)}"
    if row.freeze_rule is not None and not row.frozen:
        text += f"; freeze: {texts.of_policy(row.freeze_rule)}"
    return text


def _why(report: Report, row: Decision, texts: _RuleTexts, words: Words, ranks: bool, groups: bool) -> str:
    """The rule column: what decided, the disagreeing views of a shared array, the
    framework-specific facts a selector read, and the lr and freeze rules."""
    text = texts.decided_by(row)
    for other in row.conflicts:
        text += (
            f" [shared with {texts.show(other.path)}, where {texts.decided_by(other)} "
            f"would say {words.yes if other.decay else words.no}]"
        )
    text += _notes(row, ranks)
    return text + (groups_why(row, texts) if groups else "")


def table(report: Report, width: int | None = RULE_WIDTH) -> Table:
    """The report's table, every cell visible; rule texts longer than ``width`` cut."""
    via, labels, rates = report._extra_columns()
    ids, lrs, frozen = report._group_columns()
    words = words_of(report)
    header = (
        ["path", "kind"]
        + (["via"] if via else [])
        + ["class", "role", "shape", words.column]
        + (["label"] if labels else [])
        + (["rate"] if rates else [])
        + (["layer id"] if ids else [])
        + (["lr"] if lrs else [])
        + (["frozen"] if frozen else [])
        + (["dims"] if report.show_dims else [])
        + ["rule"]
    )
    ranks = report.policy is not None and any(rule.min_ndim is not None for rule in report.policy.rules)
    groups = ids or lrs or frozen
    texts = _RuleTexts(report, width, visible)
    full = _RuleTexts(report, None, visible)
    cells, why = [], []
    for row in report:
        leaf = row.leaf
        trained = leaf.is_param and leaf.floating
        cells.append(
            [visible(leaf.path), visible(leaf.layer)]
            + ([leaf.kind_source] if via else [])
            + [
                visible(leaf.layer_type or "-"),
                visible(leaf.role),
                str(leaf.shape),
                "yes" if row.decay else "no",
            ]
            + ([visible(row.label)] if labels else [])
            + ([f"{row.rate:g}"] if rates else [])
            + ([_ids_text(row.layer_id)] if ids else [])
            + ([_scale_text(row.lr_scale) if trained else "-"] if lrs else [])
            + ([("yes" if row.frozen else "no") if trained else "-"] if frozen else [])
            + ([_dims(row)] if report.show_dims else [])
            + [_why(report, row, texts, words, ranks, groups)]
        )
        # Where no rule text is cut (nearly always), the cell is the full text.
        why.append(_why(report, row, full, words, ranks, groups) if texts.cut else cells[-1][-1])
    return Table(header, cells, why, texts.notes())


def dicts(report: Report) -> list[dict[str, Any]]:
    """:meth:`Report.to_dicts`: the decisions as data, texts as given."""
    ids, lrs, frozen = report._group_columns()
    has_lr_rules = report.policy is not None and any(
        rule.lr is not None for rule in report.policy.rules
    )
    texts = _RuleTexts(report)
    out = []
    for row in report:
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
            entry["freeze_rule"] = repr(row.freeze_rule) if row.freeze_rule is not None else None
        entry["why"] = row.why + (groups_why(row, texts) if ids or lrs or frozen else "")
        out.append(entry)
    return out


def text_view(report: Report) -> str:
    """``str(report)``: the table, the rules it cuts in full, the totals, the per-layer
    table with :func:`layer_decay`, and the warnings."""
    found = table(report)
    lines = _text_table(found.header, found.cells)
    if found.notes:
        lines += ["rules in full:"] + [f"  {reason}: {text}" for reason, text in found.notes]
    lines.append(report.summary())
    if report._shows_layers():
        lines += ["", "per layer"] + _text_table(*report.layer_rows(), right=_LAYER_NUMERIC)
    lines += [f"warning: {visible(message)}" for message in report.warnings]
    return "\n".join(lines)


def markdown_view(report: Report) -> str:
    """:meth:`Report.to_markdown`: the table (paths as code), the rules it cuts in
    full, the totals, and the per-layer table with :func:`layer_decay`."""
    found = table(report)
    rows = [[markdown_code(c[0])] + [markdown_text(x) for x in c[1:]] for c in found.cells]
    text = "\n".join(_markdown_table(found.header, rows))
    if found.notes:
        text += "\n\nrules in full:\n\n" + "\n".join(
            f"- {reason}: {markdown_code(rule)}" for reason, rule in found.notes
        )
    text += f"\n\n{report.summary()}\n"
    if report._shows_layers():
        text += "\n**per layer**\n\n" + "\n".join(_markdown_table(*report.layer_rows())) + "\n"
    return text
