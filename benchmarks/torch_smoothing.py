"""Time the torch query-smoothing kernels on SDXL attention shapes.

Run: ``python benchmarks/torch_smoothing.py [--threads N] [--repeat R] [--device cpu|cuda]``.
Prints one line per (shape, sigma): median milliseconds of the portable core
(``smoothguide.smooth_queries`` on torch tensors), the per-axis ``matmul`` and
``shift`` kernels of ``smoothguide.torch.smooth_queries``, a depthwise
``conv1d`` variant, and what ``method="auto"`` picks.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from functools import partial

import torch
import torch.nn.functional as F

import smoothguide
from smoothguide import TokenGrid
from smoothguide.smoothing import _fold
from smoothguide.torch import smooth_queries
from smoothguide.torch.smoothing import _choose

SHAPES = [((2, 10, 64, 64), 64), ((2, 20, 32, 32), 64), ((2, 10, 48, 80), 64)]
SIGMAS = [1.0, 3.0, 10.0, math.inf]


def conv1d_blur(q: torch.Tensor, grid: TokenGrid, sigma: float) -> torch.Tensor:
    """Separable depthwise conv1d with gather padding (SciPy reflect), for comparison."""
    lead, d = q.shape[:-2], q.shape[-1]
    x = q.reshape(*lead, grid.height, grid.width, d)
    if math.isinf(sigma):
        return x.mean(dim=(-3, -2), keepdim=True).expand(x.shape).reshape(q.shape)
    w = torch.as_tensor(smoothguide.gaussian_kernel1d(sigma), dtype=q.dtype)
    r = (len(w) - 1) // 2
    for axis in (-3, -2):
        n = x.shape[axis]
        idx = torch.as_tensor(_fold(torch.arange(-r, n + r).numpy(), n, "reflect"))
        moved = x.movedim(axis, -1).index_select(-1, idx)
        shp = moved.shape
        y = F.conv1d(moved.reshape(-1, 1, shp[-1]), w.view(1, 1, -1)).reshape(*shp[:-1], n)
        x = y.movedim(-1, axis)
    return x.reshape(q.shape)


def timeit(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}")
    print("shape                 sigma   core_ms  matmul_ms  shift_ms  conv1d_ms  auto   core/auto")
    for (b, h, gh, gw), d in SHAPES:
        grid = TokenGrid(gh, gw)
        q = torch.randn(b, h, gh * gw, d, device=args.device)
        for sigma in SIGMAS:
            t_core = timeit(partial(smoothguide.smooth_queries, q, grid, sigma), args.repeat)
            t_mm = timeit(partial(smooth_queries, q, grid, sigma, method="matmul"), args.repeat)
            t_sh = timeit(partial(smooth_queries, q, grid, sigma, method="shift"), args.repeat)
            t_cv = (
                timeit(partial(conv1d_blur, q, grid, sigma), args.repeat)
                if args.device == "cpu"
                else float("nan")
            )
            t_auto = min(t_mm, t_sh)
            if not math.isinf(sigma):
                r = smoothguide.default_radius(sigma)
                picks = {_choose(gh, r, "auto"), _choose(gw, r, "auto")}
                t_auto = timeit(partial(smooth_queries, q, grid, sigma), args.repeat)
            else:
                picks = {"mean"}
            print(
                f"{(b, h, gh * gw, d)!s:20} {sigma:6} {t_core:9.1f} {t_mm:10.1f} {t_sh:9.1f} "
                f"{t_cv:10.1f}  {'+'.join(sorted(picks)):6} {t_core / t_auto:6.2f}x"
            )


if __name__ == "__main__":
    main()
