"""Schedules: a weight ρ ≥ 0 per sampling step that any guidance term can carry.

A term's effective coefficient at a step is ``ρ(ctx) · c`` where ``c`` is the
coefficient whose value 0 switches the term off (``w − 1`` for CFG, ``s`` for
official SEG, ...; see ``docs/rules.md``). ``ρ = 0`` makes the term neutral at that
step, and the branches only it needs are not evaluated.

Schedules read a :class:`~smoothguide.rules.StepContext` on one of two axes:

- ``on="sigma"``: the noise level σ of the step;
- ``on="progress"``: the fraction of the run done, ``p = step / (num_steps − 1)``,
  0 at the first step and 1 at the last. It needs the step index, which
  :mod:`smoothguide.sampling`'s samplers pass.

:class:`Interval` also takes ``on="diffusers"``: the convention of diffusers'
guiders (``ClassifierFreeGuidance(start=, stop=)``, ``BaseGuidance``), the step
indices ``int(lo·N) <= step < int(hi·N)`` (``N = num_steps``), which is *not* the
closed progress interval (N = 25, hi = 0.5: 12 steps, where ``p <= 0.5`` holds for 13).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from .base import StepContext, check_scale

__all__ = ["ALWAYS", "AXES", "Constant", "CosineRamp", "Interval", "LinearRamp", "Schedule"]

Axis = Literal["sigma", "progress"]
#: Accepted values of ``on`` (of every schedule).
AXES: tuple[str, ...] = ("sigma", "progress")
#: Accepted values of :class:`Interval`'s ``on``: also diffusers' step convention.
INTERVAL_AXES: tuple[str, ...] = (*AXES, "diffusers")


@runtime_checkable
class Schedule(Protocol):
    """A weight per step: ``schedule(ctx) -> float >= 0``; any such callable works.

    Examples
    --------
    >>> from smoothguide.rules import CFG
    >>> late = CFG(5.0, schedule=lambda ctx: 1.0 if ctx.sigma < 1.0 else 0.0)
    >>> len(late.branches(StepContext(2.0))), len(late.branches(StepContext(0.5)))
    (1, 2)
    """

    def __call__(self, ctx: StepContext) -> float:  # pragma: no cover - protocol
        ...


def check_schedule(schedule: object, name: str = "schedule") -> None:
    """Raise ``TypeError`` naming ``name`` unless ``schedule`` is callable."""
    if not callable(schedule):
        raise TypeError(
            f"{name} must be a schedule (Constant, Interval, LinearRamp, CosineRamp or "
            f"a callable StepContext -> float), got {schedule!r}"
        )


def weight(schedule: Schedule, ctx: StepContext, name: str = "schedule") -> float:
    """Evaluate ``schedule`` at ``ctx`` and check the result is a finite real ``>= 0``."""
    value = schedule(ctx)
    return check_scale(value, f"{name}(ctx)")


def _check_on(on: object, accepted: tuple[str, ...] = AXES) -> None:
    if on not in accepted:
        raise ValueError(f"on must be one of {accepted}, got {on!r}")


def _value(ctx: StepContext, on: str) -> float:
    if on == "sigma":
        return ctx.sigma
    p = ctx.progress
    if p is None:
        raise ValueError(
            f"a schedule with on={on!r} needs the step index, but the StepContext has "
            "step=None; use smoothguide.sampling's samplers, pass sigmas=... to "
            "GuidedDenoiser, or schedule on='sigma'"
        )
    return p


def _check_bounds(lo: object, hi: object, on: str, *, strict: bool) -> tuple[float, float]:
    """Validate ``0 <= lo <= hi`` (``<`` if ``strict``); ``hi = inf`` only for σ intervals."""
    lo_f = check_scale(lo, "lo")
    inf_ok = on == "sigma" and not strict
    if inf_ok and isinstance(hi, numbers.Real) and not isinstance(hi, bool) and hi == math.inf:
        hi_f = math.inf
    else:
        hi_f = check_scale(hi, "hi")
    if lo_f > hi_f or (strict and lo_f == hi_f):
        rel = "<" if strict else "<="
        raise ValueError(f"lo must be {rel} hi, got lo={lo!r}, hi={hi!r}")
    if on != "sigma" and hi_f > 1.0:
        raise ValueError(f"hi must be <= 1 with on={on!r}, got {hi!r}")
    return lo_f, hi_f


@dataclass(frozen=True)
class Constant:
    """The same weight at every step.

    Parameters
    ----------
    value
        Weight ρ ≥ 0 (default 1: the term at its full scale).

    Examples
    --------
    >>> Constant()(StepContext(sigma=3.0))
    1.0
    """

    value: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "value", check_scale(self.value, "value"))

    def __call__(self, ctx: StepContext) -> float:
        """Return ``value``."""
        return self.value


#: The default schedule of every term: weight 1 at every step.
ALWAYS = Constant()


@dataclass(frozen=True)
class Interval:
    """Guidance interval: weight 1 inside an interval, 0 outside.

    Three conventions, one per ``on``:

    - ``"sigma"``: the half-open ``σ ∈ (lo, hi]`` of Kynkäänniemi et al. 2024
      ("Applying guidance in a limited interval improves sample and distribution
      quality in diffusion models", NeurIPS 2024), who apply CFG only there.
    - ``"progress"``: the closed ``p ∈ [lo, hi]``, ``p = step / (num_steps − 1)``.
    - ``"diffusers"``: diffusers' guiders' ``start=lo`` / ``stop=hi`` exactly
      (``BaseGuidance._is_cfg_enabled``, diffusers 0.35+): half-open on step indices,
      ``int(lo · N) <= step < int(hi · N)`` with ``N = num_steps``.

    Parameters
    ----------
    lo, hi
        Bounds, ``0 <= lo <= hi``; ``hi`` may be ``math.inf`` on σ; on progress
        and diffusers ``hi <= 1``.
    on
        ``"sigma"`` (default), ``"progress"`` or ``"diffusers"``; the last two need
        the step index (``StepContext.step``).

    Examples
    --------
    >>> iv = Interval(0.28, 5.42)  # EDM2-XS values of Kynkäänniemi et al.
    >>> [iv(StepContext(s)) for s in (10.0, 5.42, 1.0, 0.28)]
    [0.0, 1.0, 1.0, 0.0]
    >>> Interval(0.0, 0.5, on="progress")(StepContext(1.0, step=1, num_steps=3))
    1.0
    >>> first_half = Interval(0.0, 0.5, on="diffusers")  # stop=0.5, N=3: int(1.5) = 1
    >>> [first_half(StepContext(1.0, step=i, num_steps=3)) for i in range(3)]
    [1.0, 0.0, 0.0]
    """

    lo: float = 0.0
    hi: float = math.inf
    on: Literal["sigma", "progress", "diffusers"] = "sigma"

    def __post_init__(self) -> None:
        _check_on(self.on, INTERVAL_AXES)
        lo, hi = _check_bounds(self.lo, self.hi, self.on, strict=False)
        object.__setattr__(self, "lo", lo)
        object.__setattr__(self, "hi", hi)

    def __call__(self, ctx: StepContext) -> float:
        """1.0 inside the interval, 0.0 outside."""
        if self.on == "diffusers":
            _value(ctx, self.on)  # raises the step-index error when step is unknown
            n, step = ctx.num_steps, ctx.step
            assert n is not None
            assert step is not None
            # diffusers' BaseGuidance._is_cfg_enabled, the same float product and int().
            inside = int(self.lo * n) <= step < int(self.hi * n)
        else:
            v = _value(ctx, self.on)
            inside = (self.lo < v <= self.hi) if self.on == "sigma" else (self.lo <= v <= self.hi)
        return 1.0 if inside else 0.0


def _ramp_position(ctx: StepContext, on: str, lo: float, hi: float) -> float:
    """0 at the start of the ramp, 1 at its end, clipped (σ decreases as sampling goes on)."""
    v = _value(ctx, on)
    u = (v - lo) / (hi - lo) if on == "progress" else (hi - v) / (hi - lo)
    return min(1.0, max(0.0, u))


@dataclass(frozen=True)
class LinearRamp:
    """A weight that moves linearly from ``start`` to ``end`` over a stretch of the run.

    With ``u`` the position in the stretch (0 before it, 1 after it), the weight
    is ``start + (end − start) · u``. On progress ``u = (p − lo)/(hi − lo)``; on σ
    ``u = (hi − σ)/(hi − lo)`` (σ falls during sampling, so the ramp starts at
    ``σ = hi``); ``u`` is clipped to [0, 1].

    Parameters
    ----------
    start, end
        Weights (≥ 0) at the start and end of the ramp.
    lo, hi
        The stretch, ``lo < hi``, both finite (progress: within [0, 1]).
    on
        ``"progress"`` (default) or ``"sigma"``.

    Examples
    --------
    >>> ramp = LinearRamp(0.0, 1.0)
    >>> [ramp(StepContext(1.0, step=i, num_steps=5)) for i in range(5)]
    [0.0, 0.25, 0.5, 0.75, 1.0]
    """

    start: float = 1.0
    end: float = 0.0
    lo: float = 0.0
    hi: float = 1.0
    on: Axis = "progress"

    def __post_init__(self) -> None:
        _check_on(self.on)
        object.__setattr__(self, "start", check_scale(self.start, "start"))
        object.__setattr__(self, "end", check_scale(self.end, "end"))
        lo, hi = _check_bounds(self.lo, self.hi, self.on, strict=True)
        object.__setattr__(self, "lo", lo)
        object.__setattr__(self, "hi", hi)

    def __call__(self, ctx: StepContext) -> float:
        """``start + (end − start) · u``."""
        u = _ramp_position(ctx, self.on, self.lo, self.hi)
        return self.start + (self.end - self.start) * u


@dataclass(frozen=True)
class CosineRamp:
    """Like :class:`LinearRamp` with a cosine easing: ``start + (end − start)(1 − cos πu)/2``.

    Parameters
    ----------
    start, end, lo, hi, on
        As in :class:`LinearRamp`.

    Examples
    --------
    >>> ramp = CosineRamp(1.0, 0.0)
    >>> [round(ramp(StepContext(1.0, step=i, num_steps=3)), 12) for i in range(3)]
    [1.0, 0.5, 0.0]
    """

    start: float = 1.0
    end: float = 0.0
    lo: float = 0.0
    hi: float = 1.0
    on: Axis = "progress"

    def __post_init__(self) -> None:
        _check_on(self.on)
        object.__setattr__(self, "start", check_scale(self.start, "start"))
        object.__setattr__(self, "end", check_scale(self.end, "end"))
        lo, hi = _check_bounds(self.lo, self.hi, self.on, strict=True)
        object.__setattr__(self, "lo", lo)
        object.__setattr__(self, "hi", hi)

    def __call__(self, ctx: StepContext) -> float:
        """``start + (end − start) · (1 − cos(π u)) / 2``."""
        u = _ramp_position(ctx, self.on, self.lo, self.hi)
        eased = 0.0 if u == 0.0 else 1.0 if u == 1.0 else (1.0 - math.cos(math.pi * u)) / 2.0
        return self.start + (self.end - self.start) * eased
