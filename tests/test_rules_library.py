"""CFG-Zero*, TCFG, FDG, MAMBO-G, CFG++ and APG's diffusers convention.

Each rule against its paper's equation written out in NumPy (on every backend), against
diffusers 0.42's guider on the same torch tensors, in compositions with CFG and SEG under
schedules, and at its neutral setting (the unguided prediction, bit for bit).
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import pytest
import scipy.ndimage
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smoothguide.branches import Branch
from smoothguide.rules import (
    APG,
    CFG,
    COND,
    FDG,
    MAMBOG,
    SEG,
    TCFG,
    UNCOND,
    CFGPlusPlus,
    CFGZeroStar,
    Compose,
    GuidanceRule,
    GuidanceTerm,
    Interval,
    LinearRamp,
    Prediction,
    StepContext,
)
from smoothguide.rules.fdg import laplacian_pyramid, reconstruct_pyramid
from smoothguide.sampling import GuidedDenoiser, sample_ddim, sample_euler

FAST = settings(
    max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
CTX = StepContext(1.0)
seeds = st.integers(0, 2**31 - 1)
scales = st.floats(0.0, 12.0)
# a few fixed shapes (JAX compiles every new shape; the values still vary by seed)
shapes = st.sampled_from([(1, 1, 1), (1, 3, 1), (2, 3, 4), (3, 2, 5)])


def draw(seed: int, shape: tuple[int, ...], n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=shape) for _ in range(n)]


def dtype_of(backend: Any) -> str:
    return "float64" if backend.has_float64 else "float32"


def tol(backend: Any, ref: np.ndarray, ops: int = 64) -> dict[str, float]:
    """``atol = ops · eps · max|ref|`` in the backend's precision."""
    eps = np.finfo(dtype_of(backend)).eps
    return {"rtol": 0.0, "atol": ops * eps * max(1.0, float(np.max(np.abs(ref))))}


def combine(
    backend: Any,
    rule: Any,
    outs: dict[Branch, np.ndarray],
    ctx: StepContext = CTX,
    state: Any = None,
) -> tuple[Any, Any]:
    """``rule.combine`` on backend arrays; the result back in NumPy (arrays or a Prediction)."""
    arrays = {b: backend.asarray(v, dtype_of(backend)) for b, v in outs.items()}
    assert set(rule.branches(ctx)) <= set(arrays)
    out, new_state = rule.combine(arrays, ctx, state)
    ref = arrays[COND]
    if isinstance(out, Prediction):
        for a in (out.denoised, out.renoise):
            assert type(a) is type(ref)
            assert a.dtype == ref.dtype
        return Prediction(backend.to_numpy(out.denoised), backend.to_numpy(out.renoise)), new_state
    assert type(out) is type(ref)
    assert out.dtype == ref.dtype
    return backend.to_numpy(out), new_state


# -- hand implementations of the papers' equations ------------------------------------------


def cfg_zero_star_by_hand(x_c: np.ndarray, x_u: np.ndarray, w: float) -> np.ndarray:
    """Fan et al. 2025, Eq. 8 and Algorithm 1: s* = c·u / ‖u‖², out = s* u + w (c − s* u)."""
    out = np.empty_like(x_c)
    for i in range(x_c.shape[0]):
        c, u = x_c[i].ravel(), x_u[i].ravel()
        s = np.dot(c, u) / (np.dot(u, u) + 1e-8)
        out[i] = (s * u + w * (c - s * u)).reshape(x_c[i].shape)
    return out


def tcfg_by_hand(x_c: np.ndarray, x_u: np.ndarray, w: float) -> np.ndarray:
    """Kwon et al. 2025, Algorithm 1, with NumPy's SVD of the 2 × N matrix [c; u]."""
    out = np.empty_like(x_c)
    for i in range(x_c.shape[0]):
        a = np.stack([x_c[i].ravel(), x_u[i].ravel()])
        _, _, vh = np.linalg.svd(a, full_matrices=False)
        v1 = vh[0]
        u_t = np.dot(a[1], v1) * v1
        out[i] = (u_t + w * (a[0] - u_t)).reshape(x_c[i].shape)
    return out


def mambo_by_hand(x_c: np.ndarray, x_u: np.ndarray, w: float, alpha: float) -> np.ndarray:
    out = np.empty_like(x_c)
    for i in range(x_c.shape[0]):
        d = x_c[i] - x_u[i]
        r = np.linalg.norm(d) / np.linalg.norm(x_u[i])
        w_r = 1.0 + (w - 1.0) * np.exp(-alpha * r)
        out[i] = x_u[i] + w_r * d
    return out


