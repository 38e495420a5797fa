"""PyTorch adapter: fast query smoothing and attention patching of any ``torch.nn.Module``.

Needs the ``torch`` extra: PyTorch first, then ``pip install ".[torch]"`` from a checkout
(``pip install "smoothguide[torch]"`` once released on PyPI).

- :func:`smooth_queries`: torch fast path of :func:`smoothguide.smooth_queries`.
- :class:`AttentionPatcher`: the :class:`smoothguide.branches.Perturber` for torch
  models: SEG (query smoothing) and PAG (identity attention) on chosen layers and rows.
- :func:`compilable`: SEG and PAG in models compiled with ``torch.compile``, without recompilation.
- :class:`Geometry`, :func:`image_geometry`, :class:`LayerSpec`, :class:`ImageTokens`,
  :class:`JointTokens`: where each layer's token grid comes from.
- :func:`register_perturbation`: run further perturbation kinds through the patcher
  (:class:`~smoothguide.layer_skip.LayerSkip` and
  :class:`~smoothguide.token_permutation.TokenPermutation` are registered on import).
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
from .patching import AttentionPatcher, LayerSource, register_perturbation
from .smoothing import smooth_queries

# Registered with the patcher on import: perturbations outside the attention call.
from . import permute as _permute  # noqa: F401  isort: skip
from . import skip as _skip  # noqa: F401  isort: skip

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
    "register_perturbation",
    "smooth_queries",
]
