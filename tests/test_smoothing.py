"""Gaussian query smoothing against SciPy's ``gaussian_filter1d`` and NumPy math."""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.ndimage import gaussian_filter1d

from smoothguide import TokenGrid, blur_matrix, default_radius, gaussian_kernel1d, smooth_queries
from smoothguide.smoothing import MODES
from tolerance import EPS32, assert_close, eps_of

pytestmark = pytest.mark.numerics  # run under several CPU kernels: nox -s tests-kernels

FIXTURE_OK = settings(
    deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=25
)
sigmas = st.one_of(st.floats(0.0, 50.0), st.just(math.inf), st.sampled_from([0.0, 0.4, 1.0, 10.0]))


def scipy_blur(x: np.ndarray, axis: int, sigma: float, mode: str, radius: int | None) -> np.ndarray:
    """Independent reference: SciPy along one axis; mean for inf; identity for 0."""
    # SciPy builds its taps as exp(-0.5 / sigma**2 * x**2): below ~1e-154, 0.5 / sigma**2
    # overflows and the centre tap is inf * 0 = NaN (with a RuntimeWarning). The exact
    # limit there is the unit impulse, i.e. the identity (what smoothguide returns).
    if not math.isfinite(0.5 / sigma**2 if sigma**2 > 0.0 else math.inf):
        return x
    if math.isinf(sigma):
        return np.broadcast_to(x.mean(axis=axis, keepdims=True), x.shape)
    r = default_radius(sigma) if radius is None else radius
    return gaussian_filter1d(x, sigma, axis=axis, mode=mode, radius=r)


def test_default_radius_matches_official_kernel_sizes() -> None:
    # Official code: k = ceil(6σ) + 1 - ceil(6σ) % 2 -> 0.5:3, 1:7, 2:13, 5:31, 10:61, 100:601.
    sizes = {0.5: 3, 1: 7, 2: 13, 5: 31, 10: 61, 100: 601}
    assert {s: 2 * default_radius(s) + 1 for s in sizes} == sizes


@pytest.mark.parametrize("sigma", [0.3, 1.0, 2.5, 10.0])
@pytest.mark.parametrize("radius", [None, 0, 2, 40])
def test_kernel_equals_scipy_impulse_response(sigma: float, radius: int | None) -> None:
    w = gaussian_kernel1d(sigma, radius=radius)
    r = default_radius(sigma) if radius is None else radius
    impulse = np.zeros(2 * r + 1)
    impulse[r] = 1.0
    ref = gaussian_filter1d(impulse, sigma, mode="constant", radius=r)
    np.testing.assert_allclose(w, ref, rtol=0, atol=1e-15)
    assert w.sum() == pytest.approx(1.0, abs=1e-14)
    np.testing.assert_array_equal(w, w[::-1])


@settings(deadline=None, max_examples=120)
@given(
    n=st.integers(1, 40),
    sigma=st.floats(0.05, 60.0),
    radius=st.one_of(st.none(), st.integers(0, 130)),
    mode=st.sampled_from(MODES),
)
def test_blur_matrix_equals_scipy_for_any_radius(
    n: int, sigma: float, radius: int | None, mode: str
) -> None:
    # M e_j = filter(e_j): the matrix is SciPy's filter applied to the identity.
    r = default_radius(sigma) if radius is None else radius
    ref = gaussian_filter1d(np.eye(n), sigma, axis=0, mode=mode, radius=r)
    np.testing.assert_allclose(blur_matrix(n, sigma, radius=radius, mode=mode), ref, atol=1e-13)


@pytest.mark.parametrize("mode", MODES)
def test_blur_matrix_limits(mode: str) -> None:
    np.testing.assert_array_equal(blur_matrix(7, 0.0, mode=mode), np.eye(7))
    np.testing.assert_array_equal(blur_matrix(7, math.inf, mode=mode), np.full((7, 7), 1 / 7))


def test_blur_matrix_backend_dtype_device(backend) -> None:
    dtype = backend.xp.float32
    m = blur_matrix(5, 1.5, xp=backend.xp, dtype=dtype)
    assert m.dtype == dtype
    assert_close(backend.to_numpy(m), blur_matrix(5, 1.5), ops=1, eps=EPS32)  # one rounding


