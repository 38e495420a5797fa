"""Quality gate of the shipped demo weights, sampled through the public rules and adapter."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from smoothguide.demo.guide import guided_sample  # noqa: E402
from smoothguide.demo.metrics import embed  # noqa: E402
from smoothguide.demo.weights import load_classifier, load_denoiser  # noqa: E402
from smoothguide.rules import CFG  # noqa: E402


@pytest.fixture(scope="module")
def models() -> tuple[object, object]:
    return load_denoiser(), load_classifier()


def test_cfg_samples_are_classified_as_their_class(models: tuple[object, object]) -> None:
    den, clf = models
    labels = torch.arange(10).repeat(6)  # 60 samples, 6 per digit
    noise = torch.randn(60, 1, 16, 16, generator=torch.Generator().manual_seed(123))
    x = guided_sample(den, CFG(2.0), labels=labels, noise=noise, steps=20)
    _, probs = embed(clf, x)
    accuracy = float((probs.argmax(axis=1) == labels.numpy()).mean())
    assert accuracy >= 0.9


def test_samples_look_like_digits_not_noise(models: tuple[object, object]) -> None:
    den, clf = models
    noise = torch.randn(30, 1, 16, 16, generator=torch.Generator().manual_seed(7))
    x = guided_sample(den, None, labels=torch.arange(10).repeat(3), noise=noise, steps=20)
    ink = ((x + 1) / 2).mean().item()
    assert 0.05 < ink < 0.3  # real digits: ~0.13 of the 16x16 frame is ink
    _, probs = embed(clf, x)
    _, noise_probs = embed(clf, noise.clamp(-1, 1))
    assert np.mean(probs.max(axis=1)) > np.mean(noise_probs.max(axis=1))
