"""Policies as data and the presets."""

from __future__ import annotations

import json
import re

import equinox as eqx
import jax
import pytest

import decaymask as dm


def is_big(leaf: dm.Leaf) -> bool:
    return leaf.size > 100


POLICY = dm.Policy(
    dm.decay(layer=("linear", "conv"), rate=0.5),
    dm.no_decay(param=("bias", "scale"), label="plain"),
    dm.label("frozen", layer="embedding"),
    dm.decay(path=re.compile(r"head/\w+$"), min_ndim=2),
    dm.decay(within=eqx.nn.MultiheadAttention, when=is_big),
    dm.no_decay(name="g", path="*/wn/*"),
    default=True,
    strict=True,
)


def test_round_trip():
    data = POLICY.to_dict()
    assert data["rules"][3] == {"decay": True, "path": {"regex": r"head/\w+$"}, "min_ndim": 2}
    assert data["rules"][4]["within"] == "equinox.nn._attention:MultiheadAttention"
    assert data["rules"][4]["when"] == "test_data:is_big"
    assert dm.Policy.from_dict(json.loads(json.dumps(data)), imports=("equinox", "test_data")) == POLICY


def test_toml_file(tmp_path):
    path = tmp_path / "train.toml"
    path.write_text(
        """
[optimizer.weight_decay]
default = false

[[optimizer.weight_decay.rules]]
decay = true
layer = "linear"

[[optimizer.weight_decay.rules]]
decay = true
layer = "layer_norm"
param = "bias"

[[optimizer.weight_decay.rules]]
label = "frozen"
layer = "equinox.nn.Embedding"
"""
    )
    policy = dm.Policy.from_file(path, key="optimizer.weight_decay", imports=("equinox",))
    assert policy == dm.Policy(
        dm.decay(layer="linear"),
        dm.decay(layer="layer_norm", param="bias"),
        dm.label("frozen", layer=eqx.nn.Embedding),
    )


def test_json_and_yaml_files(tmp_path):
    (tmp_path / "p.json").write_text(json.dumps(dm.presets.standard().to_dict()))
    assert dm.Policy.from_file(tmp_path / "p.json") == dm.presets.standard()
    import yaml
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(dm.presets.gpt().to_dict()))
    assert dm.Policy.from_file(tmp_path / "p.yaml") == dm.presets.gpt()


@pytest.mark.parametrize(
    "data, message",
    [
        ({"rules": [{"decay": True, "layer": "linaer"}]}, "Policy.from_dict: rules[0]: decay(layer='linaer'): unknown layer kind 'linaer'. Did you mean 'linear'?"),
        ({"rules": [{"decay": True}, {"decay": True, "layers": "linear"}]}, "Policy.from_dict: rules[1]: unknown key 'layers'. Valid keys: decay, label, rate, lr, freeze, layer, within, param, name, path, min_ndim, when."),
        ({"rules": [{"layer": "linear"}]}, "Policy.from_dict: rules[0]: a rule needs decay = true/false, a label, lr = <multiplier>, or freeze = true/false."),
        ({"rules": [{"decay": "yes"}]}, "Policy.from_dict: rules[0].decay: expected true or false, got 'yes'."),
        ({"rules": [{"decay": False, "rate": 2}]}, "Policy.from_dict: rules[0].rate: only decay = true rules take a rate."),
        ({"rules": [{"decay": True, "layer": "nowhere.Thing"}]}, "Policy.from_dict: rules[0].layer: 'nowhere.Thing' is in the module 'nowhere', which is not imported, and importing a module runs its code."),
        ({"rules": [{"decay": True, "path": {"regex": "("}}]}, "Policy.from_dict: rules[0].path: bad regex '(': missing ), unterminated subpattern at position 0."),
        ({"rules": {"decay": True}}, "Policy.from_dict: rules: expected a list of rule tables, got dict."),
        ({"rules": [], "defaults": True}, "Policy.from_dict: unknown key 'defaults'. Valid keys: rules, default, strict, layer_decay."),
        ({"rules": [], "default": "no"}, "Policy.from_dict: default: expected true or false, got 'no'."),
        ([], "Policy.from_dict: expected a mapping with 'rules' (and optionally 'default', 'strict', 'layer_decay'), got list."),
    ],
    ids=["kind", "key", "action", "decay", "rate", "import", "regex", "rules", "top_key", "default", "type"],
)
def test_invalid_data_names_the_key(data, message):
    with pytest.raises(dm.PolicyDataError) as info:
        dm.Policy.from_dict(data)
    assert str(info.value).startswith(message)
    assert isinstance(info.value, ValueError)


