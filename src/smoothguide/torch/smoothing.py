"""Torch fast path for query smoothing: same contract as :func:`smoothguide.smooth_queries`.

The portable core blurs each grid axis with a dense ``n x n`` matrix
(:func:`smoothguide.blur_matrix`). Here the same per-axis operators run on torch
tensors with two kernels, picked per axis:

``"matmul"``
    ``M @ x`` with the cached blur matrix of the axis (boundary mode and any
    radius folded into ``M``): one batched GEMM per axis.
``"shift"``
    A separable shift-and-add: the axis is padded once by index gathering with
    the boundary rule, then ``sum_k w[k] * x_pad[k : k + n]``; ``2r + 1``
    fused multiply-adds per element instead of ``n``. Only used when the kernel
    is narrower than the axis (``2r + 1 < n``).

``method="auto"`` chooses ``"matmul"``: it was faster than ``"shift"`` (and than a
depthwise ``conv1d``) on every SDXL shape and finite sigma measured (see
``docs/torch.md``). ``sigma = inf`` is
the exact mean along the axis (no matrix at all). 16-bit inputs are
accumulated in float32 and returned in their own dtype.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import numpy as np

from .._array import Array
from ..grid import TokenGrid
from ..smoothing import (
    Mode,
    _blur_nonfinite,
    _check_mode,
    _check_radius,
    _check_sigma,
    _fold,
    _per_axis_sigma,
    _support_np,
    blur_matrix,
    default_radius,
    gaussian_kernel1d,
)
from ._deps import torch

__all__ = ["METHODS", "Method", "axis_blur_matrix", "smooth_queries"]

Method = Literal["auto", "matmul", "shift"]
#: Accepted values of ``method``.
METHODS: tuple[str, ...] = ("auto", "matmul", "shift")


@functools.lru_cache(maxsize=256)
def axis_blur_matrix(
    n: int, sigma: float, radius: int | None, mode: str, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Cached ``n x n`` blur matrix on ``device`` in ``dtype``, see :func:`smoothguide.blur_matrix`.

    Parameters
    ----------
    n, sigma, radius, mode
        As in :func:`smoothguide.blur_matrix`.
    dtype, device
        Torch dtype and device of the result.

    Returns
    -------
    torch.Tensor
        Shape ``(n, n)``; treat it as read-only (it is shared through the cache).

    Examples
    --------
    >>> m = axis_blur_matrix(4, 1.0, None, "reflect", torch.float64, torch.device("cpu"))
    >>> tuple(m.shape), bool(torch.allclose(m.sum(0), torch.ones(4, dtype=torch.float64)))
    ((4, 4), True)
    """
    m = blur_matrix(n, sigma, radius=radius, mode=mode)  # type: ignore[arg-type]
    # Built outside inference mode: the cache is shared by every later call, and an
    # inference tensor cannot be saved for backward (autograd use would then fail).
    # A normal tensor is usable inside inference mode too.
    with torch.inference_mode(False):
        return torch.tensor(m, dtype=dtype, device=device)


@functools.lru_cache(maxsize=256)
def _shift_plan(
    n: int, sigma: float, radius: int, mode: str, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, tuple[float, ...]]:
    """Gather indices of the padded axis and the kernel taps for the shift-and-add kernel."""
    index = _fold(np.arange(-radius, n + radius), n, mode)
    taps = tuple(float(w) for w in gaussian_kernel1d(sigma, radius=radius))
    with torch.inference_mode(False):  # shared by every later call: see axis_blur_matrix
        return torch.tensor(index, dtype=torch.long, device=device), taps


def _xp() -> object:
    import array_api_compat.torch as xp

    return xp


def _choose(n: int, radius: int, method: str) -> str:
    # Measured on SDXL shapes (docs/torch.md, benchmarks/torch_smoothing.py): the
    # GEMM beat shift-and-add for every finite sigma, also sigma = 1 on 64-token axes.
    return "matmul" if method == "auto" else method


def _blur_axis(
    x: torch.Tensor,
    axis: int,
    sigma: float,
    radius: int | None,
    mode: str,
    method: str,
    finite: bool = True,
) -> torch.Tensor:
    """Blur ``x`` along ``axis`` (negative); ``x`` has the working dtype already.

    ``finite=False``: ``x`` may hold NaN / inf; both methods then take
    ``smoothguide.smoothing._blur_nonfinite`` (SciPy's semantics).
    """
    n = x.shape[axis]
    if sigma == 0.0 or n == 1:
        return x
    if math.isinf(sigma):
        return x.mean(dim=axis, keepdim=True)  # broadcast back by the caller
    r = default_radius(sigma) if radius is None else radius
    # Non-finite input: not the shift kernel, whose taps rounded to x's dtype may
    # underflow to 0 where SciPy's float64 taps do not (0 * inf = NaN vs inf).
    if finite and _choose(n, r, method) == "shift" and 2 * r + 1 < n:
        index, taps = _shift_plan(n, sigma, r, mode, x.dtype, x.device)
        padded = x.index_select(axis, index)
        out = padded.narrow(axis, 0, n) * taps[0]
        for k in range(1, len(taps)):
            out.add_(padded.narrow(axis, k, n), alpha=taps[k])
        return out
    m = axis_blur_matrix(n, sigma, radius, mode, x.dtype, x.device)
    if not finite:
        support = torch.tensor(_support_np(n, sigma, r, mode), dtype=x.dtype, device=x.device)
        return _blur_nonfinite(_xp(), x, axis, m, support)
    shape = x.shape
    lead, trail = shape[: len(shape) + axis], shape[len(shape) + axis + 1 :]
    flat = x.reshape(*lead, n, math.prod(trail))
    return torch.matmul(m, flat).reshape(shape)


