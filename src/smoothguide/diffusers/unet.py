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

from collections.abc import Mapping, Sequence
from typing import Any

from ..torch import ImageTokens, LayerSpec
from ..torch._deps import torch
from ..torch.fork import ForkPolicy
from ._deps import diffusers
from .family import ModelFamily, register_family

__all__ = ["UNET2D", "UNetForkPolicy", "unet_layers", "unet_presets"]

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


class UNetForkPolicy(ForkPolicy):
    """Fork mode of ``UNet2DConditionModel``: fork at the top-level block of the first layer.

    The fork point of a layer is ``down_blocks.<i>``, ``mid_block`` or
    ``up_blocks.<i>``, whichever holds it; blocks run down, mid, up. After a
    fork point the UNet's ``forward`` only hands its values to later blocks
    (skip connections, ``emb``, encoder states: expanded by the fork hooks),
    except ControlNet's ``mid_block_additional_residual``, added right after
    the mid block, which is therefore given at the batch in effect there.
    Proven exact (tests/test_fork.py), so on by default. Refused (``ValueError``):
    ControlNet's down-block residuals with a fork in the down blocks, and
    T2I-Adapter residuals, since the UNet adds those outside a module call.

    Examples
    --------
    >>> policy = UNetForkPolicy()
    >>> policy.point(None, "up_blocks.1.attentions.0.transformer_blocks.0.attn1")
    'up_blocks.1'
    >>> policy.rank(None, "mid_block") < policy.rank(None, "up_blocks.0")
    True
    """

    def __init__(self) -> None:
        super().__init__(proven=True)

    def point(self, model: torch.nn.Module, layer: str) -> str:
        parts = layer.split(".")
        if parts[0] == "mid_block":
            return "mid_block"
        if parts[0] in ("down_blocks", "up_blocks") and len(parts) > 1:
            return ".".join(parts[:2])
        raise ValueError(f"UNet fork mode: layer {layer!r} is in no down, mid or up block")

    def rank(self, model: torch.nn.Module, point: str) -> Any:
        parts = point.split(".")
        path = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}[parts[0]]
        return (path, int(parts[1]) if len(parts) > 1 else 0)

    def stages_of(
        self, model: torch.nn.Module, kwargs: Mapping[str, Any], points: Sequence[str]
    ) -> dict[str, int]:
        down = [p for p in points if p.startswith("down_blocks.")]
        if down and kwargs.get("down_block_additional_residuals") is not None:
            raise ValueError(
                f"UNet fork mode cannot fork in {down[0]} with ControlNet's "
                "down_block_additional_residuals (the UNet adds them to the skip connections "
                "outside a module call); perturb mid/up layers only or pass fork=False"
            )
        if kwargs.get("down_intrablock_additional_residuals") is not None:
            raise ValueError(
                "UNet fork mode does not support T2I-Adapter residuals "
                "(down_intrablock_additional_residuals, added in place outside a module call); "
                "pass fork=False"
            )
        # The mid-block residual is added after the mid block: the forks up to there have run.
        after_mid = sum(self.rank(model, p) <= (1, 0) for p in points)
        return {"mid_block_additional_residual": after_mid}


#: The family of ``diffusers.UNet2DConditionModel`` (SD 1.x/2.x, SDXL); default preset ``"mid"``.
UNET2D = register_family(
    ModelFamily(
        name="unet2d",
        matches=_is_unet,
        layers=unet_layers,
        presets=unet_presets,
        default="mid",
        fork=UNetForkPolicy(),
    )
)
