"""Reliability, round 2: the guided denoiser's batching, sigma lookup and the torch adapter.

Each test compares against an independent reference: the unbatched call, a
hand-computed value, the core :func:`smoothguide.smooth_queries` on the right
grid, or the unpatched model.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from reliability_table import failure_mode
from smoothguide import IdentityAttention, QuerySmoothing, TokenGrid
from smoothguide import smooth_queries as core_smooth_queries
from smoothguide.rules import CFG, SEG, Compose, Interval
from smoothguide.sampling import GuidedDenoiser, karras_sigmas

ROOT = Path(__file__).resolve().parent.parent
INF = math.inf


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _contain_leaked_modes() -> Iterator[None]:
    yield
    while torch._C._len_torch_function_stack() > 0:
        torch._C._pop_torch_function_stack()


# ------------------------------------------------------------------ batched kwargs (class 1)


class Pair(NamedTuple):
    first: Any
    second: Any


@dataclasses.dataclass
class Cond:
    emb: Any
    scale: float = 1.0


def _ordered_model(x: Any, sigma: Any, cond: Any) -> Any:
    """Reads every container in iteration order: the weight of each value is its position."""
    leaves: list[Any] = []

    def walk(v: Any) -> None:
        if isinstance(v, dict):
            for u in v.values():
                walk(u)
        elif isinstance(v, tuple | list):
            for u in v:
                walk(u)
        elif dataclasses.is_dataclass(v):
            walk(v.emb)
            leaves.append(np.full((x.shape[0], 1), v.scale))
        else:
            leaves.append(v)

    walk(cond)
    out = x / (1.0 + sigma**2)
    for i, leaf in enumerate(leaves):
        out = out + (i + 1) ** 2 * leaf
    return out


def _nested(batch: int, seed: int, keys: list[str]) -> dict[str, Any]:
    rng = np.random.default_rng(seed)

    def leaf() -> Any:
        return rng.standard_normal((batch, 3))

    return {
        keys[0]: leaf(),
        keys[1]: collections.OrderedDict((k, leaf()) for k in reversed(keys)),
        keys[2]: [leaf(), (leaf(), leaf())],
        keys[3]: Pair(leaf(), {k: leaf() for k in keys}),
        keys[4]: Cond(leaf(), scale=0.5),
    }


def _type_tree(v: Any) -> Any:
    if isinstance(v, dict):
        return (type(v).__name__, [(k, _type_tree(u)) for k, u in v.items()])
    if isinstance(v, tuple | list):
        return (type(v).__name__, [_type_tree(u) for u in v])
    if dataclasses.is_dataclass(v):
        return (type(v).__name__, _type_tree(v.emb))
    return "leaf"


@failure_mode(
    "batched GuidedDenoiser with nested conditioning (dict, OrderedDict, list, tuple, "
    "namedtuple, dataclass) read in order by the model",
    "every container keeps its type, key order and structure: batched == unbatched, bitwise",
)
def test_batched_nested_kwargs_keep_order_and_types() -> None:
    keys = [f"k{i}_{c}" for i, c in enumerate("zyxwvutsrq")][:5]
    seen: list[Any] = []

    def model(x: Any, sigma: Any, cond: Any) -> Any:
        seen.append(_type_tree(cond))
        return _ordered_model(x, sigma, cond)

    uncond = {"cond": _nested(1, 1, keys)}
    cond = {"cond": _nested(2, 2, keys)}
    x = np.random.default_rng(3).standard_normal((2, 3))
    batched = GuidedDenoiser(model, CFG(2.5), uncond=uncond)
    separate = GuidedDenoiser(model, CFG(2.5), uncond=uncond, batched=False)
    out_b = batched(x, 0.7, **cond)
    out_s = separate(x, 0.7, **cond)
    # Every call saw the call's structure (types, key order) exactly.
    assert all(t == _type_tree(cond["cond"]) for t in seen)
    np.testing.assert_array_equal(out_b, out_s)


_HASHSEED_SCRIPT = textwrap.dedent(
    """
    import numpy as np
    from smoothguide.rules import CFG
    from smoothguide.sampling import GuidedDenoiser

    def model(x, sigma, cond):
        out = x / (1.0 + sigma**2)
        for i, v in enumerate(cond.values()):   # reads the dict in order
            out = out + (i + 1) ** 2 * v
        return out

    keys = ["emb", "pooled", "mask", "time_ids", "style", "ctrl", "a", "b"]
    rng = np.random.default_rng(0)
    cond = {k: rng.standard_normal((2, 4)) for k in keys}
    uncond = {k: rng.standard_normal((1, 4)) for k in keys}
    x = rng.standard_normal((2, 4))
    b = GuidedDenoiser(model, CFG(3.0), uncond={"cond": uncond})(x, 0.5, cond=cond)
    s = GuidedDenoiser(model, CFG(3.0), uncond={"cond": uncond}, batched=False)(x, 0.5, cond=cond)
    # hand reference: CFG of the two branches, each read in insertion order
    def ref(c):
        return x / 1.25 + sum((i + 1) ** 2 * c[k] for i, k in enumerate(keys))
    r = ref(uncond) + 3.0 * (ref(cond) - ref(uncond))
    assert np.array_equal(b, s), "batched != unbatched"
    assert np.allclose(b, r, rtol=1e-12, atol=1e-12), "batched != hand reference"
    print("ok")
    """
)


@failure_mode(
    "batched GuidedDenoiser with a dict of conditioning arrays, under PYTHONHASHSEED=0 and 1",
    "keys keep the call's order (not set order): batched == unbatched == hand reference",
)
@pytest.mark.parametrize("seed", ["0", "1"])
def test_batched_dict_kwargs_independent_of_hash_seed(seed: str) -> None:
    import smoothguide

    src = Path(smoothguide.__file__).resolve().parent.parent  # the tree under test
    env = dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=str(src))
    res = subprocess.run(
        [sys.executable, "-c", _HASHSEED_SCRIPT], env=env, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"


@failure_mode(
    "batched GuidedDenoiser whose uncond= dict lists the keys in another order than the call",
    "ValueError naming the argument and the key order (a model may read in order)",
)
def test_batched_nested_kwargs_in_different_order_refused() -> None:
    def model(x: Any, sigma: Any, cond: Any) -> Any:
        return x

    g = GuidedDenoiser(
        model, CFG(2.0), uncond={"cond": {"b": np.zeros((1, 2)), "a": np.zeros((1, 2))}}
    )
    with pytest.raises(ValueError, match="key order"):
        g(np.zeros((2, 2)), 1.0, cond={"a": np.ones((2, 2)), "b": np.ones((2, 2))})


# ------------------------------------------------------------------ half-precision sigma (class 2)


@failure_mode(
    "GuidedDenoiser(sigmas=...) called with float16 / bfloat16 sigma (k-diffusion half latents)",
    "the step is found at the dtype's rounding, the same as for float64 sigma",
)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_sigma_finds_its_step(dtype: torch.dtype) -> None:
    sigmas = karras_sigmas(12, 0.03, 14.6)
    g = GuidedDenoiser(lambda x, s: x, CFG(2.0), sigmas=sigmas)
    for i in range(len(sigmas) - 1):
        s_half = torch.full((3,), float(sigmas[i]), dtype=torch.float64).to(dtype)
        ctx = g.context(s_half)
        assert (ctx.step, ctx.num_steps) == (i, len(sigmas) - 1)
        # independent reference: the float64 lookup of the exact value
        assert g.context(float(sigmas[i])).step == i


@failure_mode(
    "an on='progress' schedule when sigma is not in the sigmas= given (or ambiguous at its dtype)",
    "ValueError saying sigma is not in sigmas= (with the nearest entry), not 'pass sigmas='",
)
def test_sigma_not_in_schedule_message_says_why() -> None:
    sigmas = [4.0, 2.0, 1.0, 0.0]
    rule = Compose(CFG(2.0, schedule=Interval(0.0, 0.5, on="progress")))
    g = GuidedDenoiser(lambda x, s, **k: x, rule, sigmas=sigmas, uncond={})
    x = np.zeros((1, 2))
    g(x, 2.0)  # in the schedule: fine
    with pytest.raises(
        ValueError, match=r"not one of the noise levels in the sigmas=.*nearest: step 1"
    ) as info:
        g.step(x, 1.5)
    assert "pass sigmas=" not in str(info.value)
    # two entries that float16 cannot tell apart: ambiguous, said so
    close = [1.0002, 1.0, 0.0]
    g = GuidedDenoiser(lambda x, s, **k: x, rule, sigmas=close, uncond={})
    s16 = torch.tensor(1.0, dtype=torch.float16)
    assert float(s16) == float(torch.tensor(1.0002).half())  # both round to the same half
    assert g.context(s16).step is None
    with pytest.raises(ValueError, match="ambiguous"):
        g.step(torch.zeros(1, 2), s16)


def test_half_precision_sigma_nearest_rounding_breaks_ties() -> None:
    # 1.0008 and 1.0 are both within float16's epsilon of 1.0, but only 1.0 rounds to it
    g = GuidedDenoiser(lambda x, s: x, CFG(2.0), sigmas=[1.0008, 1.0, 0.0])
    assert float(torch.tensor(1.0008).half()) != 1.0
    assert g.context(torch.tensor(1.0, dtype=torch.float16)).step == 1
    assert g.context(torch.tensor(1.0008).half()).step == 0


# ------------------------------------------------------------------ video frames (class 3)


class SelfAttn(torch.nn.Module):
    """SDPA of the tokens with themselves, ``heads`` heads folded into the batch axis."""

    def __init__(self, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads

    def forward(self, t: torch.Tensor) -> torch.Tensor:  # t: (B, N, C)
        b, n, c = t.shape
        h = t.reshape(b, n, self.heads, c // self.heads).transpose(1, 2)  # (B, heads, N, d)
        out = F.scaled_dot_product_attention(h, h, h)
        return out.transpose(1, 2).reshape(b, n, c)


class Video3D(torch.nn.Module):
    """Full 3-D attention over the frames x height x width tokens of a (B, C, F, H, W) input."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = SelfAttn()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x.flatten(2).transpose(1, 2))


