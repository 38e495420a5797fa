"""Fork mode: a forked call gives the unforked call's outputs while running fewer rows early on.

References: the same GuidedDenoiser / GuidedPipeline with ``fork=False`` (the
plain batched call, tested against the unpatched model elsewhere). float64
comparisons allow a few ulps per accumulated operation (the pre-fork part runs
at a smaller batch, and CPU kernels may block a matmul differently by batch);
float32 ones ``atol = 64 eps max|ref|`` plus the same scaling.
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from typing import Any

import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402

from smoothguide.branches import Branch  # noqa: E402
from smoothguide.perturbations import QuerySmoothing  # noqa: E402
from smoothguide.rules import CFG, PAG, SEG, Compose, Interval  # noqa: E402
from smoothguide.sampling import GuidedDenoiser, euler_steps  # noqa: E402
from smoothguide.sampling.forking import ForkSpec, plan_fork  # noqa: E402
from smoothguide.torch import AttentionPatcher  # noqa: E402
from smoothguide.torch.fork import ForkPolicy  # noqa: E402

DIM, CTX = 8, 6


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def close(a: torch.Tensor, b: torch.Tensor, ops: int = 64) -> None:
    """|a - b| <= ops * eps * max|b| (elementwise), with eps of the dtype."""
    eps = torch.finfo(b.dtype).eps
    tol = ops * eps * float(b.abs().max())
    err = float((a - b).abs().max())
    assert a.shape == b.shape
    assert err <= tol, f"max |forked - unforked| = {err:.3g} > {tol:.3g}"


# ---------------------------------------------------------------- a small torch model


class Attn(torch.nn.Module):
    """Self-attention through SDPA (what the patcher perturbs)."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(DIM, 3 * DIM)
        self.out = torch.nn.Linear(DIM, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, 2, DIM // 2).permute(2, 0, 3, 1, 4)
        return self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, DIM))


class Cross(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = torch.nn.Linear(DIM, DIM)
        self.kv = torch.nn.Linear(CTX, 2 * DIM)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        k, v = self.kv(context).chunk(2, dim=-1)
        return F.scaled_dot_product_attention(self.q(x), k, v)


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(DIM)
        self.attn = Attn()
        self.cross = Cross()
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(DIM, 16), torch.nn.GELU(), torch.nn.Linear(16, DIM)
        )

    def forward(self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm(x) + temb[:, None])
        x = x + self.cross(x, context)
        return x + self.mlp(x)


