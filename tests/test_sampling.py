"""GuidedDenoiser and the samplers, end to end on the pure array-API toy attention model."""

from __future__ import annotations

import importlib.util
import itertools
import math
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import array_api_compat.numpy as xnp
import numpy as np
import pytest

from smoothguide.branches import Branch
from smoothguide.perturbations import QuerySmoothing
from smoothguide.rules import (
    APG,
    CFG,
    COND,
    PAG,
    SEG,
    UNCOND,
    Compose,
    GuidanceRule,
    Interval,
    Rescale,
    StepContext,
)
from smoothguide.sampling import (
    GuidedDenoiser,
    SteppableDenoiser,
    ddim_steps,
    euler_steps,
    karras_sigmas,
    sample_ddim,
    sample_euler,
)
from tolerance import assert_close, eps_of


def _load_toy_model() -> Any:
    """Import tests/toy_model.py (pytest runs with --import-mode=importlib)."""
    name = "smoothguide_tests_toy_model"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, Path(__file__).with_name("toy_model.py")
        )
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


ToyAttentionDenoiser = _load_toy_model().ToyAttentionDenoiser

B, H, W = 2, 4, 5
SIGMAS = karras_sigmas(4, 0.05, 5.0)
LABELS = np.array([0, 2])
NULL = np.array([3])  # the toy model's null class (num_classes = 3)


def toy(seed: int = 0) -> Any:
    return ToyAttentionDenoiser(xnp, H, W, seed=seed)


def noise(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(B, 2, H, W)) * SIGMAS[0]


def guided(model: Any, rule: Any, **kw: Any) -> GuidedDenoiser:
    return GuidedDenoiser(model, rule, uncond={"class_labels": NULL}, **kw)


def by_hand(model: Any, x: np.ndarray, sigma: float) -> dict[str, np.ndarray]:
    """Every branch of the toy model, each in its own call, perturbations entered by hand."""
    seg = QuerySmoothing(1.5)
    null = np.broadcast_to(NULL, (B,))
    out = {"c": model(x, sigma, class_labels=LABELS), "u": model(x, sigma, class_labels=null)}
    with model.perturb(seg, range(B)):
        out["c_seg"] = model(x, sigma, class_labels=LABELS)
        out["u_seg"] = model(x, sigma, class_labels=null)
    return out


# -- GuidedDenoiser: batching, formulas on real branch outputs, skipping -----------------------


def test_batched_call_layout_and_official_cfg_seg_formula() -> None:
    """[uncond, cond, cond_seg] in one call, blur on the last B rows only; official formula."""
    model, x, sigma = toy(), noise(), 1.3
    rule = SEG(3.0, sigma=1.5, cfg_scale=4.0)
    out = guided(model, rule)(x, sigma, class_labels=LABELS)
    assert model.calls == [3 * B]
    assert model.perturbed == [((rule.perturbation, (4, 5)),)]
    ref = by_hand(model, x, sigma)
    expected = ref["u"] + 4.0 * (ref["c"] - ref["u"]) + 3.0 * (ref["c"] - ref["c_seg"])
    np.testing.assert_allclose(out, expected, rtol=1e-10, atol=1e-12)
    assert not np.allclose(ref["c_seg"], ref["c"])  # the blur really changes the branch


def test_paper_eq10_blurs_the_unconditional_branch() -> None:
    model, x, sigma = toy(), noise(), 0.7
    rule = SEG(3.0, sigma=1.5, cfg_scale=4.0, convention="paper")
    out = guided(model, rule)(x, sigma, class_labels=LABELS)
    ref = by_hand(model, x, sigma)
    expected = ref["u"] + 4.0 * (ref["c"] - ref["u"]) + 3.0 * (ref["u"] - ref["u_seg"])
    np.testing.assert_allclose(out, expected, rtol=1e-10, atol=1e-12)


