"""SEG on diffusers transformers (SD3, Flux, PixArt/DiT, LTX-Video, Wan), tiny random models.

References are written here, independently of smoothguide: attention processors
that recompute each layer's attention by hand (``softmax(q kᵀ/√d) v`` in
float64) and replace the image-token queries of the perturbed rows by their
mean (σ = inf) or by a SciPy Gaussian blur on the expected grid, at a chosen
point of the processor (after or before the rotary embedding).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
scipy_ndimage = pytest.importorskip("scipy.ndimage")

from diffusers.models.embeddings import apply_rotary_emb  # noqa: E402
from diffusers.models.transformers import transformer_ltx  # noqa: E402
from diffusers.models.transformers.transformer_flux import _get_qkv_projections  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402

import smoothguide.diffusers.transformers  # noqa: E402,F401  (registers the families)
from smoothguide.diffusers import patcher_for  # noqa: E402
from smoothguide.diffusers.flux import flux_grid_from_ids  # noqa: E402
from smoothguide.diffusers.video import VideoTokens  # noqa: E402
from smoothguide.perturbations import QuerySmoothing  # noqa: E402
from smoothguide.torch import Geometry  # noqa: E402
from tolerance import EPS32  # noqa: E402
from tolerance import assert_close as close_scaled  # noqa: E402

INF = math.inf


# --------------------------------------------------------------------------- models
def _seed(n: int = 0) -> torch.Generator:
    torch.manual_seed(n)
    return torch.Generator().manual_seed(n)


def _randomize(model: torch.nn.Module) -> torch.nn.Module:
    # diffusers zero-initialises some output/gate layers; random weights make every path matter.
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return model.eval()


def make_sd3(num_layers: int = 3) -> torch.nn.Module:
    _seed()
    return _randomize(
        diffusers.SD3Transformer2DModel(
            sample_size=32,
            patch_size=2,
            in_channels=4,
            num_layers=num_layers,
            attention_head_dim=8,
            num_attention_heads=2,
            caption_projection_dim=16,
            joint_attention_dim=16,
            pooled_projection_dim=8,
            out_channels=4,
            qk_norm="rms_norm",
            dual_attention_layers=(0,),
        )
    )


def make_flux() -> torch.nn.Module:
    _seed()
    return _randomize(
        diffusers.FluxTransformer2DModel(
            patch_size=1,
            in_channels=4,
            num_layers=2,
            num_single_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=16,
            pooled_projection_dim=8,
            axes_dims_rope=[4, 4, 8],
            guidance_embeds=True,
        )
    )


def make_pixart() -> torch.nn.Module:
    _seed()
    return _randomize(
        diffusers.PixArtTransformer2DModel(
            sample_size=8,
            num_layers=3,
            patch_size=2,
            attention_head_dim=8,
            num_attention_heads=2,
            caption_channels=16,
            in_channels=4,
            cross_attention_dim=16,
            out_channels=8,
            attention_bias=True,
            activation_fn="gelu-approximate",
            num_embeds_ada_norm=1000,
            norm_type="ada_norm_single",
            norm_elementwise_affine=False,
            norm_eps=1e-6,
        )
    )


def make_dit() -> torch.nn.Module:
    _seed()
    return _randomize(
        diffusers.DiTTransformer2DModel(
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=4,
            out_channels=4,
            num_layers=2,
            sample_size=8,
            patch_size=2,
            num_embeds_ada_norm=10,
        )
    )


def make_ltx() -> torch.nn.Module:
    _seed()
    return _randomize(
        diffusers.LTXVideoTransformer3DModel(
            in_channels=4,
            out_channels=4,
            patch_size=1,
            patch_size_t=1,
            num_attention_heads=2,
            attention_head_dim=8,
            cross_attention_dim=16,
            num_layers=3,
            caption_channels=16,
        )
    )


def make_cogvideox() -> torch.nn.Module:
    _seed()
    return _randomize(
        diffusers.CogVideoXTransformer3DModel(
            num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
            time_embed_dim=2, text_embed_dim=16, num_layers=3, sample_width=10, sample_height=4,
            sample_frames=9, patch_size=2, temporal_compression_ratio=4, max_text_seq_length=6,
        )
    )  # fmt: skip


def make_wan() -> torch.nn.Module:
    _seed()
    return _randomize(
        diffusers.WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=4,
            out_channels=4,
            text_dim=16,
            freq_dim=16,
            ffn_dim=16,
            num_layers=2,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=32,
        )
    )


def flux_ids(h: int, w: int) -> torch.Tensor:
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([torch.zeros(h, w, dtype=torch.long), rows, cols], -1).reshape(-1, 3).float()


def inputs(
    family: str, model: torch.nn.Module, batch: int, size: tuple[int, ...]
) -> dict[str, Any]:
    """Model inputs; ``size`` is the image-token grid ``(h, w)`` or ``(frames, h, w)``."""
    g = _seed(1)
    t = torch.full((batch,), 400.0)
    if family == "sd3":
        h, w = size
        return dict(
            hidden_states=torch.randn(batch, 4, 2 * h, 2 * w, generator=g),
            encoder_hidden_states=torch.randn(batch, 5, 16, generator=g),
            pooled_projections=torch.randn(batch, 8, generator=g),
            timestep=t,
        )
    if family == "flux":
        h, w = size
        return dict(
            hidden_states=torch.randn(batch, h * w, 4, generator=g),
            encoder_hidden_states=torch.randn(batch, 7, 16, generator=g),
            pooled_projections=torch.randn(batch, 8, generator=g),
            timestep=t / 1000,
            img_ids=flux_ids(h, w),
            txt_ids=torch.zeros(7, 3),
            guidance=torch.full((batch,), 3.5),
        )
    if family == "pixart":
        h, w = size
        return dict(
            hidden_states=torch.randn(batch, 4, 2 * h, 2 * w, generator=g),
            encoder_hidden_states=torch.randn(batch, 6, 16, generator=g),
            timestep=t.long(),
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        )
    if family == "dit":
        h, w = size
        return dict(
            hidden_states=torch.randn(batch, 4, 2 * h, 2 * w, generator=g),
            timestep=t.long(),
            class_labels=torch.arange(batch) % 10,
        )
    if family == "ltx":
        f, h, w = size
        return dict(
            hidden_states=torch.randn(batch, f * h * w, 4, generator=g),
            encoder_hidden_states=torch.randn(batch, 6, 16, generator=g),
            timestep=t,
            encoder_attention_mask=torch.ones(batch, 6),
            num_frames=f,
            height=h,
            width=w,
        )
    if family == "wan":
        f, h, w = size
        return dict(
            hidden_states=torch.randn(batch, 4, f, 2 * h, 2 * w, generator=g),
            encoder_hidden_states=torch.randn(batch, 6, 16, generator=g),
            timestep=t,
        )
    if family == "cogvideox":  # (B, F, C, H, W); text length = max_text_seq_length
        f, h, w = size
        return dict(
            hidden_states=torch.randn(batch, f, 4, 2 * h, 2 * w, generator=g),
            encoder_hidden_states=torch.randn(batch, 6, 16, generator=g),
            timestep=t.long(),
        )
    raise AssertionError(family)


MAKERS: dict[str, Callable[[], torch.nn.Module]] = {
    "sd3": make_sd3,
    "flux": make_flux,
    "pixart": make_pixart,
    "dit": make_dit,
    "ltx": make_ltx,
    "wan": make_wan,
    "cogvideox": make_cogvideox,
}
#: non-square token grids per family (h != w; video: frames x h x w)
#: (diffusers' DiTTransformer2DModel itself unpatchifies square latents only)
SIZES = {
    "sd3": (3, 5),
    "flux": (3, 5),
    "pixart": (3, 5),
    "dit": (4, 4),
    "ltx": (3, 2, 5),
    "wan": (3, 2, 5),
    "cogvideox": (3, 2, 5),
}


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    return {name: make() for name, make in MAKERS.items()}


def tolerance(reference: torch.Tensor) -> float:
    """float32 rounding through a few random layers: relative to the output's scale."""
    return 1e-4 * float(reference.abs().max())


