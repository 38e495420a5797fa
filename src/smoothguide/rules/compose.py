"""Composition: several guidance terms, each with its own scale and schedule, in order."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .._array import Array
from ..branches import Branch
from ._prediction import Prediction, renoise_branch_of
from .base import COND, StepContext, Term, branch_output, unique_branches

__all__ = ["Compose"]


class Compose(Term):
    """Chain guidance terms: start at ``x_c``, let each term update the prediction in turn.

    ``Compose(t1, t2, ..., tn)`` computes::

        x ← x_c
        x ← t1.apply(x), then t2.apply(x), ..., then tn.apply(x)

    Additive terms (:class:`~smoothguide.rules.CFG`, :class:`~smoothguide.rules.APG`,
    :class:`~smoothguide.rules.SEG`, :class:`~smoothguide.rules.PAG`) each add
    ``ρ_k c_k Δ_k`` built from the branch outputs (not from ``x``), so their order
    only changes rounding; e.g. ``Compose(CFG(w), SEG(s))`` is the official
    CFG + SEG formula ``x_u + w (x_c − x_u) + s (x_c − x̃_c)`` and
    ``Compose(APG(w, ...), SEG(s))`` replaces CFG by its projected form.
    :class:`~smoothguide.rules.Rescale` acts on the ``x`` it receives, so put it
    after the terms it should rescale. The branches needed are the union of the
    terms' branches at that step (always including ``"cond"``); the state is the
    tuple of the terms' states. Compositions nest.

    Parameters
    ----------
    *terms
        Objects with ``branches(ctx)``, ``init_state()`` and
        ``apply(pred, outputs, ctx, state)`` (:class:`~smoothguide.rules.GuidanceTerm`).

    Examples
    --------
    >>> import numpy as np
    >>> from smoothguide.rules import CFG, SEG, COND, UNCOND, StepContext
    >>> seg = SEG(2.0, sigma=1.0)
    >>> rule = Compose(CFG(4.0), seg)
    >>> outs = {UNCOND: np.array([0.0]), COND: np.array([1.0]), seg.seg_branch: np.array([0.5])}
    >>> rule.combine(outs, StepContext(1.0))[0]  # 0 + 4 * (1 - 0) + 2 * (1 - 0.5)
    array([5.])
    """

    __slots__ = ("terms",)
    terms: tuple[Any, ...]

    def __init__(self, *terms: Any) -> None:
        if len(terms) == 0:
            raise ValueError("terms must not be empty: Compose(term, ...) needs at least one term")
        for i, t in enumerate(terms):
            missing = [
                m for m in ("branches", "init_state", "apply") if not callable(getattr(t, m, None))
            ]
            if missing:
                raise TypeError(
                    f"terms[{i}] must be a guidance term with branches(ctx), init_state() and "
                    f"apply(pred, outputs, ctx, state); {type(t).__name__} lacks {missing}"
                )
        object.__setattr__(self, "terms", tuple(terms))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Compose is immutable")

    def __repr__(self) -> str:
        return f"Compose({', '.join(map(repr, self.terms))})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Compose) and self.terms == other.terms

    def __hash__(self) -> int:
        return hash((Compose, self.terms))

    def branches(self, ctx: StepContext) -> tuple[Branch, ...]:
        """``"cond"`` and every term's branches at this step, without duplicates."""
        return unique_branches((COND,), *(t.branches(ctx) for t in self.terms))

    def init_state(self) -> tuple[Any, ...]:
        """The tuple of the terms' initial states."""
        return tuple(t.init_state() for t in self.terms)

    def apply(
        self, pred: Array, outputs: Mapping[Branch, Array], ctx: StepContext, state: Any = None
    ) -> tuple[Array, tuple[Any, ...]]:
        """Apply the terms in order; ``state`` is ``None`` or a tuple with one entry per term."""
        if state is None:
            state = self.init_state()
        if not isinstance(state, tuple) or len(state) != len(self.terms):
            raise ValueError(
                f"state must be None or a tuple of {len(self.terms)} term states "
                f"(from init_state()), got {state!r:.80}"
            )
        new_states = []
        for term, s in zip(self.terms, state, strict=True):
            pred, s = term.apply(pred, outputs, ctx, s)
            new_states.append(s)
        return pred, tuple(new_states)

    def renoise_branch(self, ctx: StepContext) -> Branch | None:
        """The branch a term (CFG++) wants the sampler to re-noise from, or ``None``.

        Raises ``ValueError`` when two terms ask for different branches.
        """
        wanted = {b for b in (renoise_branch_of(t, ctx) for t in self.terms) if b is not None}
        if len(wanted) > 1:
            raise ValueError(
                f"terms ask to re-noise from different branches {sorted(map(repr, wanted))}; "
                "a sampler can re-noise from one"
            )
        return next(iter(wanted), None)

    def combine(
        self, outputs: Mapping[Branch, Array], ctx: StepContext, state: Any = None
    ) -> tuple[Any, tuple[Any, ...]]:
        """Apply the terms to ``x_c``; a :class:`~smoothguide.rules.Prediction` if one re-noises."""
        needed = self.branches(ctx)
        pred, new_state = self.apply(branch_output(outputs, COND, needed), outputs, ctx, state)
        rb = self.renoise_branch(ctx)
        if rb is None:
            return pred, new_state
        return Prediction(pred, branch_output(outputs, rb, needed)), new_state
