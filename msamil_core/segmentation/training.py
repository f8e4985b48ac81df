"""Training the UNet++ lesion segmenter on annotated thumbnails (MsaMIL-Net's semantic feature
filtering, sec. 3.1), on :mod:`msamil_core.training.engine`.

Only annotated slides are used. Targets are the annotation (:mod:`msamil_core.wsi.annotations`)
intersected with the tissue mask, at network scale (:mod:`.model`) as soft (area-fraction) targets.
Patients, not slides, are split into training, validation (best epoch) and hold-out (never trained
on or selected on; its IoU is the honest estimate). Per batch: random flips and 90-degree
rotations, hue/saturation/brightness/contrast jitter, optionally a random square crop. Loss:
BCE + soft Dice over the image (padding excluded). The defaults (ResNet-18 encoder,
``input_size`` 256, training on 128-px crops) take about 5-6 s per epoch for 19 training slides
on 2 CPU cores; on a GPU ``input_size`` 1024 matches the paper.

IoU is per slide at thumbnail resolution after :func:`~.postprocess.postprocess` (what ``msamil
segment`` writes), averaged over slides; a slide with neither predicted nor annotated lesion
scores 1. The checkpoint's layout is in :mod:`.model`.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import MsamilError
from ..settings import AnnotationSettings, PostProcessSettings, SegmentationSettings
from ..training.engine import Schedule, Task, fit
from .model import ARCH, PAD_VALUE, build_model, network_image, normalise, predict_probabilities, round_up
from .postprocess import postprocess

log = logging.getLogger(__name__)


@dataclass
class SlideSample:
    """One annotated slide: thumbnail RGB uint8 [h, w, 3], tissue and lesion bool [h, w] (thumbnail px).

    ``lesion`` is already restricted to ``tissue``.
    """

    slide_id: str
    patient_id: str
    rgb: np.ndarray
    tissue: np.ndarray
    lesion: np.ndarray


# ----------------------------------------------------------------------------- data


def load_sample(
    slide_id: str,
    patient_id: str,
    thumbnail: str | os.PathLike,
    annotation: str | os.PathLike,
    annotations: AnnotationSettings | None = None,
) -> SlideSample:
    """Read a thumbnail with the meta.json and tissue_mask.png beside it, and rasterise its
    annotation (:func:`msamil_core.wsi.annotations.annotation_mask` with ``annotations``: which
    classes are lesion, mask labels, tolerance)."""
    from ..wsi.annotations import ClassRules, annotation_mask
    from ..wsi.masks import load_mask, read_rgb
    from ..wsi.thumbnail import load_meta, meta_sizes

    slide_dir = Path(thumbnail).parent
    meta = load_meta(slide_dir / "meta.json")
    level0_size, thumb_size = meta_sizes(meta)
    rgb = read_rgb(thumbnail, slide_id)
    tissue_path = slide_dir / "tissue_mask.png"
    if not tissue_path.exists():
        raise MsamilError(f"slide {slide_id!r}: tissue mask {tissue_path} not found; run `msamil tissue` for it first")
    tissue = load_mask(tissue_path)
    w, h = thumb_size
    for what, arr in (("thumbnail", rgb), ("tissue mask", tissue)):
        if arr.shape[:2] != (h, w):
            raise MsamilError(
                f"slide {slide_id!r}: {what} in {slide_dir} is {arr.shape[1]} x {arr.shape[0]} px but meta.json says "
                f"{w} x {h}; rerun the thumbnail and tissue steps of this slide"
            )
    a = annotations or AnnotationSettings()
    lesion = annotation_mask(annotation, slide_id, level0_size, thumb_size, ClassRules.of(a), a.mask_labels,
                             a.tolerance) & tissue
    return SlideSample(slide_id, patient_id, rgb, tissue, lesion)


def split_patients(patients: Sequence[str], holdout_fraction: float, val_fraction: float, seed: int) -> dict[str, str]:
    """Assign each patient to ``"train"``, ``"val"`` or ``"holdout"`` (seeded, reproducible).

    A non-zero fraction gets at least one patient, as long as one patient is left to train on;
    with too few patients validation is dropped before hold-out.
    """
    unique = sorted(set(patients))
    n = len(unique)
    if n == 0:
        raise MsamilError("segmentation: no annotated slides to train on; fill the sheet's `annotation` column")

    def count(fraction: float) -> int:
        return max(1, round(fraction * n)) if fraction > 0 else 0

    n_hold, n_val = count(holdout_fraction), count(val_fraction)
    while n_hold + n_val > n - 1 and n_val > 0:
        n_val -= 1
    while n_hold + n_val > n - 1 and n_hold > 0:
        n_hold -= 1
    order = np.random.default_rng(seed).permutation(n)
    parts = {}
    for rank, i in enumerate(order):
        parts[unique[i]] = "holdout" if rank < n_hold else "val" if rank < n_hold + n_val else "train"
    return parts


def _resize_float(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Float32 [h, w] to ``size`` = (w, h): area average when shrinking, bilinear otherwise."""
    img = Image.fromarray(arr.astype(np.float32), mode="F")
    shrink = size[0] <= arr.shape[1] and size[1] <= arr.shape[0]
    return np.asarray(img.resize(size, Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR))