class VideoPerFrame(torch.nn.Module):
    """Spatial attention per frame: frames folded into the batch, (B·F, H·W, C) tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = SelfAttn()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, f, h, w = x.shape
        t = x.permute(0, 2, 3, 4, 1).reshape(b * f, h * w, c)
        return self.attn(t)


def _reference_attention(t: torch.Tensor, grid: TokenGrid, sigma: Any, heads: int = 2) -> Any:
    """NumPy/core reference: queries blurred by the core smooth_queries on ``grid``."""
    b, n, c = t.shape
    h = t.reshape(b, n, heads, c // heads).transpose(1, 2).numpy()
    q = core_smooth_queries(h, grid, sigma)
    logits = q @ np.swapaxes(h, -1, -2) / math.sqrt(c // heads)
    w = np.exp(logits - logits.max(axis=-1, keepdims=True))
    w /= w.sum(axis=-1, keepdims=True)
    out = w @ h
    return np.swapaxes(out, 1, 2).reshape(b, n, c)


@failure_mode(
    "generic torch layout, (B, C, F, H, W) input and full 3-D attention over all frames",
    "blurred on TokenGrid(H, W, frames=F) (equal to the core smooth_queries there), not a fake "
    "2-D grid",
)
@pytest.mark.parametrize("sigma", [1.5, (0.8, 1.0, 2.0), INF])
def test_video_full_attention_uses_frames_grid(sigma: Any) -> None:
    from smoothguide.torch import AttentionPatcher

    torch.manual_seed(0)
    model = Video3D().double()
    x = torch.randn(2, 4, 4, 4, 4, dtype=torch.float64)  # B=2, C=4, F=4, H=W=4: 64 tokens
    plain = model(x)
    patcher = AttentionPatcher(model, layers=SelfAttn)
    with patcher.perturb(QuerySmoothing(sigma), rows=[1]):
        out = model(x)
    torch.testing.assert_close(out[0], plain[0], rtol=0, atol=0)
    t = x.flatten(2).transpose(1, 2)[1:]
    ref = _reference_attention(t, TokenGrid(4, 4, frames=4), sigma)
    np.testing.assert_allclose(out[1:].numpy(), ref, rtol=1e-12, atol=1e-12)


@failure_mode(
    "generic torch layout, (B, C, F, H, W) input with per-frame spatial attention",
    "blurred on each frame's 2-D grid (frames folded into the batch); a token count that fits "
    "both readings raises ValueError",
)
def test_video_per_frame_attention_and_ambiguous_count() -> None:
    from smoothguide.torch import AttentionPatcher, Geometry, ImageTokens

    torch.manual_seed(0)
    model = VideoPerFrame().double()
    x = torch.randn(2, 4, 3, 4, 6, dtype=torch.float64)  # F=3 frames of 4 x 6
    plain = model(x)
    patcher = AttentionPatcher(model, layers=SelfAttn)
    with patcher.perturb(QuerySmoothing(1.2), rows=[0]):
        out = model(x)
    torch.testing.assert_close(out[3:], plain[3:], rtol=0, atol=0)  # model row 1 = frames 3..5
    t = x.permute(0, 2, 3, 4, 1).reshape(6, 24, 4)[:3]
    ref = _reference_attention(t, TokenGrid(4, 6), 1.2)
    np.testing.assert_allclose(out[:3].numpy(), ref, rtol=1e-12, atol=1e-12)
    # 4 frames of 16 x 16: 256 tokens are one full frame or 4 frames of 8 x 8
    with pytest.raises(ValueError, match="fit both"):
        ImageTokens().grid(256, Geometry(batch=1, height=16, width=16, frames=4))


# ------------------------------------------------------------------ chunked SDPA (class 4)


class ChunkedAttn(torch.nn.Module):
    """Two-head self-attention that calls SDPA on chunks, as attention slicing does.

    ``how``: ``"none"`` (one call), ``"batch"`` (4-D query, one call per model row),
    ``"heads"`` (4-D query, one call per head), ``"folded"`` (3-D ``(batch·heads)``
    query, chunks of ``chunk`` rows).
    """

    def __init__(self, how: str, chunk: int = 2, dim: int = 8, heads: int = 4) -> None:
        super().__init__()
        self.how, self.chunk, self.heads = how, chunk, heads
        self.to_q = torch.nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q = self.to_q(x).reshape(b, n, self.heads, c // self.heads).transpose(1, 2)
        kv = x.reshape(b, n, self.heads, c // self.heads).transpose(1, 2)
        sdpa = F.scaled_dot_product_attention
        if self.how == "none":
            out = sdpa(q, kv, kv)
        elif self.how == "batch":
            out = torch.cat([sdpa(q[i : i + 1], kv[i : i + 1], kv[i : i + 1]) for i in range(b)])
        elif self.how == "heads":
            out = torch.cat(
                [
                    sdpa(q[:, h : h + 1], kv[:, h : h + 1], kv[:, h : h + 1])
                    for h in range(self.heads)
                ],
                dim=1,
            )
        else:
            qf, kf = q.reshape(b * self.heads, n, -1), kv.reshape(b * self.heads, n, -1)
            parts = [
                sdpa(qf[i : i + self.chunk], kf[i : i + self.chunk], kf[i : i + self.chunk])
                for i in range(0, b * self.heads, self.chunk)
            ]
            out = torch.cat(parts).reshape(b, self.heads, n, -1)
        return out.transpose(1, 2).reshape(b, n, c)


class ChunkNet(torch.nn.Module):
    def __init__(self, how: str, chunk: int = 2) -> None:
        super().__init__()
        self.attn = ChunkedAttn(how, chunk)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.attn(img.flatten(2).transpose(1, 2))


def _chunk_nets(how: str, chunk: int = 2) -> tuple[ChunkNet, ChunkNet]:
    torch.manual_seed(0)
    net = ChunkNet(how, chunk).double()
    ref = ChunkNet("none").double()
    ref.load_state_dict(net.state_dict())
    return net, ref


@failure_mode(
    "an attention that calls SDPA on chunks of the batch, or on groups of heads (4-D query)",
    "rows mapped per call: unperturbed rows equal the unpatched model bitwise, perturbed rows "
    "the unchunked model's perturbed rows",
)
@pytest.mark.parametrize("how", ["batch", "heads"])
@pytest.mark.parametrize(
    "perturbation", [QuerySmoothing(1.0), QuerySmoothing(INF), IdentityAttention()]
)
def test_sdpa_on_chunks_of_the_batch_maps_rows(how: str, perturbation: Any) -> None:
    from smoothguide.torch import AttentionPatcher

    net, ref = _chunk_nets(how)
    img = torch.randn(3, 8, 4, 6, dtype=torch.float64)
    plain = net(img)
    with AttentionPatcher(ref, layers=ChunkedAttn).perturb(perturbation, rows=[1]):
        expected = ref(img)
    with AttentionPatcher(net, layers=ChunkedAttn).perturb(perturbation, rows=[1]):
        out = net(img)
    assert torch.equal(out[0], plain[0])
    assert torch.equal(out[2], plain[2])
    assert not torch.allclose(out[1], plain[1])
    torch.testing.assert_close(out[1], expected[1], rtol=1e-12, atol=1e-12)


@failure_mode(
    "an attention that calls SDPA on chunks of the folded (batch·heads) axis",
    "RuntimeError saying the rows cannot be mapped (chunks and separate attentions look the "
    "same), never a perturbation of the wrong rows",
)
@pytest.mark.parametrize("chunk", [1, 2, 3, 4])
def test_sdpa_on_chunks_of_folded_axis_refused(chunk: int) -> None:
    from smoothguide.torch import AttentionPatcher

    net, _ = _chunk_nets("folded", chunk)
    img = torch.randn(2, 8, 4, 6, dtype=torch.float64)
    with (
        pytest.raises(RuntimeError, match="cannot be mapped"),
        AttentionPatcher(net, layers=ChunkedAttn).perturb(QuerySmoothing(1.0), rows=[1]),
    ):
        net(img)


# ------------------------------------------------------------------ double perturbation (class 5)


class Outer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = SelfAttn()

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.attn(t)


class TwoLevel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = Outer()

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.block(img.flatten(2).transpose(1, 2))


@failure_mode(
    "two AttentionPatchers of one model perturbing the same rows, and a selection naming an "
    "outer module and the attention inside it",
    "ValueError at perturb() entry (the rows would be perturbed twice); disjoint rows still "
    "compose",
)
def test_double_perturbation_refused() -> None:
    from smoothguide.torch import AttentionPatcher

    torch.manual_seed(0)
    net = TwoLevel().double()
    img = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    plain = net(img)
    p1 = AttentionPatcher(net, layers=SelfAttn)
    p2 = AttentionPatcher(net, layers=["block"])
    seg = QuerySmoothing(INF)
    with p1.perturb(seg, rows=[1]):
        once = net(img)
    with (
        p1.perturb(seg, rows=[1]),
        pytest.raises(ValueError, match="perturbed twice"),
        p2.perturb(seg, rows=[1]),
    ):
        pass  # pragma: no cover
    both = AttentionPatcher(net, layers=["block", "block.attn"])
    with (
        pytest.raises(ValueError, match="'block' and 'block.attn'.*twice"),
        both.perturb(QuerySmoothing(INF, layers=["block", "block.attn"]), rows=[1]),
    ):
        pass  # pragma: no cover
    # disjoint rows of two patchers (outer for one row, inner for another) still compose
    with p2.perturb(seg, rows=[0]), p1.perturb(seg, rows=[1]):
        out = net(img)
    with p2.perturb(seg, rows=[0]):
        only0 = net(img)
    assert torch.equal(out[1], once[1])
    assert torch.equal(out[0], only0[0])
    assert torch.equal(net(img), plain)


# ------------------------------------------------------------------ thread race (class 6)


class Gate(torch.nn.Module):
    """Blocks the calling thread inside the forward until told to go on (when armed)."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False
        self.inside, self.go = threading.Event(), threading.Event()

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        if self.armed:
            self.inside.set()
            assert self.go.wait(30)
        return t


class GatedNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = Gate()
        self.attn = SelfAttn()

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.attn(self.gate(img.flatten(2).transpose(1, 2)))


@failure_mode(
    "a plain call in thread A still running when thread B's perturb() context exits (hooks "
    "removed mid-call), then an empty context in A",
    "no stale per-thread record: A's empty context exits cleanly and A's next perturbed call "
    "equals a fresh run",
)
def test_plain_call_overlapping_other_threads_exit_leaves_no_stale_state() -> None:
    from smoothguide.torch import AttentionPatcher

    torch.manual_seed(0)
    net = GatedNet().double()
    img = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    patcher = AttentionPatcher(net, layers=SelfAttn)
    seg = QuerySmoothing(INF)
    with patcher.perturb(seg, rows=[1]):
        expected = net(img)
    errors: list[BaseException] = []
    results: list[torch.Tensor] = []
    b_in, b_out = threading.Event(), threading.Event()

    def thread_a() -> None:
        try:
            assert b_in.wait(30)
            net(img)  # plain call; blocks inside the gate
            assert b_out.is_set()
            with patcher.perturb(seg, rows=[1]):
                pass  # empty: no model call
            with patcher.perturb(seg, rows=[1]):
                results.append(net(img))
        except BaseException as exc:  # reported in the main thread
            errors.append(exc)

    net.gate.armed = True
    a = threading.Thread(target=thread_a)
    a.start()
    with patcher.perturb(seg, rows=[0]):  # thread B (this one) enters ...
        b_in.set()
        assert net.gate.inside.wait(30)  # ... A's plain call is inside the model ...
    b_out.set()  # ... and B's exit removed the hooks under it
    net.gate.armed = False
    net.gate.go.set()
    a.join(60)
    assert not a.is_alive()
    assert not errors, errors
    assert torch.equal(results[0], expected)


