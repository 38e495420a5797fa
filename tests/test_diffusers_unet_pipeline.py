"""GuidedPipeline on tiny StableDiffusion / StableDiffusionXL pipelines (random weights, CPU)."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from smoothguide.diffusers import GuidedPipeline, scheduler_sigma  # noqa: E402
from smoothguide.rules import CFG, PAG, SEG, Compose, Interval  # noqa: E402
from tolerance import assert_close  # noqa: E402

H, W = 32, 48  # non-square image; latent 16 x 24 (VAE factor 2)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    """Tiny tensors: one intra-op thread avoids oversubscribing a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tokenizer() -> Any:
    """A CLIP tokenizer with a 5-word vocabulary, built offline."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "cat</w>": 3, "photo</w>": 4}
    try:  # transformers >= 5 takes the vocabulary itself
        return transformers.CLIPTokenizer(vocab=vocab, merges=[], model_max_length=8)
    except TypeError:  # transformers 4.x reads vocab.json and merges.txt
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
            (Path(tmp) / "merges.txt").write_text("#version: 0.2\n")
            return transformers.CLIPTokenizer(
                str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), model_max_length=8
            )


def _text_encoder(projection: bool = False) -> Any:
    torch.manual_seed(1)
    config = transformers.CLIPTextConfig(
        vocab_size=16,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=8,
        projection_dim=16,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    return cls(config).eval()


def _vae() -> Any:
    torch.manual_seed(2)
    return diffusers.AutoencoderKL(
        block_out_channels=(8, 8),
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=4,
        layers_per_block=1,
    ).eval()


def _unet(xl: bool) -> Any:
    torch.manual_seed(0)
    kw: dict[str, Any] = dict(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        attention_head_dim=4,
        norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
    )
    if xl:
        kw.update(
            cross_attention_dim=32,  # both text encoders' hidden states, concatenated
            addition_embed_type="text_time",
            addition_time_embed_dim=4,
            projection_class_embeddings_input_dim=6 * 4 + 16,
            transformer_layers_per_block=(1, 2),
        )
    return diffusers.UNet2DConditionModel(**kw).eval()


def make_pipe(kind: str) -> Any:
    scheduler = diffusers.EulerDiscreteScheduler(steps_offset=1)
    if kind == "sd":
        pipe = diffusers.StableDiffusionPipeline(
            vae=_vae(),
            text_encoder=_text_encoder(),
            tokenizer=_tokenizer(),
            unet=_unet(xl=False),
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    else:
        pipe = diffusers.StableDiffusionXLPipeline(
            vae=_vae(),
            text_encoder=_text_encoder(),
            text_encoder_2=_text_encoder(projection=True),
            tokenizer=_tokenizer(),
            tokenizer_2=_tokenizer(),
            unet=_unet(xl=True),
            scheduler=scheduler,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


_PIPES: dict[str, Any] = {}


@pytest.fixture(scope="module", params=["sd", "sdxl"])
def pipe(request: pytest.FixtureRequest) -> Any:
    if request.param not in _PIPES:
        _PIPES[request.param] = make_pipe(request.param)
    return _PIPES[request.param]


class UNetBatches:
    """Records the rows the UNet returns (seen by its last conv; fork mode runs fewer before)."""

    def __init__(self, pipe: Any) -> None:
        self.batches: list[int] = []
        self.handle = pipe.unet.conv_out.register_forward_pre_hook(
            lambda m, args: self.batches.append(args[0].shape[0])
        )

    def __enter__(self) -> UNetBatches:
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()


def call(fn: Any, prompt: str = "a cat", steps: int = 2, **kw: Any) -> Any:
    gen = torch.Generator().manual_seed(0)
    kw.setdefault("output_type", "pt")
    return fn(prompt, height=H, width=W, num_inference_steps=steps, generator=gen, **kw)


def no_hooks(module: Any) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in module.modules())


CASES = [
    ("cfg+seg", SEG(3.0, sigma=10.0, cfg_scale=5.0), "a cat", 3),
    ("seg-only", SEG(3.0, sigma=math.inf), "", 2),  # unconditional: empty prompt, no CFG
    ("pag", PAG(3.0), "a cat", 2),
    ("cfg+pag", Compose(CFG(5.0), PAG(3.0)), "a cat", 3),
]


@pytest.mark.parametrize(("name", "rule", "prompt", "branches"), CASES, ids=[c[0] for c in CASES])
def test_rules_run_batched_in_one_unet_call_per_step(
    pipe: Any, name: str, rule: Any, prompt: str, branches: int
) -> None:
    before = dict(pipe.unet.attn_processors)
    with UNetBatches(pipe) as seen:
        images = call(GuidedPipeline(pipe, rule), prompt, num_images_per_prompt=2).images
    assert images.shape == (2, 3, H, W)
    assert torch.isfinite(images).all()
    assert seen.batches == [branches * 2] * 2  # 2 steps, one call each, all branches batched
    assert no_hooks(pipe.unet)
    assert all(pipe.unet.attn_processors[k] is v for k, v in before.items())


def test_guided_prediction_is_the_rule_of_the_batched_outputs(pipe: Any) -> None:
    """What the scheduler receives is u + 5 (c - u) + 3 (c - s) of the UNet's own rows."""
    raw: list[Any] = []
    used: list[Any] = []
    handle = pipe.unet.register_forward_hook(lambda m, a, out: raw.append(out[0].clone()))
    step = pipe.scheduler.step

    def recording_step(model_output: Any, *args: Any, **kwargs: Any) -> Any:
        used.append(model_output.clone())
        return step(model_output, *args, **kwargs)

    pipe.scheduler.step = recording_step
    try:
        call(GuidedPipeline(pipe, SEG(3.0, sigma=2.0, cfg_scale=5.0)), steps=1)
    finally:
        del pipe.scheduler.step
        handle.remove()
    u, c, s = raw[0].chunk(3)
    assert not torch.allclose(c, s)  # the blurred branch really differs
    expected = u + 5.0 * (c - u) + 3.0 * (c - s)
    assert_close(used[0], expected, ops=64, magnitude=9.0 * torch.cat([u, c, s]))


