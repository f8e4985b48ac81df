"""Lesion segmentation on slide thumbnails with UNet++ (MsaMIL-Net's semantic feature filtering).

MsaMIL-Net (sec. 3.1) segments lesions on a 1024-px rendering of the whole slide with UNet++ and
then tiles only the lesion areas. Here the network sees the thumbnail resized so that its long
side is ``input_size`` px (aspect kept, padded with white to a multiple of 2 ** encoder_depth,
32 by default); its lesion probabilities are upsampled back to thumbnail size, thresholded,
restricted to the tissue mask and cleaned of specks (:func:`postprocess`), so the lesion mask is a
thumbnail-size PNG like the tissue mask. The defaults (ResNet-18 encoder, ``input_size`` 256,
training on 128-px crops) take about 5-6 s per epoch for 19 training slides on 2 CPU cores; on a
GPU ``input_size`` 1024 matches the paper.

Training (:func:`train_segmentation`) uses only annotated slides. Targets are the annotation
(:mod:`msamil_core.annotations`) intersected with the tissue mask, at network scale as soft
(area-fraction) targets. Patients, not slides, are split into training, validation (best epoch)
and hold-out (never trained on or selected on; its IoU is the honest estimate). Per batch:
random flips and 90-degree rotations, hue/saturation/brightness/contrast jitter, optionally a
random square crop. Loss: BCE + soft Dice over the image (padding excluded). AdamW with linear
warm-up and cosine decay, gradient clipping, fixed seeds.

IoU is per slide at thumbnail resolution after :func:`postprocess` (what ``msamil segment``
writes), averaged over slides; a slide with neither predicted nor annotated lesion scores 1.

The checkpoint is a plain dict (``torch.load(path, weights_only=True)``) that rebuilds the model:
``arch``, ``encoder``, ``model_args``, ``input_size``, ``normalization``, ``postprocess``,
``state_dict``, ``epoch``, ``val_iou``, ``holdout_iou``, ``metrics``, ``splits``, ``config``.
Nothing is downloaded: the encoder starts from random weights or from a local state-dict file.
"""

from __future__ import annotations

import copy
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

from .errors import MsamilError
from .lesionmask import PostProcess, postprocess  # noqa: F401  (their home is torch-free)

log = logging.getLogger(__name__)

ARCH = "UnetPlusPlus"
_PAD_VALUE = 255  # white, like glass: padding looks like background to the network


@dataclass
class SegmentationConfig:
    """Training settings; the config's ``segmentation`` section maps onto them.

    Sizes are px at network scale: the thumbnail resized so that its long side is ``input_size``.
    """

    encoder: str = "resnet18"  # any segmentation_models_pytorch encoder (resnet34, efficientnet-b0, tu-<timm>)
    encoder_weights: str | None = None  # local state dict for the encoder; None = random init
    encoder_depth: int = 5
    decoder_channels: list = field(default_factory=lambda: [256, 128, 64, 32, 16])
    input_size: int = 256  # long side of the network's view of a thumbnail
    crop_size: int = 128  # train on random square crops of this size (4x cheaper than 256); 0 = whole images
    epochs: int = 15
    batch_size: int = 8
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_epochs: float = 1.0
    weight_decay: float = 1e-4
    grad_clip: float = 1.0  # max gradient norm; 0 = off
    bce_weight: float = 1.0
    dice_weight: float = 1.0
    holdout_fraction: float = 0.2  # of annotated patients, never trained on: the reported IoU
    val_fraction: float = 0.2  # of annotated patients, picks the best epoch
    augment: bool = True
    hue: float = 0.04  # max hue shift, fraction of the colour circle
    saturation: float = 0.25  # max relative saturation change
    brightness: float = 0.2  # max relative brightness change
    contrast: float = 0.2  # max relative contrast change
    seed: int = 0

    def __post_init__(self):
        self.decoder_channels = [int(c) for c in self.decoder_channels]
        checks = [
            (self.input_size >= 32, f"input_size must be at least 32 px, got {self.input_size}"),
            (
                self.crop_size == 0 or self.crop_size >= 32,
                f"crop_size must be 0 (off) or at least 32 px, got {self.crop_size}",
            ),
            (self.epochs >= 1 and self.batch_size >= 1, "epochs and batch_size must be at least 1"),
            (1 <= self.encoder_depth <= 5, f"encoder_depth must be 1..5, got {self.encoder_depth}"),
            (
                len(self.decoder_channels) == self.encoder_depth,
                "decoder_channels needs one entry per encoder_depth level",
            ),
            (
                0 <= self.holdout_fraction < 1 and 0 <= self.val_fraction < 1,
                "holdout_fraction and val_fraction must be in [0, 1)",
            ),
            (
                self.holdout_fraction + self.val_fraction < 1,
                "holdout_fraction + val_fraction must leave patients to train on",
            ),
            (self.lr > 0 and self.min_lr >= 0, "lr must be positive and min_lr non-negative"),
        ]
        for ok, message in checks:
            if not ok:
                raise MsamilError(f"segmentation: {message}")
        if self.crop_size % self.multiple:
            raise MsamilError(f"segmentation: crop_size must be a multiple of {self.multiple}, got {self.crop_size}")

    @property
    def multiple(self) -> int:
        """Input sides must be multiples of this (px)."""
        return 2**self.encoder_depth


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