def test_unbatched_runs_one_call_per_branch_with_the_same_result() -> None:
    model, x = toy(), noise()
    rule = Compose(CFG(3.0), SEG(2.0, sigma=1.5), PAG(1.0))
    one = guided(model, rule)(x, 1.0, class_labels=LABELS)
    assert model.calls == [4 * B]
    assert [len(p) for p in model.perturbed] == [2]
    model.calls.clear()
    model.perturbed.clear()
    sep = guided(model, rule, batched=False)(x, 1.0, class_labels=LABELS)
    assert model.calls == [B, B, B, B]
    assert [tuple(r for _, r in p) for p in model.perturbed] == [(), (), ((0, 1),), ((0, 1),)]
    np.testing.assert_allclose(sep, one, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "rule",
    [
        CFG(1.0),
        SEG(0.0, sigma=2.0),
        SEG(3.0, sigma=0.0),
        SEG(1.0, convention="paper"),
        PAG(0.0),
        APG(1.0, momentum=-0.5),
        Compose(CFG(1.0), SEG(0.0), Rescale(0.0)),
        Compose(CFG(7.0, schedule=Interval(2.0, 4.0)), SEG(3.0, schedule=Interval(2.0, 4.0))),
    ],
    ids=repr,
)
def test_neutral_rules_skip_branches_and_equal_the_unguided_model(rule: GuidanceRule) -> None:
    model, x = toy(), noise()
    unguided = model(x, 1.0, class_labels=LABELS)
    model.calls.clear()
    model.perturbed.clear()
    out = guided(model, rule)(x, 1.0, class_labels=LABELS)
    assert model.calls == [B]  # one call, the conditional rows only
    assert model.perturbed == [()]
    np.testing.assert_array_equal(out, unguided)


def test_seg_scale_zero_with_cfg_is_exactly_cfg_with_two_branches() -> None:
    model, x = toy(), noise()
    cfg = guided(model, CFG(4.0))(x, 1.0, class_labels=LABELS)
    model.calls.clear()
    for conv in ("official", "paper"):
        out = guided(model, SEG(0.0, cfg_scale=4.0, convention=conv))(x, 1.0, class_labels=LABELS)
        np.testing.assert_array_equal(out, cfg)
    assert model.calls == [2 * B, 2 * B]


def test_unconditional_model_and_conditioning_errors() -> None:
    model, x = toy(), noise()
    # an unconditional model: both branches without keyword arguments
    out = GuidedDenoiser(model, CFG(3.0))(x, 1.0)
    np.testing.assert_allclose(out, model(x, 1.0), rtol=1e-12)
    with pytest.raises(ValueError, match=r"uncond=None.*class_labels"):
        GuidedDenoiser(model, CFG(3.0))(x, 1.0, class_labels=LABELS)
    with pytest.raises(ValueError, match="keyword arguments differ"):
        GuidedDenoiser(model, CFG(3.0), uncond={"y": NULL})(x, 1.0, class_labels=LABELS)
    with pytest.raises(ValueError, match=r"'class_labels' must have a leading batch axis of 2"):
        guided(model, CFG(3.0))(x, 1.0, class_labels=np.array([0, 1, 2]))


def test_nested_mapping_and_constant_keyword_arguments_are_batched() -> None:
    """SDXL-style ``added_cond_kwargs`` dicts are stacked per key; equal constants pass through."""
    calls: list[tuple[int, bool]] = []

    def model(x: Any, sigma: Any, *, added: Mapping[str, Any], flag: bool) -> Any:
        calls.append((x.shape[0], flag))
        return x * sigma + added["emb"][:, :, None, None] + 2.0 * added["time"][:, None, None, None]

    x = noise()
    cond = {"added": {"emb": np.ones((B, 2)), "time": np.array([1.0, 2.0])}, "flag": True}
    uncond = {"added": {"emb": np.zeros((1, 2)), "time": np.array([0.5])}, "flag": True}
    one = GuidedDenoiser(model, CFG(3.0), uncond=uncond)(x, 0.5, **cond)
    sep = GuidedDenoiser(model, CFG(3.0), uncond=uncond, batched=False)(x, 0.5, **cond)
    assert calls == [(2 * B, True), (B, True), (B, True)]
    x_c = x * 0.5 + 1.0 + 2.0 * np.array([1.0, 2.0])[:, None, None, None]
    x_u = x * 0.5 + 2.0 * 0.5
    np.testing.assert_allclose(one, x_u + 3.0 * (x_c - x_u), rtol=1e-12)
    np.testing.assert_allclose(sep, one, rtol=1e-12)
    with pytest.raises(ValueError, match=r"'flag': its values differ"):
        GuidedDenoiser(model, CFG(3.0), uncond={**uncond, "flag": False})(x, 0.5, **cond)


