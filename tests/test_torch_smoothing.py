"""smoothguide.torch.smooth_queries: the torch fast path equals the portable core."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.ndimage

torch = pytest.importorskip("torch")

import smoothguide  # noqa: E402
from smoothguide import TokenGrid  # noqa: E402
from smoothguide.torch import smooth_queries  # noqa: E402
from smoothguide.torch.smoothing import axis_blur_matrix  # noqa: E402
from tolerance import assert_close  # noqa: E402

pytestmark = pytest.mark.numerics  # run under several CPU kernels: nox -s tests-kernels

GRIDS = [TokenGrid(8, 16), TokenGrid(24, 8, prefix=3, suffix=2), TokenGrid(5, 7, frames=3)]
SIGMAS = [0.0, 0.7, 3.0, 10.0, math.inf, (1.0, math.inf), (math.inf, 0.5, 2.0)]


@pytest.mark.parametrize("grid", GRIDS, ids=str)
@pytest.mark.parametrize("method", ["auto", "matmul", "shift"])
@pytest.mark.parametrize("mode", ["reflect", "mirror", "nearest", "wrap"])
def test_equals_portable_core(grid: TokenGrid, method: str, mode: str) -> None:
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, grid.num_tokens, 4, dtype=torch.float64, generator=gen)
    for sigma in SIGMAS:
        if isinstance(sigma, tuple) and len(sigma) == 3 and grid.frames == 1:
            continue
        ref = smoothguide.smooth_queries(q, grid, sigma, mode=mode)
        out = smooth_queries(q, grid, sigma, mode=mode, method=method)
        assert out.shape == q.shape
        assert out.dtype == q.dtype
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


def test_matches_scipy_with_kernel_wider_than_grid() -> None:
    """sigma=10 (radius 30) on an 8 x 16 grid: each axis equals scipy's gaussian_filter1d."""
    grid = TokenGrid(8, 16)
    q = torch.randn(1, grid.num_tokens, 2, dtype=torch.float64)
    out = smooth_queries(q, grid, 10.0).numpy().reshape(8, 16, 2)
    img = q.numpy().reshape(8, 16, 2)
    ref = scipy.ndimage.gaussian_filter1d(img, 10.0, axis=0, mode="reflect", radius=30)
    ref = scipy.ndimage.gaussian_filter1d(ref, 10.0, axis=1, mode="reflect", radius=30)
    np.testing.assert_allclose(out, ref, atol=1e-12)


def test_sigma_zero_is_exact_identity_and_prefix_untouched() -> None:
    grid = TokenGrid(4, 6, prefix=2, suffix=1)
    q = torch.randn(2, grid.num_tokens, 3)
    assert torch.equal(smooth_queries(q, grid, 0.0), q)
    out = smooth_queries(q, grid, 2.0)
    assert torch.equal(out[:, :2], q[:, :2])
    assert torch.equal(out[:, -1:], q[:, -1:])
    assert not torch.allclose(out[:, 2:-1], q[:, 2:-1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sigma", [1.5, math.inf])
def test_half_precision_accumulates_in_float32(dtype: torch.dtype, sigma: float) -> None:
    grid = TokenGrid(24, 8)
    # Values near the float16 maximum: summing 192 of them in 16 bits would overflow.
    q = torch.full((2, grid.num_tokens, 4), 6.0e4).to(dtype)
    q[:, ::2] = q[:, ::2] * 0.5
    out = smooth_queries(q, grid, sigma)
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    ref = smoothguide.smooth_queries(q.double().numpy(), grid, sigma)
    expected = torch.from_numpy(np.ascontiguousarray(ref)).to(dtype)
    # float32 accumulation, then one rounding to 16 bits: at most one 16-bit ulp off
    # (a float32 sum within eps32 of a 16-bit tie may round the other way).
    assert_close(out, expected, ops=1)


def test_blur_matrix_cache_is_keyed_by_dtype_and_device() -> None:
    cpu = torch.device("cpu")
    a = axis_blur_matrix(9, 2.0, None, "reflect", torch.float32, cpu)
    assert axis_blur_matrix(9, 2.0, None, "reflect", torch.float32, cpu) is a
    b = axis_blur_matrix(9, 2.0, None, "reflect", torch.float64, cpu)
    assert b.dtype == torch.float64
    assert a.dtype == torch.float32
    np.testing.assert_allclose(b.numpy(), smoothguide.blur_matrix(9, 2.0), atol=0)


def test_bad_arguments() -> None:
    grid = TokenGrid(2, 3)
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        smooth_queries(np.zeros((6, 2)), grid, 1.0)
    with pytest.raises(ValueError, match="tokens == grid.num_tokens=6"):
        smooth_queries(torch.zeros(5, 2), grid, 1.0)
    with pytest.raises(ValueError, match="method must be one of"):
        smooth_queries(torch.zeros(6, 2), grid, 1.0, method="fft")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="real floating dtype"):
        smooth_queries(torch.zeros(6, 2, dtype=torch.int64), grid, 1.0)
    with pytest.raises(ValueError, match="mode"):
        smooth_queries(torch.zeros(6, 2), grid, 1.0, mode="edge")  # type: ignore[arg-type]
