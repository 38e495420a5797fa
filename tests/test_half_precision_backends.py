"""SEG and PAG in float16 / bfloat16 models: no worse than plain half-precision inference.

The reference is the float32 model. Plain bf16/fp16 inference already differs from it
(``err_plain``, measured here on the same model and inputs); SEG and PAG in half
precision must stay within a small multiple of that error of their float32 results
(the blur accumulates in float32, so it adds no error of its own beyond one rounding).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from typing import Any

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from smoothguide import IdentityAttention, QuerySmoothing, TokenGrid  # noqa: E402
from smoothguide.diffusers import patcher_for  # noqa: E402
from smoothguide.torch import smooth_queries  # noqa: E402
from test_diffusers_transformers import inputs, make_flux, make_sd3, run  # noqa: E402
from test_diffusers_unet import inputs as unet_inputs  # noqa: E402
from test_diffusers_unet import run as unet_run  # noqa: E402
from test_diffusers_unet import tiny_unet  # noqa: E402

HALF = (torch.bfloat16, torch.float16)
#: SEG/PAG in half precision may be this many times as far from float32 as plain inference.
FACTOR = 2.0


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def cast(kw: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    return {
        k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
        for k, v in kw.items()
    }


def branches(model: torch.nn.Module, kw: dict[str, Any], sigma: Any) -> dict[str, torch.Tensor]:
    p = patcher_for(model)
    with p.perturb(QuerySmoothing(sigma, layers=p.layers), rows=[1]):
        seg = run(model, kw)
    with p.perturb(IdentityAttention(layers=p.layers), rows=[1]):
        pag = run(model, kw)
    return {"plain": run(model, kw), "seg": seg, "pag": pag}


def errors(half: dict[str, torch.Tensor], full: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float((half[k].float() - full[k]).abs().max()) for k in full}


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize(("family", "backend"), [("flux", "native"), ("flux", "_native_math"),
                                                 ("sd3", "native")])  # fmt: skip
def test_transformers_half_precision_error_is_that_of_plain_inference(
    family: str, backend: str, dtype: torch.dtype
) -> None:
    model = make_flux() if family == "flux" else make_sd3(num_layers=2)
    if family == "flux":
        model.set_attention_backend(backend)
    kw = inputs(family, model, 2, (3, 5))
    full = branches(model, kw, (1.0, 1.5))
    half_model = copy.deepcopy(model).to(dtype)
    half = branches(half_model, cast(kw, dtype), (1.0, 1.5))
    assert all(v.dtype == dtype and torch.isfinite(v).all() for v in half.values())
    err = errors(half, full)
    scale = float(full["plain"].abs().max())
    assert err["plain"] > 0  # the comparison below is against a real, measured error
    for name in ("seg", "pag"):
        assert err[name] <= FACTOR * err["plain"] + 8 * torch.finfo(dtype).eps * scale, err
        # in half precision too, the other row is untouched and the perturbed one changes
        assert torch.equal(half[name][0], half["plain"][0])
        assert not torch.equal(half[name][1], half["plain"][1])


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_unet_half_precision_error_is_that_of_plain_inference(dtype: torch.dtype) -> None:
    unet = tiny_unet()
    x, t, ehs = unet_inputs(8, 16)
    p = patcher_for(unet)

    def outs(model: Any, x: Any, ehs: Any) -> dict[str, torch.Tensor]:
        pm = patcher_for(model)
        with pm.perturb(QuerySmoothing(2.0, layers=p.layers), rows=[2]):
            seg = unet_run(model, x, t, ehs)
        with pm.perturb(IdentityAttention(layers=p.layers), rows=[2]):
            pag = unet_run(model, x, t, ehs)
        return {"plain": unet_run(model, x, t, ehs), "seg": seg, "pag": pag}

    full = outs(unet, x, ehs)
    half = outs(copy.deepcopy(unet).to(dtype), x.to(dtype), ehs.to(dtype))
    err = errors(half, full)
    scale = float(full["plain"].abs().max())
    assert err["plain"] > 0
    for name in ("seg", "pag"):
        assert err[name] <= FACTOR * err["plain"] + 8 * torch.finfo(dtype).eps * scale, err


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_half_precision_blur_accumulates_in_float32(dtype: torch.dtype) -> None:
    """bf16/fp16 queries: the blur equals the float32 blur of the same values, rounded once."""
    gen = torch.Generator().manual_seed(0)
    # large values: a sum in half precision would overflow (fp16) or lose digits (bf16)
    q = (torch.randn(2, 3, 6 * 10 + 4, 8, generator=gen) * 3e3).to(dtype)
    grid = TokenGrid(6, 10, suffix=4)
    for sigma in (1.0, 3.0, math.inf):
        got = smooth_queries(q, grid, sigma)
        want = smooth_queries(q.float(), grid, sigma).to(dtype)
        assert got.dtype == dtype
        assert torch.equal(got, want)
