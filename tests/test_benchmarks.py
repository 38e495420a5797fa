"""Smoke tests of ``benchmarks/`` on tiny shapes: every code path runs, results are sane.

No timing assertions: the numbers of a tiny run mean nothing. What is asserted is
what must hold whatever the machine: the re-implemented official blur equals SciPy's
``mirror`` Gaussian, the benchmark's methods agree, forward counts match the rules'
branches, memory never approaches a dense tokens² operator, and the report is written.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ndimage = pytest.importorskip("scipy.ndimage")
pytest.importorskip("diffusers")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the benchmarks package lives at the repository root
    sys.path.insert(0, str(ROOT))

from benchmarks.__main__ import main, parse_args  # noqa: E402
from benchmarks.config import TINY  # noqa: E402
from benchmarks.guided_step import run_guided_step  # noqa: E402
from benchmarks.memory import fit, run_memory  # noqa: E402
from benchmarks.official import (  # noqa: E402
    diffusers_layout,
    official_blur,
    official_kernel_size,
    official_style_blur,
)
from benchmarks.smoothing import run_smoothing  # noqa: E402
from benchmarks.timing import measure, measure_interleaved  # noqa: E402

from tolerance import EPS32, assert_close, scaled_atol  # noqa: E402


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """One torch thread: tiny ops on a shared CPU stall on OpenMP barriers with more."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _scipy_mirror(q: torch.Tensor, h: int, w: int, sigma: float, radius: int) -> np.ndarray:
    b, heads, _, d = q.shape
    x = q.double().numpy().reshape(b, heads, h, w, d)
    out = ndimage.gaussian_filter(
        x, (0, 0, sigma, sigma, 0), mode="mirror", radius=(0, 0, radius, radius, 0)
    )
    return out.reshape(b, heads, h * w, d)


def test_official_kernel_size_matches_the_paper_digest() -> None:
    # PAPER.md §4: sigma 1 -> 7, 2 -> 13, 5 -> 31, 10 -> 61, clamped to 33 on a 32-wide grid.
    assert [official_kernel_size(s, 1000) for s in (1.0, 2.0, 5.0, 10.0)] == [7, 13, 31, 61]
    assert official_kernel_size(10.0, 32) == 33
    assert official_kernel_size(10.0, 31) == 31
    assert official_kernel_size(0.1, 64) == 1


@pytest.mark.parametrize(("side", "sigma"), [(8, 1.0), (9, 0.7), (8, 10.0)])
def test_official_blur_is_scipy_mirror_gaussian(side: int, sigma: float) -> None:
    q = torch.randn(2, 3, side * side, 4, dtype=torch.float64)
    out = official_blur(diffusers_layout(q), sigma)
    radius = official_kernel_size(sigma, side) // 2
    # The official code builds its taps in float32 (torch.linspace's default dtype).
    assert_close(out, _scipy_mirror(q, side, side, sigma, radius), eps=EPS32, magnitude=q)


def test_official_blur_infinite_sigma_is_the_mean_and_non_square_fails() -> None:
    q = torch.randn(1, 2, 36, 3, dtype=torch.float64)
    out = official_blur(diffusers_layout(q), math.inf)
    assert_close(out, q.mean(dim=2, keepdim=True).expand_as(q), magnitude=q)
    with pytest.raises(RuntimeError):
        official_blur(diffusers_layout(torch.randn(1, 2, 6 * 10, 3)), 1.0)


def test_official_style_blur_on_a_rectangle_is_scipy_mirror() -> None:
    q = torch.randn(1, 2, 6 * 10, 3, dtype=torch.float64)
    sigma = 10.0
    out = official_style_blur(diffusers_layout(q), 6, 10, sigma)
    radius = official_kernel_size(sigma, 6) // 2
    assert_close(out, _scipy_mirror(q, 6, 10, sigma, radius), eps=EPS32, magnitude=q)


def test_measure_counts_repeats_and_respects_budget() -> None:
    calls = []
    t = measure(lambda: calls.append(1), repeat=4, warmup=2)
    assert t.n == 4
    assert len(calls) == 6
    assert t.median >= 0
    ts = measure_interleaved(
        {"a": lambda: None, "b": lambda: None}, repeat=50, budget_s=0.0, min_repeat=2
    )
    assert {k: v.n for k, v in ts.items()} == {"a": 2, "b": 2}
    with pytest.raises(ValueError):
        measure(lambda: None, repeat=0)


