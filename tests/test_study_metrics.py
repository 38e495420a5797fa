"""Study metrics against independent references (NumPy / SciPy formulas, torchmetrics)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.signal import correlate2d

from smoothguide.demo.metrics import frechet_distance
from smoothguide.study.metrics import frechet_from_sums, kid_unbiased, per_sample_metrics, ssim


def _sums(f):
    return (float(f.shape[0]), f.sum(0), f.T @ f)


def test_frechet_from_merged_sums_equals_the_direct_formula():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 6))
    b = rng.normal(loc=0.5, scale=1.3, size=(200, 6))
    parts = [a[:70], a[70:150], a[150:]]  # three "ranks"
    merged = tuple(sum(x) for x in zip(*(_sums(p) for p in parts), strict=True))
    got = frechet_from_sums(merged, _sums(b))
    ref = frechet_distance(a, b)  # np.cov + the same trace formula, on the raw features
    assert got == pytest.approx(ref, rel=1e-9)


def test_kid_is_the_unbiased_mmd_of_the_cubic_kernel():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(9, 4))
    y = rng.normal(loc=0.3, size=(7, 4))

    def k(a, b):
        return (a @ b / 4 + 1) ** 3

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    assert kid_unbiased(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-12)
    from torchmetrics.image.kid import poly_mmd

    y9 = rng.normal(loc=0.3, size=(9, 4))  # torchmetrics' formula assumes equal set sizes
    tm = poly_mmd(torch.tensor(x), torch.tensor(y9), degree=3, gamma=None, coef=1.0)
    assert kid_unbiased(x, y9) == pytest.approx(float(tm), rel=1e-10)


def _ssim_reference(a, b, data_range=2.0):
    """Wang et al. 2004 with an 11x11 Gaussian (σ 1.5), valid positions only, via SciPy."""
    g = np.exp(-((np.arange(11) - 5.0) ** 2) / (2 * 1.5**2))
    w = np.outer(g, g) / g.sum() ** 2

    def f(z):
        return correlate2d(z, w, mode="valid")

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    ma, mb = f(a), f(b)
    va, vb, cov = f(a * a) - ma**2, f(b * b) - mb**2, f(a * b) - ma * mb
    s = ((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2))
    return s.mean()


def test_ssim_matches_the_scipy_reference_and_is_one_on_identical_images():
    rng = np.random.default_rng(2)
    a = rng.uniform(-1, 1, size=(3, 1, 16, 16))
    b = np.clip(a + rng.normal(scale=0.3, size=a.shape), -1, 1)
    got = ssim(torch.tensor(a), torch.tensor(b)).numpy()
    ref = np.array([_ssim_reference(a[i, 0], b[i, 0]) for i in range(3)])
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ssim(torch.tensor(a), torch.tensor(a)).numpy(), 1.0, atol=1e-12)


def test_per_sample_metrics_by_hand():
    x = torch.tensor([[[[1.0, -1.0], [1.0, 1.0]]], [[[-1.0, -1.0], [-1.0, -1.0]]]])
    ref = torch.full_like(x, -1.0)
    probs = torch.tensor([[0.2, 0.8], [0.6, 0.4]], dtype=torch.float64)
    out = per_sample_metrics(x, ref, probs, [1, 1], ["rms", "ink", "confidence", "accuracy"])
    assert out["rms"] == pytest.approx([np.sqrt(3 * 4 / 4), 0.0])  # 3 of 4 pixels differ by 2
    assert out["ink"] == pytest.approx([0.75, 0.0])
    assert out["confidence"] == pytest.approx([0.8, 0.6])
    assert out["accuracy"] == [1.0, 0.0]
    rgb = torch.tensor([[[[1.0]], [[0.0]], [[-1.0]]]])  # (1, 0.5, 0) in [0, 1]: saturation 1
    assert per_sample_metrics(rgb, None, None, [None], ["saturation"])["saturation"] == [1.0]
