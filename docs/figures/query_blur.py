"""A query map before and after the SEG blur, at several σ, on a non-square grid.

Writes ``query_blur.png``: top row, one channel of the queries of a 24 x 36 token
grid blurred by :func:`smoothguide.smooth_queries` at σ = 0, 1, 2, 5, ∞; bottom row,
one key's logit map ``smooth_queries(Q) k`` over the query positions, which by
Prop. 3.1 is the blurred logit map.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
from _figstyle import DEFAULT_OUT, figure, save

from smoothguide import TokenGrid, attention_logits, smooth_queries

OUTPUTS = ("query_blur.png",)
SIGMAS = (0.0, 1.0, 2.0, 5.0, math.inf)


def toy_queries(height: int = 24, width: int = 36, dim: int = 8, seed: int = 0) -> np.ndarray:
    """Image-like queries: a ring and a bar projected to ``dim`` channels, plus noise."""
    rng = np.random.default_rng(seed)
    y, x = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    ring = np.exp(-((np.hypot(y - 11.5, x - 12.0) - 7.0) ** 2) / 4.0)
    bar = ((np.abs(x - 28) < 2.5) & (np.abs(y - 12) < 9)).astype(float)
    feats = np.stack([ring, bar, np.ones_like(ring)], axis=-1).reshape(-1, 3)
    proj = rng.normal(size=(3, dim))
    proj[:, 0] = (2.0, -1.5, 0.3)
    return feats @ proj + 0.6 * rng.normal(size=(height * width, dim))


def main(out: Path = DEFAULT_OUT) -> list[Path]:
    height, width = 24, 36
    grid = TokenGrid(height, width)
    q = toy_queries(height, width)
    k = np.random.default_rng(1).normal(size=(1, q.shape[1]))
    k[0, 0] = 2.0
    fig, axes = figure(2, len(SIGMAS), figsize=(11.0, 3.9))
    qlim = np.abs(q[:, 0]).max()
    logit0 = attention_logits(q, k)[:, 0]
    alim = np.abs(logit0).max()
    for j, sigma in enumerate(SIGMAS):
        bq = smooth_queries(q, grid, sigma)
        a = attention_logits(bq, k)[:, 0]
        axes[0, j].imshow(bq[:, 0].reshape(height, width), cmap="RdBu_r", vmin=-qlim, vmax=qlim)
        axes[1, j].imshow(a.reshape(height, width), cmap="PuOr_r", vmin=-alim, vmax=alim)
        label = "σ = ∞ (mean query)" if math.isinf(sigma) else f"σ = {sigma:g}"
        axes[0, j].set_title(f"{label}\nvar {bq[:, 0].var():.3f}")
        axes[1, j].set_title(f"logit var {a.var():.3f}")
        for ax in axes[:, j]:
            ax.set_xticks([])
            ax.set_yticks([])
            ax.spines[:].set_visible(True)
    axes[0, 0].set_ylabel("query channel 0")
    axes[1, 0].set_ylabel("one key's logits\n(B Q) k / √d")
    fig.suptitle(f"smooth_queries(Q, TokenGrid({height}, {width}), σ), mode='reflect'")
    fig.tight_layout()
    return [save(fig, out, "query_blur.png")]


if __name__ == "__main__":
    for p in main(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT):
        print(p)
