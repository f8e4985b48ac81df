"""Whole-slide image access: open anything OpenSlide opens, know its µm/px, read patches by magnification.

Magnification is defined by µm/px, never by the file's objective-power tag: with the default
base of 0.5 µm/px for 20x, 20x = 0.5, 10x = 1.0 and 5x = 2.0 µm/px. A slide's level-0 µm/px
comes from the file (``openslide.mpp-x``/``mpp-y``) unless the sheet's ``mpp`` column overrides
it; with neither, opening fails with an error that names the slide and the ``mpp`` column
(a silent 20x guess would give patches of the wrong physical size).

Patches are read from the coarsest pyramid level that is at least as fine as the requested
output, then resized: a 5x patch is never decoded from level 0 when the file has a coarser level.
"""

from __future__ import annotations

import logging
import math
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import MsamilError
from .geometry import DEFAULT_BASE_MPP

log = logging.getLogger(__name__)

# µm/px a microscope scan can have. Desktop-image resolution tags (72, 96, 300 dpi = 353, 265,
# 85 µm/px) are placeholders, not a scan's resolution, and fall outside.
PLAUSIBLE_MPP = (0.01, 20.0)

# Relative tolerance when comparing downsamples: pyramid levels are often 3.9999 instead of 4.
_DOWNSAMPLE_RTOL = 1e-3
# Pixels of a level read at once for a thumbnail (about 50 MB as RGB): a single-level
# 150,000 x 100,000 px slide is read block by block, never whole.
_THUMBNAIL_BLOCK_PX = 1 << 24
_COMPOSITE_ROWS_PX = 1 << 22  # pixels composited onto the background per step


@dataclass(frozen=True)
class LevelChoice:
    """The pyramid level a region is read from and the size to read there."""

    level: int
    downsample: float
    size: int  # pixels at that level


