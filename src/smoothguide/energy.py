"""Attention logits, attention, and the energy of self-attention (Hong 2024, Def. 2.1, App. B).

With logits ``A = scale * Q Kᵀ`` (queries on the rows, keys on the columns), the
paper's energy of one key's logit map ``a = A[:, j]`` is ``E'(a) = -lse(a)``, the
log-sum-exp running over query positions; the total energy is the sum over keys.
The dual definition (Appendix B) takes the lse over keys for each query, the axis
the attention softmax normalises.

The derivative helpers work on logit vectors ``a`` with the lse over the last
axis: gradient ``-softmax(a)``, Hessian ``-(diag p - p pᵀ)``; and, for a linear
blur ``B`` of the logits, the Hessian of ``a -> E'(B a)``, ``Bᵀ ∇²E'(B a) B``.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Literal

from ._array import Array, compute_dtype, device_of, namespace, require_floating

__all__ = [
    "attention",
    "attention_energy",
    "attention_logits",
    "diagonal_curvature_logdet",
    "log_softmax",
    "logsumexp",
    "lse_energy",
    "lse_energy_grad",
    "lse_energy_hessian",
    "smoothed_energy_hessian",
    "softmax",
]


def _scale(scale: float | None, dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(dim)
    # numbers.Real: NumPy scalars (np.float32, np.int64) too; bools (also np.bool_) not.
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise ValueError(f"scale must be None or a finite real number, got {scale!r}")
    return float(scale)


def _check_same_dtype(**arrays: Array) -> None:
    dtypes = {name: a.dtype for name, a in arrays.items()}
    if len(set(dtypes.values())) > 1:
        names = " and ".join(dtypes)
        got = " and ".join(str(d).removeprefix("torch.") for d in dtypes.values())
        raise TypeError(f"{names} must share a dtype, got {got}")


def _upcast(xp: Any, x: Array, name: str) -> Array:
    require_floating(xp, x, name)
    return xp.astype(x, compute_dtype(xp, x.dtype))


def logsumexp(a: Array, *, axis: int = -1) -> Array:
    """Stable ``log(sum(exp(a), axis))``: the maximum is taken out first.

    Parameters
    ----------
    a
        Real floating array.
    axis
        Axis to reduce.

    Returns
    -------
    array
        ``a`` reduced along ``axis``.

    Examples
    --------
    >>> import numpy as np
    >>> float(logsumexp(np.array([1e4, 1e4])))  # no overflow
    10000.69314718056
    """
    xp = namespace(a)
    m = xp.max(a, axis=axis, keepdims=True)
    m = xp.where(xp.isfinite(m), m, xp.zeros_like(m))
    s = xp.sum(xp.exp(a - m), axis=axis, keepdims=True)
    return xp.squeeze(xp.log(s) + m, axis=axis)


def log_softmax(a: Array, *, axis: int = -1) -> Array:
    """Stable ``log(softmax(a))`` along ``axis``: ``a - lse(a)``, finite for finite ``a``.

    Parameters
    ----------
    a
        Real floating array.
    axis
        Axis the softmax normalises.

    Returns
    -------
    array
        Same shape as ``a``.

    Examples
    --------
    >>> import numpy as np
    >>> log_softmax(np.array([0.0, -1e4]))  # log(softmax) would underflow to -inf
    array([ 0.e+00, -1.e+04])
    """
    xp = namespace(a)
    return a - xp.expand_dims(logsumexp(a, axis=axis), axis=axis)


def softmax(a: Array, *, axis: int = -1) -> Array:
    """Stable softmax along ``axis``: ``exp(a - max a) / sum(exp(a - max a))``.

    Parameters
    ----------
    a
        Real floating array.
    axis
        Axis to normalise.

    Returns
    -------
    array
        Same shape as ``a``, non-negative, summing to 1 along ``axis``.

    Examples
    --------
    >>> import numpy as np
    >>> softmax(np.array([0.0, 0.0, 0.0, 0.0]))
    array([0.25, 0.25, 0.25, 0.25])
    """
    xp = namespace(a)
    e = xp.exp(a - xp.max(a, axis=axis, keepdims=True))
    return e / xp.sum(e, axis=axis, keepdims=True)


def attention_logits(q: Array, k: Array, *, scale: float | None = None) -> Array:
    """Attention logits ``scale * Q Kᵀ`` of shape ``(..., queries, keys)``.

    Parameters
    ----------
    q, k
        Arrays of shape ``(..., queries, d)`` and ``(..., keys, d)``.
    scale
        Default ``1 / sqrt(d)``.

    Returns
    -------
    array
        ``(..., queries, keys)``, in the dtype of ``q`` (16-bit inputs accumulate in float32).

    Examples
    --------
    >>> import numpy as np
    >>> attention_logits(np.ones((2, 4)), np.ones((3, 4))).shape
    (2, 3)
    """
    xp = namespace(q, k)
    if q.ndim < 2 or k.ndim < 2 or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            "q and k must have shapes (..., queries, d) and (..., keys, d) with the same d, "
            f"got {tuple(q.shape)} and {tuple(k.shape)}"
        )
    if q.shape[-2] == 0 or k.shape[-2] == 0:
        raise ValueError(
            "q and k need at least one query and one key (softmax and lse over an empty axis "
            f"are undefined), got {tuple(q.shape)} and {tuple(k.shape)}"
        )
    _check_same_dtype(q=q, k=k)
    s = _scale(scale, q.shape[-1])
    dtype = q.dtype
    a = s * xp.matmul(_upcast(xp, q, "q"), xp.matrix_transpose(_upcast(xp, k, "k")))
    return xp.astype(a, dtype)


def attention(q: Array, k: Array, v: Array, *, scale: float | None = None) -> Array:
    """Reference attention ``softmax(scale * Q Kᵀ) V`` with a stable softmax over keys.

    Parameters
    ----------
    q, k, v
        Shapes ``(..., queries, d)``, ``(..., keys, d)`` and ``(..., keys, dv)``, one dtype.
    scale
        Default ``1 / sqrt(d)``.

    Returns
    -------
    array
        ``(..., queries, dv)`` in the dtype of ``q``.

    Examples
    --------
    >>> import numpy as np
    >>> v = np.arange(6.0).reshape(3, 2)
    >>> attention(np.zeros((1, 4)), np.ones((3, 4)), v)  # uniform weights: mean of V
    array([[2., 3.]])
    """
    xp = namespace(q, k, v)
    if v.ndim < 2 or v.shape[-2] != k.shape[-2]:
        raise ValueError(
            f"v must have shape (..., keys, dv) with keys == k.shape[-2]={k.shape[-2]}, "
            f"got {tuple(v.shape)}"
        )
    _check_same_dtype(q=q, k=k, v=v)
    dtype = q.dtype
    a = attention_logits(_upcast(xp, q, "q"), _upcast(xp, k, "k"), scale=scale)
    out = xp.matmul(softmax(a, axis=-1), _upcast(xp, v, "v"))
    return xp.astype(out, dtype)


def attention_energy(
    q: Array,
    k: Array,
    *,
    scale: float | None = None,
    axis: Literal["queries", "keys"] = "queries",
) -> Array:
    """The energy of self-attention (Hong 2024, Def. 2.1, Eq. 5), one value per key.

    ``E'(a_j) = -lse(a_j)`` for each key's logit map ``a_j = A[:, j]``,
    ``A = scale * Q Kᵀ``, the log-sum-exp running over query positions; the
    paper's total ``E(A)`` is the sum of the returned values. ``axis="keys"``
    gives the dual definition (Appendix B): ``-lse`` of each query's row of
    logits over keys, one value per query.

    Parameters
    ----------
    q, k
        Shapes ``(..., queries, d)`` and ``(..., keys, d)``.
    scale
        Default ``1 / sqrt(d)``.
    axis
        ``"queries"`` (the paper's Eq. 5) or ``"keys"`` (Appendix B).

    Returns
    -------
    array
        ``(..., keys)`` for ``axis="queries"``, ``(..., queries)`` for ``axis="keys"``;
        computed in at least float32, returned in the dtype of ``q``.

    Examples
    --------
    >>> import numpy as np
    >>> e = attention_energy(np.zeros((4, 2)), np.ones((3, 2)))   # 4 equal logits per key
    >>> bool(np.allclose(e, -np.log(4)))
    True
    """
    if axis not in ("queries", "keys"):
        raise ValueError(f"axis must be 'queries' or 'keys', got {axis!r}")
    xp = namespace(q, k)
    _check_same_dtype(q=q, k=k)
    dtype = q.dtype
    a = attention_logits(_upcast(xp, q, "q"), _upcast(xp, k, "k"), scale=scale)
    e = -logsumexp(a, axis=-2 if axis == "queries" else -1)
    return xp.astype(e, dtype)


def lse_energy(a: Array) -> Array:
    """``E'(a) = -lse(a)`` over the last axis (Eq. 5 for one key's logit map).

    Parameters
    ----------
    a
        Logits ``(..., n)``.

    Returns
    -------
    array
        ``(...)``.

    Examples
    --------
    >>> import numpy as np
    >>> float(lse_energy(np.zeros(8))) == -float(np.log(8))
    True
    """
    return -logsumexp(a, axis=-1)


def lse_energy_grad(a: Array) -> Array:
    """Gradient of ``E'(a) = -lse(a)``: ``-softmax(a)`` (last axis).

    Parameters
    ----------
    a
        Logits ``(..., n)``.

    Returns
    -------
    array
        ``(..., n)``.

    Examples
    --------
    >>> import numpy as np
    >>> lse_energy_grad(np.zeros(2))
    array([-0.5, -0.5])
    """
    return -softmax(a, axis=-1)


def lse_energy_hessian(a: Array) -> Array:
    """Hessian of ``E'(a) = -lse(a)``: ``-(diag p - p pᵀ)`` with ``p = softmax(a)``.

    It is negative semi-definite with ``1`` (the all-ones direction) in its kernel.

    Parameters
    ----------
    a
        Logits ``(..., n)``.

    Returns
    -------
    array
        ``(..., n, n)``.

    Examples
    --------
    >>> import numpy as np
    >>> lse_energy_hessian(np.zeros(2))
    array([[-0.25,  0.25],
           [ 0.25, -0.25]])
    """
    xp = namespace(a)
    p = softmax(a, axis=-1)
    outer = p[..., :, None] * p[..., None, :]
    eye = xp.eye(a.shape[-1], dtype=a.dtype, device=device_of(a))
    return outer - p[..., :, None] * eye


def smoothed_energy_hessian(a: Array, b: Array) -> Array:
    """Hessian in ``a`` of the smoothed energy ``a -> E'(B a)``: ``Bᵀ ∇²E'(B a) B``.

    This is the exact curvature of the energy SEG's blurred branch sees, as a
    function of the original (unblurred) logits of one key.

    Parameters
    ----------
    a
        Logits of shape ``(..., n)`` (a flattened ``H x W`` map).
    b
        Linear blur operator of shape ``(n, n)``, e.g. ``kron(M_h, M_w)`` of two
        :func:`~smoothguide.blur_matrix` factors.

    Returns
    -------
    array
        ``(..., n, n)``.

    Examples
    --------
    >>> import numpy as np
    >>> a = np.array([0.0, 1.0, 3.0])
    >>> bool(np.allclose(smoothed_energy_hessian(a, np.eye(3)), lse_energy_hessian(a)))
    True
    """
    xp = namespace(a, b)
    ba = xp.matmul(a[..., None, :], xp.matrix_transpose(b))[..., 0, :]
    return xp.matrix_transpose(b) @ lse_energy_hessian(ba) @ b


def diagonal_curvature_logdet(a: Array, b: Array | None = None) -> Array:
    """The paper's curvature proxy (Thm. 3.1 proof): ``log prod_i softmax(B a)_i b_ii``.

    The proof drops the off-diagonal ``p_i p_j`` terms of the Hessian, so
    ``|det H| ≈ prod_i p_i`` without blur and ``|det H~| ≈ prod_i softmax(B a)_i b_ii``
    with it. ``b=None`` gives the unblurred ``sum_i log softmax(a)_i``. This is
    the *approximation* the paper reasons with, not an exact curvature; see
    ``docs/theory.md`` for when its conclusion fails.

    Parameters
    ----------
    a
        Logits ``(..., n)``.
    b
        Blur operator ``(n, n)`` with a positive diagonal, or ``None``.

    Returns
    -------
    array
        ``(...)``: the log of the approximate ``|det|``.

    Examples
    --------
    >>> import numpy as np
    >>> float(diagonal_curvature_logdet(np.zeros(4))) == 4 * float(np.log(0.25))
    True
    """
    xp = namespace(a) if b is None else namespace(a, b)
    if b is None:
        return xp.sum(log_softmax(a, axis=-1), axis=-1)
    ba = xp.matmul(a[..., None, :], xp.matrix_transpose(b))[..., 0, :]
    return xp.sum(log_softmax(ba, axis=-1), axis=-1) + xp.sum(
        xp.log(xp.linalg.diagonal(b)), axis=-1
    )
