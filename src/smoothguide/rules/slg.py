"""Skip-Layer Guidance (Stability AI, SD3.5), in diffusers' ``SkipLayerGuidance`` convention."""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

from .._array import Array
from ..branches import Branch
from ..layer_skip import LayerSkip, Skip
from ..perturbations import LayerSelection
from ._perturbed import PerturbedDifference
from .base import (
    UNCOND,
    StepContext,
    Term,
    check_scale,
)
from .schedules import ALWAYS, Schedule, check_schedule
from .schedules import weight as schedule_weight

__all__ = ["SLG"]


@dataclass(frozen=True)
class SLG(PerturbedDifference, Term):
    """Skip-Layer Guidance: guide away from the prediction with chosen blocks skipped.

    Stability AI's SLG for SD3.5 (github.com/Stability-AI/sd3.5) and STG for
    video (Hyung et al., arXiv:2411.18664), with the formula, defaults and step
    window of diffusers 0.42's ``SkipLayerGuidance``. ``x̃_c`` is the
    conditional prediction with the selected blocks skipped
    (:class:`~smoothguide.layer_skip.LayerSkip`), ``w = cfg_scale``::

        w = 1:   x̃_c + s (x_c − x̃_c)                      neutral: s = 1
        w ≠ 1:   x_u + w (x_c − x_u) + s (x_c − x̃_c)       neutral: s = 0

    (diffusers' default, ``use_original_formulation=False``; note the base
    ``x̃_c`` without CFG, where ``ρ s = 1`` is neutral and skips the branch, so
    inside :class:`~smoothguide.rules.Compose` the running prediction is shifted
    by ``x̃_c − x_c``). As in diffusers, a scale of 0 skips the branch, and with
    ``num_steps`` known the skip branch runs only at steps
    ``int(start · n) < step < int(stop · n)``; the schedule's weight ρ
    multiplies ``s`` on top.

    Parameters
    ----------
    scale
        ``s >= 0`` (diffusers' ``skip_layer_guidance_scale``; default 2.8).
    layers
        Attention layers whose blocks are skipped (presets and names as for SEG;
        SD3.5 Medium's recommended ``("block.7", "block.8", "block.9")``).
        ``None``: the adapter's default selection.
    skip
        What is skipped: ``"block"`` (default), ``"attention"`` or ``"ff"``.
    start, stop
        Fractions of the run delimiting the skip window (0.01 and 0.2).
    cfg_scale
        CFG scale ``w >= 0``; 1 disables CFG.
    schedule, cfg_schedule
        Weights of the SLG term and of the CFG term per step.

    Examples
    --------
    >>> import numpy as np
    >>> from smoothguide.rules import COND, UNCOND, StepContext
    >>> rule = SLG(2.0, layers="block.1", cfg_scale=5.0)
    >>> outs = {UNCOND: np.array([0.0]), COND: np.array([1.0]), rule.skip_branch: np.array([0.5])}
    >>> rule.combine(outs, StepContext(1.0))[0]  # 0 + 5 * 1 + 2 * 0.5
    array([6.])
    >>> rule.branches(StepContext(1.0, step=0, num_steps=10)) == (UNCOND, COND)
    True
    """

    scale: float = 2.8
    layers: LayerSelection = None
    skip: Skip = "block"
    start: float = 0.01
    stop: float = 0.2
    cfg_scale: float = 1.0
    schedule: Schedule = ALWAYS
    cfg_schedule: Schedule = ALWAYS

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", check_scale(self.scale, "scale"))
        object.__setattr__(self, "cfg_scale", check_scale(self.cfg_scale, "cfg_scale"))
        start, stop = check_scale(self.start, "start"), check_scale(self.stop, "stop")
        if not start < 1.0:
            raise ValueError(f"start must be in [0, 1), got {self.start!r}")
        if not start <= stop <= 1.0:
            raise ValueError(f"stop must be in [start, 1] = [{start}, 1], got {self.stop!r}")
        object.__setattr__(self, "start", start)
        object.__setattr__(self, "stop", stop)
        check_schedule(self.schedule)
        check_schedule(self.cfg_schedule, "cfg_schedule")
        p = LayerSkip(self.skip, layers=self.layers)  # type: ignore[arg-type]
        object.__setattr__(self, "layers", p.layers)

    @property
    def perturbation(self) -> LayerSkip:
        """The :class:`~smoothguide.layer_skip.LayerSkip` spec of the skip branch."""
        return LayerSkip(self.skip, layers=cast("tuple[str, ...] | None", self.layers))

    @property
    def skip_branch(self) -> Branch:
        """The conditional branch with the layers skipped."""
        return Branch("cond", self.perturbation)

    perturbed = skip_branch

    def in_window(self, ctx: StepContext) -> bool:
        """diffusers' window: ``int(start · n) < step < int(stop · n)``; True when n is unknown."""
        if ctx.step is None or ctx.num_steps is None:
            return True
        n = ctx.num_steps
        return int(self.start * n) < ctx.step < int(self.stop * n)

    def coefficient(self, ctx: StepContext) -> float:
        """``ρ s`` inside the window, else 0."""
        if self.scale == 0.0 or not self.in_window(ctx):
            return 0.0
        return schedule_weight(self.schedule, ctx) * self.scale

    def skips(self, ctx: StepContext) -> bool:
        """True when the skip branch is needed: ``ρ s ≠ 0``, and ``ρ s ≠ 1`` without CFG.

        Without CFG the formula is ``x̃_c + ρ s (x_c − x̃_c)``, exactly ``x_c`` at
        ``ρ s = 1``: neutral, so the skip branch is not evaluated.
        """
        c = self.coefficient(ctx)
        if c == 0.0:
            return False
        return c != 1.0 or UNCOND in self.cfg.branches(ctx)

    active = skips

    def rebase(self, pred: Array, x_b: Array, x_p: Array, needed: tuple[Branch, ...]) -> Array:
        """Without CFG the base is ``x̃_c`` (diffusers), with CFG the CFG prediction."""
        if UNCOND in needed:
            return pred
        # diffusers: pred_cond_skip + s (pred_cond - pred_cond_skip); pred starts at x_c
        return pred - x_b + x_p
