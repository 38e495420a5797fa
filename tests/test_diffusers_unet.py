"""SEG and PAG inside a tiny diffusers UNet2DConditionModel (random weights, CPU)."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import torch.nn.functional as F  # noqa: E402
from diffusers.models.attention_processor import AttnProcessor2_0  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402

from smoothguide import IdentityAttention, QuerySmoothing, TokenGrid  # noqa: E402
from smoothguide.diffusers import patcher_for, unet_layers, unet_presets  # noqa: E402
from smoothguide.torch import smooth_queries  # noqa: E402
from tolerance import assert_close  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    """Tiny tensors: one intra-op thread avoids oversubscribing a shared CPU (10x faster here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


MID = "mid_block.attentions.0.transformer_blocks.0.attn1"


_CACHE: dict[bool, Any] = {}


def tiny_unet(xl: bool = False) -> Any:
    """A fresh copy of the tiny UNet (built once per module; tests may mutate their copy)."""
    if xl not in _CACHE:
        _CACHE[xl] = _build_unet(xl)
    return copy.deepcopy(_CACHE[xl])


def _build_unet(xl: bool) -> Any:
    """SD-like (attention at both levels) or SDXL-like (none at level 0, 2 mid blocks)."""
    torch.manual_seed(0)
    kw: dict[str, Any] = dict(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        attention_head_dim=4,
        norm_num_groups=4,
        cross_attention_dim=12,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )
    if xl:
        kw.update(
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2),
        )
    unet = diffusers.UNet2DConditionModel(**kw).eval()
    with torch.no_grad():  # sharper random attention, so perturbations show clearly
        for name, p in unet.named_parameters():
            if ".attn1.to_q." in name or ".attn1.to_k." in name:
                p.mul_(4.0)
    return unet


