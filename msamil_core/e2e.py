"""End-to-end training of a patch encoder and a MIL aggregator on K patches per slide.

MsaMIL-Net (sec. 3.4, Algorithm 2): each step takes a slide, samples K of its patches
(200 in the paper) across its 20x/10x/5x coordinates, reads and encodes them with the
trainable encoder, feeds the K features with their coordinates and scales to the MIL model
and takes the cross-entropy on the slide label; one optimizer updates both (separate learning
rates). Activation checkpointing keeps only each chunk of patches' input and output features
alive between forward and backward, so memory grows with K by a few KB per patch rather than
by the encoder's activations. The K patches are resampled every epoch.

Campanella et al. (all-in-memory multi-GPU slide training): under ``torchrun --nproc-per-node
W`` the K patches of a slide are split into W contiguous shares, each rank encodes its share,
and the features are all-gathered *with autograd* (``torch.distributed.nn.functional.
all_gather``) so every rank runs the same aggregator on all K. The gather's backward sums the
feature gradients of all W ranks, so each rank's encoder gradient is W times its share's part
of the true gradient, while its (replicated) aggregator gradient is the true one. Summing
every gradient over ranks and dividing by W therefore gives, on every rank, exactly the
gradient of one process on the same K patches (:func:`sync_gradients`). BatchNorm layers of
the encoder run on their stored statistics (eval mode) so that a patch's feature never depends
on which other patches share its chunk or rank; dropout in the aggregator draws from a
generator seeded per step, identical on every rank.

Files of one fold (``out_dir``), as in :mod:`msamil_core.train`:

* ``checkpoint.pt``: the best epoch (lowest validation loss) as a SPEC checkpoint of the MIL
  model (``model_name``, ``model_args``, ``state_dict``, ``classes``, ...) plus
  ``encoder_spec`` (name, input size, normalisation, options) and ``encoder_state_dict`` (the
  tuned encoder). ``msamil extract --encoder-checkpoint`` re-extracts features with it.
* ``resume.pt``: the same plus optimizer and loop state and the RNG state, written after every
  epoch and when SIGTERM arrives (at the next optimizer step); a rerun continues from it.
* ``history.json``: per-epoch training loss and validation metrics.

The K study (:func:`k_study`, Campanella et al.'s finding that the training loss falls as K
grows) trains the same initial model for the same number of steps with several K and writes
the loss curves (CSV, PNG) and a summary.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .encoders import EncoderSpec, PatchEncoder, build_encoder, encoder_id
from .errors import MsamilError
from .extract import read_patch_table
from .fileio import atomic_path, save_torch, write_json
from .slide import SCALES, Slide, open_slide, scale_index
from .train import (
    BALANCE_CHOICES,
    Preempted,
    _distributed,
    _StopRequest,
    autocast,
    class_weights,
    epoch_order,
    lr_at,
)

log = logging.getLogger(__name__)

# Encoder options that name a file only the initial weights need; the tuned state replaces it.
_INIT_ONLY_KWARGS = ("backbone_weights",)


@dataclass
class E2EConfig:
    """End-to-end training settings (the config's ``e2e`` entries map onto it)."""

    model: str = "msamil.base"
    model_args: dict = field(default_factory=dict)
    scales: list = field(default_factory=lambda: list(SCALES))  # patches sampled from these scales
    k: int = 200  # patches sampled per slide and step (paper: 200)
    epochs: int = 10
    lr: float = 1e-4  # MIL aggregator's peak learning rate
    encoder_lr: float = 1e-5  # encoder's peak learning rate
    min_lr: float = 1e-6  # the aggregator's floor; the encoder's is scaled by encoder_lr / lr
    warmup_epochs: float = 1.0
    weight_decay: float = 1e-2
    grad_accum: int = 1  # slides per optimizer step
    grad_clip: float = 1.0
    balance: str = "loss"  # loss | sampling | none
    seed: int = 0
    bf16: bool = True  # bf16 autocast on CUDA
    checkpointing: bool = True  # activation checkpointing of the encoder, chunk by chunk
    chunk_size: int = 16  # patches per encoder forward
    workers: int = 0  # DataLoader processes reading the next slides' patches
    standardize: bool = True  # z-score features with the initial encoder's statistics on training patches

    def __post_init__(self):
        for name, kind in (("k", int), ("epochs", int), ("lr", float), ("encoder_lr", float), ("min_lr", float),
                           ("warmup_epochs", float), ("weight_decay", float), ("grad_accum", int),
                           ("grad_clip", float), ("seed", int), ("chunk_size", int), ("workers", int)):
            try:
                setattr(self, name, kind(getattr(self, name)))
            except (TypeError, ValueError):
                raise MsamilError(f"e2e option {name} must be a number, got {getattr(self, name)!r}") from None
        self.scales = [SCALES[scale_index(s)] for s in self.scales]
        checks = [
            (bool(self.scales), "e2e needs at least one scale (20x, 10x, 5x)"),
            (self.k >= 1 and self.chunk_size >= 1, "e2e options k and chunk_size must be at least 1"),
            (self.epochs >= 1 and self.grad_accum >= 1, "e2e options epochs and grad_accum must be at least 1"),
            (self.balance in BALANCE_CHOICES, f"balance must be one of {', '.join(BALANCE_CHOICES)}, got {self.balance!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise MsamilError(message)

    @classmethod
    def from_dict(cls, values: dict) -> "E2EConfig":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise MsamilError(f"unknown e2e option(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
        return cls(**values)


# ----------------------------------------------------------------------------- data


def sample_patches(n: int, k: int, seed: int, epoch: int, index: int) -> np.ndarray:
    """Indices of the K patches (of ``n``) slide ``index`` uses in ``epoch``: a uniform sample
    without replacement, sorted, a pure function of its arguments (all of them when n <= k)."""
    if n <= k:
        return np.arange(n)
    rng = np.random.default_rng([seed, epoch, index, 3])
    return np.sort(rng.choice(n, size=k, replace=False))


@dataclass
class SlidePatches:
    """K patches of one slide as the joint model takes them (unbatched)."""

    slide_id: str
    patches: torch.Tensor  # uint8 [K, S, S, 3]
    coords: torch.Tensor  # int64 [K, 2] level-0 top-left
    scales: torch.Tensor  # int64 [K]
    label: int


@dataclass(frozen=True)
class SlideSource:
    """Where one slide's patches come from."""

    slide_id: str
    path: str
    mpp: float | None
    coords_paths: tuple[str, ...]


class SlidePatchDataset(torch.utils.data.Dataset):
    """Slides -> K sampled patches each, read at ``input_size`` px from their coordinates.

    Coordinates are read (and checked) when the dataset is made, so a missing file fails
    before training. ``epoch`` selects the sample: patches are resampled every epoch. Slides
    open lazily in whichever process reads, and stay open there.
    """

    def __init__(self, sources: list[SlideSource], labels: list[int], k: int, input_size: int,
                 scales: list[str], seed: int = 0):
        self.sources, self.labels = list(sources), list(labels)
        self.k, self.input_size, self.seed = int(k), int(input_size), seed
        keep = [scale_index(s) for s in scales]
        self.tables = []
        for src in self.sources:
            table = read_patch_table(src.coords_paths)
            rows = np.flatnonzero(np.isin(table.scales, keep))
            if not len(rows):
                raise MsamilError(f"slide {src.slide_id!r}: no patch at {'/'.join(scales)} in {list(src.coords_paths)}; "
                                  "drop the slide from the sheet or lower patches.min_fraction")
            self.tables.append((table.coords[rows], table.scales[rows], table.patch_size_level0[rows]))
        self.epoch = 0
        self._open: dict[int, Slide] = {}

    @property
    def slide_ids(self) -> list[str]:
        return [s.slide_id for s in self.sources]

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int) -> SlidePatches:
        coords, scales, sizes = self.tables[i]
        idx = sample_patches(len(coords), self.k, self.seed, self.epoch, i)
        src = self.sources[i]
        if i not in self._open:
            self._open[i] = open_slide(src.path, src.slide_id, src.mpp)
        slide = self._open[i]
        patches = np.stack([slide.read_patch(int(coords[j, 0]), int(coords[j, 1]), int(sizes[j]), self.input_size)
                            for j in idx])
        return SlidePatches(src.slide_id, torch.from_numpy(patches), torch.from_numpy(coords[idx]),
                            torch.from_numpy(scales[idx]), self.labels[i])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_open": {}}

    def close(self) -> None:
        for slide in self._open.values():
            slide.close()
        self._open.clear()


def _identity(batch):
    return batch[0]


def slide_loader(dataset, order: list[int], workers: int, device: torch.device):
    """The slides ``order`` lists, one item at a time; workers read ahead while the model runs."""
    return torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, order), batch_size=1, collate_fn=_identity, num_workers=workers,
        pin_memory=device.type == "cuda", prefetch_factor=2 if workers else None,
    )


# ----------------------------------------------------------------------------- model


def freeze_norm_statistics(module: nn.Module) -> None:
    """Put BatchNorm layers in eval mode: a patch's feature must not depend on the chunk or
    rank it is encoded in (and recomputation under checkpointing must not update statistics twice)."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


class EndToEnd(nn.Module):
    """A trainable patch encoder and a MIL aggregator, trained as one model.

    ``encode`` maps uint8 patches [n, S, S, 3] to features [n, D] in chunks of ``chunk_size``;
    with ``checkpointing`` each chunk is recomputed in the backward pass instead of keeping its
    activations. ``aggregate`` runs the MIL model on features [K, D] of one slide.
    """

    def __init__(self, encoder: PatchEncoder, mil: nn.Module, checkpointing: bool = True, chunk_size: int = 16):
        super().__init__()
        self.encoder, self.mil = encoder, mil
        self.checkpointing, self.chunk_size = checkpointing, int(chunk_size)
        # Fixed per-dimension standardisation of the features before the aggregator (identity
        # until fit_feature_norm): a randomly initialised encoder's features can be far from unit
        # scale, which the frozen pipeline handles by standardising bags (train.standardize).
        self.register_buffer("feature_mean", torch.zeros(encoder.out_dim))
        self.register_buffer("feature_std", torch.ones(encoder.out_dim))

    def train(self, mode: bool = True):
        super().train(mode)
        freeze_norm_statistics(self.encoder)
        return self

    def encode(self, patches: torch.Tensor) -> torch.Tensor:
        x = patches.permute(0, 3, 1, 2)  # [n, 3, S, S], channels_last strides, no copy
        if len(x) == 0:
            return x.new_zeros(0, self.encoder.out_dim, dtype=self.encoder.mean.dtype)
        if self.checkpointing and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            chunks = [checkpoint(self.encoder, x[i : i + self.chunk_size], use_reentrant=False)
                      for i in range(0, len(x), self.chunk_size)]
        else:
            chunks = [self.encoder(x[i : i + self.chunk_size]) for i in range(0, len(x), self.chunk_size)]
        features = torch.cat(chunks)
        return features.float() if features.dtype in (torch.float16, torch.bfloat16) else features

    def aggregate(self, features: torch.Tensor, coords: torch.Tensor, scales: torch.Tensor,
                  label: torch.Tensor | None = None, loss_fn=None):
        features = (features - self.feature_mean) / self.feature_std
        return self.mil(features.unsqueeze(0), loss_fn=loss_fn, label=label,
                        coords=coords.unsqueeze(0), scales=scales.unsqueeze(0))


def step_seed(*values: int) -> int:
    """A 31-bit seed fixed by ``values`` (seed, epoch, slide position): the same on every rank and rerun."""
    return int(np.random.SeedSequence(list(values)).generate_state(1)[0] >> 1)


def share(k: int, rank: int, world: int) -> tuple[int, int]:
    """[lo, hi) of the K patches rank ``rank`` of ``world`` encodes: contiguous, ceil(K/W) each."""
    size = math.ceil(k / world)
    return min(k, rank * size), min(k, (rank + 1) * size)


def gather_features(local: torch.Tensor, k: int, world: int) -> torch.Tensor:
    """All ranks' shares [lo:hi) -> the features of all K patches [K, D], in patch order, with
    autograd (the backward sums each rank's gradient into the share that produced it)."""
    if world == 1:
        return local
    from torch.distributed.nn.functional import all_gather

    size = math.ceil(k / world)
    padded = torch.cat([local, local.new_zeros(size - len(local), local.shape[1])]) if len(local) < size else local
    parts = all_gather(padded)
    return torch.cat([p[: hi - lo] for p, (lo, hi) in zip(parts, (share(k, r, world) for r in range(world)))])


def slide_forward(model: EndToEnd, item: SlidePatches, device: torch.device, rank: int = 0, world: int = 1,
                  loss_fn=None, bf16: bool = True, dropout_seed: int | None = None):
    """One slide through the joint model, its patches split over ``world`` ranks:
    (results_dict, log_dict) of the MIL model on all K features."""
    k = len(item.patches)
    lo, hi = share(k, rank, world)
    with autocast(device, bf16):
        local = model.encode(item.patches[lo:hi].to(device, non_blocking=True))
    features = gather_features(local, k, world)
    label = torch.tensor([item.label], device=device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], enabled=dropout_seed is not None):
        if dropout_seed is not None:  # the aggregator's dropout masks: the same on every rank
            torch.manual_seed(dropout_seed)
        with autocast(device, bf16):
            return model.aggregate(features, item.coords.to(device), item.scales.to(device), label, loss_fn)


def sync_gradients(parameters: list[nn.Parameter], world: int) -> None:
    """Sum every gradient over ranks and divide by W: the encoder's shares add up and the
    replicated aggregator's W equal copies average, so each rank holds the one-process gradient."""
    if world == 1:
        return
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p, g in zip(parameters, grads):
        p.grad = flat[offset : offset + g.numel()].view_as(p).clone()
        offset += g.numel()


def build_joint_model(cfg: E2EConfig, spec: EncoderSpec, num_classes: int) -> EndToEnd:
    """The encoder of ``spec`` (its seeded initialisation or weights) and a fresh MIL model
    (seeded by ``cfg.seed``), identical on every rank."""
    from .mil import create_model

    encoder, dim = build_encoder(spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        mil = create_model(cfg.model, in_dim=dim, num_classes=num_classes, **cfg.model_args)
    encoder.to(memory_format=torch.channels_last)  # as msamil extract: faster convolutions, on the CPU too
    return EndToEnd(encoder, mil, cfg.checkpointing, cfg.chunk_size)


@torch.no_grad()
def fit_feature_norm(model: EndToEnd, dataset: "SlidePatchDataset", device: torch.device, bf16: bool = True,
                     max_slides: int = 8) -> dict:
    """Set the model's feature standardisation from the current encoder on the epoch-0 patches
    of the first ``max_slides`` slides; returns {"mean": [D], "std": [D]} (std floored as in
    training, so constant dimensions stay finite)."""
    was_training = model.training
    model.eval()
    feats = []
    for i in range(min(max_slides, len(dataset))):
        with autocast(device, bf16):
            feats.append(model.encode(dataset[i].patches.to(device)).double())
    model.train(was_training)
    feats = torch.cat(feats)
    std = feats.std(0, unbiased=False)
    norm = {"mean": feats.mean(0).float(), "std": std.clamp_min(1e-6 + 1e-3 * float(std.mean())).float()}
    model.feature_mean.copy_(norm["mean"])
    model.feature_std.copy_(norm["std"])
    return {k: v.cpu() for k, v in norm.items()}


def spec_dict(spec: EncoderSpec) -> dict:
    """The encoder spec as stored in an e2e checkpoint (plain types; init-only files dropped)."""
    return {"name": spec.name, "input_size": spec.input_size, "mean": list(spec.mean), "std": list(spec.std),
            "kwargs": {k: v for k, v in spec.kwargs.items() if k not in _INIT_ONLY_KWARGS}, "seed": spec.seed}


def encoder_spec_from_checkpoint(path: str | os.PathLike) -> EncoderSpec:
    """The tuned encoder of an e2e checkpoint as an :class:`EncoderSpec` whose weights are the
    checkpoint itself (its ``encoder_state_dict``); fails naming the file if it is not one."""
    from .encoders import torch_load

    ckpt = torch_load(path, "e2e checkpoint")
    if not isinstance(ckpt, dict) or "encoder_spec" not in ckpt or "encoder_state_dict" not in ckpt:
        raise MsamilError(f"{path}: not an e2e checkpoint (no encoder_spec / encoder_state_dict); "
                          "give results/e2e/<name>/fold<k>/checkpoint.pt from `msamil e2e`")
    s = ckpt["encoder_spec"]
    return EncoderSpec(name=s["name"], weights=str(path), input_size=s["input_size"], mean=tuple(s["mean"]),
                       std=tuple(s["std"]), kwargs=dict(s["kwargs"]), seed=s["seed"])


# ----------------------------------------------------------------------------- training


@torch.no_grad()
def predict_slides(model: EndToEnd, dataset: SlidePatchDataset, device, rank: int = 0, world: int = 1,
                   bf16: bool = True) -> tuple[np.ndarray, float]:
    """Class probabilities [N, C] of every slide from its K sampled patches, and the mean loss."""
    was_training = model.training
    model.eval()
    probs, losses = [], []
    for i in range(len(dataset)):
        item = dataset[i]
        results, _ = slide_forward(model, item, device, rank, world, bf16=bf16)
        logits = results["logits"].float()
        probs.append(logits.softmax(-1)[0].cpu().numpy())
        losses.append(F.cross_entropy(logits, torch.tensor([item.label], device=device)).item())
    model.train(was_training)
    return np.stack(probs) if probs else np.zeros((0, 0)), float(np.mean(losses)) if losses else float("nan")


def _optimizer(model: EndToEnd, cfg: E2EConfig) -> torch.optim.Optimizer:
    groups = [{"params": [p for p in model.encoder.parameters() if p.requires_grad], "base_lr": cfg.encoder_lr},
              {"params": [p for p in model.mil.parameters() if p.requires_grad], "base_lr": cfg.lr}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, weight_decay=cfg.weight_decay)


def _set_lr(optimizer, cfg: E2EConfig, step: int, total: int, warmup: int) -> None:
    """Both groups follow one schedule (warm-up, cosine), each scaled to its own peak."""
    factor = lr_at(step, total, warmup, 1.0, cfg.min_lr / cfg.lr)
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor


def _stop_everywhere(requested: bool, world: int, device) -> bool:
    """A SIGTERM seen by any rank stops all ranks at the same step (collectives stay matched)."""
    if world == 1:
        return requested
    import torch.distributed as dist

    flag = torch.tensor([float(requested)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def train_e2e(cfg: E2EConfig, spec: EncoderSpec, train_set: SlidePatchDataset, val_set: SlidePatchDataset,
              classes: list[str], out_dir: str | os.PathLike, device: torch.device, run_config: dict | None = None) -> dict:
    """Train encoder + aggregator on one fold; writes ``checkpoint.pt``, returns the best epoch's
    validation metrics. Resumes from ``out_dir/resume.pt`` (same config) mid-epoch if need be."""
    from .metrics import classification_metrics

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rank, world = _distributed()
    model = build_joint_model(cfg, spec, len(classes)).to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _optimizer(model, cfg)
    labels = np.asarray(train_set.labels)
    weights = class_weights(labels, len(classes)).to(device) if cfg.balance == "loss" else None

    def loss_fn(logits, target):
        return F.cross_entropy(logits.float(), target, weight=weights)

    steps_per_epoch = math.ceil(len(train_set) / cfg.grad_accum)
    total_steps, warmup = steps_per_epoch * cfg.epochs, round(cfg.warmup_epochs * steps_per_epoch)
    state = {"epoch": 0, "position": 0, "step": 0, "losses": [], "best_loss": math.inf, "best_epoch": -1,
             "best_metrics": {}, "history": []}
    best = {"encoder": None, "mil": None}
    config_dict = {**asdict(cfg), "encoder_spec": spec_dict(spec)}
    resume_path = out_dir / "resume.pt"
    saved = torch.load(resume_path, map_location="cpu", weights_only=True) if resume_path.exists() else None
    if saved is not None and (saved.get("config") != config_dict or saved.get("classes") != classes):
        log.warning("%s was written with another config; starting over", resume_path)
        saved = None
    norm = None
    if saved is not None:
        norm = saved.get("feature_norm")
    elif cfg.standardize:
        norm = fit_feature_norm(model, train_set, device, cfg.bf16)
    if norm is not None:
        model.feature_mean.copy_(norm["mean"])
        model.feature_std.copy_(norm["std"])
    if saved is not None:
        model.encoder.model.load_state_dict(saved["encoder_state_dict"])
        model.mil.load_state_dict(saved["state_dict"])
        optimizer.load_state_dict(saved["optimizer"])
        torch.set_rng_state(saved["rng_state"])
        state.update(saved["scheduler"])
        best = {"encoder": saved.get("best_encoder"), "mil": saved.get("best_state")}
        log.info("resuming from %s at epoch %d, slide %d (step %d)", resume_path, state["epoch"],
                 state["position"], state["step"])

    def checkpoint_dict(encoder_state, mil_state, epoch) -> dict:
        return {"model_name": cfg.model, "model_args": dict(model.mil.model_args), "state_dict": mil_state,
                "classes": classes, "encoder": f"{encoder_id(spec)}+e2e", "config": run_config or config_dict,
                "epoch": epoch, "metrics": state["best_metrics"], "encoder_spec": spec_dict(spec),
                "encoder_state_dict": encoder_state, "feature_norm": norm}

    def save_resume():
        if rank == 0:
            save_torch(resume_path, {
                **checkpoint_dict(model.encoder.model.state_dict(), model.mil.state_dict(), state["epoch"]),
                "config": config_dict, "optimizer": optimizer.state_dict(), "scheduler": state,
                "rng_state": torch.get_rng_state(), "best_encoder": best["encoder"], "best_state": best["mil"]})

    with _StopRequest() as stop:
        while state["epoch"] < cfg.epochs:
            epoch = state["epoch"]
            train_set.epoch = epoch
            order = epoch_order(labels, epoch, cfg.seed, cfg.balance).tolist()
            start = state["position"]
            loader = slide_loader(train_set, order[start:], cfg.workers, device)
            for i, item in enumerate(loader, start):
                last_of_step = (i + 1) % cfg.grad_accum == 0 or i + 1 == len(order)
                results, _ = slide_forward(model, item, device, rank, world, loss_fn, cfg.bf16,
                                           dropout_seed=step_seed(cfg.seed, epoch, i))
                (results["loss"] / cfg.grad_accum).backward()
                state["losses"].append(results["loss"].item())
                if not last_of_step:
                    continue
                sync_gradients(params, world)
                _set_lr(optimizer, cfg, state["step"], total_steps, warmup)
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                state["step"] += 1
                state["position"] = i + 1
                if _stop_everywhere(stop.requested, world, device) and i + 1 < len(order):
                    save_resume()
                    raise Preempted()
            val_probs, val_loss = predict_slides(model, val_set, device, rank, world, cfg.bf16)
            metrics = classification_metrics(np.asarray(val_set.labels), val_probs, classes) if len(val_set) else {}
            improved = len(val_set) == 0 or val_loss < state["best_loss"]
            record = {"epoch": epoch, "train_loss": float(np.mean(state["losses"])), "val_loss": val_loss,
                      "val_auc": metrics.get("auc"), "val_balanced_accuracy": metrics.get("balanced_accuracy"),
                      "lr": optimizer.param_groups[-1]["lr"]}
            state["history"].append(record)
            log.info("epoch %d: train loss %.4f, val loss %.4f, val auc %s%s", epoch, record["train_loss"], val_loss,
                     "n/a" if record["val_auc"] is None else f"{record['val_auc']:.4f}", " *" if improved else "")
            if improved:
                best = {"encoder": copy.deepcopy(model.encoder.model.state_dict()),
                        "mil": copy.deepcopy(model.mil.state_dict())}
                state.update(best_loss=val_loss if len(val_set) else math.inf, best_epoch=epoch,
                             best_metrics={"val_loss": val_loss, **{k: v for k, v in metrics.items()
                                                                   if k not in ("confusion_matrix", "roc")}})
            state.update(epoch=epoch + 1, position=0, losses=[])
            save_resume()
            if _stop_everywhere(stop.requested, world, device):
                raise Preempted()
    train_set.close()
    val_set.close()
    if rank == 0:
        save_torch(out_dir / "checkpoint.pt", {
            **checkpoint_dict(best["encoder"] or model.encoder.model.state_dict(),
                              best["mil"] or model.mil.state_dict(), state["best_epoch"]),
            "history": state["history"]})
        write_json(out_dir / "history.json", state["history"])
        resume_path.unlink(missing_ok=True)
    return state["best_metrics"]


# ----------------------------------------------------------------------------- K study


# the patch draws that score every K's trained model (epochs no training run reaches)
END_DRAWS = (1_000_000, 1_000_001)


@torch.no_grad()
def end_loss(model: EndToEnd, train_set: SlidePatchDataset, k: int, device: torch.device, bf16: bool,
             loss_fn) -> float:
    """The trained model's loss on every slide of ``train_set`` with ``k`` patches each, in eval
    mode, averaged over the slides and the draws of :data:`END_DRAWS` (the same patches for
    every model scored at this ``k``)."""
    was_training = model.training
    model.eval()
    saved = train_set.k, train_set.epoch
    train_set.k, losses = k, []
    for draw in END_DRAWS:
        train_set.epoch = draw
        for i in range(len(train_set)):
            results, _ = slide_forward(model, train_set[i], device, loss_fn=loss_fn, bf16=bf16)
            losses.append(results["loss"].item())
    train_set.k, train_set.epoch = saved
    model.train(was_training)
    return float(np.mean(losses))


def k_study(cfg: E2EConfig, spec: EncoderSpec, train_set: SlidePatchDataset, classes: list[str], ks: list[int],
            steps: int, device: torch.device, progress: bool = True) -> tuple[list[dict], list[dict]]:
    """Train the same initial model for ``steps`` optimizer steps with each K (same slide order,
    same learning-rate schedule).

    Returns:
        ``(rows, ends)``: ``rows`` [{"k", "step", "loss"}], a step's loss being the mean over its
        ``grad_accum`` slides; ``ends`` [{"k", "end_loss", "end_loss_kmax"}], each trained model's
        loss on all training slides (:func:`end_loss`) at its own K and at the study's largest K.
    """
    from tqdm import tqdm

    labels = np.asarray(train_set.labels)
    weights = class_weights(labels, len(classes)).to(device) if cfg.balance == "loss" else None

    def loss_fn(logits, target):
        return F.cross_entropy(logits.float(), target, weight=weights)

    rows, ends = [], []
    for k in ks:
        kcfg = E2EConfig.from_dict({**asdict(cfg), "k": k})
        model = build_joint_model(kcfg, spec, len(classes)).to(device).train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = _optimizer(model, kcfg)
        if cfg.standardize:  # with the study's largest K, so every K sees the same standardisation
            train_set.k, train_set.epoch = max(ks), 0
            fit_feature_norm(model, train_set, device, cfg.bf16)
        train_set.k = k
        warmup = round(cfg.warmup_epochs * math.ceil(len(train_set) / cfg.grad_accum))
        step, seen, epoch, pending = 0, 0, 0, []
        bar = tqdm(total=steps, desc=f"K={k}", disable=not progress, unit="step")
        while step < steps:
            train_set.epoch = epoch
            for i in epoch_order(labels, epoch, cfg.seed, cfg.balance).tolist():
                results, _ = slide_forward(model, train_set[i], device, loss_fn=loss_fn, bf16=cfg.bf16,
                                           dropout_seed=step_seed(cfg.seed, epoch, seen))
                (results["loss"] / cfg.grad_accum).backward()
                pending.append(results["loss"].item())
                seen += 1
                if len(pending) < cfg.grad_accum:
                    continue
                _set_lr(optimizer, kcfg, step, steps, warmup)
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                rows.append({"k": k, "step": step, "loss": float(np.mean(pending))})
                pending, step = [], step + 1
                bar.update()
                if step == steps:
                    break
            epoch += 1
        bar.close()
        ends.append({"k": k, "end_loss": end_loss(model, train_set, k, device, cfg.bf16, loss_fn),
                     "end_loss_kmax": end_loss(model, train_set, max(ks), device, cfg.bf16, loss_fn)})
    train_set.close()
    return rows, ends


def k_study_summary(rows: list[dict], ends: list[dict] = (), tail: float = 0.25) -> list[dict]:
    """Per K: the mean training loss over the last ``tail`` share of the steps and over all, and
    the trained model's loss on all training slides (``end_loss``, ``end_loss_kmax``, from
    ``ends``) when known."""
    end_of = {e["k"]: {"end_loss": e["end_loss"], "end_loss_kmax": e["end_loss_kmax"]} for e in ends}
    out = []
    for k in sorted({r["k"] for r in rows}):
        losses = [r["loss"] for r in sorted((r for r in rows if r["k"] == k), key=lambda r: r["step"])]
        n_tail = max(1, round(tail * len(losses)))
        out.append({"k": k, "steps": len(losses), "final_loss": float(np.mean(losses[-n_tail:])),
                    "mean_loss": float(np.mean(losses)), **end_of.get(k, {})})
    return out


def write_k_study(out_dir: str | os.PathLike, rows: list[dict], ends: list[dict] = ()) -> list[dict]:
    """``k_study.csv`` (k, step, loss), ``k_study_summary.csv`` and ``k_study.png`` (loss against
    step per K, smoothed over a window of a tenth of the steps) in ``out_dir``."""
    import pandas as pd

    from .plots import plot_curves

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "k_study.csv") as tmp:
        pd.DataFrame(rows, columns=["k", "step", "loss"]).to_csv(tmp, index=False)
    summary = k_study_summary(rows, ends)
    with atomic_path(out_dir / "k_study_summary.csv") as tmp:
        pd.DataFrame(summary).to_csv(tmp, index=False)
    curves = {}
    for k in sorted({r["k"] for r in rows}):
        losses = np.array([r["loss"] for r in sorted((r for r in rows if r["k"] == k), key=lambda r: r["step"])])
        window = max(1, len(losses) // 10)
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        curves[f"K = {k}"] = (np.arange(len(smooth)) + window - 1, smooth)
    plot_curves(out_dir / "k_study.png", curves, xlabel="optimizer step",
                ylabel="training loss (moving average)", title="End-to-end training loss against K")
    return summary


# ----------------------------------------------------------------------------- report


def report_parts(configs: dict[str, dict], per_fold: dict[str, dict[int, dict]], out_dir: str | os.PathLike) -> list[str]:
    """HTML for the report: e2e-tuned against frozen-encoder features (the same MIL experiment on
    the same folds: the tuned twin's) and each e2e run's K study. ``configs`` are the experiments'
    run configs, ``per_fold`` their ``{fold: metrics}``; a twin has ``e2e`` = {"name", "frozen", "dir"}."""
    import html
    import shutil

    import pandas as pd

    from .metrics import summarize

    def pm(summary, name: str, what: str) -> tuple[str, float]:
        row = summary[(summary.experiment == name) & (summary.metric == what)]
        if not len(row) or math.isnan(row["mean"].iloc[0]):
            return "n/a", math.nan
        m, sd = float(row["mean"].iloc[0]), float(row["sd"].iloc[0])
        return (f"{m:.3f}" if math.isnan(sd) else f"{m:.3f} ± {sd:.3f}"), m

    rows, studies = [], {}
    for name, cfg in configs.items():
        info = cfg.get("e2e")
        if not isinstance(info, dict) or info.get("frozen") not in per_fold:
            continue
        frozen, folds = info["frozen"], sorted(per_fold[name])
        summary = summarize({name: per_fold[name], frozen: {k: per_fold[frozen][k] for k in folds if k in per_fold[frozen]}})
        (tuned_auc, t), (frozen_auc, f) = pm(summary, name, "auc"), pm(summary, frozen, "auc")
        rows.append({"e2e run": info.get("name"), "experiment": frozen, "folds": " ".join(map(str, folds)),
                     "AUC frozen encoder": frozen_auc, "AUC e2e-tuned encoder": tuned_auc,
                     "difference": "n/a" if math.isnan(t - f) else f"{t - f:+.3f}",
                     "bal. acc. frozen": pm(summary, frozen, "balanced_accuracy")[0],
                     "bal. acc. e2e-tuned": pm(summary, name, "balanced_accuracy")[0]})
        if info.get("dir"):
            studies[info["name"]] = Path(info["dir"])
    parts = []
    if rows:
        parts += ["<h2>End-to-end tuned against frozen encoder</h2><p>The same MIL experiment and folds, on "
                  "features of the frozen encoder and on features re-extracted with the encoder tuned end to end "
                  "on each fold's training slides (MsaMIL-Net sec. 3.4).</p>",
                  pd.DataFrame(rows).to_html(index=False, escape=True, border=0, classes="t")]
    for name, directory in studies.items():
        table, png = directory / "k_study_summary.csv", directory / "k_study.png"
        if not table.exists():
            continue
        parts.append(f"<h2>K study: {html.escape(name)}</h2><p>Training loss after the same number of steps, "
                     "from the same initial model, with K patches per slide (Campanella et al.: it falls as K grows). "
                     "final_loss: the running training loss, mean over the last quarter of the steps; end_loss: the "
                     "trained model's loss on every training slide with K patches (two fixed draws, eval mode); "
                     "end_loss_kmax: the same with the study's largest K for every model.</p>")
        parts.append(pd.read_csv(table).round(4).to_html(index=False, border=0, classes="t"))
        if png.exists():
            target = Path(out_dir) / f"k_study_{name}.png"
            shutil.copyfile(png, target)
            parts.append(f'<img src="{html.escape(target.name)}" alt="training loss against step per K">')
    return parts
