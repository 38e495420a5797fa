"""Array-API helpers shared by the core: namespace, dtype and device of the inputs."""

from __future__ import annotations

from typing import Any

import array_api_compat
import numpy as np

Array = Any  # an array of any array-API backend (NumPy, PyTorch, JAX, CuPy, array-api-strict)

__all__ = [
    "Array",
    "as_backend",
    "compat_namespace",
    "compute_dtype",
    "device_of",
    "namespace",
    "require_floating",
]


def namespace(*arrays: Array) -> Any:
    """The array-API namespace of ``arrays`` (raises ``TypeError`` for non-arrays or a mix)."""
    try:
        return array_api_compat.array_namespace(*arrays)
    except TypeError as exc:
        kinds = ", ".join(sorted({type(a).__name__ for a in arrays}))
        raise TypeError(
            f"expected arrays of one array-API backend (NumPy, PyTorch, JAX, CuPy, "
            f"array-api-strict), got {kinds}"
        ) from exc


def compat_namespace(xp: Any) -> Any:
    """The array-API namespace for ``xp``, also when ``xp`` is a framework's own module.

    ``xp=torch`` (or ``numpy`` 1.x, ``cupy``, ``dask.array``) lacks parts of the array
    API (``torch.isdtype``); array-api-compat's wrapper of it has them.

    Examples
    --------
    >>> import numpy as np
    >>> compat_namespace(np).isdtype(np.float32, "real floating")
    True
    """
    checks = (
        (array_api_compat.is_torch_namespace, "torch"),
        (array_api_compat.is_numpy_namespace, "numpy"),
        (array_api_compat.is_cupy_namespace, "cupy"),
        (array_api_compat.is_dask_namespace, "dask.array"),
    )
    for check, name in checks:
        if check(xp):
            import importlib

            return importlib.import_module(f"array_api_compat.{name}")
    return xp


def device_of(x: Array) -> Any:
    """The device ``x`` lives on, in the form its namespace accepts as ``device=``."""
    return array_api_compat.device(x)


def require_floating(xp: Any, x: Array, name: str) -> None:
    """Raise ``TypeError`` naming ``name`` unless ``x`` has a real floating dtype."""
    if not xp.isdtype(x.dtype, "real floating"):
        raise TypeError(
            f"{name} must have a real floating dtype (float16, bfloat16, float32, float64), "
            f"got {x.dtype}"
        )


def compute_dtype(xp: Any, dtype: Any, name: str = "the input") -> Any:
    """The dtype to accumulate in: float32 for 16-bit floats, else ``dtype`` itself.

    Raises ``TypeError`` naming ``name`` for a dtype that is not real floating.
    """
    if not xp.isdtype(dtype, "real floating"):
        raise TypeError(f"{name} must have a real floating dtype, got {dtype}")
    if xp.finfo(dtype).bits < 32:
        return xp.float32
    return dtype


def as_backend(a: np.ndarray, xp: Any, *, dtype: Any, device: Any) -> Array:
    """Convert a NumPy array to namespace ``xp`` with the given dtype and device."""
    if array_api_compat.is_numpy_namespace(xp):
        return np.asarray(a, dtype=dtype)
    # A writable copy: read-only NumPy buffers (cached blur matrices) upset torch.
    return xp.asarray(np.array(a), dtype=dtype, device=device)
