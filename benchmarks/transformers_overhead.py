"""Cost of SEG on a full-width SD3.5-Medium joint attention layer (random weights, CPU).

Run: ``HF_HUB_OFFLINE=1 python benchmarks/transformers_overhead.py [--threads N] [--repeat R]``.
One diffusers joint ``Attention`` (``JointAttnProcessor2_0``; 1536 channels, 24 heads of 64,
QK RMS-norm, 333 text tokens as in SD3's CLIP+T5 sequence) inside a minimal model whose
input is the ``(B, 16, H, W)`` latent (patch 2), batch 3 (``[uncond, cond, seg]``). Prints
the median milliseconds of the plain forward and of forwards with SEG on row 2
(sigma = inf, sigma = 10), through ``smoothguide.diffusers.transformers``' SD3 layout.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import Any

import torch
from diffusers.models.attention_processor import Attention, JointAttnProcessor2_0

from smoothguide import QuerySmoothing
from smoothguide.diffusers.sd3 import sd3_geometry
from smoothguide.torch import AttentionPatcher, JointTokens, LayerSpec

SHAPES = {  # name: latent (H, W); tokens = (H/2) * (W/2)
    "512x512 px (32x32 tokens)": (64, 64),
    "512x896 px (32x56 tokens)": (64, 112),
}
TEXT = 333


class Root(torch.nn.Module):
    config = type("Config", (), {"patch_size": 2})()

    def __init__(self) -> None:
        super().__init__()
        self.attn = Attention(
            query_dim=1536, added_kv_proj_dim=1536, dim_head=64, heads=24, out_dim=1536,
            context_pre_only=False, bias=True, processor=JointAttnProcessor2_0(),
            qk_norm="rms_norm", eps=1e-6,
        )  # fmt: skip

    def forward(self, hidden_states: torch.Tensor, text: torch.Tensor) -> Any:
        b, _, h, w = hidden_states.shape
        tokens = torch.randn(
            b, (h // 2) * (w // 2), 1536, generator=torch.Generator().manual_seed(0)
        )
        return self.attn(tokens, encoder_hidden_states=text)


def median_ms(fns: list[Any], repeat: int) -> list[float]:
    times: list[list[float]] = [[] for _ in fns]
    for fn in fns:
        fn()
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - t0)
    return [1e3 * statistics.median(t) for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, CPU float32, batch 3")
    print(f"{'shape':28} {'plain':>9} {'SEG inf':>9} {'SEG 10':>9}   (ms; ratio to plain)")
    torch.manual_seed(0)
    root = Root().eval()
    patcher = AttentionPatcher(
        root, {"attn": LayerSpec(JointTokens("suffix"))}, geometry=sd3_geometry(root)
    )
    text = torch.randn(3, TEXT, 1536)
    for name, (h, w) in SHAPES.items():
        latent = torch.randn(3, 16, h, w)

        def plain(latent: torch.Tensor = latent) -> None:
            with torch.no_grad():
                root(latent, text)

        def seg(sigma: float, latent: torch.Tensor = latent) -> Any:
            def run() -> None:
                with torch.no_grad(), patcher.perturb(QuerySmoothing(sigma), rows=[2]):
                    root(latent, text)

            return run

        ms = median_ms([plain, seg(math.inf), seg(10.0)], args.repeat)
        ratios = " ".join(f"{m / ms[0]:.2f}" for m in ms[1:])
        print(f"{name:28} {ms[0]:9.1f} {ms[1]:9.1f} {ms[2]:9.1f}   ({ratios})")


if __name__ == "__main__":
    main()
