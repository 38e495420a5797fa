"""Energy, query variance and curvature of random queries against σ.

Writes ``energy_vs_sigma.png`` from :func:`smoothguide.energy_report.energy_table`
(the numbers ``smoothguide energy`` prints): for each boundary mode, the mean
query variance (Lemma 3.1), the mean energy ``E'(a) = -lse(a)`` over keys
(Lemma 3.2: energy goes up) and the mean spectral norm of the exact curvature
``Bᵀ ∇²E'(B a) B`` (Thm. 3.1: goes down here), with σ = ∞ drawn at the right edge.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
from _figstyle import DEFAULT_OUT, figure, save

from smoothguide.energy_report import energy_table

OUTPUTS = ("energy_vs_sigma.png",)
SIGMAS = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, math.inf)
GRID = {"height": 8, "width": 12, "dim": 16, "keys": 12}
MODES = ("reflect", "wrap", "mirror")
FLOOR = 1e-9


def main(out: Path = DEFAULT_OUT) -> list[Path]:
    finite = [s for s in SIGMAS if math.isfinite(s)]
    x_inf = finite[-1] * 1.6
    xs = np.array([s if math.isfinite(s) else x_inf for s in SIGMAS])
    fig, axes = figure(1, 3, figsize=(11.0, 3.0))
    keys = (
        ("query_variance", "mean query variance\n(Lemma 3.1: non-increasing)"),
        ("energy", "mean energy E'(a) = −lse(a) over keys\n(Lemma 3.2: non-decreasing)"),
        ("curvature", "mean spectral norm of Bᵀ ∇²E'(Ba) B\n(Thm. 3.1: decreasing here)"),
    )
    for mode, style in zip(MODES, ("o-", "s--", "^:"), strict=True):
        rows = energy_table(sigmas=SIGMAS, mode=mode, **GRID)
        for ax, (key, title) in zip(axes, keys, strict=True):
            ys = np.array([r[key] for r in rows])
            if key != "energy":
                ys = np.maximum(ys, FLOOR)  # log axis: exact zeros (σ = ∞) drawn at the floor
            ax.plot(xs, ys, style, ms=3, lw=1, label=f"mode={mode!r}")
            ax.set_title(title)
    for ax in axes:
        ax.set_xscale("symlog", linthresh=0.5)
        ticks = [0, 0.5, 1, 2, 4, 8, 16, x_inf]
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks[:-1]] + ["∞"])
        ax.set_xlabel("σ (tokens)")
    for ax in (axes[0], axes[2]):
        ax.set_yscale("log")
        ax.set_ylim(FLOOR / 3, None)
    axes[0].legend(frameon=False)
    fig.suptitle(
        "energy_table(height=8, width=12, dim=16, keys=12): queries with a smooth part plus noise"
    )
    fig.tight_layout()
    return [save(fig, out, "energy_vs_sigma.png")]


if __name__ == "__main__":
    for p in main(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT):
        print(p)