# ------------------------------------------------------------------ pipeline arguments (class 7)


@pytest.fixture(scope="module")
def sd_pipe() -> Any:
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from test_diffusers_unet_pipeline import make_pipe

    return make_pipe("sd")


@failure_mode(
    "GuidedPipeline(...)(..., guidance_rescale=0.7), which the pipeline would apply to the "
    "already guided prediction (a silent no-op)",
    "TypeError before any step, pointing at Compose(..., Rescale(phi))",
)
def test_pipeline_refuses_guidance_rescale(sd_pipe: Any) -> None:
    from smoothguide.diffusers import GuidedPipeline

    calls: list[int] = []
    handle = sd_pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        guided = GuidedPipeline(sd_pipe, CFG(3.0))
        with pytest.raises(TypeError, match=r"guidance_rescale.*Rescale\(0\.7\)"):
            guided("a cat", num_inference_steps=2, height=32, width=48, guidance_rescale=0.7)
    finally:
        handle.remove()
    assert calls == []  # refused before the pipeline ran


@failure_mode(
    "SEG(layers='bogus'): a layer name that matches nothing",
    "ValueError listing the available layers at GuidedPipeline(...), GuidedDenoiser(...) and "
    "patcher.perturb(...) themselves, before any model call",
)
def test_unknown_layer_name_fails_at_construction(sd_pipe: Any) -> None:
    from smoothguide.diffusers import GuidedPipeline, patcher_for

    with pytest.raises(ValueError, match=r"'bogus'.*available layers: \['down_blocks"):
        GuidedPipeline(sd_pipe, Compose(CFG(3.0), SEG(2.0, layers="bogus")))
    patcher = patcher_for(sd_pipe.unet)
    with pytest.raises(ValueError, match="available layers"):
        patcher.perturb(QuerySmoothing(1.0, layers="bogus"), rows=[0])  # not even entered
    with pytest.raises(ValueError, match="available layers"):
        GuidedDenoiser(lambda x, s: x, SEG(2.0, layers="bogus"), perturber=patcher)
    GuidedPipeline(sd_pipe, SEG(2.0, layers="mid"))  # a real preset is fine


