"""Import torch with an error that names the extra to install."""

from __future__ import annotations

try:
    import torch
except ImportError as exc:  # pragma: no cover - exercised only without torch
    raise ImportError("smoothguide.torch needs PyTorch: pip install 'smoothguide[torch]'") from exc

__all__ = ["torch"]
