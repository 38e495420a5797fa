"""Fork mode on the video transformers (Wan, LTX-Video, CogVideoX): forked == unforked.

Their ``forward`` applies the input's ``batch_size`` after the blocks (Wan,
CogVideoX: the final ``reshape``; LTX: ``temb.view(batch_size, ...)`` of the
time embedding that also modulates the last block's output), so the family
policies keep ``hidden_states`` whole and name early modules
(:mod:`smoothguide.torch.fork`). Reference: the same call unforked (the plain
batched call, checked against hand-written attention in
test_diffusers_transformers.py), on tiny random models with video latents
(3 frames x 2 x 5 tokens). float64 within a few ulps per operation, float32
within ``512 eps max|ref|``.
"""

from __future__ import annotations

import dataclasses
import math
from contextlib import ExitStack
from typing import Any

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from smoothguide.branches import Branch  # noqa: E402
from smoothguide.diffusers import patcher_for  # noqa: E402
from smoothguide.diffusers.family import family_for  # noqa: E402
from smoothguide.diffusers.pipeline import _map_rows  # noqa: E402
from smoothguide.perturbations import IdentityAttention, QuerySmoothing  # noqa: E402
from smoothguide.sampling.forking import plan_fork  # noqa: E402
from smoothguide.torch.fork import ForkPolicy  # noqa: E402
from test_diffusers_transformers import MAKERS, SIZES, inputs  # noqa: E402
from test_fork import _one_thread as _one_thread  # noqa: E402  (autouse: one torch thread)
from test_fork import close  # noqa: E402

FAMILIES = ["wan", "ltx", "cogvideox"]
STACK = {"wan": "blocks", "ltx": "transformer_blocks", "cogvideox": "transformer_blocks"}


def first_rows(seen: list[int]) -> Any:
    def hook(module: Any, args: Any, kwargs: Any) -> None:
        seen.append((args[0] if args else next(iter(kwargs.values()))).shape[0])

    return hook


def run(
    family: str,
    plains: list[str],
    perturbed: list[tuple[str, Any]],
    batch: int,
    dtype: torch.dtype = torch.float64,
    policy: ForkPolicy | None = None,
) -> tuple[list[torch.Tensor], dict[str, list[int]], Any]:
    """Unforked and forked outputs of ``plains`` + ``perturbed`` branches, and rows seen forked."""
    model = MAKERS[family]().to(dtype)
    family_obj = family_for(model)
    if policy is None:
        patcher = patcher_for(model)
        assert patcher.fork_proven
    else:
        patcher = dataclasses.replace(family_obj, fork=policy).patcher(model)
    base = inputs(family, model, len(plains) * batch, SIZES[family])
    base = {
        k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
        for k, v in base.items()
    }
    branches = [Branch(p) for p in plains] + [Branch(c, p) for c, p in perturbed]
    plan = plan_fork(branches, patcher, None if policy is None else True, batch)
    assert plan is not None
    source = {p: i * batch for i, p in enumerate(plains)}
    rows = [source[b.conditioning] + i for b in plan.order for i in range(batch)]
    full = _map_rows(base, len(plains) * batch, torch.tensor(rows))
    stack = STACK[family]
    watched = [f"{stack}.0", *[n for n, _ in plan.spec.stages], "proj_out"]
    seen: dict[str, list[int]] = {n: [] for n in watched}
    outs = []
    for fork in (False, True):
        with torch.no_grad(), ExitStack() as st:
            if fork:
                mods = dict(model.named_modules())
                for n in dict.fromkeys(watched):
                    h = mods[n].register_forward_pre_hook(first_rows(seen[n]), with_kwargs=True)
                    st.callback(h.remove)
                st.enter_context(patcher.forking(plan.spec))
            for j, b in enumerate(plan.order):
                if b.perturbation is not None:
                    span = range(j * batch, (j + 1) * batch)
                    st.enter_context(patcher.perturb(b.perturbation, span))
            outs.append(model(**full, return_dict=False)[0])
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    # the fork happened: the blocks before it ran the plain rows, the output layer every row
    assert seen[f"{stack}.0"][0] == plan.spec.pre < plan.spec.rows
    for (name, _), size in zip(plan.spec.stages, plan.spec.sizes, strict=False):
        assert seen[name][0] == size
    assert seen["proj_out"] == [plan.spec.rows]
    # the perturbed rows really differ from their plain rows (the fork did not lose them):
    # by far more than float64 rounding (the tiny models react weakly to some perturbations)
    j = len(plains)
    src = source[plan.order[j].conditioning]
    if dtype == torch.float64:
        eps = torch.finfo(dtype).eps
        changed = float((outs[0][j * batch] - outs[0][src]).abs().max())
        assert changed > 1e6 * eps * float(outs[0].abs().max())
    return outs, seen, plan


