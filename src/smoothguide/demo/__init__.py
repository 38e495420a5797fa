"""The embedded demo: a small class-conditional DiT trained on real MNIST digits.

Everything here needs the ``demo`` extra (torch, safetensors, tqdm, matplotlib, pillow;
``pip install torch==2.13.0 && pip install ".[demo]"`` from a checkout). The 5,000 real
MNIST images the model is trained on ship inside the package (``demo/mnist/``), so
nothing is downloaded at run time.

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
