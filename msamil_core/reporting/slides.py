"""The report's slide-level tables, for reviewing slides: the cohort per fold (folds.csv) and each
experiment's test predictions, one row per slide, misclassified slides first, linked to the
slide's heatmap page where there is one.

A slide is tested once per repeat, by the model of the fold that held it out; the per-slide table
shows the first repeat's (``fold<k>/predictions.csv``), the split every experiment shares.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import MsamilError


def cohort_table(folds: pd.DataFrame) -> pd.DataFrame:
    """Slides, patients and slides per class of each test fold and of the whole cohort, from a
    folds table (:func:`~msamil_core.training.splits.read_folds`)."""
    classes = sorted(folds["label"].unique())
    rows = []
    for fold, part in [*sorted(folds.groupby("fold")), ("all", folds)]:
        counts = part["label"].value_counts()
        rows.append({"fold": fold, "slides": len(part), "patients": part["patient_id"].nunique(),
                     **{f"{c} (slides)": int(counts.get(c, 0)) for c in classes}})
    return pd.DataFrame(rows)


def read_fold_predictions(fold_dirs: dict[tuple[int, int], Path]) -> list[tuple[int, list[str], np.ndarray, np.ndarray,
                                                                             list[str]]]:
    """The first repeat's test predictions of an experiment (``{(repeat, fold): fold folder}``,
    as :func:`~msamil_core.reporting.report.run_dirs` gives), one ``(fold, slide_ids, y_true [N],
    probs [N, C], classes)`` per fold with a predictions.csv: every slide of the cohort once."""
    from ..evaluation.metrics import read_predictions

    out = []
    for (repeat, fold), directory in fold_dirs.items():
        path = directory / "predictions.csv"
        if repeat or not path.exists():
            continue
        try:
            out.append((fold, *read_predictions(path)))
        except (OSError, ValueError, KeyError, pd.errors.ParserError) as exc:
            raise MsamilError(f"{path}: cannot read the fold's predictions ({exc}); rerun `msamil evaluate`") from None
    return out


def fold_predictions(fold_dirs: dict[tuple[int, int], Path]) -> pd.DataFrame:
    """The first repeat's test predictions of an experiment (:func:`read_fold_predictions`) as
    one table: ``slide_id, label, predicted, fold, p_predicted, p_true`` (the probabilities of the
    predicted and of the true class)."""
    frames = []
    for fold, slide_ids, y, probs, classes in read_fold_predictions(fold_dirs):
        predicted = probs.argmax(axis=1)
        rows = range(len(slide_ids))
        frames.append(pd.DataFrame({"slide_id": slide_ids, "label": [classes[i] for i in y],
                                    "predicted": [classes[i] for i in predicted], "fold": fold,
                                    "p_predicted": probs[rows, predicted], "p_true": probs[rows, y]}))
    columns = ["slide_id", "label", "predicted", "fold", "p_predicted", "p_true"]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


def review_rows(predictions: pd.DataFrame, heatmap_pages: dict[str, str] | None = None) -> list[dict]:
    """The per-slide table's rows (dicts for the template): misclassified slides first, then the
    correct ones, each part from the lowest probability of the true class up (the most confidently
    wrong, then the least sure right, first); ``heatmap`` is the slide's page (a path relative to
    the report) or None."""
    order = predictions.assign(correct=predictions["label"] == predictions["predicted"])
    order = order.sort_values(["correct", "p_true", "slide_id"], kind="stable")
    pages = heatmap_pages or {}
    return [{"slide_id": r.slide_id, "label": r.label, "predicted": r.predicted, "correct": bool(r.correct),
             "fold": int(r.fold), "p_predicted": float(r.p_predicted), "p_true": float(r.p_true),
             "heatmap": pages.get(r.slide_id)} for r in order.itertuples()]


def slide_review(fold_dirs: dict[str, dict[tuple[int, int], Path]],
                 heatmap_pages: dict[str, dict[str, str]]) -> list[dict]:
    """Per experiment (``{experiment: its fold folders}``): its name, the :func:`review_rows`
    linked to its heatmap pages (``{experiment: {slide: page}}``) and the count misclassified;
    experiments without predictions.csv are left out."""
    out = []
    for name, dirs in fold_dirs.items():
        predictions = fold_predictions(dirs)
        if len(predictions):
            rows = review_rows(predictions, heatmap_pages.get(name))
            out.append({"name": name, "rows": rows, "wrong": sum(not r["correct"] for r in rows)})
    return out


def relative_link(path: str | os.PathLike, report_dir: str | os.PathLike) -> str:
    """A path as the report links it: relative to the report folder, with forward slashes."""
    return Path(os.path.relpath(path, report_dir)).as_posix()
