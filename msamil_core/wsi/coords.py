"""Patch grids at 20x, 10x and 5x, and their TRIDENT-compatible HDF5 files.

Each scale is a grid of square patches of ``patch_size`` px *at that magnification*: on a
0.5 µm/px slide a 512-px patch spans 512 level-0 px at 20x, 1024 at 10x and 2048 at 5x. All
grids start at level-0 (0, 0) and their steps are 1x, 2x and 4x the 20x step, so every 5x
patch holds exactly four 10x and sixteen 20x patches. Only patches wholly inside the slide are
considered, and a patch is kept when the selection mask (thumbnail resolution) covers at least
``min_fraction`` of its area (0.7 in MsaMIL-Net).

The HDF5 layout is the one TRIDENT writes: dataset ``coords`` int64 [N, 2] of level-0 top-left
(x, y), with attributes ``patch_size`` (px at the target magnification), ``patch_size_level0``,
``level0_magnification``, ``target_magnification``, ``overlap``, ``level0_width``,
``level0_height`` and ``name``. A slide with no kept patch still gets a [0, 2] dataset.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import MsamilError
from ..fileio import atomic_path
from .geometry import DEFAULT_BASE_MPP, MAGNIFICATIONS, SCALES, area_fractions, patch_size_level0, scale_counts, scale_index

if TYPE_CHECKING:
    from .slide import Slide

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Grid:
    """Kept patches of one scale: level-0 top-left coordinates and the attributes of the file."""

    coords: np.ndarray  # int64 [N, 2]
    fractions: np.ndarray  # float32 [N], selection-mask fraction of each kept patch
    attrs: dict


def make_grid(
    mask: np.ndarray,
    level0_size: tuple[int, int],
    mpp: float,
    magnification: int,
    patch_size: int = 512,
    min_fraction: float = 0.7,
    base_mpp: float = DEFAULT_BASE_MPP,
    name: str = "",
) -> Grid:
    """Grid of one magnification, kept where ``mask`` covers at least ``min_fraction``.

    Args:
        mask: selection mask [h, w] at thumbnail resolution, spanning the whole slide.
        level0_size: slide (width, height) in level-0 px.
        mpp: slide level-0 µm/px.
        magnification: 20, 10 or 5 (µm/px = base_mpp * 20 / magnification).
        patch_size: px at the target magnification.
    """
    w0, h0 = level0_size
    step = patch_size_level0(patch_size, magnification, mpp, base_mpp)
    nx, ny = w0 // step, h0 // step
    xs, ys = np.meshgrid(np.arange(nx, dtype=np.int64) * step, np.arange(ny, dtype=np.int64) * step)
    coords = np.stack([xs.ravel(), ys.ravel()], axis=1)  # row-major: y, then x
    sx, sy = mask.shape[1] / w0, mask.shape[0] / h0
    boxes = np.stack(
        [coords[:, 0] * sx, coords[:, 1] * sy, (coords[:, 0] + step) * sx, (coords[:, 1] + step) * sy], axis=1
    )
    fractions = area_fractions(mask > 0, boxes)
    keep = fractions >= min_fraction - 1e-9
    attrs = {
        "patch_size": int(patch_size),
        "patch_size_level0": int(step),
        "level0_magnification": float(round(20.0 * base_mpp / mpp, 4)),
        "target_magnification": int(magnification),
        "overlap": 0,
        "level0_width": int(w0),
        "level0_height": int(h0),
        "name": name,
        "mpp": float(mpp),
        "min_mask_fraction": float(min_fraction),
    }
    return Grid(coords=coords[keep].reshape(-1, 2), fractions=fractions[keep].astype(np.float32), attrs=attrs)


def make_grids(mask, level0_size, mpp, patch_size=512, min_fraction=0.7, base_mpp=DEFAULT_BASE_MPP, name=""):
    """:func:`make_grid` for 20x, 10x and 5x; returns ``{"20x": Grid, "10x": Grid, "5x": Grid}``."""
    return {
        f"{m}x": make_grid(mask, level0_size, mpp, m, patch_size, min_fraction, base_mpp, name) for m in MAGNIFICATIONS
    }


def sample_grids(grids: dict, n_20x: int, seed: int = 0, name: str = "") -> dict:
    """The ``random`` patch-selection strategy (MsaMIL-Net Table 1): at most ``n_20x`` patches of
    the 20x grid, drawn at random without replacement, and a quarter and a sixteenth as many at
    10x and 5x (the grids' nesting ratio, at least one); seeded by ``seed`` and the slide ``name``
    so reruns and added slides draw the same patches. Kept patches stay in grid order."""
    import zlib

    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    out = {}
    for scale, grid in grids.items():
        per_20x = (20 // int(scale.rstrip("x"))) ** 2  # 1, 4, 16 patches of 20x per patch
        n = max(1, -(-n_20x // per_20x))
        idx = np.sort(rng.permutation(len(grid.coords))[:n])
        out[scale] = Grid(coords=grid.coords[idx], fractions=grid.fractions[idx],
                          attrs=dict(grid.attrs, random_n=int(n), random_seed=int(seed)))
    return out


def write_coords(path: str | os.PathLike, coords: np.ndarray, attrs: dict) -> None:
    """Write a TRIDENT-layout coordinates file atomically (``coords`` int64 [N, 2] plus attributes)."""
    import h5py

    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            ds = f.create_dataset("coords", data=coords, maxshape=(None, 2))
            for key, value in attrs.items():
                ds.attrs[key] = value


def read_coords(path: str | os.PathLike) -> tuple[np.ndarray, dict]:
    """Read a coordinates file (ours, TRIDENT's or CLAM's): int64 [N, 2] level-0 top-left and attributes.

    CLAM stores ``patch_level`` and ``patch_size`` (at that level) instead of
    ``patch_size_level0``; those attributes are passed through unchanged.
    """
    import h5py

    try:
        with h5py.File(path, "r") as f:
            if "coords" not in f:
                raise MsamilError(f"{path}: no `coords` dataset; is this a patch-coordinates HDF5 file?")
            ds = f["coords"]
            coords = np.asarray(ds[()], dtype=np.int64).reshape(-1, 2)
            attrs = {k: _plain(v) for k, v in ds.attrs.items()}
    except OSError as exc:
        raise MsamilError(f"{path}: cannot read HDF5 ({exc}); delete it and rerun the step that wrote it") from None
    return coords, attrs


def _plain(value):
    """h5py attribute -> plain Python value (numpy scalars and bytes are unwrapped)."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


# ----------------------------------------------------------------------------- patch tables


@dataclass(frozen=True)
class PatchTable:
    """All patches of a slide, scale by scale.

    Attributes:
        coords: int64 [N, 2], level-0 top-left (x, y) in pixels.
        scales: int64 [N], 0 = 20x, 1 = 10x, 2 = 5x; non-decreasing.
        patch_size_level0: int64 [N], patch side in level-0 pixels.
    """

    coords: np.ndarray
    scales: np.ndarray
    patch_size_level0: np.ndarray

    def __len__(self) -> int:
        return len(self.coords)

    def counts(self) -> dict[str, int]:
        """Patches per scale name."""
        return scale_counts(self.scales)


def read_patch_table(coords_paths: list[str | os.PathLike], slide: "Slide | None" = None,
                     digest: str | None = None) -> PatchTable:
    """Read one slide's coordinates files (one per scale) into a :class:`PatchTable`.

    Each file's scale comes from its ``target_magnification`` attribute (20, 10 or 5) and its
    patch extent from ``patch_size_level0``. With ``slide`` given, files that record another
    slide size (``level0_width``/``level0_height``) are refused, and with ``digest`` (the slide
    file's) files whose ``slide_digest`` differs: they belong to another slide.
    """
    by_scale: dict[int, tuple[Path, np.ndarray, int]] = {}
    for path in map(Path, coords_paths):
        if not path.is_file():
            raise MsamilError(f"coordinates file not found: {path}; run `msamil coords` for this slide first")
        coords, attrs = read_coords(path)
        if "target_magnification" not in attrs or "patch_size_level0" not in attrs:
            raise MsamilError(
                f"{path}: the `coords` dataset lacks `target_magnification` or `patch_size_level0`; "
                "make coordinates with `msamil coords` (or TRIDENT), which record both"
            )
        try:
            scale = scale_index(attrs["target_magnification"])
        except MsamilError as exc:
            raise MsamilError(f"{path}: {exc}") from None
        if scale in by_scale:
            raise MsamilError(
                f"{by_scale[scale][0]} and {path} both hold {SCALES[scale]} coordinates; give one file per scale"
            )
        if slide is not None:
            _check_same_slide(path, attrs, slide)
        if digest and attrs.get("slide_digest") not in (None, digest):
            raise MsamilError(
                f"{path}: these coordinates were made from another slide file than {getattr(slide, 'path', 'this one')} "
                "(their slide_digest differs): the slide was replaced or the sheet points elsewhere; rerun "
                "`msamil thumbnail` and the steps after it for this slide"
            )
        by_scale[scale] = (path, coords, int(attrs["patch_size_level0"]))
    coords, scales, sizes = [np.zeros((0, 2), np.int64)], [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for scale in sorted(by_scale):  # 20x, 10x, 5x, whatever the argument order
        _, scale_coords, size = by_scale[scale]
        coords.append(scale_coords)
        scales.append(np.full(len(scale_coords), scale, np.int64))
        sizes.append(np.full(len(scale_coords), size, np.int64))
    return PatchTable(np.concatenate(coords).astype(np.int64), np.concatenate(scales), np.concatenate(sizes))


def _check_same_slide(path: Path, attrs: dict, slide: "Slide") -> None:
    recorded = (attrs.get("level0_width"), attrs.get("level0_height"))
    if None not in recorded and tuple(int(v) for v in recorded) != tuple(slide.dimensions):
        raise MsamilError(
            f"{path}: made for a {recorded[0]}x{recorded[1]} slide, but slide {slide.slide_id!r} is "
            f"{slide.dimensions[0]}x{slide.dimensions[1]}; these coordinates belong to another slide, "
            "rerun `msamil coords`"
        )
    name = attrs.get("name")
    if name and name != slide.slide_id:
        log.debug("%s: coordinates name slide %r, extracting them for %r", path, name, slide.slide_id)


def union_table(tables: list[PatchTable]) -> tuple[PatchTable, list[np.ndarray]]:
    """The distinct patches of several tables and where each table's rows sit in it.

    A patch is its (scale, x, y, patch_size_level0); the union lists scale 0 first, then 1, then
    2, each in order of first appearance (table by table, row by row).

    Returns:
        ``(union, indices)``: ``indices[t][i]`` is the union row of row ``i`` of ``tables[t]``.
    """
    rows: dict[tuple[int, int, int, int], int] = {}
    coords, scales, sizes = [], [], []
    positions = [np.empty(len(t), dtype=np.int64) for t in tables]
    for scale in range(len(SCALES)):
        for t, table in enumerate(tables):
            for i in np.flatnonzero(table.scales == scale):
                (x, y), size = table.coords[i], table.patch_size_level0[i]
                key = (scale, int(x), int(y), int(size))
                if key not in rows:
                    rows[key] = len(coords)
                    coords.append((int(x), int(y)))
                    scales.append(scale)
                    sizes.append(int(size))
                positions[t][i] = rows[key]
    union = PatchTable(
        coords=np.asarray(coords, dtype=np.int64).reshape(-1, 2),
        scales=np.asarray(scales, dtype=np.int64),
        patch_size_level0=np.asarray(sizes, dtype=np.int64),
    )
    return union, positions
