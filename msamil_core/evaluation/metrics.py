"""Slide-level classification metrics of one fold, predictions.csv, and the summary over folds.

Classes absent from a fold's test part: a small cohort split five ways can leave a fold
without some label. Then every macro average (AUC, balanced accuracy, F1) is taken over the
classes present in the true labels only, and the metrics list those classes under
``classes_present``. AUC needs positives and negatives: with two classes it is the positive
(second) class's AUC, undefined (``None``, with a logged warning) when the test part holds a
single class; with more classes it is the mean one-vs-rest AUC of the present classes,
undefined when only one class is present. Undefined values are ``None`` so that metrics.json
stays strict JSON; :func:`summarize` treats them as missing.

The scores are computed here with numpy, and the tests check them against scikit-learn's
(``roc_curve``, ``roc_auc_score``, ``f1_score``, ``confusion_matrix``): importing sklearn.metrics
takes about 1.6 s, which every training job of the workflow would pay for a few sums.

Calibration (:func:`reliability`, ``ece`` of :func:`classification_metrics`): the confidences
fall into equal-width bins on [0, 1] (``bins`` of them, right edges included, as
``sklearn.calibration.calibration_curve(strategy="uniform")`` bins them); with two classes the
confidence is the positive (second) class's probability and the outcome whether the slide is
positive, with more the top label's probability and whether the top label is right. The expected
calibration error is the mean over slides of |outcome rate - mean confidence| of their bin.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from ..fileio import atomic_path
from ..settings import ECE_BINS

log = logging.getLogger("msamil.metrics")

# Keys of a metrics dict that are counts, not scores: left out of the summary over folds.
_NOT_SCORES = frozenset({"n_slides", "inference_seconds", "training_seconds", "temperature"})


def _check_inputs(y_true: Any, probs: Any, classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    p = np.asarray(probs, dtype=np.float64)
    if len(classes) < 2:
        raise ValueError(f"need at least 2 classes, got {list(classes)}")
    if p.ndim != 2 or p.shape[1] != len(classes):
        raise ValueError(f"probs must be [N, {len(classes)}] (one column per class), got shape {p.shape}")
    if y.ndim != 1 or y.shape[0] != p.shape[0]:
        raise ValueError(f"y_true must be [N] with N = {p.shape[0]} (rows of probs), got shape {y.shape}")
    if y.shape[0] == 0:
        raise ValueError("no slides: metrics need at least one prediction")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= len(classes):
        raise ValueError(f"y_true must hold class indices 0..{len(classes) - 1}")
    if not np.isfinite(p).all():
        raise ValueError("probs holds NaN or infinite values")
    return y.astype(np.int64), p


def roc(positive: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """ROC curve and its area for one class against the rest.

    One point per distinct score, from the highest down, starting at (0, 0); points on a
    straight line between their neighbours are dropped (the area is unchanged). Tied scores
    make a diagonal step, so the area equals the probability that a random positive scores
    above a random negative, ties counting one half. Needs positives and negatives.

    Returns:
        ``(fpr, tpr, auc)``: float arrays of equal length and the area under them.
    """
    order = np.argsort(-score, kind="mergesort")
    hits = np.asarray(positive, dtype=bool)[order].astype(np.int64)
    ends = np.r_[np.flatnonzero(np.diff(score[order])), len(order) - 1]  # last row of each distinct score
    tps = np.cumsum(hits)[ends]
    fps = ends + 1 - tps
    if len(tps) > 2:  # keep corners only
        corner = np.r_[True, (np.diff(fps, 2) != 0) | (np.diff(tps, 2) != 0), True]
        tps, fps = tps[corner], fps[corner]
    tpr = np.r_[0, tps] / tps[-1]
    fpr = np.r_[0, fps] / fps[-1]
    auc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    return fpr, tpr, auc


def reliability(y_true: Any, probs: Any, bins: int = ECE_BINS) -> dict[str, Any]:
    """Reliability of class probabilities in ``bins`` equal-width confidence bins.

    Args:
        y_true: [N] int class indices.
        probs: [N, C] class probabilities (C >= 2).
        bins: number of equal-width bins on [0, 1].

    Returns:
        A JSON-ready dict: ``kind`` (``positive class`` with two classes, else ``top label``;
        see the module docstring), ``bins``, ``ece``, and per non-empty bin, in order,
        ``confidence`` (mean predicted probability), ``accuracy`` (outcome rate) and ``count``
        (slides). ``confidence`` and ``accuracy`` are sklearn's ``prob_pred`` and ``prob_true``.
    """
    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(probs, dtype=np.float64)
    if p.shape[1] == 2:
        kind, confidence, outcome = "positive class", p[:, 1], (y == 1).astype(np.float64)
    else:
        kind, confidence, outcome = "top label", p.max(axis=1), (p.argmax(axis=1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.searchsorted(edges[1:-1], confidence)  # bin i holds (edge_i, edge_i+1]; the first holds 0 too
    count = np.bincount(which, minlength=bins)
    conf_sum = np.bincount(which, weights=confidence, minlength=bins)
    hit_sum = np.bincount(which, weights=outcome, minlength=bins)
    kept = count > 0
    mean_conf, rate = conf_sum[kept] / count[kept], hit_sum[kept] / count[kept]
    ece = float(np.sum(count[kept] * np.abs(rate - mean_conf)) / max(len(y), 1))
    return {"kind": kind, "bins": int(bins), "ece": ece, "confidence": mean_conf.tolist(), "accuracy": rate.tolist(),
            "count": count[kept].astype(int).tolist()}


def classification_metrics(y_true: Any, probs: Any, classes: Sequence[str], ece_bins: int = ECE_BINS) -> dict[str, Any]:
    """Metrics of one fold's test part.

    Args:
        y_true: [N] int class indices into ``classes``.
        probs: [N, C] class probabilities (or any scores; the prediction is the argmax).
        classes: the C class names, in column order.

    Returns:
        A JSON-ready dict: ``n_slides``; ``auc``, ``accuracy``, ``balanced_accuracy``,
        ``f1_macro``, ``ece`` (floats, ``auc`` may be None; ``ece`` over ``ece_bins`` bins,
        :func:`reliability`); ``classes``; ``classes_present`` (in the true
        labels); ``auc_per_class`` {class: float or None}; ``confusion_matrix`` [C][C] counts,
        rows true class, columns predicted, in class order; ``roc`` {class: {"fpr": [...],
        "tpr": [...]} or None}, one-vs-rest curve points; ``reliability``, the bins of
        :func:`reliability` without ``ece``. See the module docstring for absent classes.
    """
    y, p = _check_inputs(y_true, probs, classes)
    classes = [str(c) for c in classes]
    pred = p.argmax(axis=1)
    present = [int(c) for c in np.unique(y)]

    auc_per_class: dict[str, float | None] = {}
    curves: dict[str, dict[str, list[float]] | None] = {}
    for c, name in enumerate(classes):
        positive = y == c
        if positive.all() or not positive.any():
            auc_per_class[name], curves[name] = None, None
            continue
        fpr, tpr, auc_per_class[name] = roc(positive, p[:, c])
        curves[name] = {"fpr": fpr.tolist(), "tpr": tpr.tolist()}

    if len(classes) == 2:
        auc = auc_per_class[classes[1]]
    else:
        # Present classes with a defined AUC are exactly the present ones when two or more are present.
        values = [auc_per_class[classes[c]] for c in present if auc_per_class[classes[c]] is not None]
        auc = float(np.mean(values)) if values else None
    absent = [classes[c] for c in range(len(classes)) if c not in present]
    if auc is None:
        log.warning("AUC undefined: the test part holds only class %r", classes[present[0]])
    elif absent:
        log.warning("class(es) %s absent from the test part; macro averages cover %s", absent, [classes[c] for c in present])

    recalls = [float(np.mean(pred[y == c] == c)) for c in present]
    confusion = np.zeros((len(classes), len(classes)), dtype=np.int64)  # rows true, columns predicted
    np.add.at(confusion, (y, pred), 1)
    # F1 of a class = 2 TP / (2 TP + FP + FN); 0 when the class is neither present nor predicted
    f1 = [2 * confusion[c, c] / max(1, confusion[c, :].sum() + confusion[:, c].sum()) for c in present]
    calibration = reliability(y, p, ece_bins)
    return {
        "n_slides": int(len(y)),
        "auc": auc,
        "accuracy": float(np.mean(pred == y)),
        "balanced_accuracy": float(np.mean(recalls)),
        "f1_macro": float(np.mean(f1)),
        "classes": classes,
        "classes_present": [classes[c] for c in present],
        "auc_per_class": auc_per_class,
        "confusion_matrix": confusion.tolist(),
        "roc": curves,
        "ece": calibration.pop("ece"),
        "reliability": calibration,
    }


def write_predictions(path: str | os.PathLike, slide_ids: Sequence[str], y_true: Any, probs: Any, classes: Sequence[str]) -> None:
    """Write predictions.csv atomically: ``slide_id, label, predicted, prob_<class>...``.

    ``label`` and ``predicted`` are class names (``predicted`` is the argmax of ``probs``);
    one ``prob_<class>`` column per class, in class order.
    """
    y, p = _check_inputs(y_true, probs, classes)
    if len(slide_ids) != len(y):
        raise ValueError(f"{len(slide_ids)} slide ids for {len(y)} predictions")
    names = np.asarray([str(c) for c in classes], dtype=object)
    table = pd.DataFrame({"slide_id": [str(s) for s in slide_ids], "label": names[y], "predicted": names[p.argmax(axis=1)]})
    for c, name in enumerate(names):
        table[f"prob_{name}"] = p[:, c]
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)


def read_predictions(path: str | os.PathLike) -> tuple[list[str], np.ndarray, np.ndarray, list[str]]:
    """Read a predictions.csv back: ``(slide_ids, y_true [N] int, probs [N, C], classes)``."""
    table = pd.read_csv(path, dtype={"slide_id": str, "label": str, "predicted": str}, keep_default_na=False)
    prob_columns = [c for c in table.columns if c.startswith("prob_")]
    classes = [c[len("prob_"):] for c in prob_columns]
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted(set(table["label"]) - index.keys())
    if unknown:
        raise ValueError(f"{path}: label(s) {unknown} have no prob_ column")
    y = table["label"].map(index).to_numpy(dtype=np.int64)
    return table["slide_id"].tolist(), y, table[prob_columns].to_numpy(dtype=np.float64), classes


def summarize(metrics_per_fold: Mapping[str, Mapping[Any, Mapping[str, Any]]]) -> pd.DataFrame:
    """Mean and sd over folds of every score, per experiment.

    Args:
        metrics_per_fold: ``{experiment: {fold: metrics dict}}`` (dicts as from
            :func:`classification_metrics`; any top-level number is a score, except counts).

    Returns:
        Columns ``experiment, metric, mean, sd, n_folds``: one row per experiment and score,
        experiments in the given order, scores in order of first appearance. ``n_folds``
        counts the folds where the score is defined (not None/NaN); ``sd`` is the sample
        standard deviation (ddof 1), NaN with fewer than two such folds.
    """
    rows = []
    for experiment, folds in metrics_per_fold.items():
        names: list[str] = []
        for metrics in folds.values():
            for key, value in metrics.items():
                is_score = value is None or (isinstance(value, (int, float, np.number)) and not isinstance(value, bool))
                if is_score and key not in _NOT_SCORES and key not in names:
                    names.append(key)
        for name in names:
            values = np.array([m.get(name) for m in folds.values()], dtype=np.float64)  # None -> NaN
            values = values[np.isfinite(values)]
            rows.append(
                {
                    "experiment": experiment,
                    "metric": name,
                    "mean": float(values.mean()) if len(values) else math.nan,
                    "sd": float(values.std(ddof=1)) if len(values) > 1 else math.nan,
                    "n_folds": int(len(values)),
                }
            )
    return pd.DataFrame(rows, columns=["experiment", "metric", "mean", "sd", "n_folds"])
