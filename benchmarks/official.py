"""The official SEG-SDXL query blur, re-implemented for comparison.

Logic of ``gaussian_blur_2d`` and ``SEGCFGSelfAttnProcessor`` in
``pipeline_seg.py`` of the SEG-SDXL repository (S. Hong, commit cf8256d), as
digested in the project's ``PAPER.md`` §4: the queries ``(B, heads, N, d)``
(in diffusers' layout, a transposed view of ``to_q``'s ``(B, N, heads * d)``)
are viewed as a square ``isqrt(N) x isqrt(N)`` image with ``heads * d``
channels, padded with ``F.pad(..., mode="reflect")`` (SciPy's ``"mirror"``) and
convolved with a depthwise ``k x k`` Gaussian, ``k = ceil(6 sigma) + 1`` made
odd and clamped to the grid; ``sigma > 9999`` replaces every query by the mean.

:func:`official_style_blur` is the same convolution on a true ``height x width``
grid: the official code cannot run non-square grids (``isqrt`` and ``view``
fail), so the benchmark labels that column as a generalisation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "INF_BLUR_THRESHOLD",
    "diffusers_layout",
    "gaussian_blur_2d",
    "official_blur",
    "official_kernel_size",
    "official_style_blur",
]

#: ``inf_blur = blur_sigma > 9999.0`` in the official processor.
INF_BLUR_THRESHOLD = 9999.0


def official_kernel_size(sigma: float, side: int) -> int:
    """Kernel size the official code uses for ``sigma`` on a grid of width ``side``.

    ``ceil(6 sigma) + 1 - ceil(6 sigma) % 2`` (odd), then clamped by
    ``gaussian_blur_2d`` to ``side - (side % 2 - 1)`` (even side: side + 1).
    """
    c = math.ceil(6 * sigma)
    k = c + 1 - c % 2
    return min(k, side - (side % 2 - 1))


def gaussian_blur_2d(img: torch.Tensor, kernel_size: int, sigma: float) -> torch.Tensor:
    """The official ``gaussian_blur_2d``: depthwise ``k x k`` Gaussian, reflect padding."""
    height = img.shape[-1]  # sic: the width; the official code assumes a square
    kernel_size = min(kernel_size, height - (height % 2 - 1))
    ksize_half = (kernel_size - 1) * 0.5
    x = torch.linspace(-ksize_half, ksize_half, steps=kernel_size)
    pdf = torch.exp(-0.5 * (x / sigma).pow(2))
    x_kernel = pdf / pdf.sum()
    x_kernel = x_kernel.to(device=img.device, dtype=img.dtype)
    kernel2d = torch.mm(x_kernel[:, None], x_kernel[None, :])
    kernel2d = kernel2d.expand(img.shape[-3], 1, kernel2d.shape[0], kernel2d.shape[1])
    padding = [kernel_size // 2, kernel_size // 2, kernel_size // 2, kernel_size // 2]
    img = F.pad(img, padding, mode="reflect")
    return F.conv2d(img, kernel2d, groups=img.shape[-3])


def diffusers_layout(q: torch.Tensor) -> torch.Tensor:
    """``q`` (B, heads, N, d) as the transposed view of a ``(B, N, heads * d)`` tensor.

    That is how ``AttnProcessor2_0`` (and the official SEG processor) hold the
    queries, and the layout in which the official ``.view`` to an image works.
    """
    b, h, n, d = q.shape
    return q.transpose(1, 2).reshape(b, n, h * d).view(b, n, h, d).transpose(1, 2)


def official_blur(query: torch.Tensor, sigma: float) -> torch.Tensor:
    """The official processor's blur of the perturbed chunk ``query`` (B, heads, N, d).

    ``query`` must be in :func:`diffusers_layout`. For ``sigma > 9999`` the
    official code writes the mean into ``query`` in place (as here) and returns it.
    Raises ``RuntimeError`` (from ``view``) when N is not a perfect square, as
    the official code does.
    """
    b, heads, n, head_dim = query.shape
    height = width = math.isqrt(n)
    query = query.permute(0, 1, 3, 2).view(b, heads * head_dim, height, width)
    if sigma <= INF_BLUR_THRESHOLD:
        c = math.ceil(6 * sigma)
        kernel_size = c + 1 - c % 2
        query = gaussian_blur_2d(query, kernel_size, sigma)
    else:
        query[:] = query.mean(dim=(-2, -1), keepdim=True)
    return query.view(b, heads, head_dim, height * width).permute(0, 1, 3, 2)


def official_style_blur(query: torch.Tensor, height: int, width: int, sigma: float) -> torch.Tensor:
    """The official convolution on a ``height x width`` grid (not in the official code).

    Same kernel rule, clamped to the shorter side, same ``F.pad`` reflect and
    depthwise ``conv2d``; ``query`` in :func:`diffusers_layout`.
    """
    b, heads, n, head_dim = query.shape
    if n != height * width:
        raise ValueError(f"query has {n} tokens, not height * width = {height * width}")
    img = query.permute(0, 1, 3, 2).reshape(b, heads * head_dim, height, width)
    if sigma > INF_BLUR_THRESHOLD:
        img = img.mean(dim=(-2, -1), keepdim=True).expand(img.shape)
    else:
        img = gaussian_blur_2d(img, official_kernel_size(sigma, min(height, width)), sigma)
    return img.reshape(b, heads, head_dim, n).permute(0, 1, 3, 2)
