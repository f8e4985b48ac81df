"""UNet++ for lesion segmentation on slide thumbnails: build, load weights and checkpoints, predict.

The network sees a thumbnail resized so that its long side is the checkpoint's ``input_size`` px
(aspect kept, padded with white to a multiple of 2 ** encoder_depth, 32 by default); its lesion
probabilities are upsampled back to thumbnail size. :mod:`.postprocess` turns them into the mask.

The checkpoint (:func:`~msamil_core.segmentation.training.train_segmentation`) is a plain dict
(``torch.load(path, weights_only=True)``) that rebuilds the model: ``arch``, ``encoder``,
``model_args``, ``input_size``, ``normalization``, ``postprocess``, ``state_dict``, ``epoch``,
``val_iou``, ``holdout_iou``, ``metrics``, ``splits``, ``config``. Nothing is downloaded: the
encoder starts from random weights or from a local state-dict file.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import MsamilError

log = logging.getLogger(__name__)

ARCH = "UnetPlusPlus"
PAD_VALUE = 255  # white, like glass: padding looks like background to the network


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


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


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
    if encoder_weights:  # a torchvision, timm or smp encoder's state dict, or a whole smp model's
        from ..features.weights import load_weights

        load_weights(model.encoder, encoder_weights, f"segmentation encoder {encoder}")
    return model


def normalise(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
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
    ph, pw = round_up(h, multiple), round_up(w, multiple)
    canvas = torch.full((1, 3, ph, pw), PAD_VALUE, dtype=torch.uint8)
    canvas[0, :, :h, :w] = torch.from_numpy(img.copy()).permute(2, 0, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device)
    std_t = torch.tensor(std, dtype=torch.float32, device=device)
    logits = model(normalise(canvas.to(device), mean_t, std_t)).float()[:, :, :h, :w]
    logits = F.interpolate(logits, size=rgb.shape[:2], mode="bilinear", align_corners=False)
    if was_training:
        model.train()
    return torch.sigmoid(logits)[0, 0].cpu().numpy()


def load_segmentation_checkpoint(path: str | os.PathLike, device: str = "cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild the UNet++ of a ``msamil segment-train`` checkpoint; returns (model in eval mode, dict)."""
    from ..fileio import torch_load

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


def thumbnail_probabilities(model: torch.nn.Module, ckpt: dict, rgb: np.ndarray, device: str = "cpu") -> np.ndarray:
    """Lesion probability float32 [h, w] of one thumbnail with a loaded checkpoint."""
    multiple = 2 ** int(ckpt["model_args"].get("encoder_depth", 5))
    norm = ckpt["normalization"]
    return predict_probabilities(model, rgb, int(ckpt["input_size"]), norm["mean"], norm["std"], multiple, device)
