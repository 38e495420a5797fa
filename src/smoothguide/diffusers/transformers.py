"""Transformer diffusion models: SD3, Flux, PixArt/DiT, LTX-Video, Wan, CogVideoX; pipelines.

Importing this module registers the model families with
:func:`~smoothguide.diffusers.register_family` (so
:func:`~smoothguide.diffusers.patcher_for` serves these transformers) and the
pipeline adapters with
:func:`~smoothguide.diffusers.pipeline.register_pipeline_adapter` (so
:class:`~smoothguide.diffusers.pipeline.GuidedPipeline` drives their pipelines).

Pipelines and what the wrapper needs from them:

``StableDiffusion3Pipeline``, ``PixArtAlpha/SigmaPipeline``, ``LTXPipeline``, ``CogVideoXPipeline``
    batch ``[uncond; cond]`` in one transformer call when ``guidance_scale > 1``:
    the wrapper forces CFG mode, so every rule works (CFG + SEG, SEG alone,
    PAG, ...), all branches in one transformer call per step. (CogVideoX's
    ``use_dynamic_cfg`` has no effect under the wrapper: CFG belongs to the rule;
    use a schedule there.)
``FluxPipeline`` (default adapter :data:`FLUX_PIPELINE`)
    FLUX.1 dev / schnell are guidance-distilled: one conditional call per step,
    ``guidance_scale`` is an *input* of the model (the distilled CFG strength)
    and is left to the user. There is no unconditional branch, so rules that
    need ``"uncond"`` are refused; SEG works as a negative branch of the
    (already guided) conditional prediction, ``x + s (x − x̃)``
    (``SEG(s, sigma=...)``; likewise PAG). The pipeline's "true CFG"
    (``true_cfg_scale``) is switched off.
``FluxPipeline`` with ``adapter=FLUX_TRUE_CFG``
    true CFG with a negative prompt (needed for CFG rules, e.g. on de-distilled
    Flux checkpoints): the pipeline calls the transformer for the prompt, then
    for the negative prompt; each call runs the rule's branches of its
    conditioning batched (:class:`~smoothguide.diffusers.pipeline.PipelineAdapter`
    ``sequential=("cond", "uncond")``). Pass ``negative_prompt`` or negative
    embeddings: without them the pipeline makes one call per step and the
    wrapper raises ``RuntimeError``.
``WanPipeline`` (Wan 2.1, single-transformer Wan 2.2)
    the same two-call pattern with ``guidance_scale`` forced; pipelines with a
    second transformer (``boundary_ratio``) are not matched.
"""

from __future__ import annotations

from typing import Any

from ._deps import diffusers
from .dit import DIT, dit_geometry, dit_layers, dit_presets
from .flux import FLUX, flux_geometry, flux_grid_from_ids, flux_layers, flux_presets
from .pipeline import PipelineAdapter, register_pipeline_adapter, scheduler_sigma
from .sd3 import SD3, sd3_geometry, sd3_layers, sd3_presets
from .video import (
    COGVIDEOX,
    LTX_VIDEO,
    WAN,
    VideoTokens,
    cogvideox_geometry,
    ltx_geometry,
    video_layers,
    video_presets,
    wan_geometry,
)

__all__ = [
    "COGVIDEOX",
    "DIT",
    "FLUX",
    "FLUX_PIPELINE",
    "FLUX_TRUE_CFG",
    "LTX_VIDEO",
    "SD3",
    "TRANSFORMER_CFG_PIPELINES",
    "WAN",
    "WAN_PIPELINE",
    "VideoTokens",
    "cogvideox_geometry",
    "dit_geometry",
    "dit_layers",
    "dit_presets",
    "flux_geometry",
    "flux_grid_from_ids",
    "flux_layers",
    "flux_presets",
    "ltx_geometry",
    "sd3_geometry",
    "sd3_layers",
    "sd3_presets",
    "video_layers",
    "video_presets",
    "wan_geometry",
]


def _cfg_batched(pipe: Any) -> tuple[str, ...]:
    # The wrapper forces guidance_scale = 2 on these pipelines, so they always batch [uncond; cond].
    return ("uncond", "cond")


#: Pipelines that batch ``[uncond; cond]`` into one transformer call.
TRANSFORMER_CFG_PIPELINES = register_pipeline_adapter(
    PipelineAdapter(
        "transformer-cfg",
        matches=lambda pipe: isinstance(
            pipe,
            diffusers.StableDiffusion3Pipeline
            | diffusers.PixArtAlphaPipeline
            | diffusers.PixArtSigmaPipeline
            | diffusers.LTXPipeline
            | diffusers.CogVideoXPipeline,
        ),
        denoiser="transformer",
        incoming=_cfg_batched,
    )
)


def _flux_sigma(pipe: Any, timestep: Any) -> float:
    # FluxPipeline passes timestep / 1000 to the transformer (in its dtype, maybe bfloat16).
    return scheduler_sigma(pipe, timestep, scale=1000.0)


#: ``FluxPipeline``: conditional branch only (guidance-distilled); true CFG switched off.
FLUX_PIPELINE = register_pipeline_adapter(
    PipelineAdapter(
        "flux",
        matches=lambda pipe: isinstance(pipe, diffusers.FluxPipeline),
        denoiser="transformer",
        incoming=lambda pipe: ("cond",),
        call_kwargs=lambda pipe: {"true_cfg_scale": 1.0},
        sigma=_flux_sigma,
    )
)

#: ``FluxPipeline`` with true CFG: one call per conditioning (prompt, then negative prompt).
#: Not registered (the distilled default is :data:`FLUX_PIPELINE`); pass it as
#: ``GuidedPipeline(pipe, rule, adapter=FLUX_TRUE_CFG)`` together with a negative prompt.
FLUX_TRUE_CFG = PipelineAdapter(
    "flux-true-cfg",
    matches=lambda pipe: isinstance(pipe, diffusers.FluxPipeline),
    denoiser="transformer",
    call_kwargs=lambda pipe: {"true_cfg_scale": 2.0},
    sigma=_flux_sigma,
    sequential=("cond", "uncond"),
    pipeline_scale=2.0,
)


def _is_single_wan(pipe: Any) -> bool:
    return (
        isinstance(pipe, diffusers.WanPipeline)
        and getattr(pipe, "transformer_2", None) is None
        and getattr(getattr(pipe, "config", None), "boundary_ratio", None) is None
    )


#: ``WanPipeline`` without a second transformer: one call per conditioning (cond, then uncond).
WAN_PIPELINE = register_pipeline_adapter(
    PipelineAdapter(
        "wan",
        matches=_is_single_wan,
        denoiser="transformer",
        call_kwargs=lambda pipe: {"guidance_scale": 2.0},
        sequential=("cond", "uncond"),
        pipeline_scale=2.0,
    )
)
