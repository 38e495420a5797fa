"""smoothguide.torch.AttentionPatcher on hand-written torch models and the demo DiT."""

from __future__ import annotations

import math
from typing import Any

import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402

from smoothguide import IdentityAttention, Perturber, QuerySmoothing, TokenGrid  # noqa: E402
from smoothguide.torch import AttentionPatcher, Geometry, JointTokens, LayerSpec  # noqa: E402
from smoothguide.torch import smooth_queries as fast_smooth  # noqa: E402
from tolerance import assert_close  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    """Tiny tensors: one intra-op thread avoids oversubscribing a shared CPU (10x faster here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Attn(torch.nn.Module):
    """Multi-head self-attention with a rotary-like step after the projection (as in Flux/SD3)."""

    def __init__(self, dim: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v = (torch.nn.Linear(dim, dim) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = (
            f(x).reshape(b, n, self.heads, c // self.heads).transpose(1, 2)
            for f in (self.to_q, self.to_k, self.to_v)
        )
        q = torch.flip(q, dims=[-1]) * 0.5  # stands for QK-norm / RoPE after to_q
        out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2).reshape(b, n, c)


class Net(torch.nn.Module):
    """Image (B, 8, H, W) -> tokens -> two attention blocks -> image."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList([Attn(), Attn()])

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        b, c, h, w = img.shape
        z = img.flatten(2).transpose(1, 2)
        for blk in self.blocks:
            z = z + blk(z)
        return z.transpose(1, 2).reshape(b, c, h, w)


class Capture(TorchFunctionMode):
    """Records the query of every scaled_dot_product_attention call (outside the patcher)."""

    def __init__(self) -> None:
        super().__init__()
        self.queries: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self.queries.append(args[0].detach().clone())
        return func(*args, **kwargs)


@pytest.fixture
def net() -> Net:
    torch.manual_seed(0)
    return Net().eval()


def test_is_a_perturber_and_selects_layers(net: Net) -> None:
    p = AttentionPatcher(net, layers=Attn, presets={"first": ["blocks.0"]}, default="first")
    assert isinstance(p, Perturber)
    assert p.layers == ("blocks.0", "blocks.1")
    assert p.resolve(None) == ("blocks.0",)
    assert p.resolve(["blocks.1", "first", "blocks.1"]) == ("blocks.0", "blocks.1")
    with pytest.raises(ValueError, match=r"unknown.*'blocks\.7'.*available layers.*blocks\.0"):
        p.resolve("blocks.7")
    with pytest.raises(ValueError, match="no module named"):
        AttentionPatcher(net, layers=["blocks.9"])
    by_pred = AttentionPatcher(
        net, layers=lambda name, m: name.endswith("1") and isinstance(m, Attn)
    )
    assert by_pred.layers == ("blocks.1",)


def test_sigma_zero_and_empty_rows_are_exact_identity(net: Net) -> None:
    img = torch.randn(3, 8, 4, 6)
    ref = net(img)
    p = AttentionPatcher(net, layers=Attn)
    with p.perturb(QuerySmoothing(0.0), rows=[0, 1, 2]):
        assert torch.equal(net(img), ref)
    with p.perturb(QuerySmoothing(2.0), rows=[]):
        assert torch.equal(net(img), ref)


@pytest.mark.numerics
@pytest.mark.parametrize(("h", "w"), [(8, 16), (24, 8)])
def test_blurred_queries_equal_smooth_queries_of_raw_queries(net: Net, h: int, w: int) -> None:
    """The query entering SDPA in the perturbed rows is smooth_queries of the unperturbed one."""
    img = torch.randn(3, 8, h, w)
    sigma = 10.0  # radius 30: wider than either grid side
    with Capture() as raw:
        ref = net(img)
    p = AttentionPatcher(net, layers=["blocks.1"])
    with Capture() as seen, p.perturb(QuerySmoothing(sigma, mode="mirror"), rows=[1]):
        out = net(img)
    assert len(seen.queries) == 2
    torch.testing.assert_close(
        seen.queries[0], raw.queries[0], rtol=0, atol=0
    )  # blocks.0 untouched
    q_raw, q_seen = raw.queries[1], seen.queries[1]  # (B, heads, N, d); block inputs equal
    expected = fast_smooth(q_raw[1:2], TokenGrid(h, w), sigma, mode="mirror")
    assert_close(q_seen[1:2], expected, ops=64, magnitude=q_raw[1:2])
    assert torch.equal(q_seen[[0, 2]], q_raw[[0, 2]])
    assert torch.equal(out[[0, 2]], ref[[0, 2]])  # other rows bit for bit
    assert not torch.allclose(out[1], ref[1])


