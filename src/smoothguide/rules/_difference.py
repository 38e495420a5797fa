"""What the rules on the CFG difference ``x_c − x_u`` share (CFG, APG, TCFG, MAMBO-G, CFG-Zero*).

Each of them adds ``ρ (w − 1) · f(x_c, x_u)`` to the running prediction, ``ρ`` being the
schedule's weight: ``w = 1`` (or ``ρ = 0``) is neutral and skips the unconditional branch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .._array import Array, namespace
from ..branches import Branch
from .base import COND, UNCOND, StepContext, branch_output, check_shapes
from .schedules import Schedule, weight

__all__ = ["ScaledDifference", "cond_uncond"]


class ScaledDifference:
    """Mixin: the coefficient ``ρ (w − 1)`` and branches of a rule on ``x_c − x_u``.

    The class using it has the fields ``scale`` (``w``) and ``schedule`` (``ρ``).
    """

    scale: float
    schedule: Schedule

    def coefficient(self, ctx: StepContext) -> float:
        """Effective coefficient ``ρ (w − 1)`` at this step (0: neutral)."""
        return weight(self.schedule, ctx) * (self.scale - 1.0)

    def branches(self, ctx: StepContext) -> tuple[Branch, ...]:
        """``(UNCOND, COND)``, or ``(COND,)`` when neutral at this step."""
        return (UNCOND, COND) if self.coefficient(ctx) != 0.0 else (COND,)


def cond_uncond(
    rule: str,
    pred: Array,
    outputs: Mapping[Branch, Array],
    needed: tuple[Branch, ...],
    *,
    per_sample: bool = False,
) -> tuple[Array, Array, Any]:
    """``(x_c, x_u, xp)`` of a step, checked: both present and of the running prediction's shape.

    ``per_sample``: the rule reduces over the non-batch axes (norms, projections), so the
    outputs need one; a ``ValueError`` names ``rule`` otherwise.
    """
    x_c = branch_output(outputs, COND, needed)
    x_u = branch_output(outputs, UNCOND, needed)
    check_shapes(rule, pred, outputs, COND, UNCOND)
    if per_sample and x_c.ndim < 2:
        raise ValueError(
            f"{rule} needs predictions of shape (batch, ...) with at least one non-batch axis, "
            f"got shape {tuple(x_c.shape)}"
        )
    return x_c, x_u, namespace(x_c, x_u)
