"""Autoguidance (Karras et al., NeurIPS 2024): guide with a weaker model of the same task."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .._array import Array
from ..branches import Branch
from ..weak_model import WeakModel
from .base import COND, StepContext, Term, branch_output, check_scale, check_shapes
from .schedules import ALWAYS, Schedule, check_schedule
from .schedules import weight as schedule_weight

__all__ = ["Autoguidance"]


@dataclass(frozen=True)
class Autoguidance(Term):
    """Guide the main model's prediction away from a weaker model's.

    T. Karras et al., "Guiding a Diffusion Model with a Bad Version of Itself",
    NeurIPS 2024 (arXiv:2406.02507), Eq. 2 with ``w = scale``::

        D_w(x) = D_weak(x) + w (D_main(x) − D_weak(x))          neutral: w = 1

    Both use the caller's conditioning (the ``"cond"`` branch, as in EDM2; an
    unconditional model is called without one). The weak branch is
    :class:`~smoothguide.weak_model.WeakModel`, evaluated by ``model``: one
    extra forward of the weak network. As a
    term it adds ``ρ (w − 1)(x − x_weak)`` to the running prediction, ρ the
    schedule's weight.

    Parameters
    ----------
    scale
        Guidance weight ``w >= 0`` (EDM2 uses about 2–3); 1 switches it off.
    model
        The weak denoiser.
    schedule
        Weight of the term per step.

    Examples
    --------
    >>> import numpy as np
    >>> rule = Autoguidance(2.0, model=lambda x, sigma: 0.9 * x)
    >>> outs = {COND: np.array([1.0]), rule.weak_branch: np.array([0.8])}
    >>> rule.combine(outs, StepContext(1.0))[0]  # 0.8 + 2 * (1.0 - 0.8)
    array([1.2])
    """

    scale: float = 2.0
    model: Callable[..., Any] = field(default=None, compare=False)  # type: ignore[assignment]
    schedule: Schedule = ALWAYS

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", check_scale(self.scale, "scale"))
        check_schedule(self.schedule)
        WeakModel(self.model)  # validates the model

    @property
    def weak_branch(self) -> Branch:
        """The branch the weak model evaluates."""
        return Branch("cond", WeakModel(self.model))

    def coefficient(self, ctx: StepContext) -> float:
        """``ρ (w − 1)``."""
        return schedule_weight(self.schedule, ctx) * (self.scale - 1.0)

    def branches(self, ctx: StepContext) -> tuple[Branch, ...]:
        """``cond``, plus the weak branch when active."""
        if self.coefficient(ctx) == 0.0:
            return (COND,)
        return (COND, self.weak_branch)

    def apply(
        self, pred: Array, outputs: Mapping[Branch, Array], ctx: StepContext, state: Any = None
    ) -> tuple[Array, Any]:
        """Add ``ρ (w − 1)(x_main − x_weak)``."""
        c = self.coefficient(ctx)
        if c == 0.0:
            return pred, state
        needed = self.branches(ctx)
        x_main = branch_output(outputs, COND, needed)
        x_weak = branch_output(outputs, self.weak_branch, needed)
        check_shapes("Autoguidance", pred, outputs, COND, self.weak_branch)
        return pred + c * (x_main - x_weak), state
