"""Fork mode on PixArt / DiT: forked == unforked, and the fork really happened.

Both models modulate the last block's output with the time embedding in their
own ``forward`` (PixArt: ``scale_shift_table + embedded_timestep`` from
``adaln_single``, computed before the blocks; DiT: ``proj_out_1(emb(t, y))``
after them). Reference: the same GuidedDenoiser with ``fork=False`` (the plain
batched call, itself checked against the unpatched model in
test_diffusers_transformers.py). float64 within a few ulps per operation,
float32 within ``512 eps max|ref|`` (as tests/test_fork.py).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from smoothguide.diffusers import patcher_for  # noqa: E402
from smoothguide.diffusers.dit import DIT  # noqa: E402
from smoothguide.rules import CFG, PAG, SEG, Compose  # noqa: E402
from smoothguide.sampling import GuidedDenoiser  # noqa: E402
from smoothguide.sampling.forking import ForkSpec  # noqa: E402
from smoothguide.torch.fork import ForkPolicy  # noqa: E402
from test_diffusers_transformers import make_dit, make_pixart  # noqa: E402
from test_fork import Rows, close  # noqa: E402
from test_fork import _one_thread as _one_thread  # noqa: E402  (autouse: one torch thread)


class Den(torch.nn.Module):
    """k-diffusion-style wrapper ``x - σ ε(x, t(σ))`` (ε: the first 4 output channels)."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, sigma: Any, **cond: Any) -> torch.Tensor:
        s = torch.as_tensor(sigma, dtype=x.dtype).expand(x.shape[0])
        t = (torch.atan(s) * 600).long()
        eps = self.model(x, timestep=t, return_dict=False, **cond)[0][:, :4]
        return x - s[:, None, None, None] * eps


def make(family: str, dtype: torch.dtype = torch.float64, **kw: Any) -> Any:
    if family == "pixart" and kw:
        torch.manual_seed(0)
        base = dict(make_pixart().config)
        base.update(kw)
        model = diffusers.PixArtTransformer2DModel.from_config(base)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn_like(p) * 0.3)
        model = model.eval()
    else:
        model = {"pixart": make_pixart, "dit": make_dit}[family]()
    return model.to(dtype)


def conditioning(
    family: str, batch: int, dtype: torch.dtype, extra: bool = False
) -> tuple[dict[str, Any], dict[str, Any]]:
    g = torch.Generator().manual_seed(2)
    if family == "dit":
        return {"class_labels": torch.arange(batch) % 10 + 1}, {"class_labels": torch.tensor([10])}
    cond: dict[str, Any] = {
        "encoder_hidden_states": torch.randn(batch, 6, 16, generator=g, dtype=dtype)
    }
    uncond: dict[str, Any] = {
        "encoder_hidden_states": torch.randn(1, 6, 16, generator=g, dtype=dtype)
    }
    none = {"resolution": None, "aspect_ratio": None}
    if extra:  # PixArt-α's size conditions (resolution, aspect ratio) through adaln_single
        res = torch.tensor([[16.0, 24.0]], dtype=dtype)
        ar = torch.tensor([[1.5]], dtype=dtype)
        cond["added_cond_kwargs"] = {"resolution": res.expand(batch, 2), "aspect_ratio": ar}
        cond["added_cond_kwargs"]["aspect_ratio"] = ar.expand(batch, 1)
        uncond["added_cond_kwargs"] = {"resolution": res, "aspect_ratio": ar}
    else:
        cond["added_cond_kwargs"] = none
        uncond["added_cond_kwargs"] = none
    return cond, uncond


#: (id, rule, fork points); the DiT models have 3 (PixArt) and 2 (DiT) blocks
CASES = [
    ("cfg+seg", SEG(3.0, sigma=2.0, cfg_scale=4.0, layers="block.1"), ["transformer_blocks.1"]),
    ("seg-only", SEG(3.0, sigma=math.inf, layers="block.1"), ["transformer_blocks.1"]),
    (
        "paper-eq10",
        SEG(3.0, sigma=1.5, cfg_scale=4.0, convention="paper", layers="block.1"),
        ["transformer_blocks.1"],
    ),
    ("cfg+pag", Compose(CFG(3.0), PAG(2.0, layers="block.1")), ["transformer_blocks.1"]),
    ("pag-only", PAG(2.0, layers="block.1"), ["transformer_blocks.1"]),
    (
        "seg-first-block",
        SEG(2.0, sigma=1.0, cfg_scale=2.0, layers="block.0"),
        ["transformer_blocks.0"],
    ),
]
PIXART_CASES = [
    (
        "seg+pag",
        Compose(CFG(3.0), SEG(2.0, sigma=1.0, layers="block.1"), PAG(2.0, layers="block.2")),
        ["transformer_blocks.1", "transformer_blocks.2"],
    ),
    (
        "two-sigmas",
        Compose(CFG(3.0), SEG(2.0, sigma=2.0, layers="block.2"), SEG(1.0, sigma=math.inf)),
        ["transformer_blocks.1", "transformer_blocks.2"],
    ),
]


