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

    ``mu = mean_i f_i`` and ``S = sum_i (f_i - mu)(f_i - mu)^T / (n - 1)``
    (:func:`numpy.cov`).

    Parameters
    ----------
    features
        Array-like of shape ``(n, d)`` with ``n >= 2``.

    Returns
    -------
    mu : numpy.ndarray
        Float64 mean of shape ``(d,)``.
    cov : numpy.ndarray
        Float64 covariance of shape ``(d, d)``.

    Raises
    ------
    ValueError
        If ``features`` is not 2-D with at least two rows.

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

    Features are ``classifier.embed(x)`` (the penultimate layer used by
    :func:`frechet_distance`), probabilities ``softmax(classifier.head(features))``;
    evaluated without gradients in batches on the classifier's device.

    Parameters
    ----------
    classifier
        A :class:`~smoothguide.demo.model.DemoClassifier` (anything with ``embed``,
        ``head`` and ``parameters``), normally in eval mode.
    images
        Array or tensor of shape ``(n, 1, 16, 16)``.
    batch_size
        Images per forward pass.

    Returns
    -------
    tuple of numpy.ndarray
        ``(features (n, d), probabilities (n, classes))``, float64.

    Examples
    --------
    >>> from smoothguide.demo.model import ClassifierConfig, DemoClassifier
    >>> net = DemoClassifier(ClassifierConfig(width=4, features=8)).eval()
    >>> feats, probs = embed(net, np.zeros((3, 1, 16, 16)), batch_size=2)
    >>> feats.shape, probs.shape, feats.dtype
    ((3, 8), (3, 10), dtype('float64'))
    >>> bool(np.allclose(probs.sum(axis=1), 1.0))
    True
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

    ``confidence = mean_i max_c p_ic`` and ``accuracy = mean_i [argmax_c p_ic = y_i]``,
    both rounded to 10 decimals.

    Parameters
    ----------
    probabilities
        Class probabilities of shape ``(n, classes)`` (e.g. from :func:`embed`).
    labels
        Optional intended classes of shape ``(n,)``.

    Returns
    -------
    dict of str to float
        ``{"confidence": ...}``, plus ``"accuracy"`` when ``labels`` is given.

    Raises
    ------
    ValueError
        If ``labels`` does not have shape ``(n,)``.

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

    ``mean_i sqrt(mean_pixels (x_i - r_i)^2)``: how far guidance moves each sample
    from the unguided sample of the same noise (the demo's stand-in for LPIPS).

    Parameters
    ----------
    images
        Array of shape ``(n, ...)``.
    reference
        Array of the same shape, e.g. the unguided samples of the same seeds.

    Returns
    -------
    float
        The mean RMS difference (0 for identical arrays).

    Raises
    ------
    ValueError
        If the shapes differ.

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

    ``mean((clip(x, -1, 1) + 1) / 2)`` over all pixels and images.

    Parameters
    ----------
    images
        Array-like with values in ``[-1, 1]`` (values outside are clipped).

    Returns
    -------
    float
        Mean intensity in ``[0, 1]``.

    Examples
    --------
    >>> mean_intensity(np.array([[-1.0, 1.0]]))
    0.5
    """
    a = np.clip(np.asarray(images, dtype=np.float64), -1.0, 1.0)
    return float(((a + 1.0) / 2.0).mean())
