"""Where an attention layer's token grid comes from: the model input's geometry and a token layout.

A forward pre-hook on the top-level model turns its inputs into a
:class:`Geometry` (batch size, latent height and width, frames, and, for
patchified transformers, the number of image tokens). Each perturbed attention
layer then asks its :class:`TokenLayout` for the :class:`~smoothguide.TokenGrid`
of the token axis it actually sees. Grids are never guessed as squares.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from ..grid import TokenGrid
from ._deps import torch

__all__ = [
    "Geometry",
    "GeometryFn",
    "ImageTokens",
    "JointTokens",
    "LayerSpec",
    "TokenLayout",
    "image_geometry",
]


@dataclass(frozen=True)
class Geometry:
    """What a model call tells us about its token grids.

    Parameters
    ----------
    batch
        Number of rows of the model call (the rows ``perturb`` indexes).
    height, width
        Spatial shape of the latent (the aspect every grid of the call shares).
    frames
        Number of frames (video), default 1.
    tokens
        Image tokens per frame in the attention sequence, when the model
        patchifies (SD3, Flux, DiT); ``None`` when every layer's grid is inferred
        from its token count (UNets, whose levels have different grids).

    Examples
    --------
    >>> Geometry(batch=2, height=64, width=96)
    Geometry(batch=2, height=64, width=96, frames=1, tokens=None)
    """

    batch: int
    height: int
    width: int
    frames: int = 1
    tokens: int | None = None

    def __post_init__(self) -> None:
        for name in ("batch", "height", "width", "frames"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Geometry.{name} must be an int >= 1, got {value!r}")
        if self.tokens is not None and (
            isinstance(self.tokens, bool) or not isinstance(self.tokens, int) or self.tokens < 1
        ):
            raise ValueError(f"Geometry.tokens must be None or an int >= 1, got {self.tokens!r}")


#: Maps a model call's ``(args, kwargs)`` to its :class:`Geometry`.
GeometryFn = Callable[[tuple[Any, ...], Mapping[str, Any]], Geometry]

_INPUT_NAMES = ("sample", "hidden_states", "x", "input", "latents")


def image_geometry(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Geometry:
    """Geometry of a call whose latent is ``(B, C, H, W)`` or ``(B, C, F, H, W)``.

    The latent is the first positional argument, else the first of the keyword
    arguments ``sample``, ``hidden_states``, ``x``, ``input``, ``latents``.

    Parameters
    ----------
    args, kwargs
        The model call's arguments.

    Returns
    -------
    Geometry

    Raises
    ------
    ValueError
        If no 4-D or 5-D tensor is found there.

    Examples
    --------
    >>> image_geometry((torch.zeros(3, 4, 24, 8),), {})
    Geometry(batch=3, height=24, width=8, frames=1, tokens=None)
    """
    candidates = [args[0]] if args else []
    candidates += [kwargs[k] for k in _INPUT_NAMES if k in kwargs]
    for x in candidates:
        if isinstance(x, torch.Tensor) and x.ndim == 4:
            return Geometry(batch=x.shape[0], height=x.shape[2], width=x.shape[3])
        if isinstance(x, torch.Tensor) and x.ndim == 5:
            return Geometry(
                batch=x.shape[0], height=x.shape[3], width=x.shape[4], frames=x.shape[2]
            )
    shapes = [
        tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__ for x in candidates
    ]
    raise ValueError(
        "image_geometry needs the model's latent as a (B, C, H, W) or (B, C, F, H, W) tensor "
        f"in the first positional argument or one of the keywords {_INPUT_NAMES}; got {shapes}. "
        "Pass geometry= to AttentionPatcher for other inputs."
    )


@runtime_checkable
class TokenLayout(Protocol):
    """How one attention layer's token axis maps to a grid, given the call's geometry."""

    def grid(self, num_tokens: int, geometry: Geometry) -> TokenGrid:  # pragma: no cover
        """The :class:`~smoothguide.TokenGrid` of ``num_tokens`` tokens in this layer."""
        ...


@dataclass(frozen=True)
class ImageTokens:
    """Only image tokens, ``frames * h * w`` of them, with the latent's aspect (UNet levels, DiT).

    For a video input (``geometry.frames = F > 1``) the token axis is either one
    frame (spatial attention, frames folded into the batch: a 2-D grid) or all
    ``F`` frames (full 3-D attention: ``TokenGrid(h, w, frames=F)``). The token
    count decides, among grids no larger than the latent; when both fit, the
    layer is ambiguous and raises ``ValueError``: give it a
    :class:`LayerSpec` with an explicit layout.

    Examples
    --------
    >>> ImageTokens().grid(12 * 4, Geometry(batch=1, height=24, width=8))
    TokenGrid(height=12, width=4, frames=1, prefix=0, suffix=0)
    >>> ImageTokens().grid(3 * 4 * 6, Geometry(batch=1, height=4, width=6, frames=3))
    TokenGrid(height=4, width=6, frames=3, prefix=0, suffix=0)
    """

    def grid(self, num_tokens: int, geometry: Geometry) -> TokenGrid:
        aspect = (geometry.height, geometry.width)
        if geometry.frames == 1:
            return TokenGrid.infer(num_tokens, aspect=aspect)
        fits: dict[str, TokenGrid] = {}
        errors = []
        for kind, frames in (("3-D attention over all frames", geometry.frames), ("one frame", 1)):
            try:
                g = TokenGrid.infer(num_tokens, aspect=aspect, frames=frames)
            except ValueError as exc:
                errors.append(f"{kind}: {exc}")
                continue
            # Tokens of a video latent come from it by patchifying or downsampling.
            if g.height <= geometry.height and g.width <= geometry.width:
                fits[kind] = g
            else:
                errors.append(f"{kind}: {g} is larger than the latent")
        if len(fits) == 1:
            return next(iter(fits.values()))
        if not fits:
            raise ValueError(
                f"no token grid fits {num_tokens} tokens of a {geometry.frames}-frame "
                f"{geometry.height}x{geometry.width} latent ({'; '.join(errors)})"
            )
        raise ValueError(
            f"{num_tokens} tokens of a {geometry.frames}-frame {geometry.height}x{geometry.width} "
            f"latent fit both {fits['3-D attention over all frames']} and "
            f"{fits['one frame']} (one frame); give this layer a LayerSpec whose layout says "
            "which (e.g. a TokenLayout returning TokenGrid(h, w, frames=F))"
        )


@dataclass(frozen=True)
class JointTokens:
    """Joint attention: ``geometry.tokens`` image tokens plus text tokens before or after them.

    Parameters
    ----------
    text
        ``"prefix"`` (text first, e.g. Flux's ``cat([txt, img])``) or
        ``"suffix"`` (image first, e.g. SD3's ``cat([img, txt])``).

    Examples
    --------
    >>> JointTokens("suffix").grid(6 + 4, Geometry(batch=1, height=4, width=6, tokens=6))
    TokenGrid(height=2, width=3, frames=1, prefix=0, suffix=4)
    """

    text: Literal["prefix", "suffix"]

    def __post_init__(self) -> None:
        if self.text not in ("prefix", "suffix"):
            raise ValueError(f"text must be 'prefix' or 'suffix', got {self.text!r}")

    def grid(self, num_tokens: int, geometry: Geometry) -> TokenGrid:
        if geometry.tokens is None:
            raise ValueError(
                "JointTokens needs Geometry.tokens (image tokens per frame in the sequence); "
                "the model family's geometry function must set it"
            )
        image = geometry.tokens * geometry.frames
        extra = num_tokens - image
        if extra < 0:
            raise ValueError(
                f"joint attention saw {num_tokens} tokens, fewer than the {image} image tokens "
                "of the model input"
            )
        side = {"prefix": extra} if self.text == "prefix" else {"suffix": extra}
        return TokenGrid.infer(
            num_tokens, aspect=(geometry.height, geometry.width), frames=geometry.frames, **side
        )


@dataclass(frozen=True)
class LayerSpec:
    """How a perturbable attention layer lays out its tokens.

    Parameters
    ----------
    layout
        A :class:`TokenLayout`; default :class:`ImageTokens`.

    Examples
    --------
    >>> LayerSpec().layout
    ImageTokens()
    """

    layout: TokenLayout = field(default_factory=ImageTokens)

    def __post_init__(self) -> None:
        if not isinstance(self.layout, TokenLayout):
            raise TypeError(
                f"layout must implement TokenLayout (a grid(num_tokens, geometry) method), "
                f"got {type(self.layout).__name__}"
            )
