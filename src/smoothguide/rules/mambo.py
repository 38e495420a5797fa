"""MAMBO-G (magnitude-aware guidance): CFG whose scale is damped by the update's magnitude."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .._array import Array, compute_dtype
from ..branches import Branch
from ._difference import ScaledDifference, cond_uncond
from .base import StepContext, Term, check_scale
from .schedules import ALWAYS, Schedule, check_schedule

__all__ = ["MAMBOG"]


@dataclass(frozen=True)
class MAMBOG(ScaledDifference, Term):
    """MAMBO-G: magnitude-aware mitigation for boosted guidance.

    "Magnitude-Aware Mitigation for Boosted Guidance" (arXiv:2508.03442), as
    implemented by diffusers' ``MagnitudeAwareGuidance``. Per sample, norms over
    all non-batch axes::

        r   = ‖x_c − x_u‖ / ‖x_u‖
        w_r = 1 + (w − 1) exp(−α r)
        out = x_u + w_r (x_c − x_u)  = x_c + (w − 1) exp(−α r)(x_c − x_u)

    A large update relative to the unconditional prediction (early, noisy
    steps) is damped towards the conditional model; ``α = 0`` is CFG. ``w = 1``
    is neutral (``"uncond"`` not evaluated); the schedule's weight ρ multiplies
    ``w − 1``. ``x_u = 0`` gives ``r = ∞`` (no guidance), and ``x_c = x_u = 0``
    gives ``r = 0``. diffusers' ``use_original_formulation=True`` (``x_c +
    w e^{−αr} Δ``) is ``MAMBOG(w + 1, alpha)``.

    Parameters
    ----------
    scale
        Guidance scale ``w >= 0`` (diffusers' default 10).
    alpha
        Damping strength ``α >= 0`` (diffusers' default 8).
    schedule
        Weight ρ per step.

    Examples
    --------
    >>> import numpy as np
    >>> from smoothguide.rules import COND, UNCOND, StepContext
    >>> x_c, x_u = np.array([[2.0, 0.0]]), np.array([[1.0, 0.0]])  # r = 1
    >>> out, _ = MAMBOG(3.0, alpha=0.0).combine({COND: x_c, UNCOND: x_u}, StepContext(1.0))
    >>> out  # alpha = 0: CFG, 1 + 3 (2 - 1)
    array([[4., 0.]])
    """

    scale: float = 10.0
    alpha: float = 8.0
    schedule: Schedule = ALWAYS

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", check_scale(self.scale, "scale"))
        object.__setattr__(self, "alpha", check_scale(self.alpha, "alpha"))
        check_schedule(self.schedule)

    def apply(
        self, pred: Array, outputs: Mapping[Branch, Array], ctx: StepContext, state: Any = None
    ) -> tuple[Array, Any]:
        """``pred + ρ (w − 1) exp(−α r)(x_c − x_u)``; ``pred`` itself when neutral."""
        c = self.coefficient(ctx)
        if c == 0.0:
            return pred, state
        needed = self.branches(ctx)
        x_c, x_u, xp = cond_uncond("MAMBOG", pred, outputs, needed, per_sample=True)
        work = compute_dtype(xp, x_c.dtype, "outputs")
        axes = tuple(range(1, x_c.ndim))
        diff = xp.astype(x_c, work) - xp.astype(x_u, work)
        n_d = xp.linalg.vector_norm(diff, axis=axes, keepdims=True)
        n_u = xp.linalg.vector_norm(xp.astype(x_u, work), axis=axes, keepdims=True)
        positive = n_u > 0
        # ‖x_u‖ = 0: r = ∞ (no guidance) unless the update is 0 too (then r = 0).
        degenerate = xp.where(n_d > 0, xp.full_like(n_d, math.inf), xp.zeros_like(n_d))
        ratio = xp.where(positive, n_d / xp.where(positive, n_u, 1.0), degenerate)
        if self.alpha == 0.0:  # CFG; also avoids 0 · ∞ when x_u = 0
            return pred + xp.astype(c * diff, pred.dtype), state
        damp = xp.exp(-self.alpha * ratio)
        return pred + xp.astype(c * damp * diff, pred.dtype), state
