"""Fork plans: which batch rows a perturbed branch shares with its source branch (framework-free).

A perturbed branch such as SEG's ``Branch("cond", QuerySmoothing(σ))`` gets the
same inputs as the plain ``Branch("cond")`` and computes the same values until
its first perturbed layer runs. In fork mode the model computes that shared
prefix once: the call still receives every row (so wrappers around the model
see the usual batch), but a forking perturber (:class:`ForkingPerturber`,
e.g. :class:`smoothguide.torch.AttentionPatcher`) runs only the rows of the
*pre-fork* branches until each perturbed branch's fork point, where it
duplicates the source rows. This module only plans the row layout; the torch
side (:mod:`smoothguide.torch.fork`) does the rest.

Layout of a forked call (``batch`` rows per branch): the pre-fork branches
first (the plain branches, then perturbed branches that cannot fork because
their plain branch is not evaluated), then the forked branches grouped by fork
point in execution order. The rows in effect after the ``k``-th fork point are
a prefix of that layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from ..branches import Branch
from ..perturbations import IdentityAttention, Perturbation, QuerySmoothing

__all__ = ["ForkPlan", "ForkSpec", "ForkingPerturber", "plan_fork"]


@dataclass(frozen=True)
class ForkSpec:
    """Row bookkeeping of one forked model call.

    Parameters
    ----------
    rows
        Rows the model is called with (every branch's rows, in the plan's order).
    pre
        Rows computed from the model input on (the pre-fork branches).
    stages
        ``(fork-point name, sources)`` in execution order: at that point the
        batch grows by ``len(sources)`` rows, row ``i`` a copy of pre-fork row
        ``sources[i]``.

    Examples
    --------
    ``[uncond, cond]`` until ``mid_block``, where a copy of ``cond`` (row 1) joins:

    >>> spec = ForkSpec(rows=3, pre=2, stages=(("mid_block", (1,)),))
    >>> spec.sizes, spec.sources
    ((2, 3), (0, 1, 1))
    """

    rows: int
    pre: int
    stages: tuple[tuple[str, tuple[int, ...]], ...]

    def __post_init__(self) -> None:
        total = self.pre + sum(len(s) for _, s in self.stages)
        if total != self.rows or not self.stages or any(not s for _, s in self.stages):
            raise ValueError(f"inconsistent fork spec: {self}")
        if any(not 0 <= r < self.pre for _, s in self.stages for r in s):
            raise ValueError(f"fork sources must be pre-fork rows (< {self.pre}): {self}")

    @property
    def sizes(self) -> tuple[int, ...]:
        """Rows in effect before the first fork and after each one."""
        out = [self.pre]
        for _, s in self.stages:
            out.append(out[-1] + len(s))
        return tuple(out)

    @property
    def sources(self) -> tuple[int, ...]:
        """For every row of the call, the pre-fork row it copies (itself for pre-fork rows)."""
        return tuple(range(self.pre)) + tuple(r for _, s in self.stages for r in s)


@runtime_checkable
class ForkingPerturber(Protocol):
    """A :class:`~smoothguide.branches.Perturber` that can run a call in fork mode.

    ``fork_point(p)`` names the module where branches perturbed by ``p`` fork
    and its execution rank (raises ``ValueError`` where it cannot fork);
    ``fork_proven`` says whether fork mode is exact for this model (then it is
    on by default); ``forking(spec)`` is a context manager inside which the
    next model call runs as :class:`ForkSpec` says.
    """

    fork_proven: bool

    def fork_point(
        self, perturbation: Perturbation
    ) -> tuple[str, Any]:  # pragma: no cover - protocol
        ...

    def forking(self, spec: ForkSpec) -> AbstractContextManager[None]:  # pragma: no cover
        ...


@dataclass(frozen=True)
class ForkPlan:
    """The branch order of a forked call and its :class:`ForkSpec` (from :func:`plan_fork`).

    Parameters
    ----------
    order
        Branches in row order: pre-fork branches, then forked ones by fork point.
    spec
        The rows' bookkeeping.

    Examples
    --------
    >>> plan = ForkPlan([Branch("cond")], ForkSpec(2, 1, (("block", (0,)),)))
    >>> plan.spec.sizes
    (1, 2)
    """

    order: list[Branch]
    spec: ForkSpec


def plan_fork(
    order: Sequence[Branch], perturber: Any, fork: bool | None, batch: int
) -> ForkPlan | None:
    """Plan a forked call of the branches ``order``, or ``None`` for the plain batched call.

    Parameters
    ----------
    order
        Branches in batch order (:func:`~smoothguide.sampling.batch_order`).
    perturber
        The perturber; it must be a :class:`ForkingPerturber` when ``fork`` is ``True``.
    fork
        ``True``: fork (error if the perturber cannot); ``False``: never;
        ``None``: fork when the perturber's ``fork_proven`` is true.
    batch
        Rows per branch.

    Returns
    -------
    ForkPlan or None
        ``None`` when fork mode is off or no perturbed branch has its plain
        branch in ``order`` (nothing is shared).

    Raises
    ------
    TypeError
        ``fork=True`` with a perturber that cannot fork.
    ValueError
        Where the perturber cannot fork a perturbation (its message says why).

    Examples
    --------
    >>> from smoothguide.perturbations import QuerySmoothing
    >>> class Blocks:  # a perturber whose every perturbation forks at "blocks.1"
    ...     fork_proven = True
    ...     def perturb(self, p, rows): ...
    ...     def fork_point(self, p): return "blocks.1", 1
    ...     def forking(self, spec): ...
    >>> seg = Branch("cond", QuerySmoothing(2.0))
    >>> plan = plan_fork([Branch("uncond"), Branch("cond"), seg], Blocks(), None, batch=2)
    >>> plan.spec
    ForkSpec(rows=6, pre=4, stages=(('blocks.1', (2, 3)),))
    """
    if fork is not None and not isinstance(fork, bool):
        raise TypeError(f"fork must be True, False or None (automatic), got {fork!r}")
    if fork is False:
        return None
    capable = isinstance(perturber, ForkingPerturber)
    if fork is None and not (capable and bool(perturber.fork_proven)):
        return None
    if not capable:
        raise TypeError(
            "fork=True needs a perturber that can fork (fork_point, fork_proven, forking), such "
            f"as smoothguide.torch.AttentionPatcher; got {type(perturber).__name__}"
        )
    order = list(order)
    plain = [b for b in order if b.perturbation is None]
    # Only attention perturbations are proven to fork exactly; the others (layer skips, token
    # permutations, ...) run their whole forward in the pre-fork batch.
    forkable = [
        b
        for b in order
        if isinstance(b.perturbation, QuerySmoothing | IdentityAttention)
        and Branch(b.conditioning) in plain
    ]
    if not forkable:
        return None
    points: dict[str, tuple[Any, list[Branch]]] = {}
    for b in forkable:
        assert b.perturbation is not None
        name, rank = perturber.fork_point(b.perturbation)
        points.setdefault(name, (rank, []))[1].append(b)
    pre = plain + [b for b in order if b.perturbation is not None and b not in forkable]
    stages = sorted(points.items(), key=lambda item: item[1][0])
    new_order = list(pre)
    spec_stages = []
    for name, (_, branches) in stages:
        sources = tuple(
            pre.index(Branch(b.conditioning)) * batch + i for b in branches for i in range(batch)
        )
        spec_stages.append((name, sources))
        new_order.extend(branches)
    spec = ForkSpec(len(new_order) * batch, len(pre) * batch, tuple(spec_stages))
    return ForkPlan(new_order, spec)
