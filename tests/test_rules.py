"""Guidance rules against their formulas written out by hand in NumPy, on every backend."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smoothguide.branches import Branch
from smoothguide.perturbations import IdentityAttention, QuerySmoothing
from smoothguide.rules import (
    APG,
    CFG,
    COND,
    PAG,
    SEG,
    UNCOND,
    Compose,
    Constant,
    CosineRamp,
    GuidanceRule,
    GuidanceTerm,
    Interval,
    LinearRamp,
    Rescale,
    StepContext,
)

FAST = settings(
    max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
CTX = StepContext(1.0)

shapes = st.tuples(st.integers(1, 3), st.lists(st.integers(1, 4), min_size=1, max_size=3)).map(
    lambda t: (t[0], *t[1])
)
scales = st.floats(0.0, 12.0)
seeds = st.integers(0, 2**31 - 1)


def draw_np(seed: int, shape: tuple[int, ...], n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=shape) for _ in range(n)]


def dtype_of(backend: Any) -> str:
    return "float64" if backend.has_float64 else "float32"


def tol(backend: Any, *terms: Any) -> dict[str, float]:
    """Rounding budget of the backend's dtype, scaled by the largest term of the formula.

    The inputs are rounded to the backend dtype (float32 on JAX without x64) and then
    combined with scales up to 12, so errors scale with ``scale * max|x|``, not with the
    (possibly cancelled) result.
    """
    eps = float(np.finfo(dtype_of(backend)).eps)
    magnitude = max(float(np.max(np.abs(t), initial=0.0)) for t in terms)
    return {"rtol": 0.0, "atol": 256 * eps * magnitude}


def combine(
    backend: Any,
    rule: Any,
    outs: dict[Branch, np.ndarray],
    ctx: StepContext = CTX,
    state: Any = None,
) -> tuple[np.ndarray, Any]:
    """Run ``rule.combine`` on backend arrays; check dtype and backend of the result."""
    dt = dtype_of(backend)
    arrays = {b: backend.asarray(v, dt) for b, v in outs.items()}
    assert set(rule.branches(ctx)) <= set(arrays)
    out, new_state = rule.combine(arrays, ctx, state)
    ref = arrays[COND]
    assert type(out) is type(ref)
    assert out.dtype == ref.dtype
    return backend.to_numpy(out), new_state


# -- each rule equals its formula ------------------------------------------------------------


@pytest.mark.numerics
@FAST
@given(shape=shapes, w=scales, seed=seeds)
def test_cfg_formula(backend: Any, shape: tuple[int, ...], w: float, seed: int) -> None:
    x_c, x_u = draw_np(seed, shape, 2)
    out, state = combine(backend, CFG(w), {COND: x_c, UNCOND: x_u})
    np.testing.assert_allclose(out, x_u + w * (x_c - x_u), **tol(backend, (1 + w) * x_c, w * x_u))
    assert state is None


@pytest.mark.numerics
@FAST
@given(
    shape=shapes,
    s=scales,
    w=st.one_of(st.just(1.0), scales),
    sigma=st.floats(0.17, 20.0),  # sigma <= 1/6: a single-tap kernel, neutral (round 2)
    seed=seeds,
)
def test_seg_official_formula(
    backend: Any, shape: tuple[int, ...], s: float, w: float, sigma: float, seed: int
) -> None:
    """Official SEG-SDXL: x_c + s(x_c - x~_c); with CFG x_u + w(x_c - x_u) + s(x_c - x~_c)."""
    x_c, x_u, x_seg = draw_np(seed, shape, 3)
    rule = SEG(s, sigma=sigma, cfg_scale=w)
    assert rule.seg_branch == Branch("cond", QuerySmoothing(sigma))
    outs = {COND: x_c, UNCOND: x_u, rule.seg_branch: x_seg}
    out, _ = combine(backend, rule, outs)
    expected = x_u + w * (x_c - x_u) + s * (x_c - x_seg)
    terms = ((1 + w + s) * x_c, (1 + w) * x_u, s * x_seg)
    np.testing.assert_allclose(out, expected, **tol(backend, *terms))
    # CFG + SEG as a composition of two terms is the same rule
    composed, _ = combine(backend, Compose(CFG(w), SEG(s, sigma=sigma)), outs)
    np.testing.assert_allclose(composed, expected, **tol(backend, *terms))


@FAST
@given(shape=shapes, gamma=scales, w=scales, seed=seeds)
def test_seg_paper_formulas(
    backend: Any, shape: tuple[int, ...], gamma: float, w: float, seed: int
) -> None:
    """Paper Eq. 9: x + (gamma-1)(x - x~); Eq. 10: x_u + w(x_c - x_u) + gamma(x_u - x~_u)."""
    x_c, x_u, x_tilde = draw_np(seed, shape, 3)
    eq9 = SEG(gamma, sigma=2.0, convention="paper")
    assert eq9.seg_branch == Branch("cond", QuerySmoothing(2.0))
    out, _ = combine(backend, eq9, {COND: x_c, eq9.seg_branch: x_tilde})
    np.testing.assert_allclose(
        out, x_c + (gamma - 1) * (x_c - x_tilde), **tol(backend, (1 + gamma) * x_c, gamma * x_tilde)
    )

    w = w if w != 1.0 else 2.0
    eq10 = SEG(gamma, sigma=2.0, convention="paper", cfg_scale=w)
    assert eq10.seg_branch == Branch("uncond", QuerySmoothing(2.0))  # the blurred uncond branch
    out, _ = combine(backend, eq10, {COND: x_c, UNCOND: x_u, eq10.seg_branch: x_tilde})
    expected = x_u + w * (x_c - x_u) + gamma * (x_u - x_tilde)
    terms = ((1 + w) * x_c, (1 + w + gamma) * x_u, gamma * x_tilde)
    np.testing.assert_allclose(out, expected, **tol(backend, *terms))


@FAST
@given(shape=shapes, gamma=st.floats(1.0, 12.0), seed=seeds)
def test_seg_conventions_agree_for_s_equal_gamma_minus_one(
    backend: Any, shape: tuple[int, ...], gamma: float, seed: int
) -> None:
    x, x_tilde = draw_np(seed, shape, 2)
    official = SEG(gamma - 1.0, sigma=math.inf)
    paper = SEG(gamma, sigma=math.inf, convention="paper")
    assert official.branches(CTX) == paper.branches(CTX)
    outs = {COND: x, official.seg_branch: x_tilde}
    a, _ = combine(backend, official, outs)
    b, _ = combine(backend, paper, outs)
    np.testing.assert_allclose(a, b, **tol(backend, gamma * x, gamma * x_tilde))


def test_seg_parameters_reach_the_query_smoothing_spec() -> None:
    rule = SEG(2.0, sigma=(1.0, 4.0), mode="mirror", radius=3, layers="attn1")
    expected = QuerySmoothing((1.0, 4.0), mode="mirror", radius=3, layers=("attn1",))
    assert rule.perturbation == expected
    assert rule.seg_branch == Branch("cond", expected)
    assert SEG(sigma=math.inf).perturbation == QuerySmoothing(math.inf)
    assert SEG(sigma=(0.0, 2.0, 2.0)).branches(CTX)[-1].perturbation.sigma == (0.0, 2.0, 2.0)


@FAST
@given(shape=shapes, s=scales, w=scales, seed=seeds)
def test_pag_formula(backend: Any, shape: tuple[int, ...], s: float, w: float, seed: int) -> None:
    """diffusers PAGMixin: x_u + w(x_c - x_u) + s(x_c - x^_c)."""
    x_c, x_u, x_p = draw_np(seed, shape, 3)
    rule = PAG(s, cfg_scale=w, layers="mid")
    assert rule.pag_branch == Branch("cond", IdentityAttention(layers="mid"))
    out, _ = combine(backend, rule, {COND: x_c, UNCOND: x_u, rule.pag_branch: x_p})
    terms = ((1 + w + s) * x_c, (1 + w) * x_u, s * x_p)
    np.testing.assert_allclose(out, x_u + w * (x_c - x_u) + s * (x_c - x_p), **tol(backend, *terms))


@pytest.mark.numerics
@FAST
@given(
    shape=shapes.filter(lambda s: math.prod(s[1:]) >= 2),
    w=scales,
    phi=st.floats(0.0, 1.0),
    seed=seeds,
)
def test_cfg_rescale_formula(
    backend: Any, shape: tuple[int, ...], w: float, phi: float, seed: int
) -> None:
    """Lin et al. 2024, Eqs. 15-17, std per sample over the non-batch axes."""
    x_c, x_u = draw_np(seed, shape, 2)
    out, _ = combine(backend, Compose(CFG(w), Rescale(phi)), {COND: x_c, UNCOND: x_u})
    x_cfg = x_u + w * (x_c - x_u)
    axes = tuple(range(1, len(shape)))
    std_pos = np.std(x_c, axis=axes, keepdims=True)
    std_cfg = np.std(x_cfg, axis=axes, keepdims=True)
    expected = phi * (x_cfg * std_pos / std_cfg) + (1 - phi) * x_cfg
    terms = ((1 + w) * x_c, (1 + w) * x_u, expected)
    np.testing.assert_allclose(out, expected, **tol(backend, *terms))
    if phi == 1.0:  # the rescaled prediction has exactly the std of x_c
        np.testing.assert_allclose(np.std(out, axis=axes), np.std(x_c, axis=axes), rtol=1e-4)


def apg_by_hand(
    x_c: np.ndarray, x_u: np.ndarray, w: float, eta: float, r: float, beta: float, m: Any
) -> tuple[np.ndarray, Any]:
    """Sadat et al. 2024, Algorithm 1, one sample at a time with flat vectors."""
    out, new_m = np.empty_like(x_c), np.empty_like(x_c)
    for i in range(x_c.shape[0]):
        c, d = x_c[i].ravel(), (x_c[i] - x_u[i]).ravel()
        if beta != 0.0:
            d = d + (0.0 if m is None else beta * m[i].ravel())
            new_m[i] = d.reshape(x_c[i].shape)
        if r > 0 and np.linalg.norm(d) > r:
            d = d * r / np.linalg.norm(d)
        unit = c / np.linalg.norm(c)
        par = np.dot(d, unit) * unit
        out[i] = (c + (w - 1) * ((d - par) + eta * par)).reshape(x_c[i].shape)
    return out, (new_m if beta != 0.0 else None)


@pytest.mark.numerics
@FAST
@given(
    shape=shapes,
    w=scales,
    eta=st.floats(0.0, 1.0),
    r=st.one_of(st.just(0.0), st.floats(0.1, 5.0)),
    beta=st.floats(-0.9, 0.9),
    seed=seeds,
)
def test_apg_formula_and_momentum_state(
    backend: Any, shape: tuple[int, ...], w: float, eta: float, r: float, beta: float, seed: int
) -> None:
    rule = APG(w, eta=eta, norm_threshold=r, momentum=beta)
    assert rule.init_state() is None
    m_ref = None
    state = rule.init_state()
    for step, (x_c, x_u) in enumerate([draw_np(seed, shape, 2), draw_np(seed + 1, shape, 2)]):
        out, state = combine(
            backend, rule, {COND: x_c, UNCOND: x_u}, StepContext(2.0 - step), state
        )
        expected, m_ref = apg_by_hand(x_c, x_u, w, eta, r, beta, m_ref)
        terms = ((1 + w) * x_c, (1 + w) * x_u, w * (m_ref if m_ref is not None else 0.0))
        np.testing.assert_allclose(out, expected, **tol(backend, *terms, expected))
        if m_ref is None or w == 1.0:
            assert state is None
        else:
            np.testing.assert_allclose(backend.to_numpy(state), m_ref, **tol(backend, *terms))


@FAST
@given(shape=shapes.filter(lambda s: math.prod(s[1:]) >= 2), w=st.floats(1.5, 12.0), seed=seeds)
def test_apg_special_cases(backend: Any, shape: tuple[int, ...], w: float, seed: int) -> None:
    x_c, x_u = draw_np(seed, shape, 2)
    outs = {COND: x_c, UNCOND: x_u}
    # eta = 1 without threshold and momentum is CFG
    out, _ = combine(backend, APG(w, eta=1.0), outs)
    np.testing.assert_allclose(out, x_u + w * (x_c - x_u), **tol(backend, (1 + w) * x_c, w * x_u))
    # eta = 0: the update is orthogonal to x_c, sample by sample
    out, _ = combine(backend, APG(w, eta=0.0), outs)
    for i in range(shape[0]):
        dot = np.dot((out[i] - x_c[i]).ravel(), x_c[i].ravel())
        assert abs(dot) <= 1e-3 * np.linalg.norm(out[i] - x_c[i]) * np.linalg.norm(x_c[i]) + 1e-6


# -- schedules -------------------------------------------------------------------------------


def test_schedule_values_by_hand() -> None:
    ctxs = [StepContext(s, step=i, num_steps=5) for i, s in enumerate([8.0, 4.0, 2.0, 1.0, 0.5])]
    assert [Constant(0.5)(c) for c in ctxs] == [0.5] * 5
    assert [Interval(1.0, 4.0)(c) for c in ctxs] == [0.0, 1.0, 1.0, 0.0, 0.0]  # (lo, hi] in sigma
    assert [Interval(0.25, 0.5, on="progress")(c) for c in ctxs] == [0.0, 1.0, 1.0, 0.0, 0.0]
    assert [LinearRamp(2.0, 0.0)(c) for c in ctxs] == [2.0, 1.5, 1.0, 0.5, 0.0]
    # on sigma the ramp runs from sigma = hi (start) down to sigma = lo (end)
    lin = LinearRamp(0.0, 1.0, lo=1.0, hi=5.0, on="sigma")
    assert [lin(c) for c in ctxs] == [0.0, 0.25, 0.75, 1.0, 1.0]
    cos = CosineRamp(1.0, 0.0)
    expected = [(1 + math.cos(math.pi * i / 4)) / 2 for i in range(5)]
    np.testing.assert_allclose([cos(c) for c in ctxs], expected, atol=1e-15)


@pytest.mark.parametrize(
    "rule",
    [
        CFG(5.0, schedule=Interval(0.5, 2.0)),
        SEG(3.0, cfg_scale=4.0, schedule=Interval(0.5, 2.0), cfg_schedule=Interval(0.5, 2.0)),
        PAG(3.0, schedule=LinearRamp(0.0, 1.0, lo=0.5, hi=2.0, on="sigma")),
        APG(5.0, momentum=-0.5, schedule=Interval(0.5, 2.0)),
        Compose(CFG(5.0, schedule=Interval(0.5, 2.0)), Rescale(0.7, schedule=Interval(0.5, 2.0))),
    ],
    ids=lambda r: type(r).__name__,
)
def test_scheduled_terms_follow_their_weight(rule: Any) -> None:
    """Inside the interval the rule is active; outside it returns x_c itself, branches skipped."""
    rng = np.random.default_rng(0)
    outs = {b: rng.normal(size=(2, 3)) for b in rule.branches(StepContext(1.0))}
    inside, _ = rule.combine(outs, StepContext(1.0))
    assert not np.allclose(inside, outs[COND])
    outside = StepContext(3.0)
    assert rule.branches(outside) == (COND,)
    out, _ = rule.combine({COND: outs[COND]}, outside, rule.init_state())
    assert out is outs[COND]


def test_linear_ramp_scales_the_term_coefficient() -> None:
    rng = np.random.default_rng(1)
    x_c, x_u = rng.normal(size=(2, 2, 3))
    rule = CFG(5.0, schedule=LinearRamp(1.0, 0.0))
    ctx = StepContext(1.0, step=1, num_steps=5)  # weight 0.75
    out, _ = rule.combine({COND: x_c, UNCOND: x_u}, ctx)
    np.testing.assert_allclose(out, x_c + 0.75 * 4.0 * (x_c - x_u), rtol=1e-12)


# -- neutral settings ------------------------------------------------------------------------

NEUTRAL = [
    CFG(1.0),
    SEG(0.0),
    SEG(0.0, cfg_scale=1.0, sigma=5.0),
    SEG(3.0, sigma=0.0),
    SEG(3.0, sigma=(0.0, 0.0)),
    SEG(1.0, convention="paper"),
    PAG(0.0),
    APG(1.0, momentum=-0.5, norm_threshold=2.0),
    Rescale(0.0),
    Compose(CFG(1.0), SEG(0.0), PAG(0.0), Rescale(0.0)),
]


@pytest.mark.parametrize("rule", NEUTRAL, ids=repr)
def test_neutral_rules_return_cond_and_need_nothing_else(rule: Any) -> None:
    assert isinstance(rule, GuidanceRule)
    assert isinstance(rule, GuidanceTerm)
    assert rule.branches(CTX) == (COND,)
    x_c = np.random.default_rng(2).normal(size=(2, 3))
    out, _ = rule.combine({COND: x_c}, CTX, rule.init_state())
    assert out is x_c


@pytest.mark.parametrize("w", [0.0, 2.5, 7.5])
def test_neutral_seg_with_cfg_is_plain_cfg(w: float) -> None:
    """Official s = 0 and paper gamma = 0 with CFG: exactly the CFG rule, no blurred branch."""
    rng = np.random.default_rng(3)
    outs = {COND: rng.normal(size=(2, 4)), UNCOND: rng.normal(size=(2, 4))}
    cfg, _ = CFG(w).combine(outs, CTX)
    for rule in (SEG(0.0, cfg_scale=w), SEG(0.0, cfg_scale=w, convention="paper")):
        assert set(rule.branches(CTX)) == {COND, UNCOND}
        out, _ = rule.combine(outs, CTX)
        np.testing.assert_array_equal(out, cfg)


# -- composition -----------------------------------------------------------------------------


def test_compose_order_state_and_branches() -> None:
    rng = np.random.default_rng(4)
    seg, pag = SEG(2.0, sigma=3.0), PAG(1.5)
    outs = {b: rng.normal(size=(2, 6)) for b in (COND, UNCOND, seg.seg_branch, pag.pag_branch)}
    apg = APG(4.0, momentum=-0.5)
    rule = Compose(apg, seg, pag, Rescale(0.5))
    assert rule.branches(CTX) == (COND, UNCOND, seg.seg_branch, pag.pag_branch)
    state = rule.init_state()
    assert state == (None, None, None, None)
    out, state = rule.combine(outs, CTX, state)
    x_c, x_u = outs[COND], outs[UNCOND]
    guided, m = apg_by_hand(x_c, x_u, 4.0, 0.0, 0.0, -0.5, None)
    guided = guided + 2.0 * (x_c - outs[seg.seg_branch]) + 1.5 * (x_c - outs[pag.pag_branch])
    std_c, std_g = x_c.std(axis=1, keepdims=True), guided.std(axis=1, keepdims=True)
    expected = 0.5 * guided * std_c / std_g + 0.5 * guided
    np.testing.assert_allclose(out, expected, rtol=1e-12)
    np.testing.assert_allclose(state[0], m, rtol=1e-12)
    assert state[1:] == (None, None, None)
    # nested compositions flatten to the same result
    nested, _ = Compose(Compose(apg, seg), pag, Rescale(0.5)).combine(
        outs, CTX, ((None, None), None, None)
    )
    np.testing.assert_allclose(nested, out, rtol=1e-12)


# -- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "exc", "names"),
    [
        (lambda: CFG(-1.0), ValueError, "scale"),
        (lambda: CFG("7"), TypeError, "scale"),
        (lambda: CFG(float("nan")), ValueError, "scale"),
        (lambda: CFG(2.0, schedule=3.0), TypeError, "schedule"),
        (lambda: SEG(-0.5), ValueError, "scale"),
        (lambda: SEG(3.0, cfg_scale=-2.0), ValueError, "cfg_scale"),
        (lambda: SEG(convention="diffusers"), ValueError, "convention"),
        (lambda: SEG(sigma=-1.0), ValueError, "sigma"),
        (lambda: SEG(mode="same"), ValueError, "mode"),
        (lambda: SEG(radius=-3), ValueError, "radius"),
        (lambda: SEG(layers=[]), ValueError, "layers"),
        (lambda: PAG(-1.0), ValueError, "scale"),
        (lambda: PAG(layers=3), TypeError, "layers"),
        (lambda: APG(momentum=1.0), ValueError, "momentum"),
        (lambda: APG(eta=-0.1), ValueError, "eta"),
        (lambda: APG(norm_threshold=-1.0), ValueError, "norm_threshold"),
        (lambda: Rescale(1.5), ValueError, "phi"),
        (lambda: Interval(2.0, 1.0), ValueError, "lo"),
        (lambda: Interval(0.0, 2.0, on="progress"), ValueError, "hi"),
        (lambda: Interval(0.0, 1.0, on="t"), ValueError, "on"),
        (lambda: LinearRamp(-1.0, 0.0), ValueError, "start"),
        (lambda: CosineRamp(lo=0.5, hi=0.5), ValueError, "lo"),
        (lambda: Constant(-1.0), ValueError, "value"),
        (lambda: Compose(), ValueError, "terms"),
        (lambda: Compose(CFG(2.0), "seg"), TypeError, "terms[1]"),
        (lambda: Branch("negative"), ValueError, "conditioning"),
        (lambda: StepContext(-1.0), ValueError, "sigma"),
        (lambda: StepContext(1.0, step=3, num_steps=3), ValueError, "step"),
        (lambda: StepContext(1.0, step=0), ValueError, "num_steps"),
    ],
)
def test_bad_arguments_are_named(make: Any, exc: type[Exception], names: str) -> None:
    with pytest.raises(exc, match=rf"\b{names.replace('[', '.').replace(']', '.')}"):
        make()


def test_missing_branch_outputs_are_named() -> None:
    x = np.zeros((1, 2))
    with pytest.raises(ValueError, match=r"outputs is missing branch .*uncond"):
        CFG(3.0).combine({COND: x}, CTX)
    seg = SEG(3.0, sigma=1.0)
    with pytest.raises(ValueError, match=r"outputs is missing branch .*QuerySmoothing"):
        seg.combine({COND: x}, CTX)
    with pytest.raises(TypeError, match="outputs must be a mapping"):
        CFG(3.0).combine([x, x], CTX)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="state must be None or a tuple of 2"):
        Compose(CFG(2.0), SEG(1.0)).combine({COND: x}, CTX, state=(None,))


def test_progress_schedule_needs_the_step() -> None:
    rule = CFG(3.0, schedule=Interval(0.0, 0.5, on="progress"))
    with pytest.raises(ValueError, match="on='progress' needs the step index"):
        rule.branches(StepContext(1.0))


def test_schedule_returning_a_negative_weight_is_rejected() -> None:
    rule = CFG(3.0, schedule=lambda ctx: -1.0)
    with pytest.raises(ValueError, match=r"schedule\(ctx\) must be"):
        rule.branches(CTX)
