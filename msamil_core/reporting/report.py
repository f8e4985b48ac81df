"""The cohort report: mean ± sd over folds per experiment, comparisons, plots and configs.

``write_report`` reads each experiment's ``fold<k>/metrics.json`` and ``checkpoint.pt`` (for its
config) and writes ``index.html``, ``summary.csv`` (experiment, metric, mean, sd, n_folds),
``roc.png`` and ``confusion.png`` into the report directory. Two comparisons are drawn from
the experiments themselves:

* transfer: every experiment with ``init_from`` beside the experiment with the same model,
  task and scales that starts from scratch (MIL-Lab's question: does transfer beat scratch?);
* scales: experiments with the same task that differ in the scales they use (MsaMIL-Net's
  question: does multi-scale beat single-scale?).

Extra sections (e.g. patch-selection strategies, segmentation IoU) can be passed in as
ready-made tables.
"""

from __future__ import annotations

import html
import json
import math
import os
from pathlib import Path

import pandas as pd
import torch

from ..errors import MsamilError
from ..fileio import atomic_path
from .metrics import summarize

HEADLINE = ("auc", "balanced_accuracy", "accuracy", "f1_macro")


def load_experiment(directory: str | os.PathLike) -> tuple[dict[int, dict], dict]:
    """Per-fold metrics ``{fold: metrics}`` and the experiment's config (from fold 0's checkpoint)."""
    directory = Path(directory)
    folds: dict[int, dict] = {}
    config: dict = {}
    for fold_dir in sorted(directory.glob("fold*")):
        suffix = fold_dir.name[4:]
        if not suffix.isdigit() or not (fold_dir / "metrics.json").exists():
            continue
        folds[int(suffix)] = json.loads((fold_dir / "metrics.json").read_text())
        ckpt_path = fold_dir / "checkpoint.pt"
        if not config and ckpt_path.exists():
            ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
            config = dict(ckpt.get("config") or {}, model=ckpt["model_name"], classes=list(ckpt["classes"]),
                          encoder=ckpt.get("encoder", ""))
    if not folds:
        raise MsamilError(f"{directory}: no fold<k>/metrics.json; run `msamil evaluate` for this experiment first")
    return dict(sorted(folds.items())), config


def _pm(mean: float, sd: float) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "n/a"
    return f"{mean:.3f}" if sd is None or math.isnan(sd) else f"{mean:.3f} ± {sd:.3f}"


def _wide(summary: pd.DataFrame, metrics=HEADLINE) -> pd.DataFrame:
    rows = []
    for exp, group in summary.groupby("experiment", sort=False):
        by_metric = {r.metric: r for r in group.itertuples()}
        rows.append({"experiment": exp, **{m: _pm(by_metric[m].mean, by_metric[m].sd) if m in by_metric else "n/a" for m in metrics},
                     "folds": int(max(r.n_folds for r in group.itertuples()))})
    return pd.DataFrame(rows)


def _key(config: dict, *fields: str):
    return tuple(json.dumps(config.get(f), sort_keys=True) for f in fields)


def transfer_pairs(configs: dict[str, dict]) -> list[tuple[str, str]]:
    """(transfer experiment, its from-scratch twin): same model, task and scales, no init_from."""
    pairs = []
    for name, cfg in configs.items():
        if not cfg.get("init_from"):
            continue
        for other, ocfg in configs.items():
            if other != name and not ocfg.get("init_from") and _key(cfg, "model", "task", "scales") == _key(ocfg, "model", "task", "scales"):
                pairs.append((name, other))
                break
    return pairs


def scale_groups(configs: dict[str, dict]) -> list[list[str]]:
    """Groups of from-scratch experiments on the same task that use different scales."""
    groups: dict[tuple, list[str]] = {}
    for name, cfg in configs.items():
        if not cfg.get("init_from"):
            groups.setdefault(_key(cfg, "task"), []).append(name)
    return [g for g in groups.values() if len({json.dumps(configs[n].get("scales")) for n in g}) > 1]


def _table(df: pd.DataFrame) -> str:
    return df.to_html(index=False, escape=True, border=0, classes="t", na_rep="n/a")