def inputs(h: int = 8, w: int = 16) -> tuple[Any, Any, Any]:
    """Batch [uncond, cond, cond]: rows 1 and 2 are identical inputs."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, h, w, generator=gen).repeat(3, 1, 1, 1)
    text = torch.randn(2, 5, 12, generator=gen)
    return x, torch.tensor(500), torch.cat([text[:1], text[1:], text[1:]])


def run(unet: Any, x: Any, t: Any, ehs: Any) -> Any:
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=ehs, return_dict=False)[0]


class ReferenceSelfAttention:
    """Self-attention written out by hand; ``rows`` get the mean query or identity attention."""

    def __init__(self, rows: list[int], kind: str) -> None:
        self.rows, self.kind = rows, kind

    def __call__(self, attn: Any, hidden_states: Any, *args: Any, **kwargs: Any) -> Any:
        b, n, c = hidden_states.shape
        h = attn.heads
        q, k, v = (
            f(hidden_states).reshape(b, n, h, c // h).permute(0, 2, 1, 3)
            for f in (attn.to_q, attn.to_k, attn.to_v)
        )
        q = q.clone()
        if self.kind == "mean":
            for r in self.rows:
                q[r] = q[r].mean(dim=1, keepdim=True).expand_as(q[r])
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(c // h), dim=-1)
        out = weights @ v
        if self.kind == "identity":
            for r in self.rows:
                out[r] = v[r]
        out = attn.to_out[1](attn.to_out[0](out.permute(0, 2, 1, 3).reshape(b, n, c)))
        return out + hidden_states if attn.residual_connection else out


class SelfAttentionQueries(TorchFunctionMode):
    """Records the query of every self-attention SDPA call (keys as many as queries)."""

    def __init__(self) -> None:
        super().__init__()
        self.queries: list[Any] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and args[0].shape[-2] == args[1].shape[-2]:
            self.queries.append(args[0].detach().clone())
        return func(*args, **kwargs)


def test_layers_presets_and_errors() -> None:
    unet = tiny_unet(xl=True)
    layers = list(unet_layers(unet))
    assert all(n.endswith(".attn1") for n in layers)
    assert not any(n.startswith("down_blocks.0.") for n in layers)  # DownBlock2D: no attention
    presets = unet_presets(unet)
    assert presets["mid"] == (
        "mid_block.attentions.0.transformer_blocks.0.attn1",
        "mid_block.attentions.0.transformer_blocks.1.attn1",
    )
    p = patcher_for(unet)
    assert p.default == presets["mid"]  # the paper's SDXL default: every attn1 of the mid block
    # Deterministic: module order, duplicates dropped, whatever the order asked for.
    picked = p.resolve(["up.0", MID, "up.0"])
    assert picked == p.resolve([MID, "up.0"])
    assert picked == tuple(n for n in layers if n in {*presets["up.0"], MID})
    assert len(presets["up.0"]) == 4  # 2 attentions (layers_per_block + 1) x 2 blocks
    with pytest.raises(ValueError, match=r"matches no layer.*available layers.*mid_block"):
        p.resolve("down.0")
    with pytest.raises(ValueError, match=r"unknown.*'middle'.*presets.*'mid'"):
        p.resolve("middle")
    with pytest.raises(ValueError, match="unknown"):
        p.resolve("mid_block.attentions.0.transformer_blocks.0.attn2")  # cross-attention


def test_sigma_zero_is_the_plain_forward_exactly() -> None:
    unet = tiny_unet()
    x, t, ehs = inputs()
    ref = run(unet, x, t, ehs)
    with patcher_for(unet).perturb(QuerySmoothing(0.0, layers=["down", "mid", "up"]), rows=[2]):
        assert torch.equal(run(unet, x, t, ehs), ref)


@pytest.mark.parametrize("layers", [None, ("down.1", "up")])
def test_sigma_inf_equals_an_independent_mean_query_forward(layers: Any) -> None:
    unet = tiny_unet()
    x, t, ehs = inputs(8, 16)
    patcher = patcher_for(unet)
    ref_unet = copy.deepcopy(unet)
    ref_unet.set_attn_processor(
        {
            name: ReferenceSelfAttention([2], "mean")
            if name.removesuffix(".processor") in patcher.resolve(layers)
            else AttnProcessor2_0()
            for name in ref_unet.attn_processors
        }
    )
    plain = run(unet, x, t, ehs)
    with patcher.perturb(QuerySmoothing(math.inf, layers=layers), rows=[2]):
        out = run(unet, x, t, ehs)
    expected = run(ref_unet, x, t, ehs)
    assert_close(out, expected, ops=256)
    assert torch.equal(out[:2], plain[:2])  # uncond/cond rows bit for bit
    assert (out[2] - out[1]).abs().max() > 1e-3  # SEG prediction differs from the conditional


@pytest.mark.numerics
def test_pag_equals_an_independent_identity_attention_forward() -> None:
    unet = tiny_unet()
    x, t, ehs = inputs(24, 8)
    ref_unet = copy.deepcopy(unet)
    ref_unet.set_attn_processor(
        {
            n: ReferenceSelfAttention([1, 2], "identity")
            if n.startswith("mid") and ".attn1." in n
            else AttnProcessor2_0()
            for n in ref_unet.attn_processors
        }
    )
    plain = run(unet, x, t, ehs)
    with patcher_for(unet).perturb(IdentityAttention(), rows=[1, 2]):
        out = run(unet, x, t, ehs)
    assert_close(out, run(ref_unet, x, t, ehs), ops=256)
    assert torch.equal(out[0], plain[0])
    assert (out[1] - plain[1]).abs().max() > 1e-3


@pytest.mark.numerics
@pytest.mark.parametrize(("h", "w"), [(8, 16), (24, 8)])
def test_nonsquare_grids_wide_kernel_and_captured_queries(h: int, w: int) -> None:
    """Every attn1's blurred query is smooth_queries of its raw one on the (h/2^l, w/2^l) grid."""
    unet = tiny_unet()
    x, t, ehs = inputs(h, w)
    raw: list[Any] = []
    names = list(unet_layers(unet))
    handles = [
        unet.get_submodule(n).to_q.register_forward_hook(lambda m, a, out: raw.append(out))
        for n in names
    ]
    sigma = 10.0  # radius 30: wider than every grid side here
    plain = run(unet, x, t, ehs)
    raw.clear()
    with (
        SelfAttentionQueries() as seen,
        patcher_for(unet).perturb(QuerySmoothing(sigma, layers=["down", "mid", "up"]), rows=[1]),
    ):
        out = run(unet, x, t, ehs)
    for handle in handles:
        handle.remove()
    assert len(seen.queries) == len(raw) == len(names)
    grids = set()
    for q_raw, q_seen in zip(raw, seen.queries, strict=True):
        b, n, c = q_raw.shape
        heads = q_seen.shape[1]
        q_raw = q_raw.reshape(b, n, heads, c // heads).transpose(1, 2)
        level = next(lv for lv in range(4) if (h >> lv) * (w >> lv) == n)
        grid = TokenGrid(h >> level, w >> level)
        grids.add((grid.height, grid.width))
        assert_close(q_seen[1], smooth_queries(q_raw[1], grid, sigma), magnitude=q_raw[1])
        assert torch.equal(q_seen[[0, 2]], q_raw[[0, 2]])
    assert grids == {(h, w), (h // 2, w // 2)}
    assert torch.equal(out[[0, 2]], plain[[0, 2]])
    assert not torch.allclose(out[1], plain[1])


class CountingProcessor(AttnProcessor2_0):
    """A user's custom processor (stands for IP-Adapter / LoRA processors)."""

    calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        type(self).calls += 1
        return super().__call__(*args, **kwargs)


def test_custom_processor_keeps_running_and_is_restored() -> None:
    unet = tiny_unet()
    unet.set_attn_processor(CountingProcessor())
    before = dict(unet.attn_processors)
    x, t, ehs = inputs()
    plain = run(unet, x, t, ehs)
    CountingProcessor.calls = 0
    with patcher_for(unet).perturb(QuerySmoothing(2.0, layers="mid"), rows=[2]):
        out = run(unet, x, t, ehs)
    assert CountingProcessor.calls == len(before)  # every processor ran, the mid one included
    assert not torch.allclose(out[2], plain[2])
    after = unet.attn_processors
    assert after.keys() == before.keys()
    assert all(after[k] is before[k] for k in before)


def test_exception_inside_the_context_leaves_the_model_identical() -> None:
    unet = tiny_unet()
    before = dict(unet.attn_processors)
    x, t, ehs = inputs()
    plain = run(unet, x, t, ehs)

    def fail_inside() -> None:
        with patcher_for(unet).perturb(QuerySmoothing(1.0, layers="up"), rows=[1, 2]):
            run(unet, x, t, ehs)
            raise RuntimeError("user code failed")

    with pytest.raises(RuntimeError, match="user code failed"):
        fail_inside()
    assert all(unet.attn_processors[k] is v for k, v in before.items())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in unet.modules())
    assert torch.equal(run(unet, x, t, ehs), plain)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_unet(dtype: Any) -> None:
    unet = tiny_unet().to(dtype)
    x, t, ehs = inputs(8, 16)
    x, ehs = x.to(dtype), ehs.to(dtype)
    try:
        plain = run(unet, x, t, ehs)
    except (RuntimeError, NotImplementedError) as exc:  # pragma: no cover - CPU without kernels
        pytest.skip(f"this CPU build has no {dtype} UNet kernels: {exc}")
    with (
        SelfAttentionQueries() as seen,
        patcher_for(unet).perturb(QuerySmoothing(math.inf, layers="up"), rows=[2]),
    ):
        out = run(unet, x, t, ehs)
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    assert all(q.dtype == dtype for q in seen.queries)
    assert torch.equal(out[:2], plain[:2])
