"""Figures of the demo: the labelled comparison grid and the Pareto plot (matplotlib, no pyplot)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from ._deps import require

__all__ = ["save_grid", "save_pareto"]


def _figure(width: float, height: float) -> Any:
    figure = require("matplotlib.figure")
    return figure.Figure(figsize=(width, height), dpi=100)


def save_grid(
    path: str,
    rows: Sequence[tuple[str, npt.NDArray[np.floating]]],
    *,
    title: str = "",
    column_labels: Sequence[str] | None = None,
) -> None:
    """Save a grid PNG: one labelled row per method, same seeds per column.

    Parameters
    ----------
    path
        Output ``.png`` path.
    rows
        ``(label, images)`` pairs; ``images`` has shape ``(columns, 1, h, w)``
        with values in ``[-1, 1]``; all rows have the same shape.
    title
        Figure title.
    column_labels
        Optional label per column.

    Returns
    -------
    None
        The figure is written to ``path``.

    Raises
    ------
    ValueError
        If ``rows`` is empty or its images differ in shape.

    Examples
    --------
    >>> import os, tempfile
    >>> rows = [("zeros", np.zeros((3, 1, 16, 16))), ("ones", np.ones((3, 1, 16, 16)))]
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     path = os.path.join(tmp, "grid.png")
    ...     save_grid(path, rows, title="demo", column_labels=["a", "b", "c"])
    ...     with open(path, "rb") as fh:
    ...         fh.read(4)[1:]  # the PNG signature
    b'PNG'
    """
    if not rows:
        raise ValueError("rows must not be empty")
    shape = rows[0][1].shape
    if any(img.shape != shape for _, img in rows):
        raise ValueError("all rows must hold images of the same shape")
    cols, _, h, w = shape
    pad = 1
    mosaic = np.ones((len(rows) * (h + pad) + pad, cols * (w + pad) + pad))
    for r, (_, imgs) in enumerate(rows):
        for c in range(cols):
            y0, x0 = pad + r * (h + pad), pad + c * (w + pad)
            mosaic[y0 : y0 + h, x0 : x0 + w] = (np.clip(imgs[c, 0], -1, 1) + 1) / 2
    fig = _figure(1.2 + 0.45 * cols + 1.6, 0.6 + 0.45 * len(rows))
    top = (
        0.96
        - (0.35 if title else 0.0) / fig.get_figheight()
        - (0.3 if column_labels is not None else 0.0) / fig.get_figheight()
    )
    ax = fig.add_axes((0.3, 0.02, 0.68, top - 0.02))
    ax.imshow(mosaic, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks([pad + r * (h + pad) + h / 2 for r in range(len(rows))])
    ax.set_yticklabels([label for label, _ in rows], fontsize=8)
    if column_labels is not None:
        ax.set_xticks([pad + c * (w + pad) + w / 2 for c in range(cols)])
        ax.set_xticklabels(list(column_labels), fontsize=8)
        ax.xaxis.tick_top()
    else:
        ax.set_xticks([])
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(path)


def save_pareto(
    path: str,
    sweeps: Mapping[str, Sequence[Mapping[str, Any]]],
    *,
    baseline: Mapping[str, Any] | None = None,
    title: str = "",
) -> None:
    """Save the Pareto plot: deviation vs Fréchet distance and vs confidence.

    Parameters
    ----------
    path
        Output ``.png`` path.
    sweeps
        ``{name: [point, ...]}``; each point has ``deviation``, ``fd``,
        ``confidence`` and ``label`` (the swept value, written beside it).
    baseline
        The unguided point (deviation 0), drawn as a star.
    title
        Figure title.

    Returns
    -------
    None
        The figure is written to ``path``.

    Examples
    --------
    >>> import os, tempfile
    >>> sweeps = {
    ...     "SEG": [
    ...         {"deviation": 0.1, "fd": 3.0, "confidence": 0.90, "label": "1"},
    ...         {"deviation": 0.2, "fd": 2.5, "confidence": 0.95, "label": "∞"},
    ...     ],
    ... }
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     path = os.path.join(tmp, "pareto.png")
    ...     save_pareto(path, sweeps, baseline={"fd": 4.0, "confidence": 0.8})
    ...     os.path.getsize(path) > 0
    True
    """
    _pareto_figure(sweeps, baseline=baseline, title=title).savefig(path)


#: Font size of the Pareto plot's point labels, axis labels and legends (read at README width).
PARETO_FONT = 11


def _pareto_figure(
    sweeps: Mapping[str, Sequence[Mapping[str, Any]]],
    *,
    baseline: Mapping[str, Any] | None = None,
    title: str = "",
) -> Any:
    """The Pareto figure of :func:`save_pareto`, its point labels placed without overlaps."""
    agg = require("matplotlib.backends.backend_agg")
    fig = _figure(12, 5)
    agg.FigureCanvasAgg(fig)  # a renderer to measure the labels with
    axes = [fig.add_subplot(1, 2, i + 1) for i in range(2)]
    markers = ["o", "s", "^", "D", "v"]
    labelled: list[list[tuple[float, float, str]]] = [[], []]
    for ax, key, ylabel, todo in zip(
        axes,
        ("fd", "confidence"),
        ("Fréchet distance to held-out real (lower is better)", "classifier confidence"),
        labelled,
        strict=True,
    ):
        for i, (name, points) in enumerate(sweeps.items()):
            xs = [float(p["deviation"]) for p in points]
            ys = [float(p[key]) for p in points]
            ax.plot(xs, ys, marker=markers[i % len(markers)], markersize=7, label=name)
            todo += [(x, y, str(p["label"])) for p, x, y in zip(points, xs, ys, strict=True)]
        if baseline is not None:
            ax.plot(
                [0.0],
                [float(baseline[key])],
                marker="*",
                markersize=14,
                linestyle="none",
                color="black",
                label="no guidance",
            )
        ax.set_xlabel("deviation from the unguided sample (RMS)", fontsize=PARETO_FONT)
        ax.set_ylabel(ylabel, fontsize=PARETO_FONT)
        ax.tick_params(labelsize=PARETO_FONT - 1)
        ax.grid(alpha=0.3)
        ax.margins(0.12)  # room for the labels inside the axes
        # below the panel: inside, it would hide points (the unguided star sits at a corner)
        ax.legend(fontsize=PARETO_FONT - 1, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3)
    if title:
        fig.suptitle(title, fontsize=PARETO_FONT + 2)
    fig.tight_layout()
    renderer = fig.canvas.get_renderer()
    for ax, todo in zip(axes, labelled, strict=True):
        _place_labels(ax, todo, renderer)
    return fig


# Offsets (points) tried in turn for a label: beside, above, below, left of its marker.
_OFFSETS = [(7, 5), (7, -15), (-7, 5), (-7, -15), (9, -5), (-9, -5), (0, 10), (0, -22)]
_OFFSETS += [(dx * 2, dy * 2) for dx, dy in _OFFSETS]


def _place_labels(ax: Any, todo: list[tuple[float, float, str]], renderer: Any) -> list[Any]:
    """Annotate each ``(x, y, text)`` at the first offset whose box overlaps no earlier label,
    no marker and not the legend, and stays inside the axes (else the least overlapping)."""
    markers = [ax.transData.transform((x, y)) for x, y, _ in todo]
    r = 5.0  # marker half-size in pixels
    taken = [(mx - r, my - r, mx + r, my + r) for mx, my in markers]
    if ax.get_legend() is not None:
        taken.append(tuple(ax.get_legend().get_window_extent(renderer).extents))
    inside = ax.get_window_extent(renderer)
    placed = []
    for x, y, text in todo:
        best = None
        for dx, dy in _OFFSETS:
            ann = ax.annotate(
                text,
                (x, y),
                textcoords="offset points",
                xytext=(dx, dy),
                ha="left" if dx >= 0 else "right",
                fontsize=PARETO_FONT,
            )
            b = ann.get_window_extent(renderer)
            box = (b.x0, b.y0, b.x1, b.y1)
            cost = sum(_overlap(box, t) for t in taken)
            cost += 10 * (b.width * b.height - _overlap(box, tuple(inside.extents)))
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, ann, box)
            else:
                ann.remove()
            if cost == 0:
                break
        assert best is not None
        taken.append(best[2])
        placed.append(best[1])
    return placed


def _overlap(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Area of the intersection of two ``(x0, y0, x1, y1)`` boxes."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return max(w, 0.0) * max(h, 0.0)