def test_sigma_per_sample_and_scalar_forms_agree() -> None:
    model, x = toy(), noise()
    g = guided(model, SEG(2.0, sigma=1.0, cfg_scale=3.0))
    a = g(x, 0.9, class_labels=LABELS)
    b = g(x, np.full((B,), 0.9), class_labels=LABELS)
    c = g(x, np.asarray(0.9), class_labels=LABELS)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    with pytest.raises(ValueError, match="sigma must be the same for every sample"):
        g(x, np.array([0.9, 1.0]), class_labels=LABELS)


def test_bad_denoiser_arguments_are_named() -> None:
    model = toy()
    with pytest.raises(TypeError, match="rule must be a GuidanceRule"):
        GuidedDenoiser(model, "cfg")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="model must be callable"):
        GuidedDenoiser(3, CFG(2.0))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="uncond must be None or a mapping"):
        GuidedDenoiser(model, CFG(2.0), uncond=[NULL])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="perturber must implement"):
        GuidedDenoiser(model, CFG(2.0), perturber=object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="batched must be True or False"):
        GuidedDenoiser(model, CFG(2.0), batched=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sigmas must be strictly decreasing"):
        GuidedDenoiser(model, CFG(2.0), sigmas=[1.0, 2.0])


def test_perturbed_branch_without_perturber_is_a_clear_error() -> None:
    def plain(x: Any, sigma: Any, **kw: Any) -> Any:
        return x

    x = noise()
    with pytest.raises(ValueError, match=r"no perturber: pass perturber="):
        GuidedDenoiser(plain, SEG(3.0))(x, 1.0)
    # neutral SEG never asks for the perturbed branch, so no perturber is needed
    np.testing.assert_array_equal(GuidedDenoiser(plain, SEG(0.0))(x, 1.0), x)


def test_model_returning_wrong_rows_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="must return an array with 4 rows"):
        GuidedDenoiser(lambda x, s: x[:1], CFG(2.0))(noise(), 1.0)


# -- the toy model executes perturbations on its rows only -----------------------------------


def test_toy_perturbation_touches_only_its_rows_and_sigma_zero_is_identity() -> None:
    model, x = toy(), noise()
    plain = model(x, 1.0, class_labels=LABELS)
    with model.perturb(QuerySmoothing(0.0), [1]):
        np.testing.assert_array_equal(model(x, 1.0, class_labels=LABELS), plain)
    with model.perturb(QuerySmoothing(2.0, layers="attn1"), [1]):
        blurred = model(x, 1.0, class_labels=LABELS)
    np.testing.assert_array_equal(blurred[0], plain[0])
    assert not np.allclose(blurred[1], plain[1])
    assert model._active == []  # restored on exit
    with pytest.raises(RuntimeError), model.perturb(QuerySmoothing(2.0), [0]):
        raise RuntimeError
    assert model._active == []  # also after an exception
    with (
        pytest.raises(ValueError, match="unknown layers"),
        model.perturb(QuerySmoothing(1.0, layers="mid"), [0]),
    ):
        pass


# -- samplers --------------------------------------------------------------------------------


def gaussian_denoiser(sd: float) -> Any:
    """The exact denoiser of data ~ N(0, sd^2): D(x, s) = x sd^2 / (sd^2 + s^2)."""

    def model(x: Any, sigma: Any) -> Any:
        s = sigma[:, None] if getattr(sigma, "ndim", 0) == 1 else sigma
        return x * sd**2 / (sd**2 + s**2)

    return model


