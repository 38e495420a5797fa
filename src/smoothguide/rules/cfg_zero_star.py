"""CFG-Zero* (Fan et al. 2025): CFG with an optimised unconditional scale and zero-init."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .._array import Array, compute_dtype, namespace
from ..branches import Branch
from ._difference import ScaledDifference, cond_uncond
from .base import StepContext, Term, check_scale
from .schedules import ALWAYS, Schedule, check_schedule, weight

__all__ = ["CFGZeroStar"]

_EPS = 1e-8  # added to ‖x_u‖², as in the official code and diffusers' cfg_zero_star_scale


@dataclass(frozen=True)
class CFGZeroStar(ScaledDifference, Term):
    """CFG-Zero*: CFG on a per-sample rescaled unconditional prediction, and zero-init.

    W. Fan, A. Y. Zheng, R. A. Yeh, Z. Liu, "CFG-Zero*: Improved
    Classifier-Free Guidance for Flow Matching Models" (arXiv:2503.18886),
    Sec. 4.1 (optimised scale, Eq. 8) and Sec. 4.2 (zero-init). Per sample,
    inner products over all non-batch axes::

        s* = ⟨x_c, x_u⟩ / (‖x_u‖² + 1e-8)
        out = s* x_u + w (x_c − s* x_u)  = x_c + (w − 1)(x_c − s* x_u)
        out = 0                          for the first zero-init steps

    ``w = 1`` is neutral (``"uncond"`` not evaluated); the schedule's weight ρ
    multiplies ``w − 1``. Zero-init returns zeros *in the space of the
    predictions handed to the rule*: the paper's (and diffusers') zero velocity
    when the rule combines a flow model's velocity (a diffusers pipeline);
    inside :class:`~smoothguide.sampling.GuidedDenoiser` the predictions are
    denoised ``x0`` estimates, where 0 means "predict x0 = 0". Zero-init steps
    need only the ``"cond"`` branch (for shape and dtype). In a
    :class:`~smoothguide.rules.Compose`, a zero-init step replaces the running
    prediction by zeros; terms after it still add their updates.

    diffusers' ``ClassifierFreeZeroStarGuidance(guidance_scale=w,
    zero_init_steps=k)`` is ``CFGZeroStar(w, zero_init_steps=k)``;
    ``use_original_formulation=True`` is ``CFGZeroStar(w + 1, ...)``. diffusers'
    default ``zero_init_steps`` is 1, ours 0.

    Parameters
    ----------
    scale
        Guidance scale ``w >= 0``.
    zero_init_steps
        Number of first steps whose prediction is 0 (``step < zero_init_steps``).
    zero_init_fraction
        Fraction of the run zeroed instead (the paper suggests 0.04): steps
        ``step < int(fraction · num_steps)``, the rule diffusers uses for
        ``start`` / ``stop``. The zeroed steps are the larger of the two counts.
    schedule
        Weight ρ per step.

    Examples
    --------
    >>> import numpy as np
    >>> from smoothguide.rules import COND, UNCOND, StepContext
    >>> x_c, x_u = np.array([[2.0, 0.0]]), np.array([[1.0, 1.0]])
    >>> out, _ = CFGZeroStar(3.0).combine({COND: x_c, UNCOND: x_u}, StepContext(1.0))
    >>> np.round(out, 6)  # s* = 2/2 = 1: plain CFG 1 + 3 (x_c - x_u)
    array([[ 4., -2.]])
    >>> CFGZeroStar(3.0, zero_init_steps=1).combine({COND: x_c}, StepContext(1.0, 0, 5))[0]
    array([[0., 0.]])
    """

    scale: float = 7.5
    zero_init_steps: int = 0
    zero_init_fraction: float = 0.0
    schedule: Schedule = ALWAYS

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", check_scale(self.scale, "scale"))
        k = self.zero_init_steps
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 0:
            raise ValueError(f"zero_init_steps must be an int >= 0, got {k!r}")
        object.__setattr__(self, "zero_init_steps", int(k))
        f = check_scale(self.zero_init_fraction, "zero_init_fraction")
        if f > 1.0:
            raise ValueError(
                f"zero_init_fraction must be in [0, 1], got {self.zero_init_fraction!r}"
            )
        object.__setattr__(self, "zero_init_fraction", f)
        check_schedule(self.schedule)

    def zero_init(self, ctx: StepContext) -> bool:
        """Whether ``ctx`` is one of the zero-initialised first steps."""
        if self.zero_init_steps == 0 and self.zero_init_fraction == 0.0:
            return False
        if ctx.step is None or ctx.num_steps is None:
            raise ValueError(
                "CFGZeroStar with zero-init needs the step index, but the StepContext has "
                "step=None; use smoothguide.sampling's samplers or pass sigmas=... to "
                "GuidedDenoiser"
            )
        count = max(self.zero_init_steps, math.floor(self.zero_init_fraction * ctx.num_steps))
        return ctx.step < count

    def coefficient(self, ctx: StepContext) -> float:
        """Effective coefficient ``ρ (w − 1)`` at this step (0 during zero-init)."""
        if self.zero_init(ctx):
            return 0.0
        return weight(self.schedule, ctx) * (self.scale - 1.0)

    def apply(
        self, pred: Array, outputs: Mapping[Branch, Array], ctx: StepContext, state: Any = None
    ) -> tuple[Array, Any]:
        """``pred + ρ (w − 1)(x_c − s* x_u)``; zeros during zero-init; ``pred`` when neutral."""
        if self.zero_init(ctx):
            return namespace(pred).zeros_like(pred), state
        c = self.coefficient(ctx)
        if c == 0.0:
            return pred, state
        needed = self.branches(ctx)
        x_c, x_u, xp = cond_uncond("CFGZeroStar", pred, outputs, needed, per_sample=True)
        work = compute_dtype(xp, x_c.dtype, "outputs")
        axes = tuple(range(1, x_c.ndim))
        c_w, u_w = xp.astype(x_c, work), xp.astype(x_u, work)
        s = xp.sum(c_w * u_w, axis=axes, keepdims=True) / (
            xp.sum(u_w * u_w, axis=axes, keepdims=True) + _EPS
        )
        return pred + xp.astype(c * (c_w - s * u_w), pred.dtype), state
