"""Gaussian smoothing of queries along the token grid (the SEG perturbation).

Everything here is separable: a blur along each grid axis is one small
``n x n`` matrix, so smoothing never builds a ``tokens x tokens`` operator.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any, Literal, get_args

import numpy as np

from ._array import (
    Array,
    as_backend,
    compat_namespace,
    compute_dtype,
    device_of,
    namespace,
    require_floating,
)
from .grid import TokenGrid

__all__ = [
    "MODES",
    "Mode",
    "blur_matrix",
    "default_radius",
    "gaussian_kernel1d",
    "smooth_queries",
]

Mode = Literal["reflect", "mirror", "nearest", "wrap"]
#: Boundary modes, with SciPy's ``scipy.ndimage`` meaning.
MODES: tuple[str, ...] = get_args(Mode)

#: Largest kernel radius built explicitly (sigma up to about 350 000 tokens with the
#: default radius); beyond it use ``sigma=math.inf``, which no real grid tells apart.
MAX_RADIUS = 2**20


def _check_scalar_sigma(sigma: object, name: str = "sigma") -> float:
    if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real):
        raise TypeError(f"{name} must be a real number >= 0 or math.inf, got {sigma!r}")
    value = float(sigma)
    if math.isnan(value) or value < 0:
        raise ValueError(f"{name} must be a real number >= 0 or math.inf, got {sigma!r}")
    return value


def _check_sigma(sigma: object) -> float | tuple[float, ...]:
    """Validate ``sigma``: a number, or a tuple of 2 or 3 numbers, each >= 0 or inf."""
    if isinstance(sigma, tuple | list):
        if len(sigma) not in (2, 3):
            raise ValueError(
                "sigma must be a number or a tuple (sigma_h, sigma_w) or "
                f"(sigma_t, sigma_h, sigma_w), got a sequence of length {len(sigma)}"
            )
        return tuple(_check_scalar_sigma(s, f"sigma[{i}]") for i, s in enumerate(sigma))
    return _check_scalar_sigma(sigma)


def _check_mode(mode: object) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def _check_radius(radius: object) -> int | None:
    if radius is None:
        return None
    if isinstance(radius, bool) or not isinstance(radius, int | np.integer) or radius < 0:
        raise ValueError(f"radius must be None or an int >= 0, got {radius!r}")
    if radius > MAX_RADIUS:
        raise ValueError(f"radius must be <= {MAX_RADIUS}, got {radius}; use sigma=math.inf")
    return int(radius)


def default_radius(sigma: float) -> int:
    """Kernel radius of the official SEG code for a finite ``sigma``.

    The official SEG-SDXL code uses the odd kernel size
    ``k = ceil(6 sigma) + 1 - ceil(6 sigma) % 2``; the radius is ``k // 2``.

    Parameters
    ----------
    sigma
        Gaussian width in tokens, finite and >= 0.

    Returns
    -------
    int

    Examples
    --------
    >>> [default_radius(s) for s in (0.0, 0.5, 1.0, 2.0, 10.0)]
    [0, 1, 3, 6, 30]
    """
    sigma = _check_scalar_sigma(sigma)
    if math.isinf(sigma):
        raise ValueError("sigma must be finite for a kernel radius; sigma=inf is the exact mean")
    # Compare before ceil: 6 sigma overflows to inf from sigma ~ 3e307 (OverflowError).
    if 6 * sigma > 2 * MAX_RADIUS + 1:
        raise ValueError(
            f"sigma={sigma} needs a kernel radius above {MAX_RADIUS}; use sigma=math.inf"
        )
    c = math.ceil(6 * sigma)
    radius = (c + 1 - c % 2) // 2
    if radius > MAX_RADIUS:
        raise ValueError(
            f"sigma={sigma} needs a kernel radius above {MAX_RADIUS}; use sigma=math.inf"
        )
    return radius


def gaussian_kernel1d(sigma: float, *, radius: int | None = None) -> np.ndarray:
    """Normalised 1-D Gaussian taps ``w[k] ∝ exp(-k² / (2 sigma²))``, ``k = -radius..radius``.

    Same taps as ``scipy.ndimage.gaussian_filter1d`` and as the official SEG code.

    Parameters
    ----------
    sigma
        Gaussian width in taps, finite and >= 0; ``0`` gives a unit impulse.
    radius
        Half-width; default :func:`default_radius`.

    Returns
    -------
    numpy.ndarray
        float64 array of length ``2 * radius + 1`` summing to 1.

    Examples
    --------
    >>> gaussian_kernel1d(0.0)
    array([1.])
    >>> w = gaussian_kernel1d(1.0)
    >>> len(w), round(float(w.sum()), 12), bool(w[3] == w.max())
    (7, 1.0, True)
    """
    sigma = _check_scalar_sigma(sigma)
    if math.isinf(sigma):
        raise ValueError("sigma must be finite for a kernel; sigma=inf is the exact mean")
    radius = default_radius(sigma) if radius is None else _check_radius(radius)
    assert radius is not None
    if sigma == 0.0:
        w = np.zeros(2 * radius + 1)
        w[radius] = 1.0
        return w
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    # A tiny sigma overflows (x / sigma)**2 to inf for x != 0: exp(-inf) = 0, the impulse.
    with np.errstate(over="ignore", under="ignore"):
        w = np.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


def _fold(index: np.ndarray, n: int, mode: str) -> np.ndarray:
    """Map out-of-range sample positions into ``[0, n)`` with SciPy's boundary rule."""
    if mode == "nearest":
        return np.clip(index, 0, n - 1)
    if mode == "wrap":
        return np.mod(index, n)
    if mode == "reflect":  # d c b a | a b c d | d c b a: period 2n
        j = np.mod(index, 2 * n)
        return np.where(j >= n, 2 * n - 1 - j, j)
    # mirror: d c b | a b c d | c b a: period 2n - 2
    if n == 1:
        return np.zeros_like(index)
    j = np.mod(index, 2 * n - 2)
    return np.where(j >= n, 2 * n - 2 - j, j)


