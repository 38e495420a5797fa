"""The ``smoothguide`` command: ``demo``, ``energy`` and ``train-demo``."""

from __future__ import annotations

import argparse
import importlib
import math
import sys
from collections.abc import Sequence

__all__ = ["build_parser", "main"]

#: Subcommands implemented by the optional demo layer, with the module whose
#: ``main(argv)`` runs them (their options are documented by ``--help`` there).
DELEGATED = {
    "demo": "smoothguide.demo.run",
    "train-demo": "smoothguide.demo.train",
    "study": "smoothguide.study.cli",
}


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


def _delegate(module: str, rest: list[str]) -> int:
    """Run ``module.main(rest)`` from the optional demo layer, naming the extra if missing."""
    try:
        entry = importlib.import_module(module).main
    except ImportError as exc:  # pragma: no cover - depends on the environment
        from ._extras import MissingExtraError, install_hint

        # our own errors already say how to install the extra: print that once
        hint = "" if isinstance(exc, MissingExtraError) else f"; {install_hint('demo')}"
        print(f"this command needs the demo extra: {exc}{hint}", file=sys.stderr)
        return 2
    return int(entry(rest) or 0)


def _sigma(text: str) -> float:
    from .smoothing import default_radius

    try:
        value = float(text)
        if not math.isinf(value):
            default_radius(value)  # rejects NaN, negatives and kernels too wide to build
    except (ValueError, OverflowError) as exc:
        raise argparse.ArgumentTypeError(
            f"sigma must be a number >= 0 or inf with a buildable kernel, got {text} ({exc})"
        ) from None
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``smoothguide`` command.

    Returns
    -------
    argparse.ArgumentParser

    Examples
    --------
    >>> build_parser().parse_args(["energy", "--height", "4"]).height
    4
    """
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="smoothguide", description="Smoothed Energy Guidance for diffusion models."
    )
    parser.add_argument("--version", action="version", version=f"smoothguide {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser(
        "demo",
        add_help=False,
        help="guide the embedded digit model with SEG, CFG and PAG; write pictures and "
        "metrics (smoothguide demo --help lists its options)",
    )
    energy = sub.add_parser(
        "energy",
        help="how query blur changes the attention energy, variance and curvature of "
        "random queries",
        description="Print a table: for each sigma, how blurring random queries on a token "
        "grid changes their variance, the attention energy and its curvature.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    energy.add_argument("--height", type=_positive_int, default=12, help="token grid height")
    energy.add_argument("--width", type=_positive_int, default=16, help="token grid width")
    energy.add_argument("--dim", type=_positive_int, default=16, help="query and key dimension")
    energy.add_argument(
        "--seed", type=_seed, default=0, help="seed of the random queries and keys (>= 0)"
    )
    energy.add_argument(
        "--mode",
        default="reflect",
        choices=["reflect", "mirror", "nearest", "wrap"],
        help="boundary mode of the blur (SciPy's names)",
    )
    energy.add_argument(
        "--sigmas",
        type=_sigma,
        nargs="+",
        default=[0, 0.5, 1, 2, 5, 10, math.inf],
        help="blur widths, numbers >= 0 or inf (the mean query)",
    )
    energy.set_defaults(func=_energy)
    sub.add_parser(
        "study",
        add_help=False,
        help="guidance studies sharded over processes, resumable "
        "(smoothguide study --help lists its actions)",
    )
    sub.add_parser(
        "train-demo",
        add_help=False,
        help="train the embedded demo model (smoothguide train-demo --help lists its options)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``smoothguide`` command.

    Parameters
    ----------
    argv
        Arguments without the program name; default ``sys.argv[1:]``.

    Returns
    -------
    int
        The exit status.

    Examples
    --------
    >>> main(["energy", "--height", "2", "--width", "3", "--sigmas", "0"])  # doctest: +ELLIPSIS
    | sigma | query variance | ...
    0
    """
    args_list = list(sys.argv[1:] if argv is None else argv)
    try:
        if args_list and args_list[0] in DELEGATED:
            return _delegate(DELEGATED[args_list[0]], args_list[1:])
        args = build_parser().parse_args(args_list)
        return int(args.func(args))
    except KeyboardInterrupt:
        print("smoothguide: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
