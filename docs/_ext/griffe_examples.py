"""Griffe extension: render functrain's ``Example:`` docstring sections as code examples.

The project writes Google-style ``Example:`` sections (singular). Griffe only turns the plural
``Examples:`` title into a code-example section; a singular title becomes an admonition whose
``>>>`` lines are read as Markdown (and ``[0]`` in an output as a link). This extension renames
the title before the docstring is parsed, so doctests render as Python console code, and turns
Sphinx roles (:func:`x`) into plain code spans.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)
# Sphinx roles such as :func:`flatten` would print literally in Markdown: keep the code span.
_ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|exc|obj):`~?([^`]+)`")


class ExampleSections(griffe.Extension):
    """Renames ``Example:`` section titles to ``Examples:`` and unwraps Sphinx roles."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            value = _EXAMPLE.sub(r"\1Examples:", obj.docstring.value)
            obj.docstring.value = _ROLE.sub(r"`\1`", value)
