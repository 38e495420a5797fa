"""Shared pieces of the transformer families: call binding, block-range presets, video layout."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..grid import TokenGrid
from ..torch import Geometry
from ..torch._deps import torch

__all__ = ["VideoTokens", "bind_call", "latent_tensor", "thirds"]


def bind_call(
    model: torch.nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> dict[str, Any]:
    """The arguments of a ``model(*args, **kwargs)`` call by parameter name.

    Parameters
    ----------
    model
        The module whose ``forward`` signature names the arguments.
    args, kwargs
        The call's arguments.

    Returns
    -------
    dict
        Parameter name -> value, for the arguments actually passed.
    """
    try:
        bound = inspect.signature(model.forward).bind_partial(*args, **kwargs)
    except TypeError as exc:
        raise ValueError(
            f"cannot match the call's arguments to {type(model).__name__}.forward: {exc}"
        ) from exc
    return dict(bound.arguments)


def latent_tensor(
    model: torch.nn.Module, call: Mapping[str, Any], name: str, ndim: int
) -> torch.Tensor:
    """The tensor argument ``name`` of a bound call, checked to have ``ndim`` axes."""
    x = call.get(name)
    if not isinstance(x, torch.Tensor) or x.ndim != ndim:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(
            f"{type(model).__name__} must be called with {name} as a {ndim}-D tensor to find its "
            f"token grid; got {got}"
        )
    return x


def thirds(names: Sequence[str], prefix: str = "") -> dict[str, tuple[str, ...]]:
    """Split an ordered stack of layers into ``early``, ``mid`` and ``late`` presets.

    With ``n`` layers, ``early`` holds the first ``n // 3``, ``late`` the last
    ``n // 3`` and ``mid`` the rest (for ``n < 3``: ``mid`` is everything).

    Parameters
    ----------
    names
        Layer names in depth order.
    prefix
        Prepended to the preset names (``"double."`` gives ``"double.mid"``).

    Returns
    -------
    dict
        ``{prefix + "early": ..., prefix + "mid": ..., prefix + "late": ...}``.

    Examples
    --------
    >>> thirds(["a", "b", "c", "d"])
    {'early': ('a',), 'mid': ('b', 'c'), 'late': ('d',)}
    >>> thirds(["a", "b"], prefix="x.")["x.mid"]
    ('a', 'b')
    """
    names = tuple(names)
    k = len(names) // 3
    return {
        f"{prefix}early": names[:k],
        f"{prefix}mid": names[k : len(names) - k],
        f"{prefix}late": names[len(names) - k :] if k else (),
    }


@dataclass(frozen=True)
class VideoTokens:
    """Video self-attention over ``frames x h x w`` tokens in frame-major, row-major order.

    The grid is ``TokenGrid(h, w, frames=geometry.frames)`` with the
    ``geometry.tokens`` tokens per frame laid out with the latent's aspect. A
    single ``sigma`` blurs each frame spatially; ``(σ_t, σ_h, σ_w)`` also blurs
    along the frame axis.

    Examples
    --------
    >>> VideoTokens().grid(3 * 4 * 6, Geometry(batch=1, height=4, width=6, frames=3, tokens=24))
    TokenGrid(height=4, width=6, frames=3, prefix=0, suffix=0)
    """

    def grid(self, num_tokens: int, geometry: Geometry) -> TokenGrid:
        """The grid of this layer's ``num_tokens`` tokens."""
        if geometry.tokens is not None and num_tokens != geometry.tokens * geometry.frames:
            raise ValueError(
                f"video self-attention saw {num_tokens} tokens, but the model input has "
                f"{geometry.frames} frames x {geometry.tokens} tokens"
            )
        return TokenGrid.infer(
            num_tokens, aspect=(geometry.height, geometry.width), frames=geometry.frames
        )
