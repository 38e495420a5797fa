"""Lazy imports of the demo's optional dependencies, with errors naming the extra."""

from __future__ import annotations

import importlib
from types import ModuleType

from .._extras import missing_extra

try:
    import torch
except ImportError as _exc:  # pragma: no cover - exercised only without the extra
    raise missing_extra("smoothguide.demo", "torch", "demo") from _exc

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
        raise missing_extra("smoothguide.demo", module.split(".")[0], "demo") from exc
