"""The ``smoothguide`` command: ``demo``, ``energy`` and ``train-demo``."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _energy(args: argparse.Namespace) -> int:
    from .energy_report import energy_report

    print(
        energy_report(
            height=args.height,
            width=args.width,
            dim=args.dim,
            seed=args.seed,
            sigmas=args.sigmas,
            mode=args.mode,
        )
    )
    return 0


def _demo(args: argparse.Namespace) -> int:
    try:
        from .demo import run_demo
    except ImportError as exc:  # pragma: no cover - depends on the environment
        print(
            f"smoothguide demo needs the demo extra: pip install 'smoothguide[demo]' ({exc})",
            file=sys.stderr,
        )
        return 2
    run_demo(
        out=args.out,
        quick=args.quick,
        device=args.device,
        progress=not args.no_progress,
        seed=args.seed,
    )
    return 0


def _train_demo(args: argparse.Namespace, rest: list[str]) -> int:
    from .demo.train import main as train_main

    return int(train_main(rest) or 0)


def _sigma(text: str) -> float:
    value = float(text)
    if math.isnan(value) or value < 0:
        raise argparse.ArgumentTypeError(f"sigma must be >= 0 or inf, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``smoothguide`` command."""
    parser = argparse.ArgumentParser(
        prog="smoothguide",
        description="Smoothed Energy Guidance for diffusion models.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo", help="guide the embedded digit model with SEG, CFG, PAG; write pictures and metrics"
    )
    demo.add_argument("--out", default="smoothguide-demo", help="output folder")
    demo.add_argument("--quick", action="store_true", help="fewer samples and steps (CI smoke run)")
    demo.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")
    demo.set_defaults(func=_demo)

    energy = sub.add_parser(
        "energy",
        help="how query blur changes the attention energy, "
        "variance and curvature of random queries",
    )
    energy.add_argument("--height", type=int, default=12)
    energy.add_argument("--width", type=int, default=16)
    energy.add_argument("--dim", type=int, default=16)
    energy.add_argument("--seed", type=int, default=0)
    energy.add_argument(
        "--mode", default="reflect", choices=["reflect", "mirror", "nearest", "wrap"]
    )
    energy.add_argument("--sigmas", type=_sigma, nargs="+", default=[0, 0.5, 1, 2, 5, 10, math.inf])
    energy.set_defaults(func=_energy)

    train = sub.add_parser(
        "train-demo",
        help="train the embedded demo model (arguments go to python -m smoothguide.demo.train)",
        add_help=False,
    )
    train.set_defaults(func=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``smoothguide`` command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train-demo":
        return _train_demo(argparse.Namespace(), argv[1:])
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
