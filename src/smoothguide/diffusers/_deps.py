"""Import diffusers with an error that names the extra to install."""

from __future__ import annotations

from .._extras import missing_extra

try:
    import diffusers
except ImportError as exc:  # pragma: no cover - exercised only without diffusers
    raise missing_extra("smoothguide.diffusers", "diffusers", "diffusers") from exc

__all__ = ["diffusers"]
