"""Where the benchmark ran: CPU, cores, load, versions, environment, commit."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

__all__ = ["load_average", "machine_info"]

_ENV_PREFIXES = ("OPENBLAS", "OMP_", "MKL_", "KMP_", "TORCH_", "SMOOTHGUIDE")
_PACKAGES = ("torch", "numpy", "scipy", "diffusers", "matplotlib", "smoothguide")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _simd_flags() -> str:
    """The vector-instruction flags of the CPU that matter for these kernels."""
    wanted = ("avx", "avx2", "fma", "avx512f", "avx512_bf16", "amx_tile")
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return " ".join(f for f in wanted if f in have) or "none of " + ", ".join(wanted)
    except OSError:
        pass
    return "unknown"


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _git_commit() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "src", "benchmarks"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() + (" (+ uncommitted changes)" if dirty.stdout.strip() else "")


def load_average() -> tuple[float, float, float] | None:
    """1, 5 and 15 minute load averages, or ``None`` where unavailable."""
    try:
        return os.getloadavg()
    except OSError:
        return None


def machine_info() -> dict[str, Any]:
    """A description of the machine and software the benchmark runs on."""
    import numpy as np

    info: dict[str, Any] = {
        "date (UTC)": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "CPU": _cpu_model(),
        "CPU SIMD flags": _simd_flags(),
        "logical cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git commit": _git_commit(),
    }
    if hasattr(os, "sched_getaffinity"):
        info["cores usable by this process"] = len(os.sched_getaffinity(0))
    try:
        import torch

        info["torch threads"] = torch.get_num_threads()
        info["torch CPU capability"] = torch.backends.cpu.get_cpu_capability()
    except ImportError:
        pass
    for name in _PACKAGES:
        info[name] = _version(name)
    try:
        cfg = np.show_config(mode="dicts")  # type: ignore[call-arg]
        blas = cfg.get("Build Dependencies", {}).get("blas", {})
        info["numpy BLAS"] = f"{blas.get('name', '?')} {blas.get('version', '')}".strip()
    except Exception:  # older numpy: no dict mode
        pass
    env = {k: v for k, v in sorted(os.environ.items()) if k.startswith(_ENV_PREFIXES)}
    info["environment"] = (
        ", ".join(f"{k}={v}" for k, v in env.items())
        or "no OPENBLAS_*/OMP_*/MKL_*/TORCH_* variables set"
    )
    load = load_average()
    if load is not None:
        info["load average at start (1/5/15 min)"] = " / ".join(f"{x:.2f}" for x in load)
    info["executable"] = sys.executable
    return info
