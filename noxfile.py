"""Nox sessions: tests, tests-kernels, tests-oldest, lint, typecheck, docs, package, bench.

Every session that needs torch installs ``torch==2.13.0`` first, on its own line: the
extras declare a range (``torch>=2.13``), and with no torch installed pip would resolve
the newest, multi-GB CUDA build for it.

Virtual environments are reused between runs (``reuse_venv = "yes"``): a second
``nox -s tests`` re-checks the requirements (seconds) instead of reinstalling them;
``nox -R -s tests`` also skips that check, ``nox --no-reuse-existing-virtualenvs`` starts
afresh. The ``venv`` backend is used, not ``uv``: this machine's torch wheel is found
through pip's configuration (``find-links``), which uv does not read.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tarfile
import zipfile
from pathlib import Path

import nox

nox.options.sessions = ["tests", "lint", "typecheck", "docs"]
nox.options.default_venv_backend = "venv"
nox.options.reuse_venv = "yes"

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
        # No JAX here (XLA kernels ignore ATEN_CPU_CAPABILITY): deselect it, not skip.
        session.run("pytest", "-q", "-m", "numerics", "-k", "not jax", *session.posargs, env=env)


def _oldest_pins() -> list[str]:
    """``name==X.*`` for every ``name>=X`` the package, its extras and the test group declare.

    The newest patch release of each lowest declared minor version: patch releases add no
    API, and that keeps the installs within what this machine holds locally.
    """
    project = PYPROJECT["project"]
    reqs = list(project["dependencies"])
    for extra in ("torch", "diffusers", "demo"):
        reqs += project["optional-dependencies"][extra]
    reqs += nox.project.dependency_groups(PYPROJECT, "test")
    pins = []
    for req in reqs:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", req)
        if m and m.group(1) != "torch":
            pins.append(f"{m.group(1)}=={m.group(2)}.*")
    return [TORCH, *pins]


@nox.session(name="tests-oldest")
def tests_oldest(session: nox.Session) -> None:
    """The test suite on the oldest versions the package declares (torch 2.13.0: the oldest
    torch wheel this project's machines can install). ``-- tests/test_rules.py`` for a subset."""
    pins = _oldest_pins()
    constraints = Path(session.create_tmp()) / "oldest.txt"
    constraints.write_text("\n".join(pins) + "\n")
    session.install("-U", "pip")
    session.install(TORCH)
    deps = nox.project.dependency_groups(PYPROJECT, "test")
    session.install("-c", str(constraints), "-e", ".[all]", *deps)
    session.run("python", "-m", "pip", "list", "--format=freeze")
    session.run("pytest", *session.posargs, env=OFFLINE)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff: lint and formatting (also of the Python blocks in the Markdown pages)."""
    session.install(*nox.project.dependency_groups(PYPROJECT, "lint"))
    paths = ("src", "tests", "benchmarks", "docs", "noxfile.py")
    session.run("ruff", "check", *paths)
    session.run("ruff", "format", "--check", *paths)


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


# What the built distributions must hold (paths inside the wheel) and must not.
_WHEEL_MUST = (
    "smoothguide/__init__.py",
    "smoothguide/py.typed",
    "smoothguide/demo/weights/dit.safetensors",
    "smoothguide/demo/weights/dit_weak.safetensors",
    "smoothguide/demo/weights/classifier.safetensors",
    "smoothguide/demo/weights/config.json",
    "smoothguide/demo/mnist/mnist_5k.npz",
    "smoothguide/demo/mnist/README.md",
)
_SDIST_MUST = ("LICENSE", "README.md", "CHANGELOG.md", "CITATION.cff", "pyproject.toml")


def _check_dists(dist: Path) -> Path:
    """Check the wheel's and the sdist's contents; return the wheel."""
    (wheel,) = dist.glob("smoothguide-*.whl")
    (sdist,) = dist.glob("smoothguide-*.tar.gz")
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [n for n in _WHEEL_MUST if n not in names]
    if not any(n.endswith(".dist-info/licenses/LICENSE") for n in names):
        missing.append("*.dist-info/licenses/LICENSE")
    stray = sorted(n for n in names if not n.startswith(("smoothguide/", "smoothguide-")))
    with tarfile.open(sdist) as tar:
        snames = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    missing += [f"sdist:{n}" for n in _SDIST_MUST if n not in snames]
    stray += sorted(
        f"sdist:{n}" for n in snames if n.startswith((".nox/", ".venv/", "docs/_build/"))
    )
    if missing or stray:
        raise nox.command.CommandFailed(f"distributions: missing {missing}, unexpected {stray}")
    size = wheel.stat().st_size / 2**20
    print(f"{wheel.name}: {len(names)} files, {size:.1f} MiB; {sdist.name}: {len(snames)} files")
    if size > 8:
        raise nox.command.CommandFailed(f"the wheel is {size:.1f} MiB (limit 8)")
    return wheel


def _doc_install_commands(wheel: Path) -> list[list[str]]:
    """The ``pip install`` commands of README.md and docs/ that must work today (PyPI forms,
    labelled 'after a release', excluded), the README's wheel path made the built wheel.

    The checkout's (``.[...]``) and the wheel's targets are merged into one install each with
    the union of their extras: every line's requirements are then a subset of an installed,
    consistent set, at the cost of one build instead of one per line.
    """
    sys.path.insert(0, "docs")
    try:
        import doc_blocks
    finally:
        sys.path.remove("docs")
    plain: list[str] = []
    extras: dict[str, set[str]] = {".": set(), str(wheel): set()}
    for page in doc_blocks.pages(Path(".")):
        for line in page.read_text(encoding="utf-8").splitlines():
            if "after a release" in line or "once released" in line:
                continue
            for arg in (a for args in doc_blocks.install_commands(line) for a in args):
                m = re.fullmatch(r"(\.|\S+\.whl)(?:\[([\w,]+)\])?", arg)
                if m is None:
                    plain += [] if arg in plain else [arg]
                else:
                    extras["." if m[1] == "." else str(wheel)] |= set((m[2] or "").split(","))
    merged = [f"{t}[{','.join(sorted(e - {''}))}]" if e - {""} else t for t, e in extras.items()]
    return [[a] for a in plain] + [[t] for t in merged]


@nox.session(reuse_venv=False)
def package(session: nox.Session) -> None:
    """Build wheel and sdist and check their contents; install the wheel with its extras in
    this fresh venv (torch first); from outside the checkout run the demo and every runnable
    python block of README.md and docs/; then run every install line of the pages."""
    root = Path.cwd()
    dist = Path(session.create_tmp()).resolve() / "dist"
    shutil.rmtree(dist, ignore_errors=True)
    session.install("build>=1")
    session.run("python", "-m", "build", "--outdir", str(dist), ".")
    wheel = _check_dists(dist)
    session.install(TORCH)
    session.install(f"{wheel}[all]")
    work = Path(session.create_tmp()).resolve() / "outside"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    session.chdir(work)  # the installed wheel, not the checkout's src/, is imported from here
    where = "import smoothguide as s; assert 'site-packages' in s.__file__, s.__file__"
    session.run("python", "-c", where, env=OFFLINE)
    session.run("smoothguide", "demo", "--quick", "--no-progress", "--out", "demo", env=OFFLINE)
    session.run("python", str(root / "docs" / "doc_blocks.py"), str(root), env=OFFLINE)
    session.chdir(root)
    for args in _doc_install_commands(wheel):
        session.install(*args)
