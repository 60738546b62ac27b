"""The command line: ``python -m decaymask explain`` on the demo models."""

from __future__ import annotations

import json

import pytest

import decaymask as dm
from decaymask._cli import main

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
        (["explain", "nodots"], "expected the model factory as PKG.MODULE:FACTORY, e.g. decaymask._demo:equinox_model; got 'nodots'."),
        (["explain", "no_such_module:f"], "cannot import 'no_such_module': No module named 'no_such_module'"),
        (["explain", f"{DEMO}:nope"], "'decaymask._demo' has no attribute 'nope'."),
        (["explain", f"{DEMO}:VOCAB"], "'decaymask._demo:VOCAB' is not callable: it must build and return the model."),
        (["explain", f"{DEMO}:equinox_model", "--framework", "linen"], "for Linen the factory must return (module, args) or (module, args, kwargs) with example inputs; got TinyLM."),
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
