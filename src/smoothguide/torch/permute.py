"""Run :class:`~smoothguide.token_permutation.TokenPermutation` (TPG) through an AttentionPatcher.

A forward pre-hook on the block that holds each selected attention layer
permutes the tokens of its ``hidden_states`` input on the perturbed rows.
Hooks are removed on exit, also after an exception.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ..token_permutation import TokenPermutation
from ._deps import torch
from .hooks import pre_hook_with_kwargs
from .patching import AttentionPatcher, register_perturbation
from .skip import _parent

__all__ = ["token_permutation"]


def token_permutation(n: int, seed: int) -> torch.Tensor:
    """The documented permutation of ``n`` tokens for ``seed`` (CPU ``torch.randperm``).

    The same on every machine and device: drawn by a CPU generator seeded with
    ``seed``, so a TPG run is reproducible from its settings alone.

    Parameters
    ----------
    n
        Number of tokens (image tokens of the block's input).
    seed
        The :class:`~smoothguide.token_permutation.TokenPermutation`'s seed.

    Returns
    -------
    torch.Tensor
        A permutation of ``0 … n−1`` (int64, CPU).

    Examples
    --------
    >>> sorted(token_permutation(5, 0).tolist())
    [0, 1, 2, 3, 4]
    """
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


@contextmanager
def _permute(
    patcher: AttentionPatcher, p: TokenPermutation, rows: tuple[int, ...]
) -> Iterator[None]:
    modules = dict(patcher.model.named_modules())
    blocks = list(dict.fromkeys(_parent(name) for name in patcher.resolve(p.layers)))
    owner = threading.get_ident()
    ran: set[str] = set()
    calls = [0]

    def pre_for(name: str, k: int) -> Any:
        module = modules[name]
        params = list(inspect.signature(module.forward).parameters)
        position = params.index("hidden_states") if "hidden_states" in params else 0

        def pre(
            mod: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
        ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
            local = patcher._local  # the patcher's per-thread record of model calls
            if threading.get_ident() != owner or not local.calls:
                return None
            in_kwargs = "hidden_states" in kwargs
            x = kwargs["hidden_states"] if in_kwargs else args[position]
            if not isinstance(x, torch.Tensor) or x.ndim != 3:
                got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise RuntimeError(
                    f"TokenPermutation: block {name!r} ({type(mod).__name__}) gets hidden_states "
                    f"{got}; it needs (batch, tokens, channels)"
                )
            batch = local.calls[-1].geometry.batch
            if x.shape[0] % batch or max(rows) >= batch:
                raise RuntimeError(
                    f"TokenPermutation: block {name!r} has batch {x.shape[0]}; cannot map rows "
                    f"{list(rows)} of a model call with batch {batch}"
                )
            ran.add(name)
            ratio = x.shape[0] // batch
            ix = torch.tensor([i * ratio + j for i in rows for j in range(ratio)], device=x.device)
            perm = token_permutation(x.shape[1], p.seed + k).to(x.device)
            x = x.index_copy(0, ix, x.index_select(0, ix).index_select(1, perm))
            if in_kwargs:
                return args, {**kwargs, "hidden_states": x}
            return (*args[:position], x, *args[position + 1 :]), kwargs

        return pre

    def count(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        if threading.get_ident() == owner:
            calls[0] += 1

    handles = [patcher.model.register_forward_pre_hook(count)]
    try:
        for k, name in enumerate(blocks):
            handles.append(pre_hook_with_kwargs(modules[name], pre_for(name, k)))
        yield
    finally:
        for handle in handles:
            handle.remove()
    if calls[0] and not ran:
        raise RuntimeError(
            f"none of the blocks {blocks} that {p} permutes ran in the {calls[0]} forward "
            f"call(s) of {type(patcher.model).__name__}; select layers on the path the model takes"
        )


register_perturbation(TokenPermutation, _permute)
