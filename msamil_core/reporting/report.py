"""The cohort report: mean ± sd over folds per experiment, comparisons, plots and configs.

:func:`write_report` reads each experiment's ``fold<k>/metrics.json`` and ``checkpoint.pt`` (for its
config) and writes ``index.html`` (the jinja2 template ``templates/report.html.j2``),
``summary.csv`` (experiment, metric, mean, sd, n_folds: over every test fold of every repeat),
``roc.png``, ``confusion.png`` and ``learning_curve_<i>.png`` into the report folder. The
comparisons (multi against single scale, transfer against scratch, e2e against frozen features,
patch-selection strategies, ablations against the full model, learning curves) are found from the
experiments' configs (:mod:`.tables`), each with the paired difference of AUC and balanced
accuracy over the runs both experiments share (:mod:`msamil_core.evaluation.stats`). The page links only files inside or beside the report folder by relative paths,
so it opens offline.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pandas as pd

from ..cohort.screening import read_left_out
from ..errors import MsamilError
from ..evaluation.metrics import summarize
from ..fileio import atomic_path, torch_load
from . import tables
from .pages import render

def run_dirs(directory: str | os.PathLike) -> dict[tuple[int, int], Path]:
    """The fold folders of an experiment folder with metrics.json, by (repeat, fold): repeat 0's
    ``fold<k>/`` and repeat r's ``repeat<r>/fold<k>/``, in (repeat, fold) order."""
    directory = Path(directory)
    runs = {}
    for fold_dir in [*directory.glob("fold*"), *directory.glob("repeat*/fold*")]:
        fold, parent = fold_dir.name[4:], fold_dir.parent.name
        repeat = "0" if fold_dir.parent == directory else parent[len("repeat"):]
        if fold.isdigit() and repeat.isdigit() and (fold_dir / "metrics.json").exists():
            runs[(int(repeat), int(fold))] = fold_dir
    return dict(sorted(runs.items()))


def load_experiment(directory: str | os.PathLike) -> tuple[dict[tuple[int, int], dict], dict]:
    """Per-run metrics ``{(repeat, fold): metrics}`` (with ``training_seconds`` added where the
    fold's history.json has them) and the experiment's config: its manifest's settings and
    relations (:meth:`~msamil_core.manifest.Manifest.report_config`), or for an experiment
    trained by hand (no manifest) its checkpoints' training config."""
    from ..manifest import read_manifest

    directory = Path(directory)
    runs: dict[tuple[int, int], dict] = {}
    config: dict = {}
    dirs = run_dirs(directory)
    for run, fold_dir in dirs.items():
        runs[run] = json.loads((fold_dir / "metrics.json").read_text())
        seconds = tables.training_seconds(fold_dir)
        if seconds is not None:
            runs[run]["training_seconds"] = seconds
    if not runs:
        raise MsamilError(f"{directory}: no fold<k>/metrics.json; run `msamil evaluate` for this experiment first")
    manifest = read_manifest(directory)
    if manifest is not None:
        return runs, manifest.report_config()
    # the first run's config; keys only the last run's has (a first repeat reused from a run
    # without them, e.g. ablation_of) are added from it
    for fold_dir in dict.fromkeys([dirs[min(dirs)], dirs[max(dirs)]]):
        ckpt_path = fold_dir / "checkpoint.pt"
        if ckpt_path.exists():
            ckpt = torch_load(ckpt_path, "checkpoint", allow_numpy=True)
            found = dict(ckpt.get("config") or {}, model=ckpt["model_name"], classes=list(ckpt["classes"]),
                         encoder=ckpt.get("encoder", ""))
            config = {**{k: v for k, v in found.items() if not config or k not in ("repeat", "seed")}, **config}
    return runs, config


def heatmap_links(heatmaps: dict[str, str | os.PathLike], report_dir: str | os.PathLike) -> list[dict]:
    """Per experiment: its pooled attention inside against outside the lesions, and each slide's
    page and combined map as paths relative to the report folder."""
    from .heatmaps import pooled_lesion_attention, read_summary

    out = []
    for name, directory in heatmaps.items():
        directory = Path(directory)
        summary_path = directory / "summary.csv"
        if not summary_path.exists():
            raise MsamilError(f"{summary_path}: no heatmap summary for experiment {name!r}; run `msamil heatmap` first")
        summary = read_summary(summary_path)
        pooled = pooled_lesion_attention(summary)
        slides = []
        for slide_id in dict.fromkeys(summary["slide_id"]):
            rel = Path(os.path.relpath(directory / slide_id, report_dir)).as_posix()
            slides.append((slide_id, f"{rel}/index.html", f"{rel}/attention_combined.png"))
        out.append({"name": name, "folder": directory.name, "pooled": pooled if len(pooled) else None, "slides": slides})
    return out


