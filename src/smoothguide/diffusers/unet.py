"""UNet2DConditionModel (Stable Diffusion 1.x/2.x, SDXL): self-attention layers and presets.

Perturbable layers are the self-attention modules ``...transformer_blocks.<k>.attn1``
of every down, mid and up block (cross-attention ``attn2`` is never touched).
Presets:

``"mid"`` (default)
    every ``attn1`` under ``mid_block``: the paper's and the official code's
    choice for SDXL (10 transformer blocks there; 1 in SD 1.5).
``"down"``, ``"up"``
    every ``attn1`` of the down or up path.
``"down.<i>"``, ``"up.<i>"``
    every ``attn1`` of ``down_blocks[i]`` / ``up_blocks[i]``.

Exact module names (``"up_blocks.0.attentions.1.transformer_blocks.2.attn1"``)
work too. Each layer's grid is inferred from its token count with the latent's
aspect (down/up levels have smaller grids with the same aspect).
"""

from __future__ import annotations

from ..torch import ImageTokens, LayerSpec
from ..torch._deps import torch
from ._deps import diffusers
from .family import ModelFamily, register_family

__all__ = ["UNET2D", "unet_layers", "unet_presets"]

_BLOCKS = ("down_blocks", "mid_block", "up_blocks")


def _is_unet(model: torch.nn.Module) -> bool:
    return isinstance(model, diffusers.UNet2DConditionModel)


def unet_layers(unet: torch.nn.Module) -> dict[str, LayerSpec]:
    """Self-attention ``attn1`` modules of a UNet, in module order.

    Parameters
    ----------
    unet
        A ``UNet2DConditionModel``.

    Returns
    -------
    dict
        Module name -> :class:`~smoothguide.torch.LayerSpec` (image tokens).

    Examples
    --------
    >>> unet = diffusers.UNet2DConditionModel(
    ...     block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
    ...     cross_attention_dim=8, attention_head_dim=2,
    ...     down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    ...     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    >>> list(unet_layers(unet))  # doctest: +NORMALIZE_WHITESPACE
    ['down_blocks.0.attentions.0.transformer_blocks.0.attn1',
     'up_blocks.1.attentions.0.transformer_blocks.0.attn1',
     'up_blocks.1.attentions.1.transformer_blocks.0.attn1',
     'mid_block.attentions.0.transformer_blocks.0.attn1']
    """
    attention = diffusers.models.attention_processor.Attention
    return {
        name: LayerSpec(ImageTokens())
        for name, module in unet.named_modules()
        if name.endswith(".attn1")
        and name.split(".")[0] in _BLOCKS
        and isinstance(module, attention)
        and not module.is_cross_attention
    }


def unet_presets(unet: torch.nn.Module) -> dict[str, tuple[str, ...]]:
    """Block presets ``"down"``, ``"mid"``, ``"up"``, ``"down.<i>"``, ``"up.<i>"`` of a UNet.

    Parameters
    ----------
    unet
        A ``UNet2DConditionModel``.

    Returns
    -------
    dict
        Preset -> module names (in module order); a block without self-attention
        maps to an empty tuple (selecting it alone raises).

    Examples
    --------
    >>> unet = diffusers.UNet2DConditionModel(
    ...     block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
    ...     cross_attention_dim=8, attention_head_dim=2,
    ...     down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    ...     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    >>> {k: len(v) for k, v in unet_presets(unet).items()}
    {'down': 1, 'mid': 1, 'up': 2, 'down.0': 1, 'down.1': 0, 'up.0': 0, 'up.1': 2}
    """
    names = list(unet_layers(unet))
    presets: dict[str, tuple[str, ...]] = {
        "down": tuple(n for n in names if n.startswith("down_blocks.")),
        "mid": tuple(n for n in names if n.startswith("mid_block.")),
        "up": tuple(n for n in names if n.startswith("up_blocks.")),
    }
    for path in ("down", "up"):
        blocks = getattr(unet, f"{path}_blocks", [])
        for i in range(len(blocks)):
            prefix = f"{path}_blocks.{i}."
            presets[f"{path}.{i}"] = tuple(n for n in names if n.startswith(prefix))
    return presets


#: The family of ``diffusers.UNet2DConditionModel`` (SD 1.x/2.x, SDXL); default preset ``"mid"``.
UNET2D = register_family(
    ModelFamily(
        name="unet2d",
        matches=_is_unet,
        layers=unet_layers,
        presets=unet_presets,
        default="mid",
    )
)
