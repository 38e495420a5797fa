"""Token permutation: shuffle the tokens of the hidden states entering chosen blocks (TPG).

Token Perturbation Guidance (Rajabi et al., "Token Perturbation Guidance for
Diffusion Models", NeurIPS 2025, arXiv:2506.10036) builds its weaker prediction
by permuting the image tokens that enter chosen transformer blocks. A
permutation keeps every token and its norm (it is norm-preserving, and the
token statistics are unchanged) but destroys their spatial arrangement.
"""

from __future__ import annotations

from dataclasses import dataclass

from .perturbations import Perturbation

__all__ = ["TokenPermutation"]


@dataclass(frozen=True)
class TokenPermutation(Perturbation):
    """Permute the tokens of the hidden states that enter the blocks of the selected layers.

    Layers are selected as for SEG and PAG (attention-layer names and presets);
    the block holding each one (its parent module) gets its ``hidden_states``
    input permuted along the token axis on the perturbed rows. On joint-attention
    models (SD3, Flux) ``hidden_states`` holds the image tokens only; the text
    stream (``encoder_hidden_states``) is left alone.

    The permutation of the ``k``-th selected block (in module order), for ``n``
    tokens, is ``torch.randperm(n, generator=torch.Generator().manual_seed(seed + k))``
    (CPU generator, so it is the same on every device), the same at every step
    and for every perturbed row: the perturbation is a fixed function of
    ``seed``.

    Parameters
    ----------
    seed
        Integer seed of the permutations (default 0).
    layers
        See :class:`~smoothguide.perturbations.Perturbation`.

    Examples
    --------
    >>> TokenPermutation(seed=3, layers="mid").seed
    3
    """

    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")
