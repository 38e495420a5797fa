"""Demo metrics against independent references (SciPy's sqrtm, hand-derived values)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
scipy_linalg = pytest.importorskip("scipy.linalg")

from smoothguide.demo.metrics import (  # noqa: E402
    classifier_scores,
    deviation,
    frechet_distance,
    mean_intensity,
)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_frechet_distance_matches_scipy_sqrtm(seed: int) -> None:
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6)) + rng.normal(size=6)
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    cross = np.real(scipy_linalg.sqrtm(s_a @ s_b))
    ref = np.sum((mu_a - mu_b) ** 2) + np.trace(s_a + s_b - 2 * cross)
    assert frechet_distance(a, b) == pytest.approx(ref, rel=1e-7)


def test_frechet_distance_of_gaussians_closed_form() -> None:
    # 1-D: (mu_a - mu_b)^2 + (sd_a - sd_b)^2
    a = np.array([[-1.0], [1.0]])  # mean 0, unbiased variance 2
    b = np.array([[2.0], [4.0], [6.0]])  # mean 4, unbiased variance 4
    assert frechet_distance(a, b) == pytest.approx(16 + (np.sqrt(2) - 2) ** 2)
    with pytest.raises(ValueError, match="feature dims"):
        frechet_distance(np.zeros((3, 2)), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="features"):
        frechet_distance(np.zeros((1, 2)), np.zeros((3, 2)))


def test_scores_deviation_intensity_by_hand() -> None:
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.5, 0.4, 0.1]])
    out = classifier_scores(p, labels=[0, 1, 0])
    assert out["confidence"] == pytest.approx((0.7 + 0.8 + 0.5) / 3)
    assert out["accuracy"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="labels"):
        classifier_scores(p, labels=[0, 1])
    x = np.zeros((2, 1, 2, 2))
    y = x.copy()
    y[1, 0, 0, 0] = 2.0  # one image differs in 1 of 4 pixels by 2: RMS 1; mean over images 0.5
    assert deviation(x, y) == pytest.approx(0.5)
    assert mean_intensity(np.array([-1.0, 0.0, 1.0, 3.0])) == pytest.approx((0 + 0.5 + 1 + 1) / 4)
