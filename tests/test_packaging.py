"""The package surface: what `import decaymask` loads, what the wheel ships, the docs run."""

from __future__ import annotations

import collections.abc
import doctest
import importlib
import pathlib
import subprocess
import sys
import tarfile
import typing
import zipfile

import pytest

import decaymask as dm

ROOT = pathlib.Path(__file__).resolve().parents[1]
HEAVY = ("jax", "jaxlib", "equinox", "flax", "optax", "numpy")

CHECK = """
import sys
{before}
import decaymask
loaded = sorted(m for m in {heavy!r} if m in sys.modules)
print(",".join(loaded))
"""


def _loaded_after_import(before: str = "") -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", CHECK.format(before=before, heavy=HEAVY)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    return out.split(",") if out else []


def test_import_loads_no_framework():
    assert _loaded_after_import() == []


def test_the_import_check_can_fail():
    # The same check sees a framework when one is loaded, so its silence above means something.
    assert _loaded_after_import("import optax") != []


PUBLIC = [
    "Decision",
    "GROUPS",
    "KINDS",
    "KIND_SOURCES",
    "MaskMismatchError",
    "Layer",
    "Leaf",
    "Policy",
    "PolicyDataError",
    "PolicyWarning",
    "ROLES",
    "Report",
    "Rule",
    "SELECTORS",
    "UnmatchedRuleError",
    "add_decayed_weights",
    "check_mask",
    "decay",
    "label",
    "no_decay",
    "presets",
    "register_layer",
    "unregister_layer",
    "lr",
    "freeze",
    "unfreeze",
    "layer_decay",
    "LayerDecay",
    "merge",
    "VerifyError",
    "Mismatch",
    "LayerKind",
    "LayerGroup",
    "Role",
    "record",
    "Recording",
]


@pytest.mark.parametrize("name", PUBLIC)
def test_public_names_importable(name):
    assert getattr(dm, name) is not None


def test_no_undocumented_public_names():
    public = {n for n in vars(dm) if not n.startswith("_")} - {"core", "adapters"}
    assert public == set(PUBLIC)


def test_all_lists_the_public_names():
    assert sorted(dm.__all__) == sorted(PUBLIC)
    namespace: dict[str, object] = {}
    exec("from decaymask import *", namespace)
    assert set(namespace) - {"__builtins__"} == set(PUBLIC)


def test_literal_types_are_the_names_checked_at_run_time():
    # The types a checker reads and the tuples a rule is checked against are one list.
    assert typing.get_args(dm.LayerKind) == dm.KINDS
    assert typing.get_args(dm.Role) == dm.ROLES
    assert typing.get_args(dm.LayerGroup) == tuple(dm.GROUPS) == ("norm",)
    assert dm.GROUPS["norm"] == ("layer_norm", "rms_norm", "group_norm", "batch_norm", "instance_norm")


@pytest.mark.parametrize("fn", [dm.decay, dm.no_decay, dm.label, dm.lr, dm.freeze, dm.unfreeze])
def test_rule_makers_take_kinds_and_roles_as_literal_types(fn):
    hints = typing.get_type_hints(fn)
    for key in ("layer", "within"):
        assert set(typing.get_args(hints[key])) == {
            dm.LayerKind, dm.LayerGroup, type,
            collections.abc.Sequence[typing.Union[dm.LayerKind, dm.LayerGroup, type]], type(None),
        }
    assert set(typing.get_args(hints["param"])) == {
        dm.Role, collections.abc.Sequence[dm.Role], type(None)
    }
    with pytest.raises(ValueError, match=r"unknown layer kind 'liner'\. Did you mean 'linear'\?"):
        fn(*(("x",) if fn is dm.label else (0.5,) if fn is dm.lr else ()), layer="liner")


MODULES = [
    "decaymask.core._leaf",
    "decaymask.core._rules",
    "decaymask.core._policy",
    "decaymask._face",
    "decaymask.core._registry",
    "decaymask.core._report",
    "decaymask.presets",
    "decaymask._check",
    "decaymask.core._ladder",
    "decaymask.core._group_rules",
    "decaymask._groups",
    "decaymask.core._names",
    "decaymask._record",
]


