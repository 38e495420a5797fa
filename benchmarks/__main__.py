"""``python -m benchmarks``: run the benchmarks and write ``benchmarks/README.md``.

Examples
--------
``python -m benchmarks`` (quick, a few minutes on 2 cores; writes benchmarks/README.md),
``python -m benchmarks --full``, ``python -m benchmarks --only smoothing --out /tmp/b.md``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

SECTIONS = ("smoothing", "step", "memory", "scaling", "fork")
HERE = Path(__file__).resolve().parent


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="smoothguide benchmarks: smoothing, guided-step overhead, memory, scaling.",
    )
    v = p.add_mutually_exclusive_group()
    v.add_argument(
        "--quick",
        dest="variant",
        action="store_const",
        const="quick",
        help="quick variant (default): a few minutes on 2 CPU cores",
    )
    v.add_argument(
        "--full",
        dest="variant",
        action="store_const",
        const="full",
        help="full variant: more repeats, larger step batches and scaling shapes",
    )
    v.add_argument(
        "--tiny",
        dest="variant",
        action="store_const",
        const="tiny",
        help="smoke-test shapes (seconds; the numbers mean nothing)",
    )
    p.set_defaults(variant="quick")
    p.add_argument(
        "--out",
        type=Path,
        default=HERE / "README.md",
        help="Markdown report to write (default: benchmarks/README.md)",
    )
    p.add_argument(
        "--figures",
        type=Path,
        default=None,
        help="folder for the plots (default: figures/ next to --out)",
    )
    p.add_argument(
        "--only",
        default=",".join(SECTIONS),
        help=f"comma-separated sections to run, of {', '.join(SECTIONS)} (default: all)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch.set_num_threads(N) before timing (default: torch's choice)",
    )
    p.add_argument(
        "--fork-repeat",
        type=int,
        default=None,
        help="timed repeats of the fork section's CPU wall time (0: FLOPs only; default: "
        "the variant's)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in only if s not in SECTIONS]
    if bad or not only:
        p.error(f"--only takes a comma-separated subset of {SECTIONS}, got {args.only!r}")
    args.only = only
    if args.fork_repeat is not None and args.fork_repeat < 0:
        p.error(f"--fork-repeat must be >= 0, got {args.fork_repeat}")
    if args.threads < 0:
        p.error(f"--threads must be >= 0, got {args.threads}")
    return args


def _command(argv: Sequence[str] | None) -> str:
    args = list(sys.argv[1:] if argv is None else argv)
    return "python -m benchmarks" + ("" if not args else " " + shlex.join(args))


def main(argv: Sequence[str] | None = None) -> Path:
    """Run the chosen sections and write the report; returns its path."""
    args = parse_args(argv)
    import torch

    from .config import VARIANTS
    from .machine import load_average, machine_info
    from .report import RunInfo, render

    if args.threads:
        torch.set_num_threads(args.threads)
    config = VARIANTS[args.variant]
    if args.fork_repeat is not None:
        import dataclasses

        config = dataclasses.replace(config, fork_repeat=args.fork_repeat)
    progress = not args.no_progress
    out: Path = args.out
    figures: Path = args.figures if args.figures is not None else out.parent / "figures"
    info = RunInfo(_command(argv), config.name, machine_info(), 0.0, None)
    cores = info.machine.get("cores usable by this process") or os.cpu_count() or 1
    load = load_average()
    if load is not None and load[0] > 0.75 * cores:
        info.notes.append(
            f"The 1-minute load average was {load[0]:.2f} on {cores} cores when the run started: "
            "other processes shared the CPU, so absolute times are inflated and noisy. Ratios "
            "come from interleaved timing rounds and suffer less, but treat them with care."
        )
    t0 = time.perf_counter()
    smoothing = step = memory = scaling = fork = None
    t = time.perf_counter()
    if "smoothing" in args.only:
        from .smoothing import run_smoothing

        smoothing = run_smoothing(config, progress=progress)
        info.section_s["smoothing"], t = time.perf_counter() - t, time.perf_counter()
    if "step" in args.only:
        from .guided_step import run_guided_step

        step = run_guided_step(config, progress=progress)
        info.section_s["step"], t = time.perf_counter() - t, time.perf_counter()
    if "memory" in args.only:
        from .memory import plot_memory, run_memory

        memory = run_memory(config, progress=progress)
        info.figures["memory"] = plot_memory(memory, figures / "memory.png")
        info.section_s["memory"], t = time.perf_counter() - t, time.perf_counter()
    if "scaling" in args.only:
        from .scaling import plot_scaling, run_scaling

        scaling = run_scaling(config, progress=progress)
        info.figures["scaling"] = plot_scaling(scaling, figures / "scaling.png")
        info.section_s["scaling"], t = time.perf_counter() - t, time.perf_counter()
    if "fork" in args.only:
        from .fork import run_fork

        fork = run_fork(config, progress=progress)
        info.section_s["fork"] = time.perf_counter() - t
    info.wall_s = time.perf_counter() - t0
    info.load_end = load_average()
    if info.load_end is not None and info.load_end[0] > 0.75 * cores and not info.notes:
        info.notes.append(
            f"The 1-minute load average reached {info.load_end[0]:.2f} on {cores} cores by the "
            "end of the run: other processes shared the CPU, so times are noisy."
        )
    text = render(
        info,
        smoothing=smoothing,
        step=step,
        memory=memory,
        scaling=scaling,
        fork=fork,
        readme_dir=out.parent,
    )
    if args.only == ["fork"] and out.exists():  # keep the other sections of the report
        from .report import splice_fork

        text = splice_fork(out.read_text(encoding="utf-8"), text)
    elif out.exists():  # hand-measured sections survive a regeneration
        from .report import keep_hand_sections

        text = keep_hand_sections(out.read_text(encoding="utf-8"), text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    if progress:
        print(f"wrote {out} ({info.wall_s:.0f} s)")
    return out


if __name__ == "__main__":
    main()
