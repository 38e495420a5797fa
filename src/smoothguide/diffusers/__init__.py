"""diffusers adapter: SEG and PAG for diffusers models and pipelines.

Needs the ``diffusers`` extra: PyTorch first, then ``pip install ".[diffusers]"`` from a
checkout (``pip install "smoothguide[diffusers]"`` once released on PyPI).

- :func:`patcher_for`: an :class:`~smoothguide.torch.AttentionPatcher` for a
  diffusers model, via its registered :class:`ModelFamily`
  (``UNet2DConditionModel``: :mod:`smoothguide.diffusers.unet`; SD3, Flux,
  PixArt/DiT and video transformers: :mod:`smoothguide.diffusers.transformers`).
- :class:`GuidedPipeline`: run a ``StableDiffusionPipeline`` or
  ``StableDiffusionXLPipeline`` under any :mod:`smoothguide.rules` rule, all
  branches batched into one denoiser call per step.
- :class:`SmoothguideGuidance`: any rule as a diffusers modular-pipeline guider
  (``BaseGuidance``), SEG / PAG branches perturbed through the patcher.
"""

from __future__ import annotations

# `transformers` registers the SD3, Flux, PixArt/DiT, LTX-Video and Wan families and
# their pipeline adapters (it imports what it builds on itself).
from . import transformers as _transformers  # noqa: F401
from ._deps import diffusers as _diffusers  # noqa: F401  (fails early, naming the extra)
from .family import ModelFamily, families, family_for, patcher_for, register_family
from .guider import SmoothguideGuidance, rule_from_config, rule_to_config
from .pipeline import (
    GuidedPipeline,
    PipelineAdapter,
    adapter_for,
    register_pipeline_adapter,
    scheduler_sigma,
)
from .unet import UNET2D, unet_layers, unet_presets

__all__ = [
    "UNET2D",
    "GuidedPipeline",
    "ModelFamily",
    "PipelineAdapter",
    "SmoothguideGuidance",
    "adapter_for",
    "families",
    "family_for",
    "patcher_for",
    "register_family",
    "register_pipeline_adapter",
    "rule_from_config",
    "rule_to_config",
    "scheduler_sigma",
    "unet_layers",
    "unet_presets",
]
