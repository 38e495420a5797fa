"""smoothguide rules as diffusers modular guiders, on a tiny SDXL modular pipeline built offline."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from diffusers.guiders import ClassifierFreeGuidance, SmoothedEnergyGuidance  # noqa: E402
from diffusers.modular_pipelines.stable_diffusion_xl.modular_blocks_stable_diffusion_xl import (  # noqa: E402
    StableDiffusionXLCoreDenoiseStep,
)

from smoothguide.diffusers import patcher_for  # noqa: E402
from smoothguide.diffusers.guider import (  # noqa: E402
    SmoothguideGuidance,
    rule_from_config,
    rule_to_config,
)
from smoothguide.rules import (  # noqa: E402
    APG,
    CFG,
    COND,
    FDG,
    PAG,
    SEG,
    TCFG,
    UNCOND,
    CFGPlusPlus,
    CFGZeroStar,
    Compose,
    Interval,
    LinearRamp,
    StepContext,
)
from smoothguide.sampling import batch_order  # noqa: E402

H, W, STEPS = 64, 128, 3  # latents 8 x 16


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_sdxl_unet() -> Any:
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        attention_head_dim=4,
        norm_num_groups=4,
        cross_attention_dim=12,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        addition_embed_type="text_time",
        addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=6 * 4 + 10,
    ).eval()
    with torch.no_grad():  # sharper random attention, so perturbations show clearly
        for name, p in unet.named_parameters():
            if ".attn1.to_q." in name or ".attn1.to_k." in name:
                p.mul_(4.0)
    return unet


def inputs() -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    return {
        "prompt_embeds": torch.randn(1, 5, 12, generator=g),
        "negative_prompt_embeds": torch.randn(1, 5, 12, generator=g),
        "pooled_prompt_embeds": torch.randn(1, 10, generator=g),
        "negative_pooled_prompt_embeds": torch.randn(1, 10, generator=g),
        "latents": torch.randn(1, 4, H // 8, W // 8, generator=g),
    }


def run_modular(unet: Any, guider: Any) -> Any:
    pipe = StableDiffusionXLCoreDenoiseStep().init_pipeline()
    pipe.update_components(unet=unet, scheduler=diffusers.EulerDiscreteScheduler(), guider=guider)
    with torch.no_grad():
        return pipe(**inputs(), num_inference_steps=STEPS, height=H, width=W, output="latents")


def hand_loop(unet: Any, rule: Any) -> Any:
    """The SDXL loop written out: Euler, every branch its own UNet call, rule.combine on ε."""
    sched = diffusers.EulerDiscreteScheduler()
    sched.set_timesteps(STEPS)
    kw = inputs()
    patcher = patcher_for(unet)
    time_ids = torch.tensor([[H, W, 0, 0, H, W]], dtype=torch.float32)
    cond = {"ehs": kw["prompt_embeds"], "text_embeds": kw["pooled_prompt_embeds"]}
    uncond = {
        "ehs": kw["negative_prompt_embeds"],
        "text_embeds": kw["negative_pooled_prompt_embeds"],
    }
    x = kw["latents"] * sched.init_noise_sigma
    state = rule.init_state()
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            x_in = sched.scale_model_input(x, t)
            ctx = StepContext(float(t), step=i, num_steps=STEPS)
            outs = {}
            for b in batch_order(rule.branches(ctx)):
                c = cond if b.conditioning == "cond" else uncond
                add = {"text_embeds": c["text_embeds"], "time_ids": time_ids}

                def call(c: dict[str, Any] = c, add: dict[str, Any] = add) -> Any:
                    return unet(
                        x_in,
                        t,
                        encoder_hidden_states=c["ehs"],
                        added_cond_kwargs=add,
                        return_dict=False,
                    )[0]

                if b.perturbation is None:
                    outs[b] = call()
                else:
                    with patcher.perturb(b.perturbation, range(1)):
                        outs[b] = call()
            eps, state = rule.combine(outs, ctx, state)
            x = sched.step(eps, t, x, return_dict=False)[0]
    return x


RULES = [
    CFG(3.0),
    Compose(CFG(3.0), SEG(2.0, sigma=math.inf)),
    SEG(2.0, sigma=2.0, convention="paper", cfg_scale=4.0),
    Compose(APG(4.0, momentum=-0.5), PAG(1.5)),
    Compose(CFGZeroStar(3.0, schedule=Interval(0.5, 1.0, on="progress")), SEG(1.0, sigma=math.inf)),
    Compose(TCFG(3.0), SEG(2.0, schedule=LinearRamp(1.0, 0.0))),
    FDG((5.0, 2.0)),
]


@pytest.mark.parametrize("rule", RULES, ids=lambda r: type(r).__name__)
def test_modular_pipeline_equals_the_hand_loop(rule: Any) -> None:
    unet = tiny_sdxl_unet()
    got = run_modular(unet, SmoothguideGuidance(rule))
    ref = hand_loop(unet, rule)
    torch.testing.assert_close(got, ref, rtol=0, atol=64 * 1.2e-7 * float(ref.abs().max()))


def test_cfg_guider_equals_diffusers_cfg_guider() -> None:
    unet = tiny_sdxl_unet()
    ours = run_modular(unet, SmoothguideGuidance(CFG(3.0)))
    theirs = run_modular(unet, ClassifierFreeGuidance(guidance_scale=3.0))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=64 * 1.2e-7 * float(theirs.abs().max()))


def test_seg_perturbs_where_diffusers_seg_guider_is_a_no_op() -> None:
    """Same pipeline and SEG settings: ours differs from CFG, diffusers' SEG guider equals CFG."""
    unet = tiny_sdxl_unet()
    cfg = run_modular(unet, SmoothguideGuidance(CFG(3.0)))
    ours = run_modular(unet, SmoothguideGuidance(SEG(2.0, sigma=math.inf, cfg_scale=3.0)))
    theirs = run_modular(
        unet,
        SmoothedEnergyGuidance(
            guidance_scale=3.0,
            seg_guidance_scale=2.0,
            seg_blur_sigma=1e7,
            seg_guidance_layers=None,
            seg_guidance_config=diffusers.hooks.SmoothedEnergyGuidanceConfig(
                indices=[0], fqn="mid_block.attentions.0.transformer_blocks"
            ),
            seg_guidance_start=0.0,
        ),
    )
    # diffusers' hook never attaches (shared/PAPER.md §4): its "SEG" branch is the conditional
    # one, so its result is CFG + 2 (x_c − x_c) = CFG
    torch.testing.assert_close(theirs, cfg, rtol=0, atol=64 * 1.2e-7 * float(cfg.abs().max()))
    assert float((ours - cfg).abs().max()) > 1e-3 * float(cfg.abs().max())


