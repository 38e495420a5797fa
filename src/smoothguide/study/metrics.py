"""Streamed, mergeable study metrics and their feature extractors.

Per sample (computed when its unit is sampled, stored in the unit's rows):
``rms``, ``ssim`` and ``lpips`` to the unguided sample of the same seed, ``ink``,
``saturation``, ``confidence`` and ``accuracy`` (from the feature classifier) and
``clip_score`` (with the sample's prompt).
Per setting, from sums that merge by addition (so ranks reduce them with one
``all_reduce``, never gathering images):

- means of the per-sample values: ``(sum, count)``;
- Fréchet distance: ``(n, Σ f, Σ f fᵀ)`` of the features in float64, against the
  reference set's, with the FID formula (Heusel et al. 2017);
- KID: the unbiased MMD² estimator of Bińkowski et al. 2018 (Eq. 4) with the cubic
  polynomial kernel ``k(x, y) = (xᵀy / d + 1)³`` (torchmetrics' and the paper's
  default). Its cross terms are not sums of per-sample quantities of fixed size
  for large ``d`` (the third moment tensor has ``d³`` entries), so it is computed
  on a *deterministic subset*: the ``kid_subset`` samples of a setting with the
  smallest :func:`~smoothguide.study.units.noise_seed` — the same (label, seed
  index) pairs in every setting and for any number of processes. Each rank keeps
  its ``kid_subset`` smallest, the ranks ``all_gather`` these fixed-size
  reservoirs and keep the smallest overall. torchmetrics averages 100 random
  subsets of 1000; with ``kid_subset`` ≥ the samples per setting this is the exact
  unbiased estimator over all samples. The reference subset is its first
  ``kid_subset`` rows.

Feature extractors (``features = ...``): ``"demo"`` (the demo classifier's
penultimate features, offline), ``"inception"`` (torchmetrics' InceptionV3, FID
weights from ``feature_options.weights``: a local ``pt_inception-2015-12-05``
``.pth`` file) and ``"clip"`` (a local CLIP model folder,
``feature_options.model``). Absent weights are a :class:`MetricWeightsError` at
study start, before any sampling.

Metrics with networks of their own, configured in ``[metric_options.<metric>]``:

- ``clip_score`` (``model``: a local ``CLIPModel`` folder with its processor and
  tokenizer): ``100 · max(cos(E_image, E_prompt), 0)`` per sample (Hessel et al.
  2021 with torchmetrics' weight 100), see :class:`~smoothguide.study.clip.ClipScorer`;
- ``lpips`` (``net``, ``backbone``, ``linear``): LPIPS (Zhang et al. 2018) to the
  unguided sample of the same seed, see :func:`~smoothguide.study.lpips.lpips_network`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from .clip import CLIP_HOWTO, ClipFeatures, ClipScorer, clip_folder_problem
from .definition import MetricWeightsError, StudyError
from .lpips import LPIPS_FILES, check_lpips_weights, lpips_network

__all__ = [
    "FEATURES",
    "MetricWeightsError",
    "check_feature_names",
    "check_feature_weights",
    "check_metric_options",
    "check_metric_weights",
    "frechet_from_sums",
    "kid_unbiased",
    "load_extractor",
    "load_metric_nets",
    "per_sample_metrics",
    "ssim",
]

#: Feature extractors and the metrics that need one.
FEATURES = ("demo", "inception", "clip")
FEATURE_METRICS = ("fd", "kid", "confidence", "accuracy")
PAIRED_METRICS = ("rms", "ssim", "lpips")
SCALAR_METRICS = (
    "rms",
    "ssim",
    "lpips",
    "ink",
    "saturation",
    "confidence",
    "accuracy",
    "clip_score",
)
#: Metrics with a network of their own and the ``[metric_options.<metric>]`` keys they take.
METRIC_OPTIONS: dict[str, tuple[str, ...]] = {
    "clip_score": ("model",),
    "lpips": ("net", "backbone", "linear", "resize"),
}


def check_feature_names(features: str, metrics: Sequence[str]) -> None:
    """Validate ``features`` when a metric needs an extractor (no loading).

    Parameters
    ----------
    features
        Name of the feature extractor (:data:`FEATURES`).
    metrics
        The study's metrics.

    Returns
    -------
    None

    Examples
    --------
    >>> check_feature_names("dino", ["fd"])
    Traceback (most recent call last):
    ...
    smoothguide.study.definition.StudyError: features: unknown feature extractor 'dino'; ...
    """
    if any(m in FEATURE_METRICS for m in metrics) and features not in FEATURES:
        raise StudyError(
            f"features: unknown feature extractor {features!r}; accepted: {', '.join(FEATURES)}"
        )
    if features != "demo" and any(m in ("confidence", "accuracy") for m in metrics):
        raise StudyError(
            "metrics: confidence / accuracy need the demo classifier (features = 'demo')"
        )


def check_feature_weights(
    features: str, options: Mapping[str, Any], metrics: Sequence[str]
) -> None:
    """Raise :class:`MetricWeightsError` naming the metric when its weights are absent offline.

    Parameters
    ----------
    features
        Name of the feature extractor.
    options
        ``feature_options`` of the study (``weights``: Inception ``.pth``; ``model``: CLIP folder).
    metrics
        The study's metrics.

    Returns
    -------
    None

    Examples
    --------
    >>> check_feature_weights("inception", {}, ["fd", "rms"])
    Traceback (most recent call last):
    ...
    smoothguide.study.definition.MetricWeightsError: metrics fd with features = 'inception' need ...
    """
    need = [m for m in metrics if m in FEATURE_METRICS]
    if not need or features == "demo":
        return
    names = ", ".join(need)
    if features == "inception":
        path = options.get("weights")
        if not path or not os.path.isfile(str(path)):
            raise MetricWeightsError(
                f"metrics {names} with features = 'inception' need the FID InceptionV3 weights "
                f"offline; got feature_options.weights = {path!r}. Download "
                "pt_inception-2015-12-05-6726825d.pth (torch-fidelity's release) on a machine "
                "with internet and set [feature_options] weights = '/path/to/it.pth'"
            )
    elif features == "clip":
        path = options.get("model")
        problem = clip_folder_problem(path, text=False)
        if problem:
            raise MetricWeightsError(
                f"metrics {names} with features = 'clip' need a local CLIP model folder; "
                f"feature_options.model = {path!r}: {problem}. {CLIP_HOWTO} and set "
                "[feature_options] model = 'DIR'"
            )


def check_metric_options(
    metrics: Sequence[str], options: Mapping[str, Any], *, prompts: bool, items: Sequence[Any]
) -> None:
    """Validate ``[metric_options]`` and the conditioning the metrics need (no loading).

    Parameters
    ----------
    metrics
        The study's metrics.
    options
        ``metric_options``: a table per metric of :data:`METRIC_OPTIONS`.
    prompts
        Whether the study is text-conditional (``prompts = ...``).
    items
        Its labels (for the message).

    Returns
    -------
    None

    Examples
    --------
    >>> check_metric_options(["clip_score"], {}, prompts=False, items=["null"])
    Traceback (most recent call last):
    ...
    smoothguide.study.definition.StudyError: metrics: clip_score scores each sample against ...
    """
    if not isinstance(options, Mapping):
        raise StudyError(f"metric_options: must be a table of tables, got {options!r}")
    for name, table in options.items():
        if name not in METRIC_OPTIONS:
            raise StudyError(
                f"metric_options.{name}: unknown metric; accepted: {', '.join(METRIC_OPTIONS)}"
            )
        if not isinstance(table, Mapping):
            raise StudyError(
                f"metric_options.{name}: must be a table ([metric_options.{name}]), got {table!r}"
            )
        bad = sorted(set(table) - set(METRIC_OPTIONS[name]))
        if bad:
            raise StudyError(
                f"metric_options.{name}.{bad[0]}: unknown key; accepted: "
                f"{', '.join(METRIC_OPTIONS[name])}"
            )
    lp = options.get("lpips", {})
    if lp.get("net", "alex") not in LPIPS_FILES:
        raise StudyError(
            f"metric_options.lpips.net: unknown network {lp['net']!r}; accepted: "
            f"{', '.join(LPIPS_FILES)}"
        )
    r = lp.get("resize")
    if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 32):
        raise StudyError(f"metric_options.lpips.resize: must be an int >= 32, got {r!r}")
    if "clip_score" in metrics and not prompts:
        raise StudyError(
            "metrics: clip_score scores each sample against its prompt and needs a "
            f"text-conditional study (prompts = ...); this one has labels {list(items)!r}. "
            "Set prompts or remove clip_score"
        )


def check_metric_weights(metrics: Sequence[str], options: Mapping[str, Any]) -> None:
    """Raise :class:`MetricWeightsError` naming the metric when its own weights are absent.

    Parameters
    ----------
    metrics
        The study's metrics (``clip_score`` and ``lpips`` are checked).
    options
        ``metric_options`` of the study.

    Returns
    -------
    None

    Examples
    --------
    >>> check_metric_weights(["clip_score"], {"clip_score": {"model": "/nowhere"}})
    Traceback (most recent call last):
    ...
    smoothguide.study.definition.MetricWeightsError: metrics clip_score needs a local CLIP ...
    """
    if "clip_score" in metrics:
        path = options.get("clip_score", {}).get("model")
        problem = clip_folder_problem(path, text=True)
        if problem:
            raise MetricWeightsError(
                "metrics clip_score needs a local CLIP model folder (CLIPModel weights, "
                f"processor and tokenizer); [metric_options.clip_score] model = {path!r}: "
                f"{problem}. {CLIP_HOWTO} and set [metric_options.clip_score] model = 'DIR'"
            )
    if "lpips" in metrics:
        check_lpips_weights(options.get("lpips", {}))


class _DemoFeatures:
    """The demo classifier's penultimate features and class probabilities."""

    def __init__(self, options: Mapping[str, Any], device: Any) -> None:
        from ..demo.weights import load_classifier

        self.net = load_classifier(options.get("weights_dir"), device=device).eval()
        self.device = device

    def __call__(self, images: Any) -> tuple[Any, Any]:
        import torch

        with torch.no_grad():
            f = self.net.embed(images.to(self.device))
            p = torch.softmax(self.net.head(f), dim=-1)
        return f.float().cpu(), p.double().cpu()


