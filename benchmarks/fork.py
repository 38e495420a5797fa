"""Benchmark 5: fork mode (perturbed branches join the batch at their first perturbed layer).

Models at their real configurations with random weights (nothing is downloaded):
the SD 1.5 and SDXL ``UNet2DConditionModel`` (SEG on the ``"mid"`` preset) and
an SD3-medium ``SD3Transformer2DModel`` (24 joint blocks of width 1536; SEG on the
joint attention of blocks 7–9) and, for FLOPs only, PixArt-Σ's
``PixArtTransformer2DModel`` (28 blocks of width 1152; SEG on the ``"mid"`` preset,
blocks 9–18), one image, a 32 × 32 latent, 77 text tokens (SD3: 77 + 256 = 333, as
its CLIP + T5 sequence; PixArt-Σ: 300 T5 tokens), float32, through
:class:`smoothguide.sampling.GuidedDenoiser` with the family's patcher.

Two measurements per model and variant:

- **FLOPs**: ``torch.utils.flop_counter.FlopCounterMode`` over one guided call
  with the weights on the ``meta`` device (no arithmetic runs, so it is exact,
  fast and the same on every machine);
- **CPU time** (``quick``: SD 1.5; ``--full``: all three): one torch thread,
  the computing thread's CPU seconds (``time.thread_time``: what other
  processes on a shared machine do not inflate), median of interleaved
  repeats; and the peak bytes the torch allocator held during one CFG + SEG
  call (profiler memory events), forked and unforked.

Variants: (a) no guidance, (b) CFG w = 5, (c) CFG + SEG unforked / (cf) forked,
(e) SEG alone unforked / (ef) forked (s = 3, σ = 10).
"""

from __future__ import annotations

import gc
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from smoothguide.rules import CFG, SEG
from smoothguide.sampling import GuidedDenoiser

from .config import Config
from .memory import _quiet_stderr
from .timing import Timing

__all__ = ["FORK_MODELS", "ForkResults", "render_fork", "run_fork"]

CFG_SCALE, SEG_SCALE, SEG_SIGMA = 5.0, 3.0, 10.0
LATENT = 32

SD15: dict[str, Any] = {"cross_attention_dim": 768, "attention_head_dim": 8}  # diffusers defaults
SDXL: dict[str, Any] = {
    "sample_size": 128,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (320, 640, 1280),
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "use_linear_projection": True,
}
SD3_MEDIUM: dict[str, Any] = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "out_channels": 16,
    "pos_embed_max_size": 192,
}
#: PixArt-Σ (diffusers' defaults are its configuration; 4096-wide T5 captions).
PIXART_SIGMA: dict[str, Any] = {"caption_channels": 4096, "use_additional_conditions": False}
#: Tiny stand-ins for the smoke test (the numbers mean nothing).
TINY_MODELS: dict[str, dict[str, Any]] = {
    "SD 1.5 UNet": {
        "block_out_channels": (8, 16),
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "layers_per_block": 1,
        "norm_num_groups": 4,
        "cross_attention_dim": 8,
        "attention_head_dim": 2,
    },
    "SD3-medium transformer": {
        "sample_size": 16,
        "patch_size": 2,
        "in_channels": 4,
        "num_layers": 10,
        "attention_head_dim": 4,
        "num_attention_heads": 2,
        "joint_attention_dim": 8,
        "caption_projection_dim": 8,
        "pooled_projection_dim": 4,
        "out_channels": 4,
    },
    "PixArt-Σ transformer": {
        "num_attention_heads": 2,
        "attention_head_dim": 4,
        "in_channels": 4,
        "out_channels": 8,
        "num_layers": 6,
        "cross_attention_dim": 8,
        "caption_channels": 8,
        "sample_size": 16,
        "use_additional_conditions": False,
    },
}
FORK_MODELS: dict[str, dict[str, Any]] = {
    "SD 1.5 UNet": SD15,
    "SDXL UNet": SDXL,
    "SD3-medium transformer": SD3_MEDIUM,
    "PixArt-Σ transformer": PIXART_SIGMA,
}
SD3_SEG_LAYERS = tuple(f"transformer_blocks.{i}.attn" for i in (7, 8, 9))
VARIANTS = {
    "a": "(a) no guidance",
    "b": f"(b) CFG w={CFG_SCALE:g}",
    "c": "(c) CFG + SEG, unforked",
    "cf": "(cf) CFG + SEG, forked",
    "e": "(e) SEG alone, unforked",
    "ef": "(ef) SEG alone, forked",
}


