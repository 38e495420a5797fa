"""What PAG and TPG share: a CFG part plus ``ρ s (x_c − x_p)``, ``x_p`` a perturbed branch."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .._array import Array
from ..branches import Branch
from .base import COND, StepContext, branch_output, check_shapes, unique_branches
from .cfg import CFG
from .schedules import Schedule
from .schedules import weight as schedule_weight

__all__ = ["PerturbedDifference"]


class PerturbedDifference:
    """Mixin: ``CFG(cfg_scale) + ρ s (x_c − x_p)``, ``x_p`` the output of :attr:`perturbed`.

    The class using it has the fields ``scale``, ``schedule``, ``cfg_scale`` and
    ``cfg_schedule`` and defines :attr:`perturbed`, the perturbed conditional
    branch. ``ρ s = 0`` skips that branch.
    """

    scale: float
    schedule: Schedule
    cfg_scale: float
    cfg_schedule: Schedule

    @property
    def perturbed(self) -> Branch:  # pragma: no cover - defined by the rule
        """The perturbed conditional branch."""
        raise NotImplementedError

    @property
    def cfg(self) -> CFG:
        """The CFG part, ``CFG(cfg_scale, cfg_schedule)``."""
        return CFG(self.cfg_scale, self.cfg_schedule)

    def coefficient(self, ctx: StepContext) -> float:
        """Effective coefficient ``ρ s`` of ``(x_c − x_p)`` at this step."""
        return schedule_weight(self.schedule, ctx) * self.scale

    def branches(self, ctx: StepContext) -> tuple[Branch, ...]:
        """The CFG part's branches, plus ``cond`` and the perturbed branch when active."""
        own = (COND, self.perturbed) if self.coefficient(ctx) != 0.0 else ()
        return unique_branches(self.cfg.branches(ctx), own)

    def apply(
        self, pred: Array, outputs: Mapping[Branch, Array], ctx: StepContext, state: Any = None
    ) -> tuple[Array, Any]:
        """Add the CFG part, then ``ρ s (x_c − x_p)``."""
        pred, state = self.cfg.apply(pred, outputs, ctx, state)
        c = self.coefficient(ctx)
        if c == 0.0:
            return pred, state
        needed = self.branches(ctx)
        x_c = branch_output(outputs, COND, needed)
        x_p = branch_output(outputs, self.perturbed, needed)
        check_shapes(type(self).__name__, pred, outputs, COND, self.perturbed)
        return pred + c * (x_c - x_p), state