class Out(torch.nn.Module):
    """Takes a skip connection from before the blocks (a pre-fork tensor)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(2 * DIM, 3)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.cat([x, skip], dim=-1))


class Net(torch.nn.Module):
    """``Net(x, sigma, context) -> denoised``; x is ``(B, 3, H, W)``, context ``(B, 4, CTX)``."""

    def __init__(self, depth: int = 3) -> None:
        super().__init__()
        self.embed = torch.nn.Linear(3, DIM)
        self.temb = torch.nn.Linear(1, DIM)
        self.blocks = torch.nn.ModuleList(Block() for _ in range(depth))
        self.out = Out()

    def forward(self, x: torch.Tensor, sigma: Any, context: torch.Tensor) -> torch.Tensor:
        _, c, h, w = x.shape
        s = torch.as_tensor(sigma, dtype=x.dtype).expand(x.shape[0])
        h0 = self.embed(x.flatten(2).transpose(1, 2))
        temb = self.temb(torch.log(s)[:, None])
        hs = h0
        for block in self.blocks:
            hs = block(hs, temb, context)
        out = self.out(hs, h0)
        # the batch comes from the tensor itself: x's batch is the pre-fork one here
        return out.transpose(1, 2).reshape(out.shape[0], c, h, w)


def make_net(dtype: torch.dtype = torch.float64) -> Net:
    torch.manual_seed(0)
    return Net().to(dtype).eval()


class Rows:
    """Batch sizes seen by chosen submodules, per model call."""

    def __init__(self, model: torch.nn.Module, *names: str) -> None:
        self.seen: dict[str, list[int]] = {n: [] for n in names}
        mods = dict(model.named_modules())
        self.handles = [
            mods[n].register_forward_pre_hook(
                lambda m, a, kw, n=n: self.seen[n].append(
                    (a[0] if a else next(iter(kw.values()))).shape[0]
                ),
                with_kwargs=True,
            )
            for n in names
        ]

    def close(self) -> None:
        for h in self.handles:
            h.remove()


B, H, W = 2, 4, 6  # batch > 1, non-square grid


def inputs(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, 3, H, W, generator=g, dtype=dtype)
    cond = torch.randn(B, 4, CTX, generator=g, dtype=dtype)
    uncond = torch.zeros(1, 4, CTX, dtype=dtype)
    return x, cond, uncond


L1, L2 = "blocks.1.attn", "blocks.2.attn"
TOY_CASES = [
    ("cfg+seg", SEG(3.0, sigma=2.0, cfg_scale=4.0, layers=L1), ["blocks.1"]),
    ("seg-only", SEG(3.0, sigma=math.inf, layers=L1), ["blocks.1"]),
    ("paper-eq10", SEG(3.0, sigma=1.5, cfg_scale=4.0, convention="paper", layers=L1), ["blocks.1"]),
    ("cfg+pag", Compose(CFG(3.0), PAG(2.0, layers=L2)), ["blocks.2"]),
    ("seg-two-blocks", SEG(2.0, sigma=1.0, cfg_scale=2.0, layers=(L1, L2)), ["blocks.1"]),
    ("first-block", SEG(2.0, sigma=1.0, cfg_scale=2.0, layers="blocks.0.attn"), ["blocks.0"]),
    (
        "seg+pag",
        Compose(CFG(3.0), SEG(2.0, sigma=1.0, layers=L1), PAG(2.0, layers=L2)),
        ["blocks.1", "blocks.2"],
    ),
    (
        "two-sigmas",
        Compose(CFG(3.0), SEG(2.0, sigma=2.0, layers=L2), SEG(1.0, sigma=math.inf, layers=L1)),
        ["blocks.1", "blocks.2"],
    ),
]


@pytest.mark.parametrize(("name", "rule", "points"), TOY_CASES, ids=[c[0] for c in TOY_CASES])
def test_generic_model_forked_equals_unforked(name: str, rule: Any, points: list[str]) -> None:
    net = make_net()
    patcher = AttentionPatcher(net, layers=Attn)
    x, cond, uncond = inputs()
    outs = {}
    seen = {}
    for fork in (False, True):
        rows = Rows(net, "embed", *points)
        guided = GuidedDenoiser(net, rule, uncond={"context": uncond}, perturber=patcher, fork=fork)
        with torch.no_grad():
            outs[fork] = guided(x, 0.7, context=cond)
        rows.close()
        seen[fork] = rows.seen
    close(outs[True], outs[False])
    order = guided.rule.branches(guided.context(0.7))
    plain = {b.conditioning for b in order if b.perturbation is None}
    total = len(set(order)) * B
    assert seen[False]["embed"] == [total]
    assert seen[True]["embed"] == [len(plain) * B]  # only the plain rows before the fork
    # each fork point sees the rows of the forks before it; all rows after the last
    sizes = [len(plain) * B]
    for p in points:
        assert seen[True][p] == [sizes[-1]]
        sizes.append(sizes[-1] + B * sum(1 for _ in [p]))


@pytest.mark.parametrize(("name", "rule", "points"), TOY_CASES, ids=[c[0] for c in TOY_CASES])
def test_early_copy_at_the_previous_block_output(name: str, rule: Any, points: list[str]) -> None:
    """``ForkPolicy(copy_at_previous=True)``: rows copied at the previous block's output.

    Same outputs as unforked; a fork point with a previous block sees its rows
    already copied, and the previous block's pre-fork output tensor is gone
    when the fork point runs (the forward holds only the copies).
    """
    import weakref

    net = make_net()
    patcher = AttentionPatcher(
        net, layers=Attn, fork=ForkPolicy(proven=True, copy_at_previous=True)
    )
    x, cond, uncond = inputs()
    refs: dict[str, Any] = {}
    alive: dict[str, bool] = {}
    mods = dict(net.named_modules())
    handles = []
    for p in points:
        i = int(p.split(".")[1])
        if i > 0:  # registered before the fork hooks: sees the block's own output
            handles.append(
                mods[f"blocks.{i - 1}"].register_forward_hook(
                    lambda m, a, out, p=p: refs.__setitem__(p, weakref.ref(out))
                )
            )
            handles.append(
                mods[p].register_forward_pre_hook(
                    lambda m, a, p=p: alive.__setitem__(p, refs[p]() is not None)
                )
            )
    outs, seen = {}, {}
    for fork in (False, True):
        rows = Rows(net, "embed", *points)
        guided = GuidedDenoiser(net, rule, uncond={"context": uncond}, perturber=patcher, fork=fork)
        alive.clear()
        with torch.no_grad():
            outs[fork] = guided(x, 0.7, context=cond)
        rows.close()
        seen[fork] = rows.seen
        if fork:
            assert alive == {p: False for p in points if not p.endswith(".0")}
        else:
            assert all(alive.values())  # the check can see a live tensor
    for h in handles:
        h.remove()
    close(outs[True], outs[False])
    order = guided.rule.branches(guided.context(0.7))
    size = len({b.conditioning for b in order if b.perturbation is None}) * B
    assert seen[True]["embed"] == [size]
    for p in points:  # the fork point's input: copied already unless it is the first block
        expected = size if p.endswith(".0") else size + B
        assert seen[True][p] == [expected]
        size += B


def test_schedules_turn_the_forked_branch_on_and_off() -> None:
    net = make_net()
    patcher = AttentionPatcher(net, layers=Attn)
    x, cond, uncond = inputs()
    sigmas = [5.0, 2.0, 1.0, 0.5, 0.0]
    rule = SEG(3.0, sigma=2.0, cfg_scale=3.0, layers=L1, schedule=Interval(0.7, 3.0))
    final = {}
    for fork in (False, True):
        rows = Rows(net, "embed", "blocks.1", "blocks.2")
        guided = GuidedDenoiser(net, rule, uncond={"context": uncond}, perturber=patcher, fork=fork)
        with torch.no_grad():
            for step in euler_steps(guided, x * 5.0, sigmas, extra_args={"context": cond}):
                final[fork] = step.x
        rows.close()
        if fork:  # SEG on at σ = 2, 1 only: forked there, plain CFG elsewhere
            assert rows.seen["embed"] == [2 * B] * 4
            assert rows.seen["blocks.2"] == [2 * B, 3 * B, 3 * B, 2 * B]
        else:
            assert rows.seen["embed"] == [2 * B, 3 * B, 3 * B, 2 * B]
    close(final[True], final[False], ops=256)


def test_float32_within_tolerance() -> None:
    net = make_net(torch.float32)
    patcher = AttentionPatcher(net, layers=Attn)
    x, cond, uncond = inputs(torch.float32)
    rule = Compose(CFG(3.0), SEG(2.0, sigma=1.0, layers=L1), PAG(2.0, layers=L2))
    outs = [
        GuidedDenoiser(net, rule, uncond={"context": uncond}, perturber=patcher, fork=f)(
            x, 0.7, context=cond
        ).detach()
        for f in (False, True)
    ]
    close(outs[1], outs[0], ops=64)


def test_generic_policy_is_opt_in_and_proven_policies_fork_by_default() -> None:
    net = make_net()
    x, cond, uncond = inputs()
    rule = SEG(3.0, sigma=2.0, cfg_scale=4.0, layers=L1)
    for policy, expected in ((None, 3 * B), (ForkPolicy(proven=True), 2 * B)):
        patcher = AttentionPatcher(net, layers=Attn, fork=policy)
        rows = Rows(net, "embed")
        with torch.no_grad():
            GuidedDenoiser(net, rule, uncond={"context": uncond}, perturber=patcher)(
                x, 0.7, context=cond
            )
        rows.close()
        assert rows.seen["embed"] == [expected]
    assert not AttentionPatcher(net, layers=Attn).fork_proven
    assert patcher.fork_point(QuerySmoothing(1.0, layers=(L2, L1)))[0] == "blocks.1"


def test_threads_fork_their_own_calls() -> None:
    """Concurrent forked calls on one model and patcher: each thread gets its own rows."""
    import threading

    net = make_net()
    patcher = AttentionPatcher(net, layers=Attn, fork=ForkPolicy(proven=True))
    x, cond, uncond = inputs()
    rules = [
        SEG(3.0, sigma=2.0, cfg_scale=4.0, layers=L1),
        Compose(CFG(3.0), SEG(2.0, sigma=1.0, layers=L1), PAG(2.0, layers=L2)),
    ]
    ref = [
        GuidedDenoiser(net, r, uncond={"context": uncond}, perturber=patcher, fork=False)(
            x, 0.7, context=cond
        ).detach()
        for r in rules
    ]
    got: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        den = GuidedDenoiser(net, rules[i], uncond={"context": uncond}, perturber=patcher)
        try:
            for _ in range(5):
                with torch.no_grad():
                    got[i].append(den(x, 0.7, context=cond))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i in (0, 1):
        for out in got[i]:
            close(out, ref[i])


def test_fork_true_needs_a_forking_perturber() -> None:
    class Plain:
        def perturb(self, p: Any, rows: Any) -> Any:  # pragma: no cover - never entered
            raise AssertionError

    with pytest.raises(TypeError, match="fork=True needs a perturber that can fork"):
        plan_fork([Branch("cond"), Branch("cond", QuerySmoothing(1.0))], Plain(), True, 1)
    with pytest.raises(TypeError, match="fork must be True, False or None"):
        GuidedDenoiser(make_net(), CFG(2.0), fork="yes")  # type: ignore[arg-type]
    assert (
        plan_fork([Branch("cond"), Branch("cond", QuerySmoothing(1.0))], Plain(), None, 1) is None
    )


def test_plan_layout_prefix_and_sources() -> None:
    net = make_net()
    patcher = AttentionPatcher(net, layers=Attn)
    seg2, seg1 = (
        Branch("cond", QuerySmoothing(1.0, layers=L2)),
        Branch("uncond", QuerySmoothing(2.0, layers=L1)),
    )
    order = [Branch("uncond"), Branch("cond"), seg2, seg1]
    plan = plan_fork(order, patcher, True, 2)
    assert plan is not None
    assert plan.order == [Branch("uncond"), Branch("cond"), seg1, seg2]  # fork order
    assert plan.spec == ForkSpec(8, 4, (("blocks.1", (0, 1)), ("blocks.2", (2, 3))))
    assert plan.spec.sizes == (4, 6, 8)
    # a perturbed branch without its plain branch shares nothing: it runs from the start
    lone = plan_fork(
        [Branch("cond"), Branch("uncond", QuerySmoothing(1.0, layers=L1))], patcher, True, 1
    )
    assert lone is None


class Folded(Net):
    """Folds a 'frames' factor of 2 into the batch before the blocks."""

    def forward(self, x: torch.Tensor, sigma: Any, context: torch.Tensor) -> torch.Tensor:
        _, c, h, w = x.shape
        s = torch.as_tensor(sigma, dtype=x.dtype).expand(x.shape[0])
        tokens = self.embed(x.flatten(2).transpose(1, 2))
        hs = tokens.reshape(-1, (h * w) // 2, DIM)  # (2B, HW/2, DIM)
        temb = self.temb(torch.log(s)[:, None]).repeat_interleave(2, 0)
        ctx = context.repeat_interleave(2, 0)
        for block in self.blocks:
            hs = block(hs, temb, ctx)
        out = self.out.proj(torch.cat([hs, hs], -1)).reshape(-1, h * w, 3)
        return out.transpose(1, 2).reshape(out.shape[0], c, h, w)


def test_folded_batch_at_the_fork_point_is_an_error_not_a_guess() -> None:
    torch.manual_seed(0)
    net = Folded().double().eval()
    patcher = AttentionPatcher(net, layers=Attn, geometry=lambda a, k: _geom(a))
    x, cond, uncond = inputs()
    guided = GuidedDenoiser(
        net,
        SEG(2.0, sigma=math.inf, layers=L1),
        uncond={"context": uncond},
        perturber=patcher,
        fork=True,
    )
    with pytest.raises(RuntimeError, match="have no tensor with the 2 rows in effect"):
        guided(x, 0.7, context=cond)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in net.modules())


def _geom(args: Any) -> Any:
    from smoothguide.torch import Geometry

    x = args[0]
    return Geometry(batch=x.shape[0], height=x.shape[2] // 2, width=x.shape[3])


class Reversed(Net):
    """Runs its blocks last to first: registration order is not execution order."""

    def forward(self, x: torch.Tensor, sigma: Any, context: torch.Tensor) -> torch.Tensor:
        _, c, h, w = x.shape
        s = torch.as_tensor(sigma, dtype=x.dtype).expand(x.shape[0])
        hs = h0 = self.embed(x.flatten(2).transpose(1, 2))
        temb = self.temb(torch.log(s)[:, None])
        for block in reversed(self.blocks):
            hs = block(hs, temb, context)
        out = self.out(hs, h0)
        return out.transpose(1, 2).reshape(out.shape[0], c, h, w)


def test_fork_points_out_of_planned_order_raise() -> None:
    torch.manual_seed(0)
    net = Reversed().double().eval()
    patcher = AttentionPatcher(net, layers=Attn)
    x, cond, uncond = inputs()
    rule = Compose(CFG(2.0), SEG(2.0, sigma=1.0, layers=L1), PAG(2.0, layers=L2))
    guided = GuidedDenoiser(net, rule, uncond={"context": uncond}, perturber=patcher, fork=True)
    with pytest.raises(RuntimeError, match="not in the planned order"):
        guided(x, 0.7, context=cond)

    # a rank that states the real order makes it work, and exact
    class Backwards(ForkPolicy):
        def rank(self, model: Any, point: str) -> Any:
            return -int(point.split(".")[1])

    patcher = AttentionPatcher(net, layers=Attn, fork=Backwards())
    outs = [
        GuidedDenoiser(net, rule, uncond={"context": uncond}, perturber=patcher, fork=f)(
            x, 0.7, context=cond
        ).detach()
        for f in (False, True)
    ]
    close(outs[1], outs[0])


# --------------------------------------------------------------------- diffusers UNet

diffusers = pytest.importorskip("diffusers")


def make_unet(xl: bool, dtype: torch.dtype = torch.float64) -> Any:
    torch.manual_seed(0)
    kw: dict[str, Any] = dict(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        attention_head_dim=4,
        norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
    )
    if xl:
        kw.update(
            addition_embed_type="text_time",
            addition_time_embed_dim=4,
            projection_class_embeddings_input_dim=6 * 4 + 8,
            transformer_layers_per_block=(1, 2),
        )
    return diffusers.UNet2DConditionModel(**kw).to(dtype).eval()


class EpsDenoiser(torch.nn.Module):
    """k-diffusion wrapper: ``x - σ ε(x / sqrt(1 + σ²), t(σ))`` (mixes x with the UNet's output)."""

    def __init__(self, unet: Any) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, sigma: Any, **cond: Any) -> torch.Tensor:
        s = torch.as_tensor(sigma, dtype=x.dtype).expand(x.shape[0])
        eps = self.unet(
            x / torch.sqrt(1 + s * s)[:, None, None, None], torch.atan(s) * 600, **cond
        ).sample
        return x - s[:, None, None, None] * eps