def _kind(name: str) -> str:
    return "sd3" if "SD3" in name else "pixart" if "PixArt" in name else "unet"


class _Wrapped(torch.nn.Module):  # type: ignore[misc]
    """``model(x, sigma, **cond) -> prediction`` around a UNet, SD3 or PixArt transformer."""

    def __init__(self, net: torch.nn.Module, kind: str) -> None:
        super().__init__()
        self.net, self.kind = net, kind

    def forward(self, x: torch.Tensor, sigma: Any, **cond: Any) -> torch.Tensor:
        t = torch.full((x.shape[0],), 500.0, device=x.device)
        if self.kind == "sd3":
            return self.net(hidden_states=x, timestep=t, **cond, return_dict=False)[0]
        if self.kind == "pixart":  # as PixArtSigmaPipeline calls it (no size conditions)
            extra = {"resolution": None, "aspect_ratio": None}
            return self.net(x, timestep=t, added_cond_kwargs=extra, **cond, return_dict=False)[0]
        return self.net(x, t, **cond, return_dict=False)[0]


def _build(name: str, config: dict[str, Any], device: str) -> torch.nn.Module:
    import diffusers

    cls = {
        "sd3": diffusers.SD3Transformer2DModel,
        "pixart": diffusers.PixArtTransformer2DModel,
        "unet": diffusers.UNet2DConditionModel,
    }[_kind(name)]
    if device == "meta":
        with torch.device("meta"):
            return cls(**config).eval()
    from accelerate import init_empty_weights

    with init_empty_weights():
        net = cls(**config)
    net = net.to_empty(device=device)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # random weights, quickly: the time does not depend on them
        for pname, p in net.named_parameters():
            if p.ndim > 1:
                p.normal_(0.0, 0.02, generator=gen)
            else:
                p.fill_(1.0 if pname.endswith("norm.weight") or ".norm" in pname else 0.0)
    return net.eval()


def _inputs(
    name: str, net: torch.nn.Module, device: str
) -> tuple[torch.Tensor, dict[str, Any], dict[str, Any]]:
    cfg = net.config
    g = torch.Generator().manual_seed(1)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device)

    if _kind(name) == "pixart":
        x = rnd(1, cfg.in_channels, LATENT, LATENT)
        tokens = 300 if cfg.caption_channels > 64 else 5
        cond = {"encoder_hidden_states": rnd(1, tokens, cfg.caption_channels)}
    elif _kind(name) == "sd3":
        x = rnd(1, cfg.in_channels, LATENT, LATENT)
        tokens = 333 if cfg.joint_attention_dim > 64 else 5
        cond = {
            "encoder_hidden_states": rnd(1, tokens, cfg.joint_attention_dim),
            "pooled_projections": rnd(1, cfg.pooled_projection_dim),
        }
    else:
        x = rnd(1, cfg.in_channels, LATENT, LATENT)
        cond = {"encoder_hidden_states": rnd(1, 77, cfg.cross_attention_dim)}
        if cfg.addition_embed_type == "text_time":
            text = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            cond["added_cond_kwargs"] = {"text_embeds": rnd(1, text), "time_ids": rnd(1, 6)}
    uncond = {k: (v * 0 if isinstance(v, torch.Tensor) else v) for k, v in cond.items()}
    if "added_cond_kwargs" in cond:
        uncond["added_cond_kwargs"] = {k: v * 0 for k, v in cond["added_cond_kwargs"].items()}
    return x, cond, uncond


