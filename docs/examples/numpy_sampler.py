"""Tutorial 1: SEG in a hand-written sampler, NumPy only.

Run it: ``python docs/examples/numpy_sampler.py``. ``tests/test_docs.py`` runs it too,
so every line the tutorial shows is executed in CI. The tutorial page
(docs/tutorials/numpy_sampler.md) includes this file piece by piece.
"""

from __future__ import annotations

# [imports]
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np

from smoothguide import TokenGrid, attention, smooth_queries
from smoothguide.perturbations import Perturbation, QuerySmoothing
from smoothguide.rules import CFG, SEG, StepContext
from smoothguide.sampling import GuidedDenoiser, karras_sigmas, sample_euler

# [/imports]

# [model]
SIGMA_DATA = 0.5


class TinyAttentionDenoiser:
    """``model(x, sigma, y=None) -> denoised``: one self-attention layer on the pixel grid.

    x has shape (batch, channels, height, width); every pixel is a token. ``y`` holds
    class labels; label ``num_classes`` is the null class (the unconditional branch).
    """

    def __init__(
        self,
        height: int,
        width: int,
        channels: int = 3,
        dim: int = 16,
        num_classes: int = 4,
        seed: int = 0,
    ) -> None:
        rng = np.random.default_rng(seed)
        self.grid = TokenGrid(height, width)  # the token grid SEG blurs along
        self.w_in = rng.normal(size=(channels, dim))
        self.wq, self.wk, self.wv = (rng.normal(size=(dim, dim)) / math.sqrt(dim) for _ in "qkv")
        self.w_out = rng.normal(size=(dim, channels)) * 0.2 / math.sqrt(dim)
        self.embed = rng.normal(size=(num_classes + 1, dim))
        self.null_class = num_classes
        self.active: list[tuple[QuerySmoothing, list[int]]] = []  # perturbations in force
        self.calls: list[int] = []  # batch size of every forward call

    @contextmanager
    def perturb(self, perturbation: Perturbation, rows: Sequence[int]) -> Iterator[None]:
        """The Perturber protocol: blur the queries of batch ``rows`` inside the block."""
        if not isinstance(perturbation, QuerySmoothing):
            raise TypeError(f"this model runs QuerySmoothing only, got {perturbation!r}")
        entry = (perturbation, list(rows))
        self.active.append(entry)
        try:
            yield
        finally:
            self.active.remove(entry)  # restored, also after an error

    def __call__(self, x: np.ndarray, sigma: object, y: np.ndarray | None = None) -> np.ndarray:
        b, c, h, w = x.shape
        self.calls.append(b)
        s = np.broadcast_to(np.asarray(sigma, dtype=float), (b,)).reshape(b, 1, 1, 1)
        c_in = 1 / np.sqrt(s**2 + SIGMA_DATA**2)  # EDM preconditioning (Karras 2022)
        c_skip = SIGMA_DATA**2 / (s**2 + SIGMA_DATA**2)
        c_out = s * SIGMA_DATA / np.sqrt(s**2 + SIGMA_DATA**2)
        t = (x * c_in).reshape(b, c, h * w).transpose(0, 2, 1) @ self.w_in  # (b, tokens, dim)
        if y is not None:
            t = t + self.embed[y][:, None, :]
        q, k, v = t @ self.wq, t @ self.wk, t @ self.wv
        for p, rows in self.active:  # SEG: blur these rows' queries only
            q[rows] = smooth_queries(q[rows], self.grid, p.sigma, mode=p.mode, radius=p.radius)
        t = t + attention(q, k, v)
        out = (t @ self.w_out).transpose(0, 2, 1).reshape(b, c, h, w)
        return c_skip * x + c_out * out


# [/model]


def main() -> dict[str, float]:
    # [setup]
    model = TinyAttentionDenoiser(height=6, width=10)  # a non-square 6 x 10 token grid
    sigmas = karras_sigmas(12, sigma_min=0.02, sigma_max=10.0)
    rng = np.random.default_rng(1)
    x_T = rng.normal(size=(4, 3, 6, 10)) * sigmas[0]  # 4 samples of pure noise
    # [/setup]

    # [library]
    rule = SEG(3.0, sigma=2.0)  # official convention: x_c + 3 (x_c - x̃_c)
    guided = GuidedDenoiser(model, rule)  # itself a denoiser: model(x, sigma)
    x_seg = sample_euler(guided, x_T, sigmas, progress=False)
    plain = sample_euler(model, x_T, sigmas, progress=False)
    # [/library]

    # [calls]
    model.calls.clear()
    sample_euler(GuidedDenoiser(model, rule), x_T, sigmas, progress=False)
    assert model.calls == [8] * 12  # [cond, cond_seg] batched: 2 x 4 rows
    model.calls.clear()
    x_off = sample_euler(GuidedDenoiser(model, SEG(0.0, sigma=2.0)), x_T, sigmas, progress=False)
    assert model.calls == [4] * 12  # neutral: the blurred branch is skipped
    assert np.array_equal(x_off, plain)  # and the result is bit-identical
    # [/calls]

    # [by_hand]
    x = x_T.copy()
    for i in range(len(sigmas) - 1):
        ctx = StepContext(sigmas[i], step=i, num_steps=len(sigmas) - 1)
        outputs = {}
        for branch in rule.branches(ctx):  # which model outputs SEG needs
            if branch.perturbation is None:
                outputs[branch] = model(x, sigmas[i])
            else:
                with model.perturb(branch.perturbation, rows=range(len(x))):
                    outputs[branch] = model(x, sigmas[i])
        denoised, _ = rule.combine(outputs, ctx)  # x_c + 3 (x_c - x̃_c)
        d = (x - denoised) / sigmas[i]  # Euler step of the probability-flow ODE
        x = x + (sigmas[i + 1] - sigmas[i]) * d
    assert np.allclose(x, x_seg, atol=1e-10)  # same as the library sampler
    # [/by_hand]

    # [cfg]
    y = np.array([0, 1, 2, 3])
    null = {"y": np.array([model.null_class])}  # broadcast to the batch
    rule_cfg = SEG(3.0, sigma=2.0, cfg_scale=4.0)  # x_u + 4 (x_c - x_u) + 3 (x_c - x̃_c)
    model.calls.clear()
    x_both = sample_euler(
        GuidedDenoiser(model, rule_cfg, uncond=null),
        x_T,
        sigmas,
        extra_args={"y": y},
        progress=False,
    )
    assert model.calls == [12] * 12  # [uncond, cond, cond_seg] in one call
    x_cfg = sample_euler(
        GuidedDenoiser(model, CFG(4.0), uncond=null),
        x_T,
        sigmas,
        extra_args={"y": y},
        progress=False,
    )
    # [/cfg]

    # [sweep]
    report = {}
    for blur in (0.5, 1.0, 2.0, 5.0, math.inf):
        out = sample_euler(GuidedDenoiser(model, SEG(3.0, sigma=blur)), x_T, sigmas, progress=False)
        report[f"sigma={blur:g}"] = float(np.sqrt(np.mean((out - plain) ** 2)))
        print(f"SEG sigma={blur:<4g} RMS change vs. unguided: {report[f'sigma={blur:g}']:.4f}")
    # [/sweep]
    report["seg_vs_plain"] = float(np.sqrt(np.mean((x_seg - plain) ** 2)))
    report["seg_cfg_vs_cfg"] = float(np.sqrt(np.mean((x_both - x_cfg) ** 2)))
    return report


if __name__ == "__main__":
    main()
