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
from dataclasses import dataclass

from ..perturbations import LayerSelection
from ..torch import AttentionPatcher, GeometryFn, LayerSpec, image_geometry
from ..torch._deps import torch

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
    """

    name: str
    matches: Callable[[torch.nn.Module], bool]
    layers: Callable[[torch.nn.Module], dict[str, LayerSpec]]
    presets: Callable[[torch.nn.Module], dict[str, tuple[str, ...]]]
    default: LayerSelection
    geometry: Callable[[torch.nn.Module], GeometryFn] = _image_geometry_factory

    def patcher(self, model: torch.nn.Module) -> AttentionPatcher:
        """An :class:`~smoothguide.torch.AttentionPatcher` for ``model``."""
        return AttentionPatcher(
            model,
            self.layers(model),
            presets=self.presets(model),
            default=self.default,
            geometry=self.geometry(model),
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
    """
    if not isinstance(family, ModelFamily):
        raise TypeError(f"family must be a ModelFamily, got {type(family).__name__}")
    _FAMILIES[:] = [f for f in _FAMILIES if f.name != family.name]
    _FAMILIES.append(family)
    return family


def families() -> tuple[ModelFamily, ...]:
    """The registered families, in registration order."""
    return tuple(_FAMILIES)


def family_for(model: torch.nn.Module) -> ModelFamily:
    """The first registered family that matches ``model``.

    Raises
    ------
    TypeError
        If none does; the message lists the registered families.
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
    """An :class:`~smoothguide.torch.AttentionPatcher` for a diffusers model, via its family."""
    return family_for(model).patcher(model)
