"""Rule results that ask the sampler to re-noise with a different prediction (CFG++).

Most rules return one array from ``combine``: the guided denoised prediction
``D``, from which a sampler both takes its step target and re-noises
(``ε̂ = (x − D)/σ``). CFG++ (Chung et al., ICLR 2025) separates the two: the step
target is the guided ``D_λ`` but the noise re-added is the unconditional one. A
rule that needs this returns a :class:`Prediction` instead of an array;
:func:`~smoothguide.sampling.sample_euler` and
:func:`~smoothguide.sampling.sample_ddim` honour it, other callers read
``.denoised``. A term inside :class:`~smoothguide.rules.Compose` asks for it by
having a ``renoise_branch(ctx)`` method that returns a branch (or ``None``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .._array import Array
from ..branches import Branch

__all__ = ["Prediction", "denoised_of", "renoise_branch_of", "split_prediction"]


@dataclass(frozen=True)
class Prediction:
    """A guided prediction with the denoised estimate to re-noise from.

    Attributes
    ----------
    denoised
        The step target ``D`` (denoised ``x0`` estimate of the guided model).
    renoise
        The denoised estimate ``D_r`` whose noise ``ε̂_r = (x − D_r)/σ`` the
        sampler re-adds: an Euler / DDIM step becomes ``x' = D + σ' ε̂_r``
        instead of ``x' = D + σ' (x − D)/σ``.

    Examples
    --------
    >>> import numpy as np
    >>> p = Prediction(np.array([1.0]), np.array([0.5]))
    >>> split_prediction(p)
    (array([1.]), array([0.5]))
    >>> split_prediction(np.array([1.0]))
    (array([1.]), None)
    """

    denoised: Array
    renoise: Array


def split_prediction(out: Any) -> tuple[Array, Array | None]:
    """``(denoised, renoise)`` of a rule's result; ``renoise`` is ``None`` for a plain array."""
    if isinstance(out, Prediction):
        return out.denoised, out.renoise
    return out, None


def denoised_of(out: Any) -> Array:
    """The step target of a rule's result (the array itself, or ``Prediction.denoised``)."""
    return out.denoised if isinstance(out, Prediction) else out


def renoise_branch_of(term: Any, ctx: Any) -> Branch | None:
    """The branch ``term`` wants the sampler to re-noise from at ``ctx``, or ``None``."""
    fn = getattr(term, "renoise_branch", None)
    return None if fn is None else fn(ctx)


def with_renoise(
    pred: Array, outputs: Mapping[Branch, Array], branch: Branch | None
) -> Array | Prediction:
    """``pred`` itself when ``branch`` is ``None``, else ``Prediction(pred, outputs[branch])``."""
    if branch is None:
        return pred
    return Prediction(pred, outputs[branch])