def test_unwritable_policies_and_files(tmp_path):
    with pytest.raises(dm.PolicyDataError, match=r"Policy.to_dict: rules\[0\].when: <function .*> has no import path \(a lambda or a local definition\); define it at module level"):
        dm.Policy(dm.decay(when=lambda leaf: True)).to_dict()
    (tmp_path / "p.ini").write_text("")
    with pytest.raises(dm.PolicyDataError, match=r"unknown file type '.ini'; expected .toml, .json, .yaml or .yml\."):
        dm.Policy.from_file(tmp_path / "p.ini")
    (tmp_path / "p.json").write_text("{}")
    with pytest.raises(dm.PolicyDataError, match=r"no table 'a.b' in the file \(missing 'a'\)\."):
        dm.Policy.from_file(tmp_path / "p.json", key="a.b")


KEY = jax.random.key(0)


class Tiny(eqx.Module):
    embed: eqx.nn.Embedding
    attn: eqx.nn.MultiheadAttention
    norm: eqx.nn.LayerNorm
    conv: eqx.nn.Conv1d
    head: eqx.nn.Linear

    def __init__(self):
        k = jax.random.split(KEY, 4)
        self.embed = eqx.nn.Embedding(6, 4, key=k[0])
        self.attn = eqx.nn.MultiheadAttention(2, 4, use_query_bias=True, key=k[1])
        self.norm = eqx.nn.LayerNorm(4)
        self.conv = eqx.nn.Conv1d(4, 4, 3, key=k[2])
        self.head = eqx.nn.Linear(4, 6, key=k[3])


@pytest.mark.parametrize(
    "preset, decayed",
    [
        (dm.presets.standard, {"attn/query_proj/weight", "attn/key_proj/weight", "attn/value_proj/weight", "attn/output_proj/weight", "conv/weight", "head/weight"}),
        (dm.presets.everything_but_bias_and_norm, {"embed/weight", "attn/query_proj/weight", "attn/key_proj/weight", "attn/value_proj/weight", "attn/output_proj/weight", "conv/weight", "head/weight"}),
        (dm.presets.gpt, {"embed/weight", "attn/query_proj/weight", "attn/key_proj/weight", "attn/value_proj/weight", "attn/output_proj/weight", "head/weight"}),
    ],
    ids=["standard", "everything_but_bias_and_norm", "gpt"],
)
def test_presets(preset, decayed):
    report = preset().explain(Tiny())
    assert {row.path for row in report.decayed} == decayed


def test_importing_a_module_needs_an_opt_in():
    data = {"rules": [{"decay": True}, {"decay": False, "layer": "nowhere.Thing"}]}
    with pytest.raises(dm.PolicyDataError) as info:
        dm.Policy.from_dict(data)
    assert str(info.value) == (
        "Policy.from_dict: rules[1].layer: 'nowhere.Thing' is in the module 'nowhere', "
        "which is not imported, and importing a module runs its code. If you trust this "
        "data, allow it: Policy.from_dict(data, imports=('nowhere',)) or "
        "Policy.from_file(path, imports=('nowhere',)) (imports=True allows any module)."
    )
    for imports in (True, ("nowhere",), ["nowhere"]):
        with pytest.raises(dm.PolicyDataError, match=r"rules\[1\].layer: cannot import 'nowhere.Thing': No module named 'nowhere'\."):
            dm.Policy.from_dict(data, imports=imports)
    # A prefix allows the package and its submodules, nothing else.
    with pytest.raises(dm.PolicyDataError, match=r"is in the module 'nowhere', which is not imported"):
        dm.Policy.from_dict(data, imports=("now",))
    with pytest.raises(TypeError, match=r"Policy.from_dict\(imports='nowhere'\): expected True \(import any module\) or a tuple of module prefixes, e.g. \('mylib',\), got str\."):
        dm.Policy.from_dict(data, imports="nowhere")  # type: ignore[arg-type]


