"""Issue 13 (robustness, round 2): core, rules and numerics.

Each test compares against an independent reference (SciPy, NumPy, diffusers' own
guider, the unguided prediction) and fails on the code before the fix.
"""

from __future__ import annotations

import math

import array_api_strict as xps
import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter1d

import smoothguide.torch as sgt
from reliability_table import failure_mode
from smoothguide import TokenGrid, smooth_queries
from smoothguide.smoothing import MODES
from tolerance import assert_close

INF = math.inf


def official_radius(sigma: float) -> int:
    """The official SEG code's kernel size ``ceil(6σ) + 1``, made odd, halved (independent copy)."""
    c = math.ceil(6 * sigma)
    return (c + 1 - c % 2) // 2


def scipy_smooth(q: np.ndarray, grid: TokenGrid, sigma: float, mode: str, radius: int | None):
    """float64 SciPy reference: gaussian_filter1d along height, then width."""
    x = np.array(q, dtype=np.float64)
    lead, dim = x.shape[:-2], x.shape[-1]
    sp = x[..., grid.spatial_slice, :].reshape(*lead, grid.height, grid.width, dim)
    r = official_radius(sigma) if radius is None else radius
    for axis in (-3, -2):
        if sp.shape[axis] > 1:
            sp = gaussian_filter1d(sp, sigma, axis=axis, mode=mode, radius=r)
    out = x.copy()
    out[..., grid.spatial_slice, :] = sp.reshape(*lead, grid.spatial_tokens, dim)
    return out


def run_impl(impl: str, q: np.ndarray, grid: TokenGrid, sigma: float, **kw: object) -> np.ndarray:
    if impl == "numpy":
        return smooth_queries(q, grid, sigma, **kw)  # type: ignore[arg-type]
    if impl == "array_api_strict":
        return np.asarray(smooth_queries(xps.asarray(q), grid, sigma, **kw))  # type: ignore[arg-type]
    if impl == "torch-core":
        return smooth_queries(torch.from_numpy(q), grid, sigma, **kw).numpy()  # type: ignore[arg-type]
    method = impl.removeprefix("torch-")
    out = sgt.smooth_queries(torch.from_numpy(q), grid, sigma, method=method, **kw)  # type: ignore[arg-type]
    return out.numpy()


IMPLS = ["numpy", "array_api_strict", "torch-core", "torch-matmul", "torch-shift"]


# -- NaN / inf stay within the kernel's support, as in SciPy ---------------------------------


@failure_mode(
    "one NaN, +inf or -inf query token (and mixed ones) in the blurred grid",
    "it reaches only the outputs within the kernel's support, exactly as "
    "scipy.ndimage.gaussian_filter1d (NaN, ±inf and finite values at the same places), in "
    "every boundary mode, core on every backend and the torch fast path (matmul, shift)",
)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "dtype", [pytest.param("float32", marks=pytest.mark.numerics), "float64"]
)  # the float32 half in the tests-kernels runs (the CI budget)
def test_nonfinite_queries_stay_within_the_kernel_support(impl: str, mode: str, dtype: str) -> None:
    grid = TokenGrid(9, 13, prefix=1, suffix=2)
    rng = np.random.default_rng(0)
    cases = [
        ({(4, 6): np.nan}, 1.0, None),
        ({(2, 3): INF}, 1.0, None),
        ({(0, 0): -INF}, 1.5, None),
        ({(4, 6): INF, (4, 8): -INF, (7, 1): np.nan}, 1.0, 2),  # inf - inf = NaN where both reach
        ({(3, 3): INF}, 0.05, 3),  # taps beyond +-1 underflow to 0: 0 * inf = NaN, as SciPy
        ({(1, 12): np.nan}, 2.0, 20),  # radius wider than the grid: folded taps
    ]
    for bad, sigma, radius in cases:
        q = rng.normal(size=(2, grid.num_tokens, 3)).astype(dtype)
        for (i, j), value in bad.items():
            q[1, grid.prefix + i * grid.width + j, 1] = value
        q[0, 0, 0] = np.nan  # a non-spatial token: never blurred, passed through
        ref = scipy_smooth(q, grid, sigma, mode, radius)
        out = run_impl(impl, q, grid, sigma, mode=mode, radius=radius)
        assert out.dtype == q.dtype
        np.testing.assert_array_equal(np.isnan(out), np.isnan(ref))
        np.testing.assert_array_equal(np.isposinf(out), np.isposinf(ref))
        np.testing.assert_array_equal(np.isneginf(out), np.isneginf(ref))
        finite = np.isfinite(ref)
        assert finite.sum() > q.size // 2  # most of the grid is unaffected
        assert_close(out[finite], ref[finite], ops=64, magnitude=q[np.isfinite(q)])