def read_rgb(path: str | os.PathLike, slide_id: str) -> np.ndarray:
    """A thumbnail PNG as RGB uint8 [h, w, 3]."""
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except FileNotFoundError:
        raise MsamilError(
            f"slide {slide_id!r}: thumbnail {path} not found; run `msamil thumbnail` for it first"
        ) from None
    except (OSError, ValueError) as exc:
        raise MsamilError(
            f"slide {slide_id!r}: cannot read thumbnail {path} ({exc}); rerun its thumbnail step"
        ) from None


def load_sample(
    slide_id: str,
    patient_id: str,
    thumbnail: str | os.PathLike,
    annotation: str | os.PathLike,
    rules=None,
    mask_labels: Sequence[int] | None = None,
    tolerance: float | None = None,
) -> SlideSample:
    """Read a thumbnail with the meta.json and tissue_mask.png beside it, and rasterise its annotation.

    ``rules``, ``mask_labels`` and ``tolerance`` are passed to
    :func:`msamil_core.annotations.annotation_mask`.
    """
    from .annotations import DEFAULT_TOLERANCE, annotation_mask, load_meta, meta_sizes
    from .tissue import load_mask

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
    tol = DEFAULT_TOLERANCE if tolerance is None else tolerance
    lesion = annotation_mask(annotation, slide_id, level0_size, thumb_size, rules, mask_labels, tol) & tissue
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


def network_size(thumb_hw: tuple[int, int], input_size: int) -> tuple[int, int]:
    """(w, h) of a thumbnail of (h, w) px resized so that its long side is ``input_size``."""
    h, w = thumb_hw
    s = input_size / max(h, w)
    return max(1, round(w * s)), max(1, round(h * s))


def network_image(rgb: np.ndarray, input_size: int) -> np.ndarray:
    """Thumbnail RGB uint8 [h, w, 3] at network scale (long side ``input_size``), uint8."""
    size = network_size(rgb.shape[:2], input_size)
    shrink = size[0] <= rgb.shape[1]
    return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR))


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _canvas(samples: Sequence[SlideSample], cfg: SegmentationConfig):
    """Stack samples at network scale on white square canvases.

    Returns uint8 images [N, 3, S, S], float16 soft targets [N, 1, S, S], bool valid [N, 1, S, S]
    and the (w, h) of each image on its canvas (top-left aligned).
    """
    side = max(_round_up(cfg.input_size, cfg.multiple), cfg.crop_size)
    n = len(samples)
    images = torch.full((n, 3, side, side), _PAD_VALUE, dtype=torch.uint8)
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


# ----------------------------------------------------------------------------- model


