"""The command line: ``python -m decaymask explain`` on the demo models."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

import decaymask as dm
from decaymask._cli import frameworks, main

DEMO = "decaymask._demo"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "factory, framework, head",
    [
        ("equinox_model", "equinox", "head/weight"),
        ("linen_model", "linen", "head/kernel"),
        ("nnx_model", "nnx", "head/kernel"),
    ],
)
def test_explain_json_on_each_demo_model(capsys, factory, framework, head):
    code, out, _ = run(capsys, "explain", f"{DEMO}:{factory}", "--format", "json", "--preset", "gpt")
    assert code == 0
    data = json.loads(out)
    rows = {row["path"]: row for row in data["rows"]}
    assert rows[head]["decay"] is True and rows[head]["kind"] == "linear"
    assert rows[head]["via"] == "class"
    assert {row["path"] for row in data["rows"] if row["kind"] == "layer_norm"} and not any(
        row["decay"] for row in data["rows"] if row["kind"] == "layer_norm"
    )
    assert data["totals"]["leaves"] == len(data["rows"])


def test_explain_table_with_a_policy_file(capsys, tmp_path):
    path = tmp_path / "train.toml"
    path.write_text('[wd]\nrules = [{decay = true, layer = "linear"}, {decay = true, layer = "layer_norm", param = "bias"}]\n')
    code, out, _ = run(capsys, "explain", f"{DEMO}:equinox_model", "--policy", str(path), "--policy-key", "wd")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == f"equinox: {DEMO}:equinox_model"
    assert out.rstrip().endswith("decayed 12 of 15 leaves, 696 of 840 elements (82.9%)")


def test_explain_markdown_with_dims(capsys):
    code, out, _ = run(capsys, "explain", f"{DEMO}:nnx_model", "--preset", "muon", "--format", "markdown", "--dims")
    assert code == 0
    assert "| `head/kernel` | linear | Linear | weight | (8, 16) | yes | (0,)->(1,) |" in out
    assert "| `block/attn/query/kernel` | linear | LinearGeneral | weight | (8, 2, 4) | yes | (0,)->(1, 2) |" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["explain", "nodots"], "expected the model factory as PKG.MODULE:FACTORY or path/to/file.py:FACTORY, e.g. decaymask._demo:equinox_model; got 'nodots'."),
        (["explain", "no_such_module:f"], "no module 'no_such_module' (looked in the current directory and on the Python path); give the module of the factory, or a file path such as ./my_models.py:f."),
        (["explain", f"{DEMO}:nope"], "'decaymask._demo' has no attribute 'nope'."),
        (["explain", f"{DEMO}:VOCAB"], "'decaymask._demo:VOCAB' is not callable: it must build and return the model."),
        (["explain", f"{DEMO}:equinox_model", "--framework", "linen"], "--framework linen: the factory returned an Equinox module, not a Linen (module, args) pair; give --framework equinox or leave --framework out."),
        (["explain", f"{DEMO}:equinox_model", "--policy", "x.toml", "--preset", "gpt"], "give --policy FILE or --preset NAME, not both."),
    ],
    ids=["spec", "import", "attr", "not_callable", "framework", "policy_and_preset"],
)
def test_explain_errors(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert err == f"python -m decaymask explain: error: {message}\n"


def test_explain_builds_no_parameter_memory():
    from decaymask._cli import build_abstract, _factory
    import jax

    for factory in ("equinox_model", "linen_model", "nnx_model"):
        _, tree, _ = build_abstract(_factory(f"{DEMO}:{factory}"), "auto")
        leaves = [x for x in jax.tree.leaves(tree) if hasattr(x, "shape")]
        assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves), factory
    assert dm.presets.standard() == dm.Policy.from_dict(dm.presets.standard().to_dict())


# Every user mistake: one line on stderr, exit status 2, nothing on stdout.

MODELS = '''
import numpy as np


def linen_dense():
    import flax.linen as nn
    import jax.numpy as jnp

    return nn.Dense(3), (jnp.ones((1, 4)),)


def numpy_step():
    import equinox as eqx
    import jax

    linear = eqx.nn.Linear(4, 3, key=jax.random.key(0))
    halved = np.asarray(linear.weight) * 0.5  # concrete: fails under jax.eval_shape
    return eqx.tree_at(lambda m: m.weight, linear, jax.numpy.asarray(halved))


def not_a_model():
    return {"w": np.ones(3)}


def needs_size(size):
    return linen_dense()


def raises():
    raise RuntimeError("the user's own bug")


def haiku_linear():
    import haiku as hk
    import jax.numpy as jnp

    return hk.transform(lambda x: hk.Linear(2)(x)), (jnp.ones((1, 3)),)
'''

FILES = {
    "syntax_error.py": "def f(:\n",
    "name_error.py": "x = undefined_name\n",
    "layer.toml": 'rules = [{decay = true, layer = "linaer"}]\n',
    "value.toml": 'rules = [{decay = "maybe", layer = "linear"}]\n',
    "syntax.toml": 'rules = [{decay = true layer = "linear"}]\n',
    "syntax.json": '{"rules": [\n',
    "syntax.yaml": "rules:\n  - decay: true\n   layer: [linear\n",
    "policy.txt": "rules = []\n",
    "keyed.toml": '[a]\nrules = [{decay = true, layer = "linear"}]\n',
}


@pytest.fixture
def models(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(MODELS)
    for name, text in FILES.items():
        (tmp_path / name).write_text(text)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("my_models", None)


LINEN = "my_models:linen_dense"
MISTAKES = [
    (["--framework", "equinox"], "--framework equinox: the factory returned a Linen (module, args) pair, not an Equinox module; give --framework linen or leave --framework out."),
    (["--framework", "nnx"], "--framework nnx: the factory returned a Linen (module, args) pair, not an NNX module; give --framework linen or leave --framework out."),
    (["--policy", "missing.toml"], "no policy file 'missing.toml' (not found); expected a .toml, .json, .yaml or .yml file."),
    (["--policy", "."], "no policy file '.' (it is a directory); expected a .toml, .json, .yaml or .yml file."),
    (["--policy", "layer.toml"], "layer.toml: Policy.from_dict: rules[0]: decay(layer='linaer'): unknown layer kind 'linaer'. Did you mean 'linear'? Valid kinds: "),
    (["--policy", "value.toml"], "value.toml: Policy.from_dict: rules[0].decay: expected true or false, got 'maybe'."),
    (["--policy", "syntax.toml"], "Policy.from_file('syntax.toml'): the file is not valid TOML: Unclosed inline table (at line 1, column 24)."),
    (["--policy", "syntax.json"], "Policy.from_file('syntax.json'): the file is not valid JSON: Expecting value: line 2 column 1 (char 12)."),
    (["--policy", "syntax.yaml"], "Policy.from_file('syntax.yaml'): the file is not valid (safe) YAML: expected <block end>, but found '<block mapping start>' (at line 3, column 4)."),
    (["--policy", "policy.txt"], "Policy.from_file('policy.txt'): unknown file type '.txt'; expected .toml, .json, .yaml or .yml."),
    (["--policy", "keyed.toml", "--policy-key", "b"], "Policy.from_file('keyed.toml'): no table 'b' in the file (missing 'b')."),
    (["--policy-key", "a"], "--policy-key a names a table in a policy file: give the file with --policy FILE."),
]


@pytest.mark.parametrize(
    "extra, message",
    MISTAKES,
    ids=["forced_equinox", "forced_nnx", "missing_file", "directory", "bad_layer", "bad_value",
         "toml_syntax", "json_syntax", "yaml_syntax", "suffix", "missing_key", "key_without_file"],
)
def test_each_mistake_is_one_line(capsys, models, extra, message):
    code, out, err = run(capsys, "explain", LINEN, *extra)
    assert code == 2 and out == ""
    assert err.startswith(f"python -m decaymask explain: error: {message}")
    assert err.endswith("\n") and err.count("\n") == 1, err


def test_the_factory_must_return_a_model(capsys, models):
    code, out, err = run(capsys, "explain", "my_models:not_a_model")
    assert (code, out) == (2, "")
    assert err == (
        "python -m decaymask explain: error: the factory returned a dict; expected an "
        "Equinox module, an NNX module, a Haiku (transformed, args) pair, or a Linen "
        "(module, args) pair.\n"
    )


def test_the_policy_key_reads_a_nested_table(capsys, models):
    code, out, err = run(capsys, "explain", LINEN, "--policy", "keyed.toml", "--policy-key", "a")
    assert code == 0 and err == ""
    assert out.rstrip().endswith("decayed 2 of 2 leaves, 15 of 15 elements (100.0%)")


def test_framework_choices_come_from_the_registry():
    assert {"equinox", "linen", "nnx"} <= set(frameworks())
    assert frameworks() == ("auto", *sorted(a.name for a in dm.adapters.registered() if a.factory_result))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["explain", LINEN, "--framework", "jax"], "argument --framework: invalid choice: 'jax' (choose from " + ", ".join(map(repr, frameworks())) + ")"),
        (["explain"], "the following arguments are required: factory"),
    ],
    ids=["choice", "missing_factory"],
)
def test_usage_mistakes_are_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        main(argv)
    out, err = capsys.readouterr()
    assert info.value.code == 2 and out == ""
    assert err == f"python -m decaymask explain: error: {message} (see python -m decaymask explain --help)\n"


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"decaymask {dm.__version__}\n"


def test_a_concrete_step_falls_back_to_a_concrete_build_and_says_so(capsys, models):
    code, out, err = run(capsys, "explain", "my_models:numpy_step")
    assert code == 0
    assert err == (
        "python -m decaymask explain: note: the abstract build failed "
        "(TracerArrayConversionError: The numpy.ndarray conversion method __array__() was "
        "called on traced array with shape float32[3,4]); building concretely instead, "
        "with parameter memory. Give --concrete to skip the abstract attempt.\n"
    )
    assert out.splitlines()[0] == "equinox: my_models:numpy_step (built concretely)"
    assert out.rstrip().endswith("decayed 1 of 2 leaves, 12 of 15 elements (80.0%)")
    code, forced, err = run(capsys, "explain", "my_models:numpy_step", "--concrete")
    assert (code, err, forced) == (0, "", out)


@pytest.mark.parametrize("framework", ["equinox", "linen", "nnx"])
def test_a_concrete_build_decides_as_the_abstract_one(capsys, framework):
    factory = f"{DEMO}:{framework}_model"
    _, abstract, _ = run(capsys, "explain", factory, "--format", "json")
    code, concrete, err = run(capsys, "explain", factory, "--format", "json", "--concrete")
    assert code == 0 and err == "" and json.loads(concrete) == json.loads(abstract)


# Installs with one framework: the other one is blocked in a fresh interpreter. Every
# command that blocks the same framework runs in one interpreter (starting one costs
# seconds), each with its own output streams, exit code and warning registry.

BLOCKED = """
import contextlib, io, json, sys, traceback, warnings
sys.modules[sys.argv[1]] = None
from decaymask._cli import main
results = []
for argv in json.loads(sys.argv[2]):
    out, err = io.StringIO(), io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exit:
            code = exit.code
        except Exception:
            traceback.print_exc()
            code = 1
    # As sys.exit(code) would end the interpreter.
    code = 0 if code is None else code if isinstance(code, int) else (err.write(f"{code}\\n"), 1)[1]
    results.append([code, out.getvalue(), err.getvalue()])
