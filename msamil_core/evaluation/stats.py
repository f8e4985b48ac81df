"""Paired comparisons of two experiments over repeated cross-validation.

Two experiments trained on the same folds of the same repeats give one paired difference per
(repeat, fold) test part, ``d_j = score_a - score_b``, ``j = 1 .. J`` (``J = R x k``). The test
parts of one repeat are disjoint, but the training sets of any two runs overlap heavily, so the
``d_j`` are positively correlated and the plain paired t-test's variance ``s^2 / J`` is too small
(its type-I error is far above the nominal level; Dietterich 1998). Two tests suited to this:

:func:`corrected_ttest` (Nadeau & Bengio 2003, corrected resampled t-test; Bouckaert & Frank
2004 for repeated k-fold CV): the variance of the mean difference is
``(1 / J + n_test / n_train) s^2``, with ``s^2`` the sample variance (ddof 1) of the ``d_j``;
``t = mean / sqrt(that)`` on ``J - 1`` degrees of freedom, a two-sided p-value, and the 95 %
interval ``mean ± t_{0.975, J-1} sqrt(that)``. For k-fold CV ``n_test / n_train = 1 / (k - 1)``
(:func:`kfold_test_train_ratio`); with ratio 0 the test is the ordinary paired t-test
(``scipy.stats.ttest_rel``), which the unit tests check.

:func:`paired_bootstrap` (over slides): the test predictions of every repeat are pooled per
experiment (each slide is tested once per repeat); slides are resampled with replacement, the
score of each experiment is computed per repeat on the resample and averaged over repeats, and
the difference's 2.5 / 97.5 % percentiles are the interval; the two-sided p-value is twice the
smaller tail share of bootstrap differences at or beyond zero (floored at ``1 / (B + 1)``).

A difference is significant when its p-value is below ``alpha`` (0.05). Constant differences
(``s = 0``): p = 1 when they are all zero (nothing differs), 0 otherwise (every run moved the
same way), and the interval collapses to the mean.

Only numpy and scipy.special are used (scipy ships with scikit-learn).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

ALPHA = 0.05


@dataclass
class PairedResult:
    """A paired difference ``a - b``: its mean, 95 % interval, p-value and number of pairs."""

    mean: float
    ci_low: float
    ci_high: float
    p_value: float
    n: int
    test: str
    significant: bool

    def as_dict(self) -> dict:
        return asdict(self)


def kfold_test_train_ratio(n_folds: int) -> float:
    """``n_test / n_train`` of k-fold cross-validation: ``1 / (k - 1)``."""
    if n_folds < 2:
        raise ValueError(f"k-fold CV needs at least 2 folds, got {n_folds}")
    return 1.0 / (n_folds - 1)


def _t_sf(t: float, df: int) -> float:
    """Upper tail of Student's t with ``df`` degrees of freedom."""
    from scipy.special import stdtr

    return float(stdtr(df, -t))


def _t_quantile(q: float, df: int) -> float:
    from scipy.special import stdtrit

    return float(stdtrit(df, q))


def corrected_ttest(differences: Sequence[float], test_train_ratio: float, alpha: float = ALPHA) -> PairedResult:
    """Nadeau-Bengio corrected resampled t-test of paired differences (module docstring).

    Args:
        differences: ``d_j`` of the J (repeat, fold) runs; NaN entries (an undefined score) are dropped.
        test_train_ratio: ``n_test / n_train`` of one run (0 = the plain paired t-test).
        alpha: significance level; the interval is ``1 - alpha``.

    Returns:
        :class:`PairedResult`; NaN p-value and interval with fewer than two pairs.
    """
    d = np.asarray(differences, dtype=np.float64)
    d = d[np.isfinite(d)]
    n = len(d)
    if test_train_ratio < 0:
        raise ValueError(f"test_train_ratio must be >= 0, got {test_train_ratio}")
    if n < 2:
        mean = float(d.mean()) if n else math.nan
        return PairedResult(mean, math.nan, math.nan, math.nan, n, "corrected t", False)
    mean = float(d.mean())
    var = float(d.var(ddof=1))
    if var <= 1e-24 * max(1.0, mean * mean):
        p = 1.0 if mean == 0 else 0.0
        return PairedResult(mean, mean, mean, p, n, "corrected t", p < alpha)
    se = math.sqrt((1.0 / n + test_train_ratio) * var)
    t = mean / se
    p = min(1.0, 2.0 * _t_sf(abs(t), n - 1))
    half = _t_quantile(1.0 - alpha / 2, n - 1) * se
    return PairedResult(mean, mean - half, mean + half, p, n, "corrected t", p < alpha)


