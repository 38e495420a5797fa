"""The query-smoothing methods under comparison, each a callable on one benchmark case.

Every method gets the same queries (values) in the layout it was written for:
smoothguide and SciPy the contiguous ``(B, heads, N, d)`` tensor / array, the
official SEG-SDXL code the diffusers layout its ``view`` needs
(:func:`benchmarks.official.diffusers_layout`). ``prepare(case)`` returns a
zero-argument callable (what is timed) or raises :class:`NotApplicable` with
the reason, which the report prints instead of a time.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import smoothguide
from smoothguide import TokenGrid

from .official import diffusers_layout, official_blur, official_kernel_size, official_style_blur

__all__ = [
    "METHODS",
    "Case",
    "Method",
    "NotApplicable",
    "as_float64",
    "differences",
    "fast_path",
]


class NotApplicable(Exception):
    """A method cannot run on a case; the message says why."""


def fast_path() -> Callable[..., torch.Tensor] | None:
    """``smoothguide.torch.smooth_queries`` when the torch adapter is installed, else ``None``."""
    if importlib.util.find_spec("smoothguide.torch") is None:
        return None
    try:
        from smoothguide.torch import smooth_queries
    except ImportError:
        return None
    return smooth_queries


@dataclass
class Case:
    """One (shape, sigma) of the smoothing benchmark, with the inputs every method needs."""

    batch: int
    heads: int
    height: int
    width: int
    dim: int
    sigma: float
    seed: int = 0
    q: torch.Tensor = field(init=False, repr=False)
    _cache: dict[str, Any] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        gen = torch.Generator().manual_seed(self.seed)
        self.q = torch.randn(
            self.batch, self.heads, self.tokens, self.dim, generator=gen, dtype=torch.float32
        )

    @property
    def tokens(self) -> int:
        return self.height * self.width

    @property
    def grid(self) -> TokenGrid:
        return TokenGrid(self.height, self.width)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.heads, self.tokens, self.dim)

    @property
    def square(self) -> bool:
        return self.height == self.width

    def with_sigma(self, sigma: float) -> Case:
        """The same queries (shared, not copied) at another sigma."""
        other = Case.__new__(Case)
        other.__dict__.update(self.__dict__)
        other.sigma = sigma
        other._cache = self._cache
        return other

    @property
    def q_numpy(self) -> np.ndarray:
        """The queries as a NumPy array (shares memory with :attr:`q`)."""
        return self.q.numpy()

    @property
    def q_official(self) -> torch.Tensor:
        """The queries in diffusers' layout (a copy, made once)."""
        if "official" not in self._cache:
            self._cache["official"] = diffusers_layout(self.q)
        return self._cache["official"]

    def official_radius(self) -> int:
        """Half the kernel size the official code uses here (after its clamp)."""
        return official_kernel_size(self.sigma, min(self.height, self.width)) // 2

    def official_clamped(self) -> bool:
        """Whether the official clamp shortened the kernel on this grid."""
        return self.official_radius() != smoothguide.default_radius(self.sigma)


@dataclass(frozen=True)
class Method:
    """A smoothing method (or reference cost) of the comparison.

    Attributes
    ----------
    key
        Short name used in tables.
    label
        What it is, for the report.
    prepare
        ``prepare(case) -> thunk``; raises :class:`NotApplicable`.
    per_shape
        The cost does not depend on sigma (SDPA, clone): timed once per shape.
    """

    key: str
    label: str
    prepare: Callable[[Case], Callable[[], Any]]
    per_shape: bool = False


def _ours(case: Case) -> Callable[[], Any]:
    fn = fast_path()
    if fn is None:
        raise NotApplicable("smoothguide.torch is not installed")
    q, grid, sigma = case.q, case.grid, case.sigma
    return lambda: fn(q, grid, sigma)


def _portable_torch(case: Case) -> Callable[[], Any]:
    q, grid, sigma = case.q, case.grid, case.sigma
    return lambda: smoothguide.smooth_queries(q, grid, sigma)


def _portable_numpy(case: Case) -> Callable[[], Any]:
    q, grid, sigma = case.q_numpy, case.grid, case.sigma
    return lambda: smoothguide.smooth_queries(q, grid, sigma)


