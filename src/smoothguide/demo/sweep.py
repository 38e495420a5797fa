"""``python -m smoothguide.demo.sweep``: the measured sweep behind the demo's SEG settings.

Unconditional sampling (the paper's main SEG setting) with the same seeds for
every configuration: SEG over layer presets x scales x σ, and PAG over layer
presets x scales, each scored like the demo (Fréchet distance to held-out real
digits, classifier confidence, deviation from the unguided sample of the same
seed, mean intensity). Writes ``sweep.json`` and ``sweep.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

from ..rules import PAG, SEG
from ..smoothing import default_radius
from ._cli import check_out_dir, check_seed, check_weights_dir, run_main
from ._deps import require, torch
from .data import load_demo_data
from .guide import demo_patcher, guided_sample
from .metrics import classifier_scores, deviation, embed, frechet_distance, mean_intensity
from .model import NULL_CLASS
from .weights import load_classifier, load_config, load_denoiser

__all__ = ["build_parser", "main", "run_sweep"]


def _num(s: str) -> float:
    return math.inf if s.strip() in ("inf", "∞") else float(s)


def _list(kind: str) -> Callable[[str], list[float]]:
    """An argparse type: comma-separated numbers, checked as SEG σ values or scales."""

    def parse(text: str) -> list[float]:
        try:
            values = [_num(v) for v in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated numbers, got {text!r}"
            ) from None
        for v in values:
            if kind == "sigma":
                try:
                    if not math.isinf(v):
                        default_radius(v)  # NaN, negatives, kernels too wide to build
                except (ValueError, OverflowError) as exc:
                    raise argparse.ArgumentTypeError(
                        f"sigma must be a number >= 0 or inf with a buildable kernel, got {v} "
                        f"({exc})"
                    ) from None
            elif not (v >= 0 and math.isfinite(v)):
                raise argparse.ArgumentTypeError(f"scales must be finite and >= 0, got {v}")
        return values

    return parse


def _write_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace``.

    A reader (or an interrupt) never sees a partly written file.
    """
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def run_sweep(
    out: str,
    *,
    layers: Sequence[str] = ("all", "early", "middle", "late"),
    seg_scales: Sequence[float] = (0.5, 1.0, 2.0, 3.0),
    seg_sigmas: Sequence[float] = (2.0, math.inf),
    pag_scales: Sequence[float] = (0.1, 0.25, 0.5, 1.0),
    num_samples: int = 200,
    steps: int = 16,
    seed: int = 0,
    weights_dir: str | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Run the sweep and write ``sweep.json`` / ``sweep.md``; returns the rows.

    Configurations: no guidance, then for each layer preset SEG at every
    ``seg_scales`` x ``seg_sigmas`` pair and PAG at every ``pag_scales`` value,
    all unconditional and from the same noise. ``sweep.json`` is rewritten after
    each configuration (atomically: written to a temporary file, then renamed), so
    an interrupted sweep keeps its finished rows. Layer presets are checked
    before anything is written.

    Parameters
    ----------
    out
        Output directory (created).
    layers
        Layer presets of :func:`~smoothguide.demo.guide.layer_presets`.
    seg_scales, seg_sigmas
        SEG scales and σ values (``math.inf``: the mean query).
    pag_scales
        PAG scales.
    num_samples
        Samples per configuration.
    steps
        Euler steps.
    seed
        Seed of the noise.
    weights_dir
        Weights directory (default: the shipped weights).
    progress
        Show a tqdm bar over the configurations.

    Returns
    -------
    list of dict
        One row per configuration: ``config``, ``fd`` (Fréchet distance to the
        held-out real digits), ``confidence``, ``deviation`` (from the unguided
        row), ``intensity`` and ``seconds``.

    Raises
    ------
    smoothguide.demo.weights.WeightsError
        If the weights are missing or damaged.

    Examples
    --------
    With the shipped weights, ``run_sweep("sweep", layers=["all"], num_samples=50)``
    scores 1 + 8 + 4 configurations. Without weights nothing is written:

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     run_sweep(os.path.join(tmp, "out"), weights_dir=tmp, progress=False)
    Traceback (most recent call last):
    ...
    smoothguide.demo.weights.WeightsError: no demo weights at .../config.json; ...
    """
    tqdm = require("tqdm").tqdm
    den = load_denoiser(weights_dir)
    clf = load_classifier(weights_dir)
    cfg = load_config(weights_dir)
    patcher = demo_patcher(den)
    data = load_demo_data(seed=cfg["data"]["split_seed"])
    real_feats, _ = embed(clf, data.test_images)
    noise = torch.randn(num_samples, 1, 16, 16, generator=torch.Generator().manual_seed(seed))
    labels = torch.full((num_samples,), NULL_CLASS, dtype=torch.long)
    configs: list[tuple[str, Any]] = [("none", None)]
    for lay in layers:
        for sc in seg_scales:
            for sig in seg_sigmas:
                configs.append((f"SEG {lay} s={sc:g} σ={sig:g}", SEG(sc, sigma=sig, layers=lay)))
        for sc in pag_scales:
            configs.append((f"PAG {lay} s={sc:g}", PAG(sc, layers=lay)))
    for lay in layers:
        patcher.resolve(lay)  # an unknown preset fails before anything is written
    os.makedirs(out, exist_ok=True)
    rows: list[dict[str, Any]] = []
    ref = None
    for name, rule in tqdm(configs, desc="sweep", disable=not progress):
        t0 = time.perf_counter()
        x = torch.cat(
            [
                guided_sample(
                    den,
                    rule,
                    labels=labels[i : i + 100],
                    noise=noise[i : i + 100],
                    steps=steps,
                    patcher=patcher,
                )
                for i in range(0, num_samples, 100)
            ]
        ).numpy()
        if ref is None:
            ref = x
        feats, probs = embed(clf, x)
        rows.append(
            {
                "config": name,
                "fd": round(frechet_distance(feats, real_feats), 3),
                "confidence": round(classifier_scores(probs)["confidence"], 4),
                "deviation": round(deviation(x, ref), 4),
                "intensity": round(mean_intensity(x), 4),
                "seconds": round(time.perf_counter() - t0, 1),
            }
        )
        result = {
            "num_samples": num_samples,
            "steps": steps,
            "seed": seed,
            "real_intensity": mean_intensity(data.test_images),
            "rows": rows,
        }
        _write_atomic(os.path.join(out, "sweep.json"), json.dumps(result, indent=1))
    lines = [
        "| config | FD ↓ | confidence | deviation | intensity | s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['fd']:.2f} | {r['confidence']:.3f} | "
            f"{r['deviation']:.3f} | {r['intensity']:.3f} | {r['seconds']} |"
        )
    _write_atomic(os.path.join(out, "sweep.md"), "\n".join(lines) + "\n")
    return rows


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of ``python -m smoothguide.demo.sweep``.

    Returns
    -------
    argparse.ArgumentParser
        Parses the options listed by ``--help`` (lists as comma-separated values).

    Examples
    --------
    >>> build_parser().parse_args(["--seg-sigmas", "1,inf"]).seg_sigmas
    [1.0, inf]
    """
    p = argparse.ArgumentParser(
        prog="python -m smoothguide.demo.sweep",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", default="smoothguide-demo-sweep", help="output directory")
    p.add_argument(
        "--layers", default="all,early,middle,late", help="comma-separated layer presets"
    )
    p.add_argument("--seg-scales", type=_list("scale"), default="0.5,1,2,3", help="SEG scales")
    p.add_argument(
        "--seg-sigmas", type=_list("sigma"), default="2,inf", help="SEG sigmas (inf: mean query)"
    )
    p.add_argument("--pag-scales", type=_list("scale"), default="0.1,0.25,0.5,1", help="PAG scales")
    p.add_argument("--num-samples", type=int, default=200, help="samples per configuration")
    p.add_argument("--steps", type=int, default=16, help="Euler steps")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise (>= 0)")
    p.add_argument(
        "--weights-dir", default=None, help="weights directory (None: the shipped weights)"
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (None: torch's)")
    p.add_argument("--no-progress", action="store_true", help="disable the progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry of the sweep.

    Options mirror :func:`run_sweep` (comma-separated lists; ``inf`` or ``∞`` for
    σ = ∞), plus ``--threads`` (torch CPU threads).

    Parameters
    ----------
    argv
        Command-line arguments (default ``sys.argv[1:]``).

    Returns
    -------
    int
        The exit status, 0 after printing the rows.

    Raises
    ------
    SystemExit
        Status 2 with a one-line message for a usage error (a bad list, count,
        seed, ``--out`` or ``--weights-dir``), before anything is written.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     main(["--out", tmp, "--seg-sigmas", "2,-1", "--no-progress"])
    Traceback (most recent call last):
    ...
    SystemExit: 2
    """
    p = build_parser()
    a = p.parse_args(argv)
    for name in ("num_samples", "steps", "threads"):
        value = getattr(a, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    presets = ("all", "early", "middle", "late")
    layers = [v.strip() for v in a.layers.split(",")]
    unknown = [v for v in layers if v not in presets and not v.startswith("blocks.")]
    if unknown:
        p.error(f"--layers: unknown presets {unknown}; choose from {list(presets)}")
    check_seed(p, a.seed)
    check_out_dir(p, a.out)
    check_weights_dir(p, a.weights_dir)
    if a.threads is not None:
        torch.set_num_threads(a.threads)

    def work() -> int:
        rows = run_sweep(
            a.out,
            layers=layers,
            seg_scales=a.seg_scales,
            seg_sigmas=a.seg_sigmas,
            pag_scales=a.pag_scales,
            num_samples=a.num_samples,
            steps=a.steps,
            seed=a.seed,
            weights_dir=a.weights_dir,
            progress=not a.no_progress,
        )
        for r in rows:
            print(r)
        return 0

    return run_main("python -m smoothguide.demo.sweep", work, out=a.out)


if __name__ == "__main__":
    sys.exit(main())