def paired_bootstrap(
    y_true: Sequence[np.ndarray],
    scores_a: Sequence[np.ndarray],
    scores_b: Sequence[np.ndarray],
    metric: Callable[[np.ndarray, np.ndarray], float],
    n_boot: int = 2000,
    seed: int = 0,
    alpha: float = ALPHA,
) -> PairedResult:
    """Paired bootstrap over slides of ``metric(a) - metric(b)`` (module docstring).

    Args:
        y_true: per repeat, the [N] class indices of the N slides (the same slides, in the same
            order, in every repeat and for both experiments).
        scores_a, scores_b: per repeat, each experiment's [N, C] test probabilities.
        metric: ``metric(y, probs) -> float`` (NaN where undefined on a resample; skipped).
        n_boot: resamples.

    Returns:
        :class:`PairedResult` with ``mean`` the difference on the original slides.
    """
    if not (len(y_true) == len(scores_a) == len(scores_b)) or not len(y_true):
        raise ValueError("paired_bootstrap: one y_true and two score arrays per repeat")
    n = len(y_true[0])

    def diff(idx: np.ndarray) -> float:
        values = [metric(y[idx], a[idx]) - metric(y[idx], b[idx]) for y, a, b in zip(y_true, scores_a, scores_b)]
        return float(np.mean(values))

    observed = diff(np.arange(n))
    rng = np.random.default_rng(seed)
    boots = np.array([diff(rng.integers(0, n, n)) for _ in range(n_boot)])
    boots = boots[np.isfinite(boots)]
    if not len(boots):
        return PairedResult(observed, math.nan, math.nan, math.nan, n, "paired bootstrap", False)
    low, high = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
    tail = min(np.mean(boots <= 0), np.mean(boots >= 0))
    p = float(min(1.0, max(2 * tail, 1.0 / (len(boots) + 1))))
    if np.all(boots == 0):
        p = 1.0
    return PairedResult(observed, float(low), float(high), p, n, "paired bootstrap", p < alpha)


def paired_runs(a: Mapping, b: Mapping, metric: str) -> list[tuple[object, float, float]]:
    """``(run, a's score, b's score)`` of the runs (keys: (repeat, fold)) both experiments
    have, where the score is defined in both, in run order."""
    out = []
    for run in sorted(set(a) & set(b)):
        x, y = a[run].get(metric), b[run].get(metric)
        if x is not None and y is not None and math.isfinite(x) and math.isfinite(y):
            out.append((run, float(x), float(y)))
    return out


def compare(a: Mapping, b: Mapping, metric: str, test_train_ratio: float, alpha: float = ALPHA) -> PairedResult:
    """:func:`corrected_ttest` of ``a - b`` on ``metric`` over the runs both experiments have
    (``{(repeat, fold): metrics dict}``)."""
    pairs = paired_runs(a, b, metric)
    return corrected_ttest([x - y for _, x, y in pairs], test_train_ratio, alpha)


CUT_MARK = "†"  # beside an interval bound that :func:`format_difference` cut at the difference's range


def format_difference(result: PairedResult, bounds: tuple[float, float] | None = None) -> str:
    """``+0.012 [-0.030, +0.054]`` (``n/a`` when undefined).

    ``bounds``: the range the difference can take, e.g. ``(-1, 1)`` for two scores in [0, 1]. The
    t interval is symmetric and can reach past it with few, spread runs; such a bound is cut at
    the range and marked :data:`CUT_MARK` (``+0.459 [-0.090, +1.000†]``), so a reader sees both
    that the interval is wider than the scores allow and where it would stop.
    """
    if not math.isfinite(result.mean):
        return "n/a"
    if not math.isfinite(result.ci_low):
        return f"{result.mean:+.3f}"
    low, high = result.ci_low, result.ci_high
    low_cut = high_cut = ""
    if bounds is not None:
        if low < bounds[0]:
            low, low_cut = bounds[0], CUT_MARK
        if high > bounds[1]:
            high, high_cut = bounds[1], CUT_MARK
    return f"{result.mean:+.3f} [{low:+.3f}{low_cut}, {high:+.3f}{high_cut}]"


def format_p(p: float) -> str:
    if not math.isfinite(p):
        return "n/a"
    return "<0.001" if p < 0.001 else f"{p:.3f}"