@failure_mode(
    "GuidedPipeline regrouping the rows of nested denoiser kwargs (OrderedDict, namedtuple, "
    "dataclass of tensors)",
    "every container keeps its type and key order and every tensor inside is regrouped (equal to "
    "index_select by hand)",
)
def test_pipeline_row_mapping_keeps_containers() -> None:
    pytest.importorskip("diffusers")
    from smoothguide.diffusers.pipeline import _map_rows

    batch, index = 4, torch.tensor([2, 0, 3, 1])
    t = [torch.randn(batch, 3) for _ in range(4)]
    value = {
        "added": collections.OrderedDict([("time_ids", t[0]), ("text_embeds", t[1])]),
        "pair": Pair(t[2], torch.ones(1)),
        "cond": Cond(t[3], scale=0.5),
    }
    out = _map_rows(value, batch, index)
    assert _type_tree(out) == _type_tree(value)
    assert list(out["added"]) == ["time_ids", "text_embeds"]
    assert torch.equal(out["added"]["time_ids"], t[0][index])
    assert torch.equal(out["added"]["text_embeds"], t[1][index])
    assert torch.equal(out["pair"].first, t[2][index])
    assert torch.equal(out["pair"].second, torch.ones(1))  # no batch axis: unchanged
    assert torch.equal(out["cond"].emb, t[3][index])
    assert out["cond"].scale == 0.5