def write_report(experiments: dict[str, str | os.PathLike], out_dir: str | os.PathLike,
                 extra_sections: list[tuple[str, pd.DataFrame | str]] | None = None, title: str = "msamil report",
                 features: dict[str, str] | None = None, benchmarks: str | os.PathLike | None = None,
                 segmentation: str | os.PathLike | None = None,
                 heatmaps: dict[str, str | os.PathLike] | None = None) -> pd.DataFrame:
    """Write the report for ``{experiment name: experiment directory}``; returns the summary.

    ``features`` (experiment -> feature folder) and ``benchmarks`` (Snakemake's benchmark folder)
    add the patch-selection comparison; ``segmentation`` (segment-train's metrics.json) the
    lesion segmentation IoU; ``heatmaps`` (experiment -> `msamil heatmap` folder) links the
    attention heatmaps."""
    from .selection import segmentation_table, strategy_table
    from .plots import plot_confusion_matrices, plot_roc_curves

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    per_fold: dict[str, dict[int, dict]] = {}
    configs: dict[str, dict] = {}
    for name, directory in experiments.items():
        per_fold[name], configs[name] = load_experiment(directory)
    summary = summarize(per_fold)
    with atomic_path(out_dir / "summary.csv") as tmp:
        summary.to_csv(tmp, index=False)
    plot_roc_curves(out_dir / "roc.png", per_fold)
    plot_confusion_matrices(out_dir / "confusion.png", per_fold)

    wide = _wide(summary)
    parts = [f"<h1>{html.escape(title)}</h1>",
             "<p>Test-set metrics of each fold's model on its held-out patients; mean ± sd over folds. "
             "AUC is binary or macro one-vs-rest.</p>",
             "<h2>Summary</h2>", _table(wide)]
    groups = scale_groups(configs)
    if groups:
        parts.append("<h2>Multi-scale against single-scale</h2><p>Experiments on the same task that use different scales.</p>")
        for g in groups:
            rows = wide[wide["experiment"].isin(g)].copy()
            rows.insert(1, "model", [configs[n].get("model") for n in rows["experiment"]])
            rows.insert(2, "scales", ["+".join(configs[n].get("scales") or []) for n in rows["experiment"]])
            parts.append(_table(rows))
    pairs = transfer_pairs(configs)
    if pairs:
        parts.append("<h2>Transfer against training from scratch</h2><p>Same model, task, scales and folds; "
                     "the transfer experiment starts from <code>init_from</code>.</p>")
        rows = []
        for transfer, scratch in pairs:
            t = summary[(summary.experiment == transfer) & (summary.metric == "auc")]
            s = summary[(summary.experiment == scratch) & (summary.metric == "auc")]
            tm = float(t["mean"].iloc[0]) if len(t) else float("nan")
            sm = float(s["mean"].iloc[0]) if len(s) else float("nan")
            rows.append({"transfer": transfer, "init_from": str(configs[transfer].get("init_from")),
                         "freeze": configs[transfer].get("freeze", "none"), "scratch": scratch,
                         "AUC transfer": _pm(tm, float(t["sd"].iloc[0]) if len(t) else float("nan")),
                         "AUC scratch": _pm(sm, float(s["sd"].iloc[0]) if len(s) else float("nan")),
                         "difference": "n/a" if math.isnan(tm - sm) else f"{tm - sm:+.3f}"})
        parts.append(_table(pd.DataFrame(rows)))
    from .e2e import report_parts as e2e_parts

    parts += e2e_parts(configs, per_fold, out_dir)
    inference = {name: (sum(m["inference_seconds"] for m in folds.values())
                        if folds and all("inference_seconds" in m for m in folds.values()) else None)
                 for name, folds in per_fold.items()}
    strategies = strategy_table(summary, configs, features or {}, benchmarks, inference)
    if strategies is not None:
        parts.append("<h2>Patch-selection strategies</h2><p>The same model on patches of the segmented lesion, "
                     "of all tissue, or a random subset of the tissue (MsaMIL-Net Table 1): test AUC, patches "
                     "extracted (all slides and scales), and wall time of feature extraction plus test-set "
                     "inference. One job per slide extracts the bags of all strategies, encoding shared patches "
                     "once; a strategy's extraction time is each job's wall time (Snakemake benchmark file) times "
                     "that strategy's share of the job's patches. Inference: the fold models on their test "
                     "bags, loading included (metrics.json).</p>")
        parts.append(_table(strategies))
    if segmentation:
        parts.append("<h2>Lesion segmentation (UNet++)</h2><p>IoU and Dice of the thresholded lesion masks "
                     "against the annotations, on patients the model never trained on.</p>")
        parts.append(_table(segmentation_table(segmentation)))
    if heatmaps:
        from .heatmap import report_section

        extra_sections = [*(extra_sections or []), ("Attention heatmaps", report_section(heatmaps, out_dir))]
    for heading, content in extra_sections or []:
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        parts.append(_table(content) if isinstance(content, pd.DataFrame) else content)
    parts += ["<h2>ROC curves</h2>", '<img src="roc.png" alt="ROC curves per experiment and fold">',
              "<h2>Confusion matrices (summed over folds)</h2>", '<img src="confusion.png" alt="confusion matrices">',
              "<h2>All metrics</h2>", _table(summary.round(4)),
              "<h2>Experiment configurations</h2>"]
    for name, cfg in configs.items():
        parts.append(f"<h3>{html.escape(name)}</h3><pre>{html.escape(json.dumps(cfg, indent=2, sort_keys=True, default=str))}</pre>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table.t{border-collapse:collapse;margin:1em 0}table.t td,table.t th{padding:4px 10px;border-bottom:1px solid #ddd;text-align:left}"
             "img{max-width:100%}pre{background:#f6f6f6;padding:8px;overflow:auto}")
    page = f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{style}</style></head><body>{''.join(parts)}</body></html>\n"
    with atomic_path(out_dir / "index.html") as tmp:
        tmp.write_text(page)
    return summary
