"""A pure array-API toy attention denoiser that implements the Perturber protocol.

It lets the tests run the whole guidance path (rule -> GuidedDenoiser -> sampler
-> perturbed attention) on NumPy, array-api-strict, PyTorch or JAX without any
framework adapter. The network is an EDM-preconditioned denoiser (Karras et al.
2022, sigma_data = 0.5) around two residual single-head self-attention layers on
the ``height x width`` token grid of an image ``x`` of shape
``(batch, channels, height, width)``, with an optional class embedding
(``class_labels``; label ``num_classes`` is the null class).

Perturbations are executed literally, on the perturbed batch rows only:
:class:`~smoothguide.perturbations.QuerySmoothing` calls
:func:`smoothguide.smooth_queries` on those rows' queries, and
:class:`~smoothguide.perturbations.IdentityAttention` returns those rows' values
``V`` as the attention output.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from smoothguide import TokenGrid, attention, smooth_queries
from smoothguide._array import as_backend, device_of, namespace
from smoothguide.perturbations import IdentityAttention, Perturbation, QuerySmoothing

SIGMA_DATA = 0.5


class ToyAttentionDenoiser:
    """``model(x, sigma, class_labels=None) -> denoised`` with two attention layers.

    Parameters
    ----------
    xp
        Array namespace the weights live in.
    height, width, channels, dim, num_classes
        Image grid, image channels, attention width, number of real classes.
    seed
        Seed of the random weights.
    dtype, device
        Of the weights (default float64 / the namespace's default device).

    Attributes
    ----------
    calls
        Batch size of every forward call, in order.
    perturbed
        For every forward call, the ``(perturbation, rows)`` pairs active in it.

    Examples
    --------
    >>> import array_api_compat.numpy as xp
    >>> m = ToyAttentionDenoiser(xp, 2, 3)
    >>> m(np.zeros((1, 2, 2, 3)), 1.0).shape, m.calls
    ((1, 2, 2, 3), [1])
    """

    layer_names: tuple[str, ...] = ("attn0", "attn1")

    def __init__(
        self,
        xp: Any,
        height: int,
        width: int,
        channels: int = 2,
        dim: int = 8,
        num_classes: int = 3,
        *,
        seed: int = 0,
        dtype: Any = None,
        device: Any = None,
    ) -> None:
        rng = np.random.default_rng(seed)
        dtype = xp.float64 if dtype is None else dtype
        self.xp = xp
        self.grid = TokenGrid(height, width)
        self.channels, self.dim, self.num_classes = channels, dim, num_classes

        def w(*shape: int, scale: float) -> Any:
            return as_backend(rng.normal(0.0, scale, size=shape), xp, dtype=dtype, device=device)

        self.w_in = w(channels, dim, scale=1.0)
        self.w_out = w(dim, channels, scale=0.2 / math.sqrt(dim))
        self.embed = w(num_classes + 1, dim, scale=1.0)
        self.layers = {
            name: tuple(w(dim, dim, scale=1.5 / math.sqrt(dim)) for _ in range(4))
            for name in self.layer_names
        }
        self.calls: list[int] = []
        self.perturbed: list[tuple[tuple[Perturbation, tuple[int, ...]], ...]] = []
        self._active: list[tuple[Perturbation, tuple[int, ...], tuple[str, ...]]] = []

    # -- the Perturber protocol --------------------------------------------------------------

    @contextmanager
    def perturb(self, perturbation: Perturbation, rows: Sequence[int]) -> Iterator[None]:
        """Apply ``perturbation`` to batch ``rows`` of the forward calls inside the block."""
        if not isinstance(perturbation, QuerySmoothing | IdentityAttention):
            raise TypeError(
                "the toy model executes QuerySmoothing and IdentityAttention, "
                f"got {type(perturbation).__name__}"
            )
        if perturbation.heads is not None:  # one head: a head subset is not meaningful here
            raise ValueError("the toy model has a single attention head; heads must be None")
        layers = self.layer_names if perturbation.layers is None else perturbation.layers
        unknown = [n for n in layers if n not in self.layer_names]
        if unknown:
            raise ValueError(f"unknown layers {unknown}; available: {list(self.layer_names)}")
        rows = tuple(int(r) for r in rows)
        taken = {r for _, rs, _ in self._active for r in rs}
        if taken & set(rows):
            raise ValueError(f"rows {sorted(taken & set(rows))} are already perturbed")
        entry = (perturbation, rows, tuple(layers))
        self._active.append(entry)
        try:
            yield
        finally:
            self._active.remove(entry)

    # -- the denoiser ------------------------------------------------------------------------

    def __call__(self, x: Any, sigma: Any, class_labels: Any = None) -> Any:
        xp = namespace(x)
        b, c, h, w = x.shape
        if (h, w) != (self.grid.height, self.grid.width) or c != self.channels:
            raise ValueError(f"x must have shape (batch, {self.channels}, {h}, {w})")
        for _, rows, _ in self._active:
            if rows and max(rows) >= b:
                raise ValueError(f"perturbed rows {rows} outside a batch of {b}")
        self.calls.append(int(b))
        self.perturbed.append(tuple((p, rows) for p, rows, _ in self._active))
        s = self._sigma(xp, sigma, b, x)
        c_in = 1.0 / xp.sqrt(s**2 + SIGMA_DATA**2)
        c_skip = SIGMA_DATA**2 / (s**2 + SIGMA_DATA**2)
        c_out = s * SIGMA_DATA / xp.sqrt(s**2 + SIGMA_DATA**2)
        tokens = xp.permute_dims(xp.reshape(x * c_in, (b, c, h * w)), (0, 2, 1))
        t = xp.matmul(tokens, self.w_in)
        if class_labels is not None:
            t = t + xp.take(self.embed, class_labels, axis=0)[:, None, :]
        for name in self.layer_names:
            t = t + self._attention(xp, name, t)
        out = xp.reshape(xp.permute_dims(xp.matmul(t, self.w_out), (0, 2, 1)), (b, c, h, w))
        return c_skip * x + c_out * out

    def _sigma(self, xp: Any, sigma: Any, b: int, x: Any) -> Any:
        s = xp.asarray(sigma, dtype=x.dtype, device=device_of(x))
        if s.ndim == 0:
            s = xp.broadcast_to(s, (b,))
        return xp.reshape(s, (b, 1, 1, 1))

    def _rows_perturbation(self, name: str, row: int) -> Perturbation | None:
        for p, rows, layers in self._active:
            if row in rows and name in layers:
                return p
        return None

    def _attention(self, xp: Any, name: str, t: Any) -> Any:
        wq, wk, wv, wo = self.layers[name]
        q, k, v = xp.matmul(t, wq), xp.matmul(t, wk), xp.matmul(t, wv)
        plain = attention(q, k, v)
        if not any(name in layers for _, _, layers in self._active):
            return xp.matmul(plain, wo)
        rows = []
        for i in range(t.shape[0]):
            p = self._rows_perturbation(name, i)
            if p is None:
                rows.append(plain[i : i + 1, ...])
            elif isinstance(p, IdentityAttention):  # soft PAG: (1 - w) A V + w V
                att = attention(q[i : i + 1, ...], k[i : i + 1, ...], v[i : i + 1, ...])
                w = p.weight
                rows.append(
                    v[i : i + 1, ...] if w == 1.0 else (1.0 - w) * att + w * v[i : i + 1, ...]
                )
            else:
                assert isinstance(p, QuerySmoothing)
                q_i = smooth_queries(
                    q[i : i + 1, ...],
                    self.grid,
                    p.absolute_sigma(self.grid),
                    radius=p.radius,
                    mode=p.mode,
                )
                rows.append(attention(q_i, k[i : i + 1, ...], v[i : i + 1, ...]))
        out = rows[0] if len(rows) == 1 else xp.concat(rows, axis=0)
        return xp.matmul(out, wo)