def test_euler_and_ddim_solve_the_gaussian_probability_flow_ode() -> None:
    """Gaussian data, D(x, s) = x sd^2/(sd^2 + s^2): the ODE dx/ds = x s/(sd^2 + s^2) is linear.

    Each Euler step multiplies x by 1 + (s' - s) s/(sd^2 + s^2); the exact solution is
    x(s) = x(s0) sqrt(sd^2 + s^2)/sqrt(sd^2 + s0^2), approached at first order.
    """
    sd, s0 = 0.5, 10.0
    x0 = np.array([[1.0, -2.0, 3.0]]) * s0
    exact = x0 * sd / math.sqrt(sd**2 + s0**2)
    model = gaussian_denoiser(sd)
    errors = []
    for n in (50, 100, 200):
        sigmas = karras_sigmas(n, 0.002, s0)
        factor = np.prod([1 + (b - a) * a / (sd**2 + a**2) for a, b in itertools.pairwise(sigmas)])
        e = sample_euler(model, x0, sigmas, progress=False)
        np.testing.assert_allclose(e, x0 * factor, rtol=1e-12)
        d = sample_ddim(model, x0, sigmas, progress=False)
        np.testing.assert_allclose(d, e, rtol=1e-10)  # eta = 0 DDIM is the Euler step
        errors.append(np.abs(e - exact).max())
    assert errors[-1] < 0.02 * np.abs(exact).max()
    np.testing.assert_allclose(np.array(errors[:-1]) / np.array(errors[1:]), 2.0, rtol=0.15)


def test_ddim_eta_step_by_hand() -> None:
    """One stochastic DDIM step: sigma_up, sigma_down from the VP DDIM variance."""
    model = gaussian_denoiser(1.0)
    x, z = np.array([[2.0, -1.0]]), np.array([[0.3, 0.7]])
    s, t, eta = 2.0, 1.0, 0.8
    st = next(ddim_steps(model, x, [s, t], eta=eta, noise_sampler=lambda a, b: z))
    # VP form: abar = 1/(1+sigma^2); var = eta^2 (1-abar_t)/(1-abar_s)(1 - abar_s/abar_t) / abar_t
    ab_s, ab_t = 1 / (1 + s**2), 1 / (1 + t**2)
    up = eta * math.sqrt((1 - ab_t) / (1 - ab_s) * (1 - ab_s / ab_t) / ab_t)
    down = math.sqrt(t**2 - up**2)
    den = x / (1 + s**2)
    np.testing.assert_allclose(st.x, den + down * (x - den) / s + up * z, rtol=1e-12)
    # default noise is seeded and reproducible
    a = sample_ddim(model, x, [s, t, 0.0], eta=1.0, seed=5, progress=False)
    b = sample_ddim(model, x, [s, t, 0.0], eta=1.0, seed=5, progress=False)
    np.testing.assert_array_equal(a, b)


def test_samplers_pass_step_context_to_guided_denoisers() -> None:
    seen: list[StepContext] = []

    @dataclass(frozen=True)
    class Spy(CFG):
        def branches(self, ctx: StepContext) -> tuple[Branch, ...]:
            seen.append(ctx)
            return super().branches(ctx)

    model = toy()
    sample_euler(
        guided(model, Spy(2.0)),
        noise(),
        SIGMAS,
        extra_args={"class_labels": LABELS},
        progress=False,
    )
    assert list(dict.fromkeys((c.sigma, c.step, c.num_steps) for c in seen)) == [
        (s, i, 4) for i, s in enumerate(SIGMAS[:-1])
    ]
    assert isinstance(guided(model, CFG(2.0)), SteppableDenoiser)


def test_progress_schedule_via_sigmas_for_plain_k_diffusion_calls() -> None:
    """A k-diffusion-style loop only passes sigma; sigmas= lets the denoiser find the step."""
    rule = CFG(4.0, schedule=Interval(0.0, 0.5, on="progress"))
    model = toy()
    x = noise()
    ref = sample_euler(
        guided(model, rule), x, SIGMAS, extra_args={"class_labels": LABELS}, progress=False
    )
    plain = guided(model, rule, sigmas=SIGMAS)
    y = x
    for s, s_next in itertools.pairwise(SIGMAS):  # k-diffusion's sample_euler
        d = (y - plain(y, np.full((B,), s), class_labels=LABELS)) / s
        y = y + (s_next - s) * d
    np.testing.assert_allclose(y, ref, rtol=1e-12)
    with pytest.raises(ValueError, match="needs the step index"):
        guided(model, rule)(x, SIGMAS[0], class_labels=LABELS)


# -- APG state: two concurrent runs equal two runs one after another --------------------------


