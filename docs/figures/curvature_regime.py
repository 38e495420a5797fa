"""Where the curvature claim (Thm. 3.1) holds, and where the paper's proxy does.

Writes ``curvature_regime.png``. Left: the share of random 8 x 8 logit maps (100
draws per point, reflect mode) whose exact curvature went down, i.e. the spectral
norm of ``Bᵀ ∇²E'(B a) B`` is at most that of ``∇²E'(a)``, against the logit
spread. Right: the share for which the paper's diagonal-approximation claim
``prod_i softmax(B a)_i b_ii < prod_i softmax(a)_i`` holds.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from _figstyle import DEFAULT_OUT, figure, save

from smoothguide import (
    blur_matrix,
    diagonal_curvature_logdet,
    lse_energy_hessian,
    smoothed_energy_hessian,
)

OUTPUTS = ("curvature_regime.png",)
SPREADS = (0.3, 1.0, 2.0, 3.0, 4.0, 6.0)
SIGMAS = (0.5, 1.0, 2.0, 5.0)
DRAWS = 100


def spectral_norm(m: np.ndarray) -> float:
    return float(np.abs(np.linalg.eigvalsh(m)).max())


def shares(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(exact, proxy)``: arrays of shape ``(len(SIGMAS), len(SPREADS))``."""
    rng = np.random.default_rng(seed)
    exact = np.zeros((len(SIGMAS), len(SPREADS)))
    proxy = np.zeros_like(exact)
    for j, spread in enumerate(SPREADS):
        draws = rng.normal(size=(DRAWS, 64)) * spread
        base = [spectral_norm(lse_energy_hessian(a)) for a in draws]
        base_proxy = diagonal_curvature_logdet(draws)
        for i, sigma in enumerate(SIGMAS):
            m = blur_matrix(8, sigma)
            b = np.kron(m, m)
            smooth = [spectral_norm(smoothed_energy_hessian(a, b)) for a in draws]
            exact[i, j] = np.mean(np.array(smooth) <= np.array(base))
            proxy[i, j] = np.mean(diagonal_curvature_logdet(draws, b) < base_proxy)
    return exact, proxy


def main(out: Path = DEFAULT_OUT) -> list[Path]:
    exact, proxy = shares()
    fig, axes = figure(1, 2, figsize=(9.0, 3.0), sharey=True)
    for i, sigma in enumerate(SIGMAS):
        axes[0].plot(SPREADS, 100 * exact[i], "o-", ms=3, lw=1, label=f"σ = {sigma:g}")
        axes[1].plot(SPREADS, 100 * proxy[i], "o-", ms=3, lw=1, label=f"σ = {sigma:g}")
    axes[0].set_title("exact: ‖Bᵀ∇²E'(Ba)B‖₂ ≤ ‖∇²E'(a)‖₂")
    axes[1].set_title("paper's proxy: Π softmax(Ba)ᵢ bᵢᵢ < Π softmax(a)ᵢ")
    axes[0].set_ylabel(f"% of {DRAWS} random 8x8 logit maps")
    for ax in axes:
        ax.set_xlabel("logit standard deviation")
        ax.set_ylim(-3, 103)
    axes[1].legend(frameon=False)
    fig.tight_layout()
    return [save(fig, out, "curvature_regime.png")]


def report() -> str:
    """The measured shares as a Markdown table (printed when run as a script)."""
    exact, proxy = shares()
    head = "| σ | " + " | ".join(f"std {s:g}" for s in SPREADS) + " |"
    lines = [head, "|---" * (len(SPREADS) + 1) + "|"]
    for name, tab in (("exact", exact), ("proxy", proxy)):
        for i, sigma in enumerate(SIGMAS):
            cells = " | ".join(f"{100 * v:.0f}%" for v in tab[i])
            lines.append(f"| {name} σ={sigma:g} | {cells} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
    for p in main(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT):
        print(p)