def assert_close(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """Returns the max abs error, so a later "differs" check can be made relative to it."""
    err = float((actual - reference).abs().max())
    assert err <= tolerance(reference), f"max abs error {err:.3g} > {tolerance(reference):.3g}"
    return err


def assert_differs(actual: torch.Tensor, other: torch.Tensor, error: float) -> None:
    """``actual`` differs from ``other`` by 10x the error measured against its reference
    (and by more than 1e-5 of the output scale, i.e. ~100 float32 ulps)."""
    diff = float((actual - other).abs().max())
    floor = max(10 * error, 1e-5 * float(other.abs().max()))
    assert diff > floor, f"max abs difference {diff:.3g} is within rounding ({floor:.3g})"


def run(model: torch.nn.Module, kwargs: dict[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        return model(**kwargs, return_dict=False)[0]


# ------------------------------------------------------------------ reference blur
def official_radius(sigma: float) -> int:
    """Kernel radius of the official SEG code: ``kernel_size = ceil(6σ) + 1 - ceil(6σ) % 2``."""
    c = math.ceil(6 * sigma)
    return (c + 1 - c % 2) // 2


def reference_blur(
    x: np.ndarray, sigmas: tuple[float, float, float], mode: str = "reflect"
) -> np.ndarray:
    """Blur ``x[..., F, h, w, d]`` along F, h, w with SciPy (inf: mean)."""
    for axis, s in zip((-4, -3, -2), sigmas, strict=True):
        if s == INF:
            x = np.broadcast_to(x.mean(axis=axis, keepdims=True), x.shape).copy()
        elif s > 0:
            x = scipy_ndimage.gaussian_filter1d(
                x, s, axis=axis, mode=mode, radius=official_radius(s)
            )
    return x


def sigma3(sigma: float | tuple[float, ...]) -> tuple[float, float, float]:
    if isinstance(sigma, tuple):
        return (0.0, *sigma) if len(sigma) == 2 else sigma  # type: ignore[return-value]
    return (0.0, sigma, sigma)


class Edit:
    """Replace image-token queries of ``rows`` (q: (B, heads, N, d)) by their blur on ``grid``."""

    def __init__(self, rows: list[int], grid: tuple[int, int, int], sigma: Any) -> None:
        self.rows, self.grid, self.sigmas = rows, grid, sigma3(sigma)

    def __call__(self, q: torch.Tensor, start: int) -> torch.Tensor:
        f, h, w = self.grid
        n = f * h * w
        q = q.clone()
        for r in self.rows:
            img = q[r, :, start : start + n].double().numpy()
            heads, _, d = img.shape
            blurred = reference_blur(img.reshape(heads, f, h, w, d), self.sigmas)
            q[r, :, start : start + n] = torch.from_numpy(blurred.reshape(heads, n, d)).to(q.dtype)
        return q


def no_edit(q: torch.Tensor, start: int) -> torch.Tensor:
    return q


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / √d) v in float64; (B, heads, N, d)."""
    logits = q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])
    return (logits.softmax(-1) @ v.double()).to(q.dtype)


# ------------------------------------------------------ reference processors (hand-written)
class RefJoint:
    """SD3's JointAttnProcessor2_0 math; image tokens first, text after.

    The edit runs after the QK RMS-norm (default) or, with ``before_norm``, before it.
    """

    def __init__(
        self, edit: Callable[[torch.Tensor, int], torch.Tensor], before_norm: bool = False
    ) -> None:
        self.edit, self.before_norm = edit, before_norm

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Any = None,
        attention_mask: Any = None,
        **_: Any,
    ) -> Any:
        b = hidden_states.shape[0]

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(b, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        q, k, v = (heads(f(hidden_states)) for f in (attn.to_q, attn.to_k, attn.to_v))
        if self.before_norm:
            q = self.edit(q, 0)
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        if not self.before_norm:
            q = self.edit(q, 0)
        n = q.shape[2]
        e = encoder_hidden_states
        if e is not None:
            eq, ek, ev = (heads(f(e)) for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            if attn.norm_added_q is not None:
                eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
            q, k, v = torch.cat([q, eq], 2), torch.cat([k, ek], 2), torch.cat([v, ev], 2)
        out = naive_attention(q, k, v).transpose(1, 2).flatten(2)
        if e is None:
            return attn.to_out[1](attn.to_out[0](out))
        out, eout = out[:, :n], out[:, n:]
        if not attn.context_pre_only:
            eout = attn.to_add_out(eout)
        return attn.to_out[1](attn.to_out[0](out)), eout


class RefFlux:
    """FluxAttnProcessor math (text first); the edit runs after (default) or before RoPE."""

    def __init__(
        self,
        edit: Callable[[torch.Tensor, int], torch.Tensor],
        n_img: int,
        before_rope: bool = False,
    ) -> None:
        self.edit, self.n_img, self.before_rope = edit, n_img, before_rope

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Any = None,
        attention_mask: Any = None,
        image_rotary_emb: Any = None,
    ) -> Any:
        q, k, v, eq, ek, ev = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        q, k, v = (x.unflatten(-1, (-1, attn.head_dim)) for x in (q, k, v))
        q, k = attn.norm_q(q), attn.norm_k(k)
        if attn.added_kv_proj_dim is not None:
            eq, ek, ev = (x.unflatten(-1, (-1, attn.head_dim)) for x in (eq, ek, ev))
            eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
            q, k, v = torch.cat([eq, q], 1), torch.cat([ek, k], 1), torch.cat([ev, v], 1)
        start = q.shape[1] - self.n_img
        if self.before_rope:
            q = self.edit(q.transpose(1, 2), start).transpose(1, 2)
        q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
        k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        if not self.before_rope:
            q = self.edit(q.transpose(1, 2), start).transpose(1, 2)
        out = naive_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        out = out.transpose(1, 2).flatten(2, 3)
        if encoder_hidden_states is None:
            return out
        t = encoder_hidden_states.shape[1]
        return attn.to_out[1](attn.to_out[0](out[:, t:])), attn.to_add_out(out[:, :t])


class RefSelf:
    """diffusers AttnProcessor2_0 math for a plain self-attention (PixArt/DiT attn1)."""

    def __init__(self, edit: Callable[[torch.Tensor, int], torch.Tensor]) -> None:
        self.edit = edit

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Any = None,
        attention_mask: Any = None,
        temb: Any = None,
        **_: Any,
    ) -> torch.Tensor:
        assert encoder_hidden_states is None
        assert attention_mask is None
        b = hidden_states.shape[0]

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(b, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        q, k, v = (heads(f(hidden_states)) for f in (attn.to_q, attn.to_k, attn.to_v))
        out = naive_attention(self.edit(q, 0), k, v).transpose(1, 2).flatten(2)
        return attn.to_out[1](attn.to_out[0](out))


class RefCog:
    """CogVideoXAttnProcessor2_0 math (text first, no RoPE in this config)."""

    def __init__(self, edit: Callable[[torch.Tensor, int], torch.Tensor]) -> None:
        self.edit = edit

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: Any = None,
        image_rotary_emb: Any = None,
    ) -> Any:
        assert attention_mask is None
        assert image_rotary_emb is None
        t = encoder_hidden_states.shape[1]
        x = torch.cat([encoder_hidden_states, hidden_states], 1)
        b = x.shape[0]

        def heads(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, -1, attn.heads, y.shape[-1] // attn.heads).transpose(1, 2)

        q, k, v = (heads(f(x)) for f in (attn.to_q, attn.to_k, attn.to_v))
        q, k = attn.norm_q(q), attn.norm_k(k)
        out = naive_attention(self.edit(q, t), k, v).transpose(1, 2).flatten(2)
        out = attn.to_out[1](attn.to_out[0](out))
        return out[:, t:], out[:, :t]


class RefLTX:
    """LTXVideoAttnProcessor math; the edit runs after (default) or before RoPE."""

    def __init__(
        self, edit: Callable[[torch.Tensor, int], torch.Tensor], before_rope: bool = False
    ) -> None:
        self.edit, self.before_rope = edit, before_rope

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Any = None,
        attention_mask: Any = None,
        image_rotary_emb: Any = None,
    ) -> torch.Tensor:
        assert encoder_hidden_states is None
        assert attention_mask is None
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        q, k = attn.norm_q(q), attn.norm_k(k)

        def heads(x: torch.Tensor) -> torch.Tensor:  # (B, heads, N, d)
            return x.unflatten(2, (attn.heads, -1)).transpose(1, 2)

        if self.before_rope:
            q = self.edit(heads(q), 0).transpose(1, 2).flatten(2)
        q = transformer_ltx.apply_rotary_emb(q, image_rotary_emb)
        k = transformer_ltx.apply_rotary_emb(k, image_rotary_emb)
        q = heads(q) if self.before_rope else self.edit(heads(q), 0)
        out = naive_attention(q, heads(k), heads(v)).transpose(1, 2).flatten(2)
        return attn.to_out[1](attn.to_out[0](out))


def reference_model(
    family: str,
    model: torch.nn.Module,
    layers: tuple[str, ...],
    edit: Callable[[torch.Tensor, int], torch.Tensor],
    n_img: int,
    before_rope: bool = False,
) -> torch.nn.Module:
    """A copy of ``model`` whose ``layers`` run the hand-written reference processors.

    ``before_rope``: the edit acts before RoPE (Flux, LTX) or before the QK-norm (SD3).
    """
    ref = copy.deepcopy(model)
    modules = dict(ref.named_modules())
    for name in layers:
        if family == "sd3":
            proc: Any = RefJoint(edit, before_norm=before_rope)
        elif family == "flux":
            proc = RefFlux(edit, n_img, before_rope)
        elif family in ("pixart", "dit"):
            proc = RefSelf(edit)
        elif family == "ltx":
            proc = RefLTX(edit, before_rope)
        elif family == "cogvideox":
            proc = RefCog(edit)
        else:
            raise AssertionError(family)
        modules[name].set_processor(proc)
    return ref


def grid3(size: tuple[int, ...]) -> tuple[int, int, int]:
    return (1, *size) if len(size) == 2 else size  # type: ignore[return-value]


# -------------------------------------------------------------- capture of SDPA queries
class CaptureQueries(TorchFunctionMode):
    """Records the query of every SDPA call, tagged with the attention module that made it.

    Entered outside the model call, it sits *below* smoothguide's interception,
    so it sees the query that really enters the attention (after any blur).
    """

    def __init__(self, model: torch.nn.Module, names: tuple[str, ...]) -> None:
        super().__init__()
        self.queries: dict[str, torch.Tensor] = {}  # last call per module
        self.calls: dict[str, list[tuple[torch.Tensor, int]]] = {}  # every call: (q, key tokens)
        self.current: list[str] = []
        self.handles = []
        modules = dict(model.named_modules())
        for name in names:
            self.handles.append(modules[name].register_forward_pre_hook(self._enter(name)))
            self.handles.append(modules[name].register_forward_hook(self._exit))

    def _enter(self, name: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: Any) -> None:
            self.current.append(name)

        return hook

    def _exit(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        self.current.pop()

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention and self.current:
            q = args[0] if args else kwargs["query"]
            k = args[1] if len(args) > 1 else kwargs["key"]
            self.queries[self.current[-1]] = q.detach().clone()
            self.calls.setdefault(self.current[-1], []).append((q.detach().clone(), k.shape[-2]))
        return func(*args, **kwargs)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class _Stop(Exception):
    pass


@contextmanager
def capture(
    model: torch.nn.Module, names: tuple[str, ...], *, stop: bool = False
) -> Iterator[CaptureQueries]:
    """Capture the queries of ``names``; ``stop=True`` ends the forward after the last of them."""
    mode = CaptureQueries(model, names)
    if stop:

        def halt(module: torch.nn.Module, args: Any, output: Any) -> None:
            raise _Stop

        mode.handles.append(dict(model.named_modules())[names[-1]].register_forward_hook(halt))
    try:
        with mode:
            yield mode
    except _Stop:
        pass
    finally:
        mode.remove()


# ============================================================================ tests
def test_families_layers_presets_and_defaults(models: dict[str, torch.nn.Module]) -> None:
    p = patcher_for(models["sd3"])
    assert p.layers == (
        "transformer_blocks.0.attn",
        "transformer_blocks.0.attn2",
        "transformer_blocks.1.attn",
        "transformer_blocks.2.attn",
    )
    assert p.default == ("transformer_blocks.1.attn",)
    assert p.resolve("dual") == ("transformer_blocks.0.attn2",)
    p = patcher_for(models["flux"])
    assert p.default == ("transformer_blocks.0.attn", "transformer_blocks.1.attn")
    assert p.resolve("single.1") == ("single_transformer_blocks.1.attn",)
    assert patcher_for(models["pixart"]).default == ("transformer_blocks.1.attn1",)
    assert patcher_for(models["ltx"]).default == ("transformer_blocks.1.attn1",)
    assert patcher_for(models["wan"]).layers == ("blocks.0.attn1", "blocks.1.attn1")
    with pytest.raises(ValueError, match="available layers"):
        patcher_for(models["sd3"]).resolve("double.mid")


def test_presets_at_real_depths() -> None:
    """SD3.5 Medium (24 blocks), SD3.5 Large (38), FLUX.1 (19 double + 38 single), PixArt (28)."""
    with torch.device("meta"):
        sd35m = diffusers.SD3Transformer2DModel(
            num_layers=24,
            attention_head_dim=8,
            num_attention_heads=1,
            joint_attention_dim=8,
            caption_projection_dim=8,
            pooled_projection_dim=8,
            dual_attention_layers=tuple(range(13)),
        )
        sd35l = diffusers.SD3Transformer2DModel(
            num_layers=38,
            attention_head_dim=8,
            num_attention_heads=1,
            joint_attention_dim=8,
            caption_projection_dim=8,
            pooled_projection_dim=8,
        )
        flux = diffusers.FluxTransformer2DModel(
            num_layers=19,
            num_single_layers=38,
            attention_head_dim=16,
            num_attention_heads=1,
            joint_attention_dim=8,
            pooled_projection_dim=8,
            axes_dims_rope=[4, 4, 8],
        )
    block = [int(n.split(".")[1]) for n in patcher_for(sd35m).default]
    assert block == list(range(8, 16))
    assert len(patcher_for(sd35m).resolve("dual")) == 13
    assert [int(n.split(".")[1]) for n in patcher_for(sd35l).default] == list(range(12, 26))
    pf = patcher_for(flux)
    assert [int(n.split(".")[1]) for n in pf.default] == list(range(6, 13))
    assert [int(n.split(".")[1]) for n in pf.resolve("single.mid")] == list(range(12, 26))
    assert all(n.startswith("single_") for n in pf.resolve("single"))


@pytest.mark.parametrize("family", list(MAKERS))
def test_sigma_zero_is_the_plain_model(models: dict[str, torch.nn.Module], family: str) -> None:
    model = models[family]
    kw = inputs(family, model, 2, SIZES[family])
    plain = run(model, kw)
    p = patcher_for(model)
    for sigma in (0.0, (0.0, 0.0), (0.0, 0.0, 0.0)):
        with p.perturb(QuerySmoothing(sigma, layers=p.layers), rows=[1]):
            assert torch.equal(run(model, kw), plain)


@pytest.mark.parametrize("family", ["sd3", "flux", "pixart", "dit", "ltx", "cogvideox"])
def test_sigma_inf_equals_mean_query_reference(
    models: dict[str, torch.nn.Module], family: str
) -> None:
    model = models[family]
    size = SIZES[family]
    kw = inputs(family, model, 3, size)
    plain = run(model, kw)
    p = patcher_for(model)
    layers = p.layers
    n_img = math.prod(size)
    # the hand-written reference without an edit reproduces the model
    unedited = run(reference_model(family, model, layers, no_edit, n_img), kw)
    assert_close(unedited, plain)
    ref = run(reference_model(family, model, layers, Edit([1], grid3(size), INF), n_img), kw)
    with p.perturb(QuerySmoothing(INF, layers=layers), rows=[1]):
        seg = run(model, kw)
    err = assert_close(seg, ref)
    assert torch.equal(seg[0], plain[0])  # other rows: bit for bit
    assert torch.equal(seg[2], plain[2])
    assert_differs(seg[1], plain[1], err)  # the perturbation really acts


@pytest.mark.parametrize("family", ["flux", "ltx", "sd3"])
def test_blur_acts_after_rope_not_before(models: dict[str, torch.nn.Module], family: str) -> None:
    """Prop. 3.1 needs the query of the logits: the blur must follow QK-norm and RoPE.

    Flux / LTX: a blur before RoPE differs; SD3.5 (QK RMS-norm, no RoPE): one before the norm.
    """
    model = models[family]
    size = SIZES[family]
    kw = inputs(family, model, 2, size)
    p = patcher_for(model)
    sigma = (0.0, 1.0, 1.5) if family == "ltx" else (1.0, 1.5)
    edit = Edit([1], grid3(size), sigma)
    n_img = math.prod(size)
    after = run(reference_model(family, model, p.layers, edit, n_img), kw)
    before = run(reference_model(family, model, p.layers, edit, n_img, before_rope=True), kw)
    with p.perturb(QuerySmoothing(sigma, layers=p.layers), rows=[1]):
        seg = run(model, kw)
    err = assert_close(seg, after)
    assert_differs(seg[1], before[1], err)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_text_queries_untouched_image_queries_blurred_on_grid(
    models: dict[str, torch.nn.Module], family: str
) -> None:
    model = models[family]
    h, w = SIZES[family]
    kw = inputs(family, model, 3, (h, w))
    p = patcher_for(model)
    layer = p.default[0]
    n = h * w
    img = slice(0, n) if family == "sd3" else slice(-n, None)
    txt = slice(n, None) if family == "sd3" else slice(0, -n)
    sigma = (1.0, 2.0)
    with torch.no_grad(), capture(model, (layer,)) as plain:
        model(**kw)
    with (
        torch.no_grad(),
        p.perturb(QuerySmoothing(sigma, layers=layer), rows=[2]),
        capture(model, (layer,)) as seg,
    ):
        model(**kw)
    q0, q1 = plain.queries[layer], seg.queries[layer]  # (B, heads, N, d)
    assert torch.equal(q1[..., txt, :], q0[..., txt, :])  # text queries, every row
    assert torch.equal(q1[:2], q0[:2])  # unperturbed rows
    heads, d = q0.shape[1], q0.shape[-1]
    raw = q0[2, :, img].double().numpy().reshape(heads, 1, h, w, d)
    want = reference_blur(raw, (0.0, *sigma)).reshape(heads, n, d)
    close_scaled(q1[2, :, img], want, eps=EPS32, ops=64, magnitude=raw)
    wrong = reference_blur(q0[2, :, img].double().numpy().reshape(heads, 1, w, h, d), (0.0, *sigma))
    assert np.abs(q1[2, :, img].double().numpy() - wrong.reshape(heads, n, d)).max() > 1e-2


@pytest.mark.parametrize(
    ("family", "latent", "grid", "wrong"),
    [
        ("sd3", (64, 128), (32, 64), (64, 32)),
        ("sd3", (96, 64), (48, 32), (32, 48)),
        ("sd3", (32, 128), (16, 64), (32, 32)),  # 1024 tokens: a square guess would be 32 x 32
        ("flux", (64, 128), (32, 64), (64, 32)),
        ("flux", (96, 64), (48, 32), (32, 48)),
        ("flux", (32, 128), (16, 64), (32, 32)),
    ],
)
def test_non_square_latents_use_their_grid(
    models: dict[str, torch.nn.Module],
    family: str,
    latent: tuple[int, int],
    grid: tuple[int, int],
    wrong: tuple[int, int],
) -> None:
    """Latent H x W (SD3: patch 2; Flux: 2x2 packing) -> token grid; other grids give other q."""
    model = models[family]
    h, w = grid
    kw = inputs(family, model, 1, grid)
    if family == "sd3":
        assert kw["hidden_states"].shape[-2:] == latent
    else:  # pack a (1, 1, H, W) latent and make its ids with FluxPipeline's own helpers
        x = torch.randn(1, 1, *latent, generator=_seed(2))
        pack = diffusers.FluxPipeline._pack_latents
        kw["hidden_states"] = pack(x, 1, 1, *latent)
        ids = diffusers.FluxPipeline._prepare_latent_image_ids
        kw["img_ids"] = ids(1, latent[0] // 2, latent[1] // 2, torch.device("cpu"), torch.float32)
    p = patcher_for(model)
    layer = p.layers[0]
    sigma = 3.0
    with torch.no_grad(), capture(model, (layer,), stop=True) as plain:
        model(**kw)
    with (
        torch.no_grad(),
        p.perturb(QuerySmoothing(sigma, layers=layer), rows=[0]),
        capture(model, (layer,), stop=True) as seg,
    ):
        model(**kw)
    n = h * w
    img = slice(0, n) if family == "sd3" else slice(-n, None)
    q0, q1 = (
        plain.queries[layer][0, :, img].double().numpy(),
        seg.queries[layer][0, :, img].double().numpy(),
    )
    heads, d = q0.shape[0], q0.shape[-1]

    def blurred(shape: tuple[int, int]) -> np.ndarray:
        return reference_blur(q0.reshape(heads, 1, *shape, d), (0.0, sigma, sigma)).reshape(
            heads, n, d
        )

    close_scaled(q1, blurred(grid), eps=EPS32, ops=64, magnitude=q0)
    assert np.abs(q1 - blurred(wrong)).max() > 1e-2


@pytest.mark.parametrize("family", ["ltx", "wan", "cogvideox"])
def test_video_spatial_per_frame_and_temporal_blur(
    models: dict[str, torch.nn.Module], family: str
) -> None:
    model = models[family]
    f, h, w = SIZES[family]
    kw = inputs(family, model, 2, (f, h, w))
    p = patcher_for(model)
    layer = p.layers[0]
    with torch.no_grad(), capture(model, (layer,)) as plain:
        model(**kw)
    q0 = plain.queries[layer]
    # SDPA sees (B, heads, N, d); CogVideoX's text tokens come first, the video tokens last
    n = f * h * w
    raw = q0[1, :, -n:].double().numpy()
    heads, _, d = raw.shape
    for sigma in (INF, (INF, INF, INF), (1.0, 0.0, 0.0), (0.7, 1.0, 2.0)):
        with (
            torch.no_grad(),
            p.perturb(QuerySmoothing(sigma, layers=layer), rows=[1]),
            capture(model, (layer,)) as seg,
        ):
            model(**kw)
        q1 = seg.queries[layer]
        assert torch.equal(q1[0], q0[0])
        assert torch.equal(q1[1, :, :-n], q0[1, :, :-n])  # text queries (CogVideoX)
        want = reference_blur(raw.reshape(heads, f, h, w, d), sigma3(sigma)).reshape(heads, n, d)
        close_scaled(q1[1, :, -n:], want, eps=EPS32, ops=64, magnitude=raw)
        if sigma == INF:  # spatial blur only: frames keep distinct mean queries
            frame_means = want.reshape(heads, f, h * w, d)[:, :, 0]
            assert np.abs(frame_means[:, 0] - frame_means[:, 1]).max() > 1e-3


@pytest.mark.parametrize("family", list(MAKERS))
def test_model_restored_after_exit_and_exception(
    models: dict[str, torch.nn.Module], family: str
) -> None:
    model = models[family]
    kw = inputs(family, model, 2, SIZES[family])
    plain = run(model, kw)

    def processors_of() -> dict[str, Any]:
        return {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}

    processors = processors_of()
    assert processors
    p = patcher_for(model)

    def hooks() -> int:
        return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())

    before = hooks()
    with p.perturb(QuerySmoothing(INF, layers=p.layers), rows=[0]):
        assert not torch.equal(run(model, kw), plain)

    def fail_inside() -> None:
        with p.perturb(QuerySmoothing(2.0), rows=[1]):
            run(model, kw)
            raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        fail_inside()
    assert hooks() == before
    after = processors_of()
    assert after.keys() == processors.keys()
    assert all(after[k] is processors[k] for k in processors)
    assert torch.equal(run(model, kw), plain)


def test_error_inside_forward_restores_and_names_the_input(
    models: dict[str, torch.nn.Module],
) -> None:
    model = models["ltx"]
    kw = inputs("ltx", model, 1, SIZES["ltx"])
    plain = run(model, kw)
    p = patcher_for(model)
    grid = torch.meshgrid(
        *(torch.arange(n, dtype=torch.float32) for n in SIZES["ltx"]), indexing="ij"
    )
    coords = torch.stack(grid).flatten(1)[None]  # (B, 3, N): frame, row, column
    bad = {**kw, "num_frames": None, "height": None, "width": None, "video_coords": coords}
    with (
        pytest.raises(ValueError, match="num_frames, height and width"),
        p.perturb(QuerySmoothing(1.0), rows=[0]),
    ):
        run(model, bad)
    assert torch.equal(run(model, kw), plain)


def test_flux_grid_from_ids_checks_the_layout() -> None:
    ids = flux_ids(3, 5)
    assert flux_grid_from_ids(ids, 15) == (3, 5)
    assert flux_grid_from_ids(ids[None], 15) == (3, 5)
    with pytest.raises(ValueError, match="row-major grid"):
        flux_grid_from_ids(ids[torch.randperm(15, generator=_seed(3))], 15)
    with pytest.raises(ValueError, match="row-major grid"):  # reference-image tokens appended
        flux_grid_from_ids(torch.cat([ids, ids[:4] + torch.tensor([1.0, 0.0, 5.0])]), 19)
    with pytest.raises(ValueError, match="shape"):
        flux_grid_from_ids(ids, 16)


def test_video_tokens_layout_checks_token_count() -> None:
    g = Geometry(batch=1, height=4, width=6, frames=3, tokens=24)
    assert VideoTokens().grid(72, g).shape == (3, 4, 6)
    with pytest.raises(ValueError, match="3 frames x 24 tokens"):
        VideoTokens().grid(71, g)


def test_sd3_ip_adapter_processor_keeps_running_and_its_image_attention_is_not_blurred(
    models: dict[str, torch.nn.Module],
) -> None:
    """SD3's IP-Adapter processor runs a second attention (image queries vs image + IP keys).

    SEG blurs the joint self-attention call only; the IP call, the processor object and
    the IP contribution stay as they are.
    """
    model = copy.deepcopy(models["sd3"])
    layer = "transformer_blocks.1.attn"
    _seed(4)
    ip = diffusers.models.attention_processor.SD3IPAdapterJointAttnProcessor2_0(
        hidden_size=16, ip_hidden_states_dim=8, head_dim=8, timesteps_emb_dim=16, scale=0.5
    )
    _randomize(ip)
    dict(model.named_modules())[layer].set_processor(ip)
    h, w = SIZES["sd3"]
    kw = inputs("sd3", model, 2, (h, w))
    g = _seed(5)
    kw["joint_attention_kwargs"] = {
        "ip_hidden_states": torch.randn(2, 4, 8, generator=g),
        "temb": torch.randn(2, 16, generator=g),
    }
    p = patcher_for(model)
    with torch.no_grad(), capture(model, (layer,), stop=True) as plain:
        model(**kw)
    with (
        torch.no_grad(),
        p.perturb(QuerySmoothing(INF, layers=layer), rows=[1]),
        capture(model, (layer,), stop=True) as seg,
    ):
        model(**kw)
    assert dict(model.named_modules())[layer].processor is ip
    (q_joint, k_joint), (q_ip, k_ip) = plain.calls[layer]
    (s_joint, _), (s_ip, _) = seg.calls[layer]
    n = h * w
    assert k_joint == q_joint.shape[-2] == n + 5  # joint: image + text keys
    assert k_ip == n + 4  # IP call: image + IP-image keys for n image queries
    assert torch.equal(s_ip, q_ip)  # the IP attention's queries are not blurred
    assert torch.equal(s_joint[0], q_joint[0])
    mean = q_joint[1, :, :n].mean(dim=-2, keepdim=True).expand(-1, n, -1)
    close_scaled(s_joint[1, :, :n], mean, ops=64, magnitude=q_joint[1, :, :n])
    assert torch.equal(s_joint[1, :, n:], q_joint[1, :, n:])
