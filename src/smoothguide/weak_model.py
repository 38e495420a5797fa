"""A branch evaluated by another model: autoguidance's "bad version" of the main model.

Autoguidance (Karras et al., "Guiding a Diffusion Model with a Bad Version of
Itself", NeurIPS 2024, arXiv:2406.02507) takes its weaker prediction from a
second model (smaller, or trained for less time) rather than from a
perturbation of the main one. :class:`WeakModel` marks such a branch; the
guided denoiser (and :class:`~smoothguide.diffusers.GuidedPipeline`) calls that
model for it, with the branch's conditioning, outside the main batched call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .perturbations import Perturbation

__all__ = ["WeakModel"]


@dataclass(frozen=True)
class WeakModel(Perturbation):
    """Evaluate the branch with ``model`` instead of the main model.

    Parameters
    ----------
    model
        The weaker denoiser, with the main model's calling convention
        (``model(x, sigma, **cond)`` for :class:`~smoothguide.GuidedDenoiser`,
        the pipeline's denoiser signature for ``GuidedPipeline``). Compared by
        identity, so two specs with the same model are the same branch.
    name
        A label shown in ``repr`` (default ``"weak"``).

    Examples
    --------
    >>> weak = lambda x, sigma: 0.5 * x
    >>> WeakModel(weak) == WeakModel(weak), WeakModel(weak).name
    (True, 'weak')
    """

    model: Callable[..., Any] = field(compare=False, repr=False, default=None)  # type: ignore[assignment]
    name: str = "weak"
    _id: int = field(init=False, repr=False, default=0)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not callable(self.model):
            raise TypeError(f"model must be a callable denoiser, got {self.model!r}")
        if self.layers is not None:
            raise ValueError("WeakModel replaces the whole model; it takes no layers")
        # identity of the model, so that equality and hashing do not call the model's __eq__
        object.__setattr__(self, "_id", id(self.model))
