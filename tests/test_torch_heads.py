"""Per-head SEG / PAG, soft PAG and resolution-relative σ, against a float64 hand re-implementation.

The reference recomputes the tiny network in NumPy float64 from its weights:
per-head queries, keys, values; the perturbed heads' queries blurred with
``scipy.ndimage.gaussian_filter1d`` along the grid's rows and columns, or their
attention map replaced by ``(1 − w) A + w I``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ndimage = pytest.importorskip("scipy.ndimage")

import torch.nn.functional as F  # noqa: E402

from smoothguide import (  # noqa: E402
    IdentityAttention,
    QuerySmoothing,
    TokenGrid,
    default_radius,
    smooth_queries,
)
from smoothguide.torch import AttentionPatcher  # noqa: E402

HEADS, DIM = 3, 12


class Attn(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.to_q, self.to_k, self.to_v = (torch.nn.Linear(DIM, DIM) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = (
            f(x).reshape(b, n, HEADS, c // HEADS).transpose(1, 2)
            for f in (self.to_q, self.to_k, self.to_v)
        )
        out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2).reshape(b, n, c)


class Net(torch.nn.Module):
    """(B, 12, H, W) -> tokens -> one residual attention layer -> image."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = Attn()

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        b, c, h, w = img.shape
        z = img.flatten(2).transpose(1, 2)
        z = z + self.attn(z)
        return z.transpose(1, 2).reshape(b, c, h, w)


@pytest.fixture
def net() -> Net:
    torch.manual_seed(0)
    return Net().eval()


def _linear(layer: torch.nn.Linear, x: np.ndarray) -> np.ndarray:
    w = layer.weight.detach().double().numpy()
    b = layer.bias.detach().double().numpy()
    return x @ w.T + b


def _blur(q: np.ndarray, h: int, w: int, sigma: float) -> np.ndarray:
    """(tokens, d) queries on an h x w grid, Gaussian-blurred (SciPy, reflect) or averaged."""
    g = q.reshape(h, w, -1)
    if math.isinf(sigma):
        return np.broadcast_to(g.mean(axis=(0, 1)), g.shape).reshape(h * w, -1)
    r = default_radius(sigma)  # the documented truncation (official SEG code's kernel size)
    g = ndimage.gaussian_filter1d(g, sigma, axis=0, mode="reflect", radius=r)
    g = ndimage.gaussian_filter1d(g, sigma, axis=1, mode="reflect", radius=r)
    return g.reshape(h * w, -1)


