"""CFG++ (Chung et al. 2025): guided denoised target, unconditional re-noising."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .._array import Array
from ..branches import Branch
from ._prediction import Prediction
from .base import COND, UNCOND, StepContext, Term, branch_output, check_scale, check_shapes
from .schedules import ALWAYS, Schedule, check_schedule, weight

__all__ = ["CFGPlusPlus"]


@dataclass(frozen=True)
class CFGPlusPlus(Term):
    """CFG++: the step targets the guided ``x0``, the re-added noise is the unconditional one.

    H. Chung, J. Kim, G. Y. Park, H. Nam, J. C. Ye, "CFG++: Manifold-constrained
    Classifier Free Guidance for Diffusion Models", ICLR 2025
    (arXiv:2406.08070), Algorithm 1 (DDIM) in the ``x = x0 + σ ε`` form::

        x̂0_λ = x̂0_u + λ (x̂0_c − x̂0_u)  = x̂0_c + (λ − 1)(x̂0_c − x̂0_u),   λ ∈ [0, 1]
        ε̂_u  = (x − x̂0_u) / σ
        x'   = x̂0_λ + σ' ε̂_u                     (CFG: x' = x̂0_w + σ' ε̂_w)

    :meth:`combine` returns a :class:`~smoothguide.rules.Prediction` with
    ``denoised = x̂0_λ`` and ``renoise = x̂0_u``;
    :func:`~smoothguide.sampling.sample_euler` and
    :func:`~smoothguide.sampling.sample_ddim` re-noise from it (k-diffusion's
    ``sample_euler_cfg_pp``); a plain k-diffusion sampler calling a
    :class:`~smoothguide.sampling.GuidedDenoiser` gets ``x̂0_λ`` only. λ is
    small (the paper's 0.2–0.8 correspond to CFG scales ~2.5–12.5). The
    schedule's weight ρ multiplies ``λ − 1``; ``ρ = 0`` is neutral (plain
    ``x_c``, ``"uncond"`` not evaluated, ordinary re-noising). ``λ = 1`` is not
    neutral: it re-noises with ε̂_u. Inside a
    :class:`~smoothguide.rules.Compose` the other terms add to ``x̂0_λ`` and the
    re-noising still uses ``x̂0_u`` (:meth:`renoise_branch`).

    Parameters
    ----------
    scale
        ``λ >= 0`` (the paper's range is [0, 1]).
    schedule
        Weight ρ per step.

    Examples
    --------
    >>> import numpy as np
    >>> from smoothguide.rules import COND, UNCOND, StepContext
    >>> out, _ = CFGPlusPlus(0.5).combine({COND: np.array([1.0]), UNCOND: np.array([0.0])},
    ...                                   StepContext(1.0))
    >>> out.denoised, out.renoise
    (array([0.5]), array([0.]))
    """

    scale: float = 0.6
    schedule: Schedule = ALWAYS

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", check_scale(self.scale, "scale"))
        check_schedule(self.schedule)

    def active(self, ctx: StepContext) -> bool:
        """Whether the rule acts at this step (schedule weight ρ ≠ 0)."""
        return weight(self.schedule, ctx) != 0.0

    def renoise_branch(self, ctx: StepContext) -> Branch | None:
        """``UNCOND`` when active: the sampler re-noises with ε̂_u; ``None`` otherwise."""
        return UNCOND if self.active(ctx) else None

    def branches(self, ctx: StepContext) -> tuple[Branch, ...]:
        """``(UNCOND, COND)``, or ``(COND,)`` when inactive at this step."""
        return (UNCOND, COND) if self.active(ctx) else (COND,)

    def apply(
        self, pred: Array, outputs: Mapping[Branch, Array], ctx: StepContext, state: Any = None
    ) -> tuple[Array, Any]:
        """``pred + ρ (λ − 1)(x_c − x_u)`` (the step target); ``pred`` itself when inactive."""
        rho = weight(self.schedule, ctx)
        c = rho * (self.scale - 1.0)
        if c == 0.0:
            return pred, state
        needed = self.branches(ctx)
        x_c = branch_output(outputs, COND, needed)
        x_u = branch_output(outputs, UNCOND, needed)
        check_shapes("CFGPlusPlus", pred, outputs, COND, UNCOND)
        return pred + c * (x_c - x_u), state

    def combine(
        self, outputs: Mapping[Branch, Array], ctx: StepContext, state: Any = None
    ) -> tuple[Any, Any]:
        """``(Prediction(x̂0_λ, x̂0_u), state)`` when active, else ``(x_c, state)``."""
        needed = self.branches(ctx)
        pred, state = self.apply(branch_output(outputs, COND, needed), outputs, ctx, state)
        if not self.active(ctx):
            return pred, state
        return Prediction(pred, branch_output(outputs, UNCOND, needed)), state
