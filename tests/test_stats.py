"""Paired statistics over repeated cross-validation, checked against scipy on fixed numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from msamil_core.evaluation.metrics import classification_metrics
from msamil_core.evaluation.stats import (PairedResult, compare, corrected_ttest, format_difference,
                                          kfold_test_train_ratio, paired_bootstrap, paired_runs)

# 3 repeats x 5 folds of AUC differences (fixed numbers, not drawn)
D = [0.04, -0.01, 0.06, 0.02, 0.00, 0.05, 0.03, -0.02, 0.07, 0.01, 0.02, 0.04, 0.00, 0.03, 0.05]


def test_ratio_zero_is_scipy_paired_ttest():
    a = np.array(D) + 0.9
    b = np.full(len(D), 0.9)
    ours = corrected_ttest(a - b, test_train_ratio=0.0)
    ref = sps.ttest_rel(a, b)
    assert ours.p_value == pytest.approx(ref.pvalue, rel=1e-9)
    ci = sps.ttest_1samp(a - b, 0.0).confidence_interval(0.95)
    assert (ours.ci_low, ours.ci_high) == pytest.approx((ci.low, ci.high), rel=1e-9)
    assert ours.mean == pytest.approx(np.mean(D)) and ours.n == 15


def test_corrected_variance_and_p_value():
    ratio = kfold_test_train_ratio(5)
    assert ratio == 0.25
    ours = corrected_ttest(D, ratio)
    d = np.array(D)
    se = math.sqrt((1 / 15 + 0.25) * d.var(ddof=1))
    t = d.mean() / se
    assert ours.p_value == pytest.approx(2 * sps.t.sf(abs(t), 14), rel=1e-9)
    half = sps.t.ppf(0.975, 14) * se
    assert (ours.ci_low, ours.ci_high) == pytest.approx((d.mean() - half, d.mean() + half), rel=1e-9)
    # the correction widens the interval: significant uncorrected, not corrected
    assert corrected_ttest(D, 0.0).p_value < 0.05 < ours.p_value
    assert ours.significant is False and corrected_ttest(D, 0.0).significant is True


def test_degenerate_differences():
    assert corrected_ttest([0.0] * 5, 0.25).p_value == 1.0
    const = corrected_ttest([0.1] * 5, 0.25)
    assert const.p_value == 0.0 and const.ci_low == const.ci_high == pytest.approx(0.1)
    one = corrected_ttest([0.3, float("nan")], 0.25)
    assert one.n == 1 and math.isnan(one.p_value) and not one.significant


def test_compare_pairs_runs_present_in_both():
    a = {(0, 0): {"auc": 0.9}, (0, 1): {"auc": 0.8}, (1, 0): {"auc": None}, (1, 1): {"auc": 0.7}}
    b = {(0, 0): {"auc": 0.85}, (0, 1): {"auc": 0.8}, (1, 0): {"auc": 0.6}, (2, 0): {"auc": 0.5}}
    assert paired_runs(a, b, "auc") == [((0, 0), 0.9, 0.85), ((0, 1), 0.8, 0.8)]
    result = compare(a, b, "auc", 0.25)
    assert result.n == 2 and result.mean == pytest.approx(0.025)


def test_paired_bootstrap_over_slides():
    rng = np.random.default_rng(3)
    y = np.array([0, 1] * 20)
    s = 0.6 * y + 0.4 * rng.random(40)
    good = np.stack([1 - s, s], 1)
    noise = rng.random((40, 2))

    def auc(yy, p):
        if len(np.unique(yy)) < 2:
            return float("nan")
        return classification_metrics(yy, p, ["a", "b"])["auc"]

    better = paired_bootstrap([y, y], [good, good], [noise, noise], auc, n_boot=300)
    assert better.mean == pytest.approx(auc(y, good) - auc(y, noise))
    assert better.ci_low <= better.mean <= better.ci_high
    assert better.significant and better.ci_low > 0
    same = paired_bootstrap([y], [good], [good], auc, n_boot=50)
    assert same.mean == 0 and same.p_value == 1.0 and not same.significant


def test_format_difference_cuts_at_the_range():
    wide = PairedResult(0.459, -0.090, 1.007, 0.2, 3, "corrected t", False)
    assert format_difference(wide) == "+0.459 [-0.090, +1.007]"
    assert format_difference(wide, (-1.0, 1.0)) == "+0.459 [-0.090, +1.000†]"
    inside = PairedResult(0.1, -0.2, 0.4, 0.5, 3, "corrected t", False)
    assert format_difference(inside, (-1.0, 1.0)) == "+0.100 [-0.200, +0.400]"
    assert format_difference(PairedResult(math.nan, math.nan, math.nan, math.nan, 0, "", False)) == "n/a"
