"""Lazy imports of the demo's optional dependencies, with errors naming the extra."""

from __future__ import annotations

import importlib
from types import ModuleType

_EXTRA_HINT = "pip install smoothguide[demo]"

try:
    import torch
except ImportError as _exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        f"smoothguide.demo needs PyTorch; install the demo extra: `{_EXTRA_HINT}`"
    ) from _exc

__all__ = ["require", "torch"]


def require(module: str) -> ModuleType:
    """Import ``module`` or raise an ImportError that names the ``demo`` extra.

    Parameters
    ----------
    module
        Dotted module name, e.g. ``"safetensors.torch"``.

    Returns
    -------
    ModuleType
        The imported module.

    Examples
    --------
    >>> require("json").__name__
    'json'
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            f"smoothguide.demo needs {module.split('.')[0]!r}; install the demo extra: "
            f"`{_EXTRA_HINT}`"
        ) from exc
