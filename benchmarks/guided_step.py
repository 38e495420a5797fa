"""Benchmark 2: wall time of one guided sampling step, and forward counts.

Models: the embedded demo DiT (:class:`smoothguide.demo.model.DemoDenoiser`,
random weights: the time does not depend on them) and a tiny diffusers
``UNet2DConditionModel`` wrapped as a k-diffusion denoiser. Guidance goes
through the public :class:`smoothguide.sampling.GuidedDenoiser` with the public
perturbers (:func:`smoothguide.demo.guide.demo_patcher`,
:func:`smoothguide.diffusers.patcher_for`), so this measures what a user gets.

Variants, each one Euler step ``x + (x - D(x, s)) / s * (s_next - s)``:

(a) no guidance: the plain denoiser, one forward of ``B`` rows;
(b) CFG: ``[uncond, cond]`` batched, ``2B`` rows;
(c) CFG + SEG batched: ``[uncond, cond, cond_blurred]``, ``3B`` rows, one forward;
(d) CFG + SEG as three separate forwards of ``B`` rows;
(e) SEG alone, unconditional: ``[x, x_blurred]``, ``2B`` rows;
(r2), (r3) references: the plain model on ``2B`` / ``3B`` rows (no guidance code),
so ``(c) / (r3)`` and ``(e) / (r2)`` isolate the cost of the SEG machinery
(hooks, row selection, the blur) from how the model's time grows with the batch.

Forward counts (model calls, rows, blurred rows) are recorded for these and
for neutral settings (CFG scale 1, SEG scale 0, SEG sigma 0), which must
skip their branch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from smoothguide.rules import CFG, SEG
from smoothguide.sampling import GuidedDenoiser

from .config import Config
from .timing import Timing, measure_interleaved

__all__ = [
    "CFG_SCALE",
    "SEG_SCALE",
    "SEG_SIGMA",
    "CountingModel",
    "CountingPerturber",
    "ModelBench",
    "StepResult",
    "demo_bench",
    "run_guided_step",
    "unet_bench",
]

CFG_SCALE = 5.0
SEG_SCALE = 3.0
#: Blur width of the timed SEG branch (a finite sigma runs the blur; inf is a mean).
SEG_SIGMA = 10.0
SIGMA, SIGMA_NEXT = 1.0, 0.8


class CountingModel:
    """Wraps ``model(x, sigma, **cond)``; counts calls and rows."""

    def __init__(self, model: Callable[..., Any]) -> None:
        self.model = model
        self.calls = 0
        self.rows = 0

    def reset(self) -> None:
        self.calls = self.rows = 0

    def __call__(self, x: Any, sigma: Any, **cond: Any) -> Any:
        self.calls += 1
        self.rows += int(x.shape[0])
        return self.model(x, sigma, **cond)


class CountingPerturber:
    """Wraps a :class:`~smoothguide.branches.Perturber`; counts perturbed branches and rows."""

    def __init__(self, perturber: Any) -> None:
        self.perturber = perturber
        self.entries = 0
        self.rows = 0

    def reset(self) -> None:
        self.entries = self.rows = 0

    @contextmanager
    def perturb(self, perturbation: Any, rows: Sequence[int]) -> Iterator[None]:
        self.entries += 1
        self.rows += len(rows)
        with self.perturber.perturb(perturbation, rows):
            yield


@dataclass
class ModelBench:
    """A model under test: its denoiser, perturber, inputs and conditioning."""

    name: str
    description: str
    model: CountingModel
    perturber: CountingPerturber
    x: torch.Tensor
    cond: dict[str, Any]
    uncond: dict[str, Any]
    seg_layers: str

    @property
    def uncond_full(self) -> dict[str, Any]:
        """The unconditional keyword arguments broadcast to the batch (SEG alone, unconditional)."""
        b = int(self.x.shape[0])
        return {k: v.expand(b, *v.shape[1:]) for k, v in self.uncond.items()}


@dataclass
class StepResult:
    """Timing and counts of one variant on one model."""

    model: str
    variant: str
    label: str
    timing: Timing | None
    calls: int
    rows: int
    blurred_rows: int
    batch: int


@dataclass
class GuidedStepResults:
    """All variants on all models, plus the neutral-term forward counts."""

    timed: list[StepResult] = field(default_factory=list)
    neutral: list[StepResult] = field(default_factory=list)
    models: dict[str, str] = field(default_factory=dict)

    def median(self, model: str, variant: str) -> float | None:
        for r in self.timed:
            if r.model == model and r.variant == variant and r.timing is not None:
                return r.timing.median
        return None

    def ratio(self, model: str, num: str, den: str) -> float | None:
        a, b = self.median(model, num), self.median(model, den)
        return None if a is None or b is None else a / b


def demo_bench(config: Config) -> ModelBench:
    """The demo DiT (random weights) with its public patcher; ``config.step_batch`` images."""
    from smoothguide.demo.guide import DEFAULT_LAYERS, demo_patcher
    from smoothguide.demo.model import NULL_CLASS, DemoDenoiser, DemoDiT, DiTConfig

    torch.manual_seed(0)
    dit_config = DiTConfig(**config.demo_config)
    den = DemoDenoiser(DemoDiT(dit_config)).eval()
    b = config.step_batch
    labels = torch.arange(b) % 10
    c = dit_config
    return ModelBench(
        name="demo DiT",
        description=(
            f"smoothguide.demo DemoDiT (hidden {c.hidden}, depth {c.depth}, heads {c.heads}, "
            f"{c.grid}x{c.grid} tokens), batch {b} of 1x{c.image_size}x{c.image_size}"
        ),
        model=CountingModel(den),
        perturber=CountingPerturber(demo_patcher(den)),
        x=torch.randn(b, c.channels, c.image_size, c.image_size),
        cond={"class_labels": labels},
        uncond={"class_labels": torch.full((1,), NULL_CLASS, dtype=torch.long)},
        seg_layers=f"preset {DEFAULT_LAYERS!r} (all {c.depth} attention layers)",
    )


class UNetDenoiser(torch.nn.Module):  # type: ignore[misc]
    """k-diffusion wrapper of an eps-prediction UNet: ``x - sigma * eps(x / sqrt(1 + sigma²))``."""

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x: Any, sigma: Any, *, encoder_hidden_states: Any) -> Any:
        s = torch.as_tensor(sigma, dtype=x.dtype).expand(x.shape[0])
        t = torch.atan(s) * (2 / math.pi) * 999
        eps = self.unet(
            x / torch.sqrt(1 + s * s)[:, None, None, None],
            t,
            encoder_hidden_states=encoder_hidden_states,
        ).sample
        return x - s[:, None, None, None] * eps


def unet_bench(config: Config) -> ModelBench:
    """A tiny random ``UNet2DConditionModel`` with the diffusers UNet family's patcher."""
    from diffusers import UNet2DConditionModel

    from smoothguide.diffusers import patcher_for, unet_presets

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**config.unet_config).eval()  # type: ignore[arg-type]
    b, n = config.unet_batch, config.unet_latent
    ctx_dim = int(config.unet_config["cross_attention_dim"])  # type: ignore[call-overload]
    mid = unet_presets(unet)["mid"]
    channels = config.unet_config["block_out_channels"]
    params = sum(p.numel() for p in unet.parameters())
    return ModelBench(
        name="tiny UNet",
        description=(
            f"diffusers UNet2DConditionModel, random weights, block_out_channels {channels}, "
            f"{params / 1e6:.2f} M parameters; batch {b} of 4x{n}x{n} latents, 8 text tokens"
        ),
        model=CountingModel(UNetDenoiser(unet)),
        perturber=CountingPerturber(patcher_for(unet)),
        x=torch.randn(b, 4, n, n),
        cond={"encoder_hidden_states": torch.randn(b, 8, ctx_dim)},
        uncond={"encoder_hidden_states": torch.zeros(1, 8, ctx_dim)},
        seg_layers=f"preset 'mid' ({len(mid)} attn1 layer{'s' * (len(mid) != 1)})",
    )