@FIXTURE_OK
@given(
    h=st.integers(1, 40),
    w=st.integers(1, 40),
    frames=st.integers(1, 4),
    prefix=st.integers(0, 3),
    suffix=st.integers(0, 3),
    lead=st.sampled_from([(), (2,), (1, 3)]),
    sigma=st.one_of(sigmas, st.tuples(sigmas, sigmas), st.tuples(sigmas, sigmas, sigmas)),
    mode=st.sampled_from(MODES),
    radius=st.one_of(st.none(), st.integers(0, 50)),
    use64=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_smooth_queries_equals_scipy_per_axis(
    backend, h, w, frames, prefix, suffix, lead, sigma, mode, radius, use64, seed
) -> None:
    dtype = "float64" if use64 and backend.has_float64 else "float32"
    grid = TokenGrid(h, w, frames=frames, prefix=prefix, suffix=suffix)
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(*lead, grid.num_tokens, 3)).astype(dtype)
    out = smooth_queries(backend.asarray(q), grid, sigma, radius=radius, mode=mode)
    assert out.dtype == backend.asarray(q).dtype
    assert tuple(out.shape) == q.shape
    out = backend.to_numpy(out)

    st_, sh, sw = (
        (0.0, sigma, sigma)
        if not isinstance(sigma, tuple)
        else ((0.0, *sigma) if len(sigma) == 2 else sigma)
    )
    x = q[..., prefix : prefix + grid.spatial_tokens, :].astype(np.float64)
    x = x.reshape(*lead, frames, h, w, 3)
    nd = x.ndim
    for axis, s in ((nd - 4, st_), (nd - 3, sh), (nd - 2, sw)):
        x = scipy_blur(x, axis, s, mode, radius)
    # Each output sums up to max(h, w, frames) terms per axis, three axes, of magnitude max|q|.
    assert_close(
        out[..., prefix : prefix + grid.spatial_tokens, :],
        x.reshape(*lead, -1, 3),
        ops=64 + 3 * max(h, w, frames),
        eps=eps_of(np.zeros(1, dtype)),
        magnitude=q,
    )
    np.testing.assert_array_equal(out[..., :prefix, :], q[..., :prefix, :])
    np.testing.assert_array_equal(
        out[..., prefix + grid.spatial_tokens :, :], q[..., prefix + grid.spatial_tokens :, :]
    )


def test_official_case_mirror_default_radius() -> None:
    # The official SEG-SDXL blur is torch's F.pad(mode="reflect") = SciPy "mirror",
    # with kernel size ceil(6σ)+1 made odd; without its clamp to the grid size.
    rng = np.random.default_rng(3)
    grid = TokenGrid(12, 20)
    q = rng.normal(size=(2, grid.num_tokens, 4))
    for sigma in (1.0, 2.0, 3.0):
        ref = q.reshape(2, 12, 20, 4)
        for axis in (1, 2):
            ref = gaussian_filter1d(
                ref, sigma, axis=axis, mode="mirror", radius=default_radius(sigma)
            )
        out = smooth_queries(q, grid, sigma, mode="mirror")
        np.testing.assert_allclose(out, ref.reshape(q.shape), atol=1e-12)


def test_zero_and_tiny_sigma(backend) -> None:
    q = backend.asarray(np.random.default_rng(0).normal(size=(3, 20, 4)), "float32")
    grid = TokenGrid(4, 5)
    np.testing.assert_array_equal(
        backend.to_numpy(smooth_queries(q, grid, 0.0)), backend.to_numpy(q)
    )
    np.testing.assert_array_equal(
        backend.to_numpy(smooth_queries(q, grid, (0.0, 0.0))), backend.to_numpy(q)
    )
    # sigma = 1e-3: the side taps are exp(-5e5) = 0, the result is q up to rounding.
    assert_close(smooth_queries(q, grid, 1e-3), backend.to_numpy(q), ops=4, eps=EPS32)


