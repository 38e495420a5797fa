"""SEG and PAG on every diffusers attention backend that runs on this CPU, and on a user one.

Flux's processor calls ``dispatch_attention_fn``, which routes to the backend registered
in diffusers' ``_AttentionBackendRegistry`` (``model.set_attention_backend(name)``); SD3's
and the UNet's processors call torch SDPA whatever the backend. References: hand-written
processors with float64 softmax and a SciPy blur (``test_diffusers_transformers``,
``test_diffusers_unet``), the default-backend result, and a hand softmax backend
registered through diffusers' registry that never calls torch SDPA.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from typing import Any

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("scipy")

import torch.nn.functional as F  # noqa: E402
from diffusers.models import attention_dispatch  # noqa: E402
from diffusers.models.attention_processor import AttnProcessor2_0  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402

from smoothguide import IdentityAttention, QuerySmoothing  # noqa: E402
from smoothguide.diffusers import patcher_for  # noqa: E402
from test_diffusers_transformers import (  # noqa: E402
    Edit,
    assert_close,
    assert_differs,
    grid3,
    inputs,
    make_flux,
    make_sd3,
    naive_attention,
    reference_blur,
    reference_model,
    run,
    sigma3,
)
from test_diffusers_unet import ReferenceSelfAttention, tiny_unet  # noqa: E402
from test_diffusers_unet import inputs as unet_inputs  # noqa: E402
from test_diffusers_unet import run as unet_run  # noqa: E402

Registry = attention_dispatch._AttentionBackendRegistry
Name = attention_dispatch.AttentionBackendName

#: diffusers backends with a CPU implementation in torch (the others need CUDA/NPU/XLA
#: kernels or packages: flash-attn, sageattention, xformers, kernels-hub).
CPU_BACKENDS = ("native", "_native_math", "_native_flash", "flex")
SIGMA = (1.0, 1.5)
SIZE = (3, 5)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _restore_registry() -> Iterator[None]:
    """Tests change the active backend and register backends: put everything back."""
    saved = (
        Registry._active_backend,
        dict(Registry._backends),
        dict(Registry._constraints),
        dict(Registry._supported_arg_names),
    )
    yield
    Registry._active_backend = saved[0]
    for table, old in zip(
        (Registry._backends, Registry._constraints, Registry._supported_arg_names),
        saved[1:],
        strict=True,
    ):
        table.clear()
        table.update(old)


def hand_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """A user backend: softmax(q kᵀ / √d) v in float64, (B, S, H, D) layout, no torch SDPA."""
    assert attn_mask is None
    q, k, v = (x.double().transpose(1, 2) for x in (query, key, value))
    s = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    out = torch.softmax(q @ k.transpose(-1, -2) * s, dim=-1) @ v
    return out.transpose(1, 2).to(query.dtype)


def register_hand(name: Any = Name.NATIVE) -> None:
    """Register :func:`hand_attention` under ``name`` as a user would (replacing that entry)."""
    Registry.register(name)(hand_attention)


class CountSDPA(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func is F.scaled_dot_product_attention:
            self.calls += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def flux() -> torch.nn.Module:
    return make_flux()


def flux_results(model: torch.nn.Module, kw: dict[str, Any]) -> dict[str, torch.Tensor]:
    p = patcher_for(model)
    with p.perturb(QuerySmoothing(SIGMA, layers=p.layers), rows=[1]):
        seg = run(model, kw)
    with p.perturb(IdentityAttention(layers=p.layers), rows=[1]):
        pag = run(model, kw)
    return {"plain": run(model, kw), "seg": seg, "pag": pag}


@pytest.fixture(scope="module")
def flux_reference(flux: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Default backend (torch SDPA) results and the hand-written SEG reference model."""
    kw = inputs("flux", flux, 3, SIZE)
    out = flux_results(flux, kw)
    layers = patcher_for(flux).layers
    edit = Edit([1], grid3(SIZE), SIGMA)
    out["hand_seg"] = run(reference_model("flux", flux, layers, edit, math.prod(SIZE)), kw)
    return out


