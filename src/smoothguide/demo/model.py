"""The demo networks: a small class-conditional DiT, its denoiser wrapper and a classifier.

:class:`DemoDiT` is an epsilon-prediction diffusion transformer on 16x16x1 images
(patch 2, an 8x8 grid of 64 tokens, no extra tokens; class and noise level enter
only through adaLN-Zero modulation). Its self-attention modules
(:class:`Attention`, named ``blocks.0.attn`` ... ``blocks.{depth-1}.attn``) use the
diffusers layout (``to_q``, ``to_k``, ``to_v``, ``to_out``, ``heads``) and
:func:`torch.nn.functional.scaled_dot_product_attention`, so the public torch
adapter of :mod:`smoothguide.torch` patches them like any other model.

Noise schedule: the network was trained on the continuous cosine VP schedule,
``alpha_bar(t) = cos(pi t / 2)^2``, whose variance-exploding noise level is
``sigma(t) = tan(pi t / 2)``. :class:`DemoDenoiser` exposes it through the
k-diffusion contract ``denoiser(x, sigma, *, class_labels) -> x0`` with
``x = x0 + sigma * eps``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from ._deps import torch

F = torch.nn.functional

__all__ = [
    "NULL_CLASS",
    "SIGMA_MAX",
    "SIGMA_MIN",
    "Attention",
    "ClassifierConfig",
    "DemoClassifier",
    "DemoDenoiser",
    "DemoDiT",
    "DiTConfig",
    "sigma_to_t",
    "t_to_sigma",
]

#: Class id of the null (unconditional) label.
NULL_CLASS = 10
#: Smallest VE noise level the model was trained on.
SIGMA_MIN = 0.002
#: Largest VE noise level the model was trained on.
SIGMA_MAX = 80.0


def t_to_sigma(t: Any) -> Any:
    """VE noise level of cosine-schedule time ``t`` in ``[0, 1)``: ``tan(pi t / 2)``.

    With ``alpha_bar(t) = cos(pi t / 2)^2`` the VE level is
    ``sigma = sqrt((1 - alpha_bar) / alpha_bar) = tan(pi t / 2)``; inverse of
    :func:`sigma_to_t`.

    Parameters
    ----------
    t
        Tensor of schedule times.

    Returns
    -------
    torch.Tensor
        Noise levels ``sigma >= 0``, same shape as ``t``.

    Examples
    --------
    >>> float(t_to_sigma(torch.tensor(0.5)))
    1.0
    """
    return torch.tan(t * (math.pi / 2))


def sigma_to_t(sigma: Any) -> Any:
    """Cosine-schedule time of VE noise level ``sigma``: ``2 atan(sigma) / pi``.

    Inverse of :func:`t_to_sigma`.

    Parameters
    ----------
    sigma
        Tensor of VE noise levels ``>= 0``.

    Returns
    -------
    torch.Tensor
        Times in ``[0, 1)``, same shape as ``sigma``.

    Examples
    --------
    >>> float(sigma_to_t(torch.tensor(1.0)))
    0.5
    """
    return torch.atan(sigma) * (2 / math.pi)


@dataclass(frozen=True)
class DiTConfig:
    """Hyper-parameters of :class:`DemoDiT`.

    Parameters
    ----------
    image_size
        Side of the square input images.
    channels
        Image channels.
    patch
        Patch side; the token grid is ``image_size // patch`` squared.
    hidden
        Token width, a multiple of ``heads`` and of 4 (2-D sin-cos position embedding).
    depth
        Number of transformer blocks (the shipped model has the defaults: 5).
    heads
        Attention heads per block.
    mlp_ratio
        MLP width as a multiple of ``hidden``.
    num_classes
        Number of real classes; the null class :data:`NULL_CLASS` is one more.

    Examples
    --------
    >>> DiTConfig().tokens
    64
    >>> DiTConfig(hidden=32, depth=3, heads=2).to_dict()["depth"]
    3
    """

    image_size: int = 16
    channels: int = 1
    patch: int = 2
    hidden: int = 128
    depth: int = 5
    heads: int = 4
    mlp_ratio: float = 4.0
    num_classes: int = 10

    @property
    def grid(self) -> int:
        """Side of the token grid."""
        return self.image_size // self.patch

    @property
    def tokens(self) -> int:
        """Number of tokens (all spatial)."""
        return self.grid * self.grid

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON."""
        return asdict(self)