@pytest.mark.parametrize("module", MODULES)
def test_docstring_examples_run(module):
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_wheel_ships_only_the_package(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
    )
    [wheel] = tmp_path.glob("decaymask-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert top == {"decaymask", f"decaymask-{dm.__version__}.dist-info"}
    assert "decaymask/py.typed" in names
    assert f"decaymask-{dm.__version__}.dist-info/licenses/LICENSE" in names
    license_text = zipfile.ZipFile(wheel).read(f"decaymask-{dm.__version__}.dist-info/licenses/LICENSE")
    assert b"Apache License" in license_text and b"Version 2.0, January 2004" in license_text
    assert not any("test" in n.split("/")[-1] for n in names)


def test_sdist_holds_the_package_and_what_its_tests_read(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "hatchling", "build", "-t", "sdist", "-d", str(tmp_path)],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    [sdist] = tmp_path.glob("decaymask-*.tar.gz")
    files = {n.split("/", 1)[1] for n in tarfile.open(sdist).getnames() if "/" in n}
    for needed in (
        "LICENSE", "README.md", "CHANGELOG.md", "pyproject.toml", "src/decaymask/__init__.py",
        "src/decaymask/py.typed", "tests/conftest.py", "docs/index.md", "mkdocs.yml",
        ".ci/oldest.txt", ".ci/run", "tools/render_report.py",
    ):
        assert needed in files, needed
    # Benchmarks are the repository's, and a README.md below the root is no reason to ship.
    assert not any(f.startswith(("benchmarks/", ".git/", ".benchmarks/")) for f in files)
    assert not any("__pycache__" in f or f.endswith(".pyc") for f in files)


def test_ci_checks_the_release_and_runs_the_readme_demo_from_the_wheel():
    ci = (ROOT / ".ci" / "run").read_text()
    step = ci[ci.index("python -m build"):]
    assert "twine check --strict" in step
    # The README's first command, its demo run by the wheel installed with the extras.
    demo = (ROOT / "README.md").read_text().split("```bash\n", 1)[1].splitlines()[0]
    extras = demo.split("'.[", 1)[1].split("]'", 1)[0]
    assert f'"$(ls "$dist"/decaymask-*.whl)[{extras}]"' in step
    assert f'"$release/bin/python" -m decaymask demo' in step and demo.endswith("python -m decaymask demo")


def _oldest_pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / ".ci" / "oldest.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.lower()] = version
    return pins


def test_lower_bounds_are_the_oldest_set_ci_tests():
    import re
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = _oldest_pins()
    extras = project["optional-dependencies"]
    bounds = {}
    # The library's own extras and the test suite's; the docs build is not part of it.
    for requirement in (r for name in ("equinox", "flax", "haiku", "yaml", "test") for r in extras[name]):
        found = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", requirement)
        if found:
            bounds.setdefault(found[1].lower(), set()).add(found[2])
    assert bounds and all(len(v) == 1 for v in bounds.values()), bounds
    assert {name: v.pop() for name, v in bounds.items()} == {
        name: version for name, version in pins.items() if name != "jaxlib"
    }
    assert pins["jaxlib"] == pins["jax"]
    assert project["requires-python"] == ">=3.11"


def test_readme_table_lists_the_oldest_set():
    text = (ROOT / "README.md").read_text()
    table = text.split("## Supported versions", 1)[1].split("\n## ", 1)[0]
    pins = _oldest_pins()
    for name in ("jax", "equinox", "flax", "optax", "pyyaml", "dm-haiku"):
        [row] = [line for line in table.splitlines() if line.lower().startswith(f"| {name} ")]
        assert f"| {pins[name]} |" in row, row


def test_license_is_apache_2():
    import tomllib

    assert (ROOT / "LICENSE").read_text().split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"] == "Apache-2.0"


def test_api_reference_covers_the_public_names():
    pages = "".join(p.read_text() for p in (ROOT / "docs").rglob("*.md"))
    constants = {"GROUPS", "KINDS", "KIND_SOURCES", "ROLES", "SELECTORS", "LayerKind", "LayerGroup", "Role"}
    for name in PUBLIC:
        if name in constants:
            assert f"`decaymask.{name}`" in pages, name
        elif name == "presets":
            assert "::: decaymask.presets.standard" in pages
        else:
            assert f"::: decaymask.{name}\n" in pages, name