def _canvas(samples: Sequence[SlideSample], cfg: SegmentationSettings):
    """Stack samples at network scale on white square canvases.

    Returns uint8 images [N, 3, S, S], float16 soft targets [N, 1, S, S], bool valid [N, 1, S, S]
    and the (w, h) of each image on its canvas (top-left aligned).
    """
    side = max(round_up(cfg.input_size, cfg.multiple), cfg.crop_size)
    n = len(samples)
    images = torch.full((n, 3, side, side), PAD_VALUE, dtype=torch.uint8)
    targets = torch.zeros((n, 1, side, side), dtype=torch.float16)
    valid = torch.zeros((n, 1, side, side), dtype=torch.bool)
    sizes = []
    for i, s in enumerate(samples):
        img = network_image(s.rgb, cfg.input_size)
        h, w = img.shape[:2]
        images[i, :, :h, :w] = torch.from_numpy(img.copy()).permute(2, 0, 1)
        targets[i, 0, :h, :w] = torch.from_numpy(_resize_float(s.lesion, (w, h)).copy()).to(torch.float16)
        valid[i, 0, :h, :w] = True
        sizes.append((w, h))
    return images, targets, valid, sizes


def mask_scores(pred: np.ndarray, target: np.ndarray) -> tuple[float, float, int, int]:
    """(IoU, Dice, intersection px, union px) of two bool masks; both empty scores 1."""
    inter = int(np.logical_and(pred, target).sum())
    union = int(np.logical_or(pred, target).sum())
    total = int(pred.sum()) + int(target.sum())
    iou = inter / union if union else 1.0
    dice = 2 * inter / total if total else 1.0
    return iou, dice, inter, union


def evaluate(
    model: torch.nn.Module,
    samples: Sequence[SlideSample],
    input_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    post: PostProcessSettings,
    multiple: int = 32,
    device: torch.device | str = "cpu",
) -> dict:
    """Per-slide and mean IoU/Dice of the post-processed masks (thumbnail px) against the annotations."""
    per_slide = {}
    ious, dices, inter, union = [], [], 0, 0
    for s in samples:
        prob = predict_probabilities(model, s.rgb, input_size, mean, std, multiple, device)
        pred = postprocess(prob, s.tissue, post)
        iou, dice, i, u = mask_scores(pred, s.lesion)
        per_slide[s.slide_id] = round(iou, 4)
        ious.append(iou)
        dices.append(dice)
        inter, union = inter + i, union + u
    if not samples:
        return {"iou": None, "dice": None, "pooled_iou": None, "n_slides": 0, "per_slide": {}}
    return {
        "iou": float(np.mean(ious)),
        "dice": float(np.mean(dices)),
        "pooled_iou": inter / union if union else 1.0,
        "n_slides": len(samples),
        "per_slide": per_slide,
    }


# ----------------------------------------------------------------------------- training


def dice_bce_loss(
    logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, bce_weight: float = 1.0, dice_weight: float = 1.0
) -> torch.Tensor:
    """BCE + soft Dice over the valid pixels of a batch ([B, 1, H, W] each; target in [0, 1])."""
    logits = logits.float()
    target = target.float()
    valid = valid.float()
    n = valid.sum().clamp_min(1.0)
    bce = (F.binary_cross_entropy_with_logits(logits, target, reduction="none") * valid).sum() / n
    prob = torch.sigmoid(logits) * valid
    # Dice over the whole batch: a slide without lesion does not make the ratio undefined.
    inter = (prob * target).sum()
    dice = 1.0 - (2.0 * inter + 1.0) / (prob.sum() + (target * valid).sum() + 1.0)
    return bce_weight * bce + dice_weight * dice