# -- caches never hand out tensors that break another mode -----------------------------------


def kron_blur(grid: TokenGrid, sigma: float, mode: str) -> np.ndarray:
    """The (tokens x tokens) SciPy blur operator of the grid: kron of per-axis matrices."""
    r = official_radius(sigma)
    mats = [
        gaussian_filter1d(np.eye(n), sigma, axis=0, mode=mode, radius=r)
        for n in (grid.height, grid.width)
    ]
    return np.kron(*mats)


@failure_mode(
    "torch smoothing (and SEG in a model) first under torch.inference_mode(), then with autograd",
    "the process-wide blur-matrix cache holds normal tensors (built outside inference mode): "
    "the later backward works and its gradient equals the transposed SciPy operator, and a "
    "fresh-cache run",
)
@pytest.mark.numerics
@pytest.mark.parametrize("method", ["matmul", "shift"])
def test_inference_mode_call_does_not_poison_the_blur_cache_for_autograd(method: str) -> None:
    from smoothguide.torch.smoothing import _shift_plan, axis_blur_matrix

    axis_blur_matrix.cache_clear()
    _shift_plan.cache_clear()
    grid, sigma = TokenGrid(7, 11), 1.3
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, grid.num_tokens, 3, generator=gen)
    with torch.inference_mode():
        first = sgt.smooth_queries(q, grid, sigma, method=method)
    assert first.is_inference()
    q = q.clone().requires_grad_(True)
    c = torch.randn(2, grid.num_tokens, 3, generator=gen)
    out = sgt.smooth_queries(q, grid, sigma, method=method)
    (out * c).sum().backward()
    assert q.grad is not None
    b = kron_blur(grid, sigma, "reflect")
    assert_close(q.grad, np.einsum("ji,bjd->bid", b, c.double().numpy()), magnitude=c)
    assert_close(
        out.detach(), np.einsum("ij,bjd->bid", b, q.detach().double().numpy()), magnitude=q.detach()
    )


@failure_mode(
    "a SEG-guided model evaluated under torch.inference_mode(), then differentiated",
    "the backward runs; the input gradient equals that of a run with a freshly emptied cache",
)
@pytest.mark.numerics
def test_seg_under_inference_mode_then_autograd_on_the_demo_model() -> None:
    demo = pytest.importorskip("smoothguide.demo.model")
    from smoothguide.rules import SEG
    from smoothguide.sampling import GuidedDenoiser
    from smoothguide.torch import AttentionPatcher
    from smoothguide.torch.smoothing import axis_blur_matrix

    torch.manual_seed(0)
    net = demo.DemoDiT(demo.DiTConfig(hidden=32, depth=2, heads=2)).eval()
    den = demo.DemoDenoiser(net).eval()
    patcher = AttentionPatcher(den, layers=demo.Attention)
    null = {"class_labels": torch.full((2,), demo.NULL_CLASS)}
    guided = GuidedDenoiser(den, SEG(2.0, sigma=1.5, cfg_scale=3.0), uncond=null, perturber=patcher)
    x, labels, s = torch.randn(2, 1, 16, 16), torch.tensor([3, 7]), torch.full((2,), 2.0)

    def grad() -> torch.Tensor:
        xg = x.clone().requires_grad_(True)
        guided(xg, s, class_labels=labels).square().sum().backward()
        assert xg.grad is not None
        return xg.grad

    axis_blur_matrix.cache_clear()
    reference = grad()
    axis_blur_matrix.cache_clear()
    with torch.inference_mode():
        guided(x, s, class_labels=labels)
    assert axis_blur_matrix.cache_info().currsize > 0  # the inference-mode call filled it
    assert torch.equal(grad(), reference)


# -- rules refuse branch outputs of different shapes -----------------------------------------


