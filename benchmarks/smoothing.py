"""Benchmark 1: query smoothing at SDXL attention shapes, side by side with the alternatives."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from .config import Config
from .methods import METHODS, Case, NotApplicable, differences
from .timing import Timing, measure_interleaved

__all__ = ["GOAL_SHAPE", "Row", "run_smoothing"]

#: The shape at which the issue's goals are stated.
GOAL_SHAPE = (2, 10, 64, 64, 64)


@dataclass
class Row:
    """Timings and differences of every method at one (shape, sigma)."""

    case: Case
    times: dict[str, Timing] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    diffs: dict[str, float | str] = field(default_factory=dict)

    def median(self, key: str) -> float | None:
        t = self.times.get(key)
        return None if t is None else t.median

    def ratio(self, num: str, den: str) -> float | None:
        a, b = self.median(num), self.median(den)
        return None if a is None or b is None or b == 0 else a / b

    @property
    def official_key(self) -> str:
        """``"official"`` on square grids, ``"official_hw"`` (labelled) otherwise."""
        return "official" if self.case.square else "official_hw"


def _cases(config: Config) -> Iterable[tuple[Case, float]]:
    for b, h, gh, gw, d in config.shapes:
        base = Case(b, h, gh, gw, d, config.sigmas[0])
        for sigma in config.sigmas:
            yield base.with_sigma(sigma), sigma


def run_smoothing(config: Config, *, progress: bool = True) -> list[Row]:
    """Time every method at every (shape, sigma) of ``config``; compute the differences."""
    rows: list[Row] = []
    per_shape: dict[tuple[int, ...], dict[str, Timing]] = {}
    cases = list(_cases(config))
    for case, _sigma in tqdm(cases, desc="smoothing", disable=not progress):
        row = Row(case)
        key_shape = (case.batch, case.heads, case.height, case.width, case.dim)
        shared = per_shape.setdefault(key_shape, {})
        fns = {}
        for method in METHODS:
            if method.per_shape and method.key in shared:
                row.times[method.key] = shared[method.key]
                continue
            try:
                fns[method.key] = method.prepare(case)
            except NotApplicable as exc:
                row.skipped[method.key] = str(exc)
        timings = measure_interleaved(
            fns,
            repeat=config.repeat,
            budget_s=config.budget_s,
            min_repeat=config.min_repeat,
        )
        row.times.update(timings)
        for method in METHODS:
            if method.per_shape and method.key in timings:
                shared[method.key] = timings[method.key]
        row.diffs = differences(case)
        rows.append(row)
    return rows


def goal_rows(rows: list[Row]) -> dict[str, Row]:
    """The rows at the goal shape: ``{"10": row at sigma=10, "inf": row at sigma=inf}``."""
    out: dict[str, Row] = {}
    for row in rows:
        c = row.case
        if (c.batch, c.heads, c.height, c.width, c.dim) != GOAL_SHAPE:
            continue
        if c.sigma == 10.0:
            out["10"] = row
        elif math.isinf(c.sigma):
            out["inf"] = row
    return out
