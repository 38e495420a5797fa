"""Run diffusers pipelines under any smoothguide guidance rule, all branches in one denoiser call.

:class:`GuidedPipeline` wraps a pipeline (``StableDiffusionPipeline``,
``StableDiffusionXLPipeline``; other pipelines through a registered
:class:`PipelineAdapter`). During a call it puts the pipeline in CFG mode, so
the pipeline itself prepares the unconditional and conditional inputs
(negative / empty prompt embeddings, SDXL's added conditions, IP-Adapter
embeddings, ControlNet residuals), and adds two hooks to the denoiser:

- a forward pre-hook that asks the rule which branches it needs at this step,
  selects those branches' rows from the pipeline's ``[uncond; cond]`` batch
  (every tensor argument whose first axis is the incoming batch, also inside
  dicts, lists and tuples), appends the perturbed branches' copies, and enters
  the perturbations for their rows only; one forward runs everything;
- a forward hook that splits the output by branch, combines it with
  ``rule.combine`` and hands the pipeline the guided prediction once per
  incoming chunk, so the pipeline's own ``u + w (c − u)`` returns it unchanged.

Both hooks, the perturbations and the pipeline's guidance settings are removed
or restored when the call ends, also after an exception or with
``return_dict=False``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

from ..branches import Branch
from ..rules._prediction import Prediction
from ..rules.base import GuidanceRule, StepContext
from ..sag import AttentionMaskedBlur
from ..sampling.denoiser import _batch_order, _check_layers, _rebuild_mapping, _rebuild_sequence
from ..sampling.forking import plan_fork
from ..torch import AttentionPatcher
from ..torch._deps import torch
from ..torch.hooks import pre_hook_with_kwargs
from ..weak_model import WeakModel
from ._deps import diffusers
from .family import patcher_for

__all__ = [
    "SD_PIPELINES",
    "GuidedPipeline",
    "PipelineAdapter",
    "adapter_for",
    "register_pipeline_adapter",
    "scheduler_sigma",
]


def scheduler_sigma(pipe: Any, timestep: Any, *, scale: float = 1.0) -> float:
    """Noise level σ (``x = x0 + σ ε`` scale) of a pipeline step at ``timestep``.

    Uses the scheduler's ``sigmas`` at the index of ``timestep`` in its
    ``timesteps`` when it has both (Euler, Heun, DPM-Solver with sigmas), else
    ``sqrt((1 − ᾱ_t) / ᾱ_t)`` from ``alphas_cumprod`` (DDIM, DDPM, PNDM, ...).

    Parameters
    ----------
    pipe
        The pipeline (its ``scheduler`` is read).
    timestep
        The denoiser's timestep argument (number or tensor). A float16 or
        bfloat16 tensor is matched to the scheduler's timesteps within its
        dtype's rounding (uniquely, else ``ValueError``).
    scale
        Factor from ``timestep`` to the scheduler's timesteps (Flux passes
        ``t / 1000``: ``scale=1000``).

    Returns
    -------
    float

    Examples
    --------
    >>> from types import SimpleNamespace
    >>> pipe = SimpleNamespace(scheduler=diffusers.DDIMScheduler())
    >>> a = float(pipe.scheduler.alphas_cumprod[999])
    >>> scheduler_sigma(pipe, 999) == math.sqrt((1 - a) / a)
    True
    """
    t = _timestep_value(timestep) * scale
    scheduler = pipe.scheduler
    sigmas = getattr(scheduler, "sigmas", None)
    timesteps = getattr(scheduler, "timesteps", None)
    if isinstance(sigmas, torch.Tensor) and isinstance(timesteps, torch.Tensor) and len(timesteps):
        distance = (timesteps.double().cpu() - t).abs()
        # A half-precision timestep is off by up to half its ulp (twice that after * scale).
        eps = (
            torch.finfo(timestep.dtype).eps
            if isinstance(timestep, torch.Tensor) and timestep.dtype.is_floating_point
            else 0.0
        )
        tol = max(1e-3 * max(1.0, abs(t)), eps * abs(t))
        near = [int(j) for j in torch.nonzero(distance <= tol).flatten()]
        if len(set(float(timesteps[j]) for j in near)) > 1:
            raise ValueError(
                f"timestep {t} ({timestep.dtype}) matches the scheduler's timesteps "
                f"{[float(timesteps[j]) for j in near]} within its rounding; pass the timestep "
                "in float32"
            )
        i = int(distance.argmin())
        if near and i < len(sigmas):
            return float(sigmas[i])
    alphas = getattr(scheduler, "alphas_cumprod", None)
    if isinstance(alphas, torch.Tensor):
        a = float(alphas[min(max(round(t), 0), len(alphas) - 1)])
        return math.sqrt((1.0 - a) / a)
    raise ValueError(
        f"cannot find the noise level of timestep {t} for {type(scheduler).__name__}: it has "
        "neither sigmas/timesteps nor alphas_cumprod; pass a PipelineAdapter with sigma=..."
    )


def _no_renoise(guided: Any, rule: Any) -> Any:
    """``guided``, or a ``TypeError`` for a rule that needs its own re-noising (CFG++)."""
    if isinstance(guided, Prediction):
        raise TypeError(
            f"{type(rule).__name__} asks the sampler to re-noise from another prediction "
            "(CFG++); a diffusers scheduler cannot: use smoothguide.sampling's samplers"
        )
    return guided


def _timestep_value(timestep: Any) -> float:
    if isinstance(timestep, torch.Tensor):
        return float(timestep.flatten()[0]) if timestep.numel() else math.nan
    return float(timestep)


def _cfg_layout(pipe: Any) -> tuple[str, ...]:
    return ("uncond", "cond") if pipe.do_classifier_free_guidance else ("cond",)


def _force_cfg(pipe: Any) -> dict[str, Any]:
    # Any scale > 1 makes the pipeline prepare [uncond; cond]; the value itself
    # never matters, since the pipeline receives the guided prediction twice.
    return {"guidance_scale": 2.0}


@dataclass(frozen=True)
class PipelineAdapter:
    """How :class:`GuidedPipeline` drives one kind of diffusers pipeline.

    Parameters
    ----------
    name
        Short identifier.
    matches
        ``pipe -> bool``.
    denoiser
        Attribute of the pipeline holding the denoiser (``"unet"``, ``"transformer"``).
    incoming
        ``pipe -> conditionings``: the chunks of the batch the pipeline passes
        to the denoiser, in order (``("uncond", "cond")`` in CFG mode).
    call_kwargs
        ``pipe -> kwargs`` forced on the pipeline call (CFG mode); the user may
        not pass these keys.
    sigma
        ``(pipe, timestep) -> σ`` for the rule's :class:`~smoothguide.rules.StepContext`.
    sequential
        ``None`` (default): one denoiser call per step with the ``incoming``
        chunks batched. ``("cond", "uncond")`` or ``("uncond", "cond")``: the
        pipeline makes one denoiser call per conditioning, in this order, every
        step (Flux's true CFG, Wan) and combines them as ``u + s (c − u)`` with
        ``s = pipeline_scale`` forced by ``call_kwargs``. Each call then runs the
        rule's branches of its conditioning, batched; the last call of a step
        returns the value that makes the pipeline's combination equal
        ``rule.combine`` of all of them.
    pipeline_scale
        The ``s`` that ``call_kwargs`` forces in sequential mode (default 2).

    Examples
    --------
    A pipeline whose denoiser lives in ``pipe.transformer`` and that batches
    ``[uncond; cond]`` when its ``guidance_scale`` is above 1:

    >>> adapter = PipelineAdapter(
    ...     "my-pipeline",
    ...     matches=lambda pipe: type(pipe).__name__ == "MyPipeline",
    ...     denoiser="transformer",
    ... )
    >>> adapter.call_kwargs(None)
    {'guidance_scale': 2.0}
    """

    name: str
    matches: Callable[[Any], bool]
    denoiser: str = "unet"
    incoming: Callable[[Any], tuple[str, ...]] = _cfg_layout
    call_kwargs: Callable[[Any], dict[str, Any]] = _force_cfg
    sigma: Callable[[Any, Any], float] = scheduler_sigma
    sequential: tuple[str, ...] | None = None
    pipeline_scale: float = 2.0

    def __post_init__(self) -> None:
        if self.sequential is not None and tuple(self.sequential) not in (
            ("cond", "uncond"),
            ("uncond", "cond"),
        ):
            raise ValueError(
                "sequential must be None, ('cond', 'uncond') or ('uncond', 'cond'), got "
                f"{self.sequential!r}"
            )
        if not (isinstance(self.pipeline_scale, int | float) and self.pipeline_scale > 1):
            raise ValueError(f"pipeline_scale must be a number > 1, got {self.pipeline_scale!r}")


_ADAPTERS: list[PipelineAdapter] = []


def register_pipeline_adapter(adapter: PipelineAdapter) -> PipelineAdapter:
    """Register ``adapter`` (replacing one of the same name); returns it.

    Parameters
    ----------
    adapter
        The :class:`PipelineAdapter`.

    Returns
    -------
    PipelineAdapter

    Examples
    --------
    >>> doc = PipelineAdapter("doc-example", matches=lambda pipe: False)
    >>> register_pipeline_adapter(doc) is doc
    True
    """
    if not isinstance(adapter, PipelineAdapter):
        raise TypeError(f"adapter must be a PipelineAdapter, got {type(adapter).__name__}")
    _ADAPTERS[:] = [a for a in _ADAPTERS if a.name != adapter.name]
    _ADAPTERS.append(adapter)
    return adapter


def adapter_for(pipe: Any) -> PipelineAdapter:
    """The first registered :class:`PipelineAdapter` that matches ``pipe``.

    Parameters
    ----------
    pipe
        A diffusers pipeline.

    Returns
    -------
    PipelineAdapter

    Raises
    ------
    TypeError
        If none does; the message lists the registered adapters.

    Examples
    --------
    >>> adapter_for(object())
    Traceback (most recent call last):
    ...
    TypeError: no smoothguide pipeline adapter serves object; registered: [...
    """
    for adapter in _ADAPTERS:
        if adapter.matches(pipe):
            return adapter
    raise TypeError(
        f"no smoothguide pipeline adapter serves {type(pipe).__name__}; registered: "
        f"{[a.name for a in _ADAPTERS]}"
    )


#: Stable Diffusion 1.x/2.x and SDXL pipelines that batch ``[uncond; cond]`` into
#: one UNet call: text-to-image, image-to-image and ControlNet.
SD_PIPELINES: tuple[type, ...] = (
    diffusers.StableDiffusionPipeline,
    diffusers.StableDiffusionImg2ImgPipeline,
    diffusers.StableDiffusionControlNetPipeline,
    diffusers.StableDiffusionXLPipeline,
    diffusers.StableDiffusionXLImg2ImgPipeline,
    diffusers.StableDiffusionXLControlNetPipeline,
)

register_pipeline_adapter(
    PipelineAdapter("stable-diffusion", matches=lambda pipe: isinstance(pipe, SD_PIPELINES))
)


def _map_rows(value: Any, batch: int, index: torch.Tensor) -> Any:
    """Index dim 0 of every tensor with ``batch`` rows, recursively in containers.

    Mappings, lists, tuples, namedtuples and dataclass instances keep their type and
    key order (a model may read a conditioning dict in order).
    """
    if isinstance(value, torch.Tensor):
        if value.ndim >= 1 and value.shape[0] == batch:
            return value.index_select(0, index.to(value.device))
        return value
    if isinstance(value, Mapping):
        return _rebuild_mapping(value, [(k, _map_rows(v, batch, index)) for k, v in value.items()])
    if isinstance(value, list | tuple):
        return _rebuild_sequence(value, [_map_rows(v, batch, index) for v in value])
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {
            f.name: _map_rows(getattr(value, f.name), batch, index)
            for f in dataclasses.fields(value)
            if f.init
        }
        return dataclasses.replace(value, **changes)
    return value


@dataclass
class _Step:
    """One denoiser call: the branches it runs, stacked in chunks of ``chunk`` rows."""

    order: list[Branch]
    chunk: int
    incoming: int
    ctx: StepContext
    stack: ExitStack = field(default_factory=ExitStack)
    position: int | None = None  # index of the call within a sequential step
    # autoguidance branches: (branch, args, kwargs) of their rows, run by their own model
    weak: list[tuple[Branch, Any, Any]] = field(default_factory=list)


@dataclass
class _SequentialStep:
    """A step of a pipeline that calls the denoiser once per conditioning."""

    ctx: StepContext
    needed: list[Branch]
    timestep: float
    outputs: dict[Branch, Any] = field(default_factory=dict)
    first: Any = None  # what the step's first call returned to the pipeline


#: Pipeline arguments that act on the pipeline's own CFG combination, and what to use instead.
_REFUSED = {
    "guidance_rescale": "put Rescale in the rule instead, e.g. Compose(CFG(5.0), Rescale(0.7))",
}


class GuidedPipeline:
    """A diffusers pipeline guided by a :mod:`smoothguide.rules` rule (CFG, SEG, PAG, ...).

    Parameters
    ----------
    pipe
        A ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline`` (or a
        pipeline with a registered :class:`PipelineAdapter`).
    rule
        A :class:`~smoothguide.rules.GuidanceRule`, e.g. ``SEG(3.0, sigma=10.0)``
        (SEG alone; pass an empty prompt for unconditional generation),
        ``SEG(3.0, sigma=math.inf, cfg_scale=5.0)`` or
        ``Compose(CFG(5.0), PAG(3.0))``.
    patcher
        The :class:`~smoothguide.torch.AttentionPatcher` of the denoiser;
        default :func:`~smoothguide.diffusers.patcher_for` of it (UNet: the
        ``"mid"`` preset unless a perturbation names layers).
    adapter
        Default :func:`adapter_for` of ``pipe``.
    fork
        Fork mode (:mod:`smoothguide.torch.fork`): perturbed branches join the
        batch at their first perturbed layer. ``None`` (default): on where the
        model family declares it exact (UNet2DConditionModel); ``True``: on;
        ``False``: off.

    Notes
    -----
    CFG belongs to the rule: calling with ``guidance_scale`` raises
    ``TypeError``, and so does ``guidance_rescale`` (the pipeline would apply it
    to the guided prediction, where it does nothing): use
    ``Compose(..., Rescale(phi))`` in the rule instead. Layer names of the
    rule's perturbations are checked here, against the patcher's layers.
    One denoiser call per step evaluates exactly the branches the rule needs at
    that step (``[uncond, cond, perturbed...]``), so a neutral SEG or PAG scale
    costs nothing.

    Examples
    --------
    ``guided = GuidedPipeline(pipe, SEG(3.0, sigma=10.0, cfg_scale=5.0))`` then
    ``image = guided("a photo of a cat", height=768, width=1024).images[0]``;
    see ``docs/diffusers.md``.
    """

    def __init__(
        self,
        pipe: Any,
        rule: GuidanceRule,
        *,
        patcher: AttentionPatcher | None = None,
        adapter: PipelineAdapter | None = None,
        fork: bool | None = None,
    ) -> None:
        missing = [
            m for m in ("branches", "init_state", "combine") if not callable(getattr(rule, m, None))
        ]
        if missing:
            raise TypeError(
                "rule must be a GuidanceRule with branches(ctx), init_state() and "
                f"combine(outputs, ctx, state); {type(rule).__name__} lacks {missing}"
            )
        self.adapter = adapter_for(pipe) if adapter is None else adapter
        if not isinstance(self.adapter, PipelineAdapter):
            raise TypeError(f"adapter must be a PipelineAdapter, got {type(self.adapter).__name__}")
        self.pipe = pipe
        self.rule = rule
        denoiser = getattr(pipe, self.adapter.denoiser, None)
        if not isinstance(denoiser, torch.nn.Module):
            raise TypeError(
                f"pipe.{self.adapter.denoiser} must be a torch.nn.Module, got "
                f"{type(denoiser).__name__}"
            )
        self.denoiser: torch.nn.Module = denoiser
        self.patcher = patcher_for(denoiser) if patcher is None else patcher
        if self.patcher.model is not denoiser:
            raise ValueError(f"patcher must patch pipe.{self.adapter.denoiser}, not another model")
        _check_layers(rule, self.patcher)  # SEG(layers="bogus") fails here, listing the layers
        self._steps: list[_Step] = []
        self._calls = 0
        self._state: Any = None
        self._positions = 0
        self._sequential: _SequentialStep | None = None
        if fork is not None and not isinstance(fork, bool):
            raise TypeError(f"fork must be True, False or None (automatic), got {fork!r}")
        self.fork = fork

    def __repr__(self) -> str:
        return f"GuidedPipeline({type(self.pipe).__name__}, {self.rule!r})"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the pipeline (same arguments, minus its own guidance settings) under the rule."""
        forced = self.adapter.call_kwargs(self.pipe)
        clash = sorted(set(forced) & set(kwargs))
        if clash:
            raise TypeError(
                f"GuidedPipeline sets {clash} itself; put CFG in the rule instead, e.g. "
                "SEG(3.0, cfg_scale=5.0) or Compose(CFG(5.0), PAG(3.0))"
            )
        for name, instead in _REFUSED.items():
            if name in kwargs:
                raise TypeError(
                    f"GuidedPipeline does not take {name}={kwargs[name]!r}: the pipeline would "
                    f"apply it to the already guided prediction (a silent no-op); {instead}"
                )
        with self.guiding():
            return self.pipe(*args, **kwargs, **forced)

    @contextmanager
    def guiding(self) -> Iterator[None]:
        """Install the denoiser hooks for the duration of the context (one sampling run)."""
        self._calls = 0
        self._state = self.rule.init_state()
        self._steps = []
        self._positions = 0
        self._sequential = None
        with ExitStack() as stack:
            pre = pre_hook_with_kwargs(self.denoiser, self._pre)
            stack.callback(pre.remove)
            post = self.denoiser.register_forward_hook(self._post, always_call=True)
            stack.callback(post.remove)
            # After our pre-hook, so the patcher sees the expanded batch.
            stack.enter_context(self.patcher.attached())
            stack.callback(self._close_steps)
            yield
        if self._sequential is not None:
            raise RuntimeError(
                f"sequential adapter {self.adapter.name!r}: the run ended in the middle of a step "
                f"(the pipeline did not call the denoiser once per conditioning "
                f"{self.adapter.sequential}; e.g. Flux true CFG without a negative prompt)"
            )

    def _close_steps(self) -> None:
        while self._steps:
            self._steps.pop().stack.close()

    def _context(self, timestep: Any) -> StepContext:
        sigma = self.adapter.sigma(self.pipe, timestep)
        # The pipeline's own count of this run's steps (img2img runs only the tail of
        # the scheduler's timesteps), else the scheduler's.
        n = getattr(self.pipe, "_num_timesteps", None)
        if not isinstance(n, int):
            timesteps = getattr(self.pipe.scheduler, "timesteps", None)
            n = len(timesteps) if timesteps is not None else 0
        if 0 <= self._calls < n:
            return StepContext(sigma, step=self._calls, num_steps=n)
        return StepContext(sigma)

    def _pre(
        self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        if not isinstance(sample, torch.Tensor):
            raise TypeError(
                f"GuidedPipeline: pipe.{self.adapter.denoiser} was called without a latent tensor"
            )
        batch = sample.shape[0]
        position = None
        if self.adapter.sequential is not None:
            order, ctx, position = self._sequential_branches(timestep)
            incoming: tuple[str, ...] = (self.adapter.sequential[position],)
        else:
            incoming = self.adapter.incoming(self.pipe)
            ctx = self._context(timestep)
            self._calls += 1
            order = _batch_order(self.rule.branches(ctx))
        if batch % len(incoming):
            raise RuntimeError(
                f"denoiser batch {batch} does not split into the chunks {incoming} the pipeline "
                "should pass"
            )
        chunk = batch // len(incoming)
        # Autoguidance branches run on their own model: never part of the forked call.
        weak_branches = [b for b in order if isinstance(b.perturbation, WeakModel)]
        batched = [b for b in order if b not in weak_branches]
        plan = plan_fork(batched, self.patcher, self.fork, chunk) if len(batched) > 1 else None
        if plan is not None:  # fork mode: perturbed branches in fork order
            order = plan.order + weak_branches
        rows: list[int] = []
        weak = []
        for b in order:
            if b.conditioning not in incoming:
                raise RuntimeError(
                    f"the rule needs branch {b!r} but the pipeline passes only {incoming} "
                    "(e.g. a guidance-distilled UNet with time_cond_proj_dim runs no "
                    "unconditional branch)"
                )
            start = incoming.index(b.conditioning) * chunk
            if isinstance(b.perturbation, AttentionMaskedBlur):
                raise NotImplementedError(
                    "SAG (AttentionMaskedBlur) needs a second, dependent forward per step, which "
                    "GuidedPipeline does not run; use smoothguide.GuidedDenoiser for SAG"
                )
            if isinstance(b.perturbation, WeakModel):  # autoguidance: run by its own model
                if b.perturbation.model is self.denoiser:
                    raise ValueError("WeakModel's model must not be the pipeline's own denoiser")
                ix = torch.arange(start, start + chunk, device=sample.device)
                weak.append((b, _map_rows(args, batch, ix), _map_rows(kwargs, batch, ix)))
                continue
            rows.extend(range(start, start + chunk))
        order = [b for b in order if not isinstance(b.perturbation, WeakModel)]
        index = torch.tensor(rows, device=sample.device)
        step = _Step(order, chunk, batch, ctx, position=position, weak=weak)
        self._steps.append(step)
        if plan is not None:
            step.stack.enter_context(self.patcher.forking(plan.spec))
        for j, b in enumerate(order):
            if b.perturbation is not None:
                span = range(j * chunk, (j + 1) * chunk)
                step.stack.enter_context(self.patcher.perturb(b.perturbation, span))
        return _map_rows(args, batch, index), _map_rows(kwargs, batch, index)

    def _post(self, module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        if not self._steps:
            return None
        step = self._steps.pop()
        step.stack.close()
        if output is None:  # the forward raised; torch re-raises it after this hook
            return None
        sample = output[0] if isinstance(output, tuple) else output.sample
        chunk = step.chunk
        outputs = {b: sample[j * chunk : (j + 1) * chunk] for j, b in enumerate(step.order)}
        for b, w_args, w_kwargs in step.weak:
            assert isinstance(b.perturbation, WeakModel)
            w_out = b.perturbation.model(*w_args, **w_kwargs)
            outputs[b] = w_out[0] if isinstance(w_out, tuple) else w_out.sample
        if step.position is not None:
            full = self._sequential_result(step.position, outputs)
        else:
            guided, self._state = self.rule.combine(outputs, step.ctx, self._state)
            guided = _no_renoise(guided, self.rule)
            copies = step.incoming // chunk
            full = guided if copies == 1 else torch.cat([guided] * copies, dim=0)
        if isinstance(output, tuple):
            return (full, *output[1:])
        return type(output)(sample=full)

    # -- pipelines that call the denoiser once per conditioning ---------------------------------

    def _sequential_branches(self, timestep: Any) -> tuple[list[Branch], StepContext, int]:
        seq = self.adapter.sequential
        assert seq is not None
        position = self._positions % len(seq)
        self._positions += 1
        if position == 0:
            ctx = self._context(timestep)
            self._calls += 1
            needed = _batch_order(self.rule.branches(ctx))
            foreign = sorted({b.conditioning for b in needed} - set(seq))
            if foreign:
                raise RuntimeError(
                    f"the rule needs {foreign} branches but the pipeline runs only {seq}"
                )
            self._sequential = _SequentialStep(ctx, needed, _timestep_value(timestep))
        current = self._sequential
        if current is None:
            raise RuntimeError("sequential pipeline call out of order: no step in progress")
        if position > 0 and _timestep_value(timestep) != current.timestep:
            raise RuntimeError(
                f"sequential adapter {self.adapter.name!r}: call {position + 1} of a step came at "
                f"timestep {_timestep_value(timestep)}, not {current.timestep}: the pipeline did "
                f"not call the denoiser once per conditioning {seq} (e.g. Flux true CFG without a "
                "negative prompt)"
            )
        conditioning = seq[position]
        order = [b for b in current.needed if b.conditioning == conditioning]
        if not order:
            # The pipeline calls the denoiser for this conditioning anyway; run its plain branch.
            order = [Branch(conditioning)]  # type: ignore[arg-type]
        return order, current.ctx, position

    def _sequential_result(self, position: int, outputs: dict[Branch, Any]) -> Any:
        current = self._sequential
        seq = self.adapter.sequential
        assert current is not None
        assert seq is not None
        current.outputs.update(outputs)
        conditioning = seq[position]
        if position < len(seq) - 1:
            plain = Branch(conditioning)  # type: ignore[arg-type]
            current.first = outputs.get(plain, next(iter(outputs.values())))
            return current.first
        needed = {b: current.outputs[b] for b in current.needed}
        guided, self._state = self.rule.combine(needed, current.ctx, self._state)
        guided = _no_renoise(guided, self.rule)
        self._sequential = None
        s = float(self.adapter.pipeline_scale)
        # 16-bit outputs are solved in float32; float32/float64 in their own precision.
        work = torch.promote_types(guided.dtype, torch.float32)
        first = current.first.to(work)
        target = guided.to(work)
        # The pipeline computes u + s (c - u) from what the two calls returned.
        if conditioning == "uncond":  # cond came first: solve for u
            value = (s * first - target) / (s - 1.0)
        else:  # uncond came first: solve for c
            value = first + (target - first) / s
        return value.to(guided.dtype)
