"""Reliability of the core: bad input, edge sizes, numerics, speed limits, threads.

Every input either gives a correct result (checked against SciPy / float64 NumPy
references) or a ``ValueError``/``TypeError`` whose message names the argument;
finite input never gives NaN/inf; nothing hangs.
"""

from __future__ import annotations

import math
import threading
import warnings

import array_api_strict as xps
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.ndimage import gaussian_filter1d
from scipy.special import logsumexp as sp_logsumexp

import smoothguide.torch as sgt
from reliability_table import deadline, failure_mode
from smoothguide import (
    QuerySmoothing,
    TokenGrid,
    attention,
    attention_energy,
    attention_logits,
    blur_matrix,
    diagonal_curvature_logdet,
    smooth_queries,
)
from smoothguide.rules import SEG
from smoothguide.smoothing import MODES
from tolerance import EPS32, assert_close

FUZZ = settings(max_examples=40, deadline=5000)
INF = math.inf


def official_radius(sigma: float) -> int:
    """The official SEG code's kernel size ``ceil(6σ) + 1``, made odd, halved (independent copy)."""
    c = math.ceil(6 * sigma)
    return (c + 1 - c % 2) // 2


def reference_smooth(
    q: np.ndarray, grid: TokenGrid, sigma: object, mode: str, radius: int | None
) -> np.ndarray:
    """float64 reference: SciPy's gaussian_filter1d per grid axis, mean for inf."""
    s = (0.0, sigma, sigma) if not isinstance(sigma, tuple) else ((0.0, *sigma)[-3:])
    x = np.array(q, dtype=np.float64)
    lead, dim = x.shape[:-2], x.shape[-1]
    sp = x[..., grid.spatial_slice, :].reshape(*lead, *grid.shape, dim)
    for axis, sa in zip((-4, -3, -2), s, strict=True):
        if sa == 0.0 or sp.shape[axis] == 1 or sp.size == 0:
            continue
        if math.isinf(sa):
            sp = np.broadcast_to(sp.mean(axis=axis, keepdims=True), sp.shape)
        else:
            r = official_radius(sa) if radius is None else radius
            sp = gaussian_filter1d(sp, sa, axis=axis, mode=mode, radius=r)
    out = x.copy()
    out[..., grid.spatial_slice, :] = sp.reshape(*lead, grid.spatial_tokens, dim)
    return out


def smoothing_entry_points() -> list[object]:
    return [
        pytest.param(lambda s: smooth_queries(np.ones((6, 2)), TokenGrid(2, 3), s), id="core"),
        pytest.param(
            lambda s: sgt.smooth_queries(torch.ones(6, 2), TokenGrid(2, 3), s), id="torch"
        ),
        pytest.param(lambda s: QuerySmoothing(s), id="QuerySmoothing"),
        pytest.param(lambda s: SEG(3.0, sigma=s), id="SEG"),
    ]


# -- bad arguments ---------------------------------------------------------------------------


@failure_mode(
    "TokenGrid with height/width/frames 0, negative prefix, float or bool sizes",
    "ValueError/TypeError naming the field and the accepted range",
)
@pytest.mark.parametrize(
    ("kwargs", "exc", "message"),
    [
        ({"height": 0, "width": 5}, ValueError, "height must be an int >= 1, got 0"),
        ({"height": 5, "width": 0}, ValueError, "width must be an int >= 1, got 0"),
        ({"height": 2, "width": 2, "frames": 0}, ValueError, "frames must be an int >= 1, got 0"),
        ({"height": 2, "width": 2, "prefix": -1}, ValueError, "prefix must be an int >= 0"),
        ({"height": 2.0, "width": 2}, TypeError, "height must be an int, got float"),
        ({"height": True, "width": 2}, TypeError, "height must be an int, got bool"),
    ],
)
def test_token_grid_rejects_zero_and_non_int_sizes(
    kwargs: dict[str, object], exc: type[Exception], message: str
) -> None:
    with pytest.raises(exc, match=message):
        TokenGrid(**kwargs)  # type: ignore[arg-type]


