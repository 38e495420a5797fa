"""Markdown report: every number comes from the results objects of one run."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .guided_step import CFG_SCALE, SEG_SCALE, SEG_SIGMA, GuidedStepResults
from .memory import MEMORY_SIGMA, MemoryResults
from .methods import METHODS
from .scaling import SCALING_METHODS, ScalingResults
from .smoothing import Row, goal_rows

__all__ = ["Goal", "RunInfo", "goals", "render"]


@dataclass
class RunInfo:
    """How the run was made: command, variant, machine, wall time, figures."""

    command: str
    variant: str
    machine: dict[str, Any]
    wall_s: float
    load_end: tuple[float, float, float] | None
    figures: dict[str, Path] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    section_s: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Goal:
    """One target of issue 8 and what this run measured."""

    name: str
    target: str
    measured: float | None
    shown: str
    met: bool | None


# -- formatting -----------------------------------------------------------------------------


def ms(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    v = seconds * 1e3
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


def times_x(v: float | None, digits: int = 3) -> str:
    return "—" if v is None else f"{v:.{digits}g}×"


def pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.3g} %"


def sci(v: float | str | None) -> str:
    if v is None:
        return "—"
    if isinstance(v, str):
        return v
    return "0" if v == 0 else f"{v:.1e}"


def _mib(nbytes: float) -> str:
    v = nbytes / 2**20
    return f"{v:.2g}" if v < 10 else f"{v:,.0f}"


def sigma_str(s: float) -> str:
    return "∞" if math.isinf(s) else f"{s:g}"


def shape_str(row: Row) -> str:
    c = row.case
    return f"({c.batch}, {c.heads}, {c.height}·{c.width}, {c.dim})"


def table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


# -- goals ----------------------------------------------------------------------------------


def goals(smoothing: list[Row] | None, step: GuidedStepResults | None) -> list[Goal]:
    """The issue's goals with this run's numbers (``met=None``: not measured)."""
    out: list[Goal] = []
    shape = "(2, 10, 64·64, 64)"
    if smoothing is not None:
        g = goal_rows(smoothing)
        r10, rinf = g.get("10"), g.get("inf")
        speed = None if r10 is None else r10.ratio("official", "ours")
        frac = None if r10 is None else r10.ratio("ours", "sdpa")
        clone10 = None if r10 is None else r10.ratio("ours", "clone")
        cl = None if rinf is None else rinf.ratio("ours", "clone")
        out += [
            Goal(
                f"{shape}, σ = 10: official conv / ours",
                "≥ 50×",
                speed,
                times_x(speed),
                None if speed is None else speed >= 50,
            ),
            Goal(
                f"{shape}, σ = 10: ours / SDPA",
                "≤ 3 %",
                frac,
                pct(frac),
                None if frac is None else frac <= 0.03,
            ),
            Goal(
                f"{shape}, σ = 10: ours / clone",
                "report (compute-bound)",
                clone10,
                times_x(clone10),
                None,
            ),
            Goal(
                f"{shape}, σ = ∞: ours / clone",
                "≤ 3×",
                cl,
                times_x(cl),
                None if cl is None else cl <= 3,
            ),
        ]
    if step is not None:
        for model in step.models:
            cb = step.ratio(model, "c", "b")
            ea = step.ratio(model, "e", "a")
            c3 = step.ratio(model, "c", "r3")
            e2 = step.ratio(model, "e", "r2")
            out += [
                Goal(
                    f"{model}: (c) CFG+SEG batched / (b) CFG",
                    "≤ 1.55",
                    cb,
                    "—" if cb is None else f"{cb:.3f}",
                    None if cb is None else cb <= 1.55,
                ),
                Goal(
                    f"{model}: (e) SEG alone / (a) no guidance",
                    "≤ 2.05",
                    ea,
                    "—" if ea is None else f"{ea:.3f}",
                    None if ea is None else ea <= 2.05,
                ),
                Goal(
                    f"{model}: SEG machinery, (c) / plain 3B rows; (e) / plain 2B rows",
                    "report",
                    c3,
                    ("—" if c3 is None else f"{c3:.3f}")
                    + "; "
                    + ("—" if e2 is None else f"{e2:.3f}"),
                    None,
                ),
            ]
    return out


def _met(g: Goal) -> str:
    return {True: "**met**", False: "**not met**", None: "—"}[g.met]


# -- sections -------------------------------------------------------------------------------


def _machine(info: RunInfo) -> str:
    rows = [
        [k, f"`{v}`" if k in ("executable", "environment") else str(v)]
        for k, v in info.machine.items()
    ]
    if info.load_end is not None:
        rows.append(
            ["load average at end (1/5/15 min)", " / ".join(f"{x:.2f}" for x in info.load_end)]
        )
    sections = ", ".join(f"{k} {v:.0f} s" for k, v in info.section_s.items())
    rows.append(["wall time of the run", f"{info.wall_s:.0f} s ({sections})"])
    return table(["", ""], rows)


def _reading(rows: list[Row]) -> str:
    """How to read the goal-shape numbers, with this run's values filled in."""
    g = goal_rows(rows)
    r10, rinf = g.get("10"), g.get("inf")
    if r10 is None or r10.median("ours") is None:
        return ""
    c = r10.case
    t = r10.median("ours")
    assert t is not None
    flops = 2 * (c.height + c.width) * c.batch * c.heads * c.tokens * c.dim
    k = 2 * c.official_radius() + 1
    text = [
        f"Reading the goal shape ({c.batch}, {c.heads}, {c.height}·{c.width}, {c.dim}): at σ = 10 "
        f"the fast path blurs each axis with a dense {c.height} × {c.height} (and "
        f"{c.width} × {c.width}) matrix, 2·(H + W) = {2 * (c.height + c.width)} flops per "
        f"element, {flops / 1e9:.2f} GFLOP in {1e3 * t:.1f} ms ({flops / t / 1e9:.0f} GFLOP/s); "
        f"the official code convolves with a {k} × {k} kernel, {2 * k * k} flops per element "
        f"({2 * k * k / (2 * (c.height + c.width)):.0f}× more arithmetic). q.clone() does no "
        f"arithmetic and moves {2 * 4 * c.batch * c.heads * c.tokens * c.dim / 2**20:.0f} MiB, "
        f"so ours / clone = {times_x(r10.ratio('ours', 'clone'))} at σ = 10 is the price of the "
        "arithmetic (exact Gaussian smoothing is compute-bound), not of extra memory traffic. "
        "SDPA costs ∝ tokens² · dim, the blur ∝ tokens · (H + W) · dim, so the blur's share "
        "shrinks as grids grow (compare the 32·32 rows, where tokens² is small)."
    ]
    if rinf is not None and rinf.median("ours") is not None:
        text.append(
            f" At σ = ∞ the blur is a mean over the grid: ours / clone = "
            f"{times_x(rinf.ratio('ours', 'clone'))}."
        )
    return "".join(text)


