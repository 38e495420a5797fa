"""Import torch with an error that names the extra to install."""

from __future__ import annotations

from .._extras import missing_extra

try:
    import torch
except ImportError as exc:  # pragma: no cover - exercised only without torch
    raise missing_extra("smoothguide.torch", "torch", "torch") from exc

__all__ = ["torch"]
