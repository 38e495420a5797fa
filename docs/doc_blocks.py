"""The code the README and the docs pages show: extract it, check it, run it.

- ``python_blocks(text)``: every ```` ```python ```` block with the marker comment in front
  of it, if any. Doctest blocks (``>>>``) are run by the doctest tests instead.
- ``install_commands(text)``: every ``pip install ...`` command, in code blocks and inline.

A block that cannot run here says so right above it, and only then:
``<!-- doc-test: needs real weights -->`` (a download of a published model, in practice a
GPU) or ``<!-- doc-test: fragment -->`` (a piece that uses names from the surrounding text,
such as ``model`` or ``pipe``). The other blocks of a page run in order in one namespace.

``python docs/doc_blocks.py [ROOT]`` runs every runnable block of ``ROOT``'s README.md and
docs/ (the ``package`` nox session does, against the installed wheel, from outside the
checkout).
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

MARKERS = ("needs real weights", "fragment")
_BLOCK = re.compile(
    r"(?:<!--\s*doc-test:\s*(?P<marker>[^>]*?)\s*-->\s*\n)?^```python\n(?P<code>.*?)^```",
    re.MULTILINE | re.DOTALL,
)
_PIP = re.compile(r"pip install ([^`&;#\n]+)")


@dataclass(frozen=True)
class Block:
    """A python code block of a page: its code, its marker (or ``None``) and its line."""

    code: str
    marker: str | None
    line: int

    @property
    def doctest(self) -> bool:
        return self.code.lstrip().startswith(">>>")

    @property
    def runs(self) -> bool:
        return self.marker is None and not self.doctest


def python_blocks(text: str) -> list[Block]:
    """The python blocks of a Markdown text, in order."""
    return [
        Block(m["code"], m["marker"], text.count("\n", 0, m.start("code")) + 1)
        for m in _BLOCK.finditer(text)
    ]


def install_commands(text: str) -> list[list[str]]:
    """The arguments of every ``pip install`` in the text (quotes removed), in order."""
    return [[a.strip("\"'") for a in m[1].split()] for m in _PIP.finditer(text)]


def pages(root: Path) -> list[Path]:
    """README.md and every Markdown page of docs/ (build output excluded)."""
    docs = root / "docs"
    found = [p for p in docs.rglob("*.md") if "_build" not in p.relative_to(docs).parts]
    return [root / "README.md", *sorted(found)]


def run_page(path: Path, root: Path) -> int:
    """Run a page's runnable blocks in order, in one namespace, from ``root``; return how many."""
    namespace: dict[str, object] = {"__name__": "__doc_block__"}
    n = 0
    old = os.getcwd()
    os.chdir(root)
    try:
        for block in python_blocks(path.read_text(encoding="utf-8")):
            if block.runs:
                exec(compile(block.code, f"{path}:{block.line}", "exec"), namespace)
                n += 1
    finally:
        os.chdir(old)
    return n


def main(argv: list[str]) -> int:
    """Run every runnable block of ``argv[0]`` (default: this checkout) from a scratch copy."""
    root = Path(argv[0] if argv else Path(__file__).resolve().parents[1]).resolve()
    os.environ.setdefault("MPLBACKEND", "Agg")
    with tempfile.TemporaryDirectory() as tmp:
        # blocks may write files (the demo's output): run where the checkout stays clean, with
        # the checkout's docs/examples reachable as the README says
        scratch = Path(tmp)
        (scratch / "docs").symlink_to(root / "docs")
        total = 0
        for page in pages(root):
            n = run_page(page, scratch)
            total += n
            if n:
                print(f"{page.relative_to(root)}: {n} block(s) ran")
    print(f"{total} python blocks ran")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