def seg(family: str, block: int, sigma: Any = 2.0) -> QuerySmoothing:
    return QuerySmoothing(sigma, layers=f"{STACK[family]}.{block}.attn1")


def pag(family: str, block: int) -> IdentityAttention:
    return IdentityAttention(layers=f"{STACK[family]}.{block}.attn1")


CASES = {
    # [uncond, cond] x 2 clips, SEG copying cond (official convention)
    "cfg+seg": (["uncond", "cond"], lambda f: [("cond", seg(f, 1))], 2),
    # SEG copying uncond (the paper's Eq. 10), a temporal blur as well
    "paper-eq10": (["uncond", "cond"], lambda f: [("uncond", seg(f, 1, (1.0, 2.0, 2.0)))], 2),
    # one clip, no CFG: the pre-fork batch is 1
    "seg-only": (["cond"], lambda f: [("cond", seg(f, 1, math.inf))], 1),
    "pag-only": (["cond"], lambda f: [("cond", pag(f, 1))], 1),
    "cfg+pag": (["uncond", "cond"], lambda f: [("cond", pag(f, 1))], 2),
    # two fork points: SEG at the first block, PAG at the second
    "seg+pag": (["uncond", "cond"], lambda f: [("cond", seg(f, 0)), ("cond", pag(f, 1))], 2),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("family", FAMILIES)
def test_forked_equals_unforked(family: str, case: str) -> None:
    plains, perturbed, batch = CASES[case]
    outs, _, plan = run(family, plains, perturbed(family), batch)
    close(outs[1], outs[0])
    if case == "seg+pag":
        assert len(plan.spec.stages) == 2


@pytest.mark.parametrize("family", FAMILIES)
def test_float32_within_tolerance(family: str) -> None:
    outs, _, _ = run(
        family, ["uncond", "cond"], [("cond", seg(family, 0)), ("cond", pag(family, 1))], 2,
        torch.float32,
    )  # fmt: skip
    close(outs[1], outs[0], ops=512)


@pytest.mark.parametrize("family", FAMILIES)
def test_without_keep_the_final_reshape_breaks(family: str) -> None:
    """What ``keep`` / ``early`` fix: a plain policy is refused by the shapes, or wrong."""

    def forked_as_unforked() -> None:
        outs, _, _ = run(family, ["uncond", "cond"], [("cond", seg(family, 1))], 2, policy=plain)
        close(outs[1], outs[0])

    plain = ForkPolicy()
    with pytest.raises((RuntimeError, AssertionError)):  # shapes differ: 6 rows meet 4
        forked_as_unforked()


def make_wan(**kw: Any) -> Any:
    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4,
        out_channels=4, text_dim=16, freq_dim=16, ffn_dim=16, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32, **kw,
    )  # fmt: skip
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return model.double().eval()


def forked_pair(model: Any, kw: dict[str, Any], batch: int, plains: list[str]) -> list[Any]:
    """Unforked and forked outputs of ``plains`` + SEG(cond) at ``blocks.1``."""
    patcher = patcher_for(model)
    branches = [Branch(p) for p in plains] + [Branch("cond", seg("wan", 1))]
    plan = plan_fork(branches, patcher, None, batch)
    assert plan is not None
    source = {p: i * batch for i, p in enumerate(plains)}
    rows = [source[b.conditioning] + i for b in plan.order for i in range(batch)]
    full = _map_rows(kw, len(plains) * batch, torch.tensor(rows))
    outs = []
    for fork in (False, True):
        with torch.no_grad(), ExitStack() as st:
            if fork:
                st.enter_context(patcher.forking(plan.spec))
            j = len(plains)
            st.enter_context(
                patcher.perturb(plan.order[j].perturbation, range(j * batch, (j + 1) * batch))
            )
            outs.append(model(**full, return_dict=False)[0])
    return outs


@pytest.mark.parametrize("batch", [1, 2])
def test_wan_per_token_timesteps(batch: int) -> None:
    """Wan 2.2 TI2V's per-token timesteps ``(B, tokens)``: condition_embedder's 3-D outputs."""
    model = make_wan()
    plains = ["uncond", "cond"] if batch == 2 else ["cond"]
    n = len(plains) * batch
    kw = inputs("wan", model, n, SIZES["wan"])
    kw = {k: v.double() if v.is_floating_point() else v for k, v in kw.items()}
    f, h, w = SIZES["wan"]
    kw["timestep"] = (torch.arange(n * f * h * w, dtype=torch.float64).reshape(n, -1) * 7) % 900
    outs = forked_pair(model, kw, batch, plains)
    close(outs[1], outs[0])