def _rules() -> list[object]:
    from smoothguide.rules import APG, CFG, PAG, SEG, Compose, Rescale

    return [
        pytest.param(CFG(3.0), id="CFG"),
        pytest.param(SEG(2.0, sigma=1.0), id="SEG"),
        pytest.param(SEG(2.0, sigma=1.0, cfg_scale=4.0), id="SEG+CFG"),
        pytest.param(SEG(3.0, sigma=1.0, convention="paper", cfg_scale=4.0), id="SEG-paper-Eq10"),
        pytest.param(PAG(2.0, cfg_scale=3.0), id="PAG+CFG"),
        pytest.param(APG(4.0, eta=0.5, momentum=0.3), id="APG"),
        pytest.param(Compose(CFG(3.0), Rescale(0.7)), id="CFG+Rescale"),
        pytest.param(Compose(CFG(3.0), SEG(2.0, sigma=INF), PAG(1.0)), id="Compose"),
    ]


@failure_mode(
    "branch outputs of different shapes handed to a rule (x_c of shape (2, 1) with x_u of "
    "(2, 4), or a perturbed branch of another shape), every rule and Compose",
    "ValueError naming the rule, each branch and its shape; never a broadcast result",
)
@pytest.mark.parametrize("rule", _rules())
def test_rules_refuse_branch_outputs_of_different_shapes(rule: object) -> None:
    from smoothguide.rules import StepContext

    ctx = StepContext(1.0)
    needed = rule.branches(ctx)  # type: ignore[attr-defined]
    assert len(needed) >= 2
    rng = np.random.default_rng(0)
    good = {b: rng.normal(size=(2, 4)) for b in needed}
    out, _ = rule.combine(good, ctx)  # type: ignore[attr-defined]
    assert out.shape == (2, 4)
    for odd in needed:
        outputs = dict(good)
        outputs[odd] = rng.normal(size=(2, 1))
        with pytest.raises(ValueError, match="one shape") as info:
            rule.combine(outputs, ctx)  # type: ignore[attr-defined]
        msg = str(info.value)
        assert "(2, 1)" in msg
        assert "(2, 4)" in msg
        assert repr(odd.conditioning) in msg


def _library_rules() -> list[object]:
    from smoothguide.rules import (
        FDG,
        MAMBOG,
        SAG,
        SLG,
        TCFG,
        TPG,
        Autoguidance,
        CFGPlusPlus,
        CFGZeroStar,
    )

    return [
        pytest.param(TCFG(3.0), id="TCFG"),
        pytest.param(MAMBOG(3.0), id="MAMBOG"),
        pytest.param(CFGZeroStar(3.0), id="CFGZeroStar"),
        pytest.param(FDG(), id="FDG"),
        pytest.param(CFGPlusPlus(0.5), id="CFGPlusPlus"),
        pytest.param(SLG(2.8, start=0.0, stop=1.0), id="SLG"),
        pytest.param(TPG(), id="TPG"),
        pytest.param(SAG(), id="SAG"),
        pytest.param(Autoguidance(2.0, model=lambda x, sigma: x), id="Autoguidance"),
    ]


@failure_mode(
    "branch outputs of different shapes handed to the rule library's other rules (CFG "
    "variants, SLG, TPG, SAG, autoguidance): latents (2, 4, 8, 8) against (2, 1, 8, 8)",
    "ValueError naming the rule, each branch and its shape; never a broadcast result",
)
@pytest.mark.parametrize("rule", _library_rules())
def test_library_rules_refuse_branch_outputs_of_different_shapes(rule: object) -> None:
    from smoothguide.rules import StepContext

    ctx = StepContext(1.0, step=3, num_steps=10)
    needed = rule.branches(ctx)  # type: ignore[attr-defined]
    assert len(needed) >= 2
    rng = np.random.default_rng(0)
    good = {b: rng.normal(size=(2, 4, 8, 8)) for b in needed}
    rule.combine(good, ctx)  # type: ignore[attr-defined]
    for odd in needed:
        outputs = dict(good)
        outputs[odd] = rng.normal(size=(2, 1, 8, 8))
        with pytest.raises(ValueError, match="one shape") as info:
            rule.combine(outputs, ctx)  # type: ignore[attr-defined]
        assert "(2, 1, 8, 8)" in str(info.value)
        assert repr(odd.conditioning) in str(info.value)


# -- sigma too large for a float kernel size: the same named ValueError ------------------------


