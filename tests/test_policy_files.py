"""Policy files and policy data as input from elsewhere: reading one, and saying what is
wrong with it, takes bounded time and memory, and names nothing the caller did not allow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from decimal import Decimal

import pytest

import decaymask as dm

DEEP = (
    "the data is nested more than 100 levels deep{at}; a policy is a few levels deep (a "
    "table of rules, each a table of keys and values), so this is not a policy: check that "
    "it is the data (and the key) you meant."
)
ALIASES = (
    "YAML anchors and aliases (&a, *a) are not read: an alias repeats a value, and aliases "
    "of aliases can turn a file of a few hundred bytes into billions of values; write each "
    "value out"
)
DEMO = "decaymask._demo:equinox_model"


def where(path) -> str:
    return f"Policy.from_file({str(path)!r})"


def bounded(code: str, timeout: float = 300, *args: str, status: int = 0) -> str:
    """Runs ``code`` (with ``args`` after it) in a fresh interpreter with 2 GiB of
    address space at most; fails the test, instead of hanging it or the machine, if the
    code does not finish in ``timeout`` seconds. Returns stdout and stderr."""
    # The limit is set by the child itself: a preexec_fn would fork this process, which
    # JAX, imported by other tests, warns against.
    limit = (
        "import resource; resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))\n"
        if os.name == "posix"
        else ""
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", limit + textwrap.dedent(code), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"did not finish in {timeout} s")
    assert done.returncode == status, done.stderr[-2000:]
    return done.stdout + done.stderr


def laughs(tmp_path):
    """~400 bytes of YAML whose aliases of aliases stand for 9**9 strings."""
    levels = ['&a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        levels.append(f"&{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    path = tmp_path / "laughs.yaml"
    path.write_text("rules:\n  - label: [" + ", ".join(levels) + "]\n")
    return path


# A file that expands: YAML aliases.


def test_yaml_aliases_are_refused_in_bounded_time_and_memory(tmp_path):
    path = laughs(tmp_path)
    assert path.stat().st_size < 1000
    out = bounded(
        f"""
        import time, tracemalloc
        import decaymask as dm
        tracemalloc.start()
        start = time.perf_counter()
        try:
            dm.Policy.from_file({str(path)!r})
        except dm.PolicyDataError as err:
            print(err)
        print(time.perf_counter() - start)
        print(tracemalloc.get_traced_memory()[1])
        """
    )
    message, seconds, peak = out.splitlines()
    assert message == f"{where(path)}: {ALIASES} (at line 2, column 13)."
    assert float(seconds) < 5 and int(peak) < 20_000_000


def test_the_command_line_refuses_yaml_aliases(tmp_path):
    path = laughs(tmp_path)
    code = "import sys; from decaymask._cli import main; sys.exit(main(sys.argv[1:]))"
    out = bounded(code, 300, "explain", DEMO, "--policy", str(path), status=2)
    assert out == f"python -m decaymask explain: error: {where(path)}: {ALIASES} (at line 2, column 13).\n"


def test_an_anchor_without_an_alias_is_refused_too(tmp_path):
    path = tmp_path / "p.yml"
    path.write_text("rules:\n  - &a {decay: true}\n")
    with pytest.raises(dm.PolicyDataError) as info:
        dm.Policy.from_file(path)
    assert str(info.value) == f"{where(path)}: {ALIASES} (at line 2, column 5)."


def test_shared_data_is_shown_shortened():
    # The same expansion built in Python: each list shared nine times, nine levels deep.
    out = bounded(
        """
        import decaymask as dm
        shared = ["lol"] * 9
        for _ in range(8):
            shared = [shared] * 9
        try:
            dm.Policy.from_dict({"rules": [{"label": shared}]})
        except dm.PolicyDataError as err:
            print(err)
        """
    )
    assert out == (
        "Policy.from_dict: rules[0]: label(label=[[[[...], [...], [...], [...], ...], "
        "[[.......], ...]): expected a non-empty string naming a group of optax.partition, "
        "got list.\n"
    )


@pytest.mark.parametrize(
    "data, message",
    [
        ({"rules": [{"label": [0] * 10**6}]}, "rules[0]: label(label=[0, 0, 0, 0, ...]): expected a non-empty string naming a group of optax.partition, got list."),
        ({"rules": [], "strict": [0] * 10**6}, "strict: expected true or false, got [0, 0, 0, 0, ...]."),
        ({"rules": [{"decay": True, "path": {"regex": 1, "x": [0] * 10**6}}]}, "rules[0].path: expected a glob string or {regex = '...'} (optionally with flags = ['IGNORECASE', ...]), got {'regex': 1, 'x': [0, 0, 0, 0, ...]}."),
        ({"rules": [{"decay": True, "path": {"regex": "x", "flags": [0] * 10**6}}]}, "rules[0].path.flags: expected a list of re flag names (ASCII, IGNORECASE, LOCALE, MULTILINE, DOTALL, VERBOSE), got [0, 0, 0, 0, ...]."),
        ({"rules": [{"decay": True, "when": [1] * 10**6}]}, "rules[0].when: expected the import path of a function, 'package.module:function', got [1, 1, 1, 1, ...] (list)."),
        ({"rules": [{"decay": True, "min_ndim": "x" * 5000}]}, "rules[0]: decay(min_ndim='xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx...xxxxxxxxx'): expected a non-negative int; got str."),
        ({"rules": [{"decay": True, "layer": "x" * 100_000}]}, "rules[0].layer: a string of 100,000 characters ('xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx...xxxxxxxxx'); no kind, role, name, label, glob, pattern or import path comes near 10,000: check the data."),
        ({"rules": [{"decay": True, "y" * 100_000: 1}]}, "rules[0]: a key of 100,000 characters ('yyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyy...yyyyyyyyy'); no key of a policy comes near 10,000: check the data."),
        ({"rules": [{"decay": True, 1: 1}]}, "rules[0]: unknown key 1 (int; keys are strings). Valid keys: decay, label, rate, lr, freeze, layer, within, param, name, path, min_ndim, when."),
        ({"rules": [], "default": 10**5000}, "default: expected true or false, got <an int of 5001 digits>."),
    ],
    ids=["label_list", "strict_list", "path_table", "flags_list", "when_list", "long_str", "huge_str", "huge_key", "int_key", "huge_int"],
)
def test_values_in_messages_are_shortened(data, message):
    with pytest.raises(dm.PolicyDataError) as info:
        dm.Policy.from_dict(data)
    assert str(info.value) == f"Policy.from_dict: {message}"


# Import paths: only what the caller allowed.


@pytest.mark.parametrize("target", ["sys:exit", "os:system", "builtins.print"])
def test_a_file_cannot_name_a_function_of_a_module_already_imported(tmp_path, target):
    module = target.replace(":", ".").rpartition(".")[0]
    assert module in sys.modules
    path = tmp_path / "p.toml"
    path.write_text(f'rules = [{{decay = true, when = "{target}"}}]\n')
    with pytest.raises(dm.PolicyDataError) as info:
        dm.Policy.from_file(path)
    assert str(info.value) == (
        f"Policy.from_dict: rules[0].when: {target!r} is in the module {module!r}, which "
        f"the caller has not allowed: policy data names classes and functions only in "
        f"decaymask and in the modules given as imports=, imported or not (a when= function "
        f"is called on every parameter). If you trust this data, allow it: "
        f"Policy.from_dict(data, imports=({module!r},)) or Policy.from_file(path, "
        f"imports=({module!r},)) (imports=True allows any module)."
    )


def test_the_command_line_refuses_a_function_it_was_not_given(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"rules": [{"decay": True, "when": "sys:exit"}]}))
    code = "import sys; from decaymask._cli import main; sys.exit(main(sys.argv[1:]))"
    err = bounded(code, 300, "explain", DEMO, "--policy", str(path), status=2)
    assert err.count("\n") == 1
    assert "'sys:exit' is in the module 'sys', which the caller has not allowed" in err
    assert err.rstrip().endswith("On the command line: --imports PACKAGE.")


def test_decaymask_and_the_allowed_modules_are_named_without_more():
    from decaymask.core._values import importable

    data = {"rules": [{"decay": True, "when": "decaymask.core._values:importable"}]}
    assert dm.Policy.from_dict(data).rules[0].when is importable
    data = {"rules": [{"decay": True, "when": "json:loads"}]}
    assert dm.Policy.from_dict(data, imports=("json",)).rules[0].when is json.loads
    with pytest.raises(dm.PolicyDataError, match=r"'json:loads' is in the module 'json', which the caller has not allowed"):
        dm.Policy.from_dict(data, imports=("js",))


# Nesting.


@pytest.mark.parametrize(
    "suffix, text, at",
    [
        (".json", "[" * 100_000 + "]" * 100_000, ""),
        (".toml", "a = " + "[" * 100_000 + "]" * 100_000, ""),
        (".yaml", "[" * 100_000 + "]" * 100_000, " (at line 1, column 101)"),
        (".json", '{"rules": ' + "[" * 500 + "]" * 500 + "}", " (at rules[0][0][0][0][0][0][0][0][0][0][0][0][0]...[0][0][0][0][0][0][0][0])"),
    ],
    ids=["json", "toml", "yaml", "json_500"],
)
def test_deeply_nested_files_name_the_file(tmp_path, suffix, text, at):
    path = tmp_path / f"deep{suffix}"
    path.write_text(text)
    with pytest.raises(dm.PolicyDataError) as info:
        dm.Policy.from_file(path)
    assert str(info.value) == f"{where(path)}: {DEEP.format(at=at)}"


def test_deeply_nested_data_is_walked_without_recursion():
    deep: list = []
    inner = deep
    for _ in range(100_000):
        inner.append([])
        inner = inner[0]
    with pytest.raises(dm.PolicyDataError) as info:
        dm.Policy.from_dict({"rules": deep})
    assert str(info.value).startswith("Policy.from_dict: the data is nested more than 100 levels deep (at rules[0][0]")
    # Data that holds itself is shown, not followed.
    itself: list = []
    itself.append(itself)
    with pytest.raises(dm.PolicyDataError, match=r"decay\(param=\[\[\[\[\.\.\.\]\]\]\]\): expected a role"):
        dm.Policy.from_dict({"rules": [{"decay": True, "param": itself}]})


# Encodings, keys given twice, numbers, and what is not a file.


@pytest.mark.parametrize(
    "name, raw, found",
    [
        ("p.yaml", "rules: []  # café\n".encode("latin-1"), "the byte 0xe9 at line 1, column 17"),
        ("p.json", '{"rules": []}'.encode("utf-16"), "the byte 0xff at line 1, column 1"),
        ("p.toml", b"rules = []\n\x89PNG\r\n\x1a\n\x00\x00", "the byte 0x89 at line 2, column 1"),
    ],
    ids=["latin1", "utf16", "binary"],
)
def test_a_file_that_is_not_utf8_is_named(tmp_path, name, raw, found):
    path = tmp_path / name
    path.write_bytes(raw)
    with pytest.raises(dm.PolicyDataError) as info:
        dm.Policy.from_file(path)
    assert str(info.value) == (
        f"{where(path)}: the file is not UTF-8 text: {found} is not UTF-8; save the file as "
        f"UTF-8 (TOML, JSON and YAML policy files are read as UTF-8)."
    )


def test_a_utf8_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "p.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"rules": [{"decay": True}]}).encode())
    assert dm.Policy.from_file(path) == dm.Policy(dm.decay())


@pytest.mark.parametrize(
    "name, text, at",
    [
        ("p.yaml", "rules:\n  - decay: true\n    layer: linear\n    decay: false\n", "'decay' appears twice in one table; YAML would keep the last value and drop the other without a word: keep one of them (at line 4, column 5)"),
        ("p.yml", "rules: []\ndefault: true\nrules: [{decay: true}]\n", "'rules' appears twice in one table; YAML would keep the last value and drop the other without a word: keep one of them (at line 3, column 1)"),
        ("p.json", '{"rules": [{"decay": true, "layer": "linear", "decay": false}]}', "'decay' appears twice in one table; JSON would keep the last value and drop the other without a word: keep one of them"),
    ],
    ids=["yaml", "yaml_top", "json"],
)
def test_a_key_given_twice_is_refused(tmp_path, name, text, at):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(dm.PolicyDataError) as info:
        dm.Policy.from_file(path)
    assert str(info.value) == f"{where(path)}: the key {at}."


@pytest.mark.parametrize("suffix", [".json", ".toml", ".yaml"])
def test_a_number_too_long_to_read_names_the_file(tmp_path, suffix):
    number = "1" + "0" * 5000
    text = {
        ".json": '{"rules": [{"decay": true, "rate": %s}]}' % number,
        ".toml": "[[rules]]\ndecay = true\nrate = %s\n" % number,
        ".yaml": "rules:\n  - decay: true\n    rate: %s\n" % number,
    }[suffix]
    path = tmp_path / f"p{suffix}"
    path.write_text(text)
    with pytest.raises(dm.PolicyDataError) as info:
        dm.Policy.from_file(path)
    line = 1 if suffix == ".json" else 3
    assert str(info.value) == (
        f"{where(path)}: a number of 5,001 digits at line {line}; no value of a policy "
        f"comes near that: check the file."
    )


HUGE = "<an int of 5001 digits>"


def test_numbers_too_large_for_a_float_are_named():
    with pytest.raises(TypeError) as info:
        dm.decay(rate=10**5000)
    assert str(info.value) == (
        f"decay(rate={HUGE}): expected a non-negative number that multiplies the weight "
        f"decay of the matching leaves, finite (inf or nan would turn every decayed weight "
        f"into inf or nan), got {HUGE}."
    )
    with pytest.raises(ValueError) as info:
        dm.lr(10**5000)
    assert str(info.value) == (
        f"lr({HUGE}): the multiplier {HUGE} is too large for a float; expected a finite "
        f"number > 0 (e.g. 0.1 or 10)."
    )
    with pytest.raises(ValueError, match=rf"^layer_decay\({HUGE}\): expected a rate in \(0, 1\], got {HUGE}, a number too large for a float\."):
        dm.layer_decay(10**5000)
    with pytest.raises(dm.PolicyDataError) as info:
        dm.Policy.from_dict({"rules": [{"lr": 10**5000}]})
    assert str(info.value) == (
        f"Policy.from_dict: rules[0].lr: the multiplier {HUGE} is too large for a float; "
        f"expected a finite number > 0 (e.g. 0.1 or 10)."
    )
    # A Decimal is no float: refused by type, before any comparison (a signalling NaN
    # raises on comparing).
    with pytest.raises(TypeError, match=r"^decay\(rate=Decimal\('sNaN'\)\): expected a non-negative number .*, got decimal\.Decimal\.$"):
        dm.decay(rate=Decimal("sNaN"))


@pytest.mark.parametrize(
    "name, text",
    [("p.yaml", "rules:\n  - decay: true\n    rate: 1.0e+400\n"), ("p.json", '{"rules": [{"decay": true, "rate": 1e400}]}')],
    ids=["yaml", "json"],
)
def test_a_rate_that_overflows_in_a_file_is_named(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(dm.PolicyDataError, match=r"^Policy.from_dict: rules\[0\].rate: decay\(rate=inf\): expected a non-negative number .* finite"):
        dm.Policy.from_file(path)


def test_a_directory_is_named(tmp_path):
    path = tmp_path / "policy.toml"
    path.mkdir()
    with pytest.raises(dm.PolicyDataError) as info:
        dm.Policy.from_file(path)
    assert str(info.value) == f"{where(path)}: the path is a directory, not a file; give the policy file."


NOT_REGULAR = (
    "the path is not a regular file (it is a pipe, a device or a socket, which may never "
    "end); give a policy file, or read the data yourself and pass it to Policy.from_dict."
)


@pytest.mark.skipif(not hasattr(os, "mkfifo") or not os.path.exists("/dev/zero"), reason="POSIX pipes and devices")
def test_pipes_and_devices_are_not_read(tmp_path):
    fifo = tmp_path / "p.json"
    os.mkfifo(fifo)
    zero = tmp_path / "zero.yaml"
    zero.symlink_to("/dev/zero")
    out = bounded(
        f"""
        import decaymask as dm
        for path in ({str(fifo)!r}, {str(zero)!r}):
            try:
                dm.Policy.from_file(path)
            except dm.PolicyDataError as err:
                print(err)
        """
    )
    assert out.splitlines() == [f"{where(fifo)}: {NOT_REGULAR}", f"{where(zero)}: {NOT_REGULAR}"]


def test_a_file_too_large_for_a_policy_is_not_read(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"rules": [{"decay": True, "layer": "linear"}] * 10_000}))
    assert path.stat().st_size > 256 * 1024
    with pytest.raises(dm.PolicyDataError) as info:
        dm.Policy.from_file(path)
    assert str(info.value) == (
        f"{where(path)}: the file is larger than 256 KiB, far larger than any policy, and is "
        f"not read; give the file that holds the policy, or read the data yourself and pass "
        f"the policy's table to Policy.from_dict."
    )
