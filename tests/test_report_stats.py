"""The report over repeated cross-validation: runs of every repeat, paired comparisons with the
corrected t-test, the ablation section and learning curves, on hand-made experiment folders."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from msamil_core.evaluation.metrics import classification_metrics
from msamil_core.evaluation.stats import corrected_ttest
from msamil_core.reporting import tables
from msamil_core.reporting.report import load_experiment, write_report

CLASSES = ["a", "b"]


def _run(directory: Path, auc_shift: float, seed: int, config: dict, seconds: float = 2.0) -> None:
    """A fold folder: metrics of 10 test slides whose scores separate the classes by auc_shift."""
    rng = np.random.default_rng(seed)
    y = np.array([0, 1] * 5)
    score = np.clip(0.5 + auc_shift * (y - 0.5) + 0.25 * rng.standard_normal(10), 0, 1)
    metrics = classification_metrics(y, np.stack([1 - score, score], 1), CLASSES)
    metrics["inference_seconds"] = 0.1
    directory.mkdir(parents=True)
    (directory / "metrics.json").write_text(json.dumps(metrics))
    (directory / "history.json").write_text(json.dumps([{"epoch": 0, "seconds": seconds / 2}, {"epoch": 1, "seconds": seconds / 2}]))
    torch.save({"model_name": config.get("model", "abmil.base"), "classes": CLASSES, "config": config}, directory / "checkpoint.pt")


def _experiment(root: Path, name: str, shift: float, config: dict, repeats: int = 2, folds: int = 3) -> Path:
    for r in range(repeats):
        for k in range(folds):
            sub = root / name / (f"repeat{r}/" if r else "") / f"fold{k}"
            _run(sub, shift, seed=100 * r + k + hash(name) % 7, config={"name": name, "repeat": r, **config})
    return root / name


def test_report_pairs_runs_over_repeats(tmp_path):
    full = {"model": "msamil.base", "scales": ["20x", "10x", "5x"], "model_args": {"num_queries": 10}}
    exps = {
        "full": _experiment(tmp_path, "full", 0.9, full),
        "single": _experiment(tmp_path, "single", 0.2, {**full, "scales": ["20x"]}),
        "one_query": _experiment(tmp_path, "one_query", 0.5, {**full, "model_args": {"num_queries": 1},
                                                                "ablation_of": "full"}),
        "lc_transfer_25": _experiment(tmp_path, "lc_transfer_25", 0.6, {**full, "task": "t", "train_fraction": 0.25,
                                                                        "init_from": "x.pt"}),
        "lc_scratch_25": _experiment(tmp_path, "lc_scratch_25", 0.3, {**full, "task": "t", "train_fraction": 0.25}),
        "lc_transfer_100": _experiment(tmp_path, "lc_transfer_100", 0.9, {**full, "task": "t", "train_fraction": 1.0,
                                                                          "init_from": "x.pt"}),
        "lc_scratch_100": _experiment(tmp_path, "lc_scratch_100", 0.9, {**full, "task": "t", "train_fraction": 1.0}),
    }
    runs, config = load_experiment(exps["full"])
    assert sorted(runs) == [(r, k) for r in range(2) for k in range(3)]
    assert runs[(1, 2)]["training_seconds"] == pytest.approx(2.0) and config["name"] == "full"

    out = tmp_path / "report"
    summary = write_report({n: str(p) for n, p in exps.items()}, out)
    assert int(summary[(summary.experiment == "full") & (summary.metric == "auc")]["n_folds"].iloc[0]) == 6
    assert "training_seconds" not in set(summary.metric)
    html = (out / "index.html").read_text()
    assert "Nadeau-Bengio" in html and "0.500" in html  # 1 / (3 - 1)
    assert '<h2 id="ablations">Ablations</h2>' in html and "num_queries" in html
    assert (out / "learning_curve_0.png").stat().st_size > 1000
    assert "Learning curve" in html

    # the ablation's Δ AUC and p-value are the corrected t-test over the 6 paired runs
    a, b = load_experiment(exps["full"])[0], load_experiment(exps["one_query"])[0]
    ref = corrected_ttest([a[r]["auc"] - b[r]["auc"] for r in sorted(a)], 0.5)
    per_fold = {n: load_experiment(p)[0] for n, p in exps.items()}
    configs = {n: load_experiment(p)[1] for n, p in exps.items()}
    ablation = tables.ablation_table(configs, per_fold, 0.5)
    cell = ablation["Δ AUC [95% CI]"].iloc[0]
    assert cell == f"{ref.mean:+.3f} [{ref.ci_low:+.3f}, {ref.ci_high:+.3f}]" and cell in html
    p = ablation["p (AUC)"].iloc[0]
    assert (p == "<0.001") if ref.p_value < 0.001 else float(p) == pytest.approx(ref.p_value, abs=5e-4)
    # multi against single scale is drawn with statistics
    group = tables.scale_groups(configs)
    assert group == [["full", "single"]]  # ablations and learning-curve points stay out
    scale = tables.comparison_table(tables.reference_pairs(group[0], configs), per_fold, configs, 0.5)
    assert scale["runs"].iloc[0] == 6 and re.match(r"[+-]\d\.\d{3} \[", scale["Δ AUC [95% CI]"].iloc[0])
    assert scale["Δ AUC [95% CI]"].iloc[0] in html
    # the learning curve's table pairs transfer and scratch at each fraction
    curve = tables.learning_curves(configs, per_fold, 0.5)[0]["table"]
    assert sorted(curve["fraction"]) == [0.25, 1.0]
    assert set(curve["transfer"]) == {"lc_transfer_25", "lc_transfer_100"}


def test_runs_on_other_splits_are_not_paired(tmp_path):
    base = {"model": "abmil.base", "scales": ["20x", "10x", "5x"]}
    same = _experiment(tmp_path, "same", 0.8, {**base, "repeat_splits": False})
    other = _experiment(tmp_path, "other", 0.8, {**base, "scales": ["20x"]})
    from msamil_core.reporting.tables import paired_metrics

    per_fold = {"same": load_experiment(same)[0], "other": load_experiment(other)[0]}
    configs = {"same": load_experiment(same)[1], "other": load_experiment(other)[1]}
    pa, _ = paired_metrics(per_fold, configs, "same", "other")
    assert sorted(pa) == [(0, 0), (0, 1), (0, 2)]  # repeat 1 of "same" is on split 0, of "other" on split 1


def test_e2e_against_frozen_with_training_time(tmp_path):
    base = {"model": "msamil.base", "scales": ["20x", "10x", "5x"], "repeat_splits": False}
    run_dir = tmp_path / "e2e" / "r"
    (run_dir / "fold0").mkdir(parents=True)
    (run_dir / "fold0" / "history.json").write_text(json.dumps([{"epoch": 0, "seconds": 30.0}, {"epoch": 1, "seconds": 30.0}]))
    frozen = _experiment(tmp_path, "frozen", 0.6, base, repeats=3, folds=5)
    twin = _experiment(tmp_path, "frozen_e2e_r", 0.9, {**base, "e2e": {"name": "r", "frozen": "frozen", "dir": str(run_dir)}},
                       repeats=3, folds=1)
    per_fold = {"frozen": load_experiment(frozen)[0], "frozen_e2e_r": load_experiment(twin)[0]}
    configs = {"frozen": load_experiment(frozen)[1], "frozen_e2e_r": load_experiment(twin)[1]}
    table = tables.e2e_table(configs, per_fold, 0.25)
    row = table.iloc[0]
    assert (row["e2e-tuned"], row["frozen"], row["runs"], row["e2e run"]) == ("frozen_e2e_r", "frozen", 3, "r")
    assert row["encoder tuning (s/fold)"] == 60.0 and row["training e2e arm (s/fold)"] == 62.0
    assert row["training frozen arm (s/fold)"] == 2.0
    ref = corrected_ttest([per_fold["frozen_e2e_r"][(r, 0)]["auc"] - per_fold["frozen"][(r, 0)]["auc"] for r in range(3)], 0.25)
    assert row["Δ AUC [95% CI]"] == f"{ref.mean:+.3f} [{ref.ci_low:+.3f}, {ref.ci_high:+.3f}]"


def test_keys_of_later_repeats_complete_a_reused_first_repeat(tmp_path):
    base = {"model": "abmil.base", "scales": ["20x"]}
    _experiment(tmp_path, "x", 0.8, base, repeats=1)
    for k in range(3):  # repeat 1 trained later with ablation_of; repeat 0 reused from a run without
        _run(tmp_path / "x" / "repeat1" / f"fold{k}", 0.8, k, {**base, "ablation_of": "full", "repeat": 1, "seed": 1})
    _, config = load_experiment(tmp_path / "x")
    assert config["ablation_of"] == "full" and config["repeat"] == 0 and "seed" not in config
