"""Classifier-free guidance (Ho & Salimans 2022)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .._array import Array
from ..branches import Branch
from ._difference import ScaledDifference, cond_uncond
from .base import StepContext, Term, check_scale
from .schedules import ALWAYS, Schedule, check_schedule

__all__ = ["CFG"]


@dataclass(frozen=True)
class CFG(ScaledDifference, Term):
    """Classifier-free guidance: ``x_u + w (x_c − x_u)``.

    Ho & Salimans, "Classifier-Free Diffusion Guidance" (2022), in the scale
    convention of Imagen / diffusers / the SEG paper's Eq. 3: ``w = 1`` is the
    conditional model (neutral: the ``"uncond"`` branch is not evaluated),
    ``w = 0`` the unconditional one. As a term it adds ``ρ (w − 1)(x_c − x_u)``
    to the running prediction, ``ρ`` being the schedule's weight, so a
    standalone ``CFG`` returns ``x_c + ρ (w − 1)(x_c − x_u)``, which is
    ``x_u + w (x_c − x_u)`` at ``ρ = 1``.

    Parameters
    ----------
    scale
        Guidance scale ``w >= 0``.
    schedule
        Weight ρ of the term per step (default :class:`Constant`; e.g.
        :class:`~smoothguide.rules.Interval` for a guidance interval).

    Examples
    --------
    >>> import numpy as np
    >>> from smoothguide.rules import COND, UNCOND, StepContext
    >>> out, _ = CFG(3.0).combine({COND: np.array([1.0]), UNCOND: np.array([0.5])},
    ...                           StepContext(1.0))
    >>> out  # 0.5 + 3 * (1.0 - 0.5)
    array([2.])
    >>> CFG(1.0).branches(StepContext(1.0))  # neutral: only the conditional branch
    (Branch(conditioning='cond', perturbation=None),)
    """

    scale: float = 7.5
    schedule: Schedule = ALWAYS

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", check_scale(self.scale, "scale"))
        check_schedule(self.schedule)

    def apply(
        self, pred: Array, outputs: Mapping[Branch, Array], ctx: StepContext, state: Any = None
    ) -> tuple[Array, Any]:
        """``pred + ρ (w − 1)(x_c − x_u)``; ``pred`` itself when neutral."""
        c = self.coefficient(ctx)
        if c == 0.0:
            return pred, state
        needed = self.branches(ctx)
        x_c, x_u, _ = cond_uncond("CFG", pred, outputs, needed)
        return pred + c * (x_c - x_u), state
