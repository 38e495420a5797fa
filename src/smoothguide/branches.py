"""Branches: the model evaluations a guidance rule asks for, and how a model runs them.

A branch is a (conditioning, perturbation) pair. ``Branch("uncond")`` is the
unconditional prediction, ``Branch("cond")`` the conditional one and
``Branch("cond", QuerySmoothing(10.0))`` the conditional prediction with SEG's
blurred queries. Rules only *name* branches; samplers evaluate them, batched into
one model call where possible, and pass the outputs back by branch.

The model side is the :class:`Perturber` protocol: given a perturbation and the
batch rows it applies to, it returns a context manager inside which one ordinary
forward call of the model applies that perturbation to those rows only. The torch
adapters implement it for real networks; the tests implement it for a pure
array-API attention model.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from .perturbations import Perturbation

__all__ = ["CONDITIONINGS", "Branch", "Conditioning", "Perturber"]

Conditioning = Literal["cond", "uncond"]
#: Accepted conditioning names: ``"cond"`` (the user's condition) and ``"uncond"``
#: (the null condition: empty prompt, null class, or no conditioning at all).
CONDITIONINGS: tuple[str, ...] = ("cond", "uncond")


@dataclass(frozen=True)
class Branch:
    """One model evaluation: a conditioning and an optional perturbation.

    Parameters
    ----------
    conditioning
        ``"cond"`` or ``"uncond"``.
    perturbation
        ``None`` for the plain model, else a :class:`~smoothguide.perturbations.Perturbation`.

    Examples
    --------
    >>> from smoothguide.perturbations import QuerySmoothing
    >>> Branch("cond", QuerySmoothing(2.0)).conditioning
    'cond'
    """

    conditioning: Conditioning
    perturbation: Perturbation | None = None

    def __post_init__(self) -> None:
        if self.conditioning not in CONDITIONINGS:
            raise ValueError(
                f"conditioning must be one of {CONDITIONINGS}, got {self.conditioning!r}"
            )
        if self.perturbation is not None and not isinstance(self.perturbation, Perturbation):
            raise TypeError(
                "perturbation must be None or a smoothguide.perturbations.Perturbation, "
                f"got {type(self.perturbation).__name__}"
            )


@runtime_checkable
class Perturber(Protocol):
    """How a model is asked to run some batch rows under a perturbation.

    ``perturb(p, rows)`` returns a context manager; inside it, the next forward
    calls of the model apply ``p`` to the batch rows ``rows`` (indices into the
    batch the model is called with) and leave every other row bit-identical to
    an unperturbed call. Several contexts may be active at once for disjoint rows.
    On exit the model is exactly as before, also after an exception.
    """

    def perturb(
        self, perturbation: Perturbation, rows: Sequence[int]
    ) -> AbstractContextManager[None]:  # pragma: no cover - protocol
        ...
