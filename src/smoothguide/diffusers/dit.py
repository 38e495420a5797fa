"""DiT-style transformers (PixArt-α / Σ, DiT): image self-attention ``attn1``.

``PixArtTransformer2DModel`` and ``DiTTransformer2DModel`` patchify the latent
``(B, C, H, W)`` into ``(H / p) x (W / p)`` tokens (row-major) and run
``BasicTransformerBlock`` s: ``attn1`` is self-attention over those image
tokens only (no text tokens in the sequence; PixArt's text enters through the
cross-attention ``attn2``, which is never perturbed).

Presets (blocks split in thirds by depth):

``"mid"`` (default)
    ``attn1`` of the middle third (PixArt, 28 blocks: 9–18; DiT-XL, 28 blocks: 9–18).
``"early"``, ``"late"``, ``"all"``
    first / last third, every block.
``"block.<i>"``
    one block.
"""

from __future__ import annotations

from typing import Any

from ..torch import Geometry, GeometryFn, ImageTokens, LayerSpec
from ..torch._deps import torch
from ..torch.fork import ForkPolicy
from ._blocks import bind_call, latent_tensor, thirds
from ._deps import diffusers
from .family import ModelFamily, register_family

__all__ = ["DIT", "DiTForkPolicy", "dit_geometry", "dit_layers", "dit_presets"]


def _is_dit(model: torch.nn.Module) -> bool:
    return isinstance(model, diffusers.PixArtTransformer2DModel | diffusers.DiTTransformer2DModel)


def dit_layers(model: torch.nn.Module) -> dict[str, LayerSpec]:
    """``transformer_blocks.<i>.attn1`` of a PixArt / DiT transformer, in module order.

    Parameters
    ----------
    model
        A ``PixArtTransformer2DModel`` or ``DiTTransformer2DModel``.

    Returns
    -------
    dict
        Module name -> :class:`~smoothguide.torch.LayerSpec` (image tokens).

    Examples
    --------
    >>> model = diffusers.DiTTransformer2DModel(
    ...     num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
    ...     num_layers=3, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    >>> dit_layers(model)  # doctest: +NORMALIZE_WHITESPACE
    {'transformer_blocks.0.attn1': LayerSpec(layout=ImageTokens()),
     'transformer_blocks.1.attn1': LayerSpec(layout=ImageTokens()),
     'transformer_blocks.2.attn1': LayerSpec(layout=ImageTokens())}
    """
    return {
        f"transformer_blocks.{i}.attn1": LayerSpec(ImageTokens())
        for i in range(len(getattr(model, "transformer_blocks")))  # noqa: B009
    }


def dit_presets(model: torch.nn.Module) -> dict[str, tuple[str, ...]]:
    """Presets ``"early"``, ``"mid"``, ``"late"``, ``"all"`` and ``"block.<i>"``.

    Parameters
    ----------
    model
        A ``PixArtTransformer2DModel`` or ``DiTTransformer2DModel``.

    Returns
    -------
    dict
        Preset name -> module names of :func:`dit_layers` (thirds by depth, every
        block, one block).

    Examples
    --------
    >>> model = diffusers.DiTTransformer2DModel(
    ...     num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
    ...     num_layers=3, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    >>> presets = dit_presets(model)
    >>> list(presets)
    ['all', 'early', 'mid', 'late', 'block.0', 'block.1', 'block.2']
    >>> presets["mid"]
    ('transformer_blocks.1.attn1',)
    """
    names = tuple(dit_layers(model))
    presets = {"all": names, **thirds(names)}
    presets.update({f"block.{i}": (name,) for i, name in enumerate(names)})
    return presets


def dit_geometry(model: torch.nn.Module) -> GeometryFn:
    """Geometry of a PixArt / DiT call: the ``(H / p) x (W / p)`` patch grid of the latent.

    Parameters
    ----------
    model
        The transformer (its ``config.patch_size`` is read).

    Returns
    -------
    GeometryFn
        Maps a call's ``(args, kwargs)`` to its :class:`~smoothguide.torch.Geometry`.

    Examples
    --------
    >>> model = diffusers.DiTTransformer2DModel(
    ...     num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
    ...     num_layers=3, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    >>> geometry = dit_geometry(model)  # patch size 2
    >>> geometry((), {"hidden_states": torch.zeros(2, 4, 8, 12)})
    Geometry(batch=2, height=4, width=6, frames=1, tokens=24)
    """
    patch = int(getattr(model, "config").patch_size)  # noqa: B009

    def geometry(args: tuple[Any, ...], kwargs: Any) -> Geometry:
        x = latent_tensor(model, bind_call(model, args, kwargs), "hidden_states", 4)
        height, width = x.shape[-2] // patch, x.shape[-1] // patch
        return Geometry(batch=x.shape[0], height=height, width=width, tokens=height * width)

    return geometry


class DiTForkPolicy(ForkPolicy):
    """Fork mode of PixArt / DiT: fork at ``transformer_blocks.<i>`` of the first perturbed layer.

    After the blocks both models modulate the last block's output with the
    time embedding in their own ``forward``: ``shift, scale = scale_shift_table
    + embedded_timestep`` (PixArt), ``proj_out_1(silu(emb(t, y)))`` (DiT), then
    ``norm_out(h) * (1 + scale) + shift``.

    * PixArt computes ``embedded_timestep`` once, in ``adaln_single``, before
      the blocks: ``adaln_single`` is an *early* module (its outputs are
      expanded to the forked rows, the blocks before the fork get their
      prefix; see :mod:`smoothguide.torch.fork`).
    * DiT recomputes the embedding after the blocks through module calls
      (``transformer_blocks[0].norm1.emb`` on the pre-fork ``timestep`` and
      ``class_labels``, then ``proj_out_1``, whose input the fork hooks
      expand), so it needs no early module.

    Proven exact (tests/test_fork_dit.py), so on by default.

    Examples
    --------
    >>> model = diffusers.DiTTransformer2DModel(
    ...     num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
    ...     num_layers=3, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    >>> policy = DiTForkPolicy()
    >>> policy.point(model, "transformer_blocks.1.attn1"), policy.early_of(model)
    ('transformer_blocks.1', ())
    """

    def __init__(self) -> None:
        super().__init__(proven=True)

    def early_of(self, model: torch.nn.Module) -> tuple[str, ...]:
        if isinstance(model, diffusers.PixArtTransformer2DModel):
            return ("adaln_single",)
        return ()


#: The family of ``PixArtTransformer2DModel`` and ``DiTTransformer2DModel``; default ``"mid"``.
DIT = register_family(
    ModelFamily(
        name="dit",
        matches=_is_dit,
        layers=dit_layers,
        presets=dit_presets,
        default="mid",
        geometry=dit_geometry,
        fork=DiTForkPolicy(),
    )
)