def test_apg_state_round_trip_two_samplers_interleaved() -> None:
    model = toy()
    rule = Compose(APG(4.0, momentum=-0.5, norm_threshold=5.0), SEG(2.0, sigma=1.0))
    den = guided(model, rule)  # one denoiser and one rule shared by both runs
    xa, xb = noise(1), noise(2)
    kw = {"extra_args": {"class_labels": LABELS}}
    seq_a = sample_euler(den, xa, SIGMAS, progress=False, **kw)
    seq_b = sample_ddim(den, xb, SIGMAS, progress=False, **kw)
    run_a, run_b = euler_steps(den, xa, SIGMAS, **kw), ddim_steps(den, xb, SIGMAS, **kw)
    last_a = last_b = None
    for step_a, step_b in zip(run_a, run_b, strict=True):
        last_a, last_b = step_a.x, step_b.x
    np.testing.assert_array_equal(last_a, seq_a)
    np.testing.assert_array_equal(last_b, seq_b)
    # the momentum matters, so the test above can fail if state leaked between runs
    no_momentum = Compose(APG(4.0, norm_threshold=5.0), SEG(2.0, sigma=1.0))
    other = sample_euler(guided(model, no_momentum), xa, SIGMAS, progress=False, **kw)
    assert not np.allclose(other, seq_a)
    # plain calls keep the state inside the denoiser and restart it when sigma rises
    plain = guided(model, rule)
    wrapped = lambda x, s, **c: plain(x, s, **c)  # noqa: E731 - hides step(): plain calls only
    first = sample_euler(wrapped, xa, SIGMAS, progress=False, **kw)
    again = sample_euler(wrapped, xa, SIGMAS, progress=False, **kw)
    np.testing.assert_allclose(first, seq_a, rtol=1e-12)
    np.testing.assert_array_equal(again, first)


# -- a new rule in a few lines plugs into GuidedDenoiser and the sampler ----------------------


@dataclass(frozen=True)
class OriginalCFG:
    """Ho & Salimans' own convention: (1 + w) x_c - w x_u (neutral at w = 0)."""

    w: float = 1.0

    def branches(self, ctx: StepContext) -> tuple[Branch, ...]:
        return (COND, UNCOND) if self.w != 0 else (COND,)

    def init_state(self) -> None:
        return None

    def combine(self, outputs: Mapping[Branch, Any], ctx: StepContext, state: Any = None) -> Any:
        if self.w == 0:
            return outputs[COND], state
        return (1 + self.w) * outputs[COND] - self.w * outputs[UNCOND], state


def test_a_new_rule_written_here_plugs_in() -> None:
    assert isinstance(OriginalCFG(), GuidanceRule)
    model, x = toy(), noise()
    kw = {"extra_args": {"class_labels": LABELS}, "progress": False}
    mine = sample_euler(guided(model, OriginalCFG(2.0)), x, SIGMAS, **kw)
    library = sample_euler(guided(model, CFG(3.0)), x, SIGMAS, **kw)
    np.testing.assert_allclose(mine, library, rtol=1e-9, atol=1e-12)
    model.calls.clear()
    off = sample_euler(guided(model, OriginalCFG(0.0)), x, SIGMAS, **kw)
    assert model.calls == [B] * 4
    np.testing.assert_array_equal(off, sample_euler(model, x, SIGMAS, **kw))


# -- toy end to end on every backend ---------------------------------------------------------


def test_seg_sampling_end_to_end_on_every_backend(backend: Any) -> None:
    """Euler + SEG on the toy attention model: sigma = 0 is unguided exactly, sigma > 0 differs."""
    dt = "float64" if backend.has_float64 else "float32"
    model = ToyAttentionDenoiser(backend.xp, H, W, dtype=getattr(backend.xp, dt))
    x = backend.asarray(noise(), dt)
    cond = {"class_labels": backend.asarray(LABELS)}
    unc = {"class_labels": backend.asarray(NULL)}
    kw = {"extra_args": cond, "progress": False}
    unguided = sample_euler(model, x, SIGMAS, **kw)
    assert type(unguided) is type(x)
    assert unguided.dtype == x.dtype
    zero = sample_euler(GuidedDenoiser(model, SEG(3.0, sigma=0.0), uncond=unc), x, SIGMAS, **kw)
    np.testing.assert_array_equal(backend.to_numpy(zero), backend.to_numpy(unguided))
    seg = sample_euler(GuidedDenoiser(model, SEG(3.0, sigma=2.0), uncond=unc), x, SIGMAS, **kw)
    diff = np.abs(backend.to_numpy(seg) - backend.to_numpy(unguided)).max()
    assert diff > 1e-2
    # the same run on NumPy agrees
    ref_model = toy()
    ref = sample_euler(
        guided(ref_model, SEG(3.0, sigma=2.0)),
        noise(),
        SIGMAS,
        **{**kw, "extra_args": {"class_labels": LABELS}},
    )
    # A few Euler steps of a toy model: rounding of the backend's dtype, scaled by the
    # magnitude of the trajectory (the starting noise, x0 + sigma_max * eps).
    assert_close(backend.to_numpy(seg), ref, ops=1024, eps=eps_of(seg), magnitude=noise())


