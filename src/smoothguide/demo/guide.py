"""Guiding the demo model through the public API: rules + torch adapter + sampler.

Nothing here is specific to the demo's guidance: the rule is any
:mod:`smoothguide.rules` rule, the perturber is the public
:class:`smoothguide.torch.AttentionPatcher` over the DiT's attention modules,
and sampling is :func:`smoothguide.sampling.sample_euler` over a
:class:`smoothguide.sampling.GuidedDenoiser` — the same path a user takes with
their own model.
"""

from __future__ import annotations

from typing import Any

from ..sampling import GuidedDenoiser, karras_sigmas, sample_euler
from ..torch import AttentionPatcher
from ._deps import torch
from .model import NULL_CLASS, SIGMA_MAX, SIGMA_MIN, Attention, DemoDenoiser

__all__ = ["DEFAULT_LAYERS", "demo_patcher", "demo_sigmas", "guided_sample", "layer_presets"]

#: The demo's default SEG / PAG layer selection (a preset of :func:`layer_presets`).
DEFAULT_LAYERS = "all"


def layer_presets(depth: int) -> dict[str, tuple[str, ...]]:
    """Named groups of the DiT's attention layers: all, early, middle, late.

    With ``mid = depth // 2``: ``early`` is blocks ``0 .. mid-1``, ``middle`` is
    block ``mid`` and ``late`` is blocks ``mid+1 .. depth-1``.

    Parameters
    ----------
    depth
        Number of DiT blocks, ``>= 3``.

    Returns
    -------
    dict of str to tuple of str
        Preset name -> module names ``blocks.{i}.attn``.

    Raises
    ------
    ValueError
        If ``depth`` is not an int ``>= 3``.

    Examples
    --------
    >>> layer_presets(5)["middle"]
    ('blocks.2.attn',)
    >>> layer_presets(5)["late"]
    ('blocks.3.attn', 'blocks.4.attn')
    """
    if not isinstance(depth, int) or depth < 3:
        raise ValueError(f"depth must be an int >= 3, got {depth!r}")
    names = tuple(f"blocks.{i}.attn" for i in range(depth))
    mid = depth // 2
    return {
        "all": names,
        "early": names[:mid],
        "middle": (names[mid],),
        "late": names[mid + 1 :],
    }


def demo_patcher(denoiser: DemoDenoiser, default: Any = DEFAULT_LAYERS) -> AttentionPatcher:
    """The public :class:`~smoothguide.torch.AttentionPatcher` over the demo DiT.

    Layers are the DiT's :class:`~smoothguide.demo.model.Attention` modules
    (``blocks.0.attn`` ...), with the presets of :func:`layer_presets`; the
    8x8 token grid comes from the 16x16 input at each call.

    Parameters
    ----------
    denoiser
        The :class:`~smoothguide.demo.model.DemoDenoiser` whose ``model`` is patched.
    default
        Layers used by rules that name none: a preset name of :func:`layer_presets`
        or module names (default :data:`DEFAULT_LAYERS`, ``"all"``).

    Returns
    -------
    smoothguide.torch.AttentionPatcher
        The perturber to pass to :class:`~smoothguide.sampling.GuidedDenoiser`.

    Examples
    --------
    >>> from smoothguide.demo.model import DemoDiT, DiTConfig
    >>> den = DemoDenoiser(DemoDiT(DiTConfig(hidden=32, depth=3, heads=2)))
    >>> demo_patcher(den).layers
    ('blocks.0.attn', 'blocks.1.attn', 'blocks.2.attn')
    """
    presets = layer_presets(denoiser.model.config.depth)
    return AttentionPatcher(denoiser.model, layers=Attention, presets=presets, default=default)


def demo_sigmas(steps: int) -> list[float]:
    """Karras noise levels over the trained range, ``steps`` denoiser calls.

    :func:`smoothguide.sampling.karras_sigmas` (Karras et al. 2022, EDM Eq. 5, rho = 7) from
    :data:`~smoothguide.demo.model.SIGMA_MAX` down to
    :data:`~smoothguide.demo.model.SIGMA_MIN`, with a final 0 appended.

    Parameters
    ----------
    steps
        Number of sampler steps (denoiser calls), ``>= 1``.

    Returns
    -------
    list of float
        ``steps + 1`` decreasing noise levels, ``80.0`` first and ``0.0`` last.

    Examples
    --------
    >>> s = demo_sigmas(10)
    >>> len(s), s[0], s[-1]
    (11, 80.0, 0.0)
    """
    return karras_sigmas(steps, SIGMA_MIN, SIGMA_MAX)


@torch.no_grad()
def guided_sample(
    denoiser: DemoDenoiser,
    rule: Any,
    *,
    labels: Any,
    noise: Any,
    steps: int,
    patcher: AttentionPatcher | None = None,
    progress: bool = False,
) -> Any:
    """Sample with ``rule`` (``None``: the plain model) via the public guided denoiser.

    Parameters
    ----------
    denoiser
        The :class:`~smoothguide.demo.model.DemoDenoiser`.
    rule
        A :mod:`smoothguide.rules` rule, or ``None`` for no guidance.
    labels
        Class labels of shape ``(batch,)``; :data:`~smoothguide.demo.model.NULL_CLASS`
        for unconditional samples. The unconditional branch of CFG uses the null class.
    noise
        Standard normal noise of shape ``(batch, 1, 16, 16)`` (scaled by ``sigma_max``).
    steps
        Euler steps.
    patcher
        The perturber (default: :func:`demo_patcher` of ``denoiser``).
    progress
        Show the sampler's tqdm bar.

    Returns
    -------
    torch.Tensor
        Samples of shape ``(batch, 1, 16, 16)``, clamped to ``[-1, 1]``.

    Examples
    --------
    A tiny untrained DiT (its zero-initialised output layer predicts ``eps = 0``):

    >>> from smoothguide.demo.model import DemoDiT, DiTConfig
    >>> from smoothguide.rules import SEG
    >>> den = DemoDenoiser(DemoDiT(DiTConfig(hidden=32, depth=3, heads=2)))
    >>> noise = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    >>> x = guided_sample(den, None, labels=[3, NULL_CLASS], noise=noise, steps=2)
    >>> x.shape, bool(x.abs().max() <= 1)
    (torch.Size([2, 1, 16, 16]), True)
    >>> guided_sample(den, SEG(1.0, sigma=2.0), labels=[3, 3], noise=noise, steps=2).shape
    torch.Size([2, 1, 16, 16])
    """
    sigmas = demo_sigmas(steps)
    device = noise.device
    labels = torch.as_tensor(labels, dtype=torch.long, device=device)
    if rule is None:
        model: Any = denoiser
    else:
        uncond = {"class_labels": torch.full((1,), NULL_CLASS, dtype=torch.long, device=device)}
        model = GuidedDenoiser(
            denoiser, rule, uncond=uncond, perturber=patcher or demo_patcher(denoiser)
        )
    x = sample_euler(
        model,
        noise * sigmas[0],
        sigmas,
        extra_args={"class_labels": labels},
        progress=progress,
    )
    return x.clamp(-1, 1)
