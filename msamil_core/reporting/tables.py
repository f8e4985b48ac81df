"""The report's tables, each a pandas DataFrame computed from the experiments' fold metrics
(``{experiment: {fold: metrics}}``) and configs, comparisons found from the configs themselves:
multi- against single-scale (MsaMIL-Net), transfer against scratch (MIL-Lab), e2e-tuned against
frozen features and the K study (MsaMIL-Net sec. 3.4, Campanella et al.), patch-selection
strategies (MsaMIL-Net Table 1) and the lesion segmentation's IoU.

A strategy's extraction time: one ``extract_features`` job per slide writes the bags of all
strategies, encoding the patches they share once, so it is, slide by slide, the job's wall time
(Snakemake's ``benchmark:`` file) times the share of the job's patches that strategy needs
(``len(bag) / patches_encoded``); inference time is each fold's ``inference_seconds``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pandas as pd

from ..errors import MsamilError
from ..evaluation.metrics import summarize

HEADLINE = ("auc", "balanced_accuracy", "accuracy", "f1_macro")
SUMMARY = (*HEADLINE, "ece")  # the summary table's columns: the headline scores and the calibration error
# how the report names the scores of metrics.json (a score not listed: its name, underscores as spaces)
METRIC_LABELS = {"auc": "AUC", "balanced_accuracy": "balanced accuracy", "accuracy": "accuracy",
                 "f1_macro": "macro F1", "ece": "ECE (lower is better)"}
DIFFERENCE_RANGE = (-1.0, 1.0)  # a difference of two scores in [0, 1]


def metric_label(name: str) -> str:
    """The report's name of a score: ``balanced_accuracy`` -> ``balanced accuracy``."""
    return METRIC_LABELS.get(name, name.replace("_", " "))


def mean_sd(mean: float | None, sd: float | None) -> str:
    """``0.912 ± 0.034`` (``n/a`` when undefined; no ± with a single fold)."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "n/a"
    return f"{mean:.3f}" if sd is None or math.isnan(sd) else f"{mean:.3f} ± {sd:.3f}"


def metric(summary: pd.DataFrame, experiment: str, name: str) -> tuple[float, float]:
    """(mean, sd) of one metric of one experiment in a :func:`~msamil_core.evaluation.metrics.summarize` table."""
    row = summary[(summary.experiment == experiment) & (summary.metric == name)]
    return (float(row["mean"].iloc[0]), float(row["sd"].iloc[0])) if len(row) else (math.nan, math.nan)


def summary_table(summary: pd.DataFrame, metrics=SUMMARY) -> pd.DataFrame:
    """One row per experiment: ``mean ± sd`` of each headline metric and ECE (columns named by
    :func:`metric_label`) and the number of folds."""
    rows = []
    for exp, group in summary.groupby("experiment", sort=False):
        by_metric = {r.metric: r for r in group.itertuples()}
        rows.append({"experiment": exp,
                     **{metric_label(m): mean_sd(by_metric[m].mean, by_metric[m].sd) if m in by_metric else "n/a"
                        for m in metrics},
                     "folds": int(max(r.n_folds for r in group.itertuples()))})
    return pd.DataFrame(rows)


def metrics_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Every score of every experiment (a :func:`~msamil_core.evaluation.metrics.summarize`
    table) with readable names and headers, rounded to 4 digits."""
    table = summary.round(4).assign(metric=[metric_label(m) for m in summary["metric"]])
    return table.rename(columns={"n_folds": "folds"})