def _smoothing(rows: list[Row]) -> str:
    labels = {m.key: m.label for m in METHODS}
    parts = [
        "Queries are float32 `(batch, heads, tokens, dim)` from `torch.randn` (seed 0). Methods:",
        "",
    ]
    parts += [f"- **{k}**: {v}" for k, v in labels.items()]
    parts += [
        "",
        "smoothguide and SciPy get the contiguous tensor / array; the official code gets the "
        "same values in the layout its `view` needs (diffusers' transposed `to_q` output). "
        "Each cell is the median of the timed repeats in milliseconds; the methods of one row "
        "are timed in interleaved rounds, so load drift hits them alike. SDPA and clone do not "
        "depend on σ and are timed once per shape.",
        "",
    ]
    keys = ["ours", "portable_torch", "portable_numpy", "official", "scipy", "sdpa", "clone"]
    header = ["shape", "σ", *keys, "repeats (ours / official)"]
    trows = []
    notes: dict[str, str] = {}
    for r in rows:
        cells = [shape_str(r), sigma_str(r.case.sigma)]
        for k in keys:
            key = r.official_key if k == "official" else k
            t = r.times.get(key)
            cell = ms(None if t is None else t.median)
            if k == "official" and key == "official_hw" and t is not None:
                cell += " †"
                notes["†"] = (
                    "† non-square grid: the official code cannot run it ("
                    + r.skipped.get("official", "isqrt/view fails")
                    + "); the cell times the official-style conv2d on the true H × W grid, "
                    "kernel clamped to the shorter side (`official_style_blur` in "
                    "`benchmarks/official.py`)."
                )
            cells.append(cell)
        ours_t, off_t = r.times.get("ours"), r.times.get(r.official_key)
        cells.append(f"{ours_t.n if ours_t else 0} / {off_t.n if off_t else 0}")
        trows.append(cells)
    parts.append("### Median times [ms]\n")
    parts.append(table(header, trows))
    if notes:
        parts += ["", *notes.values()]
    parts.append("\n### Ratios\n")
    parts.append(
        "official / ours: how many times faster the fast path is than the official conv "
        "(† as above). ours / SDPA: the blur's cost relative to the attention call it is added "
        "to. ours / clone: relative to reading and writing the queries once. GFLOP/s: the fast "
        "path's dense per-axis matmuls do 2·(H + W) flops per element.\n"
    )
    rrows = []
    for r in rows:
        c = r.case
        t = r.median("ours")
        gflops = (
            None
            if t is None or math.isinf(c.sigma)
            else 2 * (c.height + c.width) * c.batch * c.heads * c.tokens * c.dim / t / 1e9
        )
        off = r.ratio(r.official_key, "ours")
        rrows.append(
            [
                shape_str(r),
                sigma_str(c.sigma),
                times_x(off) + (" †" if r.official_key == "official_hw" and off else ""),
                times_x(r.ratio("ours", "scipy")),
                pct(r.ratio("ours", "sdpa")),
                times_x(r.ratio("ours", "clone")),
                times_x(r.ratio("portable_torch", "ours")),
                times_x(r.ratio("portable_numpy", "ours")),
                "—" if gflops is None else f"{gflops:.1f}",
            ]
        )
    parts.append(
        table(
            [
                "shape",
                "σ",
                "official / ours",
                "ours / scipy",
                "ours / SDPA",
                "ours / clone",
                "portable torch / ours",
                "portable NumPy / ours",
                "ours GFLOP/s",
            ],
            rrows,
        )
    )
    parts.append("\n### Max abs differences (float32 outputs)\n")
    parts.append(
        'ours vs scipy: both `mode="reflect"`, radius = `default_radius(σ)`. '
        'mirror vs official: the fast path with `mode="mirror"` (torch\'s `F.pad` reflect) and '
        "the official kernel's radius vs the official blur († its H × W generalisation); "
        "where the official code clamps the kernel to the grid (marked ‡) the fast path is "
        "given the clamped radius, so the two compute the same operator. σ = ∞: both are the "
        "mean query.\n"
    )
    drows = []
    for r in rows:
        c = r.case
        clamp = (not math.isinf(c.sigma)) and c.official_clamped()
        mirror = sci(r.diffs.get("mirror_vs_official"))
        if clamp:
            mirror += f" ‡ (k = {2 * c.official_radius() + 1})"
        if r.official_key == "official_hw":
            mirror += " †"
        drows.append(
            [
                shape_str(r),
                sigma_str(c.sigma),
                sci(r.diffs.get("ours_vs_scipy")),
                mirror,
                sci(r.diffs.get("portable_torch_vs_ours")),
                sci(r.diffs.get("portable_numpy_vs_ours")),
            ]
        )
    parts.append(
        table(
            [
                "shape",
                "σ",
                "ours vs scipy",
                "mirror vs official",
                "portable torch vs ours",
                "portable NumPy vs ours",
            ],
            drows,
        )
    )
    skipped = sorted(
        {f"- {k}: {v}" for r in rows for k, v in r.skipped.items() if k != "official_hw"}
    )
    if skipped:
        parts += ["\nNot run:\n", *skipped]
    return "\n".join(parts)


