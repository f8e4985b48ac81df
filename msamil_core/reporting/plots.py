"""Report plots as PNG: ROC curves and confusion matrices, one panel per experiment.

Drawn with Pillow (a dependency already, for masks and thumbnails) rather than matplotlib,
which msamil does not install. Everything is drawn at twice the output size and downsampled,
which anti-aliases lines and text. Inputs are the per-fold metrics dicts of
:func:`msamil_core.metrics.classification_metrics`, as ``{experiment: {fold: metrics}}``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

import numpy as np

from ..fileio import atomic_path
from .metrics import summarize

# matplotlib's tab10: distinct, colour-blind tolerant fold colours.
PALETTE = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
]
_SS = 2  # supersampling factor
_INK = (30, 30, 30)
_GRID = (225, 225, 225)
_BLUES = ((247, 251, 255), (8, 48, 107))  # confusion matrix colour map, 0 -> 1 row fraction

MetricsPerFold = Mapping[str, Mapping[Any, Mapping[str, Any]]]


@lru_cache(maxsize=None)
def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size * _SS)
    except (TypeError, OSError, ImportError):  # Pillow < 10.1 or without FreeType: fixed-size bitmap font
        return ImageFont.load_default()


class _Canvas:
    """A white RGB image with drawing in output pixels (scaled by the supersampling factor)."""

    def __init__(self, width: int, height: int):
        from PIL import Image, ImageDraw

        self.width, self.height = width, height
        self.image = Image.new("RGB", (width * _SS, height * _SS), "white")
        self.draw = ImageDraw.Draw(self.image)

    @staticmethod
    def text_size(text: str, size: int) -> tuple[float, float]:
        """Width and height of ``text`` in output pixels."""
        left, top, right, bottom = _font(size).getbbox(text)
        return (right - left) / _SS, (bottom - top) / _SS

    def text(self, xy: tuple[float, float], text: str, size: int = 12, align: str = "left", valign: str = "top",
             color: tuple[int, int, int] = _INK, vertical: bool = False) -> None:
        """Write ``text`` with (x, y) at its left/center/right and top/middle/bottom; ``vertical``
        turns it 90° counter-clockwise (reading bottom to top). Alignment is done here, not with
        Pillow's anchors, which the bitmap fallback font does not support."""
        from PIL import Image, ImageDraw

        font = _font(size)
        left, top, right, bottom = font.getbbox(text)
        stamp = Image.new("L", (max(1, right - left), max(1, bottom - top)), 0)
        ImageDraw.Draw(stamp).text((-left, -top), text, fill=255, font=font)
        if vertical:
            stamp = stamp.rotate(90, expand=True)
        w, h = stamp.size
        x = xy[0] * _SS - {"left": 0, "center": w / 2, "right": w}[align]
        y = xy[1] * _SS - {"top": 0, "middle": h / 2, "bottom": h}[valign]
        self.image.paste(Image.new("RGB", stamp.size, color), (round(x), round(y)), stamp)

    def line(self, points: Sequence[tuple[float, float]], color=_INK, width: float = 1.0, dash: float = 0.0) -> None:
        """A polyline; with ``dash`` > 0, dashes of that length (output px) along it."""
        pts = [(x * _SS, y * _SS) for x, y in points]
        if dash <= 0:
            self.draw.line(pts, fill=color, width=max(1, round(width * _SS)), joint="curve")
            return
        for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
            n = max(1, int(math.hypot(x1 - x0, y1 - y0) / (dash * _SS)))
            for i in range(0, n, 2):
                a, b = i / n, min(1.0, (i + 1) / n)
                self.draw.line([(x0 + a * (x1 - x0), y0 + a * (y1 - y0)), (x0 + b * (x1 - x0), y0 + b * (y1 - y0))],
                               fill=color, width=max(1, round(width * _SS)))

    def rect(self, box: tuple[float, float, float, float], fill=None, outline=None, width: float = 1.0) -> None:
        self.draw.rectangle([v * _SS for v in box], fill=fill, outline=outline, width=max(1, round(width * _SS)))