def _fold_taps(n: int, w: np.ndarray, mode: str) -> np.ndarray:
    """The ``n x n`` matrix of ``sum_k w[k] x[fold(i + k)]`` for any taps ``w`` (length 2r+1)."""
    r = (len(w) - 1) // 2
    offsets = np.arange(-r, r + 1)
    # Taps whose offsets differ by the boundary rule's period land on the same
    # source sample, so fold the kernel first: the cost is then O(n * period),
    # whatever the radius.
    period = {"wrap": n, "reflect": 2 * n, "mirror": max(2 * n - 2, 1), "nearest": 0}[mode]
    if period and len(w) > period:
        folded = np.zeros(period)
        np.add.at(folded, np.mod(offsets, period), w)
        offsets, w = np.arange(period), folded
    elif mode == "nearest" and r > n:
        # Offsets beyond +-n clip to the edge sample from every output position.
        clipped = np.clip(offsets, -n, n)
        w = np.bincount(clipped + n, weights=w, minlength=2 * n + 1)
        offsets = np.arange(-n, n + 1)
    rows = np.arange(n)[:, None]
    cols = _fold(rows + offsets[None, :], n, mode)
    m = np.zeros((n, n))
    np.add.at(m, (np.broadcast_to(rows, cols.shape), cols), np.broadcast_to(w, cols.shape))
    m.setflags(write=False)
    return m


@functools.lru_cache(maxsize=256)
def _blur_matrix_np(n: int, sigma: float, radius: int | None, mode: str) -> np.ndarray:
    if math.isinf(sigma):
        return np.full((n, n), 1.0 / n)
    return _fold_taps(n, gaussian_kernel1d(sigma, radius=radius), mode)


@functools.lru_cache(maxsize=64)
def _support_np(n: int, sigma: float, radius: int | None, mode: str) -> np.ndarray:
    """``(2, n, n)`` 0/1 matrices: output ``i`` reads source ``j`` through any tap / a zero tap.

    SciPy multiplies every tap, also one that underflowed to 0, so a NaN read through
    any tap, or an inf read through a zero tap (``0 * inf``), makes the output NaN.
    """
    w = gaussian_kernel1d(sigma, radius=radius)
    reach = _fold_taps(n, np.ones_like(w), mode) > 0
    zero = _fold_taps(n, (w == 0.0).astype(np.float64), mode) > 0
    out = np.stack([reach, zero]).astype(np.float64)
    out.setflags(write=False)
    return out