def test_smoothing_section_runs_every_method_and_methods_agree() -> None:
    rows = run_smoothing(TINY, progress=False)
    assert len(rows) == len(TINY.shapes) * len(TINY.sigmas)
    for row in rows:
        for key in ("ours", "portable_torch", "portable_numpy", "sdpa", "clone"):
            assert row.times[key].n >= 1
        assert row.official_key in row.times
        if not row.case.square:
            assert "isqrt" in row.skipped["official"]
        # float32 outputs of different kernels: rounding relative to the queries' scale.
        bound = scaled_atol(row.case.q, eps=EPS32, ops=64)
        for name, diff in row.diffs.items():
            assert diff <= bound, (row.case, name, diff, bound)
        assert ("ours_vs_scipy" in row.diffs) == (not math.isinf(row.case.sigma))


def test_guided_step_forward_counts_follow_the_rules() -> None:
    res = run_guided_step(TINY, progress=False)
    assert set(res.models) == {"demo DiT", "tiny UNet"}
    expected = {  # variant: (calls, rows, blurred rows) in units of the batch
        "a": (1, 1, 0),
        "b": (1, 2, 0),
        "c": (1, 3, 1),
        "d": (3, 3, 1),
        "e": (1, 2, 1),
        "r2": (1, 2, 0),
        "r3": (1, 3, 0),
        "n1": (1, 1, 0),
        "n2": (1, 2, 0),
        "n3": (1, 2, 0),
        "n4": (1, 1, 0),
        "n5": (1, 2, 1),
    }
    got = res.timed + res.neutral
    assert len(got) == 2 * len(expected)
    for r in got:
        calls, rows, blurred = expected[r.variant]
        assert (r.calls, r.rows, r.blurred_rows) == (calls, rows * r.batch, blurred * r.batch), r
    assert all(r.timing is not None and r.timing.n >= 1 for r in res.timed)


def test_memory_stays_far_below_a_dense_operator() -> None:
    res = run_memory(TINY, progress=False)
    for p in res.points:
        assert 0 < p.numpy_peak < 4 * p.tokens**2 or p.tokens < 300
        assert p.torch_peak is not None
        assert p.torch_peak > 0
    big = max(res.points, key=lambda p: p.tokens)  # 32 x 32, dim 1: tokens² = 1M entries
    assert big.numpy_peak < 0.1 * 4 * big.tokens**2
    assert big.torch_peak is not None
    assert big.torch_peak < 0.1 * 4 * big.tokens**2
    f = fit(res.points, "torch_peak", with_tokens2=False)
    assert f.columns == ("input_bytes", "H^2+W^2", "1")
    assert all(map(math.isfinite, f.coef))


def test_main_writes_the_report_and_figures(tmp_path: Path) -> None:
    out = tmp_path / "README.md"
    main(["--tiny", "--only", "smoothing,memory,scaling", "--out", str(out), "--no-progress"])
    text = out.read_text()
    assert "python -m benchmarks --tiny --only smoothing,memory,scaling" in text
    for heading in ("## Machine", "## Goals", "## 1. Query smoothing", "## 3. Peak memory"):
        assert heading in text
    assert "## 2. Guided-step overhead" not in text
    assert (tmp_path / "figures" / "scaling.png").stat().st_size > 0
    assert (tmp_path / "figures" / "memory.png").stat().st_size > 0
    assert "](figures/scaling.png)" in text


def test_parse_args_rejects_unknown_sections() -> None:
    assert parse_args([]).variant == "quick"
    assert parse_args(["--full"]).variant == "full"
    with pytest.raises(SystemExit):
        parse_args(["--only", "nope"])
    with pytest.raises(SystemExit):
        parse_args(["--quick", "--full"])


@pytest.mark.slow
def test_the_prepared_gpu_script_runs_its_cpu_smoke_test() -> None:
    # benchmarks/gpu_backends.py is what a lent GPU machine runs (issue 14); no test needs a
    # GPU, but its tiny CPU mode must keep working so that the one device run is not wasted.
    import os
    import re
    import subprocess

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_backends.py"), "--device", "cpu", "--tiny"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    # Each usable backend's SEG and PAG error against the float32 math reference of the same
    # perturbation is bf16-sized (eps_bf16 = 2**-8 relative, values O(1)); MATH always runs.
    rows = re.findall(
        r"^\| tiny \| (SDPA \S+|diffusers \S+) \| ([0-9.e+-]+) \| ([0-9.e+-]+) \|", out, re.M
    )
    names = [r[0] for r in rows]
    assert "SDPA MATH" in names, out
    assert "diffusers native" in names, out
    for name, seg, pag in rows:
        assert float(seg) < 0.05, (name, seg)
        assert float(pag) < 0.05, (name, pag)
    # A σ sweep of the compiled Flux step adds no graph.
    graphs = re.search(r"\| compile_repeated_blocks \|.*\| (\d+) → (\d+) \|", out)
    assert graphs is not None, out
    assert graphs[1] == graphs[2], graphs[0]