class _InceptionFeatures:  # pragma: no cover - needs weights absent in CI
    def __init__(self, options: Mapping[str, Any], device: Any) -> None:
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.net = NoTrainInceptionV3(
            name="inception-v3-compat",
            features_list=[str(options.get("dims", 2048))],
            feature_extractor_weights_path=str(options["weights"]),
        ).to(device)
        self.device = device

    def __call__(self, images: Any) -> tuple[Any, None]:
        import torch

        x = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        with torch.no_grad():
            f = self.net(x.to(self.device))
        return f.float().cpu(), None


def load_metric_nets(
    metrics: Sequence[str], options: Mapping[str, Any], device: Any
) -> dict[str, Any]:
    """The networks of ``clip_score`` / ``lpips`` among ``metrics`` (``{}`` if neither).

    Parameters
    ----------
    metrics
        The study's metrics.
    options
        ``metric_options``.
    device
        Torch device.

    Returns
    -------
    dict
        ``"clip_score"``: a :class:`ClipScorer`; ``"lpips"``: :func:`lpips_network`.

    Examples
    --------
    >>> load_metric_nets(["rms", "ssim"], {}, "cpu")
    {}
    """
    out: dict[str, Any] = {}
    if "clip_score" in metrics:
        out["clip_score"] = ClipScorer(options.get("clip_score", {}).get("model"), device)
    if "lpips" in metrics:
        out["lpips"] = lpips_network(options.get("lpips", {}), device)
    return out


