"""The documentation site's promises: every example in the guides runs as shown.

Each page's ```python blocks run in order in one namespace, in a fresh directory, with
warnings as errors. A ```text block right after a python block is that block's output
and must equal what it prints. A ```console block holds commands (`$ ...`) and what
each prints; they run in the directory where the page's Python ran. The notebook view
embedded in a guide is checked against what the code renders today.

To rewrite every shown output and the embedded view from the code (after a change that
is meant to change them): ``python tests/test_docs.py --update``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import types
import warnings
from typing import Any

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
VIEW = DOCS / "assets" / "report-view.html"
VIEW_PAGE = DOCS / "getting-started" / "equinox.md"
PICTURE = DOCS / "assets" / "report-view.png"  # made by docs/render_view.py

_FENCE = re.compile(r"^```(\w*)\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


@dataclasses.dataclass
class Block:
    lang: str
    body: str
    start: int  # offsets of the body in the page's text
    end: int
    output: Block | None = None  # a ```text block right after a ```python block


def _blocks(text: str) -> list[Block]:
    found = [Block(m.group(1), m.group(2), m.start(2), m.end(2)) for m in _FENCE.finditer(text)]
    spans = [(m.start(), m.end()) for m in _FENCE.finditer(text)]
    kept: list[Block] = []
    for i, block in enumerate(found):
        after_python = (
            i > 0
            and block.lang == "text"
            and found[i - 1].lang == "python"
            and not text[spans[i - 1][1] : spans[i][0]].strip()
        )
        if after_python:
            kept[-1].output = block
        else:
            kept.append(block)
    return kept


def _pages() -> list[pathlib.Path]:
    return sorted(
        path for path in DOCS.rglob("*.md")
        if any(b.lang in ("python", "console") for b in _blocks(path.read_text()))
    )


def _shell_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = str(pathlib.Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    # The commands read the decaymask these tests import.
    import decaymask

    here = str(pathlib.Path(decaymask.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([here, *sys.path])
    env["COLUMNS"] = "100"
    return env


def _console(body: str, cwd: pathlib.Path) -> tuple[str, str]:
    """(shown, produced): the block as written and as the commands print it today."""
    produced: list[str] = []
    for line in body.splitlines():
        if line.startswith("$ "):
            command = line[2:]
            argv = shlex.split(command)
            if argv[0] == "python":
                argv[0] = sys.executable
            result = subprocess.run(argv, cwd=cwd, env=_shell_env(), capture_output=True, text=True)
            produced.append(line)
            produced.extend((result.stdout + result.stderr).rstrip("\n").splitlines())
    return body.rstrip("\n"), "\n".join(produced)


def run_page(page: pathlib.Path, cwd: pathlib.Path) -> tuple[list[tuple[Block, str]], dict[str, Any]]:
    """Runs the page; returns (every output block with what the code printed, namespace)."""
    from decaymask.core import _registry

    text = page.read_text()
    # The page runs as a module of its own, so that its classes have a module to live in.
    module = types.ModuleType(f"docs_{page.parent.name}_{page.stem}".replace("-", "_"))
    sys.modules[module.__name__] = module
    namespace: dict[str, Any] = module.__dict__
    results: list[tuple[Block, str]] = []
    classes, names = dict(_registry._by_class), dict(_registry._by_name)
    previous = pathlib.Path.cwd()
    os.chdir(cwd)
    try:
        with warnings.catch_warnings():
            # The examples must run clean: no PolicyWarning, no library warning, unless
            # the example catches it itself to show it.
            warnings.simplefilter("error")
            for block in _blocks(text):
                if block.lang == "python":
                    out = io.StringIO()
                    # Padded so that a traceback gives the line in the page.
                    code = "\n" * text.count("\n", 0, block.start) + block.body
                    with contextlib.redirect_stdout(out):
                        exec(compile(code, str(page), "exec", dont_inherit=True), namespace)
                    if block.output is not None:
                        results.append((block.output, out.getvalue()))
                elif block.lang == "console":
                    shown, produced = _console(block.body, cwd)
                    results.append((block, produced + "\n"))
    finally:
        os.chdir(previous)
        sys.modules.pop(module.__name__, None)
        for cls in set(_registry._by_class) - set(classes):
            _registry.unregister_layer(cls)
        for name in set(_registry._by_name) - set(names):
            _registry.unregister_layer(name)
    return results, namespace


VIEW_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>decaymask: the notebook view of a report</title>
<style>
body {{ font-family: system-ui, sans-serif; font-size: 13px; margin: 12px; color: #1f2328; }}
h2 {{ font-size: 14px; margin: 18px 0 6px 0; }}
code {{ font-family: ui-monospace, monospace; }}
</style></head><body>
<!-- Written by `python tests/test_docs.py --update` from docs/getting-started/equinox.md;
     tests/test_docs.py checks that it equals what the code renders. -->
<h2><code>report</code>: a short report</h2>
{short}
<h2><code>long_report</code>: {rows} rows, grouped by module (the first group opened)</h2>
{long}
</body></html>
"""


