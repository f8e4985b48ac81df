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
gradient of one process on the same K patches (the engine's gradient average). BatchNorm layers of
the encoder run on their stored statistics (eval mode) so that a patch's feature never depends
on which other patches share its chunk or rank; dropout in the aggregator draws from a
generator seeded per step, identical on every rank.

Training runs on :mod:`.engine` with ``shard_items = False``: every rank runs every slide and
encodes its share of the slide's patches. A fold's ``checkpoint.pt`` (``out_dir``) is a SPEC
checkpoint of the MIL model plus ``encoder_spec`` and ``encoder_state_dict`` (the tuned encoder,
which ``msamil extract --encoder-checkpoint`` re-extracts features with); ``resume.pt`` and
``history.json`` are as in :mod:`.mil`.

The K study (:func:`k_study`, Campanella et al.'s finding that the training loss falls as K
grows) trains the same initial model for the same number of steps with several K and writes
the loss curves and a summary as CSV; ``msamil e2e`` has reporting draw the curves.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import MsamilError
from ..features.encoders import EncoderSpec, PatchEncoder, build_encoder, encoder_id
from ..fileio import atomic_path, save_torch, torch_load, write_json
from ..runtime import autocast, distributed, is_main_process
from ..wsi.coords import read_patch_table
from ..wsi.geometry import SCALES, scale_index
from ..wsi.slide import OpenSlides
from ..settings import E2EConfig, SplitSettings
from .engine import Schedule, fit
from .mil import SlideTask, validation_metrics

log = logging.getLogger(__name__)

E2E_TILE_CACHE_MB = 32  # decoded tiles kept per open slide while sampling patches

# Encoder options that name a file only the initial weights need; the tuned state replaces it.
_INIT_ONLY_KWARGS = ("backbone_weights",)


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
    open lazily in whichever process reads; at most ``open_slides`` stay open there
    (:class:`~msamil_core.wsi.slide.OpenSlides`).
    """

    def __init__(self, sources: list[SlideSource], labels: list[int], k: int, input_size: int,
                 scales: list[str], seed: int = 0, open_slides: int = 8):
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
        # K random patches per slide and step rarely share a tile: a small cache per open slide
        # (each reading process holds up to open_slides of them)
        self.slides = OpenSlides(open_slides, tile_cache_mb=E2E_TILE_CACHE_MB)

    @property
    def slide_ids(self) -> list[str]:
        return [s.slide_id for s in self.sources]

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int) -> SlidePatches:
        coords, scales, sizes = self.tables[i]
        idx = sample_patches(len(coords), self.k, self.seed, self.epoch, i)
        src = self.sources[i]
        slide = self.slides.get(src.path, src.slide_id, src.mpp)
        patches = np.stack([slide.read_patch(int(coords[j, 0]), int(coords[j, 1]), int(sizes[j]), self.input_size)
                            for j in idx])
        return SlidePatches(src.slide_id, torch.from_numpy(patches), torch.from_numpy(coords[idx]),
                            torch.from_numpy(scales[idx]), self.labels[i])

    def close(self) -> None:
        self.slides.close()


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


def build_joint_model(cfg: E2EConfig, spec: EncoderSpec, num_classes: int) -> EndToEnd:
    """The encoder of ``spec`` (its seeded initialisation or weights) and a fresh MIL model
    (seeded by ``cfg.seed``), identical on every rank."""
    from ..mil import create_model

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
    ckpt = torch_load(path, "e2e checkpoint")
    if not isinstance(ckpt, dict) or "encoder_spec" not in ckpt or "encoder_state_dict" not in ckpt:
        raise MsamilError(f"{path}: not an e2e checkpoint (no encoder_spec / encoder_state_dict); "
                          "give results/e2e/<name>/fold<k>/checkpoint.pt from `msamil e2e`")
    s = ckpt["encoder_spec"]
    return EncoderSpec(name=s["name"], weights=str(path), input_size=s["input_size"], mean=tuple(s["mean"]),
                       std=tuple(s["std"]), kwargs=dict(s["kwargs"]), seed=s["seed"])


# ----------------------------------------------------------------------------- training


class E2ETask(SlideTask):
    """End-to-end training for :func:`~msamil_core.training.engine.fit`: a slide's K sampled patches
    per item, encoded (split across ranks) and aggregated; cross-entropy on the slide label."""

    shard_items = False  # every rank runs every slide; the slide's patches are what is split

    def __init__(self, cfg: E2EConfig, spec: EncoderSpec, train_set: SlidePatchDataset, val_set: SlidePatchDataset | None,
                 classes: list[str], device: torch.device, norm_k: int | None = None):
        super().__init__(cfg, train_set, val_set or [], classes, device)
        self.spec = spec
        self.rank, self.world = distributed()
        self.model = build_joint_model(cfg, spec, len(classes)).to(device).train()
        if cfg.standardize:  # with `norm_k` patches per slide (the K study's largest K), else the run's K
            k = train_set.k
            train_set.k, train_set.epoch = norm_k or k, 0
            fit_feature_norm(self.model, train_set, device, cfg.bf16)
            train_set.k = k

    def param_groups(self) -> list[dict]:
        ratio = self.cfg.min_lr / self.cfg.lr  # the encoder's floor scales with its peak
        groups = [{"params": [p for p in self.model.encoder.parameters() if p.requires_grad], "lr": self.cfg.encoder_lr,
                   "min_lr": self.cfg.encoder_lr * ratio},
                  {"params": [p for p in self.model.mil.parameters() if p.requires_grad], "lr": self.cfg.lr,
                   "min_lr": self.cfg.min_lr}]
        return [g for g in groups if g["params"]]

    def loss(self, item: SlidePatches, epoch: int, position: int) -> torch.Tensor:
        results, _ = slide_forward(self.model, item, self.device, self.rank, self.world, self.loss_fn, self.cfg.bf16,
                                   dropout_seed=step_seed(self.cfg.seed, epoch, position))
        return results["loss"]

    def evaluate(self) -> dict | None:
        return validation_metrics(self.model, self.val_set, self.classes, self.device, self.cfg.bf16,
                                  lambda item: slide_forward(self.model, item, self.device, self.rank, self.world,
                                                             bf16=self.cfg.bf16))

    def fingerprint(self) -> dict:
        config = {k: v for k, v in asdict(self.cfg).items() if k != "open_slides"}  # does not change results
        return {**super().fingerprint(), "config": {**config, "encoder_spec": spec_dict(self.spec)}}


def train_e2e(cfg: E2EConfig, spec: EncoderSpec, train_set: SlidePatchDataset, val_set: SlidePatchDataset,
              classes: list[str], out_dir: str | os.PathLike, device: torch.device, run_config: dict | None = None) -> dict:
    """Train encoder + aggregator on one fold; writes ``checkpoint.pt`` and ``history.json``,
    returns the best epoch's validation metrics. Resumes from ``out_dir/resume.pt`` (same
    config, classes and slides), mid-epoch if need be."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    task = E2ETask(cfg, spec, train_set, val_set, classes, device)
    try:
        result = fit(task, Schedule.of(cfg), out_dir / "resume.pt")
    finally:
        train_set.close()
        val_set.close()
    if result.rank == 0:
        mil_state = {k.removeprefix("mil."): v for k, v in result.best_state.items() if k.startswith("mil.")}
        encoder_state = {k.removeprefix("encoder.model."): v for k, v in result.best_state.items()
                         if k.startswith("encoder.model.")}
        save_torch(out_dir / "checkpoint.pt", {
            "model_name": cfg.model, "model_args": dict(task.model.mil.model_args), "state_dict": mil_state,
            "classes": classes, "encoder": f"{encoder_id(spec)}+e2e", "config": run_config or asdict(cfg),
            "epoch": result.best_epoch, "metrics": result.best_metrics, "encoder_spec": spec_dict(spec),
            "encoder_state_dict": encoder_state,
            "feature_norm": {"mean": result.best_state["feature_mean"], "std": result.best_state["feature_std"]},
            "history": result.history})
        write_json(out_dir / "history.json", result.history)
        (out_dir / "resume.pt").unlink(missing_ok=True)
    return result.best_metrics


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
            steps: int, device: torch.device) -> tuple[list[dict], list[dict]]:
    """Train the same initial model for ``steps`` optimizer steps with each K (same slide order,
    same learning-rate schedule, features standardised with the study's largest K).

    Returns:
        ``(rows, ends)``: ``rows`` [{"k", "step", "loss"}], a step's loss being the mean over its
        ``grad_accum`` slides; ``ends`` [{"k", "end_loss", "end_loss_kmax"}], each trained model's
        loss on all training slides (:func:`end_loss`) at its own K and at the study's largest K.
    """
    rows, ends = [], []
    steps_per_epoch = math.ceil(len(train_set) / cfg.grad_accum)
    for k in ks:
        kcfg = cfg.replace(k=k, epochs=math.ceil(steps / steps_per_epoch))
        train_set.k = k
        task = E2ETask(kcfg, spec, train_set, None, classes, device, norm_k=max(ks))
        fit(task, Schedule.of(kcfg, max_steps=steps),
            on_step=lambda step, losses, k=k: rows.append({"k": k, "step": step, "loss": float(np.mean(losses))}))
        ends.append({"k": k, "end_loss": end_loss(task.model, train_set, k, device, cfg.bf16, task.loss_fn),
                     "end_loss_kmax": end_loss(task.model, train_set, max(ks), device, cfg.bf16, task.loss_fn)})
        log.info("K study: K=%d trained for %d steps", k, steps)
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
    """``k_study.csv`` (k, step, loss) and ``k_study_summary.csv`` in ``out_dir`` (``msamil e2e``
    then draws ``k_study.png`` from the CSV)."""
    import pandas as pd

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "k_study.csv") as tmp:
        pd.DataFrame(rows, columns=["k", "step", "loss"]).to_csv(tmp, index=False)
    summary = k_study_summary(rows, ends)
    with atomic_path(out_dir / "k_study_summary.csv") as tmp:
        pd.DataFrame(summary).to_csv(tmp, index=False)
    return summary


