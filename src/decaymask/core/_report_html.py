"""The notebook view of a report: totals and warnings first, then the rows as an HTML
table; decayed rows tinted and marked; a long report grouped by module, each group
collapsed."""

from __future__ import annotations

from html import escape as _escape_html
from typing import TYPE_CHECKING, Any

from ._report_table import Table, table, words_of
from ._text import visible

if TYPE_CHECKING:
    from ._report import Report


def escape(text: str) -> str:
    """``text`` for HTML: visible (a bidi override would reorder the page), then escaped."""
    return _escape_html(visible(text))


_HTML_CLASS = "decaymask-report"
_HTML_FLAT_ROWS = 40  # longer reports are grouped by module, each group collapsed
_MARK = {True: "&#10003;", False: "&middot;"}
_NUMERIC = frozenset({"rate", "layer id", "lr"})  # right-aligned columns
# JupyterLab right-aligns every table cell with `:not(.jp-RenderedMarkdown)
# .jp-RenderedHTMLCommon td` (two classes and a tag), and drops <style> elements from
# the outputs of a notebook it does not trust: each cell carries its alignment inline,
# which outranks any selector and survives its sanitizer.
_LEFT = ' style="text-align: left"'
_RIGHT = ' style="text-align: right"'
# The rest scoped to the report's class, `div.` adding a tag so as to win over
# JupyterLab's one-class rules wherever they sit; colours are tints, readable on light
# and dark themes alike.
_HTML_STYLE = """<style>
div.decaymask-report table { border-collapse: collapse; margin: 0.25em 0 0.75em 0; }
div.decaymask-report th, div.decaymask-report td {
  text-align: left; padding: 0.15em 0.8em 0.15em 0.4em; vertical-align: top;
  white-space: nowrap; }
div.decaymask-report td:last-child { white-space: normal; }
div.decaymask-report th { border-bottom: 1px solid rgba(128, 128, 128, 0.6); }
div.decaymask-report th.dm-num, div.decaymask-report td.dm-num { text-align: right; }
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


def report_html(report: Report) -> str:
    """``report`` as one HTML fragment, styles included: what ``Report._repr_html_``
    gives a notebook."""
    found = table(report)
    words = words_of(report)
    warnings = list(report.warnings)
    parts = [f'<div class="{_HTML_CLASS}">', _HTML_STYLE]
    parts.append(
        f'<p class="dm-summary"><b>{escape(report.summary())}</b>'
        f'<span class="dm-legend"> &nbsp; <span class="dm-swatch dm-yes">'
        f"{_MARK[True]} {words.legend[0]}</span> "
        f'<span class="dm-swatch">{_MARK[False]} {words.legend[1]}</span></span></p>'
    )
    if warnings:
        items = "".join(f"<li>{escape(text)}</li>" for text in warnings)
        parts.append(
            f'<div class="dm-warnings"><b>&#9888; {len(warnings)} '
            f"warning{'s' if len(warnings) != 1 else ''}</b><ul>{items}</ul></div>"
        )
    if len(found.cells) <= _HTML_FLAT_ROWS:
        parts.append(_html_table(report, found, range(len(found.cells))))
    else:
        parts.append(_html_groups(report, found, list(range(len(found.cells))), 0))
    if found.notes:
        items = "".join(
            f"<li>{escape(reason)}: <code>{escape(rule)}</code></li>" for reason, rule in found.notes
        )
        parts.append(f'<div class="dm-legend">rules in full:<ul>{items}</ul></div>')
    if report._shows_layers():
        parts.append(_html_layers(*report.layer_rows()))
    parts.append("</div>")
    return "".join(parts)


def _html_groups(report: Report, found: Table, indices: list[int], depth: int) -> str:
    """The rows below one module path, by the next path component: arrays of the
    module itself in a table, each submodule a collapsed group with its totals
    (subdivided again while it holds more than a screenful)."""
    paths = {i: report[i].path.split("/") for i in indices}
    own = [i for i in indices if len(paths[i]) <= depth + 1]
    children: dict[str, list[int]] = {}
    for i in indices:
        if len(paths[i]) > depth + 1:
            children.setdefault("/".join(paths[i][: depth + 1]), []).append(i)
    if not own and len(children) == 1:  # one submodule only: show its children
        return _html_groups(report, found, indices, depth + 1)
    share = words_of(report).share
    parts = [_html_table(report, found, own)] if own else []
    for name, members in children.items():
        rows = [report[i] for i in members]
        n_decay = sum(row.decay for row in rows)
        elements = sum(row.leaf.size for row in rows)
        decayed = sum(row.leaf.size for row in rows if row.decay)
        inner = (
            _html_table(report, found, members)
            if len(members) <= _HTML_FLAT_ROWS
            else _html_groups(report, found, members, depth + 1)
        )
        parts.append(
            f"<details><summary>{_share_bar(decayed, elements)}<code>{escape(name)}</code>"
            f" &nbsp; {share.format(n=n_decay, total=len(rows))}, {decayed:,} of "
            f"{elements:,} elements</summary>{inner}</details>"
        )
    return "".join(parts)


def _html_table(report: Report, found: Table, indices: Any) -> str:
    header, cells = found.header, found.cells
    decay_col = header.index(words_of(report).column)
    numeric = {i for i, h in enumerate(header) if h in _NUMERIC}
    last = len(header) - 1
    head = "".join(
        f'<th class="dm-num"{_RIGHT}>{escape(h)}</th>' if i in numeric else f"<th{_LEFT}>{escape(h)}</th>"
        for i, h in enumerate(header)
    )
    body = []
    for index in indices:
        row = cells[index]
        yes = report[index].decay
        tds = []
        for i, c in enumerate(row):
            if i == 0:
                tds.append(f"<td{_LEFT}><code>{escape(c)}</code></td>")
            elif i == decay_col:
                tds.append(f'<td class="dm-mark"{_LEFT}>{_MARK[yes]} {escape(c)}</td>')
            elif i in numeric:
                tds.append(f'<td class="dm-num"{_RIGHT}>{escape(c)}</td>')
            elif i == last and found.why[index] != c:
                # A rule text cut short: in full on hover, and below the table.
                tds.append(f'<td{_LEFT} title="{escape(found.why[index])}">{escape(c)}</td>')
            else:
                tds.append(f"<td{_LEFT}>{escape(c)}</td>")
        body.append(f'<tr class="{"dm-yes" if yes else "dm-no"}">{"".join(tds)}</tr>')
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _html_layers(header: list[str], cells: list[list[str]]) -> str:
    """The per-layer table of a policy with a layer-decay ladder, under its heading."""
    numeric = {i for i, h in enumerate(header) if h in _NUMERIC or h in ("leaves", "parameters")}

    def cell(tag: str, i: int, text: str) -> str:
        align = f' class="dm-num"{_RIGHT}' if i in numeric else _LEFT
        return f"<{tag}{align}>{escape(text)}</{tag}>"

    head = "".join(cell("th", i, h) for i, h in enumerate(header))
    body = "".join(
        "<tr>" + "".join(cell("td", i, c) for i, c in enumerate(row)) + "</tr>" for row in cells
    )
    return (
        f'<p class="dm-summary dm-layers"><b>per layer</b></p>'
        f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    )