def view_page(namespace: dict[str, Any]) -> str:
    """The embedded page: the Equinox guide's two reports as a notebook renders them."""
    long = namespace["long_report"]._repr_html_().replace("<details>", "<details open>", 1)
    return VIEW_TEMPLATE.format(
        short=namespace["report"]._repr_html_(), long=long, rows=len(namespace["long_report"])
    )


@pytest.mark.parametrize("page", _pages(), ids=lambda p: str(p.relative_to(DOCS)))
def test_page_examples_run_as_shown(page, tmp_path):
    if "```console" in page.read_text() and shutil.which("decaymask", path=_shell_env()["PATH"]) is None:
        # CI installs the package (pip install -e '.[test]'), so there the command exists.
        assert not os.environ.get("CI"), "pip install -e . did not install `decaymask`"
        pytest.skip("the decaymask command is not installed beside this Python (pip install -e .)")
    results, namespace = run_page(page, tmp_path)
    for block, produced in results:
        assert produced.rstrip("\n") == block.body.rstrip("\n"), (page.name, block.body[:80])
    if page == VIEW_PAGE:
        assert VIEW.read_text() == view_page(namespace), (
            "docs/assets/report-view.html differs from what the code renders: "
            "python tests/test_docs.py --update"
        )


def test_the_reference_vocabulary_is_the_code_s():
    import decaymask as dm

    text = (DOCS / "reference" / "layers.md").read_text()
    rows = {
        cells[0].strip("` "): re.findall(r"`([^`]+)`", cells[1])
        for line in text.splitlines()
        if line.startswith("| `")
        for cells in [line.strip("|").split("|")]
    }
    assert rows["KINDS"] == list(dm.KINDS) and rows["ROLES"] == list(dm.ROLES)
    assert rows["SELECTORS"] == list(dm.SELECTORS) and rows["KIND_SOURCES"] == list(dm.KIND_SOURCES)
    assert rows["GROUPS"][0] == "norm" and list(dm.GROUPS) == ["norm"]
    rules = (DOCS / "reference" / "rules.md").read_text()
    selectors = re.findall(r"^\| `(\w+)=` \|", rules, re.MULTILINE)
    assert selectors == list(dm.SELECTORS)


def _reference() -> str:
    return "\n".join(page.read_text() for page in (DOCS / "reference").glob("*.md"))


def test_the_reference_covers_the_public_api():
    """Every public name has a place in the reference: rendered from its docstring
    (``::: decaymask.X``) or, for the vocabulary constants and types, in the text."""
    import decaymask as dm

    text = _reference()
    rendered = set(re.findall(r"^::: (decaymask[\w.]*)", text, re.MULTILINE))
    for name in dm.__all__:
        if name == "presets":
            continue
        assert f"decaymask.{name}" in rendered or f"`decaymask.{name}`" in text, name
    for name in dm.presets.__all__:
        assert f"decaymask.presets.{name}" in rendered, name
    # Policy's members are listed by hand on two pages; a new method must join a list.
    listed = set(re.findall(r"^        - (\w+)$", (DOCS / "reference" / "policy.md").read_text(), re.MULTILINE))
    listed |= {n.rsplit(".", 1)[1] for n in rendered if n.startswith("decaymask.Policy.")}
    public = {n for n in dir(dm.Policy) if not n.startswith("_")}
    assert public == listed, (public - listed, listed - public)


def test_every_guide_has_examples():
    pages = {str(p.relative_to(DOCS)) for p in _pages()}
    guides = {str(p.relative_to(DOCS)) for p in (DOCS / "guides").glob("*.md")}
    starts = {str(p.relative_to(DOCS)) for p in (DOCS / "getting-started").glob("*.md")}
    assert len(starts) == 4 and len(guides) >= 6
    assert guides | starts <= pages


def test_the_view_is_embedded():
    text = VIEW_PAGE.read_text()
    assert '<iframe src="../../assets/report-view.html"' in text
    assert VIEW.exists()


def test_the_view_is_shown_as_a_picture():
    """The page shows the picture of the view; a PNG of a sane size (docs/render_view.py)."""
    import struct

    assert "](../assets/report-view.png)" in VIEW_PAGE.read_text()
    data = PICTURE.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", "not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    assert 600 <= width <= 1400 and 300 <= height <= 3000, (width, height)
    assert 10_000 < len(data) < 300_000, len(data)


def test_nav_lists_every_page():
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in DOCS.rglob("*.md"):
        assert str(page.relative_to(DOCS)) in nav, page


def _update() -> None:
    for page in _pages():
        with tempfile.TemporaryDirectory() as tmp:
            results, namespace = run_page(page, pathlib.Path(tmp))
        text = page.read_text()
        for block, produced in sorted(results, key=lambda r: -r[0].start):
            text = text[: block.start] + produced.rstrip("\n") + "\n" + text[block.end :]
        page.write_text(text)
        if page == VIEW_PAGE:
            VIEW.parent.mkdir(exist_ok=True)
            VIEW.write_text(view_page(namespace))
        print(page.relative_to(ROOT))


if __name__ == "__main__":
    if sys.argv[1:] != ["--update"]:
        sys.exit("usage: python tests/test_docs.py --update")
    _update()
