"""Gaussian kernels and the blur matrix of each boundary mode.

Writes ``kernels.png`` (the taps of :func:`smoothguide.gaussian_kernel1d` with the
official radius rule) and ``blur_matrices.png`` (the ``n x n`` matrices of
:func:`smoothguide.blur_matrix` for ``reflect``, ``mirror``, ``nearest`` and ``wrap``,
with their column sums: 1 everywhere means the mean is kept exactly).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from _figstyle import DEFAULT_OUT, figure, save

from smoothguide import blur_matrix, default_radius, gaussian_kernel1d
from smoothguide.smoothing import MODES

OUTPUTS = ("kernels.png", "blur_matrices.png")


def kernels(out: Path) -> Path:
    fig, ax = figure(figsize=(6.4, 2.6))
    for sigma in (0.5, 1.0, 2.0, 4.0):
        r = default_radius(sigma)
        w = gaussian_kernel1d(sigma)
        ax.plot(np.arange(-r, r + 1), w, "o-", ms=3, lw=1, label=f"σ={sigma:g}: radius {r}")
    ax.set_xlabel("tap offset k (tokens)")
    ax.set_ylabel("weight w[k]")
    ax.set_title("gaussian_kernel1d(σ): normalised taps, radius = default_radius(σ) ≈ 3σ")
    ax.legend(frameon=False)
    return save(fig, out, "kernels.png")


def matrices(out: Path, n: int = 12, sigma: float = 2.0) -> Path:
    fig, axes = figure(2, len(MODES), figsize=(10.0, 4.6), height_ratios=(3, 1.3))
    vmax = max(float(blur_matrix(n, sigma, mode=m).max()) for m in MODES)
    for j, mode in enumerate(MODES):
        m = blur_matrix(n, sigma, mode=mode)
        ax = axes[0, j]
        ax.imshow(m, cmap="magma", vmin=0, vmax=vmax)
        sym = "symmetric" if np.allclose(m, m.T) else "not symmetric"
        ax.set_title(f'mode="{mode}"\n{sym}')
        ax.set_xticks([0, n - 1])
        ax.set_yticks([0, n - 1])
        ax.set_xlabel("source token j")
        if j == 0:
            ax.set_ylabel("output token i")
        col = m.sum(axis=0)
        ax = axes[1, j]
        ax.bar(np.arange(n), col - 1.0, color=["C3" if abs(c - 1) > 1e-12 else "C2" for c in col])
        ax.axhline(0.0, color="k", lw=0.6)
        ax.set_ylim(-0.6, 0.6)
        ax.set_xlabel("column j")
        if j == 0:
            ax.set_ylabel("column sum − 1")
        ax.text(0.02, 0.9, f"max |dev| = {np.abs(col - 1).max():.3f}", transform=ax.transAxes)
    fig.suptitle(f"blur_matrix(n={n}, σ={sigma:g}, mode=...): row i = weights of output token i")
    fig.tight_layout()
    return save(fig, out, "blur_matrices.png")


def main(out: Path = DEFAULT_OUT) -> list[Path]:
    return [kernels(out), matrices(out)]


if __name__ == "__main__":
    for p in main(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT):
        print(p)
