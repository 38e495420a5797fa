"""SAG: mask and degradation vs diffusers' StableDiffusionSAGPipeline; the branch vs a hand run.

References: ``StableDiffusionSAGPipeline.sag_masking`` and its
``CrossAttnStoreProcessor`` (diffusers 0.42, ``pipelines/deprecated``), called on
the same tensors; the full SAG step written out by hand on a tiny UNet.
"""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from diffusers.pipelines.deprecated.stable_diffusion_sag import (  # noqa: E402
    pipeline_stable_diffusion_sag as ref_sag,
)

from smoothguide import SAG, AttentionMaskedBlur, GuidedDenoiser, TokenGrid  # noqa: E402
from smoothguide.diffusers import patcher_for  # noqa: E402
from smoothguide.sag import sag_degrade, sag_mask  # noqa: E402
from test_diffusers_unet import tiny_unet  # noqa: E402

MID = "mid_block.attentions.0.transformer_blocks.0.attn1"


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _diffusers_masking(
    x0: torch.Tensor, probs: torch.Tensor, map_size: tuple[int, int], heads: int, eps: Any
) -> torch.Tensor:
    """diffusers' sag_masking with a scheduler whose add_noise is ``x + noise`` (EDM scaling)."""
    fake = SimpleNamespace(
        unet=SimpleNamespace(config=SimpleNamespace(attention_head_dim=heads)),
        scheduler=SimpleNamespace(add_noise=lambda x, noise, timesteps: x + noise),
    )
    return ref_sag.StableDiffusionSAGPipeline.sag_masking(
        fake, x0, probs, map_size, torch.tensor(1), eps
    )


@pytest.mark.parametrize(
    ("grid", "latent"), [((4, 6), (8, 12)), ((5, 5), (5, 5)), ((3, 4), (9, 8))]
)
def test_mask_and_degradation_equal_diffusers_sag_masking(
    grid: tuple[int, int], latent: tuple[int, int]
) -> None:
    g = torch.Generator().manual_seed(0)
    b, heads, n = 2, 3, grid[0] * grid[1]
    probs = torch.softmax(3 * torch.randn(b * heads, n, n, generator=g, dtype=torch.float64), -1)
    x0 = torch.randn(b, 4, *latent, generator=g, dtype=torch.float64)
    noise = torch.randn(b, 4, *latent, generator=g, dtype=torch.float64)
    ref = _diffusers_masking(x0, probs, grid, heads, noise)
    mask = sag_mask(probs.reshape(b, heads, n, n), TokenGrid(*grid), latent)
    assert 0 < float(mask.mean()) < 1  # a real mask: some tokens blurred, some kept
    ours = sag_degrade(x0, mask) + noise
    # diffusers builds its Gaussian taps in float32 (torch.linspace default): float32 rounding
    tol = 16 * float(np.finfo(np.float32).eps) * float(ref.abs().max())
    torch.testing.assert_close(ours, ref, rtol=0, atol=tol)
    # and on NumPy: the core is backend-neutral
    np.testing.assert_allclose(
        sag_degrade(
            x0.numpy(), sag_mask(probs.reshape(b, heads, n, n).numpy(), TokenGrid(*grid), latent)
        ),
        ours.numpy() - noise.numpy(),
        atol=1e-12,
    )


class Den:
    """The tiny UNet as a ``model(x, sigma, **cond)`` denoiser (its output taken as x0)."""

    def __init__(self, unet: Any) -> None:
        self.unet = unet

    def __call__(self, x: torch.Tensor, sigma: Any, encoder_hidden_states: Any) -> torch.Tensor:
        with torch.no_grad():
            return self.unet(x, 500, encoder_hidden_states=encoder_hidden_states).sample


def _stored_probs(unet: Any, x: torch.Tensor, ehs: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """The mid self-attention probabilities by diffusers' own CrossAttnStoreProcessor."""
    ref = copy.deepcopy(unet)
    store = ref_sag.CrossAttnStoreProcessor()
    ref.mid_block.attentions[0].transformer_blocks[0].attn1.processor = store
    size: list[Any] = []
    with (
        ref.mid_block.attentions[0].register_forward_hook(
            lambda m, i, o: size.append(o[0].shape[-2:])
        ),
        torch.no_grad(),
    ):
        ref(x, 500, encoder_hidden_states=ehs)
    return store.attention_probs, tuple(size[0])


@pytest.mark.parametrize(("cfg", "batched"), [(1.0, True), (3.0, True), (3.0, False)])
def test_sag_step_equals_hand_implementation_on_a_tiny_unet(cfg: float, batched: bool) -> None:
    unet = tiny_unet()
    model = Den(unet)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 8, 16, generator=g)
    text = torch.randn(2, 5, 12, generator=g)
    null = torch.zeros(1, 5, 12)
    sigma, s = 0.8, 0.75
    rule = SAG(s, layers=MID, cfg_scale=cfg)
    guided = GuidedDenoiser(
        model,
        rule,
        uncond={"encoder_hidden_states": null},
        perturber=patcher_for(unet),
        batched=batched,
    )
    out = guided(x, sigma, encoder_hidden_states=text)

    src = null.expand(2, -1, -1) if cfg != 1.0 else text
    x_src = model(x, sigma, encoder_hidden_states=src)
    probs, map_size = _stored_probs(unet, x, src)
    heads = probs.shape[0] // 2
    x_deg = _diffusers_masking(x_src, probs, map_size, heads, x - x_src)
    assert not torch.allclose(x_deg, x)
    d_deg = model(x_deg, sigma, encoder_hidden_states=src)
    x_bar = d_deg + (x - x_deg)
    x_c = model(x, sigma, encoder_hidden_states=text)
    x_u = model(x, sigma, encoder_hidden_states=null.expand(2, -1, -1))
    expected = (
        x_c + s * (x_c - x_bar) if cfg == 1.0 else x_u + cfg * (x_c - x_u) + s * (x_u - x_bar)
    )
    scale = float(expected.abs().max())
    assert float((out - expected).abs().max()) <= 2e-5 * scale
    assert (
        float((out - (x_c if cfg == 1.0 else x_u + cfg * (x_c - x_u))).abs().max()) > 1e-3 * scale
    )
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in unet.modules())


def test_capture_records_only_the_requested_rows_and_errors() -> None:
    unet = tiny_unet()
    patcher = patcher_for(unet)
    g = torch.Generator().manual_seed(0)
    x, ehs = torch.randn(3, 4, 8, 16, generator=g), torch.randn(3, 5, 12, generator=g)
    with torch.no_grad(), patcher.capture_attention(MID, rows=[2]) as cap:
        plain_inside = unet(x, 500, encoder_hidden_states=ehs).sample
    with torch.no_grad():
        plain = unet(x, 500, encoder_hidden_states=ehs).sample
    assert torch.equal(plain_inside, plain)  # recording changes nothing
    probs, _ = _stored_probs(unet, x[2:], ehs[2:])
    assert cap.probs is not None
    assert cap.probs.shape == (1, probs.shape[0], *probs.shape[1:])
    torch.testing.assert_close(cap.probs[0], probs, rtol=1e-5, atol=1e-6)
    assert cap.grid == TokenGrid(4, 8)
    with (
        pytest.raises(ValueError, match="one layer"),
        patcher.capture_attention(patcher.layers, [0]),
    ):
        pass
    with pytest.raises(ValueError, match="blur_sigma"):
        AttentionMaskedBlur(0.0)
    assert math.isclose(SAG().scale, 0.75)
