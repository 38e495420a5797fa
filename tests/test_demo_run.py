"""`smoothguide demo --quick` end to end: files written, metrics finite, deterministic per seed."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("matplotlib")

from smoothguide.demo.run import main, run_demo

FILES = (
    "grid_unconditional.png",
    "grid_conditional.png",
    "pareto.png",
    "metrics.md",
    "metrics.json",
)


def test_quick_demo_writes_files_with_finite_metrics(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    for name in FILES:
        assert (tmp_path / name).stat().st_size > 0, name
    for name in FILES[:3]:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads((tmp_path / "metrics.json").read_text())
    rows = result["methods"]
    names = [r["method"] for r in rows]
    assert "uncond: none" in names
    assert "cond: CFG w=2" in names
    assert any(n.startswith("uncond: SEG") for n in names)
    assert any(n.startswith("uncond: PAG") for n in names)
    for r in rows:
        for key in ("fd", "confidence", "deviation", "intensity"):
            assert math.isfinite(r[key]), (r["method"], key)
        assert 0.0 <= r["confidence"] <= 1.0
    assert {r["deviation"] for r in rows if r["method"].endswith(": none")} == {0.0}
    # guidance changes the samples: every guided method deviates from the unguided one
    assert all(r["deviation"] > 0 for r in rows if not r["method"].endswith(": none"))
    table = (tmp_path / "metrics.md").read_text()
    assert all(f"| {n} |" in table for n in names)
    assert table.strip() in capsys.readouterr().out


def test_demo_is_deterministic_per_seed(tmp_path: Path) -> None:
    kw = {"quick": True, "progress": False, "num_samples": 10, "steps": 3, "echo": False}
    a = run_demo(str(tmp_path / "a"), seed=3, **kw)
    b = run_demo(str(tmp_path / "b"), seed=3, **kw)
    c = run_demo(str(tmp_path / "c"), seed=4, **kw)
    strip = lambda res: [{k: v for k, v in r.items() if k != "seconds"} for r in res["methods"]]  # noqa: E731
    assert strip(a) == strip(b)
    assert strip(a) != strip(c)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="num_samples"):
        run_demo("unused", num_samples=3)
    with pytest.raises(TypeError, match="seed"):
        run_demo("unused", seed="0")  # type: ignore[arg-type]


@pytest.mark.parametrize("argv", [["--num-samples", "3"], ["--steps", "0"], ["--threads", "0"]])
def test_cli_rejects_bad_sizes(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert argv[0] in capsys.readouterr().err


def test_demo_samples_come_from_the_study_store_and_resume(tmp_path: Path) -> None:
    """The demo samples through the study machinery: its stored units hold the samples a
    hand loop gets from the per-sample noise seeds, and a rerun samples nothing again."""
    import torch

    from smoothguide.demo.guide import guided_sample
    from smoothguide.demo.model import NULL_CLASS
    from smoothguide.demo.weights import load_denoiser
    from smoothguide.rules import SEG
    from smoothguide.study import Store, noise_seed

    kw = {"quick": True, "progress": False, "num_samples": 10, "steps": 2, "echo": False}
    first = run_demo(str(tmp_path), seed=5, **kw)
    (folder,) = (tmp_path / "study").glob("demo_unconditional-*")
    store = Store(str(folder))
    units = sorted(p.name for p in folder.rglob("*.safetensors") if p.name.startswith("s0"))
    assert units, list(folder.rglob("*"))
    stamps = {p: p.stat().st_mtime_ns for p in folder.rglob("*.safetensors")}
    again = run_demo(str(tmp_path), seed=5, **kw)
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*.safetensors")} == stamps
    assert again["methods"] == first["methods"]  # seconds included: read from the store

    # setting 2 of the unconditional study is the quick demo's SEG σ = 2 (after PAG)
    rule = SEG(1.0, sigma=2.0, layers="all")
    got = store.read_tensors("s002-c00000", ("samples", "seed_index"))
    noise = torch.stack(
        [
            torch.randn(
                1, 16, 16, generator=torch.Generator().manual_seed(noise_seed(5, "null", k))
            )
            for k in got["seed_index"].tolist()
        ]
    )
    den = load_denoiser()
    want = guided_sample(den, rule, labels=[NULL_CLASS] * len(noise), noise=noise, steps=2)
    scale = want.abs().max().item()
    torch.testing.assert_close(got["samples"], want, rtol=0, atol=1e-5 * scale)
    assert not torch.allclose(
        got["samples"],
        guided_sample(den, None, labels=[NULL_CLASS] * len(noise), noise=noise, steps=2),
    )
