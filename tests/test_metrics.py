"""Fold metrics against sklearn and hand-checked cases, absent classes, predictions.csv, summary, plots."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
from PIL import Image
from sklearn.calibration import calibration_curve
from sklearn.metrics import (
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    roc_auc_score,
    roc_curve,
)

from msamil_core.evaluation.metrics import (
    classification_metrics,
    read_predictions,
    reliability,
    summarize,
    write_predictions,
)
from msamil_core.reporting.plots import plot_confusion_matrices, plot_roc_curves, roc_points, summed_confusion


def softmax_fold(n: int, n_classes: int, separation: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels and class probabilities where the true class gets a logit boost of ``separation``."""
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n) % n_classes)  # every class present
    logits = rng.normal(size=(n, n_classes))
    logits[np.arange(n), y] += separation
    p = np.exp(logits)
    return y, p / p.sum(axis=1, keepdims=True)


def test_binary_hand_checked():
    y = np.array([0, 0, 1, 1])
    p1 = np.array([0.1, 0.4, 0.35, 0.8])
    m = classification_metrics(y, np.stack([1 - p1, p1], axis=1), ["normal", "tumor"])
    # Of the 4 (positive, negative) pairs only (0.35, 0.4) is mis-ordered: AUC 3/4.
    assert m["auc"] == pytest.approx(0.75)
    # Predictions (argmax) 0, 0, 0, 1: three right; recalls 1 and 1/2.
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["balanced_accuracy"] == pytest.approx(0.75)
    # F1: normal 2*(2/3)*1/(2/3+1) = 0.8, tumor 2*1*(1/2)/(1+1/2) = 2/3.
    assert m["f1_macro"] == pytest.approx((0.8 + 2 / 3) / 2)
    assert m["confusion_matrix"] == [[2, 0], [1, 1]]
    assert m["n_slides"] == 4 and m["classes_present"] == ["normal", "tumor"]
    fpr, tpr, _ = roc_curve(y, p1)
    assert m["roc"]["tumor"] == {"fpr": fpr.tolist(), "tpr": tpr.tolist()}