def test_guider_batches_follow_the_rule_and_skip_neutral_branches() -> None:
    seg = SEG(2.0, sigma=3.0, schedule=Interval(0.0, 0.5, on="progress"))
    g = SmoothguideGuidance(Compose(CFG(1.0), seg))
    g.set_state(step=0, num_inference_steps=4, timestep=torch.tensor(999))
    assert g.num_conditions == 2
    assert [
        g._branch_of[k]
        for k in (
            b.__guidance_identifier__
            for b in g.prepare_inputs({"prompt_embeds": (torch.ones(1, 2), torch.zeros(1, 2))})
        )
    ] == [COND, seg.seg_branch]
    g.set_state(step=3, num_inference_steps=4, timestep=torch.tensor(10))
    batches = g.prepare_inputs({"prompt_embeds": (torch.ones(1, 2), torch.zeros(1, 2))})
    assert len(batches) == 1
    assert torch.equal(batches[0].prompt_embeds, torch.ones(1, 2))
    x = torch.randn(1, 4, 2, 2)
    assert g.forward(pred_cond=x).pred is x


def test_config_saves_and_loads(tmp_path: Any) -> None:
    rule = Compose(
        APG(4.0, momentum=-0.5, norm_threshold=2.0, schedule=Interval(0.1, 5.0)),
        SEG(3.0, sigma=(math.inf, 2.0), mode="mirror", layers=("mid",), convention="paper"),
        FDG((5.0, 2.0), parallel_weights=(1.0, 0.5), schedule=(Interval(), LinearRamp())),
        PAG(1.0, cfg_scale=2.0),
    )
    g = SmoothguideGuidance(rule, start=0.1, stop=0.9)
    g.save_pretrained(tmp_path)
    back = SmoothguideGuidance.from_pretrained(tmp_path)
    assert back.rule == rule
    assert (back._start, back._stop) == (0.1, 0.9)
    assert rule_from_config(rule_to_config(rule)) == rule
    with pytest.raises(TypeError, match="custom or lambda schedule has no config"):
        SmoothguideGuidance(CFG(2.0, schedule=lambda ctx: 1.0))