@failure_mode(
    "sigma negative, NaN, -inf, a tuple of length 1 or 4, a string, a bool, an array, None",
    "ValueError/TypeError naming sigma (sigma[i] for tuple entries) with the accepted values, "
    "from smooth_queries (core and torch), QuerySmoothing and SEG alike",
)
@pytest.mark.parametrize("make", smoothing_entry_points())
@pytest.mark.parametrize(
    ("sigma", "exc"),
    [
        (-1.0, ValueError),
        (math.nan, ValueError),
        (-INF, ValueError),
        ((1.0,), ValueError),
        ((1.0, 2.0, 3.0, 4.0), ValueError),
        ((1.0, math.nan), ValueError),
        ("2", TypeError),
        (True, TypeError),
        (np.array([1.0, 2.0]), TypeError),
        (None, TypeError),
    ],
    ids=repr,
)
def test_bad_sigma_is_a_named_error(make: object, sigma: object, exc: type[Exception]) -> None:
    with pytest.raises(exc, match=r"sigma") as info:
        make(sigma)  # type: ignore[operator]
    text = str(info.value)
    assert "inf" in text or "tuple" in text or "(sigma_h, sigma_w)" in text  # accepted values


@failure_mode(
    "finite sigma too large for any kernel (1e300) given to smooth_queries or blur_matrix",
    "ValueError naming sigma that points to sigma=math.inf (the exact mean)",
)
@pytest.mark.parametrize(
    "call",
    [
        lambda: smooth_queries(np.ones((6, 2)), TokenGrid(2, 3), 1e300),
        lambda: sgt.smooth_queries(torch.ones(6, 2), TokenGrid(2, 3), 1e300),
        lambda: blur_matrix(3, 1e300),
    ],
)
def test_sigma_beyond_any_kernel_points_to_inf(call: object) -> None:
    with pytest.raises(ValueError, match=r"sigma=1e\+300 .*use sigma=math.inf"):
        call()  # type: ignore[operator]


@failure_mode(
    "q of integer or complex dtype, a Python list, 1-D q, tokens != grid.num_tokens, a grid "
    "given as a tuple, a bad radius or boundary mode",
    "TypeError/ValueError naming q (with the accepted dtypes or the expected token count), "
    "grid, radius or mode",
)
@pytest.mark.parametrize("impl", ["core", "torch"])
@pytest.mark.parametrize(
    ("q", "kwargs", "exc", "message"),
    [
        (np.ones((6, 2), np.int32), {}, TypeError, r"q must have a real floating dtype.*int32"),
        (np.ones((6, 2), np.complex64), {}, TypeError, r"q must have a real floating.*complex"),
        (np.ones((7, 2)), {}, ValueError, r"tokens == grid.num_tokens=6.*\(7, 2\)"),
        (np.ones(6), {}, ValueError, r"q must have shape \(\.\.\., tokens, dim\)"),
        (np.ones((6, 2)), {"grid": (2, 3)}, TypeError, "grid must be a TokenGrid"),
        (np.ones((6, 2)), {"radius": -1}, ValueError, "radius must be None or an int >= 0"),
        (np.ones((6, 2)), {"radius": 2.5}, ValueError, "radius must be None or an int >= 0"),
        (np.ones((6, 2)), {"mode": "constant"}, ValueError, r"mode must be one of \('reflect'"),
    ],
)
def test_bad_queries_grid_radius_mode_are_named(
    impl: str, q: np.ndarray, kwargs: dict[str, object], exc: type[Exception], message: str
) -> None:
    kw = dict(kwargs)
    grid = kw.pop("grid", TokenGrid(2, 3))
    if impl == "core":
        fn, arr = smooth_queries, q
    else:
        fn, arr = sgt.smooth_queries, torch.from_numpy(q)
    with pytest.raises(exc, match=message):
        fn(arr, grid, 1.0, **kw)  # type: ignore[arg-type]


