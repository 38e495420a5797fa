"""Issue 13 (robustness, round 2): core, rules and numerics.

Each test compares against an independent reference (SciPy, NumPy, diffusers' own
guider, the unguided prediction) and fails on the code before the fix.
"""

from __future__ import annotations

import math

import array_api_strict as xps
import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter1d

import smoothguide.torch as sgt
from reliability_table import failure_mode
from smoothguide import TokenGrid, smooth_queries
from smoothguide.smoothing import MODES
from tolerance import assert_close

INF = math.inf


def official_radius(sigma: float) -> int:
    """The official SEG code's kernel size ``ceil(6σ) + 1``, made odd, halved (independent copy)."""
    c = math.ceil(6 * sigma)
    return (c + 1 - c % 2) // 2


def scipy_smooth(q: np.ndarray, grid: TokenGrid, sigma: float, mode: str, radius: int | None):
    """float64 SciPy reference: gaussian_filter1d along height, then width."""
    x = np.array(q, dtype=np.float64)
    lead, dim = x.shape[:-2], x.shape[-1]
    sp = x[..., grid.spatial_slice, :].reshape(*lead, grid.height, grid.width, dim)
    r = official_radius(sigma) if radius is None else radius
    for axis in (-3, -2):
        if sp.shape[axis] > 1:
            sp = gaussian_filter1d(sp, sigma, axis=axis, mode=mode, radius=r)
    out = x.copy()
    out[..., grid.spatial_slice, :] = sp.reshape(*lead, grid.spatial_tokens, dim)
    return out


def run_impl(impl: str, q: np.ndarray, grid: TokenGrid, sigma: float, **kw: object) -> np.ndarray:
    if impl == "numpy":
        return smooth_queries(q, grid, sigma, **kw)  # type: ignore[arg-type]
    if impl == "array_api_strict":
        return np.asarray(smooth_queries(xps.asarray(q), grid, sigma, **kw))  # type: ignore[arg-type]
    if impl == "torch-core":
        return smooth_queries(torch.from_numpy(q), grid, sigma, **kw).numpy()  # type: ignore[arg-type]
    method = impl.removeprefix("torch-")
    out = sgt.smooth_queries(torch.from_numpy(q), grid, sigma, method=method, **kw)  # type: ignore[arg-type]
    return out.numpy()


IMPLS = ["numpy", "array_api_strict", "torch-core", "torch-matmul", "torch-shift", "torch-auto"]


# -- NaN / inf stay within the kernel's support, as in SciPy ---------------------------------


@failure_mode(
    "one NaN, +inf or -inf query token (and mixed ones) in the blurred grid",
    "it reaches only the outputs within the kernel's support, exactly as "
    "scipy.ndimage.gaussian_filter1d (NaN, ±inf and finite values at the same places), in "
    "every boundary mode, core on every backend and the torch fast path (matmul, shift)",
)
@pytest.mark.numerics
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_nonfinite_queries_stay_within_the_kernel_support(impl: str, mode: str, dtype: str) -> None:
    grid = TokenGrid(9, 13, prefix=1, suffix=2)
    rng = np.random.default_rng(0)
    cases = [
        ({(4, 6): np.nan}, 1.0, None),
        ({(2, 3): INF}, 1.0, None),
        ({(0, 0): -INF}, 1.5, None),
        ({(4, 6): INF, (4, 8): -INF, (7, 1): np.nan}, 1.0, 2),  # inf - inf = NaN where both reach
        ({(3, 3): INF}, 0.05, 3),  # taps beyond +-1 underflow to 0: 0 * inf = NaN, as SciPy
        ({(1, 12): np.nan}, 2.0, 20),  # radius wider than the grid: folded taps
    ]
    for bad, sigma, radius in cases:
        q = rng.normal(size=(2, grid.num_tokens, 3)).astype(dtype)
        for (i, j), value in bad.items():
            q[1, grid.prefix + i * grid.width + j, 1] = value
        q[0, 0, 0] = np.nan  # a non-spatial token: never blurred, passed through
        ref = scipy_smooth(q, grid, sigma, mode, radius)
        out = run_impl(impl, q, grid, sigma, mode=mode, radius=radius)
        assert out.dtype == q.dtype
        np.testing.assert_array_equal(np.isnan(out), np.isnan(ref))
        np.testing.assert_array_equal(np.isposinf(out), np.isposinf(ref))
        np.testing.assert_array_equal(np.isneginf(out), np.isneginf(ref))
        finite = np.isfinite(ref)
        assert finite.sum() > q.size // 2  # most of the grid is unaffected
        assert_close(out[finite], ref[finite], ops=64, magnitude=q[np.isfinite(q)])


# -- caches never hand out tensors that break another mode -----------------------------------


def kron_blur(grid: TokenGrid, sigma: float, mode: str) -> np.ndarray:
    """The (tokens x tokens) SciPy blur operator of the grid: kron of per-axis matrices."""
    r = official_radius(sigma)
    mats = [
        gaussian_filter1d(np.eye(n), sigma, axis=0, mode=mode, radius=r)
        for n in (grid.height, grid.width)
    ]
    return np.kron(*mats)


