"""Module hooks that are safe while other threads add and remove hooks.

``torch.nn.Module._call_impl`` iterates over a snapshot of a module's hooks and then looks
up, per hook, whether it was registered ``with_kwargs``. When another thread removes (or is
in the middle of registering) a kwargs hook between those two steps, torch calls that hook
in the plain convention: ``hook(module, args)`` for a pre-hook, ``hook(module, args,
output)`` for a forward hook. Such a call can only reach a hook of *another* thread's
context (a thread never registers or removes its own hooks during its own model call), so
the wrappers here treat it as "not mine" and leave the call untouched, instead of failing
with a ``TypeError`` about a missing ``kwargs`` argument.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._deps import torch

if TYPE_CHECKING:
    from torch.utils.hooks import RemovableHandle

__all__ = ["forward_hook_with_kwargs", "pre_hook_with_kwargs"]

_PreHook = Callable[
    [torch.nn.Module, tuple[Any, ...], dict[str, Any]],
    "tuple[tuple[Any, ...], dict[str, Any]] | None",
]
_ForwardHook = Callable[[torch.nn.Module, tuple[Any, ...], dict[str, Any], Any], Any]


def pre_hook_with_kwargs(
    module: torch.nn.Module, hook: _PreHook, *, prepend: bool = False
) -> RemovableHandle:
    """``module.register_forward_pre_hook(hook, with_kwargs=True)``, thread-safe (see above).

    Parameters
    ----------
    module
        The module whose calls ``hook`` sees.
    hook
        ``hook(module, args, kwargs)``; returns ``None`` or new ``(args, kwargs)``.
    prepend
        Run before the module's other pre-hooks.

    Returns
    -------
    torch.utils.hooks.RemovableHandle
        ``.remove()`` detaches the hook.

    Examples
    --------
    >>> lin = torch.nn.Linear(2, 2, bias=False)
    >>> h = pre_hook_with_kwargs(lin, lambda m, args, kw: ((2 * args[0],), kw))
    >>> bool(torch.equal(lin(torch.ones(1, 2)), lin.weight.sum(1, keepdim=True).T * 2))
    True
    >>> h.remove()
    """

    def safe(mod: torch.nn.Module, args: tuple[Any, ...], *kwargs: dict[str, Any]) -> Any:
        if len(kwargs) != 1:  # called in the plain convention: another thread's hook
            return None
        return hook(mod, args, kwargs[0])

    return module.register_forward_pre_hook(safe, with_kwargs=True, prepend=prepend)


def forward_hook_with_kwargs(
    module: torch.nn.Module, hook: _ForwardHook, *, always_call: bool = False
) -> RemovableHandle:
    """``module.register_forward_hook(hook, with_kwargs=True)``, thread-safe (see above).

    Parameters
    ----------
    module
        The module whose calls ``hook`` sees.
    hook
        ``hook(module, args, kwargs, output)``; returns ``None`` or a replacement output.
    always_call
        Also call the hook when the forward raised.

    Returns
    -------
    torch.utils.hooks.RemovableHandle
        ``.remove()`` detaches the hook.

    Examples
    --------
    >>> lin = torch.nn.Linear(2, 2)
    >>> h = forward_hook_with_kwargs(lin, lambda m, args, kw, out: -out)
    >>> x = torch.randn(3, 2)
    >>> out = lin(x)
    >>> h.remove()
    >>> bool(torch.equal(out, -lin(x)))
    True
    """

    def safe(mod: torch.nn.Module, args: tuple[Any, ...], *rest: Any) -> Any:
        if len(rest) != 2:  # called as hook(module, args, output): another thread's hook
            return None
        return hook(mod, args, rest[0], rest[1])

    return module.register_forward_hook(safe, with_kwargs=True, always_call=always_call)