def calibration(fold_dirs: dict[str, dict], configs: dict[str, dict], per_fold: dict[str, dict],
                summary: pd.DataFrame) -> tuple[pd.DataFrame | None, dict[str, dict]]:
    """The report's calibration: per experiment, its first repeat's test predictions pooled over
    folds (:func:`~msamil_core.reporting.slides.read_fold_predictions`) in the experiment's
    ``ece_bins`` bins (:func:`~msamil_core.evaluation.metrics.reliability`).

    Returns:
        The table (experiment, test slides, pooled ECE, ECE per fold as mean ± sd, the fitted
        temperatures as mean ± sd or ``off``; None without predictions) and ``{experiment:
        reliability dict with its classes}`` for :func:`~msamil_core.reporting.plots.plot_reliability`.
    """
    import numpy as np

    from ..evaluation.metrics import reliability
    from ..settings import ECE_BINS
    from .slides import read_fold_predictions

    rows, curves = [], {}
    for name, dirs in fold_dirs.items():
        found = read_fold_predictions(dirs)
        if not found:
            continue
        classes = found[0][4]
        y = np.concatenate([f[2] for f in found])
        probs = np.concatenate([f[3] for f in found])
        curves[name] = {**reliability(y, probs, int(configs[name].get("ece_bins") or ECE_BINS)), "classes": classes}
        temperatures = [m["temperature"] for m in per_fold[name].values() if "temperature" in m]
        t_sd = float(np.std(temperatures, ddof=1)) if len(temperatures) > 1 else None
        rows.append({"experiment": name, "test slides": len(y), "pooled ECE": round(curves[name]["ece"], 4),
                     "ECE per fold": mean_sd(*metric(summary, name, "ece")),
                     "temperature": mean_sd(float(np.mean(temperatures)), t_sd) if temperatures else "off"})
    return (pd.DataFrame(rows) if rows else None), curves


# ----------------------------------------------------------------------------- paired comparisons


def _split(config: dict, run: tuple[int, int]) -> tuple[int, int]:
    """(split, fold) of a run: with ``repeat_splits`` (the default) repeat r has its own split."""
    repeat, fold = run
    return (repeat if config.get("repeat_splits", True) else 0, fold)


def paired_metrics(per_fold: dict[str, dict], configs: dict[str, dict], a: str, b: str) -> tuple[dict, dict]:
    """The runs of ``a`` and ``b`` that tested the same slides: same repeat and fold, the same
    split (``repeat_splits``) and the same number of test slides."""
    pa, pb = {}, {}
    for run in sorted(set(per_fold[a]) & set(per_fold[b])):
        ma, mb = per_fold[a][run], per_fold[b][run]
        if _split(configs[a], run) == _split(configs[b], run) and ma.get("n_slides") == mb.get("n_slides"):
            pa[run], pb[run] = ma, mb
    return pa, pb


def test_train_ratio(per_fold: dict[str, dict]) -> float:
    """``n_test / n_train`` of the report's k-fold runs: ``1 / (k - 1)`` for the largest fold count."""
    from ..evaluation.stats import kfold_test_train_ratio

    k = max((fold + 1 for runs in per_fold.values() for _, fold in runs), default=2)
    return kfold_test_train_ratio(max(k, 2))


def comparison_table(pairs: list[tuple[str, str]], per_fold: dict[str, dict], configs: dict[str, dict],
                     ratio: float, labels: tuple[str, str] = ("A", "B")) -> pd.DataFrame | None:
    """One row per (A, B) pair: each side's AUC and balanced accuracy (mean ± sd over the paired
    runs) and the paired difference A - B with its 95 % interval and p-value of the corrected
    resampled t-test (:func:`~msamil_core.evaluation.stats.compare`), and whether it is significant."""
    from ..evaluation.stats import compare, format_difference, format_p

    rows = []
    for a, b in pairs:
        if a not in per_fold or b not in per_fold:
            continue
        pa, pb = paired_metrics(per_fold, configs, a, b)
        summary = summarize({a: pa, b: pb}) if pa else None
        row = {labels[0]: a, labels[1]: b, "runs": len(pa)}
        flags = []
        for name, title in (("auc", "AUC"), ("balanced_accuracy", "bal. acc.")):  # both in [0, 1]
            if summary is not None:
                row[f"{title} {labels[0]}"] = mean_sd(*metric(summary, a, name))
                row[f"{title} {labels[1]}"] = mean_sd(*metric(summary, b, name))
            result = compare(pa, pb, name, ratio)
            row[f"Δ {title} [95% CI]"] = format_difference(result, DIFFERENCE_RANGE)
            row[f"p ({title})"] = format_p(result.p_value)
            flags.append(title if result.significant else None)
        row["significant (p < 0.05)"] = ", ".join(f for f in flags if f) or "no"
        rows.append(row)
    return pd.DataFrame(rows) if rows else None


