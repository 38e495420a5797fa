"""A guided denoiser: run the branches a rule needs, batched, and combine them.

Models follow the k-diffusion contract ``model(x, sigma, **cond) -> denoised``
with ``x = x0 + sigma * eps`` and ``sigma`` a scalar or an array of shape
``(batch,)``. :class:`GuidedDenoiser` follows it too, so any k-diffusion-style
sampler can use it unchanged; :mod:`smoothguide.sampling.samplers` additionally
passes the step index and keeps stateful rules' state explicit through
:meth:`GuidedDenoiser.step`.
"""

from __future__ import annotations

import itertools
import numbers
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from typing import Any, Protocol, runtime_checkable

import array_api_compat

from .._array import Array, namespace
from ..branches import Branch, Perturber
from ..rules.base import GuidanceRule, StepContext
from .forking import plan_fork

__all__ = ["GuidedDenoiser", "SteppableDenoiser", "batch_order"]


@runtime_checkable
class SteppableDenoiser(Protocol):
    """A denoiser that takes the step context and explicit state (what the samplers use).

    ``step(x, sigma, cond, ctx=..., state=...) -> (denoised, new_state)`` and
    ``init_state()`` for a fresh run. :class:`GuidedDenoiser` implements it; any
    other ``model(x, sigma, **cond)`` is called plainly.

    Examples
    --------
    >>> from smoothguide.rules import CFG
    >>> isinstance(GuidedDenoiser(lambda x, sigma: x, CFG(2.0)), SteppableDenoiser)
    True
    """

    def init_state(self) -> Any:  # pragma: no cover - protocol
        ...

    def step(
        self,
        x: Array,
        sigma: Any,
        cond: Mapping[str, Any] | None = None,
        *,
        ctx: StepContext | None = None,
        state: Any = None,
    ) -> tuple[Array, Any]:  # pragma: no cover - protocol
        ...


def _is_array(v: object) -> bool:
    return bool(array_api_compat.is_array_api_obj(v))


def _same(a: object, b: object) -> bool:
    if a is b:
        return True
    if _is_array(a) or _is_array(b):
        return False
    try:
        return bool(a == b)
    except Exception:  # objects whose == is not a plain bool
        return False


