"""The core imports no framework: importing smoothguide must not import torch or scipy."""

from __future__ import annotations

import subprocess
import sys


def test_core_imports_no_framework() -> None:
    code = (
        "import sys, smoothguide, smoothguide.rules, smoothguide.sampling;"
        "bad = sorted(m for m in ('torch', 'scipy', 'jax', 'diffusers') if m in sys.modules);"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_public_api_is_exported() -> None:
    import smoothguide

    for name in smoothguide.__all__:
        assert getattr(smoothguide, name) is not None