class Attention(torch.nn.Module):
    """Multi-head self-attention in the diffusers layout.

    Parameters
    ----------
    dim
        Token width.
    heads
        Number of heads (``dim`` must be divisible by it).

    Examples
    --------
    >>> attn = Attention(8, heads=2)
    >>> attn(torch.zeros(3, 5, 8)).shape
    torch.Size([3, 5, 8])
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.heads = heads
        self.to_q = torch.nn.Linear(dim, dim)
        self.to_k = torch.nn.Linear(dim, dim)
        self.to_v = torch.nn.Linear(dim, dim)
        self.to_out = torch.nn.Linear(dim, dim)

    def forward(self, x: Any) -> Any:
        """Attend over the tokens of ``x`` of shape ``(batch, tokens, dim)``."""
        b, n, c = x.shape
        h = self.heads
        q = self.to_q(x).reshape(b, n, h, c // h).transpose(1, 2)
        k = self.to_k(x).reshape(b, n, h, c // h).transpose(1, 2)
        v = self.to_v(x).reshape(b, n, h, c // h).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, c))


def _modulate(x: Any, shift: Any, scale: Any) -> Any:
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(torch.nn.Module):
    """Pre-norm transformer block with adaLN-Zero conditioning."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = torch.nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, heads)
        self.norm2 = torch.nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        inner = int(hidden * mlp_ratio)
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(hidden, inner),
            torch.nn.GELU(approximate="tanh"),
            torch.nn.Linear(inner, hidden),
        )
        self.ada = torch.nn.Linear(hidden, 6 * hidden)
        torch.nn.init.zeros_(self.ada.weight)
        torch.nn.init.zeros_(self.ada.bias)

    def forward(self, x: Any, c: Any) -> Any:
        """Apply the block to tokens ``x`` under conditioning vector ``c``."""
        s1, g1, a1, s2, g2, a2 = self.ada(F.silu(c)).chunk(6, dim=-1)
        x = x + a1[:, None] * self.attn(_modulate(self.norm1(x), s1, g1))
        return x + a2[:, None] * self.mlp(_modulate(self.norm2(x), s2, g2))


def _sincos_1d(dim: int, positions: Any) -> Any:
    freqs = torch.exp(-math.log(10000.0) * torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))
    args = positions.to(torch.float64)[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)


