"""``smoothguide study run STUDY.toml --out DIR`` and ``smoothguide study report DIR``.

The same command runs in-process or as one rank of a launcher::

    smoothguide study run study.toml --out DIR
    accelerate launch --num_processes 8 -m smoothguide study run study.toml --out DIR
    torchrun --nproc-per-node 2 -m smoothguide study run study.toml --out DIR
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .definition import StudyError

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``smoothguide study``: actions ``run``, ``check`` and ``report``.

    Returns
    -------
    argparse.ArgumentParser

    Examples
    --------
    >>> a = build_parser().parse_args(["run", "s.toml", "--out", "d", "--no-progress"])
    >>> a.action, a.study, a.out, a.progress
    ('run', 's.toml', 'd', False)
    """
    p = argparse.ArgumentParser(
        prog="smoothguide study",
        description="Guidance studies: sharded over processes (accelerate / torchrun), "
        "resumable, reported from the store.",
    )
    sub = p.add_subparsers(dest="action", required=True)
    run = sub.add_parser("run", help="run or resume a study into --out")
    run.add_argument("study", help="study TOML file")
    run.add_argument("--out", required=True, help="output folder (the store)")
    run.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm bars")
    run.add_argument("--cpu", action="store_true", help="use the CPU even if CUDA is available")
    check = sub.add_parser("check", help="validate a study file without sampling")
    check.add_argument("study", help="study TOML file")
    rep = sub.add_parser("report", help="CSV + Markdown table, Pareto plot, sample grids")
    rep.add_argument("dir", help="output folder of a finished study")
    rep.add_argument("--out", default=None, help="report folder (default DIR/report)")
    rep.add_argument("--columns", type=int, default=8, help="seeds per grid row")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``smoothguide study``; a :class:`StudyError` exits with status 2.

    Parameters
    ----------
    argv
        Arguments after ``study`` (default ``sys.argv[1:]``).

    Returns
    -------
    int
        The exit status: 0, or 2 with the error on stderr.

    Examples
    --------
    >>> main(["check", "no-such-study.toml"])  # the error goes to stderr
    2
    """
    args = build_parser().parse_args(argv)
    try:
        from .definition import load_study

        if args.action == "check":
            study = load_study(args.study)
            print(f"study {study.name!r} is valid: definition hash {study.definition_hash()}")
            return 0
        if args.action == "run":
            from .runner import run_study

            run_study(load_study(args.study), args.out, progress=args.progress, cpu=args.cpu)
            return 0
        from .report import write_report

        for path in write_report(args.dir, args.out, columns=args.columns):
            print(path)
        return 0
    except StudyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