def test_neutral_scale_adds_no_unet_work_and_matches_the_plain_pipeline(pipe: Any) -> None:
    plain_cfg = call(pipe, guidance_scale=5.0).images
    plain = call(pipe, guidance_scale=1.0).images
    with UNetBatches(pipe) as seen:
        guided_cfg = call(GuidedPipeline(pipe, SEG(0.0, sigma=10.0, cfg_scale=5.0))).images
        guided = call(GuidedPipeline(pipe, SEG(3.0, sigma=0.0))).images
    assert seen.batches == [2, 2, 1, 1]  # [uncond, cond]; then [cond]: no SEG rows at all
    # CFG alone: same formula, rearranged by the rule (x_c + (w - 1)(x_c - x_u)): rounding only.
    assert_close(guided_cfg, plain_cfg, ops=1024)  # 2 steps and the VAE
    assert torch.equal(guided, plain)  # no guidance at all: bit for bit


def test_return_dict_false_generators_and_restore(pipe: Any) -> None:
    guided = GuidedPipeline(pipe, SEG(3.0, sigma=1.0, cfg_scale=4.0))
    first = call(guided, return_dict=False)
    second = call(guided, return_dict=False)
    assert isinstance(first, tuple)
    assert first[0].shape == (1, 3, H, W)
    assert torch.equal(first[0], second[0])  # same generator seed, same image
    assert no_hooks(pipe.unet)


def test_exception_mid_run_leaves_the_pipeline_as_before(pipe: Any) -> None:
    before = dict(pipe.unet.attn_processors)
    plain = call(pipe, guidance_scale=3.0).images

    def fail(p: Any, i: int, t: Any, kw: dict[str, Any]) -> dict[str, Any]:
        raise RuntimeError("stop at step 0")

    guided = GuidedPipeline(pipe, SEG(3.0, sigma=5.0, cfg_scale=3.0))
    with pytest.raises(RuntimeError, match="stop at step 0"):
        call(guided, callback_on_step_end=fail)
    assert no_hooks(pipe.unet)
    assert all(pipe.unet.attn_processors[k] is v for k, v in before.items())
    assert torch.equal(call(pipe, guidance_scale=3.0).images, plain)


def test_guidance_scale_belongs_to_the_rule(pipe: Any) -> None:
    with pytest.raises(TypeError, match=r"sets \['guidance_scale'\] itself"):
        call(GuidedPipeline(pipe, SEG(3.0)), guidance_scale=7.0)
    with pytest.raises(TypeError, match="rule must be a GuidanceRule"):
        GuidedPipeline(pipe, "seg")  # type: ignore[arg-type]