class GuidedDenoiser:
    """Wrap a denoiser and a guidance rule into a guided denoiser.

    At each call the rule says which branches it needs at this step
    (:meth:`~smoothguide.rules.GuidanceRule.branches`); only those are
    evaluated. The ``"cond"`` branch uses the call's keyword arguments; the
    ``"uncond"`` branch uses ``uncond`` (arrays with a leading axis of 1 are
    broadcast to the batch), or no keyword arguments when ``uncond`` is ``None``
    (an unconditional model). A branch with a perturbation runs its rows inside
    ``perturber.perturb(perturbation, rows)``.

    With ``batched=True`` all branches go into ONE model call, stacked along
    axis 0 in the order ``[uncond, cond, perturbed...]`` (perturbed branches in
    the order the rule lists them), each perturbed branch's rows given to the
    perturber as a ``range`` into that batch. ``batched=False`` makes one call
    per branch (rows ``range(batch)``), e.g. for benchmarks or models that
    cannot take a larger batch. Either way the result is combined by
    ``rule.combine``.

    Parameters
    ----------
    model
        ``model(x, sigma, **cond) -> denoised``.
    rule
        A :class:`~smoothguide.rules.GuidanceRule`.
    uncond
        Keyword arguments of the unconditional branch, e.g.
        ``{"class_labels": null_labels}``; ``None`` for an unconditional model.
    perturber
        A :class:`~smoothguide.branches.Perturber` for branches with a
        perturbation; by default the model itself when it implements
        ``perturb``. A perturbed branch without one raises ``ValueError``.
    batched
        One model call for all branches (default) or one call per branch.
    sigmas
        Optional noise-level schedule of the sampling run (as given to a
        k-diffusion sampler). When set, a plain call ``guided(x, sigma)`` finds
        its step index from ``sigma``, so schedules ``on="progress"`` work with
        any sampler.
    fork
        Fork mode of the batched call (:mod:`smoothguide.sampling.forking`): a
        perturbed branch joins the batch only at its first perturbed layer
        instead of recomputing the rows it shares with its plain branch.
        ``None`` (default): on when the perturber declares it exact for the
        model (``fork_proven``); ``True``: on (error if the perturber cannot
        fork); ``False``: off. Perturbed branches then come in fork order.

    Notes
    -----
    :meth:`step` is pure: state in, state out. A plain call keeps the state of a
    stateful rule (APG momentum) in the denoiser and starts a fresh state when
    σ rises above the previous call's σ (a new run); call :meth:`reset_state`
    to force that. Share one rule between concurrent runs, not one plain-called
    ``GuidedDenoiser``. Every call needs one σ for the whole batch.

    Examples
    --------
    >>> import numpy as np
    >>> from smoothguide.rules import CFG
    >>> def model(x, sigma, y=None):  # a toy denoiser: conditional shift
    ...     return x / (1 + sigma**2) + (0.0 if y is None else y[:, None])
    >>> guided = GuidedDenoiser(model, CFG(3.0), uncond={"y": np.zeros(1)})
    >>> x = np.ones((2, 4))
    >>> out = guided(x, 1.0, y=np.array([1.0, 2.0]))
    >>> bool(np.allclose(out, 0.5 + 3 * np.array([[1.0], [2.0]])))
    True
    """

    def __init__(
        self,
        model: Callable[..., Array],
        rule: GuidanceRule,
        *,
        uncond: Mapping[str, Any] | None = None,
        perturber: Perturber | None = None,
        batched: bool = True,
        sigmas: Sequence[float] | Array | None = None,
        fork: bool | None = None,
    ) -> None:
        if not callable(model):
            raise TypeError(f"model must be callable as model(x, sigma, **cond), got {model!r}")
        missing = [
            m for m in ("branches", "init_state", "combine") if not callable(getattr(rule, m, None))
        ]
        if missing:
            raise TypeError(
                "rule must be a GuidanceRule with branches(ctx), init_state() and "
                f"combine(outputs, ctx, state); {type(rule).__name__} lacks {missing}"
            )
        if uncond is not None and (
            not isinstance(uncond, Mapping) or not all(isinstance(k, str) for k in uncond)
        ):
            raise TypeError(
                f"uncond must be None or a mapping of keyword arguments (str keys), got {uncond!r}"
            )
        if perturber is None and isinstance(model, Perturber):
            perturber = model
        if perturber is not None and not callable(getattr(perturber, "perturb", None)):
            raise TypeError(
                "perturber must implement smoothguide.branches.Perturber "
                f"(perturb(perturbation, rows) -> context manager), got {perturber!r}"
            )
        if not isinstance(batched, bool):
            raise TypeError(f"batched must be True or False, got {batched!r}")
        self.model = model
        self.rule = rule
        self.uncond = None if uncond is None else dict(uncond)
        self.perturber = perturber
        self.batched = batched
        if fork is not None and not isinstance(fork, bool):
            raise TypeError(f"fork must be True, False or None (automatic), got {fork!r}")
        self.fork = fork
        self.sigmas = None if sigmas is None else _sigma_list(sigmas, "sigmas")
        self._state: Any = rule.init_state()
        self._last_sigma: float | None = None

    def __repr__(self) -> str:
        return f"GuidedDenoiser({self.model!r}, {self.rule!r}, batched={self.batched})"

    # -- the k-diffusion contract ------------------------------------------------------------

    def __call__(self, x: Array, sigma: Any, **cond: Any) -> Array:
        """Guided prediction ``rule.combine`` of the needed branches at ``(x, sigma)``."""
        ctx = self.context(sigma)
        if self._last_sigma is not None and ctx.sigma > self._last_sigma:
            self.reset_state()
        out, self._state = self.step(x, sigma, cond, ctx=ctx, state=self._state)
        self._last_sigma = ctx.sigma
        return out

    def reset_state(self) -> None:
        """Start the rule's state afresh for plain calls (a new sampling run)."""
        self._state = self.rule.init_state()
        self._last_sigma = None

    # -- the explicit API ---------------------------------------------------------------------

    def init_state(self) -> Any:
        """The rule's initial state."""
        return self.rule.init_state()

    def context(self, sigma: Any) -> StepContext:
        """The :class:`~smoothguide.rules.StepContext` of a call at ``sigma``.

        The step index is found in ``sigmas`` (given at construction) when
        ``sigma`` equals one of its entries up to a relative 1e-5; otherwise it
        is unknown (``None``).
        """
        s = _sigma_value(sigma)
        if self.sigmas is None:
            return StepContext(s)
        n = len(self.sigmas) - 1
        for i in range(n):
            if abs(self.sigmas[i] - s) <= 1e-5 * max(abs(s), 1e-12):
                return StepContext(s, step=i, num_steps=n)
        return StepContext(s)

    def step(
        self,
        x: Array,
        sigma: Any,
        cond: Mapping[str, Any] | None = None,
        *,
        ctx: StepContext | None = None,
        state: Any = None,
    ) -> tuple[Array, Any]:
        """One guided prediction with explicit step context and state.

        Parameters
        ----------
        x
            Noisy input of shape ``(batch, ...)``.
        sigma
            Noise level: a number, a 0-d array or an array of shape ``(batch,)``.
        cond
            Keyword arguments of the ``"cond"`` branch (``None``: none).
        ctx
            Step context; default :meth:`context` of ``sigma``.
        state
            The rule's state (``None`` or from :meth:`init_state` / a previous step).

        Returns
        -------
        tuple
            ``(denoised, new_state)``.
        """
        cond = {} if cond is None else cond
        if not isinstance(cond, Mapping):
            raise TypeError(f"cond must be None or a mapping of keyword arguments, got {cond!r}")
        if ctx is None:
            ctx = self.context(sigma)
        elif not isinstance(ctx, StepContext):
            raise TypeError(f"ctx must be a StepContext or None, got {ctx!r}")
        needed = tuple(self.rule.branches(ctx))
        outputs = self.evaluate(needed, x, sigma, cond)
        out, new_state = self.rule.combine(outputs, ctx, state)
        return out, new_state

    def evaluate(
        self,
        branches: Sequence[Branch],
        x: Array,
        sigma: Any,
        cond: Mapping[str, Any] | None = None,
    ) -> dict[Branch, Array]:
        """Run the model for ``branches`` (batched or not) and return ``{branch: output}``."""
        xp = namespace(x)
        if x.ndim < 1:
            raise ValueError(f"x must have a leading batch axis, got shape {tuple(x.shape)}")
        cond = {} if cond is None else dict(cond)
        order = batch_order(branches)
        if not order:
            raise ValueError("branches must not be empty: a rule needs at least one branch")
        batch = int(x.shape[0])
        for b in order:
            if b.perturbation is not None and self.perturber is None:
                raise ValueError(
                    f"the rule needs branch {b!r} with a perturbation, but the GuidedDenoiser "
                    "has no perturber: pass perturber=... (e.g. a smoothguide.torch adapter) "
                    "or a model that implements perturb(perturbation, rows)"
                )
        kwargs = [self._branch_kwargs(b, cond, batch) for b in order]
        if not self.batched or len(order) == 1:
            outputs = {}
            for b, kw in zip(order, kwargs, strict=True):
                with ExitStack() as stack:
                    if b.perturbation is not None:
                        assert self.perturber is not None
                        stack.enter_context(self.perturber.perturb(b.perturbation, range(batch)))
                    out = self.model(x, sigma, **kw)
                outputs[b] = _check_output(out, batch, x)
            return outputs
        # Fork mode: same rows, perturbed branches in fork order (see smoothguide.sampling.forking).
        plan = plan_fork(order, self.perturber, self.fork, batch)
        if plan is not None:
            kwargs = [kwargs[order.index(b)] for b in plan.order]
            order = plan.order
        n = len(order)
        big_x = xp.concat([x] * n, axis=0)
        big_sigma = _repeat_sigma(xp, sigma, batch, n)
        big_kw = _merge_kwargs(xp, kwargs, order, batch)
        with ExitStack() as stack:
            if plan is not None:
                stack.enter_context(self.perturber.forking(plan.spec))  # type: ignore[union-attr]
            for j, b in enumerate(order):
                if b.perturbation is not None:
                    assert self.perturber is not None
                    rows = range(j * batch, (j + 1) * batch)
                    stack.enter_context(self.perturber.perturb(b.perturbation, rows))
            out = self.model(big_x, big_sigma, **big_kw)
        out = _check_output(out, n * batch, x)
        return {b: out[j * batch : (j + 1) * batch, ...] for j, b in enumerate(order)}

    def _branch_kwargs(self, b: Branch, cond: Mapping[str, Any], batch: int) -> dict[str, Any]:
        if b.conditioning == "cond":
            return dict(cond)
        if self.uncond is None:
            if cond:
                raise ValueError(
                    f"the rule needs the unconditional branch {b!r}, but uncond=None (an "
                    f"unconditional model) while the call passes conditioning {sorted(cond)}; "
                    "pass uncond={...} with the null conditioning to GuidedDenoiser"
                )
            return {}
        return {k: _broadcast_batch(v, batch) for k, v in self.uncond.items()}


