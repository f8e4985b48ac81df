"""Training and evaluation of MIL models on feature bags, one fold at a time.

The loop reads like nanoGPT's: a dataclass config, a pure learning-rate function (linear
warm-up, cosine decay), an autocast context (bf16 on CUDA), gradient accumulation over bags,
gradient clipping, a ``@torch.no_grad()`` evaluation that switches eval/train, a fixed seed,
and a checkpoint dict that rebuilds the model with :func:`msamil_core.mil.create_model`.

Everything random is a pure function of (seed, epoch, bag): the epoch's bag order, the
class-balanced sample and each bag's instance subsample. Together with the saved torch RNG
state, a run that is killed and resumed continues exactly where it stopped.

Files of one fold (``out_dir``):

* ``checkpoint.pt``: the best epoch's model (SPEC "Checkpoint"), written once training ends;
* ``resume.pt``: the same plus optimizer, scheduler and RNG state, written after every epoch
  and when SIGTERM arrives (SLURM preemption); a rerun continues from it. It is removed when
  ``checkpoint.pt`` is written.
* ``history.json``: per-epoch training loss and validation metrics.

Under ``torchrun --nproc-per-node N`` (DDP) each process trains on its share of each epoch's
bags; gradients are averaged across processes, so N processes take the optimizer steps one
process would take with N times the accumulation.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import signal
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .bags import Bag, find_bag, load_bag
from .errors import MsamilError
from .fileio import save_torch, write_json
from .slide import SCALES, scale_index

log = logging.getLogger(__name__)

FREEZE_CHOICES = ("none", "all_but_head")
BALANCE_CHOICES = ("loss", "sampling", "none")
MONITOR_CHOICES = ("val_loss", "val_auc", "val_balanced_accuracy")


@dataclass
class TrainConfig:
    """One experiment's training settings (the config's ``experiments`` entries map onto it)."""

    model: str = "abmil.base"
    model_args: dict = field(default_factory=dict)  # overrides of the registered defaults
    scales: list = field(default_factory=lambda: list(SCALES))  # instances kept, by scale
    epochs: int = 20
    lr: float = 2e-4
    min_lr: float = 1e-6
    warmup_epochs: float = 1.0
    weight_decay: float = 1e-2
    grad_accum: int = 4  # bags per optimizer step
    grad_clip: float = 1.0  # max gradient norm; 0 = off
    max_instances: int = 4096  # random subsample of larger bags in training; 0 = all
    balance: str = "loss"  # class balance by weighted loss, by sampling, or none
    patience: int = 5  # epochs without improvement of `monitor` before stopping; 0 = never
    monitor: str = "val_loss"
    seed: int = 0
    init_from: str | None = None  # our checkpoint or a MIL-Lab / FEATHER weights file
    freeze: str = "none"  # none | all_but_head (train the classifier only)
    bf16: bool = True  # bf16 autocast on CUDA
    workers: int = 0  # DataLoader workers that load bags
    standardize: bool = True  # z-score features per dimension with the training bags' statistics

    def __post_init__(self):
        # YAML 1.1 reads 1e-6 as a string: coerce numbers to the declared types, naming the key.
        for name, kind in (("epochs", int), ("lr", float), ("min_lr", float), ("warmup_epochs", float),
                           ("weight_decay", float), ("grad_accum", int), ("grad_clip", float),
                           ("max_instances", int), ("patience", int), ("seed", int), ("workers", int)):
            try:
                setattr(self, name, kind(getattr(self, name)))
            except (TypeError, ValueError):
                raise MsamilError(f"training option {name} must be a number, got {getattr(self, name)!r}") from None
        self.scales = [SCALES[scale_index(s)] for s in self.scales]
        if not self.scales:
            raise MsamilError("an experiment needs at least one scale (20x, 10x, 5x)")
        checks = [
            (self.freeze in FREEZE_CHOICES, f"freeze must be one of {', '.join(FREEZE_CHOICES)}, got {self.freeze!r}"),
            (self.balance in BALANCE_CHOICES, f"balance must be one of {', '.join(BALANCE_CHOICES)}, got {self.balance!r}"),
            (self.monitor in MONITOR_CHOICES, f"monitor must be one of {', '.join(MONITOR_CHOICES)}, got {self.monitor!r}"),
            (self.epochs >= 1 and self.grad_accum >= 1, "epochs and grad_accum must be at least 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise MsamilError(message)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(values) - known)
        if unknown:
            raise MsamilError(f"unknown training option(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
        return cls(**values)


# ----------------------------------------------------------------------------- pure helpers


def lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float, min_lr: float) -> float:
    """Learning rate at optimizer step ``step``: linear warm-up, then cosine decay to ``min_lr``."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


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


