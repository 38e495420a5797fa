"""The ``smoothguide`` command line."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from smoothguide.cli import main
from smoothguide.energy_report import energy_table


def test_energy_command_prints_a_row_per_sigma(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["energy", "--height", "4", "--width", "6", "--sigmas", "0", "2", "inf"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("| sigma |")
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["0", "2", "inf"]


def test_energy_table_follows_the_lemmas() -> None:
    rows = energy_table(height=6, width=8, dim=4, sigmas=(0.0, 1.0, 3.0, math.inf), keys=5)
    var = [r["query_variance"] for r in rows]
    energy = [r["energy"] for r in rows]
    assert var == sorted(var, reverse=True)  # Lemma 3.1 (reflect)
    assert energy == sorted(energy)  # Lemma 3.2: lse down, energy up
    assert rows[-1]["query_variance"] < 1e-20


def test_bad_sigma_is_rejected() -> None:
    with pytest.raises(SystemExit):
        main(["energy", "--sigmas", "-1"])


def test_module_entry_point() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "smoothguide", "--help"], capture_output=True, text=True, check=True
    )
    assert "energy" in out.stdout
    assert "demo" in out.stdout
