"""Perturbation specs: what a guidance branch changes inside the model.

A perturbation is data, not code that runs the model. Rules put one into a
:class:`~smoothguide.branches.Branch`; adapters (:mod:`smoothguide.torch`,
:mod:`smoothguide.diffusers`, or the pure array-API toy model in the tests)
execute it on the chosen self-attention layers, for the batch rows of that
branch only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from .grid import TokenGrid
from .smoothing import Mode, _check_mode, _check_radius, _check_sigma, default_radius

__all__ = [
    "IdentityAttention",
    "LayerSelection",
    "Perturbation",
    "QuerySmoothing",
]

#: Which attention layers a perturbation acts on. ``None`` means the adapter's
#: documented default (the paper's: the SDXL mid block); a string is a preset or
#: an exact module name; a sequence is a union of those, in the order given.
LayerSelection = str | Sequence[str] | None


def _normalize_layers(layers: LayerSelection) -> tuple[str, ...] | None:
    if layers is None:
        return None
    if isinstance(layers, str):
        return (layers,)
    if not isinstance(layers, Sequence) or not all(isinstance(x, str) for x in layers):
        raise TypeError(f"layers must be None, a string or a sequence of strings, got {layers!r}")
    if len(layers) == 0:
        raise ValueError("layers must not be empty; pass None for the adapter's default")
    return tuple(layers)


def _normalize_heads(heads: object) -> tuple[int, ...] | None:
    """``None`` (every head) or a non-empty tuple of distinct head indices >= 0, sorted."""
    if heads is None:
        return None
    items = (heads,) if isinstance(heads, int) else heads
    if isinstance(items, str | bytes) or not isinstance(items, Sequence):
        raise TypeError(f"heads must be None, an int or a sequence of ints, got {heads!r}")
    out = tuple(items)
    if not out or not all(isinstance(h, int) and not isinstance(h, bool) and h >= 0 for h in out):
        raise ValueError(f"heads must be None or a non-empty sequence of ints >= 0, got {heads!r}")
    if len(set(out)) != len(out):
        raise ValueError(f"heads must not repeat, got {heads!r}")
    return tuple(sorted(out))


@dataclass(frozen=True)
class Perturbation:
    """Base class of perturbation specs.

    Parameters
    ----------
    layers
        Attention layers to perturb: ``None`` (adapter default), a preset or
        module name, or a sequence of them.

    Examples
    --------
    >>> isinstance(QuerySmoothing(1.0), Perturbation)
    True
    """

    layers: tuple[str, ...] | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", _normalize_layers(self.layers))


@dataclass(frozen=True)
class QuerySmoothing(Perturbation):
    """SEG's perturbation: Gaussian-blur the self-attention queries on the token grid.

    Blurring queries equals blurring every key's logit map (Hong 2024, Prop. 3.1),
    so this is the "smoothed energy" branch of Smoothed Energy Guidance.

    Parameters
    ----------
    sigma
        Gaussian width in tokens: a number (height and width), or one per grid
        axis, ``(σ_h, σ_w)`` or ``(σ_t, σ_h, σ_w)``. ``math.inf`` replaces each
        query by the mean query of its grid; ``0`` leaves the layer unchanged.
    mode
        Boundary mode with SciPy's meaning (``"reflect"``, ``"mirror"``,
        ``"nearest"``, ``"wrap"``).
    radius
        Kernel radius in tokens; ``None`` uses :func:`~smoothguide.default_radius`
        of the (absolute) σ.
    heads
        Attention heads to blur (indices into the layer's head axis); ``None``
        (default) blurs every head. HeadHunter-style per-head SEG
        (arXiv:2506.10978).
    relative
        ``False`` (default): σ is in tokens. ``True``: σ is a fraction of the
        token grid's shorter side, ``σ_abs = σ · min(h, w)`` on every axis, so
        one setting means the same blur at every resolution and aspect ratio
        (:meth:`absolute_sigma`).
    layers
        See :class:`Perturbation`.

    Examples
    --------
    >>> QuerySmoothing(10.0).sigma
    10.0
    >>> QuerySmoothing(float("inf"), layers="mid").layers
    ('mid',)
    >>> QuerySmoothing(2.0, heads=(2, 0)).heads
    (0, 2)
    >>> from smoothguide import TokenGrid
    >>> QuerySmoothing(0.1, relative=True).absolute_sigma(TokenGrid(32, 48))
    3.2
    """

    sigma: float | tuple[float, ...] = math.inf
    mode: Mode = "reflect"
    radius: int | None = None
    heads: tuple[int, ...] | None = field(default=None, kw_only=True)
    relative: bool = field(default=False, kw_only=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        sigma = _check_sigma(self.sigma)
        object.__setattr__(self, "sigma", sigma)
        _check_mode(self.mode)
        # NumPy integers are accepted and stored as int; radius > MAX_RADIUS refused.
        object.__setattr__(self, "radius", _check_radius(self.radius))
        object.__setattr__(self, "heads", _normalize_heads(self.heads))
        if not isinstance(self.relative, bool):
            raise TypeError(f"relative must be True or False, got {self.relative!r}")
        if self.radius is None and not self.relative:
            # Fail here, not inside the model: a sigma too wide for any kernel.
            for s in sigma if isinstance(sigma, tuple) else (sigma,):
                if not math.isinf(s):
                    default_radius(s)

    def _taps(self) -> tuple[int | None, ...]:
        """Kernel radius per blurred axis (``None`` for σ = inf, the mean, or a relative σ).

        A relative σ is resolved per layer grid, so its radius is not known here.
        """
        s = self.sigma
        axes = s if isinstance(s, tuple) else (s,)
        return tuple(
            None
            if math.isinf(a) or (self.relative and self.radius is None)
            else (self.radius if self.radius is not None else default_radius(a))
            for a in axes
        )

    @property
    def is_identity(self) -> bool:
        """True when the blur leaves every query unchanged.

        That is σ = 0 on every axis, or a single-tap kernel (radius 0: an explicit
        ``radius=0``, or σ <= 1/6 with the default radius) on every finite axis, whose
        one tap is exactly 1. Such a perturbation is neutral: rules skip its branch.
        """
        s = self.sigma
        axes = s if isinstance(s, tuple) else (s,)
        return all(a == 0.0 or r == 0 for a, r in zip(axes, self._taps(), strict=True))

    def absolute_sigma(self, grid: TokenGrid) -> float | tuple[float, ...]:
        """σ in tokens on ``grid``: ``sigma`` itself, or ``sigma · min(h, w)`` when relative.

        Parameters
        ----------
        grid
            The layer's :class:`~smoothguide.TokenGrid`.

        Returns
        -------
        float or tuple of float
            Same structure as ``sigma`` (``inf`` and ``0`` stay as they are).
        """
        if not self.relative:
            return self.sigma
        side = float(min(grid.height, grid.width))
        s = self.sigma
        return s * side if isinstance(s, float) else tuple(x * side for x in s)


@dataclass(frozen=True)
class IdentityAttention(Perturbation):
    """PAG's perturbation: replace the self-attention map by the identity (Ahn et al. 2024).

    Each token then attends only to itself, so the attention output equals the
    values ``V`` (before the output projection). With ``weight = w < 1`` the map
    is interpolated toward the identity instead, ``A' = (1 − w) A + w I``, so the
    output is ``(1 − w) softmax(QKᵀ/√d) V + w V`` (soft PAG of HeadHunter,
    arXiv:2506.10978); ``w = 1`` is PAG, ``w = 0`` the plain model.

    Parameters
    ----------
    weight
        Interpolation weight ``w`` in ``[0, 1]`` (default 1: PAG).
    heads
        Attention heads to perturb; ``None`` (default) perturbs every head.
    layers
        See :class:`Perturbation`.

    Examples
    --------
    >>> IdentityAttention(layers=("mid",)).layers
    ('mid',)
    >>> IdentityAttention(weight=0.25, heads=[1]).heads
    (1,)
    """

    kind: Literal["identity"] = "identity"
    weight: float = field(default=1.0, kw_only=True)
    heads: tuple[int, ...] | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        w = self.weight
        if isinstance(w, bool) or not isinstance(w, int | float) or not 0.0 <= float(w) <= 1.0:
            raise ValueError(f"weight must be a number in [0, 1], got {w!r}")
        object.__setattr__(self, "weight", float(w))
        object.__setattr__(self, "heads", _normalize_heads(self.heads))

    @property
    def is_identity(self) -> bool:
        """True when the model is left unchanged (``weight == 0``)."""
        return self.weight == 0.0
