"""Tangential damping CFG (Kwon et al. 2025): CFG with a projected unconditional prediction."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .._array import Array, compute_dtype
from ..branches import Branch
from ._difference import ScaledDifference, cond_uncond
from .base import StepContext, Term, check_scale
from .schedules import ALWAYS, Schedule, check_schedule

__all__ = ["TCFG"]


@dataclass(frozen=True)
class TCFG(ScaledDifference, Term):
    """TCFG: project ``x_u`` onto the principal direction of ``[x_c; x_u]``, then CFG.

    M. Kwon, J. Jeong, Y.-T. Hsu, Y. Uh, "TCFG: Tangential Damping
    Classifier-free Guidance" (CVPR 2025, arXiv:2503.18137), Algorithm 1. Per
    sample, with the flattened predictions stacked as the rows of a 2 × N
    matrix ``A = [x_c; x_u] = U S Vᵀ`` and ``v₁`` its first right singular vector::

        x_u' = ⟨x_u, v₁⟩ v₁                (the tangential component is damped)
        out  = x_u' + w (x_c − x_u')  = x_c + (w − 1)(x_c − x_u')

    ``w = 1`` is neutral (``"uncond"`` not evaluated); the schedule's weight ρ
    multiplies ``w − 1``. ``v₁`` is computed from the 2 × 2 Gram matrix
    ``A Aᵀ`` in closed form (its top eigenvector ``u₁`` gives ``v₁ = Aᵀu₁/‖Aᵀu₁‖``),
    which is the SVD's ``v₁`` up to a sign that the projection does not see, in
    O(N) on any array backend. diffusers' ``TangentialClassifierFreeGuidance(w)``
    is ``TCFG(w)`` (it computes in float32; ``use_original_formulation=True``
    is ``TCFG(w + 1)``).

    Parameters
    ----------
    scale
        Guidance scale ``w >= 0``.
    schedule
        Weight ρ per step.

    Examples
    --------
    >>> import numpy as np
    >>> from smoothguide.rules import COND, UNCOND, StepContext
    >>> x_c, x_u = np.array([[1.0, 0.0]]), np.array([[1.0, 0.0]])
    >>> TCFG(5.0).combine({COND: x_c, UNCOND: x_u}, StepContext(1.0))[0]  # x_u' = x_u = x_c
    array([[1., 0.]])
    """

    scale: float = 7.5
    schedule: Schedule = ALWAYS

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", check_scale(self.scale, "scale"))
        check_schedule(self.schedule)

    def apply(
        self, pred: Array, outputs: Mapping[Branch, Array], ctx: StepContext, state: Any = None
    ) -> tuple[Array, Any]:
        """``pred + ρ (w − 1)(x_c − x_u')``; ``pred`` itself when neutral."""
        c = self.coefficient(ctx)
        if c == 0.0:
            return pred, state
        needed = self.branches(ctx)
        x_c, x_u, xp = cond_uncond("TCFG", pred, outputs, needed, per_sample=True)
        work = compute_dtype(xp, x_c.dtype, "outputs")
        axes = tuple(range(1, x_c.ndim))
        a_c, a_u = xp.astype(x_c, work), xp.astype(x_u, work)
        u_proj = _principal_projection(xp, a_c, a_u, axes)
        return pred + xp.astype(c * (a_c - u_proj), pred.dtype), state


def _principal_projection(xp: Any, c: Array, u: Array, axes: tuple[int, ...]) -> Array:
    """``⟨u, v₁⟩ v₁`` per sample, ``v₁`` the top right singular vector of ``[c; u]``."""
    a = xp.sum(c * c, axis=axes, keepdims=True)
    b = xp.sum(c * u, axis=axes, keepdims=True)
    d = xp.sum(u * u, axis=axes, keepdims=True)
    # Top eigenvalue of [[a, b], [b, d]]; its eigenvector is (b, λ−a) or (λ−d, b): take the
    # longer of the two (they are parallel; one vanishes when b = 0).
    half = (a - d) / 2
    lam = (a + d) / 2 + xp.sqrt(half * half + b * b)
    e1 = (b, lam - a)
    e2 = (lam - d, b)
    first = (e1[0] * e1[0] + e1[1] * e1[1]) >= (e2[0] * e2[0] + e2[1] * e2[1])
    p = xp.where(first, e1[0], e2[0])
    q = xp.where(first, e1[1], e2[1])
    v = p * c + q * u  # Aᵀ u₁, unnormalised
    vv = xp.sum(v * v, axis=axes, keepdims=True)
    uv = xp.sum(u * v, axis=axes, keepdims=True)
    # A zero matrix (c = u = 0) has no direction: the projection of u = 0 is 0.
    positive = vv > 0
    return xp.where(positive, uv / xp.where(positive, vv, 1.0), 0.0) * v
