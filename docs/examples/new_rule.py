"""Tutorial 3: a new guidance rule in 30 lines, plugged into the library's sampler.

``AnnealedSEG`` is SEG whose blur width follows the noise level: at noise level σ_t
the queries are blurred with ``ratio * σ_t`` tokens (capped at ``max_blur``), so
the perturbation is strong early and fades out at the end. It needs nothing from
the library but the public protocol. Run: ``python docs/examples/new_rule.py``.
"""

from __future__ import annotations

# [rule]
import math
from dataclasses import dataclass

from smoothguide.branches import Branch
from smoothguide.perturbations import QuerySmoothing
from smoothguide.rules import COND, StepContext, Term, branch_output


@dataclass(frozen=True)
class AnnealedSEG(Term):
    """x_c + scale * (x_c - x̃_c), queries blurred by min(ratio * σ_t, max_blur) tokens."""

    scale: float = 3.0
    ratio: float = 1.0
    max_blur: float = math.inf

    def blurred(self, ctx: StepContext) -> Branch:
        blur = min(self.ratio * ctx.sigma, self.max_blur)
        return Branch("cond", QuerySmoothing(round(blur, 6)))  # rounded: a stable branch key

    def active(self, ctx: StepContext) -> bool:
        return self.scale != 0 and not self.blurred(ctx).perturbation.is_identity

    def branches(self, ctx: StepContext) -> tuple[Branch, ...]:
        return (COND, self.blurred(ctx)) if self.active(ctx) else (COND,)

    def apply(self, pred, outputs, ctx, state=None):
        if not self.active(ctx):
            return pred, state  # neutral: branch never evaluated
        x_c = branch_output(outputs, COND)
        x_blur = branch_output(outputs, self.blurred(ctx))
        return pred + self.scale * (x_c - x_blur), state


# [/rule]


def main() -> dict[str, float]:
    import numpy as np
    from numpy_sampler import TinyAttentionDenoiser

    from smoothguide.rules import CFG, SEG, Compose
    from smoothguide.sampling import GuidedDenoiser, karras_sigmas, sample_euler

    # [check]
    rule = AnnealedSEG(scale=2.0, ratio=0.5, max_blur=4.0)
    ctx = StepContext(sigma=3.0)  # blur = min(0.5 * 3, 4) = 1.5 tokens
    x_c, x_blur = np.array([1.0, 2.0]), np.array([0.5, 2.5])
    outputs = {COND: x_c, Branch("cond", QuerySmoothing(1.5)): x_blur}
    guided, _ = rule.combine(outputs, ctx)
    assert np.allclose(guided, x_c + 2.0 * (x_c - x_blur))  # the formula, by hand
    assert AnnealedSEG(0.0).branches(ctx) == (COND,)  # neutral skips the branch
    # [/check]

    # [plug]
    model = TinyAttentionDenoiser(height=6, width=10)
    sigmas = karras_sigmas(10, sigma_min=0.02, sigma_max=10.0)
    x_T = np.random.default_rng(0).normal(size=(2, 3, 6, 10)) * sigmas[0]
    y, null = np.array([1, 2]), {"y": np.array([model.null_class])}
    both = Compose(CFG(3.0), AnnealedSEG(scale=2.0, ratio=0.5, max_blur=4.0))
    x = sample_euler(
        GuidedDenoiser(model, both, uncond=null), x_T, sigmas, extra_args={"y": y}, progress=False
    )
    # [/plug]

    # [same]
    # With a constant blur (ratio 0, max_blur ignored) it is the library's SEG:
    const = AnnealedSEG(scale=2.0, ratio=0.0, max_blur=0.0)
    assert const.branches(ctx) == (COND,)  # σ_blur = 0: identity, skipped
    fixed = AnnealedSEG(scale=2.0, ratio=1e9, max_blur=2.0)  # always 2 tokens
    a = sample_euler(GuidedDenoiser(model, fixed), x_T, sigmas, progress=False)
    b = sample_euler(GuidedDenoiser(model, SEG(2.0, sigma=2.0)), x_T, sigmas, progress=False)
    assert np.allclose(a, b, atol=1e-12)
    # [/same]
    return {"rms": float(np.sqrt(np.mean(x**2))), "fixed_vs_seg": float(np.abs(a - b).max())}


if __name__ == "__main__":
    print(main())
