"""Skip-layer guidance (LayerSkip + SLG) against diffusers 0.42's own skip-layer code, tiny models.

References: ``SD3Transformer2DModel.forward(skip_layers=...)`` (the SD3 pipeline's
SLG path), diffusers' ``LayerSkipConfig`` hooks (``hooks/layer_skip.py``) and the
``SkipLayerGuidance`` guider's ``forward`` and step window. Each reference skips
for the whole batch; smoothguide must match it on the perturbed rows and leave
the other rows bit-identical to the plain model.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from diffusers.guiders import SkipLayerGuidance  # noqa: E402
from diffusers.hooks import HookRegistry, LayerSkipConfig  # noqa: E402
from diffusers.hooks.layer_skip import _apply_layer_skip_hook  # noqa: E402

from smoothguide import LayerSkip  # noqa: E402
from smoothguide.diffusers import patcher_for  # noqa: E402
from smoothguide.rules import COND, SLG, UNCOND, StepContext  # noqa: E402
from test_diffusers_transformers import (  # noqa: E402
    inputs,
    make_cogvideox,
    make_dit,
    make_flux,
    make_sd3,
    make_wan,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _run(model: torch.nn.Module, kw: dict[str, Any], **extra: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(**kw, **extra).sample


def _with_diffusers_skip(
    model: torch.nn.Module, kw: dict[str, Any], config: LayerSkipConfig
) -> torch.Tensor:
    _apply_layer_skip_hook(model, config, name="reference")
    try:
        return _run(model, kw)
    finally:
        HookRegistry.check_if_exists_or_initialize(model).remove_hook("reference", recurse=True)


def _assert_rows(
    out: torch.Tensor, plain: torch.Tensor, ref: torch.Tensor, rows: list[int]
) -> None:
    others = [i for i in range(out.shape[0]) if i not in rows]
    assert torch.equal(out[others], plain[others])  # untouched rows: bit-identical
    scale = float(ref.abs().max())
    err = float((out[rows] - ref[rows]).abs().max())
    assert err <= 1e-5 * scale, f"max abs error {err:.3g} (output scale {scale:.3g})"
    # the skip changes the perturbed rows far beyond rounding
    assert float((ref[rows] - plain[rows]).abs().max()) > 1e-2 * scale


@pytest.fixture(scope="module")
def sd3() -> torch.nn.Module:
    return make_sd3(num_layers=3)


@pytest.fixture(scope="module")
def dit() -> torch.nn.Module:
    return make_dit()


@pytest.fixture(scope="module")
def video() -> dict[str, torch.nn.Module]:
    return {"wan": make_wan(), "cogvideox": make_cogvideox()}


def test_sd3_block_skip_equals_diffusers_skip_layers(sd3: torch.nn.Module) -> None:
    kw = inputs("sd3", sd3, 3, (3, 5))
    plain = _run(sd3, kw)
    ref = _run(sd3, kw, skip_layers=[1])
    patcher = patcher_for(sd3)
    with patcher.perturb(LayerSkip(layers="block.1"), rows=[0, 2]):
        out = _run(sd3, kw)
    _assert_rows(out, plain, ref, [0, 2])
    # a dual block (attn + attn2) is skipped once, as a whole
    ref0 = _run(sd3, kw, skip_layers=[0])
    with patcher.perturb(LayerSkip(layers="block.0"), rows=[1]):
        out0 = _run(sd3, kw)
    _assert_rows(out0, plain, ref0, [1])


def test_sd3_last_block_and_joint_attention_skips(sd3: torch.nn.Module) -> None:
    """The last joint block (``context_pre_only``: returns ``(None, hidden_states)``) against
    SD3's ``skip_layers``; the joint attention skip against a hand forward hook that returns
    the attention's two inputs (diffusers 0.42 has no skip function for JointAttnProcessor2_0)."""
    kw = inputs("sd3", sd3, 2, (3, 5))
    plain = _run(sd3, kw)
    patcher = patcher_for(sd3)
    ref = _run(sd3, kw, skip_layers=[2])
    with patcher.perturb(LayerSkip(layers="block.2"), rows=[1]):
        out = _run(sd3, kw)
    _assert_rows(out, plain, ref, [1])

    attn = sd3.transformer_blocks[1].attn

    def identity(mod: Any, args: Any, kwargs: dict[str, Any], output: Any) -> Any:
        return kwargs["hidden_states"], kwargs["encoder_hidden_states"]

    handle = attn.register_forward_hook(identity, with_kwargs=True)
    try:
        ref = _run(sd3, kw)
    finally:
        handle.remove()
    with patcher.perturb(LayerSkip("attention", layers="block.1"), rows=[0]):
        out = _run(sd3, kw)
    _assert_rows(out, plain, ref, [0])