def test_pag_rows_get_values_and_disjoint_contexts_combine(net: Net) -> None:
    img = torch.randn(4, 8, 3, 5)
    ref = net(img)
    p = AttentionPatcher(net, layers=Attn)
    with (
        p.perturb(IdentityAttention(layers="blocks.0"), rows=[3]),
        p.perturb(QuerySmoothing(math.inf, layers="blocks.1"), rows=[2]),
    ):
        out = net(img)
    assert torch.equal(out[[0, 1]], ref[[0, 1]])
    assert not torch.allclose(out[3], ref[3])
    assert not torch.allclose(out[2], ref[2])
    # Row 3: block 0 outputs its values V (identity attention), block 1 runs plainly.
    z0 = img[3:4].flatten(2).transpose(1, 2)
    z1 = z0 + net.blocks[0].to_v(z0)
    z2 = z1 + net.blocks[1](z1)
    assert_close(out[3], z2[0].transpose(0, 1).reshape(8, 3, 5))
    with (
        pytest.raises(ValueError, match="disjoint rows"),
        p.perturb(QuerySmoothing(1.0), rows=[0, 1]),
        p.perturb(IdentityAttention(), rows=[1]),
    ):
        pass


def test_restored_after_exception_and_no_hooks_left(net: Net) -> None:
    img = torch.randn(2, 8, 4, 4)
    ref = net(img)
    p = AttentionPatcher(net, layers=Attn)

    def raise_in_context() -> None:
        with p.perturb(QuerySmoothing(1.0), rows=[1]):
            net(img)
            raise KeyError("boom")

    def fail(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        raise ZeroDivisionError("inside the attention layer")

    def raise_inside_forward() -> None:
        with p.perturb(QuerySmoothing(1.0), rows=[1]):
            net(img)

    with pytest.raises(KeyError):
        raise_in_context()
    handle = net.blocks[1].to_k.register_forward_pre_hook(fail)
    with pytest.raises(ZeroDivisionError):
        raise_inside_forward()
    handle.remove()
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())
    assert torch._C._len_torch_function_stack() == 0
    assert torch.equal(net(img), ref)


def test_errors_name_the_problem(net: Net) -> None:
    p = AttentionPatcher(net, layers=Attn)
    img = torch.randn(2, 8, 4, 4)
    with pytest.raises(ValueError, match="out of range"), p.perturb(QuerySmoothing(1.0), rows=[2]):
        net(img)
    with (
        pytest.raises(TypeError, match="QuerySmoothing or IdentityAttention"),
        p.perturb(
            "seg",
            rows=[0],  # type: ignore[arg-type]
        ),
    ):
        pass

    class NoSDPA(torch.nn.Module):
        def forward(self, img: torch.Tensor) -> torch.Tensor:
            return self.attn(img.flatten(2).transpose(1, 2))

    bad = NoSDPA()
    bad.attn = torch.nn.Identity()
    pb = AttentionPatcher(bad, layers=["attn"])
    with (
        pytest.raises(RuntimeError, match="without a self-attention call of .*scaled_dot_product"),
        pb.perturb(QuerySmoothing(1.0), rows=[0]),
    ):
        bad(img)
    odd = AttentionPatcher(
        net, layers=Attn, geometry=lambda a, k: Geometry(batch=3, height=4, width=4)
    )
    with (
        pytest.raises(RuntimeError, match="not a multiple of the model batch 3"),
        odd.perturb(QuerySmoothing(1.0), rows=[0]),
    ):
        net(img)