HUGE = [1e300, 3e307, 1e308, 1.7976931348623157e308]


def _huge_entry_points() -> list[object]:
    from smoothguide import blur_matrix, default_radius, gaussian_kernel1d
    from smoothguide.perturbations import QuerySmoothing
    from smoothguide.rules import SEG

    grid = TokenGrid(2, 3)
    return [
        pytest.param(default_radius, id="default_radius"),
        pytest.param(gaussian_kernel1d, id="gaussian_kernel1d"),
        pytest.param(lambda s: blur_matrix(4, s), id="blur_matrix"),
        pytest.param(lambda s: smooth_queries(np.ones((6, 2)), grid, s), id="smooth_queries"),
        pytest.param(lambda s: smooth_queries(np.ones((6, 2)), grid, (0.0, s)), id="per-axis"),
        pytest.param(lambda s: sgt.smooth_queries(torch.ones(6, 2), grid, s), id="torch"),
        pytest.param(QuerySmoothing, id="QuerySmoothing"),
        pytest.param(lambda s: SEG(3.0, sigma=(1.0, s)), id="SEG"),
    ]


@failure_mode(
    "sigma >= ~3e307 (6 sigma overflows to inf) in default_radius, gaussian_kernel1d, "
    "blur_matrix, smooth_queries (core, torch), QuerySmoothing, SEG",
    "the same ValueError as for sigma = 1e300, naming sigma and pointing to sigma=math.inf; "
    "never OverflowError",
)
@pytest.mark.parametrize("entry", _huge_entry_points())
@pytest.mark.parametrize("sigma", HUGE)
def test_huge_sigma_is_a_named_value_error(entry: object, sigma: float) -> None:
    with pytest.raises(ValueError, match=r"sigma.*math\.inf"):
        entry(sigma)  # type: ignore[operator]


@failure_mode(
    "smoothguide energy --sigmas 1e308 (and 3e307)",
    "a usage error (exit 2) with one error line naming sigma and math.inf; no traceback",
)
@pytest.mark.parametrize("sigma", ["3e307", "1e308"])
def test_energy_command_refuses_huge_sigma_without_traceback(
    sigma: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from smoothguide.cli import main

    with pytest.raises(SystemExit) as info:
        main(["energy", "--sigmas", sigma])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(errors) == 1
    assert "sigma" in errors[0]
    assert "math.inf" in errors[0]


# -- NumPy scalars are accepted wherever a Python number is --------------------------------------


def _same(a: object, b: object) -> None:
    """Equal results, bit for bit (the NumPy scalars below hold exactly the Python values)."""
    if isinstance(a, tuple | list):
        assert isinstance(b, tuple | list)
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _same(x, y)
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)  # type: ignore[arg-type]
    elif isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b)  # type: ignore[arg-type]
        assert a.dtype == b.dtype  # type: ignore[union-attr]
    else:
        assert a == b
        assert type(a) is type(b)  # stored as Python numbers, whatever came in


