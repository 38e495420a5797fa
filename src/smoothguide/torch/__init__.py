"""PyTorch adapter: fast query smoothing and attention patching of any ``torch.nn.Module``.

Needs the ``torch`` extra (``pip install 'smoothguide[torch]'``).

- :func:`smooth_queries`: torch fast path of :func:`smoothguide.smooth_queries`.
- :class:`AttentionPatcher`: the :class:`smoothguide.branches.Perturber` for torch
  models: SEG (query smoothing) and PAG (identity attention) on chosen layers and rows.
- :func:`compilable`: SEG and PAG in models compiled with ``torch.compile``, without recompilation.
- :class:`Geometry`, :func:`image_geometry`, :class:`LayerSpec`, :class:`ImageTokens`,
  :class:`JointTokens`: where each layer's token grid comes from.
"""

from __future__ import annotations

from ._deps import torch as _torch  # noqa: F401  (fails early, naming the extra)
from .compile import compilable
from .layouts import (
    Geometry,
    GeometryFn,
    ImageTokens,
    JointTokens,
    LayerSpec,
    TokenLayout,
    image_geometry,
)
from .patching import AttentionPatcher, LayerSource
from .smoothing import smooth_queries

__all__ = [
    "AttentionPatcher",
    "Geometry",
    "GeometryFn",
    "ImageTokens",
    "JointTokens",
    "LayerSource",
    "LayerSpec",
    "TokenLayout",
    "compilable",
    "image_geometry",
    "smooth_queries",
]