print("\\n" + json.dumps(results))
"""

ONE_FRAMEWORK = [
    ("equinox", "nnx_model", "auto", "nnx: "),
    ("equinox", "nnx_model", "nnx", "nnx: "),
    ("equinox", "linen_model", "auto", "linen: "),
    ("flax", "equinox_model", "auto", "equinox: "),
    ("flax", "equinox_model", "equinox", "equinox: "),
]

MISSING_FRAMEWORK = [
    ("equinox", ["explain", f"{DEMO}:nnx_model", "--framework", "equinox"],
     "--framework equinox needs equinox, which is not installed: pip install 'decaymask[equinox]'."),
    ("flax", ["explain", f"{DEMO}:equinox_model", "--framework", "nnx"],
     "--framework nnx needs flax, which is not installed: pip install 'decaymask[flax]'."),
    ("equinox", ["explain", f"{DEMO}:equinox_model"],
     "the factory decaymask._demo:equinox_model imports equinox, which is not installed: pip install 'decaymask[equinox]' ("),
    ("flax", ["explain", f"{DEMO}:linen_model"],
     "the factory decaymask._demo:linen_model imports flax, which is not installed: pip install 'decaymask[flax]' ("),
    ("flax", ["demo"],
     "the demo runs one model in Equinox, Linen and NNX and needs both frameworks; flax is not installed: pip install 'decaymask[all]'. 'explain' works with either one alone."),
]


def _one_framework_argv(factory: str, framework: str) -> list[str]:
    return ["explain", f"{DEMO}:{factory}", "--framework", framework]


@pytest.fixture(scope="module")
def without():
    """(blocked, argv) -> (exit code, stdout, stderr) of every command of this module run
    with one framework blocked."""
    runs: dict[str, list[list[str]]] = {}
    for blocked, factory, framework, _ in ONE_FRAMEWORK:
        runs.setdefault(blocked, []).append(_one_framework_argv(factory, framework))
    for blocked, argv, _ in MISSING_FRAMEWORK:
        runs.setdefault(blocked, []).append(argv)
    results = {}
    for blocked, argvs in runs.items():
        done = subprocess.run(
            [sys.executable, "-c", BLOCKED, blocked, json.dumps(argvs)],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
        assert done.returncode == 0 and done.stderr == "", done.stderr
        for argv, result in zip(argvs, json.loads(done.stdout.rstrip("\n").rsplit("\n", 1)[-1]), strict=True):
            results[blocked, tuple(argv)] = tuple(result)
    return results


@pytest.mark.parametrize(
    "blocked, factory, framework, head",
    ONE_FRAMEWORK,
    ids=["nnx", "nnx_forced", "linen", "equinox", "equinox_forced"],
)
def test_one_framework_installed_is_enough(without, blocked, factory, framework, head):
    code, stdout, stderr = without[blocked, tuple(_one_framework_argv(factory, framework))]
    assert code == 0 and stderr == ""
    assert stdout.startswith(head + f"{DEMO}:{factory}\n")
    assert "decayed " in stdout.splitlines()[-1]


@pytest.mark.parametrize(
    "blocked, argv, message",
    MISSING_FRAMEWORK,
    ids=["forced_equinox", "forced_nnx", "equinox_factory", "linen_factory", "demo"],
)
def test_a_missing_framework_is_one_line(without, blocked, argv, message):
    code, stdout, stderr = without[blocked, tuple(argv)]
    assert code == 2 and stdout == ""
    command = argv[0]
    assert stderr.startswith(f"python -m decaymask {command}: error: {message}")
    assert stderr.count("\n") == 1, stderr


def test_console_script_is_declared():
    import tomllib

    project = tomllib.loads((pathlib.Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert project["project"]["scripts"] == {"decaymask": "decaymask._cli:main"}


def test_a_policy_file_imports_only_the_packages_given(capsys, tmp_path, monkeypatch):
    (tmp_path / "blockmod_for_cli.py").write_text("class Stem:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "blockmod_for_cli", raising=False)
    policy = tmp_path / "p.toml"
    policy.write_text('rules = []\nlayer_decay = {rate = 0.75, stem = ["blockmod_for_cli:Stem"]}\n')
    code, out, err = run(capsys, "explain", f"{DEMO}:equinox_model", "--policy", str(policy))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.rstrip().endswith("On the command line: --imports PACKAGE.")
    assert "blockmod_for_cli" not in sys.modules
    code, out, err = run(
        capsys, "explain", f"{DEMO}:equinox_model", "--policy", str(policy), "--imports", "blockmod_for_cli"
    )
    # Imported now; the demo model has no stack of blocks, which is the next error.
    assert "blockmod_for_cli" in sys.modules
    assert code == 2 and "found no repeated stack of blocks" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "spec, message",
    [
        (".my_models:linen_dense", "'.my_models:linen_dense': a relative module name has no package to be relative to; write my_models:linen_dense (a module on the path or in the current directory) or a file path, ./my_models.py:linen_dense."),
        ("my_models:needs_size", "'my_models:needs_size' takes arguments (size); the factory is called with none. Give a function that builds the model by itself (e.g. one that calls this one with its arguments)."),
        ("nowhere_module:f", "no module 'nowhere_module' (looked in the current directory and on the Python path); give the module of the factory, or a file path such as ./my_models.py:f."),
        ("./missing.py:f", "'./missing.py:f': no file './missing.py'."),
    ],
    ids=["relative", "arguments", "no_module", "no_file"],
)
def test_factory_mistakes_are_one_line(capsys, models, spec, message):
    code, out, err = run(capsys, "explain", spec)
    assert (code, out) == (2, "")
    assert err == f"python -m decaymask explain: error: {message}\n"


def test_a_file_path_and_the_current_directory_find_the_factory(capsys, models, monkeypatch):
    code, out, err = run(capsys, "explain", "./my_models.py:linen_dense")
    assert code == 0 and err == "" and "decayed 1 of 2 leaves" in out
    # The console script has no current directory on the path, as python -m has.
    sys.modules.pop("my_models", None)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(models))])
    code, out, err = run(capsys, "explain", "my_models:linen_dense")
    assert code == 0 and err == "" and "decayed 1 of 2 leaves" in out


@pytest.mark.parametrize(
    "spec, where, shown",
    [
        ("my_models:raises", "calling my_models:raises raised RuntimeError", "RuntimeError: the user's own bug"),
        ("syntax_error:f", "importing syntax_error raised SyntaxError", "SyntaxError: invalid syntax"),
        ("name_error:f", "importing name_error raised NameError", "NameError: name 'undefined_name' is not defined"),
    ],
    ids=["factory_raises", "syntax_error", "name_error"],
)
def test_the_users_own_errors_are_shown_as_theirs(capsys, models, spec, where, shown):
    code, out, err = run(capsys, "explain", spec)
    assert (code, out) == (2, "")
    lines = err.splitlines()
    assert lines[-1] == f"python -m decaymask explain: error: {where} (its traceback is above): fix the model code."
    assert lines[-2] == shown
    # The traceback is the user's code alone.
    assert "decaymask" not in "\n".join(lines[:-1])
    sys.modules.pop(spec.partition(":")[0], None)


def test_a_forced_framework_names_what_the_factory_returned(capsys, models):
    code, out, err = run(capsys, "explain", "my_models:haiku_linear", "--framework", "linen")
    assert (code, out) == (2, "")
    assert err == (
        "python -m decaymask explain: error: --framework linen: the factory returned a Haiku "
        "(transformed, args) pair, not a Linen (module, args) pair; give --framework haiku or "
        "leave --framework out.\n"
    )


def test_help_names_every_framework(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for title in ("Equinox", "Flax Linen", "Flax NNX", "Haiku"):
        assert title in out