def test_sd3_ff_skip_equals_diffusers_layer_skip_hook(sd3: torch.nn.Module) -> None:
    kw = inputs("sd3", sd3, 2, (3, 5))
    plain = _run(sd3, kw)
    config = LayerSkipConfig([1], fqn="transformer_blocks", skip_attention=False, skip_ff=True)
    ref = _with_diffusers_skip(sd3, kw, config)
    with patcher_for(sd3).perturb(LayerSkip("ff", layers="block.1"), rows=[1]):
        out = _run(sd3, kw)
    _assert_rows(out, plain, ref, [1])


@pytest.mark.parametrize(
    ("skip", "config"),
    [
        ("attention", dict(skip_attention=True, skip_ff=False)),
        ("block", dict(skip_attention=True, skip_ff=True)),
        ("ff", dict(skip_attention=False, skip_ff=True)),
    ],
)
def test_dit_skips_equal_diffusers_layer_skip_hooks(
    dit: torch.nn.Module, skip: str, config: dict[str, bool]
) -> None:
    kw = inputs("dit", dit, 2, (4, 4))
    plain = _run(dit, kw)
    ref = _with_diffusers_skip(dit, kw, LayerSkipConfig([0], fqn="transformer_blocks", **config))
    layer = "transformer_blocks.0.attn1"
    with patcher_for(dit).perturb(LayerSkip(skip, layers=layer), rows=[0]):  # type: ignore[arg-type]
        out = _run(dit, kw)
    _assert_rows(out, plain, ref, [0])


@pytest.mark.parametrize(
    ("family", "fqn", "size"),
    [("wan", "blocks", (3, 2, 5)), ("cogvideox", "transformer_blocks", (3, 2, 5))],
)
@pytest.mark.parametrize(
    ("skip", "config"),
    [("block", dict(skip_attention=True, skip_ff=True)), ("ff", dict(skip_attention=False))],
)
def test_video_stg_r_and_ff_skip_equal_diffusers_layer_skip_hooks(
    video: dict[str, torch.nn.Module],
    family: str,
    fqn: str,
    size: tuple[int, int, int],
    skip: str,
    config: dict[str, bool],
) -> None:
    """STG-R (whole block) and feed-forward skips on tiny video transformers."""
    model = video[family]
    kw = inputs(family, model, 2, size)
    plain = _run(model, kw)
    ref = _with_diffusers_skip(model, kw, LayerSkipConfig([1], fqn=fqn, **config))
    with patcher_for(model).perturb(LayerSkip(skip, layers="block.1"), rows=[1]):  # type: ignore[arg-type]
        out = _run(model, kw)
    _assert_rows(out, plain, ref, [1])


@pytest.mark.parametrize("layer", ["double.1", "single.0"])
def test_flux_block_skip_equals_hand_identity_blocks(layer: str) -> None:
    """Flux blocks return ``(encoder_hidden_states, hidden_states)``; a skipped block returns
    its two inputs in that order (reference: a hand forward hook; diffusers' own whole-block
    hook returns them swapped)."""
    model = make_flux()
    kw = inputs("flux", model, 2, (3, 5))
    plain = _run(model, kw)
    kind, index = layer.split(".")
    stack = model.transformer_blocks if kind == "double" else model.single_transformer_blocks

    def identity(mod: Any, args: Any, kwargs: dict[str, Any], out: Any) -> Any:
        return kwargs["encoder_hidden_states"], kwargs["hidden_states"]

    handle = stack[int(index)].register_forward_hook(identity, with_kwargs=True)
    try:
        ref = _run(model, kw)
    finally:
        handle.remove()
    with patcher_for(model).perturb(LayerSkip(layers=layer), rows=[0]):
        out = _run(model, kw)
    _assert_rows(out, plain, ref, [0])


