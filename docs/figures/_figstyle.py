"""Shared plotting helpers of the figure scripts (matplotlib, Agg backend, no network)."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("MPLBACKEND", "Agg")

import matplotlib as mpl

mpl.use("Agg")

import matplotlib.pyplot as plt

DEFAULT_OUT = Path(__file__).resolve().parent / "_generated"

STYLE = {
    "figure.dpi": 110,
    "savefig.dpi": 110,
    "font.size": 9,
    "axes.titlesize": 9,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
}


def figure(*args: object, **kwargs: object) -> tuple[plt.Figure, object]:
    """``plt.subplots`` under the shared style."""
    with mpl.rc_context(STYLE):
        return plt.subplots(*args, **kwargs)  # type: ignore[arg-type]


def save(fig: plt.Figure, out: Path, name: str) -> Path:
    """Save ``fig`` as ``out/name`` (PNG, no timestamp metadata) and close it."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    with mpl.rc_context(STYLE):
        fig.savefig(path, metadata={"Software": None}, bbox_inches="tight")
    plt.close(fig)
    return path