def test_modules_already_imported_need_the_opt_in_too():
    data = {"rules": [{"decay": True, "within": "equinox.nn.MultiheadAttention", "when": "test_data:is_big"}]}
    with pytest.raises(dm.PolicyDataError) as info:
        dm.Policy.from_dict(data)
    assert str(info.value) == (
        "Policy.from_dict: rules[0].within: 'equinox.nn.MultiheadAttention' is in the module "
        "'equinox.nn', which the caller has not allowed: policy data names classes and "
        "functions only in decaymask and in the modules given as imports=, imported or not "
        "(a when= function is called on every parameter). If you trust this data, allow it: "
        "Policy.from_dict(data, imports=('equinox',)) or Policy.from_file(path, "
        "imports=('equinox',)) (imports=True allows any module)."
    )
    with pytest.raises(dm.PolicyDataError, match=r"^Policy.from_dict: rules\[0\].when: 'test_data:is_big' is in the module 'test_data', which the caller has not allowed"):
        dm.Policy.from_dict(data, imports=("equinox",))
    expected = dm.Policy(dm.decay(within=eqx.nn.MultiheadAttention, when=is_big))
    assert dm.Policy.from_dict(data, imports=("equinox", "test_data")) == expected
    assert dm.Policy.from_dict(data, imports=True) == expected


def test_an_opted_in_import_runs_the_module(tmp_path, monkeypatch):
    package = tmp_path / "fresh_layers_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "blocks.py").write_text("class Block:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    config = tmp_path / "p.json"
    config.write_text(json.dumps({"rules": [{"decay": True, "within": "fresh_layers_pkg.blocks:Block"}]}))
    with pytest.raises(dm.PolicyDataError, match=r"rules\[0\].within: 'fresh_layers_pkg.blocks:Block' is in the module 'fresh_layers_pkg.blocks', which is not imported.*imports=\('fresh_layers_pkg',\)"):
        dm.Policy.from_file(config)
    import sys
    assert "fresh_layers_pkg.blocks" not in sys.modules
    policy = dm.Policy.from_file(config, imports=("fresh_layers_pkg",))
    monkeypatch.delitem(sys.modules, "fresh_layers_pkg.blocks")
    monkeypatch.delitem(sys.modules, "fresh_layers_pkg")
    assert policy.rules[0].within[0].__qualname__ == "Block"


def test_relative_import_paths_name_the_key():
    with pytest.raises(dm.PolicyDataError) as info:
        dm.Policy.from_dict({"rules": [{"decay": True, "layer": ".foo:Bar"}]}, imports=True)
    assert str(info.value) == (
        "Policy.from_dict: rules[0].layer: '.foo:Bar' is a relative import path, which "
        "data cannot resolve; write the whole module path, e.g. 'package.module:Name'."
    )
    with pytest.raises(dm.PolicyDataError, match=r"rules\[0\].when: '..up.fn' is a relative import path"):
        dm.Policy.from_dict({"rules": [{"decay": True, "when": "..up.fn"}]})


@pytest.mark.parametrize("key", ["layer", "within", "param", "name", "path", "min_ndim", "when", "label", "rate", "decay"])
def test_a_null_value_names_the_key(key):
    rule = {"decay": True, key: None}
    with pytest.raises(dm.PolicyDataError) as info:
        dm.Policy.from_dict({"rules": [{"decay": False}, rule]})
    assert str(info.value) == (
        f"Policy.from_dict: rules[1].{key}: null (no value); give {key} a value or leave "
        f"the key out."
    )


def test_a_forgotten_yaml_value_is_not_a_rule_matching_everything(tmp_path):
    (tmp_path / "p.yaml").write_text("rules:\n  - decay: true\n    layer:\n")
    with pytest.raises(dm.PolicyDataError, match=r"rules\[0\].layer: null \(no value\)"):
        dm.Policy.from_file(tmp_path / "p.yaml")