def _step(res: GuidedStepResults) -> str:
    parts = [
        f"One Euler step `x + (x − D(x, σ)) / σ · (σ_next − σ)` at σ = 1, through the public "
        f"`smoothguide.sampling.GuidedDenoiser` with CFG w = {CFG_SCALE:g}, SEG s = {SEG_SCALE:g}, "
        f"σ_blur = {SEG_SIGMA:g} (official convention). Variants of one model are timed in "
        "interleaved rounds; medians in milliseconds. `calls`: model forwards per step; `rows`: "
        "batch rows through the model; `blurred`: rows under a SEG perturbation.\n",
    ]
    for model, desc in res.models.items():
        parts.append(f"### {model}\n\n{desc}.\n")
        base = res.median(model, "a")
        rows = []
        for r in res.timed:
            if r.model != model:
                continue
            t = None if r.timing is None else r.timing.median
            rows.append(
                [
                    r.label,
                    ms(t),
                    "—" if t is None or base is None else f"{t / base:.2f}",
                    str(r.calls),
                    f"{r.rows} ({r.rows // r.batch}B)",
                    str(r.blurred_rows),
                    str(0 if r.timing is None else r.timing.n),
                ]
            )
        parts.append(
            table(["variant", "median ms", "× (a)", "calls", "rows", "blurred", "repeats"], rows)
        )

        def rat(num: str, den: str, model: str = model) -> str:
            v = res.ratio(model, num, den)
            return "—" if v is None else f"{v:.3f}"

        parts.append(
            f"\n(c)/(b) = {rat('c', 'b')} (goal ≤ 1.55; 3 branches vs 2 is a FLOP ratio of 1.5), "
            f"(e)/(a) = {rat('e', 'a')} (goal ≤ 2.05), separate / batched (d)/(c) = "
            f"{rat('d', 'c')}. The model alone on 3B vs 2B rows, (r3)/(r2) = {rat('r3', 'r2')}, "
            f"and on 2B vs B rows, (r2)/(a) = {rat('r2', 'a')}: how its time grows with the "
            "batch. The SEG machinery (hooks, row selection, blur) on top of that: (c)/(r3) = "
            f"{rat('c', 'r3')}, (e)/(r2) = {rat('e', 'r2')}.\n"
        )
    parts.append("### Neutral terms skip their branch (forward counts, one step)\n")
    rows = []
    for r in res.neutral:
        rows.append(
            [
                r.model,
                r.label,
                str(r.calls),
                f"{r.rows} ({r.rows // r.batch}B)",
                str(r.blurred_rows),
            ]
        )
    parts.append(table(["model", "rule", "calls", "rows", "blurred rows"], rows))
    return "\n".join(parts)