def test_schedules_see_the_step_and_the_scheduler_sigma(pipe: Any) -> None:
    pipe.scheduler.set_timesteps(3)
    sigmas = [float(s) for s in pipe.scheduler.sigmas[:3]]
    threshold = (sigmas[0] + sigmas[1]) / 2  # SEG on for sigma <= threshold: steps 1 and 2
    by_sigma = SEG(3.0, sigma=2.0, schedule=Interval(0.0, threshold))
    by_step = SEG(3.0, sigma=2.0, schedule=Interval(0.0, 0.5, on="progress"))  # steps 0 and 1
    with UNetBatches(pipe) as seen:
        call(GuidedPipeline(pipe, by_sigma), steps=3)
        call(GuidedPipeline(pipe, by_step), steps=3)
    assert seen.batches == [1, 2, 2, 2, 2, 1]


def test_scheduler_sigma_euler_and_ddim() -> None:
    class Pipe:
        scheduler: Any = None

    pipe = Pipe()
    pipe.scheduler = diffusers.EulerDiscreteScheduler(steps_offset=1)
    pipe.scheduler.set_timesteps(4)
    for t, s in zip(pipe.scheduler.timesteps, pipe.scheduler.sigmas, strict=False):
        assert scheduler_sigma(pipe, t) == pytest.approx(float(s))
    pipe.scheduler = diffusers.DDIMScheduler()
    pipe.scheduler.set_timesteps(4)
    t = int(pipe.scheduler.timesteps[1])
    a = float(pipe.scheduler.alphas_cumprod[t])
    assert scheduler_sigma(pipe, torch.tensor(t)) == pytest.approx(math.sqrt((1 - a) / a))


def test_controlnet_and_img2img_pipelines() -> None:
    """ControlNet residuals and img2img latents are batched with the branches like the rest."""
    sd, xl = make_pipe("sd"), make_pipe("sdxl")
    controlnet = diffusers.ControlNetModel.from_unet(
        sd.unet, conditioning_embedding_out_channels=(4, 8)
    )
    cn_pipe = diffusers.StableDiffusionControlNetPipeline(
        **{k: v for k, v in sd.components.items() if k != "image_encoder"}, controlnet=controlnet
    )
    i2i = diffusers.StableDiffusionXLImg2ImgPipeline(
        **{k: v for k, v in xl.components.items() if k != "image_encoder"}
    )
    control = torch.rand(1, 3, H, W)
    for pipe, extra in ((cn_pipe, {"image": control}), (i2i, {"image": control, "strength": 1.0})):
        pipe.set_progress_bar_config(disable=True)
        with UNetBatches(pipe) as seen:
            images = call(GuidedPipeline(pipe, SEG(3.0, sigma=4.0, cfg_scale=4.0)), **extra).images
        assert images.shape == (1, 3, H, W)
        assert torch.isfinite(images).all()
        assert seen.batches == [3, 3]
        assert no_hooks(pipe.unet)


def test_img2img_progress_counts_the_steps_it_runs() -> None:
    """strength 0.5 of 4 steps runs 2 (progress 0, 1): Interval(0.5, 1) is on at the second."""
    sd = make_pipe("sd")
    i2i = diffusers.StableDiffusionImg2ImgPipeline(
        **{k: v for k, v in sd.components.items() if k != "image_encoder"}
    )
    i2i.set_progress_bar_config(disable=True)
    rule = SEG(3.0, sigma=2.0, schedule=Interval(0.5, 1.0, on="progress"))
    with UNetBatches(i2i) as seen:
        call(GuidedPipeline(i2i, rule), steps=4, image=torch.rand(1, 3, H, W), strength=0.5)
    assert seen.batches == [1, 2]


