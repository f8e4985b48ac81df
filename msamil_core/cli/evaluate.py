"""Evaluate trained fold models on their test parts: predictions.csv and metrics.json per fold.

For each fold, the checkpoint <models>/fold<k>/checkpoint.pt is run on the fold's test slides
(the slides of the patients whose `fold` is k in folds.csv, restricted to the experiment's task).
Metrics: AUC (binary; macro one-vs-rest for more classes), accuracy, balanced accuracy, macro
F1 and the confusion matrix. predictions.csv has slide_id, label, predicted and prob_<class>.
"""


from __future__ import annotations

import argparse

from .options import add_fold_arguments, fold_indices, load_folds, split_settings

HELP = "fold checkpoints -> predictions.csv + metrics.json on each fold's test part"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--features", required=True, help="directory of feature bags (<slide_id>.pt or .h5)")
    add_fold_arguments(parser)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    parser.add_argument("--models", required=True, help="experiment directory holding fold<k>/checkpoint.pt")
    parser.add_argument("--threads", type=int, help="torch CPU threads")


def run(args: argparse.Namespace) -> None:
    from ..cohort.sheet import load_sheet
    from ..runtime import resolve_device, set_threads
    from ..training.mil import evaluate_experiment

    set_threads(args.threads)
    sheet = load_sheet(args.sheet, need_paths=False)  # bags only: no slide is opened
    folds = load_folds(args, sheet)
    evaluate_experiment(args.models, sheet, folds, fold_indices(args, folds), args.features,
                        resolve_device(args.device), split_settings(args))