def augment_batch(
    images: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, cfg: SegmentationSettings, gen: torch.Generator
):
    """Random rotations by 90 degrees, flips and colour jitter, per sample; images float [B, 3, S, S] in [0, 1]."""
    from torchvision.transforms.v2 import functional as TF

    def uniform(spread: float) -> float:
        return float((torch.rand((), generator=gen) * 2 - 1) * spread)

    out_x, out_y, out_v = [], [], []
    for x, y, v in zip(images, targets, valid):
        k = int(torch.randint(4, (), generator=gen))
        flip = bool(torch.randint(2, (), generator=gen))
        x, y, v = (torch.rot90(t, k, dims=(1, 2)) for t in (x, y, v))
        if flip:
            x, y, v = (torch.flip(t, dims=(2,)) for t in (x, y, v))
        # Stain and scanner differences are shifts in hue, saturation, brightness and contrast.
        x = TF.adjust_brightness(x, 1.0 + uniform(cfg.brightness))
        x = TF.adjust_contrast(x, 1.0 + uniform(cfg.contrast))
        x = TF.adjust_saturation(x, 1.0 + uniform(cfg.saturation))
        if cfg.hue > 0:
            x = TF.adjust_hue(x, uniform(cfg.hue))
        out_x.append(x.clamp(0, 1))
        out_y.append(y)
        out_v.append(v)
    return torch.stack(out_x), torch.stack(out_y), torch.stack(out_v)


def _random_crops(images, targets, valid, sizes, index, crop: int, gen: torch.Generator):
    """A random ``crop`` x ``crop`` window of each indexed sample, inside its image where it fits."""
    xs, ys, vs = [], [], []
    for i in index.tolist():
        w, h = sizes[i]
        x0 = int(torch.randint(max(1, w - crop + 1), (), generator=gen))
        y0 = int(torch.randint(max(1, h - crop + 1), (), generator=gen))
        xs.append(images[i, :, y0 : y0 + crop, x0 : x0 + crop])
        ys.append(targets[i, :, y0 : y0 + crop, x0 : x0 + crop])
        vs.append(valid[i, :, y0 : y0 + crop, x0 : x0 + crop])
    return torch.stack(xs), torch.stack(ys), torch.stack(vs)


class SegmentationTask(Task):
    """UNet++ training for :func:`~msamil_core.training.engine.fit`: a batch of (cropped,
    augmented) thumbnails per item, BCE + soft Dice; validation IoU after every epoch. Batches
    and augmentation draw from one generator seeded by ``seed``, whose state resume.pt keeps."""

    def __init__(self, cfg: SegmentationSettings, split: dict[str, list[SlideSample]], post: PostProcessSettings,
                 device: torch.device):
        from ..features.encoders import IMAGENET_MEAN, IMAGENET_STD

        self.cfg, self.split, self.post, self.device = cfg, split, post, device
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg.encoder, cfg.encoder_depth, cfg.decoder_channels, cfg.encoder_weights).to(device)
        self.mean, self.std = list(IMAGENET_MEAN), list(IMAGENET_STD)
        self.mean_t, self.std_t = torch.tensor(self.mean, device=device), torch.tensor(self.std, device=device)
        self.images, self.targets, self.valid, self.sizes = _canvas(split["train"], cfg)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.order = torch.arange(len(split["train"]))
        self.batches = math.ceil(len(split["train"]) / cfg.batch_size)

    def param_groups(self) -> list[dict]:
        return [{"params": list(self.model.parameters()), "lr": self.cfg.lr, "min_lr": self.cfg.min_lr}]

    def dataset(self):
        return self

    def __len__(self) -> int:
        return self.batches

    def __getitem__(self, b: int):
        """Batch ``b`` of the epoch: images float [B, 3, S, S] in [0, 1], targets, valid masks."""
        cfg = self.cfg
        index = self.order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
        if cfg.crop_size:
            x, y, v = _random_crops(self.images, self.targets, self.valid, self.sizes, index, cfg.crop_size, self.gen)
        else:
            x, y, v = self.images[index], self.targets[index], self.valid[index]
        x = x.float() / 255.0
        if cfg.augment:
            x, y, v = augment_batch(x, y, v, cfg, self.gen)
        return x, y, v

    def epoch_order(self, epoch: int):
        return range(self.batches)

    def set_epoch(self, epoch: int) -> None:
        self.order = torch.randperm(len(self.split["train"]), generator=self.gen)

    def loss(self, item, epoch: int, position: int) -> torch.Tensor:
        x, y, v = (t.to(self.device) for t in item)
        logits = self.model(normalise(x, self.mean_t, self.std_t))
        return dice_bce_loss(logits, y, v, self.cfg.bce_weight, self.cfg.dice_weight)

    def evaluate(self) -> dict | None:
        if not self.split["val"]:
            return None
        return evaluate(self.model, self.split["val"], self.cfg.input_size, self.mean, self.std, self.post,
                        self.cfg.multiple, self.device)

    def fingerprint(self) -> dict:
        return {"config": asdict(self.cfg), "postprocess": asdict(self.post),
                "slides": {part: [s.slide_id for s in group] for part, group in self.split.items()}}

    def state_dict(self) -> dict:
        return {"generator": self.gen.get_state(), "order": self.order}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["generator"])
        self.order = state["order"]


