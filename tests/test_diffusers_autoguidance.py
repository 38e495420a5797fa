"""Autoguidance in GuidedPipeline: a second, weaker UNet evaluates the weak branch (tiny SD)."""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from smoothguide import CFG, Autoguidance, Compose  # noqa: E402
from smoothguide.diffusers import GuidedPipeline  # noqa: E402
from test_diffusers_unet_pipeline import _unet, call, make_pipe, no_hooks  # noqa: E402


@pytest.fixture(scope="module")
def pipe() -> Any:
    return make_pipe("sd")


def _weak_unet() -> Any:
    weak = _unet(xl=False)
    torch.manual_seed(7)
    with torch.no_grad():  # another "checkpoint": the same net with perturbed weights
        for p in weak.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return weak


@pytest.mark.parametrize("cfg", [1.0, 4.0])
def test_scheduler_gets_weak_plus_w_times_main_minus_weak(pipe: Any, cfg: float) -> None:
    weak = _weak_unet()
    seen: list[tuple[Any, Any, Any]] = []

    def grab(module: Any, args: Any, kwargs: Any, out: Any) -> None:
        seen.append((args, dict(kwargs), out[0].clone()))

    handle = pipe.unet.register_forward_hook(grab, with_kwargs=True)
    used: list[Any] = []
    step = pipe.scheduler.step

    def recording_step(model_output: Any, *args: Any, **kwargs: Any) -> Any:
        used.append(model_output.clone())
        return step(model_output, *args, **kwargs)

    pipe.scheduler.step = recording_step
    rule = Compose(CFG(cfg), Autoguidance(2.5, model=weak))
    try:
        call(GuidedPipeline(pipe, rule), steps=2)
    finally:
        del pipe.scheduler.step
        handle.remove()
    assert len(seen) == 2
    assert no_hooks(pipe.unet)
    assert no_hooks(weak)
    for (args, kwargs, out), guided in zip(seen, used, strict=True):
        chunks = out.chunk(2 if cfg != 1.0 else 1)
        x_c = chunks[-1]
        # the weak UNet on the cond rows of the same call, by hand
        n = x_c.shape[0]
        rows = slice(out.shape[0] - n, out.shape[0])
        sample = args[0][rows]
        ehs = kwargs["encoder_hidden_states"][rows]
        with torch.no_grad():
            x_w = weak(sample, args[1], encoder_hidden_states=ehs, return_dict=False)[0]
        expected = x_c + 1.5 * (x_c - x_w)
        if cfg != 1.0:
            x_u = chunks[0]
            expected = expected + (cfg - 1.0) * (x_c - x_u)
        assert not torch.allclose(x_w, x_c)
        torch.testing.assert_close(guided[: x_c.shape[0]], expected, rtol=1e-5, atol=1e-6)


def test_own_denoiser_as_weak_model_is_refused(pipe: Any) -> None:
    with pytest.raises(ValueError, match="own denoiser"):
        call(GuidedPipeline(pipe, Autoguidance(2.0, model=pipe.unet)), steps=1)
    assert no_hooks(pipe.unet)


def test_sag_in_a_pipeline_is_a_clear_error(pipe: Any) -> None:
    from smoothguide import SAG

    with pytest.raises(NotImplementedError, match="GuidedDenoiser"):
        call(GuidedPipeline(pipe, SAG(0.5)), steps=1)
    assert no_hooks(pipe.unet)
