"""Reliability of the rules, the guided denoiser and the NumPy samplers.

Bad arguments give named errors; finite branch outputs give finite guided
predictions equal to each rule's formula; faults (exceptions, KeyboardInterrupt)
leave no perturbation active; the same seed gives bit-identical samples, also in a
fresh interpreter with another hash seed; concurrent runs equal sequential ones.
"""

from __future__ import annotations

import hashlib
import math
import os
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import array_api_compat.numpy as xnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reliability_table import failure_mode
from smoothguide.perturbations import Perturbation, QuerySmoothing
from smoothguide.rules import (
    APG,
    CFG,
    COND,
    PAG,
    SEG,
    UNCOND,
    Compose,
    Rescale,
    StepContext,
)
from smoothguide.sampling import (
    GuidedDenoiser,
    karras_sigmas,
    sample_ddim,
    sample_euler,
)
from toy_model import ToyAttentionDenoiser

FUZZ = settings(max_examples=30, deadline=5000)
CTX = StepContext(1.0)
SIGMAS = karras_sigmas(4, 0.05, 5.0)
NULL = np.array([3])  # the toy model's null class


def toy(seed: int = 0) -> ToyAttentionDenoiser:
    return ToyAttentionDenoiser(xnp, 4, 5, seed=seed)


def start(seed: int = 1, batch: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(batch, 2, 4, 5)) * SIGMAS[0]


def run(model: Any, rule: Any, x: np.ndarray, **kw: Any) -> np.ndarray:
    guided = GuidedDenoiser(model, rule, uncond={"class_labels": NULL})
    labels = np.arange(x.shape[0]) % 3
    return sample_euler(
        guided, x, SIGMAS, extra_args={"class_labels": labels}, progress=False, **kw
    )


# -- bad arguments ---------------------------------------------------------------------------


@failure_mode(
    "rule scales NaN, inf, negative, a string, a bool, None; APG momentum outside (-1, 1); "
    "Rescale phi > 1; unknown SEG convention; empty Compose or a non-term in it",
    "ValueError/TypeError at construction naming the parameter and the accepted range",
)
@pytest.mark.parametrize(
    ("make", "exc", "message"),
    [
        *[
            (lambda r=r, v=v: r(v), e, f"{name} must be a")
            for r, name in [
                (CFG, "scale"),
                (SEG, "scale"),
                (APG, "scale"),
                (PAG, "scale"),
                (Rescale, "phi"),
            ]
            for v, e in [
                (math.nan, ValueError),
                (math.inf, ValueError),
                (-1.0, ValueError),
                ("3", TypeError),
                (True, TypeError),
                (None, TypeError),
            ]
        ],
        (lambda: SEG(cfg_scale=math.nan), ValueError, "cfg_scale must be a finite"),
        (lambda: APG(momentum=1.0), ValueError, r"momentum must be in \(-1, 1\)"),
        (lambda: Rescale(1.5), ValueError, r"phi must be in \[0, 1\]"),
        (lambda: SEG(convention="both"), ValueError, "convention must be one of"),
        (lambda: Compose(), ValueError, "terms must not be empty"),
        (lambda: Compose(CFG(2.0), "SEG"), TypeError, r"terms\[1\] must be a guidance term"),
        (lambda: StepContext(math.nan), ValueError, "sigma must be a real number >= 0"),
        (lambda: StepContext(1.0, step=3, num_steps=3), ValueError, r"step must be an int in"),
    ],
)
def test_bad_rule_arguments_are_named(make: Any, exc: type[Exception], message: str) -> None:
    with pytest.raises(exc, match=message):
        make()


@failure_mode(
    "a user schedule that returns NaN, inf or a negative weight at some step",
    "ValueError naming schedule(ctx) when the step asks for its branches (before any model call)",
)
@pytest.mark.parametrize("value", [math.nan, math.inf, -0.5])
def test_bad_schedule_values_are_named_at_the_step(value: float) -> None:
    rule = SEG(3.0, sigma=1.0, schedule=lambda ctx: value)
    with pytest.raises(ValueError, match=r"schedule\(ctx\) must be a finite real number"):
        rule.branches(CTX)


