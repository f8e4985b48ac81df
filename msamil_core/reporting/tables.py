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
from ..training.metrics import summarize

HEADLINE = ("auc", "balanced_accuracy", "accuracy", "f1_macro")


def mean_sd(mean: float | None, sd: float | None) -> str:
    """``0.912 ± 0.034`` (``n/a`` when undefined; no ± with a single fold)."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "n/a"
    return f"{mean:.3f}" if sd is None or math.isnan(sd) else f"{mean:.3f} ± {sd:.3f}"


def metric(summary: pd.DataFrame, experiment: str, name: str) -> tuple[float, float]:
    """(mean, sd) of one metric of one experiment in a :func:`~msamil_core.training.metrics.summarize` table."""
    row = summary[(summary.experiment == experiment) & (summary.metric == name)]
    return (float(row["mean"].iloc[0]), float(row["sd"].iloc[0])) if len(row) else (math.nan, math.nan)


def summary_table(summary: pd.DataFrame, metrics=HEADLINE) -> pd.DataFrame:
    """One row per experiment: ``mean ± sd`` of each headline metric and the number of folds."""
    rows = []
    for exp, group in summary.groupby("experiment", sort=False):
        by_metric = {r.metric: r for r in group.itertuples()}
        rows.append({"experiment": exp,
                     **{m: mean_sd(by_metric[m].mean, by_metric[m].sd) if m in by_metric else "n/a" for m in metrics},
                     "folds": int(max(r.n_folds for r in group.itertuples()))})
    return pd.DataFrame(rows)


def _key(config: dict, *fields: str) -> tuple:
    return tuple(json.dumps(config.get(f), sort_keys=True) for f in fields)


def scale_groups(configs: dict[str, dict]) -> list[list[str]]:
    """Groups of from-scratch experiments on the same task that use different scales."""
    groups: dict[tuple, list[str]] = {}
    for name, cfg in configs.items():
        if not cfg.get("init_from"):
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
            if other != name and not ocfg.get("init_from") and _key(cfg, "model", "task", "scales") == _key(
                    ocfg, "model", "task", "scales"):
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


def e2e_table(configs: dict[str, dict], per_fold: dict[str, dict[int, dict]]) -> pd.DataFrame | None:
    """e2e-tuned against frozen-encoder features: each twin (config ``e2e`` = {"name", "frozen",
    "dir"}) beside its frozen experiment on the twin's folds."""
    rows = []
    for name, cfg in configs.items():
        info = cfg.get("e2e")
        if not isinstance(info, dict) or info.get("frozen") not in per_fold:
            continue
        frozen, folds = info["frozen"], sorted(per_fold[name])
        summary = summarize({name: per_fold[name], frozen: {k: per_fold[frozen][k] for k in folds if k in per_fold[frozen]}})
        (t, tsd), (f, fsd) = metric(summary, name, "auc"), metric(summary, frozen, "auc")
        rows.append({"e2e run": info.get("name"), "experiment": frozen, "folds": " ".join(map(str, folds)),
                     "AUC frozen encoder": mean_sd(f, fsd), "AUC e2e-tuned encoder": mean_sd(t, tsd),
                     "difference": "n/a" if math.isnan(t - f) else f"{t - f:+.3f}",
                     "bal. acc. frozen": mean_sd(*metric(summary, frozen, "balanced_accuracy")),
                     "bal. acc. e2e-tuned": mean_sd(*metric(summary, name, "balanced_accuracy"))})
    return pd.DataFrame(rows) if rows else None


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
        if cfg.get("strategy") and not cfg.get("init_from") and not cfg.get("e2e"):
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
