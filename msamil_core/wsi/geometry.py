"""Magnifications, scales and patch geometry shared by every step.

Magnification is defined by µm/px, never by an objective-power tag: 20x is ``base_mpp`` (0.5 µm/px
by default), 10x twice and 5x four times that. A scale's index (0 = 20x, 1 = 10x, 2 = 5x) is what
feature bags store in ``scales``.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import MsamilError

# Index in this tuple is the `scales` value stored in feature bags (0 = 20x, 1 = 10x, 2 = 5x).
SCALES = ("20x", "10x", "5x")
MAGNIFICATIONS = (20, 10, 5)
# µm/px that defines 20x; 10x and 5x are 2x and 4x coarser.
DEFAULT_BASE_MPP = 0.5

def scale_index(scale: str | int | float) -> int:
    """Map ``"20x"``/``20``/``20.0`` to 0, ``"10x"`` to 1, ``"5x"`` to 2."""
    if isinstance(scale, str):
        text = scale.strip().lower().rstrip("x")
    else:
        text = str(scale)
    try:
        mag = float(text)
    except ValueError:
        raise MsamilError(f"unknown scale {scale!r}: use one of {', '.join(SCALES)}") from None
    for i, m in enumerate(MAGNIFICATIONS):
        if math.isclose(mag, m):
            return i
    raise MsamilError(f"unknown scale {scale!r}: use one of {', '.join(SCALES)}")


def magnification_mpp(magnification: float, base_mpp: float = DEFAULT_BASE_MPP) -> float:
    """µm/px of a magnification, 20x being ``base_mpp`` (0.5 µm/px by default)."""
    return base_mpp * 20.0 / float(magnification)


def patch_size_level0(patch_size: int, magnification: float, mpp: float, base_mpp: float = DEFAULT_BASE_MPP) -> int:
    """Level-0 extent (px) of a ``patch_size`` px patch at ``magnification`` on a slide of ``mpp`` µm/px.

    Rounded at 20x and multiplied up, so that one 10x patch spans exactly two 20x patches and
    one 5x patch exactly four: the grids of the three scales stay aligned.
    """
    size20 = max(1, round(patch_size * magnification_mpp(20, base_mpp) / mpp))
    factor = 20.0 / float(magnification)
    if not math.isclose(factor, round(factor)):
        # Non power-of-two magnifications (e.g. 40x on a 20x base) cannot nest; round directly.
        return max(1, round(patch_size * magnification_mpp(magnification, base_mpp) / mpp))
    return size20 * round(factor)


def area_fractions(mask: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Fraction of each box covered by a mask, exactly, with fractional pixel overlap.

    Args:
        mask: [h, w] bool or 0..1 array; pixel (i, j) covers [j, j+1) x [i, i+1).
        boxes: float [N, 4] of (x0, y0, x1, y1) in mask pixel units.

    Returns:
        float64 [N] in [0, 1].

    The integral of a piecewise-constant image is bilinear inside each pixel cell, so bilinear
    interpolation of the summed-area table at the box corners is exact.
    """
    h, w = mask.shape
    sat = np.zeros((h + 1, w + 1), dtype=np.float64)
    sat[1:, 1:] = np.cumsum(np.cumsum(mask.astype(np.float64), axis=0), axis=1)

    def integral(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        x = np.clip(x, 0, w)
        y = np.clip(y, 0, h)
        x0 = np.minimum(np.floor(x).astype(np.int64), w - 1)
        y0 = np.minimum(np.floor(y).astype(np.int64), h - 1)
        fx, fy = x - x0, y - y0
        top = sat[y0, x0] * (1 - fx) + sat[y0, x0 + 1] * fx
        bottom = sat[y0 + 1, x0] * (1 - fx) + sat[y0 + 1, x0 + 1] * fx
        return top * (1 - fy) + bottom * fy

    if len(boxes) == 0:
        return np.zeros(0)
    x0, y0, x1, y1 = (boxes[:, i].astype(np.float64) for i in range(4))
    inside = integral(x1, y1) - integral(x0, y1) - integral(x1, y0) + integral(x0, y0)
    area = np.maximum((x1 - x0) * (y1 - y0), 1e-12)
    return np.clip(inside / area, 0.0, 1.0)


def scale_counts(scales) -> dict[str, int]:
    """Patches per scale name from scale indices [N] (0 = 20x, 1 = 10x, 2 = 5x)."""
    counts = np.bincount(np.asarray(scales, dtype=np.int64), minlength=len(SCALES))
    return {name: int(counts[i]) for i, name in enumerate(SCALES)}
