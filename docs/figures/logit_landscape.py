"""An attention-logit landscape before and after the SEG blur.

Writes ``logit_landscape.png``: one key's logit map ``a = Q k / √d`` over the
query positions of a 24 x 36 grid, as a surface at σ = 0, 1, 3 (blurring the
queries, Prop. 3.1), and the Boltzmann distribution ``softmax(a)`` over query
positions along the middle row: the distribution whose log-partition function is
the energy ``E'(a) = -lse(a)``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from _figstyle import DEFAULT_OUT, STYLE, save
from query_blur import toy_queries

from smoothguide import TokenGrid, attention_logits, lse_energy, smooth_queries
from smoothguide.energy import softmax

OUTPUTS = ("logit_landscape.png",)
SIGMAS = (0.0, 1.0, 3.0)


def main(out: Path = DEFAULT_OUT) -> list[Path]:
    import matplotlib as mpl
    import matplotlib.pyplot as plt

    height, width = 24, 36
    grid = TokenGrid(height, width)
    q = toy_queries(height, width)
    k = np.random.default_rng(1).normal(size=(1, q.shape[1]))
    k[0, 0] = 2.0
    yy, xx = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    with mpl.rc_context(STYLE):
        fig = plt.figure(figsize=(11.0, 3.4))
        maps = [attention_logits(smooth_queries(q, grid, s), k)[:, 0] for s in SIGMAS]
        lo, hi = min(m.min() for m in maps), max(m.max() for m in maps)
        for j, (sigma, a) in enumerate(zip(SIGMAS, maps, strict=True)):
            ax = fig.add_subplot(1, len(SIGMAS) + 1, j + 1, projection="3d")
            z = a.reshape(height, width)
            ax.plot_surface(xx, yy, z, cmap="viridis", vmin=lo, vmax=hi, linewidth=0)
            ax.set_zlim(lo, hi)
            ax.set_title(f"σ = {sigma:g}: E'(a) = {float(lse_energy(a)):.3f}")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.view_init(elev=35, azim=-60)
        ax = fig.add_subplot(1, len(SIGMAS) + 1, len(SIGMAS) + 1)
        for sigma, a in zip(SIGMAS, maps, strict=True):
            p = softmax(a).reshape(height, width)
            ax.plot(np.arange(width), p[height // 2], lw=1.2, label=f"σ = {sigma:g}")
        ax.set_xlabel("column (middle row)")
        ax.set_title("softmax(a) over query positions")
        ax.legend(frameon=False)
        fig.suptitle("one key's logit landscape a = (B Q) k / √d over the 24 x 36 query grid")
        fig.tight_layout()
    return [save(fig, out, "logit_landscape.png")]


if __name__ == "__main__":
    for p in main(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT):
        print(p)
