"""Failure-mode tags and a time limit for the reliability tests; generator of docs/reliability.md.

Every test in ``tests/test_reliability_*.py`` is tagged with
``@failure_mode(what_was_tried, what_the_library_does)``. The tag does nothing at
run time; this module reads the tags (and any ``xfail`` marks) from the test
files' source with :mod:`ast`, so the table in ``docs/reliability.md`` is built
from the test ids themselves. ``tests/test_reliability_docs.py`` fails when the
committed table differs from the generated one; regenerate it with::

    python tests/reliability_table.py
"""

from __future__ import annotations

import ast
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "reliability.md"
BEGIN = "<!-- BEGIN GENERATED TABLE (python tests/reliability_table.py) -->"
END = "<!-- END GENERATED TABLE -->"
LAYERS = {
    "core": "Core (grid, smoothing, energy) and the command line",
    "rules": "Rules and samplers",
    "torch": "Torch adapter and diffusers models",
    "demo": "Embedded demo model and weights",
    "round2_core": "Round 2 (issue 13): core, rules, numerics",
    "round2_torch": "Round 2 (issue 13): torch adapter, guided denoiser, command line",
    "round2_cli": "Round 2 (issue 13): command line and demo",
}


def failure_mode(tried: str, does: str) -> Callable[[F], F]:
    """Tag a test with the failure mode it tries and what the library does about it.

    Examples
    --------
    >>> @failure_mode("sigma = NaN", "ValueError naming sigma")
    ... def test_x() -> None: ...
    >>> test_x.failure_mode
    ('sigma = NaN', 'ValueError naming sigma')
    """

    def tag(f: F) -> F:
        f.failure_mode = (tried, does)  # type: ignore[attr-defined]
        return f

    return tag


class DeadlineExceeded(AssertionError):
    """Raised by a :func:`deadline` block that ran too long (a would-be hang)."""


class _Alarm(Exception):
    """Raised by the SIGALRM handler inside the block; turned into DeadlineExceeded."""


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Fail with :class:`DeadlineExceeded` if the block runs longer than ``seconds``.

    Uses ``SIGALRM`` (main thread, POSIX), so a pure-Python loop that would hang is
    interrupted; a long C call is interrupted when it returns.

    Examples
    --------
    >>> with deadline(5):
    ...     sum(range(10))
    45
    """

    def _raise(signum: int, frame: Any) -> None:
        raise _Alarm

    old = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    except _Alarm:
        # A fresh exception: the interrupted frame may lack line numbers, which upsets pytest.
        raise DeadlineExceeded(f"took longer than {seconds} s (a hang in a real run)") from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _string(node: ast.expr) -> str:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr | ast.BinOp):
        raise ValueError("failure_mode arguments must be plain string literals")
    raise ValueError(f"failure_mode argument is not a string literal: {ast.dump(node)}")


def _xfail_reason(decorators: list[ast.expr]) -> str | None:
    for d in decorators:
        if isinstance(d, ast.Call) and ast.unparse(d.func).endswith("mark.xfail"):
            for kw in d.keywords:
                if kw.arg == "reason":
                    return _string(kw.value)
            return "known bug"
    return None


def collect(test_dir: Path | None = None) -> list[dict[str, str]]:
    """Rows ``{layer, id, tried, does, status}`` from every tagged reliability test.

    Examples
    --------
    >>> rows = collect()
    >>> all(r["id"].startswith("tests/test_reliability_") for r in rows)
    True
    """
    test_dir = test_dir or ROOT / "tests"
    rows = []
    for path in sorted(test_dir.glob("test_reliability_*.py")):
        layer = path.stem.removeprefix("test_reliability_")
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:
            if not isinstance(node, ast.FunctionDef) or not node.name.startswith("test_"):
                continue
            for d in node.decorator_list:
                if (
                    isinstance(d, ast.Call)
                    and isinstance(d.func, ast.Name)
                    and d.func.id == "failure_mode"
                ):
                    reason = _xfail_reason(node.decorator_list)
                    rows.append(
                        {
                            "layer": layer,
                            "id": f"tests/{path.name}::{node.name}",
                            "tried": _string(d.args[0]),
                            "does": _string(d.args[1]),
                            "status": "pass" if reason is None else f"KNOWN BUG (xfail): {reason}",
                        }
                    )
    return rows


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render(rows: list[dict[str, str]] | None = None) -> str:
    """The Markdown tables, one per layer, between the BEGIN/END markers."""
    rows = collect() if rows is None else rows
    out = [BEGIN, ""]
    for layer, title in LAYERS.items():
        mine = [r for r in rows if r["layer"] == layer]
        if not mine:
            continue
        out += [
            f"### {title}",
            "",
            "| failure mode tried | what the library does | test | status |",
        ]
        out.append("|---|---|---|---|")
        for r in mine:
            cells = (r["tried"], r["does"], f"`{r['id'].split('::')[1]}`", r["status"])
            out.append("| " + " | ".join(_cell(c) for c in cells) + " |")
        out.append("")
    out.append(END)
    return "\n".join(out)


def update(doc: Path = DOC) -> bool:
    """Rewrite the generated part of ``doc``; return whether it changed."""
    text = doc.read_text(encoding="utf-8")
    start, stop = text.index(BEGIN), text.index(END) + len(END)
    new = text[:start] + render() + text[stop:]
    if new != text:
        doc.write_text(new, encoding="utf-8")
    return new != text


if __name__ == "__main__":
    changed = update()
    sys.stdout.write(f"{DOC.relative_to(ROOT)}: {'updated' if changed else 'up to date'}\n")
