"""Evaluation: slide-level classification metrics, predictions.csv and the summary over folds
(:mod:`.metrics`), and paired comparisons of experiments over repeated cross-validation
(:mod:`.stats`). Training and reporting both use them, so they live below both."""
