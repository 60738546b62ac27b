"""Policy files: TOML, JSON and YAML read into policy data.

A policy file may come from someone else, so reading one is bounded: its size, the
nesting of its data, the length of its strings and numbers; YAML aliases, which can
repeat a value billions of times, are refused; so are keys given twice, which every
one of these formats would otherwise settle silently by keeping the last.
"""

from __future__ import annotations

import codecs
import json
import os
import pathlib
import re
import stat
import sys
from collections.abc import Mapping
from typing import Any

from ._bounds import MAX_DEPTH, MAX_FILE_BYTES, check_shape, short_text, too_deep
from ._imports import PolicyDataError

_TWICE = (
    "appears twice in one table; {fmt} would keep the last value and drop the other "
    "without a word: keep one of them"
)


class _Refused(Exception):
    """What a reader refuses in a file, and where (a YAML mark, or ``None``)."""

    def __init__(self, text: str, mark: Any = None):
        super().__init__(text)
        self.text = text
        self.mark = mark


def _at(mark: Any) -> str:
    return f" (at line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""


def _read_bytes(path: pathlib.Path, where: str) -> bytes:
    """The file's bytes, at most :data:`MAX_FILE_BYTES` of them; a directory, a pipe
    or a device is refused without reading (a pipe may never end, ``/dev/zero`` does
    not), and a pipe is opened without waiting for a writer."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags)
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise PolicyDataError(
                f"{where}: the path is a directory, not a file; give the policy file."
            )
        if not stat.S_ISREG(mode):
            raise PolicyDataError(
                f"{where}: the path is not a regular file (it is a pipe, a device or a "
                f"socket, which may never end); give a policy file, or read the data "
                f"yourself and pass it to Policy.from_dict."
            )
        file = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with file:
        raw = file.read(MAX_FILE_BYTES + 1)
    if len(raw) > MAX_FILE_BYTES:
        raise PolicyDataError(
            f"{where}: the file is larger than {MAX_FILE_BYTES // 1024} KiB, far larger "
            f"than any policy, and is not read; give the file that holds the policy, or "
            f"read the data yourself and pass the policy's table to Policy.from_dict."
        )
    return raw


def _text(raw: bytes, where: str) -> str:
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8) :]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
        raise PolicyDataError(
            f"{where}: the file is not UTF-8 text: the byte 0x{raw[err.start]:02x} at line "
            f"{line}, column {column} is not UTF-8; save the file as UTF-8 (TOML, JSON and "
            f"YAML policy files are read as UTF-8)."
        ) from None
    # Python reads no int of more digits than its limit (4300 by default), and its
    # error would advise raising the limit: no value of a policy is anywhere near.
    limit = getattr(sys, "get_int_max_str_digits", lambda: 0)()
    long = re.search(r"\d{%d,}" % (limit + 1), text) if limit else None
    if long:
        raise PolicyDataError(
            f"{where}: a number of {len(long.group()):,} digits at line "
            f"{text.count(chr(10), 0, long.start()) + 1}; no value of a policy comes near "
            f"that: check the file."
        )
    return text


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Refused(f"the key {short_text(key, 60)} " + _TWICE.format(fmt="JSON"))
        out[key] = value
    return out


_LOADER: Any = None


def _yaml_loader(yaml: Any) -> Any:
    """``yaml.SafeLoader`` refusing anchors and aliases, keys given twice, and nesting
    deeper than :data:`MAX_DEPTH` (its composer recurses once per level)."""
    global _LOADER
    if _LOADER is not None:
        return _LOADER

    class PolicyLoader(yaml.SafeLoader):  # type: ignore[misc,name-defined,unused-ignore]
        def __init__(self, stream: Any):
            super().__init__(stream)
            self.depth = 0

        def compose_node(self, parent: Any, index: Any) -> Any:
            event = self.peek_event()
            anchor = getattr(event, "anchor", None)
            if anchor is not None:
                name = short_text(anchor, 30).strip("'")
                raise _Refused(
                    f"YAML anchors and aliases (&{name}, *{name}) are not read: an alias "
                    f"repeats a value, and aliases of aliases can turn a file of a few "
                    f"hundred bytes into billions of values; write each value out",
                    event.start_mark,
                )
            self.depth += 1
            try:
                if self.depth > MAX_DEPTH:
                    at = _at(event.start_mark)[5:-1]  # "line 3, column 7"
                    raise _Refused(too_deep("", at)[2:])
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    marker = (type(key), key)
                    hash(marker)
                except TypeError:
                    continue  # the loader's own error: an unhashable key
                if marker in seen:
                    raise _Refused(
                        f"the key {short_text(key, 60)} " + _TWICE.format(fmt="YAML"),
                        key_node.start_mark,
                    )
                seen.add(marker)
            return super().construct_mapping(node, deep=deep)

    _LOADER = PolicyLoader
    return _LOADER


def _parse(text: str, suffix: str, where: str) -> Any:
    if suffix == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            try:
                import tomli as tomllib  # type: ignore[no-redef,import-not-found,unused-ignore]
            except ImportError as err:
                raise ImportError(f"{where}: reading TOML on Python 3.10 needs: pip install tomli") from err
        try:
            return tomllib.loads(text)
        except ValueError as err:  # TOMLDecodeError among them
            raise PolicyDataError(f"{where}: the file is not valid TOML: {err}.") from err
    if suffix == ".json":
        try:
            return json.loads(text, object_pairs_hook=_no_duplicates)
        except ValueError as err:  # JSONDecodeError among them
            raise PolicyDataError(f"{where}: the file is not valid JSON: {err}.") from err
    try:
        import yaml
    except ImportError as err:
        raise ImportError(f"{where}: reading YAML needs PyYAML: pip install 'decaymask[yaml]'") from err
    try:
        # A safe loader: it also refuses tags such as !!python/object, which would run code.
        return yaml.load(text, Loader=_yaml_loader(yaml))  # noqa: S506
    except (yaml.YAMLError, ValueError) as err:
        # YAML's own message quotes the offending lines: its problem and place suffice.
        problem, mark = getattr(err, "problem", None), getattr(err, "problem_mark", None)
        said = f"{problem}{_at(mark)}" if problem and mark else str(err)
        raise PolicyDataError(f"{where}: the file is not valid (safe) YAML: {said}.") from err


def read_file(path: str | pathlib.Path, key: str | None) -> Any:
    path = pathlib.Path(path)
    suffix = path.suffix.lower()
    where = f"Policy.from_file({short_text(str(path), 200)})"
    if suffix not in (".toml", ".json", ".yaml", ".yml"):
        raise PolicyDataError(
            f"{where}: unknown file type {short_text(suffix, 30)}; expected .toml, .json, "
            f".yaml or .yml."
        )
    text = _text(_read_bytes(path, where), where)
    try:
        data = _parse(text, suffix, where)
    except _Refused as err:
        said = f"{err.text}{_at(err.mark)}"
        raise PolicyDataError(f"{where}: {said}" + ("" if said.endswith(".") else ".")) from None
    except RecursionError:
        raise PolicyDataError(too_deep(where)) from None
    if key:
        for part in key.split("."):
            if not isinstance(data, Mapping) or part not in data:
                raise PolicyDataError(f"{where}: no table {key!r} in the file (missing {part!r}).")
            data = data[part]
    check_shape(data, where)
    return data