def _variants(
    name: str, net: torch.nn.Module, x: torch.Tensor, cond: dict[str, Any], uncond: dict[str, Any]
) -> dict[str, Callable[[], Any]]:
    from smoothguide.diffusers import patcher_for

    model = _Wrapped(net, _kind(name))
    patcher = patcher_for(net)
    layers: Any = SD3_SEG_LAYERS if "SD3" in name else "mid"
    if "SD3" in name and len(net.transformer_blocks) < 24:
        layers = tuple(f"transformer_blocks.{i}.attn" for i in (3, 4))  # the tiny stand-in
    seg_cfg = SEG(SEG_SCALE, sigma=SEG_SIGMA, cfg_scale=CFG_SCALE, layers=layers)
    seg = SEG(SEG_SCALE, sigma=SEG_SIGMA, layers=layers)

    def guided(rule: Any, fork: bool) -> Callable[[], Any]:
        den = GuidedDenoiser(model, rule, uncond=uncond, perturber=patcher, fork=fork)
        return lambda: den(x, 1.0, **cond)

    return {
        "a": lambda: model(x, 1.0, **cond),
        "b": guided(CFG(CFG_SCALE), False),
        "c": guided(seg_cfg, False),
        "cf": guided(seg_cfg, True),
        "e": guided(seg, False),
        "ef": guided(seg, True),
    }


def _cpu_times(fns: dict[str, Callable[[], Any]], repeat: int) -> dict[str, Timing]:
    """CPU seconds of this thread per call, in interleaved rounds after one warm-up each."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeat):
            for k, fn in fns.items():
                t0 = time.thread_time()
                fn()
                times[k].append(time.thread_time() - t0)
    finally:
        if enabled:
            gc.enable()
    return {k: Timing(tuple(v)) for k, v in times.items()}


def _peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak bytes the torch CPU allocator held during ``fn()``, above its start."""
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        with _quiet_stderr():
            prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    finally:
        os.remove(path)
    totals = sorted(
        (e["ts"], e["args"]["Total Allocated"], e["args"].get("Bytes", 0))
        for e in events
        if e.get("name") == "[memory]" and "Total Allocated" in e.get("args", {})
    )
    if not totals:
        return 0
    return max(t for _, t, _ in totals) - (totals[0][1] - totals[0][2])


@dataclass
class ForkModel:
    """One model's results."""

    name: str
    params: int
    flops: dict[str, int] = field(default_factory=dict)
    timings: dict[str, Timing] = field(default_factory=dict)
    peak: dict[str, int] = field(default_factory=dict)

    def ratio(self, what: str, num: str, den: str) -> float | None:
        src: Any = self.flops if what == "flops" else self.timings
        if num not in src or den not in src:
            return None
        a, b = src[num], src[den]
        return (a / b) if what == "flops" else a.median / b.median


@dataclass
class ForkResults:
    """Every model's results, plus what the run used."""

    models: list[ForkModel] = field(default_factory=list)
    threads: int = 0
    timed: bool = False
    repeat: int = 0


def run_fork(config: Config, *, progress: bool = True) -> ForkResults:
    """FLOPs (meta device) and, unless ``config.fork_repeat`` is 0, CPU wall time and memory."""
    from torch.utils.flop_counter import FlopCounterMode

    tiny = config.name == "tiny"
    models = TINY_MODELS if tiny else FORK_MODELS
    res = ForkResults(threads=torch.get_num_threads(), repeat=config.fork_repeat)
    for name, cfg in models.items():
        net = _build(name, cfg, "meta")
        fm = ForkModel(name, sum(p.numel() for p in net.parameters()))
        x, cond, uncond = _inputs(name, net, "meta")
        with torch.inference_mode():
            for key, fn in _variants(name, net, x, cond, uncond).items():
                with FlopCounterMode(display=False) as counter:
                    fn()
                fm.flops[key] = int(counter.get_total_flops())
        del net
        res.models.append(fm)
    if config.fork_repeat < 1:
        return res
    res.timed = True
    for fm in res.models:
        if tiny is False and fm.name not in config.fork_timed:
            continue
        net = _build(fm.name, models[fm.name], "cpu")
        x, cond, uncond = _inputs(fm.name, net, "cpu")
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # all compute in this thread: its CPU time is the cost
        try:
            with torch.inference_mode():
                fns = _variants(fm.name, net, x, cond, uncond)
                fm.timings = _cpu_times(fns, config.fork_repeat)
                for key in ("c", "cf"):
                    gc.collect()
                    fm.peak[key] = _peak_bytes(fns[key])
        finally:
            torch.set_num_threads(threads)
        del net, fns
        gc.collect()
    return res


