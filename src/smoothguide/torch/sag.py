"""Capture one attention layer's probabilities on chosen rows (for SAG's mask).

:func:`capture_attention` pushes a :class:`torch.overrides.TorchFunctionMode`
while the one layer runs; at its self-attention SDPA call it computes
``softmax(Q Kᵀ · scale)`` for the requested batch rows only (the layer's own
output is computed by the untouched SDPA call) and records it with the
layer's token grid. Hooks and the mode are removed on exit.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from torch.overrides import TorchFunctionMode

from ..grid import TokenGrid
from ..perturbations import LayerSelection
from ._deps import torch
from .patching import _SDPA, AttentionPatcher, _remove_mode, _split_sdpa_args

__all__ = ["AttentionCapture", "capture_attention"]


@dataclass
class AttentionCapture:
    """What :func:`capture_attention` recorded: the last self-attention call of its layer.

    Attributes
    ----------
    probs
        ``(rows, heads, tokens, tokens)`` float32-or-wider probabilities, or ``None``.
    grid
        The layer's :class:`~smoothguide.TokenGrid` in that call.
    Examples
    --------
    >>> AttentionCapture().probs is None
    True
    """

    probs: torch.Tensor | None = None
    grid: TokenGrid | None = None


class _ProbsMode(TorchFunctionMode):
    def __init__(self, patcher: AttentionPatcher, name: str, rows: tuple[int, ...], out: Any):
        super().__init__()
        self.patcher, self.name, self.rows, self.out = patcher, name, rows, out

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        if func is _SDPA:
            q, k, _, rest, rest_kwargs = _split_sdpa_args(args, kwargs)
            if k.shape[-2] == q.shape[-2]:
                self._record(q, k, rest, rest_kwargs)
        return func(*args, **kwargs)

    def _record(
        self, q: torch.Tensor, k: torch.Tensor, rest: tuple[Any, ...], kw: dict[str, Any]
    ) -> None:
        mask = rest[0] if rest else kw.get("attn_mask")
        if mask is not None:
            raise RuntimeError(
                f"attention layer {self.name!r}: SAG's attention map needs an unmasked "
                "self-attention call"
            )
        grid, geometry = self.patcher._grid(self.name, q.shape[-2])
        batch = geometry.batch
        if q.shape[0] % batch or max(self.rows) >= batch:
            raise RuntimeError(
                f"attention layer {self.name!r}: attention batch {q.shape[0]} cannot be mapped "
                f"to rows {list(self.rows)} of a model call with batch {batch}"
            )
        ratio = q.shape[0] // batch
        ix = torch.tensor([i * ratio + j for i in self.rows for j in range(ratio)], device=q.device)
        work = torch.promote_types(q.dtype, torch.float32)
        qs, ks = q.index_select(0, ix).to(work), k.index_select(0, ix).to(work)
        scale = kw.get("scale")
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        probs = torch.softmax(torch.matmul(qs, ks.transpose(-1, -2)) * scale, dim=-1)
        # (rows * ratio, [heads,] n, n) -> (rows, heads, n, n), heads = ratio * heads per row
        n = q.shape[-2]
        self.out.probs = probs.reshape(len(self.rows), -1, n, n)
        self.out.grid = grid


@contextmanager
def capture_attention(
    patcher: AttentionPatcher, layers: LayerSelection, rows: Sequence[int]
) -> Iterator[AttentionCapture]:
    """Record the attention probabilities of one layer on batch rows ``rows``.

    Parameters
    ----------
    patcher
        Resolves ``layers`` and supplies each model call's geometry.
    layers
        A selection that resolves to exactly one layer.
    rows
        Batch rows of the model call.

    Yields
    ------
    AttentionCapture
        Filled by the forward calls made inside the context.
    Examples
    --------
    >>> import torch.nn.functional as F
    >>> from smoothguide.torch import AttentionPatcher
    >>> class Attn(torch.nn.Module):
    ...     def forward(self, x):                       # x: (B, N, d)
    ...         return F.scaled_dot_product_attention(x, x, x)
    >>> class Net(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.attn = Attn()
    ...     def forward(self, img):                     # img: (B, d, H, W)
    ...         return self.attn(img.flatten(2).transpose(1, 2))
    >>> net, img = Net(), torch.randn(2, 4, 3, 5)
    >>> with capture_attention(AttentionPatcher(net, layers=Attn), "attn", rows=[1]) as cap:
    ...     _ = net(img)
    >>> cap.probs.shape, (cap.grid.height, cap.grid.width)
    (torch.Size([1, 1, 15, 15]), (3, 5))
    >>> bool(torch.allclose(cap.probs.sum(-1), torch.ones(1, 1, 15)))
    True
    """
    names = patcher.resolve(layers)
    if len(names) != 1:
        raise ValueError(f"SAG uses the attention map of one layer; {layers!r} selects {names}")
    name = names[0]
    rows = tuple(rows)
    out = AttentionCapture()
    owner = threading.get_ident()
    module = dict(patcher.model.named_modules())[name]
    pushed: list[_ProbsMode] = []

    def pre(mod: torch.nn.Module, args: tuple[Any, ...]) -> None:
        if threading.get_ident() == owner and rows:
            mode = _ProbsMode(patcher, name, rows, out)
            mode.__enter__()
            pushed.append(mode)

    def post(mod: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if threading.get_ident() == owner and pushed:
            _remove_mode(pushed.pop())

    with patcher.attached():
        handles = [
            module.register_forward_pre_hook(pre),
            module.register_forward_hook(post, always_call=True),
        ]
        try:
            yield out
        finally:
            for handle in handles:
                handle.remove()
            while pushed:  # a BaseException inside the layer skipped its post hook
                _remove_mode(pushed.pop())
