"""GuidedPipeline with SEG siblings on a tiny SD: autoguidance (a second UNet), SLG, TPG, SAG."""

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


@pytest.mark.parametrize("kind", ["slg", "tpg"])
def test_slg_and_tpg_run_batched_in_guided_pipeline(pipe: Any, kind: str) -> None:
    """What the scheduler receives is u + 3 (c − u) + 2 (c − p) of the UNet's own batched rows."""
    from smoothguide import SLG, TPG

    rule: Any = (
        SLG(2.0, layers="mid", cfg_scale=3.0, start=0.0, stop=1.0)
        if kind == "slg"
        else TPG(2.0, layers="mid", cfg_scale=3.0)
    )
    raw: list[Any] = []
    used: list[Any] = []
    handle = pipe.unet.register_forward_hook(lambda m, a, out: raw.append(out[0].clone()))
    step = pipe.scheduler.step

    def recording_step(model_output: Any, *args: Any, **kwargs: Any) -> Any:
        used.append(model_output.clone())
        return step(model_output, *args, **kwargs)

    pipe.scheduler.step = recording_step
    try:
        call(GuidedPipeline(pipe, rule), steps=3)
    finally:
        del pipe.scheduler.step
        handle.remove()
    assert no_hooks(pipe.unet)
    # SLG's window (diffusers): int(0 * 3) < step < int(1 * 3), so steps 1 and 2; TPG: every step
    active = [1, 2] if kind == "slg" else [0, 1, 2]
    assert [r.shape[0] for r in raw] == [3 if i in active else 2 for i in range(3)]
    for i in active:
        u, c, p = raw[i].chunk(3)
        assert not torch.allclose(c, p)  # the perturbation really acts
        torch.testing.assert_close(used[i], u + 3.0 * (c - u) + 2.0 * (c - p), rtol=1e-5, atol=1e-6)