def has_cut(table: pd.DataFrame) -> bool:
    """Whether a comparison table has an interval cut at the range of a difference (a bound
    marked :data:`~msamil_core.evaluation.stats.CUT_MARK`), which the report then says."""
    from ..evaluation.stats import CUT_MARK

    return any(CUT_MARK in str(v) for column in table.columns if str(column).startswith("Δ") for v in table[column])


def reference_pairs(group: list[str], configs: dict[str, dict]) -> list[tuple[str, str]]:
    """The comparisons a group of experiments draws: its first experiment (config order) against
    each other one, and every same-model pair that differs only in scales (more scales first)."""
    pairs = [(group[0], other) for other in group[1:]]
    for i, a in enumerate(group):
        for b in group[i + 1:]:
            ca, cb = configs[a], configs[b]
            if _key(ca, "model", "model_args", "strategy") == _key(cb, "model", "model_args", "strategy") and \
                    len(ca.get("scales") or []) != len(cb.get("scales") or []):
                pair = (a, b) if len(ca.get("scales") or []) > len(cb.get("scales") or []) else (b, a)
                if pair not in pairs and pair[::-1] not in pairs:
                    pairs.append(pair)
    return pairs


def ablation_pairs(configs: dict[str, dict]) -> list[tuple[str, str]]:
    """(full model, ablation) for each experiment with ``ablation_of`` naming a reported experiment."""
    return [(cfg["ablation_of"], name) for name, cfg in configs.items()
            if cfg.get("ablation_of") in configs]


def _main_comparison(cfg: dict) -> bool:
    """Whether an experiment takes part in the scale and strategy comparisons (not an ablation,
    not a learning-curve point, not an e2e twin, trained from scratch)."""
    return (not cfg.get("init_from") and not cfg.get("ablation_of") and not cfg.get("e2e")
            and (cfg.get("train_fraction") or 1.0) >= 1.0)


def _key(config: dict, *fields: str) -> tuple:
    return tuple(json.dumps(config.get(f), sort_keys=True) for f in fields)


def scale_groups(configs: dict[str, dict]) -> list[list[str]]:
    """Groups of from-scratch experiments on the same task that use different scales."""
    groups: dict[tuple, list[str]] = {}
    for name, cfg in configs.items():
        if _main_comparison(cfg):
            groups.setdefault(_key(cfg, "task"), []).append(name)
    return [g for g in groups.values() if len({json.dumps(configs[n].get("scales")) for n in g}) > 1]


def scale_table(wide: pd.DataFrame, configs: dict[str, dict], group: list[str]) -> pd.DataFrame:
    """The summary rows of one scale group, with each experiment's model and scales."""
    rows = wide[wide["experiment"].isin(group)].copy()
    rows.insert(1, "model", [configs[n].get("model") for n in rows["experiment"]])
    rows.insert(2, "scales", ["+".join(configs[n].get("scales") or []) for n in rows["experiment"]])
    return rows


def transfer_pairs(configs: dict[str, dict]) -> list[tuple[str, str]]:
    """(transfer experiment, its from-scratch twin): same model, task and scales, no init_from."""
    pairs = []
    for name, cfg in configs.items():
        if not cfg.get("init_from"):
            continue
        for other, ocfg in configs.items():
            if other != name and not ocfg.get("init_from") and _key(cfg, "model", "task", "scales", "train_fraction") \
                    == _key(ocfg, "model", "task", "scales", "train_fraction"):
                pairs.append((name, other))
                break
    return pairs


