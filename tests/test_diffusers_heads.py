"""Per-head and resolution-relative SEG on joint attention (tiny SD3, Flux), vs hand processors.

The reference is the hand-written attention processors of
``test_diffusers_transformers`` (float64 attention, SciPy blur of the image-token
queries of chosen rows), restricted here to chosen heads.
"""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from smoothguide import QuerySmoothing  # noqa: E402
from smoothguide.diffusers import patcher_for  # noqa: E402
from test_diffusers_transformers import (  # noqa: E402
    MAKERS,
    SIZES,
    Edit,
    assert_close,
    assert_differs,
    grid3,
    inputs,
    reference_model,
    run,
)


class HeadEdit(Edit):
    """``Edit`` on the heads ``heads`` only."""

    def __init__(self, rows: list[int], grid: Any, sigma: Any, heads: tuple[int, ...]) -> None:
        super().__init__(rows, grid, sigma)
        self.heads = list(heads)

    def __call__(self, q: torch.Tensor, start: int) -> torch.Tensor:
        blurred = super().__call__(q, start)
        out = q.clone()
        out[:, self.heads] = blurred[:, self.heads]
        return out


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    return {name: MAKERS[name]() for name in ("sd3", "flux")}


@pytest.mark.parametrize("family", ["sd3", "flux"])
@pytest.mark.parametrize(("sigma", "relative"), [(1.5, False), (0.4, True)])
def test_per_head_and_relative_seg_equal_hand_processors(
    models: dict[str, torch.nn.Module], family: str, sigma: float, relative: bool
) -> None:
    model = models[family]
    h, w = SIZES[family]
    kw = inputs(family, model, 2, (h, w))
    patcher = patcher_for(model)
    layer = patcher.default[0]
    absolute = sigma * min(h, w) if relative else sigma
    ref = reference_model(
        family, model, (layer,), HeadEdit([1], grid3((h, w)), absolute, (1,)), n_img=h * w
    )
    expected = run(ref, kw)
    plain = run(model, kw)
    p = QuerySmoothing(sigma, heads=(1,), relative=relative, layers=layer)
    with patcher.perturb(p, rows=[1]):
        out = run(model, kw)
    err = assert_close(out, expected)
    assert torch.equal(out[0], plain[0])
    assert_differs(out[1], plain[1], err)
    with patcher.perturb(QuerySmoothing(absolute, layers=layer), rows=[1]):
        every_head = run(model, kw)
    assert_differs(out[1], every_head[1], err)
