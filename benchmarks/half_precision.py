"""Error of SEG / PAG in bfloat16 / float16 against float32, next to that of plain inference.

Tiny random-weight diffusers models (the test configs), CPU. Prints, per model and dtype,
max |half - float32| of the plain, SEG (σ = (1, 1.5)) and PAG outputs, relative to
max |float32 plain|. Run: ``HF_HUB_OFFLINE=1 python benchmarks/half_precision.py``.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_diffusers_transformers import inputs, make_flux, make_sd3
from test_half_precision_backends import branches, cast, errors


def main() -> None:
    torch.set_num_threads(1)
    print("| model (backend) | dtype | plain | SEG | PAG |")
    print("|---|---|---|---|---|")
    for family, backend in (("flux", "native"), ("flux", "flex"), ("sd3", "native")):
        model = make_flux() if family == "flux" else make_sd3(num_layers=2)
        if family == "flux":
            model.set_attention_backend(backend)
        kw = inputs(family, model, 2, (3, 5))
        full = branches(model, kw, (1.0, 1.5))
        scale = float(full["plain"].abs().max())
        for dtype in (torch.bfloat16, torch.float16):
            half = branches(copy.deepcopy(model).to(dtype), cast(kw, dtype), (1.0, 1.5))
            err = errors(half, full)
            cells = " | ".join(f"{err[k] / scale:.2e}" for k in ("plain", "seg", "pag"))
            print(f"| {family} ({backend}) | {str(dtype).removeprefix('torch.')} | {cells} |")


if __name__ == "__main__":
    main()
