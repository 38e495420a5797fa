"""Demo figures: the Pareto plot's labels are legible (no overlaps, readable size, legends)."""

from __future__ import annotations

import itertools

import pytest

pytest.importorskip("torch")
pytest.importorskip("matplotlib")

from smoothguide.demo.plots import PARETO_FONT, _pareto_figure


def _pt(dev: float, fd: float, conf: float, label: str) -> dict[str, object]:
    return {"deviation": dev, "fd": fd, "confidence": conf, "label": label}


# The published run's crowded spots: SEG σ = 5 next to σ = ∞, SEG 0.5 near PAG 0.1,
# PAG 0.25 near 1 on the confidence axis.
SWEEPS = {
    "SEG: σ sweep": [
        _pt(0.037, 31.99, 0.588, "0.5"),
        _pt(0.129, 25.88, 0.621, "1"),
        _pt(0.249, 20.82, 0.663, "2"),
        _pt(0.260, 20.55, 0.657, "5"),
        _pt(0.262, 20.66, 0.655, "∞"),
    ],
    "PAG: scale sweep": [
        _pt(0.045, 32.60, 0.600, "0.1"),
        _pt(0.112, 31.82, 0.620, "0.25"),
        _pt(0.203, 32.11, 0.643, "0.5"),
        _pt(0.335, 35.95, 0.675, "1"),
    ],
}


def test_pareto_labels_do_not_overlap_and_are_readable() -> None:
    fig = _pareto_figure(SWEEPS, baseline={"fd": 34.07, "confidence": 0.581}, title="t")
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        labels = [t for t in ax.texts if t.get_text()]
        assert sorted(t.get_text() for t in labels) == sorted(
            p["label"] for pts in SWEEPS.values() for p in pts
        )
        boxes = [t.get_window_extent(renderer) for t in labels]
        for (a, ta), (b, tb) in itertools.combinations(zip(boxes, labels, strict=True), 2):
            assert not a.overlaps(b), (ta.get_text(), tb.get_text())
        assert all(t.get_fontsize() >= 10 for t in labels)
        assert ax.get_legend() is not None  # both panels say which curve is which
        assert {t.get_text() for t in ax.get_legend().get_texts()} == {*SWEEPS, "no guidance"}
    assert PARETO_FONT >= 10


def test_pareto_labels_avoid_the_legend() -> None:
    fig = _pareto_figure(SWEEPS, baseline={"fd": 34.07, "confidence": 0.581})
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        legend = ax.get_legend().get_window_extent(renderer)
        assert not any(t.get_window_extent(renderer).overlaps(legend) for t in ax.texts)


def _result(n: int) -> dict[str, object]:
    row = {"method": "cond: none", "fd": 4.8, "confidence": 0.9, "accuracy": 0.96}
    row |= {"deviation": 0.0, "intensity": 0.12, "seconds": 1.0}
    settings = {"num_samples": n, "steps": 8, "seed": 0, "seg_scale": 1.0, "layers": ["b"]}
    settings |= {"weights_sha256": "0" * 64, "weights_steps": 1, "device": "cpu"}
    settings |= {"torch_threads": 1}
    reference = {"fd_real_train_vs_held_out": 4.4, "real_train_samples": n}
    reference |= {"held_out_confidence": 0.93, "held_out_accuracy": 0.98}
    reference |= {"held_out_intensity": 0.13}
    return {"settings": settings, "reference": reference, "methods": [row], "seconds_total": 1}


def test_real_digit_row_is_a_floor_only_with_enough_samples() -> None:
    from smoothguide.demo.run import FLOOR_MIN_SAMPLES, format_table

    small = format_table(_result(30))
    assert "| real: 30 train vs held-out (no floor: too few) |" in small
    assert "biased upwards" in small
    big = format_table(_result(FLOOR_MIN_SAMPLES))
    assert f"| real: {FLOOR_MIN_SAMPLES} train vs held-out |" in big
    assert "no floor" not in big
    assert "biased" not in big


def test_readme_table_is_the_demo_table() -> None:
    # the README shows metrics.md's table of the default run: its header, every method row
    # of the default demo in order, then the real-digit row
    from pathlib import Path

    from smoothguide.demo.run import DemoSettings, format_table, methods

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    header = next(ln for ln in format_table(_result(200)).splitlines() if ln.startswith("| method"))
    lines = readme.splitlines()
    start = lines.index(header)
    rows = []
    for ln in lines[start + 2 :]:
        if not ln.startswith("|"):
            break
        rows.append(ln.split("|")[1].strip())
    assert rows[:-1] == [m.name for m in methods(DemoSettings())]
    assert rows[-1] == "real: 200 train vs held-out"
