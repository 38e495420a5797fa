"""Reliability of the torch adapter (AttentionPatcher) and the diffusers UNet family.

Fault injection (exceptions and KeyboardInterrupt inside a patched layer, in a
geometry function, in the user's sampler callback) must leave the model exactly
as before: same state_dict bits, same processors, no hooks, no torch function
mode left on the stack, and the same output as a never-patched copy. Also:
nested and re-entrant contexts, threads, half precision, strided inputs, empty
batches and bad arguments.
"""

from __future__ import annotations

import copy
import math
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from reliability_table import failure_mode
from smoothguide import IdentityAttention, QuerySmoothing, TokenGrid
from smoothguide.demo.guide import demo_patcher
from smoothguide.demo.model import DemoDenoiser, DemoDiT, DiTConfig
from smoothguide.rules import CFG, PAG, SEG, Compose
from smoothguide.sampling import GuidedDenoiser, karras_sigmas, sample_euler
from smoothguide.torch import AttentionPatcher, Geometry, smooth_queries
from tolerance import assert_close

INF = math.inf


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny tensors: one intra-op thread avoids oversubscribing the shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _contain_leaked_modes() -> Iterator[None]:
    """Pop torch function modes a failing test leaves behind, so the failure stays in that test.

    A mode left on the stack (bug R1 in /work/notes/requests.md) would otherwise break every
    later attention call of the whole pytest session.
    """
    yield
    while torch._C._len_torch_function_stack() > 0:
        torch._C._pop_torch_function_stack()


