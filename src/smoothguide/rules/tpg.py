"""Token Perturbation Guidance (Rajabi et al., NeurIPS 2025)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

from ..branches import Branch
from ..perturbations import LayerSelection
from ..token_permutation import TokenPermutation
from ._perturbed import PerturbedDifference
from .base import Term, check_scale
from .schedules import ALWAYS, Schedule, check_schedule

__all__ = ["TPG"]


@dataclass(frozen=True)
class TPG(PerturbedDifference, Term):
    """Token Perturbation Guidance: guide away from a prediction with shuffled block inputs.

    J. Rajabi et al., "Token Perturbation Guidance for Diffusion Models",
    NeurIPS 2025 (arXiv:2506.10036). The perturbed branch permutes the tokens of
    the hidden states entering the chosen blocks
    (:class:`~smoothguide.token_permutation.TokenPermutation`); ``x̌_c`` is its
    conditional output. Same form as PAG, with ``w = cfg_scale``::

        w = 1:   x_c + s (x_c − x̌_c)
        w ≠ 1:   x_u + w (x_c − x_u) + s (x_c − x̌_c)          neutral: s = 0

    Parameters
    ----------
    scale
        ``s >= 0`` (default 3.0).
    layers
        Attention layers whose blocks get permuted inputs (presets and names as
        for SEG; ``None``: the adapter's default).
    seed
        Seed of the permutations.
    cfg_scale
        CFG scale ``w >= 0``; 1 disables CFG.
    schedule, cfg_schedule
        Weights of the TPG term and of the CFG term per step.

    Examples
    --------
    >>> import numpy as np
    >>> from smoothguide.rules import COND, StepContext
    >>> rule = TPG(2.0)
    >>> rule.combine({COND: np.array([1.0]), rule.tpg_branch: np.array([0.5])}, StepContext(1.0))[0]
    array([2.])
    """

    scale: float = 3.0
    layers: LayerSelection = None
    seed: int = 0
    cfg_scale: float = 1.0
    schedule: Schedule = ALWAYS
    cfg_schedule: Schedule = ALWAYS

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", check_scale(self.scale, "scale"))
        object.__setattr__(self, "cfg_scale", check_scale(self.cfg_scale, "cfg_scale"))
        check_schedule(self.schedule)
        check_schedule(self.cfg_schedule, "cfg_schedule")
        p = TokenPermutation(self.seed, layers=self.layers)  # type: ignore[arg-type]
        object.__setattr__(self, "layers", p.layers)

    @property
    def perturbation(self) -> TokenPermutation:
        """The :class:`~smoothguide.token_permutation.TokenPermutation` spec."""
        return TokenPermutation(self.seed, layers=cast("tuple[str, ...] | None", self.layers))

    @property
    def tpg_branch(self) -> Branch:
        """The perturbed conditional branch."""
        return Branch("cond", self.perturbation)

    perturbed = tpg_branch
