"""Benchmark 3: peak memory of query smoothing against the input size.

NumPy: ``tracemalloc`` (NumPy reports its buffers to it) around one call of the
portable :func:`smoothguide.smooth_queries`. Torch: the torch profiler's
allocator events (``profile_memory=True``; peak of "Total Allocated" during the
call) around :func:`smoothguide.torch.smooth_queries`. The blur-matrix caches
are cleared first, so building the per-axis ``H x H`` and ``W x W`` matrices
is counted too.

The peaks are fitted by least squares to ``a * input_bytes + b * (H² + W²) + c``
(``input_bytes = tokens * dim * 4``, float32); a second fit adds a
``tokens²`` column, whose coefficient shows that nothing grows with
``tokens²`` (a dense ``tokens x tokens`` blur operator would).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import smoothguide
from smoothguide import TokenGrid
from smoothguide.smoothing import _blur_matrix_np

from .config import Config
from .methods import fast_path

__all__ = ["MEMORY_SIGMA", "Fit", "MemoryPoint", "MemoryResults", "plot_memory", "run_memory"]

#: Blur width of the memory measurement (finite: the blur matrices are built).
MEMORY_SIGMA = 3.0


@dataclass(frozen=True)
class MemoryPoint:
    """Peak bytes of one smoothing call, above the memory in use before it."""

    height: int
    width: int
    dim: int
    numpy_peak: int
    torch_peak: int | None

    @property
    def tokens(self) -> int:
        return self.height * self.width

    @property
    def input_bytes(self) -> int:
        return self.tokens * self.dim * 4

    @property
    def matrix_entries(self) -> int:
        return self.height**2 + self.width**2


@dataclass(frozen=True)
class Fit:
    """Least-squares fit ``peak ≈ sum(coef[k] * column[k])``."""

    columns: tuple[str, ...]
    coef: tuple[float, ...]
    max_rel_residual: float


@dataclass
class MemoryResults:
    """Every measured point and the fits of the NumPy and torch peaks."""

    points: list[MemoryPoint] = field(default_factory=list)
    fits: dict[str, Fit] = field(default_factory=dict)


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence the C++ profiler's start/stop lines on file descriptor 2."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _clear_caches() -> None:
    _blur_matrix_np.cache_clear()
    with contextlib.suppress(ImportError):
        from smoothguide.torch.smoothing import axis_blur_matrix

        axis_blur_matrix.cache_clear()


def numpy_peak(q: np.ndarray, grid: TokenGrid, sigma: float) -> int:
    """Peak bytes traced during ``smoothguide.smooth_queries(q, grid, sigma)`` (NumPy)."""
    _clear_caches()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        out = smoothguide.smooth_queries(q, grid, sigma)
        peak = tracemalloc.get_traced_memory()[1]
        del out
    finally:
        tracemalloc.stop()
    return peak - before


def torch_peak(q: torch.Tensor, grid: TokenGrid, sigma: float) -> int | None:
    """Peak bytes the torch allocator held during the fast-path call, above its start."""
    fn = fast_path()
    if fn is None:
        return None
    from torch.profiler import ProfilerActivity, profile

    _clear_caches()
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn(q, grid, sigma)
        del out
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        with _quiet_stderr():
            prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    finally:
        os.remove(path)
    totals = [
        (e["ts"], e["args"]["Total Allocated"], e["args"].get("Bytes", 0))
        for e in events
        if e.get("name") == "[memory]" and "Total Allocated" in e.get("args", {})
    ]
    if not totals:
        return 0
    totals.sort()
    start = totals[0][1] - totals[0][2]  # in use before the first event
    return max(t for _, t, _ in totals) - start


def fit(points: list[MemoryPoint], attr: str, *, with_tokens2: bool) -> Fit:
    """Relative least-squares fit of a peak on input bytes, H² + W², 1 (and tokens²)."""
    cols = ["input_bytes", "H^2+W^2", "1"] + (["tokens^2"] if with_tokens2 else [])
    rows = []
    ys = []
    for p in points:
        y = getattr(p, attr)
        if y is None:
            continue
        r = [p.input_bytes, p.matrix_entries, 1.0]
        if with_tokens2:
            r.append(float(p.tokens) ** 2)
        rows.append(r)
        ys.append(float(y))
    a = np.asarray(rows, dtype=np.float64)
    y = np.asarray(ys)
    # Relative least squares (each row divided by its peak), columns scaled so the
    # solve is well conditioned; coefficients are reported in bytes.
    scale = np.abs(a).max(axis=0)
    scale[scale == 0] = 1.0
    weight = 1.0 / np.maximum(y, 1.0)
    coef, *_ = np.linalg.lstsq(a / scale * weight[:, None], y * weight, rcond=None)
    coef = coef / scale
    resid = np.abs(a @ coef - y) / np.maximum(y, 1.0)
    return Fit(tuple(cols), tuple(float(c) for c in coef), float(resid.max()))


def run_memory(config: Config, *, progress: bool = True) -> MemoryResults:
    """Measure peaks at ``config.memory_grids`` and fit them."""
    from tqdm.auto import tqdm

    res = MemoryResults()
    gen = np.random.default_rng(0)
    # Warm up both paths (lazy imports, namespace caches) so they are not counted.
    warm = gen.standard_normal((1, 16, 2), dtype=np.float32)
    numpy_peak(warm, TokenGrid(4, 4), MEMORY_SIGMA)
    torch_peak(torch.from_numpy(warm), TokenGrid(4, 4), MEMORY_SIGMA)
    for h, w, d in tqdm(config.memory_grids, desc="memory", disable=not progress):
        grid = TokenGrid(h, w)
        q_np = gen.standard_normal((1, h * w, d), dtype=np.float32)
        npk = numpy_peak(q_np, grid, MEMORY_SIGMA)
        tpk = torch_peak(torch.from_numpy(q_np), grid, MEMORY_SIGMA)
        res.points.append(MemoryPoint(h, w, d, npk, tpk))
    for attr in ("numpy_peak", "torch_peak"):
        if len([p for p in res.points if getattr(p, attr) is not None]) >= 4:
            res.fits[attr] = fit(res.points, attr, with_tokens2=False)
            res.fits[attr + "+tokens2"] = fit(res.points, attr, with_tokens2=True)
    return res


def plot_memory(res: MemoryResults, path: Path) -> Path:
    """Peak bytes against input bytes (log-log), with a dense ``tokens²`` operator for scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    pts = sorted(res.points, key=lambda p: p.tokens)
    for attr, label, fmt in (
        ("numpy_peak", "portable path, NumPy (tracemalloc)", "s"),
        ("torch_peak", "torch fast path (profiler)", "o"),
    ):
        xy = [(p.input_bytes + 8 * p.matrix_entries, getattr(p, attr)) for p in pts]
        xy = [(x, y) for x, y in xy if y is not None]
        if xy:
            ax.plot(*zip(*xy, strict=True), fmt, label=label, alpha=0.8)
    xs = [p.input_bytes + 8 * p.matrix_entries for p in pts]
    ax.plot(
        xs,
        [4 * p.tokens**2 for p in pts],
        "x",
        color="C3",
        label="a dense tokens² float32 operator",
    )
    lo, hi = min(xs), max(xs)
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="y = x")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tokens·dim·4 + 8·(H² + W²)  [bytes]")
    ax.set_ylabel("peak memory of one call [bytes]")
    ax.set_title(f"query smoothing, sigma = {MEMORY_SIGMA:g}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
