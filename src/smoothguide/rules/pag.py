"""Perturbed-Attention Guidance (Ahn et al. 2024), the SEG paper's main baseline."""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

from ..branches import Branch
from ..perturbations import IdentityAttention, LayerSelection
from ._perturbed import PerturbedDifference
from .base import StepContext, Term, check_scale
from .schedules import ALWAYS, Schedule, check_schedule
from .schedules import weight as schedule_weight

__all__ = ["PAG"]


@dataclass(frozen=True)
class PAG(PerturbedDifference, Term):
    """Perturbed-Attention Guidance: guide away from a prediction with identity self-attention.

    D. Ahn et al., "Self-Rectifying Diffusion Sampling with Perturbed-Attention
    Guidance", ECCV 2024 (arXiv:2403.17377). The perturbed branch replaces the
    self-attention map of the chosen layers by the identity, so each token's
    attention output is its value ``V``
    (:class:`~smoothguide.perturbations.IdentityAttention`); ``x̂_c`` is its
    output on the conditional branch. Formula of the paper and of diffusers'
    ``PAGMixin``, with ``w = cfg_scale``::

        w = 1:   x_c + s (x_c − x̂_c)
        w ≠ 1:   x_u + w (x_c − x_u) + s (x_c − x̂_c)          neutral: s = 0

    The schedule's weight ρ multiplies ``s``; ``cfg_schedule`` weighs ``w − 1``.

    Parameters
    ----------
    scale
        PAG scale ``s >= 0`` (default 3.0, the paper's SD setting).
    layers
        Self-attention layers to perturb, passed to the adapter.
    cfg_scale
        CFG scale ``w >= 0``; 1 disables CFG.
    schedule, cfg_schedule
        Weights of the PAG term and of the CFG term per step.
    weight
        Soft PAG (HeadHunter, arXiv:2506.10978): the map becomes
        ``(1 − weight) A + weight I``; 1 (default) is PAG, 0 turns the term off.
    heads
        Attention heads to perturb (``None``: all), per-head PAG.

    Examples
    --------
    >>> import numpy as np
    >>> from smoothguide.rules import COND, UNCOND, StepContext
    >>> rule = PAG(2.0, cfg_scale=5.0)
    >>> outs = {UNCOND: np.array([0.0]), COND: np.array([1.0]),
    ...         rule.pag_branch: np.array([0.5])}
    >>> rule.combine(outs, StepContext(1.0))[0]  # 0 + 5 * 1 + 2 * 0.5
    array([6.])
    """

    scale: float = 3.0
    layers: LayerSelection = None
    cfg_scale: float = 1.0
    schedule: Schedule = ALWAYS
    cfg_schedule: Schedule = ALWAYS
    weight: float = 1.0
    heads: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", check_scale(self.scale, "scale"))
        object.__setattr__(self, "cfg_scale", check_scale(self.cfg_scale, "cfg_scale"))
        check_schedule(self.schedule)
        check_schedule(self.cfg_schedule, "cfg_schedule")
        p = IdentityAttention(
            layers=self.layers,  # type: ignore[arg-type]
            weight=self.weight,
            heads=self.heads,
        )
        object.__setattr__(self, "layers", p.layers)
        object.__setattr__(self, "weight", p.weight)
        object.__setattr__(self, "heads", p.heads)

    @property
    def perturbation(self) -> IdentityAttention:
        """The :class:`~smoothguide.perturbations.IdentityAttention` spec."""
        return IdentityAttention(
            layers=cast("tuple[str, ...] | None", self.layers),
            weight=self.weight,
            heads=self.heads,
        )

    @property
    def pag_branch(self) -> Branch:
        """The perturbed conditional branch."""
        return Branch("cond", self.perturbation)

    perturbed = pag_branch

    def coefficient(self, ctx: StepContext) -> float:
        """Effective coefficient ``ρ s`` of ``(x_c − x̂_c)`` at this step (0 when ``weight = 0``)."""
        if self.perturbation.is_identity:
            return 0.0
        return schedule_weight(self.schedule, ctx) * self.scale
