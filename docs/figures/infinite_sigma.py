"""σ = ∞ is the mean query, not uniform attention.

Writes ``infinite_sigma.png``: for four query tokens (columns) of image-like queries on a
12 x 16 grid, their attention distribution over the keys, drawn on the key grid: for the
model (σ = 0), at σ = ∞ (every query token gets the same distribution
``softmax(q̄ Kᵀ / √d)``), and, for contrast, uniform attention (every weight ``1/N``),
which σ = ∞ is not.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
from _figstyle import DEFAULT_OUT, figure, save
from matplotlib.colors import PowerNorm
from query_blur import toy_queries

from smoothguide import TokenGrid, attention_logits, smooth_queries
from smoothguide.energy import softmax

OUTPUTS = ("infinite_sigma.png",)
QUERY_TOKENS = ((2, 3), (6, 8), (9, 13), (11, 1))  # (row, column) of the shown query tokens


def main(out: Path = DEFAULT_OUT) -> list[Path]:
    height, width = 12, 16
    grid = TokenGrid(height, width)
    q = 1.5 * toy_queries(height, width)
    k = 1.5 * toy_queries(height, width, seed=3)  # keys of the same tokens (self-attention)
    n = grid.num_tokens
    rows = [
        ("σ = 0", softmax(attention_logits(q, k), axis=-1)),
        ("σ = ∞", softmax(attention_logits(smooth_queries(q, grid, math.inf), k), axis=-1)),
        ("uniform", np.full((n, n), 1.0 / n)),
    ]
    shown = [r * width + c for r, c in QUERY_TOKENS]
    vmax = max(float(p[shown].max()) for _, p in rows)
    norm = PowerNorm(0.5, vmin=0.0, vmax=vmax)  # square-root colour scale: 1/N stays visible
    fig, axes = figure(len(rows), len(QUERY_TOKENS), figsize=(8.0, 5.2))
    for i, (label, p) in enumerate(rows):
        for j, (r, c) in enumerate(QUERY_TOKENS):
            ax = axes[i, j]
            im = ax.imshow(p[r * width + c].reshape(height, width), cmap="magma", norm=norm)
            if i == 0:
                ax.set_title(f"query ({r},{c})")
            if j == 0:
                ax.set_ylabel(label)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.spines[:].set_visible(True)
    fig.colorbar(im, ax=list(axes.ravel()), shrink=0.7, label="attention weight on each key")
    fig.suptitle(
        "attention of four query tokens over the 12 x 16 key grid: the model, SEG at σ = ∞\n"
        "(the same distribution for every query), and uniform attention (what σ = ∞ is not)"
    )
    return [save(fig, out, "infinite_sigma.png")]


if __name__ == "__main__":
    for p in main(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT):
        print(p)