def build_model(
    encoder: str = "resnet18",
    encoder_depth: int = 5,
    decoder_channels: Sequence[int] = (256, 128, 64, 32, 16),
    encoder_weights: str | os.PathLike | None = None,
) -> torch.nn.Module:
    """UNet++ with one output channel (lesion logit), never downloading anything.

    ``encoder_weights`` is a local state-dict file for the encoder (a torchvision, timm or
    segmentation_models_pytorch encoder state dict, or a whole smp model whose ``encoder.*`` keys
    are used); without it the encoder is randomly initialised.
    """
    import segmentation_models_pytorch as smp

    try:
        model = smp.UnetPlusPlus(
            encoder_name=encoder,
            encoder_weights=None,  # never download; local weights are loaded below
            encoder_depth=int(encoder_depth),
            decoder_channels=[int(c) for c in decoder_channels],
            in_channels=3,
            classes=1,
        )
    except (KeyError, ValueError, RuntimeError) as exc:
        known = [n for n in smp.encoders.get_encoder_names() if n.startswith(("resnet", "efficientnet", "mobilenet"))]
        raise MsamilError(
            f"segmentation encoder {encoder!r} cannot build a UNet++ ({str(exc).strip() or type(exc).__name__}); "
            f"use a segmentation_models_pytorch encoder such as {', '.join(known[:8])}, or tu-<timm model>"
        ) from None
    if encoder_weights:
        load_encoder_weights(model, encoder_weights, encoder)
    return model


# Prefixes a whole-model or wrapped state dict puts before the encoder's own keys.
_ENCODER_PREFIXES = ("encoder.", "module.encoder.", "model.encoder.", "module.", "backbone.")
# Classifier heads of ImageNet checkpoints that a segmentation encoder does not have.
_HEAD_PREFIXES = (
    "fc.",
    "_fc.",
    "classifier.",
    "head.",
    "last_linear.",
    "model.fc.",
    "model.classifier.",
    "model.head.",
)