def transfer_table(summary: pd.DataFrame, configs: dict[str, dict]) -> pd.DataFrame | None:
    """Each transfer experiment beside its from-scratch twin (test AUC and the difference)."""
    rows = []
    for transfer, scratch in transfer_pairs(configs):
        (tm, tsd), (sm, ssd) = metric(summary, transfer, "auc"), metric(summary, scratch, "auc")
        rows.append({"transfer": transfer, "init_from": str(configs[transfer].get("init_from")),
                     "freeze": configs[transfer].get("freeze", "none"), "scratch": scratch,
                     "AUC transfer": mean_sd(tm, tsd), "AUC scratch": mean_sd(sm, ssd),
                     "difference": "n/a" if math.isnan(tm - sm) else f"{tm - sm:+.3f}"})
    return pd.DataFrame(rows) if rows else None


def training_seconds(fold_dir: Path) -> float | None:
    """Seconds the fold's training epochs took (history.json), None when unknown."""
    path = fold_dir / "history.json"
    if not path.exists():
        return None
    history = json.loads(path.read_text())
    seconds = [epoch.get("seconds") for epoch in history] if isinstance(history, list) else []
    return float(sum(seconds)) if seconds and all(isinstance(x, (int, float)) for x in seconds) else None


def e2e_pairs(configs: dict[str, dict], per_fold: dict[str, dict]) -> list[tuple[str, str]]:
    """(e2e twin, its frozen-encoder experiment) for each twin (config ``e2e`` = {"name", "frozen", "dir"})."""
    return [(name, cfg["e2e"]["frozen"]) for name, cfg in configs.items()
            if isinstance(cfg.get("e2e"), dict) and cfg["e2e"].get("frozen") in per_fold]


def _mean(values: list) -> float | None:
    """The mean of ``values``; None when there are none or one is unknown (None)."""
    return float(sum(values) / len(values)) if values and all(v is not None for v in values) else None


def _mean_seconds(runs: dict, key: str = "training_seconds") -> float | None:
    return _mean([m.get(key) for m in runs.values()])


def e2e_encoder_seconds(run_dir: str | os.PathLike, folds) -> float | None:
    """Mean seconds per fold the e2e run took to tune its encoder (its folds' history.json)."""
    return _mean([training_seconds(Path(run_dir) / f"fold{k}") for k in sorted(set(folds))])


def e2e_table(configs: dict[str, dict], per_fold: dict[str, dict], ratio: float) -> pd.DataFrame | None:
    """e2e-tuned against frozen-encoder features on the twin's runs: :func:`comparison_table`
    with the training time per fold of each arm (MIL training; for the e2e arm also the
    end-to-end tuning of the encoder on that fold)."""
    pairs = e2e_pairs(configs, per_fold)
    table = comparison_table(pairs, per_fold, configs, ratio, labels=("e2e-tuned", "frozen"))
    if table is None:
        return None
    e2e_s, frozen_s, tune_s = [], [], []
    for twin, frozen in pairs:
        pa, pb = paired_metrics(per_fold, configs, twin, frozen)
        info = configs[twin]["e2e"]
        tune = e2e_encoder_seconds(info["dir"], [k for _, k in pa]) if info.get("dir") else None
        mil_twin, mil_frozen = _mean_seconds(pa), _mean_seconds(pb)
        tune_s.append(None if tune is None else round(tune, 1))
        e2e_s.append(None if tune is None or mil_twin is None else round(tune + mil_twin, 1))
        frozen_s.append(None if mil_frozen is None else round(mil_frozen, 1))
    table.insert(2, "e2e run", [configs[t]["e2e"].get("name") for t, _ in pairs])
    table["encoder tuning (s/fold)"] = tune_s
    table["training e2e arm (s/fold)"] = e2e_s
    table["training frozen arm (s/fold)"] = frozen_s
    return table


