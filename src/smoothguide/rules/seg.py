"""Smoothed Energy Guidance (Hong 2024), in the official code's and the paper's convention."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, cast

from .._array import Array
from ..branches import Branch
from ..perturbations import LayerSelection, QuerySmoothing
from ..smoothing import Mode
from .base import (
    COND,
    UNCOND,
    StepContext,
    Term,
    branch_output,
    check_scale,
    check_shapes,
    unique_branches,
)
from .cfg import CFG
from .schedules import ALWAYS, Schedule, check_schedule, weight

__all__ = ["CONVENTIONS", "SEG", "Convention"]

Convention = Literal["official", "paper"]
#: Accepted values of ``SEG(convention=...)``.
CONVENTIONS: tuple[str, ...] = ("official", "paper")


@dataclass(frozen=True)
class SEG(Term):
    """Smoothed Energy Guidance: guide away from a prediction with blurred attention queries.

    S. Hong, "Smoothed Energy Guidance: Guiding Diffusion Models with Reduced
    Energy Curvature of Attention", NeurIPS 2024 (arXiv:2408.00760). The
    perturbed branch runs the model with its self-attention queries blurred by a
    Gaussian of width ``sigma`` on the token grid
    (:class:`~smoothguide.perturbations.QuerySmoothing`); ``x̃`` below is that
    branch's output. ``w`` is ``cfg_scale`` (``w = 1``: no CFG).

    ``convention="official"`` (default; SEG-SDXL ``pipeline_seg.py`` and the
    diffusers guider), blurring the *conditional* branch::

        w = 1:   x_c + s (x_c − x̃_c)
        w ≠ 1:   x_u + w (x_c − x_u) + s (x_c − x̃_c)          neutral: s = 0

    ``convention="paper"``, the paper's Eq. 9 (no CFG) and Eq. 10 (with CFG,
    blurring the *unconditional* branch), with ``γ = scale``::

        w = 1:   x + (γ − 1)(x − x̃)         (Eq. 9)          neutral: γ = 1
        w ≠ 1:   x_u + w (x_c − x_u) + γ (x_u − x̃_u)  (Eq. 10)  neutral: γ = 0

    Without CFG both conventions blur the same branch and agree for
    ``s = γ − 1``. "Unconditional SEG" is the ``w = 1`` rule evaluated without a
    prompt: its base branch ``x`` is whatever conditioning the caller passes
    (the ``"cond"`` branch). Whether Eq. 9 or Eq. 10 applies is fixed by
    ``cfg_scale`` at construction, not per step.

    As a term it adds the guidance to the running prediction (CFG part first);
    the schedule's weight ρ multiplies ``s``, ``γ − 1`` or ``γ`` (the
    coefficient whose 0 means "off"), and ``cfg_schedule`` weighs ``w − 1``.
    A neutral step (coefficient 0, or ``sigma = 0`` on every axis, which
    leaves the model unchanged) does not evaluate the blurred branch.

    Parameters
    ----------
    scale
        ``s`` (official) or ``γ`` (paper), ``>= 0``. Default 3.0, the value
        used in the paper and the official code.
    sigma
        Blur width in tokens: a number (height and width), ``(σ_h, σ_w)``,
        ``(σ_t, σ_h, σ_w)``, or ``math.inf`` (every query becomes the mean
        query; the paper's best FID).
    mode
        Boundary mode: ``"reflect"`` (default), ``"mirror"`` (the official
        code's), ``"nearest"``, ``"wrap"``.
    radius
        Kernel radius; ``None`` for the official code's rule, kernel size
        ``ceil(6σ) + 1`` made odd (:func:`~smoothguide.default_radius`).
    layers
        Self-attention layers to blur, passed to the adapter (``None``: its
        default, the paper's SDXL mid block).
    convention
        ``"official"`` or ``"paper"``.
    cfg_scale
        CFG scale ``w >= 0``; 1 disables CFG.
    schedule, cfg_schedule
        Weights of the SEG term and of the CFG term per step.
    heads
        Attention heads to blur (``None``: all), per-head SEG.
    relative
        ``True``: ``sigma`` is a fraction of the token grid's shorter side
        (see :class:`~smoothguide.perturbations.QuerySmoothing`).

    Examples
    --------
    >>> import numpy as np
    >>> from smoothguide.rules import COND, StepContext
    >>> rule = SEG(3.0, sigma=10.0)
    >>> ctx = StepContext(1.0)
    >>> [b.conditioning for b in rule.branches(ctx)]
    ['cond', 'cond']
    >>> outs = {COND: np.array([1.0]), rule.seg_branch: np.array([0.8])}
    >>> rule.combine(outs, ctx)[0]  # 1.0 + 3 * (1.0 - 0.8)
    array([1.6])
    >>> SEG(0.0).branches(ctx) == (COND,)
    True
    """

    scale: float = 3.0
    sigma: float | tuple[float, ...] = math.inf
    mode: Mode = "reflect"
    radius: int | None = None
    layers: LayerSelection = None
    convention: Convention = "official"
    cfg_scale: float = 1.0
    schedule: Schedule = ALWAYS
    cfg_schedule: Schedule = ALWAYS
    heads: tuple[int, ...] | None = None
    relative: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", check_scale(self.scale, "scale"))
        object.__setattr__(self, "cfg_scale", check_scale(self.cfg_scale, "cfg_scale"))
        if self.convention not in CONVENTIONS:
            raise ValueError(f"convention must be one of {CONVENTIONS}, got {self.convention!r}")
        check_schedule(self.schedule)
        check_schedule(self.cfg_schedule, "cfg_schedule")
        p = QuerySmoothing(
            self.sigma,
            mode=self.mode,
            radius=self.radius,
            layers=self.layers,  # type: ignore[arg-type]
            heads=self.heads,
            relative=self.relative,
        )
        object.__setattr__(self, "sigma", p.sigma)
        object.__setattr__(self, "heads", p.heads)
        object.__setattr__(self, "layers", p.layers)

    @property
    def perturbation(self) -> QuerySmoothing:
        """The :class:`~smoothguide.perturbations.QuerySmoothing` spec of the blurred branch."""
        layers = cast("tuple[str, ...] | None", self.layers)  # normalised in __post_init__
        return QuerySmoothing(
            self.sigma,
            mode=self.mode,
            radius=self.radius,
            layers=layers,
            heads=self.heads,
            relative=self.relative,
        )

    @property
    def with_cfg(self) -> bool:
        """Whether the rule includes CFG (``cfg_scale != 1``)."""
        return self.cfg_scale != 1.0

    @property
    def blurred(self) -> str:
        """The conditioning of the blurred branch: ``"uncond"`` only for the paper's Eq. 10."""
        return "uncond" if self.convention == "paper" and self.with_cfg else "cond"

    @property
    def seg_branch(self) -> Branch:
        """The blurred branch, ``Branch(self.blurred, self.perturbation)``."""
        return Branch(self.blurred, self.perturbation)  # type: ignore[arg-type]

    @property
    def cfg(self) -> CFG:
        """The CFG part, ``CFG(cfg_scale, cfg_schedule)``."""
        return CFG(self.cfg_scale, self.cfg_schedule)

    def coefficient(self, ctx: StepContext) -> float:
        """Effective coefficient of the SEG difference at this step (0 when neutral).

        ``ρ s`` (official), ``ρ (γ − 1)`` (paper, Eq. 9) or ``ρ γ`` (paper, Eq. 10).
        """
        if self.perturbation.is_identity:
            return 0.0
        eq9 = self.convention == "paper" and not self.with_cfg
        c = self.scale - 1.0 if eq9 else self.scale
        return weight(self.schedule, ctx) * c

    def branches(self, ctx: StepContext) -> tuple[Branch, ...]:
        """The CFG part's branches, plus the reference and blurred branch when active."""
        own: tuple[Branch, ...] = ()
        if self.coefficient(ctx) != 0.0:
            ref = UNCOND if self.blurred == "uncond" else COND
            own = (ref, self.seg_branch)
        return unique_branches(self.cfg.branches(ctx), own)

    def apply(
        self, pred: Array, outputs: Mapping[Branch, Array], ctx: StepContext, state: Any = None
    ) -> tuple[Array, Any]:
        """Add the CFG part, then ``c · (x_ref − x̃_ref)`` with ``c`` from :meth:`coefficient`."""
        pred, state = self.cfg.apply(pred, outputs, ctx, state)
        c = self.coefficient(ctx)
        if c == 0.0:
            return pred, state
        needed = self.branches(ctx)
        ref = branch_output(outputs, UNCOND if self.blurred == "uncond" else COND, needed)
        blurred = branch_output(outputs, self.seg_branch, needed)
        check_shapes(
            "SEG", pred, outputs, UNCOND if self.blurred == "uncond" else COND, self.seg_branch
        )
        return pred + c * (ref - blurred), state