def test_wan_positional_call() -> None:
    """A kept argument passed positionally (``model(x, t, text)``) is kept too."""
    model = make_wan()
    kw = inputs("wan", model, 2, SIZES["wan"])
    kw = {k: v.double() if v.is_floating_point() else v for k, v in kw.items()}
    patcher = patcher_for(model)
    plan = plan_fork(
        [Branch("uncond"), Branch("cond"), Branch("cond", seg("wan", 1))], patcher, None, 1
    )
    assert plan is not None
    full = _map_rows(kw, 2, torch.tensor([0, 1, 1]))
    args = (full["hidden_states"], full["timestep"], full["encoder_hidden_states"])
    outs = []
    for fork in (False, True):
        with torch.no_grad(), ExitStack() as st:
            if fork:
                st.enter_context(patcher.forking(plan.spec))
            st.enter_context(patcher.perturb(plan.order[2].perturbation, range(2, 3)))
            outs.append(model(*args, return_dict=False)[0])
    close(outs[1], outs[0])


def test_wan_image_embeddings_refused() -> None:
    """Wan I2V concatenates image and text embeddings outside a module call: refused."""
    model = make_wan(image_dim=12)
    kw = inputs("wan", model, 2, SIZES["wan"])
    kw = {k: v.double() if v.is_floating_point() else v for k, v in kw.items()}
    kw["encoder_hidden_states_image"] = torch.randn(2, 3, 12, dtype=torch.float64)
    with pytest.raises(ValueError, match="encoder_hidden_states_image"):
        forked_pair(model, kw, 1, ["uncond", "cond"])
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


# -------------------------------------------------------------------------- pipelines

pytest.importorskip("transformers")

from smoothguide.diffusers import GuidedPipeline  # noqa: E402
from smoothguide.rules import CFG, PAG, SEG, Compose  # noqa: E402
from test_diffusers_transformers_pipelines import STEPS, _gen, ltx_kwargs  # noqa: E402
from test_diffusers_transformers_pipelines import cogvideox_pipe as cogvideox_pipe  # noqa: E402
from test_diffusers_transformers_pipelines import ltx_pipe as ltx_pipe  # noqa: E402
from test_diffusers_transformers_pipelines import wan_pipe as wan_pipe  # noqa: E402


def _video_kwargs(name: str) -> dict[str, Any]:
    if name == "ltx":
        return ltx_kwargs() | dict(height=32, width=64, num_frames=9)
    pe = torch.randn(1, 6, 16, generator=torch.Generator().manual_seed(1))
    return dict(
        prompt_embeds=pe, negative_prompt_embeds=0 * pe, height=16, width=32,
        num_frames=5 if name == "wan" else 9, num_inference_steps=STEPS,
    )  # fmt: skip


PIPE_RULES = {
    "cfg+seg": Compose(CFG(4.0), SEG(3.0, sigma=(1.0, 2.0, 2.0))),
    "seg+pag": Compose(
        CFG(4.0), SEG(2.0, sigma=math.inf, layers="block.0"), PAG(2.0, layers="block.1")
    ),
}


@pytest.mark.parametrize("rule", list(PIPE_RULES))
@pytest.mark.parametrize("name", ["wan", "ltx", "cogvideox"])
def test_video_pipeline_forked_equals_unforked(
    request: pytest.FixtureRequest, name: str, rule: str
) -> None:
    """Wan (one call per conditioning), LTX-Video and CogVideoX pipelines, latents.

    Two clips per prompt, except LTX: its pipeline does not repeat given prompt
    embeddings per clip (its ``forward`` then views them across rows), which
    fork mode refuses rather than guess rows.
    """
    pipe = request.getfixturevalue(f"{name}_pipe")
    with torch.no_grad():  # diffusers zero-initialises some layers: make every path count
        g = torch.Generator().manual_seed(7)
        for p in pipe.transformer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    clips = 1 if name == "ltx" else 2
    kw = _video_kwargs(name) | {"output_type": "latent", "num_videos_per_prompt": clips}
    out, seen = {}, {}
    for fork in (False, None):
        rows: list[int] = []
        last: list[int] = []
        h1 = pipe.transformer.get_submodule(
            "blocks.0" if name == "wan" else "transformer_blocks.0"
        ).register_forward_pre_hook(first_rows(rows), with_kwargs=True)
        h2 = pipe.transformer.proj_out.register_forward_pre_hook(first_rows(last), with_kwargs=True)
        try:
            out[fork] = GuidedPipeline(pipe, PIPE_RULES[rule], fork=fork)(**kw, generator=_gen())
        finally:
            h1.remove()
            h2.remove()
        seen[fork] = (rows, last)
    a, b = out[None].frames, out[False].frames
    # forked calls ran fewer rows before the fork (Wan's unconditional call has no fork)
    assert all(r <= t for r, t in zip(*seen[None], strict=True))
    assert sum(r < t for r, t in zip(*seen[None], strict=True)) == STEPS
    assert seen[False][0] == seen[False][1]
    close(a, b, ops=1024)
    assert all(not m._forward_pre_hooks for m in pipe.transformer.modules())
