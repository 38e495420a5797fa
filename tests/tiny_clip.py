"""Offline test helpers: a tiny random CLIP folder, random LPIPS weight files, a prompt model.

Nothing is downloaded: the CLIP is built from a config with random weights and a
letter-level tokenizer (every lowercase letter is a token, no BPE merges), then saved
with ``save_pretrained`` exactly as a user saves the real one.
"""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path
from typing import Any

from toy_study_model import ToyModel

#: Positions of the tiny text model (prompts are truncated to this many tokens).
MAX_TOKENS = 32


def tiny_tokenizer() -> Any:
    """A CLIP tokenizer whose vocabulary is the 26 letters, alone and word-final."""
    import transformers

    words = list(string.ascii_lowercase)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for w in words + [w + "</w>" for w in words]:
        vocab[w] = len(vocab)
    try:  # transformers >= 5 takes the vocabulary itself
        return transformers.CLIPTokenizer(vocab=vocab, merges=[], model_max_length=MAX_TOKENS)
    except TypeError:  # transformers 4.x reads vocab.json and merges.txt
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
            (Path(tmp) / "merges.txt").write_text("#version: 0.2\n")
            return transformers.CLIPTokenizer(
                str(Path(tmp) / "vocab.json"),
                str(Path(tmp) / "merges.txt"),
                model_max_length=MAX_TOKENS,
            )


def save_tiny_clip(path: Path, *, seed: int = 0, image_size: int = 16) -> Path:
    """Save a random tiny ``CLIPModel`` + ``CLIPProcessor`` to ``path``; return ``path``."""
    import torch
    import transformers

    tok = tiny_tokenizer()
    config = transformers.CLIPConfig(
        text_config=dict(
            vocab_size=len(tok.get_vocab()),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=MAX_TOKENS,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=8,
        ),
        projection_dim=8,
    )
    torch.manual_seed(seed)
    model = transformers.CLIPModel(config).eval()
    image_proc = transformers.CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path))
    transformers.CLIPProcessor(image_processor=image_proc, tokenizer=tok).save_pretrained(str(path))
    return path


def save_random_lpips(folder: Path, net: str = "alex", *, seed: int = 0) -> tuple[Path, Path]:
    """Random backbone (torchvision's key layout) and non-negative linear layers for LPIPS.

    Returns ``(backbone.pth, linear.pth)``.
    """
    import torch

    from smoothguide.study.lpips import lpips_backbone

    g = torch.Generator().manual_seed(seed)
    feats = lpips_backbone(net)
    sd: dict[str, Any] = {}
    for k, v in feats.state_dict().items():
        fan_in = v[0].numel() if v.ndim > 1 else 1
        sd[f"features.{k}"] = torch.randn(v.shape, generator=g) / fan_in**0.5
    sd["classifier.1.weight"] = torch.zeros(2, 2)  # torchvision's file has these too
    chans = [m.out_channels for m in feats if isinstance(m, torch.nn.Conv2d)]
    taps = {"alex": (0, 1, 2, 3, 4), "vgg": (1, 3, 6, 9, 12)}[net]
    lin = {
        f"lin{i}.model.1.weight": torch.rand(1, chans[j], 1, 1, generator=g)
        for i, j in enumerate(taps)
    }
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(sd, folder / "backbone.pth")
    torch.save(lin, folder / f"{net}.pth")
    return folder / "backbone.pth", folder / f"{net}.pth"


class PromptModel(ToyModel):
    """A text-conditional toy: RGB ``tanh(noise · w)`` (unguided ``w = 1``), 16x16, no network."""

    noise_shape = (3, 16, 16)


prompt_factory = PromptModel