def assert_backend_results(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    err = assert_close(got["seg"], ref["hand_seg"])  # independent: float64 + SciPy
    assert_close(got["seg"], ref["seg"])
    assert_close(got["pag"], ref["pag"])
    assert_close(got["plain"], ref["plain"])
    for name in ("seg", "pag"):  # unperturbed rows: exactly the backend's plain output
        assert torch.equal(got[name][[0, 2]], got["plain"][[0, 2]])
    assert_differs(got["seg"][1], got["plain"][1], err)
    assert_differs(got["pag"][1], got["plain"][1], err)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_flux_seg_pag_on_each_cpu_backend(
    flux: torch.nn.Module, flux_reference: dict[str, torch.Tensor], backend: str
) -> None:
    model = copy.deepcopy(flux)
    model.set_attention_backend(backend)
    assert {m.processor._attention_backend for m in model.modules() if hasattr(m, "processor")} == {
        Name(backend)
    }
    got = flux_results(model, inputs("flux", model, 3, SIZE))
    assert_backend_results(got, flux_reference)
    assert not any(hasattr(fn, "__smoothguide_backend__") for fn in Registry._backends.values())


def test_flux_on_a_registered_backend_that_never_calls_sdpa(
    flux: torch.nn.Module, flux_reference: dict[str, torch.Tensor]
) -> None:
    register_hand()
    model = copy.deepcopy(flux)
    model.set_attention_backend("native")
    with CountSDPA() as counted:
        got = flux_results(model, inputs("flux", model, 3, SIZE))
    assert counted.calls == 0  # the perturbation went through the registered backend
    assert_backend_results(got, flux_reference)
    assert Registry._backends[Name.NATIVE] is hand_attention  # restored, not wrapped


def test_backend_registered_while_perturbing_is_used_and_kept(
    flux: torch.nn.Module, flux_reference: dict[str, torch.Tensor]
) -> None:
    model = copy.deepcopy(flux)
    kw = inputs("flux", model, 3, SIZE)
    p = patcher_for(model)
    with p.perturb(QuerySmoothing(SIGMA, layers=p.layers), rows=[1]), CountSDPA() as counted:
        register_hand()
        seg = run(model, kw)
    assert counted.calls == 0
    assert_close(seg, flux_reference["hand_seg"])
    assert Registry._backends[Name.NATIVE] is hand_attention


def test_unselected_layers_use_the_backend_unchanged(
    flux: torch.nn.Module,
) -> None:
    model = copy.deepcopy(flux)
    kw = inputs("flux", model, 3, SIZE)
    plain = run(model, kw)
    p = patcher_for(model)
    seen: list[torch.Tensor] = []

    def spy(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, **kwargs: Any) -> Any:
        seen.append(query.detach().clone())
        return hand_attention(query, key, value, **kwargs)

    register_hand()
    Registry._backends[Name.NATIVE] = spy  # same signature names as hand_attention
    with p.perturb(QuerySmoothing(math.inf, layers="double.0"), rows=[1]):
        out = run(model, kw)
    # 4 layers, each called once; only double.0's call sees a changed query (row 1, image tokens)
    assert len(seen) == 4
    with torch.no_grad():
        Registry._backends[Name.NATIVE] = hand_attention
        hand_plain = run(model, kw)
    assert_close(hand_plain, plain)
    assert torch.equal(out[[0, 2]], hand_plain[[0, 2]])
    q = seen[0]
    n_img = math.prod(SIZE)
    img = q[1, -n_img:]  # (tokens, heads, d): every image token's query is the mean
    assert torch.allclose(img, img.mean(0, keepdim=True).expand_as(img), atol=1e-6)


def test_context_parallel_backend_call_raises_naming_it(flux: torch.nn.Module) -> None:
    model = copy.deepcopy(flux)
    kw = inputs("flux", model, 2, SIZE)
    p = patcher_for(model)
    layer = dict(model.named_modules())[p.default[0]]
    layer.processor._parallel_config = object()  # as enable_parallelism() would set it
    with (
        pytest.raises(RuntimeError, match=r"backend .*context\s+parallelism"),
        p.perturb(QuerySmoothing(1.0), rows=[1]),
    ):
        run(model, kw)
    assert not any(hasattr(fn, "__smoothguide_backend__") for fn in Registry._backends.values())


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("backend", [*CPU_BACKENDS, "hand"])
def test_sd3_and_unet_under_any_selected_backend(backend: str) -> None:
    """SD3's and the UNet's processors call torch SDPA whatever backend is selected."""
    if backend == "hand":
        register_hand()
        backend = "native"
    sd3 = make_sd3(num_layers=2)
    kw = inputs("sd3", sd3, 3, SIZE)
    p = patcher_for(sd3)
    edit = Edit([1], grid3(SIZE), SIGMA)
    want = run(reference_model("sd3", sd3, p.layers, edit, math.prod(SIZE)), kw)
    unet = tiny_unet()
    x, t, ehs = unet_inputs(8, 16)
    pu = patcher_for(unet)
    ref_unet = copy.deepcopy(unet)
    ref_unet.set_attn_processor(
        {
            name: ReferenceSelfAttention([2], "mean")
            if name.removesuffix(".processor") in pu.default
            else AttnProcessor2_0()
            for name in ref_unet.attn_processors
        }
    )
    with attention_dispatch.attention_backend(backend):
        with p.perturb(QuerySmoothing(SIGMA, layers=p.layers), rows=[1]):
            seg = run(sd3, kw)
        with pu.perturb(QuerySmoothing(math.inf), rows=[2]):
            useg = unet_run(unet, x, t, ehs)
    assert_close(seg, want)
    torch.testing.assert_close(useg, unet_run(ref_unet, x, t, ehs), rtol=1e-4, atol=1e-5)


def test_other_thread_calls_the_wrapped_backend_unperturbed(flux: torch.nn.Module) -> None:
    import threading

    register_hand()
    model = copy.deepcopy(flux)
    kw = inputs("flux", model, 3, SIZE)
    plain = run(model, kw)
    p = patcher_for(model)
    seen: dict[str, torch.Tensor] = {}

    def other() -> None:
        assert hasattr(Registry._backends[Name.NATIVE], "__smoothguide_backend__")  # wrapped
        seen["out"] = run(model, kw)

    with p.perturb(QuerySmoothing(math.inf, layers=p.layers), rows=[1]):
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
        seg = run(model, kw)
    assert torch.equal(seen["out"], plain)
    assert not torch.equal(seg[1], plain[1])


# ---------------------------------------------------- grouped-query attention (GQA)
HQ, HKV, DH = 4, 2, 8  # 4 query heads share 2 key/value heads


class GQAAttention(torch.nn.Module):
    """Self-attention with fewer K/V heads than Q heads (SDPA's ``enable_gqa=True``).

    ``route``: ``"sdpa"`` calls torch SDPA, ``"dispatch"`` diffusers' ``dispatch_attention_fn``.
    """

    def __init__(self, route: str) -> None:
        super().__init__()
        self.route = route
        self.q = torch.nn.Linear(6, HQ * DH)
        self.kv = torch.nn.Linear(6, 2 * HKV * DH)
        self.out = torch.nn.Linear(HQ * DH, 6)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, heads, N, d) each; K and V with HKV heads."""
        q = self.q(x).unflatten(-1, (HQ, DH)).transpose(1, 2)
        k, v = self.kv(x).unflatten(-1, (2, HKV, DH)).unbind(-3)
        return q, k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x)
        if self.route == "sdpa":
            o = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        else:
            o = attention_dispatch.dispatch_attention_fn(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), enable_gqa=True
            ).transpose(1, 2)
        return self.out(o.transpose(1, 2).flatten(-2))


class GQANet(torch.nn.Module):
    def __init__(self, route: str) -> None:
        super().__init__()
        self.attn = GQAAttention(route)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.attn(img.flatten(2).transpose(1, 2))


def gqa_reference(net: GQANet, img: torch.Tensor, edit: str, row: int) -> torch.Tensor:
    """float64 by hand: K/V repeat_interleave'd to the query heads; SciPy blur (SEG) or V (PAG)."""
    attn = net.attn.double()
    try:
        x = img.double().flatten(2).transpose(1, 2)
        with torch.no_grad():
            q, k, v = attn.qkv(x)
            k, v = (t.repeat_interleave(HQ // HKV, dim=1) for t in (k, v))
            if edit == "seg":
                h, w = img.shape[-2:]
                blurred = reference_blur(
                    q[row].numpy().reshape(HQ, 1, h, w, DH), sigma3(SIGMA)
                ).reshape(HQ, h * w, DH)
                q = q.clone()
                q[row] = torch.from_numpy(blurred)
            o = naive_attention(q, k, v)
            if edit == "pag":
                o[row] = v[row]
            return attn.out(o.transpose(1, 2).flatten(-2)).float()
    finally:
        attn.float()


@pytest.mark.parametrize("route", ["sdpa", "native", "_native_math", "hand"])
def test_seg_and_pag_with_grouped_query_attention(route: str) -> None:
    from smoothguide.torch import AttentionPatcher

    if route == "hand":  # a registered backend that never calls torch SDPA, GQA by hand

        def hand_gqa(query, key, value, attn_mask=None, scale=None, enable_gqa=False):  # type: ignore[no-untyped-def]
            assert enable_gqa
            heads = query.shape[2] // key.shape[2]
            k, v = (t.repeat_interleave(heads, dim=2) for t in (key, value))
            return hand_attention(query, k, v, attn_mask, scale)

        Registry.register(Name.NATIVE)(hand_gqa)
    torch.manual_seed(0)
    net = GQANet("sdpa" if route == "sdpa" else "dispatch").eval()
    img = torch.randn(3, 6, *SIZE)
    p = AttentionPatcher(net, layers=GQAAttention)
    backend = "native" if route in ("sdpa", "hand") else route
    with attention_dispatch.attention_backend(backend), torch.no_grad():
        plain = net(img)
        with p.perturb(QuerySmoothing(SIGMA), rows=[1]):
            seg = net(img)
        with p.perturb(IdentityAttention(), rows=[2]):
            pag = net(img)
    assert_close(plain, gqa_reference(net, img, "none", 0))
    err = assert_close(seg, gqa_reference(net, img, "seg", 1))
    assert_close(pag, gqa_reference(net, img, "pag", 2))
    assert torch.equal(seg[[0, 2]], plain[[0, 2]])
    assert torch.equal(pag[[0, 1]], plain[[0, 1]])
    assert_differs(seg[1], plain[1], err)
    assert_differs(pag[2], plain[2], err)