def _memory(res: MemoryResults, figure: Path | None) -> str:
    parts = [
        f"Peak memory of one smoothing call (σ = {MEMORY_SIGMA:g}, queries `(1, tokens, dim)` "
        "float32), above what was in use before the call, blur-matrix caches cleared first. "
        "NumPy: `tracemalloc`; torch: the profiler's allocator events. `dense tokens²`: the size "
        "of a dense float32 tokens × tokens blur operator, for scale.\n",
    ]
    rows = []
    for p in res.points:
        base = p.input_bytes + 8 * p.matrix_entries
        rows.append(
            [
                f"{p.height}×{p.width}",
                str(p.dim),
                f"{p.input_bytes / 1024:.0f}",
                f"{p.matrix_entries:,}",
                f"{p.numpy_peak / 1024:.0f}",
                "—" if p.torch_peak is None else f"{p.torch_peak / 1024:.0f}",
                f"{p.numpy_peak / base:.2f}",
                "—" if p.torch_peak is None else f"{p.torch_peak / base:.2f}",
                _mib(4 * p.tokens**2),
            ]
        )
    parts.append(
        table(
            [
                "grid",
                "dim",
                "input KiB",
                "H² + W²",
                "NumPy peak KiB",
                "torch peak KiB",
                "NumPy peak / (input + 8(H²+W²))",
                "torch peak / (input + 8(H²+W²))",
                "dense tokens² MiB",
            ],
            rows,
        )
    )
    parts.append("\nRelative least-squares fits (coefficients in bytes):\n")
    frows = []
    for name, f in res.fits.items():
        coef = dict(zip(f.columns, f.coef, strict=True))
        frows.append(
            [
                name.replace("+tokens2", " + tokens² column"),
                f"{coef['input_bytes']:.2f}",
                f"{coef['H^2+W^2']:.2f}",
                f"{coef['1'] / 1024:.0f} KiB",
                f"{coef['tokens^2']:.1e}" if "tokens^2" in coef else "—",
                f"{100 * f.max_rel_residual:.0f} %",
            ]
        )
    parts.append(
        table(
            [
                "peak",
                "× input bytes",
                "bytes per H²+W² entry",
                "constant",
                "bytes per tokens² entry",
                "max rel. residual",
            ],
            frows,
        )
    )
    parts.append(
        "\nThe peak is a small multiple of the input plus the two per-axis matrices; the "
        "tokens² coefficient is ~0 bytes per entry (a dense operator needs 4). The residual "
        "is not noise but the model's simplicity: a peak is the maximum over phases of a "
        "call (matrix build, first axis, second axis), not a sum."
    )
    if figure is not None:
        parts.append(f"\n![memory]({figure.as_posix()})")
    return "\n".join(parts)