def load_encoder_weights(model: torch.nn.Module, path: str | os.PathLike, encoder: str) -> None:
    """Load a local state dict into ``model.encoder`` strictly (classifier heads aside)."""
    from .encoders import read_state_dict

    what = f"segmentation encoder {encoder}"
    state = read_state_dict(path, f"{what} weights")
    target = model.encoder.state_dict()
    # Candidates: as is, minus a wrapper prefix, or plus timm-universal's "model." prefix.
    candidates = [state]
    for prefix in _ENCODER_PREFIXES:
        if any(k.startswith(prefix) for k in state):
            candidates.append({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
    candidates.append({f"model.{k}": v for k, v in state.items()})
    best = max(candidates, key=lambda s: len(set(s) & set(target)))
    best = {k: v for k, v in best.items() if k in target or not k.startswith(_HEAD_PREFIXES)}
    missing = [k for k in target if k not in best and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in best if k not in target]
    shapes = [k for k in best if k in target and best[k].shape != target[k].shape]
    if missing or unexpected or shapes:
        parts = [
            f"{len(keys)} keys {label} (e.g. {', '.join(keys[:2])})"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("of another shape", shapes))
            if keys
        ]
        raise MsamilError(
            f"{what}: weights {path} do not fit this encoder: {'; '.join(parts)}; give ImageNet (or other) "
            "weights of exactly this encoder, or leave encoder_weights empty for random initialisation"
        )
    model.encoder.load_state_dict(best, strict=False)  # strictness checked above, minus num_batches_tracked
    log.info("%s: loaded weights from %s (%d tensors)", what, path, len(best))


def _normalise(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 or [0, 1] float [B, 3, H, W] -> normalised float."""
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images
    return (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


@torch.no_grad()
def predict_probabilities(
    model: torch.nn.Module,
    rgb: np.ndarray,
    input_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    multiple: int = 32,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Lesion probability of each thumbnail pixel, float32 [h, w] in [0, 1].

    The thumbnail (RGB uint8 [h, w, 3]) is resized to long side ``input_size``, padded with
    white to a multiple of ``multiple``, segmented, and the logits are upsampled bilinearly to
    the thumbnail's size.
    """
    was_training = model.training
    model.eval()
    img = network_image(rgb, input_size)
    h, w = img.shape[:2]
    ph, pw = _round_up(h, multiple), _round_up(w, multiple)
    canvas = torch.full((1, 3, ph, pw), _PAD_VALUE, dtype=torch.uint8)
    canvas[0, :, :h, :w] = torch.from_numpy(img.copy()).permute(2, 0, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device)
    std_t = torch.tensor(std, dtype=torch.float32, device=device)
    logits = model(_normalise(canvas.to(device), mean_t, std_t)).float()[:, :, :h, :w]
    logits = F.interpolate(logits, size=rgb.shape[:2], mode="bilinear", align_corners=False)
    if was_training:
        model.train()
    return torch.sigmoid(logits)[0, 0].cpu().numpy()


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
    post: PostProcess,
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
    images: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, cfg: SegmentationConfig, gen: torch.Generator
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


def train_segmentation(
    samples: Sequence[SlideSample],
    cfg: SegmentationConfig | None = None,
    post: PostProcess | None = None,
    device: str = "auto",
    progress: bool = True,
) -> tuple[dict, dict]:
    """Train UNet++ on annotated thumbnails; returns (checkpoint dict, metrics dict).

    The checkpoint holds the best epoch by validation IoU (the last epoch when no patient is
    left for validation); the metrics hold per-epoch history, the best validation metrics and
    the hold-out metrics of that checkpoint (``holdout.iou``).
    """
    from tqdm import tqdm

    from . import __version__
    from .encoders import IMAGENET_MEAN, IMAGENET_STD, file_sha256
    from .train import autocast, lr_at, resolve_device

    cfg = cfg or SegmentationConfig()
    post = post or PostProcess()
    dev = resolve_device(device)
    parts = split_patients([s.patient_id for s in samples], cfg.holdout_fraction, cfg.val_fraction, cfg.seed)
    split = {name: [s for s in samples if parts[s.patient_id] == name] for name in ("train", "val", "holdout")}
    slide_ids = {name: [s.slide_id for s in group] for name, group in split.items()}
    log.info(
        "segmentation: %d annotated slides of %d patients: %d train, %d validation, %d hold-out slides",
        len(samples),
        len(parts),
        *(len(split[k]) for k in ("train", "val", "holdout")),
    )
    if not split["val"]:
        log.warning("segmentation: no validation patients; the last epoch is kept")

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.encoder, cfg.encoder_depth, cfg.decoder_channels, cfg.encoder_weights).to(dev)
    mean, std = list(IMAGENET_MEAN), list(IMAGENET_STD)
    mean_t = torch.tensor(mean, device=dev)
    std_t = torch.tensor(std, device=dev)
    images, targets, valid, sizes = _canvas(split["train"], cfg)
    n_train = len(split["train"])
    steps_per_epoch = math.ceil(n_train / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)

    history = []
    best = {"iou": -1.0, "epoch": 0, "state": None, "metrics": {}}
    step = 0
    started = time.perf_counter()
    bar = tqdm(range(1, cfg.epochs + 1), desc="segment-train", unit="epoch", disable=not progress)
    for epoch in bar:
        t0 = time.perf_counter()
        model.train()
        losses = []
        order = torch.randperm(n_train, generator=gen)
        for b in range(steps_per_epoch):
            index = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            if cfg.crop_size:
                x, y, v = _random_crops(images, targets, valid, sizes, index, cfg.crop_size, gen)
            else:
                x, y, v = images[index], targets[index], valid[index]
            x = x.float() / 255.0
            if cfg.augment:
                x, y, v = augment_batch(x, y, v, cfg, gen)
            x, y, v = x.to(dev), y.to(dev), v.to(dev)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total_steps, warmup_steps, cfg.lr, cfg.min_lr)
            with autocast(dev, True):
                logits = model(_normalise(x, mean_t, std_t))
            loss = dice_bce_loss(logits, y, v, cfg.bce_weight, cfg.dice_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            losses.append(float(loss.detach()))
            step += 1
        metrics = evaluate(model, split["val"], cfg.input_size, mean, std, post, cfg.multiple, dev)
        record = {
            "epoch": epoch,
            "train_loss": float(np.mean(losses)),
            "val_iou": metrics["iou"],
            "val_dice": metrics["dice"],
            "lr": optimizer.param_groups[0]["lr"],
            "seconds": round(time.perf_counter() - t0, 2),
        }
        history.append(record)
        improved = metrics["iou"] is None or metrics["iou"] > best["iou"]
        if improved:
            best = {
                "iou": metrics["iou"],
                "epoch": epoch,
                "state": copy.deepcopy(model.state_dict()),
                "metrics": metrics,
            }
        val_text = "n/a" if metrics["iou"] is None else f"{metrics['iou']:.4f}"
        log.info(
            "epoch %d: train loss %.4f, val IoU %s%s", epoch, record["train_loss"], val_text, " *" if improved else ""
        )
        bar.set_postfix(loss=f"{record['train_loss']:.3f}", val_iou=val_text)
    bar.close()
    train_seconds = time.perf_counter() - started

    model.load_state_dict(best["state"])
    holdout = evaluate(model, split["holdout"], cfg.input_size, mean, std, post, cfg.multiple, dev)
    if holdout["iou"] is not None:
        log.info("hold-out IoU %.4f over %d slides (best epoch %d)", holdout["iou"], holdout["n_slides"], best["epoch"])
    metrics = {
        "best_epoch": best["epoch"],
        "val": best["metrics"],
        "holdout": holdout,
        "splits": slide_ids,
        "train_seconds": round(train_seconds, 1),
        "history": history,
    }
    config = asdict(cfg)
    checkpoint = {
        "arch": ARCH,
        "encoder": cfg.encoder,
        "model_args": {
            "encoder": cfg.encoder,
            "encoder_depth": cfg.encoder_depth,
            "decoder_channels": list(cfg.decoder_channels),
        },
        "input_size": cfg.input_size,
        "normalization": {"mean": mean, "std": std},
        "postprocess": asdict(post),
        "state_dict": {k: v.detach().cpu() for k, v in best["state"].items()},
        "epoch": best["epoch"],
        "val_iou": best["metrics"].get("iou"),
        "holdout_iou": holdout["iou"],
        "metrics": {k: metrics[k] for k in ("best_epoch", "val", "holdout", "train_seconds")},
        "splits": slide_ids,
        "config": config,
        "encoder_weights_sha256": file_sha256(cfg.encoder_weights) if cfg.encoder_weights else None,
        "msamil_version": __version__,
    }
    return checkpoint, metrics


# ----------------------------------------------------------------------------- inference


def load_segmentation_checkpoint(path: str | os.PathLike, device: str = "cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild the UNet++ of a ``msamil segment-train`` checkpoint; returns (model in eval mode, dict)."""
    from .encoders import torch_load

    if not Path(path).is_file():
        raise MsamilError(f"segmentation checkpoint {path}: file not found; train one with `msamil segment-train`")
    ckpt = torch_load(path, "segmentation checkpoint")
    if not isinstance(ckpt, dict) or ckpt.get("arch") != ARCH:
        raise MsamilError(
            f"segmentation checkpoint {path}: not a UNet++ checkpoint of `msamil segment-train`; train one first"
        )
    for key in ("model_args", "state_dict", "input_size", "normalization"):
        if key not in ckpt:
            raise MsamilError(f"segmentation checkpoint {path}: lacks `{key}`; retrain it with `msamil segment-train`")
    model = build_model(**ckpt["model_args"])
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        raise MsamilError(f"segmentation checkpoint {path}: weights do not fit its model ({str(exc)[:200]})") from None
    return model.to(device).eval(), ckpt


def segment_thumbnail(
    model: torch.nn.Module,
    ckpt: dict,
    rgb: np.ndarray,
    tissue: np.ndarray | None,
    post: PostProcess,
    device: str = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """(lesion mask bool [h, w], probability float32 [h, w]) of one thumbnail with a loaded checkpoint."""
    prob = thumbnail_probabilities(model, ckpt, rgb, device)
    return postprocess(prob, tissue, post), prob


def thumbnail_probabilities(model: torch.nn.Module, ckpt: dict, rgb: np.ndarray, device: str = "cpu") -> np.ndarray:
    """Lesion probability float32 [h, w] of one thumbnail with a loaded checkpoint."""
    multiple = 2 ** int(ckpt["model_args"].get("encoder_depth", 5))
    norm = ckpt["normalization"]
    return predict_probabilities(model, rgb, int(ckpt["input_size"]), norm["mean"], norm["std"], multiple, device)
