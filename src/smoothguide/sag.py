"""Self-attention guidance's degraded input: blur where the self-attention looks (Hong et al. 2023).

S. Hong, G. Lee, W. Jang, S. Kim, "Improving Sample Quality of Diffusion Models
Using Self-Attention Guidance", ICCV 2023 (arXiv:2210.00939). From one branch's
prediction ``x̂0`` at ``x = x0 + σ ε`` and the self-attention probabilities ``A``
of one layer on that branch:

1. mask ``M``: the tokens whose total received attention, averaged over heads,
   exceeds ``threshold`` (1, the mean: ``Σ_q mean_h A[h, q, k] > 1``), on the
   layer's token grid, upsampled (nearest) to the latent;
2. degraded prediction ``x̄0 = M · blur(x̂0) + (1 − M) · x̂0`` (Gaussian, σ = 1,
   kernel 9, mirrored boundary, as the reference code);
3. re-noised input ``x̄ = x̄0 + (x − x̂0)`` (the same noise ``σ ε̂``), evaluated
   again by the model: the branch's extra forward.

:class:`AttentionMaskedBlur` is the branch spec; :func:`sag_mask` and
:func:`sag_degrade` hold steps 1–3 for any array-API backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ._array import Array, namespace
from .grid import TokenGrid
from .perturbations import Perturbation
from .smoothing import Mode, _check_mode, blur_matrix

__all__ = ["AttentionMaskedBlur", "sag_degrade", "sag_mask"]


@dataclass(frozen=True)
class AttentionMaskedBlur(Perturbation):
    """SAG's branch: the model at the attention-masked, blurred and re-noised prediction.

    The branch's conditioning names the *source* branch (its prediction and the
    self-attention of ``layers`` on its rows); the model is then called again at
    the degraded input with the same conditioning. Its output, as a branch, is
    ``D(x̄) + (x − x̄)``: the degraded prediction moved back to ``x``, so that
    rules combine it linearly exactly as the reference code combines noise
    predictions (``ε = (x − D) / σ``).

    Parameters
    ----------
    blur_sigma
        Gaussian width of the blur in latent pixels (default 1.0).
    radius
        Kernel radius (default 4: the reference's kernel size 9).
    mode
        Boundary mode (default ``"mirror"``: the reference's reflect padding).
    threshold
        Mask threshold on the head-averaged attention a key receives (default 1.0).
    layers
        The one self-attention layer whose map is used (``None``: the adapter's
        default, the SD mid block).

    Examples
    --------
    >>> AttentionMaskedBlur().blur_sigma, AttentionMaskedBlur().radius
    (1.0, 4)
    """

    blur_sigma: float = 1.0
    radius: int = 4
    mode: Mode = "mirror"
    threshold: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        s = self.blur_sigma
        if isinstance(s, bool) or not isinstance(s, int | float) or not 0.0 < float(s) < 1e6:
            raise ValueError(f"blur_sigma must be a finite number > 0, got {s!r}")
        object.__setattr__(self, "blur_sigma", float(s))
        if isinstance(self.radius, bool) or not isinstance(self.radius, int) or self.radius < 0:
            raise ValueError(f"radius must be an int >= 0, got {self.radius!r}")
        _check_mode(self.mode)
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, int | float):
            raise TypeError(f"threshold must be a number, got {t!r}")
        object.__setattr__(self, "threshold", float(t))


def sag_mask(
    probs: Array, grid: TokenGrid, size: tuple[int, int], *, threshold: float = 1.0
) -> Array:
    """SAG's mask from attention probabilities, upsampled (nearest) to ``size = (H, W)``.

    Parameters
    ----------
    probs
        ``(batch, heads, tokens, tokens)`` attention probabilities (rows sum to 1)
        over ``grid``'s tokens (no prefix or suffix tokens).
    grid
        The layer's token grid (``h × w``).
    size
        Latent ``(H, W)``; token ``(i, j)`` covers pixels ``(⌊i'·h/H⌋, ⌊j'·w/W⌋)``
        (``torch.nn.functional.interpolate``'s ``"nearest"``).
    threshold
        A key is masked when ``Σ_q mean_h probs[h, q, key] > threshold``.

    Returns
    -------
    array
        ``(batch, 1, H, W)`` of 0 / 1 in ``probs``' dtype.

    Examples
    --------
    Every query attends to key 0 only: that key's column sums to 4, the others to 0.

    >>> import numpy as np
    >>> from smoothguide import TokenGrid
    >>> probs = np.zeros((1, 1, 4, 4))
    >>> probs[..., 0] = 1.0
    >>> sag_mask(probs, TokenGrid(2, 2), (2, 2))[0, 0]
    array([[1., 0.],
           [0., 0.]])
    """
    xp = namespace(probs)
    if probs.ndim != 4 or probs.shape[-1] != probs.shape[-2] or probs.shape[-1] != grid.num_tokens:
        raise ValueError(
            f"probs must be (batch, heads, {grid.num_tokens}, {grid.num_tokens}) for {grid}, "
            f"got {tuple(probs.shape)}"
        )
    if grid.frames != 1 or grid.prefix or grid.suffix:
        raise ValueError(f"SAG needs a single-frame image-token grid, got {grid}")
    received = xp.sum(xp.mean(probs, axis=1), axis=1)  # (batch, keys)
    mask = xp.astype(received > threshold, probs.dtype)
    mask = xp.reshape(mask, (probs.shape[0], grid.height, grid.width))
    big_h, big_w = size
    dev = getattr(probs, "device", None)
    rows = xp.asarray([i * grid.height // big_h for i in range(big_h)], device=dev)
    cols = xp.asarray([j * grid.width // big_w for j in range(big_w)], device=dev)
    mask = xp.take(xp.take(mask, rows, axis=1), cols, axis=2)
    return xp.reshape(mask, (probs.shape[0], 1, big_h, big_w))


def sag_degrade(x0: Array, mask: Array, p: AttentionMaskedBlur | None = None) -> Array:
    """``mask · blur(x0) + (1 − mask) · x0`` with ``p``'s Gaussian on the last two axes.

    Parameters
    ----------
    x0
        Predicted clean latent, ``(batch, channels, H, W)``.
    mask
        From :func:`sag_mask`, broadcastable to ``x0``.
    p
        The blur settings (default :class:`AttentionMaskedBlur`'s).

    Returns
    -------
    array
        Same shape, dtype and backend as ``x0``.

    Examples
    --------
    A zero mask keeps ``x0``; a full mask blurs it (a constant stays constant).

    >>> import numpy as np
    >>> x0 = np.random.default_rng(0).normal(size=(1, 1, 6, 6))
    >>> bool(np.array_equal(sag_degrade(x0, np.zeros((1, 1, 6, 6))), x0))
    True
    >>> np.allclose(sag_degrade(np.ones((1, 1, 6, 6)), np.ones((1, 1, 6, 6))), 1.0)
    True
    """
    p = AttentionMaskedBlur() if p is None else p
    xp = namespace(x0)
    h, w = x0.shape[-2], x0.shape[-1]
    dev = getattr(x0, "device", None)
    kw: dict[str, Any] = dict(radius=p.radius, mode=p.mode, xp=xp, dtype=x0.dtype, device=dev)
    bh = blur_matrix(h, p.blur_sigma, **kw)
    bw = blur_matrix(w, p.blur_sigma, **kw)
    blurred = xp.matmul(xp.matmul(bh, x0), xp.permute_dims(bw, (1, 0)))
    return mask * blurred + (1.0 - mask) * x0
