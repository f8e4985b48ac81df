"""MIL models on feature bags: one fold's training (on :mod:`.engine`), evaluation and checkpoints.

Everything random is a pure function of (seed, epoch, bag): the epoch's bag order, the
class-balanced sample and each bag's instance subsample; dropout draws from torch's RNG, whose
state resume.pt keeps, so a run that is killed and resumed continues exactly where it stopped.

Files of one fold (``out_dir``):

* ``checkpoint.pt``: the best epoch's model (SPEC "Checkpoint"), written once training ends,
  with the training bags' feature standardisation (``feature_norm``);
* ``resume.pt``: model, optimizer, loop and random state, written after every epoch and on
  SIGTERM; a rerun continues from it; removed when ``checkpoint.pt`` is written;
* ``history.json``: per-epoch training loss and validation metrics;
* with evaluation, ``metrics.json`` and ``predictions.csv`` of the best model on the fold's test part.

Under ``torchrun --nproc-per-node N`` (DDP) each optimizer step covers ``N x grad_accum`` bags,
each process taking its share: N processes take exactly the steps one process would take with
N times the accumulation.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import MsamilError
from ..features.bags import Bag, find_bag, load_bag
from ..fileio import save_torch, torch_load, write_json
from ..runtime import autocast, is_main_process
from ..settings import ECE_BINS, SplitSettings, TrainConfig
from ..wsi.geometry import scale_index
from .calibration import checkpoint_temperature, fit_temperature, scaled_logits
from .engine import Schedule, Task, fit

log = logging.getLogger(__name__)


def epoch_order(labels: np.ndarray, epoch: int, seed: int, balance: str) -> np.ndarray:
    """Indices of the bags to visit in ``epoch``: a permutation, or a class-balanced sample
    with replacement of the same length when ``balance == "sampling"``."""
    rng = np.random.default_rng([seed, epoch, 1])
    n = len(labels)
    if balance != "sampling":
        return rng.permutation(n)
    counts = np.bincount(labels)
    weights = 1.0 / counts[labels]
    return rng.choice(n, size=n, replace=True, p=weights / weights.sum())


def class_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights n / (C * n_c), so every class weighs the same in the loss."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    weights = np.where(counts > 0, len(labels) / (num_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(weights, dtype=torch.float32)




# ----------------------------------------------------------------------------- data


@dataclass
class BagItem:
    """One bag as the model takes it (unbatched)."""

    slide_id: str
    features: torch.Tensor  # float [M, D]
    coords: torch.Tensor  # int64 [M, 2] level-0 top-left
    scales: torch.Tensor  # int64 [M]
    label: int
    sizes: torch.Tensor | None = None  # int64 [M] patch side in level-0 px


def bag_item(bag: Bag, slide_id: str, label: int, keep: torch.Tensor, norm: dict | None = None,
             subsample=None) -> BagItem:
    """A loaded bag as a model takes it: the instances whose scale is in ``keep`` (scale indices),
    of those the rows ``subsample(M)`` picks (default all), features in torch's default dtype,
    standardised with ``norm`` ({"mean": [D], "std": [D]})."""
    rows = torch.isin(bag.scales, keep)
    feats, coords, scales, sizes = (t[rows] for t in (bag.features, bag.coords, bag.scales, bag.patch_size_level0))
    idx = subsample(len(feats)) if subsample else None
    if idx is not None:
        feats, coords, scales, sizes = feats[idx], coords[idx], scales[idx], sizes[idx]
    feats = feats.to(torch.get_default_dtype())  # float32 unless a caller (a float64 test) says otherwise
    if norm is not None:
        feats = (feats - norm["mean"]) / norm["std"]
    return BagItem(slide_id, feats, coords, scales, label, sizes)


class BagDataset(torch.utils.data.Dataset):
    """Bags of some slides, restricted to the configured scales; in training a bag larger than
    ``max_instances`` is subsampled at random (seeded by seed, epoch and bag)."""

    def __init__(self, paths: list[Path], slide_ids: list[str], labels: list[int], scales: list[str],
                 max_instances: int = 0, seed: int = 0, train: bool = False, norm: dict | None = None):
        self.paths, self.slide_ids, self.labels = list(paths), list(slide_ids), list(labels)
        self.keep = scale_indices(scales)
        self.max_instances, self.seed, self.train = max_instances, seed, train
        self.norm = norm  # {"mean": [D], "std": [D]} or None
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> BagItem:
        def subsample(n: int):
            if not (self.train and self.max_instances and n > self.max_instances):
                return None
            rng = np.random.default_rng([self.seed, self.epoch, i, 2])
            return torch.from_numpy(np.sort(rng.permutation(n)[: self.max_instances]))

        bag = load_bag(self.paths[i], require_coords=False)
        return bag_item(bag, self.slide_ids[i], self.labels[i], self.keep, self.norm, subsample)

    def feature_statistics(self) -> dict:
        """Per-dimension mean and std of every instance of these bags (the kept scales):
        {"mean": float [D], "std": float [D]}, std floored so constant dimensions stay finite."""
        total, sq, count = None, None, 0
        for path in self.paths:
            bag = load_bag(path, require_coords=False)
            feats = bag.features[torch.isin(bag.scales, self.keep)].double()
            if total is None:
                total, sq = feats.new_zeros(feats.shape[1]), feats.new_zeros(feats.shape[1])
            total += feats.sum(0)
            sq += (feats * feats).sum(0)
            count += len(feats)
        if not count:
            raise MsamilError("the training bags hold no instance of the experiment's scales")
        mean = total / count
        std = (sq / count - mean * mean).clamp_min(0).sqrt()
        return {"mean": mean.float(), "std": std.clamp_min(1e-6 + 1e-3 * float(std.mean())).float()}


def scale_indices(scales: list[str]) -> torch.Tensor:
    """Scale names -> their indices (0 = 20x, 1 = 10x, 2 = 5x), as a tensor for ``torch.isin``."""
    return torch.tensor([scale_index(s) for s in scales])


def locate_bags(feature_dir: str | os.PathLike, slide_ids: list[str]) -> list[Path]:
    """The bag file of each slide in ``feature_dir`` (.pt, or TRIDENT/CLAM .h5); fails naming
    the first missing slide."""
    return [find_bag(feature_dir, s) for s in slide_ids]


def check_feature_dim(paths: list[Path], in_dim: int, where: str, encoder: str | None = None,
                      scales: list[str] | None = None) -> dict[Path, str]:
    """Every bag has ``in_dim`` features and one encoder id (``encoder``, else the first bag's),
    else an error naming two bags (or the bag and the model) and the fix. Returns the bags with
    no instance at ``scales`` (e.g. a slide whose segmented lesion kept no patch, or whose tiles
    failed to decode), each with why."""
    reference = (encoder, where) if encoder else None
    keep = scale_indices(scales) if scales else None
    empty = {}
    for p in paths:
        bag = load_bag(p, require_coords=False)
        if keep is not None and not bool(torch.isin(bag.scales, keep).any()):
            empty[p] = bag.left_out or f"no patch at {'+'.join(scales)} in its bag {p} (e.g. no lesion found)"
        if bag.features.shape[1] != in_dim:
            raise MsamilError(
                f"{p}: bags have {bag.features.shape[1]} features but {where} expects {in_dim}; "
                "use bags of the same encoder (or the model and weights made for these features)"
            )
        if reference is None:
            reference = (bag.encoder, str(p))
        elif bag.encoder and reference[0] and bag.encoder != reference[0]:
            raise MsamilError(
                f"bags of two encoders: {reference[1]} comes from {reference[0]!r} but {p} from {bag.encoder!r}; "
                "one experiment needs the bags of one encoder (re-extract, or point at one feature folder)"
            )
    return empty


def without_empty(ids: list[str], labels: list[int], paths: list[Path], empty: dict[Path, str], what: str,
                  ) -> tuple[list[str], list[int], list[Path], dict[str, str]]:
    """The slides of a part whose bags hold patches (``empty``: :func:`check_feature_dim`'s); the
    others are left out of it with a warning: ({slide: reason} of those left out)."""
    left = {}
    for sid, path in zip(ids, paths):
        if path in empty:
            left[sid] = empty[path]
            log.warning("slide %r left out of %s: %s", sid, what, left[sid])
    kept = [(s, y, p) for s, y, p in zip(ids, labels, paths) if p not in empty]
    return [s for s, _, _ in kept], [y for _, y, _ in kept], [p for _, _, p in kept], left


def check_init_from(cfg: TrainConfig, bag: Bag, in_dim: int, where: str) -> None:
    """With ``init_from``: the bags come from the encoder (name, width) the weights were trained on."""
    if cfg.init_from:
        from ..mil.transfer import check_transfer

        check_transfer(cfg.init_from, bag.encoder, in_dim, where)


# ----------------------------------------------------------------------------- model


def build_model(cfg: TrainConfig, in_dim: int, num_classes: int, classes: list[str] | None = None) -> torch.nn.Module:
    """Create the experiment's model; load ``init_from`` and freeze as configured. The classifier
    is re-initialised when ``init_from`` is our checkpoint of other ``classes``
    (:func:`transfers_classifier`)."""
    from ..mil import create_model, load_pretrained

    model = create_model(cfg.model, in_dim=in_dim, num_classes=num_classes, **cfg.model_args)
    if cfg.init_from:
        load_pretrained(model, cfg.init_from, keep_classifier=transfers_classifier(cfg.init_from, classes))
    if cfg.freeze == "all_but_head":
        head = tuple(model.head_prefixes)
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith(head))
    return model


def transfers_classifier(init_from: str | os.PathLike, classes: list[str] | None) -> bool:
    """Whether fine-tuning keeps the source's classifier: not when ``init_from`` is our
    checkpoint of other classes (a cytology head must not start an architecture task, even with
    the same number of classes); other weight files keep it when its shape fits."""
    path = Path(init_from)
    if classes is None or path.suffix != ".pt" or not path.is_file():
        return True
    ckpt = torch_load(path, "checkpoint", allow_numpy=True)
    return not (isinstance(ckpt, dict) and "classes" in ckpt and list(ckpt["classes"]) != list(classes))


def forward_bag(model, item: BagItem, device, loss_fn=None, return_attention=False):
    """Run one bag through a model: (results_dict, log_dict) of the SPEC's API."""
    h = item.features.to(device, non_blocking=True).unsqueeze(0)
    label = torch.tensor([item.label], device=device)
    return model(
        h,
        loss_fn=loss_fn,
        label=label,
        coords=item.coords.to(device).unsqueeze(0),
        scales=item.scales.to(device).unsqueeze(0),
        return_attention=return_attention,
    )


@torch.no_grad()
def predict_logits(model, dataset, device, bf16: bool = True, forward=None) -> torch.Tensor:
    """Logits [N, C] (float32, on the CPU) of every item (bag) of ``dataset`` in eval mode;
    ``forward(item)`` runs one item (default :func:`forward_bag`)."""
    was_training = model.training
    model.eval()
    logits = []
    for i in range(len(dataset)):
        item = dataset[i]
        with autocast(device, bf16):
            results, _ = forward(item) if forward else forward_bag(model, item, device)
        logits.append(results["logits"].float()[0].cpu())
    model.train(was_training)
    return torch.stack(logits) if logits else torch.zeros((0, 0))


def predict(model, dataset, device, bf16: bool = True, forward=None,
            temperature: float = 1.0) -> tuple[np.ndarray, float]:
    """Class probabilities [N, C] of every item of ``dataset`` (:func:`predict_logits`, at
    ``temperature``: :func:`~.calibration.scaled_logits`) and their mean unweighted cross-entropy."""
    logits = predict_logits(model, dataset, device, bf16, forward)
    if not len(logits):
        return np.zeros((0, 0)), float("nan")
    logits = scaled_logits(logits, temperature)
    losses = F.cross_entropy(logits, torch.as_tensor(dataset.labels), reduction="none")
    return logits.softmax(-1).numpy(), float(np.mean(losses.tolist()))


def validation_metrics(model, dataset, classes: list[str], device, bf16: bool = True, forward=None,
                       ece_bins: int = ECE_BINS) -> dict | None:
    """``loss`` and :func:`~msamil_core.evaluation.metrics.classification_metrics` of the model on a
    validation set (None when it is empty): what the engine's tasks return from ``evaluate``."""
    from ..evaluation.metrics import classification_metrics

    if not len(dataset):
        return None
    probs, loss = predict(model, dataset, device, bf16, forward)
    return {"loss": loss, **classification_metrics(np.asarray(dataset.labels), probs, classes, ece_bins)}


def load_checkpoint(path: str | os.PathLike, device: torch.device | str = "cpu"):
    """Rebuild a model from our checkpoint; returns (model in eval mode, checkpoint dict)."""
    from ..mil import create_model

    path = Path(path)
    if not path.exists():
        raise MsamilError(f"checkpoint not found: {path}; train the experiment first")
    ckpt = torch_load(path, "checkpoint", allow_numpy=True)
    if not isinstance(ckpt, dict):
        raise MsamilError(f"checkpoint {path}: holds a {type(ckpt).__name__}, not an msamil checkpoint")
    for key in ("model_name", "model_args", "state_dict", "classes"):
        if key not in ckpt:
            raise MsamilError(f"{path}: checkpoint lacks `{key}`; is it an msamil checkpoint?")
    model = create_model(ckpt["model_name"], **ckpt["model_args"])
    model.load_state_dict(ckpt["state_dict"])
    return model.to(device).eval(), ckpt


class SlideTask(Task):
    """What MIL and end-to-end training share: one slide per item, in an order drawn from (seed,
    epoch) (class-balanced with ``balance: sampling``), cross-entropy on the slide label
    (class-weighted with ``balance: loss``), validation by :func:`validation_metrics`."""

    def __init__(self, cfg, train_set, val_set, classes: list[str], device: torch.device):
        self.cfg, self.train_set, self.val_set, self.classes, self.device = cfg, train_set, val_set, classes, device
        self.labels = np.asarray(train_set.labels)
        weights = class_weights(self.labels, len(classes)).to(device) if cfg.balance == "loss" else None
        self.loss_fn = lambda logits, target: F.cross_entropy(logits.float(), target, weight=weights)

    def dataset(self):
        return self.train_set

    def epoch_order(self, epoch: int):
        return epoch_order(self.labels, epoch, self.cfg.seed, self.cfg.balance).tolist()

    def set_epoch(self, epoch: int) -> None:
        self.train_set.epoch = epoch

    def fingerprint(self) -> dict:
        val = self.val_set or None  # e2e's K study has none
        return {"config": asdict(self.cfg), "classes": list(self.classes),
                "train": [[s, int(y)] for s, y in zip(self.train_set.slide_ids, self.train_set.labels)],
                "val": [[s, int(y)] for s, y in zip(val.slide_ids, val.labels)] if val is not None else []}


class MILTask(SlideTask):
    """One fold's MIL training for :func:`~msamil_core.training.engine.fit`: a bag per item; the
    loss adds the model's own instance losses (CLAM, DTFD) to the cross-entropy."""

    def __init__(self, cfg: TrainConfig, train_set: BagDataset, val_set: BagDataset, classes: list[str],
                 in_dim: int, device: torch.device):
        super().__init__(cfg, train_set, val_set, classes, device)
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg, in_dim, len(classes), classes).to(device)

    def param_groups(self) -> list[dict]:
        return [{"params": [p for p in self.model.parameters() if p.requires_grad], "lr": self.cfg.lr,
                 "min_lr": self.cfg.min_lr}]

    def loss(self, item: BagItem, epoch: int, position: int) -> torch.Tensor:
        results, _ = forward_bag(self.model, item, self.device, loss_fn=self.loss_fn)
        return results["loss"]

    def evaluate(self) -> dict | None:
        return validation_metrics(self.model, self.val_set, self.classes, self.device, self.cfg.bf16,
                                  ece_bins=self.cfg.ece_bins)


def train_fold(cfg: TrainConfig, train_set: BagDataset, val_set: BagDataset, classes: list[str], in_dim: int,
               out_dir: str | os.PathLike, device: torch.device, encoder: str = "", run_config: dict | None = None) -> dict:
    """Train one fold and write ``checkpoint.pt`` and ``history.json``; returns the best epoch's
    validation metrics. Resumes from ``out_dir/resume.pt`` when it was written for the same
    config, classes and training slides. With ``temperature_scaling`` the best model's temperature
    is fitted on the validation slides (:func:`~.calibration.fit_temperature`); the checkpoint's
    ``temperature`` is 1.0 without."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.temperature_scaling and not len(val_set):
        raise MsamilError(f"{out_dir}: temperature_scaling needs validation slides and this fold has none; set "
                          "splits.val_fraction above 0 or turn training.temperature_scaling off")
    norm = train_set.feature_statistics() if cfg.standardize else None
    train_set.norm = val_set.norm = norm
    task = MILTask(cfg, train_set, val_set, classes, in_dim, device)
    result = fit(task, Schedule.of(cfg), out_dir / "resume.pt")
    if result.rank == 0:
        temperature = 1.0
        if cfg.temperature_scaling:
            task.model.load_state_dict(result.best_state)
            logits = predict_logits(task.model, val_set, device, cfg.bf16)
            temperature = fit_temperature(logits, torch.as_tensor(val_set.labels))
            log.info("%s: temperature %.4f fitted on %d validation slides", out_dir, temperature, len(val_set))
        save_torch(out_dir / "checkpoint.pt", {
            "model_name": cfg.model, "model_args": dict(task.model.model_args), "state_dict": result.best_state,
            "classes": classes, "encoder": encoder, "config": run_config or asdict(cfg), "epoch": result.best_epoch,
            "metrics": result.best_metrics, "feature_norm": norm, "temperature": temperature,
        })
        write_json(out_dir / "history.json", result.history)
        (out_dir / "resume.pt").unlink(missing_ok=True)
    return result.best_metrics


def checkpoint_scales(ckpt: dict) -> list[str]:
    """The scales an experiment's model reads (its training config; all three by default)."""
    from ..settings import SCALES

    scales = (ckpt.get("config") or {}).get("scales") or SCALES
    return [SCALES[i] for i in sorted({scale_index(s) for s in scales})]


def evaluate_fold(fold_dir: str | os.PathLike, k: int, sheet, folds, features: str | os.PathLike, device,
                  splits: SplitSettings) -> dict:
    """Run ``fold_dir/checkpoint.pt`` on fold ``k``'s test part, its probabilities at the
    checkpoint's temperature; write predictions.csv and metrics.json there
    (``inference_seconds``: loading the test bags and running the model; ``temperature`` when
    the model was trained with temperature scaling)."""
    from ..cohort.tasks import select_slides, task_classes
    from ..evaluation.metrics import classification_metrics, write_predictions
    from .splits import fold_parts

    fold_dir = Path(fold_dir)
    started = time.perf_counter()
    model, ckpt = load_checkpoint(fold_dir / "checkpoint.pt", device)
    task = (ckpt.get("config") or {}).get("task")
    classes, mapping = task_classes(sheet, task, ckpt["classes"] if task is None else None)
    if classes != list(ckpt["classes"]):
        raise MsamilError(
            f"{fold_dir / 'checkpoint.pt'}: the model's classes {ckpt['classes']} differ from this sheet's {classes}; "
            "evaluate with the sheet and task it was trained on"
        )
    parts = fold_parts(folds, k, val_fraction=splits.val_fraction, seed=splits.seed)
    test_ids, test_y = select_slides(parts["test"], sheet, mapping)
    if not test_ids:
        raise MsamilError(f"fold {k} has no test slides for classes {classes}; check folds.csv and the task")
    paths = locate_bags(features, test_ids)
    scales = checkpoint_scales(ckpt)
    empty = check_feature_dim(paths, int(ckpt["model_args"]["in_dim"]), f"the model {fold_dir / 'checkpoint.pt'}",
                              encoder=ckpt.get("encoder") or None, scales=scales)
    test_ids, test_y, paths, left_out = without_empty(test_ids, test_y, paths, empty, f"fold {k}'s test part")
    if not test_ids:
        raise MsamilError(f"fold {k}: no test slide has patches at {'+'.join(scales)}; check the patch selection")
    dataset = BagDataset(paths, test_ids, test_y, scales, norm=ckpt.get("feature_norm"))
    config = ckpt.get("config") or {}
    temperature = checkpoint_temperature(ckpt, str(fold_dir / "checkpoint.pt"))
    probs, loss = predict(model, dataset, device, temperature=temperature)
    y = np.asarray(test_y)
    metrics = classification_metrics(y, probs, classes, config.get("ece_bins", ECE_BINS))
    metrics["loss"] = loss
    if config.get("temperature_scaling"):
        metrics["temperature"] = temperature
    metrics["n_slides"] = len(test_ids)
    if left_out:
        metrics["left_out"] = left_out
    metrics["inference_seconds"] = round(time.perf_counter() - started, 3)
    write_predictions(fold_dir / "predictions.csv", test_ids, y, probs, classes)
    write_json(fold_dir / "metrics.json", metrics)
    log.info("fold %d: %d test slides, auc %s, balanced accuracy %.4f", k, len(test_ids),
             "n/a" if metrics["auc"] is None else f"{metrics['auc']:.4f}", metrics["balanced_accuracy"])
    return metrics


@dataclass
class FoldData:
    """Where an experiment's folds come from: bags, sheet, folds table and how folds are split."""

    features: str | os.PathLike
    sheet: object  # the slide sheet (cohort.sheet.load_sheet)
    folds: object  # the folds table (splits.read_folds / make_folds)
    splits: SplitSettings = field(default_factory=SplitSettings)  # validation parts
    classes: list[str] | None = None  # class order without a task


def train_experiment(cfg: TrainConfig, data: FoldData, folds: list[int], out: str | os.PathLike, device,
                     evaluate: bool = False, task: dict | None = None, name: str | None = None) -> None:
    """Train an experiment on the given folds, each into ``out/fold<k>/``; with ``evaluate`` run
    each fold's best model on its test part too. ``task`` maps class names to sheet labels (None:
    the sheet's labels are the classes)."""
    from ..cohort.tasks import select_slides, task_classes
    from .splits import fold_parts

    name = name or Path(out).name
    classes, mapping = task_classes(data.sheet, task, data.classes)
    out = Path(out)
    for k in folds:
        parts = fold_parts(data.folds, k, val_fraction=data.splits.val_fraction, seed=data.splits.seed)
        (train_ids, train_y), (val_ids, val_y), (test_ids, _) = (
            select_slides(parts[p], data.sheet, mapping) for p in ("train", "val", "test"))
        if cfg.train_fraction is not None and cfg.train_fraction < 1.0:
            train_ids, train_y = learning_curve_subset(train_ids, train_y, data.sheet, cfg)
        if not train_ids:
            raise MsamilError(f"fold {k} has no training slides for classes {classes}; check folds.csv and the task")
        train_paths, val_paths = locate_bags(data.features, train_ids), locate_bags(data.features, val_ids)
        first = load_bag(train_paths[0], require_coords=False)
        in_dim = first.features.shape[1]
        # every bag the fold will touch, test part included, before any training starts
        empty = check_feature_dim(train_paths + val_paths + locate_bags(data.features, test_ids), in_dim,
                                  f"the bags of fold {k} (first: {train_paths[0]})", scales=cfg.scales)
        train_ids, train_y, train_paths, _ = without_empty(train_ids, train_y, train_paths, empty,
                                                           f"fold {k}'s training")
        val_ids, val_y, val_paths, _ = without_empty(val_ids, val_y, val_paths, empty, f"fold {k}'s validation")
        if not train_ids:
            raise MsamilError(f"fold {k}: no training slide has patches at {'+'.join(cfg.scales)}; "
                              "check the patch selection")
        check_init_from(cfg, first, in_dim, f"the bags of fold {k} (e.g. {train_paths[0]})")
        train_set = BagDataset(train_paths, train_ids, train_y, cfg.scales, cfg.max_instances, cfg.seed, train=True)
        val_set = BagDataset(val_paths, val_ids, val_y, cfg.scales)
        log.info("%s fold %d: %d train / %d val slides, classes %s, model %s on %s", name, k, len(train_ids),
                 len(val_ids), classes, cfg.model, "+".join(cfg.scales))
        run_config = {"name": name, "task": task, **cfg.to_dict()}
        metrics = train_fold(cfg, train_set, val_set, classes, in_dim, out / f"fold{k}", device,
                             encoder=first.encoder, run_config=run_config)
        log.info("%s fold %d: best validation %s", name, k,
                 {m: round(v, 4) for m, v in metrics.items() if isinstance(v, float)})
        if evaluate and is_main_process():
            evaluate_fold(out / f"fold{k}", k, data.sheet, data.folds, data.features, device, data.splits)


def learning_curve_subset(train_ids: list[str], train_y: list[int], sheet,
                          cfg: TrainConfig) -> tuple[list[str], list[int]]:
    """A fold's training slides and labels cut to ``train_fraction`` of its patients per class
    (:func:`~.splits.training_subset`, seeded by the repeat so that each repeat draws anew)."""
    from .splits import training_subset

    patients = [str(sheet.loc[s, "patient_id"]) for s in train_ids]
    kept = training_subset(patients, train_y, cfg.train_fraction, seed=cfg.repeat)
    log.info("train_fraction %s: %d of %d training slides", cfg.train_fraction, len(kept), len(train_ids))
    return [train_ids[i] for i in kept], [train_y[i] for i in kept]


def evaluate_experiment(models: str | os.PathLike, sheet, folds, fold_list: list[int], features: str | os.PathLike,
                        device, splits: SplitSettings) -> list[dict]:
    """``msamil evaluate``: :func:`evaluate_fold` for each fold of ``fold_list`` of the experiment
    folder ``models``."""
    return [evaluate_fold(Path(models) / f"fold{k}", k, sheet, folds, features, device, splits) for k in fold_list]
