"""Sample-quality metrics of the demo.

- :func:`frechet_distance`: the Fréchet distance between Gaussians fitted to two
  feature sets (FID's formula, here on the demo classifier's penultimate features
  instead of Inception's).
- :func:`classifier_scores`: mean top-class confidence and, for class-conditional
  samples, the fraction classified as the class they were drawn for.
- :func:`deviation`: per-image RMS pixel difference to the unguided sample of the
  same seed (the role LPIPS plays in the paper's Pareto plots).
- :func:`mean_intensity`: mean ink in ``[0, 1]`` (over-guidance thickens strokes).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from ._deps import torch

__all__ = [
    "classifier_scores",
    "deviation",
    "embed",
    "frechet_distance",
    "gaussian_stats",
    "mean_intensity",
]


def gaussian_stats(
    features: npt.ArrayLike,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Mean and (unbiased) covariance of features of shape ``(n, d)``, ``n >= 2``.

    Examples
    --------
    >>> mu, cov = gaussian_stats([[0.0, 1.0], [2.0, 3.0]])
    >>> mu.tolist(), cov.tolist()
    ([1.0, 2.0], [[2.0, 2.0], [2.0, 2.0]])
    """
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must have shape (n >= 2, d), got {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def _sqrtm_psd(a: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(features_a: npt.ArrayLike, features_b: npt.ArrayLike) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets.

    ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^{1/2} S_b S_a^{1/2})^{1/2})``, the
    FID formula (Heusel et al. 2017); the trace term is computed from the
    symmetric matrix ``S_a^{1/2} S_b S_a^{1/2}``, whose square root has the same
    trace as ``(S_a S_b)^{1/2}``.

    Parameters
    ----------
    features_a, features_b
        Arrays of shape ``(n_a, d)`` and ``(n_b, d)``.

    Returns
    -------
    float
        The distance (``>= 0`` up to rounding; 0 for identical sets).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> a = rng.normal(size=(500, 3))
    >>> round(frechet_distance(a, a), 6)
    0.0
    >>> round(frechet_distance(a, a + 2.0), 6)  # a shift by 2 in 3 dims: 3 * 2**2
    12.0
    """
    mu_a, s_a = gaussian_stats(features_a)
    mu_b, s_b = gaussian_stats(features_b)
    if mu_a.shape != mu_b.shape:
        raise ValueError(f"feature dims differ: {mu_a.shape[0]} vs {mu_b.shape[0]}")
    root_a = _sqrtm_psd(s_a)
    cross = _sqrtm_psd(root_a @ s_b @ root_a)
    d = float(np.sum((mu_a - mu_b) ** 2) + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(cross))
    return max(d, 0.0)


@torch.no_grad()
def embed(classifier: Any, images: Any, batch_size: int = 500) -> tuple[Any, Any]:
    """Features and softmax probabilities of ``images`` (``(n, 1, 16, 16)`` in ``[-1, 1]``).

    Returns
    -------
    tuple of numpy.ndarray
        ``(features (n, d), probabilities (n, classes))``, float64.
    """
    x = torch.as_tensor(images, dtype=torch.float32)
    device = next(classifier.parameters()).device
    feats, probs = [], []
    for i in range(0, x.shape[0], batch_size):
        xb = x[i : i + batch_size].to(device)
        f = classifier.embed(xb)
        feats.append(f.double().cpu().numpy())
        probs.append(torch.softmax(classifier.head(f), dim=-1).double().cpu().numpy())
    return np.concatenate(feats), np.concatenate(probs)


def classifier_scores(
    probabilities: npt.ArrayLike, labels: npt.ArrayLike | None = None
) -> dict[str, float]:
    """Mean top-class confidence, and accuracy against ``labels`` when given.

    Examples
    --------
    >>> classifier_scores([[0.9, 0.1], [0.3, 0.7]], labels=[0, 0])
    {'confidence': 0.8, 'accuracy': 0.5}
    """
    p = np.asarray(probabilities, dtype=np.float64)
    out = {"confidence": round(float(p.max(axis=1).mean()), 10)}
    if labels is not None:
        y = np.asarray(labels)
        if y.shape != (p.shape[0],):
            raise ValueError(f"labels must have shape ({p.shape[0]},), got {y.shape}")
        out["accuracy"] = round(float((p.argmax(axis=1) == y).mean()), 10)
    return out


def deviation(images: npt.ArrayLike, reference: npt.ArrayLike) -> float:
    """Mean over images of the RMS pixel difference to the reference of the same seed.

    Examples
    --------
    >>> deviation(np.zeros((2, 1, 2, 2)), np.stack([np.zeros((1, 2, 2)), np.ones((1, 2, 2))]))
    0.5
    """
    a = np.asarray(images, dtype=np.float64)
    b = np.asarray(reference, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"images and reference must have the same shape, got {a.shape}, {b.shape}")
    rms = np.sqrt(((a - b) ** 2).reshape(a.shape[0], -1).mean(axis=1))
    return float(rms.mean())


def mean_intensity(images: npt.ArrayLike) -> float:
    """Mean ink of images in ``[-1, 1]``, mapped to ``[0, 1]`` (0 = black background).

    Examples
    --------
    >>> mean_intensity(np.array([[-1.0, 1.0]]))
    0.5
    """
    a = np.clip(np.asarray(images, dtype=np.float64), -1.0, 1.0)
    return float(((a + 1.0) / 2.0).mean())