def write_report(experiments: dict[str, str | os.PathLike], out_dir: str | os.PathLike, title: str = "msamil report",
                 sections: list[tuple[str, str | os.PathLike]] = (), features: dict[str, str] | None = None,
                 benchmarks: str | os.PathLike | None = None, segmentation: str | os.PathLike | None = None,
                 heatmaps: dict[str, str | os.PathLike] | None = None,
                 left_out: str | os.PathLike | None = None) -> pd.DataFrame:
    """Write the report for ``{experiment name: experiment directory}``; returns the summary.

    ``sections``: extra (title, CSV file) tables. ``features`` (experiment -> feature folder) and
    ``benchmarks`` (Snakemake's benchmark folder) add the patch-selection comparison;
    ``segmentation`` (segment-train's metrics.json) the lesion segmentation IoU; ``heatmaps``
    (experiment -> `msamil heatmap` folder) the attention heatmaps; ``left_out`` (the screening's
    left_out.csv) the slides and annotations left out of the run, with their reasons.
    """
    from .heatmaps import INSIDE_FRACTION
    from .plots import plot_confusion_matrices, plot_learning_curve, plot_roc_curves

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
    wide = tables.summary_table(summary)
    k_studies = []
    for name, study, png in tables.k_studies(configs):
        image = None
        if png is not None:
            image = f"k_study_{name}.png"
            shutil.copyfile(png, out_dir / image)
        k_studies.append((name, study, image))
    # inference time of one pass over the cohort: the first repeat's folds
    inference = {name: (sum(m["inference_seconds"] for (r, _), m in folds.items() if r == 0)
                        if folds and all("inference_seconds" in m for m in folds.values()) else None)
                 for name, folds in per_fold.items()}
    ratio = tables.test_train_ratio(per_fold)
    groups = tables.scale_groups(configs)
    curves = tables.learning_curves(configs, per_fold, ratio)
    for i, curve in enumerate(curves):
        curve["image"] = f"learning_curve_{i}.png"
        plot_learning_curve(out_dir / curve["image"], curve["points"], title=curve["title"])
    transfer = [pair for pair in tables.transfer_pairs(configs) if "train_fraction" not in configs[pair[0]]]
    page = render(
        "report.html.j2", title=title, summary_table=wide, ratio=ratio,
        repeats=max(r for runs in per_fold.values() for r, _ in runs) + 1,
        scale_tables=[(tables.scale_table(wide, configs, g),
                       tables.comparison_table(tables.reference_pairs(g, configs), per_fold, configs, ratio))
                      for g in groups],
        transfer=tables.transfer_table(summary, configs),
        transfer_stats=tables.comparison_table(transfer, per_fold, configs, ratio, labels=("transfer", "scratch")),
        e2e=tables.e2e_table(configs, per_fold, ratio), k_studies=k_studies,
        ablation=tables.ablation_table(configs, per_fold, ratio), learning_curves=curves,
        strategy_stats=[tables.comparison_table(tables.reference_pairs(g, configs), per_fold, configs, ratio)
                        for g in tables.strategy_groups(configs)],
        strategies=tables.strategy_table(summary, configs, features or {}, benchmarks, inference),
        segmentation=tables.segmentation_table(segmentation) if segmentation else None,
        heatmaps=heatmap_links(heatmaps, out_dir) if heatmaps else [], inside_fraction=INSIDE_FRACTION,
        left_out=read_left_out(left_out) if left_out else None,
        sections=[(heading, pd.read_csv(path)) for heading, path in sections], all_metrics=summary.round(4),
        configs=[(name, json.dumps(cfg, indent=2, sort_keys=True, default=str)) for name, cfg in configs.items()],
    )
    with atomic_path(out_dir / "index.html") as tmp:
        tmp.write_text(page)
    return summary
