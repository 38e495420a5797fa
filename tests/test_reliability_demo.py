"""Reliability of the embedded demo model: safe, checked weight loading and deterministic sampling.

Weights are safetensors plus a JSON config (never pickle). Every way a weights
directory can be damaged (truncated, flipped bytes, a pickle in disguise, wrong
shapes, a broken config) must give a clear :class:`WeightsError`, and the same
seed must give bit-identical samples on CPU, also in a fresh interpreter.
These tests build a tiny weights directory of their own, so they do not depend
on the shipped weights; the shipped model is checked too when it is present.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from reliability_table import failure_mode
from smoothguide.demo.guide import guided_sample
from smoothguide.demo.model import ClassifierConfig, DemoClassifier, DemoDiT, DiTConfig
from smoothguide.demo.weights import (
    CLASSIFIER_FILE,
    CONFIG_FILE,
    DIT_FILE,
    WeightsError,
    file_sha256,
    load_classifier,
    load_denoiser,
    load_tensors,
    save_tensors,
)
from smoothguide.rules import CFG, SEG, Compose

TINY = DiTConfig(hidden=16, depth=3, heads=2)
SMALL_CLF = ClassifierConfig(width=4, features=8)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_weights(d: Path, seed: int = 0) -> Path:
    """A complete tiny weights directory (random, non-zero DiT weights) in the shipped format."""
    d.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    dit = DemoDiT(TINY)
    with torch.no_grad():
        for p in dit.parameters():
            p.normal_(0.0, 0.3)
    clf = DemoClassifier(SMALL_CLF)
    config = {
        "dit": TINY.to_dict(),
        "classifier": SMALL_CLF.to_dict(),
        "files": {
            DIT_FILE: {"sha256": save_tensors(dit.state_dict(), str(d / DIT_FILE))},
            CLASSIFIER_FILE: {"sha256": save_tensors(clf.state_dict(), str(d / CLASSIFIER_FILE))},
        },
    }
    (d / CONFIG_FILE).write_text(json.dumps(config))
    return d


def rehash(d: Path) -> None:
    """Record the current file hashes in the config (a damaged file whose hash was updated)."""
    cfg = json.loads((d / CONFIG_FILE).read_text())
    for name in (DIT_FILE, CLASSIFIER_FILE):
        cfg["files"][name]["sha256"] = file_sha256(str(d / name))
    (d / CONFIG_FILE).write_text(json.dumps(cfg))


def truncate(n: int) -> Callable[[Path], None]:
    def damage(d: Path) -> None:
        f = d / DIT_FILE
        f.write_bytes(f.read_bytes()[:n])

    return damage


def flip_byte(where: str) -> Callable[[Path], None]:
    def damage(d: Path) -> None:
        f = d / DIT_FILE
        data = bytearray(f.read_bytes())
        header = int.from_bytes(data[:8], "little")
        i = 8 + header // 2 if where == "header" else len(data) - 5
        data[i] ^= 0x5A
        f.write_bytes(bytes(data))

    return damage


def huge_header(d: Path) -> None:
    f = d / DIT_FILE
    data = f.read_bytes()
    f.write_bytes((2**62).to_bytes(8, "little") + data[8:])


def wrong_shapes(d: Path) -> None:
    other = DemoDiT(DiTConfig(hidden=32, depth=3, heads=2))
    save_tensors(other.state_dict(), str(d / DIT_FILE))


def missing_tensor(d: Path) -> None:
    tensors = load_tensors(str(d / DIT_FILE))
    tensors.pop(sorted(tensors)[0])
    save_tensors(tensors, str(d / DIT_FILE))


DAMAGE = {
    "empty file": truncate(0),
    "7 bytes (no header length)": truncate(7),
    "header only": truncate(200),
    "truncated in the tensor data": truncate(-100),
    "flipped byte in the tensor data": flip_byte("data"),
    "flipped byte in the JSON header": flip_byte("header"),
    "header length 2**62": huge_header,
}


@failure_mode(
    "a damaged DiT weight file: empty, 7 bytes, header only, truncated data, a flipped byte in "
    "the data or in the JSON header, a header length of 2**62",
    "WeightsError: SHA-256 mismatch naming the file and the fix (reinstall / retrain); the same "
    "file with its hash re-recorded: WeightsError from the safetensors parser (no huge "
    "allocation, no crash), or naming config.json when a damaged name still parses",
)
@pytest.mark.parametrize("damage", list(DAMAGE), ids=list(DAMAGE))
def test_damaged_weight_file_gives_a_clear_error(tmp_path: Path, damage: str) -> None:
    d = write_weights(tmp_path / "w")
    DAMAGE[damage](d)
    with pytest.raises(WeightsError, match=r"dit\.safetensors is corrupted or was replaced"):
        load_denoiser(str(d))
    rehash(d)
    if damage == "flipped byte in the tensor data":
        load_denoiser(str(d))  # valid safetensors with other numbers: only the hash can tell
        return
    # A header byte may also turn a tensor name into another valid name: then the model check.
    bad = r"dit\.safetensors (is not a valid safetensors|does not match the model in config)"
    with pytest.raises(WeightsError, match=bad):
        load_denoiser(str(d))


@failure_mode(
    "a well-formed safetensors file that does not fit the configured model (other shapes, a "
    "tensor missing), its hash recorded",
    "WeightsError naming the file and config.json ('does not match the model')",
)
@pytest.mark.parametrize("damage", [wrong_shapes, missing_tensor], ids=["shapes", "missing"])
def test_weights_that_do_not_fit_the_config(tmp_path: Path, damage: Any) -> None:
    d = write_weights(tmp_path / "w")
    damage(d)
    rehash(d)
    with pytest.raises(WeightsError, match=r"does not match the model in config\.json"):
        load_denoiser(str(d))


class _Payload:
    """Unpickling this creates ``marker``: proof that a loader ran pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


