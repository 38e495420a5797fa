"""Median-of-repeats wall-clock timing."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["Timing", "measure", "measure_interleaved"]


@dataclass(frozen=True)
class Timing:
    """Wall-clock seconds of the timed repeats of one callable.

    Attributes
    ----------
    times
        Seconds of each timed repeat (the warm-up excluded).
    """

    times: tuple[float, ...]

    @property
    def median(self) -> float:
        """Median seconds."""
        return statistics.median(self.times)

    @property
    def n(self) -> int:
        """Number of timed repeats."""
        return len(self.times)

    @property
    def spread(self) -> float:
        """(max - min) / median of the repeats: how noisy this measurement was."""
        return (max(self.times) - min(self.times)) / self.median if self.median > 0 else 0.0


def measure(
    fn: Callable[[], Any],
    *,
    repeat: int,
    budget_s: float = float("inf"),
    min_repeat: int = 1,
    warmup: int = 1,
    sync: Callable[[], None] | None = None,
) -> Timing:
    """Time ``fn()`` ``repeat`` times after ``warmup`` untimed calls; return every time.

    Repeating stops early once the timed calls took ``budget_s`` seconds in
    total and at least ``min_repeat`` ran, so slow baselines (the official 2-D
    convolution) do not dominate a quick run. ``sync`` (e.g.
    ``torch.cuda.synchronize``) runs after each call, inside the timed region.
    The garbage collector is off while timing.
    """
    if repeat < 1 or min_repeat < 1:
        raise ValueError(f"repeat and min_repeat must be >= 1, got {repeat}, {min_repeat}")
    for _ in range(warmup):
        fn()
        if sync is not None:
            sync()
    times: list[float] = []
    enabled = gc.isenabled()
    gc.disable()
    try:
        total = 0.0
        while len(times) < repeat and (len(times) < min_repeat or total < budget_s):
            t0 = time.perf_counter()
            fn()
            if sync is not None:
                sync()
            dt = time.perf_counter() - t0
            times.append(dt)
            total += dt
    finally:
        if enabled:
            gc.enable()
    return Timing(tuple(times))


def measure_interleaved(
    fns: dict[str, Callable[[], Any]],
    *,
    repeat: int,
    budget_s: float = float("inf"),
    min_repeat: int = 1,
    warmup: int = 1,
    desc: str | None = None,
) -> dict[str, Timing]:
    """Time several callables in round-robin rounds, so load drift hits them alike.

    Each round runs every callable that still needs repeats once; a callable
    stops after ``repeat`` timed calls, or once its timed calls took
    ``budget_s`` seconds in total and at least ``min_repeat`` ran. ``desc``
    shows a tqdm bar with that title (``None``: no bar).
    """
    from tqdm.auto import tqdm

    if repeat < 1 or min_repeat < 1:
        raise ValueError(f"repeat and min_repeat must be >= 1, got {repeat}, {min_repeat}")
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    totals = dict.fromkeys(fns, 0.0)

    def active(k: str) -> bool:
        n = len(times[k])
        return n < repeat and (n < min_repeat or totals[k] < budget_s)

    bar = tqdm(total=len(fns) * repeat, desc=desc, disable=desc is None, leave=False)
    enabled = gc.isenabled()
    gc.disable()
    try:
        while any(active(k) for k in fns):
            for k, fn in fns.items():
                if not active(k):
                    continue
                t0 = time.perf_counter()
                fn()
                dt = time.perf_counter() - t0
                times[k].append(dt)
                totals[k] += dt
                bar.update()
    finally:
        bar.close()
        if enabled:
            gc.enable()
    return {k: Timing(tuple(v)) for k, v in times.items()}
