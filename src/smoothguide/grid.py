"""Token grids: how a transformer's token axis maps to (frames, height, width)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

__all__ = ["TokenGrid"]


def _check_count(value: object, name: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return int(value)


def _check_aspect(aspect: object) -> tuple[int, int]:
    if (
        not isinstance(aspect, tuple | list)
        or len(aspect) != 2
        or not all(isinstance(a, numbers.Integral) and not isinstance(a, bool) for a in aspect)
        or not all(a >= 1 for a in aspect)
    ):
        raise ValueError(
            "aspect must be a (height, width) pair of positive ints, e.g. the latent's "
            f"spatial shape, got {aspect!r}"
        )
    return int(aspect[0]), int(aspect[1])


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted({*small, *(n // d for d in small)})


def _factor_range(size: int, cells: int) -> tuple[int, float] | None:
    """Integer factors ``s`` with ``floor(size/s) == cells`` or ``ceil(size/s) == cells``.

    As ``s`` grows ``size/s`` falls, so the factors form one interval ``[lo, hi]``;
    returns it, or None when it is empty.
    """
    lo = size // (cells + 1) + 1  # smallest s with floor(size / s) <= cells
    if size // lo != cells and -(-size // lo) != cells:
        return None
    hi = math.inf if cells == 1 else -(-size // (cells - 1)) - 1  # largest s, ceil >= cells
    return lo, hi


def _factors_overlap(a: tuple[int, float] | None, b: tuple[int, float] | None) -> bool:
    return a is not None and b is not None and max(a[0], b[0]) <= min(a[1], b[1])


@dataclass(frozen=True)
class TokenGrid:
    """Token-axis layout: ``prefix`` tokens, a ``frames x height x width`` grid, ``suffix`` tokens.

    Spatial tokens are stored in row-major ``(frame, row, column)`` order, as
    produced by flattening a ``(frames, height, width)`` latent. Prefix and suffix
    tokens (text tokens of joint attention, registers, class tokens) are not
    spatial and are never smoothed.

    Parameters
    ----------
    height, width
        Grid rows and columns (>= 1).
    frames
        Number of frames (video), default 1.
    prefix, suffix
        Number of non-spatial tokens before and after the grid, default 0.

    Examples
    --------
    >>> g = TokenGrid(4, 6, prefix=2)
    >>> g.num_tokens, g.spatial_tokens, g.shape
    (26, 24, (1, 4, 6))
    """

    height: int
    width: int
    frames: int = 1
    prefix: int = 0
    suffix: int = 0

    def __post_init__(self) -> None:
        for name in ("height", "width", "frames"):
            object.__setattr__(self, name, _check_count(getattr(self, name), name, minimum=1))
        for name in ("prefix", "suffix"):
            object.__setattr__(self, name, _check_count(getattr(self, name), name, minimum=0))

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(frames, height, width)``."""
        return (self.frames, self.height, self.width)

    @property
    def spatial_tokens(self) -> int:
        """Number of grid tokens, ``frames * height * width``."""
        return self.frames * self.height * self.width

    @property
    def num_tokens(self) -> int:
        """Length of the whole token axis, ``prefix + spatial_tokens + suffix``."""
        return self.prefix + self.spatial_tokens + self.suffix

    @property
    def spatial_slice(self) -> slice:
        """The slice of the token axis that holds the grid tokens."""
        return slice(self.prefix, self.prefix + self.spatial_tokens)

    @classmethod
    def infer(
        cls,
        num_tokens: int,
        aspect: tuple[int, int],
        *,
        frames: int = 1,
        prefix: int = 0,
        suffix: int = 0,
    ) -> TokenGrid:
        """The grid of ``num_tokens`` tokens for an image or latent of shape ``aspect``.

        A grid ``(h, w)`` fits when it has exactly the aspect ratio of ``aspect``
        (``h * aspect[1] == w * aspect[0]``), or, failing that, when it is what an
        integer downsampling factor ``s`` gives with floor or ceil rounding
        (``h in {floor(H/s), ceil(H/s)}``, the same for ``w``), as in UNets whose
        strided convolutions round odd sizes up. The answer must be unique;
        a square is never guessed.

        Parameters
        ----------
        num_tokens
            Length of the token axis, prefix and suffix included.
        aspect
            ``(H, W)``: the spatial shape of the image or latent the tokens come from.
        frames, prefix, suffix
            As in :class:`TokenGrid`.

        Returns
        -------
        TokenGrid

        Raises
        ------
        ValueError
            If no grid, or more than one, fits.

        Examples
        --------
        >>> TokenGrid.infer(32 * 64, aspect=(64, 128))
        TokenGrid(height=32, width=64, frames=1, prefix=0, suffix=0)
        >>> TokenGrid.infer(13 * 8, aspect=(100, 60))  # 100x60 halved three times, rounding up
        TokenGrid(height=13, width=8, frames=1, prefix=0, suffix=0)
        """
        num_tokens = _check_count(num_tokens, "num_tokens", minimum=1)
        frames = _check_count(frames, "frames", minimum=1)
        prefix = _check_count(prefix, "prefix", minimum=0)
        suffix = _check_count(suffix, "suffix", minimum=0)
        big_h, big_w = _check_aspect(aspect)
        spatial = num_tokens - prefix - suffix
        if spatial < 1 or spatial % frames:
            raise ValueError(
                f"num_tokens={num_tokens} minus prefix={prefix} and suffix={suffix} leaves "
                f"{spatial} spatial tokens, which is not a positive multiple of frames={frames}"
            )
        n = spatial // frames
        g = math.gcd(big_h, big_w)
        a, b = big_h // g, big_w // g
        k = math.isqrt(n // (a * b)) if n % (a * b) == 0 else 0
        if k and a * b * k * k == n:
            return cls(a * k, b * k, frames=frames, prefix=prefix, suffix=suffix)
        fits = {
            (h, n // h)
            for h in _divisors(n)
            if _factors_overlap(_factor_range(big_h, h), _factor_range(big_w, n // h))
        }
        if len(fits) == 1:
            h, w = fits.pop()
            return cls(h, w, frames=frames, prefix=prefix, suffix=suffix)
        if fits:
            raise ValueError(
                f"{n} tokens per frame fit several grids for aspect={aspect}: "
                f"{sorted(fits)}; pass an explicit TokenGrid"
            )
        raise ValueError(
            f"{n} tokens per frame fit no grid with the aspect of {aspect} (exact ratio, or "
            "an integer downsampling with floor/ceil rounding); pass an explicit TokenGrid "
            "or check prefix/suffix"
        )