def _scaling(res: ScalingResults, figure: Path | None) -> str:
    b, h = res.lead
    parts = [
        f"Square grids, queries `({b}, {h}, side², {res.dim})` float32; median ms.\n",
    ]
    keys = list(SCALING_METHODS)
    rows = []
    for sigma in res.sigmas:
        for n in res.sides:
            t = res.times.get((sigma, n), {})
            ours = t.get("ours")
            off = t.get("official")
            rows.append(
                [
                    sigma_str(sigma),
                    f"{n}×{n}",
                    *[ms(t[k].median) if k in t else "—" for k in keys],
                    "—" if ours is None or off is None else times_x(off.median / ours.median),
                ]
            )
    parts.append(
        table(["σ", "grid", *[SCALING_METHODS[k][0] for k in keys], "official / ours"], rows)
    )
    if figure is not None:
        parts.append(f"\n![scaling]({figure.as_posix()})")
    return "\n".join(parts)


def render(
    info: RunInfo,
    *,
    smoothing: list[Row] | None,
    step: GuidedStepResults | None,
    memory: MemoryResults | None,
    scaling: ScalingResults | None,
    readme_dir: Path,
    fork: Any = None,
) -> str:
    """The full ``benchmarks/README.md`` text."""

    def rel(key: str) -> Path | None:
        p = info.figures.get(key)
        if p is None:
            return None
        try:
            return p.resolve().relative_to(readme_dir.resolve())
        except ValueError:
            return p

    parts = [
        "# smoothguide benchmarks",
        "",
        "<!-- Generated by `python -m benchmarks`; do not edit by hand: every number below "
        "comes from the run described here. -->",
        "",
        f"Regenerate with:\n\n```\n{info.command}\n```\n",
        f"Variant: **{info.variant}** (`--quick` is the default, `--full` repeats more and uses "
        "larger step batches and scaling shapes). Goals and shapes: issue 8.",
        "",
    ]
    parts += [*(f"> **Note.** {n}" for n in info.notes)]
    parts += ["", "## Machine", "", _machine(info), ""]
    gl = goals(smoothing, step)
    if gl:
        parts += ["## Goals", ""]
        parts.append(
            table(
                ["goal", "target", "measured", "status"],
                [[g.name, g.target, g.shown, _met(g)] for g in gl],
            )
        )
        parts.append("")
        if smoothing is not None:
            parts += [_reading(smoothing), ""]
    if smoothing is not None:
        parts += ["## 1. Query smoothing", "", _smoothing(smoothing), ""]
    if step is not None:
        parts += ["## 2. Guided-step overhead", "", _step(step), ""]
    if memory is not None:
        parts += ["## 3. Peak memory", "", _memory(memory, rel("memory")), ""]
    if scaling is not None:
        parts += ["## 4. Scaling with the grid", "", _scaling(scaling, rel("scaling")), ""]
    if fork is not None:
        from .fork import render_fork

        parts += [
            FORK_BEGIN,
            "## 5. Fork mode",
            "",
            render_fork(fork),
            "",
            *(f"> **Note.** {n}\n" for n in info.notes),
            f"Command: `{info.command}` ({info.machine.get('date (UTC)', '')} UTC, "
            f"{info.machine.get('CPU', 'CPU')}, {info.machine.get('logical cores', '?')} "
            "logical cores).",
            FORK_END,
            "",
        ]
    parts += [HAND_BEGIN, HAND_END, "", GPU_SECTION, ""]
    return "\n".join(parts).rstrip() + "\n"