def _euler(den: Callable[..., Any], x: torch.Tensor, cond: Mapping[str, Any]) -> torch.Tensor:
    d = (x - den(x, SIGMA, **cond)) / SIGMA
    return x + d * (SIGMA_NEXT - SIGMA)


def _variants(mb: ModelBench) -> list[tuple[str, str, Callable[..., Any], dict[str, Any]]]:
    """``(key, label, denoiser, cond)`` of the timed variants and of the neutral checks."""

    def guided(rule: Any, *, batched: bool = True) -> GuidedDenoiser:
        return GuidedDenoiser(
            mb.model, rule, uncond=mb.uncond, perturber=mb.perturber, batched=batched
        )

    seg_cfg = SEG(SEG_SCALE, sigma=SEG_SIGMA, cfg_scale=CFG_SCALE)
    return [
        ("a", "(a) no guidance", mb.model, mb.cond),
        ("b", f"(b) CFG w={CFG_SCALE:g}", guided(CFG(CFG_SCALE)), mb.cond),
        ("c", "(c) CFG + SEG, one batched forward", guided(seg_cfg), mb.cond),
        ("d", "(d) CFG + SEG, separate forwards", guided(seg_cfg, batched=False), mb.cond),
        (
            "e",
            "(e) SEG alone, unconditional",
            guided(SEG(SEG_SCALE, sigma=SEG_SIGMA)),
            mb.uncond_full,
        ),
        ("r2", "(r2) reference: plain model, 2B rows", _stacked(mb, 2), _stacked_cond(mb, 2)),
        ("r3", "(r3) reference: plain model, 3B rows", _stacked(mb, 3), _stacked_cond(mb, 3)),
    ]