def _sincos_2d(dim: int, grid: int) -> Any:
    pos = torch.arange(grid)
    rows = _sincos_1d(dim // 2, pos)[:, None, :].expand(grid, grid, dim // 2)
    cols = _sincos_1d(dim // 2, pos)[None, :, :].expand(grid, grid, dim // 2)
    return torch.cat([rows, cols], dim=-1).reshape(grid * grid, dim).to(torch.float32)


def timestep_embedding(t: Any, dim: int) -> Any:
    """Sinusoidal embedding of schedule times ``t`` in ``[0, 1]`` (scaled by 1000)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = (t.float() * 1000.0)[:, None] * freqs[None].to(t.device)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class DemoDiT(torch.nn.Module):
    """Class-conditional epsilon-prediction DiT on 16x16x1 images.

    ``forward(x_t, t, class_labels)`` takes the VP-scaled noisy image
    ``x_t = cos(pi t/2) x0 + sin(pi t/2) eps``, times ``t`` of shape ``(batch,)`` and
    integer labels ``0..9`` or :data:`NULL_CLASS`, and predicts ``eps``.
    The output projections (final layer and every adaLN-Zero modulation) are
    zero-initialised, so an untrained model predicts ``eps = 0``.

    Parameters
    ----------
    config
        Architecture (default ``DiTConfig()``).

    Examples
    --------
    >>> net = DemoDiT(DiTConfig(hidden=32, depth=2, heads=2))
    >>> net(torch.zeros(2, 1, 16, 16), torch.full((2,), 0.5), torch.tensor([3, 10])).shape
    torch.Size([2, 1, 16, 16])
    >>> [n for n, m in net.named_modules() if isinstance(m, Attention)]
    ['blocks.0.attn', 'blocks.1.attn']
    """

    def __init__(self, config: DiTConfig | None = None) -> None:
        super().__init__()
        cfg = config or DiTConfig()
        self.config = cfg
        h, p = cfg.hidden, cfg.patch
        self.patch_embed = torch.nn.Linear(cfg.channels * p * p, h)
        self.register_buffer("pos_embed", _sincos_2d(h, cfg.grid), persistent=False)
        self.t_embed = torch.nn.Sequential(
            torch.nn.Linear(h, h), torch.nn.SiLU(), torch.nn.Linear(h, h)
        )
        self.y_embed = torch.nn.Embedding(cfg.num_classes + 1, h)
        self.blocks = torch.nn.ModuleList(
            [DiTBlock(h, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth)]
        )
        self.final_norm = torch.nn.LayerNorm(h, elementwise_affine=False, eps=1e-6)
        self.final_ada = torch.nn.Linear(h, 2 * h)
        self.final = torch.nn.Linear(h, cfg.channels * p * p)
        for lin in (self.final_ada, self.final):
            torch.nn.init.zeros_(lin.weight)
            torch.nn.init.zeros_(lin.bias)

    def forward(self, x: Any, t: Any, class_labels: Any) -> Any:
        """Predict the noise of ``x`` at schedule times ``t`` for ``class_labels``."""
        cfg = self.config
        b, ch, hh, ww = x.shape
        p, g = cfg.patch, cfg.grid
        tokens = (
            x.reshape(b, ch, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, ch * p * p)
        )
        z = self.patch_embed(tokens) + self.pos_embed
        c = self.t_embed(timestep_embedding(t, cfg.hidden)) + self.y_embed(class_labels)
        for block in self.blocks:
            z = block(z, c)
        shift, scale = self.final_ada(F.silu(c)).chunk(2, dim=-1)
        out = self.final(_modulate(self.final_norm(z), shift, scale))
        return out.reshape(b, g, g, ch, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, ch, hh, ww)


class DemoDenoiser(torch.nn.Module):
    """k-diffusion style denoiser over :class:`DemoDiT`.

    ``denoiser(x, sigma, *, class_labels)`` returns the estimate of the clean image
    ``x0`` for a noisy ``x = x0 + sigma * eps`` (variance-exploding convention).
    ``sigma`` is a tensor of shape ``(batch,)`` (or a scalar, broadcast);
    ``class_labels`` holds digits ``0..9`` or :data:`NULL_CLASS` for the
    unconditional branch (an int is broadcast over the batch).

    The estimate is ``x0 = x - sigma * eps_theta(x / sqrt(1 + sigma^2), t(sigma), y)``
    with ``t(sigma) = 2 atan(sigma) / pi`` (:func:`sigma_to_t`): the VE input
    rescaled to the VP input the DiT was trained on.

    Parameters
    ----------
    model
        The epsilon-prediction :class:`DemoDiT`.

    Attributes
    ----------
    sigma_min, sigma_max
        The trained noise range, :data:`SIGMA_MIN` and :data:`SIGMA_MAX`.
    null_class
        :data:`NULL_CLASS`.

    Examples
    --------
    >>> den = DemoDenoiser(DemoDiT(DiTConfig(hidden=32, depth=1, heads=2)))
    >>> x = torch.randn(2, 1, 16, 16)
    >>> bool(torch.equal(den(x, torch.ones(2), class_labels=3), x))  # untrained: eps = 0
    True
    """

    sigma_min: float = SIGMA_MIN
    sigma_max: float = SIGMA_MAX
    null_class: int = NULL_CLASS

    def __init__(self, model: DemoDiT) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Any, sigma: Any, *, class_labels: Any = NULL_CLASS) -> Any:
        """Return the ``x0`` estimate of ``x`` at VE noise level ``sigma``."""
        b = x.shape[0]
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(b)
        if sigma.shape != (b,):
            raise ValueError(
                f"sigma must be a scalar or have shape ({b},), got {tuple(sigma.shape)}"
            )
        labels = torch.as_tensor(class_labels, dtype=torch.long, device=x.device)
        if labels.ndim == 0:
            labels = labels.expand(b)
        if labels.shape != (b,):
            raise ValueError(
                f"class_labels must be an int or have shape ({b},), got {tuple(labels.shape)}"
            )
        if bool(((labels < 0) | (labels > NULL_CLASS)).any()):
            raise ValueError(f"class_labels must be in 0..{NULL_CLASS} ({NULL_CLASS} = null class)")
        s = sigma[:, None, None, None]
        x_in = x / torch.sqrt(1 + s * s)
        eps = self.model(x_in, sigma_to_t(sigma), labels)
        return x - s * eps


@dataclass(frozen=True)
class ClassifierConfig:
    """Hyper-parameters of :class:`DemoClassifier`.

    Parameters
    ----------
    width
        Channels of the first two convolutions (the last two have ``2 * width``).
    features
        Width of the penultimate (feature) layer used by the metrics.
    num_classes
        Number of output classes.

    Examples
    --------
    >>> ClassifierConfig(width=4, features=8).to_dict()
    {'width': 4, 'features': 8, 'num_classes': 10}
    """

    width: int = 32
    features: int = 128
    num_classes: int = 10

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON."""
        return asdict(self)


class DemoClassifier(torch.nn.Module):
    """Tiny CNN on 16x16 digits in ``[-1, 1]``: the demo's feature network.

    ``forward`` returns class logits, :meth:`embed` the penultimate features used
    for the Fréchet distance.

    Architecture: two blocks of two 3x3 convolutions + ReLU and a 2x2 max-pool
    (16x16 -> 4x4), a linear layer to ``features`` + ReLU, dropout 0.3 (in
    ``forward`` only) and a linear head.

    Parameters
    ----------
    config
        Architecture (default ``ClassifierConfig()``).

    Examples
    --------
    >>> net = DemoClassifier()
    >>> net(torch.zeros(2, 1, 16, 16)).shape, net.embed(torch.zeros(2, 1, 16, 16)).shape
    (torch.Size([2, 10]), torch.Size([2, 128]))
    """

    def __init__(self, config: ClassifierConfig | None = None) -> None:
        super().__init__()
        cfg = config or ClassifierConfig()
        self.config = cfg
        w = cfg.width
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(1, w, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.Conv2d(w, w, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(w, 2 * w, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.Conv2d(2 * w, 2 * w, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),
            torch.nn.Flatten(),
            torch.nn.Linear(2 * w * 16, cfg.features),
            torch.nn.ReLU(),
        )
        self.dropout = torch.nn.Dropout(0.3)
        self.head = torch.nn.Linear(cfg.features, cfg.num_classes)

    def embed(self, x: Any) -> Any:
        """Penultimate features, shape ``(batch, features)``."""
        return self.features(x)

    def forward(self, x: Any) -> Any:
        """Class logits, shape ``(batch, num_classes)``."""
        return self.head(self.dropout(self.embed(x)))