def _official(case: Case) -> Callable[[], Any]:
    if not case.square:
        try:
            official_blur(case.q_official.clone(), case.sigma)
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            raise NotApplicable(
                f"the official code fails on {case.height}x{case.width}: isqrt({case.tokens}) = "
                f"{math.isqrt(case.tokens)}, RuntimeError: {first}"
            ) from None
        raise NotApplicable("non-square grid")  # pragma: no cover - isqrt view always fails
    # For sigma > 9999 the official code writes the mean in place: give it a scratch copy.
    q = case.q_official.clone() if math.isinf(case.sigma) else case.q_official
    sigma = case.sigma
    return lambda: official_blur(q, sigma)


def _official_hw(case: Case) -> Callable[[], Any]:
    if case.square:
        raise NotApplicable("square grid: the official code itself runs")
    q, h, w, sigma = case.q_official, case.height, case.width, case.sigma
    return lambda: official_style_blur(q, h, w, sigma)


def _scipy(case: Case) -> Callable[[], Any]:
    if math.isinf(case.sigma):
        raise NotApplicable("scipy.ndimage.gaussian_filter has no sigma = inf")
    from scipy import ndimage

    b, h = case.batch, case.heads
    x = case.q_numpy.reshape(b, h, case.height, case.width, case.dim)
    r = smoothguide.default_radius(case.sigma)
    sig = (0.0, 0.0, case.sigma, case.sigma, 0.0)
    rad = (0, 0, r, r, 0)
    return lambda: ndimage.gaussian_filter(x, sig, mode="reflect", radius=rad)


def _sdpa(case: Case) -> Callable[[], Any]:
    q = case.q
    return lambda: F.scaled_dot_product_attention(q, q, q)


def _clone(case: Case) -> Callable[[], Any]:
    q = case.q
    return lambda: q.clone()


METHODS: tuple[Method, ...] = (
    Method("ours", "smoothguide.torch.smooth_queries (torch fast path)", _ours),
    Method(
        "portable_torch", "smoothguide.smooth_queries (portable path) on torch", _portable_torch
    ),
    Method(
        "portable_numpy", "smoothguide.smooth_queries (portable path) on NumPy", _portable_numpy
    ),
    Method(
        "official", "official SEG-SDXL blur: k x k depthwise conv2d (re-implemented)", _official
    ),
    Method(
        "official_hw",
        "official-style conv2d on the true H x W grid (the official code cannot run it)",
        _official_hw,
    ),
    Method("scipy", "scipy.ndimage.gaussian_filter over the grid axes", _scipy),
    Method("sdpa", "F.scaled_dot_product_attention(q, q, q) at the same shape", _sdpa, True),
    Method("clone", "q.clone(): read + write the queries once", _clone, True),
)


def as_float64(x: Any) -> np.ndarray:
    """Any method's output as a contiguous float64 NumPy array of shape (B, heads, N, d)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def differences(case: Case) -> dict[str, float | str]:
    """Max abs differences between methods on ``case`` (float32 outputs).

    ``ours_vs_scipy``: fast path vs SciPy, both ``mode="reflect"`` and the default
    radius. ``mirror_vs_official``: fast path with ``mode="mirror"`` and the
    official (possibly clamped) radius vs the official blur (or its H x W
    generalisation on non-square grids). ``portable_*_vs_ours``: the portable path
    vs the fast path.
    """
    out: dict[str, float | str] = {}
    ours_fn = fast_path()
    ref_fn = ours_fn if ours_fn is not None else smoothguide.smooth_queries
    ours = as_float64(ref_fn(case.q, case.grid, case.sigma))
    if not math.isinf(case.sigma):
        out["ours_vs_scipy"] = float(
            np.abs(ours - as_float64(_scipy(case)()).reshape(ours.shape)).max()
        )
        radius: int | None = case.official_radius()
    else:
        radius = None
    mirror = as_float64(ref_fn(case.q, case.grid, case.sigma, mode="mirror", radius=radius))
    if case.square:
        official = official_blur(case.q_official.clone(), case.sigma)
    else:
        official = official_style_blur(case.q_official, case.height, case.width, case.sigma)
    out["mirror_vs_official"] = float(np.abs(mirror - as_float64(official)).max())
    if ours_fn is not None:
        out["portable_torch_vs_ours"] = float(
            np.abs(as_float64(_portable_torch(case)()) - ours).max()
        )
        out["portable_numpy_vs_ours"] = float(
            np.abs(as_float64(_portable_numpy(case)()) - ours).max()
        )
    return out
