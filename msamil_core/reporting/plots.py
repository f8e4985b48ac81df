"""Report charts as PNG with matplotlib (Agg): ROC curves, confusion matrices, reliability
diagrams, line plots (learning curves, the K study's loss curves).

Inputs of the ROC and confusion charts are the per-fold metrics dicts of
:func:`msamil_core.evaluation.metrics.classification_metrics`, as ``{experiment: {fold: metrics}}``;
each chart has one panel per experiment, side by side (at most three per row).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..evaluation.metrics import summarize
from ..fileio import atomic_path

MetricsPerFold = Mapping[str, Mapping[Any, Mapping[str, Any]]]
PANEL = 4.2  # inches per panel side
DPI = 100


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed); imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike, dpi: int = DPI, compress_level: int = 6) -> None:
    """Write a figure as PNG atomically and close it (``compress_level`` 1 for photos such as
    thumbnails, which compress little and slowly)."""
    plt = pyplot()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, pil_kwargs={"compress_level": compress_level})
    plt.close(fig)


def _panels(n: int, columns: int = 3):
    """A figure of ``n`` equal panels in rows of at most ``columns``; (figure, flat list of axes)."""
    plt = pyplot()
    cols = min(columns, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(PANEL * cols, PANEL * rows), squeeze=False)
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.set_axis_off()
    return fig, flat[:n]


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


def plot_roc_curves(path: str | os.PathLike, metrics_per_fold: MetricsPerFold) -> None:
    """ROC curves PNG: one panel per experiment, one curve per fold (see :func:`roc_points`),
    with each fold's AUC and the mean ± sd AUC over folds."""
    _check(metrics_per_fold)
    summary = summarize(metrics_per_fold)
    auc = summary[summary["metric"] == "auc"].set_index("experiment")
    fig, axes = _panels(len(metrics_per_fold))
    for ax, (experiment, folds) in zip(axes, metrics_per_fold.items()):
        mean, sd = (auc.at[experiment, "mean"], auc.at[experiment, "sd"]) if experiment in auc.index else (None, None)
        multiclass = len(next(iter(folds.values()))["classes"]) > 2
        for fold, metrics in folds.items():
            points = roc_points(metrics)
            repeat, k = fold if isinstance(fold, tuple) else (0, fold)
            if repeat:  # repeats after the first: thin, unlabelled lines (15 entries would hide the panel)
                style = {"linewidth": 0.6, "color": "0.55", "label": "_nolegend_"}
            else:  # a perfect fold runs along the frame: keep it visible above the axes' spines
                style = {"linewidth": 1.6, "label": f"fold {k}  AUC {_fmt(metrics.get('auc'))}", "clip_on": False,
                         "zorder": 3}
            ax.plot(*(points if points is not None else ([], [])), **style)
        ax.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=1, label="chance")
        ax.set(xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), xlabel="False positive rate", ylabel="True positive rate",
               aspect="equal")
        ax.set_title(f"{experiment}\nAUC {_fmt(mean)} ± {_fmt(sd)} over {len(folds)} test folds"
                     + ("\nmacro-average ROC" if multiclass else ""), fontsize=10)  # one line ran into the next panel
        ax.grid(color="0.9")
        ax.legend(loc="lower right", fontsize=7, frameon=True)
    fig.tight_layout()
    save_figure(fig, path)


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


