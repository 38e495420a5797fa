"""``smoothguide study report DIR``: tables, Pareto plot and sample grids from the store alone.

Reads ``study.json``, ``metrics.json`` and the unit files (no model, no sampling)
and writes to ``DIR/report`` (or ``--out``):

- ``metrics.csv`` and ``metrics.md``: one row per setting;
- ``pareto.png``: quality (``fd``, else ``kid``) against the deviation from the
  unguided sample of the same seed (``rms``), one curve per rule family, the
  unguided baseline as a star;
- ``grid_<k>.png``: for each of the first labels / prompts, one row per setting
  and one column per seed index (the same noise down each column).
"""

from __future__ import annotations

import csv
import importlib
import io
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from .definition import METRICS, StudyError
from .store import Store, atomic_write
from .units import make_units

__all__ = ["load_results", "write_report"]

_COLUMNS = tuple(METRICS)


def load_results(root: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(study.json, metrics.json)`` of a finished study folder.

    Parameters
    ----------
    root
        The study's output folder.

    Returns
    -------
    tuple of dict
        The recorded definition and the reduced metrics.

    Raises
    ------
    StudyError
        If the folder holds no study, is unfinished, or the metrics belong to another
        definition.

    Examples
    --------
    >>> load_results("no-such-folder")
    Traceback (most recent call last):
    ...
    smoothguide.study.definition.StudyError: no-such-folder: no study.json; not a study folder
    """
    store = Store(root)
    study = store.read_definition()
    if study is None:
        raise StudyError(f"{root}: no study.json; not a study folder")
    path = os.path.join(root, "metrics.json")
    d = study["definition"]
    units = make_units(len(d["settings"]), len(d["items"]), d["seeds"], d["unit_size"])
    done = store.done(verify=False)
    missing = [u.uid for u in units if u.uid not in done]
    if missing or not os.path.exists(path):
        raise StudyError(
            f"{root}: the study is not finished ({len(missing)} of {len(units)} units missing"
            + (", e.g. " + ", ".join(missing[:3]) if missing else ", no metrics.json")
            + "); run `smoothguide study run` with the same study file again"
        )
    with open(path, encoding="utf-8") as fh:
        metrics = json.load(fh)
    if metrics.get("hash") != study["hash"]:
        raise StudyError(f"{path}: written by another study definition; rerun the study")
    return study, metrics


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def _tables(metrics: dict[str, Any]) -> tuple[str, str]:
    cols = [c for c in _COLUMNS if any(r.get(c) is not None for r in metrics["settings"])]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["setting", "family", "name", *cols])
    for r in metrics["settings"]:
        w.writerow(
            [
                r["setting"],
                r["family"],
                r["name"],
                *("" if r.get(c) is None else r[c] for c in cols),
            ]
        )
    head = "| setting | family | " + " | ".join(cols) + " |"
    lines = [
        f"# study {metrics['study']}",
        "",
        f"{metrics['samples_per_setting']} samples per setting, {metrics['steps']} steps; "
        f"features: {metrics.get('features')}; definition {metrics['hash'][:12]}.",
        "",
        head,
        "|---|---|" + "---:|" * len(cols),
    ]
    for r in metrics["settings"]:
        lines.append(
            f"| {r['name']} | {r['family']} | " + " | ".join(_cell(r.get(c)) for c in cols) + " |"
        )
    return buf.getvalue(), "\n".join(lines) + "\n"


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100)


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _pareto(metrics: dict[str, Any], path: str) -> bool:
    rows = metrics["settings"]
    ykey = next((k for k in ("fd", "kid") if any(r.get(k) is not None for r in rows)), None)
    if ykey is None or not any(r.get("rms") is not None for r in rows):
        return False
    fig = _figure(8.0, 6.0)
    ax = fig.add_subplot(1, 1, 1)
    base = rows[0]
    families: dict[str, list[dict[str, Any]]] = {}
    for r in rows[1:]:
        families.setdefault(r["family"], []).append(r)
    from ..demo.plots import PARETO_FONT, _place_labels  # the demo's overlap-free labels

    agg = importlib.import_module("matplotlib.backends.backend_agg")
    agg.FigureCanvasAgg(fig)  # a renderer to measure the labels with
    todo: list[tuple[float, float, str]] = []
    markers = "osD^v<>p"
    for i, (fam, pts) in enumerate(families.items()):
        pts = sorted(pts, key=lambda r: float(r["rms"]))
        ax.plot(
            [p["rms"] for p in pts],
            [p[ykey] for p in pts],
            marker=markers[i % len(markers)],
            label=fam,
        )
        for p in pts:
            label = p["name"].replace(p["spec"]["rule"], "", 1) if "spec" in p else p["name"]
            # parameters shared by the whole family (the layer, ...) would only crowd the plot
            label = " ".join(w for w in label.split() if not w.startswith("layers="))
            todo.append((float(p["rms"]), float(p[ykey]), label or fam))
    if base.get(ykey) is not None:
        ax.plot(
            [0.0],
            [base[ykey]],
            marker="*",
            markersize=12,
            color="black",
            linestyle="none",
            label="no guidance",
        )
    ax.set_xlabel("deviation from the unguided sample of the same seed (RMS)")
    ax.set_ylabel(f"{ykey} (lower is better)")
    ax.grid(alpha=0.3)
    ax.margins(0.12)
    ax.legend(fontsize=PARETO_FONT - 2, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=4)
    ax.set_title(f"{metrics['study']}: quality vs deviation", fontsize=PARETO_FONT)
    fig.tight_layout()
    _place_labels(ax, todo, fig.canvas.get_renderer())
    atomic_write(path, _png(fig))
    return True


def _to_rgb(x: np.ndarray) -> np.ndarray:
    v = (np.clip(x, -1, 1) + 1) / 2
    if v.shape[0] == 1:
        v = np.repeat(v, 3, axis=0)
    return np.transpose(v[:3], (1, 2, 0))


def _grids(
    store: Store, study: dict[str, Any], out: str, columns: int, max_items: int
) -> list[str]:
    d = study["definition"]
    settings = d["settings"]
    units = make_units(len(settings), len(d["items"]), d["seeds"], d["unit_size"])
    # (setting, item, seed index) -> image, read only for the shown items / seeds
    want_items = set(range(min(max_items, len(d["items"]))))
    want_seeds = set(range(min(columns, d["seeds"])))
    images: dict[tuple[int, int, int], np.ndarray] = {}
    for u in units:
        if not any(i in want_items and k in want_seeds for i, k in u.items):
            continue
        t = store.read_tensors(u.uid, ("samples",))
        x = t["samples"].float().numpy()
        for j, (i, k) in enumerate(u.items):
            if i in want_items and k in want_seeds:
                images[(u.setting, i, k)] = x[j]
    paths = []
    for i in sorted(want_items):
        cells = [[images[(s, i, k)] for k in sorted(want_seeds)] for s in range(len(settings))]
        h, w = cells[0][0].shape[1:]
        pad = max(1, h // 16)
        nr, nc = len(cells), len(cells[0])
        mosaic = np.ones((nr * (h + pad) + pad, nc * (w + pad) + pad, 3))
        for r, row in enumerate(cells):
            for c, img in enumerate(row):
                y0, x0 = pad + r * (h + pad), pad + c * (w + pad)
                mosaic[y0 : y0 + h, x0 : x0 + w] = _to_rgb(img)
        fig = _figure(2.6 + 0.5 * nc, 0.8 + 0.45 * nr)
        ax = fig.add_axes((0.38, 0.02, 0.6, 0.86))
        ax.imshow(mosaic, interpolation="nearest")
        ax.set_yticks([pad + r * (h + pad) + h / 2 for r in range(nr)])
        ax.set_yticklabels([s["name"] for s in settings], fontsize=6)
        ax.set_xticks([pad + c * (w + pad) + w / 2 for c in range(nc)])
        ax.set_xticklabels([f"seed {k}" for k in sorted(want_seeds)], fontsize=6)
        ax.xaxis.tick_top()
        ax.tick_params(length=0)
        item = d["items"][i]
        title = "unconditional" if item == "null" else f"{d['conditioning'][:-1]} {item!s:.60}"
        fig.suptitle(f"{title} (same seed per column)", fontsize=8)
        path = os.path.join(out, f"grid_{i}.png")
        atomic_write(path, _png(fig))
        paths.append(path)
    return paths


def write_report(
    root: str, out: str | None = None, *, columns: int = 8, max_items: int = 4
) -> Sequence[str]:
    """Write the report of the finished study folder ``root``; return the files written.

    Parameters
    ----------
    root
        The study's output folder.
    out
        Report folder (default ``root/report``).
    columns
        Seeds per grid row.
    max_items
        Grids for at most this many labels / prompts.

    Returns
    -------
    list of str
        Paths of the files written.

    Examples
    --------
    ``write_report("demo-study")`` after ``smoothguide study run ... --out demo-study``
    writes ``demo-study/report/``; an unfinished folder is refused
    (:func:`load_results`).
    """
    study, metrics = load_results(root)
    out = out or os.path.join(root, "report")
    os.makedirs(out, exist_ok=True)
    csv_text, md = _tables(metrics)
    written = []
    for name, text in (("metrics.csv", csv_text), ("metrics.md", md)):
        atomic_write(os.path.join(out, name), text.encode())
        written.append(os.path.join(out, name))
    if _pareto(metrics, os.path.join(out, "pareto.png")):
        written.append(os.path.join(out, "pareto.png"))
    written += _grids(Store(root), study, out, columns, max_items)
    return written