def resolve_device(name: str = "auto") -> torch.device:
    """The torch device of a command's ``--device`` option. ``auto``: the CPU without CUDA;
    under torchrun the process's LOCAL_RANK GPU; else a GPU no other msamil process on this
    machine holds, so that Snakemake's ``--resources gpu=N`` gives N jobs N different GPUs."""
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        if "LOCAL_RANK" in os.environ:
            return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        return torch.device("cuda", _claim_gpu())
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MsamilError(f"device {name!r} asked for, but no CUDA GPU is visible; use --device cpu")
    return torch.device(name)


_claimed: dict[str, int] = {}  # lock file -> open descriptor, held until the process exits


def claim_free(keys: list[str], lock_dir: str | os.PathLike) -> int | None:
    """Index of the first key whose lock file in ``lock_dir`` no other process holds, now held
    by this one until it exits (the operating system releases it even after SIGKILL);
    None when every key is held."""
    import fcntl

    for index, key in enumerate(keys):
        path = os.path.join(lock_dir, f"msamil-{key}.lock")
        if path in _claimed:
            return index
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        _claimed[path] = fd
        return index
    return None


def _claim_gpu() -> int:
    """A visible GPU for this process; GPUs are named by UUID, so jobs that see them in
    another order (CUDA_VISIBLE_DEVICES) still claim each physical GPU once."""
    import tempfile

    count = torch.cuda.device_count()
    if count == 1:
        return 0
    keys = [f"gpu-{torch.cuda.get_device_properties(i).uuid}" for i in range(count)]
    index = claim_free(keys, tempfile.gettempdir())
    if index is None:
        log.warning("all %d GPUs are in use by other msamil jobs; sharing GPU 0 (limit GPU jobs with "
                    "snakemake --resources gpu=%d)", count, count)
        return 0
    return index


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast on CUDA; CPU runs in float32 (bf16 matmuls are slow on most CPUs)."""
    if device.type == "cuda" and bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


# ----------------------------------------------------------------------------- data


@dataclass
class BagItem:
    """One bag as the model takes it (unbatched)."""

    slide_id: str
    features: torch.Tensor  # float [M, D]
    coords: torch.Tensor  # int64 [M, 2] level-0 top-left
    scales: torch.Tensor  # int64 [M]
    label: int


class BagDataset(torch.utils.data.Dataset):
    """Bags of some slides, restricted to the configured scales; in training a bag larger than
    ``max_instances`` is subsampled at random (seeded by seed, epoch and bag)."""

    def __init__(self, paths: list[Path], slide_ids: list[str], labels: list[int], scales: list[str],
                 max_instances: int = 0, seed: int = 0, train: bool = False, norm: dict | None = None):
        self.paths, self.slide_ids, self.labels = list(paths), list(slide_ids), list(labels)
        self.keep = torch.tensor([scale_index(s) for s in scales])
        self.max_instances, self.seed, self.train = max_instances, seed, train
        self.norm = norm  # {"mean": [D], "std": [D]} or None
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> BagItem:
        bag = load_bag(self.paths[i], require_coords=False)
        keep = torch.isin(bag.scales, self.keep)
        feats, coords, scales = bag.features[keep], bag.coords[keep], bag.scales[keep]
        if self.train and self.max_instances and len(feats) > self.max_instances:
            rng = np.random.default_rng([self.seed, self.epoch, i, 2])
            idx = torch.from_numpy(np.sort(rng.permutation(len(feats))[: self.max_instances]))
            feats, coords, scales = feats[idx], coords[idx], scales[idx]
        feats = feats.float()
        if self.norm is not None:
            feats = (feats - self.norm["mean"]) / self.norm["std"]
        return BagItem(self.slide_ids[i], feats, coords, scales, self.labels[i])

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


def _identity(batch):
    return batch[0]


def locate_bags(feature_dir: str | os.PathLike, slide_ids: list[str]) -> list[Path]:
    """The bag file of each slide in ``feature_dir`` (.pt, or TRIDENT/CLAM .h5); fails naming
    the first missing slide."""
    return [find_bag(feature_dir, s) for s in slide_ids]


def check_feature_dim(paths: list[Path], in_dim: int, where: str) -> None:
    """Every bag has ``in_dim`` features, else an error naming the bag and the fix."""
    for p in paths:
        bag = load_bag(p, require_coords=False)
        if bag.features.shape[1] != in_dim:
            raise MsamilError(
                f"{p}: bags have {bag.features.shape[1]} features but {where} expects {in_dim}; "
                "use bags of the same encoder (or the model and weights made for these features)"
            )


# ----------------------------------------------------------------------------- model


def build_model(cfg: TrainConfig, in_dim: int, num_classes: int) -> torch.nn.Module:
    """Create the experiment's model; load ``init_from`` and freeze as configured."""
    from .mil import create_model, load_pretrained

    model = create_model(cfg.model, in_dim=in_dim, num_classes=num_classes, **cfg.model_args)
    if cfg.init_from:
        load_pretrained(model, cfg.init_from)
    if cfg.freeze == "all_but_head":
        head = tuple(model.head_prefixes)
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith(head))
    return model


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
def predict(model, dataset: BagDataset, device, bf16: bool = True) -> tuple[np.ndarray, float]:
    """Class probabilities [N, C] of every bag and the mean unweighted cross-entropy."""
    was_training = model.training
    model.eval()
    probs, losses = [], []
    for i in range(len(dataset)):
        item = dataset[i]
        with autocast(device, bf16):
            results, _ = forward_bag(model, item, device)
        logits = results["logits"].float()
        probs.append(logits.softmax(-1)[0].cpu().numpy())
        losses.append(F.cross_entropy(logits, torch.tensor([item.label], device=device)).item())
    model.train(was_training)
    return np.stack(probs) if probs else np.zeros((0, 0)), float(np.mean(losses)) if losses else float("nan")


