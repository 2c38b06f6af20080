"""Every ```python block of the documentation site runs, so the guides cannot rot.

Each page under ``docs/`` with Python blocks is one test case (id: the page's path). Its blocks
run in page order in one namespace, as a reader would paste them into one session, so a later
block may use the names an earlier one defined. The test runs on the CPU in a temporary working
directory (pages write ``runs/``, ``checkpoints/`` and the like) and prints how many blocks ran
and which were skipped, with the reasons.

Pages steer the test with HTML comments, which the rendered site does not show:

``<!-- docs-test: skip (reason) -->``
    on the line before a block (blank lines may separate them): the block is not run. The reason
    is required; use it for blocks that cannot run here (``torchrun``, CUDA, JAX, a long
    compilation) or that are deliberately fragments (``...`` standing for the reader's code).

``<!-- docs-test: raises Name -->``
    before a block that demonstrates an error: it must raise an exception whose class (or a base
    class) is called ``Name``.

``<!-- docs-test: setup`` *code* ``-->``
    hidden code run at that point, to define what the prose assumes the reader already has
    (a model, a batch, a ``loader``). Keep it small and rare: prefer making a block
    self-contained when that does not change what the page says.

``<!-- docs-test: check`` *code* ``-->``
    hidden assertions run at that point, usually after a block whose comments state a result
    (``# {'epoch': 3}``), so that the stated output is the real one.

Setup and check code is Python, indented freely (it is dedented), and must not contain ``-->``.
The comment itself starts at column 0: inside a content tab or an admonition, Markdown would end
it at the first blank line and show the rest as text (place it before the tabs instead).
"""

from __future__ import annotations

import re
import sys
import textwrap
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

DOCS = Path(__file__).resolve().parents[1] / "docs"

_FENCE = re.compile(
    r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$",
    re.MULTILINE | re.DOTALL,
)
_MARKER = re.compile(r"<!--\s*docs-test:\s*(?P<kind>\w+)(?P<rest>.*?)-->", re.DOTALL)


@dataclass
class Chunk:
    """One piece of code of a page, in page order."""

    kind: str  # "block", "setup" or "check"
    line: int  # 1-based line of the code's first line in the page
    code: str
    skip: str | None = None  # the reason, for a skipped block
    raises: str | None = None  # the exception class name a block must raise


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def parse_page(text: str, name: str) -> list[Chunk]:
    """Splits a page into its Python blocks and hidden setup/check code, in page order."""
    events: list[tuple[int, str, re.Match[str]]] = []
    for m in _FENCE.finditer(text):
        events.append((m.start(), "fence", m))
    for m in _MARKER.finditer(text):
        events.append((m.start(), "marker", m))
    events.sort(key=lambda e: e[0])

    chunks: list[Chunk] = []
    pending: tuple[str, str, int] | None = None  # (kind, argument, end of the marker)
    for pos, what, m in events:
        if pending is not None and text[pending[2] : pos].strip():
            line = _line_of(text, pending[2])
            raise ValueError(f"{name}:{line}: docs-test {pending[0]} is not followed by a block")
        if what == "fence":
            if m["lang"] != "python":
                if pending is not None:
                    line = _line_of(text, pos)
                    raise ValueError(
                        f"{name}:{line}: docs-test {pending[0]} before a non-Python block"
                    )
                continue
            body = "".join(
                line[len(m["indent"]) :] if line.strip() else "\n"
                for line in m["body"].splitlines(keepends=True)
            )
            chunk = Chunk("block", _line_of(text, m.start("body")), body)
            if pending is not None:
                setattr(chunk, pending[0], pending[1])
                pending = None
            chunks.append(chunk)
            continue
        kind, rest = m["kind"], m["rest"]
        line = _line_of(text, pos)
        if kind == "skip":
            reason = re.fullmatch(r"\s*\((.+)\)\s*", rest, re.DOTALL)
            if reason is None or not reason[1].strip():
                raise ValueError(f"{name}:{line}: docs-test skip needs a (reason)")
            pending = ("skip", " ".join(reason[1].split()), m.end())
        elif kind == "raises":
            exc = rest.strip()
            if not exc.isidentifier():
                raise ValueError(f"{name}:{line}: docs-test raises needs an exception name")
            pending = ("raises", exc, m.end())
        elif kind in ("setup", "check"):
            first, _, code = rest.partition("\n")
            if first.strip():
                raise ValueError(f"{name}:{line}: docs-test {kind} code starts on the next line")
            if text[text.rfind("\n", 0, pos) + 1 : pos]:
                # Indented (in a tab or an admonition), Markdown ends the comment at a blank
                # line and shows the rest as text.
                raise ValueError(f"{name}:{line}: put indented docs-test {kind} code at column 0")
            chunks.append(Chunk(kind, line + 1, textwrap.dedent(code)))
        else:
            raise ValueError(f"{name}:{line}: unknown docs-test marker {kind!r}")
    if pending is not None:
        raise ValueError(f"{name}: docs-test {pending[0]} at the end of the page")
    return chunks


