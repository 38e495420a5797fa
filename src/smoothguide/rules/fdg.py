"""Frequency-decoupled guidance (Sadat et al. 2025): CFG per level of a Laplacian pyramid."""

from __future__ import annotations

import functools
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from .._array import Array, as_backend, compute_dtype, device_of, namespace
from ..branches import Branch
from .base import COND, UNCOND, StepContext, Term, branch_output, check_scale, check_shapes
from .schedules import ALWAYS, Schedule, check_schedule, weight

__all__ = ["FDG", "laplacian_pyramid", "reconstruct_pyramid"]

Convention = Literal["paper", "diffusers"]
_EPS = 1e-12  # torch.nn.functional.normalize's eps, as in the reference projection
# Burt & Adelson's 5-tap binomial kernel; kornia's pyramid uses its 5 × 5 outer product.
_TAPS = np.array([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0


def _mirror(i: int, n: int) -> int:
    """Index ``i`` folded into ``[0, n)`` without repeating the edge (torch's "reflect")."""
    if n == 1:
        return 0
    period = 2 * (n - 1)
    i %= period
    return i if i < n else period - i


@functools.lru_cache(maxsize=64)
def _blur(n: int) -> np.ndarray:
    m = np.zeros((n, n))
    for i in range(n):
        for k, t in enumerate(_TAPS):
            m[i, _mirror(i + k - 2, n)] += t
    return m


@functools.lru_cache(maxsize=64)
def _down(n: int) -> np.ndarray:
    """Blur, then bilinear resize n → n/2 (align_corners=False: the mean of each pair)."""
    pool = np.zeros((n // 2, n))
    for i in range(n // 2):
        pool[i, 2 * i] = pool[i, 2 * i + 1] = 0.5
    m = pool @ _blur(n)
    m.flags.writeable = False
    return m


@functools.lru_cache(maxsize=64)
def _up(m: int) -> np.ndarray:
    """Bilinear resize m → 2m (align_corners=False, edge-clamped as in torch), then blur."""
    lin = np.zeros((2 * m, m))
    for j in range(2 * m):
        src = max((j + 0.5) / 2 - 0.5, 0.0)
        i0 = int(np.floor(src))
        i1 = min(i0 + 1, m - 1)
        frac = src - i0
        lin[j, i0] += 1.0 - frac
        lin[j, i1] += frac
    out = _blur(2 * m) @ lin
    out.flags.writeable = False
    return out


def _apply2(xp: Any, x: Array, mh: np.ndarray, mw: np.ndarray) -> Array:
    """``Mh @ x @ Mwᵀ`` over the last two axes."""
    kw = {"dtype": x.dtype, "device": device_of(x)}
    y = xp.matmul(as_backend(mh, xp, **kw), x)
    return xp.matmul(y, as_backend(np.ascontiguousarray(mw.T), xp, **kw))


def _check_pyramid(x: Array, levels: int, name: str) -> None:
    if isinstance(levels, bool) or not isinstance(levels, numbers.Integral) or levels < 1:
        raise ValueError(f"levels must be an int >= 1, got {levels!r}")
    if x.ndim < 3:
        raise ValueError(
            f"{name} must have shape (batch, ..., height, width), got shape {tuple(x.shape)}"
        )
    step = 1 << (levels - 1)
    h, w = int(x.shape[-2]), int(x.shape[-1])
    if h % step or w % step:
        raise ValueError(
            f"{name}'s height and width must be divisible by 2**(levels-1) = {step} for a "
            f"{levels}-level pyramid, got {h} x {w}"
        )


def laplacian_pyramid(x: Array, levels: int) -> list[Array]:
    """The Laplacian pyramid of ``x`` over its last two axes, finest level first.

    kornia's ``build_laplacian_pyramid`` (used by diffusers' FDG guider) on
    sizes divisible by ``2**(levels−1)``: Gaussian levels ``g₀ = x``,
    ``g_{k+1} = down(g_k)`` (5-tap binomial blur with torch's "reflect"
    boundary, then 2 × 2 averaging); band ``k`` is ``g_k − up(g_{k+1})``
    (bilinear 2× upsampling, then the blur), the last entry is ``g_{levels−1}``.
    Every operator is a matrix per axis, so this runs on any array backend.

    Parameters
    ----------
    x
        Array of shape ``(batch, ..., height, width)``, height and width
        divisible by ``2**(levels − 1)``.
    levels
        Number of levels ``>= 1`` (1: ``[x]``).

    Returns
    -------
    list of arrays
        ``levels`` arrays, band ``k`` of size ``(h/2^k, w/2^k)``; same backend and dtype.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.arange(16.0).reshape(1, 1, 4, 4)
    >>> [p.shape for p in laplacian_pyramid(x, 2)]
    [(1, 1, 4, 4), (1, 1, 2, 2)]
    >>> bool(np.allclose(reconstruct_pyramid(laplacian_pyramid(x, 3)), x))
    True
    """
    _check_pyramid(x, levels, "x")
    xp = namespace(x)
    gauss = [x]
    for _ in range(levels - 1):
        g = gauss[-1]
        gauss.append(_apply2(xp, g, _down(int(g.shape[-2])), _down(int(g.shape[-1]))))
    bands = []
    for k in range(levels - 1):
        g = gauss[k + 1]
        bands.append(gauss[k] - _apply2(xp, g, _up(int(g.shape[-2])), _up(int(g.shape[-1]))))
    bands.append(gauss[-1])
    return bands


def reconstruct_pyramid(pyramid: Sequence[Array]) -> Array:
    """Invert :func:`laplacian_pyramid`: ``img ← up(img) + band_k`` from the coarsest level.

    Parameters
    ----------
    pyramid
        Bands as :func:`laplacian_pyramid` returns them, finest first.

    Returns
    -------
    array
        The image at the finest band's size (exactly ``x`` up to rounding).

    Examples
    --------
    >>> import numpy as np
    >>> x = np.random.default_rng(0).normal(size=(1, 1, 8, 8))
    >>> bool(np.allclose(reconstruct_pyramid(laplacian_pyramid(x, 3)), x))
    True
    """
    xp = namespace(*pyramid)
    img = pyramid[-1]
    for k in range(len(pyramid) - 2, -1, -1):
        img = _apply2(xp, img, _up(int(img.shape[-2])), _up(int(img.shape[-1]))) + pyramid[k]
    return img


def _per_level(value: Any, levels: int, name: str, check: Any) -> tuple[Any, ...]:
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != levels:
            raise ValueError(
                f"{name} must be one value or {levels} values (one per level, like scales), "
                f"got {len(value)}"
            )
        return tuple(check(v) for v in value)
    return (check(value),) * levels


@dataclass(frozen=True)
class FDG(Term):
    """Frequency-decoupled guidance: a separate CFG scale per Laplacian-pyramid level.

    S. Sadat, T. Vontobel, F. Salehi, R. M. Weber, "Guidance in the Frequency
    Domain Enables High-Fidelity Sampling at Low CFG Scales" (arXiv:2506.19713),
    Algorithm 1. With ``P_k`` level ``k`` of the Laplacian pyramid of
    :func:`laplacian_pyramid` over the last two (spatial) axes, finest first,
    and ``R`` its inverse (:func:`reconstruct_pyramid`, linear)::

        Δ_k = P_k(x_c) − P_k(x_u)
        U_k = Δ_k⊥ + p_k Δ_k∥        (projection on P_k(x_c), per sample; p_k = 1: U_k = Δ_k)
        paper:      out = R(P_k(x_c) + (w_k − 1) U_k)  = x_c + R((w_k − 1) U_k)
        diffusers:  out = R(P_k(x_u) + w_k U_k)        = x_c + R(w_k U_k − Δ_k)

    The two conventions agree when every ``p_k = 1``; diffusers'
    ``FrequencyDecoupledGuidance(guidance_scales=ws, parallel_weights=ps)`` is
    ``FDG(ws, parallel_weights=ps, convention="diffusers")`` and its
    ``use_original_formulation=True`` is ``FDG([w + 1 ...])`` (paper). A level
    with ``w_k = 1`` is left at ``P_k(x_c)`` in both (as diffusers does); all
    ``w_k = 1`` is neutral (``"uncond"`` not evaluated). The schedule's weight
    ρ_k (one schedule, or one per level) multiplies the level's update.

    Parameters
    ----------
    scales
        ``(w_0, ..., w_{L−1})``, finest level first (diffusers' order); the
        number of levels ``L = len(scales)``. The paper's SDXL setting is
        ``(10.0, 5.0)`` (``w_high``, ``w_low``).
    parallel_weights
        ``p_k >= 0``, one or one per level (default 1: no projection).
    convention
        ``"paper"`` (default) or ``"diffusers"``.
    schedule
        A schedule for all levels or a tuple of one per level.

    Examples
    --------
    >>> import numpy as np
    >>> from smoothguide.rules import COND, UNCOND, StepContext
    >>> rng = np.random.default_rng(0)
    >>> x_c, x_u = rng.normal(size=(2, 1, 2, 4, 4))
    >>> out, _ = FDG((3.0, 3.0)).combine({COND: x_c, UNCOND: x_u}, StepContext(1.0))
    >>> bool(np.allclose(out, x_u + 3.0 * (x_c - x_u)))  # equal scales: CFG
    True
    """

    scales: tuple[float, ...] = (10.0, 5.0)
    parallel_weights: float | tuple[float, ...] = 1.0
    convention: Convention = "paper"
    schedule: Schedule | tuple[Schedule, ...] = ALWAYS

    def __post_init__(self) -> None:
        sc = self.scales
        if isinstance(sc, (str, bytes)) or not isinstance(sc, Sequence) or len(sc) < 1:
            raise ValueError(
                f"scales must be a sequence of >= 1 scales (one per level), got {sc!r}"
            )
        object.__setattr__(self, "scales", tuple(check_scale(w, "scales[k]") for w in sc))
        n = len(self.scales)
        object.__setattr__(
            self,
            "parallel_weights",
            _per_level(
                self.parallel_weights,
                n,
                "parallel_weights",
                lambda v: check_scale(v, "parallel_weights[k]"),
            ),
        )
        if self.convention not in ("paper", "diffusers"):
            raise ValueError(f"convention must be 'paper' or 'diffusers', got {self.convention!r}")

        def _sched(s: Any) -> Any:
            check_schedule(s)
            return s

        if isinstance(self.schedule, tuple):
            _per_level(self.schedule, n, "schedule", _sched)
        else:
            check_schedule(self.schedule)

    @property
    def levels(self) -> int:
        """Number of pyramid levels ``L = len(scales)``."""
        return len(self.scales)

    def _weights(self, ctx: StepContext) -> tuple[float, ...]:
        s = self.schedule
        scheds = s if isinstance(s, tuple) else (s,) * self.levels
        return tuple(weight(f, ctx) for f in scheds)

    def coefficients(self, ctx: StepContext) -> tuple[float, ...]:
        """``ρ_k`` per level, 0 where the level is neutral (``w_k = 1`` or ``ρ_k = 0``)."""
        return tuple(
            0.0 if w == 1.0 else r for w, r in zip(self.scales, self._weights(ctx), strict=True)
        )

    def branches(self, ctx: StepContext) -> tuple[Branch, ...]:
        """``(UNCOND, COND)``, or ``(COND,)`` when every level is neutral at this step."""
        return (UNCOND, COND) if any(c != 0.0 for c in self.coefficients(ctx)) else (COND,)

    def apply(
        self, pred: Array, outputs: Mapping[Branch, Array], ctx: StepContext, state: Any = None
    ) -> tuple[Array, Any]:
        """``pred + R(ρ_k · update_k)``; ``pred`` itself when every level is neutral."""
        rho = self.coefficients(ctx)
        if all(r == 0.0 for r in rho):
            return pred, state
        needed = self.branches(ctx)
        x_c = branch_output(outputs, COND, needed)
        x_u = branch_output(outputs, UNCOND, needed)
        check_shapes("FDG", pred, outputs, COND, UNCOND)
        xp = namespace(x_c, x_u)
        _check_pyramid(x_c, self.levels, "the predictions")
        work = compute_dtype(xp, x_c.dtype, "outputs")
        a_c = xp.astype(x_c, work)
        diff = a_c - xp.astype(x_u, work)
        # The pyramid is linear: P_k(x_c) − P_k(x_u) = P_k(x_c − x_u).
        d_pyr = laplacian_pyramid(diff, self.levels)
        c_pyr = None
        axes = tuple(range(1, x_c.ndim))
        updates = []
        for k, (w, p, r) in enumerate(
            zip(self.scales, self.parallel_weights, rho, strict=True)  # type: ignore[arg-type]
        ):
            d = d_pyr[k]
            if r == 0.0:
                updates.append(xp.zeros_like(d))
                continue
            upd = d
            if p != 1.0:
                if c_pyr is None:
                    c_pyr = laplacian_pyramid(a_c, self.levels)
                unit = c_pyr[k]
                unit = unit / xp.maximum(
                    xp.linalg.vector_norm(unit, axis=axes, keepdims=True), _EPS
                )
                par = xp.sum(d * unit, axis=axes, keepdims=True) * unit
                upd = (d - par) + p * par
            if self.convention == "paper":
                updates.append((r * (w - 1.0)) * upd)
            else:
                updates.append(r * (w * upd - d))
        return pred + xp.astype(reconstruct_pyramid(updates), pred.dtype), state
