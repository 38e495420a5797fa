"""Nox sessions: tests, tests-kernels, lint, typecheck, docs, bench.

Every session that needs torch installs ``torch==2.13.0`` first, on its own line:
an unpinned torch (or a range admitting newer releases) resolves a multi-GB CUDA build.
"""

from __future__ import annotations

import os

import nox

nox.options.sessions = ["tests", "lint", "typecheck", "docs"]
nox.options.default_venv_backend = "venv"

TORCH = "torch==2.13.0"
PYPROJECT = nox.project.load_toml("pyproject.toml")
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "MPLBACKEND": "Agg"}


def _install(session: nox.Session, extras: str, *groups: str) -> None:
    session.install("-U", "pip")
    session.install(TORCH)
    deps = [d for g in groups for d in nox.project.dependency_groups(PYPROJECT, g)]
    session.install("-e", f".[{extras}]", *deps)


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite on every backend (NumPy, array-api-strict, PyTorch, JAX)."""
    _install(session, "all", "test")
    session.install("jax[cpu]")
    session.run("pytest", *session.posargs, env=OFFLINE)


#: (ATEN_CPU_CAPABILITY, OMP_NUM_THREADS) of the tests-kernels runs: torch's scalar
#: kernels and its AVX2 ones (whatever this CPU's best is), on 1 and 2 threads.
KERNELS = [(cap, threads) for cap in ("default", "avx2") for threads in ("1", "2")]


@nox.session(name="tests-kernels")
def tests_kernels(session: nox.Session) -> None:
    """The ``numerics`` tests under other CPU kernels and thread counts (issue 13).

    A float32 result must not depend on which kernels a CPU runs: each configuration
    of ``KERNELS`` runs ``pytest -m numerics`` (NumPy, array-api-strict and torch
    backends; JAX's XLA kernels do not read ``ATEN_CPU_CAPABILITY``).
    """
    _install(session, "all", "test")
    for cap, threads in KERNELS:
        env = {
            **OFFLINE,
            "ATEN_CPU_CAPABILITY": cap,
            "OMP_NUM_THREADS": threads,
            "SMOOTHGUIDE_TEST_BACKENDS": "numpy,array_api_strict,torch",
        }
        session.log(f"ATEN_CPU_CAPABILITY={cap} OMP_NUM_THREADS={threads}")
        session.run("pytest", "-q", "-m", "numerics", *session.posargs, env=env)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff."""
    session.install(*nox.project.dependency_groups(PYPROJECT, "lint"))
    session.run("ruff", "check", "src", "tests", "benchmarks", "docs", "noxfile.py")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy on the package."""
    _install(session, "all", "typecheck")
    session.run("mypy")


@nox.session
def docs(session: nox.Session) -> None:
    """Build the documentation with warnings as errors (figures regenerated first)."""
    _install(session, "all,docs")
    session.run("python", "docs/figures/make_figures.py", env=OFFLINE)
    session.run(
        "sphinx-build", "-W", "--keep-going", "-b", "html", "docs", "docs/_build/html", env=OFFLINE
    )


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks; ``nox -s bench -- --full`` for the long variant."""
    _install(session, "all", "test")
    session.install("scipy", "matplotlib")
    env = dict(OFFLINE)
    env.update({k: v for k, v in os.environ.items() if k.startswith("OPENBLAS")})
    session.run("python", "-m", "benchmarks", *session.posargs, env=env)
