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
    fig = _figure(10, 4.2)
    axes = [fig.add_subplot(1, 2, i + 1) for i in range(2)]
    markers = ["o", "s", "^", "D", "v"]
    for ax, key, ylabel in zip(
        axes,
        ("fd", "confidence"),
        ("Fréchet distance to held-out real (lower is better)", "classifier confidence"),
        strict=True,
    ):
        for i, (name, points) in enumerate(sweeps.items()):
            xs = [float(p["deviation"]) for p in points]
            ys = [float(p[key]) for p in points]
            ax.plot(xs, ys, marker=markers[i % len(markers)], label=name)
            for p, x, y in zip(points, xs, ys, strict=True):
                ax.annotate(
                    str(p["label"]), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7
                )
        if baseline is not None:
            ax.plot(
                [0.0],
                [float(baseline[key])],
                marker="*",
                markersize=12,
                linestyle="none",
                color="black",
                label="no guidance",
            )
        ax.set_xlabel("deviation from the unguided sample of the same seed (RMS)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
