"""SD3Transformer2DModel (Stable Diffusion 3 / 3.5, MMDiT): joint attention, image tokens only.

Every ``transformer_blocks.<i>.attn`` is a *joint* attention over
``cat([image tokens, text tokens])`` (``JointAttnProcessor2_0``): the text
tokens are a **suffix** of the sequence. SEG blurs the image-token queries only,
on the ``(H / p) x (W / p)`` patch grid of the latent ``hidden_states``
(``p = config.patch_size``); text queries, all keys and values are untouched.
SD3.5 Medium's extra image-only self-attention ``transformer_blocks.<i>.attn2``
(``dual_attention_layers``) is perturbable too.

The query is blurred where it enters ``softmax(Q Kᵀ / √d)``: after the QK
RMS-norm of SD3.5 (a per-token nonlinearity, so blurring before it would not
blur the logits; Hong 2024, Prop. 3.1 needs the query of the logits).

Presets (``n = len(transformer_blocks)``; blocks split in thirds by depth):

``"mid"`` (default)
    joint ``attn`` of the middle third of the blocks (SD3.5 Medium, 24 blocks:
    8–15; SD3.5 Large, 38 blocks: 12–25).
``"early"``, ``"late"``
    joint ``attn`` of the first / last third.
``"joint"``
    every joint ``attn``.
``"dual"``
    every image-only ``attn2`` (SD3.5 Medium's blocks 0–12).
``"block.<i>"``
    ``attn`` (and ``attn2`` if present) of block ``i``.
"""

from __future__ import annotations

from typing import Any

from ..torch import Geometry, GeometryFn, ImageTokens, JointTokens, LayerSpec
from ..torch._deps import torch
from ..torch.fork import ForkPolicy
from ._blocks import bind_call, latent_tensor, thirds
from ._deps import diffusers
from .family import ModelFamily, register_family

__all__ = ["SD3", "sd3_geometry", "sd3_layers", "sd3_presets"]


def _is_sd3(model: torch.nn.Module) -> bool:
    return isinstance(model, diffusers.SD3Transformer2DModel)


def sd3_layers(model: torch.nn.Module) -> dict[str, LayerSpec]:
    """Joint ``attn`` (text suffix) and image-only ``attn2`` of every SD3 block, in module order.

    Parameters
    ----------
    model
        An ``SD3Transformer2DModel``.

    Returns
    -------
    dict
        Module name -> :class:`~smoothguide.torch.LayerSpec`.

    Examples
    --------
    >>> model = diffusers.SD3Transformer2DModel(
    ...     sample_size=32, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
    ...     num_attention_heads=2, caption_projection_dim=16, joint_attention_dim=16,
    ...     pooled_projection_dim=8, out_channels=4, dual_attention_layers=(0,))
    >>> sd3_layers(model)  # doctest: +NORMALIZE_WHITESPACE
    {'transformer_blocks.0.attn': LayerSpec(layout=JointTokens(text='suffix')),
     'transformer_blocks.0.attn2': LayerSpec(layout=ImageTokens()),
     'transformer_blocks.1.attn': LayerSpec(layout=JointTokens(text='suffix')),
     'transformer_blocks.2.attn': LayerSpec(layout=JointTokens(text='suffix'))}
    """
    layers: dict[str, LayerSpec] = {}
    for i, block in enumerate(getattr(model, "transformer_blocks")):  # noqa: B009
        layers[f"transformer_blocks.{i}.attn"] = LayerSpec(JointTokens("suffix"))
        if getattr(block, "attn2", None) is not None:
            layers[f"transformer_blocks.{i}.attn2"] = LayerSpec(ImageTokens())
    return layers


def sd3_presets(model: torch.nn.Module) -> dict[str, tuple[str, ...]]:
    """Presets ``"early"``, ``"mid"``, ``"late"``, ``"joint"``, ``"dual"``, ``"block.<i>"``.

    Parameters
    ----------
    model
        An ``SD3Transformer2DModel``.

    Returns
    -------
    dict
        Preset name -> module names of :func:`sd3_layers`.

    Examples
    --------
    >>> model = diffusers.SD3Transformer2DModel(
    ...     sample_size=32, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
    ...     num_attention_heads=2, caption_projection_dim=16, joint_attention_dim=16,
    ...     pooled_projection_dim=8, out_channels=4, dual_attention_layers=(0,))
    >>> presets = sd3_presets(model)
    >>> list(presets)
    ['joint', 'early', 'mid', 'late', 'dual', 'block.0', 'block.1', 'block.2']
    >>> presets["mid"], presets["dual"]
    (('transformer_blocks.1.attn',), ('transformer_blocks.0.attn2',))
    >>> presets["block.0"]
    ('transformer_blocks.0.attn', 'transformer_blocks.0.attn2')
    """
    n = len(getattr(model, "transformer_blocks"))  # noqa: B009
    joint = tuple(f"transformer_blocks.{i}.attn" for i in range(n))
    names = sd3_layers(model)
    presets = {"joint": joint, **thirds(joint)}
    presets["dual"] = tuple(name for name in names if name.endswith(".attn2"))
    for i in range(n):
        presets[f"block.{i}"] = tuple(
            name for name in names if name.startswith(f"transformer_blocks.{i}.")
        )
    return presets


def sd3_geometry(model: torch.nn.Module) -> GeometryFn:
    """Geometry of an SD3 call: the ``(H / p) x (W / p)`` patch grid of ``hidden_states``.

    Parameters
    ----------
    model
        An ``SD3Transformer2DModel`` (its ``config.patch_size`` is read).

    Returns
    -------
    GeometryFn
        Maps a call's ``(args, kwargs)`` to its :class:`~smoothguide.torch.Geometry`.

    Examples
    --------
    >>> model = diffusers.SD3Transformer2DModel(
    ...     sample_size=32, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
    ...     num_attention_heads=2, caption_projection_dim=16, joint_attention_dim=16,
    ...     pooled_projection_dim=8, out_channels=4, dual_attention_layers=(0,))
    >>> geometry = sd3_geometry(model)  # patch size 2
    >>> geometry((torch.zeros(1, 4, 16, 24),), {})
    Geometry(batch=1, height=8, width=12, frames=1, tokens=96)
    """
    patch = int(getattr(model, "config").patch_size)  # noqa: B009

    def geometry(args: tuple[Any, ...], kwargs: Any) -> Geometry:
        x = latent_tensor(model, bind_call(model, args, kwargs), "hidden_states", 4)
        height, width = x.shape[-2] // patch, x.shape[-1] // patch
        return Geometry(batch=x.shape[0], height=height, width=width, tokens=height * width)

    return geometry


#: The family of ``diffusers.SD3Transformer2DModel``; default preset ``"mid"``.
SD3 = register_family(
    ModelFamily(
        name="sd3",
        matches=_is_sd3,
        layers=sd3_layers,
        presets=sd3_presets,
        default="mid",
        geometry=sd3_geometry,
        # fork at the block of the first perturbed layer, copying the rows at the previous
        # block's output (the block loop hands them on unchanged); exact (tests/test_fork.py)
        fork=ForkPolicy(
            proven=True, refuse=("block_controlnet_hidden_states",), copy_at_previous=True
        ),
    )
)