class SequentialPipe:
    """Calls its UNet once per conditioning (cond, then uncond), like Flux's true CFG."""

    def __init__(self, unet: Any, uncond_first: bool = False, skip_uncond: bool = False) -> None:
        self.unet = unet
        self.uncond_first = uncond_first
        self.skip_uncond = skip_uncond  # a misconfigured run: one call per step
        self.scheduler = diffusers.EulerDiscreteScheduler(steps_offset=1)

    def __call__(
        self, latents: Any, cond: Any, uncond: Any, steps: int, true_cfg_scale: float
    ) -> Any:
        self.scheduler.set_timesteps(steps)
        self._num_timesteps = steps
        latents = latents * self.scheduler.init_noise_sigma
        for t in self.scheduler.timesteps:
            x = self.scheduler.scale_model_input(latents, t)
            if self.skip_uncond:
                noise = self.unet(x, t, encoder_hidden_states=cond).sample
                latents = self.scheduler.step(noise, t, latents).prev_sample
                continue
            if self.uncond_first:
                neg = self.unet(x, t, encoder_hidden_states=uncond).sample
            noise = self.unet(x, t, encoder_hidden_states=cond).sample
            if not self.uncond_first:
                neg = self.unet(x, t, encoder_hidden_states=uncond).sample
            noise = neg + true_cfg_scale * (noise - neg)
            latents = self.scheduler.step(noise, t, latents).prev_sample
        return latents


@pytest.mark.parametrize("uncond_first", [False, True])
def test_sequential_pipeline_gets_the_rule_exactly(uncond_first: bool) -> None:
    """Two denoiser calls per step (cond+SEG batched, then uncond) still give the rule's value."""
    from smoothguide import QuerySmoothing
    from smoothguide.diffusers import PipelineAdapter, patcher_for

    pipe = SequentialPipe(
        _unet(xl=False).double(), uncond_first
    )  # float64: compare to 1e-10, not rounding
    adapter = PipelineAdapter(
        "sequential-test",
        matches=lambda p: isinstance(p, SequentialPipe),
        sequential=("uncond", "cond") if uncond_first else ("cond", "uncond"),
        call_kwargs=lambda p: {"true_cfg_scale": 2.0},
    )
    gen = torch.Generator().manual_seed(3)
    latents = torch.randn(1, 4, 8, 12, generator=gen, dtype=torch.float64)
    cond, uncond = torch.randn(2, 1, 5, 16, generator=gen, dtype=torch.float64).unbind(0)
    rule = SEG(3.0, sigma=2.0, cfg_scale=5.0)
    with UNetBatches(pipe) as seen:
        out = GuidedPipeline(pipe, rule, adapter=adapter)(latents, cond, uncond, steps=2)
    per_step = [1, 2] if uncond_first else [2, 1]  # [uncond] and [cond, cond_seg]
    assert seen.batches == per_step * 2
    assert no_hooks(pipe.unet)

    # By hand: the three predictions separately, the official SEG + CFG formula, Euler steps.
    patcher = patcher_for(pipe.unet)
    scheduler = diffusers.EulerDiscreteScheduler(steps_offset=1)
    scheduler.set_timesteps(2)
    x = latents * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            inp = scheduler.scale_model_input(x, t)
            c = pipe.unet(inp, t, encoder_hidden_states=cond).sample
            u = pipe.unet(inp, t, encoder_hidden_states=uncond).sample
            with patcher.perturb(QuerySmoothing(2.0), rows=[0]):
                s = pipe.unet(inp, t, encoder_hidden_states=cond).sample
            x = scheduler.step(u + 5.0 * (c - u) + 3.0 * (c - s), t, x).prev_sample
    assert_close(out, x, ops=1024)  # float64: 2 steps of the UNet
    with pytest.raises(ValueError, match="sequential must be"):
        PipelineAdapter("bad", matches=lambda p: False, sequential=("cond",))


@pytest.mark.parametrize("steps", [1, 2])
def test_sequential_adapter_refuses_a_pipeline_that_calls_once_per_step(steps: int) -> None:
    from smoothguide.diffusers import PipelineAdapter

    pipe = SequentialPipe(_unet(xl=False), skip_uncond=True)
    adapter = PipelineAdapter(
        "sequential-test",
        matches=lambda p: isinstance(p, SequentialPipe),
        sequential=("cond", "uncond"),
        call_kwargs=lambda p: {"true_cfg_scale": 2.0},
    )
    latents, text = torch.randn(1, 4, 8, 8), torch.randn(1, 5, 16)
    guided = GuidedPipeline(pipe, SEG(3.0, sigma=2.0, cfg_scale=5.0), adapter=adapter)
    with pytest.raises(RuntimeError, match="did not call the denoiser once per conditioning"):
        guided(latents, text, text, steps=steps)
    assert no_hooks(pipe.unet)
