"""Minimal Euler and DDIM samplers over the k-diffusion denoiser contract, in the array API.

Both samplers integrate from ``sigmas[0]`` down to ``sigmas[-1]`` (usually 0)
with a denoiser ``model(x, sigma, **extra_args) -> denoised``. When the model is
a :class:`~smoothguide.sampling.SteppableDenoiser` (e.g. a
:class:`~smoothguide.sampling.GuidedDenoiser`) they pass it the step index, for
schedules on sampling progress, and keep the rule's state (APG momentum) local
to the run, so one denoiser can serve several runs at once.

Each sampler has a generator form (``euler_steps``, ``ddim_steps``) that yields
after every step, and a function form (``sample_euler``, ``sample_ddim``) that
runs to the end with an optional tqdm progress bar.
"""

from __future__ import annotations

import importlib.util
import math
import numbers
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._array import Array, as_backend, device_of, namespace, require_floating
from ..rules._prediction import split_prediction
from ..rules.base import StepContext
from .denoiser import SteppableDenoiser, _sigma_list

__all__ = [
    "SamplerStep",
    "ddim_steps",
    "euler_steps",
    "karras_sigmas",
    "sample_ddim",
    "sample_euler",
]

NoiseSampler = Callable[[float, float], Array]


@dataclass(frozen=True)
class SamplerStep:
    """What a sampler generator yields after each step.

    Attributes
    ----------
    index
        Step index ``i`` (0-based).
    sigma, sigma_next
        The step went from ``sigmas[i]`` to ``sigmas[i + 1]``.
    x
        The sample at ``sigma_next``.
    denoised
        The denoiser's prediction at ``sigma``.

    Examples
    --------
    >>> import numpy as np
    >>> step = next(euler_steps(lambda x, sigma: 0 * x, np.ones((1, 1)), [1.0, 0.0]))
    >>> step.index, step.sigma, step.sigma_next, step.x
    (0, 1.0, 0.0, array([[0.]]))
    """

    index: int
    sigma: float
    sigma_next: float
    x: Array
    denoised: Array


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> list[float]:
    """The noise levels of Karras et al. 2022 (EDM, Eq. 5), with a final 0 appended.

    ``σ_i = (σ_max^{1/ρ} + i/(n−1) (σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ`` for
    ``i = 0..n−1``, then ``0``: ``n`` denoiser evaluations.

    Parameters
    ----------
    n
        Number of steps, ``>= 1`` (``n = 1`` gives ``[σ_max, 0]``).
    sigma_min, sigma_max
        ``0 < sigma_min < sigma_max`` (only ``sigma_max`` is used when ``n = 1``).
    rho
        Curvature ``ρ > 0`` (EDM: 7).

    Returns
    -------
    list of float
        ``n + 1`` strictly decreasing levels ending at 0.

    Examples
    --------
    >>> [round(s, 4) for s in karras_sigmas(3, 0.1, 10.0)]
    [10.0, 1.4507, 0.1, 0.0]
    """
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    for name, v in (("sigma_min", sigma_min), ("sigma_max", sigma_max), ("rho", rho)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0 < v < math.inf:
            raise ValueError(f"{name} must be a finite real number > 0, got {v!r}")
    # Python floats from here on: NumPy scalars would leak into the returned list.
    sigma_min, sigma_max, rho, n = float(sigma_min), float(sigma_max), float(rho), int(n)
    if n == 1:
        return [sigma_max, 0.0]
    if sigma_min >= sigma_max:
        raise ValueError(f"sigma_min must be < sigma_max, got {sigma_min} >= {sigma_max}")
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    out = [(hi + i / (n - 1) * (lo - hi)) ** rho for i in range(n)]
    out[0], out[-1] = float(sigma_max), float(sigma_min)
    return [*out, 0.0]


def _check_x(x: Array) -> Any:
    xp = namespace(x)
    require_floating(xp, x, "x")
    if x.ndim < 1:
        raise ValueError(f"x must have a leading batch axis, got shape {tuple(x.shape)}")
    return xp


def _check_extra(extra_args: Mapping[str, Any] | None) -> dict[str, Any]:
    if extra_args is None:
        return {}
    if not isinstance(extra_args, Mapping):
        raise TypeError(f"extra_args must be None or a mapping, got {extra_args!r}")
    return dict(extra_args)


class _Denoise:
    """Calls ``model`` at step ``i``, threading the state of a steppable denoiser."""

    def __init__(self, model: Any, extra: dict[str, Any], num_steps: int) -> None:
        if not callable(model) and not isinstance(model, SteppableDenoiser):
            raise TypeError(f"model must be callable as model(x, sigma, **cond), got {model!r}")
        self.model = model
        self.extra = extra
        self.num_steps = num_steps
        self.steppable = isinstance(model, SteppableDenoiser)
        self.state = model.init_state() if self.steppable else None

    def __call__(self, xp: Any, x: Array, sigma: float, i: int) -> tuple[Array, Array | None]:
        """``(denoised, renoise)``; ``renoise`` is ``None`` unless the rule gave a Prediction."""
        s = xp.full((x.shape[0],), sigma, dtype=x.dtype, device=device_of(x))
        if not self.steppable:
            return split_prediction(self.model(x, s, **self.extra))
        ctx = StepContext(sigma, step=i, num_steps=self.num_steps)
        out, self.state = self.model.step(x, s, self.extra, ctx=ctx, state=self.state)
        return split_prediction(out)


def euler_steps(
    model: Callable[..., Array],
    x: Array,
    sigmas: Sequence[float] | Array,
    *,
    extra_args: Mapping[str, Any] | None = None,
) -> Iterator[SamplerStep]:
    """Euler's method for the probability-flow ODE, one yield per step.

    Karras et al. 2022 (EDM), Algorithm 1 without the Heun correction, as in
    k-diffusion's ``sample_euler``: ``d = (x − D(x, σ_i))/σ_i`` and
    ``x ← x + (σ_{i+1} − σ_i) d``. A rule that returns a
    :class:`~smoothguide.rules.Prediction` (CFG++) gets
    ``x ← D + σ_{i+1} (x − D_r)/σ_i`` instead, ``D_r`` its ``renoise``
    (k-diffusion's ``sample_euler_cfg_pp``).

    Parameters
    ----------
    model
        Denoiser ``model(x, sigma, **extra_args)``, or a
        :class:`~smoothguide.sampling.SteppableDenoiser`.
    x
        Initial sample at ``sigmas[0]`` (noise times ``sigmas[0]``), shape ``(batch, ...)``.
    sigmas
        Strictly decreasing noise levels ``>= 0``, e.g. :func:`karras_sigmas`.
    extra_args
        Keyword arguments for the model (the ``"cond"`` branch of a guided denoiser).

    Yields
    ------
    SamplerStep
        After each of the ``len(sigmas) − 1`` steps.

    Examples
    --------
    >>> import numpy as np
    >>> model = lambda x, sigma: x / (1 + sigma[:, None] ** 2)  # data ~ N(0, 1)
    >>> steps = list(euler_steps(model, np.ones((1, 2)), [2.0, 1.0, 0.0]))
    >>> len(steps), steps[-1].sigma_next
    (2, 0.0)
    """
    xp = _check_x(x)
    levels = _sigma_list(sigmas, "sigmas")
    denoise = _Denoise(model, _check_extra(extra_args), len(levels) - 1)
    return _euler(xp, denoise, x, levels)


def _euler(xp: Any, denoise: _Denoise, x: Array, levels: list[float]) -> Iterator[SamplerStep]:
    for i in range(len(levels) - 1):
        s, s_next = levels[i], levels[i + 1]
        denoised, renoise = denoise(xp, x, s, i)
        if renoise is None:
            d = (x - denoised) / s
            x = x + (s_next - s) * d
        else:  # CFG++: step to the guided x0, re-add the noise of the `renoise` prediction
            x = denoised + s_next * ((x - renoise) / s)
        yield SamplerStep(i, s, s_next, x, denoised)


def _default_noise(x: Array, seed: int | None) -> NoiseSampler:
    xp = namespace(x)
    rng = np.random.default_rng(seed)
    shape, dtype, device = tuple(x.shape), x.dtype, device_of(x)

    def sample(sigma: float, sigma_next: float) -> Array:
        return as_backend(rng.standard_normal(shape), xp, dtype=dtype, device=device)

    return sample


def ddim_steps(
    model: Callable[..., Array],
    x: Array,
    sigmas: Sequence[float] | Array,
    *,
    eta: float = 0.0,
    noise_sampler: NoiseSampler | None = None,
    seed: int | None = None,
    extra_args: Mapping[str, Any] | None = None,
) -> Iterator[SamplerStep]:
    """DDIM (Song et al. 2021, Eq. 12) in the σ parameterisation, one yield per step.

    With ``ε̂ = (x − D(x, σ))/σ``, the DDIM step from σ to σ' with
    stochasticity η is, in ``x = x0 + σ ε`` form::

        σ_up   = min(σ', η · sqrt(σ'² (σ² − σ'²) / σ²))
        σ_down = sqrt(σ'² − σ_up²)
        x'     = D(x, σ) + σ_down ε̂ + σ_up z,      z ~ N(0, I)

    (the VP DDIM variance ``η² (1−ᾱ')/(1−ᾱ) (1 − ᾱ/ᾱ')`` divided by ``ᾱ'``,
    with ``ᾱ = 1/(1 + σ²)``; this equals k-diffusion's ancestral step). ``η = 0``
    is deterministic DDIM, mathematically the Euler step. A rule that returns a
    :class:`~smoothguide.rules.Prediction` (CFG++) has ``ε̂`` computed from its
    ``renoise`` prediction (Chung et al. 2025, Algorithm 1).

    Parameters
    ----------
    model, x, sigmas, extra_args
        As in :func:`euler_steps`.
    eta
        ``η >= 0`` (0: deterministic, 1: DDPM-like).
    noise_sampler
        ``noise_sampler(sigma, sigma_next) -> array`` shaped like ``x`` (same
        backend, dtype, device); default: NumPy's ``default_rng(seed)``.
    seed
        Seed of the default noise sampler.

    Yields
    ------
    SamplerStep
        After each step.

    Examples
    --------
    >>> import numpy as np
    >>> model = lambda x, sigma: x / (1 + sigma[:, None] ** 2)
    >>> last = list(ddim_steps(model, np.ones((1, 2)), [2.0, 1.0, 0.0]))[-1]
    >>> last.x
    array([[0.3, 0.3]])
    """
    xp = _check_x(x)
    levels = _sigma_list(sigmas, "sigmas")
    if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or not 0 <= eta < math.inf:
        raise ValueError(f"eta must be a finite real number >= 0, got {eta!r}")
    if noise_sampler is not None and not callable(noise_sampler):
        raise TypeError(
            f"noise_sampler must be callable (sigma, sigma_next) -> array, got {noise_sampler!r}"
        )
    denoise = _Denoise(model, _check_extra(extra_args), len(levels) - 1)
    return _ddim(xp, denoise, x, levels, float(eta), noise_sampler, seed)


def _ddim(
    xp: Any,
    denoise: _Denoise,
    x: Array,
    levels: list[float],
    eta: float,
    noise_sampler: NoiseSampler | None,
    seed: int | None,
) -> Iterator[SamplerStep]:
    for i in range(len(levels) - 1):
        s, s_next = levels[i], levels[i + 1]
        denoised, renoise = denoise(xp, x, s, i)
        sigma_up = min(s_next, eta * math.sqrt(s_next**2 * (s**2 - s_next**2) / s**2))
        sigma_down = math.sqrt(s_next**2 - sigma_up**2)
        # CFG++ re-noises with the `renoise` prediction's noise estimate instead of the guided one.
        x = denoised + (sigma_down / s) * (x - (denoised if renoise is None else renoise))
        if sigma_up > 0.0:
            if noise_sampler is None:
                noise_sampler = _default_noise(x, seed)
            x = x + sigma_up * noise_sampler(s, s_next)
        yield SamplerStep(i, s, s_next, x, denoised)


def _progress_bar(progress: bool | None, total: int, desc: str) -> Any:
    """A tqdm bar, or ``None``: ``progress=None`` shows one if tqdm is installed."""
    if isinstance(progress, np.bool_):  # NumPy's bool scalar, like a Python bool
        progress = bool(progress)
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"progress must be True, False or None, got {progress!r}")
    if progress is False:
        return None
    if importlib.util.find_spec("tqdm") is None:
        if progress:
            raise ImportError(
                "progress=True needs tqdm: pip install tqdm (part of the torch extra), "
                "or pass progress=False"
            )
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc)


