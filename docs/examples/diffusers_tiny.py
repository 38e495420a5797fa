"""Tutorial 2, offline: SEG on a tiny Stable Diffusion pipeline with random weights.

Real weights are gigabytes; this pipeline has the same architecture in miniature
(built from configs, random weights, nothing downloaded), so every step of the
tutorial runs in seconds on a CPU. The images are noise; the mechanics are real.
Run: ``python docs/examples/diffusers_tiny.py``. ``tests/test_docs.py`` runs it too.
"""

from __future__ import annotations

# [imports]
import math

import diffusers
import torch
import transformers

from smoothguide.diffusers import GuidedPipeline, unet_presets
from smoothguide.rules import SEG

# [/imports]


# fmt: off
# [build]
def tiny_pipeline() -> diffusers.StableDiffusionPipeline:
    """A Stable Diffusion 1.5-shaped pipeline: about 88k parameters, random weights."""
    torch.manual_seed(0)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "cat</w>": 3}
    tokenizer = transformers.CLIPTokenizer(vocab=vocab, merges=[], model_max_length=8)
    text_encoder = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=2, max_position_embeddings=8, bos_token_id=0, eos_token_id=1,
            pad_token_id=1,
        )
    )
    vae = diffusers.AutoencoderKL(
        block_out_channels=(8, 8), latent_channels=4, norm_num_groups=4, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    )
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, attention_head_dim=4,
        norm_num_groups=4, cross_attention_dim=16,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer,
        unet=unet.eval(), scheduler=diffusers.EulerDiscreteScheduler(steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
# [/build]
# fmt: on


def main() -> dict[str, object]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is fastest on a shared CPU
    try:
        return run(tiny_pipeline())
    finally:
        torch.set_num_threads(threads)


def run(pipe: diffusers.StableDiffusionPipeline) -> dict[str, object]:

    # [presets]
    presets = unet_presets(pipe.unet)
    print("mid:", presets["mid"])  # the paper's choice on SDXL; here one block
    print("presets:", sorted(presets))
    # [/presets]

    # [run]
    batches: list[int] = []  # rows the UNet returns, per step (fork mode: the blurred row
    # joins at the mid block, docs/fork.md)
    hook = pipe.unet.conv_out.register_forward_pre_hook(lambda m, a: batches.append(a[0].shape[0]))
    before = dict(pipe.unet.attn_processors)

    guided = GuidedPipeline(pipe, SEG(3.0, sigma=math.inf, cfg_scale=5.0))
    image = guided("a cat", height=32, width=48, num_inference_steps=3, output_type="pt").images
    assert image.shape == (1, 3, 32, 48)  # a non-square image: 16 x 24 latent
    assert batches == [3, 3, 3]  # [uncond, cond, cond_seg] in one UNet call per step

    batches.clear()
    unguided = GuidedPipeline(pipe, SEG(3.0, sigma=10.0))  # SEG alone: [cond, cond_seg]
    unguided("", height=32, width=48, num_inference_steps=3, output_type="pt")
    assert batches == [2, 2, 2]
    hook.remove()
    assert all(pipe.unet.attn_processors[k] is v for k, v in before.items())  # restored
    # [/run]
    return {"presets": presets, "image_shape": tuple(image.shape)}


if __name__ == "__main__":
    main()
