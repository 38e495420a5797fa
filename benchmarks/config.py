"""What each benchmark variant measures: shapes, sigmas, repeats and sizes."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = ["FULL", "QUICK", "TINY", "VARIANTS", "Config"]

Shape = tuple[int, int, int, int, int]  # (batch, heads, height, width, dim)


@dataclass(frozen=True)
class Config:
    """One benchmark variant.

    Attributes
    ----------
    name
        ``"quick"``, ``"full"`` or ``"tiny"`` (the smoke test's).
    shapes
        Query shapes ``(batch, heads, height, width, dim)``: tokens = height * width.
    sigmas
        Blur widths of the smoothing table (``math.inf``: the mean query).
    repeat
        Timed repeats per measurement (the median is reported), after one warm-up.
    budget_s
        Stop repeating one measurement after this many seconds (at least ``min_repeat``).
    min_repeat
        Fewest timed repeats of a measurement.
    step_batch
        Images per branch for the demo model in the guided-step benchmark.
    unet_batch
        Latents per branch for the tiny UNet in the guided-step benchmark.
    step_repeat
        Timed repeats of one guided step.
    step_warmup
        Untimed guided steps per variant before timing.
    demo_config, unet_config
        Keyword arguments of the demo DiT config and of the tiny ``UNet2DConditionModel``.
    unet_latent
        Latent height and width of the tiny UNet.
    memory_grids
        ``(height, width, dim)`` of the memory measurement.
    scaling_grids
        Square grid sides of the scaling plot.
    scaling_lead
        ``(batch, heads)`` of the scaling measurement (dim 64).
    scaling_sigmas
        Blur widths of the scaling plot.
    fork_repeat
        Timed repeats of the fork-mode benchmark's wall-time part (0: FLOPs only).
    fork_timed
        Models of the fork-mode benchmark that are also timed on the CPU.
    """

    name: str
    shapes: tuple[Shape, ...]
    sigmas: tuple[float, ...]
    repeat: int
    budget_s: float
    min_repeat: int
    step_batch: int
    unet_batch: int
    step_repeat: int
    step_warmup: int = 2
    demo_config: dict[str, int] = field(default_factory=dict)
    unet_config: dict[str, object] = field(default_factory=dict)
    unet_latent: int = 32
    memory_grids: tuple[tuple[int, int, int], ...] = ()
    scaling_grids: tuple[int, ...] = ()
    scaling_lead: tuple[int, int] = (1, 4)
    scaling_sigmas: tuple[float, ...] = (3.0, 10.0)
    fork_repeat: int = 3
    fork_timed: tuple[str, ...] = ("SD 1.5 UNet", "SDXL UNet", "SD3-medium transformer")


SDXL_SHAPES: tuple[Shape, ...] = (
    (2, 10, 64, 64, 64),  # SDXL 1024x1024, down/up level 1 (64x64 latent tokens)
    (2, 20, 32, 32, 64),  # SDXL mid block (the paper's layers)
    (2, 10, 48, 80, 64),  # a non-square (768x1280) image at the 64x64 level
)
SIGMAS = (1.0, 3.0, 10.0, math.inf)

#: A tiny UNet2DConditionModel: attention at both levels and in the mid block.
TINY_UNET: dict[str, object] = {
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": (32, 64),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
}

#: An even smaller UNet for the smoke test.
MICRO_UNET: dict[str, object] = {
    **TINY_UNET,
    "block_out_channels": (8, 16),
    "cross_attention_dim": 8,
    "attention_head_dim": 4,
    "norm_num_groups": 4,
}

MEMORY_GRIDS = (
    (16, 16, 64),
    (32, 32, 64),
    (48, 80, 64),
    (64, 64, 64),
    (96, 96, 64),
    (128, 128, 64),
    (64, 64, 8),
    (128, 128, 1),
    (256, 256, 1),
    (64, 512, 1),
    (512, 512, 1),
)

QUICK = Config(
    name="quick",
    shapes=SDXL_SHAPES,
    sigmas=SIGMAS,
    repeat=7,
    budget_s=1.0,
    min_repeat=3,
    step_batch=16,
    unet_batch=4,
    step_repeat=9,
    unet_config=TINY_UNET,
    unet_latent=32,
    memory_grids=MEMORY_GRIDS,
    scaling_grids=(16, 32, 64, 96, 128),
    scaling_lead=(1, 4),
    fork_timed=("SD 1.5 UNet", "SDXL UNet"),  # the real SD3-medium takes minutes per repeat
)

FULL = Config(
    name="full",
    shapes=SDXL_SHAPES,
    sigmas=SIGMAS,
    repeat=21,
    budget_s=15.0,
    min_repeat=5,
    step_batch=32,
    unet_batch=8,
    step_repeat=21,
    unet_config=TINY_UNET,
    unet_latent=64,
    memory_grids=MEMORY_GRIDS,
    scaling_grids=(16, 24, 32, 48, 64, 96, 128),
    scaling_lead=(2, 10),
    fork_repeat=5,
)

#: Tiny shapes for the smoke test (seconds; the numbers mean nothing).
TINY = Config(
    name="tiny",
    shapes=((1, 2, 8, 8, 4), (1, 2, 6, 10, 4)),
    sigmas=(1.0, 10.0, math.inf),
    repeat=1,
    budget_s=0.5,
    min_repeat=1,
    step_batch=2,
    unet_batch=2,
    step_repeat=1,
    step_warmup=0,
    demo_config={"hidden": 16, "depth": 3, "heads": 2},
    unet_config=MICRO_UNET,
    unet_latent=8,
    memory_grids=((8, 8, 4), (8, 16, 4), (16, 16, 1), (32, 32, 1)),
    scaling_grids=(8, 16),
    scaling_lead=(1, 1),
    scaling_sigmas=(3.0,),
    fork_repeat=0,
)

VARIANTS = {c.name: c for c in (QUICK, FULL, TINY)}