@failure_mode(
    "a pickle (torch.save-style payload that runs code when unpickled) saved as "
    "dit.safetensors, its hash recorded in the config",
    "WeightsError from the safetensors parser; the payload never runs (no pickle anywhere)",
)
def test_pickle_disguised_as_weights_is_never_unpickled(tmp_path: Path) -> None:
    d = write_weights(tmp_path / "w")
    marker = tmp_path / "pwned"
    (d / DIT_FILE).write_bytes(pickle.dumps(_Payload(marker)))
    rehash(d)
    with pytest.raises(WeightsError, match="not a valid safetensors"):
        load_denoiser(str(d))
    assert not marker.exists()
    pickle.loads((d / DIT_FILE).read_bytes())  # the payload is live: unpickling would run it
    assert marker.exists()


@failure_mode(
    "a broken config.json: missing, not JSON, without the 'files' entry of the DiT, without "
    "its sha256, with an unknown model field",
    "WeightsError naming config.json and what is missing or wrong",
)
@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda cfg: None, "no demo weights"),
        (lambda cfg: "{not json", "not valid JSON"),
        (lambda cfg: {k: v for k, v in cfg.items() if k != "files"}, "lacks the 'files' entry"),
        (lambda cfg: {**cfg, "files": {}}, "dit.safetensors"),
        (lambda cfg: {**cfg, "files": {DIT_FILE: {}}}, "sha256"),
        (lambda cfg: {**cfg, "dit": {**cfg["dit"], "depth_typo": 3}}, "depth_typo"),
    ],
    ids=["missing", "not-json", "no-files", "no-dit-entry", "no-sha256", "unknown-field"],
)
def test_broken_config_is_a_weights_error(tmp_path: Path, edit: Any, message: str) -> None:
    d = write_weights(tmp_path / "w")
    cfg = json.loads((d / CONFIG_FILE).read_text())
    new = edit(cfg)
    if new is None:
        (d / CONFIG_FILE).unlink()
    else:
        (d / CONFIG_FILE).write_text(new if isinstance(new, str) else json.dumps(new))
    with pytest.raises(WeightsError, match=message):
        load_denoiser(str(d))


def test_intact_tiny_weights_load_and_are_eval_mode(tmp_path: Path) -> None:
    d = write_weights(tmp_path / "w")
    den = load_denoiser(str(d))
    assert not den.training
    assert all(not p.requires_grad for p in den.parameters())
    assert load_classifier(str(d)).config == SMALL_CLF


# -- determinism -----------------------------------------------------------------------------

_SCRIPT = """
import hashlib, sys, torch
torch.set_num_threads(1)
from smoothguide.demo.guide import guided_sample
from smoothguide.demo.weights import load_denoiser
from smoothguide.rules import CFG, SEG, Compose
den = load_denoiser(sys.argv[1])
noise = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(7))
rule = Compose(CFG(2.0), SEG(2.0, sigma=1.5))
out = guided_sample(den, rule, labels=[1, 4, 10], noise=noise, steps=4)
print(hashlib.sha256(out.numpy().tobytes()).hexdigest())
"""


def sample_digest(den: Any) -> str:
    noise = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(7))
    rule = Compose(CFG(2.0), SEG(2.0, sigma=1.5))
    out = guided_sample(den, rule, labels=[1, 4, 10], noise=noise, steps=4)
    assert torch.isfinite(out).all()
    return hashlib.sha256(out.numpy().tobytes()).hexdigest()


@failure_mode(
    "the same seed twice for the demo DiT (loaded from safetensors; guided SEG+CFG Euler run): "
    "in one process and in a fresh interpreter",
    "bit-identical samples on CPU (same torch build and thread count); another seed differs",
)
def test_demo_sampling_is_bit_identical_across_runs_and_processes(tmp_path: Path) -> None:
    d = write_weights(tmp_path / "w")
    den = load_denoiser(str(d))
    first = sample_digest(den)
    assert sample_digest(den) == first
    assert sample_digest(load_denoiser(str(d))) == first
    noise = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(8))
    other = guided_sample(den, CFG(2.0), labels=[1, 4, 10], noise=noise, steps=4)
    assert hashlib.sha256(other.numpy().tobytes()).hexdigest() != first
    env = {**os.environ, "PYTHONHASHSEED": "99"}
    res = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(d)], env=env, capture_output=True, text=True, check=True
    )
    assert res.stdout.strip() == first


@failure_mode(
    "the shipped demo weights: two guided runs with the same seed",
    "bit-identical samples on CPU",
)
def test_shipped_model_is_deterministic() -> None:
    den = load_denoiser()
    assert sample_digest(den) == sample_digest(den)