def _save_grid(path: str | os.PathLike, panels: list[_Canvas], max_columns: int = 3) -> None:
    """Lay panels out left to right, top to bottom, in equal cells; downsample; write atomically."""
    from PIL import Image

    columns = min(max_columns, len(panels))
    rows = math.ceil(len(panels) / columns)
    cell_w = max(p.image.width for p in panels)
    cell_h = max(p.image.height for p in panels)
    sheet = Image.new("RGB", (columns * cell_w, rows * cell_h), "white")
    for i, panel in enumerate(panels):
        sheet.paste(panel.image, ((i % columns) * cell_w, (i // columns) * cell_h))
    sheet = sheet.resize((sheet.width // _SS, sheet.height // _SS), Image.Resampling.LANCZOS)
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG", optimize=True)


def _check(metrics_per_fold: MetricsPerFold) -> None:
    if not metrics_per_fold or not all(metrics_per_fold.values()):
        raise ValueError("nothing to plot: need at least one experiment with at least one fold")


def roc_points(metrics: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray] | None:
    """The ROC curve of one fold as (fpr, tpr): the positive (second) class's curve with two
    classes; with more, the macro average of the present classes' one-vs-rest curves (tpr
    interpolated on the union of their fpr values, from (0, 0)). None where no curve is defined."""
    classes, roc = metrics["classes"], metrics["roc"]
    if len(classes) == 2:
        curve = roc.get(classes[1])
        return (np.asarray(curve["fpr"]), np.asarray(curve["tpr"])) if curve else None
    curves = [c for c in roc.values() if c]
    if not curves:
        return None
    fpr = np.unique(np.concatenate([c["fpr"] for c in curves]))
    tpr = np.mean([np.interp(fpr, c["fpr"], c["tpr"]) for c in curves], axis=0)
    # np.interp reads a vertical step at fpr 0 as its top; the curve still starts at the origin.
    return np.concatenate([[0.0], fpr]), np.concatenate([[0.0], tpr])


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _axes(canvas: _Canvas, box: tuple[float, float, float, float], x_range: tuple[float, float],
          y_range: tuple[float, float], xlabel: str, ylabel: str, xfmt: str, yfmt: str) -> None:
    """Grid lines, five-interval tick labels and axis titles of a plot area (left, top, width, height)."""
    left, top, width, height = box
    right, bottom = left + width, top + height
    for i in range(6):
        t = i / 5
        x, y = left + t * width, bottom - t * height
        canvas.line([(x, top), (x, bottom)], color=_GRID)
        canvas.line([(left, y), (right, y)], color=_GRID)
        canvas.text((x, bottom + 5), xfmt.format(x_range[0] + t * (x_range[1] - x_range[0])), size=11, align="center")
        canvas.text((left - 6, y), yfmt.format(y_range[0] + t * (y_range[1] - y_range[0])), size=11, align="right",
                    valign="middle")
    canvas.text((left + width / 2, bottom + 24), xlabel, size=12, align="center")
    canvas.text((14, top + height / 2), ylabel, size=12, align="center", valign="middle", vertical=True)


def _roc_panel(experiment: str, folds: Mapping[Any, Mapping[str, Any]], auc_mean: float, auc_sd: float) -> _Canvas:
    left, top, side = 64, 56, 360
    canvas = _Canvas(left + side + 20, top + side + 50)
    right, bottom = left + side, top + side
    multiclass = len(next(iter(folds.values()))["classes"]) > 2

    canvas.text((left + side / 2, 8), experiment, size=15, align="center")
    subtitle = f"AUC {_fmt(auc_mean)} ± {_fmt(auc_sd)} over {len(folds)} folds"
    canvas.text((left + side / 2, 30), subtitle + (" (macro-average ROC)" if multiclass else ""), size=11, align="center")
    _axes(canvas, (left, top, side, side), (0.0, 1.0), (0.0, 1.0), "False positive rate", "True positive rate",
          "{:.1f}", "{:.1f}")
    canvas.line([(left, bottom), (right, top)], color=(150, 150, 150), width=1.2, dash=5)

    entries = []
    for i, (fold, metrics) in enumerate(folds.items()):
        color = PALETTE[i % len(PALETTE)]
        points = roc_points(metrics)
        if points is not None:
            fpr, tpr = points
            canvas.line([(left + a * side, bottom - b * side) for a, b in zip(fpr, tpr)], color=color, width=2)
        entries.append((f"fold {fold}  AUC {_fmt(metrics.get('auc'))}", color, False))
    entries.append(("chance", (150, 150, 150), True))
    canvas.rect((left, top, right, bottom), outline=_INK)

    # Legend in the lower right, where ROC curves seldom go.
    row = 16
    width = max(canvas.text_size(label, 11)[0] for label, _, _ in entries) + 36
    x0, y0 = right - width - 8, bottom - row * len(entries) - 12
    canvas.rect((x0, y0, right - 8, bottom - 8), fill="white", outline=(190, 190, 190))
    for j, (label, color, dashed) in enumerate(entries):
        y = y0 + 6 + j * row + row / 2
        canvas.line([(x0 + 6, y), (x0 + 26, y)], color=color, width=2, dash=3 if dashed else 0)
        canvas.text((x0 + 32, y), label, size=11, valign="middle")
    return canvas


def plot_roc_curves(path: str | os.PathLike, metrics_per_fold: MetricsPerFold) -> None:
    """ROC curves PNG: one panel per experiment, one curve per fold (see :func:`roc_points`),
    with each fold's AUC and the mean ± sd AUC over folds."""
    _check(metrics_per_fold)
    summary = summarize(metrics_per_fold)
    auc = summary[summary["metric"] == "auc"].set_index("experiment")
    panels = []
    for experiment, folds in metrics_per_fold.items():
        mean, sd = (auc.at[experiment, "mean"], auc.at[experiment, "sd"]) if experiment in auc.index else (None, None)
        panels.append(_roc_panel(str(experiment), folds, mean, sd))
    _save_grid(path, panels)


def summed_confusion(folds: Mapping[Any, Mapping[str, Any]]) -> tuple[list[str], np.ndarray]:
    """Class names and the confusion matrix summed over folds (rows true, columns predicted)."""
    classes = None
    total = None
    for fold, metrics in folds.items():
        if classes is None:
            classes = list(metrics["classes"])
            total = np.zeros((len(classes), len(classes)), dtype=np.int64)
        elif list(metrics["classes"]) != classes:
            raise ValueError(f"fold {fold}: classes {metrics['classes']} differ from the other folds' {classes}")
        total += np.asarray(metrics["confusion_matrix"], dtype=np.int64)
    return classes, total


def _confusion_panel(experiment: str, folds: Mapping[Any, Mapping[str, Any]]) -> _Canvas:
    classes, matrix = summed_confusion(folds)
    n = len(classes)
    cell = int(min(96, max(30, 320 // n)))
    name_w = max(_Canvas.text_size(c, 11)[0] for c in classes)
    side, top = cell * n, 56
    title, subtitle = experiment, f"confusion matrix, summed over {len(folds)} folds"
    # Titles are centred over the matrix; the margins grow where they are wider than it.
    half_title = max(_Canvas.text_size(title, 15)[0], _Canvas.text_size(subtitle, 11)[0]) / 2 + 10
    left = int(max(name_w + 36, half_title - side / 2))
    center = left + side / 2
    canvas = _Canvas(int(max(left + side + 20, center + half_title)), top + side + int(name_w) + 40)

    canvas.text((center, 8), title, size=15, align="center")
    canvas.text((center, 30), subtitle, size=11, align="center")
    rows = matrix.sum(axis=1, keepdims=True)
    fraction = np.divide(matrix, rows, out=np.zeros(matrix.shape), where=rows > 0)
    for i in range(n):
        for j in range(n):
            f = float(fraction[i, j])
            fill = tuple(round(a + f * (b - a)) for a, b in zip(*_BLUES))
            x, y = left + j * cell, top + i * cell
            canvas.rect((x, y, x + cell, y + cell), fill=fill, outline="white")
            ink = "white" if f > 0.5 else _INK
            canvas.text((x + cell / 2, y + cell / 2), str(matrix[i, j]), size=13 if cell >= 40 else 11,
                        align="center", valign="bottom" if cell >= 48 else "middle", color=ink)
            if cell >= 48:  # room for the row percentage under the count
                canvas.text((x + cell / 2, y + cell / 2 + 3), f"{100 * f:.0f}%", size=10, align="center", color=ink)
    canvas.rect((left, top, left + side, top + side), outline=_INK)
    for k, name in enumerate(classes):
        canvas.text((left - 6, top + k * cell + cell / 2), name, size=11, align="right", valign="middle")
        canvas.text((left + k * cell + cell / 2, top + side + 6), name, size=11, align="center", vertical=True)
    canvas.text((center, top + side + name_w + 14), "Predicted", size=12, align="center")
    canvas.text((6, top + side / 2), "True", size=12, align="left", valign="middle", vertical=True)
    return canvas


def plot_confusion_matrices(path: str | os.PathLike, metrics_per_fold: MetricsPerFold) -> None:
    """Confusion matrices PNG: one panel per experiment, counts summed over folds, cells
    shaded by the fraction of their true class (row)."""
    _check(metrics_per_fold)
    _save_grid(path, [_confusion_panel(str(e), folds) for e, folds in metrics_per_fold.items()])


def plot_curves(path: str | os.PathLike, curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
                xlabel: str, ylabel: str, title: str = "") -> None:
    """Line plot PNG of named (x, y) curves on shared axes, e.g. training loss against step per K."""
    if not curves:
        raise ValueError("plot_curves: no curves to draw")
    xs = np.concatenate([np.asarray(x, float) for x, _ in curves.values()])
    ys = np.concatenate([np.asarray(y, float) for _, y in curves.values()])
    x0, x1 = float(xs.min()), float(max(xs.max(), xs.min() + 1e-9))
    pad = 0.05 * max(float(ys.max() - ys.min()), 1e-9)
    y0, y1 = float(ys.min()) - pad, float(ys.max()) + pad
    left, top, width, height = 70, 40, 480, 300
    canvas = _Canvas(left + width + 20, top + height + 50)
    right, bottom = left + width, top + height

    def at(x: float, y: float) -> tuple[float, float]:
        return left + (x - x0) / (x1 - x0) * width, bottom - (y - y0) / (y1 - y0) * height

    canvas.text((left + width / 2, 10), title, size=14, align="center")
    _axes(canvas, (left, top, width, height), (x0, x1), (y0, y1), xlabel, ylabel, "{:.0f}", "{:.3g}")
    for i, (label, (x, y)) in enumerate(curves.items()):
        color = PALETTE[i % len(PALETTE)]
        canvas.line([at(a, b) for a, b in zip(x, y)], color=color, width=2)
        canvas.line([(right - 110, top + 12 + 16 * i), (right - 90, top + 12 + 16 * i)], color=color, width=2)
        canvas.text((right - 84, top + 12 + 16 * i), label, size=11, valign="middle")
    canvas.rect((left, top, right, bottom), outline=_INK)
    _save_grid(path, [canvas])
