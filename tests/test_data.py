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
    assert dm.Policy.from_dict(json.loads(json.dumps(data))) == POLICY


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
    policy = dm.Policy.from_file(path, key="optimizer.weight_decay")
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
        ({"rules": [{"decay": True}, {"decay": True, "layers": "linear"}]}, "Policy.from_dict: rules[1]: unknown key 'layers'. Valid keys: decay, label, rate, layer, within, param, name, path, min_ndim, when."),
        ({"rules": [{"layer": "linear"}]}, "Policy.from_dict: rules[0]: a rule needs decay = true/false, or a label."),
        ({"rules": [{"decay": "yes"}]}, "Policy.from_dict: rules[0].decay: expected true or false, got 'yes'."),
        ({"rules": [{"decay": False, "rate": 2}]}, "Policy.from_dict: rules[0].rate: only decay = true rules take a rate."),
        ({"rules": [{"decay": True, "layer": "nowhere.Thing"}]}, "Policy.from_dict: rules[0].layer: cannot import 'nowhere.Thing': No module named 'nowhere'."),
        ({"rules": [{"decay": True, "path": {"regex": "("}}]}, "Policy.from_dict: rules[0].path: bad regex '(': missing ), unterminated subpattern at position 0."),
        ({"rules": {"decay": True}}, "Policy.from_dict: rules: expected a list of rule tables, got dict."),
        ({"rules": [], "defaults": True}, "Policy.from_dict: unknown key 'defaults'. Valid keys: rules, default, strict."),
        ({"rules": [], "default": "no"}, "Policy.from_dict: default: expected true or false, got 'no'."),
        ([], "Policy.from_dict: expected a mapping with 'rules' (and optionally 'default', 'strict'), got list."),
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
