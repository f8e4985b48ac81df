"""The cohort report: mean ± sd over folds per experiment, comparisons, slides to review, plots and configs.

:func:`write_report` reads each experiment's ``fold<k>/metrics.json`` and ``predictions.csv`` and
its manifest (or ``checkpoint.pt``, for its config) and writes ``index.html`` (the jinja2
template ``templates/report.html.j2``), ``summary.csv`` (experiment, metric, mean, sd, n_folds:
over every test fold of every repeat), ``roc.png``, ``confusion.png``,
``reliability_<experiment>.png`` (calibration, pooled over the first repeat's test folds) and
``learning_curve_<i>.png`` into the report folder. The page opens with its provenance (date,
commit, config files, encoders and the digest of their weights: :mod:`.provenance`) and a table
of contents; the cohort per fold and each experiment's test slides, misclassified first and
linked to their heatmap pages, come after the summary (:mod:`.slides`). The comparisons (multi
against single scale, transfer against scratch, e2e against frozen features, patch-selection
strategies, ablations against the full model, learning curves) are found from the experiments'
configs (:mod:`.tables`), each with the paired difference of AUC and balanced accuracy over the
runs both experiments share (:mod:`msamil_core.evaluation.stats`). The page links only files
inside or beside the report folder by relative paths, so it opens offline, and it fits a
1,400 px window: a wider table scrolls in its own box (bench/report_screenshot.py checks it in
headless Chromium).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pandas as pd

from ..cohort.screening import read_left_out
from ..errors import MsamilError
from ..evaluation.metrics import summarize
from ..evaluation.stats import CUT_MARK
from ..fileio import atomic_path, torch_load
from . import tables
from .pages import render
from .slides import relative_link

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
    id, true and predicted class, page and combined map (paths relative to the report folder),
    misclassified slides first."""
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
        for row in summary.drop_duplicates("slide_id").itertuples():
            rel = relative_link(directory / row.slide_id, report_dir)
            slides.append({"slide_id": row.slide_id, "label": row.label, "predicted": row.predicted,
                           "correct": not row.label or row.label == row.predicted,
                           "page": f"{rel}/index.html", "image": f"{rel}/attention_combined.png"})
        slides.sort(key=lambda s: s["correct"])
        out.append({"name": name, "folder": directory.name, "pooled": pooled if len(pooled) else None, "slides": slides})
    return out


def add_contents(page: str) -> str:
    """The page with its table of contents (a link to each ``<h2 id=...>`` heading) in place of
    the template's ``<nav id="contents"></nav>``: the template is the one home of the sections
    and of which of them a report has."""
    headings = re.findall(r'<h2 id="([^"]+)">(.*?)</h2>', page)
    items = "".join(f'<li><a href="#{anchor}">{title}</a></li>' for anchor, title in headings)
    return page.replace('<nav id="contents"></nav>', f'<nav id="contents"><h2>Contents</h2><ol>{items}</ol></nav>', 1)


def write_report(experiments: dict[str, str | os.PathLike], out_dir: str | os.PathLike, title: str = "msamil report",
                 sections: list[tuple[str, str | os.PathLike]] = (), features: dict[str, str] | None = None,
                 benchmarks: str | os.PathLike | None = None, segmentation: str | os.PathLike | None = None,
                 heatmaps: dict[str, str | os.PathLike] | None = None,
                 left_out: str | os.PathLike | None = None, folds: str | os.PathLike | None = None,
                 config_files: list[str | os.PathLike] = ()) -> pd.DataFrame:
    """Write the report for ``{experiment name: experiment directory}``; returns the summary.

    ``sections``: extra (title, CSV file) tables. ``features`` (experiment -> feature folder) and
    ``benchmarks`` (Snakemake's benchmark folder) add the patch-selection comparison;
    ``segmentation`` (segment-train's metrics.json) the lesion segmentation IoU; ``heatmaps``
    (experiment -> `msamil heatmap` folder) the attention heatmaps; ``left_out`` (the screening's
    left_out.csv) the slides and annotations left out of the run, with their reasons; ``folds``
    (folds.csv) the cohort table; ``config_files`` the config the run was made with, named in the
    provenance header.
    """
    from ..manifest import read_manifest
    from ..training.splits import read_folds
    from .heatmaps import INSIDE_FRACTION
    from .plots import plot_confusion_matrices, plot_learning_curve, plot_reliability, plot_roc_curves
    from .provenance import provenance
    from .slides import cohort_table, slide_review

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    per_fold: dict[str, dict[int, dict]] = {}
    configs: dict[str, dict] = {}
    manifests: dict[str, dict] = {}
    for name, directory in experiments.items():
        per_fold[name], configs[name] = load_experiment(directory)
        manifest = read_manifest(directory)
        if manifest is not None:
            manifests[name] = manifest.data
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
    heatmap_sets = heatmap_links(heatmaps, out_dir) if heatmaps else []
    fold_dirs = {name: run_dirs(directory) for name, directory in experiments.items()}
    review = slide_review(fold_dirs, {h["name"]: {s["slide_id"]: s["page"] for s in h["slides"]} for h in heatmap_sets})
    calibration, reliability = tables.calibration(fold_dirs, configs, per_fold, summary)
    diagrams = []
    for name, curve in reliability.items():
        diagrams.append((name, f"reliability_{name}.png", curve))
        plot_reliability(out_dir / diagrams[-1][1], name, curve)
    page = render(
        "report.html.j2", title=title, summary_table=wide, ratio=ratio,
        provenance=provenance(manifests, config_files), cohort=cohort_table(read_folds(folds)) if folds else None,
        review=review, cut_mark=CUT_MARK, cut_in=tables.has_cut,
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
        heatmaps=heatmap_sets, inside_fraction=INSIDE_FRACTION,
        left_out=read_left_out(left_out) if left_out else None,
        sections=[(heading, pd.read_csv(path)) for heading, path in sections],
        calibration=calibration, reliability=diagrams,
        all_metrics=tables.metrics_table(summary),
        configs=[(name, json.dumps(cfg, indent=2, sort_keys=True, default=str)) for name, cfg in configs.items()],
    )
    with atomic_path(out_dir / "index.html") as tmp:
        tmp.write_text(add_contents(page))
    return summary
