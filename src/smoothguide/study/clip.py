"""CLIP networks of a study, from local folders only: image features and the CLIP score.

``features = "clip"`` uses the projected image embeddings (:class:`ClipFeatures`);
the ``clip_score`` metric the cosine of image and prompt embeddings
(:class:`ClipScorer`). Folders are ``save_pretrained`` outputs of a ``CLIPModel``
and its processor, loaded with ``local_files_only=True``; a missing or unusable
folder is a :class:`~smoothguide.study.definition.MetricWeightsError` that says how
to save one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from .definition import MetricWeightsError

__all__ = ["ClipScorer"]

CLIP_HOWTO = (
    "On a machine with network save one with `from transformers import CLIPModel, "
    "CLIPProcessor; CLIPModel.from_pretrained('openai/clip-vit-large-patch14')"
    ".save_pretrained(DIR); CLIPProcessor.from_pretrained('openai/clip-vit-large-patch14')"
    ".save_pretrained(DIR)`, copy DIR here"
)
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def clip_folder_problem(path: Any, *, text: bool) -> str | None:
    """What is missing from a local CLIP folder (``None``: it looks complete).

    A light check (no weights are read): ``config.json`` of ``model_type = "clip"``,
    a weights file, the image processor's config and, for ``text``, a tokenizer.
    """
    if not path:
        return "not set"
    p = str(path)
    if not os.path.isdir(p):
        return "no such folder"
    cfg = os.path.join(p, "config.json")
    if not os.path.isfile(cfg):
        return "no config.json in it"
    try:
        with open(cfg, encoding="utf-8") as fh:
            model_type = json.load(fh).get("model_type")
    except (OSError, ValueError) as exc:
        return f"config.json is unreadable ({exc})"
    if model_type != "clip":
        return f"config.json has model_type {model_type!r}, not 'clip' (a CLIPModel)"
    if not any(os.path.isfile(os.path.join(p, f)) for f in _WEIGHT_FILES):
        return f"no weights file in it ({', '.join(_WEIGHT_FILES)})"
    # transformers 4 saves the image processor as preprocessor_config.json, 5 (inside a
    # CLIPProcessor) as processor_config.json
    if not any(
        os.path.isfile(os.path.join(p, f))
        for f in ("preprocessor_config.json", "processor_config.json")
    ):
        return "no preprocessor_config.json / processor_config.json (the image processor) in it"
    has_tok = os.path.isfile(os.path.join(p, "tokenizer.json")) or all(
        os.path.isfile(os.path.join(p, f)) for f in ("vocab.json", "merges.txt")
    )
    if text and not has_tok:
        return "no tokenizer (tokenizer.json, or vocab.json and merges.txt) in it"
    return None


def uint8_rgb(images: Any) -> Any:
    """``[-1, 1]`` images as the uint8 RGB a saved PNG holds (grey repeated to 3 channels)."""
    import torch

    x = ((images.detach().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def _embeds(out: Any) -> Any:
    """The projected embeddings of ``get_image_features`` / ``get_text_features``.

    transformers 4 returns the tensor; transformers 5 a ``BaseModelOutputWithPooling``
    whose ``pooler_output`` holds the projection.
    """
    import torch

    if isinstance(out, torch.Tensor):
        return out
    pooled = getattr(out, "pooler_output", None)
    if isinstance(pooled, torch.Tensor):
        return pooled
    raise TypeError(f"CLIP features: expected a tensor or a pooler_output, got {type(out)}")


def _load_clip(path: str, device: Any, what: str, key: str, *, text: bool) -> tuple[Any, Any]:
    """``(CLIPModel, CLIPProcessor or CLIPImageProcessor)`` of a local folder.

    An unusable folder is a :class:`MetricWeightsError` naming ``what`` and ``key``.
    """
    from transformers import CLIPImageProcessor, CLIPModel, CLIPProcessor

    try:
        model = CLIPModel.from_pretrained(path, local_files_only=True).to(device).eval()
        loader = CLIPProcessor if text else CLIPImageProcessor
        proc = loader.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # a foreign or corrupt folder fails in many ways: say which
        raise MetricWeightsError(
            f"{what}: the CLIP folder {key} = {path!r} cannot be loaded offline "
            f"({type(exc).__name__}: {exc}). {CLIP_HOWTO} and set {key} = 'DIR'"
        ) from None
    return model, proc


class ClipFeatures:
    """Projected CLIP image embeddings of the ``CLIPModel`` folder ``feature_options.model``."""

    def __init__(self, options: Mapping[str, Any], device: Any) -> None:
        self.model, self.proc = _load_clip(
            str(options["model"]), device, "features = 'clip'", "feature_options.model", text=False
        )
        self.device = device

    def __call__(self, images: Any) -> tuple[Any, None]:
        import torch

        inputs = self.proc(images=list(uint8_rgb(images)), return_tensors="pt")
        with torch.no_grad():
            out = self.model.get_image_features(pixel_values=inputs["pixel_values"].to(self.device))
        return _embeds(out).float().cpu(), None


class ClipScorer:
    """CLIP score of images with their prompts: ``100 · max(cos(E_I, E_C), 0)`` per image.

    ``E_I`` and ``E_C`` are the projected CLIP embeddings of the image and the caption
    (Hessel et al. 2021, "CLIPScore", Eq. 1 with weight 100 as in torchmetrics'
    ``clip_score``). Images in ``[-1, 1]`` are quantised to uint8 RGB (what a saved
    PNG holds) and go through the folder's ``CLIPImageProcessor``; captions through
    its tokenizer, truncated to the text model's positions (77 for OpenAI CLIP).
    The cosine is taken in float64. torchmetrics clamps the *mean* at 0 instead of
    each sample; the two agree whenever every cosine is ≥ 0, as with trained CLIPs.

    Parameters
    ----------
    model
        A local ``CLIPModel`` folder (``save_pretrained`` of the model and its
        ``CLIPProcessor``); loaded with ``local_files_only=True``.
    device
        Torch device.

    Examples
    --------
    A folder is needed (``tests/tiny_clip.py`` builds a random tiny one)::

        scorer = ClipScorer("/models/clip-vit-large-patch14", "cuda")
        scorer(images, ["a photo of a cat", ...])  # float64 tensor (n,)
    """

    def __init__(self, model: str, device: Any) -> None:
        key = "[metric_options.clip_score] model"
        self.model, self.proc = _load_clip(str(model), device, "metrics clip_score", key, text=True)
        self.device = device
        self.max_len = int(self.model.config.text_config.max_position_embeddings)

    def image_embeds(self, images: Any) -> Any:
        """Projected image embeddings ``(n, d)`` (float32) of images in ``[-1, 1]``."""
        import torch

        inputs = self.proc.image_processor(images=list(uint8_rgb(images)), return_tensors="pt")
        with torch.no_grad():
            out = self.model.get_image_features(pixel_values=inputs["pixel_values"].to(self.device))
        return _embeds(out).float().cpu()

    def text_embeds(self, prompts: Sequence[str]) -> Any:
        """Projected text embeddings ``(n, d)`` (float32) of the prompts."""
        import torch

        tok = self.proc.tokenizer(
            [str(p) for p in prompts],
            padding=True,
            truncation=True,
            max_length=self.max_len,
            return_tensors="pt",
        )
        with torch.no_grad():
            out = self.model.get_text_features(
                input_ids=tok["input_ids"].to(self.device),
                attention_mask=tok["attention_mask"].to(self.device),
            )
        return _embeds(out).float().cpu()

    def __call__(self, images: Any, prompts: Sequence[str]) -> Any:
        """Per-image CLIP score, float64 ``(n,)``."""
        if len(prompts) != images.shape[0]:
            raise ValueError(
                f"prompts: {len(prompts)} prompts for {images.shape[0]} images; one each"
            )
        a = self.image_embeds(images).double()
        b = self.text_embeds(prompts).double()
        cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
        return 100 * cos.clamp_min(0.0)
