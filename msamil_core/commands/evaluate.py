"""Evaluate trained fold models on their test parts: predictions.csv and metrics.json per fold.

For each fold, the checkpoint <models>/fold<k>/checkpoint.pt is run on the fold's test slides
(the slides of the patients whose `fold` is k in folds.csv, restricted to the experiment's task).
Metrics: AUC (binary; macro one-vs-rest for more classes), accuracy, balanced accuracy, macro
F1 and the confusion matrix. predictions.csv has slide_id, label, predicted and prob_<class>.
"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "fold checkpoints -> predictions.csv + metrics.json on each fold's test part"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .train import add_data_arguments

    add_data_arguments(parser)
    parser.add_argument("--models", required=True, help="experiment directory holding fold<k>/checkpoint.pt")
    parser.add_argument("--threads", type=int, help="torch CPU threads")


def run(args: argparse.Namespace) -> None:
    import torch

    from ..sheet import load_sheet
    from ..train import resolve_device
    from .train import fold_indices, load_folds

    if args.threads:
        torch.set_num_threads(args.threads)
    sheet = load_sheet(args.sheet)
    folds = load_folds(args, sheet)
    device = resolve_device(args.device)
    for k in fold_indices(args, folds):
        evaluate_fold(Path(args.models) / f"fold{k}", k, sheet, folds, args.features, device,
                      val_fraction=args.val_fraction, split_seed=args.split_seed)


def evaluate_fold(fold_dir, k: int, sheet, folds, features: str, device, val_fraction: float = 0.2,
                  split_seed: int = 0) -> dict:
    """Run ``fold_dir/checkpoint.pt`` on fold ``k``'s test part; write predictions.csv and
    metrics.json there (``inference_seconds``: loading the test bags and running the model)."""
    import logging
    import time

    import numpy as np

    from ..errors import MsamilError
    from ..experiment import select_slides, task_classes
    from ..fileio import write_json
    from ..metrics import classification_metrics, write_predictions
    from ..splits import fold_parts
    from ..train import BagDataset, TrainConfig, check_feature_dim, load_checkpoint, locate_bags, predict

    log = logging.getLogger("msamil.evaluate")
    fold_dir = Path(fold_dir)
    started = time.perf_counter()
    model, ckpt = load_checkpoint(fold_dir / "checkpoint.pt", device)
    run_config = ckpt.get("config") or {}
    task = run_config.get("task")
    classes, mapping = task_classes(sheet, task, ckpt["classes"] if task is None else None)
    if classes != list(ckpt["classes"]):
        raise MsamilError(
            f"{fold_dir / 'checkpoint.pt'}: the model's classes {ckpt['classes']} differ from this sheet's {classes}; "
            "evaluate with the sheet and task it was trained on"
        )
    test_ids, test_y = select_slides(fold_parts(folds, k, val_fraction=val_fraction, seed=split_seed)["test"], sheet, mapping)
    if not test_ids:
        raise MsamilError(f"fold {k} has no test slides for classes {classes}; check folds.csv and the task")
    paths = locate_bags(features, test_ids)
    check_feature_dim(paths, int(ckpt["model_args"]["in_dim"]), f"the model {fold_dir / 'checkpoint.pt'}")
    scales = TrainConfig.from_dict({k2: v for k2, v in run_config.items() if k2 in TrainConfig.__dataclass_fields__}).scales
    dataset = BagDataset(paths, test_ids, test_y, scales, norm=ckpt.get("feature_norm"))
    probs, loss = predict(model, dataset, device)
    y = np.asarray(test_y)
    metrics = classification_metrics(y, probs, classes)
    metrics["loss"] = loss
    metrics["n_slides"] = len(test_ids)
    metrics["inference_seconds"] = round(time.perf_counter() - started, 3)
    write_predictions(fold_dir / "predictions.csv", test_ids, y, probs, classes)
    write_json(fold_dir / "metrics.json", metrics)
    log.info("fold %d: %d test slides, auc %.4f, balanced accuracy %.4f", k, len(test_ids),
             metrics.get("auc", float("nan")) or float("nan"), metrics.get("balanced_accuracy", float("nan")))
    return metrics