class TiffTileReader:
    """Reads regions of tiled JPEG TIFF levels by decoding the tiles straight from the file.

    OpenSlide spends about twice the JPEG decode time again on compositing and pixel-format
    conversion; for the common case of a tiled JPEG TIFF (generic TIFF, Aperio SVS) decoding the
    tiles with libjpeg-turbo (imagecodecs) and pasting them is what the CPU must do at the least.
    Levels are matched to TIFF pages by their size. Anything else (JPEG 2000, NDPI, MRXS, DICOM,
    ...) stays with OpenSlide; :func:`open_slide` also checks one region against OpenSlide and
    drops this reader for a file whose pixels differ.
    """

    # Formats whose pyramid levels are ordinary tiled TIFF pages.
    VENDORS = ("generic-tiff", "aperio", "philips", "ventana", "leica")

    def __init__(self, path: Path, level_dimensions):
        import tifffile

        self._tif = tifffile.TiffFile(path)
        self._fd = os.open(path, os.O_RDONLY)
        self._scratch: dict[tuple[int, int], np.ndarray] = {}
        self.pages = {}
        by_size = {}
        for page in self._tif.pages:
            if (
                page.is_tiled
                and page.compression == 7  # JPEG
                and page.tilewidth >= 16
                and page.tilelength >= 16
                and page.samplesperpixel == 3
                and page.planarconfig == 1
                and page.photometric in (2, 6)  # RGB, YCbCr
                and page.tiledepth == 1
            ):
                by_size.setdefault((page.imagewidth, page.imagelength), page)
        for level, dims in enumerate(level_dimensions):
            page = by_size.get(tuple(dims))
            if page is not None:
                self.pages[level] = page

    def read(self, level: int, x: int, y: int, w: int, h: int, background) -> np.ndarray:
        """RGB uint8 [h, w, 3] at ``level``, top-left (x, y) in that level's pixels."""
        import imagecodecs

        page = self.pages[level]
        tw, th = page.tilewidth, page.tilelength
        width, height = page.imagewidth, page.imagelength
        across = (width + tw - 1) // tw
        out = np.empty((h, w, 3), dtype=np.uint8)
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, width), min(y + h, height)
        if (x0, y0, x1, y1) != (x, y, x + w, y + h):
            out[...] = background  # the region reaches past the image
        # Decoding into one reused buffer avoids a fresh allocation (and its page faults) per
        # tile, which costs about as much as decoding a well-compressed tile.
        scratch = self._scratch.get((th, tw))
        if scratch is None:
            scratch = self._scratch[(th, tw)] = np.empty((th, tw, 3), dtype=np.uint8)
        # Aperio writes untransformed RGB into JPEG tiles; YCbCr tiles convert as usual.
        options = {"colorspace": "RGB", "outcolorspace": "RGB"} if page.photometric == 2 else {}
        for ty in range(y0 // th, (y1 - 1) // th + 1) if y1 > y0 else ():
            for tx in range(x0 // tw, (x1 - 1) // tw + 1) if x1 > x0 else ():
                # intersection of this tile with the region, in level pixels
                ax0, ay0 = max(x0, tx * tw), max(y0, ty * th)
                ax1, ay1 = min(x1, (tx + 1) * tw), min(y1, (ty + 1) * th)
                target = out[ay0 - y : ay1 - y, ax0 - x : ax1 - x]
                i = ty * across + tx
                count = page.databytecounts[i]
                if count == 0:  # sparse TIFF: tile never written
                    target[...] = background
                    continue
                data = os.pread(self._fd, count, page.dataoffsets[i])
                tile = imagecodecs.jpeg8_decode(data, tables=page.jpegtables, out=scratch, **options)
                target[...] = tile[ay0 - ty * th : ay1 - ty * th, ax0 - tx * tw : ax1 - tx * tw, :3]
        return out

    def close(self) -> None:
        os.close(self._fd)
        self._tif.close()


class Slide:
    """An open whole-slide image with a known level-0 µm/px.

    Use :func:`open_slide` to create one. Coordinates are level-0 pixels, (x, y) = (column, row).
    """

    def __init__(self, osr, path: Path, slide_id: str, mpp: float, mpp_source: str):
        self._osr = osr
        self._tiles: TiffTileReader | None = None
        self.path = path
        self.slide_id = slide_id
        self.mpp = float(mpp)
        self.mpp_source = mpp_source
        self.dimensions: tuple[int, int] = tuple(osr.dimensions)
        self.level_count: int = osr.level_count
        self.level_dimensions: tuple[tuple[int, int], ...] = tuple(tuple(d) for d in osr.level_dimensions)
        self.level_downsamples: tuple[float, ...] = tuple(float(d) for d in osr.level_downsamples)
        self.properties = dict(osr.properties)
        bg = self.properties.get("openslide.background-color", "FFFFFF")
        try:
            self.background = tuple(int(bg[i : i + 2], 16) for i in (0, 2, 4))
        except ValueError:
            self.background = (255, 255, 255)

    # -- metadata ---------------------------------------------------------------------------
    @property
    def vendor(self) -> str | None:
        return self.properties.get("openslide.vendor")

    @property
    def objective_power(self) -> float | None:
        value = self.properties.get("openslide.objective-power")
        try:
            return float(value) if value is not None else None
        except ValueError:
            return None

    def magnification(self, base_mpp: float = DEFAULT_BASE_MPP) -> float:
        """Level-0 magnification implied by µm/px (20x at ``base_mpp``)."""
        return 20.0 * base_mpp / self.mpp

    def metadata(self) -> dict:
        """JSON-ready description: level dims, downsamples, mpp, objective power, vendor."""
        return {
            "slide_id": self.slide_id,
            "path": str(self.path),
            "vendor": self.vendor,
            "mpp": self.mpp,
            "mpp_source": self.mpp_source,
            "objective_power": self.objective_power,
            "magnification_from_mpp": round(self.magnification(), 3),
            "width": self.dimensions[0],
            "height": self.dimensions[1],
            "level_count": self.level_count,
            "level_dimensions": [list(d) for d in self.level_dimensions],
            "level_downsamples": list(self.level_downsamples),
        }

    # -- reading ----------------------------------------------------------------------------
    def level_for_downsample(self, wanted: float) -> int:
        """Coarsest level whose downsample is at most ``wanted`` (within 0.1 %), else level 0.

        Such a level still has enough resolution for the output, and the coarsest of them
        decodes the fewest pixels.
        """
        candidates = [i for i, ds in enumerate(self.level_downsamples) if ds <= wanted * (1 + _DOWNSAMPLE_RTOL)]
        return max(candidates, key=lambda i: self.level_downsamples[i]) if candidates else 0

    def best_level(self, size_level0: float, out_size: int) -> LevelChoice:
        """Where to read ``size_level0`` level-0 px that are shown as ``out_size`` px."""
        level = self.level_for_downsample(size_level0 / out_size)
        ds = self.level_downsamples[level]
        return LevelChoice(level=level, downsample=ds, size=max(1, round(size_level0 / ds)))

    def read_region(self, x: int, y: int, level: int, size: tuple[int, int]) -> np.ndarray:
        """RGB uint8 [h, w, 3] of a region at ``level`` with level-0 top-left (x, y).

        Transparent pixels (outside the scanned area) are filled with the slide's background colour.
        """
        ds = self.level_downsamples[level]
        # Off-grid level-0 positions fall between a coarse level's pixels, where OpenSlide
        # resamples by a sub-pixel shift: leave those to OpenSlide to keep its exact pixels.
        if self._tiles is not None and level in self._tiles.pages and (x / ds).is_integer() and (y / ds).is_integer():
            try:
                return self._tiles.read(level, int(x / ds), int(y / ds), int(size[0]), int(size[1]), self.background)
            except Exception as exc:  # imagecodecs.JpegError, OSError
                raise MsamilError(
                    f"slide {self.slide_id!r} ({self.path}): tiles fail to decode ({exc}); "
                    "the file is corrupt or truncated: re-export or re-copy it, or remove it from the sheet"
                ) from None
        try:
            rgba = self._osr.read_region((int(x), int(y)), int(level), (int(size[0]), int(size[1])))
        except Exception as exc:  # openslide.OpenSlideError and friends
            raise MsamilError(
                f"slide {self.slide_id!r} ({self.path}): tiles fail to decode ({exc}); "
                "the file is corrupt or truncated: re-export or re-copy it, or remove it from the sheet"
            ) from None
        arr = np.asarray(rgba)
        if arr[..., 3].min() == 255:
            return np.ascontiguousarray(arr[..., :3])
        return composite(arr, self.background)

    def read_patch(self, x: int, y: int, size_level0: int, out_size: int) -> np.ndarray:
        """A square patch as RGB uint8 [out_size, out_size, 3].

        (x, y) is the level-0 top-left and ``size_level0`` the patch's extent in level-0 px. The
        region is decoded from :meth:`best_level` and resized (box-filtered when shrinking).
        """
        choice = self.best_level(size_level0, out_size)
        region = self.read_region(x, y, choice.level, (choice.size, choice.size))
        if choice.size == out_size:
            return region
        img = Image.fromarray(region)
        if choice.size % out_size == 0:  # integer shrink: the same box filter, three times faster
            return np.asarray(img.reduce(choice.size // out_size))
        resample = Image.Resampling.BOX if choice.size > out_size else Image.Resampling.BILINEAR
        return np.asarray(img.resize((out_size, out_size), resample))

    def read_thumbnail(self, long_side: int) -> np.ndarray:
        """The whole slide as RGB uint8 with its long side ``long_side`` px, aspect kept.

        Read from the coarsest level that is fine enough; a level larger than
        ``_THUMBNAIL_BLOCK_PX`` (a single-level slide, or one whose pyramid stops early) is read
        and box-filtered block by block, so memory stays bounded whatever the slide's size: each
        thumbnail pixel averages exactly the level pixels under it, as a whole-level resize does.
        """
        w0, h0 = self.dimensions
        scale = long_side / max(w0, h0)
        tw, th = max(1, round(w0 * scale)), max(1, round(h0 * scale))
        level = self.level_for_downsample(max(w0 / tw, h0 / th))
        lw, lh = self.level_dimensions[level]
        if lw * lh > _THUMBNAIL_BLOCK_PX and lw >= tw and lh >= th:
            return self._thumbnail_by_blocks(level, (tw, th))
        region = self.read_region(0, 0, level, (lw, lh))
        img = Image.fromarray(region)
        if (lw, lh) != (tw, th):
            img = img.resize((tw, th), Image.Resampling.BOX if lw >= tw else Image.Resampling.BILINEAR)
        return np.asarray(img)

    def _thumbnail_by_blocks(self, level: int, size: tuple[int, int]) -> np.ndarray:
        """The box-filtered thumbnail of ``size`` (w, h) px of a large level, read in blocks of
        at most about ``_THUMBNAIL_BLOCK_PX`` level pixels."""
        tw, th = size
        lw, lh = self.level_dimensions[level]
        ds = self.level_downsamples[level]
        sx, sy = lw / tw, lh / th  # level px per thumbnail px
        # square blocks of thumbnail px, as many as fit; a whole row of tiles is read once
        side = max(1, int(math.sqrt(_THUMBNAIL_BLOCK_PX / (sx * sy))))
        out = np.empty((th, tw, 3), dtype=np.uint8)
        for j0 in range(0, th, side):
            j1 = min(th, j0 + side)
            y0, y1 = math.floor(j0 * sy), min(lh, math.ceil(j1 * sy))
            for i0 in range(0, tw, side):
                i1 = min(tw, i0 + side)
                x0, x1 = math.floor(i0 * sx), min(lw, math.ceil(i1 * sx))
                region = self.read_region(round(x0 * ds), round(y0 * ds), level, (x1 - x0, y1 - y0))
                box = (i0 * sx - x0, j0 * sy - y0, min(i1 * sx, lw) - x0, min(j1 * sy, lh) - y0)
                block = Image.fromarray(region).resize((i1 - i0, j1 - j0), Image.Resampling.BOX, box=box)
                out[j0:j1, i0:i1] = np.asarray(block)
        return out

    # -- lifecycle --------------------------------------------------------------------------
    def use_direct_tiles(self) -> bool:
        """Read tiled JPEG TIFF levels without OpenSlide when that gives OpenSlide's pixels.

        Returns whether the direct reader is in use. The check decodes one tile-sized region
        of the finest direct level both ways; JPEG decoders may differ by a grey level or so.
        """
        if self.vendor not in TiffTileReader.VENDORS:
            return False
        try:
            reader = TiffTileReader(self.path, self.level_dimensions)
        except Exception:  # not a TIFF tifffile understands
            return False
        if not reader.pages:
            reader.close()
            return False
        level = min(reader.pages)
        page = reader.pages[level]
        w, h = self.level_dimensions[level]
        # a region off the tile grid, inside the image, to check the arithmetic too
        size = (min(page.tilewidth + 7, w), min(page.tilelength + 5, h))
        lx, ly = (w - size[0]) // 2, (h - size[1]) // 2
        ds = self.level_downsamples[level]
        try:
            ours = reader.read(level, lx, ly, size[0], size[1], self.background).astype(np.int16)
            theirs = self.read_region(round(lx * ds), round(ly * ds), level, size).astype(np.int16)
        except Exception:
            reader.close()
            return False
        if np.abs(ours - theirs).mean() > 1.0:
            log.debug("%s: direct tile reads differ from OpenSlide; using OpenSlide", self.slide_id)
            reader.close()
            return False
        self._tiles = reader
        return True

    def close(self) -> None:
        if self._tiles is not None:
            self._tiles.close()
            self._tiles = None
        self._osr.close()

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Slide({self.slide_id!r}, {self.dimensions[0]}x{self.dimensions[1]}, mpp={self.mpp:.4f}, levels={self.level_count})"


def composite(rgba: np.ndarray, background) -> np.ndarray:
    """RGB uint8 [h, w, 3] of OpenSlide's premultiplied RGBA [h, w, 4] on a background colour,
    a few million pixels at a time (float temporaries of a whole large region would take
    several times its size)."""
    h, w = rgba.shape[:2]
    out = np.empty((h, w, 3), dtype=np.uint8)
    bg = np.asarray(background, dtype=np.float32)
    rows = max(1, _COMPOSITE_ROWS_PX // max(1, w))
    for r0 in range(0, h, rows):
        chunk = rgba[r0 : r0 + rows]
        a = chunk[..., 3:4].astype(np.float32) / 255.0
        mixed = chunk[..., :3].astype(np.float32) + bg * (1.0 - a)
        np.clip(mixed + 0.5, 0, 255, out=mixed)
        out[r0 : r0 + rows] = mixed
    return out


def _file_mpp(properties: dict) -> tuple[float | None, str]:
    """Level-0 µm/px from OpenSlide's properties, or None with the reason it is unusable."""
    values = []
    for key in ("openslide.mpp-x", "openslide.mpp-y"):
        try:
            v = float(properties[key])
        except (KeyError, ValueError):
            continue
        if v > 0 and math.isfinite(v):
            values.append(v)
    if not values:
        return None, "records no µm/px (no openslide.mpp-x)"
    mpp = float(np.mean(values))
    lo, hi = PLAUSIBLE_MPP
    if not lo <= mpp <= hi:
        return None, (
            f"records {mpp:.4g} µm/px, which is no microscope resolution (a placeholder resolution tag, "
            "e.g. 72 dpi)"
        )
    return mpp, ""


def open_slide(
    path: str | os.PathLike, slide_id: str | None = None, mpp: float | None = None, direct_tiles: bool = True
) -> Slide:
    """Open a whole-slide image.

    Args:
        path: any file OpenSlide opens (svs, ndpi, tiff, mrxs, scn, bif, dicom, ...).
        slide_id: name used in messages (default: the file's stem).
        mpp: level-0 µm/px; overrides the file's value (the sheet's ``mpp`` column).
        direct_tiles: decode tiled JPEG TIFF levels without OpenSlide where that gives the
            same pixels (:class:`TiffTileReader`); False always reads through OpenSlide.

    Raises:
        MsamilError: the file is missing or unopenable, or neither the file nor ``mpp`` gives µm/px.
    """
    import openslide

    path = Path(path)
    slide_id = slide_id or path.stem
    if not path.exists():
        raise MsamilError(f"slide {slide_id!r}: file not found: {path}; fix its `path` in the slide sheet")
    try:
        osr = openslide.OpenSlide(str(path))
    except Exception as exc:  # OpenSlideUnsupportedFormatError, OpenSlideError
        reason = str(exc) or type(exc).__name__
        raise MsamilError(
            f"slide {slide_id!r}: OpenSlide cannot open {path} ({reason}); convert it to a format "
            "OpenSlide reads (e.g. pyramidal tiled TIFF) or remove it from the slide sheet"
        ) from None
    if mpp is not None and not (isinstance(mpp, float) and math.isnan(mpp)):
        mpp = float(mpp)
        if not (mpp > 0 and math.isfinite(mpp)):
            osr.close()
            raise MsamilError(f"slide {slide_id!r}: mpp must be a positive number of µm/px, got {mpp}")
        source = "sheet"
    else:
        mpp, reason = _file_mpp(dict(osr.properties))
        source = "file"
    if mpp is None:
        osr.close()
        raise MsamilError(
            f"slide {slide_id!r}: {path} {reason}; give the µm per level-0 pixel in the slide sheet's "
            "`mpp` column (e.g. 0.25 for 40x, 0.5 for 20x)"
        )
    slide = Slide(osr, path, slide_id, mpp, source)
    if direct_tiles:
        slide.use_direct_tiles()
    return slide


class OpenSlides:
    """Open slides for a reader that visits many (end-to-end training, its validation and K
    study): at most ``capacity`` are open at once, and opening one more closes the least recently
    read, so file handles and OpenSlide's caches stay bounded whatever the cohort's size.

    A copy made by pickling (a DataLoader worker's) starts empty and opens its own handles: each
    reading process holds at most ``capacity`` slides.
    """

    def __init__(self, capacity: int = 8, direct_tiles: bool = True):
        if int(capacity) < 1:
            raise MsamilError(f"open_slides (slides kept open at once) must be at least 1, got {capacity}")
        self.capacity, self.direct_tiles = int(capacity), direct_tiles
        self._slides: OrderedDict[tuple, Slide] = OrderedDict()

    def get(self, path: str | os.PathLike, slide_id: str | None = None, mpp: float | None = None) -> Slide:
        """The open slide of ``path`` (opened by :func:`open_slide` if it is not open now)."""
        key = (str(path), slide_id, None if mpp is None or math.isnan(mpp) else float(mpp))
        slide = self._slides.get(key)
        if slide is not None:
            self._slides.move_to_end(key)
            return slide
        while len(self._slides) >= self.capacity:
            self._slides.popitem(last=False)[1].close()
        slide = self._slides[key] = open_slide(path, slide_id, mpp, self.direct_tiles)
        return slide

    def __len__(self) -> int:
        return len(self._slides)

    def close(self) -> None:
        while self._slides:
            self._slides.popitem(last=False)[1].close()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_slides": OrderedDict()}
