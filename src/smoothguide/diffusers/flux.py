"""FluxTransformer2DModel (FLUX.1 dev / schnell): double- and single-stream joint attention.

Both kinds of block attend over ``cat([text tokens, image tokens])``: the
double-stream blocks (``transformer_blocks.<i>.attn``) concatenate the text
and image projections inside ``FluxAttnProcessor``, the single-stream blocks
(``single_transformer_blocks.<i>.attn``) get the concatenated sequence. The
text tokens are a **prefix**. SEG blurs the image-token queries only.

Grid: the pipeline packs the ``(C, H, W)`` latent into ``(H/2)·(W/2)`` tokens
of ``4C`` channels (2x2 patches, row-major), and passes their positions as
``img_ids`` (``(N, 3)``: ``[0, row, col]``). The grid is read from
``img_ids`` and checked to be a complete row-major grid of the ``N`` image
tokens; no square is ever assumed.

Where the blur happens: on the query that enters ``softmax(Q Kᵀ / √d)``,
i.e. after the QK RMS-norm *and* after the rotary position embedding. Both are
per-token maps that do not commute with averaging neighbouring tokens (RoPE
rotates each token by its own angle), so blurring earlier would not blur the
attention logits (Hong 2024, Prop. 3.1); ``tests/test_diffusers_transformers.py``
shows that a pre-RoPE blur gives a different output.

Presets (double blocks ``D``, single blocks ``S``, each split in thirds by depth):

``"double.mid"`` (default)
    middle third of the double-stream blocks (FLUX.1, 19 blocks: 6–12).
``"double.early"``, ``"double.late"``, ``"double"``
    first / last third, all double-stream blocks.
``"single.early"``, ``"single.mid"``, ``"single.late"``, ``"single"``
    the same for the single-stream blocks (FLUX.1, 38 blocks: mid 12–25).
``"double.<i>"``, ``"single.<i>"``
    one block.
"""

from __future__ import annotations

from typing import Any

from ..torch import Geometry, GeometryFn, JointTokens, LayerSpec
from ..torch._deps import torch
from ..torch.fork import ForkPolicy
from ._blocks import bind_call, latent_tensor, thirds
from ._deps import diffusers
from .family import ModelFamily, register_family

__all__ = ["FLUX", "flux_geometry", "flux_grid_from_ids", "flux_layers", "flux_presets"]


def _is_flux(model: torch.nn.Module) -> bool:
    return isinstance(model, diffusers.FluxTransformer2DModel)


def _double(model: torch.nn.Module) -> tuple[str, ...]:
    n = len(getattr(model, "transformer_blocks"))  # noqa: B009
    return tuple(f"transformer_blocks.{i}.attn" for i in range(n))


def _single(model: torch.nn.Module) -> tuple[str, ...]:
    n = len(getattr(model, "single_transformer_blocks"))  # noqa: B009
    return tuple(f"single_transformer_blocks.{i}.attn" for i in range(n))


def flux_layers(model: torch.nn.Module) -> dict[str, LayerSpec]:
    """Double- then single-stream joint attention modules (text prefix), in module order.

    Parameters
    ----------
    model
        A ``FluxTransformer2DModel``.

    Returns
    -------
    dict
        Module name -> :class:`~smoothguide.torch.LayerSpec`.

    Examples
    --------
    >>> model = diffusers.FluxTransformer2DModel(
    ...     patch_size=1, in_channels=4, num_layers=2, num_single_layers=3,
    ...     attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
    ...     pooled_projection_dim=8, axes_dims_rope=[4, 4, 8])
    >>> layers = flux_layers(model)
    >>> list(layers)  # doctest: +NORMALIZE_WHITESPACE
    ['transformer_blocks.0.attn', 'transformer_blocks.1.attn',
     'single_transformer_blocks.0.attn', 'single_transformer_blocks.1.attn',
     'single_transformer_blocks.2.attn']
    >>> layers["transformer_blocks.0.attn"]
    LayerSpec(layout=JointTokens(text='prefix'))
    """
    spec = LayerSpec(JointTokens("prefix"))
    return {name: spec for name in (*_double(model), *_single(model))}


def flux_presets(model: torch.nn.Module) -> dict[str, tuple[str, ...]]:
    """Presets ``"double"``, ``"single"``, their ``.early/.mid/.late`` thirds and single blocks.

    Parameters
    ----------
    model
        A ``FluxTransformer2DModel``.

    Returns
    -------
    dict
        Preset name -> module names of :func:`flux_layers`.

    Examples
    --------
    >>> model = diffusers.FluxTransformer2DModel(
    ...     patch_size=1, in_channels=4, num_layers=2, num_single_layers=3,
    ...     attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
    ...     pooled_projection_dim=8, axes_dims_rope=[4, 4, 8])
    >>> presets = flux_presets(model)
    >>> list(presets)  # doctest: +NORMALIZE_WHITESPACE
    ['double', 'single', 'double.early', 'double.mid', 'double.late', 'single.early',
     'single.mid', 'single.late', 'double.0', 'double.1', 'single.0', 'single.1', 'single.2']
    >>> presets["double.mid"]  # fewer than 3 blocks: "mid" is all of them
    ('transformer_blocks.0.attn', 'transformer_blocks.1.attn')
    >>> presets["single.mid"]
    ('single_transformer_blocks.1.attn',)
    """
    double, single = _double(model), _single(model)
    presets = {"double": double, "single": single}
    presets.update(thirds(double, "double."))
    presets.update(thirds(single, "single."))
    presets.update({f"double.{i}": (name,) for i, name in enumerate(double)})
    presets.update({f"single.{i}": (name,) for i, name in enumerate(single)})
    return presets


