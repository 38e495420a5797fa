"""SEG and PAG on the rows (and, optionally, the heads) of one attention call.

:class:`~smoothguide.torch.AttentionPatcher` calls these two functions on the
tensors that enter / leave ``scaled_dot_product_attention`` of a perturbed
layer. They hold the whole per-row, per-head arithmetic of SEG (query blur,
Hong 2024) and PAG / soft PAG (identity map, Ahn et al. 2024; interpolation
toward it, HeadHunter, arXiv:2506.10978), so the patcher itself only routes.

Heads are the axis after the batch of a 4-D ``(batch, heads, tokens, dim)``
query, the layout every diffusers ``AttnProcessor2_0``-style processor passes.
"""

from __future__ import annotations

from ..grid import TokenGrid
from ..perturbations import IdentityAttention, QuerySmoothing
from ._deps import torch
from .smoothing import smooth_queries

__all__ = ["blur_query_rows", "identity_rows"]


def _head_index(name: str, heads: tuple[int, ...], x: torch.Tensor) -> torch.Tensor:
    if x.ndim != 4:
        raise RuntimeError(
            f"attention layer {name!r}: heads={list(heads)} needs a (batch, heads, tokens, dim) "
            f"query, got shape {tuple(x.shape)} (heads folded into the batch cannot be told apart)"
        )
    if max(heads) >= x.shape[1]:
        raise ValueError(
            f"attention layer {name!r} has {x.shape[1]} heads; heads={list(heads)} is out of range"
        )
    return torch.tensor(heads, device=x.device)


def blur_query_rows(
    name: str, q: torch.Tensor, ix: torch.Tensor, grid: TokenGrid, p: QuerySmoothing
) -> torch.Tensor:
    """``q`` with the rows ``ix`` (and heads ``p.heads``) blurred on ``grid`` by ``p``.

    σ is ``p.absolute_sigma(grid)`` (resolution-relative σ resolved on this
    layer's grid); every other row and head is returned bit-identical.

    Parameters
    ----------
    name
        The attention layer's name (for error messages).
    q
        Queries ``(batch, heads, tokens, dim)``.
    ix
        Batch rows to blur, a 1-D integer tensor on ``q``'s device.
    grid
        The layer's :class:`~smoothguide.grid.TokenGrid` (text tokens outside it
        are not blurred).
    p
        The :class:`~smoothguide.perturbations.QuerySmoothing` (σ, radius, mode,
        heads).

    Returns
    -------
    torch.Tensor
        A new tensor of ``q``'s shape, dtype and device.

    Examples
    --------
    >>> import torch
    >>> from smoothguide.grid import TokenGrid
    >>> from smoothguide.perturbations import QuerySmoothing
    >>> q = torch.randn(2, 2, 16, 4)
    >>> out = blur_query_rows("attn", q, torch.tensor([1]), TokenGrid(4, 4), QuerySmoothing(1.0))
    >>> torch.equal(out[0], q[0]), torch.equal(out[1], q[1])
    (True, False)
    """
    sigma = p.absolute_sigma(grid)
    rows = q.index_select(0, ix)
    if p.heads is None:
        blurred = smooth_queries(rows, grid, sigma, radius=p.radius, mode=p.mode)
    else:
        hx = _head_index(name, p.heads, q)
        part = smooth_queries(rows.index_select(1, hx), grid, sigma, radius=p.radius, mode=p.mode)
        blurred = rows.index_copy(1, hx, part)
    return q.index_copy(0, ix, blurred)


def identity_rows(
    name: str,
    out: torch.Tensor,
    q: torch.Tensor,
    v: torch.Tensor,
    ix: torch.Tensor,
    grid: TokenGrid,
    p: IdentityAttention,
) -> torch.Tensor:
    """``out`` with the grid tokens of rows ``ix`` (heads ``p.heads``) moved toward ``V``.

    ``w = p.weight``: those entries become ``(1 − w) · out + w · V``, i.e. the
    attention map ``(1 − w) A + w I`` applied to ``V`` (``w = 1``: exactly ``V``,
    PAG). Non-grid tokens (text of joint attention) keep their attention. With
    grouped-query attention (``enable_gqa=True``: ``Hkv`` value heads for ``Hq``
    query heads) query head ``h`` reads value head ``h // (Hq / Hkv)``, so ``V`` is
    ``repeat_interleave``-d to the query's heads first, as SDPA does.

    Parameters
    ----------
    name
        The attention layer's name (for error messages).
    out
        The attention output ``(batch, heads, tokens, dim)``.
    q, v
        The layer's queries and values; ``v`` (after the grouped-query repeat)
        must match ``out``'s shape and ``q``'s batch, heads and tokens (else
        ``RuntimeError``).
    ix
        Batch rows to change, a 1-D integer tensor on ``out``'s device.
    grid
        The layer's :class:`~smoothguide.grid.TokenGrid`.
    p
        The :class:`~smoothguide.perturbations.IdentityAttention` (weight, heads).

    Returns
    -------
    torch.Tensor
        A new tensor of ``out``'s shape and dtype.

    Examples
    --------
    >>> import torch
    >>> from smoothguide.grid import TokenGrid
    >>> from smoothguide.perturbations import IdentityAttention
    >>> q, v, out = torch.randn(3, 2, 1, 4, 8).unbind(0)
    >>> ix, grid = torch.tensor([0]), TokenGrid(2, 2)
    >>> new = identity_rows("attn", out, q, v, ix, grid, IdentityAttention())
    >>> torch.equal(new[0], v[0])
    True
    """
    # grouped-query attention (SDPA's enable_gqa): value head h // (Hq / Hkv) feeds
    # query head h, so identity attention returns that head's values
    gqa = q.ndim == 4 and v.ndim == 4 and 0 < v.shape[1] != q.shape[1]
    if gqa and q.shape[1] % v.shape[1] == 0:
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    if v.shape[:-1] != q.shape[:-1] or out.shape != v.shape:
        raise RuntimeError(
            f"attention layer {name!r}: identity attention needs values with the "
            f"query's batch, heads and tokens; got query {tuple(q.shape)}, value "
            f"{tuple(v.shape)}"
        )
    rows_out = out.index_select(0, ix)
    values = v.index_select(0, ix).to(out.dtype)
    s = grid.spatial_slice
    target = values[..., s, :]
    if p.weight != 1.0:
        target = torch.lerp(rows_out[..., s, :], target, p.weight)
    ident = torch.cat([rows_out[..., : s.start, :], target, rows_out[..., s.stop :, :]], dim=-2)
    if p.heads is not None:
        hx = _head_index(name, p.heads, out)
        ident = rows_out.index_copy(1, hx, ident.index_select(1, hx))
    return out.index_copy(0, ix, ident)
