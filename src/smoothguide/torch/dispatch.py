"""Perturb attention that runs through diffusers' attention dispatcher, on any backend.

diffusers' ``dispatch_attention_fn`` (Flux, Wan, LTX, QwenImage, ... processors) looks
the backend function up in ``_AttentionBackendRegistry._backends`` at every call:
``"native"``, ``"_native_math"``, ``"flex"``, ``"flash"``, ``"sage"``, ``"xformers"``,
... and whatever a user registered there. Many of them never call
``torch.nn.functional.scaled_dot_product_attention``, so the SDPA interception of
:mod:`smoothguide.torch.patching` alone would not see them.

While a perturbation is active, every registry entry is wrapped (never replaced for
good: the original function is called, and put back when the last perturbation
exits; an entry registered meanwhile is wrapped on the next perturbed layer call and
kept as registered on exit). The wrapper hands the call to the perturbing
:class:`torch.overrides.TorchFunctionMode` of the layer that is running in this
thread, if any; otherwise (other threads, unperturbed layers) it calls the backend
unchanged. The layer's mode then perturbs the query (``(B, S, H, D)`` in the
dispatcher's layout: after QK-norm and RoPE, exactly what enters softmax) and the
output the backend returns, and ignores the SDPA call a native backend makes inside,
so nothing is applied twice.
"""

from __future__ import annotations

import functools
import importlib
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

from torch.overrides import _get_current_function_mode_stack

from ._deps import torch

__all__ = ["DispatchHandler", "intercepting"]

_WRAPPED = "__smoothguide_backend__"


class DispatchHandler(Protocol):
    """What a layer's torch-function mode offers to the dispatcher wrapper."""

    def dispatch(self, backend: str, fn: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
        """Run backend ``fn`` (``kwargs`` as diffusers passes them) with the perturbation."""
        ...  # pragma: no cover


_lock = threading.RLock()
_users = 0


def _registry() -> Any:
    """diffusers' backend registry, or ``None`` when diffusers (or its dispatcher) is absent."""
    try:
        module = importlib.import_module("diffusers.models.attention_dispatch")
    except ImportError:
        return None
    return getattr(module, "_AttentionBackendRegistry", None)


def _handler() -> DispatchHandler | None:
    """The innermost perturbing mode on this thread's torch-function-mode stack."""
    for mode in reversed(_get_current_function_mode_stack()):
        if callable(getattr(mode, "dispatch", None)):
            return mode
    return None


def _wrap(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def backend(*args: Any, **kwargs: Any) -> Any:
        # Traced code (torch.compile) never sees per-context wrappers: see compile.py.
        handler = None if torch.compiler.is_compiling() else _handler()
        if handler is None or args:  # diffusers calls backends with keywords only
            return fn(*args, **kwargs)
        return handler.dispatch(name, fn, kwargs)

    setattr(backend, _WRAPPED, fn)
    return backend


def refresh() -> None:
    """Wrap the registry entries not wrapped yet (e.g. registered after :func:`intercepting`)."""
    registry = _registry()
    if registry is None:
        return
    with _lock:
        if _users == 0:
            return
        backends = registry._backends
        for key, fn in list(backends.items()):
            if not hasattr(fn, _WRAPPED):
                backends[key] = _wrap(getattr(key, "value", str(key)), fn)


def _unwrap() -> None:
    registry = _registry()
    if registry is None:
        return
    backends = registry._backends
    for key, fn in list(backends.items()):
        original = getattr(fn, _WRAPPED, None)
        if original is not None:
            backends[key] = original


@contextmanager
def intercepting() -> Iterator[None]:
    """Keep diffusers' registered attention backends wrapped for the context (reference counted).

    :meth:`AttentionPatcher.perturb <smoothguide.torch.AttentionPatcher.perturb>` enters it;
    outside a perturbed layer the wrappers call the backend unchanged.

    Yields
    ------
    None

    Examples
    --------
    >>> from diffusers.models.attention_dispatch import _AttentionBackendRegistry as registry
    >>> before = dict(registry._backends)
    >>> with intercepting():
    ...     wrapped = registry._backends["native"] is not before["native"]
    >>> wrapped, registry._backends == before
    (True, True)
    """
    global _users
    with _lock:
        _users += 1
    try:
        refresh()
        yield
    finally:
        with _lock:
            _users -= 1
            if _users == 0:
                _unwrap()


@contextmanager
def _bypassed(mode: Any) -> Iterator[None]:
    # A native backend calls torch SDPA inside: the mode must not perturb that call again.
    mode.bypass += 1
    try:
        yield
    finally:
        mode.bypass -= 1


def perturbed_call(mode: Any, backend: str, fn: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
    """Run diffusers backend ``fn`` for the layer whose perturbing mode is ``mode``.

    ``kwargs`` are the keywords ``dispatch_attention_fn`` passes: ``query``, ``key``,
    ``value`` in ``(B, S, H, D)`` layout, mask and options. Self (or joint) attention
    calls (keys as many as queries) go through ``mode.patcher._attend`` with the
    backend as the attention function; others run unchanged.
    """
    q, k, v = kwargs.get("query"), kwargs.get("key"), kwargs.get("value")
    if q is None or k is None or v is None or q.ndim != 4 or k.shape[1] != q.shape[1]:
        with _bypassed(mode):
            return fn(**kwargs)
    if kwargs.get("_parallel_config") is not None:
        raise RuntimeError(
            f"attention layer {mode.name!r}: diffusers backend {backend!r} runs with context "
            "parallelism (parallel_config), which splits the token axis across devices, so the "
            "image-token grid SEG blurs is not on one device; disable context parallelism for "
            "guided inference (SEG/PAG support every backend without it)"
        )
    if kwargs.get("return_lse"):
        raise RuntimeError(
            f"attention layer {mode.name!r}: diffusers backend {backend!r} was asked for the "
            "log-sum-exp (return_lse=True), which identity attention (PAG) would invalidate; "
            "call it with return_lse=False"
        )
    mode.calls += 1

    def attend(qh: Any, kh: Any, vh: Any) -> Any:  # (B, H, S, D) in and out
        out = fn(**{**kwargs, "query": qh.transpose(1, 2), "key": kh.transpose(1, 2),
                    "value": vh.transpose(1, 2)})  # fmt: skip
        if not hasattr(out, "transpose"):
            raise RuntimeError(
                f"attention layer {mode.name!r}: diffusers backend {backend!r} returned "
                f"{type(out).__name__}, not one tensor; SEG/PAG need the attention output"
            )
        return out.transpose(1, 2)

    with _bypassed(mode):
        out = mode.patcher._attend(
            mode.name, mode.entries, (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)),
            {}, attend=attend, rows=mode,
        )  # fmt: skip
    return out.transpose(1, 2)