def test_three_classes_match_sklearn():
    y, p = softmax_fold(60, 3, separation=1.0, seed=0)
    m = classification_metrics(y, p, ["a", "b", "c"])
    pred = p.argmax(axis=1)
    assert m["auc"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"))
    assert m["accuracy"] == pytest.approx(np.mean(pred == y))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["f1_macro"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert m["confusion_matrix"] == confusion_matrix(y, pred).tolist()
    for c, name in enumerate("abc"):
        assert m["auc_per_class"][name] == pytest.approx(roc_auc_score(y == c, p[:, c]))
    assert 0.5 < m["auc"] < 1.0  # a real, imperfect signal: the case is not degenerate
    assert json.loads(json.dumps(m, allow_nan=False)) == m


def test_absent_class_macro_over_present(caplog):
    y, p = softmax_fold(30, 3, separation=1.0, seed=1)
    keep = y != 2
    y, p = y[keep], p[keep]
    pred = p.argmax(axis=1)
    assert (pred == 2).any()  # predictions into the absent class must still count against recall
    with caplog.at_level(logging.WARNING, logger="msamil.metrics"):
        m = classification_metrics(y, p, ["a", "b", "c"])
    assert "absent" in caplog.text and "'c'" in caplog.text
    assert m["classes_present"] == ["a", "b"]
    assert m["auc_per_class"]["c"] is None and m["roc"]["c"] is None
    expected_auc = np.mean([roc_auc_score(y == c, p[:, c]) for c in (0, 1)])
    assert m["auc"] == pytest.approx(expected_auc)
    assert m["balanced_accuracy"] == pytest.approx(np.mean([np.mean(pred[y == c] == c) for c in (0, 1)]))
    assert m["f1_macro"] == pytest.approx(f1_score(y, pred, labels=[0, 1], average="macro"))
    assert m["confusion_matrix"][2] == [0, 0, 0] and len(m["confusion_matrix"]) == 3
    assert json.loads(json.dumps(m, allow_nan=False)) == m


def test_single_class_has_no_auc(caplog):
    y = np.array([1, 1, 1])
    p = np.array([[0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    with caplog.at_level(logging.WARNING, logger="msamil.metrics"):
        m = classification_metrics(y, p, ["normal", "tumor"])
    assert m["auc"] is None and "AUC undefined" in caplog.text
    assert m["accuracy"] == pytest.approx(2 / 3) and m["balanced_accuracy"] == pytest.approx(2 / 3)
    assert json.dumps(m, allow_nan=False)


@pytest.mark.parametrize(
    "y, p, message",
    [
        ([0, 1], [[0.5, 0.5, 0.0], [0.1, 0.9, 0.0]], r"probs must be \[N, 2\]"),
        ([0, 2], [[0.5, 0.5], [0.1, 0.9]], "class indices 0..1"),
        ([0], [[0.5, 0.5], [0.1, 0.9]], "y_true must be"),
        ([0, 1], [[np.nan, 0.5], [0.1, 0.9]], "NaN"),
    ],
)
def test_bad_inputs(y, p, message):
    with pytest.raises(ValueError, match=message):
        classification_metrics(np.asarray(y), np.asarray(p), ["x", "y"])


def test_predictions_csv(tmp_path):
    y, p = softmax_fold(12, 3, separation=2.0, seed=2)
    ids = [f"slide {i:03d}" for i in range(12)]
    path = tmp_path / "fold0" / "predictions.csv"
    write_predictions(path, ids, y, p, ["bland", "atypical", "mixed"])
    lines = path.read_text().splitlines()
    assert lines[0] == "slide_id,label,predicted,prob_bland,prob_atypical,prob_mixed"
    assert len(lines) == 13
    first = lines[1].split(",")
    assert first[0] == "slide 000"
    assert first[1] == ["bland", "atypical", "mixed"][y[0]]
    assert first[2] == ["bland", "atypical", "mixed"][p[0].argmax()]
    ids_back, y_back, p_back, classes = read_predictions(path)
    assert ids_back == ids and classes == ["bland", "atypical", "mixed"]
    np.testing.assert_array_equal(y_back, y)
    np.testing.assert_allclose(p_back, p, rtol=1e-12)
    assert [q.name for q in path.parent.iterdir()] == ["predictions.csv"]
    with pytest.raises(ValueError, match="slide ids"):
        write_predictions(path, ids[:-1], y, p, ["bland", "atypical", "mixed"])


def test_summary_mean_sd_over_folds():
    per_fold = {
        "abmil": {k: classification_metrics(*softmax_fold(40, 2, 1.5, seed=k), ["n", "t"]) for k in range(4)},
        "msamil": {0: classification_metrics(*softmax_fold(40, 2, 2.5, seed=9), ["n", "t"])},
    }
    per_fold["abmil"][3]["auc"] = None  # an undefined AUC in one fold
    table = summarize(per_fold)
    assert list(table.columns) == ["experiment", "metric", "mean", "sd", "n_folds"]
    assert list(table["experiment"].unique()) == ["abmil", "msamil"]
    assert set(table["metric"]) == {"auc", "accuracy", "balanced_accuracy", "f1_macro", "ece"}
    row = table.set_index(["experiment", "metric"])
    acc = [per_fold["abmil"][k]["accuracy"] for k in range(4)]
    assert row.loc[("abmil", "accuracy"), "mean"] == pytest.approx(np.mean(acc))
    assert row.loc[("abmil", "accuracy"), "sd"] == pytest.approx(np.std(acc, ddof=1))
    assert row.loc[("abmil", "accuracy"), "n_folds"] == 4
    auc = [per_fold["abmil"][k]["auc"] for k in range(3)]
    assert row.loc[("abmil", "auc"), "mean"] == pytest.approx(np.mean(auc))
    assert row.loc[("abmil", "auc"), "n_folds"] == 3
    assert math.isnan(row.loc[("msamil", "auc"), "sd"]) and row.loc[("msamil", "auc"), "n_folds"] == 1


def metrics_for(experiments: list[str], n_classes: int, n_folds: int = 3) -> dict:
    classes = [f"class_{c}" for c in range(n_classes)]
    return {
        e: {k: classification_metrics(*softmax_fold(30, n_classes, 1.0 + i, seed=10 * i + k), classes) for k in range(n_folds)}
        for i, e in enumerate(experiments)
    }


def png_image(path) -> Image.Image:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as img:
        img.verify()
    img = Image.open(path)
    img.load()
    return img


@pytest.mark.parametrize("n_classes", [2, 4])
def test_plots_are_png_panels(tmp_path, n_classes):
    one = metrics_for(["abmil.base"], n_classes)
    two = metrics_for(["abmil.base", "msamil.base"], n_classes)
    for name, plot in (("roc", plot_roc_curves), ("confusion", plot_confusion_matrices)):
        plot(tmp_path / f"{name}1.png", one)
        plot(tmp_path / f"{name}2.png", two)
        a, b = png_image(tmp_path / f"{name}1.png"), png_image(tmp_path / f"{name}2.png")
        assert 250 <= a.width <= 1200 and 250 <= a.height <= 1200, a.size
        assert b.width > 1.8 * a.width and b.height == a.height  # panels side by side
        pixels = np.asarray(a.convert("L"), dtype=np.float64)
        assert (pixels < 128).mean() > 0.005  # drawn content, not a blank page
        assert (pixels > 250).mean() > 0.3  # mostly white background


def test_roc_points_and_summed_confusion():
    per_fold = metrics_for(["x"], 3)["x"]
    for metrics in per_fold.values():
        fpr, tpr = roc_points(metrics)
        assert fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1
        assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= -1e-12)
        # The area under the macro-average curve is close to the macro AUC.
        area = np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2)  # trapezoids
        assert area == pytest.approx(metrics["auc"], abs=0.05)
    classes, total = summed_confusion(per_fold)
    assert classes == ["class_0", "class_1", "class_2"]
    assert total.sum() == sum(m["n_slides"] for m in per_fold.values())
    np.testing.assert_array_equal(total, sum(np.asarray(m["confusion_matrix"]) for m in per_fold.values()))
    per_fold[1] = dict(per_fold[1], classes=["class_0", "class_1", "other"])
    with pytest.raises(ValueError, match="differ"):
        summed_confusion(per_fold)


def test_numpy_scores_match_sklearn_on_random_folds_with_ties():
    """The numpy ROC, AUC, F1 and confusion matrix against sklearn's, on folds with tied scores,
    absent classes and classes never predicted."""
    rng = np.random.default_rng(7)
    for trial in range(200):
        n, c = int(rng.integers(2, 40)), int(rng.integers(2, 5))
        y = rng.integers(0, c, n)
        p = rng.integers(0, 6, size=(n, c)).astype(float) + 1e-3  # few distinct values: many ties
        p /= p.sum(axis=1, keepdims=True)
        m = classification_metrics(y, p, [f"k{i}" for i in range(c)])
        pred = p.argmax(axis=1)
        present = sorted(set(y.tolist()))
        assert m["f1_macro"] == pytest.approx(f1_score(y, pred, labels=present, average="macro", zero_division=0))
        assert m["confusion_matrix"] == confusion_matrix(y, pred, labels=list(range(c))).tolist()
        for k in range(c):
            positive = y == k
            if positive.all() or not positive.any():
                assert m["auc_per_class"][f"k{k}"] is None
                continue
            fpr, tpr, _ = roc_curve(positive, p[:, k])
            assert m["roc"][f"k{k}"]["fpr"] == pytest.approx(fpr.tolist()), trial
            assert m["roc"][f"k{k}"]["tpr"] == pytest.approx(tpr.tolist()), trial
            assert m["auc_per_class"][f"k{k}"] == pytest.approx(roc_auc_score(positive, p[:, k])), trial


@pytest.mark.parametrize("n_classes", [2, 3])
@pytest.mark.parametrize("bins", [5, 10])
def test_reliability_and_ece_match_sklearns_calibration_curve(n_classes, bins):
    y, p = softmax_fold(200, n_classes, 1.0, seed=n_classes + bins)
    p[:7, 0], p[:7, 1:] = 1.0, 0.0  # confidences on the edges 0 and 1
    p[7:11] = 1.0 / n_classes
    if n_classes == 2:  # the positive class's probability on an inner bin edge
        p[11:15] = [0.7, 0.3]
    m = classification_metrics(y, p, [f"c{i}" for i in range(n_classes)], ece_bins=bins)
    rel = m["reliability"]
    # sklearn's definition: positive class with two classes, the top label's hit with more
    hit, conf = ((y == 1), p[:, 1]) if n_classes == 2 else ((p.argmax(1) == y), p.max(1))
    prob_true, prob_pred = calibration_curve(hit.astype(int), conf, n_bins=bins, strategy="uniform")
    assert rel["kind"] == ("positive class" if n_classes == 2 else "top label") and rel["bins"] == bins
    np.testing.assert_allclose(rel["accuracy"], prob_true, rtol=1e-12)
    np.testing.assert_allclose(rel["confidence"], prob_pred, rtol=1e-12)
    assert sum(rel["count"]) == len(y)
    # ECE: the bins' |outcome rate - confidence| weighted by their share of the slides
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    counts = np.bincount(which, minlength=bins)
    assert counts[counts > 0].tolist() == rel["count"]
    expected = np.sum(counts[counts > 0] / len(y) * np.abs(prob_true - prob_pred))
    assert m["ece"] == pytest.approx(expected, abs=1e-12)
    assert reliability(y, p, bins)["ece"] == m["ece"]


def test_ece_is_zero_when_confidence_matches_the_outcome_rate():
    y = np.array([1] * 8 + [0] * 2 + [1] * 3 + [0] * 7)
    p1 = np.array([0.8] * 10 + [0.3] * 10)  # 80 % positive at 0.8, 30 % positive at 0.3
    m = classification_metrics(y, np.stack([1 - p1, p1], axis=1), ["normal", "tumor"])
    assert m["ece"] == pytest.approx(0.0, abs=1e-12)
    assert m["reliability"]["count"] == [10, 10]
    assert "ece" in set(summarize({"x": {0: m}})["metric"])  # a score of the summary (lower is better)
