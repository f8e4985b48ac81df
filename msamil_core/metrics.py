"""Slide-level classification metrics of one fold, predictions.csv, and the summary over folds.

Classes absent from a fold's test part: a small cohort split five ways can leave a fold
without some label. Then every macro average (AUC, balanced accuracy, F1) is taken over the
classes present in the true labels only, and the metrics list those classes under
``classes_present``. AUC needs positives and negatives: with two classes it is the positive
(second) class's AUC, undefined (``None``, with a logged warning) when the test part holds a
single class; with more classes it is the mean one-vs-rest AUC of the present classes,
undefined when only one class is present. Undefined values are ``None`` so that metrics.json
stays strict JSON; :func:`summarize` treats them as missing.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from .fileio import atomic_path

log = logging.getLogger("msamil.metrics")

# Keys of a metrics dict that are counts, not scores: left out of the summary over folds.
_NOT_SCORES = frozenset({"n_slides"})


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


def _number(x: float) -> float | None:
    """A JSON-ready float: NaN becomes None."""
    x = float(x)
    return None if math.isnan(x) else x


def classification_metrics(y_true: Any, probs: Any, classes: Sequence[str]) -> dict[str, Any]:
    """Metrics of one fold's test part.

    Args:
        y_true: [N] int class indices into ``classes``.
        probs: [N, C] class probabilities (or any scores; the prediction is the argmax).
        classes: the C class names, in column order.

    Returns:
        A JSON-ready dict: ``n_slides``; ``auc``, ``accuracy``, ``balanced_accuracy``,
        ``f1_macro`` (floats, ``auc`` may be None); ``classes``; ``classes_present`` (in the true
        labels); ``auc_per_class`` {class: float or None}; ``confusion_matrix`` [C][C] counts,
        rows true class, columns predicted, in class order; ``roc`` {class: {"fpr": [...],
        "tpr": [...]} or None}, one-vs-rest curve points. See the module docstring for absent
        classes.
    """
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, roc_auc_score, roc_curve

    y, p = _check_inputs(y_true, probs, classes)
    classes = [str(c) for c in classes]
    pred = p.argmax(axis=1)
    present = [int(c) for c in np.unique(y)]

    auc_per_class: dict[str, float | None] = {}
    roc: dict[str, dict[str, list[float]] | None] = {}
    for c, name in enumerate(classes):
        positive = y == c
        if positive.all() or not positive.any():
            auc_per_class[name], roc[name] = None, None
            continue
        auc_per_class[name] = float(roc_auc_score(positive, p[:, c]))
        fpr, tpr, _ = roc_curve(positive, p[:, c])
        roc[name] = {"fpr": fpr.tolist(), "tpr": tpr.tolist()}

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
    return {
        "n_slides": int(len(y)),
        "auc": auc,
        "accuracy": float(accuracy_score(y, pred)),
        "balanced_accuracy": float(np.mean(recalls)),
        "f1_macro": float(f1_score(y, pred, labels=present, average="macro", zero_division=0)),
        "classes": classes,
        "classes_present": [classes[c] for c in present],
        "auc_per_class": auc_per_class,
        "confusion_matrix": confusion_matrix(y, pred, labels=list(range(len(classes)))).tolist(),
        "roc": roc,
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