def plot_confusion_matrices(path: str | os.PathLike, metrics_per_fold: MetricsPerFold) -> None:
    """Confusion matrices PNG: one panel per experiment, counts summed over folds, cells
    shaded by the fraction of their true class (row)."""
    _check(metrics_per_fold)
    fig, axes = _panels(len(metrics_per_fold))
    for ax, (experiment, folds) in zip(axes, metrics_per_fold.items()):
        classes, matrix = summed_confusion(folds)
        rows = matrix.sum(axis=1, keepdims=True)
        fraction = np.divide(matrix, rows, out=np.zeros(matrix.shape), where=rows > 0)
        ax.imshow(fraction, cmap="Blues", vmin=0, vmax=1)
        n = len(classes)
        for i in range(n):
            for j in range(n):
                ink = "white" if fraction[i, j] > 0.5 else "0.1"
                ax.text(j, i, f"{matrix[i, j]}\n{100 * fraction[i, j]:.0f}%", ha="center", va="center", color=ink,
                        fontsize=9 if n <= 4 else 7)
        ax.set_xticks(range(n), classes, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(n), classes, fontsize=8)
        ax.set(xlabel="Predicted", ylabel="True")
        ax.set_title(f"{experiment}\nconfusion matrix, summed over {len(folds)} test folds", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def plot_curves(path: str | os.PathLike, curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
                xlabel: str, ylabel: str, title: str = "") -> None:
    """Line plot PNG of named (x, y) curves on shared axes, e.g. training loss against step per K."""
    if not curves:
        raise ValueError("plot_curves: no curves to draw")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, (x, y) in curves.items():
        ax.plot(x, y, linewidth=1.8, label=label)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(color="0.9")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def plot_k_study(study_dir: str | os.PathLike) -> None:
    """``k_study.png`` in a K study's folder from its ``k_study.csv`` (k, step, loss; written by
    :func:`msamil_core.training.e2e.write_k_study`): training loss against step per K, smoothed
    over a window of a tenth of the steps."""
    import pandas as pd

    study_dir = Path(study_dir)
    # float() reads back the very losses training wrote (pandas < 3's default parser may miss by an ulp)
    rows = pd.read_csv(study_dir / "k_study.csv", converters={"loss": float})
    curves = {}
    for k, group in rows.groupby("k"):
        losses = group.sort_values("step", kind="stable")["loss"].to_numpy()
        window = max(1, len(losses) // 10)
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        curves[f"K = {k}"] = (np.arange(len(smooth)) + window - 1, smooth)
    plot_curves(study_dir / "k_study.png", curves, xlabel="optimizer step",
                ylabel="training loss (moving average)", title="End-to-end training loss against K")


def plot_learning_curve(path: str | os.PathLike, points: Mapping[str, tuple[Sequence[float], ...]],
                        title: str = "", ylabel: str = "test AUC") -> None:
    """AUC against the share of training patients, one line per arm with its 95 % band:
    ``points`` = {arm: (fractions, mean, low, high)} (NaN bounds draw no band there)."""
    if not points:
        raise ValueError("plot_learning_curve: no points")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for arm, (x, mean, low, high) in points.items():
        x, mean, low, high = (np.asarray(v, dtype=float) for v in (x, mean, low, high))
        line, = ax.plot(100 * x, mean, marker="o", linewidth=1.8, label=arm)
        # scores live in [0, 1]: the interval of the mean is cut there
        ax.fill_between(100 * x, np.clip(low, 0, 1), np.clip(high, 0, 1), color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set(xlabel="training patients per fold (%)", ylabel=ylabel, title=title, xscale="log")
    ax.set_xticks([10, 25, 50, 100], ["10", "25", "50", "100"])
    ax.grid(color="0.9")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def plot_reliability(path: str | os.PathLike, experiment: str, curve: Mapping[str, Any]) -> None:
    """Reliability diagram PNG of one experiment: the outcome rate against the mean confidence of
    each non-empty bin (marker area by its slides), the diagonal of perfect calibration, and the
    slides per bin below. ``curve``: :func:`~msamil_core.evaluation.metrics.reliability`'s dict
    with ``classes`` added."""
    plt = pyplot()
    fig, (ax, counts) = plt.subplots(2, 1, figsize=(PANEL, PANEL * 1.35), sharex=True,
                                     gridspec_kw={"height_ratios": [3, 1]})
    edges = np.linspace(0.0, 1.0, curve["bins"] + 1)
    conf, rate, n = (np.asarray(curve[k], dtype=float) for k in ("confidence", "accuracy", "count"))
    ax.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=1, label="calibrated")
    ax.vlines(conf, np.minimum(conf, rate), np.maximum(conf, rate), color="tab:red", linewidth=1.2, alpha=0.6,
              label="gap")
    ax.plot(conf, rate, color="tab:blue", linewidth=1.2)
    ax.scatter(conf, rate, s=15 + 85 * n / max(n.max(), 1), color="tab:blue", zorder=3, clip_on=False, label="bin")
    positive = curve["kind"] == "positive class"
    what = f"P({curve['classes'][1]})" if positive else "top-label probability"
    ax.set(xlim=(0, 1), ylim=(-0.02, 1.02), ylabel=f"share {curve['classes'][1]}" if positive else "share correct",
           aspect="auto")
    ax.set_title(f"{experiment}\nECE {curve['ece']:.3f} over {int(n.sum())} test slides, {curve['bins']} bins",
                 fontsize=10)
    ax.grid(color="0.9")
    ax.legend(loc="upper left", fontsize=7)
    counts.hist(conf, bins=edges, weights=n, color="0.55")  # each bin's slides, at its own bin
    counts.set(xlabel=f"mean predicted {what}", ylabel="slides")
    fig.tight_layout()
    save_figure(fig, path)