def run_both(
    family: str,
    rule: Any,
    points: list[str],
    batch: int,
    grid: tuple[int, int],
    dtype: torch.dtype = torch.float64,
    extra: bool = False,
) -> tuple[dict[Any, torch.Tensor], dict[Any, dict[str, list[int]]], Any]:
    model = make(family, dtype, use_additional_conditions=True) if extra else make(family, dtype)
    patcher = patcher_for(model)
    den = Den(model)
    cond, uncond = conditioning(family, batch, dtype, extra)
    h, w = grid
    x = torch.randn(batch, 4, 2 * h, 2 * w, generator=torch.Generator().manual_seed(4), dtype=dtype)
    outs, seen = {}, {}
    for fork in (False, None):  # None: the family's default, forked
        rows = Rows(model, "pos_embed", *points, "proj_out" if family == "pixart" else "proj_out_2")
        guided = GuidedDenoiser(den, rule, uncond=uncond, perturber=patcher, fork=fork)
        with torch.no_grad():
            outs[fork] = guided(x, 1.3, **cond)
        rows.close()
        seen[fork] = rows.seen
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    return outs, seen, guided


def check_rows(
    seen: dict[Any, dict[str, list[int]]], guided: Any, points: list[str], batch: int
) -> None:
    order = guided.rule.branches(guided.context(1.3))
    plain = len({b.conditioning for b in order if b.perturbation is None})
    total = len(set(order)) * batch
    first, last = "pos_embed", next(n for n in seen[None] if n.startswith("proj_out"))
    assert seen[False][first] == [total]
    assert seen[False][last] == [total]
    assert seen[None][first] == [plain * batch]  # the pre-fork blocks saw fewer rows
    assert seen[None][points[0]] == [plain * batch]
    assert seen[None][last] == [total]  # the final modulation saw every row
    assert plain * batch < total


ALL_CASES = [("pixart", *c) for c in CASES + PIXART_CASES] + [("dit", *c) for c in CASES]


@pytest.mark.parametrize(
    ("family", "name", "rule", "points"), ALL_CASES, ids=[f"{c[0]}-{c[1]}" for c in ALL_CASES]
)
def test_forked_equals_unforked(family: str, name: str, rule: Any, points: list[str]) -> None:
    """Two images; PixArt on a non-square 3 x 5 patch grid (DiT unpatchifies squares only)."""
    grid = (3, 5) if family == "pixart" else (4, 4)
    outs, seen, guided = run_both(family, rule, points, 2, grid)
    close(outs[None], outs[False])
    check_rows(seen, guided, points, 2)


@pytest.mark.parametrize("family", ["pixart", "dit"])
@pytest.mark.parametrize("rule_name", ["seg", "pag"])
def test_one_image_without_cfg_forks_from_a_batch_of_one(family: str, rule_name: str) -> None:
    """Pre-fork batch 1: a (1, ...) time embedding must not broadcast over the forked rows.

    The forked call's embedding of the final stage (2 rows) meets the pre-fork
    block (1 row); reshaping it to that block's batch would silently mix rows,
    so the result is compared with the unforked call and with the unpatched
    model on the plain row.
    """
    seg = SEG(3.0, sigma=math.inf, layers="block.1")
    rule = seg if rule_name == "seg" else PAG(2.0, layers="block.1")
    points = ["transformer_blocks.1"]
    grid = (2, 3) if family == "pixart" else (3, 3)
    outs, seen, guided = run_both(family, rule, points, 1, grid)
    close(outs[None], outs[False])
    check_rows(seen, guided, points, 1)
    assert seen[None]["pos_embed"] == [1]


def test_pixart_size_conditions_and_float32() -> None:
    """PixArt-α's resolution / aspect-ratio conditions (adaln_single's extra inputs), float32."""
    rule = Compose(CFG(3.0), SEG(2.0, sigma=1.0, layers="block.1"), PAG(2.0, layers="block.2"))
    points = ["transformer_blocks.1", "transformer_blocks.2"]
    for dtype, ops in ((torch.float64, 64), (torch.float32, 512)):
        outs, seen, guided = run_both("pixart", rule, points, 2, (3, 5), dtype, extra=True)
        close(outs[None], outs[False], ops=ops)
        check_rows(seen, guided, points, 2)


def test_dit_float32_within_tolerance() -> None:
    rule = SEG(3.0, sigma=2.0, cfg_scale=4.0, layers="block.1")
    outs, seen, guided = run_both("dit", rule, ["transformer_blocks.1"], 2, (4, 4), torch.float32)
    close(outs[None], outs[False], ops=512)
    check_rows(seen, guided, ["transformer_blocks.1"], 2)


