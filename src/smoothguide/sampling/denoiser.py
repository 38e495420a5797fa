"""A guided denoiser: run the branches a rule needs, batched, and combine them.

Models follow the k-diffusion contract ``model(x, sigma, **cond) -> denoised``
with ``x = x0 + sigma * eps`` and ``sigma`` a scalar or an array of shape
``(batch,)``. :class:`GuidedDenoiser` follows it too, so any k-diffusion-style
sampler can use it unchanged; :mod:`smoothguide.sampling.samplers` additionally
passes the step index and keeps stateful rules' state explicit through
:meth:`GuidedDenoiser.step`.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import numbers
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from contextlib import ExitStack
from typing import Any, Protocol, runtime_checkable

import array_api_compat

from .._array import Array, namespace
from ..branches import Branch, Perturber
from ..perturbations import Perturbation
from ..rules._prediction import denoised_of
from ..rules.base import GuidanceRule, StepContext
from ..sag import AttentionMaskedBlur, sag_degrade, sag_mask
from ..weak_model import WeakModel
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
        if perturber is not None:
            _check_layers(rule, perturber)  # a bad layer name fails here, not at a step
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
        return denoised_of(out)

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
        ``sigma`` equals one of its entries up to a relative 1e-5, or up to the
        rounding of ``sigma``'s dtype when that is coarser (float16, bfloat16 σ of
        half-precision samplers), and the match is unique; otherwise it is unknown
        (``None``).
        """
        s = _sigma_value(sigma)
        if self.sigmas is None:
            return StepContext(s)
        step, _ = self._find_step(sigma, s)
        if step is None:
            return StepContext(s)
        return StepContext(s, step=step, num_steps=len(self.sigmas) - 1)

    def _find_step(self, sigma: Any, s: float) -> tuple[int | None, str]:
        """The step of ``sigma`` (value ``s``) in ``self.sigmas``, or ``None`` and why not."""
        assert self.sigmas is not None
        sigmas = self.sigmas[:-1]  # the last entry is where the run ends, not a step
        rel, tiny, dtype = _precision(sigma)
        near = [i for i, t in enumerate(sigmas) if abs(t - s) <= rel * max(abs(t), abs(s)) + tiny]
        if len(near) == 1:
            return near[0], ""
        if len(near) > 1:
            # Several entries lie within the dtype's rounding: take the one that rounds
            # to exactly this sigma, if only one does.
            exact = [i for i in near if _rounded(sigma, sigmas[i]) == s]
            if len(exact) == 1:
                return exact[0], ""
            return None, (
                f"sigma={s!r} ({dtype}) matches steps {near} of the sigmas= given to "
                f"GuidedDenoiser ({[sigmas[i] for i in near]}) within {dtype} rounding, so "
                "its step is ambiguous; call the denoiser with sigma in a finer dtype "
                "(float32 or float64)"
            )
        k = min(range(len(sigmas)), key=lambda i: abs(sigmas[i] - s))
        return None, (
            f"sigma={s!r} ({dtype}) is not one of the noise levels in the sigmas= given to "
            f"GuidedDenoiser (nearest: step {k}, sigma={sigmas[k]!r}), so its step is "
            "unknown; call the denoiser at the schedule's noise levels (a sampler that "
            "evaluates between them, e.g. at midpoints, cannot use on='progress')"
        )

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
            ``(denoised, new_state)``; ``denoised`` is the rule's result: an
            array, or a :class:`~smoothguide.rules.Prediction` for rules that
            ask the sampler to re-noise from another prediction (CFG++).
        """
        cond = {} if cond is None else cond
        if not isinstance(cond, Mapping):
            raise TypeError(f"cond must be None or a mapping of keyword arguments, got {cond!r}")
        if ctx is None:
            ctx = self.context(sigma)
        elif not isinstance(ctx, StepContext):
            raise TypeError(f"ctx must be a StepContext or None, got {ctx!r}")
        try:
            needed = tuple(self.rule.branches(ctx))
            outputs = self.evaluate(needed, x, sigma, cond)
            out, new_state = self.rule.combine(outputs, ctx, state)
        except ValueError as exc:
            if self.sigmas is None or ctx.step is not None or "step" not in str(exc):
                raise
            # The rule needs the step index and sigmas= was given: say why it was not
            # found instead of the generic advice to pass sigmas=.
            _, why = self._find_step(sigma, ctx.sigma)
            raise ValueError(f"the rule needs the step index at this call, but {why}") from exc
        return out, new_state

    def evaluate(
        self,
        branches: Sequence[Branch],
        x: Array,
        sigma: Any,
        cond: Mapping[str, Any] | None = None,
    ) -> dict[Branch, Array]:
        """Run the model for ``branches`` (batched or not) and return ``{branch: output}``.

        A branch whose perturbation is a :class:`~smoothguide.weak_model.WeakModel`
        is evaluated by that model, in a call of its own.
        """
        if x.ndim < 1:
            raise ValueError(f"x must have a leading batch axis, got shape {tuple(x.shape)}")
        cond = {} if cond is None else dict(cond)
        order = batch_order(branches)
        if not order:
            raise ValueError("branches must not be empty: a rule needs at least one branch")
        batch = int(x.shape[0])
        # Branches of another model (autoguidance) run outside the main model's call.
        weak = [b for b in order if isinstance(b.perturbation, WeakModel)]
        # SAG branches: their source branch runs in the main call (its attention map
        # recorded), then the model runs again at the degraded input.
        sag = [b for b in order if isinstance(b.perturbation, AttentionMaskedBlur)]
        order = [b for b in order if b not in weak and b not in sag]
        captures: dict[Branch, list[AttentionMaskedBlur]] = {}
        for b in sag:
            assert isinstance(b.perturbation, AttentionMaskedBlur)
            captures.setdefault(Branch(b.conditioning), []).append(b.perturbation)
        order = batch_order(order + list(captures))
        held: dict[tuple[Branch, AttentionMaskedBlur], Any] = {}
        outputs = self._evaluate_main(order, x, sigma, cond, batch, captures, held) if order else {}
        for b in sag:
            outputs[b] = self._sag_output(b, outputs, held, x, sigma, cond, batch)
        for b in weak:
            assert isinstance(b.perturbation, WeakModel)
            out = b.perturbation.model(x, sigma, **self._branch_kwargs(b, cond, batch))
            outputs[b] = _check_output(out, batch, x)
        return outputs

    def _sag_output(
        self,
        b: Branch,
        outputs: Mapping[Branch, Array],
        held: Mapping[tuple[Branch, AttentionMaskedBlur], Any],
        x: Array,
        sigma: Any,
        cond: Mapping[str, Any],
        batch: int,
    ) -> Array:
        """SAG: ``D(x̄) + (x − x̄)`` at ``x̄ = degrade(x̂0) + (x − x̂0)`` (smoothguide.sag)."""
        p = b.perturbation
        assert isinstance(p, AttentionMaskedBlur)
        source = Branch(b.conditioning)
        capture = held[(source, p)]
        if capture.probs is None:
            raise RuntimeError(
                f"SAG: the attention layer {p.layers} did not run in the model call, so there "
                "is no attention map to build the mask from"
            )
        xp = namespace(x)
        x0 = outputs[source]
        mask = sag_mask(capture.probs, capture.grid, tuple(x.shape[-2:]), threshold=p.threshold)
        degraded = sag_degrade(x0, xp.astype(mask, x0.dtype), p)
        x_deg = degraded + (x - x0)
        out = self.model(x_deg, sigma, **self._branch_kwargs(source, cond, batch))
        return _check_output(out, batch, x) + (x - x_deg)

    def _evaluate_main(
        self,
        order: list[Branch],
        x: Array,
        sigma: Any,
        cond: dict[str, Any],
        batch: int,
        captures: Mapping[Branch, list[AttentionMaskedBlur]],
        held: dict[tuple[Branch, AttentionMaskedBlur], Any],
    ) -> dict[Branch, Array]:
        xp = namespace(x)
        if captures and not callable(getattr(self.perturber, "capture_attention", None)):
            raise ValueError(
                "SAG needs a perturber that records attention maps (capture_attention), e.g. "
                "smoothguide.torch.AttentionPatcher"
            )

        def enter(stack: ExitStack, b: Branch, rows: range) -> None:
            if b.perturbation is not None:
                assert self.perturber is not None
                stack.enter_context(self.perturber.perturb(b.perturbation, rows))
            for p in captures.get(b, ()):
                capture = self.perturber.capture_attention(p.layers, rows)  # type: ignore[union-attr]
                held[(b, p)] = stack.enter_context(capture)

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
                    enter(stack, b, range(batch))
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
                enter(stack, b, range(j * batch, (j + 1) * batch))
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


def _rule_perturbations(rule: Any) -> list[Any]:
    """The perturbations a rule's terms declare (``term.perturbation``, through ``Compose``).

    Used to check layer selections before the first step. A custom rule whose
    perturbations are not reachable this way is checked at its first step instead.

    Examples
    --------
    >>> from smoothguide.rules import CFG, PAG, SEG, Compose
    >>> [type(p).__name__ for p in _rule_perturbations(Compose(CFG(2.0), SEG(3.0), PAG(1.0)))]
    ['QuerySmoothing', 'IdentityAttention']
    """
    found: list[Any] = []
    seen: set[int] = set()

    def walk(obj: Any, depth: int) -> None:
        if id(obj) in seen or depth > 8:
            return
        seen.add(id(obj))
        try:
            p = getattr(obj, "perturbation", None)
        except Exception:  # a property that needs more than the rule itself
            p = None
        if isinstance(p, Perturbation) and p not in found:
            found.append(p)
        for t in getattr(obj, "terms", ()) or ():
            walk(t, depth + 1)

    walk(rule, 0)
    return found


def _check_layers(rule: Any, perturber: Any) -> None:
    """Check each of ``rule``'s perturbations' layer selections with ``perturber.resolve``.

    Raises the perturber's error (it lists the available layers) for a selection
    that names no layer, before any model call. Perturbers without ``resolve`` are
    not checked.
    """
    resolve = getattr(perturber, "resolve", None)
    if not callable(resolve):
        return
    for p in _rule_perturbations(rule):
        resolve(p.layers)


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


def _rebuild_mapping(template: Mapping[Any, Any], items: list[tuple[Any, Any]]) -> Any:
    """A mapping of ``template``'s type (dict, OrderedDict, defaultdict, ...) holding ``items``."""
    if type(template) is dict:
        return dict(items)
    if isinstance(template, MutableMapping):
        out = copy.copy(template)  # keeps the type and e.g. a defaultdict's factory
        out.clear()
        out.update(items)
        return out
    try:
        return type(template)(dict(items))  # type: ignore[call-arg]
    except Exception as exc:
        raise TypeError(
            f"cannot rebuild a {type(template).__name__} from its items; pass a dict, or use "
            "batched=False"
        ) from exc


