"""Train a MIL model on feature bags, one fold or all folds, with or without Snakemake.

Bags come from --features: our .pt bags (``msamil extract``) or a directory of TRIDENT/CLAM
feature .h5 files, one per slide, named by slide_id. Folds come from --folds (results/splits/
folds.csv); without it they are made from the sheet (patient-level, label-stratified) and
written to <out>/folds.csv. Each fold writes <out>/fold<k>/checkpoint.pt (best epoch by the
validation metric), history.json, and while training resume.pt: a killed or preempted run
continues from it when run again. Under `torchrun --nproc-per-node N` training runs as DDP.
With --evaluate each fold's best checkpoint then runs on the fold's test part (predictions.csv,
metrics.json), exactly as `msamil evaluate` does.

Training options may come from --experiment (a JSON/YAML file or inline JSON with the training keys
of the config's `experiments` entries); explicit flags override it, and what neither gives is the
config's default (`msamil config` lists them).
"""


from __future__ import annotations

import argparse

from .options import (add_fold_arguments, add_settings, classes_option, fold_indices, from_args, json_option, load_folds,
                      read_options, split_settings)

HELP = "feature bags + sheet + folds -> models/<experiment>/fold<k>/checkpoint.pt"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..settings import TrainConfig

    parser.add_argument("--features", required=True, help="directory of feature bags (<slide_id>.pt or .h5)")
    add_fold_arguments(parser)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    parser.add_argument("--out", required=True, help="experiment directory: fold<k>/ is written inside")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--evaluate", action="store_true",
                        help="then run each fold's best checkpoint on its test part: predictions.csv and metrics.json, "
                        "as `msamil evaluate` writes them (the workflow does this, sparing a process per fold)")
    group = parser.add_argument_group("training (over --experiment, which is over the defaults)")
    group.add_argument("--experiment", help="JSON/YAML file or inline JSON with training options (the keys below, "
                       "as the config's `experiments` entries name them)")
    add_settings(group, TrainConfig, defaults=False, source="--experiment's, else {default}")


def train_config(args: argparse.Namespace):
    """The :class:`~msamil_core.settings.TrainConfig`: the defaults, --experiment, then the flags."""
    from ..settings import TrainConfig

    options = read_options(args.experiment) if args.experiment else {}
    base = TrainConfig.from_dict(options, "--experiment")
    return from_args(args, TrainConfig, base)


def run(args: argparse.Namespace) -> None:
    from pathlib import Path

    from ..cohort.sheet import load_sheet
    from ..runtime import resolve_device, set_threads
    from ..training.mil import FoldData, train_experiment

    set_threads(args.threads)
    cfg = train_config(args)
    sheet = load_sheet(args.sheet, need_paths=False)  # bags only: no slide is opened
    folds = load_folds(args, sheet, Path(args.out))
    data = FoldData(args.features, sheet, folds, split_settings(args), classes_option(args))
    train_experiment(cfg, data, fold_indices(args, folds), args.out, resolve_device(args.device),
                     evaluate=args.evaluate, task=json_option(args.task, "--task"))