def _run(
    steps: Iterator[SamplerStep],
    total: int,
    x: Array,
    progress: bool | None,
    callback: Callable[[SamplerStep], None] | None,
    desc: str,
) -> Array:
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be None or callable(SamplerStep), got {callback!r}")
    bar = _progress_bar(progress, total, desc)
    try:
        for st in steps:
            x = st.x
            if callback is not None:
                callback(st)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return x


def sample_euler(
    model: Callable[..., Array],
    x: Array,
    sigmas: Sequence[float] | Array,
    *,
    extra_args: Mapping[str, Any] | None = None,
    progress: bool | None = None,
    callback: Callable[[SamplerStep], None] | None = None,
) -> Array:
    """Run :func:`euler_steps` to the end and return the final sample.

    Parameters
    ----------
    model, x, sigmas, extra_args
        As in :func:`euler_steps`.
    progress
        ``True``: a tqdm progress bar (``ImportError`` if tqdm is missing);
        ``False``: none; ``None`` (default): a bar when tqdm is installed.
    callback
        Called with each :class:`SamplerStep`.

    Returns
    -------
    array
        The sample at ``sigmas[-1]``, same backend, dtype and device as ``x``.

    Examples
    --------
    >>> import numpy as np
    >>> model = lambda x, sigma: x / (1 + sigma[:, None] ** 2)
    >>> sample_euler(model, np.ones((1, 2)), [2.0, 1.0, 0.0], progress=False)
    array([[0.3, 0.3]])
    """
    levels = _sigma_list(sigmas, "sigmas")
    steps = euler_steps(model, x, levels, extra_args=extra_args)
    return _run(steps, len(levels) - 1, x, progress, callback, "euler")


