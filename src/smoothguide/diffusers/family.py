"""Model families: how a diffusers model declares its perturbable attention layers.

A :class:`ModelFamily` says which models it serves, which attention modules
SEG/PAG may perturb (with each one's token layout), the block presets and the
default selection, and how a forward call's inputs give the token geometry.
:func:`patcher_for` turns a model into an
:class:`~smoothguide.torch.AttentionPatcher` through the first registered
family that matches. New architectures register a family with
:func:`register_family`; nothing else changes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..perturbations import LayerSelection
from ..torch import AttentionPatcher, GeometryFn, LayerSpec, image_geometry
from ..torch._deps import torch
from ..torch.fork import ForkPolicy

__all__ = [
    "ModelFamily",
    "families",
    "family_for",
    "patcher_for",
    "register_family",
]


def _image_geometry_factory(model: torch.nn.Module) -> GeometryFn:
    return image_geometry


@dataclass(frozen=True)
class ModelFamily:
    """How a family of diffusers models exposes its attention layers to SEG and PAG.

    Parameters
    ----------
    name
        Short identifier, e.g. ``"unet2d"``.
    matches
        ``model -> bool``: whether this family serves ``model``.
    layers
        ``model -> {module name: LayerSpec}``: every perturbable self-attention
        module, in module order.
    presets
        ``model -> {preset: module names}``: block presets.
    default
        Selection used when a perturbation's ``layers`` is ``None``: a preset or
        module name, or a tuple of them.
    geometry
        ``model -> GeometryFn``: builds the function that reads a forward
        call's :class:`~smoothguide.torch.Geometry` (default: the latent is
        the first ``(B, C, H, W)`` / ``(B, C, F, H, W)`` input).
    fork
        The :class:`~smoothguide.torch.fork.ForkPolicy` of fork mode; default
        the generic one, which is not proven (fork mode only with ``fork=True``).

    Examples
    --------
    A family for a hand-written model whose attention modules are named ``*.attn``:

    >>> from smoothguide.torch import LayerSpec
    >>> fam = ModelFamily(
    ...     name="my-dit",
    ...     matches=lambda m: type(m).__name__ == "MyDiT",
    ...     layers=lambda m: {n: LayerSpec() for n, _ in m.named_modules() if n.endswith(".attn")},
    ...     presets=lambda m: {},
    ...     default=None,
    ... )
    >>> fam.name
    'my-dit'
    """

    name: str
    matches: Callable[[torch.nn.Module], bool]
    layers: Callable[[torch.nn.Module], dict[str, LayerSpec]]
    presets: Callable[[torch.nn.Module], dict[str, tuple[str, ...]]]
    default: LayerSelection
    geometry: Callable[[torch.nn.Module], GeometryFn] = _image_geometry_factory
    fork: ForkPolicy = field(default_factory=ForkPolicy)

    def patcher(self, model: torch.nn.Module) -> AttentionPatcher:
        """An :class:`~smoothguide.torch.AttentionPatcher` for ``model``."""
        return AttentionPatcher(
            model,
            self.layers(model),
            presets=self.presets(model),
            default=self.default,
            geometry=self.geometry(model),
            fork=self.fork,
        )


_FAMILIES: list[ModelFamily] = []


def register_family(family: ModelFamily) -> ModelFamily:
    """Register ``family`` (replacing one of the same name); returns it.

    Parameters
    ----------
    family
        The :class:`ModelFamily`.

    Returns
    -------
    ModelFamily

    Examples
    --------
    >>> fam = ModelFamily("doc-example", lambda m: False, lambda m: {}, lambda m: {}, None)
    >>> register_family(fam) is fam, fam in families()
    (True, True)
    """
    if not isinstance(family, ModelFamily):
        raise TypeError(f"family must be a ModelFamily, got {type(family).__name__}")
    _FAMILIES[:] = [f for f in _FAMILIES if f.name != family.name]
    _FAMILIES.append(family)
    return family


def families() -> tuple[ModelFamily, ...]:
    """The registered families, in registration order.

    Returns
    -------
    tuple of ModelFamily

    Examples
    --------
    >>> from smoothguide.diffusers import families  # importing the package registers "unet2d"
    >>> "unet2d" in [f.name for f in families()]
    True
    """
    return tuple(_FAMILIES)


def family_for(model: torch.nn.Module) -> ModelFamily:
    """The first registered family that matches ``model``.

    Parameters
    ----------
    model
        A diffusers model (or any module a registered family serves).

    Returns
    -------
    ModelFamily

    Raises
    ------
    TypeError
        If none does; the message lists the registered families.

    Examples
    --------
    >>> family_for(torch.nn.Linear(2, 2))
    Traceback (most recent call last):
    ...
    TypeError: no smoothguide model family serves Linear; registered families: [...
    """
    for family in _FAMILIES:
        if family.matches(model):
            return family
    raise TypeError(
        f"no smoothguide model family serves {type(model).__name__}; registered families: "
        f"{[f.name for f in _FAMILIES]}. Use smoothguide.torch.AttentionPatcher with explicit "
        "layers, or register a ModelFamily"
    )


def patcher_for(model: torch.nn.Module) -> AttentionPatcher:
    """An :class:`~smoothguide.torch.AttentionPatcher` for a diffusers model, via its family.

    Parameters
    ----------
    model
        E.g. a ``UNet2DConditionModel``.

    Returns
    -------
    AttentionPatcher
        With the family's layers, presets, default selection and geometry.

    Examples
    --------
    >>> import diffusers
    >>> from smoothguide.diffusers import patcher_for
    >>> unet = diffusers.UNet2DConditionModel(
    ...     block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
    ...     cross_attention_dim=8, attention_head_dim=2,
    ...     down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    ...     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    >>> patcher_for(unet).default
    ('mid_block.attentions.0.transformer_blocks.0.attn1',)
    """
    return family_for(model).patcher(model)
