"""CFG rescale (Lin et al. 2024): match the guided prediction's std to the conditional one's."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .._array import Array, compute_dtype, namespace
from ..branches import Branch
from .base import COND, StepContext, Term, branch_output, check_scale, check_shapes
from .schedules import ALWAYS, Schedule, check_schedule, weight

__all__ = ["Rescale"]


@dataclass(frozen=True)
class Rescale(Term):
    """Rescale the running prediction to the standard deviation of ``x_c`` (CFG rescale).

    S. Lin, B. Liu, J. Li, X. Yang, "Common Diffusion Noise Schedules and Sample
    Steps are Flawed", WACV 2024 (arXiv:2305.08891), Sec. 3.4, Eqs. 15-17. With
    ``x`` the prediction so far (e.g. after CFG) and standard deviations taken
    per sample over all non-batch axes::

        x_rescaled = x · std(x_c) / std(x)
        out        = φ x_rescaled + (1 − φ) x            neutral: φ = 0

    It acts on the predictions the denoiser combines (denoised ``x0`` in
    :class:`~smoothguide.sampling.GuidedDenoiser`; diffusers applies it to ε).
    Put it *last* in a :class:`~smoothguide.rules.Compose`, after the terms it
    should rescale: ``Compose(CFG(7.5), Rescale(0.7))`` is "CFG rescale". The
    schedule's weight ρ multiplies φ. A sample with ``std(x) = 0`` is left as is.

    Parameters
    ----------
    phi
        Rescale strength ``φ`` in [0, 1] (the paper uses 0.7).
    schedule
        Weight ρ per step.

    Examples
    --------
    >>> import numpy as np
    >>> from smoothguide.rules import COND, StepContext
    >>> x_c = np.array([[1.0, -1.0]])            # std 1
    >>> out, _ = Rescale(1.0).apply(4 * x_c, {COND: x_c}, StepContext(1.0))
    >>> out
    array([[ 1., -1.]])
    """

    phi: float = 0.7
    schedule: Schedule = ALWAYS

    def __post_init__(self) -> None:
        phi = check_scale(self.phi, "phi")
        if phi > 1.0:
            raise ValueError(f"phi must be in [0, 1], got {self.phi!r}")
        object.__setattr__(self, "phi", phi)
        check_schedule(self.schedule)

    def coefficient(self, ctx: StepContext) -> float:
        """Effective strength ``ρ φ`` at this step."""
        return weight(self.schedule, ctx) * self.phi

    def branches(self, ctx: StepContext) -> tuple[Branch, ...]:
        """Only the conditional branch."""
        return (COND,)

    def apply(
        self, pred: Array, outputs: Mapping[Branch, Array], ctx: StepContext, state: Any = None
    ) -> tuple[Array, Any]:
        """``ρφ · pred · std(x_c)/std(pred) + (1 − ρφ) · pred``; ``pred`` itself when neutral."""
        c = self.coefficient(ctx)
        if c == 0.0:
            return pred, state
        x_c = branch_output(outputs, COND, (COND,))
        check_shapes("Rescale", pred, outputs, COND)
        xp = namespace(pred, x_c)
        if pred.ndim < 2:
            raise ValueError(
                "Rescale needs predictions of shape (batch, ...) with at least one non-batch "
                f"axis, got shape {tuple(pred.shape)}"
            )
        axes = tuple(range(1, pred.ndim))
        work = compute_dtype(xp, pred.dtype, "outputs")
        std_c = xp.std(xp.astype(x_c, work), axis=axes, keepdims=True)
        std_x = xp.std(xp.astype(pred, work), axis=axes, keepdims=True)
        positive = std_x > 0
        ratio = xp.where(positive, std_c / xp.where(positive, std_x, 1.0), 1.0)
        factor = xp.astype(c * ratio + (1.0 - c), pred.dtype)
        return pred * factor, state
