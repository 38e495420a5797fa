"""Benchmark 4: smoothing time as the token grid grows, with the official conv alongside."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .config import Config
from .methods import Case, NotApplicable, fast_path
from .methods import _clone as clone_method
from .methods import _official as official_method
from .methods import _ours as ours_method
from .methods import _portable_numpy as portable_numpy_method
from .methods import _scipy as scipy_method
from .timing import Timing, measure_interleaved

__all__ = ["SCALING_METHODS", "ScalingResults", "plot_scaling", "run_scaling"]

#: key -> (label, prepare) of the methods on the scaling plot.
SCALING_METHODS = {
    "ours": ("smoothguide torch fast path", ours_method),
    "portable_numpy": ("smoothguide portable path, NumPy", portable_numpy_method),
    "official": ("official SEG-SDXL conv2d", official_method),
    "scipy": ("scipy.ndimage.gaussian_filter", scipy_method),
    "clone": ("q.clone() (memory floor)", clone_method),
}


@dataclass
class ScalingResults:
    """``times[(sigma, side)][key]``: timing of method ``key`` on a ``side x side`` grid."""

    lead: tuple[int, int]
    dim: int
    times: dict[tuple[float, int], dict[str, Timing]] = field(default_factory=dict)
    skipped: dict[tuple[float, int], dict[str, str]] = field(default_factory=dict)

    @property
    def sigmas(self) -> list[float]:
        return sorted({s for s, _ in self.times})

    @property
    def sides(self) -> list[int]:
        return sorted({n for _, n in self.times})


def run_scaling(config: Config, *, progress: bool = True) -> ScalingResults:
    """Time the scaling methods on square grids ``config.scaling_grids``."""
    from tqdm.auto import tqdm

    b, h = config.scaling_lead
    dim = 64 if config.name != "tiny" else 4
    res = ScalingResults((b, h), dim)
    plan = [(s, n) for s in config.scaling_sigmas for n in config.scaling_grids]
    for sigma, n in tqdm(plan, desc="scaling", disable=not progress):
        case = Case(b, h, n, n, dim, sigma)
        fns = {}
        skipped = {}
        for key, (_, prepare) in SCALING_METHODS.items():
            if key == "ours" and fast_path() is None:
                skipped[key] = "smoothguide.torch is not installed"
                continue
            try:
                fns[key] = prepare(case)
            except NotApplicable as exc:
                skipped[key] = str(exc)
        res.times[(sigma, n)] = measure_interleaved(
            fns, repeat=config.repeat, budget_s=config.budget_s, min_repeat=config.min_repeat
        )
        res.skipped[(sigma, n)] = skipped
    return res


def plot_scaling(res: ScalingResults, path: Path) -> Path:
    """Log-log plot of median time against tokens, one panel per sigma; returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sigmas = res.sigmas
    fig, axes = plt.subplots(1, len(sigmas), figsize=(5.2 * len(sigmas), 4.2), squeeze=False)
    styles = {
        "ours": ("C0", "o-"),
        "portable_numpy": ("C2", "s--"),
        "official": ("C3", "^-"),
        "scipy": ("C1", "d:"),
        "clone": ("0.5", "x-."),
    }
    for ax, sigma in zip(axes[0], sigmas, strict=True):
        for key, (label, _) in SCALING_METHODS.items():
            pts = [
                (n * n, res.times[(sigma, n)][key].median * 1e3)
                for n in res.sides
                if key in res.times.get((sigma, n), {})
            ]
            if not pts:
                continue
            color, fmt = styles[key]
            ax.plot(*zip(*pts, strict=True), fmt, color=color, label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("tokens (square grid side²)")
        ax.set_ylabel("median time [ms]")
        b, h = res.lead
        ax.set_title(f"sigma = {sigma:g}, queries ({b}, {h}, tokens, {res.dim}) float32")
        ax.set_xticks([n * n for n in res.sides])
        ax.set_xticklabels([f"{n}²" for n in res.sides])
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