def _scalar_cases() -> list[object]:
    """(name, call(f, i)): ``f`` makes a real number, ``i`` an integer, of one kind."""
    from smoothguide import (
        attention,
        attention_energy,
        attention_logits,
        blur_matrix,
        default_radius,
        gaussian_kernel1d,
    )
    from smoothguide.perturbations import QuerySmoothing
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
        Interval,
        LinearRamp,
        Rescale,
        StepContext,
    )
    from smoothguide.sampling import karras_sigmas, sample_ddim

    rng = np.random.default_rng(0)
    q, k, v = rng.normal(size=(6, 4)), rng.normal(size=(5, 4)), rng.normal(size=(5, 2))
    grid = TokenGrid(2, 3)
    outs = {COND: rng.normal(size=(2, 3)), UNCOND: rng.normal(size=(2, 3))}

    def rule_out(rule: object, f: object, i: object) -> object:
        ctx = StepContext(f(1.5), step=i(1), num_steps=i(3))  # type: ignore[operator]
        branches = rule.branches(ctx)  # type: ignore[attr-defined]
        given = {b: outs.get(b, outs[COND] * 0.5) for b in branches}
        return rule.combine(given, ctx)[0], rule  # type: ignore[attr-defined]

    def schedule(s: object, f: object, i: object) -> object:
        ctxs = [StepContext(x, step=j, num_steps=4) for j, x in enumerate((8.0, 4.0, 2.0, 1.0))]
        return [s(c) for c in ctxs], s  # type: ignore[operator]

    return [
        ("attention_energy", lambda f, i: attention_energy(q, k, scale=f(0.5))),
        ("attention_logits", lambda f, i: attention_logits(q, k, scale=f(0.25))),
        ("attention", lambda f, i: attention(q, k, v, scale=f(0.5))),
        ("default_radius", lambda f, i: default_radius(f(2.5))),
        ("gaussian_kernel1d", lambda f, i: gaussian_kernel1d(f(1.5), radius=i(3))),
        ("blur_matrix", lambda f, i: blur_matrix(i(5), f(1.5), radius=i(2))),
        ("smooth_queries", lambda f, i: smooth_queries(q, grid, f(1.5), radius=i(2))),
        ("smooth_queries-tuple", lambda f, i: smooth_queries(q, grid, (f(0.5), f(2.0)))),
        (
            "torch.smooth_queries",
            lambda f, i: sgt.smooth_queries(torch.from_numpy(q), grid, f(1.5), radius=i(2)),
        ),
        ("TokenGrid", lambda f, i: TokenGrid(i(2), i(3), frames=i(1), prefix=i(1), suffix=i(0))),
        ("TokenGrid.infer", lambda f, i: TokenGrid.infer(i(24), aspect=(i(2), i(3)))),
        ("QuerySmoothing", lambda f, i: QuerySmoothing(f(1.5), radius=i(3))),
        ("QuerySmoothing-tuple", lambda f, i: QuerySmoothing((f(0.5), f(2.0)), radius=i(2))),
        ("StepContext", lambda f, i: StepContext(f(1.5), step=i(1), num_steps=i(3))),
        ("CFG", lambda f, i: rule_out(CFG(f(3.0)), f, i)),
        (
            "SEG",
            lambda f, i: rule_out(SEG(f(2.0), sigma=f(1.5), cfg_scale=f(3.0), radius=i(3)), f, i),
        ),
        (
            "SEG-paper",
            lambda f, i: rule_out(SEG(f(2.0), sigma=(f(1.0), f(0.5)), convention="paper"), f, i),
        ),
        ("PAG", lambda f, i: rule_out(PAG(f(2.0), cfg_scale=f(1.5)), f, i)),
        (
            "APG",
            lambda f, i: rule_out(
                APG(f(4.0), eta=f(0.5), norm_threshold=f(2.0), momentum=f(-0.5)), f, i
            ),
        ),
        ("Rescale", lambda f, i: rule_out(Compose(CFG(f(3.0)), Rescale(f(0.75))), f, i)),
        ("Constant", lambda f, i: schedule(Constant(f(0.5)), f, i)),
        ("Interval-sigma", lambda f, i: schedule(Interval(f(1.0), f(4.0)), f, i)),
        ("Interval-inf", lambda f, i: schedule(Interval(f(2.0), f(math.inf)), f, i)),
        (
            "Interval-progress",
            lambda f, i: schedule(Interval(f(0.25), f(0.75), on="progress"), f, i),
        ),
        ("LinearRamp", lambda f, i: schedule(LinearRamp(f(2.0), f(0.0), lo=f(0.25)), f, i)),
        (
            "CosineRamp",
            lambda f, i: schedule(
                CosineRamp(f(1.0), f(3.0), lo=f(1.0), hi=f(8.0), on="sigma"), f, i
            ),
        ),
        (
            "CFG-scheduled",
            lambda f, i: rule_out(CFG(f(3.0), schedule=Interval(f(1.0), f(2.0))), f, i),
        ),
        ("karras_sigmas", lambda f, i: karras_sigmas(i(4), f(0.5), f(8.0), rho=f(7.0))),
        (
            "sample_ddim",
            lambda f, i: sample_ddim(
                lambda x, s: x * 0.5,
                np.ones((1, 2)),
                [f(2.0), f(1.0), f(0.0)],
                eta=f(0.5),
                seed=i(3),
                progress=False if f is float else np.bool_(False),  # NumPy's bool too
            ),
        ),
    ]


NUMPY_KINDS = [
    pytest.param(np.float64, np.int64, id="float64-int64"),
    pytest.param(np.float32, np.int32, id="float32-int32"),
    pytest.param(np.float16, np.int16, id="float16-int16"),
    pytest.param(np.float32, np.uint8, id="float32-uint8"),
]