def load_extractor(features: str, options: Mapping[str, Any], device: Any) -> Any:
    """The feature extractor: ``images (n, c, h, w) in [-1, 1] -> (features, probs or None)``.

    Parameters
    ----------
    features
        ``"demo"``, ``"inception"`` or ``"clip"``.
    options
        ``feature_options`` (``weights_dir`` of the demo classifier; see the module docstring).
    device
        Torch device.

    Returns
    -------
    callable
        Features float32 ``(n, d)`` and class probabilities float64 (demo only).

    Examples
    --------
    >>> import torch
    >>> f, p = load_extractor("demo", {}, "cpu")(torch.zeros(2, 1, 16, 16))
    >>> f.shape, p.shape
    (torch.Size([2, 128]), torch.Size([2, 10]))
    """
    cls = {"demo": _DemoFeatures, "inception": _InceptionFeatures, "clip": ClipFeatures}[features]
    return cls(options, device)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> npt.NDArray[np.float64]:
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(x: Any, y: Any, *, data_range: float = 2.0, size: int = 11, sigma: float = 1.5) -> Any:
    """Per-image SSIM (Wang et al. 2004, Eq. 13) with an 11x11 Gaussian window (σ = 1.5).

    ``(2 μx μy + C1)(2 σxy + C2) / ((μx² + μy² + C1)(σx² + σy² + C2))`` with
    ``C1 = (0.01 L)²``, ``C2 = (0.03 L)²``, ``L = data_range`` (2 for images in
    ``[-1, 1]``), local statistics over the window positions that fit inside the
    image (no padding), averaged over positions and channels. Window sides larger
    than the image are shrunk to the image side (odd).

    Parameters
    ----------
    x, y
        Tensors of shape ``(n, c, h, w)``.

    Returns
    -------
    torch.Tensor
        Float64 SSIM per image, shape ``(n,)``.

    Examples
    --------
    >>> import torch
    >>> x = torch.rand(2, 1, 16, 16)
    >>> ssim(x, x).tolist()
    [1.0, 1.0]
    """
    import torch

    xd, yd = x.double(), y.double()
    n, c, h, w = xd.shape
    size = min(size, h - (1 - h % 2), w - (1 - w % 2))
    g = torch.as_tensor(_gaussian_window(size, sigma))
    win = (g[:, None] * g[None, :]).expand(c, 1, size, size).contiguous()

    def filt(t: Any) -> Any:
        return torch.nn.functional.conv2d(t, win, groups=c)

    mx, my = filt(xd), filt(yd)
    sxx = filt(xd * xd) - mx * mx
    syy = filt(yd * yd) - my * my
    sxy = filt(xd * yd) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return s.reshape(n, -1).mean(dim=1)


