"""Skip-layer perturbation: run chosen blocks (or their attention / feed-forward) as the identity.

Skip-layer guidance (SLG; Stability AI, SD3.5) and spatio-temporal skip
guidance (STG; Hyung et al., arXiv:2411.18664) build their weaker prediction
by skipping parts of the network on one branch: a module that is skipped
returns its input unchanged, as diffusers' ``LayerSkipConfig`` hooks do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .perturbations import Perturbation

__all__ = ["SKIPS", "LayerSkip", "Skip"]

Skip = Literal["block", "attention", "ff"]
#: Accepted values of ``LayerSkip(skip=...)``.
SKIPS: tuple[str, ...] = ("block", "attention", "ff")


@dataclass(frozen=True)
class LayerSkip(Perturbation):
    """Skip the blocks that hold the selected attention layers, or parts of them.

    Layers are selected exactly as for SEG and PAG (attention-layer names and
    the model family's presets, e.g. SD3's ``"block.7"``); each selected
    attention layer names what is skipped:

    ``"block"`` (default; SLG of SD3.5, STG-R)
        the transformer block that holds the layer (its parent module) returns
        its input hidden states (image and, for joint blocks, text) unchanged:
        the whole residual branch ``x + f(x)`` becomes ``x``.
    ``"attention"``
        the attention module returns its input (``hidden_states``, and
        ``encoder_hidden_states`` for joint attention): its residual adds the
        normalised input instead of the attention output (diffusers'
        ``skip_attention``).
    ``"ff"``
        the block's feed-forward modules (``ff``, ``ff_context`` of joint blocks,
        ``ffn``, or any ``FeedForward`` inside it) return their input (diffusers'
        ``skip_ff``).

    Only the perturbed branch's batch rows are changed. For STG-A (the
    attention map replaced by the identity) use
    :class:`~smoothguide.perturbations.IdentityAttention`.

    Parameters
    ----------
    skip
        ``"block"``, ``"attention"`` or ``"ff"``.
    layers
        See :class:`~smoothguide.perturbations.Perturbation`.

    Examples
    --------
    >>> LayerSkip(layers=("block.7", "block.8")).skip
    'block'
    >>> LayerSkip("ff").layers is None
    True
    """

    skip: Skip = "block"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.skip not in SKIPS:
            raise ValueError(f"skip must be one of {SKIPS}, got {self.skip!r}")