def _stacked(mb: ModelBench, k: int) -> Callable[..., Any]:
    """The plain model on ``k`` stacked copies of the batch; returns the first copy's output."""
    b = int(mb.x.shape[0])

    def den(x: Any, sigma: Any, **cond: Any) -> Any:
        return mb.model(torch.cat([x] * k), sigma, **cond)[:b]

    return den


def _stacked_cond(mb: ModelBench, k: int) -> dict[str, Any]:
    return {key: torch.cat([v] * k) for key, v in mb.cond.items()}


def _neutral(mb: ModelBench) -> list[tuple[str, str, Callable[..., Any], dict[str, Any]]]:
    def guided(rule: Any) -> GuidedDenoiser:
        return GuidedDenoiser(mb.model, rule, uncond=mb.uncond, perturber=mb.perturber)

    return [
        ("n1", "CFG w=1 (neutral)", guided(CFG(1.0)), mb.cond),
        (
            "n2",
            f"CFG w={CFG_SCALE:g} + SEG s=0 (SEG neutral)",
            guided(SEG(0.0, sigma=SEG_SIGMA, cfg_scale=CFG_SCALE)),
            mb.cond,
        ),
        (
            "n3",
            f"CFG w={CFG_SCALE:g} + SEG s={SEG_SCALE:g}, sigma=0 (no blur: neutral)",
            guided(SEG(SEG_SCALE, sigma=0.0, cfg_scale=CFG_SCALE)),
            mb.cond,
        ),
        ("n4", "SEG s=0, no CFG (both neutral)", guided(SEG(0.0, sigma=SEG_SIGMA)), mb.cond),
        (
            "n5",
            f"CFG w=1 + SEG s={SEG_SCALE:g} (CFG neutral)",
            guided(SEG(SEG_SCALE, sigma=SEG_SIGMA, cfg_scale=1.0)),
            mb.cond,
        ),
    ]


def _count(mb: ModelBench, den: Callable[..., Any], cond: Mapping[str, Any]) -> tuple[int, ...]:
    mb.model.reset()
    mb.perturber.reset()
    _euler(den, mb.x, cond)
    return mb.model.calls, mb.model.rows, mb.perturber.rows


def _bench_model(
    mb: ModelBench, config: Config, results: GuidedStepResults, progress: bool
) -> None:
    results.models[mb.name] = mb.description + f"; SEG layers: {mb.seg_layers}"
    b = int(mb.x.shape[0])
    with torch.inference_mode():
        variants = _variants(mb)
        counts = {key: _count(mb, den, cond) for key, _, den, cond in variants}
        fns = {
            key: (lambda den=den, cond=cond: _euler(den, mb.x, cond))
            for key, _, den, cond in variants
        }
        timings = measure_interleaved(
            fns,
            repeat=config.step_repeat,
            budget_s=config.budget_s,
            min_repeat=config.min_repeat,
            warmup=config.step_warmup,
            desc=f"guided step ({mb.name})" if progress else None,
        )
        for key, label, _, _ in variants:
            calls, rows, blurred = counts[key]
            results.timed.append(
                StepResult(mb.name, key, label, timings[key], calls, rows, blurred, b)
            )
        for key, label, den, cond in _neutral(mb):
            calls, rows, blurred = _count(mb, den, cond)
            results.neutral.append(StepResult(mb.name, key, label, None, calls, rows, blurred, b))


def run_guided_step(config: Config, *, progress: bool = True) -> GuidedStepResults:
    """Time variants (a)-(e) on the demo DiT and the tiny UNet; count forwards."""
    results = GuidedStepResults()
    for factory in (demo_bench, unet_bench):
        mb = factory(config)
        _bench_model(mb, config, results, progress)
    return results
