"""Checks and error handling shared by the demo's command-line entry points.

Usage errors (an unwritable ``--out``, an unknown or absent ``--device``, a
missing ``--weights-dir``, a negative ``--seed``) are found before any work
and reported by ``parser.error`` (one line, exit status 2). At run time a
``KeyboardInterrupt`` prints one line and exits 130, a weights or file-system
error prints one line and exits 1, and output folders the run created are
removed again when they are still empty.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable

from ._deps import torch
from .weights import CONFIG_FILE, WeightsError

__all__ = [
    "check_device",
    "check_out_dir",
    "check_seed",
    "check_weights_dir",
    "run_main",
]

#: Largest seed accepted (what NumPy's and torch's generators both take).
MAX_SEED = 2**32 - 1


def _nearest_existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def missing_dirs(path: str) -> list[str]:
    """``path`` and its ancestors that do not exist yet, deepest first."""
    out = []
    path = os.path.abspath(path)
    while not os.path.exists(path):
        out.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return out


def remove_empty(dirs: list[str]) -> None:
    """Remove the folders of ``dirs`` (deepest first) that exist and are empty."""
    for d in dirs:
        try:
            os.rmdir(d)  # only succeeds for an empty folder
        except OSError:
            break


def check_out_dir(parser: argparse.ArgumentParser, path: str, option: str = "--out") -> str:
    """Fail with ``parser.error`` unless ``path`` is (or can be created as) a writable folder."""
    if os.path.exists(path) and not os.path.isdir(path):
        parser.error(f"{option} {path}: exists and is not a folder")
    base = _nearest_existing(path)
    if not os.path.isdir(base):
        parser.error(f"{option} {path}: {base} is not a folder, so it cannot be created")
    try:  # os.access is not enough (root, read-only file systems): try it
        fd, probe = tempfile.mkstemp(prefix=".smoothguide-probe-", dir=base)
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        parser.error(f"{option} {path}: {base} is not writable ({exc.strerror or exc})")
    return path


def check_device(parser: argparse.ArgumentParser, name: str, option: str = "--device") -> str:
    """Fail with ``parser.error`` unless ``name`` is a torch device usable on this machine."""
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        parser.error(f"{option} {name!r} is not a torch device; use e.g. cpu, cuda, cuda:1 or mps")
    if dev.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"{option} {name}: CUDA is not available on this machine; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        parser.error(
            f"{option} {name}: this machine has {torch.cuda.device_count()} CUDA device(s)"
        )
    try:
        torch.empty(1, device=dev)
    except (RuntimeError, AssertionError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        parser.error(f"{option} {name}: not usable on this machine ({first}); use --device cpu")
    return name


def check_weights_dir(
    parser: argparse.ArgumentParser, path: str | None, option: str = "--weights-dir"
) -> str | None:
    """Fail with ``parser.error`` unless ``path`` is ``None`` or a folder with ``config.json``."""
    if path is None:
        return None
    if not os.path.isdir(path):
        what = "is not a folder" if os.path.exists(path) else "does not exist"
        parser.error(f"{option} {path} {what}")
    if not os.path.isfile(os.path.join(path, CONFIG_FILE)):
        parser.error(
            f"{option} {path} holds no demo weights ({CONFIG_FILE} missing); "
            "train them with smoothguide train-demo --out DIR"
        )
    return path


def check_seed(parser: argparse.ArgumentParser, seed: int, option: str = "--seed") -> int:
    """Fail with ``parser.error`` unless ``0 <= seed <= MAX_SEED``."""
    if not 0 <= seed <= MAX_SEED:
        parser.error(f"{option} must be an integer from 0 to {MAX_SEED}, got {seed}")
    return seed


def run_main(prog: str, work: Callable[[], int], out: str | None = None) -> int:
    """Run ``work()`` as a command: one line for an interrupt (130) or a run-time error (1).

    Folders of ``out`` that did not exist before are removed again if the run
    fails and leaves them empty.
    """
    created = missing_dirs(out) if out is not None else []
    try:
        return work()
    except KeyboardInterrupt:
        remove_empty(created)
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except (WeightsError, OSError) as exc:
        remove_empty(created)
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except BaseException:
        remove_empty(created)
        raise