@failure_mode(
    "torch smoothing (and SEG in a model) first under torch.inference_mode(), then with autograd",
    "the process-wide blur-matrix cache holds normal tensors (built outside inference mode): "
    "the later backward works and its gradient equals the transposed SciPy operator, and a "
    "fresh-cache run",
)
@pytest.mark.numerics
@pytest.mark.parametrize("method", ["matmul", "shift"])
def test_inference_mode_call_does_not_poison_the_blur_cache_for_autograd(method: str) -> None:
    from smoothguide.torch.smoothing import _shift_plan, axis_blur_matrix

    axis_blur_matrix.cache_clear()
    _shift_plan.cache_clear()
    grid, sigma = TokenGrid(7, 11), 1.3
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, grid.num_tokens, 3, generator=gen)
    with torch.inference_mode():
        first = sgt.smooth_queries(q, grid, sigma, method=method)
    assert first.is_inference()
    q = q.clone().requires_grad_(True)
    c = torch.randn(2, grid.num_tokens, 3, generator=gen)
    out = sgt.smooth_queries(q, grid, sigma, method=method)
    (out * c).sum().backward()
    assert q.grad is not None
    b = kron_blur(grid, sigma, "reflect")
    assert_close(q.grad, np.einsum("ji,bjd->bid", b, c.double().numpy()), magnitude=c)
    assert_close(out.detach(), np.einsum("ij,bjd->bid", b, q.detach().double().numpy()),
                 magnitude=q.detach())  # fmt: skip


@failure_mode(
    "a SEG-guided model evaluated under torch.inference_mode(), then differentiated",
    "the backward runs; the input gradient equals that of a run with a freshly emptied cache",
)
@pytest.mark.numerics
def test_seg_under_inference_mode_then_autograd_on_the_demo_model() -> None:
    demo = pytest.importorskip("smoothguide.demo.model")
    from smoothguide.rules import SEG
    from smoothguide.sampling import GuidedDenoiser
    from smoothguide.torch import AttentionPatcher
    from smoothguide.torch.smoothing import axis_blur_matrix

    torch.manual_seed(0)
    net = demo.DemoDiT(demo.DiTConfig(hidden=32, depth=2, heads=2)).eval()
    den = demo.DemoDenoiser(net).eval()
    patcher = AttentionPatcher(den, layers=demo.Attention)
    null = {"class_labels": torch.full((2,), demo.NULL_CLASS)}
    guided = GuidedDenoiser(den, SEG(2.0, sigma=1.5, cfg_scale=3.0), uncond=null, perturber=patcher)
    x, labels, s = torch.randn(2, 1, 16, 16), torch.tensor([3, 7]), torch.full((2,), 2.0)

    def grad() -> torch.Tensor:
        xg = x.clone().requires_grad_(True)
        guided(xg, s, class_labels=labels).square().sum().backward()
        assert xg.grad is not None
        return xg.grad

    axis_blur_matrix.cache_clear()
    reference = grad()
    axis_blur_matrix.cache_clear()
    with torch.inference_mode():
        guided(x, s, class_labels=labels)
    assert axis_blur_matrix.cache_info().currsize > 0  # the inference-mode call filled it
    assert torch.equal(grad(), reference)


# -- rules refuse branch outputs of different shapes -----------------------------------------


def _rules() -> list[object]:
    from smoothguide.rules import APG, CFG, PAG, SEG, Compose, Rescale

    return [
        pytest.param(CFG(3.0), id="CFG"),
        pytest.param(SEG(2.0, sigma=1.0), id="SEG"),
        pytest.param(SEG(2.0, sigma=1.0, cfg_scale=4.0), id="SEG+CFG"),
        pytest.param(SEG(3.0, sigma=1.0, convention="paper", cfg_scale=4.0), id="SEG-paper-Eq10"),
        pytest.param(PAG(2.0, cfg_scale=3.0), id="PAG+CFG"),
        pytest.param(APG(4.0, eta=0.5, momentum=0.3), id="APG"),
        pytest.param(Compose(CFG(3.0), Rescale(0.7)), id="CFG+Rescale"),
        pytest.param(Compose(CFG(3.0), SEG(2.0, sigma=INF), PAG(1.0)), id="Compose"),
    ]


@failure_mode(
    "branch outputs of different shapes handed to a rule (x_c of shape (2, 1) with x_u of "
    "(2, 4), or a perturbed branch of another shape), every rule and Compose",
    "ValueError naming the rule, each branch and its shape; never a broadcast result",
)
@pytest.mark.parametrize("rule", _rules())
def test_rules_refuse_branch_outputs_of_different_shapes(rule: object) -> None:
    from smoothguide.rules import StepContext

    ctx = StepContext(1.0)
    needed = rule.branches(ctx)  # type: ignore[attr-defined]
    assert len(needed) >= 2
    rng = np.random.default_rng(0)
    good = {b: rng.normal(size=(2, 4)) for b in needed}
    out, _ = rule.combine(good, ctx)  # type: ignore[attr-defined]
    assert out.shape == (2, 4)
    for odd in needed:
        outputs = dict(good)
        outputs[odd] = rng.normal(size=(2, 1))
        with pytest.raises(ValueError, match="one shape") as info:
            rule.combine(outputs, ctx)  # type: ignore[attr-defined]
        msg = str(info.value)
        assert "(2, 1)" in msg
        assert "(2, 4)" in msg
        assert repr(odd.conditioning) in msg