def test_plain_lists_are_refused_with_the_backends_named() -> None:
    with pytest.raises(TypeError, match="array-API backend"):
        smooth_queries([[1.0, 2.0]] * 6, TokenGrid(2, 3), 1.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        sgt.smooth_queries(np.ones((6, 2)), TokenGrid(2, 3), 1.0)


@failure_mode(
    "blur_matrix asked for an integer or complex dtype",
    "TypeError naming dtype (a real floating dtype is needed)",
)
@pytest.mark.parametrize("dtype", [np.int64, np.complex128])
def test_blur_matrix_rejects_non_real_floating_dtype(dtype: type) -> None:
    with pytest.raises(TypeError, match="dtype"):
        blur_matrix(4, 1.0, dtype=dtype)


# -- fuzzing: any grid, sigma, mode, radius, batch (also empty), width (also 0) ---------------

grids = st.builds(
    TokenGrid,
    height=st.integers(1, 5),
    width=st.integers(1, 5),
    frames=st.integers(1, 3),
    prefix=st.integers(0, 2),
    suffix=st.integers(0, 2),
)
axis_sigma = st.one_of(
    st.sampled_from([0.0, INF, 0.5, 1.0]), st.floats(1e-3, 40.0, allow_subnormal=False)
)
any_sigma = st.one_of(axis_sigma, st.tuples(axis_sigma, axis_sigma), st.tuples(*[axis_sigma] * 3))


@pytest.mark.numerics
@failure_mode(
    "hypothesis: random grids (1xN, Nx1, video, prefix/suffix text tokens), sigma "
    "(0, tiny, huge kernel radius >= grid, inf, per-axis tuples), every mode, radius, empty "
    "batches and zero-width queries, float32/float64; NumPy, array-api-strict, torch (core path "
    "and the torch fast path's matmul and shift kernels)",
    "result equals SciPy's gaussian_filter1d per axis (mean for inf) within 2e-5 (float32) "
    "/ 1e-11 (float64), same shape and dtype, always finite, non-grid tokens untouched",
)
@FUZZ
@given(
    grid=grids,
    sigma=any_sigma,
    mode=st.sampled_from(MODES),
    radius=st.one_of(st.none(), st.integers(0, 12)),
    batch=st.integers(0, 2),
    dim=st.integers(0, 3),
    dtype=st.sampled_from(["float32", "float64"]),
    impl=st.sampled_from(["numpy", "array_api_strict", "torch", "torch-matmul", "torch-shift"]),
    seed=st.integers(0, 2**16),
)
def test_fuzz_smooth_queries_matches_scipy_or_is_finite_and_exact(
    grid: TokenGrid,
    sigma: object,
    mode: str,
    radius: int | None,
    batch: int,
    dim: int,
    dtype: str,
    impl: str,
    seed: int,
) -> None:
    q = np.random.default_rng(seed).normal(size=(batch, grid.num_tokens, dim)).astype(dtype)
    ref = reference_smooth(q, grid, sigma, mode, radius)
    kw = {"radius": radius, "mode": mode}
    if impl == "numpy":
        out = smooth_queries(q, grid, sigma, **kw)  # type: ignore[arg-type]
    elif impl == "array_api_strict":
        out = np.asarray(smooth_queries(xps.asarray(q), grid, sigma, **kw))  # type: ignore[arg-type]
    elif impl == "torch":
        out = smooth_queries(torch.from_numpy(q), grid, sigma, **kw).numpy()  # type: ignore[arg-type]
    else:
        method = impl.removeprefix("torch-")
        t = sgt.smooth_queries(torch.from_numpy(q), grid, sigma, method=method, **kw)  # type: ignore[arg-type]
        out = t.numpy()
    assert out.shape == q.shape
    assert out.dtype == q.dtype
    assert np.isfinite(out).all()
    # Rounding of up to 2r + 1 (or n, for sigma = inf) terms of magnitude max|q|.
    assert_close(out, ref, ops=64 + 2 * max(grid.shape), magnitude=q)
    text = np.r_[0 : grid.prefix, grid.prefix + grid.spatial_tokens : grid.num_tokens]
    np.testing.assert_array_equal(out[:, text], q[:, text])


@failure_mode(
    "1xN and Nx1 grids (one row / one column of tokens)",
    "the length-1 axis is left alone, the other blurred exactly as SciPy's 1-D filter",
)
@pytest.mark.parametrize("shape", [(1, 7), (7, 1)])
@pytest.mark.parametrize("mode", MODES)
def test_one_row_and_one_column_grids(shape: tuple[int, int], mode: str) -> None:
    q = np.random.default_rng(0).normal(size=(7, 3))
    out = smooth_queries(q, TokenGrid(*shape), 1.5, mode=mode)  # type: ignore[arg-type]
    ref = gaussian_filter1d(q, 1.5, axis=0, mode=mode, radius=official_radius(1.5))
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-12)