def test_hooks_removed_after_exception_and_unknown_paths_are_errors(sd3: torch.nn.Module) -> None:
    kw = inputs("sd3", sd3, 2, (3, 5))
    plain = _run(sd3, kw)
    patcher = patcher_for(sd3)
    bad = dict(kw, hidden_states=kw["hidden_states"][:, :3])  # wrong channels: forward raises
    with pytest.raises(RuntimeError), patcher.perturb(LayerSkip(layers="block.1"), rows=[1]):
        _run(sd3, bad)
    for module in sd3.modules():
        assert not module._forward_hooks
        assert not module._forward_pre_hooks
    assert torch.equal(_run(sd3, kw), plain)
    with pytest.raises(ValueError, match="skip must be one of"):
        LayerSkip("residual")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown layer or preset"):
        patcher.perturb(LayerSkip(layers="block.9"), rows=[0]).__enter__()


@pytest.mark.parametrize("cfg_scale", [1.0, 4.0])
def test_slg_rule_equals_diffusers_skip_layer_guidance(cfg_scale: float) -> None:
    g = torch.Generator().manual_seed(0)
    x_c, x_u, x_s = (torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64) for _ in range(3))
    n = 30
    guider = SkipLayerGuidance(
        guidance_scale=cfg_scale,
        skip_layer_guidance_scale=2.8,
        skip_layer_guidance_layers=[7, 8, 9],
    )
    rule = SLG(2.8, layers=("block.7", "block.8", "block.9"), cfg_scale=cfg_scale)
    for step in range(n):
        guider.set_state(step, n, torch.tensor(999))
        ctx = StepContext(1.0, step=step, num_steps=n)
        needed = set(rule.branches(ctx))
        assert (rule.skip_branch in needed) == guider._is_slg_enabled()
        assert (UNCOND in needed) == guider._is_cfg_enabled()
        outputs = {COND: x_c, UNCOND: x_u, rule.skip_branch: x_s}
        ref = guider.forward(
            x_c,
            x_u if guider._is_cfg_enabled() else None,
            x_s if guider._is_slg_enabled() else None,
        ).pred
        got, _ = rule.combine({b: outputs[b] for b in needed}, ctx)
        np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=1e-13, atol=1e-13)
    assert SLG(0.0).branches(StepContext(1.0)) == (COND,)


def test_other_threads_are_not_skipped_or_permuted(dit: torch.nn.Module) -> None:
    import threading

    from smoothguide import TokenPermutation

    kw = inputs("dit", dit, 2, (4, 4))
    plain = _run(dit, kw)
    patcher = patcher_for(dit)
    layer = "transformer_blocks.0.attn1"
    for p in (LayerSkip(layers=layer), TokenPermutation(layers=layer)):
        seen: list[torch.Tensor] = []
        with patcher.perturb(p, rows=[0, 1]):
            worker = threading.Thread(target=lambda: seen.append(_run(dit, kw)))
            worker.start()
            worker.join()
            mine = _run(dit, kw)
        assert torch.equal(seen[0], plain)  # the other thread ran the plain model
        assert not torch.equal(mine, plain)


def test_slg_scale_one_without_cfg_is_neutral_and_skips_its_branch() -> None:
    # x̃_c + 1 · (x_c − x̃_c) is x_c: the skip forward is not run, the result is x_c exactly
    rng = np.random.default_rng(0)
    x_c = rng.normal(size=(2, 4, 3, 3))
    rule = SLG(1.0, layers="block.1", start=0.0, stop=1.0)
    ctx = StepContext(1.0, step=3, num_steps=10)
    assert rule.branches(ctx) == (COND,)
    out, _ = rule.combine({COND: x_c}, ctx)
    assert np.array_equal(out, x_c)
    # with CFG, s = 1 is a real term and needs its branch
    with_cfg = SLG(1.0, layers="block.1", start=0.0, stop=1.0, cfg_scale=3.0)
    assert with_cfg.skip_branch in with_cfg.branches(ctx)