def per_sample_metrics(
    x: Any, ref: Any | None, probs: Any | None, labels: Sequence[int | None], metrics: Sequence[str]
) -> dict[str, list[float | None]]:
    """Per-sample values of the scalar metrics of ``metrics`` (float64 math).

    ``rms = sqrt(mean (x − ref)²)``, ``ssim`` (:func:`ssim`), ``ink = mean (x + 1) / 2``,
    ``saturation = mean (max_c − min_c) / max_c`` of ``(x + 1) / 2`` (HSV, 0 where
    ``max_c = 0``), ``confidence = max_c p_c``, ``accuracy = [argmax p = label]``
    (``None`` for unlabelled samples).

    Parameters
    ----------
    x
        Samples ``(n, c, h, w)`` in ``[-1, 1]``.
    ref
        The paired unguided samples (same shape), or ``None``.
    probs
        Class probabilities ``(n, classes)``, or ``None``.
    labels
        Intended class per sample (``None``: unconditional).
    metrics
        Which metrics to compute.

    Returns
    -------
    dict of str to list
        Metric name -> one value per sample.

    Examples
    --------
    >>> import torch
    >>> per_sample_metrics(torch.ones(1, 1, 2, 2), -torch.ones(1, 1, 2, 2), None, [None],
    ...                    ["rms", "ink"])
    {'rms': [2.0], 'ink': [1.0]}
    """
    import torch

    xd = x.double()
    n = xd.shape[0]
    out: dict[str, list[float | None]] = {}
    if ref is not None:
        rd = ref.double()
        if "rms" in metrics:
            out["rms"] = torch.sqrt(((xd - rd) ** 2).reshape(n, -1).mean(dim=1)).tolist()
        if "ssim" in metrics:
            out["ssim"] = ssim(xd, rd).tolist()
    v = (xd.clamp(-1, 1) + 1) / 2
    if "ink" in metrics:
        out["ink"] = v.reshape(n, -1).mean(dim=1).tolist()
    if "saturation" in metrics:
        hi, lo = v.amax(dim=1), v.amin(dim=1)
        sat = torch.where(hi > 0, (hi - lo) / hi.clamp_min(1e-300), torch.zeros_like(hi))
        out["saturation"] = sat.reshape(n, -1).mean(dim=1).tolist()
    if probs is not None:
        if "confidence" in metrics:
            out["confidence"] = probs.max(dim=1).values.tolist()
        if "accuracy" in metrics:
            pred = probs.argmax(dim=1).tolist()
            out["accuracy"] = [
                None if y is None else float(p == y) for p, y in zip(pred, labels, strict=True)
            ]
    return out