@failure_mode(
    "non-contiguous torch queries: transposed, expanded (stride 0), sliced with a step",
    "same values as the contiguous copy (float64 reference within 1e-12), core and torch "
    "fast path, both kernels (matmul, shift)",
)
@pytest.mark.parametrize("layout", ["transpose", "expand", "step"])
@pytest.mark.parametrize("impl", ["core", "matmul", "shift"])
def test_non_contiguous_torch_queries(layout: str, impl: str) -> None:
    g = TokenGrid(3, 8, prefix=1)
    base = torch.randn(
        3, g.num_tokens, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    if layout == "transpose":
        q = base.transpose(0, 2).contiguous().transpose(0, 2)
    elif layout == "expand":
        q = base[:1].expand(3, -1, -1)
    else:
        q = torch.randn(3, 2 * g.num_tokens, 4, dtype=torch.float64)[:, ::2]
    assert not q.is_contiguous()
    if impl == "core":
        out = smooth_queries(q, g, (1.0, 1.5))
    else:
        out = sgt.smooth_queries(q, g, (1.0, 1.5), method=impl)  # type: ignore[arg-type]
    ref = reference_smooth(q.contiguous().numpy(), g, (1.0, 1.5), "reflect", None)
    np.testing.assert_allclose(out.numpy(), ref, rtol=0, atol=1e-12)


# -- numerics: half precision, large values, sigma = inf ------------------------------------


@failure_mode(
    "float16 / bfloat16 queries through smoothing (core on torch, torch fast path)",
    "accumulated in float32, returned in the input dtype: within one rounding of the float64 "
    "result (|err| <= eps(dtype) * max|q|)",
)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("impl", ["core", "torch"])
@pytest.mark.parametrize("sigma", [0.7, 3.0, INF, (INF, 2.0)])
def test_half_precision_smoothing_vs_float64(dtype: torch.dtype, impl: str, sigma: object) -> None:
    g = TokenGrid(6, 10, suffix=2)
    q = (torch.randn(2, g.num_tokens, 8, generator=torch.Generator().manual_seed(1)) * 4).to(dtype)
    fn = smooth_queries if impl == "core" else sgt.smooth_queries
    out = fn(q, g, sigma)  # type: ignore[operator]
    assert out.dtype == dtype
    ref = reference_smooth(q.double().numpy(), g, sigma, "reflect", None)
    err = (out.double().numpy() - ref).__abs__().max()
    assert err <= torch.finfo(dtype).eps * float(q.abs().max())


@failure_mode(
    "sigma = inf on float16 queries near the float16 maximum (6e4, sums overflow float16)",
    "the mean is taken in float32: finite and equal to the float64 mean rounded to float16",
)
@pytest.mark.parametrize("impl", ["core", "torch"])
def test_sigma_inf_on_float16_near_the_maximum(impl: str) -> None:
    g = TokenGrid(4, 4)
    signs = torch.tensor([1.0, 1.0, 1.0, -1.0] * 4)[:, None]
    q = (6e4 * signs).expand(16, 2).to(torch.float16)[None]
    fn = smooth_queries if impl == "core" else sgt.smooth_queries
    out = fn(q, g, INF)  # type: ignore[operator]
    assert torch.isfinite(out).all()
    expected = torch.full_like(q, 3e4)  # (12 - 4) * 6e4 / 16, exact in float16
    assert torch.equal(out, expected)


def reference_energy(q: np.ndarray, k: np.ndarray, scale: float, axis: str) -> np.ndarray:
    a = scale * np.einsum("...qd,...kd->...qk", q.astype(np.float64), k.astype(np.float64))
    return -sp_logsumexp(a, axis=-2 if axis == "queries" else -1)


@failure_mode(
    "attention logits of +-1e4 (a naive exp overflows) in the energy and in attention",
    "stable log-sum-exp / softmax: energy equals SciPy's float64 logsumexp to 1e-12 "
    "relative, attention rows are convex combinations of V; no warning, no inf",
)
@pytest.mark.parametrize("axis", ["queries", "keys"])
def test_large_logits_energy_and_attention_are_stable(axis: str) -> None:
    q = np.array([[100.0, 0.0], [-100.0, 0.0], [0.0, 100.0]])
    k = np.array([[100.0, 0.0], [0.0, -100.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        e = attention_energy(q, k, scale=1.0, axis=axis)  # type: ignore[arg-type]
        out = attention(q, k, np.array([[1.0, 0.0], [0.0, 1.0]]), scale=1.0)
    ref = reference_energy(q, k, 1.0, axis)
    assert np.abs(ref).max() == pytest.approx(1e4)
    np.testing.assert_allclose(e, ref, rtol=1e-12)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out.sum(-1), 1.0, rtol=1e-12)


@pytest.mark.numerics
@failure_mode(
    "float16 / bfloat16 queries and keys in the attention energy",
    "logits and log-sum-exp in float32, result in the input dtype: within 2 eps(dtype) "
    "relative of the float64 energy of the same (rounded) inputs",
)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("axis", ["queries", "keys"])
def test_half_precision_energy_vs_float64(dtype: torch.dtype, axis: str) -> None:
    gen = torch.Generator().manual_seed(2)
    q = (torch.randn(2, 24, 16, generator=gen) * 3).to(dtype)
    k = (torch.randn(2, 24, 16, generator=gen) * 3).to(dtype)
    e = attention_energy(q, k, axis=axis)  # type: ignore[arg-type]
    assert e.dtype == dtype
    ref = reference_energy(q.double().numpy(), k.double().numpy(), 0.25, axis)
    rel = np.abs(e.double().numpy() - ref) / np.abs(ref)
    assert rel.max() <= 2 * torch.finfo(dtype).eps


@pytest.mark.numerics
@failure_mode(
    "hypothesis: attention energy for random q, k (values up to 1e3, logits up to ~1e7), any "
    "scale, empty batch",
    "finite, equal to SciPy's float64 logsumexp within 1e-9 relative (float64) / 1e-5 (float32)",
)
@FUZZ
@given(
    nq=st.integers(1, 6),
    nk=st.integers(1, 6),
    d=st.integers(1, 4),
    batch=st.integers(0, 2),
    magnitude=st.sampled_from([1e-3, 1.0, 30.0, 1e3]),
    scale=st.one_of(st.none(), st.floats(-10.0, 10.0)),
    axis=st.sampled_from(["queries", "keys"]),
    dtype=st.sampled_from(["float32", "float64"]),
    seed=st.integers(0, 2**16),
)
def test_fuzz_attention_energy_is_finite_and_matches_scipy(
    nq: int,
    nk: int,
    d: int,
    batch: int,
    magnitude: float,
    scale: float | None,
    axis: str,
    dtype: str,
    seed: int,
) -> None:
    rng = np.random.default_rng(seed)
    q = (rng.normal(size=(batch, nq, d)) * magnitude).astype(dtype)
    k = (rng.normal(size=(batch, nk, d)) * magnitude).astype(dtype)
    e = attention_energy(q, k, scale=scale, axis=axis)  # type: ignore[arg-type]
    assert e.dtype == q.dtype
    assert np.isfinite(e).all()
    ref = reference_energy(q, k, 1 / math.sqrt(d) if scale is None else scale, axis)
    rtol = 1e-5 if dtype == "float32" else 1e-9
    # Relative to the largest logit: float32 rounds the logits themselves.
    logits = np.abs(attention_logits(q.astype(np.float64), k.astype(np.float64), scale=scale))
    bound = rtol * (1.0 + (logits.max() if logits.size else 0.0))
    np.testing.assert_allclose(e, ref, rtol=0, atol=bound)


@failure_mode(
    "the paper's curvature proxy for finite logits with a large spread ([0, -1e4])",
    "finite value (log-softmax), no RuntimeWarning",
)
def test_curvature_logdet_is_finite_for_large_logits() -> None:
    a = np.array([0.0, -1e4])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        value = diagonal_curvature_logdet(a)
    expected = float(np.sum(a - sp_logsumexp(a)))
    assert value == pytest.approx(expected, rel=1e-12)


@failure_mode(
    "attention / energy with zero keys or zero queries on the reduced axis",
    "ValueError naming q or k (at least one query/key), the same on every backend",
)
@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize(
    "call",
    [
        lambda xp: attention_energy(xp.ones((3, 2)), xp.ones((0, 2)), axis="keys"),
        lambda xp: attention_energy(xp.ones((0, 2)), xp.ones((3, 2)), axis="queries"),
        lambda xp: attention(xp.ones((3, 2)), xp.ones((0, 2)), xp.ones((0, 2))),
    ],
)
def test_energy_with_an_empty_reduction_axis_is_a_named_error(backend: str, call: object) -> None:
    xp = np if backend == "numpy" else torch
    with pytest.raises(ValueError, match=r"\b(q|k)\b"):
        call(xp)  # type: ignore[operator]


@failure_mode(
    "q and k of different dtypes (float16 with float64, float16 with float32)",
    "TypeError naming q and k with the dtypes the caller passed",
)
@pytest.mark.parametrize("k_dtype", [np.float32, np.float64])
def test_mixed_dtypes_are_named_with_the_callers_dtypes(k_dtype: type) -> None:
    q, k = np.ones((3, 2), np.float16), np.ones((3, 2), k_dtype)
    with pytest.raises(TypeError, match=rf"float16 and {np.dtype(k_dtype).name}"):
        attention_energy(q, k)


def test_attention_logits_names_mixed_dtypes() -> None:
    with pytest.raises(TypeError, match="q and k must share a dtype, got float16 and float64"):
        attention_logits(np.ones((3, 2), np.float16), np.ones((3, 2)))
    with pytest.raises(ValueError, match="scale must be None or a finite real number"):
        attention_logits(np.ones((3, 2)), np.ones((3, 2)), scale=math.nan)


# -- no hangs --------------------------------------------------------------------------------


@failure_mode(
    "a finite but enormous sigma (3e6 tokens) on a 2x3 grid",
    "a result within 0.5 s (cost bounded by the grid, not the kernel radius), or a ValueError "
    "naming sigma that points to sigma=math.inf",
)
def test_huge_finite_sigma_is_fast_or_refused() -> None:
    q = np.random.default_rng(0).normal(size=(6, 2))
    refused = ""
    with deadline(0.5):
        try:
            out = smooth_queries(q, TokenGrid(2, 3), 3e6)
        except ValueError as exc:
            refused = str(exc)
    if refused:
        assert "sigma" in refused
        assert "math.inf" in refused
    else:
        assert_close(out, smooth_queries(q, TokenGrid(2, 3), INF), eps=EPS32, magnitude=q)


@failure_mode(
    "TokenGrid.infer with a huge aspect (10**8 x 7)",
    "an answer or a ValueError within 1 s (no loop over every downsampling factor)",
)
def test_infer_is_fast_for_huge_aspects() -> None:
    with deadline(1.0):
        try:
            g = TokenGrid.infer(7, aspect=(10**8, 7))
        except ValueError:
            return
    assert g.num_tokens == 7


@failure_mode(
    "hypothesis: TokenGrid.infer over token counts, aspects (also 1xN, Nx1), frames, prefix/suffix",
    "a grid with exactly num_tokens tokens and a fitting shape, or ValueError; never a square "
    "guessed against the aspect",
)
@FUZZ
@given(
    h=st.integers(1, 40),
    w=st.integers(1, 40),
    s=st.integers(1, 8),
    frames=st.integers(1, 3),
    prefix=st.integers(0, 3),
    suffix=st.integers(0, 3),
    extra=st.integers(-2, 2),
)
def test_fuzz_infer_returns_a_fitting_grid_or_value_error(
    h: int, w: int, s: int, frames: int, prefix: int, suffix: int, extra: int
) -> None:
    gh, gw = -(-h // s), -(-w // s)  # what a stride-s UNet level with ceil rounding sees
    n = frames * gh * gw + prefix + suffix + extra
    refused = ""
    with deadline(2.0):
        try:
            g = TokenGrid.infer(n, aspect=(h, w), frames=frames, prefix=prefix, suffix=suffix)
        except ValueError as exc:
            refused = str(exc)
    if refused:
        assert extra != 0 or "several grids" in refused  # the true grid fits, so only ambiguity
        return
    assert g.num_tokens == n
    assert (g.frames, g.prefix, g.suffix) == (frames, prefix, suffix)
    exact = g.height * w == g.width * h
    rounded = any(
        g.height in (h // t, -(-h // t)) and g.width in (w // t, -(-w // t))
        for t in range(1, max(h, w) + 1)
    )
    assert exact or rounded
    if extra == 0:
        assert g.height * g.width == gh * gw


# -- threads ---------------------------------------------------------------------------------


@failure_mode(
    "smooth_queries from 4 threads at once with different sigmas, modes and backends "
    "(shared blur-matrix caches)",
    "each result bit-identical to the same call run alone",
)
def test_concurrent_smoothing_equals_sequential() -> None:
    g = TokenGrid(9, 7, prefix=1)
    q = np.random.default_rng(3).normal(size=(2, g.num_tokens, 4))
    jobs = [
        (smooth_queries, q, s, m) for s, m in [(0.8, "reflect"), (2.5, "mirror"), (40.0, "wrap")]
    ] + [(sgt.smooth_queries, torch.from_numpy(q), 1.7, "nearest")]
    expected = [np.asarray(fn(x, g, s, mode=m)) for fn, x, s, m in jobs]  # type: ignore[operator]
    results: dict[int, list[np.ndarray]] = {i: [] for i in range(len(jobs))}
    barrier = threading.Barrier(len(jobs))

    def work(i: int) -> None:
        fn, x, s, m = jobs[i]
        barrier.wait()
        for _ in range(20):
            results[i].append(np.asarray(fn(x, g, s, mode=m)))  # type: ignore[operator]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for i, exp in enumerate(expected):
        assert len(results[i]) == 20
        assert all(np.array_equal(r, exp) for r in results[i])


# -- the command line ------------------------------------------------------------------------


@failure_mode(
    "`smoothguide energy` with --height 0, --width -3, --dim 0, --sigmas -1 / nan / 1e300",
    "a usage error naming the option (exit status 2), not a Python traceback",
)
@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["--height", "0"], "--height"),
        (["--width", "-3"], "--width"),
        (["--dim", "0"], "--dim"),
        (["--sigmas", "-1"], "--sigmas"),
        (["--sigmas", "nan"], "--sigmas"),
        (["--sigmas", "1e300"], "--sigmas"),
    ],
)
def test_cli_bad_options_are_usage_errors(
    args: list[str], option: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from smoothguide.cli import main

    with pytest.raises(SystemExit) as info:
        main(["energy", *args])
    assert info.value.code == 2
    assert f"argument {option}" in capsys.readouterr().err