def test_infinite_sigma_is_mean_per_frame_and_axis(backend) -> None:
    rng = np.random.default_rng(1)
    grid = TokenGrid(3, 4, frames=2, prefix=1)
    q = rng.normal(size=(2, grid.num_tokens, 5)).astype("float32")
    x = q[:, 1:].reshape(2, 2, 3, 4, 5)
    out = backend.to_numpy(smooth_queries(backend.asarray(q), grid, math.inf))[:, 1:]
    ref = np.broadcast_to(x.mean(axis=(2, 3), keepdims=True), x.shape)  # per frame
    assert_close(out.reshape(x.shape), ref, eps=EPS32, magnitude=x)
    out_w = backend.to_numpy(smooth_queries(backend.asarray(q), grid, (0.0, math.inf)))[:, 1:]
    assert_close(
        out_w.reshape(x.shape),
        np.broadcast_to(x.mean(axis=3, keepdims=True), x.shape),
        eps=EPS32,
        magnitude=x,
    )
    out_t = backend.to_numpy(smooth_queries(backend.asarray(q), grid, (math.inf, 0.0, 0.0)))[:, 1:]
    assert_close(
        out_t.reshape(x.shape),
        np.broadcast_to(x.mean(axis=1, keepdims=True), x.shape),
        eps=EPS32,
        magnitude=x,
    )


def test_low_precision_accumulates_in_float32() -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    grid = TokenGrid(16, 24)
    q64 = rng.normal(size=(2, grid.num_tokens, 8))
    for dt, eps in ((torch.float16, 2**-10), (torch.bfloat16, 2**-7)):
        q = torch.from_numpy(q64).to(dt)
        for sigma in (2.0, math.inf):
            out = smooth_queries(q, grid, sigma)
            assert out.dtype == dt
            ref = smooth_queries(q.double().numpy(), grid, sigma)
            # float32 accumulation: only the final rounding to 16 bits remains.
            assert np.abs(out.double().numpy() - ref).max() <= eps * np.abs(ref).max()
            assert torch.isfinite(out).all()


def test_jax_jit() -> None:
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    grid = TokenGrid(6, 10, prefix=2)
    q = np.random.default_rng(4).normal(size=(2, grid.num_tokens, 3)).astype("float32")
    f = jax.jit(lambda x: smooth_queries(x, grid, (1.5, 3.0), mode="wrap"))
    assert_close(
        np.asarray(f(jnp.asarray(q))),
        smooth_queries(q, grid, (1.5, 3.0), mode="wrap"),
        eps=EPS32,
        magnitude=q,
    )


def test_never_builds_a_tokens_by_tokens_matrix() -> None:
    # 128x128 grid: a tokens x tokens float32 matrix would take 1 GiB.
    grid = TokenGrid(128, 128)
    q = np.random.default_rng(5).normal(size=(grid.num_tokens, 8)).astype("float32")
    tracemalloc.start()
    smooth_queries(q, grid, 3.0)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 6 * q.nbytes + 2 * 4 * 128 * 128 + 2**20


@pytest.mark.parametrize(
    ("sigma", "kwargs", "exc", "match"),
    [
        (-1.0, {}, ValueError, "sigma"),
        (math.nan, {}, ValueError, "sigma"),
        ((1.0, 2.0, 3.0, 4.0), {}, ValueError, "sigma"),
        ((1.0, -2.0), {}, ValueError, r"sigma\[1\]"),
        ("2", {}, TypeError, "sigma"),
        (1.0, {"mode": "constant"}, ValueError, "mode"),
        (1.0, {"radius": -1}, ValueError, "radius"),
        (1.0, {"radius": 1.5}, ValueError, "radius"),
    ],
)
def test_bad_arguments(sigma, kwargs, exc, match) -> None:
    q = np.zeros((6, 2))
    with pytest.raises(exc, match=match):
        smooth_queries(q, TokenGrid(2, 3), sigma, **kwargs)


def test_bad_queries() -> None:
    grid = TokenGrid(2, 3)
    with pytest.raises(ValueError, match="tokens == grid.num_tokens=6"):
        smooth_queries(np.zeros((7, 2)), grid, 1.0)
    with pytest.raises(TypeError, match="q must have a real floating dtype"):
        smooth_queries(np.zeros((6, 2), dtype=np.int64), grid, 1.0)
    with pytest.raises(TypeError, match="q must have a real floating dtype"):
        smooth_queries(np.zeros((6, 2), dtype=np.complex64), grid, 1.0)
    with pytest.raises(TypeError, match="grid must be a TokenGrid"):
        smooth_queries(np.zeros((6, 2)), (2, 3), 1.0)
    with pytest.raises(TypeError, match="array-API backend"):
        smooth_queries([[0.0]], grid, 1.0)
    with pytest.raises(ValueError, match="n must be"):
        blur_matrix(0, 1.0)
    with pytest.raises(ValueError, match="finite"):
        default_radius(math.inf)
