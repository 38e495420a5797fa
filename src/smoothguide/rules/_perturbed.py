"""What PAG, TPG, SLG and SAG share: CFG plus ``ρ s (x_b − x_p)``, ``x_p`` a perturbed branch."""

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
    """Mixin: ``CFG(cfg_scale) + ρ s (x_b − x_p)``, ``x_p`` the output of :attr:`perturbed`.

    The class using it has the fields ``scale``, ``schedule``, ``cfg_scale`` and
    ``cfg_schedule`` and defines :attr:`perturbed`, the perturbed branch of
    :attr:`source` ``b`` (``cond`` unless the rule says otherwise, e.g. SAG with
    CFG perturbs ``uncond``). The branch is evaluated only when :meth:`active`
    (by default ``ρ s ≠ 0``); a rule whose base is not the CFG prediction
    (SLG without CFG) overrides :meth:`rebase`.
    """

    scale: float
    schedule: Schedule
    cfg_scale: float
    cfg_schedule: Schedule

    @property
    def perturbed(self) -> Branch:  # pragma: no cover - defined by the rule
        """The perturbed branch."""
        raise NotImplementedError

    @property
    def source(self) -> Branch:
        """The branch ``b`` whose perturbation :attr:`perturbed` is: ``cond``."""
        return COND

    @property
    def cfg(self) -> CFG:
        """The CFG part, ``CFG(cfg_scale, cfg_schedule)``."""
        return CFG(self.cfg_scale, self.cfg_schedule)

    def coefficient(self, ctx: StepContext) -> float:
        """Effective coefficient ``ρ s`` of ``(x_b − x_p)`` at this step."""
        return schedule_weight(self.schedule, ctx) * self.scale

    def active(self, ctx: StepContext) -> bool:
        """True when the perturbed branch is needed at this step: ``ρ s ≠ 0``."""
        return self.coefficient(ctx) != 0.0

    def branches(self, ctx: StepContext) -> tuple[Branch, ...]:
        """The CFG part's branches, plus the source and the perturbed branch when active."""
        own = (self.source, self.perturbed) if self.active(ctx) else ()
        return unique_branches(self.cfg.branches(ctx), own)

    def rebase(self, pred: Array, x_b: Array, x_p: Array, needed: tuple[Branch, ...]) -> Array:
        """The base the term is added to: the running (CFG) prediction, unchanged."""
        return pred

    def apply(
        self, pred: Array, outputs: Mapping[Branch, Array], ctx: StepContext, state: Any = None
    ) -> tuple[Array, Any]:
        """Add the CFG part, then ``ρ s (x_b − x_p)`` to :meth:`rebase`'s base."""
        pred, state = self.cfg.apply(pred, outputs, ctx, state)
        if not self.active(ctx):
            return pred, state
        needed = self.branches(ctx)
        x_b = branch_output(outputs, self.source, needed)
        x_p = branch_output(outputs, self.perturbed, needed)
        check_shapes(type(self).__name__, pred, outputs, self.source, self.perturbed)
        pred = self.rebase(pred, x_b, x_p, needed)
        return pred + self.coefficient(ctx) * (x_b - x_p), state
