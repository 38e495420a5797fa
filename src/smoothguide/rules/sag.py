"""Self-Attention Guidance (Hong et al., ICCV 2023), as diffusers' StableDiffusionSAGPipeline."""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

from ..branches import Branch
from ..perturbations import LayerSelection
from ..sag import AttentionMaskedBlur
from ._perturbed import PerturbedDifference
from .base import (
    COND,
    UNCOND,
    Term,
    check_scale,
)
from .schedules import ALWAYS, Schedule, check_schedule

__all__ = ["SAG"]


@dataclass(frozen=True)
class SAG(PerturbedDifference, Term):
    """Self-Attention Guidance: guide away from the model at an attention-masked blurred input.

    S. Hong, G. Lee, W. Jang, S. Kim, "Improving Sample Quality of Diffusion
    Models Using Self-Attention Guidance", ICCV 2023 (arXiv:2210.00939), with
    the combination of diffusers' ``StableDiffusionSAGPipeline``. ``x̄_b`` is
    branch ``b``'s SAG output (:class:`~smoothguide.sag.AttentionMaskedBlur`:
    the model at ``b``'s prediction blurred where ``b``'s self-attention looks,
    re-noised, moved back to ``x``), ``w = cfg_scale``::

        w = 1:   x_c + s (x_c − x̄_c)
        w ≠ 1:   x_u + w (x_c − x_u) + s (x_u − x̄_u)          neutral: s = 0

    Cost: one extra forward per step, which cannot join the batched call (its
    input depends on the source branch's output), plus one layer's attention
    probabilities on the source rows.

    Parameters
    ----------
    scale
        ``s >= 0`` (diffusers' ``sag_scale``, default 0.75).
    layers
        The one self-attention layer whose map builds the mask (``None``: the
        adapter's default; for the SD UNet the mid block, as the reference).
    blur_sigma, threshold
        See :class:`~smoothguide.sag.AttentionMaskedBlur` (1.0 and 1.0).
    cfg_scale
        CFG scale ``w >= 0``; 1 disables CFG.
    schedule, cfg_schedule
        Weights of the SAG term and of the CFG term per step.

    Examples
    --------
    >>> import numpy as np
    >>> from smoothguide.rules import COND, UNCOND, StepContext
    >>> rule = SAG(0.5)
    >>> outs = {COND: np.array([1.0]), rule.sag_branch: np.array([0.6])}
    >>> rule.combine(outs, StepContext(1.0))[0]  # 1.0 + 0.5 * 0.4
    array([1.2])
    """

    scale: float = 0.75
    layers: LayerSelection = None
    blur_sigma: float = 1.0
    threshold: float = 1.0
    cfg_scale: float = 1.0
    schedule: Schedule = ALWAYS
    cfg_schedule: Schedule = ALWAYS

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", check_scale(self.scale, "scale"))
        object.__setattr__(self, "cfg_scale", check_scale(self.cfg_scale, "cfg_scale"))
        check_schedule(self.schedule)
        check_schedule(self.cfg_schedule, "cfg_schedule")
        p = AttentionMaskedBlur(
            self.blur_sigma,
            threshold=self.threshold,
            layers=self.layers,  # type: ignore[arg-type]
        )
        object.__setattr__(self, "layers", p.layers)
        object.__setattr__(self, "blur_sigma", p.blur_sigma)
        object.__setattr__(self, "threshold", p.threshold)

    @property
    def perturbation(self) -> AttentionMaskedBlur:
        """The :class:`~smoothguide.sag.AttentionMaskedBlur` spec."""
        layers = cast("tuple[str, ...] | None", self.layers)
        return AttentionMaskedBlur(self.blur_sigma, threshold=self.threshold, layers=layers)

    @property
    def source(self) -> Branch:
        """The branch whose prediction and attention map SAG degrades: ``uncond`` with CFG."""
        return UNCOND if self.cfg_scale != 1.0 else COND

    @property
    def sag_branch(self) -> Branch:
        """The SAG branch (conditioning of :attr:`source`)."""
        return Branch(self.source.conditioning, self.perturbation)

    perturbed = sag_branch
