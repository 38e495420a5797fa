"""Sampling: a guided denoiser over the k-diffusion contract, and minimal samplers.

:class:`GuidedDenoiser` turns ``model(x, sigma, **cond)`` plus a guidance rule
into a guided denoiser with the same contract; :func:`sample_euler` and
:func:`sample_ddim` (generator forms :func:`euler_steps`, :func:`ddim_steps`)
run any such denoiser on any array-API backend.
"""

from .denoiser import GuidedDenoiser, SteppableDenoiser, batch_order
from .samplers import (
    SamplerStep,
    ddim_steps,
    euler_steps,
    karras_sigmas,
    sample_ddim,
    sample_euler,
)

__all__ = [
    "GuidedDenoiser",
    "SamplerStep",
    "SteppableDenoiser",
    "batch_order",
    "ddim_steps",
    "euler_steps",
    "karras_sigmas",
    "sample_ddim",
    "sample_euler",
]
