"""Shared fixtures: one backend fixture over NumPy, array-api-strict, PyTorch and JAX.

``SMOOTHGUIDE_TEST_BACKENDS=numpy,torch`` picks backends (default: every installed one).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ALL_BACKENDS = ("numpy", "array_api_strict", "torch", "jax")


def _wanted() -> list[str]:
    env = os.environ.get("SMOOTHGUIDE_TEST_BACKENDS")
    names = [b.strip() for b in env.split(",")] if env else list(ALL_BACKENDS)
    unknown = set(names) - set(ALL_BACKENDS)
    if unknown:
        raise ValueError(f"SMOOTHGUIDE_TEST_BACKENDS: unknown backends {sorted(unknown)}")
    return names


@dataclass(frozen=True)
class Backend:
    """An array backend under test: its namespace and converters to and from NumPy."""

    name: str
    xp: Any

    def asarray(self, a: Any, dtype: str | None = None) -> Any:
        a = np.asarray(a)
        if dtype is not None:
            a = a.astype(dtype)
        if self.name == "numpy":
            return a
        if self.name == "torch":
            import torch

            return torch.from_numpy(np.array(a))
        if self.name == "jax":
            import jax.numpy as jnp

            return jnp.asarray(a)
        return self.xp.asarray(a)

    def to_numpy(self, x: Any) -> np.ndarray:
        if self.name == "torch":
            return x.detach().cpu().float().numpy() if x.dtype.itemsize < 4 else x.numpy()
        if self.name == "array_api_strict":
            return np.asarray(x.__array__() if hasattr(x, "__array__") else x)
        return np.asarray(x)

    @property
    def has_float64(self) -> bool:
        if self.name != "jax":
            return True
        import jax

        return bool(jax.config.read("jax_enable_x64"))


def _make(name: str) -> Backend:
    if name == "numpy":
        import array_api_compat.numpy as xp
    elif name == "array_api_strict":
        import array_api_strict as xp
    elif name == "torch":
        import array_api_compat.torch as xp
    else:
        import jax.numpy as xp
    return Backend(name, xp)


_PARAMS = [
    pytest.param(
        name,
        marks=pytest.mark.skipif(
            importlib.util.find_spec(name) is None, reason=f"{name} not installed"
        ),
    )
    for name in _wanted()
]


@pytest.fixture(params=_PARAMS)
def backend(request: pytest.FixtureRequest) -> Backend:
    """Each selected array backend in turn."""
    return _make(request.param)