def run_e2e(cfg: E2EConfig, spec: EncoderSpec, sheet, folds, fold_list: list[int], coords_dir: str | os.PathLike,
            out: str | os.PathLike, device: torch.device, classes: list[str] | None = None,
            splits: SplitSettings | None = None, task: dict | None = None, name: str | None = None) -> None:
    """``msamil e2e``: train each fold of ``fold_list`` into ``out/fold<k>/``, or with
    ``cfg.k_study`` run the K study on the first fold's training slides into ``out/``.
    Coordinates are read from ``coords_dir/<scale>/<slide_id>.h5``; ``task`` maps class names to
    sheet labels (None: the sheet's labels)."""
    from ..cohort.sheet import slide_mpp
    from ..cohort.tasks import select_slides, task_classes
    from ..layout import scale_file
    from .splits import fold_parts

    splits = splits or SplitSettings()
    name = name or Path(out).name
    classes, mapping = task_classes(sheet, task, classes)
    out = Path(out)

    def dataset(part: str, k: int) -> SlidePatchDataset:
        ids, labels = select_slides(fold_parts(folds, k, val_fraction=splits.val_fraction, seed=splits.seed)[part],
                                    sheet, mapping)
        sources = [SlideSource(s, sheet.loc[s, "path"], slide_mpp(sheet.loc[s]),
                               tuple(scale_file(coords_dir, scale, s) for scale in SCALES)) for s in ids]
        return SlidePatchDataset(sources, labels, cfg.k, spec.input_size, cfg.scales, cfg.seed, cfg.open_slides)

    if cfg.k_study:
        ks = sorted(cfg.k_study)
        rows, ends = k_study(cfg, spec, dataset("train", fold_list[0]), classes, ks, cfg.k_study_steps, device)
        if is_main_process():
            for r in write_k_study(out, rows, ends):
                log.info("K study: K=%d, after %d steps: running loss (last quarter) %.4f, loss on all training "
                         "slides %.4f (K=%d) and %.4f (K=%d)", r["k"], r["steps"], r["final_loss"], r["end_loss"],
                         r["k"], r["end_loss_kmax"], max(ks))
        return
    for k in fold_list:
        train_set, val_set = dataset("train", k), dataset("val", k)
        if not len(train_set):
            raise MsamilError(f"fold {k} has no training slides for classes {classes}; check folds.csv and the task")
        log.info("%s fold %d: %d train / %d val slides, encoder %s -> %s, K=%d", name, k, len(train_set), len(val_set),
                 spec.name, cfg.model, cfg.k)
        metrics = train_e2e(cfg, spec, train_set, val_set, classes, out / f"fold{k}", device,
                            {"name": name, "task": task, **cfg.to_dict()})
        log.info("%s fold %d: best validation %s", name, k,
                 {m: round(v, 4) for m, v in metrics.items() if isinstance(v, float)})