def flux_grid_from_ids(img_ids: torch.Tensor, num_tokens: int) -> tuple[int, int]:
    """``(rows, cols)`` of the packed image tokens, read from Flux's ``img_ids``.

    Parameters
    ----------
    img_ids
        ``(N, 3)`` (or deprecated ``(B, N, 3)``) positions ``[0, row, col]``.
    num_tokens
        ``N``, the image tokens of ``hidden_states``.

    Returns
    -------
    tuple of int

    Raises
    ------
    ValueError
        If the ids are not a complete row-major grid of ``num_tokens`` tokens
        (e.g. extra reference-image tokens of Kontext-style models).

    Examples
    --------
    >>> rows, cols = torch.meshgrid(torch.arange(2), torch.arange(3), indexing="ij")
    >>> ids = torch.stack([torch.zeros(2, 3), rows, cols], -1).reshape(6, 3)
    >>> flux_grid_from_ids(ids, 6)
    (2, 3)
    """
    ids = img_ids[0] if img_ids.ndim == 3 else img_ids
    if ids.ndim != 2 or ids.shape[-1] != 3 or ids.shape[0] != num_tokens:
        raise ValueError(
            f"img_ids must have shape ({num_tokens}, 3) for {num_tokens} image tokens, got "
            f"{tuple(img_ids.shape)}"
        )
    rows = ids[:, 1].detach()
    cols = ids[:, 2].detach()
    h = int(torch.unique(rows).numel())
    w = int(torch.unique(cols).numel())
    ok = h * w == num_tokens
    if ok:
        r, c = rows.reshape(h, w), cols.reshape(h, w)
        ok = bool(
            (r == r[:, :1]).all()
            and (c == c[:1, :]).all()
            and (h == 1 or bool((r[1:, 0] > r[:-1, 0]).all()))
            and (w == 1 or bool((c[0, 1:] > c[0, :-1]).all()))
        )
    if not ok:
        raise ValueError(
            f"img_ids do not describe a row-major grid of the {num_tokens} image tokens (found "
            f"{h} distinct rows and {w} distinct columns); SEG needs the packed latent grid"
        )
    return h, w


def flux_geometry(model: torch.nn.Module) -> GeometryFn:
    """Geometry of a Flux call: the packed token grid given by ``img_ids``.

    Parameters
    ----------
    model
        A ``FluxTransformer2DModel``.

    Returns
    -------
    GeometryFn
        Maps a call's ``(args, kwargs)`` to its :class:`~smoothguide.torch.Geometry`.

    Examples
    --------
    >>> model = diffusers.FluxTransformer2DModel(
    ...     patch_size=1, in_channels=4, num_layers=2, num_single_layers=3,
    ...     attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
    ...     pooled_projection_dim=8, axes_dims_rope=[4, 4, 8])
    >>> rows, cols = torch.meshgrid(torch.arange(2), torch.arange(3), indexing="ij")
    >>> ids = torch.stack([torch.zeros(2, 3), rows, cols], -1).reshape(6, 3)
    >>> geometry = flux_geometry(model)
    >>> geometry((), {"hidden_states": torch.zeros(1, 6, 4), "img_ids": ids})
    Geometry(batch=1, height=2, width=3, frames=1, tokens=6)
    """

    def geometry(args: tuple[Any, ...], kwargs: Any) -> Geometry:
        call = bind_call(model, args, kwargs)
        x = latent_tensor(model, call, "hidden_states", 3)
        ids = call.get("img_ids")
        if not isinstance(ids, torch.Tensor):
            raise ValueError(
                "FluxTransformer2DModel must be called with img_ids to find its token grid"
            )
        h, w = flux_grid_from_ids(ids, x.shape[1])
        return Geometry(batch=x.shape[0], height=h, width=w, tokens=h * w)

    return geometry


#: The family of ``diffusers.FluxTransformer2DModel``; default preset ``"double.mid"``.
FLUX = register_family(
    ModelFamily(
        name="flux",
        matches=_is_flux,
        layers=flux_layers,
        presets=flux_presets,
        default="double.mid",
        geometry=flux_geometry,
        # fork at the (double or single) block of the first perturbed layer, copying the rows
        # at the previous block's output of the same stack; exact (tests/test_fork.py)
        fork=ForkPolicy(
            proven=True,
            refuse=("controlnet_block_samples", "controlnet_single_block_samples"),
            copy_at_previous=True,
        ),
    )
)
