"""Masks and thumbnails as PNG files: what the per-slide steps write and read back.

Masks are 8-bit PNGs at thumbnail size, 0 = background and 255 = inside; every write is atomic.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from ..errors import MsamilError
from ..fileio import atomic_path


def save_mask(path: str | os.PathLike, mask: np.ndarray) -> None:
    """Write a mask as 8-bit PNG, 0/255, atomically."""
    with atomic_path(path) as tmp:
        Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L").save(tmp, format="PNG")


def load_mask(path: str | os.PathLike) -> np.ndarray:
    """Read a mask PNG (any mode); bool [h, w], True where the value is above half."""
    try:
        with Image.open(path) as img:
            arr = np.asarray(img.convert("L"))
    except (OSError, ValueError) as exc:
        raise MsamilError(f"{path}: cannot read mask image ({exc}); delete it and rerun the step that wrote it") from None
    return arr > 127


def save_rgb_png(path: str | os.PathLike, rgb: np.ndarray) -> None:
    """Write an RGB uint8 image as PNG, atomically."""
    with atomic_path(path) as tmp:
        Image.fromarray(rgb).save(tmp, format="PNG")


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