@failure_mode(
    "combine() without a branch the rule needs; APG momentum state of the wrong shape; "
    "Compose state of the wrong length",
    "ValueError naming outputs and the missing branch / naming state and the expected shape",
)
def test_missing_branches_and_bad_state_are_named() -> None:
    x = np.ones((2, 3))
    with pytest.raises(ValueError, match="outputs is missing branch .*uncond"):
        CFG(3.0).combine({COND: x}, CTX)
    seg = SEG(2.0, sigma=1.0)
    with pytest.raises(ValueError, match="outputs is missing branch .*QuerySmoothing"):
        seg.combine({COND: x}, CTX)
    with pytest.raises(
        ValueError, match=r"state must be None or a momentum buffer of shape \(2, 3\)"
    ):
        APG(3.0, momentum=-0.5).combine({COND: x, UNCOND: 0 * x}, CTX, np.ones((1, 3)))
    with pytest.raises(ValueError, match="state must be None or a tuple of 2 term states"):
        Compose(CFG(2.0), seg).combine({COND: x, UNCOND: x}, CTX, (None,))


@failure_mode(
    "integer-dtype branch outputs given to APG / Rescale",
    "TypeError naming the outputs and the accepted (real floating) dtypes",
)
@pytest.mark.parametrize("rule", [APG(3.0), Rescale(0.7)], ids=["APG", "Rescale"])
def test_rules_reject_integer_outputs_clearly(rule: Any) -> None:
    x = np.ones((2, 3), np.int64)
    with pytest.raises(TypeError, match="floating"):
        rule.combine({COND: x, UNCOND: 0 * x}, CTX)


@failure_mode(
    "branch outputs of different dtypes (float32 with float64) or devices (cpu with meta)",
    "dtypes: promoted by the backend, result equals the float64 formula; devices: the "
    "backend's error naming both devices, no silent copy",
)
def test_mismatched_dtypes_and_devices_between_branches() -> None:
    c, u = np.full((1, 2), 1.5, np.float32), np.full((1, 2), 0.5)
    out, _ = CFG(3.0).combine({COND: c, UNCOND: u}, CTX)
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, 0.5 + 3.0 * (1.5 - 0.5))
    with pytest.raises(RuntimeError, match=r"device.*(meta|cpu)"):
        CFG(3.0).combine({COND: torch.ones(1, 2), UNCOND: torch.ones(1, 2, device="meta")}, CTX)


# -- fuzzing the rules -----------------------------------------------------------------------

scales = st.floats(0.0, 20.0)


@st.composite
def rules(draw: st.DrawFn) -> Any:
    kind = draw(st.sampled_from(["cfg", "seg", "seg-paper", "pag", "apg", "rescale", "compose"]))
    w = draw(scales)
    if kind == "cfg":
        return CFG(w)
    if kind in ("seg", "seg-paper"):
        conv = "paper" if kind == "seg-paper" else "official"
        return SEG(draw(scales), sigma=1.0, convention=conv, cfg_scale=draw(scales))
    if kind == "pag":
        return PAG(draw(scales), cfg_scale=w)
    if kind == "apg":
        return APG(
            w,
            eta=draw(st.floats(0.0, 1.0)),
            norm_threshold=draw(st.floats(0.0, 10.0)),
            momentum=draw(st.floats(-0.9, 0.9)),
        )
    if kind == "rescale":
        return Compose(CFG(w), Rescale(draw(st.floats(0.0, 1.0))))
    return Compose(APG(w, eta=draw(st.floats(0.0, 1.0))), SEG(draw(scales), sigma=2.0))