@failure_mode(
    "NumPy scalars (np.float16/32/64, np.int16/32/64, np.uint8, np.bool_) for every number of the "
    "public API: scales of energy and every rule, sigma and radius (core, torch, "
    "QuerySmoothing, SEG), grid sizes, schedule bounds, step contexts, sampler arguments",
    "accepted and stored as Python numbers: the same result, bit for bit, as the Python number",
)
@pytest.mark.parametrize(("fkind", "ikind"), NUMPY_KINDS)
@pytest.mark.parametrize(
    ("name", "call"), _scalar_cases(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_numpy_scalars_are_accepted_like_python_numbers(
    name: str, call: object, fkind: type, ikind: type
) -> None:
    reference = call(float, int)  # type: ignore[operator]
    _same(reference, call(lambda x: fkind(x), lambda n: ikind(n)))  # type: ignore[operator]


@failure_mode(
    "blur_matrix(..., xp=torch, dtype=torch.float32): the framework module itself as xp",
    "the same matrix as with xp=array_api_compat.torch (no AttributeError), also xp=numpy",
)
def test_blur_matrix_takes_the_framework_module_as_xp() -> None:
    import array_api_compat.numpy as cnp
    import array_api_compat.torch as ctorch

    from smoothguide import blur_matrix

    m = blur_matrix(5, 1.5, xp=torch, dtype=torch.float32)
    assert isinstance(m, torch.Tensor)
    assert torch.equal(m, blur_matrix(5, 1.5, xp=ctorch, dtype=torch.float32))
    assert torch.equal(
        m,
        torch.from_numpy(
            gaussian_filter1d(np.eye(5), 1.5, axis=0, mode="reflect", radius=official_radius(1.5))
        ).float(),
    )
    np.testing.assert_array_equal(
        blur_matrix(5, 1.5, xp=np, dtype=np.float32), blur_matrix(5, 1.5, xp=cnp, dtype=np.float32)
    )


# -- the tests-kernels runs really run the kernels they name ------------------------------------


@failure_mode(
    "the numerics tests run under ATEN_CPU_CAPABILITY=default / avx2 (nox -s tests-kernels)",
    "torch reports that capability, so the run exercises those kernels (not the CPU's best)",
)
@pytest.mark.numerics
def test_requested_cpu_capability_is_the_one_torch_uses() -> None:
    import os
    import subprocess
    import sys

    wanted = os.environ.get("ATEN_CPU_CAPABILITY")
    if wanted:  # inside a tests-kernels run: this process
        assert torch.backends.cpu.get_cpu_capability().lower() == wanted.lower()
    # and the mechanism itself, in a fresh interpreter
    code = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip().lower() == "default"


# -- a perturbation that changes nothing skips its branch ---------------------------------------


@failure_mode(
    "SEG whose kernel is a single tap (sigma <= 1/6 with the default radius, or radius=0), "
    "alone and with CFG, scalar and per-axis sigma",
    "neutral like sigma = 0: QuerySmoothing.is_identity, no blurred branch is evaluated (one "
    "forward of the batch), and the result equals the unguided / CFG prediction bit for bit",
)
@pytest.mark.parametrize(
    "kw",
    [
        {"sigma": 0.1},
        {"sigma": 0.16},
        {"sigma": 2.0, "radius": 0},
        {"sigma": (0.0, 0.15)},
        {"sigma": (0.1, 1.5), "radius": 0},
        {"sigma": (0.0, 0.1, 0.1)},
    ],
    ids=repr,
)
@pytest.mark.parametrize("cfg", [1.0, 4.0])
def test_single_tap_smoothing_is_neutral_and_skips_its_branch(kw: dict, cfg: float) -> None:
    import array_api_compat.numpy as xnp

    from smoothguide.perturbations import QuerySmoothing
    from smoothguide.rules import CFG, SEG, StepContext
    from smoothguide.sampling import GuidedDenoiser
    from toy_model import ToyAttentionDenoiser

    p = QuerySmoothing(kw["sigma"], radius=kw.get("radius"))
    assert p.is_identity
    # Independent check that it is an identity: SciPy's filter with that kernel.
    q = np.random.default_rng(1).normal(size=(20, 3))
    sig = kw["sigma"] if isinstance(kw["sigma"], tuple) else (kw["sigma"], kw["sigma"])
    r = kw.get("radius")
    ref = q.reshape(4, 5, 3)
    for axis, s in zip((0, 1), sig[-2:], strict=True):
        if s:
            ref = gaussian_filter1d(
                ref, s, axis=axis, radius=official_radius(s) if r is None else r
            )
    np.testing.assert_array_equal(ref.reshape(20, 3), q)

    b, labels, null = 2, np.array([0, 2]), np.array([3])
    model = ToyAttentionDenoiser(xnp, 4, 5, seed=0)
    x = np.random.default_rng(2).normal(size=(b, 2, 4, 5))
    expected = GuidedDenoiser(model, CFG(cfg), uncond={"class_labels": null})(
        x, 1.0, class_labels=labels
    )
    model.calls.clear()
    rule = SEG(3.0, cfg_scale=cfg, **kw)
    assert rule.branches(StepContext(1.0)) == CFG(cfg).branches(StepContext(1.0))
    out = GuidedDenoiser(model, rule, uncond={"class_labels": null})(x, 1.0, class_labels=labels)
    assert model.calls == [b if cfg == 1.0 else 2 * b]  # no blurred rows at all
    np.testing.assert_array_equal(out, expected)


def test_two_taps_are_not_neutral() -> None:
    """The boundary: sigma just above 1/6 has radius 1 and is a real perturbation."""
    from smoothguide.perturbations import QuerySmoothing

    assert not QuerySmoothing(0.17).is_identity
    assert not QuerySmoothing(0.1, radius=1).is_identity
    assert not QuerySmoothing(math.inf, radius=0).is_identity  # the mean ignores radius
    assert not QuerySmoothing((0.1, 0.5)).is_identity


# -- Interval(on="diffusers") is diffusers' guider start / stop exactly ----------------------------


@failure_mode(
    "Interval on diffusers' guider start / stop convention, for N = 1..30 steps and "
    "many start / stop values (including 0, 1 and values whose products round)",
    "Interval(start, stop, on='diffusers') is on exactly at the steps where diffusers' own "
    "ClassifierFreeGuidance(start=, stop=) enables CFG "
    "(int(start N) <= step < int(stop N)); CFG with that schedule needs the same branches",
)
def test_diffusers_interval_matches_the_diffusers_guider() -> None:
    guiders = pytest.importorskip("diffusers.guiders")
    from smoothguide.rules import CFG, Interval, StepContext

    values = [0.0, 0.1, 0.25, 1 / 3, 0.5, 0.7, 0.9, 1.0]
    checked = differs = 0
    for start in values[:-1]:  # diffusers: 0 <= start < 1, start <= stop <= 1
        for stop in [v for v in values if v >= start]:
            guider = guiders.ClassifierFreeGuidance(guidance_scale=5.0, start=start, stop=stop)
            ours = Interval(start, stop, on="diffusers")
            progress = Interval(start, stop, on="progress")
            rule = CFG(5.0, schedule=ours)
            for n in range(1, 31):
                for step in range(n):
                    guider.set_state(step, n, None)
                    ctx = StepContext(1.0, step=step, num_steps=n)
                    enabled = guider._is_cfg_enabled()
                    assert (ours(ctx) == 1.0) == enabled, (start, stop, n, step)
                    if step < 2 or step == n - 1:  # the rule sees the same (cheaper: a few)
                        assert len(rule.branches(ctx)) == guider.num_conditions
                    differs += (progress(ctx) == 1.0) != enabled
                    checked += 1
    assert checked > 10_000
    assert differs > 0  # the closed progress interval is another convention


def test_progress_and_diffusers_conventions_differ_as_documented() -> None:
    """N = 25, stop = 0.5: diffusers guides steps 0..11 (12), the closed progress one 0..12."""
    from smoothguide.rules import Interval, StepContext

    ctxs = [StepContext(1.0, step=i, num_steps=25) for i in range(25)]
    assert sum(Interval(0.0, 0.5, on="diffusers")(c) for c in ctxs) == 12
    assert sum(Interval(0.0, 0.5, on="progress")(c) for c in ctxs) == 13
    with pytest.raises(ValueError, match="on='diffusers' needs the step index"):
        Interval(0.0, 0.5, on="diffusers")(StepContext(1.0))
    with pytest.raises(ValueError, match="hi must be <= 1"):
        Interval(0.0, 1.5, on="diffusers")
    with pytest.raises(ValueError, match="on must be one of"):
        Interval(0.0, 0.5, on="steps")  # type: ignore[arg-type]


# -- constructors refuse what could only fail later, inside the model -----------------------------


def _bad_constructions() -> list[object]:
    from smoothguide.perturbations import QuerySmoothing
    from smoothguide.rules import APG, PAG, SEG, CosineRamp, Interval, LinearRamp, Rescale

    nan = math.nan
    cases = [
        ("QuerySmoothing", lambda: QuerySmoothing(-1.0), "sigma"),
        ("QuerySmoothing", lambda: QuerySmoothing(nan), "sigma"),
        ("QuerySmoothing", lambda: QuerySmoothing((1.0, -2.0)), r"sigma\[1\]"),
        ("QuerySmoothing", lambda: QuerySmoothing(1e300), "sigma"),
        ("QuerySmoothing", lambda: QuerySmoothing((2.0, 1e300)), "sigma"),
        ("QuerySmoothing", lambda: QuerySmoothing(1.0, radius=-1), "radius"),
        ("QuerySmoothing", lambda: QuerySmoothing(1.0, radius=2.5), "radius"),
        ("QuerySmoothing", lambda: QuerySmoothing(1.0, radius=nan), "radius"),  # type: ignore[arg-type]
        ("QuerySmoothing", lambda: QuerySmoothing(1.0, radius=True), "radius"),
        ("QuerySmoothing", lambda: QuerySmoothing(1.0, radius=2**40), "radius"),
        ("QuerySmoothing", lambda: QuerySmoothing(1.0, mode="edge"), "mode"),  # type: ignore[arg-type]
        ("SEG", lambda: SEG(3.0, sigma=1e300), "sigma"),
        ("SEG", lambda: SEG(3.0, sigma=-1.0), "sigma"),
        ("SEG", lambda: SEG(3.0, sigma=2.0, radius=-3), "radius"),
        ("SEG", lambda: SEG(3.0, sigma=2.0, radius=1.5), "radius"),  # type: ignore[arg-type]
        ("SEG", lambda: SEG(nan), "scale"),
        ("PAG", lambda: PAG(-1.0), "scale"),
        ("PAG", lambda: PAG(1.0, cfg_scale=math.inf), "cfg_scale"),
        ("APG", lambda: APG(2.0, eta=nan), "eta"),
        ("APG", lambda: APG(2.0, momentum=1.0), "momentum"),
        ("APG", lambda: APG(2.0, norm_threshold=-1.0), "norm_threshold"),
        ("Rescale", lambda: Rescale(1.5), "phi"),
        ("Rescale", lambda: Rescale(nan), "phi"),
        ("Interval", lambda: Interval(4.0, 1.0), "lo"),
        ("Interval", lambda: Interval(nan, 1.0), "lo"),
        ("Interval", lambda: Interval(0.0, 1.5, on="progress"), "hi"),
        ("Interval", lambda: Interval(0.0, 1.5, on="diffusers"), "hi"),
        ("LinearRamp", lambda: LinearRamp(nan, 1.0), "start"),
        ("LinearRamp", lambda: LinearRamp(1.0, 0.0, lo=0.5, hi=0.5), "lo"),
        ("CosineRamp", lambda: CosineRamp(1.0, 0.0, lo=0.0, hi=math.inf, on="sigma"), "hi"),
    ]
    return [pytest.param(f, name, id=f"{cls}-{i}") for i, (cls, f, name) in enumerate(cases)]


@failure_mode(
    "constructing QuerySmoothing / SEG with a sigma or radius that can never build a kernel "
    "(negative, NaN, non-integer, bool or too large radius, sigma too wide for any kernel), "
    "and PAG, APG, Rescale, Interval and ramps with impossible values",
    "ValueError / TypeError at construction naming the argument (not later, inside the model)",
)
@pytest.mark.parametrize(("make", "name"), _bad_constructions())
def test_constructors_refuse_values_that_can_never_work(make: object, name: str) -> None:
    with pytest.raises((ValueError, TypeError), match=name):
        make()  # type: ignore[operator]
