"""GuidedPipeline on transformer pipelines (SD3, Flux, LTX-Video, PixArt): tiny random models, CPU.

Prompt embeddings are passed directly (no text encoder or tokenizer is built).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import smoothguide.diffusers.transformers  # noqa: E402,F401  (registers families and adapters)
from smoothguide.diffusers import GuidedPipeline, patcher_for  # noqa: E402
from smoothguide.diffusers.transformers import FLUX_TRUE_CFG  # noqa: E402
from smoothguide.rules import CFG, PAG, SEG, Compose  # noqa: E402
from tolerance import assert_close  # noqa: E402

#: Rounding budget of a whole float32 pipeline run (a few steps of a transformer, then
#: the VAE), relative to the image's magnitude: ~1e-4 on [0, 1] images, while a wrong
#: branch order or a missing guidance term moves them by > 1e-2.
PIPE_OPS = 1024

STEPS = 2


def _vae(latent_channels: int) -> Any:
    # one level: vae_scale_factor 1, so the image has the latent's size
    return diffusers.AutoencoderKL(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,),
        layers_per_block=1, latent_channels=latent_channels, norm_num_groups=1,
        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
        scaling_factor=1.5035,
    )  # fmt: skip


@pytest.fixture(scope="module")
def sd3_pipe() -> Any:
    torch.manual_seed(0)
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
        num_attention_heads=2, caption_projection_dim=16, joint_attention_dim=16,
        pooled_projection_dim=8, out_channels=4, qk_norm="rms_norm",
    )  # fmt: skip
    return diffusers.StableDiffusion3Pipeline(
        transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
        vae=_vae(4), text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
        text_encoder_3=None, tokenizer_3=None,
    )  # fmt: skip


@pytest.fixture(scope="module")
def flux_pipe() -> Any:
    torch.manual_seed(0)
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8], guidance_embeds=True,
    )  # fmt: skip
    return diffusers.FluxPipeline(
        transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
        vae=_vae(1), text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
    )  # fmt: skip


@pytest.fixture(scope="module")
def ltx_pipe() -> Any:
    torch.manual_seed(0)
    transformer = diffusers.LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2,
        attention_head_dim=8, cross_attention_dim=16, num_layers=3, caption_channels=16,
    )  # fmt: skip
    vae = diffusers.AutoencoderKLLTXVideo(
        in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False),
        decoder_inject_noise=(False, False, False, False, False),
        upsample_residual=(False, False, False, False), upsample_factor=(1, 1, 1, 1),
        timestep_conditioning=False, patch_size=1, patch_size_t=1, encoder_causal=True,
        decoder_causal=False,
    )  # fmt: skip
    vae.use_framewise_encoding = False
    vae.use_framewise_decoding = False
    return diffusers.LTXPipeline(
        transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=vae,
        text_encoder=None, tokenizer=None,
    )  # fmt: skip


@pytest.fixture(scope="module")
def wan_pipe() -> Any:
    torch.manual_seed(0)
    transformer = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=16,
        out_channels=16, text_dim=16, freq_dim=16, ffn_dim=16, num_layers=3,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    )  # fmt: skip
    vae = diffusers.AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
        temperal_downsample=[False, True, True],
    )  # fmt: skip
    return diffusers.WanPipeline(
        tokenizer=None, text_encoder=None, transformer=transformer, vae=vae,
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=7.0),
    )  # fmt: skip


@pytest.fixture(scope="module")
def cogvideox_pipe() -> Any:
    torch.manual_seed(0)
    transformer = diffusers.CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        time_embed_dim=2, text_embed_dim=16, num_layers=2, sample_width=2, sample_height=2,
        sample_frames=9, patch_size=2, temporal_compression_ratio=4, max_text_seq_length=6,
    )  # fmt: skip
    vae = diffusers.AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8),
        latent_channels=4, layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4,
    )  # fmt: skip
    return diffusers.CogVideoXPipeline(
        tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
        scheduler=diffusers.CogVideoXDDIMScheduler(),
    )  # fmt: skip


@pytest.fixture(scope="module", params=["PixArtAlphaPipeline", "PixArtSigmaPipeline"])
def pixart_pipe(request: pytest.FixtureRequest) -> Any:
    torch.manual_seed(0)
    transformer = diffusers.PixArtTransformer2DModel(
        sample_size=8, num_layers=3, patch_size=2, attention_head_dim=8, num_attention_heads=2,
        caption_channels=16, in_channels=4, cross_attention_dim=16, out_channels=8,
        attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
        norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
    )  # fmt: skip
    return getattr(diffusers, request.param)(
        transformer=transformer, scheduler=diffusers.DDIMScheduler(), vae=_vae(4),
        text_encoder=None, tokenizer=None,
    )  # fmt: skip


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def sd3_kwargs() -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    pe, pooled = torch.randn(1, 5, 16, generator=g), torch.randn(1, 8, generator=g)
    return dict(
        prompt_embeds=pe, pooled_prompt_embeds=pooled, negative_prompt_embeds=0 * pe,
        negative_pooled_prompt_embeds=0 * pooled, num_inference_steps=STEPS, output_type="np",
    )  # fmt: skip


def flux_kwargs() -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    return dict(
        prompt_embeds=torch.randn(1, 7, 32, generator=g),
        pooled_prompt_embeds=torch.randn(1, 32, generator=g), num_inference_steps=STEPS,
        guidance_scale=3.5, output_type="np",
    )  # fmt: skip


def ltx_kwargs() -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    pe, mask = torch.randn(1, 6, 16, generator=g), torch.ones(1, 6)
    return dict(
        prompt_embeds=pe, prompt_attention_mask=mask, negative_prompt_embeds=0 * pe,
        negative_prompt_attention_mask=mask, num_inference_steps=STEPS, output_type="np",
    )  # fmt: skip


def pixart_kwargs() -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    pe, mask = torch.randn(1, 6, 16, generator=g), torch.ones(1, 6)
    return dict(
        prompt_embeds=pe, prompt_attention_mask=mask, negative_prompt_embeds=0 * pe,
        negative_prompt_attention_mask=mask, negative_prompt=None, num_inference_steps=STEPS,
        output_type="np", use_resolution_binning=False,
    )  # fmt: skip


@contextmanager
def count_batches(model: torch.nn.Module) -> Iterator[list[int]]:
    """Batch sizes of the model's forward calls as the model itself runs them."""
    seen: list[int] = []

    def hook(module: torch.nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        sample = output[0] if isinstance(output, tuple) else output.sample
        seen.append(int(sample.shape[0]))

    # registered before GuidedPipeline's own hook, so it sees the batched output
    handle = model.register_forward_hook(hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def _hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def test_sd3_cfg_seg_and_seg_only(sd3_pipe: Any) -> None:
    before = _hooks(sd3_pipe.transformer)
    size = dict(height=16, width=24)  # non-square: 8 x 12 latent tokens
    plain = sd3_pipe(**sd3_kwargs(), **size, guidance_scale=4.0, generator=_gen()).images
    cfg = GuidedPipeline(sd3_pipe, CFG(4.0))(**sd3_kwargs(), **size, generator=_gen()).images
    assert_close(cfg, plain, ops=PIPE_OPS)  # the adapter's [uncond; cond] order is right
    with count_batches(sd3_pipe.transformer) as seen:
        seg = GuidedPipeline(sd3_pipe, SEG(3.0, sigma=math.inf, cfg_scale=4.0))
        image = seg(**sd3_kwargs(), **size, generator=_gen()).images
    assert seen == [3] * STEPS  # uncond, cond, blurred cond: one call per step
    assert image.shape == (1, 16, 24, 3)
    assert np.isfinite(image).all()
    assert np.abs(image - plain).max() > 1e-3
    with count_batches(sd3_pipe.transformer) as seen:
        only = GuidedPipeline(sd3_pipe, SEG(3.0, sigma=2.0))(
            **sd3_kwargs(), **size, generator=_gen()
        )
    assert seen == [2] * STEPS  # cond, blurred cond
    assert only.images.shape == (1, 16, 24, 3)
    assert np.isfinite(only.images).all()
    assert _hooks(sd3_pipe.transformer) == before


def test_flux_seg_as_negative_branch_of_the_distilled_model(flux_pipe: Any) -> None:
    size = dict(height=12, width=20)  # packed: 6 x 10 tokens
    plain = flux_pipe(**flux_kwargs(), **size, generator=_gen()).images
    # neutral SEG: the pipeline's own guidance embedding (guidance_scale=3.5) is untouched
    with count_batches(flux_pipe.transformer) as seen:
        neutral = GuidedPipeline(flux_pipe, SEG(0.0))(**flux_kwargs(), **size, generator=_gen())
    assert seen == [1] * STEPS
    assert_close(neutral.images, plain, ops=PIPE_OPS)
    with count_batches(flux_pipe.transformer) as seen:
        guided = GuidedPipeline(flux_pipe, SEG(2.0, sigma=3.0, layers=("double", "single")))
        image = guided(**flux_kwargs(), **size, generator=_gen()).images
    assert seen == [2] * STEPS  # cond and blurred cond in one call
    assert image.shape == (1, 12, 20, 3)
    assert np.isfinite(image).all()
    assert np.abs(image - plain).max() > 1e-3
    pag = GuidedPipeline(flux_pipe, PAG(2.0))(**flux_kwargs(), **size, generator=_gen()).images
    assert np.isfinite(pag).all()
    assert np.abs(pag - plain).max() > 1e-3


def test_flux_refuses_rules_that_need_an_unconditional_branch(flux_pipe: Any) -> None:
    before = _hooks(flux_pipe.transformer)
    guided = GuidedPipeline(flux_pipe, SEG(3.0, cfg_scale=4.0))
    with pytest.raises(RuntimeError, match="uncond"):
        guided(**flux_kwargs(), height=8, width=8, generator=_gen())
    with pytest.raises(TypeError, match="true_cfg_scale"):
        guided(**flux_kwargs(), height=8, width=8, true_cfg_scale=4.0)
    assert _hooks(flux_pipe.transformer) == before


def test_flux_true_cfg_runs_cfg_rules_one_call_per_conditioning(flux_pipe: Any) -> None:
    g = torch.Generator().manual_seed(2)
    neg = dict(
        negative_prompt_embeds=torch.randn(1, 7, 32, generator=g),
        negative_pooled_prompt_embeds=torch.randn(1, 32, generator=g),
    )  # fmt: skip
    size = dict(height=12, width=20)
    plain = flux_pipe(**flux_kwargs(), **neg, **size, true_cfg_scale=4.0, generator=_gen()).images
    cfg = GuidedPipeline(flux_pipe, CFG(4.0), adapter=FLUX_TRUE_CFG)
    assert_close(cfg(**flux_kwargs(), **neg, **size, generator=_gen()).images, plain, ops=PIPE_OPS)
    rule = SEG(3.0, sigma=math.inf, cfg_scale=4.0, layers=("double", "single"))
    with count_batches(flux_pipe.transformer) as seen:
        guided = GuidedPipeline(flux_pipe, rule, adapter=FLUX_TRUE_CFG)
        image = guided(**flux_kwargs(), **neg, **size, generator=_gen()).images
    assert seen == [2, 1] * STEPS  # [cond, cond_seg] then [uncond]
    assert image.shape == (1, 12, 20, 3)
    assert np.isfinite(image).all()
    assert np.abs(image - plain).max() > 1e-3


def test_flux_true_cfg_without_negative_prompt_is_refused(flux_pipe: Any) -> None:
    """One call per step instead of two: the two-call bookkeeping must not misalign silently."""
    before = _hooks(flux_pipe.transformer)
    guided = GuidedPipeline(flux_pipe, SEG(3.0, cfg_scale=4.0), adapter=FLUX_TRUE_CFG)
    with pytest.raises(RuntimeError, match="once per conditioning"):
        guided(**flux_kwargs(), height=8, width=8, generator=_gen())
    assert _hooks(flux_pipe.transformer) == before


def test_wan_cfg_seg_one_call_per_conditioning(wan_pipe: Any) -> None:
    g = torch.Generator().manual_seed(1)
    pe = torch.randn(1, 6, 16, generator=g)
    kw = dict(
        prompt_embeds=pe, negative_prompt_embeds=0 * pe, height=16, width=32, num_frames=5,
        num_inference_steps=STEPS, output_type="np",
    )  # fmt: skip
    plain = wan_pipe(**kw, guidance_scale=4.0, generator=_gen()).frames
    cfg = GuidedPipeline(wan_pipe, CFG(4.0))(**kw, generator=_gen()).frames
    assert_close(cfg, plain, ops=PIPE_OPS)
    rule = SEG(3.0, sigma=(1.0, math.inf, math.inf), cfg_scale=4.0, layers="all")
    with count_batches(wan_pipe.transformer) as seen:
        video = GuidedPipeline(wan_pipe, rule)(**kw, generator=_gen()).frames
    assert seen == [2, 1] * STEPS
    assert video.shape == (1, 5, 16, 32, 3)
    assert np.isfinite(video).all()
    assert np.abs(video - plain).max() > 1e-3


def test_ltx_video_cfg_seg_with_temporal_blur(ltx_pipe: Any) -> None:
    size = dict(height=32, width=64, num_frames=9)  # latent 3 frames x 8 x 16
    plain = ltx_pipe(**ltx_kwargs(), **size, guidance_scale=3.0, generator=_gen()).frames
    with count_batches(ltx_pipe.transformer) as seen:
        rule = SEG(3.0, sigma=(1.0, math.inf, math.inf), cfg_scale=3.0, layers="all")
        video = GuidedPipeline(ltx_pipe, rule)(**ltx_kwargs(), **size, generator=_gen()).frames
    assert seen == [3] * STEPS
    assert video.shape == (1, 9, 32, 64, 3)
    assert np.isfinite(video).all()
    assert np.abs(video - plain).max() > 1e-3
    with count_batches(ltx_pipe.transformer) as seen:
        only = GuidedPipeline(ltx_pipe, SEG(3.0, sigma=2.0, layers="all"))
        frames = only(**ltx_kwargs(), **size, generator=_gen()).frames
    assert seen == [2] * STEPS
    assert frames.shape == (1, 9, 32, 64, 3)
    assert np.isfinite(frames).all()


def test_cogvideox_cfg_seg_per_frame(cogvideox_pipe: Any) -> None:
    pe = torch.randn(1, 6, 16, generator=torch.Generator().manual_seed(1))
    kw = dict(
        prompt_embeds=pe, negative_prompt_embeds=0 * pe, height=16, width=32, num_frames=9,
        num_inference_steps=STEPS, output_type="np",
    )  # fmt: skip
    plain = cogvideox_pipe(**kw, guidance_scale=5.0, generator=_gen()).frames
    rule = SEG(3.0, sigma=math.inf, cfg_scale=5.0, layers="all")
    with count_batches(cogvideox_pipe.transformer) as seen:
        video = GuidedPipeline(cogvideox_pipe, rule)(**kw, generator=_gen()).frames
    assert seen == [3] * STEPS
    assert video.shape == (1, 9, 16, 32, 3)
    assert np.isfinite(video).all()
    assert np.abs(video - plain).max() > 1e-4


def test_pixart_cfg_seg(pixart_pipe: Any) -> None:
    size = dict(height=8, width=16)  # 4 x 8 tokens
    rule = Compose(CFG(4.0), SEG(3.0, sigma=math.inf))
    with count_batches(pixart_pipe.transformer) as seen:
        image = GuidedPipeline(pixart_pipe, rule)(**pixart_kwargs(), **size, generator=_gen())
    assert seen == [3] * STEPS
    assert image.images.shape == (1, 8, 16, 3)
    assert np.isfinite(image.images).all()


def test_patcher_for_pipeline_transformers(sd3_pipe: Any, flux_pipe: Any, ltx_pipe: Any) -> None:
    assert patcher_for(sd3_pipe.transformer).default == ("transformer_blocks.1.attn",)
    assert "single.mid" in patcher_for(flux_pipe.transformer).presets
    assert patcher_for(ltx_pipe.transformer).default == ("transformer_blocks.1.attn1",)