def blur_matrix(
    n: int,
    sigma: float,
    *,
    radius: int | None = None,
    mode: Mode = "reflect",
    xp: Any = None,
    dtype: Any = None,
    device: Any = None,
) -> Array:
    """The ``n x n`` matrix ``M`` such that ``M @ x`` Gaussian-blurs ``x`` along its first axis.

    ``(M @ x)[i] = sum_k w[k] x[fold(i + k)]`` with the taps of
    :func:`gaussian_kernel1d` and SciPy's boundary rule ``fold`` for ``mode``;
    the boundary handling is folded into ``M`` for any radius, also ``radius >= n``.
    Row ``i`` of ``M`` equals ``scipy.ndimage.gaussian_filter1d`` of the unit
    vector ``e_i``'s transpose, i.e. ``M = gaussian_filter1d(I, sigma, axis=0)``.

    Parameters
    ----------
    n
        Length of the blurred axis (>= 1).
    sigma
        Gaussian width in samples (>= 0); ``0`` gives the identity and
        ``math.inf`` the exact mean (every entry ``1/n``).
    radius
        Kernel radius; default :func:`default_radius`.
    mode
        ``"reflect"`` (default; symmetric and doubly stochastic, so means are kept
        exactly), ``"mirror"`` (torch's ``F.pad(mode="reflect")``, the official SEG
        code's), ``"nearest"`` or ``"wrap"``.
    xp, dtype, device
        Namespace, dtype and device of the result; default NumPy float64.

    Returns
    -------
    array of shape ``(n, n)``

    Examples
    --------
    >>> m = blur_matrix(4, 1.0)
    >>> bool(np.allclose(m.sum(axis=0), 1.0) and np.allclose(m, m.T))
    True
    >>> blur_matrix(3, float("inf"))[0]
    array([0.33333333, 0.33333333, 0.33333333])
    """
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    sigma = _check_scalar_sigma(sigma)
    _check_mode(mode)
    radius = _check_radius(radius)
    if not math.isinf(sigma) and radius is None:
        radius = default_radius(sigma)
    m = _blur_matrix_np(int(n), sigma, radius, mode)
    if xp is None:
        if dtype is not None and np.dtype(dtype).kind != "f":
            raise TypeError(f"dtype must be a real floating dtype, got {np.dtype(dtype)}")
        return m.copy() if dtype is None else m.astype(dtype)
    xp = compat_namespace(xp)  # xp=torch (the module itself) lacks isdtype
    if dtype is not None and not xp.isdtype(dtype, "real floating"):
        raise TypeError(f"dtype must be a real floating dtype, got {dtype}")
    return as_backend(m, xp, dtype=xp.float64 if dtype is None else dtype, device=device)


def _per_axis_sigma(sigma: float | tuple[float, ...]) -> tuple[float, float, float]:
    """``(sigma_t, sigma_h, sigma_w)``; a single number blurs height and width only."""
    if isinstance(sigma, tuple):
        return (0.0, *sigma) if len(sigma) == 2 else sigma  # type: ignore[return-value]
    return (0.0, sigma, sigma)


def _apply_along(xp: Any, m: Array, x: Array, axis: int) -> Array:
    """``M @ x`` along ``axis`` (negative) of ``x``, every other axis a batch of lines."""
    shape = x.shape
    n = shape[axis]
    # Put the blurred axis second to last, everything after it flattened into the
    # last axis, so that one broadcast matmul applies M to every line.
    lead, trail = shape[: len(shape) + axis], shape[len(shape) + axis + 1 :]
    flat = xp.reshape(x, (*lead, n, math.prod(trail)))
    return xp.reshape(xp.matmul(m, flat), shape)


def _all_finite(xp: Any, x: Array) -> bool:
    """Whether every entry of ``x`` is finite; ``False`` when that cannot be known now.

    Under tracing (``jax.jit``) the values are unknown: the caller then takes the path
    that is exact for any input.
    """
    try:
        # A sum is non-finite iff an entry is (or it overflows: then the exact path
        # runs needlessly); much cheaper than a boolean array and its reduction.
        with np.errstate(over="ignore", invalid="ignore"):  # inf - inf, overflow: the answer
            return bool(xp.isfinite(xp.sum(x)))
    except TypeError:  # a tracer's truth value (jax ConcretizationTypeError is a TypeError)
        return False


def _blur_nonfinite(xp: Any, x: Array, axis: int, m: Array, support: Array) -> Array:
    """``M @ x`` along ``axis`` with SciPy's treatment of NaN and ±inf entries.

    The dense product would spread a NaN over the whole axis (``0 * NaN = NaN``);
    ``scipy.ndimage.gaussian_filter1d`` keeps it within the kernel's support. Here the
    finite entries are blurred with ``M`` and the non-finite ones are counted through
    the support matrices of :func:`_support_np` (``support[0]``: any tap reaches,
    ``support[1]``: a zero tap reaches): an output is NaN if it reads a NaN, both
    signs of inf, or an inf through a zero tap; else ±inf if it reads an inf.
    """
    finite = xp.isfinite(x)
    zero = xp.zeros_like(x)
    out = _apply_along(xp, m, xp.where(finite, x, zero), axis)
    reach, zero_tap = support[0, ...], support[1, ...]
    one = xp.ones_like(x)

    def reads(mask: Array, mat: Array) -> Array:
        return _apply_along(xp, mat, xp.where(mask, one, zero), axis) > 0

    pos, neg = x == math.inf, x == -math.inf
    p, q = reads(pos, reach), reads(neg, reach)
    nan = reads(xp.isnan(x), reach) | (p & q) | reads(pos | neg, zero_tap)
    out = xp.where(p, xp.full_like(x, math.inf), out)
    out = xp.where(q, xp.full_like(x, -math.inf), out)
    return xp.where(nan, xp.full_like(x, math.nan), out)


