"""Train a MIL model on feature bags, one fold or all folds, with or without Snakemake.

Bags come from --features: our .pt bags (``msamil extract``) or a directory of TRIDENT/CLAM
feature .h5 files, one per slide, named by slide_id. Folds come from --folds (results/splits/
folds.csv); without it they are made from the sheet (patient-level, label-stratified) and
written to <out>/folds.csv. Each fold writes <out>/fold<k>/checkpoint.pt (best epoch by the
validation metric), history.json, and while training resume.pt: a killed or preempted run
continues from it when run again. Under `torchrun --nproc-per-node N` training runs as DDP.
With --evaluate each fold's best checkpoint then runs on the fold's test part (predictions.csv,
metrics.json), exactly as `msamil evaluate` does.

Options may come from --experiment (a JSON/YAML file or inline JSON with the keys of the
config's `experiments` entries); explicit flags override it.
"""


from __future__ import annotations

import argparse

from .options import add_config_arguments, add_fold_arguments, config_flags, fold_indices, json_option, load_folds, read_options

HELP = "feature bags + sheet + folds -> models/<experiment>/fold<k>/checkpoint.pt"


TRAINING_OPTIONS = {
    "model": "registered MIL model (see `msamil list-models`)",
    "scales": "scales whose instances are used",
    "epochs": "epochs",
    "lr": "peak learning rate (AdamW)",
    "min_lr": "learning rate at the end of the cosine decay",
    "weight_decay": "AdamW weight decay",
    "warmup_epochs": "linear warm-up",
    "grad_accum": "bags per optimizer step (per process under torchrun)",
    "grad_clip": "max gradient norm; 0 = off",
    "max_instances": "random subsample of larger bags in training (0 = all)",
    "balance": "class balance by loss weights or sampling",
    "patience": "early stopping patience in epochs (0 = off)",
    "monitor": "the validation metric that picks the best epoch",
    "seed": "seed of the model, the bag order and the subsampling",
    "init_from": "our checkpoint or MIL-Lab/FEATHER weights to start from (transfer)",
    "freeze": "train everything, or the classifier only",
    "workers": "DataLoader workers loading bags",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..training.mil import BALANCE_CHOICES, FREEZE_CHOICES, MONITOR_CHOICES, TrainConfig

    parser.add_argument("--features", required=True, help="directory of feature bags (<slide_id>.pt or .h5)")
    add_fold_arguments(parser)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    parser.add_argument("--out", required=True, help="experiment directory: fold<k>/ is written inside")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--evaluate", action="store_true",
                        help="then run each fold's best checkpoint on its test part: predictions.csv and metrics.json, "
                        "as `msamil evaluate` writes them (the workflow does this, sparing a process per fold)")
    group = parser.add_argument_group("training (flags override --experiment)")
    group.add_argument("--experiment", help="JSON/YAML file or inline JSON with experiment options")
    group.add_argument("--model-args", help="JSON of model options, e.g. '{\"dropout\": 0.25}'")
    add_config_arguments(group, TrainConfig, TRAINING_OPTIONS, defaults=False,
                         choices={"balance": BALANCE_CHOICES, "freeze": FREEZE_CHOICES, "monitor": MONITOR_CHOICES})


def experiment_options(args: argparse.Namespace) -> dict:
    """The experiment dict: --experiment, then explicit flags on top."""
    options = read_options(args.experiment) if args.experiment else {}
    flags = {**config_flags(args, TRAINING_OPTIONS), "model_args": json_option(args.model_args, "--model-args"),
             "task": json_option(args.task, "--task")}
    options.update({k: v for k, v in flags.items() if v is not None})
    return options


def run(args: argparse.Namespace) -> None:
    from pathlib import Path

    from ..cohort.sheet import load_sheet
    from ..runtime import resolve_device, set_threads
    from ..training.mil import FoldData, train_experiment

    set_threads(args.threads)
    sheet = load_sheet(args.sheet, need_paths=False)  # bags only: no slide is opened
    folds = load_folds(args, sheet, Path(args.out))
    data = FoldData(args.features, sheet, folds, args.val_fraction, args.split_seed, args.classes)
    train_experiment(experiment_options(args), data, fold_indices(args, folds), args.out, resolve_device(args.device),
                     evaluate=args.evaluate)
