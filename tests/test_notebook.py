"""The notebook view: a Report executed in a real Jupyter kernel renders as HTML, and its
slices and filters render as Reports too."""

from __future__ import annotations

import ast
import json
import os
import pathlib
import sys

import pytest

try:
    import nbclient
    import nbformat
except ImportError:  # pragma: no cover - the test extra installs them
    nbclient = nbformat = None

CELLS = [
    """
import decaymask as dm

leaves = [
    dm.Leaf(f"block_{i}/{name}", layer=kind, role=role, shape=shape)
    for i in range(3)
    for name, kind, role, shape in [
        ("dense/kernel", "linear", "weight", (8, 8)),
        ("dense/bias", "linear", "bias", (8,)),
        ("norm/scale", "layer_norm", "scale", (8,)),
    ]
]
report = dm.Policy(dm.decay(layer="linear", param="weight")).report(leaves)
report
""",
    "report[:3]",
    "report.decayed",
    "report.not_decayed.filter(lambda row: row.role == 'scale')",
    "report[0].path, len(report), [row.decay for row in report][:3]",
    "import sys; sys.executable, dm.__file__",
]


def _kernel(tmp_path: pathlib.Path, monkeypatch) -> str:
    """A kernel spec that runs this very interpreter (an installed "python3" spec may
    name whichever `python` comes first on PATH)."""
    spec = tmp_path / "jupyter" / "kernels" / "decaymask-test"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": "decaymask test", "language": "python"})
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    # The kernel imports the decaymask under test, whatever the install points at.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(sys.path))
    return "decaymask-test"


def _run_notebook(tmp_path: pathlib.Path, kernel: str) -> list:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(source.strip()) for source in CELLS]
    client = nbclient.NotebookClient(
        nb,
        timeout=120,
        kernel_name=kernel,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()
    return [cell.outputs for cell in nb.cells]


def _html(outputs: list) -> str:
    [result] = [o for o in outputs if o.output_type == "execute_result"]
    return result["data"]["text/html"]


@pytest.mark.skipif(
    nbclient is None and not os.environ.get("CI"),
    reason="nbclient, nbformat and ipykernel come with the test extra",
)
def test_a_report_renders_in_a_real_kernel(tmp_path, monkeypatch):
    outputs = _run_notebook(tmp_path, _kernel(tmp_path, monkeypatch))
    full, head, decayed, scales, plain, where = outputs
    assert not [o for cell in outputs for o in cell if o.output_type == "error"]
    html = _html(full)
    assert html.startswith('<div class="decaymask-report"><style>')
    assert "<b>decayed 3 of 9 leaves, 192 of 240 elements (80.0%)</b>" in html
    assert html.count('<tr class="dm-yes">') == 3 and html.count('<tr class="dm-no">') == 6
    assert "<details>" not in html  # short: one table, nothing collapsed
    assert "<b>decayed 1 of 3 leaves, 64 of 80 elements (80.0%)</b>" in _html(head)
    assert "<b>decayed 3 of 3 leaves, 192 of 192 elements (100.0%)</b>" in _html(decayed)
    assert _html(decayed).count('<tr class="dm-no">') == 0
    assert "<b>decayed 0 of 3 leaves, 0 of 24 elements (0.0%)</b>" in _html(scales)
    [result] = [o for o in plain if o.output_type == "execute_result"]
    assert result["data"]["text/plain"] == "('block_0/dense/kernel', 9, [True, False, False])"
    import decaymask

    [result] = [o for o in where if o.output_type == "execute_result"]
    # IPython wraps a long tuple over lines: compare the value, not the text.
    assert ast.literal_eval(result["data"]["text/plain"]) == (sys.executable, decaymask.__file__)
