"""Autoguidance in studies: ``rule = "Autoguidance"`` with a ``weak`` model on the demo DiT."""

from __future__ import annotations

import itertools
import os
import textwrap

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from smoothguide.demo.model import NULL_CLASS  # noqa: E402
from smoothguide.demo.weights import WEIGHTS_DIR, load_denoiser, load_weak_denoiser  # noqa: E402
from smoothguide.study import Store, StudyError, load_study, noise_seed  # noqa: E402
from smoothguide.study.cli import main as study_main  # noqa: E402
from smoothguide.study.runner import run_study  # noqa: E402

STUDY = """
name = "ag"
seed = 4
labels = ["null"]
seeds = 3
unit_size = 3
metrics = ["rms", "ink"]

[sampler]
steps = 3
threads = 1

[[rules]]
rule = "Autoguidance"
scale = 2.5
"""


def _write(tmp_path, text: str) -> str:
    p = tmp_path / "s.toml"
    p.write_text(textwrap.dedent(text), encoding="utf-8")
    return str(p)


def _karras(n: int, smin: float = 0.002, smax: float = 80.0, rho: float = 7.0) -> list[float]:
    """EDM's schedule (Karras et al. 2022, Eq. 5), then 0, in float64."""
    a, b = smax ** (1 / rho), smin ** (1 / rho)
    return [(a + i / (n - 1) * (b - a)) ** rho for i in range(n)] + [0.0]


def _hand_autoguidance(main, weak, noise, w: float, steps: int):
    """Euler on D = D_weak + w (D_main − D_weak) (Karras et al. 2024, Eq. 2), null class."""
    sig = _karras(steps)
    x = noise * sig[0]
    y = torch.full((x.shape[0],), NULL_CLASS, dtype=torch.long)
    for s, s_next in itertools.pairwise(sig):
        sigma = torch.full((x.shape[0],), s)
        d_main = main(x, sigma, class_labels=y)
        d_weak = weak(x, sigma, class_labels=y)
        d = d_weak + w * (d_main - d_weak)
        x = x + (x - d) / s * (s_next - s)
    return x.clamp(-1, 1)


def _noise(seed: int, seed_index) -> torch.Tensor:
    gens = [torch.Generator().manual_seed(noise_seed(seed, "null", int(k))) for k in seed_index]
    return torch.stack([torch.randn(1, 16, 16, generator=g) for g in gens])


@torch.no_grad()
def test_autoguidance_unit_equals_a_hand_euler_loop_with_the_shipped_weak_model(tmp_path):
    study = load_study(_write(tmp_path, STUDY))
    (ag,) = [s for s in study.settings() if s.family == "Autoguidance"]
    assert ag.name == "Autoguidance scale=2.5"
    out = str(tmp_path / "out")
    run_study(study, out, progress=False, echo=False)
    got = Store(out).read_tensors("s001-c00000", ("samples", "seed_index"))
    noise = _noise(4, got["seed_index"].tolist())
    main, weak = load_denoiser(), load_weak_denoiser()
    want = _hand_autoguidance(main, weak, noise, 2.5, steps=3)
    scale = want.abs().max().item()
    torch.testing.assert_close(got["samples"], want, rtol=0, atol=1e-5 * scale)
    # the weak branch matters: w = 1 (the main model alone) gives other samples
    assert (got["samples"] - _hand_autoguidance(main, weak, noise, 1.0, 3)).abs().max() > 0.05


@torch.no_grad()
def test_a_weak_folder_is_loaded_and_the_main_model_as_its_own_weak_model_is_neutral(tmp_path):
    # weak = the main model's folder: D_main + (w − 1)(D_main − D_main) = D_main, unguided
    text = STUDY + f'weak = "{WEIGHTS_DIR}"\n'
    study = load_study(_write(tmp_path, text))
    out = str(tmp_path / "out")
    run_study(study, out, progress=False, echo=False)
    store = Store(out)
    got = store.read_tensors("s001-c00000", ("samples",))["samples"]
    base = store.read_tensors("s000-c00000", ("samples",))["samples"]
    torch.testing.assert_close(got, base, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "line, key, accepted",
    [
        ('weak = "no/such/folder"', "rules[0].weak", "'shipped'"),
        ("weak = 3", "rules[0].weak", "'shipped'"),
        ('model = "x"', "rules[0].model", "weak"),
    ],
)
def test_bad_weak_fails_before_sampling_naming_the_key(tmp_path, capsys, line, key, accepted):
    path = _write(tmp_path, STUDY + line + "\n")
    with pytest.raises(StudyError) as err:
        load_study(path)
    msg = str(err.value)
    assert msg.startswith(key + ":"), msg
    assert accepted in msg
    out = tmp_path / "out"
    assert study_main(["run", path, "--out", str(out), "--no-progress"]) == 2
    assert key in capsys.readouterr().err
    assert not out.exists()


def test_autoguidance_needs_a_model_with_weak_models(tmp_path):
    text = """
    name = "ag"
    model = "sdxl"
    labels = ["null"]

    [[rules]]
    rule = "Compose"
    terms = [{ rule = "CFG" }, { rule = "Autoguidance", scale = 2.5 }]
    """
    with pytest.raises(StudyError, match=r"^rules\[0\]\.terms\[1\]\.rule: .*model 'sdxl'"):
        load_study(_write(tmp_path, text))


def test_a_setting_built_without_the_model_refuses_to_sample(tmp_path):
    (s,) = [x for x in load_study(_write(tmp_path, STUDY)).settings() if x.family != "none"]
    rule = s.build()
    with pytest.raises(StudyError, match="'shipped' was not resolved"):
        rule.model(torch.zeros(1, 1, 16, 16), torch.ones(1))
    assert os.path.isdir(WEIGHTS_DIR)