def train_segmentation(samples: Sequence[SlideSample], cfg: SegmentationSettings | None = None,
                       post: PostProcessSettings | None = None, device: str = "auto",
                       resume_path: str | os.PathLike | None = None) -> tuple[dict, dict]:
    """Train UNet++ on annotated thumbnails; returns (checkpoint dict, metrics dict).

    The checkpoint holds the best epoch by validation IoU (the last epoch when no patient is
    left for validation); the metrics hold per-epoch history, the best validation metrics and
    the hold-out metrics of that checkpoint (``holdout.iou``). With ``resume_path`` a killed or
    preempted run continues from there.
    """
    from .. import __version__
    from ..fileio import file_sha256
    from ..runtime import resolve_device

    cfg = cfg or SegmentationSettings()
    post = post or cfg.postprocess()
    dev = resolve_device(device)
    parts = split_patients([s.patient_id for s in samples], cfg.holdout_fraction, cfg.val_fraction, cfg.seed)
    split = {name: [s for s in samples if parts[s.patient_id] == name] for name in ("train", "val", "holdout")}
    slide_ids = {name: [s.slide_id for s in group] for name, group in split.items()}
    log.info("segmentation: %d annotated slides of %d patients: %d train, %d validation, %d hold-out slides",
             len(samples), len(parts), *(len(split[k]) for k in ("train", "val", "holdout")))
    if not split["val"]:
        log.warning("segmentation: no validation patients; the last epoch is kept")
    started = time.perf_counter()
    task = SegmentationTask(cfg, split, post, dev)
    result = fit(task, Schedule.of(cfg, monitor="val_iou"), resume_path)
    train_seconds = time.perf_counter() - started
    model = task.model
    model.load_state_dict(result.best_state)
    holdout = evaluate(model, split["holdout"], cfg.input_size, task.mean, task.std, post, cfg.multiple, dev)
    if holdout["iou"] is not None:
        log.info("hold-out IoU %.4f over %d slides (best epoch %d)", holdout["iou"], holdout["n_slides"],
                 result.best_epoch)
    metrics = {"best_epoch": result.best_epoch, "val": result.best_metrics, "holdout": holdout, "splits": slide_ids,
               "train_seconds": round(train_seconds, 1), "history": result.history}
    checkpoint = {
        "arch": ARCH,
        "encoder": cfg.encoder,
        "model_args": {"encoder": cfg.encoder, "encoder_depth": cfg.encoder_depth,
                       "decoder_channels": list(cfg.decoder_channels)},
        "input_size": cfg.input_size,
        "normalization": {"mean": task.mean, "std": task.std},
        "postprocess": asdict(post),
        "state_dict": {k: v.detach().cpu() for k, v in result.best_state.items()},
        "epoch": result.best_epoch,
        "val_iou": result.best_metrics.get("iou"),
        "holdout_iou": holdout["iou"],
        "metrics": {k: metrics[k] for k in ("best_epoch", "val", "holdout", "train_seconds")},
        "splits": slide_ids,
        "config": asdict(cfg),
        "encoder_weights_sha256": file_sha256(cfg.encoder_weights) if cfg.encoder_weights else None,
        "msamil_version": __version__,
    }
    return checkpoint, metrics


