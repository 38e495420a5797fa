"""Reliability, round 2: the command line and the demo scripts as a user meets them.

A usage error is one line on stderr and exit status 2 before any work, never a
traceback; an interrupt is one line and status 130; a failed run leaves no
empty output folder; ``train-demo`` never replaces the shipped weights by
default; every option says its default in ``--help``; the sweep writes its
results atomically.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from reliability_table import failure_mode
from smoothguide import cli

pytest.importorskip("torch")

from smoothguide.demo import run as demo_run
from smoothguide.demo import sweep as demo_sweep
from smoothguide.demo import train as demo_train
from smoothguide.demo.weights import CONFIG_FILE, WEIGHTS_DIR


def _src() -> str:
    import smoothguide

    return str(Path(smoothguide.__file__).resolve().parent.parent)  # the tree under test


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=_src(), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def _one_line_error(res: subprocess.CompletedProcess[str], status: int, *words: str) -> None:
    assert res.returncode == status, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr
    last = res.stderr.strip().splitlines()[-1]
    for w in words:
        assert w in last, (w, res.stderr)


def _fail_if_called(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("the command started working before refusing a usage error")


@failure_mode(
    "smoothguide demo with --out under a file (a subprocess, as a user runs it)",
    "one-line error naming the option, exit 2, no traceback, no folder created",
)
def test_demo_usage_errors_are_one_line(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    res = _run(["smoothguide", "demo", "--quick", "--no-progress", "--out", "afile/sub"], tmp_path)
    _one_line_error(res, 2, "smoothguide demo: error:", "--out", "not a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # nothing created


@failure_mode(
    "smoothguide demo / train-demo / sweep with a usage error (--seed -1, --device cuda:99 or an "
    "unknown device, a missing --weights-dir, bad lists or presets), called as main(argv)",
    "SystemExit(2) before any work (sampling, training or loading never starts)",
)
@pytest.mark.parametrize(
    ("module", "target", "argv"),
    [
        (demo_run, "run_demo", ["--seed", "-1"]),
        (demo_run, "run_demo", ["--device", "cuda:99"]),
        (demo_run, "run_demo", ["--device", "bogus"]),
        (demo_run, "run_demo", ["--weights-dir", "no-such-dir"]),
        (demo_train, "load_demo_data", ["--seed", "-1"]),
        (demo_train, "load_demo_data", ["--device", "nope"]),
        (demo_train, "load_demo_data", ["--warmup", "0"]),
        (demo_train, "load_demo_data", ["--hidden", "30"]),
        (demo_train, "load_demo_data", ["--ema", "1.5"]),
        (demo_sweep, "run_sweep", ["--seed", "-1"]),
        (demo_sweep, "run_sweep", ["--seg-sigmas", "2,nan"]),
        (demo_sweep, "run_sweep", ["--seg-scales", "1,abc"]),
        (demo_sweep, "run_sweep", ["--layers", "bogus"]),
        (demo_sweep, "run_sweep", ["--weights-dir", "missing"]),
    ],
)
def test_usage_errors_refused_before_any_work(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    module: Any,
    target: str,
    argv: list[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(module, target, _fail_if_called)
    with pytest.raises(SystemExit) as info:
        module.main([*argv, "--out", str(tmp_path / "out")])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "error:" in err[-1]
    assert not (tmp_path / "out").exists()


@failure_mode(
    "Ctrl-C (KeyboardInterrupt) during smoothguide demo, train-demo, the sweep and energy",
    "one line on stderr, exit status 130, no traceback, no empty output folder left",
)
@pytest.mark.parametrize(
    ("module", "target"),
    [(demo_run, "run_demo"), (demo_train, "load_demo_data"), (demo_sweep, "run_sweep")],
)
def test_keyboard_interrupt_is_one_line_and_130(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    module: Any,
    target: str,
) -> None:
    out = tmp_path / "new" / "out"

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        out.mkdir(parents=True, exist_ok=True)  # as the real work does first
        raise KeyboardInterrupt

    monkeypatch.setattr(module, target, interrupted)
    assert module.main(["--out", str(out), "--no-progress"]) == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [err.strip()]  # one line
    assert "interrupted" in err
    assert not (tmp_path / "new").exists()


def test_energy_keyboard_interrupt(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import smoothguide.energy_report as report

    def interrupted(**kwargs: Any) -> str:
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "energy_report", interrupted)
    assert cli.main(["energy", "--sigmas", "0"]) == 130
    assert capsys.readouterr().err.strip() == "smoothguide: interrupted"


@failure_mode(
    "smoothguide demo whose --weights-dir holds a broken config.json, --out a new nested folder",
    "one-line error, exit 1, and the folders it created are removed again",
)
def test_failed_run_leaves_no_empty_output_folder(tmp_path: Path) -> None:
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / CONFIG_FILE).write_text("{not json")
    res = _run(
        ["smoothguide", "demo", "--quick", "--no-progress", "--weights-dir", "weights", "--out",
         "a/b/c"],
        tmp_path,
    )  # fmt: skip
    _one_line_error(res, 1, "smoothguide demo: error:", "not valid JSON")
    assert not (tmp_path / "a").exists()


def _tree_hash(folder: str) -> dict[str, str]:
    return {
        name: hashlib.sha256(Path(folder, name).read_bytes()).hexdigest()
        for name in sorted(os.listdir(folder))
    }


@failure_mode(
    "smoothguide train-demo with its default --out, and with --out naming the shipped weights",
    "the default is a new folder outside the package; the shipped folder needs --force "
    "(refused with exit 2 before training, weights unchanged)",
)
def test_train_demo_never_overwrites_shipped_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    package = os.path.realpath(os.path.dirname(demo_train.__file__))
    default = os.path.realpath(demo_train.build_parser().parse_args([]).out)
    assert not default.startswith(package + os.sep)
    assert default != os.path.realpath(WEIGHTS_DIR)
    before = _tree_hash(WEIGHTS_DIR)
    monkeypatch.setattr(demo_train, "load_demo_data", _fail_if_called)
    for out in (WEIGHTS_DIR, os.path.join(WEIGHTS_DIR, ".")):
        with pytest.raises(SystemExit) as info:
            demo_train.main(["--steps", "1", "--out", out])
        assert info.value.code == 2
        assert "--force" in capsys.readouterr().err
    assert _tree_hash(WEIGHTS_DIR) == before


def _parsers() -> list[tuple[str, argparse.ArgumentParser]]:
    top = cli.build_parser()
    sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    return [
        ("energy", sub.choices["energy"]),
        ("demo", demo_run.build_parser()),
        ("train-demo", demo_train.build_parser()),
        ("sweep", demo_sweep.build_parser()),
    ]


@failure_mode(
    "smoothguide energy / demo / train-demo / sweep --help",
    "every option has a description and its default is shown",
)
def test_every_option_has_help_and_shows_its_default() -> None:
    for name, parser in _parsers():
        text = parser.format_help()
        for action in parser._actions:
            if not action.option_strings or action.default is argparse.SUPPRESS:
                continue
            assert action.help, (name, action.option_strings)
            # the help line of this option ends with its default
            assert isinstance(parser.formatter_class, type), name
            assert issubclass(parser.formatter_class, argparse.ArgumentDefaultsHelpFormatter), name
        assert text.count("(default:") >= sum(
            1 for a in parser._actions if a.option_strings and a.default is not argparse.SUPPRESS
        ), name


@failure_mode(
    "smoothguide --version; smoothguide energy --sigmas 1e308",
    "prints the package version (exit 0); a one-line argument error (exit 2), no traceback",
)
def test_version_and_huge_sigma(tmp_path: Path) -> None:
    import smoothguide

    res = _run(["smoothguide", "--version"], tmp_path)
    assert res.returncode == 0
    assert res.stdout.strip() == f"smoothguide {smoothguide.__version__}"
    res = _run(["smoothguide", "energy", "--sigmas", "1e308"], tmp_path)
    _one_line_error(res, 2, "--sigmas")
    res = _run(["smoothguide", "energy", "--seed", "-1"], tmp_path)
    _one_line_error(res, 2, "--seed")


@failure_mode(
    "the sweep interrupted while writing sweep.json, and a bad --seg-sigmas",
    "sweep.json is replaced atomically (old content or new, never partial, no temp file "
    "left); a bad list is refused before anything is written",
)
def test_sweep_writes_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "sweep.json"
    target.write_text('{"rows": ["old"]}')
    real_fdopen = os.fdopen

    class Half(io.StringIO):
        def __init__(self, fh: Any) -> None:
            super().__init__()
            self.fh = fh

        def __enter__(self) -> Half:
            return self

        def __exit__(self, *exc: Any) -> None:
            self.fh.close()

        def write(self, text: str) -> int:
            self.fh.write(text[: len(text) // 2])
            self.fh.flush()
            raise KeyboardInterrupt

    monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: Half(real_fdopen(fd, *a, **k)))
    with pytest.raises(KeyboardInterrupt):
        demo_sweep._write_atomic(str(target), '{"rows": ["new", "rows"]}')
    monkeypatch.setattr(os, "fdopen", real_fdopen)
    assert target.read_text() == '{"rows": ["old"]}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep.json"]
    demo_sweep._write_atomic(str(target), '{"rows": ["new"]}')
    assert target.read_text() == '{"rows": ["new"]}'
    res = _run(
        ["smoothguide.demo.sweep", "--out", "out", "--seg-sigmas", "2,1e308", "--no-progress"],
        tmp_path,
    )
    _one_line_error(res, 2, "--seg-sigmas")
    assert not (tmp_path / "out").exists()


def test_seed_bounds_are_what_the_generators_take() -> None:
    import numpy as np
    import torch

    from smoothguide.demo._cli import MAX_SEED

    np.random.default_rng(MAX_SEED)
    torch.Generator().manual_seed(MAX_SEED)
    with pytest.raises(ValueError, match="seed must be >= 0"):
        demo_run.run_demo(seed=-1)


def test_unwritable_out_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A folder no file can be created in (checked by trying: os.access is wrong for root)."""
    import tempfile

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        tempfile.TemporaryFile(dir=locked).close()
        base = Path("/proc")  # root ignores permissions; /proc takes no new files
        if not base.is_dir():
            pytest.skip("no unwritable folder available")
    except OSError:
        base = locked
    monkeypatch.setattr(demo_run, "run_demo", _fail_if_called)
    with pytest.raises(SystemExit) as info:
        demo_run.main(["--out", str(base / "sub" / "out")])
    assert info.value.code == 2
    assert "not writable" in capsys.readouterr().err
    locked.chmod(0o700)