def reference(
    net: Net,
    img: torch.Tensor,
    rows: set[int],
    heads: tuple[int, ...],
    *,
    sigma: float | None = None,
    weight: float | None = None,
) -> np.ndarray:
    """Hand float64 forward; rows ``rows``, heads ``heads`` blurred (sigma) or soft-identity."""
    x = img.double().numpy()
    b, c, h, w = x.shape
    z = x.reshape(b, c, h * w).transpose(0, 2, 1)
    out = np.empty_like(z)
    for i in range(b):
        per = [_linear(f, z[i]) for f in (net.attn.to_q, net.attn.to_k, net.attn.to_v)]
        q, k, v = (t.reshape(h * w, HEADS, c // HEADS).transpose(1, 0, 2) for t in per)
        att = np.empty_like(q)
        for hd in range(HEADS):
            qh = q[hd]
            hit = i in rows and hd in heads
            if hit and sigma is not None:
                qh = _blur(qh, h, w, sigma)
            logits = qh @ k[hd].T / math.sqrt(c // HEADS)
            a = np.exp(logits - logits.max(axis=1, keepdims=True))
            a /= a.sum(axis=1, keepdims=True)
            if hit and weight is not None:
                a = (1 - weight) * a + weight * np.eye(h * w)
            att[hd] = a @ v[hd]
        out[i] = z[i] + att.transpose(1, 0, 2).reshape(h * w, c)
    return out.transpose(0, 2, 1).reshape(b, c, h, w)


def check(actual: torch.Tensor, ref: np.ndarray) -> None:
    err = float(np.abs(actual.double().numpy() - ref).max())
    # float32 through two projections and a softmax over <= 48 tokens: a few hundred ulps.
    tol = 512 * np.finfo(np.float32).eps * float(np.abs(ref).max())
    assert err <= tol, f"max abs error {err:.3g} > {tol:.3g}"


@pytest.mark.parametrize("sigma", [1.5, math.inf])
@pytest.mark.parametrize("heads", [(0, 2), (1,)])
def test_per_head_seg_equals_hand_reference(net: Net, sigma: float, heads: tuple[int, ...]) -> None:
    img = torch.randn(3, DIM, 4, 6)
    patcher = AttentionPatcher(net, layers=Attn)
    with torch.no_grad():
        plain = net(img)
        with patcher.perturb(QuerySmoothing(sigma, heads=heads), rows=[1, 2]):
            out = net(img)
    check(out, reference(net, img, {1, 2}, heads, sigma=sigma))
    assert torch.equal(out[0], plain[0])  # other rows bit-identical
    # a per-head blur is not the all-head blur
    with torch.no_grad(), patcher.perturb(QuerySmoothing(sigma), rows=[1, 2]):
        every = net(img)
    assert float((every[1:] - out[1:]).abs().max()) > 1e-3 * float(every.abs().max())


@pytest.mark.parametrize("weight", [1.0, 0.3])
@pytest.mark.parametrize("heads", [None, (0, 2)])
def test_soft_and_per_head_pag_equal_hand_reference(
    net: Net, weight: float, heads: tuple[int, ...] | None
) -> None:
    img = torch.randn(2, DIM, 3, 5)
    patcher = AttentionPatcher(net, layers=Attn)
    with torch.no_grad():
        plain = net(img)
        with patcher.perturb(IdentityAttention(weight=weight, heads=heads), rows=[0]):
            out = net(img)
    check(out, reference(net, img, {0}, heads or tuple(range(HEADS)), weight=weight))
    assert torch.equal(out[1], plain[1])


def test_weight_zero_is_the_plain_model_and_weight_one_is_pag(net: Net) -> None:
    img = torch.randn(2, DIM, 3, 4)
    patcher = AttentionPatcher(net, layers=Attn)
    with torch.no_grad():
        plain = net(img)
        with patcher.perturb(IdentityAttention(weight=0.0), rows=[0, 1]):
            zero = net(img)
        with patcher.perturb(IdentityAttention(), rows=[1]):
            pag = net(img)
        with patcher.perturb(IdentityAttention(weight=1.0, heads=(0, 1, 2)), rows=[1]):
            all_heads = net(img)
    assert torch.equal(zero, plain)
    assert torch.equal(pag, all_heads)


@pytest.mark.parametrize("shape", [(4, 6), (8, 12), (6, 4), (5, 5)])
def test_relative_sigma_is_proportional_to_the_shorter_side(
    net: Net, shape: tuple[int, int]
) -> None:
    h, w = shape
    rel = QuerySmoothing(0.25, relative=True, heads=(1,))
    absolute = 0.25 * min(h, w)
    assert rel.absolute_sigma(TokenGrid(h, w)) == absolute
    assert QuerySmoothing((0.0, 0.1, 0.2), relative=True).absolute_sigma(TokenGrid(h, w)) == (
        0.0,
        0.1 * min(h, w),
        0.2 * min(h, w),
    )
    img = torch.randn(2, DIM, h, w)
    patcher = AttentionPatcher(net, layers=Attn)
    with torch.no_grad():
        with patcher.perturb(rel, rows=[1]):
            out = net(img)
        with patcher.perturb(QuerySmoothing(absolute, heads=(1,)), rows=[1]):
            same = net(img)
    assert torch.equal(out, same)
    check(out, reference(net, img, {1}, (1,), sigma=absolute))


def test_relative_sigma_core_equals_smooth_queries_with_the_absolute_sigma() -> None:
    rng = np.random.default_rng(0)
    for h, w in [(6, 9), (12, 18), (9, 6)]:
        grid = TokenGrid(h, w)
        q = rng.standard_normal((2, h * w, 4))
        p = QuerySmoothing(1 / 6, relative=True)
        sigma = p.absolute_sigma(grid)
        assert sigma == pytest.approx(min(h, w) / 6, rel=1e-15)
        ref = np.stack([_blur(x, h, w, min(h, w) / 6) for x in q])
        np.testing.assert_allclose(smooth_queries(q, grid, sigma), ref, rtol=0, atol=1e-12)


def test_bad_heads_and_weights_are_errors(net: Net) -> None:
    with pytest.raises(ValueError, match="heads"):
        QuerySmoothing(1.0, heads=())
    with pytest.raises(ValueError, match="heads"):
        IdentityAttention(heads=(1, 1))
    with pytest.raises(ValueError, match="heads"):
        IdentityAttention(heads=(-1,))
    with pytest.raises(TypeError, match="heads"):
        QuerySmoothing(1.0, heads="0")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="weight"):
        IdentityAttention(weight=1.5)
    with pytest.raises(TypeError, match="relative"):
        QuerySmoothing(1.0, relative=1)  # type: ignore[arg-type]
    patcher = AttentionPatcher(net, layers=Attn)
    img = torch.randn(1, DIM, 2, 3)
    with (
        pytest.raises(ValueError, match="3 heads"),
        patcher.perturb(QuerySmoothing(1.0, heads=(3,)), rows=[0]),
    ):
        net(img)
    assert not net.attn._forward_pre_hooks  # restored
    assert not net.attn._forward_hooks


def test_heads_need_a_head_axis() -> None:
    class Flat(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> Any:  # (B, N, d): heads folded away
            return F.scaled_dot_product_attention(x, x, x)

    class Wrap(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = Flat()

        def forward(self, img: torch.Tensor) -> Any:
            return self.attn(img.flatten(2).transpose(1, 2))

    model = Wrap()
    patcher = AttentionPatcher(model, layers=Flat)
    with (
        pytest.raises(RuntimeError, match="heads"),
        patcher.perturb(IdentityAttention(heads=(0,)), rows=[0]),
    ):
        model(torch.randn(1, 4, 2, 2))
