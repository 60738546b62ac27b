"""`explain` with parameter groups: layer ids, lr multipliers and frozen leaves in every
view of a report, a per-layer summary, and reports of policies without groups unchanged."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

import decaymask as dm
from decaymask._cli import main
from decaymask.core._report import LayerRow


class Block(eqx.Module):
    norm: eqx.nn.LayerNorm
    fc: eqx.nn.Linear

    def __init__(self, key):
        self.norm = eqx.nn.LayerNorm(4)
        self.fc = eqx.nn.Linear(4, 4, key=key)


class ViT(eqx.Module):
    embed: eqx.nn.Embedding
    pos_embed: jax.Array
    blocks: list
    norm: eqx.nn.LayerNorm
    head: eqx.nn.Linear

    def __init__(self, key):
        keys = jax.random.split(key, 5)
        self.embed = eqx.nn.Embedding(10, 4, key=keys[0])
        self.pos_embed = jnp.zeros((3, 4))
        self.blocks = [Block(keys[1 + i]) for i in range(3)]
        self.norm = eqx.nn.LayerNorm(4)
        self.head = eqx.nn.Linear(4, 2, key=keys[4])


def vit() -> ViT:
    """The factory the CLI tests build."""
    return ViT(jax.random.key(0))


class ScanBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return x + nn.Dense(4)(nn.LayerNorm()(x)), None


class ScanModel(nn.Module):
    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(10, 4)(ids)
        stack = nn.scan(
            ScanBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=3
        )
        x, _ = stack(name="blocks")(x, None)
        return nn.Dense(2)(nn.LayerNorm()(x))


MODEL = vit()
SCAN = ScanModel()
SCAN_ARGS = (jnp.zeros((1, 3), jnp.int32),)
SCAN_PARAMS = SCAN.init(jax.random.key(0), *SCAN_ARGS)["params"]

GROUPS = dm.Policy(
    dm.decay(layer="linear", param="weight"),
    dm.lr(0.1, layer="embedding"),
    dm.freeze(path="head/*"),
    dm.unfreeze(path="head/bias"),
    dm.layer_decay(0.5),
)
REPORT = GROUPS.explain(MODEL)

TABLE = """\
path                  kind        via    class      role       shape    decay  layer id  lr       frozen  rule
----                  ----        ---    -----      ----       -----    -----  --------  --       ------  ----
embed/weight          embedding   class  Embedding  embedding  (10, 4)  no     0         0.00625  no      default; lr: rule 2: lr(0.1, layer='embedding')
pos_embed             unknown     name   ViT        position   (3, 4)   no     0         0.0625   no      default
blocks/0/norm/weight  layer_norm  class  LayerNorm  scale      (4,)     no     1         0.125    no      default
blocks/0/norm/bias    layer_norm  class  LayerNorm  bias       (4,)     no     1         0.125    no      default
blocks/0/fc/weight    linear      class  Linear     weight     (4, 4)   yes    1         0.125    no      rule 1: decay(layer='linear', param='weight')
blocks/0/fc/bias      linear      class  Linear     bias       (4,)     no     1         0.125    no      default
blocks/1/norm/weight  layer_norm  class  LayerNorm  scale      (4,)     no     2         0.25     no      default
blocks/1/norm/bias    layer_norm  class  LayerNorm  bias       (4,)     no     2         0.25     no      default
blocks/1/fc/weight    linear      class  Linear     weight     (4, 4)   yes    2         0.25     no      rule 1: decay(layer='linear', param='weight')
blocks/1/fc/bias      linear      class  Linear     bias       (4,)     no     2         0.25     no      default
blocks/2/norm/weight  layer_norm  class  LayerNorm  scale      (4,)     no     3         0.5      no      default
blocks/2/norm/bias    layer_norm  class  LayerNorm  bias       (4,)     no     3         0.5      no      default
blocks/2/fc/weight    linear      class  Linear     weight     (4, 4)   yes    3         0.5      no      rule 1: decay(layer='linear', param='weight')
blocks/2/fc/bias      linear      class  Linear     bias       (4,)     no     3         0.5      no      default
norm/weight           layer_norm  class  LayerNorm  scale      (4,)     no     4         1        no      default
norm/bias             layer_norm  class  LayerNorm  bias       (4,)     no     4         1        no      default
head/weight           linear      class  Linear     weight     (2, 4)   no     4         0        yes     rule 3: freeze(path='head/*')
head/bias             linear      class  Linear     bias       (2,)     no     4         1        no      default; freeze: rule 4: unfreeze(path='head/bias')
decayed 3 of 18 leaves, 48 of 154 elements (31.2%); frozen 1 leaf, 8 elements"""

# n = 3 blocks, rate 0.5: id k learns 0.5 ** (4 - k) times as fast; the embedding's lr
# rule makes the stem's multipliers differ (0.0625 * 0.1 and 0.0625).
PER_LAYER = """\
per layer
layer id  leaves  parameters  lr              frozen
--------  ------  ----------  --              ------
       0       2          52  0.00625-0.0625  none
       1       4          28  0.125           none
       2       4          28  0.25            none
       3       4          28  0.5             none
       4       4          18  1               1 of 4"""

LAYERS = (
    LayerRow(id=0, leaves=2, parameters=40 + 12, multiplier=(0.00625, 0.0625), frozen=0),
    LayerRow(id=1, leaves=4, parameters=4 + 4 + 16 + 4, multiplier=0.125, frozen=0),
    LayerRow(id=2, leaves=4, parameters=28, multiplier=0.25, frozen=0),
    LayerRow(id=3, leaves=4, parameters=28, multiplier=0.5, frozen=0),
    LayerRow(id=4, leaves=4, parameters=4 + 4 + 8 + 2, multiplier=1.0, frozen=1),
)


def test_table_shows_layer_ids_multipliers_frozen_and_the_per_layer_summary():
    assert str(REPORT) == TABLE + "\n\n" + PER_LAYER
    header, cells = REPORT.table_rows()
    assert header[7:11] == ["layer id", "lr", "frozen", "rule"]
    assert cells[-2][7:10] == ["4", "0", "yes"]
    assert REPORT.summary() == "decayed 3 of 18 leaves, 48 of 154 elements (31.2%); frozen 1 leaf, 8 elements"


def test_layers_rows_in_id_order():
    assert REPORT.layers() == LAYERS
    assert [row.frozen_text for row in REPORT.layers()] == ["none"] * 4 + ["1 of 4"]
    # The parameters of every layer add up to the report's elements (no leaf is stacked).
    assert sum(row.parameters for row in REPORT.layers()) == REPORT.num_elements == 154
    with pytest.raises(dataclasses.FrozenInstanceError):
        REPORT.layers()[0].id = 5  # type: ignore[misc]


def test_markdown_has_the_columns_and_the_per_layer_table():
    lines = REPORT.to_markdown().splitlines()
    assert lines[:3] == [
        "| path | kind | via | class | role | shape | decay | layer id | lr | frozen | rule |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        "| `embed/weight` | embedding | class | Embedding | embedding | (10, 4) | no | 0 | 0.00625 | no | default; lr: rule 2: lr(0.1, layer='embedding') |",
    ]
    assert lines[19] == "| `head/bias` | linear | class | Linear | bias | (2,) | no | 4 | 1 | no | default; freeze: rule 4: unfreeze(path='head/bias') |"
    assert lines[20:] == [
        "",
        "decayed 3 of 18 leaves, 48 of 154 elements (31.2%); frozen 1 leaf, 8 elements",
        "",
        "**per layer**",
        "",
        "| layer id | leaves | parameters | lr | frozen |",
        "| --- | --- | --- | --- | --- |",
        "| 0 | 2 | 52 | 0.00625-0.0625 | none |",
        "| 1 | 4 | 28 | 0.125 | none |",
        "| 2 | 4 | 28 | 0.25 | none |",
        "| 3 | 4 | 28 | 0.5 | none |",
        "| 4 | 4 | 18 | 1 | 1 of 4 |",
    ]
    assert REPORT.to_markdown().endswith("| 4 | 4 | 18 | 1 | 1 of 4 |\n")


def test_json_rows_totals_and_layers():
    data = json.loads(REPORT.to_json())
    assert list(data) == ["rows", "totals", "layers"]
    assert data["rows"][0] == {
        "path": "embed/weight", "kind": "embedding", "via": "class", "class": "Embedding",
        "role": "embedding", "shape": [10, 4], "dtype": "float32", "decay": False,
        "label": "no_decay", "rate": 0.0, "layer_id": 0, "lr": 0.00625, "frozen": False,
        "rule": None, "lr_rule": "lr(0.1, layer='embedding')", "freeze_rule": None,
        "why": "default; lr: rule 2: lr(0.1, layer='embedding')",
    }
    head = {row["path"]: row for row in data["rows"]}
    assert {k: head["head/weight"][k] for k in ("layer_id", "lr", "frozen", "rule", "freeze_rule", "why")} == {
        "layer_id": 4, "lr": 0.0, "frozen": True, "rule": "freeze(path='head/*')",
        "freeze_rule": "freeze(path='head/*')", "why": "rule 3: freeze(path='head/*')",
    }
    assert head["head/bias"]["why"] == "default; freeze: rule 4: unfreeze(path='head/bias')"
    assert head["head/bias"]["freeze_rule"] == "unfreeze(path='head/bias')"
    assert data["totals"] == {
        "leaves": 18, "leaves_decayed": 3, "elements": 154, "elements_decayed": 48,
        "leaves_frozen": 1, "elements_frozen": 8,
    }
    assert data["layers"] == [
        {"id": 0, "leaves": 2, "parameters": 52, "lr": [0.00625, 0.0625], "frozen": 0},
        {"id": 1, "leaves": 4, "parameters": 28, "lr": 0.125, "frozen": 0},
        {"id": 2, "leaves": 4, "parameters": 28, "lr": 0.25, "frozen": 0},
        {"id": 3, "leaves": 4, "parameters": 28, "lr": 0.5, "frozen": 0},
        {"id": 4, "leaves": 4, "parameters": 18, "lr": 1.0, "frozen": 1},
    ]


def _unstyled(html: str) -> str:
    """The HTML without the alignment every cell carries (test_report_html.py checks it)."""
    return html.replace(' style="text-align: left"', "").replace(' style="text-align: right"', "")


def test_html_shows_the_columns_and_the_per_layer_table():
    html = _unstyled(REPORT._repr_html_())
    assert (
        '<th>decay</th><th class="dm-num">layer id</th><th class="dm-num">lr</th>'
        "<th>frozen</th><th>rule</th>"
    ) in html
    assert (
        '<tr class="dm-no"><td><code>head/weight</code></td><td>linear</td><td>class</td><td>Linear</td>'
        '<td>weight</td><td>(2, 4)</td><td class="dm-mark">&middot; no</td>'
        '<td class="dm-num">4</td><td class="dm-num">0</td><td>yes</td>'
        "<td>rule 3: freeze(path=&#x27;head/*&#x27;)</td></tr>"
    ) in html
    summary = html.index(
        '<p class="dm-summary"><b>decayed 3 of 18 leaves, 48 of 154 elements (31.2%); '
        "frozen 1 leaf, 8 elements</b>"
    )
    layers = html.index('<p class="dm-summary dm-layers"><b>per layer</b></p>')
    assert summary < html.index("<table>") < layers
    assert (
        '<tr><td class="dm-num">0</td><td class="dm-num">2</td><td class="dm-num">52</td>'
        '<td class="dm-num">0.00625-0.0625</td><td>none</td></tr>'
    ) in html
    assert html.endswith('<td class="dm-num">18</td><td class="dm-num">1</td><td>1 of 4</td></tr></tbody></table></div>')


# A Linen model scanned over its blocks: every block leaf is stacked along the layer axis.

SCAN_POLICY = dm.Policy(
    dm.decay(layer="linear", param="weight"),
    dm.freeze(layer="embedding"),
    dm.freeze(path="Dense_0/*"),
    dm.layer_decay(0.5),
)


def test_stacked_leaves_carry_tuple_layer_ids_and_per_layer_values():
    report = SCAN_POLICY.explain(SCAN_PARAMS, module=SCAN, args=SCAN_ARGS)
    rows = {row.path: row for row in report}
    kernel = rows["blocks/Dense_0/kernel"]
    assert (kernel.shape, kernel.layer_id, kernel.lr_scale) == ((3, 4, 4), (1, 2, 3), (0.125, 0.25, 0.5))
    assert rows["Embed_0/embedding"].layer_id == 0 and rows["Dense_0/kernel"].layer_id == 4
    assert str(report).splitlines()[:3] + str(report).splitlines()[8:] == [
        "path                      kind        class      role       shape      decay  layer id  lr         frozen  rule",
        "----                      ----        -----      ----       -----      -----  --------  --         ------  ----",
        "Dense_0/bias              linear      Dense      bias       (2,)       no     4         0          yes     rule 3: freeze(path='Dense_0/*')",
        "blocks/Dense_0/kernel     linear      Dense      weight     (3, 4, 4)  yes    1-3       0.125-0.5  no      rule 1: decay(layer='linear', param='weight')",
        "blocks/LayerNorm_0/bias   layer_norm  LayerNorm  bias       (3, 4)     no     1-3       0.125-0.5  no      default",
        "blocks/LayerNorm_0/scale  layer_norm  LayerNorm  scale      (3, 4)     no     1-3       0.125-0.5  no      default",
        "decayed 1 of 9 leaves, 48 of 142 elements (33.8%); frozen 3 leaves, 50 elements",
        "",
        "per layer",
        "layer id  leaves  parameters  lr     frozen",
        "--------  ------  ----------  --     ------",
        "       0       1          40  0      all",
        "       1       4          28  0.125  none",
        "       2       4          28  0.25   none",
        "       3       4          28  0.5    none",
        "       4       4          18  1      2 of 4",
    ]
    # A stacked leaf counts once in each of its three layers, with a third of its size.
    assert report.layers() == (
        LayerRow(0, 1, 40, 0.0, 1),
        LayerRow(1, 4, 4 + 16 + 4 + 4, 0.125, 0),
        LayerRow(2, 4, 28, 0.25, 0),
        LayerRow(3, 4, 28, 0.5, 0),
        LayerRow(4, 4, 4 + 4 + 8 + 2, 1.0, 2),
    )
    data = {row["path"]: row for row in report.to_dicts()}
    assert (data["blocks/Dense_0/kernel"]["layer_id"], data["blocks/Dense_0/kernel"]["lr"]) == (
        [1, 2, 3], [0.125, 0.25, 0.5],
    )
    assert json.loads(report.to_json())["layers"][0] == {
        "id": 0, "leaves": 1, "parameters": 40, "lr": 0.0, "frozen": 1,
    }


def test_a_frozen_stacked_leaf_is_frozen_in_each_of_its_layers():
    policy = dm.Policy(dm.freeze(path="blocks/LayerNorm_0/*"), dm.layer_decay(0.5))
    report = policy.explain(SCAN_PARAMS, module=SCAN, args=SCAN_ARGS)
    _, cells = report.table_rows()
    assert {c[0]: c[6:9] for c in cells if c[0].startswith("blocks/")} == {
        "blocks/Dense_0/bias": ["1-3", "0.125-0.5", "no"],
        "blocks/Dense_0/kernel": ["1-3", "0.125-0.5", "no"],
        "blocks/LayerNorm_0/bias": ["1-3", "0", "yes"],
        "blocks/LayerNorm_0/scale": ["1-3", "0", "yes"],
    }
    assert report.layers()[1:4] == (
        LayerRow(1, 4, 28, 0.125, 2),
        LayerRow(2, 4, 28, 0.25, 2),
        LayerRow(3, 4, 28, 0.5, 2),
    )
    assert [row.frozen_text for row in report.layers()] == ["none", "2 of 4", "2 of 4", "2 of 4", "none"]


def test_stacked_ids_are_shown_as_runs_and_multipliers_as_their_range():
    leaves = [
        dm.Leaf("stack/kernel", layer="linear", role="weight", shape=(4, 2, 2)),
        dm.Leaf("step", layer="unknown", role="other", shape=(), dtype="int32"),
        dm.Leaf("stats/mean", layer="batch_norm", role="other", shape=(2,), is_param=False),
    ]
    decisions = [
        dm.Decision(leaves[0], False, None, "default", layer_id=(1, 2, 3, 7), lr_scale=(0.0317, 0.1, 0.2, 0.75)),
        dm.Decision(leaves[1], False, None, "not floating point: never decayed", layer_id=8, lr_scale=0.0),
        dm.Decision(leaves[2], False, None, "state: never decayed", layer_id=8, lr_scale=0.0),
    ]
    report = dm.Report(decisions, dm.Policy(dm.freeze(param="embedding"), dm.layer_decay(0.75)))
    _, cells = report.table_rows()
    assert [c[6:10] for c in cells] == [  # after path, kind, via, class, role, shape
        ["no", "1-3,7", "0.0317-0.75", "no"],
        ["no", "8", "-", "-"],  # never trained: no multiplier, not frozen by any rule
        ["no", "8", "-", "-"],
    ]
    assert report.layers() == (
        LayerRow(1, 1, 4, 0.0317, 0),
        LayerRow(2, 1, 4, 0.1, 0),
        LayerRow(3, 1, 4, 0.2, 0),
        LayerRow(7, 1, 4, 0.75, 0),
        LayerRow(8, 2, 1 + 2, 0.0, 0),
    )


# Groups without a ladder: no layer ids and no per-layer table.


def test_freeze_without_layer_decay_says_how_much_is_frozen():
    policy = dm.Policy(*dm.presets.standard().rules, dm.freeze(layer="embedding"))
    report = policy.explain(MODEL)
    lines = str(report).splitlines()
    assert lines[:3] == [
        "path                  kind        via    class      role       shape    decay  frozen  rule",
        "----                  ----        ---    -----      ----       -----    -----  ------  ----",
        "embed/weight          embedding   class  Embedding  embedding  (10, 4)  no     yes     rule 5: freeze(layer='embedding')",
    ]
    assert lines[-1] == "decayed 4 of 18 leaves, 56 of 154 elements (36.4%); frozen 1 leaf, 40 elements"
    assert report.layers() == () and "per layer" not in report.to_markdown()
    assert list(json.loads(report.to_json())) == ["rows", "totals"]
    assert "dm-layers" not in report._repr_html_()


def test_lr_without_layer_decay_adds_only_the_lr_column():
    policy = dm.Policy(dm.decay(layer="linear", param="weight"), dm.lr(2.0, within=Block))
    report = policy.explain(MODEL)
    header, cells = report.table_rows()
    assert header == ["path", "kind", "via", "class", "role", "shape", "decay", "lr", "rule"]
    rows = {c[0]: c for c in cells}
    assert rows["blocks/1/fc/weight"][7:] == [
        "2", f"rule 1: decay(layer='linear', param='weight'); lr: rule 2: {policy.rules[1]!r}",
    ]
    assert repr(policy.rules[1]).startswith("lr(2.0, within=") and repr(policy.rules[1]).endswith("Block)")
    assert rows["head/weight"][7:] == ["1", "rule 1: decay(layer='linear', param='weight')"]
    assert report.summary() == "decayed 4 of 18 leaves, 56 of 154 elements (36.4%)"
    assert set(report.to_dicts()[0]) == {
        "path", "kind", "via", "class", "role", "shape", "dtype", "decay", "label", "rate",
        "lr", "rule", "lr_rule", "why",
    }
    assert str(report).splitlines()[-1] == report.summary()


# Policies without groups: byte for byte what they were before groups existed.

PLAIN = dm.Policy(dm.decay(layer="linear", param="weight", rate=0.5), dm.label("emb", layer="embedding"))
PLAIN_LEAVES = [
    dm.Leaf("embed/embedding", layer="embedding", role="embedding", shape=(10, 4)),
    dm.Leaf("fc/kernel", layer="linear", role="weight", shape=(4, 4)),
    dm.Leaf("fc/bias", layer="linear", role="bias", shape=(4,)),
]
PLAIN_TABLE = """\
path             kind       via    class  role       shape    decay  label     rate  rule
----             ----       ---    -----  ----       -----    -----  -----     ----  ----
embed/embedding  embedding  given  -      embedding  (10, 4)  no     emb       0     default
fc/kernel        linear     given  -      weight     (4, 4)   yes    decay     0.5   rule 1: decay(layer='linear', param='weight', rate=0.5)
fc/bias          linear     given  -      bias       (4,)     no     no_decay  0     default
decayed 1 of 3 leaves, 16 of 60 elements (26.7%)"""
PLAIN_MARKDOWN = """\
| path | kind | via | class | role | shape | decay | label | rate | rule |
| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |
| `embed/embedding` | embedding | given | - | embedding | (10, 4) | no | emb | 0 | default |
| `fc/kernel` | linear | given | - | weight | (4, 4) | yes | decay | 0.5 | rule 1: decay(layer='linear', param='weight', rate=0.5) |
| `fc/bias` | linear | given | - | bias | (4,) | no | no_decay | 0 | default |