def smooth_queries(
    q: Array,
    grid: TokenGrid,
    sigma: float | tuple[float, ...],
    *,
    radius: int | None = None,
    mode: Mode = "reflect",
    method: Method = "auto",
) -> torch.Tensor:
    """Gaussian-blur torch queries on the token grid (fast :func:`smoothguide.smooth_queries`).

    Same arguments, semantics and result as the portable function (Hong 2024,
    Eq. 6-8: blurring queries equals blurring every key's logit map), for torch
    tensors, with a per-axis kernel choice.

    Parameters
    ----------
    q
        Torch tensor of shape ``(..., tokens, dim)`` with ``tokens == grid.num_tokens``.
    grid
        Layout of the token axis; prefix and suffix tokens are returned unchanged.
    sigma
        A number (height and width), ``(σ_h, σ_w)`` or ``(σ_t, σ_h, σ_w)``;
        ``0`` leaves an axis alone, ``math.inf`` replaces it by its mean.
    radius
        Kernel radius of every blurred axis; default :func:`smoothguide.default_radius`.
    mode
        Boundary mode (``"reflect"``, ``"mirror"``, ``"nearest"``, ``"wrap"``).
    method
        ``"auto"`` (default), ``"matmul"`` or ``"shift"`` (see the module docs).

    Returns
    -------
    torch.Tensor
        Same shape, dtype and device as ``q``; float16/bfloat16 are accumulated in
        float32. With ``sigma = inf`` on every blurred axis the result may be a
        broadcast (stride-0) view: call ``.contiguous()`` before writing to it in place.

    Examples
    --------
    >>> q = torch.arange(12.0).reshape(6, 2)        # a 2 x 3 grid, 2 channels
    >>> smooth_queries(q, TokenGrid(2, 3), float("inf"))[:, 0]
    tensor([5., 5., 5., 5., 5., 5.])
    >>> bool(torch.equal(smooth_queries(q, TokenGrid(2, 3), 0.0), q))
    True
    """
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"q must be a torch.Tensor, got {type(q).__name__}")
    if not isinstance(grid, TokenGrid):
        raise TypeError(f"grid must be a TokenGrid, got {type(grid).__name__}")
    if not q.is_floating_point():
        raise TypeError(
            "q must have a real floating dtype (float16, bfloat16, float32, float64), "
            f"got {q.dtype}"
        )
    if q.ndim < 2 or q.shape[-2] != grid.num_tokens:
        raise ValueError(
            f"q must have shape (..., tokens, dim) with tokens == grid.num_tokens="
            f"{grid.num_tokens} ({grid}), got shape {tuple(q.shape)}"
        )
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    sigmas = _per_axis_sigma(_check_sigma(sigma))
    _check_mode(mode)
    radius = _check_radius(radius)
    if all(s == 0.0 for s in sigmas):
        return q
    dtype = q.dtype
    work = q.float() if torch.finfo(dtype).bits < 32 else q
    lead, dim = q.shape[:-2], q.shape[-1]
    shape = (*lead, *grid.shape, dim)
    x = work[..., grid.spatial_slice, :].reshape(shape)
    # Averaged (sigma = inf) axes first, in ONE reduction (a strided single-axis mean is
    # slow), and kept of length 1 until the end, so the finite axes blur a smaller
    # tensor. The mean commutes with the other axes' blurs (separable linear maps).
    means = tuple(a for a, s in zip((-4, -3, -2), sigmas, strict=True) if math.isinf(s))
    if means:
        x = x.mean(dim=means, keepdim=True)
    # One check per call: the dense product would spread a NaN / inf over its whole
    # axis, SciPy keeps it within the kernel. A sum is non-finite iff an entry is (or
    # the sum overflows: then the exact path runs needlessly); it costs ~1.5% of the
    # blur on SDXL shapes, where `isfinite(x).all()` cost 20%.
    # Meta tensors (FLOP counting, tracing) hold no values: count the dense path.
    finite = x.device.type == "meta" or bool(torch.isfinite(x.detach().sum()))
    for axis, s in zip((-4, -3, -2), sigmas, strict=True):
        if not math.isinf(s):
            x = _blur_axis(x, axis, s, radius, mode, method, finite)
    x = x.expand(shape).reshape(*lead, grid.spatial_tokens, dim)
    if grid.prefix or grid.suffix:
        x = torch.cat(
            [work[..., : grid.prefix, :], x, work[..., grid.prefix + grid.spatial_tokens :, :]],
            dim=-2,
        )
    return x.to(dtype)