class Attn(torch.nn.Module):
    """Two-head self-attention whose forward can be told to fail after SDPA."""

    def __init__(self, dim: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v = (torch.nn.Linear(dim, dim) for _ in range(3))
        self.to_out = torch.nn.Linear(dim, dim)
        self.fail: type[BaseException] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = (
            f(x).reshape(b, n, self.heads, c // self.heads).transpose(1, 2)
            for f in (self.to_q, self.to_k, self.to_v)
        )
        out = F.scaled_dot_product_attention(q, k, v)
        if self.fail is not None:
            raise self.fail("injected fault inside the patched layer")
        return self.to_out(out.transpose(1, 2).reshape(b, n, c))


class Net(torch.nn.Module):
    """Image (B, 8, H, W) -> tokens -> two residual attention blocks -> image."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList([Attn(), Attn()])
        self.register_buffer("offset", torch.zeros(8))

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        b, c, h, w = img.shape
        z = img.flatten(2).transpose(1, 2) + self.offset
        for blk in self.blocks:
            z = z + blk(z)
        return z.transpose(1, 2).reshape(b, c, h, w)


def make_net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net().eval()


def image(batch: int = 3, h: int = 4, w: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 8, h, w, generator=torch.Generator().manual_seed(seed))


def hooks(model: torch.nn.Module) -> int:
    """Every forward/backward hook registered on any submodule, and global module hooks."""
    n = 0
    for m in model.modules():
        for name, value in vars(m).items():
            if "hooks" in name and isinstance(value, dict):
                n += len(value)
    g = torch.nn.modules.module
    return n + len(g._global_forward_hooks) + len(g._global_forward_pre_hooks)


def snapshot(model: torch.nn.Module) -> dict[str, Any]:
    procs = getattr(model, "attn_processors", {})
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "processors": {k: id(v) for k, v in procs.items()},
        "training": [m.training for m in model.modules()],
        "grad": [p.requires_grad for p in model.parameters()],
    }


def assert_restored(model: torch.nn.Module, before: dict[str, Any]) -> None:
    """Bit-identical state, same processor objects, no hooks, no torch function mode left."""
    after = snapshot(model)
    assert after["state"].keys() == before["state"].keys()
    for k, v in before["state"].items():
        assert after["state"][k].dtype == v.dtype
        assert torch.equal(after["state"][k], v), k
    assert after["processors"] == before["processors"]
    assert after["training"] == before["training"]
    assert after["grad"] == before["grad"]
    assert hooks(model) == 0
    assert torch._C._len_torch_function_stack() == 0


# -- fault injection -------------------------------------------------------------------------


@failure_mode(
    "an exception (RuntimeError) or KeyboardInterrupt raised inside a patched attention layer "
    "while a SEG or PAG perturbation is active",
    "the error propagates; state_dict bit-identical, no hooks, no torch function mode left on "
    "the stack, and the next call equals a never-patched copy bit for bit",
)
@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize(
    "perturbation", [QuerySmoothing(1.5), IdentityAttention()], ids=["SEG", "PAG"]
)
def test_keyboard_interrupt_inside_layer_restores_everything(
    error: type[BaseException], perturbation: Any
) -> None:
    net, pristine = make_net(), make_net()
    img = image()
    before = snapshot(net)
    patcher = AttentionPatcher(net, layers=Attn)
    net.blocks[1].fail = error
    with pytest.raises(error, match="injected"), patcher.perturb(perturbation, rows=[0, 2]):
        net(img)
    net.blocks[1].fail = None
    assert_restored(net, before)
    assert torch.equal(net(img), pristine(img))
    q = torch.randn(1, 2, 6, 4)  # an unrelated attention call in this thread still works
    weights = torch.softmax(q @ q.transpose(-1, -2) / 2.0, dim=-1)
    assert_close(F.scaled_dot_product_attention(q, q, q), weights @ q, magnitude=q)


@failure_mode(
    "a user geometry function that raises, or returns something that is not a Geometry",
    "its error (or a TypeError naming the geometry function) propagates; model restored",
)
@pytest.mark.parametrize("bad", ["raises", "wrong-type"])
def test_failing_geometry_function_leaves_the_model_restored(bad: str) -> None:
    net = make_net()
    img = image()
    before = snapshot(net)
    plain = net(img)

    def geometry(args: Any, kwargs: Any) -> Any:
        if bad == "raises":
            raise ValueError("user geometry failed")
        return (3, 4, 6)

    patcher = AttentionPatcher(net, layers=Attn, geometry=geometry)
    exc, match = (
        (ValueError, "user geometry failed") if bad == "raises" else (TypeError, "Geometry")
    )
    with pytest.raises(exc, match=match), patcher.perturb(QuerySmoothing(1.0), rows=[1]):
        net(img)
    assert_restored(net, before)
    assert torch.equal(net(img), plain)


def tiny_demo(seed: int = 0) -> DemoDenoiser:
    """The demo DiT at toy size with all weights random (its zero-init layers would hide bugs)."""
    torch.manual_seed(seed)
    net = DemoDiT(DiTConfig(hidden=16, depth=3, heads=2))
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.3)
    return DemoDenoiser(net).eval()


SIGMAS = karras_sigmas(3, 0.05, 10.0)


def guided_run(den: DemoDenoiser, rule: Any, batch: int = 2, callback: Any = None) -> torch.Tensor:
    guided = GuidedDenoiser(
        den, rule, uncond={"class_labels": torch.tensor([10])}, perturber=demo_patcher(den)
    )
    x = torch.randn(batch, 1, 16, 16, generator=torch.Generator().manual_seed(3)) * SIGMAS[0]
    labels = torch.arange(batch) % 10
    with torch.no_grad():
        return sample_euler(
            guided,
            x,
            SIGMAS,
            extra_args={"class_labels": labels},
            progress=False,
            callback=callback,
        )


@failure_mode(
    "KeyboardInterrupt or an exception mid-sampling (guided SEG+CFG run of the demo DiT): "
    "raised inside an attention sub-layer (to_out) during the perturbed forward, or by the "
    "user's step callback",
    "propagates; model bit-identical (state_dict), no hooks or modes left; a fresh guided run "
    "equals the run of a never-interrupted copy bit for bit",
)
@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize("where", ["layer", "callback"])
def test_interrupt_during_guided_sampling(error: type[BaseException], where: str) -> None:
    den, pristine = tiny_demo(), tiny_demo()
    before = snapshot(den)
    rule = Compose(CFG(2.0), SEG(2.0, sigma=1.0))
    calls = {"n": 0}

    def fail_in_to_out(mod: Any, args: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 2:  # step 1's batched forward, inside the perturbed attention layer
            raise error("injected")

    def callback(step: Any) -> None:
        if step.index == 1:
            raise error("injected")

    handle = None
    if where == "layer":
        handle = den.model.blocks[1].attn.to_out.register_forward_pre_hook(fail_in_to_out)
    try:
        with pytest.raises(error, match="injected"):
            guided_run(den, rule, callback=callback if where == "callback" else None)
    finally:
        if handle is not None:
            handle.remove()
    assert_restored(den, before)
    assert torch.equal(guided_run(den, rule), guided_run(pristine, rule))


@failure_mode(
    "KeyboardInterrupt inside a diffusers UNet's perturbed mid-block self-attention (a custom "
    "processor) under SEG",
    "propagates; the same processor objects are installed, state_dict bit-identical, no "
    "hooks or modes left, output equals the never-patched UNet",
)
def test_unet_interrupt_keeps_processors_and_weights() -> None:
    diffusers = pytest.importorskip("diffusers")
    from diffusers.models.attention_processor import AttnProcessor2_0

    from smoothguide.diffusers import patcher_for

    class Interrupting(AttnProcessor2_0):
        armed = False

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            out = super().__call__(*args, **kwargs)
            if type(self).armed:
                raise KeyboardInterrupt("injected")
            return out

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
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
    ).eval()
    mid = unet.mid_block.attentions[0].transformer_blocks[0].attn1  # a perturbed layer
    mid.set_processor(Interrupting())
    pristine = copy.deepcopy(unet)
    before = snapshot(unet)
    g = torch.Generator().manual_seed(0)
    x, ehs = torch.randn(3, 4, 8, 16, generator=g), torch.randn(3, 5, 12, generator=g)
    t = torch.tensor([10, 10, 10])
    Interrupting.armed = True
    try:
        with (
            pytest.raises(KeyboardInterrupt),
            torch.no_grad(),
            patcher_for(unet).perturb(QuerySmoothing(1.0, layers="mid"), rows=[2]),
        ):
            unet(x, t, encoder_hidden_states=ehs)
    finally:
        Interrupting.armed = False
    assert_restored(unet, before)
    with torch.no_grad():
        assert torch.equal(
            unet(x, t, encoder_hidden_states=ehs).sample,
            pristine(x, t, encoder_hidden_states=ehs).sample,
        )


# -- nested and re-entrant use ---------------------------------------------------------------


@failure_mode(
    "nested perturb() contexts: same patcher on disjoint rows, same rows twice, two patchers "
    "of one model",
    "disjoint rows and two patchers compose (each row equals its single-perturbation run); "
    "overlapping rows: ValueError naming the rows; model restored after each",
)
def test_nested_and_reentrant_contexts() -> None:
    net = make_net()
    img = image()
    before = snapshot(net)
    seg, pag = QuerySmoothing(INF), IdentityAttention()
    p1, p2 = AttentionPatcher(net, layers=Attn), AttentionPatcher(net, layers=Attn)
    with p1.perturb(seg, rows=[0]):
        only_seg = net(img)
    with p1.perturb(pag, rows=[2]):
        only_pag = net(img)
    plain = net(img)
    for outer, inner in ((p1, p1), (p1, p2)):
        with outer.perturb(seg, rows=[0]), inner.perturb(pag, rows=[2]):
            both = net(img)
        assert torch.equal(both[0], only_seg[0])
        assert torch.equal(both[1], plain[1])
        assert torch.equal(both[2], only_pag[2])
    with (
        p1.perturb(seg, rows=[0, 1]),
        pytest.raises(ValueError, match=r"rows \[1\] are already"),
        p1.perturb(pag, rows=[1, 2]),
    ):
        pass  # pragma: no cover
    assert_restored(net, before)
    assert torch.equal(net(img), plain)


# -- threads ---------------------------------------------------------------------------------


@failure_mode(
    "two threads sampling at once with different rules (SEG+CFG, PAG) on two demo models, "
    "each with its own patcher",
    "each thread's samples bit-identical to the same runs done sequentially",
)
def test_two_models_in_two_threads_equal_sequential() -> None:
    dens = [tiny_demo(0), tiny_demo(1)]
    rules = [Compose(CFG(2.0), SEG(2.0, sigma=1.0)), PAG(2.0, cfg_scale=1.5)]
    expected = [guided_run(d, r) for d, r in zip(dens, rules, strict=True)]
    got: list[list[torch.Tensor]] = [[], []]
    barrier = threading.Barrier(2)

    def work(i: int) -> None:
        barrier.wait()
        for _ in range(2):
            got[i].append(guided_run(dens[i], rules[i]))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i in range(2):
        assert len(got[i]) == 2
        assert all(torch.equal(g, expected[i]) for g in got[i])


@failure_mode(
    "one model: a plain call from thread B while thread A holds a perturb() context",
    "B's output is the plain model's (perturbations are per thread), or B gets a RuntimeError "
    "saying concurrent use of one patched model is unsupported; never a silently perturbed "
    "result",
)
def test_other_thread_plain_call_is_not_perturbed() -> None:
    net = make_net()
    img = image()
    plain = net(img)
    patcher = AttentionPatcher(net, layers=Attn)
    entered, done = threading.Event(), threading.Event()
    result: dict[str, Any] = {}

    def holder() -> None:
        with patcher.perturb(QuerySmoothing(INF), rows=[0]):
            entered.set()
            done.wait(10)

    def other() -> None:
        entered.wait(10)
        try:
            result["out"] = net(img)
        except RuntimeError as exc:
            result["error"] = str(exc)
        finally:
            done.set()

    threads = [threading.Thread(target=holder), threading.Thread(target=other)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    if "error" in result:
        assert "thread" in result["error"]
    else:
        assert torch.equal(result["out"], plain)
    assert hooks(net) == 0


# -- numerics, layouts, sizes ----------------------------------------------------------------


@failure_mode(
    "float16 / bfloat16 model and input under SEG (sigma 1.5 and inf) and PAG",
    "perturbed rows equal the float64 run of the same weights within 8 eps(dtype) x max|out|; "
    "unperturbed rows equal the plain half-precision forward bit for bit",
)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "perturbation", [QuerySmoothing(1.5), QuerySmoothing(INF), IdentityAttention()], ids=repr
)
def test_half_precision_patched_model_vs_float64(dtype: torch.dtype, perturbation: Any) -> None:
    net = make_net()
    img = image()
    half, ref = copy.deepcopy(net).to(dtype), copy.deepcopy(net).double()
    with AttentionPatcher(half, layers=Attn).perturb(perturbation, rows=[1]):
        out = half(img.to(dtype))
    with AttentionPatcher(ref, layers=Attn).perturb(perturbation, rows=[1]):
        exact = ref(img.double())
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    err = (out[1].double() - exact[1]).abs().max()
    assert err <= 8 * torch.finfo(dtype).eps * exact[1].abs().max()
    assert torch.equal(out[[0, 2]], half(img.to(dtype))[[0, 2]])


@failure_mode(
    "non-contiguous model inputs (transposed, sliced with a step) and non-contiguous queries "
    "into the torch fast path",
    "the same output as for the contiguous copy (within float32 rounding, 1e-6)",
)
@pytest.mark.parametrize("layout", ["transpose", "step"])
def test_strided_inputs_to_the_patched_model(layout: str) -> None:
    net = make_net()
    dense = image()
    if layout == "transpose":
        img = dense.transpose(2, 3).contiguous().transpose(2, 3)
    else:
        img = torch.repeat_interleave(dense, 2, dim=3)[..., ::2]
    assert not img.is_contiguous()
    patcher = AttentionPatcher(net, layers=Attn)
    with patcher.perturb(QuerySmoothing(1.2), rows=[1, 2]):
        out, ref = net(img), net(img.contiguous())
    assert_close(out, ref, ops=64)  # strided inputs may take other kernels
    q = torch.randn(2, 4, 24, 3)[:, ::2].transpose(-1, -2).contiguous().transpose(-1, -2)
    assert_close(
        smooth_queries(q, TokenGrid(4, 6), 1.0),
        smooth_queries(q.contiguous(), TokenGrid(4, 6), 1.0),
        magnitude=q,
    )


@failure_mode(
    "an empty batch through guided sampling of a patched model (SEG+CFG); perturb() with no rows",
    "an empty sample of the right shape; no rows is exactly the plain model",
)
def test_empty_batch_and_no_rows() -> None:
    den = tiny_demo()
    out = guided_run(den, Compose(CFG(2.0), SEG(2.0, sigma=1.0)), batch=0)
    assert out.shape == (0, 1, 16, 16)
    net = make_net()
    img = image()
    with AttentionPatcher(net, layers=Attn).perturb(QuerySmoothing(INF), rows=[]):
        assert torch.equal(net(img), make_net()(img))
    assert hooks(den) == 0


@failure_mode(
    "bad patcher arguments: model not a Module, unknown layer name, rows negative / bool / "
    "repeated / a string / beyond the batch, an unsupported perturbation type, a geometry "
    "with batch 0",
    "TypeError/ValueError naming the argument (unknown layers list the available ones); "
    "model restored",
)
@pytest.mark.parametrize(
    ("call", "exc", "message"),
    [
        (lambda p, n: AttentionPatcher(object(), layers=Attn), TypeError, "model must be"),
        (lambda p, n: AttentionPatcher(n, layers=["nope"]), ValueError, "no module named"),
        (
            lambda p, n: p.perturb(QuerySmoothing(1.0, layers="nope"), rows=[0]).__enter__(),
            ValueError,
            r"available layers: \['blocks.0', 'blocks.1'\]",
        ),
        (lambda p, n: p.perturb(QuerySmoothing(1.0), rows=[-1]).__enter__(), ValueError, "rows"),
        (lambda p, n: p.perturb(QuerySmoothing(1.0), rows=[True]).__enter__(), ValueError, "rows"),
        (lambda p, n: p.perturb(QuerySmoothing(1.0), rows=[1, 1]).__enter__(), ValueError, "rows"),
        (lambda p, n: p.perturb(QuerySmoothing(1.0), rows="01").__enter__(), TypeError, "rows"),
        (lambda p, n: p.perturb(object(), rows=[0]).__enter__(), TypeError, "perturbation must"),
        (lambda p, n: Geometry(batch=0, height=2, width=2), ValueError, "Geometry.batch"),
    ],
)
def test_bad_patcher_arguments_are_named(call: Any, exc: type[Exception], message: str) -> None:
    net = make_net()
    before = snapshot(net)
    with pytest.raises(exc, match=message):
        call(AttentionPatcher(net, layers=Attn), net)
    assert_restored(net, before)


@failure_mode(
    "perturbed rows beyond the batch of the model call",
    "ValueError naming the rows and the batch; model restored",
)
def test_rows_beyond_the_batch() -> None:
    net = make_net()
    before = snapshot(net)
    with (
        pytest.raises(ValueError, match=r"rows \[5\] out of range for a model call with batch 3"),
        AttentionPatcher(net, layers=Attn).perturb(QuerySmoothing(1.0), rows=[5]),
    ):
        net(image())
    assert_restored(net, before)


@failure_mode(
    "unconditional keyword arguments on another device than the conditional ones (meta vs cpu)",
    "the backend's device error from batching, raised before any hook is added; model restored",
)
def test_branch_inputs_on_mismatched_devices() -> None:
    den = tiny_demo()
    before = snapshot(den)
    rule = Compose(CFG(2.0), SEG(2.0, sigma=1.0))
    guided = GuidedDenoiser(
        den,
        rule,
        uncond={"class_labels": torch.tensor([10], device="meta")},
        perturber=demo_patcher(den),
    )
    x = torch.randn(2, 1, 16, 16)
    with pytest.raises(RuntimeError, match="device"), torch.no_grad():
        guided(x, 1.0, class_labels=torch.tensor([1, 2]))
    assert_restored(den, before)


# -- fuzzing the patcher against an independent float64 reference ---------------------------


def reference_forward(
    net: Net, img: torch.Tensor, rows: set[int], perturbation: Any
) -> torch.Tensor:
    """The Net's forward written out by hand, perturbing ``rows`` with the core functions."""
    from smoothguide import attention
    from smoothguide import smooth_queries as core_smooth

    b, c, h, w = img.shape
    z = img.flatten(2).transpose(1, 2) + net.offset
    for blk in net.blocks:
        heads, d = blk.heads, c // blk.heads
        q, k, v = (
            f(z).reshape(b, h * w, heads, d).transpose(1, 2) for f in (blk.to_q, blk.to_k, blk.to_v)
        )
        outs = []
        for i in range(b):
            qi, ki, vi = q[i].numpy(), k[i].numpy(), v[i].numpy()
            if i in rows and isinstance(perturbation, QuerySmoothing):
                p = perturbation
                qi = core_smooth(qi, TokenGrid(h, w), p.sigma, radius=p.radius, mode=p.mode)
            oi = vi if i in rows and isinstance(perturbation, IdentityAttention) else None
            outs.append(torch.from_numpy(attention(qi, ki, vi) if oi is None else oi))
        out = torch.stack(outs).transpose(1, 2).reshape(b, h * w, c)
        z = z + blk.to_out(out)
    return z.transpose(1, 2).reshape(b, c, h, w)


@failure_mode(
    "hypothesis: the patcher on random grids (1xN, Nx1 included), batch sizes, row subsets, "
    "sigma (also inf and per-axis), modes, radii, SEG and PAG",
    "perturbed rows equal a hand-written float64 forward using the core smooth_queries / "
    "attention to 1e-10; other rows bit-identical to the plain forward; always finite; hooks "
    "removed",
)
@settings(max_examples=25, deadline=5000)
@given(
    h=st.integers(1, 5),
    w=st.integers(1, 5),
    batch=st.integers(1, 3),
    data=st.data(),
    sigma=st.one_of(
        st.sampled_from([INF, 0.5, 3.0]),
        st.tuples(st.sampled_from([0.0, 1.0, INF]), st.sampled_from([0.0, 0.7, INF])),
    ),
    mode=st.sampled_from(["reflect", "mirror", "nearest", "wrap"]),
    radius=st.one_of(st.none(), st.integers(0, 6)),
    kind=st.sampled_from(["SEG", "PAG"]),
)
def test_fuzz_patcher_matches_a_hand_written_reference(
    h: int,
    w: int,
    batch: int,
    data: st.DataObject,
    sigma: Any,
    mode: str,
    radius: int | None,
    kind: str,
) -> None:
    rows = data.draw(st.sets(st.integers(0, batch - 1)), label="rows")
    net = make_net().double()
    img = image(batch, h, w).double()
    p = QuerySmoothing(sigma, mode=mode, radius=radius) if kind == "SEG" else IdentityAttention()
    with torch.no_grad():
        plain = net(img)
        with AttentionPatcher(net, layers=Attn).perturb(p, rows=sorted(rows)):
            out = net(img)
        ref = reference_forward(net, img, rows, p)
    assert torch.isfinite(out).all()
    for i in range(batch):
        if i in rows:
            torch.testing.assert_close(out[i], ref[i], rtol=1e-10, atol=1e-10)
        else:
            assert torch.equal(out[i], plain[i])
    assert hooks(net) == 0


@failure_mode(
    "Ctrl-C (KeyboardInterrupt) inside the perturbed mid-block attention during a "
    "GuidedPipeline call of a tiny Stable Diffusion pipeline (CFG + SEG)",
    "propagates; UNet weights, processors and hooks as before, no torch function mode left; "
    "the plain pipeline then gives the same images as before the interrupted call",
)
def test_keyboard_interrupt_during_a_guided_pipeline_call() -> None:
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from smoothguide.diffusers import GuidedPipeline
    from test_diffusers_unet_pipeline import H, W, make_pipe

    pipe = make_pipe("sd")
    unet = pipe.unet

    def call(fn: Any, **kw: Any) -> Any:
        gen = torch.Generator().manual_seed(0)
        return fn(
            "a cat", height=H, width=W, num_inference_steps=2, generator=gen, output_type="pt", **kw
        ).images

    plain = call(pipe, guidance_scale=3.0)
    before = snapshot(unet)
    seen = {"n": 0}

    def interrupt(mod: Any, args: Any) -> None:
        seen["n"] += 1
        if seen["n"] == 2:  # the second UNet step
            raise KeyboardInterrupt

    mid = unet.mid_block.attentions[0].transformer_blocks[0].attn1
    handle = mid.to_out[0].register_forward_pre_hook(interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            call(GuidedPipeline(pipe, SEG(3.0, sigma=2.0, cfg_scale=3.0, layers="mid")))
    finally:
        handle.remove()
    assert_restored(unet, before)
    assert torch.equal(call(pipe, guidance_scale=3.0), plain)


# -- a perturbation must never silently do nothing ------------------------------------------


class SkippingNet(Net):
    """A Net whose second block is skipped (a conditional path) or run in a worker thread."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        b, c, h, w = img.shape
        z = img.flatten(2).transpose(1, 2) + self.offset
        z = z + self.blocks[0](z)
        if self.how == "worker-thread":
            with ThreadPoolExecutor(1) as pool:
                z = z + pool.submit(self.blocks[1], z).result()
        return z.transpose(1, 2).reshape(b, c, h, w)


@failure_mode(
    "a perturbation selecting only a layer that does not run in the calling thread during the "
    "context: a skipped conditional path, or a forward that runs the layer in a worker thread "
    "(as DataParallel does)",
    "RuntimeError naming the layer when the context exits: the perturbation never silently "
    "does nothing",
)
@pytest.mark.parametrize("how", ["skipped", "worker-thread"])
def test_selected_layer_that_never_runs_is_an_error(how: str) -> None:
    torch.manual_seed(0)
    net = SkippingNet(how).eval()
    img = image()
    patcher = AttentionPatcher(net, layers=Attn)
    with (
        pytest.raises(RuntimeError, match=r"blocks\.1"),
        patcher.perturb(QuerySmoothing(INF, layers="blocks.1"), rows=[0]),
    ):
        net(img)
    assert hooks(net) == 0


@failure_mode(
    "SEG on a diffusers UNet whose attention processor does not call "
    "scaled_dot_product_attention (the classic AttnProcessor)",
    "RuntimeError naming the layer and its processor class and how to fix it; never a silent "
    "no-op; processors and weights restored",
)
def test_non_sdpa_processor_is_refused_loudly() -> None:
    diffusers = pytest.importorskip("diffusers")
    from diffusers.models.attention_processor import AttnProcessor

    from smoothguide.diffusers import patcher_for

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
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
    ).eval()
    unet.set_attn_processor(AttnProcessor())
    before = snapshot(unet)
    g = torch.Generator().manual_seed(0)
    x, ehs = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 12, generator=g)
    with (
        pytest.raises(RuntimeError, match=r"mid_block.*AttnProcessor.*scaled_dot_product"),
        torch.no_grad(),
        patcher_for(unet).perturb(QuerySmoothing(1.0, layers="mid"), rows=[1]),
    ):
        unet(x, torch.tensor([5, 5]), encoder_hidden_states=ehs)
    assert_restored(unet, before)


@failure_mode(
    "KeyboardInterrupt inside a patched layer, caught by user code inside an outer perturb() "
    "context that then keeps calling the model",
    "the outer context's later calls are exactly as if the inner context had never existed "
    "(no leftover mode perturbs them twice)",
)
def test_caught_interrupt_inside_an_outer_context_leaves_no_stale_perturbation() -> None:
    net = make_net()
    img = image()
    patcher = AttentionPatcher(net, layers=Attn)
    seg, pag = QuerySmoothing(1.0), IdentityAttention()
    with patcher.perturb(seg, rows=[0]):
        expected = net(img)
    with patcher.perturb(seg, rows=[0]):
        net.blocks[0].fail = KeyboardInterrupt
        with pytest.raises(KeyboardInterrupt), patcher.perturb(pag, rows=[1]):
            net(img)
        net.blocks[0].fail = None
        assert torch._C._len_torch_function_stack() == 0
        assert torch.equal(net(img), expected)
    assert hooks(net) == 0


# -- diffusers transformer families: token grids read from model inputs ----------------------


@st.composite
def flux_ids(draw: st.DrawFn) -> tuple[torch.Tensor, int, tuple[int, int] | None]:
    """Flux ``img_ids`` of an h x w grid (any offsets and strides), maybe damaged."""
    h, w = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    r0, c0 = draw(st.integers(0, 5)), draw(st.integers(0, 5))
    dr, dc = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    rows, cols = torch.meshgrid(r0 + dr * torch.arange(h), c0 + dc * torch.arange(w), indexing="ij")
    ids = torch.stack([torch.zeros(h, w), rows.float(), cols.float()], -1).reshape(h * w, 3)
    damage = draw(
        st.sampled_from(["none", "column-major", "shuffle", "drop", "duplicate", "extra-ref"])
    )
    expected: tuple[int, int] | None = (h, w)
    if damage == "column-major":
        ids = ids.reshape(h, w, 3).transpose(0, 1).reshape(h * w, 3)
        expected = (h, w) if h == 1 or w == 1 else None
    elif damage == "shuffle":
        perm = torch.randperm(
            h * w, generator=torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
        )
        ids = ids[perm]
        expected = (h, w) if bool((perm == torch.arange(h * w)).all()) else None
    elif damage == "drop" and h > 1 and w > 1:  # a hole inside a 2-D grid
        keep = torch.arange(h * w) != (h * w) // 2
        ids, expected = ids[keep], None
    elif damage == "duplicate":
        ids, expected = torch.cat([ids, ids[-1:]]), None
    elif damage == "extra-ref":  # Kontext-style reference-image tokens appended
        ref = ids.clone()
        ref[:, 0] = 1.0
        ids, expected = torch.cat([ids, ref]), None
    return ids, ids.shape[0], expected


@failure_mode(
    "hypothesis: Flux img_ids of random grids (offsets, strides, 1xN, Nx1), and damaged ids: "
    "column-major, shuffled, a token dropped or duplicated, extra reference-image tokens",
    "the exact (rows, cols) of an intact row-major grid, else ValueError saying the ids are not "
    "a row-major grid; never a guessed grid",
)
@settings(max_examples=60, deadline=None)  # the first example imports diffusers (seconds)
@given(case=flux_ids())
def test_fuzz_flux_grid_from_ids(case: tuple[torch.Tensor, int, tuple[int, int] | None]) -> None:
    from smoothguide.diffusers.flux import flux_grid_from_ids

    ids, n, expected = case
    if expected is None:
        with pytest.raises(ValueError, match="row-major grid"):
            flux_grid_from_ids(ids, n)
    else:
        assert flux_grid_from_ids(ids, n) == expected
    with pytest.raises(ValueError, match="img_ids must have shape"):
        flux_grid_from_ids(ids, n + 1)


class CroppingNet(Net):
    """A Net whose attention sees one token fewer than the image has (a grid that cannot fit)."""

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        z = img.flatten(2).transpose(1, 2)[:, 1:] + self.offset
        for blk in self.blocks:
            z = z + blk(z)
        return z


@failure_mode(
    "attention token counts that fit no grid of the input's aspect (one token cropped), and an "
    "attention batch that is not a multiple of the model batch",
    "ValueError naming the layer and the token count / RuntimeError naming the layer and both "
    "batch sizes; no square guessed; model restored",
)
def test_tokens_that_fit_no_grid_are_named() -> None:
    torch.manual_seed(0)
    net = CroppingNet().eval()
    before = snapshot(net)
    with (
        pytest.raises(ValueError, match=r"attention layer 'blocks\.0'.*23 tokens"),
        AttentionPatcher(net, layers=Attn).perturb(QuerySmoothing(1.0), rows=[0]),
    ):
        net(image(3, 4, 6))
    assert_restored(net, before)
    net = make_net()

    def wrong_batch(args: Any, kwargs: Any) -> Geometry:
        return Geometry(batch=2, height=4, width=6)

    patcher = AttentionPatcher(net, layers=Attn, geometry=wrong_batch)
    with (
        pytest.raises(RuntimeError, match=r"'blocks\.0'.*not a multiple of the model batch 2"),
        patcher.perturb(QuerySmoothing(1.0), rows=[0]),
    ):
        net(image(3, 4, 6))
    assert hooks(net) == 0


@failure_mode(
    "one perturb() context object entered twice: again after it exited, and nested in itself",
    "RuntimeError saying the context was already used and to call perturb() again (not "
    "Python's AttributeError about 'args'); model restored",
)
@pytest.mark.parametrize("how", ["again", "nested"])
def test_reusing_one_context_object_is_a_clear_error(how: str) -> None:
    net = make_net()
    img = image()
    before = snapshot(net)
    ctx = AttentionPatcher(net, layers=Attn).perturb(QuerySmoothing(1.0), rows=[0])
    if how == "again":
        with ctx:
            net(img)
        with pytest.raises(RuntimeError, match=r"perturb\(\)"), ctx:
            pass  # pragma: no cover
    else:
        with ctx, pytest.raises(RuntimeError, match=r"perturb\(\)"), ctx:
            pass  # pragma: no cover
    assert_restored(net, before)


@failure_mode(
    "ONE demo model sampled by two threads at once with different rules (SEG+CFG in one, PAG "
    "in the other), each with its own patcher, and with one shared patcher",
    "each thread's samples bit-identical to the same run done alone (perturbations are per "
    "thread; hooks are reference-counted under a lock)",
)
@pytest.mark.parametrize("patchers", ["own", "shared"])
def test_one_model_two_threads_different_rules_equal_sequential(patchers: str) -> None:
    den = tiny_demo(0)
    rules = [Compose(CFG(2.0), SEG(2.0, sigma=1.0)), PAG(2.0, cfg_scale=1.5)]
    shared = demo_patcher(den)
    perturbers = [shared, shared] if patchers == "shared" else [demo_patcher(den) for _ in rules]

    def run_one(i: int) -> torch.Tensor:
        guided = GuidedDenoiser(
            den, rules[i], uncond={"class_labels": torch.tensor([10])}, perturber=perturbers[i]
        )
        x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(3)) * SIGMAS[0]
        with torch.no_grad():
            return sample_euler(
                guided, x, SIGMAS, extra_args={"class_labels": torch.tensor([1, 2])}, progress=False
            )

    expected = [run_one(i) for i in range(2)]
    got: list[list[torch.Tensor]] = [[], []]
    barrier = threading.Barrier(2)

    def work(i: int) -> None:
        barrier.wait()
        for _ in range(3):
            got[i].append(run_one(i))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i in range(2):
        assert len(got[i]) == 3
        assert all(torch.equal(g, expected[i]) for g in got[i])
    assert hooks(den) == 0