def test_without_the_early_module_pixart_is_wrong_or_fails() -> None:
    """The early-module hook is what makes PixArt exact: a plain policy does not fork it right."""
    model = make("pixart")
    plain = dataclasses.replace(DIT, fork=ForkPolicy(proven=True)).patcher(model)
    x = torch.randn(2, 4, 6, 10, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    cond, uncond = conditioning("pixart", 2, torch.float64)
    rule = SEG(3.0, sigma=2.0, cfg_scale=4.0, layers="block.1")
    den = Den(model)
    ref = GuidedDenoiser(den, rule, uncond=uncond, perturber=plain, fork=False)(x, 1.3, **cond)
    with pytest.raises(RuntimeError, match="size of tensor"):
        GuidedDenoiser(den, rule, uncond=uncond, perturber=plain)(x, 1.3, **cond)
    good = GuidedDenoiser(den, rule, uncond=uncond, perturber=patcher_for(model))(x, 1.3, **cond)
    close(good.detach(), ref.detach())


def test_early_module_outputs_without_the_batch_raise() -> None:
    """Rows are never guessed: an early module's output of no stage's batch is an error."""
    model = make("pixart")
    patcher = patcher_for(model)
    n = 3
    kw = dict(
        hidden_states=torch.randn(n, 4, 4, 6, dtype=torch.float64),
        encoder_hidden_states=torch.randn(n, 6, 16, dtype=torch.float64),
        timestep=torch.tensor([400]),  # one timestep for 3 rows: adaln_single gives 1 row
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
    )
    spec = ForkSpec(3, 2, (("transformer_blocks.1", (1,)),))
    from smoothguide.perturbations import QuerySmoothing

    with (
        pytest.raises(RuntimeError, match="early module 'adaln_single'"),
        patcher.forking(spec),
        patcher.perturb(QuerySmoothing(1.0, layers="transformer_blocks.1.attn1"), [2]),
    ):
        model(**kw)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


# ------------------------------------------------------------------ PixArt-α / Σ pipelines

pytest.importorskip("transformers")

from smoothguide.diffusers import GuidedPipeline  # noqa: E402
from test_diffusers_transformers_pipelines import _gen, pixart_kwargs  # noqa: E402
from test_diffusers_transformers_pipelines import pixart_pipe as pixart_pipe  # noqa: E402

PIPE_CASES = [
    ("cfg+seg", Compose(CFG(4.0), SEG(3.0, sigma=2.0))),
    ("paper-eq10", SEG(3.0, sigma=2.0, cfg_scale=4.0, convention="paper")),
    ("seg+pag", Compose(CFG(4.0), SEG(2.0, sigma=math.inf), PAG(2.0, layers="late"))),
]


@pytest.mark.parametrize(("name", "rule"), PIPE_CASES, ids=[c[0] for c in PIPE_CASES])
def test_pixart_pipeline_forked_equals_unforked(pixart_pipe: Any, name: str, rule: Any) -> None:
    """PixArt-α and Σ pipelines: 2 images per prompt, prompt masks, a 4 x 8 token latent."""
    with torch.no_grad():  # the fixture's diffusers init zeroes some layers: make every path count
        g = torch.Generator().manual_seed(7)
        for p in pixart_pipe.transformer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    out, seen = {}, {}
    for fork in (False, None):
        rows = Rows(pixart_pipe.transformer, "pos_embed", "proj_out")
        kw = pixart_kwargs() | {"output_type": "latent", "num_images_per_prompt": 2}
        out[fork] = GuidedPipeline(pixart_pipe, rule, fork=fork)(
            **kw, height=8, width=16, generator=_gen()
        ).images
        rows.close()
        seen[fork] = rows.seen
    assert out[None].shape == (2, 4, 8, 16)
    assert all(a < b for a, b in zip(seen[None]["pos_embed"], seen[None]["proj_out"], strict=True))
    assert seen[False]["pos_embed"] == seen[False]["proj_out"]
    close(out[None], out[False], ops=512)
    assert all(not m._forward_pre_hooks for m in pixart_pipe.transformer.modules())


def test_policy_names_are_checked() -> None:
    with pytest.raises(TypeError, match="sequences of names, not a string"):
        ForkPolicy(early="adaln_single")
    with pytest.raises(TypeError, match="sequences of names, not a string"):
        ForkPolicy(keep="hidden_states")
    model = make("dit")
    patcher = dataclasses.replace(DIT, fork=ForkPolicy(proven=True, early=("nope",))).patcher(model)
    spec = ForkSpec(2, 1, (("transformer_blocks.1", (0,)),))
    with pytest.raises(ValueError, match=r"early modules \['nope'\]"), patcher.forking(spec):
        pass  # pragma: no cover - never entered
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    assert "early=('nope',)" in repr(patcher.forker.policy)