def _blur_by_hand(x: np.ndarray, axis: int) -> np.ndarray:
    # torch's "reflect" padding is SciPy's "mirror"
    taps = np.array([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0
    return scipy.ndimage.correlate1d(x, taps, axis=axis, mode="mirror")


def _down_by_hand(x: np.ndarray) -> np.ndarray:
    for ax in (-2, -1):
        y = _blur_by_hand(x, ax)
        y = np.moveaxis(y, ax, -1)
        x = np.moveaxis((y[..., 0::2] + y[..., 1::2]) / 2, -1, ax)
    return x


def _up_by_hand(x: np.ndarray) -> np.ndarray:
    for ax in (-2, -1):
        y = np.moveaxis(x, ax, -1)
        p = np.concatenate([y[..., :1], y, y[..., -1:]], axis=-1)  # edge clamp of torch bilinear
        out = np.empty((*y.shape[:-1], 2 * y.shape[-1]))
        out[..., 0::2] = 0.25 * p[..., :-2] + 0.75 * p[..., 1:-1]
        out[..., 1::2] = 0.75 * p[..., 1:-1] + 0.25 * p[..., 2:]
        x = _blur_by_hand(np.moveaxis(out, -1, ax), ax)
    return x


def pyramid_by_hand(x: np.ndarray, levels: int) -> list[np.ndarray]:
    """Burt & Adelson's Laplacian pyramid as kornia builds it."""
    gauss = [x]
    for _ in range(levels - 1):
        gauss.append(_down_by_hand(gauss[-1]))
    bands = [gauss[k] - _up_by_hand(gauss[k + 1]) for k in range(levels - 1)]
    return [*bands, gauss[-1]]


def recon_by_hand(pyr: list[np.ndarray]) -> np.ndarray:
    img = pyr[-1]
    for k in range(len(pyr) - 2, -1, -1):
        img = _up_by_hand(img) + pyr[k]
    return img


def _project_by_hand(d: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    par = np.empty_like(d)
    for i in range(d.shape[0]):
        unit = c[i] / max(np.linalg.norm(c[i]), 1e-12)
        par[i] = np.sum(d[i] * unit) * unit
    return par, d - par


def fdg_by_hand(
    x_c: np.ndarray, x_u: np.ndarray, ws: tuple[float, ...], ps: tuple[float, ...], conv: str
) -> np.ndarray:
    """Sadat et al. 2025, Algorithm 1: CFG per pyramid level, then the inverse pyramid."""
    pc, pu = pyramid_by_hand(x_c, len(ws)), pyramid_by_hand(x_u, len(ws))
    guided = []
    for k, (w, p) in enumerate(zip(ws, ps, strict=True)):
        if w == 1.0:
            guided.append(pc[k])
            continue
        d = pc[k] - pu[k]
        par, orth = _project_by_hand(d, pc[k])
        upd = orth + p * par
        guided.append(pc[k] + (w - 1) * upd if conv == "paper" else pu[k] + w * upd)
    return recon_by_hand(guided)


def apg_diffusers_by_hand(
    x_c: np.ndarray,
    x_u: np.ndarray,
    w: float,
    eta: float,
    r: float,
    beta: float,
    m: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    """diffusers' APG: momentum, norm threshold, projection on x_c, then x_u + w · update."""
    d = x_c - x_u
    d = d if m is None else d + beta * m
    new_m = d
    out = np.empty_like(x_c)
    for i in range(x_c.shape[0]):
        di = d[i]
        if r > 0 and np.linalg.norm(di) > r:
            di = di * r / np.linalg.norm(di)
        unit = x_c[i] / np.linalg.norm(x_c[i])
        par = np.sum(di * unit) * unit
        out[i] = x_u[i] + w * ((di - par) + eta * par)
    return out, new_m


# -- each rule equals its equation, on every backend ------------------------------------------


@FAST
@given(shape=shapes, w=scales, seed=seeds)
def test_cfg_zero_star_formula(backend: Any, shape: tuple[int, ...], w: float, seed: int) -> None:
    x_c, x_u = draw(seed, shape, 2)
    out, state = combine(backend, CFGZeroStar(w), {COND: x_c, UNCOND: x_u})
    ref = cfg_zero_star_by_hand(x_c, x_u, w)
    np.testing.assert_allclose(out, ref, **tol(backend, ref))
    assert state is None


def test_cfg_zero_star_zero_init_by_count_and_fraction(backend: Any) -> None:
    x_c, x_u = draw(5, (2, 3, 4), 2)
    outs = {COND: x_c, UNCOND: x_u}
    for rule, zeroed in (
        (CFGZeroStar(4.0, zero_init_steps=2), 2),
        (CFGZeroStar(4.0, zero_init_fraction=0.04), 2),  # 4 % of 50 steps
        (CFGZeroStar(4.0, zero_init_steps=1, zero_init_fraction=0.1), 5),
    ):
        for step in (0, zeroed - 1, zeroed, 49):
            ctx = StepContext(1.0, step=step, num_steps=50)
            if step < zeroed:
                assert rule.branches(ctx) == (COND,)  # the unconditional forward is skipped
                out, _ = combine(backend, rule, {COND: x_c}, ctx)
                np.testing.assert_array_equal(out, np.zeros_like(x_c))
            else:
                out, _ = combine(backend, rule, outs, ctx)
                ref = cfg_zero_star_by_hand(x_c, x_u, 4.0)
                np.testing.assert_allclose(out, ref, **tol(backend, ref))
    with pytest.raises(ValueError, match="step index"):
        CFGZeroStar(4.0, zero_init_steps=1).branches(CTX)


@FAST
@given(shape=shapes, w=scales, seed=seeds)
def test_tcfg_formula(backend: Any, shape: tuple[int, ...], w: float, seed: int) -> None:
    x_c, x_u = draw(seed, shape, 2)
    x_u = x_c + 0.3 * x_u  # close branches, as a model's are
    out, _ = combine(backend, TCFG(w), {COND: x_c, UNCOND: x_u})
    ref = tcfg_by_hand(x_c, x_u, w)
    # the projection goes through squared norms: a few more ops of error than plain CFG
    np.testing.assert_allclose(out, ref, **tol(backend, ref, 512))


def test_tcfg_degenerate_inputs_are_finite(backend: Any) -> None:
    z = np.zeros((1, 4))
    e = np.array([[1.0, 0.0, 0.0, 0.0]])
    for x_c, x_u in ((z, z), (e, z), (z, e), (e, 2 * e)):
        out, _ = combine(backend, TCFG(3.0), {COND: x_c, UNCOND: x_u})
        ref = tcfg_by_hand(x_c, x_u, 3.0) if np.any(x_c) or np.any(x_u) else z
        np.testing.assert_allclose(out, ref, atol=1e-6)


@FAST
@given(shape=shapes, w=scales, alpha=st.floats(0.0, 10.0), seed=seeds)
def test_mambo_formula(
    backend: Any, shape: tuple[int, ...], w: float, alpha: float, seed: int
) -> None:
    x_c, x_u = draw(seed, shape, 2)
    out, _ = combine(backend, MAMBOG(w, alpha=alpha), {COND: x_c, UNCOND: x_u})
    ref = mambo_by_hand(x_c, x_u, w, alpha)
    np.testing.assert_allclose(out, ref, **tol(backend, ref, 256))


PYR_SHAPES = [(1, 1, 8, 8), (2, 3, 4, 8), (1, 2, 2, 16), (2, 1, 3, 8, 4)]


@pytest.mark.parametrize("shape", PYR_SHAPES)
@pytest.mark.parametrize("levels", [1, 2, 3])
def test_laplacian_pyramid_matches_hand_construction(
    backend: Any, shape: tuple[int, ...], levels: int
) -> None:
    if shape[-2] % (1 << (levels - 1)) or shape[-1] % (1 << (levels - 1)):
        with pytest.raises(ValueError, match="divisible"):
            laplacian_pyramid(backend.asarray(np.zeros(shape)), levels)
        return
    (x,) = draw(levels, shape, 1)
    pyr = laplacian_pyramid(backend.asarray(x, dtype_of(backend)), levels)
    ref = pyramid_by_hand(x, levels)
    assert len(pyr) == levels
    for p, r in zip(pyr, ref, strict=True):
        np.testing.assert_allclose(backend.to_numpy(p), r, **tol(backend, r))
    back = backend.to_numpy(reconstruct_pyramid(pyr))
    np.testing.assert_allclose(back, x, **tol(backend, x))  # perfect reconstruction


@FAST
@given(
    ws=st.lists(st.sampled_from([0.0, 1.0, 2.5, 7.0]), min_size=1, max_size=3),
    p=st.sampled_from([1.0, 0.0, 0.4]),
    conv=st.sampled_from(["paper", "diffusers"]),
    seed=seeds,
)
def test_fdg_formula(backend: Any, ws: list[float], p: float, conv: str, seed: int) -> None:
    x_c, x_u = draw(seed, (2, 2, 8, 4), 2)
    rule = FDG(tuple(ws), parallel_weights=p, convention=conv)  # type: ignore[arg-type]
    if all(w == 1.0 for w in ws):
        assert rule.branches(CTX) == (COND,)
        return
    out, _ = combine(backend, rule, {COND: x_c, UNCOND: x_u})
    ref = fdg_by_hand(x_c, x_u, tuple(ws), (p,) * len(ws), conv)
    np.testing.assert_allclose(out, ref, **tol(backend, ref, 512))


def test_fdg_equal_scales_is_cfg_and_conventions_agree_without_projection(backend: Any) -> None:
    x_c, x_u = draw(7, (2, 2, 8, 8), 2)
    outs = {COND: x_c, UNCOND: x_u}
    ref = x_u + 4.0 * (x_c - x_u)
    for conv in ("paper", "diffusers"):
        out, _ = combine(backend, FDG((4.0, 4.0, 4.0), convention=conv), outs)  # type: ignore[arg-type]
        np.testing.assert_allclose(out, ref, **tol(backend, ref, 512))
    with pytest.raises(ValueError, match="divisible"):
        FDG((2.0, 2.0, 2.0)).combine({COND: x_c[..., :6], UNCOND: x_u[..., :6]}, CTX)


@FAST
@given(
    w=st.floats(0.0, 12.0),
    eta=st.floats(0.0, 1.0),
    r=st.one_of(st.just(0.0), st.floats(0.1, 5.0)),
    beta=st.floats(-0.9, 0.9),
    seed=seeds,
)
def test_apg_diffusers_convention_formula(
    backend: Any, w: float, eta: float, r: float, beta: float, seed: int
) -> None:
    rule = APG(w, eta=eta, norm_threshold=r, momentum=beta, convention="diffusers")
    state, m_ref = rule.init_state(), None
    for step in range(3):
        x_c, x_u = draw(seed + step, (2, 3, 4), 2)
        out, state = combine(
            backend, rule, {COND: x_c, UNCOND: x_u}, StepContext(3.0 - step), state
        )
        if w == 1.0:
            np.testing.assert_array_equal(out, x_c)
            continue
        ref, m_ref = apg_diffusers_by_hand(x_c, x_u, w, eta, r, beta, m_ref)
        np.testing.assert_allclose(out, ref, **tol(backend, ref, 256))


@pytest.mark.parametrize("w", [1.5, 3.0, 8.0])
@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
def test_apg_convention_mapping(w: float, eta: float) -> None:
    """diffusers(w, η) = paper(w, η′) with η′ = (wη − 1)/(w − 1) (no momentum / threshold)."""
    x_c, x_u = draw(11, (2, 5, 3), 2)
    outs = {COND: x_c, UNCOND: x_u}
    dif, _ = APG(w, eta=eta, convention="diffusers").combine(outs, CTX)
    eta_p = (w * eta - 1) / (w - 1)
    # paper with a negative η′ written out (APG(eta=...) only takes η ≥ 0)
    par, orth = _project_by_hand(x_c - x_u, x_c)
    np.testing.assert_allclose(dif, x_c + (w - 1) * (orth + eta_p * par), rtol=1e-12, atol=1e-12)
    if eta == 1.0:  # no projection: both are CFG
        pap, _ = APG(w, eta=eta).combine(outs, CTX)
        np.testing.assert_allclose(dif, pap, rtol=1e-12, atol=1e-12)


@FAST
@given(shape=shapes, lam=st.floats(0.0, 1.0), seed=seeds)
def test_cfgpp_combine(backend: Any, shape: tuple[int, ...], lam: float, seed: int) -> None:
    x_c, x_u = draw(seed, shape, 2)
    out, _ = combine(backend, CFGPlusPlus(lam), {COND: x_c, UNCOND: x_u})
    assert isinstance(out, Prediction)
    ref = x_u + lam * (x_c - x_u)
    np.testing.assert_allclose(out.denoised, ref, **tol(backend, ref))
    np.testing.assert_array_equal(out.renoise, x_u.astype(dtype_of(backend)))


# -- against diffusers 0.42's guiders ---------------------------------------------------------


def _t(a: np.ndarray, dtype: str = "float32") -> Any:
    import torch

    return torch.from_numpy(np.array(a, dtype=dtype))


def _ours_torch(
    rule: Any,
    x_c: np.ndarray,
    x_u: np.ndarray,
    ctx: StepContext,
    state: Any = None,
    dtype: str = "float32",
) -> tuple[np.ndarray, Any]:
    outs = {COND: _t(x_c, dtype), UNCOND: _t(x_u, dtype)}
    out, state = rule.combine({b: outs[b] for b in rule.branches(ctx)}, ctx, state)
    return out.numpy(), state


def _diffusers_window(start: float, stop: float) -> Any:
    """diffusers' guidance window on step indices, as a schedule."""

    def sched(ctx: StepContext) -> float:
        n = ctx.num_steps
        assert n is not None
        assert ctx.step is not None
        return 1.0 if int(start * n) <= ctx.step < int(stop * n) else 0.0

    return sched


def _guided(
    guider: Any, x_c: np.ndarray, x_u: np.ndarray, step: int, n: int, dtype: str = "float32"
) -> np.ndarray:
    import torch

    guider.set_state(step=step, num_inference_steps=n, timestep=torch.tensor(999 - step))
    c, u = _t(x_c, dtype), _t(x_u, dtype)
    if guider.num_conditions == 1:
        return guider.forward(c).pred.numpy()
    return guider.forward(c, u).pred.numpy()


def _close(ours: np.ndarray, ref: np.ndarray, ops: int = 256) -> None:
    eps = np.finfo(np.float32).eps
    np.testing.assert_allclose(ours, ref, rtol=0, atol=ops * eps * max(1.0, np.abs(ref).max()))


@pytest.mark.parametrize("w", [1.0, 2.5, 7.5])
@pytest.mark.parametrize("original", [False, True])
def test_cfg_zero_star_equals_diffusers(w: float, original: bool) -> None:
    pytest.importorskip("diffusers")
    from diffusers.guiders import ClassifierFreeZeroStarGuidance

    n = 10
    g = ClassifierFreeZeroStarGuidance(
        guidance_scale=w, zero_init_steps=2, start=0.1, stop=0.8, use_original_formulation=original
    )
    rule = CFGZeroStar(
        w + 1 if original else w, zero_init_steps=2, schedule=_diffusers_window(0.1, 0.8)
    )
    for step in range(n):
        x_c, x_u = draw(step, (2, 4, 4, 4), 2)
        ours, _ = _ours_torch(rule, x_c, 0.5 * x_c + x_u, StepContext(1.0, step, n))
        _close(ours, _guided(g, x_c, 0.5 * x_c + x_u, step, n))


@pytest.mark.parametrize("w", [1.0, 3.0, 7.5])
@pytest.mark.parametrize("original", [False, True])
def test_tcfg_equals_diffusers(w: float, original: bool) -> None:
    pytest.importorskip("diffusers")
    from diffusers.guiders import TangentialClassifierFreeGuidance

    n = 6
    g = TangentialClassifierFreeGuidance(
        guidance_scale=w, use_original_formulation=original, start=0.2, stop=1.0
    )
    rule = TCFG(w + 1 if original else w, schedule=_diffusers_window(0.2, 1.0))
    for step in range(n):
        x_c, x_u = draw(step + 20, (2, 4, 4, 4), 2)
        x_u = x_c + 0.3 * x_u
        ours, _ = _ours_torch(rule, x_c, x_u, StepContext(1.0, step, n), dtype="float64")
        # diffusers runs its SVD in float32 whatever the input dtype
        _close(ours, _guided(g, x_c, x_u, step, n, dtype="float64"), 2048)


@pytest.mark.parametrize("w", [1.0, 4.0, 10.0])
@pytest.mark.parametrize("alpha", [0.0, 8.0])
@pytest.mark.parametrize("original", [False, True])
def test_mambo_equals_diffusers(w: float, alpha: float, original: bool) -> None:
    pytest.importorskip("diffusers")
    from diffusers.guiders import MagnitudeAwareGuidance

    g = MagnitudeAwareGuidance(guidance_scale=w, alpha=alpha, use_original_formulation=original)
    rule = MAMBOG(w + 1 if original else w, alpha=alpha)
    # (batch, tokens, channels): with torch 2.13 diffusers' torch.norm(dim=[1, 2, 3]) on 4-D
    # latents raises (a matrix norm needs 2 dims), so its guider only runs on <= 3-D outputs
    for step in range(3):
        x_c, x_u = draw(step + 40, (2, 16, 8), 2)
        x_u = x_c + (0.05 + 0.2 * step) * x_u
        ours, _ = _ours_torch(rule, x_c, x_u, StepContext(1.0, step, 3))
        _close(ours, _guided(g, x_c, x_u, step, 3))


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("beta", [0.0, -0.5])
@pytest.mark.parametrize("r", [0.0, 3.0])
def test_apg_equals_diffusers(eta: float, beta: float, r: float) -> None:
    pytest.importorskip("diffusers")
    from diffusers.guiders import AdaptiveProjectedGuidance

    n, w = 6, 5.0
    kw = {
        "guidance_scale": w,
        "eta": eta,
        "adaptive_projected_guidance_rescale": r,
        "adaptive_projected_guidance_momentum": beta if beta else None,
    }
    g = AdaptiveProjectedGuidance(**kw)
    g_orig = AdaptiveProjectedGuidance(**kw, use_original_formulation=True)
    rules = (
        APG(w, eta=eta, norm_threshold=r, momentum=beta, convention="diffusers"),
        APG(w + 1, eta=eta, norm_threshold=r, momentum=beta),
    )  # original = paper, w + 1
    states: list[Any] = [None, None]
    for step in range(n):
        x_c, x_u = draw(step + 60, (2, 4, 4, 4), 2)
        for j, (guider, rule) in enumerate(zip((g, g_orig), rules, strict=True)):
            if step == 0:  # diffusers creates the momentum buffer in prepare_inputs at step 0
                guider.set_state(step=0, num_inference_steps=n, timestep=None)
                guider.prepare_inputs({})
            ctx = StepContext(1.0, step, n)
            ours, states[j] = _ours_torch(rule, x_c, x_u, ctx, states[j])
            _close(ours, _guided(guider, x_c, x_u, step, n))


@pytest.mark.parametrize("ws", [(10.0, 5.0), (6.0, 3.0, 1.5)])
@pytest.mark.parametrize("p", [None, 0.3])
@pytest.mark.parametrize("original", [False, True])
def test_fdg_equals_diffusers(ws: tuple[float, ...], p: float | None, original: bool) -> None:
    """Same inputs, same pyramid (kornia's): equal up to float32 rounding.

    diffusers 0.42's guider fails when only some levels are active (a level with w = 1, or
    per-level start/stop): it then appends a stale or unbound ``pred_cond_freq``. So the
    comparison uses one window for all levels and no w = 1; our per-level neutral levels are
    checked against the hand formula in test_fdg_formula.
    """
    pytest.importorskip("kornia")
    from diffusers.guiders import FrequencyDecoupledGuidance

    n = 5
    g = FrequencyDecoupledGuidance(
        guidance_scales=list(ws),
        parallel_weights=p,
        use_original_formulation=original,
        start=0.2,
        stop=0.8,
    )
    sched = _diffusers_window(0.2, 0.8)
    if original:  # x_c + w·U per level is the paper's convention with w + 1
        rule = FDG(tuple(w + 1 for w in ws), 1.0 if p is None else p, "paper", sched)
    else:
        rule = FDG(ws, 1.0 if p is None else p, "diffusers", sched)
    for step in range(n):
        x_c, x_u = draw(step + 80, (2, 4, 8, 16), 2)
        ours, _ = _ours_torch(rule, x_c, x_u, StepContext(1.0, step, n))
        _close(ours, _guided(g, x_c, x_u, step, n), 1024)


# -- neutral settings: the unguided prediction, bit for bit ------------------------------------

NEUTRAL = [
    CFGZeroStar(1.0),
    CFGZeroStar(5.0, schedule=Interval(5.0, 9.0)),
    TCFG(1.0),
    MAMBOG(1.0, alpha=3.0),
    FDG((1.0, 1.0)),
    FDG((4.0, 2.0), schedule=(Interval(5.0, 9.0), Interval(5.0, 9.0))),
    FDG((1.0, 1.0), parallel_weights=0.0, convention="diffusers"),
    APG(1.0, eta=0.0, convention="diffusers"),
    CFGPlusPlus(0.5, schedule=Interval(5.0, 9.0)),
    Compose(CFGZeroStar(1.0), TCFG(1.0), MAMBOG(1.0), FDG((1.0,)), SEG(0.0), CFG(1.0)),
]


@pytest.mark.parametrize("rule", NEUTRAL, ids=repr)
def test_neutral_settings_return_the_conditional_prediction(backend: Any, rule: Any) -> None:
    assert isinstance(rule, GuidanceRule)
    assert isinstance(rule, GuidanceTerm)
    assert rule.branches(CTX) == (COND,)
    x_c = backend.asarray(draw(1, (2, 2, 4, 4), 1)[0], dtype_of(backend))
    out, _ = rule.combine({COND: x_c}, CTX, rule.init_state())
    assert out is x_c


# -- composition with CFG and SEG, under schedules --------------------------------------------

SEG_RULE = SEG(2.0, sigma=3.0, schedule=LinearRamp(1.0, 0.0))
NEW_RULES = [
    CFGZeroStar(4.0, schedule=Interval(0.5, 5.0)),
    TCFG(3.0, schedule=Interval(0.5, 5.0)),
    MAMBOG(6.0, alpha=2.0, schedule=Interval(0.5, 5.0)),
    FDG((5.0, 2.0), schedule=Interval(0.5, 5.0)),
    APG(4.0, momentum=-0.5, convention="diffusers", schedule=Interval(0.5, 5.0)),
    CFGPlusPlus(0.4, schedule=Interval(0.5, 5.0)),
]


def _outputs(rule: Any, seed: int) -> dict[Branch, np.ndarray]:
    x_c, x_u, x_s = draw(seed, (2, 2, 4, 4), 3)
    return {COND: x_c, UNCOND: x_c + 0.3 * x_u, SEG_RULE.seg_branch: x_c + 0.2 * x_s}


def _denoised(out: Any) -> np.ndarray:
    return out.denoised if isinstance(out, Prediction) else out


@pytest.mark.parametrize("rule", NEW_RULES, ids=lambda r: type(r).__name__)
def test_composition_with_seg_and_cfg_under_schedules(backend: Any, rule: Any) -> None:
    """Compose(rule, SEG) = rule + SEG's update; Compose(CFG, rule) = CFG + rule's update."""
    cfg = CFG(2.0, schedule=Interval(0.0, 2.0))
    sigmas = [8.0, 4.0, 2.0, 1.0, 0.25]
    states: dict[str, Any] = {"seg": None, "cfg": None, "alone": None}
    seg_c, cfg_c = Compose(rule, SEG_RULE), Compose(cfg, rule)
    states = {"seg": seg_c.init_state(), "cfg": cfg_c.init_state(), "alone": rule.init_state()}
    for i, s in enumerate(sigmas):
        ctx = StepContext(s, step=i, num_steps=len(sigmas))
        outs = _outputs(rule, 100 + i)
        x_c, x_u, x_s = outs[COND], outs[UNCOND], outs[SEG_RULE.seg_branch]
        alone, states["alone"] = combine(backend, rule, outs, ctx, states["alone"])
        active = 0.5 < s <= 5.0
        assert (UNCOND in rule.branches(ctx)) == active
        assert isinstance(alone, Prediction) == (active and isinstance(rule, CFGPlusPlus))
        seg_w = SEG_RULE.coefficient(ctx)
        out, states["seg"] = combine(backend, seg_c, outs, ctx, states["seg"])
        needed = set(seg_c.branches(ctx))
        assert (SEG_RULE.seg_branch in needed) == (seg_w != 0.0)
        ref = _denoised(alone) + seg_w * (x_c - x_s)
        np.testing.assert_allclose(_denoised(out), ref, **tol(backend, ref, 512))
        out, states["cfg"] = combine(backend, cfg_c, outs, ctx, states["cfg"])
        ref = _denoised(alone) + cfg.coefficient(ctx) * (x_c - x_u)
        np.testing.assert_allclose(_denoised(out), ref, **tol(backend, ref, 512))
        if isinstance(alone, Prediction):  # the composition keeps CFG++'s re-noising branch
            np.testing.assert_array_equal(out.renoise, x_u.astype(dtype_of(backend)))


# -- CFG++ in the samplers; old rules bit-identical --------------------------------------------


def toy_model(x: Any, sigma: Any, y: Any = None) -> Any:
    """A closed-form denoiser: data ~ N(y, 1) per row (y = 0 without conditioning)."""
    s2 = sigma[:, None] ** 2
    mean = 0.0 if y is None else y[:, None]
    return (x + s2 * mean) / (1 + s2)


SIGMAS = [6.0, 3.0, 1.5, 0.7, 0.2, 0.0]


def _toy_np(x: np.ndarray, s: float, y: np.ndarray | None) -> np.ndarray:
    return toy_model(x, np.full((x.shape[0],), s), y)


def test_cfgpp_euler_and_ddim_equal_hand_loops(backend: Any) -> None:
    lam = 0.4
    y = np.array([1.0, -2.0])
    x0 = np.random.default_rng(3).normal(size=(2, 5)) * SIGMAS[0]
    z = [np.random.default_rng(10 + i).normal(size=(2, 5)) for i in range(len(SIGMAS))]
    dt = dtype_of(backend)
    guided = GuidedDenoiser(
        toy_model, CFGPlusPlus(lam), uncond={"y": backend.asarray(np.zeros(1), dt)}
    )
    extra = {"y": backend.asarray(y, dt)}

    # Euler CFG++ (k-diffusion's sample_euler_cfg_pp): x ← D_λ + σ' (x − D_u)/σ
    x = x0.copy()
    for s, s_next in itertools.pairwise(SIGMAS):
        d_c, d_u = _toy_np(x, s, y), _toy_np(x, s, np.zeros(2))
        x = d_u + lam * (d_c - d_u) + s_next * (x - d_u) / s
    out = sample_euler(guided, backend.asarray(x0, dt), SIGMAS, extra_args=extra, progress=False)
    np.testing.assert_allclose(backend.to_numpy(out), x, **tol(backend, x, 256))

    # DDIM CFG++ with η = 0.7 (Chung et al. 2025, Algorithm 1, in σ form)
    eta, x, it = 0.7, x0.copy(), iter(z)
    for s, s_next in itertools.pairwise(SIGMAS):
        d_c, d_u = _toy_np(x, s, y), _toy_np(x, s, np.zeros(2))
        up = min(s_next, eta * math.sqrt(s_next**2 * (s**2 - s_next**2) / s**2))
        down = math.sqrt(s_next**2 - up**2)
        x = d_u + lam * (d_c - d_u) + down * (x - d_u) / s
        if up > 0:
            x = x + up * next(it)
    noise = iter(z)
    out = sample_ddim(
        guided,
        backend.asarray(x0, dt),
        SIGMAS,
        eta=eta,
        extra_args=extra,
        noise_sampler=lambda a, b: backend.asarray(next(noise), dt),
        progress=False,
    )
    np.testing.assert_allclose(backend.to_numpy(out), x, **tol(backend, x, 256))


@pytest.mark.parametrize("rule", [CFG(3.0), APG(3.0, momentum=-0.5), CFGZeroStar(3.0)], ids=repr)
def test_samplers_are_bit_identical_for_rules_without_renoise(rule: Any) -> None:
    """The pre-CFG++ update formulas, applied to the denoiser's own outputs, give the same bits."""
    y = np.array([1.0, -2.0])
    x0 = np.random.default_rng(4).normal(size=(2, 5)) * SIGMAS[0]
    guided = GuidedDenoiser(toy_model, rule, uncond={"y": np.zeros(1)}, sigmas=SIGMAS)
    seen: list[np.ndarray] = []
    out = sample_euler(
        guided,
        x0,
        SIGMAS,
        extra_args={"y": y},
        progress=False,
        callback=lambda st: seen.append(st.denoised),
    )
    x = x0
    for i, (s, s_next) in enumerate(itertools.pairwise(SIGMAS)):
        d = (x - seen[i]) / s
        x = x + (s_next - s) * d
    np.testing.assert_array_equal(out, x)
    seen.clear()
    z = [np.random.default_rng(20 + i).normal(size=(2, 5)) for i in range(len(SIGMAS))]
    noise = iter(z)
    out = sample_ddim(
        guided,
        x0,
        SIGMAS,
        eta=0.5,
        noise_sampler=lambda a, b: next(noise),
        extra_args={"y": y},
        progress=False,
        callback=lambda st: seen.append(st.denoised),
    )
    x, it = x0, iter(z)
    for i, (s, s_next) in enumerate(itertools.pairwise(SIGMAS)):
        up = min(s_next, 0.5 * math.sqrt(s_next**2 * (s**2 - s_next**2) / s**2))
        down = math.sqrt(s_next**2 - up**2)
        x = seen[i] + (down / s) * (x - seen[i])
        if up > 0:
            x = x + up * next(it)
    np.testing.assert_array_equal(out, x)


def test_guided_denoiser_plain_call_returns_the_cfgpp_step_target() -> None:
    guided = GuidedDenoiser(toy_model, CFGPlusPlus(0.3), uncond={"y": np.zeros(1)})
    x, y = np.ones((2, 3)), np.array([1.0, 2.0])
    out = guided(x, np.ones(2), y=y)
    d_c, d_u = _toy_np(x, 1.0, y), _toy_np(x, 1.0, np.zeros(2))
    np.testing.assert_allclose(out, d_u + 0.3 * (d_c - d_u), rtol=1e-14)


def test_two_different_renoise_branches_are_rejected() -> None:
    class Other(CFGPlusPlus):
        def renoise_branch(self, ctx: StepContext) -> Branch | None:
            return COND

    rule = Compose(CFGPlusPlus(0.5), Other(0.5))
    with pytest.raises(ValueError, match="different branches"):
        rule.combine({COND: np.ones((1, 2)), UNCOND: np.zeros((1, 2))}, CTX)


@pytest.mark.parametrize(
    ("make", "names"),
    [
        (lambda: CFGZeroStar(2.0, zero_init_steps=-1), "zero_init_steps"),
        (lambda: CFGZeroStar(2.0, zero_init_fraction=1.5), "zero_init_fraction"),
        (lambda: TCFG(-1.0), "scale"),
        (lambda: MAMBOG(2.0, alpha=-1.0), "alpha"),
        (lambda: FDG(()), "scales"),
        (lambda: FDG((2.0, 3.0), parallel_weights=(1.0,)), "parallel_weights"),
        (lambda: FDG((2.0,), convention="kornia"), "convention"),  # type: ignore[arg-type]
        (lambda: APG(2.0, convention="comfy"), "convention"),  # type: ignore[arg-type]
        (lambda: CFGPlusPlus(-0.1), "scale"),
    ],
)
def test_bad_arguments_are_named(make: Any, names: str) -> None:
    with pytest.raises((ValueError, TypeError), match=names):
        make()


@pytest.mark.parametrize("rule", NEUTRAL, ids=repr)
def test_neutral_rules_sample_exactly_like_the_unguided_model(rule: Any) -> None:
    """A whole Euler run under a neutral rule is the conditional model's run, bit for bit."""
    sigmas = [4.0, 2.0, 1.0, 0.3, 0.0]  # outside the rules' Interval(5, 9]
    y = np.array([1.0, -2.0])
    x0 = np.random.default_rng(6).normal(size=(2, 2, 4, 4)) * sigmas[0]
    calls: list[Any] = []

    def model(x: Any, sigma: Any, y: Any = None) -> Any:
        calls.append(y)
        s2 = sigma[:, None, None, None] ** 2
        return (x + s2 * (0.0 if y is None else y[:, None, None, None])) / (1 + s2)

    guided = GuidedDenoiser(model, rule, uncond={"y": np.zeros(1)}, sigmas=sigmas)
    out = sample_euler(guided, x0, sigmas, extra_args={"y": y}, progress=False)
    assert all(c is not None and np.array_equal(c, y) for c in calls)  # never the uncond branch
    calls.clear()
    plain = sample_euler(model, x0, sigmas, extra_args={"y": y}, progress=False)
    np.testing.assert_array_equal(out, plain)