@failure_mode(
    "hypothesis: every built-in rule and compositions with random scales on random finite "
    "branch outputs (|x| <= 1e4, also exactly zero predictions), float32/float64, empty batch, "
    "two steps with momentum state",
    "finite output of the input's shape and dtype; CFG and official SEG equal their formulas; "
    "APG with eta=1, r=0, beta=0 equals CFG",
)
@FUZZ
@given(
    rule=rules(),
    batch=st.integers(0, 3),
    magnitude=st.sampled_from([0.0, 1e-3, 1.0, 1e4]),
    dtype=st.sampled_from(["float32", "float64"]),
    seed=st.integers(0, 2**16),
)
def test_fuzz_rules_give_finite_outputs_matching_their_formulas(
    rule: Any, batch: int, magnitude: float, dtype: str, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    state = rule.init_state()
    for sigma in (2.0, 1.0):
        ctx = StepContext(sigma)
        outputs = {
            b: (rng.normal(size=(batch, 2, 3)) * magnitude).astype(dtype)
            for b in rule.branches(ctx)
        }
        out, state = rule.combine(outputs, ctx, state)
        assert out.shape == (batch, 2, 3)
        assert out.dtype == np.dtype(dtype)
        assert np.isfinite(out).all()
    c, u = (outputs.get(b) for b in (COND, UNCOND))
    eps = 1e-5 if dtype == "float32" else 1e-12
    tol = {"rtol": eps, "atol": eps * 25 * magnitude}  # scales up to 20 amplify rounding
    if isinstance(rule, CFG) and u is not None:
        np.testing.assert_allclose(out, u + rule.scale * (c - u), **tol)
    if isinstance(rule, SEG) and rule.convention == "official" and rule.scale > 0:
        blurred = outputs[rule.seg_branch]
        ref = c if u is None else u + rule.cfg_scale * (c - u)
        np.testing.assert_allclose(out, ref + rule.scale * (c - blurred), **tol)
    if isinstance(rule, CFG) and u is not None:
        apg, _ = APG(rule.scale, eta=1.0).combine(outputs, ctx)
        np.testing.assert_allclose(apg, out, rtol=tol["rtol"] * 10, atol=tol["atol"] * 10)


# -- samplers --------------------------------------------------------------------------------


def gaussian(x: np.ndarray, sigma: Any, **_: Any) -> np.ndarray:
    """Exact denoiser of data ~ N(0, 1): x / (1 + sigma^2)."""
    s = np.asarray(sigma, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return x / (1 + s * s)


@failure_mode(
    "sampler arguments: sigmas with NaN/inf, increasing, a single level, 2-D; eta NaN or "
    "negative; integer x; extra_args not a mapping; callback not callable",
    "ValueError/TypeError naming sigmas, eta, x, extra_args or callback",
)
@pytest.mark.parametrize(
    ("call", "exc", "message"),
    [
        (lambda: sample_euler(gaussian, np.ones((1, 2)), [1.0, math.nan]), ValueError, "sigmas"),
        (lambda: sample_euler(gaussian, np.ones((1, 2)), [math.inf, 0.0]), ValueError, "sigmas"),
        (lambda: sample_euler(gaussian, np.ones((1, 2)), [1.0, 2.0]), ValueError, "sigmas"),
        (lambda: sample_euler(gaussian, np.ones((1, 2)), [1.0]), ValueError, "sigmas"),
        (lambda: sample_euler(gaussian, np.ones((1, 2)), np.ones((2, 2))), ValueError, "sigmas"),
        (
            lambda: sample_ddim(gaussian, np.ones((1, 2)), [1.0, 0.0], eta=math.nan),
            ValueError,
            "eta",
        ),
        (lambda: sample_ddim(gaussian, np.ones((1, 2)), [1.0, 0.0], eta=-1.0), ValueError, "eta"),
        (lambda: sample_euler(gaussian, np.ones((1, 2), int), [1.0, 0.0]), TypeError, "x must"),
        (
            lambda: sample_euler(gaussian, np.ones((1, 2)), [1.0, 0.0], extra_args=[1]),
            TypeError,
            "extra_args",
        ),
        (
            lambda: sample_euler(gaussian, np.ones((1, 2)), [1.0, 0.0], callback=3, progress=False),
            TypeError,
            "callback",
        ),
    ],
)
def test_bad_sampler_arguments_are_named(call: Any, exc: type[Exception], message: str) -> None:
    with pytest.raises(exc, match=message):
        call()


@failure_mode(
    "hypothesis: Euler and DDIM over random strictly decreasing schedules (levels 1e-4..1e3, "
    "2..6 levels, ending at 0 or not), eta in [0, 2], batch 0..2",
    "finite samples of the input's shape and dtype; DDIM with eta=0 equals Euler to 1e-12",
)
@FUZZ
@given(
    levels=st.lists(st.floats(1e-4, 1e3), min_size=1, max_size=5, unique=True),
    end_at_zero=st.booleans(),
    eta=st.floats(0.0, 2.0),
    batch=st.integers(0, 2),
    seed=st.integers(0, 2**16),
)
def test_fuzz_samplers_stay_finite(
    levels: list[float], end_at_zero: bool, eta: float, batch: int, seed: int
) -> None:
    sigmas = sorted(levels, reverse=True) + ([0.0] if end_at_zero or len(levels) == 1 else [])
    x = np.random.default_rng(seed).normal(size=(batch, 3)) * sigmas[0]
    euler = sample_euler(gaussian, x, sigmas, progress=False)
    ddim0 = sample_ddim(gaussian, x, sigmas, progress=False)
    ddim = sample_ddim(gaussian, x, sigmas, eta=eta, seed=seed, progress=False)
    for out in (euler, ddim0, ddim):
        assert out.shape == x.shape
        assert out.dtype == x.dtype
        assert np.isfinite(out).all()
    np.testing.assert_allclose(ddim0, euler, rtol=1e-12, atol=1e-12 * sigmas[0])


# -- fault injection -------------------------------------------------------------------------


class FailingToy(ToyAttentionDenoiser):
    """The toy model, raising ``error`` at forward call number ``fail_at`` (counted from 1)."""

    def __init__(self, error: type[BaseException], fail_at: int) -> None:
        super().__init__(xnp, 4, 5, seed=0)
        self.error, self.fail_at = error, fail_at

    def __call__(self, x: Any, sigma: Any, class_labels: Any = None) -> Any:
        if len(self.calls) + 1 == self.fail_at:
            self.calls.append(-1)
            raise self.error("injected")
        return super().__call__(x, sigma, class_labels)


@failure_mode(
    "an exception or KeyboardInterrupt raised inside the model while the SEG branch is "
    "perturbed, and inside the user's step callback, mid-run",
    "the error propagates unchanged; no perturbation stays active; a fresh run equals the run "
    "of a never-failed model bit for bit",
)
@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize("where", ["model", "callback"])
def test_faults_mid_run_leave_no_perturbation_active(
    error: type[BaseException], where: str
) -> None:
    rule = Compose(CFG(3.0), SEG(2.0, sigma=1.5))
    model = FailingToy(error, fail_at=3 if where == "model" else 0)
    calls = []

    def callback(step: Any) -> None:
        calls.append(step.index)
        if where == "callback" and step.index == 1:
            raise error("injected")

    with pytest.raises(error, match="injected"):
        run(model, rule, start(), callback=callback)
    assert model._active == []
    assert calls == [0, 1]  # both faults hit during the third step
    model.fail_at = 0
    np.testing.assert_array_equal(run(model, rule, start()), run(toy(), rule, start()))


@failure_mode(
    "an empty batch (0 samples) through the guided denoiser and both samplers, with CFG and a "
    "perturbed branch",
    "an empty result of the right shape; the perturber is asked for empty rows",
)
def test_empty_batch_through_guided_sampling() -> None:
    seen: list[tuple[Perturbation, tuple[int, ...]]] = []

    class Perturber:
        @contextmanager
        def perturb(self, p: Perturbation, rows: Sequence[int]) -> Iterator[None]:
            seen.append((p, tuple(rows)))
            yield

    rule = Compose(CFG(3.0), SEG(2.0, sigma=1.0))
    guided = GuidedDenoiser(gaussian, rule, uncond={}, perturber=Perturber())
    x = np.zeros((0, 2, 4, 5))
    for sampler in (sample_euler, sample_ddim):
        out = sampler(guided, x, SIGMAS, progress=False)
        assert out.shape == (0, 2, 4, 5)
    assert seen
    assert all(rows == () and isinstance(p, QuerySmoothing) for p, rows in seen)


# -- determinism -----------------------------------------------------------------------------

_SCRIPT = """
import hashlib, numpy as np
from smoothguide.sampling import karras_sigmas, sample_ddim
x = np.random.default_rng(0).normal(size=(3, 8)) * 5.0
f = lambda x, s: x / (1 + np.asarray(s)[:, None] ** 2)
out = sample_ddim(f, x, karras_sigmas(6, 0.05, 5.0), eta=1.0, seed=123, progress=False)
print(hashlib.sha256(out.tobytes()).hexdigest())
"""


@failure_mode(
    "the same seed twice: in one process, and in two fresh interpreters with different "
    "PYTHONHASHSEED (NumPy DDIM with eta=1, guided toy SEG+CFG run)",
    "bit-identical samples; a different seed (or seed=None) gives different samples",
)
def test_same_seed_is_bit_identical_across_runs_and_processes() -> None:
    x = start()
    f = gaussian
    a = sample_ddim(f, x, SIGMAS, eta=1.0, seed=5, progress=False)
    b = sample_ddim(f, x, SIGMAS, eta=1.0, seed=5, progress=False)
    assert a.tobytes() == b.tobytes()
    assert not np.array_equal(a, sample_ddim(f, x, SIGMAS, eta=1.0, seed=6, progress=False))
    assert not np.array_equal(a, sample_ddim(f, x, SIGMAS, eta=1.0, progress=False))
    rule = Compose(CFG(3.0), SEG(2.0, sigma=1.5))
    assert run(toy(), rule, x).tobytes() == run(toy(), rule, x).tobytes()
    digests = set()
    for hash_seed in ("0", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        res = subprocess.run(
            [sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, check=True
        )
        digests.add(res.stdout.strip())
    here = sample_ddim(
        lambda x, s: x / (1 + np.asarray(s)[:, None] ** 2),
        np.random.default_rng(0).normal(size=(3, 8)) * 5.0,
        karras_sigmas(6, 0.05, 5.0),
        eta=1.0,
        seed=123,
        progress=False,
    )
    assert digests == {hashlib.sha256(here.tobytes()).hexdigest()}


# -- threads ---------------------------------------------------------------------------------


@failure_mode(
    "two threads sampling at once with different rules (SEG+CFG, APG with momentum) on two "
    "models, and two threads sharing one GuidedDenoiser and one APG rule object",
    "each thread's sample bit-identical to the same run done sequentially (rules hold no "
    "state; samplers keep APG momentum per run)",
)
def test_concurrent_sampling_equals_sequential() -> None:
    seg_rule = Compose(CFG(3.0), SEG(2.0, sigma=1.5))
    apg_rule = APG(4.0, eta=0.5, momentum=-0.5)
    shared = GuidedDenoiser(gaussian, apg_rule, uncond={})
    model_a, model_b = toy(0), toy(1)
    jobs = {
        "seg-model-a": lambda: run(model_a, seg_rule, start(1)),
        "apg-model-b": lambda: run(model_b, apg_rule, start(2)),
        "shared-1": lambda: sample_euler(shared, start(3), SIGMAS, progress=False),
        "shared-2": lambda: sample_euler(shared, start(4), SIGMAS, progress=False),
    }
    expected = {k: f() for k, f in jobs.items()}
    got: dict[str, list[np.ndarray]] = {k: [] for k in jobs}
    barrier = threading.Barrier(len(jobs))

    def work(k: str) -> None:
        barrier.wait()
        for _ in range(3):
            got[k].append(jobs[k]())

    threads = [threading.Thread(target=work, args=(k,)) for k in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for k, exp in expected.items():
        assert len(got[k]) == 3
        assert all(g.tobytes() == exp.tobytes() for g in got[k]), k


@pytest.mark.numerics
@failure_mode(
    "float16 / bfloat16 branch outputs of a 4x64x64 latent (std 3: sums of squares overflow "
    "float16) through CFG, APG (norms, projection, threshold) and CFG + Rescale (std)",
    "norms and standard deviations accumulated in float32: finite, output in the input dtype, "
    "within 4 eps(dtype) x max|out| of the float64 result of the same inputs",
)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "rule",
    [CFG(7.5), APG(7.5, eta=0.3, norm_threshold=50.0), Compose(CFG(7.5), Rescale(0.7))],
    ids=["CFG", "APG", "CFG+Rescale"],
)
def test_half_precision_rules_vs_float64(dtype: torch.dtype, rule: Any) -> None:
    gen = torch.Generator().manual_seed(0)
    c = (torch.randn(2, 4, 64, 64, generator=gen) * 3).to(dtype)
    u = (torch.randn(2, 4, 64, 64, generator=gen) * 3).to(dtype)
    if dtype == torch.float16:  # the sum of squares of one sample overflows float16
        assert not torch.isfinite((c[0].float() ** 2).sum().to(dtype))
    out, _ = rule.combine({COND: c, UNCOND: u}, CTX)
    ref, _ = rule.combine({COND: c.double(), UNCOND: u.double()}, CTX)
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    assert (out.double() - ref).abs().max() <= 4 * torch.finfo(dtype).eps * ref.abs().max()


# -- batching the branches' keyword arguments --------------------------------------------------


def _leaves(v: Any) -> Iterator[Any]:
    if isinstance(v, dict):
        for k in sorted(v):
            yield from _leaves(v[k])
    else:
        yield v


def kwarg_model(x: np.ndarray, sigma: Any, **kw: Any) -> np.ndarray:
    """A denoiser whose every output row depends on every keyword argument's row (or constant)."""
    b = x.shape[0]
    s = np.zeros(b)
    for v in _leaves(kw):
        if isinstance(v, np.ndarray):
            s = s + np.broadcast_to(v.reshape(v.shape[0], -1).sum(1), (b,))
        else:
            s = s + float(v)
    return x / 2 + s[:, None]


@st.composite
def kwarg_values(draw: st.DrawFn, batch: int, depth: int = 0) -> Any:
    kind = draw(st.sampled_from(["rows", "one-row", "wide", "constant", "other-batch", "nested"]))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    if kind == "rows":
        return rng.normal(size=(batch,))
    if kind == "one-row":
        return rng.normal(size=(1,))
    if kind == "wide":
        return rng.normal(size=(batch, 2))
    if kind == "constant":
        return draw(st.sampled_from([0, 1, 2.5]))
    if kind == "other-batch":
        return rng.normal(size=(batch + 1,))
    if depth >= 1:
        return rng.normal(size=(batch,))
    return {"inner": draw(kwarg_values(batch, depth + 1))}


@failure_mode(
    "hypothesis: conditional and unconditional keyword arguments of every shape: per-row "
    "arrays, leading axis 1 (broadcast), wider arrays, equal and different constants, nested "
    "mappings, a wrong batch size",
    "the batched call ([uncond, cond] in one forward) equals one call per branch to 1e-12, or "
    "a ValueError naming the keyword argument and suggesting batched=False",
)
@FUZZ
@given(data=st.data(), batch=st.integers(1, 3))
def test_fuzz_batched_keyword_arguments_equal_unbatched(data: st.DataObject, batch: int) -> None:
    keys = data.draw(st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, unique=True))
    cond = {k: data.draw(kwarg_values(batch), label=f"cond[{k}]") for k in keys}
    uncond = {k: data.draw(kwarg_values(1), label=f"uncond[{k}]") for k in keys}
    x = np.random.default_rng(0).normal(size=(batch, 3))
    batched = GuidedDenoiser(kwarg_model, CFG(3.0), uncond=uncond)
    try:
        together = batched(x, 1.0, **cond)
    except ValueError as exc:
        message = str(exc)
        assert any(f"'{k}'" in message for k in keys), message
        assert "batched=False" in message
        return
    alone = GuidedDenoiser(kwarg_model, CFG(3.0), uncond=uncond, batched=False)(x, 1.0, **cond)
    np.testing.assert_allclose(together, alone, rtol=1e-12, atol=1e-12)


@failure_mode(
    "unconditional prompt embeddings of another sequence length than the conditional ones "
    "(torch, (1, 77, 8) vs (2, 154, 8): a long prompt)",
    "ValueError naming the keyword argument and both shapes, suggesting batched=False; the "
    "unbatched denoiser runs",
)
def test_branch_embeddings_of_different_lengths_are_named() -> None:
    def model(x: torch.Tensor, sigma: Any, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        return x / 2 + encoder_hidden_states.mean(dim=(1, 2))[:, None]

    uncond = {"encoder_hidden_states": torch.zeros(1, 77, 8)}
    cond = {"encoder_hidden_states": torch.ones(2, 154, 8)}
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"'encoder_hidden_states'.*batched=False"):
        GuidedDenoiser(model, CFG(3.0), uncond=uncond)(x, 1.0, **cond)
    out = GuidedDenoiser(model, CFG(3.0), uncond=uncond, batched=False)(x, 1.0, **cond)
    torch.testing.assert_close(out, torch.full((2, 3), 3.0))  # 0 + 3 * (1 - 0)
