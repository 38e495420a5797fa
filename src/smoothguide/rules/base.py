"""The guidance-rule protocol: which branches a rule needs and how it combines them.

A rule never calls the model. At every sampling step the sampler (or
:class:`~smoothguide.sampling.GuidedDenoiser`) asks the rule which
:class:`~smoothguide.branches.Branch` outputs it needs *at this step*, evaluates
exactly those (batched into one forward call where possible) and hands the
outputs back to :meth:`GuidanceRule.combine`.

Two protocols live here:

- :class:`GuidanceRule`, what samplers talk to: ``branches(ctx)``,
  ``init_state()`` and ``combine(outputs, ctx, state) -> (prediction, state)``.
- :class:`GuidanceTerm`, what :class:`~smoothguide.rules.Compose` chains:
  ``branches(ctx)``, ``init_state()`` and ``apply(pred, outputs, ctx, state)``,
  which updates a running prediction that starts at the conditional output.
  :class:`Term` turns a term into a rule (its ``combine`` starts from the
  ``"cond"`` output), so every built-in rule is both.

State is explicit: a rule object holds no mutable state. A stateful rule (APG's
momentum) returns its new state from ``combine``; the caller keeps it, so one rule
object can serve any number of samplers at once.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from .._array import Array
from ..branches import Branch

__all__ = [
    "COND",
    "UNCOND",
    "GuidanceRule",
    "GuidanceTerm",
    "StepContext",
    "Term",
    "branch_output",
]

#: The conditional prediction ``x_c``: the model with the caller's conditioning.
COND = Branch("cond")
#: The unconditional prediction ``x_u``: the model with the null conditioning.
UNCOND = Branch("uncond")


@dataclass(frozen=True)
class StepContext:
    """Where a sampling step is: its noise level and, when known, its index.

    Parameters
    ----------
    sigma
        Noise level σ of the step (the k-diffusion / EDM σ, ``x = x0 + σ ε``).
    step
        Index of the step, ``0 <= step < num_steps``, or ``None`` when unknown
        (a plain k-diffusion sampler only passes σ).
    num_steps
        Number of denoiser evaluations of the run, or ``None``.

    Examples
    --------
    >>> ctx = StepContext(sigma=2.5, step=3, num_steps=7)
    >>> ctx.progress
    0.5
    >>> StepContext(1.0).progress is None
    True
    """

    sigma: float
    step: int | None = None
    num_steps: int | None = None

    def __post_init__(self) -> None:
        s = self.sigma
        if isinstance(s, bool) or not isinstance(s, numbers.Real) or not (float(s) >= 0):
            raise ValueError(f"sigma must be a real number >= 0, got {s!r}")
        object.__setattr__(self, "sigma", float(s))
        if (self.step is None) != (self.num_steps is None):
            raise ValueError(
                "step and num_steps must be given together, got "
                f"step={self.step!r}, num_steps={self.num_steps!r}"
            )
        if self.num_steps is not None:
            n = self.num_steps
            if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
                raise ValueError(f"num_steps must be an int >= 1, got {n!r}")
            i = self.step
            if isinstance(i, bool) or not isinstance(i, numbers.Integral) or not 0 <= i < n:
                raise ValueError(f"step must be an int in [0, num_steps={n}), got {i!r}")

    @property
    def progress(self) -> float | None:
        """Fraction of the run done: ``step / (num_steps - 1)``; 0 at the first step, 1 at the last.

        ``None`` when the step is unknown. A run of a single step has progress 0.
        """
        if self.step is None or self.num_steps is None:
            return None
        return self.step / (self.num_steps - 1) if self.num_steps > 1 else 0.0


@runtime_checkable
class GuidanceRule(Protocol):
    """A guidance rule: the branches it needs at a step and how it combines them.

    ``branches(ctx)`` lists the branch outputs needed at step ``ctx``; a rule
    that is neutral at that step (scale that means "off", outside its
    schedule) leaves its extra branches out, so they are never evaluated.
    ``combine(outputs, ctx, state)`` receives a mapping from each listed branch
    to its output and returns ``(prediction, new_state)``. ``init_state()``
    returns the state of a fresh sampling run (``None`` for stateless rules).

    Examples
    --------
    >>> from smoothguide.rules import CFG
    >>> isinstance(CFG(2.0), GuidanceRule)
    True
    >>> [b.conditioning for b in CFG(2.0).branches(StepContext(1.0))]
    ['uncond', 'cond']
    """

    def branches(self, ctx: StepContext) -> tuple[Branch, ...]:  # pragma: no cover - protocol
        ...

    def init_state(self) -> Any:  # pragma: no cover - protocol
        ...

    def combine(
        self, outputs: Mapping[Branch, Array], ctx: StepContext, state: Any = None
    ) -> tuple[Array, Any]:  # pragma: no cover - protocol
        ...


@runtime_checkable
class GuidanceTerm(Protocol):
    """One term of a composed rule: it updates a running prediction.

    ``apply(pred, outputs, ctx, state)`` returns ``(new_pred, new_state)``; an
    inactive term returns ``pred`` itself (the same object) so that neutral
    settings reproduce the unguided prediction bit for bit.

    Examples
    --------
    >>> import numpy as np
    >>> from smoothguide.rules import Rescale
    >>> x = np.array([[1.0, -1.0]])
    >>> Rescale(0.0).apply(x, {COND: x}, StepContext(1.0))[0] is x  # neutral: same object
    True
    """

    def branches(self, ctx: StepContext) -> tuple[Branch, ...]:  # pragma: no cover - protocol
        ...

    def init_state(self) -> Any:  # pragma: no cover - protocol
        ...

    def apply(
        self, pred: Array, outputs: Mapping[Branch, Array], ctx: StepContext, state: Any = None
    ) -> tuple[Array, Any]:  # pragma: no cover - protocol
        ...


class Term:
    """Base class for terms that start from the conditional output ``x_c``.

    Subclasses implement ``branches(ctx)`` and ``apply(pred, outputs, ctx, state)``;
    this class adds ``combine`` (``apply`` with ``pred = outputs[COND]``), so a
    term is a complete :class:`GuidanceRule` and composes with
    :class:`~smoothguide.rules.Compose`. Stateless terms keep the default
    ``init_state() -> None``.

    Examples
    --------
    >>> import numpy as np
    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class Double(Term):
    ...     def branches(self, ctx):
    ...         return (COND,)
    ...     def apply(self, pred, outputs, ctx, state=None):
    ...         return 2 * pred, state
    >>> Double().combine({COND: np.array([1.5])}, StepContext(1.0))
    (array([3.]), None)
    """

    def branches(self, ctx: StepContext) -> tuple[Branch, ...]:
        raise NotImplementedError  # pragma: no cover

    def apply(
        self, pred: Array, outputs: Mapping[Branch, Array], ctx: StepContext, state: Any = None
    ) -> tuple[Array, Any]:
        raise NotImplementedError  # pragma: no cover

    def init_state(self) -> Any:
        """State of a fresh sampling run: ``None`` (stateless)."""
        return None

    def combine(
        self, outputs: Mapping[Branch, Array], ctx: StepContext, state: Any = None
    ) -> tuple[Array, Any]:
        """Apply this term to the conditional output; see :class:`GuidanceRule`."""
        return self.apply(branch_output(outputs, COND, self.branches(ctx)), outputs, ctx, state)


def branch_output(
    outputs: Mapping[Branch, Array], branch: Branch, needed: tuple[Branch, ...] = ()
) -> Array:
    """``outputs[branch]``, or a ``ValueError`` naming ``outputs`` and the missing branch.

    Parameters
    ----------
    outputs
        Branch outputs handed to a rule.
    branch
        The branch wanted.
    needed
        All branches the rule needs at this step, for the error message.

    Returns
    -------
    array
        ``outputs[branch]``.

    Examples
    --------
    >>> branch_output({COND: 1.0}, COND)
    1.0
    >>> branch_output({COND: 1.0}, UNCOND)
    Traceback (most recent call last):
    ...
    ValueError: outputs is missing branch Branch(conditioning='uncond', perturbation=None) ...
    """
    if not isinstance(outputs, Mapping):
        raise TypeError(
            f"outputs must be a mapping from Branch to array, got {type(outputs).__name__}"
        )
    try:
        return outputs[branch]
    except KeyError:
        need = ", ".join(map(repr, needed or (branch,)))
        have = ", ".join(map(repr, outputs)) or "nothing"
        raise ValueError(
            f"outputs is missing branch {branch!r} (the rule needs: {need}; got: {have})"
        ) from None


def _name(branch: Branch) -> str:
    p = branch.perturbation
    return f"{branch.conditioning!r}" if p is None else f"{branch.conditioning!r} + {p!r}"


def check_shapes(
    rule: str, pred: Array, outputs: Mapping[Branch, Array], *branches: Branch
) -> None:
    """Raise ``ValueError`` unless ``pred`` and each ``outputs[b]`` share one shape.

    Guidance formulas such as ``x_u + w (x_c − x_u)`` would otherwise broadcast
    outputs of different shapes (``(2, 1)`` with ``(2, 4)``) into a silently wrong
    result. Arrays without a ``shape`` (Python numbers) are not checked.

    Examples
    --------
    >>> import numpy as np
    >>> check_shapes("CFG", np.zeros((2, 4)), {COND: np.zeros((2, 4)), UNCOND: np.zeros((2, 1))},
    ...              COND, UNCOND)
    Traceback (most recent call last):
    ...
    ValueError: CFG: branch outputs must all have one shape (no broadcasting), got ...
    """
    shapes: dict[str, tuple[int, ...]] = {}
    ps = getattr(pred, "shape", None)
    if ps is not None:
        shapes["the running prediction"] = tuple(ps)
    for b in branches:
        s = getattr(outputs.get(b), "shape", None)
        if s is not None:
            shapes[f"branch {_name(b)}"] = tuple(s)
    if len(set(shapes.values())) > 1:
        listing = "; ".join(f"{k} has shape {v}" for k, v in shapes.items())
        raise ValueError(
            f"{rule}: branch outputs must all have one shape (no broadcasting), got {listing}"
        )


def check_scale(value: object, name: str, *, minimum: float | None = 0.0) -> float:
    """Validate a finite real scale, ``>= minimum`` unless ``minimum`` is ``None``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or (minimum is not None and v < minimum):
        bound = "" if minimum is None else f" >= {minimum:g}"
        raise ValueError(f"{name} must be a finite real number{bound}, got {value!r}")
    return v


def unique_branches(*groups: tuple[Branch, ...]) -> tuple[Branch, ...]:
    """Concatenate branch tuples, keeping the first occurrence of each branch."""
    seen: dict[Branch, None] = {}
    for group in groups:
        for b in group:
            seen.setdefault(b, None)
    return tuple(seen)