def test_joint_tokens_leave_text_queries_alone() -> None:
    """A joint [text; image] sequence: text-token queries stay bit-identical."""
    torch.manual_seed(1)
    attn = Attn()

    class Joint(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = attn

        def forward(self, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
            return self.attn(torch.cat([txt, img.flatten(2).transpose(1, 2)], dim=1))

    model = Joint()
    img, txt = torch.randn(2, 8, 4, 6), torch.randn(2, 5, 8)

    def geometry(args, kwargs):  # type: ignore[no-untyped-def]
        return Geometry(batch=2, height=4, width=6, tokens=24)

    p = AttentionPatcher(model, {"attn": LayerSpec(JointTokens("prefix"))}, geometry=geometry)
    with Capture() as raw:
        model(img, txt)
    with Capture() as seen, p.perturb(QuerySmoothing(math.inf), rows=[0]):
        model(img, txt)
    q_raw, q_seen = raw.queries[0], seen.queries[0]
    assert torch.equal(q_seen[0, :, :5], q_raw[0, :, :5])
    mean = q_raw[0, :, 5:].mean(dim=1, keepdim=True)
    assert_close(q_seen[0, :, 5:], mean.expand(-1, 24, -1), ops=64, magnitude=q_raw[0, :, 5:])


@pytest.mark.numerics
def test_demo_model_by_class_and_exact_names() -> None:
    demo = pytest.importorskip("smoothguide.demo.model")
    net = demo.DemoDiT(demo.DiTConfig(hidden=32, depth=2, heads=2)).eval()
    for blk in net.parameters():
        torch.nn.init.normal_(blk, std=0.2)
    x, t, y = torch.randn(2, 1, 16, 16), torch.full((2,), 0.5), torch.tensor([3, 3])
    p = AttentionPatcher(net, layers=demo.Attention)
    assert p.layers == ("blocks.0.attn", "blocks.1.attn")
    ref = net(x, t, y)
    with Capture() as raw:
        net(x, t, y)
    with Capture() as seen, p.perturb(QuerySmoothing(1.0, layers="blocks.0.attn"), rows=[1]):
        out = net(x, t, y)
    expected = fast_smooth(raw.queries[0][1], TokenGrid(8, 8), 1.0)
    assert_close(seen.queries[0][1], expected, ops=64, magnitude=raw.queries[0][1])
    assert torch.equal(out[0], ref[0])
    assert not torch.allclose(out[1], ref[1])


@pytest.mark.numerics
def test_guided_denoiser_batched_equals_separate_calls_on_the_demo_model() -> None:
    """The Perturber contract end to end: one batched call == one call per branch."""
    demo = pytest.importorskip("smoothguide.demo.model")
    from smoothguide.rules import PAG, SEG, Compose
    from smoothguide.sampling import GuidedDenoiser

    torch.manual_seed(0)
    net = demo.DemoDiT(demo.DiTConfig(hidden=32, depth=2, heads=2)).eval()
    for param in net.parameters():
        torch.nn.init.normal_(param, std=0.2)
    den = demo.DemoDenoiser(net).eval()
    patcher = AttentionPatcher(den, layers=demo.Attention)
    rule = Compose(SEG(2.0, sigma=1.5, cfg_scale=3.0, layers="model.blocks.0.attn"), PAG(1.0))
    x, labels = torch.randn(2, 1, 16, 16), torch.tensor([3, 7])
    null = {"class_labels": torch.full((2,), demo.NULL_CLASS)}
    outs = []
    with torch.no_grad():
        for batched in (True, False):
            guided = GuidedDenoiser(den, rule, uncond=null, perturber=patcher, batched=batched)
            outs.append(guided(x, torch.full((2,), 2.0), class_labels=labels))
    # Different batch sizes run different GEMM blockings: rounding through 2 blocks.
    assert_close(outs[0], outs[1], ops=256)
    with torch.no_grad():
        plain = GuidedDenoiser(den, SEG(0.0, cfg_scale=3.0), uncond=null)(
            x, torch.full((2,), 2.0), class_labels=labels
        )
    assert not torch.allclose(outs[0], plain, atol=1e-4)


def test_selected_layers_that_never_run_are_an_error(net: Net) -> None:
    """The model ran inside the context but the chosen layer did not: loud, not a silent no-op."""

    class Skip(Net):
        def forward(self, img: torch.Tensor) -> torch.Tensor:
            z = img.flatten(2).transpose(1, 2)
            return self.blocks[0](z)

    skip = Skip().eval()
    p = AttentionPatcher(skip, layers=Attn)

    def run() -> None:
        with p.perturb(QuerySmoothing(1.0, layers="blocks.1"), rows=[0]):
            skip(torch.randn(1, 8, 2, 3))

    with pytest.raises(RuntimeError, match=r"none of the selected layers \['blocks\.1'\] ran"):
        run()
    with p.perturb(QuerySmoothing(1.0, layers="blocks.1"), rows=[0]):
        pass  # no model call at all: nothing to complain about


def test_only_self_attention_calls_of_a_layer_are_perturbed() -> None:
    """A second SDPA call against other tokens (an IP-Adapter's keys) keeps its queries."""

    class AttnWithImagePrompt(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.to_q = torch.nn.Linear(8, 8)
            self.ip_tokens = torch.nn.Parameter(torch.randn(1, 2, 3, 4))

        def forward(self, z: torch.Tensor) -> torch.Tensor:
            b, n, c = z.shape
            q = self.to_q(z).reshape(b, n, 2, 4).transpose(1, 2)
            own = F.scaled_dot_product_attention(q, q, q)  # self-attention
            ip = self.ip_tokens.expand(b, -1, -1, -1)
            extra = F.scaled_dot_product_attention(q, ip, ip)  # cross-attention to 3 tokens
            return (own + extra).transpose(1, 2).reshape(b, n, c)

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = AttnWithImagePrompt()

        def forward(self, img: torch.Tensor) -> torch.Tensor:
            return self.attn(img.flatten(2).transpose(1, 2))

    torch.manual_seed(2)
    model = Model()
    img = torch.randn(2, 8, 4, 5)
    p = AttentionPatcher(model, layers=["attn"])
    with Capture() as raw:
        model(img)
    with Capture() as seen, p.perturb(QuerySmoothing(math.inf), rows=[1]):
        model(img)
    (q_self, q_cross), (r_self, r_cross) = seen.queries, raw.queries
    assert torch.equal(q_cross, r_cross)  # the cross call: untouched
    mean = r_self[1].mean(dim=1, keepdim=True).expand_as(r_self[1])
    torch.testing.assert_close(q_self[1], mean)
    assert torch.equal(q_self[0], r_self[0])