def train_from_sheet(sheet_path: str | os.PathLike, out: str | os.PathLike, cfg: SegmentationSettings,
                     slides_dir: str | os.PathLike | None = None, thumbnails: Sequence[str] | None = None,
                     metrics_path: str | os.PathLike | None = None, probabilities_dir: str | os.PathLike | None = None,
                     device: str = "auto") -> dict:
    """``msamil segment-train``: train on the sheet's annotated slides whose thumbnail.png,
    meta.json and tissue_mask.png lie in ``slides_dir/<slide_id>/`` (or beside the given
    ``thumbnails``), their annotations read with ``cfg``'s annotation settings; write the checkpoint to ``out`` and the metrics beside it (or to
    ``metrics_path``); with ``probabilities_dir``, also each slide's lesion probabilities under the
    saved checkpoint (:func:`~msamil_core.segmentation.postprocess.save_probabilities`). A killed
    run resumes from ``resume.pt`` beside ``out``. Returns the metrics."""
    from ..cohort.sheet import load_sheet
    from ..fileio import file_sha256, save_torch, write_json
    from ..runtime import is_main_process, resolve_device
    from .model import load_segmentation_checkpoint, thumbnail_probabilities
    from .postprocess import save_probabilities

    sheet = load_sheet(sheet_path)
    if "annotation" not in sheet.columns:
        raise MsamilError(f"slide sheet {sheet_path}: no `annotation` column; segmentation training needs annotated slides")
    annotated = sheet[sheet["annotation"] != ""]
    if thumbnails:
        thumbs = {Path(p).parent.name: Path(p) for p in thumbnails}
        unknown = sorted(set(thumbs) - set(sheet.index))
        if unknown:
            raise MsamilError(f"thumbnails of slides not in the sheet {sheet_path}: {', '.join(unknown[:5])}; each "
                              "thumbnail must sit in a folder named by its slide_id")
        annotated = annotated[annotated.index.isin(list(thumbs))]
    else:
        thumbs = {sid: Path(slides_dir) / sid / "thumbnail.png" for sid in annotated.index}
    if annotated.empty:
        raise MsamilError(f"slide sheet {sheet_path}: no slide with an `annotation` among those given; annotate some "
                          "slides first")
    samples = []
    for sid, row in annotated.iterrows():
        samples.append(load_sample(sid, row["patient_id"], thumbs[sid], row["annotation"], cfg.annotations()))
        log.info("%s: lesion %.1f %% of the thumbnail", sid, 100.0 * samples[-1].lesion.mean())
    out = Path(out)
    checkpoint, metrics = train_segmentation(samples, cfg, device=device, resume_path=out.parent / "resume.pt")
    if not is_main_process():
        return metrics
    # metrics first: the checkpoint is the rule's main output and marks the step complete
    write_json(Path(metrics_path) if metrics_path else out.with_name("metrics.json"), metrics)
    save_torch(out, checkpoint)
    (out.parent / "resume.pt").unlink(missing_ok=True)
    if probabilities_dir:
        # the saved checkpoint rebuilt as `msamil segment` rebuilds it, on the same pixels
        dev = resolve_device(device)
        model, ckpt = load_segmentation_checkpoint(out, dev)
        digest = file_sha256(out)
        for sample in samples:
            prob = thumbnail_probabilities(model, ckpt, sample.rgb, dev)
            save_probabilities(probabilities_dir, sample.slide_id, prob, digest, thumbs[sample.slide_id],
                               ckpt.get("postprocess", {}))
        log.info("wrote the lesion probabilities of %d slides to %s", len(samples), probabilities_dir)
    held = metrics["holdout"]["iou"]
    log.info("wrote %s (best epoch %d, val IoU %s, hold-out IoU %s, %.0f s)", out, metrics["best_epoch"],
             "n/a" if metrics["val"].get("iou") is None else f"{metrics['val']['iou']:.4f}",
             "n/a" if held is None else f"{held:.4f}", metrics["train_seconds"])
    return metrics
