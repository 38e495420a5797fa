"""torch.compile-friendly SEG and PAG: the perturbation as two opaque ops in the traced graph.

torch.compile traces the attention layers once; dynamo does not guard on module hooks,
so hooks that :class:`~smoothguide.torch.AttentionPatcher` adds per ``perturb`` context
after compilation are never seen by the compiled code. Inside :func:`compilable`, every
chosen layer instead carries, for the whole context, hooks that dynamo traces into the
graph, and the attention call of the layer (torch SDPA, or any backend of diffusers'
``dispatch_attention_fn``) becomes::

    q   = smoothguide::perturb_query(q, k, slot)      # SEG rows blurred, others copied
    out = attention(q, k, v, ...)                     # the model's own kernel, traced
    out = smoothguide::perturb_output(out, v, slot)   # PAG rows = v on image tokens

Both are :func:`torch.library.custom_op` ops: opaque to dynamo and inductor, they run
eagerly at run time and read the patcher's state there (the active ``perturb``
contexts of the calling thread, the geometry of the current model call). ``slot`` is a
small tensor attribute of the layer module, so blocks that share one compiled graph
(regional compilation, ``compile_repeated_blocks``) tell their layers apart at run time.
Switching between perturbed and plain calls, σ of a sweep, layers or rows of a schedule
therefore changes no guard: no recompilation. The cost is one copy of the query and of
the output per chosen layer call, also when nothing is perturbed.
"""

from __future__ import annotations

import functools
import itertools
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from ..perturbations import IdentityAttention, LayerSelection, QuerySmoothing
from . import dispatch as _dispatch
from ._deps import torch

if TYPE_CHECKING:  # pragma: no cover
    from .patching import AttentionPatcher

__all__ = ["compilable", "is_static"]

_SLOT = "_smoothguide_slot"
_WRAPPED = "__smoothguide_static_backend__"
_F = torch.nn.functional


class _Current(threading.local):
    """The slot of the chosen layer running now (set and cleared by traced hooks)."""

    slot: torch.Tensor | None = None


_current = _Current()
_lock = threading.RLock()
_slots: dict[int, tuple[weakref.ref[AttentionPatcher], str]] = {}
_ids = itertools.count(1)
_static: weakref.WeakKeyDictionary[AttentionPatcher, dict[str, int]] = weakref.WeakKeyDictionary()
_installs = 0
_sdpa: Callable[..., torch.Tensor] | None = None
_register: Any = None  # diffusers' _AttentionBackendRegistry.register while wrapped


def is_static(patcher: AttentionPatcher) -> frozenset[str] | None:
    """The layers made compile-friendly by an active :func:`compilable` of ``patcher``.

    Parameters
    ----------
    patcher
        An :class:`~smoothguide.torch.AttentionPatcher`.

    Returns
    -------
    frozenset of str or None
        The layer names, or ``None`` outside :func:`compilable`.

    Examples
    --------
    >>> from smoothguide.torch import AttentionPatcher
    >>> patcher = AttentionPatcher(torch.nn.Sequential(torch.nn.Identity()), layers=["0"])
    >>> is_static(patcher) is None
    True
    >>> with compilable(patcher):
    ...     sorted(is_static(patcher))
    ['0']
    """
    layers = _static.get(patcher)
    return None if layers is None else frozenset(layers)


# ------------------------------------------------------------------- run-time ops
def _lookup(slot: torch.Tensor) -> tuple[AttentionPatcher | None, str]:
    ref, name = _slots.get(int(slot.reshape(-1)[0]), (None, ""))
    return (ref() if ref is not None else None), name


def _entries(patcher: AttentionPatcher, name: str, kind: type) -> list[Any]:
    active = [e for e in patcher._local.active if name in e.layers]
    for entry in active:
        entry.ran.add(name)
    return [e for e in active if isinstance(e.perturbation, kind)]


