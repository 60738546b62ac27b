"""What a report prints is text a terminal, a Markdown renderer and a notebook show as
it is: names holding escape sequences, newlines or bidi overrides show as escapes, one
row per leaf; long rule texts are cut with the full text below; rows have a short
repr; a Muon report speaks of Muon."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest

import decaymask as dm
from decaymask._cli import main

KEY = jax.random.key(0)
POLICY = dm.Policy(dm.decay(layer="linear", param="weight"))

# Each hostile character of a key and how every view writes it.
HOSTILE = [
    ("\x1b[31m", "\\x1b[31m"),  # an ANSI colour sequence
    ("\x1b]0;owned\x07", "\\x1b]0;owned\\x07"),  # sets the terminal's title
    ("\r", "\\r"),  # returns to the start of the line, to overwrite it
    ("\x07", "\\x07"),  # the bell
    ("\x9b2J", "\\x9b2J"),  # a C1 control: CSI, clears the screen on some terminals
    ("\x00", "\\x00"),
    ("\u202e", "\\u202e"),  # right-to-left override: what follows shows reversed
    ("\u2066", "\\u2066"),  # left-to-right isolate
    ("\u200b", "\\u200b"),  # zero-width space: two paths that look the same
    ("\u2028", "\\u2028"),  # line separator
    ("\n", "\\n"),
    ("\t", "\\t"),
]
IDS = ["ansi", "osc", "cr", "bell", "c1", "nul", "rlo", "lri", "zwsp", "ls", "newline", "tab"]


def _model(char: str) -> dict:
    return {f"fc{char}x": eqx.nn.Linear(3, 2, key=KEY), "out": eqx.nn.Linear(2, 2, key=KEY)}


def _printable(text: str) -> bool:
    return all(line.isprintable() for line in text.split("\n"))


@pytest.mark.parametrize("char, shown", HOSTILE, ids=IDS)
def test_names_show_their_control_and_format_characters_as_escapes(char, shown):
    report = POLICY.explain(_model(char))
    assert [row.path for row in report][:2] == [f"fc{char}x/weight", f"fc{char}x/bias"]  # data as is
    text = str(report)
    assert _printable(text) and len(text.splitlines()) == 2 + 4 + 1
    assert text.splitlines()[2].startswith(f"fc{shown}x/weight  linear")
    markdown = report.to_markdown()
    assert _printable(markdown)
    assert markdown.splitlines()[2].startswith(f"| `fc{shown}x/weight` | linear |")
    html = report._repr_html_()
    assert char not in html.partition("</style>")[2] and f"<code>fc{shown}x/weight</code>" in html
    assert repr(report[0]) == f"<Decision fc{shown}x/weight: decay, rule 1: decay(layer='linear', param='weight')>"


@pytest.mark.parametrize("char, shown", HOSTILE, ids=IDS)
def test_class_names_labels_and_rule_texts_show_as_escapes(char, shown):
    hostile = type("Gate", (eqx.Module,), {"__annotations__": {"w": jax.Array}})
    hostile.__qualname__ = f"Gate{char}"  # type() refuses a NUL in the name, this does not
    leaves = [dm.Leaf("gate/w", layer="linear", role="weight", shape=(2, 2), layer_type=f"Gate{char}")]
    policy = dm.Policy(dm.decay(layer=hostile), dm.decay(path="gate/*", label=f"big{char}"))
    report = policy.report(leaves)
    for text in (str(report), report.to_markdown(), repr(policy)):
        assert _printable(text), text
    line = str(report).splitlines()[2]
    assert f"Gate{shown}" in line and f"big{shown}" in line
    assert f"rule 2: decay(path='gate/*', label='big{shown}')" in line
    assert f"decay(layer=Gate{shown})" in repr(policy)


def test_the_command_line_prints_escapes(capsys):
    code = main(["explain", f"{__name__}:hostile_model"])
    out, err = capsys.readouterr()
    assert (code, err) == (0, "")
    assert _printable(out) and "\x1b" not in out and "\u202e" not in out
    assert "fc\\x1b[2J\\x1b[31mred\\u202ex/weight  linear" in out
    assert "warning: " in out and "ghost\\x1b[31m/w" in out


def hostile_model():
    """A factory for the command line: keys that clear the screen, colour and reverse."""
    return {
        "fc\x1b[2J\x1b[31mred\u202ex": eqx.nn.Linear(3, 2, key=KEY),
        "ghost\x1b[31m": Gate(),
    }


class Gate(eqx.Module):
    w: jax.Array

    def __init__(self):
        self.w = jnp.ones((2, 2))


def test_warnings_show_paths_as_escapes():
    with pytest.warns(dm.PolicyWarning) as record:
        POLICY.for_equinox(hostile_model())
    [message] = [str(w.message) for w in record]
    assert message.startswith("for_equinox: layers of unknown kind own parameters (Gate: ghost\\x1b[31m/w)")
    assert message.isprintable()


def test_newline_and_pipe_in_keys_keep_one_row_per_leaf():
    model = {"a\nb|c": eqx.nn.Linear(3, 2, key=KEY), "d": eqx.nn.Linear(2, 2, key=KEY)}
    report = POLICY.explain(model)
    lines = str(report).splitlines()
    assert len(lines) == 2 + 4 + 1 and lines[2].startswith("a\\nb|c/weight  linear")
    markdown = report.to_markdown().splitlines()
    assert len(markdown) == 2 + 4 + 2
    assert markdown[2] == (
        "| `a\\nb\\|c/weight` | linear | Linear | weight | (2, 3) | yes | "
        "rule 1: decay(layer='linear', param='weight') |"
    )
    # Every row has the header's number of cells.
    assert {line.replace("\\|", "").count("|") for line in markdown[:6]} == {8}


def test_markdown_code_spans_hold_backticks():
    report = POLICY.report([dm.Leaf("a`b/w", layer="linear", role="weight", shape=(2, 2))])
    assert report.to_markdown().splitlines()[2].startswith("| ``a`b/w`` | linear |")


def test_a_decision_reads_as_a_short_row():
    leaves = [
        dm.Leaf("fc/kernel", layer="linear", role="weight", shape=(4, 2)),
        dm.Leaf("fc/bias", layer="linear", role="bias", shape=(2,)),
        dm.Leaf("head/kernel", layer="linear", role="weight", shape=(2, 2)),
    ]
    policy = dm.Policy(dm.decay(layer="linear", param="weight"), dm.freeze(path="head/*"))
    first, second, third = policy.report(leaves)
    assert repr(first) == "<Decision fc/kernel: decay, rule 1: decay(layer='linear', param='weight')>"
    assert repr(second) == "<Decision fc/bias: no decay, default>"
    assert repr(third) == "<Decision head/kernel: no decay, frozen, rule 2: freeze(path='head/*')>"


LONG = tuple(f"encoder/layers/{i}/attention/*/bias" for i in range(6))
LONG_RULE = f"no_decay(path={LONG!r})"


def _long_report() -> dm.Report:
    leaves = [
        dm.Leaf("encoder/layers/0/attention/q/bias", layer="linear", role="bias", shape=(2,)),
        dm.Leaf("fc/kernel", layer="linear", role="weight", shape=(4, 2)),
    ]
    return dm.Policy(dm.decay(layer="linear"), dm.no_decay(path=LONG)).report(leaves)


def test_a_long_rule_text_is_cut_in_the_table_and_given_in_full_below():
    report = _long_report()
    cut = "rule 2: " + LONG_RULE[:87] + "..."
    lines = str(report).splitlines()
    assert lines[2] == "encoder/layers/0/attention/q/bias  linear  given  -      bias    (2,)    no     " + cut
    assert lines[4:] == ["rules in full:", f"  rule 2: {LONG_RULE}", "decayed 1 of 2 leaves, 8 of 10 elements (80.0%)"]
    assert max(len(line) for line in lines[:4]) == len(lines[2]) < 200
    markdown = report.to_markdown()
    assert f"| no | {cut} |" in markdown
    assert f"\n\nrules in full:\n\n- rule 2: `{LONG_RULE}`\n\ndecayed 1 of 2 leaves" in markdown
    html = report._repr_html_()
    assert f'title="rule 2: {LONG_RULE}"'.replace("'", "&#x27;") in html
    assert f"<li>rule 2: <code>{LONG_RULE}</code></li>".replace("'", "&#x27;") in html
    # The data keeps the text whole.
    assert report.table_rows()[1][0][-1] == cut
    assert report.to_dicts()[0]["why"] == f"rule 2: {LONG_RULE}"
    assert repr(report[0]).endswith(f"rule 2: {LONG_RULE}>")


def test_preset_rules_are_shown_whole():
    report = dm.presets.standard().explain(eqx.nn.Linear(2, 2, key=KEY))
    assert "rules in full" not in str(report) and "..." not in str(report)


class MLP(eqx.Module):
    layers: list
    embed: eqx.nn.Embedding

    def __init__(self, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.embed = eqx.nn.Embedding(10, 4, key=k3)
        self.layers = [eqx.nn.Linear(4, 8, key=k1), eqx.nn.Linear(8, 4, key=k2)]


def test_a_muon_report_speaks_of_muon():
    model = MLP(KEY)
    report = dm.presets.muon().explain(model, show_dims=True)
    lines = str(report).splitlines()
    assert lines[0].split() == ["path", "kind", "class", "role", "shape", "muon", "dims", "rule"]
    assert lines[-1] == "2 of 5 leaves go to Muon, 64 of 116 elements (55.2%)"
    assert "decay" not in lines[-1]
    assert report.to_markdown().startswith("| path | kind | class | role | shape | muon | dims | rule |")
    html = report._repr_html_()
    assert "<b>2 of 5 leaves go to Muon, 64 of 116 elements (55.2%)</b>" in html
    assert "&#10003; Muon</span>" in html and "&middot; not Muon</span>" in html
    # The same policy explaining a mask speaks of decay.
    plain = dm.presets.muon().explain(model)
    assert str(plain).splitlines()[-1] == "decayed 2 of 5 leaves, 64 of 116 elements (55.2%)"
    # Muon gets exactly the rows the report marks.
    dims = dm.presets.muon().muon_dims_for_equinox(model)
    marked = {row.path for row in report if row.decay}
    assert marked == {"layers/0/weight", "layers/1/weight"}
    assert dims.layers[0].weight is not None and dims.embed.weight is None
