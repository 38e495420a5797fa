"""End to end: 1 vs 2 processes (torchrun, accelerate launch; gloo on CPU), kill and resume.

The reference of every check is the uninterrupted in-process run of the same tiny study
on the shipped demo model (3 settings x 2 labels x 2 seeds, 3 Euler steps). Sample bytes
must be identical; metrics agree to ``rtol = 1e-9`` (float64 sums added in another order;
in practice they are equal).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from smoothguide.study import Store, StudyError, load_study
from smoothguide.study.runner import run_study

SRC = os.path.join(os.path.dirname(__file__), "..", "src")
BIN = os.path.dirname(sys.executable)
STUDY = """
name = "tiny"
seed = 3
labels = ["null", 7]
seeds = 2
unit_size = 2
metrics = ["fd", "kid", "rms", "ssim", "ink", "confidence", "accuracy"]

[sampler]
steps = 3
threads = 1

[[rules]]
rule = "SEG"
scale = 1.0
sigma = inf

[[rules]]
rule = "PAG"
scale = 0.5
"""
N_UNITS = 3 * 2  # settings x chunks of 2 samples (4 samples per setting)


@pytest.fixture(scope="module")
def study_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("study") / "tiny.toml"
    p.write_text(textwrap.dedent(STUDY), encoding="utf-8")
    return str(p)


@pytest.fixture(scope="module")
def reference(study_file, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ref") / "out")
    run_study(load_study(study_file), out, progress=False, echo=False)
    return out


def _launch(launcher, study_file, out, env_extra=None, check=True):
    env = dict(os.environ, PYTHONPATH=os.path.abspath(SRC), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env.update(env_extra or {})
    cmd = {
        "torchrun": [os.path.join(BIN, "torchrun"), "--nproc-per-node", "2"],
        # accelerate launches several CPU processes through torchrun with --multi_gpu;
        # PartialState then sets up gloo because there is no GPU
        "accelerate": [
            os.path.join(BIN, "accelerate"),
            "launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
        ],
    }[launcher]
    cmd += ["-m", "smoothguide", "study", "run", study_file, "--out", out, "--no-progress"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def _units(out):
    d = os.path.join(out, "units")
    return sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))


def _index_units(out):
    return [rec["unit"] for rec in Store(out).records()]


def _assert_same_result(out, reference):
    assert _units(out) == _units(reference)
    assert len(_units(reference)) == N_UNITS
    for name in _units(reference):
        with (
            open(os.path.join(out, "units", name), "rb") as a,
            open(os.path.join(reference, "units", name), "rb") as b,
        ):
            assert a.read() == b.read(), name
    with (
        open(os.path.join(out, "metrics.json")) as fa,
        open(os.path.join(reference, "metrics.json")) as fb,
    ):
        ma, mb = json.load(fa), json.load(fb)
    assert ma["hash"] == mb["hash"]
    for ra, rb in zip(ma["settings"], mb["settings"], strict=True):
        for key in ("fd", "kid", "rms", "ssim", "ink", "confidence", "accuracy"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-9, abs=1e-12), (ra["name"], key)


@pytest.mark.slow
def test_two_processes_equal_one(study_file, reference, tmp_path):
    out = str(tmp_path / "out")
    _launch("torchrun", study_file, out)
    _assert_same_result(out, reference)
    ranks = [rec["rank"] for rec in Store(out).records()]
    assert sorted(set(ranks)) == [0, 1]  # both ranks sampled
    units = _index_units(out)
    assert sorted(units) == sorted(set(units))
    assert len(units) == N_UNITS
    with open(os.path.join(out, "summary.json")) as fh:
        assert json.load(fh)["processes"] == 2


@pytest.mark.slow
def test_kill_one_rank_then_resume_with_accelerate(study_file, reference, tmp_path):
    out = str(tmp_path / "out")
    r = _launch(
        "torchrun",
        study_file,
        out,
        {"SMOOTHGUIDE_STUDY_KILL_AFTER": "1", "SMOOTHGUIDE_STUDY_KILL_RANK": "1"},
        check=False,
    )
    assert r.returncode != 0
    before = _index_units(out)
    assert 0 < len(before) < N_UNITS
    assert not os.path.exists(os.path.join(out, "metrics.json"))
    _launch("accelerate", study_file, out)
    _assert_same_result(out, reference)
    after = _index_units(out)
    assert sorted(after) == sorted(set(after))
    assert len(after) == N_UNITS
    assert set(before) <= set(after)


@pytest.mark.slow
def test_kill_all_ranks_then_resume_in_one_process(study_file, reference, tmp_path):
    out = str(tmp_path / "out")
    r = _launch("torchrun", study_file, out, {"SMOOTHGUIDE_STUDY_KILL_AFTER": "1"}, check=False)
    assert r.returncode != 0
    before = _index_units(out)
    assert 0 < len(before) < N_UNITS
    # the killed writers left a unit's samples file without its index line
    orphans = set(_units(out)) - {u + ".safetensors" for u in before}
    assert orphans
    run_study(load_study(study_file), out, progress=False, echo=False)  # resume: 1 process
    _assert_same_result(out, reference)
    after = _index_units(out)
    assert sorted(after) == sorted(set(after))
    assert len(after) == N_UNITS
    assert not [f for f in os.listdir(os.path.join(out, "units")) if f.endswith(".tmp")]


def test_truncated_unit_is_redone(study_file, reference, tmp_path):
    out = str(tmp_path / "out")
    shutil.copytree(reference, out)
    victim = os.path.join(out, "units", "s001-c00001.safetensors")
    size = os.path.getsize(victim)
    with open(victim, "r+b") as fh:
        fh.truncate(size // 2)
    os.remove(os.path.join(out, "metrics.json"))
    summary = run_study(load_study(study_file), out, progress=False, echo=False)
    assert summary is not None
    _assert_same_result(out, reference)
    units = _index_units(out)
    assert units.count("s001-c00001") == 2  # the stale record and the redone one
    assert len(set(units)) == N_UNITS
    with open(os.path.join(out, "summary.json")) as fh:
        assert json.load(fh)["units_run"] == 1


def test_changed_definition_is_refused(study_file, reference, tmp_path):
    changed = tmp_path / "changed.toml"
    with open(study_file, encoding="utf-8") as fh:
        changed.write_text(fh.read().replace("steps = 3", "steps = 4"), encoding="utf-8")
    before = sorted(os.listdir(os.path.join(reference, "units")))
    with pytest.raises(StudyError, match="another study.*sampler"):
        run_study(load_study(str(changed)), reference, progress=False, echo=False)
    assert sorted(os.listdir(os.path.join(reference, "units"))) == before


def test_report_from_the_store(reference, tmp_path):
    from smoothguide.study.cli import main

    out = str(tmp_path / "report")
    assert main(["report", reference, "--out", out]) == 0
    files = sorted(os.listdir(out))
    assert files == ["grid_0.png", "grid_1.png", "metrics.csv", "metrics.md", "pareto.png"]
    with open(os.path.join(reference, "metrics.json")) as fh:
        m = json.load(fh)
    with open(os.path.join(out, "metrics.csv")) as fh:
        lines = fh.read().splitlines()
    assert len(lines) == 1 + len(m["settings"])
    header = lines[0].split(",")
    for line, row in zip(lines[1:], m["settings"], strict=True):
        cells = dict(zip(header, line.split(","), strict=True))
        assert float(cells["fd"]) == row["fd"]
        assert cells["name"] == row["name"]


def test_report_refuses_an_unfinished_study(reference, tmp_path):
    from smoothguide.study.report import load_results

    out = str(tmp_path / "out")
    shutil.copytree(reference, out)
    os.remove(os.path.join(out, "metrics.json"))
    with pytest.raises(StudyError, match="not finished"):
        load_results(out)


def test_rows_pair_each_sample_with_the_unguided_sample_of_the_same_seed(reference):
    import numpy as np

    store = Store(reference)
    for chunk in range(2):
        base = store.read_tensors(f"s000-c{chunk:05d}")
        for setting in (1, 2):
            uid = f"s{setting:03d}-c{chunk:05d}"
            t = store.read_tensors(uid)
            # the same (label, seed index) pairs and noise seeds as the baseline unit
            assert t["noise_seed"].tolist() == base["noise_seed"].tolist()
            assert t["item"].tolist() == base["item"].tolist()
            x, r = t["samples"].double().numpy(), base["samples"].double().numpy()
            rms = np.sqrt(((x - r) ** 2).reshape(len(x), -1).mean(axis=1))
            ink = ((np.clip(x, -1, 1) + 1) / 2).reshape(len(x), -1).mean(axis=1)
            rows = store.read_rows(uid)["rows"]
            np.testing.assert_allclose([row["rms"] for row in rows], rms, rtol=1e-12)
            np.testing.assert_allclose([row["ink"] for row in rows], ink, rtol=1e-12)
            assert rms.min() > 0  # guidance changed every sample


def test_custom_model_factory_by_import_path(tmp_path):
    """A study on a model that is not the demo's: ``model = "module:function"``."""
    import numpy as np

    from smoothguide.study import RuleGrid, SamplerSettings, Study

    study = Study(
        "toy",
        rules=(RuleGrid("CFG", scale=[1.0, 3.0]),),
        labels=(0, 1),
        seeds=3,
        unit_size=2,
        model="toy_study_model:factory",
        metrics=("rms", "ink"),
        sampler=SamplerSettings(steps=1),
    )
    m = run_study(study, str(tmp_path / "out"), progress=False, echo=False)
    assert m is not None
    rows = {r["name"]: r for r in m["settings"]}
    # the toy model returns tanh(noise * w), w = 1 unguided: CFG w = 1 equals the baseline
    assert rows["CFG scale=1"]["rms"] == 0.0
    assert rows["CFG scale=3"]["rms"] > 0.0
    store = Store(str(tmp_path / "out"))
    t = store.read_tensors("s002-c00000")
    import torch

    from smoothguide.study.units import noise_seed

    want = torch.stack(
        [
            torch.randn((1, 4, 4), generator=torch.Generator().manual_seed(noise_seed(0, i, k)))
            for i, k in zip(t["item"].tolist(), t["seed_index"].tolist(), strict=True)
        ]
    )
    np.testing.assert_array_equal(t["samples"].numpy(), torch.tanh(want * 3).numpy())
