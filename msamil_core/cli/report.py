"""Write the cohort report: index.html, summary.csv (mean ± sd over folds), ROC and confusion PNGs.

Each --experiment NAME=DIR points at an experiment directory with fold<k>/metrics.json (from
`msamil evaluate`) and fold<k>/checkpoint.pt (for its config), and with repeats
repeat<r>/fold<k>/ as well; mean ± sd is over all of them. Transfer experiments are set beside
their from-scratch twins, experiments on the same task that use different scales are compared,
ablations (`ablation_of`) are set beside their full model and `train_fraction` experiments
drawn as learning curves, automatically, each comparison with the paired difference over the
runs both experiments share and its corrected resampled t-test (95 % interval, p-value). --section TITLE=CSV adds a table (e.g. patch-selection figures);
--heatmaps NAME=DIR links an experiment's attention heatmaps. The page opens with its provenance (date, commit,
--config-file, encoders and their weights' digest), a table of contents, the cohort per fold (--folds) and a
table of each experiment's test slides, misclassified first, linked to their heatmap pages.
"""

from __future__ import annotations

import argparse

from .options import named

HELP = "fold metrics of experiments -> report/index.html + summary.csv + plots"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--experiment", action="append", required=True, metavar="NAME=DIR",
                        help="an experiment and its directory (repeat for each)")
    parser.add_argument("--section", action="append", default=[], metavar="TITLE=CSV",
                        help="an extra table to include, from a CSV file (repeatable)")
    parser.add_argument("--features", action="append", default=[], metavar="NAME=DIR",
                        help="an experiment's feature folder (repeatable): the patch counts of the strategy comparison")
    parser.add_argument("--benchmarks", help="Snakemake benchmark folder: the extraction and inference times")
    parser.add_argument("--segmentation", metavar="JSON", help="metrics.json of `msamil segment-train`")
    parser.add_argument("--heatmaps", action="append", default=[], metavar="NAME=DIR",
                        help="an experiment's `msamil heatmap` folder (summary.csv + <slide>/), linked with its "
                        "attention inside vs outside the lesions (repeatable)")
    parser.add_argument("--left-out", metavar="CSV",
                        help="left_out.csv of `msamil screen`: the slides and annotations left out, with reasons")
    parser.add_argument("--folds", metavar="CSV", help="folds.csv of `msamil splits`: the cohort table per fold")
    parser.add_argument("--config-file", action="append", default=[], metavar="YAML",
                        help="the config file the run was made with, named in the report's header (repeatable)")
    parser.add_argument("--out-dir", required=True, help="report directory to write")
    parser.add_argument("--title", default="msamil report")


def run(args: argparse.Namespace) -> None:
    from ..reporting.report import write_report

    write_report(dict(named(args.experiment, "--experiment")), args.out_dir, title=args.title,
                 sections=named(args.section, "--section"), features=dict(named(args.features, "--features")),
                 benchmarks=args.benchmarks, segmentation=args.segmentation,
                 heatmaps=dict(named(args.heatmaps, "--heatmaps")), left_out=args.left_out, folds=args.folds,
                 config_files=args.config_file)