def batch_order(branches: Sequence[Branch]) -> list[Branch]:
    """Unique branches in batch order: ``[uncond, cond, perturbed...]``.

    The plain ``"uncond"`` and ``"cond"`` branches come first, then the perturbed
    branches in the order given; duplicates are dropped. This is the row layout of
    :class:`GuidedDenoiser`'s batched call (branch ``j`` owns rows
    ``j * batch .. (j + 1) * batch - 1``).

    Parameters
    ----------
    branches
        Branches a rule asked for, in any order, possibly repeated.

    Returns
    -------
    list of Branch

    Examples
    --------
    >>> from smoothguide.perturbations import QuerySmoothing
    >>> seg = Branch("cond", QuerySmoothing(1.0))
    >>> [b.conditioning for b in batch_order([seg, Branch("cond"), Branch("uncond"), seg])]
    ['uncond', 'cond', 'cond']
    """
    unique: dict[Branch, None] = {}
    for b in branches:
        if not isinstance(b, Branch):
            raise TypeError(f"branches must be Branch objects, got {b!r}")
        unique.setdefault(b, None)
    plain = [b for b in (Branch("uncond"), Branch("cond")) if b in unique]
    return plain + [b for b in unique if b.perturbation is not None]


_batch_order = batch_order  # the name smoothguide.diffusers imports


