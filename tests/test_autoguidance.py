"""Autoguidance: a branch evaluated by a second, weaker model (toy array-API denoisers)."""

from __future__ import annotations

import array_api_compat.numpy as xnp
import numpy as np
import pytest

from smoothguide import CFG, SEG, Autoguidance, Branch, Compose, GuidedDenoiser, WeakModel
from smoothguide.rules import COND, StepContext
from smoothguide.sampling import sample_euler
from toy_model import ToyAttentionDenoiser

H, W = 3, 4


def _models() -> tuple[ToyAttentionDenoiser, ToyAttentionDenoiser]:
    return ToyAttentionDenoiser(xnp, H, W, seed=0), ToyAttentionDenoiser(xnp, H, W, seed=1)


@pytest.mark.parametrize("batched", [True, False])
def test_autoguidance_equals_hand_formula(batched: bool) -> None:
    main, weak = _models()
    x = np.random.default_rng(0).standard_normal((2, 2, H, W))
    labels = np.array([0, 2])
    guided = GuidedDenoiser(main, Autoguidance(2.5, model=weak), batched=batched)
    out = guided(x, 0.7, class_labels=labels)
    x_main = main(x, 0.7, class_labels=labels)
    x_weak = weak(x, 0.7, class_labels=labels)
    np.testing.assert_allclose(out, x_weak + 2.5 * (x_main - x_weak), rtol=1e-12, atol=1e-12)
    assert not np.allclose(out, x_main)
    assert weak.calls[0] == 2  # its own call, one batch of the caller's rows


def test_autoguidance_with_cfg_and_seg_keeps_the_other_branches_batched() -> None:
    main, weak = _models()
    x = np.random.default_rng(1).standard_normal((2, 2, H, W))
    labels = np.array([1, 0])
    null = {"class_labels": np.array([3])}
    rule = Compose(CFG(3.0), Autoguidance(2.0, model=weak), SEG(1.5, sigma=1.0))
    out = GuidedDenoiser(main, rule, uncond=null)(x, 0.5, class_labels=labels)
    assert main.calls[-1] == 6  # [uncond, cond, seg] in one call; the weak branch is elsewhere
    assert weak.calls == [2]
    plain = GuidedDenoiser(main, Compose(CFG(3.0), SEG(1.5, sigma=1.0)), uncond=null)
    base = plain(x, 0.5, class_labels=labels)
    x_c = main(x, 0.5, class_labels=labels)
    x_w = weak(x, 0.5, class_labels=labels)
    np.testing.assert_allclose(out, base + (2.0 - 1.0) * (x_c - x_w), rtol=1e-12, atol=1e-12)


def test_neutral_scale_never_calls_the_weak_model_and_sampling_runs() -> None:
    main, weak = _models()
    x = np.random.default_rng(2).standard_normal((1, 2, H, W))
    rule = Autoguidance(1.0, model=weak)
    assert rule.branches(StepContext(1.0)) == (COND,)
    sigmas = [2.0, 1.0, 0.5, 0.0]
    a = sample_euler(GuidedDenoiser(main, rule), x, sigmas)
    b = sample_euler(main, x, sigmas)
    np.testing.assert_array_equal(a, b)
    assert weak.calls == []
    guided = sample_euler(GuidedDenoiser(main, Autoguidance(2.0, model=weak)), x, sigmas)
    assert len(weak.calls) == 3
    assert np.all(np.isfinite(guided))


def test_weak_model_spec_identity_and_errors() -> None:
    main, weak = _models()
    assert Branch("cond", WeakModel(weak)) == Branch("cond", WeakModel(weak))
    assert WeakModel(weak) != WeakModel(main)
    with pytest.raises(TypeError, match="callable"):
        WeakModel(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no layers"):
        WeakModel(weak, layers="mid")
    with pytest.raises(TypeError, match="callable"):
        Autoguidance(2.0)