@failure_mode(
    "a bfloat16 / float16 Flux pipeline: the transformer gets timestep / 1000 in half precision",
    "the step's sigma is found within the dtype's rounding (equal to the scheduler's own sigma), "
    "not a ValueError",
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_timestep_finds_the_scheduler_sigma(dtype: torch.dtype) -> None:
    diffusers = pytest.importorskip("diffusers")
    from types import SimpleNamespace

    from smoothguide.diffusers.pipeline import scheduler_sigma
    from smoothguide.diffusers.transformers import _flux_sigma

    scheduler = diffusers.FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(28)
    pipe = SimpleNamespace(scheduler=scheduler)
    for i, t in enumerate(scheduler.timesteps):
        half = (t / 1000).to(dtype).expand(2)  # what FluxPipeline hands its transformer
        assert _flux_sigma(pipe, half) == float(scheduler.sigmas[i])
        assert scheduler_sigma(pipe, t.to(dtype)) == float(scheduler.sigmas[i])


@failure_mode(
    "perturb(rows=...) given NumPy integers (rows computed with NumPy)",
    "accepted as the equal Python ints (same result bit for bit); bools, floats and negative "
    "rows are refused",
)
def test_perturb_takes_numpy_integer_rows() -> None:
    from smoothguide.torch import AttentionPatcher

    torch.manual_seed(0)
    net = TwoLevel().double()
    img = torch.randn(3, 4, 3, 3, dtype=torch.float64)
    patcher = AttentionPatcher(net, layers=SelfAttn)
    seg = QuerySmoothing(INF)
    with patcher.perturb(seg, rows=[1, 2]):
        ref = net(img)
    with patcher.perturb(seg, rows=[np.int64(1), np.int32(2)]):
        out = net(img)
    assert torch.equal(out, ref)
    for bad in ([True], [1.0], [np.int64(-1)]):
        with pytest.raises(ValueError, match="rows must be ints >= 0"):
            patcher.perturb(seg, rows=bad)
