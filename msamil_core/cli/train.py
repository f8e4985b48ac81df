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

from .options import add_fold_arguments, fold_indices, json_option, load_folds, read_options

HELP = "feature bags + sheet + folds -> models/<experiment>/fold<k>/checkpoint.pt"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..training.mil import BALANCE_CHOICES, FREEZE_CHOICES, MONITOR_CHOICES

    parser.add_argument("--features", required=True, help="directory of feature bags (<slide_id>.pt or .h5)")
    add_fold_arguments(parser)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    parser.add_argument("--out", required=True, help="experiment directory: fold<k>/ is written inside")
    parser.add_argument("--experiment", help="JSON/YAML file or inline JSON with experiment options")
    parser.add_argument("--model", help="registered MIL model (see `msamil list-models`; default abmil.base)")
    parser.add_argument("--model-args", help="JSON of model options, e.g. '{\"dropout\": 0.25}'")
    parser.add_argument("--scales", nargs="+", help="scales whose instances are used (default: 20x 10x 5x)")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--lr", type=float, help="peak learning rate (AdamW)")
    parser.add_argument("--weight-decay", type=float)
    parser.add_argument("--warmup-epochs", type=float)
    parser.add_argument("--grad-accum", type=int, help="bags per optimizer step (per process under torchrun)")
    parser.add_argument("--max-instances", type=int, help="random subsample of larger bags in training (0 = all)")
    parser.add_argument("--balance", choices=BALANCE_CHOICES, help="class balance by loss weights or sampling")
    parser.add_argument("--patience", type=int, help="early stopping patience in epochs (0 = off)")
    parser.add_argument("--monitor", choices=MONITOR_CHOICES)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--init-from", help="our checkpoint or MIL-Lab/FEATHER weights to start from (transfer)")
    parser.add_argument("--freeze", choices=FREEZE_CHOICES)
    parser.add_argument("--workers", type=int, help="DataLoader workers loading bags")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--evaluate", action="store_true",
                        help="then run each fold's best checkpoint on its test part: predictions.csv and metrics.json, "
                        "as `msamil evaluate` writes them (the workflow does this, sparing a process per fold)")


def experiment_options(args: argparse.Namespace) -> dict:
    """The experiment dict: --experiment, then explicit flags on top."""
    options = read_options(args.experiment) if args.experiment else {}
    flags = {
        "model": args.model, "scales": args.scales, "epochs": args.epochs, "lr": args.lr,
        "weight_decay": args.weight_decay, "warmup_epochs": args.warmup_epochs, "grad_accum": args.grad_accum,
        "max_instances": args.max_instances, "balance": args.balance, "patience": args.patience,
        "monitor": args.monitor, "seed": args.seed, "init_from": args.init_from, "freeze": args.freeze,
        "workers": args.workers, "model_args": json_option(args.model_args, "--model-args"),
        "task": json_option(args.task, "--task"),
    }
    options.update({k: v for k, v in flags.items() if v is not None})
    return options


def run(args: argparse.Namespace) -> None:
    from pathlib import Path

    from ..cohort.sheet import load_sheet
    from ..runtime import resolve_device, set_threads
    from ..training.mil import FoldData, train_experiment

    set_threads(args.threads)
    sheet = load_sheet(args.sheet)
    folds = load_folds(args, sheet, Path(args.out))
    data = FoldData(args.features, sheet, folds, args.val_fraction, args.split_seed, args.classes)
    train_experiment(experiment_options(args), data, fold_indices(args, folds), args.out, resolve_device(args.device),
                     evaluate=args.evaluate)
