"""Float tolerances that do not depend on which CPU kernels run.

A float32 result computed by a different (but correct) kernel — AVX-512 instead of
AVX2, another blocking of a GEMM, another thread count — differs from the reference by
rounding: a few units of ``eps`` per accumulated operation, relative to the magnitude
of the values. So tolerances here are ``ops * eps * max|ref|``, never a bare absolute
number. ``eps`` is that of the least precise floating dtype taking part.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["EPS32", "assert_close", "eps_of", "scaled_atol"]

#: float32 machine epsilon, for float64 data that passed through float32 somewhere.
EPS32 = float(np.finfo(np.float32).eps)


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch
        x = x.detach().cpu()
        if x.dtype.itemsize < 4 or str(x.dtype) == "torch.bfloat16":
            x = x.float()
        return x.numpy()
    if hasattr(x, "__array__") or np.isscalar(x) or isinstance(x, list | tuple):
        return np.asarray(x)
    return np.asarray(x)


def eps_of(*arrays: Any) -> float:
    """Machine epsilon of the least precise floating dtype among ``arrays`` (float64 if none)."""
    eps = float(np.finfo(np.float64).eps)
    for a in arrays:
        dtype = getattr(a, "dtype", None)
        if dtype is None:
            continue
        name = str(dtype).removeprefix("torch.")
        if name == "bfloat16":
            e = 2.0**-7
        else:
            try:
                np_dtype = np.dtype(name)
            except TypeError:
                continue
            if np_dtype.kind != "f":
                continue
            e = float(np.finfo(np_dtype).eps)
        eps = max(eps, e)
    return eps


def scaled_atol(ref: Any, *, ops: float = 64, eps: float | None = None, like: Any = None) -> float:
    """``ops * eps * max|ref|``: the rounding budget of ``ops`` accumulated operations."""
    r = np.abs(_to_numpy(ref).astype(np.float64))
    r = r[np.isfinite(r)]
    magnitude = float(r.max()) if r.size else 0.0
    e = eps if eps is not None else eps_of(ref, *(() if like is None else (like,)))
    return ops * e * magnitude


def assert_close(
    actual: Any,
    desired: Any,
    *,
    ops: float = 64,
    eps: float | None = None,
    magnitude: Any = None,
    err_msg: str = "",
) -> None:
    """``|actual - desired| <= ops * eps * max|magnitude|`` element-wise (NaN/inf must match).

    ``eps`` defaults to that of the least precise dtype of ``actual`` and ``desired``;
    ``magnitude`` (default ``desired``) is what the rounding errors scale with, e.g. the
    inputs of an average, whose result can be much smaller than its terms.
    """
    a = _to_numpy(actual).astype(np.float64)
    d = _to_numpy(desired).astype(np.float64)
    e = eps if eps is not None else eps_of(actual, desired)
    atol = scaled_atol(d if magnitude is None else magnitude, ops=ops, eps=e)
    np.testing.assert_allclose(
        a, d, rtol=0, atol=atol, err_msg=err_msg or f"atol = {ops} * {e:.3g} * max|desired|"
    )