def _blur_axis(
    xp: Any,
    x: Array,
    axis: int,
    sigma: float,
    radius: int | None,
    mode: Mode,
    finite: bool = True,
) -> Array:
    """Blur ``x`` along ``axis`` (negative, counted from the end) with a left matmul."""
    n = x.shape[axis]
    if sigma == 0.0 or n == 1:
        return x
    if math.isinf(sigma):
        mean = xp.mean(x, axis=axis, keepdims=True)
        return xp.broadcast_to(mean, x.shape)
    dev = device_of(x)
    m = blur_matrix(n, sigma, radius=radius, mode=mode, xp=xp, dtype=x.dtype, device=dev)
    if finite:
        return _apply_along(xp, m, x, axis)
    r = default_radius(sigma) if radius is None else radius
    support = as_backend(_support_np(n, sigma, r, mode), xp, dtype=x.dtype, device=dev)
    return _blur_nonfinite(xp, x, axis, m, support)


def smooth_queries(
    q: Array,
    grid: TokenGrid,
    sigma: float | tuple[float, ...],
    *,
    radius: int | None = None,
    mode: Mode = "reflect",
) -> Array:
    """Gaussian-blur queries along the token grid (SEG, Hong 2024, Eq. 6-8).

    Blurring the queries equals blurring the attention logits of every key
    (Prop. 3.1: ``(B Q) Kᵀ = B (Q Kᵀ)``), without the ``tokens²`` cost.
    Along each grid axis the result equals
    ``scipy.ndimage.gaussian_filter1d(q, sigma, axis, mode=mode, radius=radius)``,
    also for NaN and ±inf entries: they reach only the outputs within the kernel's
    support, as in SciPy (finite queries take the dense fast path; a call whose
    queries hold a non-finite entry takes a masked path: four products instead of
    one, about 6x the time on a 20 x 4096 x 64 float32 tensor).

    Parameters
    ----------
    q
        Queries of shape ``(..., tokens, dim)`` with ``tokens == grid.num_tokens``;
        any leading batch/head dims.
    grid
        Layout of the token axis; prefix and suffix tokens are returned unchanged.
    sigma
        A number (blurs height and width, the paper's 2-D blur; frames untouched),
        ``(sigma_h, sigma_w)`` or ``(sigma_t, sigma_h, sigma_w)``. ``0`` leaves an
        axis alone, ``math.inf`` replaces it by its mean.
    radius
        Kernel radius for every blurred axis; default :func:`default_radius` of each axis's σ.
    mode
        Boundary mode, see :func:`blur_matrix`.

    Returns
    -------
    array
        Same shape, dtype, device and backend as ``q``. 16-bit floats are
        accumulated in float32.

    Examples
    --------
    >>> q = np.arange(12.0).reshape(6, 2)           # a 2 x 3 grid, 2 channels
    >>> smooth_queries(q, TokenGrid(2, 3), float("inf"))[:, 0]
    array([5., 5., 5., 5., 5., 5.])
    >>> bool(np.array_equal(smooth_queries(q, TokenGrid(2, 3), 0.0), q))
    True
    """
    xp = namespace(q)
    if not isinstance(grid, TokenGrid):
        raise TypeError(f"grid must be a TokenGrid, got {type(grid).__name__}")
    require_floating(xp, q, "q")
    if q.ndim < 2 or q.shape[-2] != grid.num_tokens:
        raise ValueError(
            f"q must have shape (..., tokens, dim) with tokens == grid.num_tokens="
            f"{grid.num_tokens} ({grid}), got shape {tuple(q.shape)}"
        )
    sigmas = _per_axis_sigma(_check_sigma(sigma))
    _check_mode(mode)
    radius = _check_radius(radius)
    if all(s == 0.0 for s in sigmas):
        return q
    dtype = q.dtype
    work = xp.astype(q, compute_dtype(xp, dtype))
    lead, dim = q.shape[:-2], q.shape[-1]
    spatial = work[..., grid.spatial_slice, :]
    x = xp.reshape(spatial, (*lead, *grid.shape, dim))
    # One check per call: the dense product is exact for finite queries only (a NaN
    # would spread over its whole axis); non-finite ones take SciPy's semantics.
    finite = _all_finite(xp, x)
    for axis, s in zip((-4, -3, -2), sigmas, strict=True):
        x = _blur_axis(xp, x, axis, s, radius, mode, finite)
    x = xp.reshape(x, (*lead, grid.spatial_tokens, dim))
    parts = [x]
    if grid.prefix:
        parts.insert(0, work[..., : grid.prefix, :])
    if grid.suffix:
        parts.append(work[..., grid.prefix + grid.spatial_tokens :, :])
    out = xp.concat(parts, axis=-2) if len(parts) > 1 else x
    return xp.astype(out, dtype)
