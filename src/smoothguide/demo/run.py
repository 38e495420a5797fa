"""``smoothguide demo``: SEG against no guidance, CFG and PAG on the shipped model.

:func:`run_demo` samples the same seeds under every method through the public
rules, torch adapter and sampler (:func:`smoothguide.demo.guide.guided_sample`),
scores them with :mod:`smoothguide.demo.metrics` and writes to ``out``. The
sampling runs as two studies (unconditional: the null label; class-conditional:
digits 0..9) through :func:`smoothguide.study.run_study`, stored under
``out/study/``: each sample's noise comes from (seed, label, seed index), every
finished unit is written atomically, and a killed demo resumes where it stopped.


- ``grid_unconditional.png`` and ``grid_conditional.png``: labelled comparison
  grids (rows = methods, columns = seeds / digits, same noise per column);
- ``pareto.png``: SEG's σ sweep (fixed scale) against PAG's scale sweep, x =
  deviation from the unguided sample of the same seed, y = Fréchet distance on
  the classifier's features to held-out real digits, and classifier confidence;
- ``metrics.md`` and ``metrics.json``: the table, the settings and the timings.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..rules import CFG, PAG, SEG
from ._cli import check_device, check_out_dir, check_seed, check_weights_dir, run_main
from ._deps import require, torch
from .data import load_demo_data
from .guide import DEFAULT_LAYERS, demo_patcher
from .metrics import classifier_scores, deviation, embed, frechet_distance, mean_intensity
from .plots import save_grid, save_pareto
from .weights import DIT_FILE, load_classifier, load_config, load_denoiser

__all__ = ["DemoSettings", "Method", "build_parser", "main", "methods", "run_demo"]

#: Samples per work unit of the demo's studies.
UNIT_SIZE = 100


@dataclass(frozen=True)
class DemoSettings:
    """Guidance settings of the demo (chosen from the measured sweep, see the docs).

    Attributes
    ----------
    seg_scale
        SEG scale ``s`` (official convention, ``x_c + s (x_c − x̃_c)``), held fixed
        while σ varies.
    seg_sigmas
        The σ values shown in the grid (``math.inf``: the mean query).
    seg_layers
        Layer preset or names for SEG and PAG.
    pag_scale
        PAG scale in the grid.
    cfg_scale
        CFG scale ``w``.
    sweep_sigmas, sweep_pag_scales
        The two Pareto sweeps.

    Examples
    --------
    >>> s = DemoSettings(seg_scale=2.0)
    >>> s.seg_scale, s.seg_sigmas
    (2.0, (1.0, 2.0, 5.0, inf))
    """

    seg_scale: float = 1.0
    seg_sigmas: tuple[float, ...] = (1.0, 2.0, 5.0, math.inf)
    seg_layers: str | tuple[str, ...] = DEFAULT_LAYERS
    pag_scale: float = 0.5
    cfg_scale: float = 2.0
    sweep_sigmas: tuple[float, ...] = (0.5, 1.0, 2.0, 5.0, math.inf)
    sweep_pag_scales: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0)


@dataclass(frozen=True)
class Method:
    """One sampling configuration of the demo.

    Attributes
    ----------
    name
        Row label.
    conditional
        Class-conditional samples (labels 0..9) or unconditional (null class).
    rule
        The guidance rule, ``None`` for the plain model.
    grid
        Whether the method is a row of the comparison grid.
    sweep
        ``"SEG"`` or ``"PAG"`` when the method is a point of a Pareto sweep.
    value
        The swept value (σ for SEG, scale for PAG).
    key
        Free-form tag, not used in comparisons (default ``""``).

    Examples
    --------
    >>> from smoothguide.rules import SEG
    >>> m = Method("uncond: SEG s=1 σ=2", False, SEG(1.0, sigma=2.0), sweep="SEG", value=2.0)
    >>> m.grid, m.sweep, m.value
    (True, 'SEG', 2.0)
    """

    name: str
    conditional: bool
    rule: Any
    grid: bool = True
    sweep: str | None = None
    value: float | None = None
    key: str = field(default="", compare=False)


def _sig(s: float | None) -> str:
    if s is None:
        return ""
    return "∞" if math.isinf(s) else f"{s:g}"


def methods(settings: DemoSettings, *, quick: bool = False) -> list[Method]:
    """The demo's methods: unconditional and class-conditional rows, then sweep-only points.

    Unconditional: no guidance, PAG and SEG at each σ of ``settings.seg_sigmas``;
    class-conditional: no guidance, CFG, SEG σ=∞, PAG + CFG and SEG σ=∞ + CFG;
    then the remaining points of the two Pareto sweeps (``grid=False``).

    Parameters
    ----------
    settings
        Scales, σ values and layers.
    quick
        Only SEG σ ∈ {2, ∞} unconditionally, no class-conditional SEG / PAG + CFG
        rows and no sweep-only points.

    Returns
    -------
    list of Method
        Grid rows first (unconditional, then class-conditional), then sweep-only points.

    Examples
    --------
    >>> names = [m.name for m in methods(DemoSettings(), quick=True)]
    >>> names[:2]
    ['uncond: none', 'uncond: PAG s=0.5']
    >>> len(names), len(methods(DemoSettings()))
    (7, 15)
    """
    s, lay = settings, settings.seg_layers
    out = [Method("uncond: none", False, None)]
    out.append(
        Method(
            f"uncond: PAG s={s.pag_scale:g}",
            False,
            PAG(s.pag_scale, layers=lay),
            sweep="PAG",
            value=s.pag_scale,
        )
    )
    sigmas = (2.0, math.inf) if quick else s.seg_sigmas
    for sig in sigmas:
        out.append(
            Method(
                f"uncond: SEG s={s.seg_scale:g} σ={_sig(sig)}",
                False,
                SEG(s.seg_scale, sigma=sig, layers=lay),
                sweep="SEG",
                value=sig,
            )
        )
    out.append(Method("cond: none", True, None))
    out.append(Method(f"cond: CFG w={s.cfg_scale:g}", True, CFG(s.cfg_scale)))
    if not quick:
        out.append(
            Method(
                f"cond: SEG s={s.seg_scale:g} σ=∞",
                True,
                SEG(s.seg_scale, sigma=math.inf, layers=lay),
            )
        )
        out.append(
            Method(
                f"cond: PAG s={s.pag_scale:g} + CFG w={s.cfg_scale:g}",
                True,
                PAG(s.pag_scale, layers=lay, cfg_scale=s.cfg_scale),
            )
        )
    out.append(
        Method(
            f"cond: SEG s={s.seg_scale:g} σ=∞ + CFG w={s.cfg_scale:g}",
            True,
            SEG(s.seg_scale, sigma=math.inf, layers=lay, cfg_scale=s.cfg_scale),
        )
    )
    if not quick:
        have_seg = {m.value for m in out if m.sweep == "SEG"}
        for sig in s.sweep_sigmas:
            if sig not in have_seg:
                out.append(
                    Method(
                        f"uncond: SEG s={s.seg_scale:g} σ={_sig(sig)}",
                        False,
                        SEG(s.seg_scale, sigma=sig, layers=lay),
                        grid=False,
                        sweep="SEG",
                        value=sig,
                    )
                )
        for sc in s.sweep_pag_scales:
            if sc != s.pag_scale:
                out.append(
                    Method(
                        f"uncond: PAG s={sc:g}",
                        False,
                        PAG(sc, layers=lay),
                        grid=False,
                        sweep="PAG",
                        value=sc,
                    )
                )
    return out


def _rule_grid(rule: Any) -> Any:
    """The :class:`~smoothguide.study.RuleGrid` of one fixed rule (its non-default fields)."""
    from ..study import RuleGrid

    params: dict[str, Any] = {}
    for f in dataclasses.fields(rule):
        v = getattr(rule, f.name)
        if v != f.default:
            params[f.name] = [list(v)] if isinstance(v, tuple) else v  # a tuple is one value
    grid = RuleGrid(type(rule).__name__, **params)
    (setting,) = grid.settings()
    if setting.build() != rule:  # a field the study cannot express: never run another rule
        raise AssertionError(f"the study setting {setting.build()!r} is not the rule {rule!r}")
    return grid


def _study(
    name: str,
    group: list[Method],
    labels: tuple[int | str, ...],
    seeds: int,
    *,
    seed: int,
    steps: int,
    weights_dir: str | None,
    layers: Any,
) -> Any:
    """A :class:`~smoothguide.study.Study` of the methods of one group (a label set)."""
    from ..study import SamplerSettings, Study

    return Study(
        name,
        rules=tuple(_rule_grid(m.rule) for m in group if m.rule is not None),
        labels=labels,
        seeds=seeds,
        seed=seed,
        model="demo",
        model_options={"layers": layers}
        | ({} if weights_dir is None else {"weights_dir": weights_dir}),
        sampler=SamplerSettings(steps=steps),
        unit_size=UNIT_SIZE,
        metrics=("rms",),
    )


def _run_group(
    study: Any, group: list[Method], root: str, device: Any, progress: bool
) -> tuple[dict[str, Any], dict[str, float]]:
    """Run (or resume) ``study`` under ``root``; every method's samples in the store's order
    of (seed index, label) and the sampling seconds of its units."""
    from ..study.dist import Dist
    from ..study.runner import run_study
    from ..study.store import Store
    from ..study.units import make_units

    # one folder per definition: a demo rerun with other settings never meets a foreign store
    out = os.path.join(root, f"{study.name}-{study.definition_hash()[:12]}")
    run_study(study, out, dist=Dist(device=device), progress=progress, echo=False)
    store, settings = Store(out), study.settings()
    units = make_units(len(settings), len(study.items()), study.seeds, study.unit_size)
    samples: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    for m in group:
        (k,) = [i for i, st in enumerate(settings) if st.build() == m.rule]
        mine = [u for u in units if u.setting == k]
        parts = [store.read_tensors(u.uid, ("samples", "item", "seed_index")) for u in mine]
        x = torch.cat([t["samples"] for t in parts]).numpy()
        # sample j of the demo: seed index j // L of label j % L (labels interleaved)
        key = torch.cat([t["seed_index"] * len(study.items()) + t["item"] for t in parts])
        samples[m.name] = x[torch.argsort(key).numpy()]
        seconds[m.name] = sum(store.read_rows(u.uid)["seconds"]["sample"] for u in mine)
    return samples, seconds


def run_demo(
    out: str = "smoothguide-demo",
    *,
    quick: bool = False,
    device: str = "cpu",
    progress: bool = True,
    seed: int = 0,
    num_samples: int | None = None,
    steps: int | None = None,
    settings: DemoSettings | None = None,
    weights_dir: str | None = None,
    echo: bool = True,
) -> dict[str, Any]:
    """Run the demo and write its figures and tables to ``out``.

    Parameters
    ----------
    out
        Output directory (created).
    quick
        Fewer samples, steps and methods (a smoke test, ~20 s on 2 CPU cores).
    device
        Torch device, e.g. ``"cpu"`` or ``"cuda"``.
    progress
        Show the study runner's tqdm bars (one per label set).
    seed
        Seed of the noise; the same seed gives the same files.
    num_samples
        Samples per method, a multiple of 10 (default 200, quick 30); the
        class-conditional ones are ``num_samples / 10`` per digit.
    steps
        Euler steps (default 16, quick 8).
    settings
        Guidance settings (default :class:`DemoSettings`).
    weights_dir
        Weights directory (default: the shipped weights).
    echo
        Print the metrics table.

    Returns
    -------
    dict
        The content of ``metrics.json``: ``settings``, ``reference`` (real
        train vs held-out digits), ``methods`` (one row of metrics per method)
        and ``seconds_total``.

    Raises
    ------
    ValueError
        If ``num_samples < 10``, ``steps < 1`` or ``seed < 0``.
    smoothguide.demo.weights.WeightsError
        If the weights are missing or damaged.

    Examples
    --------
    With the shipped weights, ``run_demo("smoothguide-demo", quick=True)`` writes
    the five files and returns the ``metrics.json`` content (about 20 s on 2 CPU
    cores). Arguments are checked before anything is loaded, and a directory
    without weights is reported as such:

    >>> run_demo(num_samples=5)
    Traceback (most recent call last):
    ...
    ValueError: num_samples must be a multiple of 10 (>= 10), got 5
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     run_demo(os.path.join(tmp, "out"), weights_dir=tmp, progress=False)
    Traceback (most recent call last):
    ...
    smoothguide.demo.weights.WeightsError: no demo weights at .../config.json; ...
    """
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {seed!r}")
    if seed < 0:  # checked before any work: NumPy's generator refuses it only at the end
        raise ValueError(f"seed must be >= 0, got {seed}")
    n = num_samples if num_samples is not None else (30 if quick else 200)
    steps = steps if steps is not None else (8 if quick else 16)
    if isinstance(n, bool) or not isinstance(n, int) or n < 10 or n % 10:
        raise ValueError(f"num_samples must be a multiple of 10 (>= 10), got {n!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    settings = settings or DemoSettings()
    require("tqdm")
    t_total = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    dev = torch.device(device)
    den = load_denoiser(weights_dir, device=dev)
    clf = load_classifier(weights_dir, device=dev)
    cfg = load_config(weights_dir)
    patcher = demo_patcher(den, default=settings.seg_layers)
    data = load_demo_data(seed=cfg["data"]["split_seed"])
    real_feats, real_probs = embed(clf, data.test_images)

    all_methods = methods(settings, quick=quick)
    cond_labels = np.arange(n) % 10
    samples: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    # Sampling runs through the study machinery (smoothguide.study): per-sample noise seeds
    # from (seed, label, seed index), units stored atomically, a killed demo resumes.
    for conditional, labels, seeds in ((False, ("null",), n), (True, tuple(range(10)), n // 10)):
        group = [m for m in all_methods if m.conditional == conditional]
        name = "demo_conditional" if conditional else "demo_unconditional"
        study = _study(
            name,
            group,
            labels,
            seeds,
            seed=seed,
            steps=steps,
            weights_dir=weights_dir,
            layers=settings.seg_layers,
        )
        got, secs = _run_group(study, group, os.path.join(out, "study"), dev, progress)
        samples.update(got)
        seconds.update(secs)
    rows: list[dict[str, Any]] = []
    for m in all_methods:
        x = samples[m.name]
        feats, probs = embed(clf, x)
        ref = samples["cond: none" if m.conditional else "uncond: none"]
        scores = classifier_scores(probs, cond_labels if m.conditional else None)
        rows.append(
            {
                "method": m.name,
                "setting": "class-conditional" if m.conditional else "unconditional",
                "fd": frechet_distance(feats, real_feats),
                "confidence": scores["confidence"],
                "accuracy": scores.get("accuracy"),
                "deviation": deviation(x, ref),
                "intensity": mean_intensity(x),
                "seconds": round(seconds[m.name], 2),
                "sweep": m.sweep,
                "value": None
                if m.value is None
                else (_sig(m.value) if m.sweep == "SEG" else m.value),
                "rule": repr(m.rule),
            }
        )

    # as many real training digits, with the conditional samples' labels (i % 10): FD depends
    # on the class balance as much as on the sample size, so both must match to be a floor
    rng = np.random.default_rng(seed)
    counts = np.bincount(np.arange(n) % 10, minlength=10)
    pick = np.concatenate(
        [
            rng.choice(np.flatnonzero(data.train_labels == c), size=int(k), replace=False)
            for c, k in enumerate(counts)
        ]
    )
    train_feats, _ = embed(clf, data.train_images[np.sort(pick)])
    reference = {
        "fd_real_train_vs_held_out": frechet_distance(train_feats, real_feats),
        "real_train_samples": int(n),
        "held_out_confidence": classifier_scores(real_probs)["confidence"],
        "held_out_accuracy": classifier_scores(real_probs, data.test_labels)["accuracy"],
        "held_out_intensity": mean_intensity(data.test_images),
    }

    _write_figures(out, all_methods, samples, rows, n)
    result = {
        "settings": {
            "seed": seed,
            "quick": quick,
            "num_samples": n,
            "steps": steps,
            "sampler": "smoothguide.sampling.sample_euler, Karras sigmas 0.002..80",
            "seg_scale": settings.seg_scale,
            "seg_convention": "official",
            "layers": list(patcher.resolve(settings.seg_layers)),
            "pag_scale": settings.pag_scale,
            "cfg_scale": settings.cfg_scale,
            "device": str(dev),
            "torch_threads": torch.get_num_threads(),
            "weights_sha256": cfg["files"][DIT_FILE]["sha256"],
            "weights_steps": cfg.get("training", {}).get("steps"),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "reference": reference,
        "methods": rows,
        "seconds_total": round(time.perf_counter() - t_total, 1),
    }
    with open(os.path.join(out, "metrics.json"), "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=2, allow_nan=False)
        fh.write("\n")
    table = format_table(result)
    with open(os.path.join(out, "metrics.md"), "w", encoding="utf-8") as fh:
        fh.write(table)
    if echo:
        print(table)
    return result


def _write_figures(
    out: str, all_methods: list[Method], samples: dict[str, Any], rows: list[dict[str, Any]], n: int
) -> None:
    cols = min(10, n)
    for conditional, fname, title, col_labels in (
        (False, "grid_unconditional.png", "Unconditional samples (same seed per column)", None),
        (
            True,
            "grid_conditional.png",
            "Class-conditional samples (same seed per column)",
            [str(i) for i in range(cols)],
        ),
    ):
        grid_rows = [
            (m.name, samples[m.name][:cols])
            for m in all_methods
            if m.grid and m.conditional == conditional
        ]
        save_grid(os.path.join(out, fname), grid_rows, title=title, column_labels=col_labels)
    by_name = {r["method"]: r for r in rows}
    sweeps: dict[str, list[dict[str, Any]]] = {}
    for label, kind in (("SEG: σ sweep", "SEG"), ("PAG: scale sweep", "PAG")):
        pts = sorted((m for m in all_methods if m.sweep == kind), key=lambda m: m.value or 0.0)
        sweeps[label] = [
            dict(by_name[m.name], label=(_sig(m.value) if kind == "SEG" else f"{m.value:g}"))
            for m in pts
        ]
    save_pareto(
        os.path.join(out, "pareto.png"),
        sweeps,
        baseline=by_name["uncond: none"],
        title="Unconditional sampling: SEG σ sweep vs PAG scale sweep",
    )


#: From this many samples per set on, the real train-vs-held-out FD is shown as the floor.
FLOOR_MIN_SAMPLES = 100


def format_table(result: dict[str, Any]) -> str:
    """The Markdown metrics table of a :func:`run_demo` result.

    The real-digit row compares ``num_samples`` training digits with the held-out set: a
    floor for the methods' FD only with :data:`FLOOR_MIN_SAMPLES` samples or more (with
    fewer, FD's small-sample bias dominates and the row is labelled as no floor).
    """
    s, ref = result["settings"], result["reference"]
    lines = [
        "# smoothguide demo metrics",
        "",
        f"{s['num_samples']} samples per method, {s['steps']} Euler steps, seed {s['seed']}, "
        f"SEG scale {s['seg_scale']:g} (official convention) on {', '.join(s['layers'])}; "
        f"weights {s['weights_sha256'][:12]} ({s['weights_steps']} steps); "
        f"total {result['seconds_total']} s on {s['device']} ({s['torch_threads']} threads).",
        "",
        "FD: Fréchet distance of the demo classifier's features to the 500 held-out real "
        "digits (lower is better); deviation: RMS pixel difference to the unguided sample of "
        "the same seed; intensity: mean ink in [0, 1].",
        "",
        "| method | FD ↓ | confidence | accuracy | deviation | intensity | seconds |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["methods"]:
        acc = "" if r["accuracy"] is None else f"{r['accuracy']:.3f}"
        lines.append(
            f"| {r['method']} | {r['fd']:.2f} | {r['confidence']:.3f} | {acc} | "
            f"{r['deviation']:.3f} | {r['intensity']:.3f} | {r['seconds']:.1f} |"
        )
    n_real = int(ref.get("real_train_samples", s["num_samples"]))
    floor = n_real >= FLOOR_MIN_SAMPLES
    label = f"real: {n_real} train vs held-out" + ("" if floor else " (no floor: too few)")
    lines += [
        f"| {label} | {ref['fd_real_train_vs_held_out']:.2f} | "
        f"{ref['held_out_confidence']:.3f} | {ref['held_out_accuracy']:.3f} | | "
        f"{ref['held_out_intensity']:.3f} | |",
        "",
    ]
    if not floor:
        lines += [
            f"With {n_real} samples the Fréchet distance is biased upwards and noisy (its "
            "covariances are estimated from few samples), for real digits as for generated "
            f"ones: the real-digit row is no floor at this size (use {FLOOR_MIN_SAMPLES} "
            "samples or more, as the default run does).",
            "",
        ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of ``smoothguide demo`` / ``python -m smoothguide.demo``.

    Returns
    -------
    argparse.ArgumentParser
        Options ``--out``, ``--quick``, ``--device``, ``--seed``, ``--num-samples``,
        ``--steps``, ``--threads``, ``--weights-dir`` and ``--no-progress``.

    Examples
    --------
    >>> args = build_parser().parse_args(["--quick", "--steps", "4"])
    >>> args.quick, args.steps, args.num_samples, args.out
    (True, 4, None, 'smoothguide-demo')
    """
    p = argparse.ArgumentParser(
        prog="smoothguide demo",
        description="Compare SEG with no guidance, CFG and PAG on the embedded MNIST model.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", default="smoothguide-demo", help="output directory")
    p.add_argument("--quick", action="store_true", help="fewer samples, steps and methods")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, mps, ...)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise (>= 0)")
    p.add_argument(
        "--num-samples",
        type=int,
        default=None,
        help="samples per method, >= 10 (None: 200, or 30 with --quick)",
    )
    p.add_argument(
        "--steps", type=int, default=None, help="Euler steps (None: 16, or 8 with --quick)"
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (None: torch's)")
    p.add_argument(
        "--weights-dir", default=None, help="weights directory (None: the shipped weights)"
    )
    p.add_argument("--no-progress", action="store_true", help="disable the progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse ``argv`` and run :func:`run_demo`.

    Parameters
    ----------
    argv
        Command-line arguments (default ``sys.argv[1:]``); see :func:`build_parser`.

    Returns
    -------
    int
        The exit status, 0 after writing the files to ``--out``.

    Raises
    ------
    SystemExit
        Status 2 (with a usage message on stderr) for invalid options, e.g.
        ``--num-samples`` below 10 or not a multiple of 10, ``--steps`` or ``--threads`` below 1, a
        negative ``--seed``, an unwritable ``--out``, a device this machine
        lacks or a ``--weights-dir`` without weights. At run time an interrupt
        prints one line and returns 130, a weights or file error one line and 1.

    Examples
    --------
    ``main(["--quick", "--out", "smoothguide-demo"])`` runs the quick demo on the
    shipped weights. Options are checked first:

    >>> main(["--num-samples", "5"])
    Traceback (most recent call last):
    ...
    SystemExit: 2
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.num_samples is not None and (args.num_samples < 10 or args.num_samples % 10):
        parser.error(f"--num-samples must be a multiple of 10 (>= 10), got {args.num_samples}")
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    check_seed(parser, args.seed)
    check_out_dir(parser, args.out)
    check_device(parser, args.device)
    check_weights_dir(parser, args.weights_dir)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    def work() -> int:
        run_demo(
            args.out,
            quick=args.quick,
            device=args.device,
            progress=not args.no_progress,
            seed=args.seed,
            num_samples=args.num_samples,
            steps=args.steps,
            weights_dir=args.weights_dir,
        )
        print(
            f"wrote {os.path.abspath(args.out)}: grid_unconditional.png, grid_conditional.png, "
            "pareto.png, metrics.md, metrics.json"
        )
        return 0

    return run_main("smoothguide demo", work, out=args.out)


if __name__ == "__main__":
    sys.exit(main())
