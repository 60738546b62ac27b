"""The README's promises: its commands are the ones CI runs, and the demo runs."""

from __future__ import annotations

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.strip() for line in block.splitlines() if line.strip()]


def test_readme_opens_with_the_demo_and_test_commands():
    demo, tests = _readme_commands()
    assert demo.endswith("python -m decaymask demo") and demo.startswith("pip install")
    assert tests.startswith("pip install") and "pytest" in tests


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert _readme_commands()[1] in ci


def test_demo_runs():
    result = subprocess.run(
        [sys.executable, "-m", "decaymask", "demo", "--steps", "2"],
        capture_output=True,
        text=True,
        check=True,
    )
    out = result.stdout
    # The same policy on the same model in three frameworks.
    assert "decayed 12 of 15 leaves, 696 of 840 elements (82.9%)" in out  # Equinox
    assert out.count("decayed 16 of 19 leaves, 728 of 872 elements (83.5%)") == 2  # Linen, NNX
    assert "head/weight                    linear      Linear     weight     (16, 8)  yes" in out
    assert "block/attn/query/kernel  linear      DenseGeneral  weight     (8, 2, 4)  yes" in out
    assert "block/attn/query/kernel  linear      LinearGeneral  weight     (8, 2, 4)  yes" in out
    lines = out.splitlines()
    for name in ("Equinox", "Linen", "NNX"):
        [row] = [line for line in lines if line.startswith(f"  {name} ")]
        losses = [float(x) for x in row.split()[1:]]
        assert len(losses) == 2 and losses[1] < losses[0]


def test_readme_python_examples_run(tmp_path, monkeypatch):
    """Every ```python block of the README, in order, in one namespace."""
    import warnings

    text = (ROOT / "README.md").read_text()
    blocks = [part.split("```", 1)[0] for part in text.split("```python\n")[1:]]
    assert len(blocks) >= 10
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    with warnings.catch_warnings():
        # The examples must run clean: no PolicyWarning, no library warning.
        warnings.simplefilter("error")
        for block in blocks:
            exec(compile(block, "README.md", "exec"), namespace)
