"""Adaptive Projected Guidance (Sadat et al. 2024), with momentum as explicit state."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from .._array import Array, compute_dtype
from ..branches import Branch
from ._difference import ScaledDifference, cond_uncond
from .base import StepContext, Term, check_scale
from .schedules import ALWAYS, Schedule, check_schedule, weight

__all__ = ["APG", "APG_CONVENTIONS"]

#: Accepted values of ``APG(convention=...)``.
APG_CONVENTIONS: tuple[str, ...] = ("paper", "diffusers")

_EPS = 1e-12  # torch.nn.functional.normalize's default eps, as in the reference code


@dataclass(frozen=True)
class APG(ScaledDifference, Term):
    """Adaptive Projected Guidance: CFG with the update's parallel part down-weighted.

    S. Sadat, O. Hilliges, R. M. Weber, "Eliminating Oversaturation and
    Artifacts of High Guidance Scales in Diffusion Models", ICLR 2025
    (arXiv:2410.02416), Algorithm 1, in denoised (``x0``) space. Per sample,
    norms and inner products over all non-batch axes::

        Δ  = x_c − x_u
        Δ ← Δ + β m            m: running average from the previous step; m ← Δ   (momentum)
        Δ ← Δ · min(1, r/‖Δ‖)                          (norm threshold, if r > 0)
        Δ∥ = ⟨Δ, x̂_c⟩ x̂_c,  x̂_c = x_c/‖x_c‖,  Δ⊥ = Δ − Δ∥
        paper:      out = x_c + (w − 1)(Δ⊥ + η Δ∥)       neutral: w = 1
        diffusers:  out = x_u + w (Δ⊥ + η Δ∥)            (w = 1 treated as neutral)

    ``convention="paper"`` (default) is the paper's Algorithm 1; ``"diffusers"``
    is diffusers' ``AdaptiveProjectedGuidance(guidance_scale=w, eta=η,
    adaptive_projected_guidance_momentum=β,
    adaptive_projected_guidance_rescale=r)``. Without momentum and norm threshold,
    ``diffusers(w, η) = x_c + (w − 1)Δ⊥ + (wη − 1)Δ∥ = paper(w, η′)`` with
    ``η′ = (wη − 1)/(w − 1)`` (negative for η < 1/w), and in general
    ``diffusers = paper − (1 − η)Δ∥`` where Δ∥ is the parallel part of the raw
    ``x_c − x_u``. diffusers' ``use_original_formulation=True`` (``x_c + w (Δ⊥ + η
    Δ∥)``) is ``convention="paper"`` with scale ``w + 1``. Like diffusers, the
    "diffusers" convention returns ``x_c`` at ``w = 1`` although it is not
    continuous there when η ≠ 1.

    ``η = 1, r = 0, β = 0`` is CFG. The momentum buffer is the rule's state:
    :meth:`init_state` gives ``None`` (no history) and :meth:`apply` returns the
    new buffer (``None`` when ``β = 0``), so one ``APG`` object can serve
    several samplers at once. A neutral step (``ρ (w − 1) = 0``) skips the
    ``"uncond"`` branch and leaves the buffer unchanged. The schedule's weight ρ
    multiplies ``w − 1``.

    Parameters
    ----------
    scale
        Guidance scale ``w >= 0``.
    eta
        Weight ``η >= 0`` of the parallel component (the paper recommends 0).
    norm_threshold
        ``r >= 0``; 0 disables the norm threshold.
    momentum
        ``β`` in (−1, 1); the paper uses negative values (e.g. −0.5); 0 disables it.
    schedule
        Weight ρ per step.
    convention
        ``"paper"`` (default) or ``"diffusers"``; in the latter ρ multiplies
        ``x_u + w·update − x_c``.

    Examples
    --------
    >>> import numpy as np
    >>> from smoothguide.rules import COND, UNCOND, StepContext
    >>> x_c, x_u = np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]])
    >>> out, state = APG(2.0).combine({COND: x_c, UNCOND: x_u}, StepContext(1.0))
    >>> out  # Δ = (1, -1); Δ⊥ = (0, -1) w.r.t. x_c; η = 0
    array([[ 1., -1.]])
    >>> state is None
    True
    """

    scale: float = 7.5
    eta: float = 0.0
    norm_threshold: float = 0.0
    momentum: float = 0.0
    schedule: Schedule = ALWAYS
    convention: Literal["paper", "diffusers"] = "paper"

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", check_scale(self.scale, "scale"))
        object.__setattr__(self, "eta", check_scale(self.eta, "eta"))
        object.__setattr__(
            self, "norm_threshold", check_scale(self.norm_threshold, "norm_threshold")
        )
        beta = check_scale(self.momentum, "momentum", minimum=None)
        if not -1.0 < beta < 1.0:
            raise ValueError(f"momentum must be in (-1, 1), got {self.momentum!r}")
        object.__setattr__(self, "momentum", beta)
        check_schedule(self.schedule)
        if self.convention not in APG_CONVENTIONS:
            raise ValueError(
                f"convention must be one of {APG_CONVENTIONS}, got {self.convention!r}"
            )

    def apply(
        self, pred: Array, outputs: Mapping[Branch, Array], ctx: StepContext, state: Any = None
    ) -> tuple[Array, Any]:
        """``pred + ρ (w − 1)(Δ⊥ + η Δ∥)``; returns the new momentum buffer as state."""
        c = self.coefficient(ctx)
        if c == 0.0:
            return pred, state
        needed = self.branches(ctx)
        x_c, x_u, xp = cond_uncond("APG", pred, outputs, needed, per_sample=True)
        work = compute_dtype(xp, x_c.dtype, "outputs")
        axes = tuple(range(1, x_c.ndim))
        diff = xp.astype(x_c, work) - xp.astype(x_u, work)
        raw = diff
        new_state = None
        if self.momentum != 0.0:
            if state is not None:
                if tuple(state.shape) != tuple(diff.shape):
                    raise ValueError(
                        f"state must be None or a momentum buffer of shape {tuple(diff.shape)}, "
                        f"got shape {tuple(state.shape)}"
                    )
                diff = diff + self.momentum * xp.astype(state, work)
            new_state = diff
        if self.norm_threshold > 0.0:
            norm = xp.linalg.vector_norm(diff, axis=axes, keepdims=True)
            over = norm > self.norm_threshold
            diff = diff * xp.where(over, self.norm_threshold / xp.where(over, norm, 1.0), 1.0)
        unit = xp.astype(x_c, work)
        unit = unit / xp.maximum(xp.linalg.vector_norm(unit, axis=axes, keepdims=True), _EPS)
        parallel = xp.sum(diff * unit, axis=axes, keepdims=True) * unit
        update = (diff - parallel) + self.eta * parallel
        if self.convention == "diffusers":
            # x_u + w·update = x_c + (w·update − Δ); ρ weighs that whole change.
            rho = weight(self.schedule, ctx)
            return pred + xp.astype(rho * (self.scale * update - raw), pred.dtype), new_state
        return pred + xp.astype(c * update, pred.dtype), new_state