def _broadcast_batch(v: Any, batch: int) -> Any:
    """Broadcast arrays with a leading axis of 1 to ``batch`` (also inside mappings)."""
    if isinstance(v, Mapping):
        return {k: _broadcast_batch(u, batch) for k, u in v.items()}
    if _is_array(v) and v.ndim >= 1 and v.shape[0] == 1 and batch != 1:
        xp = namespace(v)
        return xp.broadcast_to(v, (batch, *v.shape[1:]))
    return v


def _merge_kwargs(
    xp: Any, kwargs: list[dict[str, Any]], order: list[Branch], batch: int
) -> dict[str, Any]:
    """Stack the branches' keyword arguments along axis 0, in branch order."""
    keys = set(kwargs[0])
    for b, kw in zip(order, kwargs, strict=True):
        if set(kw) != keys:
            raise ValueError(
                "cannot batch branches whose keyword arguments differ: "
                f"{order[0]!r} has {sorted(keys)}, {b!r} has {sorted(kw)}; give uncond= the "
                "same keys as the call, or use batched=False"
            )
    return {k: _merge_value(xp, [kw[k] for kw in kwargs], batch, repr(k)) for k in sorted(keys)}


def _merge_value(xp: Any, values: list[Any], batch: int, name: str) -> Any:
    """Merge one keyword argument: concat arrays, recurse into mappings, keep equal constants."""
    if all(isinstance(v, Mapping) for v in values):
        keys = set(values[0])
        if any(set(v) != keys for v in values):
            raise ValueError(
                f"cannot batch keyword argument {name}: its keys differ between branches "
                f"({[sorted(v) for v in values]}); use batched=False"
            )
        return {k: _merge_value(xp, [v[k] for v in values], batch, f"{name}[{k!r}]") for k in keys}
    if all(_is_array(v) and v.ndim >= 1 for v in values):
        parts = []
        for v in values:
            v = _broadcast_batch(v, batch)
            if v.shape[0] != batch:
                raise ValueError(
                    f"keyword argument {name} must have a leading batch axis of {batch} or 1 "
                    f"to be batched, got shape {tuple(v.shape)}; use batched=False"
                )
            parts.append(v)
        trailing = {tuple(p.shape[1:]) for p in parts}
        if len(trailing) > 1:
            raise ValueError(
                f"cannot batch keyword argument {name}: its shapes differ between branches "
                f"({[tuple(p.shape) for p in parts]}); use batched=False"
            )
        return xp.concat(parts, axis=0)
    if all(_same(values[0], v) for v in values[1:]):
        return values[0]
    raise ValueError(
        f"cannot batch keyword argument {name}: its values differ between branches and "
        "are not arrays with a batch axis; use batched=False"
    )