decayed 1 of 3 leaves, 16 of 60 elements (26.7%)
"""
PLAIN_JSON = (
    '{"rows": [{"path": "embed/embedding", "kind": "embedding", "via": "given", "class": null, '
    '"role": "embedding", "shape": [10, 4], "dtype": "float32", "decay": false, "label": "emb", '
    '"rate": 0.0, "rule": null, "why": "default"}, {"path": "fc/kernel", "kind": "linear", '
    '"via": "given", "class": null, "role": "weight", "shape": [4, 4], "dtype": "float32", '
    '"decay": true, "label": "decay", "rate": 0.5, "rule": "decay(layer=\'linear\', '
    'param=\'weight\', rate=0.5)", "why": "rule 1: decay(layer=\'linear\', param=\'weight\', '
    'rate=0.5)"}, {"path": "fc/bias", "kind": "linear", "via": "given", "class": null, '
    '"role": "bias", "shape": [4], "dtype": "float32", "decay": false, "label": "no_decay", '
    '"rate": 0.0, "rule": null, "why": "default"}], "totals": {"leaves": 3, "leaves_decayed": 1, '
    '"elements": 60, "elements_decayed": 16}}'
)

# sha256 of the outputs as they were before the group columns existed: the str,
# markdown, JSON and HTML of the standard preset on MODEL, and the HTML of PLAIN (the
# standard ones with the via column that ViT's own pos_embed, unknown via name, brings).
BEFORE = {
    "standard_str": "3f9cb6c7f4da1092485aa898b3a09c8cdfabf5f8ea891d875ee495d6cfec7fcd",
    "standard_markdown": "cd5885c9d59bd9b200508b6232ad7a26d05f4fa83962a4a3bbd7f89bb99ceb8a",
    "standard_json": "a5f78d19051e3f5a9f9849eba6ee9b771b10d890530e781070b3a5aa3417994d",
    "standard_html": "36f6b4fdf2edc3f8d6b95792b6de8df8f0333edc691f16b995ff8e7f02088c5e",
    "plain_html": "a9d5c741da34d544e140b5cd1c6a8815b14538b4381d60f364454dc69084762f",
}


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _html_as_before(html: str) -> str:
    """The HTML without what came after those hashes, for notebooks that restyle tables:
    each cell's inline alignment and the tag in the style's selectors."""
    return _unstyled(html).replace("div.decaymask-report", ".decaymask-report")


def test_policies_without_groups_render_as_before():
    plain = PLAIN.report(PLAIN_LEAVES)
    assert str(plain) == PLAIN_TABLE
    assert plain.to_markdown() == PLAIN_MARKDOWN
    assert plain.to_json() == PLAIN_JSON
    assert _sha(_html_as_before(plain._repr_html_())) == BEFORE["plain_html"]
    assert plain.layers() == ()
    standard = dm.presets.standard().explain(MODEL)
    assert {
        "standard_str": _sha(str(standard)),
        "standard_markdown": _sha(standard.to_markdown()),
        "standard_json": _sha(standard.to_json()),
        "standard_html": _sha(_html_as_before(standard._repr_html_())),
    } == {k: v for k, v in BEFORE.items() if k.startswith("standard")}


# The command line prints the same.

POLICY_FILE = """\
rules = [
  {decay = true, layer = "linear", param = "weight"},
  {lr = 0.1, layer = "embedding"},
  {freeze = true, path = "head/*"},
]
layer_decay = {rate = 0.5}
"""


@pytest.fixture(scope="module")
def policy_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("policy") / "groups.toml"
    path.write_text(POLICY_FILE)
    return str(path)


def _cli(capsys, *argv: str) -> str:
    code = main(["explain", f"{__name__}:vit", *argv])
    out, err = capsys.readouterr()
    assert (code, err) == (0, "")
    return out


def test_cli_table_prints_the_columns_and_the_per_layer_table(capsys, policy_file):
    out = _cli(capsys, "--policy", policy_file)
    policy = dm.Policy.from_file(policy_file)
    assert out == f"equinox: {__name__}:vit\n{policy!r}\n\n{policy.explain(MODEL)}\n"
    lines = out.splitlines()
    assert lines[8:11] == [
        "path                  kind        via    class      role       shape    decay  layer id  lr       frozen  rule",
        "----                  ----        ---    -----      ----       -----    -----  --------  --       ------  ----",
        "embed/weight          embedding   class  Embedding  embedding  (10, 4)  no     0         0.00625  no      default; lr: rule 2: lr(0.1, layer='embedding')",
    ]
    assert lines[-12:] == [
        "head/weight           linear      class  Linear     weight     (2, 4)   no     4         0        yes     rule 3: freeze(path='head/*')",
        "head/bias             linear      class  Linear     bias       (2,)     no     4         0        yes     rule 3: freeze(path='head/*')",
        "decayed 3 of 18 leaves, 48 of 154 elements (31.2%); frozen 2 leaves, 10 elements",
        "",
        "per layer",
        "layer id  leaves  parameters  lr              frozen",
        "--------  ------  ----------  --              ------",
        "       0       2          52  0.00625-0.0625  none",
        "       1       4          28  0.125           none",
        "       2       4          28  0.25            none",
        "       3       4          28  0.5             none",
        "       4       4          18  1               2 of 4",
    ]


def test_cli_markdown_and_json(capsys, policy_file):
    markdown = _cli(capsys, "--policy", policy_file, "--format", "markdown")
    assert "| `blocks/2/fc/weight` | linear | class | Linear | weight | (4, 4) | yes | 3 | 0.5 | no | rule 1: decay(layer='linear', param='weight') |\n" in markdown
    assert markdown.endswith(
        "\n\ndecayed 3 of 18 leaves, 48 of 154 elements (31.2%); frozen 2 leaves, 10 elements\n"
        "\n**per layer**\n\n| layer id | leaves | parameters | lr | frozen |\n"
        "| --- | --- | --- | --- | --- |\n| 0 | 2 | 52 | 0.00625-0.0625 | none |\n"
        "| 1 | 4 | 28 | 0.125 | none |\n| 2 | 4 | 28 | 0.25 | none |\n"
        "| 3 | 4 | 28 | 0.5 | none |\n| 4 | 4 | 18 | 1 | 2 of 4 |\n"
    )
    data = json.loads(_cli(capsys, "--policy", policy_file, "--format", "json"))
    assert data["totals"]["leaves_frozen"] == 2 and data["totals"]["elements_frozen"] == 10
    assert [(layer["id"], layer["lr"], layer["frozen"]) for layer in data["layers"]] == [
        (0, [0.00625, 0.0625], 0), (1, 0.125, 0), (2, 0.25, 0), (3, 0.5, 0), (4, 1.0, 2),
    ]
    assert {k: data["rows"][-1][k] for k in ("path", "layer_id", "lr", "frozen", "freeze_rule")} == {
        "path": "head/bias", "layer_id": 4, "lr": 0.0, "frozen": True, "freeze_rule": "freeze(path='head/*')",
    }
    assert (data["rows"][0]["lr"], data["rows"][0]["lr_rule"]) == (0.00625, "lr(0.1, layer='embedding')")
