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

HELP = "feature bags + sheet + folds -> models/<experiment>/fold<k>/checkpoint.pt"


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by train and evaluate: bags, sheet, folds, task."""
    parser.add_argument("--features", required=True, help="directory of feature bags (<slide_id>.pt or .h5)")
    parser.add_argument("--sheet", required=True, help="slide sheet (CSV/TSV with slide_id, path, label, patient_id)")
    parser.add_argument("--folds", help="folds.csv from `msamil splits`; default: made from the sheet")
    parser.add_argument("--fold", default="all", help="fold index, or `all` (default)")
    parser.add_argument("--n-folds", type=int, default=5, help="folds to make when --folds is not given (default 5)")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="share of training patients used for validation")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the folds and validation parts")
    parser.add_argument("--classes", nargs="+", help="class order (default: sorted sheet labels)")
    parser.add_argument("--task", help="JSON: class name -> list of sheet labels (e.g. a two-class task)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..train import BALANCE_CHOICES, FREEZE_CHOICES, MONITOR_CHOICES

    add_data_arguments(parser)
    parser.add_argument("--out", required=True, help="experiment directory: fold<k>/ is written inside")
    parser.add_argument("--experiment", help="JSON/YAML file or inline JSON with experiment options")
    parser.add_argument("--model", help="registered MIL model (see `msamil list-models`; default abmil.base)")
    parser.add_argument("--model-args", help="JSON of model options, e.g. '{\"dropout\": 0.25}'")
    parser.add_argument("--scales", nargs="+", help="scales whose instances are used (default: 20x 10x 5x)")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--lr", type=float, help="peak learning rate (AdamW)")
    parser.add_argument("--weight-decay", type=float)
    parser.add_argument("--warmup-epochs", type=float)
    parser.add_argument("--grad-accum", type=int, help="bags per optimizer step")
    parser.add_argument("--max-instances", type=int, help="random subsample of larger bags in training (0 = all)")
    parser.add_argument("--balance", choices=BALANCE_CHOICES, help="class balance by loss weights or sampling")
    parser.add_argument("--patience", type=int, help="early stopping patience in epochs (0 = off)")
    parser.add_argument("--monitor", choices=MONITOR_CHOICES)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--init-from", help="our checkpoint or MIL-Lab/FEATHER weights to start from (transfer)")
    parser.add_argument("--freeze", choices=FREEZE_CHOICES)
    parser.add_argument("--workers", type=int, help="DataLoader workers loading bags")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument(
        "--evaluate",
        action="store_true",
        help="then run each fold's best checkpoint on its test part: predictions.csv and metrics.json, as "
        "`msamil evaluate` writes them (the workflow does this, sparing a process per fold)",
    )


def read_options(text: str, flag: str = "--experiment") -> dict:
    """Options from inline JSON or a JSON/YAML file."""
    import json
    from pathlib import Path

    import yaml

    from ..errors import MsamilError

    try:
        if text.lstrip().startswith("{"):  # inline JSON
            options = json.loads(text)
        elif Path(text).is_file():
            options = yaml.safe_load(Path(text).read_text()) or {}
        else:
            raise MsamilError(f"{flag} {text}: no such file (give a JSON/YAML file or inline JSON)")
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise MsamilError(f"{flag}: not valid JSON/YAML ({exc})") from None
    if not isinstance(options, dict):
        raise MsamilError(f"{flag} must be a mapping of options")
    return options


def experiment_options(args: argparse.Namespace) -> dict:
    """The experiment dict: --experiment, then explicit flags on top."""
    import json

    from ..errors import MsamilError

    options = read_options(args.experiment) if args.experiment else {}
    flags = {
        "model": args.model, "scales": args.scales, "epochs": args.epochs, "lr": args.lr,
        "weight_decay": args.weight_decay, "warmup_epochs": args.warmup_epochs, "grad_accum": args.grad_accum,
        "max_instances": args.max_instances, "balance": args.balance, "patience": args.patience,
        "monitor": args.monitor, "seed": args.seed, "init_from": args.init_from, "freeze": args.freeze,
        "workers": args.workers,
    }
    options.update({k: v for k, v in flags.items() if v is not None})
    if args.model_args:
        try:
            options["model_args"] = json.loads(args.model_args)
        except json.JSONDecodeError as exc:
            raise MsamilError(f"--model-args: not JSON ({exc})") from None
    if getattr(args, "task", None):
        try:
            options["task"] = json.loads(args.task)
        except json.JSONDecodeError as exc:
            raise MsamilError(f"--task: not JSON ({exc})") from None
    return options


def load_folds(args: argparse.Namespace, sheet, out_dir=None):
    """folds.csv from --folds, or made from the sheet (and written to out_dir/folds.csv)."""
    from pathlib import Path

    from ..splits import make_folds, read_folds, write_folds

    if args.folds:
        folds = read_folds(args.folds)
    else:
        folds = make_folds(sheet, n_folds=args.n_folds, seed=args.split_seed)
        if out_dir is not None:
            write_folds(Path(out_dir) / "folds.csv", folds)
    return folds


def fold_indices(args: argparse.Namespace, folds) -> list[int]:
    from ..errors import MsamilError

    n = int(folds["fold"].max()) + 1
    if args.fold == "all":
        return list(range(n))
    try:
        k = int(args.fold)
    except ValueError:
        raise MsamilError(f"--fold must be a fold index or `all`, got {args.fold!r}") from None
    if not 0 <= k < n:
        raise MsamilError(f"--fold {k}: the folds file has folds 0..{n - 1}")
    return [k]


def run(args: argparse.Namespace) -> None:
    import logging
    import os
    from pathlib import Path

    import torch

    from ..bags import load_bag
    from ..experiment import select_slides, task_classes
    from ..sheet import load_sheet
    from ..splits import fold_parts
    from ..train import BagDataset, TrainConfig, check_feature_dim, locate_bags, resolve_device, train_fold
    from .evaluate import evaluate_fold

    log = logging.getLogger("msamil.train")
    if args.threads:
        torch.set_num_threads(args.threads)
    options = experiment_options(args)
    task = options.pop("task", None)
    name = options.pop("name", Path(args.out).name)
    options.pop("encoder", None)  # the workflow's feature set; the bags say which encoder made them
    strategy = options.pop("strategy", None)  # patch selection of the bags (kept for the report)
    e2e = options.pop("e2e", None)  # retrained on e2e-tuned features: {name, frozen, dir}, for the report
    cfg = TrainConfig.from_dict(options)
    sheet = load_sheet(args.sheet)
    classes, mapping = task_classes(sheet, task, args.classes)
    out = Path(args.out)
    folds = load_folds(args, sheet, out)
    device = resolve_device(args.device)
    for k in fold_indices(args, folds):
        parts = fold_parts(folds, k, val_fraction=args.val_fraction, seed=args.split_seed)
        train_ids, train_y = select_slides(parts["train"], sheet, mapping)
        val_ids, val_y = select_slides(parts["val"], sheet, mapping)
        train_paths = locate_bags(args.features, train_ids)
        val_paths = locate_bags(args.features, val_ids)
        test_ids, _ = select_slides(parts["test"], sheet, mapping)
        first = load_bag(train_paths[0], require_coords=False)
        in_dim = first.features.shape[1]
        # every bag the fold will touch, test part included, before any training starts
        check_feature_dim(train_paths + val_paths + locate_bags(args.features, test_ids), in_dim,
                          f"the bags of fold {k} (first: {train_paths[0]})")
        train_set = BagDataset(train_paths, train_ids, train_y, cfg.scales, cfg.max_instances, cfg.seed, train=True)
        val_set = BagDataset(val_paths, val_ids, val_y, cfg.scales)
        log.info("%s fold %d: %d train / %d val slides, classes %s, model %s on %s", name, k, len(train_ids),
                 len(val_ids), classes, cfg.model, "+".join(cfg.scales))
        run_config = {"name": name, "task": task, **options, **({"strategy": strategy} if strategy else {}),
                      **({"e2e": e2e} if e2e else {})}
        metrics = train_fold(cfg, train_set, val_set, classes, in_dim, out / f"fold{k}", device,
                             encoder=first.encoder, run_config=run_config)
        log.info("%s fold %d: best validation %s", name, k, {m: round(v, 4) for m, v in metrics.items() if isinstance(v, float)})
        if args.evaluate and int(os.environ.get("RANK", "0")) == 0:
            evaluate_fold(out / f"fold{k}", k, sheet, folds, args.features, device,
                          val_fraction=args.val_fraction, split_seed=args.split_seed)