def _sqrtm_psd(a: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def moments_to_gaussian(
    n: float, s1: npt.NDArray[np.float64], s2: npt.NDArray[np.float64]
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Mean and unbiased covariance from ``n``, ``Σ f`` and ``Σ f fᵀ``.

    ``μ = Σf / n`` and ``S = (Σ f fᵀ − n μ μᵀ) / (n − 1)``.
    """
    mu = s1 / n
    cov = (s2 - n * np.outer(mu, mu)) / (n - 1)
    return mu, cov


def frechet_from_sums(
    a: tuple[float, npt.NDArray[np.float64], npt.NDArray[np.float64]],
    b: tuple[float, npt.NDArray[np.float64], npt.NDArray[np.float64]],
) -> float:
    """Fréchet distance between the Gaussians of two ``(n, Σf, Σffᵀ)`` sums (n ≥ 2 each).

    ``|μa − μb|² + tr(Sa + Sb − 2 (Sa^½ Sb Sa^½)^½)`` (Heusel et al. 2017).

    Parameters
    ----------
    a, b
        ``(n, Σ f, Σ f fᵀ)`` of two feature sets (sums merge by addition).

    Returns
    -------
    float
        The distance (NaN if a set has fewer than 2 samples).

    Examples
    --------
    >>> f = np.array([[0.0, 1.0], [2.0, 3.0], [1.0, 0.0]])
    >>> s = (3.0, f.sum(0), f.T @ f)
    >>> round(frechet_from_sums(s, (3.0, (f + 1).sum(0), (f + 1).T @ (f + 1))), 9)
    2.0
    """
    if a[0] < 2 or b[0] < 2:
        return math.nan
    mu_a, s_a = moments_to_gaussian(*a)
    mu_b, s_b = moments_to_gaussian(*b)
    root = _sqrtm_psd(s_a)
    cross = _sqrtm_psd(root @ s_b @ root)
    d = float(np.sum((mu_a - mu_b) ** 2) + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(cross))
    return max(d, 0.0)


def kid_unbiased(x: npt.ArrayLike, y: npt.ArrayLike) -> float:
    """Unbiased MMD² with ``k(a, b) = (aᵀb / d + 1)³`` (Bińkowski et al. 2018, Eq. 4).

    ``Σ_{i≠j} k(x_i, x_j) / (m(m−1)) + Σ_{i≠j} k(y_i, y_j) / (n(n−1)) − 2 Σ k(x_i, y_j) / (mn)``
    in float64; NaN when either set has fewer than 2 rows.

    Parameters
    ----------
    x, y
        Feature sets ``(m, d)`` and ``(n, d)``.

    Returns
    -------
    float
        The estimate (may be slightly negative: it is unbiased).

    Examples
    --------
    >>> x = np.array([[1.0], [2.0]])
    >>> kid_unbiased(x, x)  # k = 8, 27, 125: 27 + 27 − 2 (8 + 2·27 + 125) / 4
    -39.5
    """
    xa = np.asarray(x, dtype=np.float64)
    ya = np.asarray(y, dtype=np.float64)
    m, n = xa.shape[0], ya.shape[0]
    if m < 2 or n < 2:
        return math.nan
    d = xa.shape[1]
    kxx = (xa @ xa.T / d + 1) ** 3
    kyy = (ya @ ya.T / d + 1) ** 3
    kxy = (xa @ ya.T / d + 1) ** 3
    return float(
        (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
        + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
        - 2 * kxy.sum() / (m * n)
    )