def unet_cond(
    xl: bool, dtype: torch.dtype = torch.float64
) -> tuple[dict[str, Any], dict[str, Any]]:
    g = torch.Generator().manual_seed(3)
    cond: dict[str, Any] = {
        "encoder_hidden_states": torch.randn(B, 5, 16, generator=g, dtype=dtype)
    }
    uncond: dict[str, Any] = {
        "encoder_hidden_states": torch.randn(1, 5, 16, generator=g, dtype=dtype)
    }
    if xl:
        time_ids = torch.tensor([[16.0, 24.0, 0.0, 0.0, 16.0, 24.0]], dtype=dtype)
        cond["added_cond_kwargs"] = {
            "text_embeds": torch.randn(B, 8, generator=g, dtype=dtype),
            "time_ids": time_ids.expand(B, 6),
        }
        uncond["added_cond_kwargs"] = {
            "text_embeds": torch.zeros(1, 8, dtype=dtype),
            "time_ids": time_ids,
        }
    return cond, uncond


MID = "mid"
UNET_CASES = [
    ("cfg+seg-mid", SEG(3.0, sigma=10.0, cfg_scale=5.0), ["mid_block"]),
    ("seg-only", SEG(3.0, sigma=math.inf), ["mid_block"]),
    ("paper-eq10", SEG(3.0, sigma=2.0, cfg_scale=5.0, convention="paper"), ["mid_block"]),
    ("cfg+pag-up", Compose(CFG(5.0), PAG(3.0, layers="up.1")), ["up_blocks.1"]),
    (
        "seg-down+pag-up",
        Compose(CFG(3.0), SEG(3.0, sigma=3.0, layers="down.0"), PAG(2.0, layers="up")),
        ["down_blocks.0", "up_blocks.1"],
    ),
    (
        "two-sigmas",
        Compose(CFG(3.0), SEG(2.0, sigma=math.inf, layers="up.1"), SEG(2.0, sigma=1.0, layers=MID)),
        ["mid_block", "up_blocks.1"],
    ),
]