#: Hand-measured sections (the study throughput, issue 15) sit between these markers;
#: ``keep_hand_sections`` carries them over when the report is regenerated.
HAND_BEGIN, HAND_END = "<!-- hand:begin -->", "<!-- hand:end -->"


def keep_hand_sections(old: str, new: str) -> str:
    """``new`` report with the hand-written block of ``old`` (if any) in place of its own."""
    if not (HAND_BEGIN in old and HAND_END in old and HAND_BEGIN in new):
        return new
    a, b = old.index(HAND_BEGIN), old.index(HAND_END) + len(HAND_END)
    c, d = new.index(HAND_BEGIN), new.index(HAND_END) + len(HAND_END)
    return new[:c] + old[a:b] + new[d:]


FORK_BEGIN, FORK_END = "<!-- fork:begin -->", "<!-- fork:end -->"


def splice_fork(old: str, new: str) -> str:
    """``old`` report with its fork section replaced by (or appended from) the one in ``new``."""
    start, stop = new.index(FORK_BEGIN), new.index(FORK_END) + len(FORK_END)
    section = new[start:stop]
    if FORK_BEGIN in old and FORK_END in old:
        a, b = old.index(FORK_BEGIN), old.index(FORK_END) + len(FORK_END)
        return old[:a] + section + old[b:]
    return old.rstrip() + "\n\n" + section + "\n"


#: Not produced by a run: what a GPU session runs (benchmarks/gpu_backends.py, issue 14).
GPU_SECTION = """## 7. GPU: not yet measured on a GPU

No GPU was available to these runs. `benchmarks/gpu_backends.py` is the prepared check
(about 2-4 minutes on one CUDA device): SEG and PAG on one attention layer under torch's
flash / efficient / cuDNN / math SDPA kernels and every usable diffusers backend (native,
cuDNN, flash, flex, sage, xformers, ...) against the float32 math reference; the blur
share of an attention call and the SEG layer ratio at SDXL-mid, SD3.5 and Flux shapes at
1024² in bf16; the SEG step ratio of a real-width Flux transformer (2 + 2 blocks), eager
and with `compilable` + `compile_repeated_blocks`, with the graph count before and after a
σ sweep. Run `HF_HUB_OFFLINE=1 python benchmarks/gpu_backends.py` and paste its tables
here (`--device cpu --tiny` is a smoke test)."""
