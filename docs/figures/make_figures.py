"""Regenerate every figure of the documentation from the library itself.

Usage::

    python docs/figures/make_figures.py [OUT_DIR]

``OUT_DIR`` defaults to ``docs/figures/_generated`` (what the pages reference).
Each figure script in :data:`SCRIPTS` lists the files it writes in ``OUTPUTS``
and writes them from its ``main(out)``; ``tests/test_docs.py`` checks that every
image the docs reference is one of them. Runs in seconds on the NumPy core.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

#: The figure scripts (modules in docs/figures/), in the order they run.
SCRIPTS = (
    "kernels",
    "query_blur",
    "logit_landscape",
    "energy_curve",
    "curvature_regime",
    "infinite_sigma",
)


def _script(name: str) -> Any:
    """The figure script ``name`` of this folder, loaded from its file.

    Not ``import name``: a script's name may also be an installed package's (``kernels``
    is one on PyPI, which diffusers imports), and ``sys.modules`` would hand back that.
    """
    key = f"_smoothguide_figure_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, HERE / f"{name}.py")
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


def outputs() -> dict[str, str]:
    """``{file name: script}`` for every figure the scripts declare."""
    found: dict[str, str] = {}
    for name in SCRIPTS:
        for fname in _script(name).OUTPUTS:
            if fname in found:
                raise ValueError(f"{fname} is declared by both {found[fname]} and {name}")
            found[fname] = name
    return found


def main(out: Path = HERE / "_generated") -> list[Path]:
    """Run every script into ``out``; check each wrote exactly what it declares."""
    written: list[Path] = []
    for name in SCRIPTS:
        module = _script(name)
        start = time.perf_counter()
        paths = [Path(p) for p in module.main(out)]
        if sorted(p.name for p in paths) != sorted(module.OUTPUTS):
            raise RuntimeError(f"{name}.main wrote {paths}, but declares {module.OUTPUTS}")
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise RuntimeError(f"{name}.main did not write {missing}")
        print(f"{name}: {', '.join(p.name for p in paths)} ({time.perf_counter() - start:.1f} s)")
        written.extend(paths)
    return written


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "_generated")