PAGES = sorted(
    path
    for path in DOCS.rglob("*.md")
    if "_ext" not in path.parts and "```python" in path.read_text()
)


def _run(chunk: Chunk, namespace: dict, name: str) -> None:
    # Leading newlines make tracebacks point at the page's own line numbers.
    source = "\n" * (chunk.line - 1) + chunk.code
    exec(compile(source, name, "exec"), namespace)


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(DOCS)) for p in PAGES])
def test_page_blocks_run(page: Path, tmp_path, monkeypatch, record_property) -> None:
    name = f"docs/{page.relative_to(DOCS)}"
    chunks = parse_page(page.read_text(), name)
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    # A real module, since dynamo looks up the globals of functions it compiles by module name.
    module = types.ModuleType("functrain_docs_page")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    namespace = module.__dict__
    ran, skipped = 0, []
    for chunk in chunks:
        if chunk.skip is not None:
            skipped.append(f"line {chunk.line}: {chunk.skip}")
            continue
        if chunk.raises is not None:
            with pytest.raises(Exception) as info:
                _run(chunk, namespace, name)
            names = [cls.__name__ for cls in type(info.value).__mro__]
            assert chunk.raises in names, f"{name}:{chunk.line} raised {names[0]}: {info.value}"
        else:
            _run(chunk, namespace, name)
        ran += chunk.kind == "block"
    record_property("blocks_run", ran)
    record_property("blocks_skipped", len(skipped))
    print(f"{name}: {ran} run, {len(skipped)} skipped")
    for reason in skipped:
        print(f"  skipped {reason}")
    assert ran > 0 or skipped, f"{name} has no Python block"


def test_markers_are_checked():
    text = textwrap.dedent(
        """\
        <!-- docs-test: setup
            x = 1
        -->

        <!-- docs-test: skip (needs a GPU) -->

        ```python
        gpu()
        ```

            ```python
            y = x + 1
            ```
        """
    )
    chunks = parse_page(text, "t.md")
    assert [(c.kind, c.skip, c.code) for c in chunks] == [
        ("setup", None, "x = 1\n"),
        ("block", "needs a GPU", "gpu()\n"),
        ("block", None, "y = x + 1\n"),
    ]
    with pytest.raises(ValueError, match="needs a"):
        parse_page("<!-- docs-test: skip -->\n```python\nx\n```\n", "t.md")
    with pytest.raises(ValueError, match="at column 0"):
        parse_page('=== "tab"\n\n    <!-- docs-test: setup\n    x = 1\n    -->\n', "t.md")
    with pytest.raises(ValueError, match="not followed by a block"):
        parse_page("<!-- docs-test: skip (why) -->\ntext\n```python\nx\n```\n", "t.md")