# -- progress bar and sampler arguments -------------------------------------------------------


def test_progress_bar_on_off_and_without_tqdm(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    model, x = gaussian_denoiser(1.0), np.ones((1, 2))
    sample_euler(model, x, [2.0, 1.0, 0.0], progress=True)
    assert "2/2" in capsys.readouterr().err
    sample_euler(model, x, [2.0, 1.0, 0.0], progress=False)
    assert capsys.readouterr().err == ""
    monkeypatch.setitem(sys.modules, "tqdm", None)  # as if tqdm were not installed
    with pytest.raises(ImportError, match="progress=True needs tqdm"):
        sample_euler(model, x, [2.0, 1.0, 0.0], progress=True)
    out = sample_euler(model, x, [2.0, 1.0, 0.0])  # default: a bar only when tqdm is there
    assert capsys.readouterr().err == ""
    np.testing.assert_allclose(out, sample_euler(model, x, [2.0, 1.0, 0.0], progress=False))


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (
            lambda m, x: sample_euler(m, x, [1.0, 2.0]),
            ValueError,
            "sigmas must be strictly decreasing",
        ),
        (lambda m, x: sample_euler(m, x, [1.0]), ValueError, "sigmas must hold at least 2"),
        (
            lambda m, x: sample_euler(m, x, [1.0, -1.0]),
            ValueError,
            "sigmas must be finite and >= 0",
        ),
        (lambda m, x: sample_euler(m, x, "abc"), TypeError, "sigmas must be a sequence"),
        (
            lambda m, x: sample_euler(m, x, [1.0, 0.0], progress="yes"),
            TypeError,
            "progress must be",
        ),
        (
            lambda m, x: sample_euler(m, x, [1.0, 0.0], extra_args=[1]),
            TypeError,
            "extra_args must be",
        ),
        (lambda m, x: sample_euler(m, x, [1.0, 0.0], callback=3), TypeError, "callback must be"),
        (
            lambda m, x: sample_euler(m, x.astype(int), [1.0, 0.0]),
            TypeError,
            "x must have a real floating",
        ),
        (lambda m, x: sample_ddim(m, x, [1.0, 0.0], eta=-1.0), ValueError, "eta must be"),
        (lambda m, x: euler_steps(3, x, [1.0, 0.0]), TypeError, "model must be callable"),
        (lambda m, x: karras_sigmas(0, 0.1, 1.0), ValueError, "n must be"),
        (lambda m, x: karras_sigmas(3, 1.0, 0.1), ValueError, "sigma_min must be < sigma_max"),
        (lambda m, x: karras_sigmas(3, -1.0, 1.0), ValueError, "sigma_min must be"),
    ],
)
def test_bad_sampler_arguments_are_named(call: Any, exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match):
        call(gaussian_denoiser(1.0), np.ones((1, 2)))


def test_callback_sees_every_step() -> None:
    steps: list[Any] = []
    sample_euler(
        gaussian_denoiser(1.0),
        np.ones((1, 2)),
        [3.0, 2.0, 1.0, 0.0],
        callback=steps.append,
        progress=False,
    )
    assert [(s.index, s.sigma, s.sigma_next) for s in steps] == [
        (0, 3.0, 2.0),
        (1, 2.0, 1.0),
        (2, 1.0, 0.0),
    ]


def test_rules_and_sampling_import_no_framework() -> None:
    """The core layers import neither torch, scipy nor tqdm (tqdm only when a bar is shown)."""
    code = (
        "import sys, smoothguide.rules, smoothguide.sampling; "
        "print(sorted(m for m in ('torch', 'scipy', 'tqdm', 'jax') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