def sample_ddim(
    model: Callable[..., Array],
    x: Array,
    sigmas: Sequence[float] | Array,
    *,
    eta: float = 0.0,
    noise_sampler: NoiseSampler | None = None,
    seed: int | None = None,
    extra_args: Mapping[str, Any] | None = None,
    progress: bool | None = None,
    callback: Callable[[SamplerStep], None] | None = None,
) -> Array:
    """Run :func:`ddim_steps` to the end and return the final sample.

    Parameters
    ----------
    model, x, sigmas, eta, noise_sampler, seed, extra_args
        As in :func:`ddim_steps`.
    progress, callback
        As in :func:`sample_euler`.

    Returns
    -------
    array
        The sample at ``sigmas[-1]``.

    Examples
    --------
    >>> import numpy as np
    >>> model = lambda x, sigma: x / (1 + sigma[:, None] ** 2)
    >>> sample_ddim(model, np.ones((1, 2)), [2.0, 1.0, 0.0], progress=False)
    array([[0.3, 0.3]])
    """
    levels = _sigma_list(sigmas, "sigmas")
    steps = ddim_steps(
        model, x, levels, eta=eta, noise_sampler=noise_sampler, seed=seed, extra_args=extra_args
    )
    return _run(steps, len(levels) - 1, x, progress, callback, "ddim")