def test_cfgpp_is_refused_by_a_scheduler_loop() -> None:
    g = SmoothguideGuidance(CFGPlusPlus(0.5))
    g.set_state(step=0, num_inference_steps=2, timestep=torch.tensor(999))
    g.prepare_inputs({"prompt_embeds": (torch.ones(1, 2), torch.zeros(1, 2))})
    x = torch.zeros(1, 2)
    with pytest.raises(TypeError, match="re-noise"):
        g.forward(pred_cond=x, pred_uncond=x)


def test_apg_state_restarts_at_step_zero() -> None:
    g = SmoothguideGuidance(APG(3.0, momentum=-0.5))
    rng = np.random.default_rng(0)
    c, u = (torch.from_numpy(rng.normal(size=(1, 4, 2, 2))).float() for _ in range(2))
    first = []
    for _ in range(2):  # two runs: the second must repeat the first
        outs = []
        for step in range(3):
            g.set_state(step=step, num_inference_steps=3, timestep=torch.tensor(999 - step))
            g.prepare_inputs({"prompt_embeds": (torch.ones(1, 2), torch.zeros(1, 2))})
            outs.append(g.forward(pred_cond=c * (step + 1), pred_uncond=u).pred)
        first.append(outs)
    for a, b in zip(*first, strict=True):
        assert torch.equal(a, b)
    assert UNCOND in APG(3.0).branches(StepContext(1.0))


def test_modular_guider_equals_guided_pipeline_on_the_same_components() -> None:
    """SDXL under GuidedPipeline (branches batched) vs the modular loop (one call per branch)."""
    from smoothguide.diffusers import GuidedPipeline
    from test_diffusers_unet_pipeline import make_pipe

    pipe = make_pipe("sdxl")
    h, w = 32, 48  # latents 16 x 24 (this VAE's factor is 2)
    g = torch.Generator().manual_seed(3)
    emb = {
        "prompt_embeds": torch.randn(1, 5, 32, generator=g),
        "negative_prompt_embeds": torch.randn(1, 5, 32, generator=g),
        "pooled_prompt_embeds": torch.randn(1, 16, generator=g),
        "negative_pooled_prompt_embeds": torch.randn(1, 16, generator=g),
    }
    latents = torch.randn(1, 4, h // 2, w // 2, generator=g)
    rule = Compose(CFG(4.0), SEG(2.0, sigma=3.0, schedule=Interval(0.0, 5.0)), PAG(1.0))
    with torch.no_grad():
        ref = GuidedPipeline(pipe, rule)(
            **emb,
            latents=latents,
            height=h,
            width=w,
            num_inference_steps=STEPS,
            output_type="latent",
        ).images
        modular = StableDiffusionXLCoreDenoiseStep().init_pipeline()
        modular.update_components(
            unet=pipe.unet,
            vae=pipe.vae,
            scheduler=diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config),
            guider=SmoothguideGuidance(rule, scheduler=pipe.scheduler),
        )
        got = modular(
            **emb, latents=latents, height=h, width=w, num_inference_steps=STEPS, output="latents"
        )
    # batched vs one call per branch: the same math up to float32 rounding
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5 * float(ref.abs().max()))
    assert float((got - latents).abs().max()) > 0


def test_guided_pipeline_refuses_cfgpp() -> None:
    from smoothguide.diffusers import GuidedPipeline
    from test_diffusers_unet_pipeline import make_pipe

    with pytest.raises(TypeError, match="re-noise"):
        GuidedPipeline(make_pipe("sd"), CFGPlusPlus(0.5))(
            "a cat", height=32, width=48, num_inference_steps=1, output_type="latent"
        )
