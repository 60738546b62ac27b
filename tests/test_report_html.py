"""The notebook view keeps its alignment where a notebook restyles tables: JupyterLab
right-aligns every cell with a two-class selector, and drops <style> elements from
outputs it does not trust; each cell of a report carries its alignment inline."""

from __future__ import annotations

import html.parser
import re
from typing import Any

import pytest

import decaymask as dm

POLICY = dm.Policy(
    dm.decay(layer="linear", param="weight", rate=0.5), dm.lr(0.1, layer="embedding"), dm.layer_decay(0.5)
)


def _leaves(blocks: int) -> list[dm.Leaf]:
    leaves = [dm.Leaf("embed/embedding", layer="embedding", role="embedding", shape=(10, 4))]
    for i in range(blocks):
        leaves += [
            dm.Leaf(f"blocks/{i}/fc/kernel", layer="linear", role="weight", shape=(4, 4)),
            dm.Leaf(f"blocks/{i}/fc/bias", layer="linear", role="bias", shape=(4,)),
        ]
    return leaves + [dm.Leaf("head/kernel", layer="linear", role="weight", shape=(4, 10))]


class _Cells(html.parser.HTMLParser):
    """Every th and td: its table's header, its text and its inline style."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: list[tuple[str, str, str]] = []  # (tag, style, text)
        self._open: list[Any] | None = None

    def handle_starttag(self, tag, attrs):
        if tag in ("th", "td"):
            self._open = [tag, dict(attrs).get("style", ""), ""]

    def handle_data(self, data):
        if self._open is not None:
            self._open[2] += data

    def handle_endtag(self, tag):
        if tag in ("th", "td") and self._open is not None:
            self.cells.append(tuple(self._open))  # type: ignore[arg-type]
            self._open = None


def _cells(page: str) -> list[tuple[str, str, str]]:
    parser = _Cells()
    parser.feed(page)
    return parser.cells


NUMERIC = re.compile(r"^([\d.][\d,.e+\-]*|rate|layer id|lr|leaves|parameters)$")


@pytest.mark.parametrize("blocks", [2, 30], ids=["flat", "grouped"])
def test_every_cell_carries_its_alignment_inline(blocks):
    page = POLICY.report(_leaves(blocks))._repr_html_()
    cells = _cells(page)
    assert len(cells) > (2 * blocks + 2) * 10  # the rows, their headers, the per-layer table
    for tag, style, text in cells:
        expected = "text-align: right" if NUMERIC.match(text.strip()) else "text-align: left"
        assert style == expected, (tag, text)
    # The text columns, the path and the rule above all, are left-aligned.
    assert ("td", "text-align: left", "blocks/0/fc/kernel") in cells
    assert ("td", "text-align: left", "rule 1: decay(layer='linear', param='weight', rate=0.5)") in cells


def test_the_style_outranks_jupyterlabs_one_class_rules():
    page = POLICY.report(_leaves(2))._repr_html_()
    # JupyterLab: `.jp-RenderedHTMLCommon td { padding: 0.5em; white-space: normal;
    # vertical-align: middle }`, one class and a tag; the report's rules add a tag.
    assert "div.decaymask-report th, div.decaymask-report td {" in page


JUPYTERLAB_RIGHT = ":not(.jp-RenderedMarkdown).jp-RenderedHTMLCommon td"


def test_a_jupyterlab_export_keeps_the_alignment(tmp_path):
    """The page nbconvert's JupyterLab template makes from a notebook holding the report:
    JupyterLab's own stylesheet (which right-aligns every cell) and the report's cells,
    each left-aligned inline. An inline style loses only to an !important rule, and
    the stylesheet has none on table cells."""
    nbconvert = pytest.importorskip("nbconvert")
    nbformat = pytest.importorskip("nbformat")
    report = POLICY.report(_leaves(2))
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("report")
    cell.outputs = [
        nbformat.v4.new_output(
            "execute_result", data={"text/html": report._repr_html_(), "text/plain": repr(report)}, execution_count=1
        )
    ]
    nb.cells = [cell]
    try:
        page, _ = nbconvert.HTMLExporter(template_name="lab").from_notebook_node(nb)
    except Exception as err:  # pragma: no cover - the lab template ships with jupyterlab
        pytest.skip(f"nbconvert's lab template is not available: {err}")
    assert JUPYTERLAB_RIGHT in page  # the rule that right-aligns every cell
    rules = re.findall(r"([^{}]*)\{([^{}]*)\}", page)
    for selector, body in rules:
        if re.search(r"\b(td|th)\b", selector):
            assert not re.search(r"text-align\s*:[^;]*!important", body), selector
    ours = page[page.index('<div class="decaymask-report">'):]
    cells = _cells(ours[: ours.index("</div></div>") if "</div></div>" in ours else None])
    assert cells and all(style.startswith("text-align: ") for _, style, _ in cells)
    assert ("td", "text-align: left", "blocks/0/fc/kernel") in cells
