"""Untrusted input: names holding terminal control characters are shown as visible text
in every error and warning, and policy data cannot hang a build with a regex."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import unicodedata
import warnings

import equinox as eqx
import flax.linen as nn
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import decaymask as dm
from decaymask._cli import main
from decaymask.core._regex import MAX_OPEN_REPEATS, backtracking

pytestmark = pytest.mark.filterwarnings("ignore::decaymask.PolicyWarning")

# An escape sequence that clears the screen, a carriage return, a bell, a bidi override.
BAD = "a\x1b[2Jb\r\x07\u202ec"
SHOWN = "a\\x1b[2Jb\\r\\x07\\u202ec"


def raw_controls(text: str) -> list[str]:
    return [c for c in text if c != "\n" and unicodedata.category(c) in ("Cc", "Cf")]


def assert_visible(text: str) -> None:
    assert not raw_controls(text), text
    assert SHOWN in text, text


class Holder(eqx.Module):
    blocks: dict

    def __init__(self, arrays: dict) -> None:
        self.blocks = arrays


class EinsumNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Einsum((2, 3, 4), "...a,abc->...bc", name=BAD)(x)


class DenseNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, name=BAD)(x)


def haiku_params() -> dict:
    def forward(x):
        w = hk.get_parameter(BAD, (2, 3), init=hk.initializers.RandomNormal())
        return x @ w + hk.Linear(3, name="head")(x)

    f = hk.transform(forward)
    return f.init(jax.random.PRNGKey(0), jnp.ones((1, 2)))


# ------------------------------------------------------------------ errors and warnings


def test_a_muon_layout_error_shows_an_equinox_key_as_visible_text():
    model = Holder({BAD: jnp.ones((2, 3, 4))})
    unknown = r"matrix layout \(reduction and output axes\) is unknown"
    with pytest.raises(ValueError, match=unknown) as info:
        dm.Policy(dm.decay()).muon_dims(model)
    assert_visible(str(info.value))
    assert str(info.value).startswith(f"muon_dims: blocks/{SHOWN} (")


def test_a_muon_layout_error_shows_a_linen_module_name_as_visible_text():
    variables = EinsumNet().init(jax.random.PRNGKey(0), jnp.ones((1, 2)))
    with pytest.raises(ValueError, match="is unknown") as info:
        dm.Policy(dm.decay(param="bias")).muon_dims(variables["params"])
    assert_visible(str(info.value))


def test_check_mask_names_the_mismatch_as_visible_text():
    params = DenseNet().init(jax.random.PRNGKey(0), jnp.ones((1, 2)))["params"]
    mask = {BAD: {"kernel": 1, "bias": False}}
    with pytest.raises(dm.MaskMismatchError, match=r"a mask leaf must be True or False") as info:
        dm.check_mask(mask, params)
    message = str(info.value)
    assert_visible(message)
    assert message.startswith(f"mask does not match params at {SHOWN}/")
    assert "\n  mask has the int 1\n" in message  # the message's own lines are kept


def test_verify_names_a_haiku_parameter_as_visible_text():
    params = haiku_params()
    with pytest.raises(dm.VerifyError, match="tx does not do what the policy says") as info:
        dm.Policy(dm.decay()).verify(optax.sgd(0.1), params)
    assert_visible(str(info.value))
    assert any(BAD in m.path for m in info.value.mismatches)  # the canonical path, unchanged


def test_wrap_names_arrays_missing_from_the_full_tree_as_visible_text():
    tx = dm.Policy(dm.lr(0.1, path="*")).wrap(optax.sgd(0.1), full={"other": jnp.ones(3)})
    with pytest.raises(ValueError, match="hold arrays the full tree does not") as info:
        tx.init({BAD: jnp.ones(3)})
    assert_visible(str(info.value))


def test_explain_errors_show_names_as_visible_text():
    policy = dm.Policy(dm.layer_decay(0.5, blocks=f"blocks/{BAD}/*"))
    with pytest.raises(ValueError) as info:
        policy.explain({"x": jnp.ones(3)})
    assert_visible(str(info.value))


def test_an_integer_leaf_warning_shows_its_path_as_visible_text():
    model = Holder({BAD: jnp.arange(3), "w": jnp.ones((3, 3))})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm.Policy(dm.decay()).mask(model)
    messages = [str(w.message) for w in caught if "integer or bool arrays" in str(w.message)]
    assert messages and all(not raw_controls(m) for m in messages)
    assert SHOWN in messages[0]
    assert caught[0].filename == __file__  # warnings still point at the caller's line


class Loud:
    """A value whose repr holds an escape sequence."""

    def __repr__(self) -> str:
        return BAD


def test_a_value_whose_repr_holds_control_characters_is_shown_as_visible_text():
    with pytest.raises(TypeError, match="expected a learning-rate multiplier") as info:
        dm.lr(Loud())
    assert_visible(str(info.value))
    with pytest.raises(TypeError, match="expected a non-empty string naming a group") as info:
        dm.decay(label=Loud())
    assert_visible(str(info.value))


def test_add_decayed_weights_shows_a_bad_rate_as_visible_text():
    tx = dm.add_decayed_weights(0.1, {"w": Loud()})
    params = {"w": jnp.ones(2)}
    with pytest.raises(TypeError, match="a rate must be a float") as info:
        tx.update(params, tx.init(params), params)
    assert_visible(str(info.value))


def test_rules_still_match_the_real_names():
    model = Holder({BAD: jnp.ones((3, 3)), "plain": jnp.ones((3, 3))})
    by_regex = dm.Policy(dm.decay(), dm.no_decay(path=re.compile(re.escape(BAD))))
    assert by_regex.mask(model).blocks == {BAD: False, "plain": True}
    by_glob = dm.Policy(dm.decay(), dm.no_decay(path=f"blocks/{BAD}"))
    assert by_glob.mask(model).blocks == {BAD: False, "plain": True}
    assert [row.path for row in by_glob.explain(model)] == [f"blocks/{BAD}", "blocks/plain"]


def test_the_cli_prints_errors_as_visible_text(tmp_path, capsys):
    folder = tmp_path / "m\x1b[2Jodels"
    folder.mkdir()
    (folder / "broken.py").write_text("def model():\n    raise RuntimeError('no model')\n")
    code = main(["explain", f"{folder}/broken.py:model"])
    _, err = capsys.readouterr()
    assert code == 2
    last = err.strip().splitlines()[-1]
    assert "raised RuntimeError (its traceback is above): fix the model code." in last
    assert not raw_controls(last) and "m\\x1b[2Jodels" in last


def test_the_cli_applies_a_policy_file_regex_to_the_real_name(tmp_path, capsys):
    (tmp_path / "boxed.py").write_text(
        "import equinox as eqx\nimport jax.numpy as jnp\n\n"
        "class Box(eqx.Module):\n    d: dict\n\n"
        "def model():\n    return Box({'a\\x1b[2Jb': jnp.ones((3, 3)), 'c': jnp.ones((3, 3))})\n"
    )
    policy = tmp_path / "policy.json"
    rules = [{"decay": True}, {"decay": False, "path": {"regex": "a\x1b"}}]
    policy.write_text(json.dumps({"rules": rules}))
    argv = [f"{tmp_path}/boxed.py:model", "--policy", str(policy), "--format", "json"]
    code = main(["explain", *argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    rows = {row["path"]: row["decay"] for row in json.loads(out)["rows"]}
    assert rows == {"d/a\x1b[2Jb": False, "d/c": True}
    assert not raw_controls(err)


# ----------------------------------------------------------------- regexes in policy data


@pytest.mark.parametrize(
    "regex, why",
    [
        ("(a*)*b", "repeats a group that holds a repeat of its own"),
        ("(a|aa)+$", "repeats an alternation whose branches can match the same text"),
        ("(x+x+)+y", "repeats a group that holds a repeat of its own"),
        ("(\\w+/)*kernel", "repeats a group that holds a repeat of its own"),
        ("(.*)*x", "repeats a group that holds a repeat of its own"),
        ("(a?){25}a{25}", "repeats a group that holds a repeat of its own"),
        ("(?:abc|abd|ab)+$", "repeats an alternation whose branches can match the same text"),
        ("(?i:(?:k|K.)+)$", "repeats an alternation whose branches can match the same text"),
        ("(?=(a*)*)x", "repeats a group that holds a repeat of its own"),
        ("(a)\\1", "uses a backreference or a conditional group"),
        ("(?P<x>a)?(?(x)b|c)", "uses a backreference or a conditional group"),
        (".*a.*a.*a.*a.*a", f"holds 5 unbounded repeats \\(at most {MAX_OPEN_REPEATS}"),
    ],
)
def test_a_policy_file_regex_that_can_backtrack_without_end_is_refused(tmp_path, regex, why):
    path = tmp_path / "policy.toml"
    path.write_text(f"[[rules]]\ndecay = false\npath = {{regex = {json.dumps(regex)}}}\n")
    with pytest.raises(dm.PolicyDataError, match=r"rules\[0\]\.path: the regex .* " + why) as info:
        dm.Policy.from_file(path)
    message = str(info.value)
    assert "Fix: write the path as a glob" in message
    assert "possessive quantifier or an atomic group" in message


@pytest.mark.parametrize(
    "regex",
    ["(?>a*)*b", "(a*+)*b", "a*+b", "encoder/.*/kernel", "(attn|mlp)/kernel", "(ab|cd)+$",
     "^(layer_\\d++/)*bias$", "(blocks/\\d+/)?kernel", "([a-z]|[m-p])+$", "(\\w|\\d)+$"],
)
def test_regexes_that_cannot_backtrack_without_end_load_and_match_quickly(regex):
    policy = dm.Policy.from_dict({"rules": [{"decay": False, "path": {"regex": regex}}]})
    names = {"a" * 40 + "!": jnp.ones((2, 2)), "ab" * 30 + "!": jnp.ones((2, 2))}
    start = time.perf_counter()
    policy.mask(names, framework="flax")
    assert time.perf_counter() - start < 5


def test_the_refusal_is_made_at_load_before_any_build():
    data = {"rules": [{"decay": False, "path": [{"regex": "ok"}, {"regex": "(a|aa)+$"}]}]}
    with pytest.raises(dm.PolicyDataError, match=r"rules\[0\]\.path: the regex '\(a\|aa\)\+\$'"):
        dm.Policy.from_dict(data)


def test_a_refused_regex_hangs_nothing_where_it_loads(tmp_path):
    # The regex would hang a search of a path of thirty-odd a's for minutes; loading and
    # failing takes a moment.
    path = tmp_path / "policy.json"
    path.write_text(json.dumps({"rules": [{"decay": False, "path": {"regex": "(a*)*b"}}]}))
    script = (
        "import decaymask as dm, sys\n"
        "try:\n    dm.Policy.from_file(sys.argv[1])\n"
        "except dm.PolicyDataError as err:\n    print('refused')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=120
    )
    assert done.stdout.strip() == "refused", done.stderr


def test_a_regex_longer_than_the_string_bound_is_refused():
    with pytest.raises(dm.PolicyDataError, match="characters"):
        dm.Policy.from_dict({"rules": [{"decay": False, "path": {"regex": "a" * 20_001}}]})


def test_python_built_regexes_are_the_callers_own_and_are_not_refused():
    pattern = re.compile(r"(\w+/)*kernel")
    policy = dm.Policy(dm.decay(), dm.no_decay(path=pattern))
    assert policy.mask({"dense": {"kernel": jnp.ones((2, 2))}}, framework="flax") == {
        "dense": {"kernel": False}
    }
    assert backtracking(pattern.pattern) is not None  # yet the same pattern in data would be


def test_reading_a_pattern_is_bounded_too(monkeypatch):
    from decaymask.core import _regex

    big = "(" + "|".join(f"[\\x00-\\U0010ffff]{i}" for i in range(900)) + ")+"
    start = time.perf_counter()
    assert backtracking(big) is not None
    assert time.perf_counter() - start < 5
    monkeypatch.setattr(_regex, "_BUDGET", 10)
    assert backtracking(r"(\da|xb)+") == (
        "has too many character sets in repeated alternatives to be read"
    )


def test_the_backtracking_reading_does_not_trip_on_patterns_re_refuses():
    assert backtracking("(unclosed") is None  # left for re.compile to name
    with pytest.raises(dm.PolicyDataError, match="bad regex"):
        dm.Policy.from_dict({"rules": [{"decay": False, "path": {"regex": "(unclosed"}}]})
    deep = "(" * 2000 + "a" + ")" * 2000
    with pytest.raises(dm.PolicyDataError):
        dm.Policy.from_dict({"rules": [{"decay": False, "path": {"regex": deep}}]})
