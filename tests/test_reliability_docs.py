"""docs/reliability.md: its failure-mode tables are generated from the reliability tests."""

from __future__ import annotations

from pathlib import Path

from reliability_table import BEGIN, DOC, END, ROOT, collect, render


def test_the_tables_in_the_docs_are_generated_from_the_tests() -> None:
    text = DOC.read_text(encoding="utf-8")
    table = text[text.index(BEGIN) : text.index(END) + len(END)]
    assert table == render(), "regenerate with: python tests/reliability_table.py"


def test_every_reliability_test_file_contributes_rows() -> None:
    rows = collect()
    layers = {r["layer"] for r in rows}
    files = {
        p.stem.removeprefix("test_reliability_") for p in ROOT.glob("tests/test_reliability_*.py")
    }
    assert files - {"docs"} <= layers
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids))  # one tag per test


def test_tags_are_read_from_source_not_guessed(tmp_path: Path) -> None:
    (tmp_path / "test_reliability_core.py").write_text(
        "import pytest\n"
        "@failure_mode('tried', 'does')\n"
        "def test_a(): pass\n"
        "@failure_mode('bug', 'should')\n"
        "@pytest.mark.xfail(strict=True, reason='R1: broken')\n"
        "def test_b(): pass\n"
        "def test_untagged(): pass\n"
    )
    rows = collect(tmp_path)
    assert [(r["id"].split("::")[1], r["status"]) for r in rows] == [
        ("test_a", "pass"),
        ("test_b", "KNOWN BUG (xfail): R1: broken"),
    ]
    assert "| tried | does | `test_a` | pass |" in render(rows)