def _repeat_sigma(xp: Any, sigma: Any, batch: int, n: int) -> Any:
    if not _is_array(sigma) or sigma.ndim == 0:
        return sigma
    if sigma.ndim != 1 or sigma.shape[0] not in (1, batch):
        raise ValueError(
            f"sigma must be a number, a 0-d array or have shape (batch,) = ({batch},), "
            f"got shape {tuple(sigma.shape)}"
        )
    sigma = xp.broadcast_to(sigma, (batch,))
    return xp.concat([sigma] * n, axis=0)


def _check_output(out: Any, rows: int, x: Array) -> Array:
    if not _is_array(out) or out.ndim < 1 or out.shape[0] != rows:
        shape = tuple(out.shape) if _is_array(out) else type(out).__name__
        raise ValueError(
            f"the model must return an array with {rows} rows (one per input row, x has shape "
            f"{tuple(x.shape)} per branch), got {shape}"
        )
    return out


def _sigma_value(sigma: Any) -> float:
    """The common noise level of a call as a Python float."""
    if isinstance(sigma, numbers.Real) and not isinstance(sigma, bool):
        value = float(sigma)
    elif _is_array(sigma):
        if sigma.ndim == 0:
            value = float(sigma)
        elif sigma.ndim == 1 and sigma.shape[0] >= 1:
            xp = namespace(sigma)
            if sigma.shape[0] > 1 and not bool(xp.all(sigma == sigma[0])):
                raise ValueError(
                    "sigma must be the same for every sample of a call (guidance schedules "
                    "read one noise level per step); got differing values"
                )
            value = float(sigma[0])
        else:
            raise ValueError(
                f"sigma must be a number, a 0-d array or an array of shape (batch,), "
                f"got shape {tuple(sigma.shape)}"
            )
    else:
        raise TypeError(f"sigma must be a real number or an array, got {sigma!r}")
    if not value >= 0.0:
        raise ValueError(f"sigma must be >= 0, got {value}")
    return value


def _sigma_list(sigmas: Any, name: str) -> list[float]:
    """A noise-level schedule as Python floats, checked: >= 2 entries, strictly decreasing, >= 0."""
    if _is_array(sigmas):
        if sigmas.ndim != 1:
            raise ValueError(f"{name} must be one-dimensional, got shape {tuple(sigmas.shape)}")
        values = [float(sigmas[i]) for i in range(int(sigmas.shape[0]))]
    elif isinstance(sigmas, Sequence) and not isinstance(sigmas, str):
        values = []
        for s in sigmas:
            if isinstance(s, bool) or not (isinstance(s, numbers.Real) or _is_array(s)):
                raise TypeError(f"{name} must hold real numbers, got {s!r}")
            values.append(float(s))
    else:
        raise TypeError(f"{name} must be a sequence or 1-D array of noise levels, got {sigmas!r}")
    if len(values) < 2:
        raise ValueError(f"{name} must hold at least 2 noise levels (start and end), got {values}")
    if any(not (v >= 0.0 and v < float("inf")) for v in values):
        raise ValueError(f"{name} must be finite and >= 0, got {values}")
    if any(b >= a for a, b in itertools.pairwise(values)):
        raise ValueError(f"{name} must be strictly decreasing, got {values}")
    return values
