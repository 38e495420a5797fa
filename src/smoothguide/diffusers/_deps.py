"""Import diffusers with an error that names the extra to install."""

from __future__ import annotations

try:
    import diffusers
except ImportError as exc:  # pragma: no cover - exercised only without diffusers
    raise ImportError(
        "smoothguide.diffusers needs diffusers: pip install 'smoothguide[diffusers]'"
    ) from exc

__all__ = ["diffusers"]