@pytest.mark.parametrize("rate", ["inf", "-inf", "nan", "-1.0"])
def test_rates_in_data_must_be_finite_and_non_negative(tmp_path, rate):
    (tmp_path / "p.toml").write_text(f"[[rules]]\ndecay = true\nrate = {rate}\n")
    with pytest.raises(dm.PolicyDataError, match=r"^Policy.from_dict: rules\[0\].rate: decay\(rate=[-a-z0-9.]+\): expected a non-negative number"):
        dm.Policy.from_file(tmp_path / "p.toml")
    with pytest.raises(dm.PolicyDataError, match=r"rules\[0\].rate: decay\(rate='fast'\): expected a non-negative number .*, got str\."):
        dm.Policy.from_dict({"rules": [{"decay": True, "rate": "fast"}]})


def test_regex_flags_survive_the_round_trip():
    policy = dm.Policy(
        dm.decay(),
        dm.no_decay(path=re.compile("BIAS", re.IGNORECASE)),
        dm.no_decay(path=(re.compile("^x.y$", re.DOTALL | re.MULTILINE), "ln/*")),
    )
    data = policy.to_dict()
    assert data["rules"][1] == {"decay": False, "path": {"regex": "BIAS", "flags": ["IGNORECASE"]}}
    assert data["rules"][2]["path"][0] == {"regex": "^x.y$", "flags": ["MULTILINE", "DOTALL"]}
    again = dm.Policy.from_dict(json.loads(json.dumps(data)))
    assert again == policy
    bias = dm.Leaf("fc/bias", layer="linear", role="bias", shape=(2,))
    assert [d.decay for d in again.decide([bias])] == [False]
    with pytest.raises(dm.PolicyDataError, match=r"rules\[0\].path.flags: expected a list of re flag names \(ASCII, IGNORECASE, LOCALE, MULTILINE, DOTALL, VERBOSE\), got \['I'\]\."):
        dm.Policy.from_dict({"rules": [{"decay": True, "path": {"regex": "x", "flags": ["I"]}}]})
    with pytest.raises(dm.PolicyDataError, match=r"rules\[0\].path: bad regex 'x': cannot use LOCALE flag with a str pattern\."):
        dm.Policy.from_dict({"rules": [{"decay": True, "path": {"regex": "x", "flags": ["LOCALE"]}}]})


@pytest.mark.parametrize(
    "suffix, text, parser",
    [
        (".toml", "[[rules]\ndecay = true\n", "TOML"),
        (".json", '{"rules": [', "JSON"),
        (".yaml", "rules: [decay: true\n", "(safe) YAML"),
        (".yml", "rules: !!python/object/apply:os.system ['true']\n", "(safe) YAML"),
    ],
    ids=["toml", "json", "yaml", "yaml_python_tag"],
)
def test_unparsable_files_name_the_file(tmp_path, suffix, text, parser):
    path = tmp_path / f"policy{suffix}"
    path.write_text(text)
    with pytest.raises(dm.PolicyDataError) as info:
        dm.Policy.from_file(path)
    assert str(info.value).startswith(
        f"Policy.from_file({str(path)!r}): the file is not valid {parser}: "
    )
    assert info.value.__cause__ is not None


def test_policies_from_data_pickle():
    import pickle

    assert pickle.loads(pickle.dumps(POLICY)) == POLICY
    again = dm.Policy.from_dict(POLICY.to_dict(), imports=("equinox", "test_data"))
    assert pickle.loads(pickle.dumps(again)) == POLICY


class Renamed:
    pass


Renamed.__qualname__ = "POLICY"  # its module holds something else under that name


def test_to_dict_refuses_an_import_path_that_names_something_else():
    with pytest.raises(dm.PolicyDataError, match=r"^Policy.to_dict: rules\[0\].layer: <class 'test_data.POLICY'> is not what its import path test_data:POLICY names; define it at module level under its own name"):
        dm.Policy(dm.decay(layer=Renamed)).to_dict()
