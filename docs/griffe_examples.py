"""Docs build: the docstrings are written for doctest and plain reading; two touches make
them read well in the rendered reference.

- Their ``Example:`` sections hold doctests, which griffe's Google parser reads as code
  only in sections titled ``Examples:``.
- Sphinx roles (``:class:`Rule```, ``:meth:`to_dict```) become inline code.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_TITLE = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)
_ROLE = re.compile(r":(?:class|func|meth|attr|mod|exc|data|obj):`~?([^`]+)`")


class ExampleSections(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            text = _TITLE.sub(r"\1Examples:", obj.docstring.value)
            obj.docstring.value = _ROLE.sub(r"`\1`", text)
