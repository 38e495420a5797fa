"""Overhead of AttentionPatcher's SDPA interception on real diffusers attention shapes.

Run: ``HF_HUB_OFFLINE=1 python benchmarks/torch_patching_overhead.py [--threads N] [--repeat R]``.
For one diffusers ``Attention`` (self-attention, ``AttnProcessor2_0``) at SD 1.5 and SDXL
shapes, batch 3 (``[uncond, cond, perturbed]``), prints the median milliseconds of the plain
forward and of forwards with the patcher active on row 2: identity attention (PAG: the
interception itself plus a row copy), SEG with sigma = inf (mean) and sigma = 10.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
from diffusers.models.attention_processor import Attention

from smoothguide import IdentityAttention, QuerySmoothing
from smoothguide.torch import AttentionPatcher

SHAPES = {  # name: (channels, heads, latent h, latent w)
    "tiny 8x8 (fixed cost)": (64, 2, 8, 8),
    "SD1.5 down.0 @512px": (320, 8, 64, 64),
    "SD1.5 mid @512px": (1280, 8, 8, 8),
    "SDXL mid @1024px": (1280, 20, 32, 32),
    "SDXL mid @768x1344": (1280, 20, 24, 42),
}


class Root(torch.nn.Module):
    def __init__(self, channels: int, heads: int) -> None:
        super().__init__()
        self.attn = Attention(channels, heads=heads, dim_head=channels // heads)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.attn(img.flatten(2).transpose(1, 2))


def median_ms(fns, repeat: int) -> list[float]:  # type: ignore[no-untyped-def]
    """Median milliseconds of each function, timed interleaved (fair on a noisy machine)."""
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
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, CPU float32, batch 3")
    print(f"{'shape':22} {'plain':>8} {'PAG':>8} {'SEG inf':>8} {'SEG 10':>8}   (ms; ratio)")
    for name, (c, heads, h, w) in SHAPES.items():
        torch.manual_seed(0)
        root = Root(c, heads).eval()
        img = torch.randn(3, c, h, w)
        patcher = AttentionPatcher(root, layers=["attn"])

        def under(p, root=root, img=img, patcher=patcher):  # type: ignore[no-untyped-def]
            def run() -> None:
                with torch.no_grad(), patcher.perturb(p, rows=[2]):
                    root(img)

            return run

        def plain(root=root, img=img) -> None:  # type: ignore[no-untyped-def]
            with torch.no_grad():
                root(img)

        variants = (IdentityAttention(), QuerySmoothing(math.inf), QuerySmoothing(10.0))
        repeat = args.repeat * (20 if h * w <= 64 else 1)
        t = median_ms([plain, *(under(p) for p in variants)], repeat)
        ratios = " ".join(f"{x / t[0]:.3f}" for x in t[1:])
        print(f"{name:22} {t[0]:8.2f} {t[1]:8.2f} {t[2]:8.2f} {t[3]:8.2f}   {ratios}")


if __name__ == "__main__":
    main()