def _rebuild_sequence(template: Any, items: list[Any]) -> Any:
    """A list, tuple or namedtuple like ``template`` holding ``items``."""
    if isinstance(template, tuple) and hasattr(template, "_fields"):
        return type(template)(*items)  # namedtuple
    if type(template) in (list, tuple):
        return type(template)(items)
    return type(template)(items)  # a list or tuple subclass


def _is_sequence(v: object) -> bool:
    return isinstance(v, list | tuple)


def _is_dataclass_instance(v: object) -> bool:
    return dataclasses.is_dataclass(v) and not isinstance(v, type)


def _broadcast_batch(v: Any, batch: int) -> Any:
    """Broadcast arrays with a leading axis of 1 to ``batch``, also inside containers.

    Mappings, lists, tuples (namedtuples) and dataclass instances keep their type
    and key order.
    """
    if isinstance(v, Mapping):
        return _rebuild_mapping(v, [(k, _broadcast_batch(u, batch)) for k, u in v.items()])
    if _is_sequence(v):
        return _rebuild_sequence(v, [_broadcast_batch(u, batch) for u in v])
    if _is_dataclass_instance(v):
        changes = {
            f.name: _broadcast_batch(getattr(v, f.name), batch)
            for f in dataclasses.fields(v)
            if f.init
        }
        return dataclasses.replace(v, **changes)
    if _is_array(v) and v.ndim >= 1 and v.shape[0] == 1 and batch != 1:
        xp = namespace(v)
        return xp.broadcast_to(v, (batch, *v.shape[1:]))
    return v


