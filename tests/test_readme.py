"""The README's promises: its commands are the ones CI runs, and the demo runs."""

from __future__ import annotations

import os
import pathlib
import shlex
import subprocess
import sys

import pytest

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


def _run_python_examples() -> None:
    import warnings

    text = (ROOT / "README.md").read_text()
    blocks = [part.split("```", 1)[0] for part in text.split("```python\n")[1:]]
    assert len(blocks) >= 10
    namespace: dict = {}
    with warnings.catch_warnings():
        # The examples must run clean: no PolicyWarning, no library warning.
        warnings.simplefilter("error")
        for block in blocks:
            exec(compile(block, "README.md", "exec"), namespace)


@pytest.fixture(scope="module")
def examples_dir(tmp_path_factory):
    """The directory where every ```python block of the README ran (once for the module:
    the shell commands run where the examples did)."""
    where = tmp_path_factory.mktemp("readme")
    previous = os.getcwd()
    os.chdir(where)
    try:
        _run_python_examples()
    finally:
        os.chdir(previous)
    return where


def test_readme_python_examples_run(examples_dir):
    """Every ```python block of the README, in order, in one namespace (they run in the
    fixture; an error there fails this test)."""


def _shell_commands() -> list[str]:
    """Every line of every ```bash block but the install commands of the first."""
    text = (ROOT / "README.md").read_text()
    lines = [
        line.strip()
        for block in text.split("```bash\n")[1:]
        for line in block.split("```", 1)[0].splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    return [line for line in lines if line not in _readme_commands()]


def _shell_env() -> dict[str, str]:
    # The commands run with this interpreter and its scripts (the `decaymask` command).
    env = dict(os.environ)
    env["PATH"] = str(pathlib.Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), *sys.path])
    return env


def _has_console_script() -> bool:
    found = (pathlib.Path(sys.executable).parent / "decaymask").exists()
    # CI installs the package (pip install -e '.[test]'), so there the command must exist.
    assert found or not os.environ.get("CI"), "pip install -e . did not install `decaymask`"
    return found


def test_readme_shell_commands_run(examples_dir):
    """Every command the README shows runs as shown, in the directory where its Python
    examples ran (one of them writes the train.toml a command reads)."""
    commands = _shell_commands()
    assert len(commands) >= 4 and any("--policy train.toml" in c for c in commands)
    if not _has_console_script():
        pytest.skip("the decaymask command is not installed beside this Python (pip install -e .)")
    for command in commands:
        result = subprocess.run(
            ["bash", "-c", command], cwd=examples_dir, env=_shell_env(), capture_output=True,
            text=True,
        )
        assert result.returncode == 0 and result.stderr == "", (command, result.stderr)
        assert result.stdout.strip(), command
        if command.startswith("decaymask --version"):
            assert result.stdout.startswith("decaymask ")
        elif "--format markdown" not in command:
            assert result.stdout.rstrip().splitlines()[-1].startswith("decayed "), command


def test_readme_shows_the_real_error_line():
    text = (ROOT / "README.md").read_text()
    shown = text.split("\n$ decaymask ", 1)[1].split("```", 1)[0].strip().splitlines()
    command, expected = shown[0], shown[1]
    if not _has_console_script():
        pytest.skip("the decaymask command is not installed beside this Python (pip install -e .)")
    result = subprocess.run(
        ["decaymask", *shlex.split(command)], env=_shell_env(), capture_output=True, text=True
    )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == expected + "\n"