def ablation_table(configs: dict[str, dict], per_fold: dict[str, dict], ratio: float) -> pd.DataFrame | None:
    """Each ablation (``ablation_of``) beside its full model: :func:`comparison_table` and the
    model options the ablation changes."""
    pairs = ablation_pairs(configs)
    table = comparison_table(pairs, per_fold, configs, ratio, labels=("full model", "ablation"))
    if table is None:
        return None
    changed = []
    for full, ablation in pairs:
        a, b = configs[full].get("model_args") or {}, configs[ablation].get("model_args") or {}
        diff = {k: b.get(k) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
        if configs[full].get("model") != configs[ablation].get("model"):
            diff = {"model": configs[ablation].get("model"), **diff}
        changed.append(json.dumps(diff, sort_keys=True) if diff else "(same options)")
    table.insert(2, "changed", changed)
    return table


def learning_curves(configs: dict[str, dict], per_fold: dict[str, dict], ratio: float) -> list[dict]:
    """Learning curves: experiments with ``train_fraction``, grouped by (model, task, scales);
    per group its arms (``transfer`` when ``init_from`` is set, else ``scratch``) as
    ``{arm: [(fraction, experiment), ...]}``, the AUC points ``{arm: (fractions, mean, low,
    high)}`` (95 % interval of the mean over runs, corrected as the paired test) and the
    transfer-against-scratch :func:`comparison_table` per fraction."""
    from ..evaluation.stats import corrected_ttest

    groups: dict[tuple, dict[str, list]] = {}
    for name, cfg in configs.items():
        if cfg.get("train_fraction") is not None and not cfg.get("ablation_of"):
            arm = "transfer" if cfg.get("init_from") else "scratch"
            groups.setdefault(_key(cfg, "model", "task", "scales"), {}).setdefault(arm, []).append(
                (float(cfg["train_fraction"]), name))
    out = []
    for key, arms in groups.items():
        points = {}
        for arm, members in arms.items():
            members.sort()
            rows = []
            for fraction, name in members:
                values = [m.get("auc") for m in per_fold[name].values()]
                result = corrected_ttest([v for v in values if v is not None], ratio)
                rows.append((fraction, result.mean, result.ci_low, result.ci_high))
            points[arm] = tuple(list(col) for col in zip(*rows))
        pairs = [(t, s) for f, t in arms.get("transfer", []) for g, s in arms.get("scratch", []) if f == g]
        table = comparison_table(pairs, per_fold, configs, ratio, labels=("transfer", "scratch"))
        if table is not None:
            table.insert(0, "fraction", [configs[t]["train_fraction"] for t, _ in pairs])
        first = configs[next(iter(arms.values()))[0][1]]
        task = first.get("task") or ""
        task = " / ".join(task) if isinstance(task, dict) else str(task)  # the classes of a task mapping
        title = " ".join(x for x in (str(first.get("model")), task, "+".join(first.get("scales") or [])) if x)
        out.append({"title": title, "arms": arms, "points": points, "table": table})
    return out


def k_studies(configs: dict[str, dict]) -> list[tuple[str, pd.DataFrame, Path | None]]:
    """(run name, k_study_summary.csv table, k_study.png or None) of each e2e run a twin names
    whose K study exists."""
    studies = {}
    for cfg in configs.values():
        info = cfg.get("e2e")
        if isinstance(info, dict) and info.get("dir"):
            studies[info["name"]] = Path(info["dir"])
    out = []
    for name, directory in studies.items():
        table, png = directory / "k_study_summary.csv", directory / "k_study.png"
        if table.exists():
            out.append((name, pd.read_csv(table).round(4), png if png.exists() else None))
    return out


def strategy_groups(configs: dict[str, dict]) -> list[list[str]]:
    """Groups of from-scratch experiments identical but for ``strategy`` (two or more strategies)."""
    groups: dict[tuple, list[str]] = {}
    for name, cfg in configs.items():
        if cfg.get("strategy") and _main_comparison(cfg):
            groups.setdefault(_key(cfg, "model", "model_args", "task", "scales"), []).append(name)
    return [g for g in groups.values() if len({configs[n]["strategy"] for n in g}) > 1]


def bag_counts(feature_dir: str | os.PathLike) -> dict[str, tuple[int, int]]:
    """Slide -> (patches in its bag, patches its extraction job encoded) for a feature folder."""
    import torch

    counts = {}
    for path in sorted(Path(feature_dir).glob("*.pt")):
        if path.name.startswith("."):  # hidden: a temporary (fileio.TEMP_PREFIX) or another tool's, never a bag
            continue
        try:
            bag = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # truncated or not a PyTorch file
            raise MsamilError(f"feature bag {path}: cannot read it ({type(exc).__name__}); "
                              "delete it and rerun the workflow to extract it again") from None
        n = len(bag["coords"])
        counts[path.stem] = (n, int(bag.get("patches_encoded", n)) or 1)
    return counts


def benchmark_seconds(path: Path) -> float | None:
    """Wall-clock seconds (``s`` column, summed) of a Snakemake benchmark file; None when missing."""
    if not path.exists():
        return None
    try:
        return float(pd.read_csv(path, sep="\t")["s"].sum())
    except (OSError, ValueError, KeyError, pd.errors.ParserError) as exc:
        raise MsamilError(f"{path}: not a Snakemake benchmark file ({exc})") from None


def extraction_seconds(counts: dict[str, tuple[int, int]], job_dir: Path) -> float | None:
    """Each slide's extraction-job wall time times this bag's share of the job's patches, summed;
    None when a slide's benchmark file is missing."""
    total = 0.0
    for slide, (n, encoded) in counts.items():
        seconds = benchmark_seconds(job_dir / f"{slide}.tsv")
        if seconds is None:
            return None
        total += seconds * n / encoded
    return total


def strategy_table(summary: pd.DataFrame, configs: dict[str, dict], features: dict[str, str],
                   benchmarks: str | os.PathLike | None, inference: dict[str, float | None]) -> pd.DataFrame | None:
    """One row per experiment of each strategy group; None when there is no such group.

    ``inference``: experiment -> seconds its fold models took on their test parts (None: unknown).
    """
    groups = strategy_groups(configs)
    if not groups:
        return None
    rows = []
    bench = Path(benchmarks) if benchmarks else None
    for group in groups:
        for name in sorted(group, key=lambda n: configs[n]["strategy"]):
            strategy = configs[name]["strategy"]
            feature_dir = features.get(name)
            counts = bag_counts(feature_dir) if feature_dir else None
            extract_s = None
            if bench is not None and counts is not None:
                job = Path(feature_dir).name.removesuffix(f"-{strategy}")  # <key>-<hash>: the extraction job's folder
                extract_s = extraction_seconds(counts, bench / "extract_features" / job)
            infer_s = inference.get(name)
            total = None if extract_s is None or infer_s is None else extract_s + infer_s
            rows.append({
                "experiment": name,
                "strategy": strategy,
                "AUC": mean_sd(*metric(summary, name, "auc")),
                "patches extracted": None if counts is None else sum(n for n, _ in counts.values()),
                "extraction (s)": None if extract_s is None else round(extract_s, 1),
                "inference (s)": None if infer_s is None else round(infer_s, 1),
                "extraction + inference (s)": None if total is None else round(total, 1),
            })
    return pd.DataFrame(rows)


def segmentation_table(metrics_path: str | os.PathLike) -> pd.DataFrame:
    """Hold-out and validation IoU/Dice of the lesion segmentation model."""
    try:
        with open(metrics_path) as f:
            metrics = json.load(f)
    except (OSError, ValueError) as exc:
        raise MsamilError(f"{metrics_path}: cannot read segmentation metrics ({exc}); rerun segment-train") from None
    rows = []
    for part in ("holdout", "val"):
        m = metrics.get(part) or {}
        rows.append({"part": "hold-out patients" if part == "holdout" else "validation patients",
                     "slides": m.get("n_slides"), "IoU": m.get("iou"), "Dice": m.get("dice"),
                     "pooled IoU": m.get("pooled_iou")})
    return pd.DataFrame(rows).round(4)