def _merge_kwargs(
    xp: Any, kwargs: list[dict[str, Any]], order: list[Branch], batch: int
) -> dict[str, Any]:
    """Stack the branches' keyword arguments along axis 0, in branch order.

    Keyword arguments keep the order of the first branch's (they bind by name).
    """
    keys = set(kwargs[0])
    for b, kw in zip(order, kwargs, strict=True):
        if set(kw) != keys:
            raise ValueError(
                "cannot batch branches whose keyword arguments differ: "
                f"{order[0]!r} has {sorted(keys)}, {b!r} has {sorted(kw)}; give uncond= the "
                "same keys as the call, or use batched=False"
            )
    return {k: _merge_value(xp, [kw[k] for kw in kwargs], batch, repr(k)) for k in kwargs[0]}


def _merge_value(xp: Any, values: list[Any], batch: int, name: str) -> Any:
    """Merge one keyword argument: concat arrays, recurse into containers, keep equal constants.

    Containers (mappings, lists, tuples, namedtuples, dataclass instances) are rebuilt
    with the type and key order of the branches' values, which must agree: a model
    may read a mapping in order, so a different order would change what it computes.
    """
    first = values[0]
    if all(isinstance(v, Mapping) for v in values):
        keys = list(first)
        for v in values[1:]:
            if list(v) != keys:
                what = "keys" if set(v) != set(keys) else "key order"
                raise ValueError(
                    f"cannot batch keyword argument {name}: its {what} differ between branches "
                    f"({[list(u) for u in values]}); give uncond= the same keys in the same "
                    "order, or use batched=False"
                )
        return _rebuild_mapping(
            first,
            [(k, _merge_value(xp, [v[k] for v in values], batch, f"{name}[{k!r}]")) for k in keys],
        )
    if all(_is_sequence(v) for v in values):
        if any(type(v) is not type(first) or len(v) != len(first) for v in values):
            raise ValueError(
                f"cannot batch keyword argument {name}: its containers differ between branches "
                f"({[f'{type(v).__name__} of {len(v)}' for v in values]}); use batched=False"
            )
        return _rebuild_sequence(
            first,
            [
                _merge_value(xp, [v[i] for v in values], batch, f"{name}[{i}]")
                for i in range(len(first))
            ],
        )
    if all(_is_dataclass_instance(v) for v in values):
        if any(type(v) is not type(first) for v in values):
            raise ValueError(
                f"cannot batch keyword argument {name}: its types differ between branches "
                f"({[type(v).__name__ for v in values]}); use batched=False"
            )
        merged = {}
        for f in dataclasses.fields(first):
            parts = [getattr(v, f.name) for v in values]
            if f.init:
                merged[f.name] = _merge_value(xp, parts, batch, f"{name}.{f.name}")
            elif not all(_same(parts[0], u) for u in parts[1:]):
                raise ValueError(
                    f"cannot batch keyword argument {name}: its field {f.name!r} (not an "
                    "__init__ field) differs between branches; use batched=False"
                )
        return dataclasses.replace(first, **merged)
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
    if all(_same(first, v) for v in values[1:]):
        return first
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


def _precision(sigma: Any) -> tuple[float, float, str]:
    """Relative and absolute tolerance for matching ``sigma`` to a schedule, and its dtype.

    A relative 1e-5, or the dtype's machine epsilon (twice its rounding error) when
    that is coarser, plus the dtype's smallest normal number for subnormal sigma.
    """
    if _is_array(sigma):
        xp = namespace(sigma)
        try:
            info = xp.finfo(sigma.dtype)
        except (TypeError, ValueError):  # an integer dtype: exact values
            return 1e-5, 0.0, str(sigma.dtype)
        return max(1e-5, float(info.eps)), float(info.smallest_normal), str(sigma.dtype)
    return 1e-5, 0.0, type(sigma).__name__


def _rounded(sigma: Any, value: float) -> float:
    """``value`` rounded to ``sigma``'s dtype (``value`` itself for a Python number)."""
    if not _is_array(sigma):
        return value
    xp = namespace(sigma)
    return float(xp.asarray(value, dtype=sigma.dtype, device=array_api_compat.device(sigma)))


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