@pytest.mark.parametrize("xl", [False, True], ids=["sd", "sdxl"])
@pytest.mark.parametrize(("name", "rule", "points"), UNET_CASES, ids=[c[0] for c in UNET_CASES])
def test_unet_forked_equals_unforked(xl: bool, name: str, rule: Any, points: list[str]) -> None:
    from smoothguide.diffusers import patcher_for

    unet = make_unet(xl)
    den = EpsDenoiser(unet)
    patcher = patcher_for(unet)
    assert patcher.fork_proven
    cond, uncond = unet_cond(xl)
    x = torch.randn(B, 4, 8, 12, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    outs, seen = {}, {}
    for fork in (False, None):  # None: the UNet family's default, forked
        rows = Rows(unet, "conv_in", *points)
        guided = GuidedDenoiser(den, rule, uncond=uncond, perturber=patcher, fork=fork)
        with torch.no_grad():
            outs[fork] = guided(x, 1.3, **cond)
        rows.close()
        seen[fork] = rows.seen
    close(outs[None], outs[False])
    plain = len(
        {
            b.conditioning
            for b in guided.rule.branches(guided.context(1.3))
            if b.perturbation is None
        }
    )
    assert seen[None]["conv_in"] == [plain * B]
    assert seen[None][points[0]] == [plain * B]
    assert seen[False]["conv_in"][0] > plain * B


def test_unet_float32_within_tolerance() -> None:
    from smoothguide.diffusers import patcher_for

    unet = make_unet(True, torch.float32)
    den = EpsDenoiser(unet)
    cond, uncond = unet_cond(True, torch.float32)
    x = torch.randn(B, 4, 8, 12, generator=torch.Generator().manual_seed(4))
    rule = Compose(CFG(5.0), SEG(3.0, sigma=10.0, layers=MID), PAG(2.0, layers="up.1"))
    outs = []
    for fork in (False, True):
        guided = GuidedDenoiser(den, rule, uncond=uncond, perturber=patcher_for(unet), fork=fork)
        with torch.no_grad():
            outs.append(guided(x, 1.3, **cond))
    close(outs[1], outs[0], ops=256)


# ------------------------------------------------------------- UNet with IP-Adapter

IP_EMBED = (12, 10)  # two IP-Adapters, CLIP image-embedding widths 12 and 10


def load_random_ip_adapters(unet: Any, dtype: torch.dtype) -> None:
    """Two plain IP-Adapters from random state dicts, through diffusers' own loader.

    ``UNet2DConditionModel._load_ip_adapter_weights`` (what ``load_ip_adapter``
    calls after reading a checkpoint) installs ``IPAdapterAttnProcessor2_0`` in
    every cross attention and a ``MultiIPAdapterImageProjection`` (4 image tokens
    per adapter) as ``encoder_hid_proj``; the keys follow the checkpoint format
    (``<k>.to_k_ip.weight``, k = 1, 3, 5, ... over the cross attentions).
    """
    g = torch.Generator().manual_seed(7)
    cross = unet.config.cross_attention_dim
    state_dicts = []
    for dim in IP_EMBED:
        ip: dict[str, torch.Tensor] = {}
        key = 1
        for name in unet.attn_processors:
            if name.endswith("attn2.processor"):
                # the image keys / values have the width of the layer's text keys
                hidden = unet.get_submodule(name.removesuffix(".processor")).to_k.out_features
                for k in ("to_k_ip", "to_v_ip"):
                    ip[f"{key}.{k}.weight"] = torch.randn(hidden, cross, generator=g) * 0.3
                key += 2
        proj = {
            "proj.weight": torch.randn(4 * cross, dim, generator=g) * 0.3,
            "proj.bias": torch.randn(4 * cross, generator=g) * 0.1,
            "norm.weight": 1 + 0.1 * torch.randn(cross, generator=g),
            "norm.bias": 0.1 * torch.randn(cross, generator=g),
        }
        state_dicts.append({"image_proj": proj, "ip_adapter": ip})
    unet._load_ip_adapter_weights(state_dicts, low_cpu_mem_usage=False)
    unet.to(dtype)


class IPRows:
    """Leading sizes of the IP-Adapter image tokens each chosen cross attention receives."""

    def __init__(self, unet: Any, *names: str) -> None:
        self.seen: dict[str, list[tuple[int, ...]]] = {n: [] for n in names}
        mods = dict(unet.named_modules())

        def record(name: str) -> Any:
            def hook(m: Any, a: Any, kw: dict[str, Any]) -> None:
                text, images = kw["encoder_hidden_states"]
                self.seen[name].append((text.shape[0], *(t.shape[0] for t in images)))

            return hook

        self.handles = [
            mods[n].register_forward_pre_hook(record(n), with_kwargs=True) for n in names
        ]

    def close(self) -> None:
        for h in self.handles:
            h.remove()


IP_CASES = [
    ("cfg+seg-mid", SEG(3.0, sigma=10.0, cfg_scale=5.0)),
    ("seg-only", SEG(3.0, sigma=math.inf)),
    ("cfg+pag-mid", Compose(CFG(5.0), PAG(3.0, layers=MID))),
]


@pytest.mark.parametrize("xl", [False, True], ids=["sd", "sdxl"])
@pytest.mark.parametrize(("name", "rule"), IP_CASES, ids=[c[0] for c in IP_CASES])
def test_unet_with_ip_adapters_forked_equals_unforked(xl: bool, name: str, rule: Any) -> None:
    """IP-Adapter image embeddings (a list of per-adapter tensors in ``added_cond_kwargs``).

    2 images, a negative prompt (random embeddings) with zero negative image
    embeddings (what diffusers' pipelines pass), float32, non-square latent.
    """
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    from smoothguide.diffusers import patcher_for

    unet = make_unet(xl, torch.float32)
    load_random_ip_adapters(unet, torch.float32)
    assert isinstance(
        unet.attn_processors["mid_block.attentions.0.transformer_blocks.0.attn2.processor"],
        IPAdapterAttnProcessor2_0,
    )
    den = EpsDenoiser(unet)
    patcher = patcher_for(unet)
    assert patcher.fork_proven
    cond, uncond = unet_cond(xl, torch.float32)
    g = torch.Generator().manual_seed(8)
    images = [torch.randn(B, 1, d, generator=g) for d in IP_EMBED]
    cond.setdefault("added_cond_kwargs", {})["image_embeds"] = images
    uncond.setdefault("added_cond_kwargs", {})["image_embeds"] = [
        torch.zeros(1, 1, d) for d in IP_EMBED
    ]
    x = torch.randn(B, 4, 8, 12, generator=torch.Generator().manual_seed(4))
    mid = "mid_block.attentions.0.transformer_blocks.0.attn2"
    up = "up_blocks.1.attentions.0.transformer_blocks.0.attn2"
    outs, seen, ip_seen = {}, {}, {}
    for fork in (False, None):
        rows = Rows(unet, "conv_in", "mid_block")
        ip_rows = IPRows(unet, "down_blocks.0.attentions.0.transformer_blocks.0.attn2", mid, up)
        guided = GuidedDenoiser(den, rule, uncond=uncond, perturber=patcher, fork=fork)
        with torch.no_grad():
            outs[fork] = guided(x, 1.3, **cond)
        rows.close()
        ip_rows.close()
        seen[fork], ip_seen[fork] = rows.seen, ip_rows.seen
    close(outs[None], outs[False], ops=256)
    branches = list(guided.rule.branches(guided.context(1.3)))
    plain = len({b.conditioning for b in branches if b.perturbation is None})
    full = len(branches) * B
    # the fork happened: the down blocks and the mid block's input ran the plain rows only
    assert seen[None]["conv_in"] == [plain * B]
    assert seen[None]["mid_block"] == [plain * B]
    assert seen[False]["conv_in"] == [full]
    # and the IP-Adapter processors saw text and image tokens at the batch in effect
    pre, post = (plain * B,) * 3, (full,) * 3
    assert ip_seen[None] == {
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2": [pre],
        mid: [post],
        up: [post],
    }
    assert all(v == [post] for v in ip_seen[False].values())
    # the image embeddings matter (their rows were not lost or mixed up by the fork)
    guided = GuidedDenoiser(den, rule, uncond=uncond, perturber=patcher)
    cond["added_cond_kwargs"]["image_embeds"] = [t.flip(0) for t in images]
    with torch.no_grad():
        flipped = guided(x, 1.3, **cond)
    assert float((flipped - outs[None]).abs().max()) > 1e-3


@pytest.mark.parametrize(
    "rule", [SEG(3.0, sigma=math.inf), SEG(3.0, sigma=10.0, cfg_scale=5.0)], ids=["seg", "cfg+seg"]
)
def test_unet_with_ip_adapter_masks_forked_equals_unforked(rule: Any) -> None:
    """One image with IP-Adapter masks (``cross_attention_kwargs``, ``(1, images, H, W)``).

    The masks' leading axis is the image batch, so they are batched per branch
    and the fork cuts and copies their rows like the image embeddings' (SEG
    alone: a pre-fork batch of 1).
    """
    from diffusers.image_processor import IPAdapterMaskProcessor

    from smoothguide.diffusers import patcher_for

    unet = make_unet(False, torch.float32)
    load_random_ip_adapters(unet, torch.float32)
    den = EpsDenoiser(unet)
    g = torch.Generator().manual_seed(10)
    x = torch.randn(1, 4, 8, 12, generator=g)
    left = torch.zeros(1, 1, 16, 24)
    left[..., :12] = 1.0
    masks = IPAdapterMaskProcessor().preprocess([left, 1 - left], height=16, width=24)
    kw = {"ip_adapter_masks": [m[None] for m in masks]}  # one (1, 1, H, W) mask per adapter
    cond = {
        "encoder_hidden_states": torch.randn(1, 5, 16, generator=g),
        "added_cond_kwargs": {
            "image_embeds": [torch.randn(1, 1, d, generator=g) for d in IP_EMBED]
        },
        "cross_attention_kwargs": kw,
    }
    uncond = {
        "encoder_hidden_states": torch.zeros(1, 5, 16),
        "added_cond_kwargs": {"image_embeds": [torch.zeros(1, 1, d) for d in IP_EMBED]},
        "cross_attention_kwargs": kw,
    }
    outs = []
    for fork in (False, True):
        guided = GuidedDenoiser(den, rule, uncond=uncond, perturber=patcher_for(unet), fork=fork)
        with torch.no_grad():
            outs.append(guided(x, 1.3, **cond))
    close(outs[1], outs[0], ops=256)
    # the masks matter (left and right halves: each adapter acts on its own half)
    for c in (cond, uncond):
        del c["cross_attention_kwargs"]
    with torch.no_grad():
        unmasked = GuidedDenoiser(den, rule, uncond=uncond, perturber=patcher_for(unet))(
            x, 1.3, **cond
        )
    assert float((unmasked - outs[1]).abs().max()) > 1e-3


# ------------------------------------------------------------------ diffusers pipelines

transformers = pytest.importorskip("transformers")

from smoothguide.diffusers import GuidedPipeline  # noqa: E402
from test_diffusers_unet_pipeline import H as PH  # noqa: E402
from test_diffusers_unet_pipeline import W as PW  # noqa: E402
from test_diffusers_unet_pipeline import call, make_pipe, no_hooks  # noqa: E402
from test_diffusers_unet_pipeline import pipe as pipe  # noqa: E402  (the fixture)

PIPE_CASES = [
    ("cfg+seg", SEG(3.0, sigma=10.0, cfg_scale=5.0), "a cat"),
    ("seg-only", SEG(3.0, sigma=math.inf), ""),
    ("paper-eq10", SEG(3.0, sigma=2.0, cfg_scale=4.0, convention="paper"), "a cat"),
    ("seg-mid+pag-up", Compose(CFG(4.0), SEG(2.0, sigma=3.0), PAG(2.0, layers="up")), "a cat"),
]


@pytest.mark.parametrize(("name", "rule", "prompt"), PIPE_CASES, ids=[c[0] for c in PIPE_CASES])
def test_pipeline_forked_equals_unforked(
    pipe: Any,
    name: str,
    rule: Any,
    prompt: str,
) -> None:
    """SD / SDXL (added conditions), 2 images per prompt, a negative prompt, non-square latents."""
    out = {}
    for fork in (False, None):
        rows = Rows(pipe.unet, "conv_in", "conv_out")
        guided = GuidedPipeline(pipe, rule, fork=fork)
        kw = {"negative_prompt": "a photo"} if prompt else {}
        out[fork] = call(guided, prompt, num_images_per_prompt=2, output_type="latent", **kw).images
        rows.close()
        if fork is None:
            assert rows.seen["conv_in"][0] < rows.seen["conv_out"][0]
        else:
            assert rows.seen["conv_in"] == rows.seen["conv_out"]
    assert out[None].shape == (2, 4, PH // 2, PW // 2)
    close(out[None], out[False], ops=256)
    assert no_hooks(pipe.unet)


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_pipeline_with_ip_adapters_forked_equals_unforked(kind: str) -> None:
    """``ip_adapter_image_embeds`` through the pipeline's own preparation (negative first)."""
    ip_pipe = make_pipe(kind)
    load_random_ip_adapters(ip_pipe.unet, torch.float32)
    g = torch.Generator().manual_seed(9)
    embeds = [torch.randn(2, 1, d, generator=g) for d in IP_EMBED]  # [negative; positive]
    rule = Compose(CFG(4.0), SEG(2.0, sigma=3.0), PAG(2.0, layers="up"))
    out = {}
    for fork in (False, None):
        rows = Rows(ip_pipe.unet, "conv_in", "conv_out")
        guided = GuidedPipeline(ip_pipe, rule, fork=fork)
        out[fork] = call(
            guided,
            "a cat",
            negative_prompt="a photo",
            num_images_per_prompt=2,
            ip_adapter_image_embeds=embeds,
            output_type="latent",
        ).images
        rows.close()
        if fork is None:
            assert rows.seen["conv_in"][0] < rows.seen["conv_out"][0]
        else:
            assert rows.seen["conv_in"] == rows.seen["conv_out"]
    close(out[None], out[False], ops=256)
    assert no_hooks(ip_pipe.unet)
    other = call(
        GuidedPipeline(ip_pipe, rule),
        "a cat",
        negative_prompt="a photo",
        num_images_per_prompt=2,
        ip_adapter_image_embeds=[e.flip(0) for e in embeds],
        output_type="latent",
    ).images
    assert float((other - out[None]).abs().max()) > 1e-3  # the image embeddings are used


def test_controlnet_residuals_fork_after_the_down_blocks_only() -> None:
    sd = make_pipe("sd")
    controlnet = diffusers.ControlNetModel.from_unet(
        sd.unet, conditioning_embedding_out_channels=(4, 8)
    )
    cn = diffusers.StableDiffusionControlNetPipeline(
        **{k: v for k, v in sd.components.items() if k != "image_encoder"}, controlnet=controlnet
    )
    cn.set_progress_bar_config(disable=True)
    control = torch.rand(1, 3, PH, PW, generator=torch.Generator().manual_seed(5))
    for rule in (
        SEG(3.0, sigma=4.0, cfg_scale=4.0),  # mid: the mid-block residual joins after the fork
        Compose(CFG(4.0), PAG(2.0, layers="up.1")),  # up: it joins before
    ):
        out = [
            call(GuidedPipeline(cn, rule, fork=f), image=control, output_type="latent").images
            for f in (False, True)
        ]
        close(out[1], out[0], ops=256)
    down = SEG(3.0, sigma=4.0, cfg_scale=4.0, layers="down.0")
    with pytest.raises(ValueError, match="down_block_additional_residuals"):
        call(GuidedPipeline(cn, down), image=control, output_type="latent")
    assert no_hooks(cn.unet)
    assert call(GuidedPipeline(cn, down, fork=False), image=control).images.isfinite().all()


# ------------------------------------------------------------------ transformer families

from smoothguide.diffusers import patcher_for  # noqa: E402
from smoothguide.diffusers.pipeline import _map_rows  # noqa: E402
from smoothguide.perturbations import IdentityAttention  # noqa: E402
from test_diffusers_transformers import MAKERS, SIZES  # noqa: E402
from test_diffusers_transformers import inputs as transformer_inputs  # noqa: E402

TRANSFORMER_CASES = [
    ("sd3", {"seg": QuerySmoothing(2.0, layers="transformer_blocks.1.attn")}),
    (
        "sd3",
        {
            "seg": QuerySmoothing(math.inf, layers="transformer_blocks.0.attn2"),
            "pag": IdentityAttention(layers="transformer_blocks.2.attn"),
        },
    ),
    ("flux", {"seg": QuerySmoothing(2.0, layers="transformer_blocks.1.attn")}),
    (
        "flux",
        {
            "seg": QuerySmoothing(1.0, layers="single_transformer_blocks.1.attn"),
            "pag": IdentityAttention(layers="transformer_blocks.1.attn"),
        },
    ),
]


@pytest.mark.parametrize(
    ("family", "perturbations"),
    TRANSFORMER_CASES,
    ids=[f"{f}-{'+'.join(p)}" for f, p in TRANSFORMER_CASES],
)
def test_transformer_forked_equals_unforked(family: str, perturbations: dict[str, Any]) -> None:
    """[uncond, cond] x 2 images, perturbed branches copying cond (official) or uncond (Eq. 10)."""
    model = MAKERS[family]()
    patcher = patcher_for(model)
    assert patcher.fork_proven
    batch = 2
    base = transformer_inputs(family, model, 2 * batch, SIZES[family])  # rows: uncond, cond
    branches = [Branch("uncond"), Branch("cond")]
    for i, p in enumerate(perturbations.values()):
        branches.append(Branch("cond" if i % 2 == 0 else "uncond", p))
    plan = plan_fork(branches, patcher, None, batch)
    assert plan is not None
    source = {"uncond": 0, "cond": batch}
    rows = [source[b.conditioning] + i for b in plan.order for i in range(batch)]
    full = _map_rows(base, 2 * batch, torch.tensor(rows))
    outs = []
    for fork in (False, True):
        with torch.no_grad(), ExitStack() as stack:
            if fork:
                stack.enter_context(patcher.forking(plan.spec))
            for j, b in enumerate(plan.order):
                if b.perturbation is not None:
                    span = range(j * batch, (j + 1) * batch)
                    stack.enter_context(patcher.perturb(b.perturbation, span))
            outs.append(model(**full, return_dict=False)[0])
    close(outs[1], outs[0], ops=512)
    # the perturbed rows really differ from their plain rows (the fork did not lose them)
    plain_rows = outs[0][batch : 2 * batch]
    assert float((outs[0][2 * batch : 3 * batch] - plain_rows).abs().max()) > 1e-3


def test_unforkable_policy_refuses_fork_true_and_stays_unforked_by_default() -> None:
    from smoothguide.torch.fork import Unforkable

    patcher = AttentionPatcher(make_net(), layers=Attn, fork=Unforkable("a test reason"))
    assert not patcher.fork_proven
    order = [Branch("cond"), Branch("cond", QuerySmoothing(1.0, layers=L1))]
    assert plan_fork(order, patcher, None, 1) is None
    with pytest.raises(ValueError, match="fork mode is not available for Net: a test reason"):
        plan_fork(order, patcher, True, 1)


@pytest.mark.parametrize("family", ["pixart", "dit", "wan", "ltx", "cogvideox"])
def test_dit_and_video_families_fork_by_default(family: str) -> None:
    """Proven in tests/test_fork_dit.py and tests/test_fork_video.py."""
    patcher = patcher_for(MAKERS[family]())
    assert patcher.fork_proven
    order = [Branch("cond"), Branch("cond", QuerySmoothing(1.0))]
    plan = plan_fork(order, patcher, None, 1)
    assert plan is not None
    assert plan.spec.sizes == (1, 2)


def test_sd3_controlnet_residuals_refused() -> None:
    model = MAKERS["sd3"]()
    patcher = patcher_for(model)
    kw = transformer_inputs("sd3", model, 1, SIZES["sd3"])
    kw = _map_rows(kw, 1, torch.tensor([0, 0]))
    kw["block_controlnet_hidden_states"] = [torch.zeros(2, 15, 16)]
    spec = ForkSpec(2, 1, (("transformer_blocks.1", (0,)),))
    with (
        pytest.raises(ValueError, match="block_controlnet_hidden_states"),
        patcher.forking(spec),
        patcher.perturb(QuerySmoothing(1.0), [1]),
    ):
        model(**kw)


@pytest.mark.slow
def test_benchmark_counts_fewer_flops_forked() -> None:
    """benchmarks/fork.py on tiny stand-ins (meta device, FLOPs only): forking saves work."""
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)
    from benchmarks.config import TINY
    from benchmarks.fork import render_fork, run_fork

    res = run_fork(TINY, progress=False)
    assert not res.timed
    assert [m.name for m in res.models] == [
        "SD 1.5 UNet",
        "SD3-medium transformer",
        "PixArt-Σ transformer",
    ]
    for m in res.models:
        f = m.flops
        # unforked: 3 (2) rows of the model plus the blur; forked: between 2 (1) and 3 (2) rows
        assert f["c"] >= 1.5 * f["b"]
        assert f["e"] >= 2 * f["a"]
        assert f["b"] < f["cf"] < f["c"]
        assert f["a"] < f["ef"] < f["e"]
        assert f["b"] == 2 * f["a"]
    assert "## 5." not in render_fork(res)
    assert "(cf) / (b) forked" in render_fork(res)
