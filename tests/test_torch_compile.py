"""SEG and PAG in torch.compile'd diffusers models (inductor, CPU), without recompilation.

Whole-model ``torch.compile(model)`` and regional compilation (diffusers'
``compile_repeated_blocks``, or ``block.compile()`` of every transformer block) of tiny
UNet, SD3 and Flux models, inside :func:`smoothguide.torch.compile.compilable`. The
reference is the eager model under the same perturbation (itself checked against
hand-written references in ``test_diffusers_*``). After warm-up (a plain and a SEG
call), σ of a sweep, SEG / PAG / plain, other rows and other layers must not add a
graph: ``torch._dynamo.utils.counters["stats"]["unique_graphs"]`` stays put.

Every case compiles with inductor (CPU C++ code generation); all of them share one
inductor cache per run. ``SMOOTHGUIDE_COMPILE_BACKEND=aot_eager`` runs the same
tracing, guards and AOTAutograd functionalisation without code generation (quick local
runs). Also here: a compiled Flux on diffusers dispatcher backends other than the
default (``_native_math`` and a hand backend registered through diffusers' registry that
never calls torch SDPA), and root ``model.compile()`` (``nn.Module.compile``, in place).
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from torch._dynamo.utils import counters  # noqa: E402

from smoothguide import IdentityAttention, QuerySmoothing  # noqa: E402
from smoothguide.diffusers import patcher_for  # noqa: E402
from smoothguide.torch import compilable  # noqa: E402
from test_diffusers_transformers import inputs, run  # noqa: E402
from test_diffusers_unet import inputs as unet_inputs  # noqa: E402
from test_diffusers_unet import tiny_unet  # noqa: E402

# inductor's first import touches deprecated torch.jit APIs
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:torch.*")


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()  # type: ignore[attr-defined]
    counters.clear()
    yield
    torch._dynamo.reset()


def small_flux() -> torch.nn.Module:
    torch.manual_seed(0)
    model = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8,
        axes_dims_rope=[4, 4, 8], guidance_embeds=True,
    )  # fmt: skip
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return model.eval()


def small_sd3() -> torch.nn.Module:
    torch.manual_seed(0)
    model = diffusers.SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, caption_projection_dim=16, joint_attention_dim=16,
        pooled_projection_dim=8, out_channels=4, qk_norm="rms_norm",
    )  # fmt: skip
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return model.eval()


def unet_kwargs() -> dict[str, Any]:
    x, t, ehs = unet_inputs(8, 16)
    return {"sample": x, "timestep": t, "encoder_hidden_states": ehs}


def call(model: Any, kw: dict[str, Any]) -> torch.Tensor:
    return run(model, kw)


def graphs() -> int:
    return int(counters["stats"]["unique_graphs"])


BACKEND = os.environ.get("SMOOTHGUIDE_COMPILE_BACKEND", "inductor")


def compiler(how: str) -> Callable[[torch.nn.Module], Any]:
    name = BACKEND

    def whole(model: torch.nn.Module) -> Any:
        return torch.compile(model, backend=name)

    def root(model: torch.nn.Module) -> Any:  # nn.Module.compile: in place, same object
        model.compile(backend=name)
        return model

    def regional(model: torch.nn.Module) -> Any:
        if getattr(model, "_repeated_blocks", None):
            model.compile_repeated_blocks(backend=name)
        else:  # SD3 declares no repeated blocks: compile each transformer block
            for block in model.transformer_blocks:
                block.compile(backend=name)
        return model

    return {"regional": regional, "whole": whole, "root": root}[how]


def check(
    model: torch.nn.Module,
    kw: dict[str, Any],
    compile_fn: Callable[[torch.nn.Module], Any],
    other_layer: str,
    rows: tuple[list[int], list[int]],
    setup: Callable[[], None] = lambda: None,
) -> torch.nn.Module:
    """Compiled == eager for σ sweep, PAG, another layer, SEG+PAG and plain; no recompile.

    ``setup`` runs inside :func:`compilable`, before compiling. Returns the compiled model.
    """
    p = patcher_for(model)
    a, b = rows

    def cases(target: Any, patcher: Any) -> dict[str, torch.Tensor]:
        out = {}
        for sigma in (1.0, 2.5, math.inf):
            with patcher.perturb(QuerySmoothing(sigma, layers=patcher.layers), rows=a):
                out[f"seg{sigma}"] = call(target, kw)
        with patcher.perturb(IdentityAttention(layers=patcher.layers), rows=a):
            out["pag"] = call(target, kw)
        with patcher.perturb(QuerySmoothing(3.0, layers=other_layer), rows=b):
            out["other"] = call(target, kw)
        with (  # SEG and PAG on disjoint rows of one call: the rule-batched case
            patcher.perturb(QuerySmoothing(1.0), rows=a),
            patcher.perturb(IdentityAttention(), rows=b),
        ):
            out["both"] = call(target, kw)
        out["plain"] = call(target, kw)
        return out

    eager = cases(model, p)
    compiled_model = copy.deepcopy(model)
    pc = patcher_for(compiled_model)
    with compilable(pc):
        setup()
        compiled = compile_fn(compiled_model)
        call(compiled, kw)  # warm-up: plain and perturbed
        with pc.perturb(QuerySmoothing(0.7), rows=a):
            call(compiled, kw)
        warm = graphs()
        assert warm > 0  # it really compiled
        got = cases(compiled, pc)
        assert graphs() == warm, "a perturbation switch recompiled"
        assert counters["graph_break"] == {} or sum(counters["graph_break"].values()) == 0
    for name, ref in eager.items():
        err = float((got[name] - ref).abs().max())
        assert err <= 1e-4 * float(ref.abs().max()), (name, err)
    scale = float(eager["plain"].abs().max())
    for name in ("seg1.0", "pag", "other"):  # they act: 5x the compiled-vs-eager tolerance
        assert float((got[name] - got["plain"]).abs().max()) > 5e-4 * scale, name
    # after the context the compiled model is a plain model again (no hooks, no ops)
    assert not any(hasattr(m, "_smoothguide_slot") for m in compiled_model.modules())
    return compiled


@pytest.mark.slow
@pytest.mark.parametrize("how", ["regional", "whole"])
def test_flux_compiled(how: str) -> None:
    model = small_flux()
    kw = inputs("flux", model, 3, (3, 5))
    check(model, kw, compiler(how), "single.0", ([2], [1]))


@pytest.mark.slow
@pytest.mark.parametrize("how", ["regional", "whole"])
def test_sd3_compiled(how: str) -> None:
    model = small_sd3()
    kw = inputs("sd3", model, 3, (3, 5))
    check(model, kw, compiler(how), "block.0", ([2], [1]))


@pytest.mark.slow
@pytest.mark.parametrize("how", ["regional", "whole"])
def test_unet_compiled(how: str) -> None:
    unet = tiny_unet()
    kw = unet_kwargs()
    layer = "up_blocks.1.attentions.0.transformer_blocks.0.attn1"
    check(unet, kw, compiler(how), layer, ([2], [1]))


# ------------------------------------------- dispatcher backends and root model.compile()
@pytest.fixture
def _restore_registry() -> Iterator[Any]:
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry as registry

    saved = (
        registry._active_backend,
        dict(registry._backends),
        dict(registry._constraints),
        dict(registry._supported_arg_names),
    )
    yield registry
    registry._active_backend = saved[0]
    for table, old in zip(
        (registry._backends, registry._constraints, registry._supported_arg_names),
        saved[1:],
        strict=True,
    ):
        table.clear()
        table.update(old)


def tempered_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """A user backend without torch SDPA: softmax(0.75 q kᵀ / √d) v in float64, (B, S, H, D).

    Three quarters of the usual logit scale, so its output visibly differs from every SDPA
    backend's: a compiled model that silently fell back to another backend fails the test.
    """
    assert attn_mask is None
    q, k, v = (x.double().transpose(1, 2) for x in (query, key, value))
    s = 0.75 / math.sqrt(q.shape[-1]) if scale is None else 0.75 * scale
    out = torch.softmax(q @ k.transpose(-1, -2) * s, dim=-1) @ v
    return out.transpose(1, 2).to(query.dtype)


@pytest.mark.slow
@pytest.mark.usefixtures("_restore_registry")
@pytest.mark.parametrize("attention", ["_native_math", "tempered"])
def test_flux_compiled_on_another_dispatcher_backend(attention: str) -> None:
    from diffusers.models.attention_dispatch import AttentionBackendName as Name
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry as registry

    def register() -> None:  # as a user would: through diffusers' registry
        registry.register(Name.NATIVE)(tempered_attention)

    model = small_flux()
    kw = inputs("flux", model, 3, (3, 5))
    default = call(model, kw)  # torch SDPA (diffusers' "native")
    if attention == "tempered":
        register()  # replaces "native": models without a backend of their own use it
        model.set_attention_backend("native")
    else:
        model.set_attention_backend(attention)
    # registered again inside compilable (before compiling): it must be wrapped there too
    setup = register if attention == "tempered" else (lambda: None)
    check(model, kw, compiler("regional"), "single.0", ([2], [1]), setup=setup)
    if attention == "tempered":  # the compiled model really ran the registered backend
        assert float((call(model, kw) - default).abs().max()) > 1e-2 * float(default.abs().max())
        assert registry._backends[Name.NATIVE] is tempered_attention  # restored, not wrapped


@pytest.mark.slow
def test_flux_root_module_compile() -> None:
    """``model.compile()`` compiles in place: inside compilable it works like torch.compile(model);
    after it the model is still compiled, runs plain, and a perturbation raises naming the fix."""
    model = small_flux()
    kw = inputs("flux", model, 3, (3, 5))
    compiled = check(model, kw, compiler("root"), "single.0", ([2], [1]))
    assert compiled._compiled_call_impl is not None  # type: ignore[attr-defined]
    torch.testing.assert_close(call(compiled, kw), call(model, kw), rtol=1e-4, atol=1e-5)
    p = patcher_for(compiled)
    with (
        pytest.raises(
            RuntimeError, match=r"compiled by torch.compile.*compilable\(patcher\) before"
        ),
        p.perturb(QuerySmoothing(1.0), rows=[1]),
    ):
        call(compiled, kw)


# ------------------------------------------------------------- errors and restoring
class _Attn(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        return torch.nn.functional.scaled_dot_product_attention(x, x, x)


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = _Attn(), _Attn()

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(img.flatten(2).transpose(1, 2)))


def _net() -> tuple[torch.nn.Module, torch.Tensor, Any]:
    from smoothguide.torch import AttentionPatcher

    torch.manual_seed(0)
    net = _Net().eval()
    return net, torch.randn(2, 4, 3, 5), AttentionPatcher(net, layers=_Attn)


def test_compiled_without_compilable_raises_naming_the_fix() -> None:
    net, x, p = _net()
    compiled = torch.compile(net, backend="aot_eager")
    with torch.no_grad():
        compiled(x)  # compiled without hooks: later per-context hooks are never run
        with (
            pytest.raises(RuntimeError, match=r"torch.compile'd.*compilable\(patcher\)"),
            p.perturb(QuerySmoothing(1.0), rows=[1]),
        ):
            compiled(x)


def test_compilable_layer_choice_nesting_and_restoring() -> None:
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry as registry

    net, x, p = _net()
    sdpa = torch.nn.functional.scaled_dot_product_attention
    backends = dict(registry._backends)
    with compilable(p, layers=["a"]):
        assert torch.nn.functional.scaled_dot_product_attention is not sdpa
        with (
            pytest.raises(ValueError, match=r"'b' is not among .*compilable.*\['a'\]"),
            p.perturb(QuerySmoothing(1.0, layers="b"), rows=[1]),
        ):
            net(x)
        with pytest.raises(RuntimeError, match="already active"), compilable(p):
            pass
        with torch.no_grad(), p.perturb(QuerySmoothing(math.inf, layers="a"), rows=[1]):
            out = net(x)
    with torch.no_grad(), p.perturb(QuerySmoothing(math.inf, layers="a"), rows=[1]):
        assert torch.equal(net(x), out)  # eager path, same result
    assert torch.nn.functional.scaled_dot_product_attention is sdpa
    assert registry._backends == backends
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in net.modules())