# ----------------------------------------------------------------------------- training


class _StopRequest:
    """SIGTERM (SLURM preemption, scancel) sets a flag; the loop saves and exits at the next step."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        def handler(signum, frame):
            log.warning("SIGTERM: saving a resume checkpoint and stopping")
            self.requested = True

        try:
            self._previous = signal.signal(signal.SIGTERM, handler)
        except ValueError:  # not the main thread
            self._previous = None
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class Preempted(SystemExit):
    """Raised after a SIGTERM checkpoint; exit status 143 like a process killed by SIGTERM."""

    def __init__(self):
        super().__init__(143)


def _distributed() -> tuple[int, int]:
    """(rank, world size); initialises the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist.get_rank(), dist.get_world_size()


def _metric_value(name: str, val_loss: float, metrics: dict) -> float:
    """The monitored quantity as 'higher is better'."""
    if name == "val_loss":
        return -val_loss
    value = metrics.get(name.removeprefix("val_"), float("nan"))
    return float("nan") if value is None else float(value)


def train_fold(
    cfg: TrainConfig,
    train_set: BagDataset,
    val_set: BagDataset,
    classes: list[str],
    in_dim: int,
    out_dir: str | os.PathLike,
    device: torch.device,
    encoder: str = "",
    run_config: dict | None = None,
) -> dict:
    """Train one fold and write ``checkpoint.pt``; returns the best epoch's validation metrics.

    Resumes from ``out_dir/resume.pt`` when it exists (same config), and writes it after every
    epoch and on SIGTERM.
    """
    from .metrics import classification_metrics

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rank, world = _distributed()
    norm = train_set.feature_statistics() if cfg.standardize else None
    train_set.norm = val_set.norm = norm
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, in_dim, len(classes)).to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    train_labels = np.asarray(train_set.labels)
    weights = class_weights(train_labels, len(classes)).to(device) if cfg.balance == "loss" else None

    def loss_fn(logits, target):
        return F.cross_entropy(logits.float(), target, weight=weights)

    bags_per_rank = math.ceil(len(train_set) / world)
    steps_per_epoch = math.ceil(bags_per_rank / cfg.grad_accum)
    total_steps = steps_per_epoch * cfg.epochs
    warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)
    ddp_model = model
    if world > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True
        )

    state = {"epoch": 0, "step": 0, "best_score": -math.inf, "best_epoch": -1, "bad_epochs": 0,
             "best_state": None, "best_metrics": {}, "history": []}
    resume_path = out_dir / "resume.pt"
    config_dict = asdict(cfg)
    if resume_path.exists():
        saved = torch.load(resume_path, map_location="cpu", weights_only=True)
        if saved.get("config") != config_dict or saved.get("classes") != classes:
            log.warning("%s was written with another config; starting over", resume_path)
        else:
            model.load_state_dict(saved["state_dict"])
            optimizer.load_state_dict(saved["optimizer"])
            torch.set_rng_state(saved["rng_state"])
            state.update(saved["scheduler"])
            log.info("resuming from %s at epoch %d (step %d)", resume_path, state["epoch"], state["step"])

    def save_resume():
        if rank != 0:
            return
        save_torch(resume_path, {
            "model_name": cfg.model, "model_args": dict(model.model_args), "state_dict": model.state_dict(),
            "classes": classes, "encoder": encoder, "config": config_dict, "epoch": state["epoch"],
            "metrics": state["best_metrics"], "feature_norm": norm, "optimizer": optimizer.state_dict(), "scheduler": state,
            "rng_state": torch.get_rng_state(),
        })

    loader_kwargs = dict(batch_size=1, collate_fn=_identity, num_workers=cfg.workers,
                         persistent_workers=False, pin_memory=device.type == "cuda")
    with _StopRequest() as stop:
        while state["epoch"] < cfg.epochs:
            epoch = state["epoch"]
            train_set.epoch = epoch
            order = epoch_order(train_labels, epoch, cfg.seed, cfg.balance)[rank::world]
            loader = torch.utils.data.DataLoader(torch.utils.data.Subset(train_set, order.tolist()), **loader_kwargs)
            ddp_model.train()
            losses = []
            optimizer.zero_grad(set_to_none=True)
            for i, item in enumerate(loader):
                last_of_step = (i + 1) % cfg.grad_accum == 0 or i + 1 == len(order)
                sync = nullcontext() if (world == 1 or last_of_step) else ddp_model.no_sync()
                with sync, autocast(device, cfg.bf16):
                    results, _ = forward_bag(ddp_model, item, device, loss_fn=loss_fn)
                    loss = results["loss"] / cfg.grad_accum
                loss.backward()
                losses.append(loss.item() * cfg.grad_accum)
                if last_of_step:
                    for group in optimizer.param_groups:
                        group["lr"] = lr_at(state["step"], total_steps, warmup_steps, cfg.lr, cfg.min_lr)
                    if cfg.grad_clip > 0:
                        torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    state["step"] += 1
            probs, val_loss = predict(model, val_set, device, cfg.bf16)
            metrics = classification_metrics(np.asarray(val_set.labels), probs, classes) if len(val_set) else {}
            score = _metric_value(cfg.monitor, val_loss, metrics)
            improved = len(val_set) == 0 or (not math.isnan(score) and score > state["best_score"])
            record = {"epoch": epoch, "train_loss": float(np.mean(losses)), "val_loss": val_loss,
                      "val_auc": metrics.get("auc"), "val_balanced_accuracy": metrics.get("balanced_accuracy"),
                      "lr": optimizer.param_groups[0]["lr"]}
            state["history"].append(record)
            log.info("epoch %d: train loss %.4f, val loss %.4f, val auc %s%s", epoch, record["train_loss"],
                     val_loss, _fmt(record["val_auc"]), " *" if improved else "")
            if improved:
                state.update(best_score=score if not math.isnan(score) else state["best_score"], best_epoch=epoch,
                             bad_epochs=0, best_state=copy.deepcopy(model.state_dict()),
                             best_metrics={"val_loss": val_loss, **{k: v for k, v in metrics.items() if k != "confusion_matrix"}})
            else:
                state["bad_epochs"] += 1
            state["epoch"] = epoch + 1
            save_resume()
            if stop.requested:
                raise Preempted()
            if cfg.patience and state["bad_epochs"] >= cfg.patience:
                log.info("early stop: %s did not improve for %d epochs", cfg.monitor, cfg.patience)
                break

    best_state = state["best_state"] or model.state_dict()
    if rank == 0:
        save_torch(out_dir / "checkpoint.pt", {
            "model_name": cfg.model, "model_args": dict(model.model_args), "state_dict": best_state,
            "classes": classes, "encoder": encoder, "config": run_config or config_dict,
            "epoch": state["best_epoch"], "metrics": state["best_metrics"], "feature_norm": norm,
        })
        write_json(out_dir / "history.json", state["history"])
        resume_path.unlink(missing_ok=True)
    return state["best_metrics"]


def _fmt(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def load_checkpoint(path: str | os.PathLike, device: torch.device | str = "cpu"):
    """Rebuild a model from our checkpoint; returns (model in eval mode, checkpoint dict)."""
    from .mil import create_model

    path = Path(path)
    if not path.exists():
        raise MsamilError(f"checkpoint not found: {path}; train the experiment first")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise MsamilError(f"{path}: not a readable msamil checkpoint ({exc})") from None
    for key in ("model_name", "model_args", "state_dict", "classes"):
        if key not in ckpt:
            raise MsamilError(f"{path}: checkpoint lacks `{key}`; is it an msamil checkpoint?")
    model = create_model(ckpt["model_name"], **ckpt["model_args"])
    model.load_state_dict(ckpt["state_dict"])
    return model.to(device).eval(), ckpt
