"""Kwargs hooks caught mid-(de)registration by another thread (smoothguide.torch.hooks)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from smoothguide.torch.hooks import forward_hook_with_kwargs, pre_hook_with_kwargs  # noqa: E402


def _half_registered(handle: object, module: torch.nn.Module, flags: str) -> None:
    """The state torch leaves between adding a hook and flagging it ``with_kwargs`` (and
    between the two deletions of its removal): listed, but not flagged."""
    del getattr(module, flags)[handle.id]  # type: ignore[attr-defined]


def test_raw_kwargs_hook_fails_in_the_half_registered_state() -> None:
    """The torch behaviour the wrappers guard against (so the tests below can fail)."""
    lin = torch.nn.Linear(3, 3)
    handle = lin.register_forward_pre_hook(lambda m, a, k: None, with_kwargs=True)
    _half_registered(handle, lin, "_forward_pre_hooks_with_kwargs")
    with pytest.raises(TypeError):
        lin(torch.ones(2, 3))


def test_pre_hook_half_registered_leaves_the_call_alone() -> None:
    lin = torch.nn.Linear(3, 3)
    x = torch.randn(2, 3)
    ref = lin(x)
    seen: list[dict[str, object]] = []

    def double(m: torch.nn.Module, args: tuple, kwargs: dict) -> tuple:
        seen.append(kwargs)
        return (2 * args[0],), kwargs

    handle = pre_hook_with_kwargs(lin, double)
    torch.testing.assert_close(lin(x), lin.forward(2 * x), rtol=0, atol=0)  # active when whole
    assert seen == [{}]
    _half_registered(handle, lin, "_forward_pre_hooks_with_kwargs")
    torch.testing.assert_close(lin(x), ref, rtol=0, atol=0)
    assert len(seen) == 1


def test_forward_hook_half_registered_leaves_the_call_alone() -> None:
    lin = torch.nn.Linear(3, 3)
    x = torch.randn(2, 3)
    ref = lin(x)
    handle = forward_hook_with_kwargs(lin, lambda m, a, k, out: -out)
    torch.testing.assert_close(lin(x), -ref, rtol=0, atol=0)
    _half_registered(handle, lin, "_forward_hooks_with_kwargs")
    torch.testing.assert_close(lin(x), ref, rtol=0, atol=0)
