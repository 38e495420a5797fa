"""Attention logits, attention and energy against NumPy/SciPy and finite differences."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.special import logsumexp as sp_lse
from scipy.special import softmax as sp_softmax

from smoothguide import (
    TokenGrid,
    attention,
    attention_energy,
    attention_logits,
    blur_matrix,
    diagonal_curvature_logdet,
    lse_energy,
    lse_energy_grad,
    lse_energy_hessian,
    smooth_queries,
    smoothed_energy_hessian,
)
from tolerance import EPS32, assert_close, eps_of

pytestmark = pytest.mark.numerics  # run under several CPU kernels: nox -s tests-kernels

FIXTURE_OK = settings(
    deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=15
)


@FIXTURE_OK
@given(nq=st.integers(1, 12), nk=st.integers(1, 12), d=st.integers(1, 6), seed=st.integers(0, 999))
def test_logits_attention_energy_match_numpy(backend, nq, nk, d, seed) -> None:
    rng = np.random.default_rng(seed)
    q, k, v = (rng.normal(size=(2, n, d)).astype("float32") for n in (nq, nk, nk))
    a = np.einsum("bqd,bkd->bqk", q.astype(float), k.astype(float)) / math.sqrt(d)
    xq, xk, xv = (backend.asarray(t) for t in (q, k, v))
    # float32 rounding of d-term dot products, relative to the largest logit (|q||k|).
    mag = {"eps": EPS32, "magnitude": np.abs(a).max() + np.log(12) + 1.0}
    assert_close(backend.to_numpy(attention_logits(xq, xk)), a, **mag)
    assert_close(
        backend.to_numpy(attention(xq, xk, xv)),
        sp_softmax(a, axis=-1) @ v,
        eps=EPS32,
        magnitude=np.abs(v).max() * (1.0 + np.abs(a).max()),
    )
    assert_close(
        backend.to_numpy(attention_energy(xq, xk)), -sp_lse(a, axis=1), **mag
    )  # per key: lse over query positions
    assert_close(backend.to_numpy(attention_energy(xq, xk, axis="keys")), -sp_lse(a, axis=2), **mag)
    assert_close(
        backend.to_numpy(attention_logits(xq, xk, scale=0.5)), a * math.sqrt(d) * 0.5, **mag
    )


def test_energy_is_stable_for_huge_logits() -> None:
    q = np.array([[1e4], [-1e4], [1e4]])
    k = np.array([[1.0], [-1.0]])
    e = attention_energy(q, k, scale=1.0)
    # key 1 sees two logits 1e4, key 2 one logit 1e4 (the rest -1e4)
    np.testing.assert_allclose(e, [-(1e4 + math.log(2)), -1e4], rtol=1e-12)
    out = attention(q, k, np.eye(2), scale=1.0)
    assert np.isfinite(out).all()


def test_low_precision_energy() -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    q, k = rng.normal(size=(64, 16)) * 30, rng.normal(size=(64, 16))
    ref = -sp_lse(q @ k.T / 4.0, axis=0)
    for dt, rel in ((torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)):
        e = attention_energy(torch.from_numpy(q).to(dt), torch.from_numpy(k).to(dt))
        assert e.dtype == dt
        # inputs rounded to 16 bits, then float32 accumulation
        q16, k16 = (torch.from_numpy(t).to(dt).double().numpy() for t in (q, k))
        np.testing.assert_allclose(e.double().numpy(), -sp_lse(q16 @ k16.T / 4, axis=0), rtol=rel)
        assert np.abs(e.double().numpy() - ref).max() <= rel * np.abs(ref).max() * 10


def _central_diff(f, a: np.ndarray, h: float = 1e-5) -> np.ndarray:
    cols = []
    for i in range(a.size):
        e = np.zeros_like(a)
        e[i] = h
        cols.append((f(a + e) - f(a - e)) / (2 * h))
    return np.stack(cols, axis=-1)


@settings(deadline=None, max_examples=30)
@given(n=st.integers(1, 10), seed=st.integers(0, 999), spread=st.floats(0.1, 5.0))
def test_gradient_and_hessian_match_finite_differences(n: int, seed: int, spread: float) -> None:
    a = np.random.default_rng(seed).normal(size=n) * spread
    np.testing.assert_allclose(lse_energy_grad(a), _central_diff(lse_energy, a), atol=1e-8)
    np.testing.assert_allclose(lse_energy_hessian(a), _central_diff(lse_energy_grad, a), atol=1e-7)
    np.testing.assert_allclose(lse_energy(a), -sp_lse(a))


@settings(deadline=None, max_examples=20)
@given(
    h=st.integers(1, 5),
    w=st.integers(1, 5),
    sigma=st.floats(0.2, 4.0),
    seed=st.integers(0, 99),
    mode=st.sampled_from(["reflect", "mirror", "nearest", "wrap"]),
)
def test_smoothed_hessian_matches_finite_differences(h, w, sigma, seed, mode) -> None:
    b = np.kron(blur_matrix(h, sigma, mode=mode), blur_matrix(w, sigma, mode=mode))
    a = np.random.default_rng(seed).normal(size=h * w) * 2

    def grad_of_smoothed(x: np.ndarray) -> np.ndarray:  # chain rule: Bᵀ ∇E'(Bx)
        return b.T @ lse_energy_grad(b @ x)

    np.testing.assert_allclose(
        smoothed_energy_hessian(a, b), _central_diff(grad_of_smoothed, a), atol=1e-7
    )
    # and the gradient itself against differences of the smoothed energy
    np.testing.assert_allclose(
        grad_of_smoothed(a), _central_diff(lambda x: lse_energy(b @ x), a), atol=1e-8
    )


def test_hessian_backends(backend) -> None:
    a = np.random.default_rng(1).normal(size=(3, 6))
    b = blur_matrix(6, 1.0)
    dtype = "float64" if backend.has_float64 else "float32"
    eps = eps_of(np.zeros(1, dtype))
    xa, xb = backend.asarray(a, dtype), backend.asarray(b, dtype)
    p = sp_softmax(a, axis=-1)
    ref = p[:, :, None] * p[:, None, :] - np.einsum("bi,ij->bij", p, np.eye(6))
    # Entries are products of probabilities (<= 1); inputs of magnitude ~3 rounded first.
    big = {"eps": eps, "magnitude": 1.0 + np.abs(a).max()}
    assert_close(backend.to_numpy(lse_energy_hessian(xa)), ref, **big)
    pb = sp_softmax(a @ b.T, axis=-1)
    refb = b.T @ (pb[:, :, None] * pb[:, None, :] - np.einsum("bi,ij->bij", pb, np.eye(6))) @ b
    assert_close(backend.to_numpy(smoothed_energy_hessian(xa, xb)), refb, **big)
    ref_logdet = np.log(pb).sum(-1) + np.log(np.diag(b)).sum()
    assert_close(backend.to_numpy(diagonal_curvature_logdet(xa, xb)), ref_logdet, eps=eps)


def test_energy_of_blurred_queries_equals_energy_of_blurred_logits() -> None:
    # Prop. 3.1 seen through the energy: E of (B Q) Kᵀ == -lse of each key's blurred map.
    rng = np.random.default_rng(7)
    grid = TokenGrid(5, 7)
    q, k = rng.normal(size=(35, 4)), rng.normal(size=(9, 4))
    b = np.kron(blur_matrix(5, 1.3), blur_matrix(7, 1.3))
    logits = q @ k.T / 2.0
    np.testing.assert_allclose(
        attention_energy(smooth_queries(q, grid, 1.3), k), -sp_lse(b @ logits, axis=0), atol=1e-12
    )


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda: attention_logits(np.zeros((2, 3)), np.zeros((2, 4))), ValueError, "same d"),
        (lambda: attention_logits(np.zeros((2, 3)), np.zeros((2, 3), "f4")), TypeError, "dtype"),
        (
            lambda: attention_logits(np.zeros((2, 3), int), np.zeros((2, 3), int)),
            TypeError,
            "q must",
        ),
        (
            lambda: attention_logits(np.zeros((2, 3)), np.zeros((2, 3)), scale=math.nan),
            ValueError,
            "scale",
        ),
        (
            lambda: attention(np.zeros((2, 3)), np.zeros((2, 3)), np.zeros((3, 3))),
            ValueError,
            "v must",
        ),
        (
            lambda: attention_energy(np.zeros((2, 3)), np.zeros((2, 3)), axis="rows"),
            ValueError,
            "axis",
        ),
    ],
)
def test_bad_input(call, exc, match) -> None:
    with pytest.raises(exc, match=match):
        call()
