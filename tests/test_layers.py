"""The dependency picture: face -> core, face -> adapters, adapters -> core; the core
imports no adapter and no framework, and no adapter imports the face."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

import decaymask as dm

SRC = pathlib.Path(dm.__file__).resolve().parent
FRAMEWORKS = {"jax", "jaxlib", "numpy", "optax", "equinox", "flax", "haiku"}
FACE = {"decaymask", "decaymask._face", "decaymask._check", "decaymask._cli",
        "decaymask.presets", "decaymask._transforms", "decaymask._demo"}


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: pathlib.Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside a function, made absolute."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            # `from . import _linen` imports a module, not a name.
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return found


def _files(under: str) -> list[pathlib.Path]:
    return sorted((SRC / under).rglob("*.py"))


def _top(module: str) -> str:
    return module.split(".")[0]


@pytest.mark.parametrize("path", _files("core"), ids=lambda p: p.name)
def test_the_core_imports_no_adapter_no_face_and_no_framework(path):
    imported = imports_of(path)
    assert not {m for m in imported if m.startswith("decaymask.adapters")}
    assert not {m for m in imported if m in FACE - {"decaymask"}}
    assert not {m for m in imported if _top(m) in FRAMEWORKS}


@pytest.mark.parametrize("path", _files("adapters"), ids=lambda p: str(p.relative_to(SRC)))
def test_adapters_import_the_core_but_not_the_face(path):
    imported = {m for m in imports_of(path) if _top(m) == "decaymask"}
    assert not imported & (FACE - {"decaymask"}), imported & FACE


def test_the_import_check_sees_imports():
    # The checks above can fail: the face does import the adapters and the core.
    imported = imports_of(SRC / "_face.py")
    assert "decaymask.adapters" in imported and "decaymask.core._policy" in imported


CLAIM = """
import sys, decaymask.adapters as a
tree = {"layer": {"w": 1.0}}
for adapter in a.registered():
    adapter.claim(tree)
print(sorted(m for m in ("jax", "equinox", "flax", "haiku") if m in sys.modules))
"""


def test_finding_and_asking_every_adapter_imports_no_framework():
    out = subprocess.run(
        [sys.executable, "-c", CLAIM], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


def test_no_source_file_is_long():
    long = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 420}
    assert long == {}
