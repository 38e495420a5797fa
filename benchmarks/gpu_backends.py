"""GPU check of SEG / PAG on fast attention backends, compiled, in bf16 (not run by the tests).

A prepared, short script for a machine with a CUDA device (about 2-4 minutes on one GPU):

1. correctness: SEG (σ = 2) and PAG on one attention layer under every torch SDPA kernel
   (flash, efficient, cuDNN, math) and every diffusers backend that is usable here
   (``native``, ``_native_cudnn``, ``_native_efficient``, ``_native_flash``, ``flex``,
   ``flash``, ``_flash_3``, ``sage``, ``xformers``, ...), against the float32 math
   reference of the same perturbation;
2. the blur share: time of ``smooth_queries`` on the perturbed row / time of the attention
   call of the whole batch, and the SEG layer ratio (perturbed / plain call), at SDXL-mid,
   SD3.5 and Flux attention shapes at 1024², bf16, batch 3 ``[uncond, cond, seg]``;
3. the SEG step ratio of a real-width Flux transformer (2 double + 2 single blocks),
   eager and compiled (``compilable`` + ``compile_repeated_blocks``), with the number of
   graphs before and after a σ sweep (it must not grow).

Usage::

    HF_HUB_OFFLINE=1 python benchmarks/gpu_backends.py            # prints Markdown tables
    HF_HUB_OFFLINE=1 python benchmarks/gpu_backends.py --device cpu --tiny   # smoke test

Copy the printed tables into ``benchmarks/README.md`` (section "GPU").
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models import attention_dispatch as ad
from torch.nn.attention import sdpa_kernel

from smoothguide import IdentityAttention, QuerySmoothing
from smoothguide.torch import AttentionPatcher, Geometry, JointTokens, LayerSpec, compilable
from smoothguide.torch import smooth_queries as torch_smooth
from smoothguide.torch.layouts import ImageTokens

#: (name, heads, grid h, grid w, head dim, text tokens, text first)
SHAPES = [
    ("SDXL mid @ 1024²", 20, 32, 32, 64, 0, False),
    ("SD3.5 M @ 1024²", 24, 64, 64, 64, 333, False),
    ("Flux @ 1024²", 24, 64, 64, 128, 512, True),
]
TINY = [("tiny", 2, 4, 6, 16, 3, True)]
SDPA_KERNELS = ["FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"]
DIFFUSERS = [
    "native",
    "_native_cudnn",
    "_native_efficient",
    "_native_flash",
    "_native_math",
    "flex",
    "flash",
    "flash_hub",
    "_flash_3",
    "_flash_3_hub",
    "sage",
    "sage_hub",
    "xformers",
]


class Attn(torch.nn.Module):
    """One attention call on given q, k, v: torch SDPA, or a diffusers backend (BSHD)."""

    def __init__(self, backend: str | None = None) -> None:
        super().__init__()
        self.backend = backend

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.backend is None:
            return F.scaled_dot_product_attention(q, k, v)
        out = ad.dispatch_attention_fn(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), backend=self.backend
        )
        return out.transpose(1, 2)


class Net(torch.nn.Module):
    def __init__(self, backend: str | None, shape: tuple[Any, ...]) -> None:
        super().__init__()
        self.attn = Attn(backend)
        h, w = shape[2], shape[3]
        self.geometry = Geometry(batch=3, height=h, width=w, tokens=h * w)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.attn(q, k, v)


def patcher(net: Net, shape: tuple[Any, ...]) -> AttentionPatcher:
    text, first = shape[5], shape[6]
    layout = JointTokens("prefix" if first else "suffix") if text else ImageTokens()
    return AttentionPatcher(
        net, {"attn": LayerSpec(layout)}, geometry=lambda args, kwargs: net.geometry
    )


def timed(fn: Callable[[], Any], repeat: int, device: str) -> float:
    """Median milliseconds of ``fn()``."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(2):
        fn()
    sync()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[len(times) // 2]


def qkv(shape: tuple[Any, ...], dtype: torch.dtype, device: str) -> list[torch.Tensor]:
    _, heads, h, w, d, text, _ = shape
    g = torch.Generator(device=device).manual_seed(0)
    n = h * w + text
    return [torch.randn(3, heads, n, d, generator=g, device=device, dtype=dtype) for _ in "qkv"]


def results(net: Net, p: AttentionPatcher, x: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        with p.perturb(QuerySmoothing(2.0), rows=[2]):
            seg = net(*x)
        with p.perturb(IdentityAttention(), rows=[2]):
            pag = net(*x)
    return {"seg": seg.float(), "pag": pag.float()}


def correctness(shapes: list[Any], dtype: torch.dtype, device: str, repeat: int) -> None:
    print(f"\n### SEG / PAG per attention backend ({dtype}, {device})\n")
    print("| shape | backend | SEG err | PAG err | plain ms | SEG ms | SEG / plain |")
    print("|---|---|---|---|---|---|---|")
    for shape in shapes:
        x = qkv(shape, dtype, device)
        ref_net = Net(None, shape)
        with sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            ref = results(ref_net, patcher(ref_net, shape), [t.float() for t in x])
        cases: list[tuple[str, Net, Any]] = []
        for kernel in SDPA_KERNELS:
            cases.append(
                (f"SDPA {kernel}", Net(None, shape), getattr(torch.nn.attention.SDPBackend, kernel))
            )
        for name in DIFFUSERS:
            cases.append((f"diffusers {name}", Net(name, shape), None))
        for label, net, kernel in cases:
            try:
                if net.attn.backend is not None:
                    ad._check_attention_backend_requirements(
                        ad.AttentionBackendName(net.attn.backend)
                    )
                    ad._maybe_download_kernel_for_backend(ad.AttentionBackendName(net.attn.backend))
                ctx = sdpa_kernel(kernel) if kernel is not None else nullcontext()
                with ctx:
                    p = patcher(net, shape)
                    got = results(net, p, x)
                    scale = float(ref["seg"].abs().max())
                    errs = [float((got[k] - ref[k]).abs().max()) / scale for k in ("seg", "pag")]

                    def plain(net: Net = net, x: list[torch.Tensor] = x) -> Any:
                        with torch.no_grad():
                            return net(*x)

                    def seg(net: Net = net, x: list[torch.Tensor] = x, p: Any = p) -> Any:
                        with torch.no_grad(), p.perturb(QuerySmoothing(2.0), rows=[2]):
                            return net(*x)

                    t0, t1 = timed(plain, repeat, device), timed(seg, repeat, device)
                print(
                    f"| {shape[0]} | {label} | {errs[0]:.1e} | {errs[1]:.1e} | {t0:.3f} | "
                    f"{t1:.3f} | {t1 / t0:.3f} |"
                )
            except Exception as exc:  # a report line per unusable backend
                print(
                    f"| {shape[0]} | {label} | not usable: {type(exc).__name__}: "
                    f"{str(exc).splitlines()[0][:80]} | | | | |"
                )


def blur_share(shapes: list[Any], dtype: torch.dtype, device: str, repeat: int) -> None:
    from smoothguide import TokenGrid

    print(f"\n### Blur share of one attention call ({dtype}, {device}, batch 3, SEG row 1)\n")
    print("| shape | σ | blur ms | SDPA ms | blur / SDPA |")
    print("|---|---|---|---|---|")
    for shape in shapes:
        q, k, v = qkv(shape, dtype, device)
        _, _, h, w, _, text, first = shape
        grid = TokenGrid(h, w, prefix=text if first else 0, suffix=0 if first else text)
        t_attn = timed(
            lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v), repeat, device
        )
        for sigma in (1.0, 3.0, 10.0, math.inf):
            t_blur = timed(lambda q=q, g=grid, s=sigma: torch_smooth(q[2:], g, s), repeat, device)
            print(f"| {shape[0]} | {sigma} | {t_blur:.3f} | {t_attn:.3f} | {t_blur / t_attn:.1%} |")


def flux_step(tiny: bool, dtype: torch.dtype, device: str, repeat: int) -> None:
    import diffusers
    from torch._dynamo.utils import counters

    from smoothguide.diffusers import patcher_for

    width = (
        dict(
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=16,
            pooled_projection_dim=8,
            axes_dims_rope=[4, 4, 8],
            in_channels=4,
        )
        if tiny
        else dict(
            attention_head_dim=128,
            num_attention_heads=24,
            joint_attention_dim=4096,
            pooled_projection_dim=768,
            axes_dims_rope=[16, 56, 56],
            in_channels=64,
        )
    )
    model = diffusers.FluxTransformer2DModel(
        patch_size=1, num_layers=2, num_single_layers=2, guidance_embeds=True, **width
    )
    model = model.to(device=device, dtype=dtype).eval()
    h = w = 4 if tiny else 64
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float().to(device)
    c = width["in_channels"]
    kw = dict(
        hidden_states=torch.randn(3, h * w, c, device=device, dtype=dtype),
        encoder_hidden_states=torch.randn(
            3, 7 if tiny else 512, width["joint_attention_dim"], device=device, dtype=dtype
        ),
        pooled_projections=torch.randn(
            3, width["pooled_projection_dim"], device=device, dtype=dtype
        ),
        timestep=torch.full((3,), 0.5, device=device, dtype=dtype),
        img_ids=ids,
        txt_ids=torch.zeros(7 if tiny else 512, 3, device=device),
        guidance=torch.full((3,), 3.5, device=device, dtype=dtype),
        return_dict=False,
    )
    p = patcher_for(model)
    print(f"\n### Flux step, 2 double + 2 single blocks, batch 3 ({dtype}, {device})\n")
    print("| mode | plain ms | SEG (row 2, all layers) ms | SEG step ratio | graphs |")
    print("|---|---|---|---|---|")

    def plain() -> Any:
        with torch.no_grad():
            return model(**kw)

    def seg(sigma: float = 2.0) -> Any:
        with torch.no_grad(), p.perturb(QuerySmoothing(sigma, layers=p.layers), rows=[2]):
            return model(**kw)

    t0, t1 = timed(plain, repeat, device), timed(seg, repeat, device)
    print(f"| eager | {t0:.2f} | {t1:.2f} | {t1 / t0:.3f} | — |")
    with compilable(p):
        model.compile_repeated_blocks()
        plain()
        seg()
        before = counters["stats"]["unique_graphs"]
        t0, t1 = timed(plain, repeat, device), timed(seg, repeat, device)
        for sigma in (1.0, 5.0, math.inf):
            seg(sigma)
        after = counters["stats"]["unique_graphs"]
    print(f"| compile_repeated_blocks | {t0:.2f} | {t1:.2f} | {t1 / t0:.3f} | {before} → {after} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (smoke test)")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--skip-step", action="store_true", help="skip the Flux step (3.)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu --tiny for a smoke test")
    dtype = torch.bfloat16
    shapes = TINY if args.tiny else SHAPES
    if args.device == "cuda":
        print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    correctness(shapes, dtype, args.device, args.repeat)
    blur_share(shapes, dtype, args.device, args.repeat)
    if not args.skip_step:
        flux_step(args.tiny, dtype, args.device, max(3, args.repeat // 4))


if __name__ == "__main__":
    main()