@torch.library.custom_op("smoothguide::perturb_query", mutates_args=())
def _perturb_query(q: torch.Tensor, k: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    patcher, name = _lookup(slot)
    if patcher is not None and q.ndim >= 3 and k.shape[-2] == q.shape[-2]:
        entries = _entries(patcher, name, QuerySmoothing)
        if entries:
            out = patcher._attend(name, entries, (q, k, q), {}, attend=lambda q, k, v: q)
            return out.contiguous()
    return q.clone(memory_format=torch.contiguous_format)


@_perturb_query.register_fake
def _(q: torch.Tensor, k: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.custom_op("smoothguide::perturb_output", mutates_args=())
def _perturb_output(out: torch.Tensor, v: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    patcher, name = _lookup(slot)
    # self / joint attention only (values of the queries' own tokens); with grouped-query
    # attention v has fewer heads than out, which identity_rows expands (never skipped)
    if (
        patcher is not None
        and out.ndim >= 3
        and v.ndim == out.ndim
        and v.shape[-2] == out.shape[-2]
    ):
        entries = [
            e
            for e in patcher._local.active
            if name in e.layers and isinstance(e.perturbation, IdentityAttention)
        ]
        if entries:
            # ``out`` stands in for the query: same batch, heads and tokens (v may have
            # fewer heads under grouped-query attention)
            res = patcher._attend(name, entries, (out, v, v), {}, attend=lambda q, k, v: out)
            return res.contiguous()
    return out.clone(memory_format=torch.contiguous_format)


@_perturb_output.register_fake
def _(out: torch.Tensor, v: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(out, memory_format=torch.contiguous_format)


# --------------------------------------------------------------- traced wrappers
def _scaled_dot_product_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any
) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` inside :func:`compilable`: the two ops around it."""
    assert _sdpa is not None
    slot = _current.slot
    if slot is None:
        return _sdpa(query, key, value, *args, **kwargs)
    q = torch.ops.smoothguide.perturb_query(query, key, slot)
    out = _sdpa(q, key, value, *args, **kwargs)
    return torch.ops.smoothguide.perturb_output(out, value, slot)


def _wrap_backend(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def backend(*args: Any, **kwargs: Any) -> Any:
        slot = _current.slot
        q, k, v = kwargs.get("query"), kwargs.get("key"), kwargs.get("value")
        if slot is None or args or q is None or k is None or v is None or q.ndim != 4:
            return fn(*args, **kwargs)  # diffusers calls backends with keywords only
        if kwargs.get("_parallel_config") is not None:
            raise RuntimeError(
                f"diffusers backend {name!r} runs with context parallelism "
                "(parallel_config), which splits the image-token grid SEG blurs across "
                "devices; disable context parallelism for guided inference (SEG/PAG under "
                "torch.compile support every backend without it)"
            )
        if kwargs.get("return_lse"):
            raise RuntimeError(
                f"diffusers backend {name!r} was asked for the log-sum-exp "
                "(return_lse=True), which identity attention (PAG) would invalidate; call it "
                "with return_lse=False"
            )
        _current.slot = None  # a native backend calls torch SDPA inside: not again
        try:
            qh = torch.ops.smoothguide.perturb_query(q.transpose(1, 2), k.transpose(1, 2), slot)
            out = fn(**{**kwargs, "query": qh.transpose(1, 2)})
            out = torch.ops.smoothguide.perturb_output(
                out.transpose(1, 2), v.transpose(1, 2), slot
            ).transpose(1, 2)
        finally:
            _current.slot = slot
        return out

    setattr(backend, _WRAPPED, fn)
    return backend


def _install() -> None:
    global _installs, _sdpa
    _installs += 1
    if _installs > 1:
        return
    _sdpa = _F.scaled_dot_product_attention
    _F.scaled_dot_product_attention = _scaled_dot_product_attention
    registry = _dispatch._registry()
    if registry is not None:
        for key, fn in list(registry._backends.items()):
            if not hasattr(fn, _WRAPPED):
                registry._backends[key] = _wrap_backend(getattr(key, "value", str(key)), fn)
        _patch_register(registry)


def _patch_register(registry: Any) -> None:
    """Wrap a backend that ``registry.register`` adds inside :func:`compilable` as well.

    Compiled code reads the registry when it is traced (and re-traced after a change of
    the entry it read), never at run time, so an entry registered later must already
    be the wrapped function when the model is traced again.
    """
    global _register
    _register = registry.__dict__.get("register")
    if not isinstance(_register, classmethod):
        return
    original = _register.__func__

    def register(cls: Any, backend: Any, *args: Any, **kwargs: Any) -> Any:
        store = original(cls, backend, *args, **kwargs)

        def decorator(func: Any) -> Any:
            out = store(func)
            fn = cls._backends.get(backend)
            if fn is not None and not hasattr(fn, _WRAPPED):
                cls._backends[backend] = _wrap_backend(getattr(backend, "value", str(backend)), fn)
            return out

        return decorator

    registry.register = classmethod(functools.wraps(original)(register))


def _uninstall() -> None:
    global _installs, _sdpa
    _installs -= 1
    if _installs > 0:
        return
    if _F.scaled_dot_product_attention is _scaled_dot_product_attention:
        _F.scaled_dot_product_attention = _sdpa  # type: ignore[assignment]
    _sdpa = None
    registry = _dispatch._registry()
    if registry is not None:
        if isinstance(_register, classmethod):
            registry.register = _register
        for key, fn in list(registry._backends.items()):
            original = getattr(fn, _WRAPPED, None)
            if original is not None:
                registry._backends[key] = original


def _pre(module: torch.nn.Module, args: Any) -> None:
    _current.slot = getattr(module, _SLOT)


def _post(module: torch.nn.Module, args: Any, output: Any) -> None:
    _current.slot = None


def _reset(module: torch.nn.Module, args: Any) -> None:
    _current.slot = None


@contextmanager
def compilable(patcher: AttentionPatcher, layers: LayerSelection = None) -> Iterator[None]:
    """Make the perturbations of ``patcher`` work in models compiled with ``torch.compile``.

    Enter it *before* the model (or its blocks) is compiled or first called compiled,
    and keep it entered while the compiled model is used; ``patcher.perturb`` then
    works as usual, for whole-model ``torch.compile(model)`` and regional compilation
    (``model.compile_repeated_blocks()``, ``block.compile()``) alike.

    Parameters
    ----------
    patcher
        The :class:`~smoothguide.torch.AttentionPatcher` of the model.
    layers
        The layers that perturbations inside the context may select (presets or names,
        as in :meth:`AttentionPatcher.resolve`); default every layer of the patcher.
        Each pays one copy of its query and output per call (see the module docs).

    Yields
    ------
    None

    Raises
    ------
    RuntimeError
        If a :func:`compilable` of the same patcher is already active.

    Examples
    --------
    >>> import torch.nn.functional as F
    >>> class Attn(torch.nn.Module):
    ...     def forward(self, x):
    ...         return F.scaled_dot_product_attention(x, x, x)
    >>> class Net(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.attn = Attn()
    ...     def forward(self, img):
    ...         return self.attn(img.flatten(2).transpose(1, 2))
    >>> from smoothguide.torch import AttentionPatcher
    >>> net = Net()
    >>> patcher = AttentionPatcher(net, layers=Attn)
    >>> with compilable(patcher), patcher.perturb(QuerySmoothing(float("inf")), rows=[1]):
    ...     out = net(torch.randn(2, 4, 3, 5))      # torch.compile(net) works the same
    >>> bool(torch.allclose(out[1], out[1, :1]))
    True
    """
    names = patcher.layers if layers is None else patcher.resolve(layers)
    with _lock:
        if patcher in _static:
            raise RuntimeError("compilable(patcher) is already active for this patcher")
        ids = {name: next(_ids) for name in names}
        handles = []
        try:
            _install()
            for name, ident in ids.items():
                module = patcher._modules[name]
                setattr(module, _SLOT, torch.tensor([ident], dtype=torch.int64))
                _slots[ident] = (weakref.ref(patcher), name)
                handles.append(module.register_forward_pre_hook(_pre, prepend=True))
                # No always_call: dynamo guards on those hook ids, one graph per block.
                handles.append(module.register_forward_hook(_post))
            # A layer that raised leaves its slot set: every model call starts clean.
            handles.append(patcher.model.register_forward_pre_hook(_reset))
            _static[patcher] = ids
        except BaseException:
            for h in handles:
                h.remove()
            _uninstall()
            raise
    try:
        with patcher.attached():
            yield
    finally:
        with _lock:
            for h in handles:
                h.remove()
            for name, ident in ids.items():
                _slots.pop(ident, None)
                module = patcher._modules[name]
                if _SLOT in module.__dict__:
                    delattr(module, _SLOT)
            _static.pop(patcher, None)
            _current.slot = None
            _uninstall()