def _x(v: float | None) -> str:
    return "—" if v is None else f"{v:.3f}"


def _mib(n: int | None) -> str:
    return "—" if n is None else f"{n / 2**20:.0f} MiB"


GOALS = {"SDXL UNet": 1.30, "SD 1.5 UNet": 1.33, "SD3-medium transformer": 1.37}


def render_fork(res: ForkResults) -> str:
    """The fork-mode section of the benchmark report (Markdown)."""
    lines = [
        "Fork mode (`GuidedDenoiser(..., fork=None)`, on by default for every diffusers "
        "family): the batched call runs only the plain branches' rows until the "
        "perturbed branch's first perturbed block, where the rows it copies are duplicated "
        "(docs/fork.md). Models at their real configurations, random weights, 1 image, "
        f"{LATENT} × {LATENT} latent, float32; SEG s = {SEG_SCALE:g}, σ = {SEG_SIGMA:g} on "
        "the UNets' and PixArt-Σ's `mid` preset (PixArt-Σ: blocks 9–18, 300 text tokens, "
        "FLOPs only) and on SD3-medium's joint attention of blocks 7–9; CFG "
        f"w = {CFG_SCALE:g}.",
        "",
        "**FLOPs** (`torch.utils.flop_counter.FlopCounterMode`, weights on the meta device: "
        "exact and machine-independent):",
        "",
        "| model | params | (b) CFG GFLOP | (c) / (b) unforked | (cf) / (b) forked | goal "
        "(cf)/(b) | (e) / (a) unforked | (ef) / (a) forked |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in res.models:
        goal = GOALS.get(m.name)
        cf = m.ratio("flops", "cf", "b")
        status = "" if goal is None or cf is None else (" met" if cf <= goal else " not met")
        lines.append(
            f"| {m.name} | {m.params / 1e9:.2f} B | {m.flops.get('b', 0) / 1e9:.0f} | "
            f"{_x(m.ratio('flops', 'c', 'b'))} | {_x(cf)} | "
            f"{'—' if goal is None else f'≤ {goal}{status}'} | "
            f"{_x(m.ratio('flops', 'e', 'a'))} | {_x(m.ratio('flops', 'ef', 'a'))} |"
        )
    timed = [m for m in res.models if m.timings]
    if timed:
        lines += [
            "",
            "**CPU time** on this machine (one torch thread; CPU seconds of the computing "
            f"thread, `time.thread_time`, which other processes sharing the CPU do not "
            f"inflate; median of {res.repeat} interleaved repeats after one warm-up) and the "
            "peak bytes the torch allocator held during one CFG + SEG call:",
            "",
            "| model | (a) no guidance | (b) CFG | (c) / (b) unforked | (cf) / (b) forked | "
            "(e) / (a) unforked | (ef) / (a) forked | peak (c) | peak (cf) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for m in timed:
            lines.append(
                f"| {m.name} | {m.timings['a'].median:.2f} s | {m.timings['b'].median:.2f} s | "
                f"{_x(m.ratio('time', 'c', 'b'))} | {_x(m.ratio('time', 'cf', 'b'))} | "
                f"{_x(m.ratio('time', 'e', 'a'))} | {_x(m.ratio('time', 'ef', 'a'))} | "
                f"{_mib(m.peak.get('c'))} | {_mib(m.peak.get('cf'))} |"
            )
    return "\n".join(lines)
