"""Token permutation (TPG) on a tiny UNet and a tiny SD3, against hand-written forward pre-hooks.

The reference permutes the ``hidden_states`` entering the chosen blocks of the
*whole* batch with ``torch.randperm(n, generator=torch.Generator().manual_seed(seed + k))``
(the documented permutation of the ``k``-th block), written here by hand;
smoothguide must match it on the perturbed rows and leave the others bit-identical.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from smoothguide import TokenPermutation  # noqa: E402
from smoothguide.diffusers import patcher_for  # noqa: E402
from smoothguide.rules import COND, TPG, UNCOND, StepContext  # noqa: E402
from test_diffusers_transformers import inputs as tr_inputs  # noqa: E402
from test_diffusers_transformers import make_sd3  # noqa: E402
from test_diffusers_unet import inputs as unet_inputs  # noqa: E402
from test_diffusers_unet import run as unet_run  # noqa: E402
from test_diffusers_unet import tiny_unet  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@contextmanager
def permuted_inputs(model: torch.nn.Module, blocks: list[str], seed: int) -> Iterator[None]:
    """Every row's ``hidden_states`` entering ``blocks[k]`` permuted by randperm(seed + k)."""
    modules = dict(model.named_modules())
    handles = []

    def make(k: int) -> Any:
        def pre(mod: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if "hidden_states" in kwargs:
                x = kwargs["hidden_states"]
                perm = torch.randperm(x.shape[1], generator=torch.Generator().manual_seed(seed + k))
                return args, {**kwargs, "hidden_states": x[:, perm]}
            x = args[0]
            perm = torch.randperm(x.shape[1], generator=torch.Generator().manual_seed(seed + k))
            return (x[:, perm], *args[1:]), kwargs

        return pre

    for k, name in enumerate(blocks):
        handles.append(modules[name].register_forward_pre_hook(make(k), with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _check(out: torch.Tensor, plain: torch.Tensor, ref: torch.Tensor, rows: list[int]) -> None:
    others = [i for i in range(out.shape[0]) if i not in rows]
    assert torch.equal(out[others], plain[others])
    scale = float(ref.abs().max())
    assert float((out[rows] - ref[rows]).abs().max()) <= 1e-5 * scale
    assert float((ref[rows] - plain[rows]).abs().max()) > 1e-2 * scale


def test_unet_permutation_equals_hand_pre_hooks() -> None:
    unet = tiny_unet()
    x, t, ehs = unet_inputs()
    plain = unet_run(unet, x, t, ehs)
    patcher = patcher_for(unet)
    layers = patcher.resolve("mid") + patcher.layers[:1]
    blocks = sorted(
        {n.rsplit(".", 1)[0] for n in layers}, key=list(dict(unet.named_modules())).index
    )
    with permuted_inputs(unet, blocks, seed=5):
        ref = unet_run(unet, x, t, ehs)
    with patcher.perturb(TokenPermutation(5, layers=layers), rows=[2]):
        out = unet_run(unet, x, t, ehs)
    _check(out, plain, ref, [2])
    with patcher.perturb(TokenPermutation(6, layers=layers), rows=[2]):
        other_seed = unet_run(unet, x, t, ehs)
    assert not torch.equal(other_seed[2], out[2])


def test_sd3_permutes_image_tokens_only_and_preserves_them() -> None:
    model = make_sd3()
    kw = tr_inputs("sd3", model, 2, (3, 5))
    with torch.no_grad():
        plain = model(**kw).sample
        with permuted_inputs(model, ["transformer_blocks.1"], seed=0):
            ref = model(**kw).sample
    seen: dict[str, torch.Tensor] = {}

    def grab(mod: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen.setdefault("x", kwargs["hidden_states"].clone())
        seen.setdefault("text", kwargs["encoder_hidden_states"].clone())

    block = model.transformer_blocks[1]
    with torch.no_grad():
        handle = block.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            model(**kw)
        finally:
            handle.remove()
        plain_in = dict(seen)
        seen.clear()
        with patcher_for(model).perturb(TokenPermutation(layers="block.1"), rows=[1]):
            # registered after the patcher's hook, so it sees the permuted input
            handle = block.register_forward_pre_hook(grab, with_kwargs=True)
            try:
                out = model(**kw).sample
            finally:
                handle.remove()
    _check(out, plain, ref, [1])
    assert torch.equal(seen["text"], plain_in["text"])  # text stream untouched
    assert torch.equal(seen["x"][0], plain_in["x"][0])
    got, want = seen["x"][1], plain_in["x"][1]
    assert not torch.equal(got, want)
    # the same tokens, rearranged: norms and the multiset of tokens are preserved
    assert torch.equal(torch.linalg.vector_norm(got), torch.linalg.vector_norm(want))
    key = lambda t: sorted(map(tuple, t.tolist()))  # noqa: E731
    assert key(got) == key(want)


def test_tpg_rule_formula_and_neutral_scale() -> None:
    rng = np.random.default_rng(0)
    x_u, x_c, x_p = (rng.standard_normal(4) for _ in range(3))
    rule = TPG(2.5, cfg_scale=4.0)
    out, _ = rule.combine({UNCOND: x_u, COND: x_c, rule.tpg_branch: x_p}, StepContext(1.0))
    np.testing.assert_allclose(out, x_u + 4.0 * (x_c - x_u) + 2.5 * (x_c - x_p), rtol=1e-14)
    assert TPG(0.0).branches(StepContext(1.0)) == (COND,)
    with pytest.raises(ValueError, match="seed"):
        TokenPermutation(-1)


def test_hooks_removed_after_an_exception() -> None:
    unet = tiny_unet()
    x, t, ehs = unet_inputs()
    plain = unet_run(unet, x, t, ehs)
    patcher = patcher_for(unet)
    with pytest.raises(RuntimeError), patcher.perturb(TokenPermutation(layers="mid"), rows=[1]):
        unet_run(unet, x[:, :3], t, ehs)  # wrong channels: the forward raises
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in unet.modules())
    assert torch.equal(unet_run(unet, x, t, ehs), plain)
