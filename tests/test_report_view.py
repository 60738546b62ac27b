"""A Report as a value and as the notebook shows it: slices and filters are Reports; the
HTML view puts totals and warnings first, marks decayed rows, groups long reports."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import decaymask as dm

ROOT = pathlib.Path(__file__).resolve().parents[1]
POLICY = dm.Policy(dm.decay(layer="linear", param="weight"))


def _leaves(blocks: int) -> list[dm.Leaf]:
    leaves = [dm.Leaf("embed/embedding", layer="embedding", role="embedding", shape=(10, 4))]
    for i in range(blocks):
        leaves += [
            dm.Leaf(f"blocks/{i}/fc/kernel", layer="linear", role="weight", shape=(4, 4)),
            dm.Leaf(f"blocks/{i}/fc/bias", layer="linear", role="bias", shape=(4,)),
            dm.Leaf(f"blocks/{i}/norm/scale", layer="layer_norm", role="scale", shape=(4,)),
        ]
    return leaves + [dm.Leaf("head/kernel", layer="linear", role="weight", shape=(4, 10))]


def test_slices_and_filters_are_reports():
    report = POLICY.report(_leaves(3))
    head = report[:3]
    assert isinstance(head, dm.Report) and [row.path for row in head] == [
        "embed/embedding", "blocks/0/fc/kernel", "blocks/0/fc/bias",
    ]
    assert head.policy is POLICY and head.summary() == "decayed 1 of 3 leaves, 16 of 60 elements (26.7%)"
    assert isinstance(report[1], dm.Decision) and report[-1].path == "head/kernel"
    assert len(report) == 11 and [row.path for row in report][:2] == ["embed/embedding", "blocks/0/fc/kernel"]
    decayed = report.decayed
    assert isinstance(decayed, dm.Report) and all(row.decay for row in decayed) and len(decayed) == 4
    kept = report.not_decayed
    assert isinstance(kept, dm.Report) and len(kept) == 7 and not any(row.decay for row in kept)
    scales = report.filter(lambda row: row.role == "scale")
    assert isinstance(scales, dm.Report) and [row.path for row in scales] == [
        f"blocks/{i}/norm/scale" for i in range(3)
    ]
    assert isinstance(report[::2][1:], dm.Report) and report[::2][1:][0].path == "blocks/0/fc/bias"
    assert str(report.decayed).splitlines()[-1] == "decayed 4 of 4 leaves, 88 of 88 elements (100.0%)"
    assert report.to_dicts()[:3] == head.to_dicts()


def test_a_slice_keeps_the_reports_other_attributes():
    report = dm.Report(POLICY.decide(_leaves(1)), POLICY, show_dims=True)
    assert report[:2].show_dims is True and report.decayed.show_dims is True


def test_html_totals_first_then_marked_left_aligned_rows():
    html = POLICY.report(_leaves(2))._repr_html_()
    summary = html.index('<p class="dm-summary"><b>decayed 3 of 8 leaves, 72 of 128 elements (56.2%)</b>')
    assert summary < html.index("<table>")
    rows = re.findall(r'<tr class="(dm-yes|dm-no)"><td style="text-align: left"><code>([^<]*)</code>', html)
    assert rows == [
        ("dm-no", "embed/embedding"), ("dm-yes", "blocks/0/fc/kernel"), ("dm-no", "blocks/0/fc/bias"),
        ("dm-no", "blocks/0/norm/scale"), ("dm-yes", "blocks/1/fc/kernel"), ("dm-no", "blocks/1/fc/bias"),
        ("dm-no", "blocks/1/norm/scale"), ("dm-yes", "head/kernel"),
    ]
    assert html.count('<td class="dm-mark" style="text-align: left">&#10003; yes</td>') == 3
    assert html.count('<td class="dm-mark" style="text-align: left">&middot; no</td>') == 5
    # Every cell is left-aligned inline (what JupyterLab's own styles cannot override,
    # test_report_html.py); decayed rows are tinted and carry a bar.
    assert "div.decaymask-report th, div.decaymask-report td {\n  text-align: left;" in html
    assert ".decaymask-report tr.dm-yes td { background:" in html
    assert "<details>" not in html and '<div class="dm-warnings">' not in html


def test_html_rate_column_is_right_aligned():
    rated = dm.Policy(dm.decay(layer="linear", param="weight", rate=0.5))
    html = rated.report(_leaves(1))._repr_html_()
    assert '<th class="dm-num" style="text-align: right">rate</th>' in html
    assert '<td class="dm-num" style="text-align: right">0.5</td>' in html


def test_html_long_report_grouped_by_module_and_collapsed():
    report = POLICY.report(_leaves(30))  # 92 rows
    html = report._repr_html_()
    assert html.index('<p class="dm-summary"><b>decayed 31 of 92 leaves') < html.index("<details>")
    summaries = re.findall(r"<summary>.*?<code>([^<]*)</code> &nbsp; ([^<]*)</summary>", html)
    # In path order: embed, blocks (90 rows, so subdivided per block), head.
    assert [name for name, _ in summaries] == (
        ["embed", "blocks"] + [f"blocks/{i}" for i in range(30)] + ["head"]
    )
    assert summaries[0] == ("embed", "0 of 1 leaves decay, 0 of 40 elements")
    assert summaries[1] == ("blocks", "30 of 90 leaves decay, 480 of 720 elements")
    assert summaries[2] == ("blocks/0", "1 of 3 leaves decay, 16 of 24 elements")
    assert "<details open" not in html and html.count("<details>") == 33
    assert html.count('<tr class="dm-yes">') == 31  # every row is still there, collapsed


def test_html_a_report_under_one_root_groups_by_its_children():
    leaves = [
        dm.Leaf(f"model/layer_{i}/kernel", layer="linear", role="weight", shape=(2, 2))
        for i in range(50)
    ]
    html = POLICY.report(leaves)._repr_html_()
    summaries = re.findall(r"<code>(model/layer_\d+)</code>", html)
    assert summaries[:2] == ["model/layer_0", "model/layer_1"] and len(summaries) == 50


def test_html_warnings_come_before_the_rows_escaped():
    report = dm.Report(
        POLICY.decide(_leaves(1)),
        POLICY,
        warnings=("rule 2 no_decay(path='decoder/*') matched no parameter <of> this tree",),
    )
    html = report._repr_html_()
    box = html.index('<div class="dm-warnings"><b>&#9888; 1 warning</b><ul><li>rule 2 '
                     "no_decay(path=&#x27;decoder/*&#x27;) matched no parameter &lt;of&gt; this tree</li></ul></div>")
    assert html.index('<p class="dm-summary">') < box < html.index("<table>")


def test_render_script_writes_the_page(tmp_path):
    import os

    assert "python tools/render_report.py" in (ROOT / "README.md").read_text()
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "render_report.py"), "--html-only", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{tmp_path / 'report.html'}\n"
    page = (tmp_path / "report.html").read_text()
    assert page.count('<div class="decaymask-report">') == 3
    assert '<div class="dm-warnings">' in page and page.count("<details open>") == 2
