"""Run :class:`~smoothguide.layer_skip.LayerSkip` on torch models through an AttentionPatcher.

A forward hook on each skipped module (the block holding a selected attention
layer, the attention module itself, or the block's feed-forward modules)
replaces the perturbed rows of the module's output by the same rows of its
input: the module acts as the identity on that branch only, as diffusers'
``LayerSkipConfig`` hooks do for a whole batch. Hooks are removed on exit,
also after an exception.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from ..layer_skip import LayerSkip
from ._deps import torch
from .hooks import forward_hook_with_kwargs
from .patching import AttentionPatcher, register_perturbation

__all__ = ["BLOCK_OUTPUTS", "module_targets"]

#: Which input argument each element of a block's tuple output is, by block class
#: name (diffusers' joint blocks return ``(encoder_hidden_states, hidden_states)``).
#: Blocks that return one tensor return ``hidden_states``; unknown tuple-returning
#: blocks are taken to return ``(hidden_states, encoder_hidden_states)``.
BLOCK_OUTPUTS: dict[str, tuple[str, ...]] = {
    "JointTransformerBlock": ("encoder_hidden_states", "hidden_states"),
    "FluxTransformerBlock": ("encoder_hidden_states", "hidden_states"),
    "FluxSingleTransformerBlock": ("encoder_hidden_states", "hidden_states"),
}
_DEFAULT_TUPLE = ("hidden_states", "encoder_hidden_states")
_FF_NAMES = ("ff", "ff_context", "ffn")
#: Feed-forward classes by name (diffusers' ``_FEEDFORWARD_CLASSES``), found without importing it.
_FF_CLASSES = ("FeedForward", "LuminaFeedForward")


def _parent(name: str) -> str:
    if "." not in name:
        raise ValueError(
            f"attention layer {name!r} has no parent block in the model; LayerSkip('block') and "
            "LayerSkip('ff') need attention layers that sit inside a block"
        )
    return name.rsplit(".", 1)[0]


def module_targets(patcher: AttentionPatcher, p: LayerSkip) -> dict[str, torch.nn.Module]:
    """The modules ``p`` skips, by name, in module order (each once).

    Parameters
    ----------
    patcher
        Resolves ``p.layers`` (presets, names) to attention layers.
    p
        The :class:`~smoothguide.layer_skip.LayerSkip`.

    Returns
    -------
    dict
        Module name -> module.

    Examples
    --------
    >>> import torch
    >>> from smoothguide.layer_skip import LayerSkip
    >>> from smoothguide.torch import AttentionPatcher, LayerSpec
    >>> class Block(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.attn, self.ff = torch.nn.Identity(), torch.nn.Identity()
    >>> model = torch.nn.Sequential(Block(), Block())
    >>> patcher = AttentionPatcher(model, layers={"0.attn": LayerSpec(), "1.attn": LayerSpec()})
    >>> list(module_targets(patcher, LayerSkip("ff", layers="1.attn")))
    ['1.ff']
    """
    modules = dict(patcher.model.named_modules())
    names: list[str] = []
    for layer in patcher.resolve(p.layers):
        if p.skip == "attention":
            names.append(layer)
        elif p.skip == "block":
            names.append(_parent(layer))
        else:
            block = _parent(layer)
            inside = [
                n
                for n, m in modules.items()
                if n.startswith(block + ".")
                and (type(m).__name__ in _FF_CLASSES or n.rsplit(".", 1)[1] in _FF_NAMES)
            ]
            # outermost only: a feed-forward nested in another one is skipped with it
            found = [n for n in inside if not any(n.startswith(o + ".") for o in inside)]
            if not found:
                raise ValueError(
                    f"block {block!r} of attention layer {layer!r} has no feed-forward module "
                    f"(named {_FF_NAMES} or of class {_FF_CLASSES}); LayerSkip('ff') cannot be "
                    "applied there"
                )
            names.extend(found)
    order = {n: i for i, n in enumerate(modules)}
    return {n: modules[n] for n in sorted(set(names), key=order.__getitem__)}


def _bind(module: torch.nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
    try:
        return inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments
    except TypeError:  # a forward we cannot bind: fall back to the first argument
        return {"hidden_states": args[0] if args else next(iter(kwargs.values()), None)}


def _first_input(bound: Mapping[str, Any]) -> Any:
    for key in ("hidden_states", "x", "input"):
        if key in bound:
            return bound[key]
    return next(iter(bound.values()), None)


def _replace(out: Any, inp: Any, rows: tuple[int, ...], batch: int, where: str) -> Any:
    if out is None or not isinstance(out, torch.Tensor):
        return out
    if not isinstance(inp, torch.Tensor) or inp.shape != out.shape:
        got = tuple(inp.shape) if isinstance(inp, torch.Tensor) else type(inp).__name__
        raise RuntimeError(
            f"LayerSkip: {where} returned shape {tuple(out.shape)} but its input is {got}, so it "
            "cannot be skipped (replaced by its input)"
        )
    if out.shape[0] % batch:
        raise RuntimeError(
            f"LayerSkip: {where} has batch {out.shape[0]}, not a multiple of the model batch "
            f"{batch}"
        )
    if max(rows) >= batch:
        raise ValueError(f"rows {list(rows)} out of range for a model call with batch {batch}")
    ratio = out.shape[0] // batch
    ix = torch.tensor([i * ratio + j for i in rows for j in range(ratio)], device=out.device)
    return out.index_copy(0, ix, inp.index_select(0, ix).to(out.dtype))


@contextmanager
def _layer_skip(patcher: AttentionPatcher, p: LayerSkip, rows: tuple[int, ...]) -> Iterator[None]:
    targets = module_targets(patcher, p)
    owner = threading.get_ident()
    ran: set[str] = set()
    calls = [0]

    def hook_for(name: str) -> Any:
        def hook(
            module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
        ) -> Any:
            local = patcher._local  # the patcher's per-thread record of model calls
            if threading.get_ident() != owner or not local.calls:
                return None
            ran.add(name)
            batch = local.calls[-1].geometry.batch
            bound = _bind(module, args, kwargs)
            where = f"{type(module).__name__} {name!r}"
            if not isinstance(output, tuple):
                return _replace(output, _first_input(bound), rows, batch, where)
            if p.skip == "block":
                keys = BLOCK_OUTPUTS.get(type(module).__name__, _DEFAULT_TUPLE)
            else:
                keys = _DEFAULT_TUPLE
            if len(output) > len(keys):
                raise RuntimeError(
                    f"LayerSkip: {where} returned {len(output)} outputs; only {keys} can be "
                    "mapped back to its inputs"
                )
            return tuple(
                _replace(o, bound.get(k), rows, batch, where)
                for o, k in zip(output, keys, strict=False)
            )

        return hook

    def count(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        if threading.get_ident() == owner:
            calls[0] += 1

    handles = [patcher.model.register_forward_pre_hook(count)]
    try:
        for name, module in targets.items():
            handles.append(forward_hook_with_kwargs(module, hook_for(name)))
        yield
    finally:
        for handle in handles:
            handle.remove()
    if calls[0] and not ran:
        raise RuntimeError(
            f"none of the modules {list(targets)} that {p} skips ran in the {calls[0]} forward "
            f"call(s) of {type(patcher.model).__name__}; select layers on the path the model takes"
        )


register_perturbation(LayerSkip, _layer_skip)
