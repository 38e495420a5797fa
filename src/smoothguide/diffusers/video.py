"""Video transformers with full 3-D attention: LTX-Video, Wan 2.x and CogVideoX.

Both run self-attention ``attn1`` over all ``frames x h x w`` latent tokens
of the clip at once (frame-major, then row-major), with 3-D rotary position
embeddings; text enters through the cross-attention ``attn2`` (never
perturbed). The grid is ``TokenGrid(h, w, frames=F)``
(:class:`~smoothguide.diffusers.video.VideoTokens`), so:

- ``QuerySmoothing(σ)`` / ``SEG(sigma=σ)`` blurs every frame spatially and
  leaves the time axis alone (``σ = inf``: each query becomes the mean query of
  its own frame);
- ``sigma=(σ_t, σ_h, σ_w)`` also blurs along frames (``σ_t = inf``: averages
  over the clip as well).

The queries are blurred after QK-norm and RoPE, where they enter
``softmax(Q Kᵀ / √d)`` (see :mod:`smoothguide.diffusers.flux`).

``LTXVideoTransformer3DModel``
    input packed ``(B, F·H·W, C)`` with ``num_frames``, ``height``, ``width``
    (latent sizes, patch size 1) passed by the pipeline; layers
    ``transformer_blocks.<i>.attn1``.
``WanTransformer3DModel``
    input ``(B, C, F, H, W)``, patchified by ``config.patch_size`` ``(p_t, p_h, p_w)``;
    layers ``blocks.<i>.attn1``.
``CogVideoXTransformer3DModel``
    input ``(B, F, C, H, W)`` (frames before channels), patch ``p`` (and ``p_t`` for
    CogVideoX 1.5); layers ``transformer_blocks.<i>.attn1`` are *joint* attention over
    ``cat([text, video])``: the text tokens are a prefix and stay untouched, as in Flux.

Presets (blocks split in thirds by depth): ``"mid"`` (default), ``"early"``,
``"late"``, ``"all"``, ``"block.<i>"``.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from typing import Any

from ..torch import Geometry, GeometryFn, JointTokens, LayerSpec
from ..torch._deps import torch
from ..torch.fork import ForkPolicy
from ._blocks import VideoTokens, bind_call, latent_tensor, thirds
from ._deps import diffusers
from .family import ModelFamily, register_family

__all__ = [
    "COGVIDEOX",
    "LTX_VIDEO",
    "WAN",
    "VideoTokens",
    "cogvideox_geometry",
    "ltx_geometry",
    "video_layers",
    "video_presets",
    "wan_geometry",
]


def _stack(model: torch.nn.Module) -> tuple[str, Sequence[torch.nn.Module]]:
    name = "blocks" if isinstance(model, diffusers.WanTransformer3DModel) else "transformer_blocks"
    return name, getattr(model, name)


def video_layers(model: torch.nn.Module) -> dict[str, LayerSpec]:
    """Attention ``attn1`` of every block of an LTX-Video, Wan or CogVideoX transformer.

    Parameters
    ----------
    model
        ``LTXVideoTransformer3DModel``, ``WanTransformer3DModel`` or
        ``CogVideoXTransformer3DModel``.

    Returns
    -------
    dict
        Module name -> :class:`~smoothguide.torch.LayerSpec`: :class:`VideoTokens`, or
        ``JointTokens("prefix")`` for CogVideoX's text + video attention.

    Examples
    --------
    >>> model = diffusers.WanTransformer3DModel(
    ...     patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4,
    ...     out_channels=4, text_dim=16, freq_dim=16, ffn_dim=16, num_layers=2,
    ...     rope_max_seq_len=32)
    >>> video_layers(model)  # doctest: +NORMALIZE_WHITESPACE
    {'blocks.0.attn1': LayerSpec(layout=VideoTokens()),
     'blocks.1.attn1': LayerSpec(layout=VideoTokens())}
    >>> model = diffusers.CogVideoXTransformer3DModel(
    ...     num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
    ...     time_embed_dim=2, text_embed_dim=16, num_layers=2, sample_width=10,
    ...     sample_height=4, sample_frames=9, patch_size=2, max_text_seq_length=6)
    >>> video_layers(model)  # doctest: +NORMALIZE_WHITESPACE
    {'transformer_blocks.0.attn1': LayerSpec(layout=JointTokens(text='prefix')),
     'transformer_blocks.1.attn1': LayerSpec(layout=JointTokens(text='prefix'))}
    """
    stack, blocks = _stack(model)
    joint = isinstance(model, diffusers.CogVideoXTransformer3DModel)
    spec = LayerSpec(JointTokens("prefix") if joint else VideoTokens())
    return {f"{stack}.{i}.attn1": spec for i in range(len(blocks))}


def video_presets(model: torch.nn.Module) -> dict[str, tuple[str, ...]]:
    """Presets ``"early"``, ``"mid"``, ``"late"``, ``"all"`` and ``"block.<i>"``.

    Parameters
    ----------
    model
        ``LTXVideoTransformer3DModel``, ``WanTransformer3DModel`` or
        ``CogVideoXTransformer3DModel``.

    Returns
    -------
    dict
        Preset name -> module names of :func:`video_layers`.

    Examples
    --------
    >>> model = diffusers.LTXVideoTransformer3DModel(
    ...     in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2,
    ...     attention_head_dim=8, cross_attention_dim=16, num_layers=3, caption_channels=16)
    >>> presets = video_presets(model)
    >>> list(presets)
    ['all', 'early', 'mid', 'late', 'block.0', 'block.1', 'block.2']
    >>> presets["late"]
    ('transformer_blocks.2.attn1',)
    """
    names = tuple(video_layers(model))
    presets = {"all": names, **thirds(names)}
    presets.update({f"block.{i}": (name,) for i, name in enumerate(names)})
    return presets


def ltx_geometry(model: torch.nn.Module) -> GeometryFn:
    """Geometry of an LTX-Video call: ``num_frames x height x width`` latent tokens.

    Parameters
    ----------
    model
        An ``LTXVideoTransformer3DModel``.

    Returns
    -------
    GeometryFn
        Maps a call's ``(args, kwargs)`` to its :class:`~smoothguide.torch.Geometry`.

    Examples
    --------
    >>> model = diffusers.LTXVideoTransformer3DModel(
    ...     in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2,
    ...     attention_head_dim=8, cross_attention_dim=16, num_layers=3, caption_channels=16)
    >>> geometry = ltx_geometry(model)
    >>> x = torch.zeros(1, 2 * 3 * 4, 4)  # 2 frames of 3 x 4 packed latent tokens
    >>> geometry((), {"hidden_states": x, "num_frames": 2, "height": 3, "width": 4})
    Geometry(batch=1, height=3, width=4, frames=2, tokens=12)
    """

    def geometry(args: tuple[Any, ...], kwargs: Any) -> Geometry:
        call = bind_call(model, args, kwargs)
        x = latent_tensor(model, call, "hidden_states", 3)
        sizes = [call.get(k) for k in ("num_frames", "height", "width")]
        if not all(
            isinstance(s, numbers.Integral) and not isinstance(s, bool) and int(s) >= 1
            for s in sizes
        ):
            raise ValueError(
                "LTXVideoTransformer3DModel must be called with num_frames, height and width "
                f"(ints) to find its token grid, got {sizes}"
            )
        frames, height, width = (int(s) for s in sizes)  # type: ignore[arg-type]
        if x.shape[1] % frames:
            raise ValueError(
                f"hidden_states has {x.shape[1]} tokens, not a multiple of num_frames={frames}"
            )
        return Geometry(
            batch=x.shape[0], height=height, width=width, frames=frames, tokens=x.shape[1] // frames
        )

    return geometry


def wan_geometry(model: torch.nn.Module) -> GeometryFn:
    """Geometry of a Wan call: the ``(F/p_t) x (H/p_h) x (W/p_w)`` patch grid of the latent.

    Parameters
    ----------
    model
        A ``WanTransformer3DModel`` (its ``config.patch_size`` is read).

    Returns
    -------
    GeometryFn
        Maps a call's ``(args, kwargs)`` to its :class:`~smoothguide.torch.Geometry`.

    Examples
    --------
    >>> model = diffusers.WanTransformer3DModel(
    ...     patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4,
    ...     out_channels=4, text_dim=16, freq_dim=16, ffn_dim=16, num_layers=2,
    ...     rope_max_seq_len=32)
    >>> geometry = wan_geometry(model)  # patch size (1, 2, 2)
    >>> geometry((torch.zeros(2, 4, 3, 8, 12),), {})
    Geometry(batch=2, height=4, width=6, frames=3, tokens=24)
    """
    p_t, p_h, p_w = (int(p) for p in getattr(model, "config").patch_size)  # noqa: B009

    def geometry(args: tuple[Any, ...], kwargs: Any) -> Geometry:
        x = latent_tensor(model, bind_call(model, args, kwargs), "hidden_states", 5)
        frames, height, width = x.shape[2] // p_t, x.shape[3] // p_h, x.shape[4] // p_w
        return Geometry(
            batch=x.shape[0], height=height, width=width, frames=frames, tokens=height * width
        )

    return geometry


def cogvideox_geometry(model: torch.nn.Module) -> GeometryFn:
    """Geometry of a CogVideoX call: ``(F/p_t) x (H/p) x (W/p)`` tokens of the latent.

    The latent is ``hidden_states`` of shape ``(B, F, C, H, W)`` (frames before channels).

    Parameters
    ----------
    model
        A ``CogVideoXTransformer3DModel`` (its ``config.patch_size`` and ``patch_size_t`` are read).

    Returns
    -------
    GeometryFn
        Maps a call's ``(args, kwargs)`` to its :class:`~smoothguide.torch.Geometry`.

    Examples
    --------
    >>> model = diffusers.CogVideoXTransformer3DModel(
    ...     num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
    ...     time_embed_dim=2, text_embed_dim=16, num_layers=2, sample_width=10,
    ...     sample_height=4, sample_frames=9, patch_size=2, max_text_seq_length=6)
    >>> geometry = cogvideox_geometry(model)  # patch size 2, no temporal patch
    >>> geometry((torch.zeros(1, 3, 4, 8, 12),), {})  # (B, F, C, H, W)
    Geometry(batch=1, height=4, width=6, frames=3, tokens=24)
    """
    config = getattr(model, "config")  # noqa: B009
    p, p_t = int(config.patch_size), int(config.patch_size_t or 1)

    def geometry(args: tuple[Any, ...], kwargs: Any) -> Geometry:
        x = latent_tensor(model, bind_call(model, args, kwargs), "hidden_states", 5)
        frames, height, width = -(-x.shape[1] // p_t), x.shape[3] // p, x.shape[4] // p
        return Geometry(
            batch=x.shape[0], height=height, width=width, frames=frames, tokens=height * width
        )

    return geometry


#: Fork mode of the video transformers (fork point ``<blocks>.<i>``; exact,
#: tests/test_fork_video.py). Their ``forward`` takes ``batch_size`` from the
#: input and applies it after the blocks, outside a module call: Wan and
#: CogVideoX in the final ``reshape(batch_size, ...)``, LTX in
#: ``temb.view(batch_size, -1, ...)`` (of the time embedding and the
#: projected text, whose ``embedded_timestep`` modulates the last block's
#: output). So ``hidden_states`` reaches ``forward`` with every row (``keep``),
#: and the time/text embedders that feed values used after the blocks are
#: early modules (LTX also gets ``timestep`` and ``encoder_hidden_states``
#: whole, since it views their embeddings with the full batch before the blocks).
_FORK = {
    "ltx-video": ForkPolicy(
        proven=True,
        keep=("hidden_states", "timestep", "encoder_hidden_states"),
        early=("time_embed", "caption_projection"),
    ),
    # Wan I2V concatenates the image embeddings with the text ones before the blocks,
    # outside a module call, at the rows of the early condition_embedder: refused
    "wan": ForkPolicy(
        proven=True,
        keep=("hidden_states",),
        early=("condition_embedder",),
        refuse=("encoder_hidden_states_image",),
    ),
    # CogVideoX hands its time embedding to norm_out as a module argument: nothing early
    "cogvideox": ForkPolicy(proven=True, keep=("hidden_states",)),
}


def _video_family(
    name: str, cls: type, geometry: Callable[[torch.nn.Module], GeometryFn]
) -> ModelFamily:
    """Register a video transformer class: shared layers and presets, default ``"mid"``."""
    return register_family(
        ModelFamily(
            name=name,
            matches=lambda model: isinstance(model, cls),
            layers=video_layers,
            presets=video_presets,
            default="mid",
            geometry=geometry,
            fork=_FORK[name],
        )
    )


#: The family of ``diffusers.LTXVideoTransformer3DModel``; default preset ``"mid"``.
LTX_VIDEO = _video_family("ltx-video", diffusers.LTXVideoTransformer3DModel, ltx_geometry)

#: The family of ``diffusers.WanTransformer3DModel``; default preset ``"mid"``.
WAN = _video_family("wan", diffusers.WanTransformer3DModel, wan_geometry)

#: The family of ``diffusers.CogVideoXTransformer3DModel``; default preset ``"mid"``.
COGVIDEOX = _video_family("cogvideox", diffusers.CogVideoXTransformer3DModel, cogvideox_geometry)
