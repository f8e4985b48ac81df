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

import functools
import logging
import math
import os
import sys
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import MsamilError, SlideDataError
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
# Pillow's resampling works in fixed point with this many fractional bits (Resample.c).
PIL_PRECISION_BITS = 22
# Most output rows or columns that resample_exactly computes with arithmetic rather than copies.
_ARITHMETIC_LINES = 8


@dataclass(frozen=True)
class LevelChoice:
    """The pyramid level a region is read from and the size to read there."""

    level: int
    downsample: float
    size: int  # pixels at that level


#: Decoded tiles kept per open slide, in MB (:class:`TiffTileReader`). A pass over patches in
#: raster order decodes each tile once when the budget holds a row of tiles of the level read
#: plus the tiles of two patches: 256 MB holds three rows of a 100,000 px wide level (about 400
#: tiles of 240 x 240 px, 70 MB a row), so such a pass over level 0 of slides up to about
#: 300,000 px wide. A pass keeps about one row; the rest of the budget serves other orders.
DEFAULT_TILE_CACHE_MB = 256


def tile_cache_bytes(cache_mb: float) -> int:
    """Bytes of a tile cache budget given in MB; refuses a negative or unset one."""
    if not (isinstance(cache_mb, (int, float)) and 0 <= cache_mb < math.inf):
        raise MsamilError(f"tile_cache_mb (MB of decoded tiles kept per open slide) must be a number >= 0, got {cache_mb!r}")
    return int(cache_mb * 2**20)


@dataclass(frozen=True)
class TileCounts:
    """What a slide's direct tile reader has done since it opened (:attr:`Slide.tile_counts`)."""

    decoded: int  # JPEG tiles decoded
    reused: int  # tile reads served from the cache of decoded tiles
    cached_bytes: int  # bytes of decoded tiles held now
    budget_bytes: int  # most bytes the cache may hold (0: no cache)


@dataclass(frozen=True)
class TileSpan:
    """The part of one tile that a region covers: ``tile[tile_rows, tile_cols]`` is
    ``region[rows, cols]``; ``index`` is the tile's index in its TIFF page. ``beyond`` says
    whether the tile holds image pixels right of or below the region, which a later patch of
    a pass in raster order may read; a pass is done with the others."""

    index: int
    tile_rows: slice
    tile_cols: slice
    rows: slice
    cols: slice
    beyond: bool


class TiffTileReader:
    """Reads regions of tiled JPEG TIFF levels by decoding the tiles straight from the file.

    OpenSlide spends about twice the JPEG decode time again on compositing and pixel-format
    conversion; for the common case of a tiled JPEG TIFF (generic TIFF, Aperio SVS) decoding the
    tiles with libjpeg-turbo (imagecodecs) and pasting them is what the CPU must do at the least.
    Levels are matched to TIFF pages by their size. Anything else (JPEG 2000, NDPI, MRXS, DICOM,
    ...) stays with OpenSlide; :func:`open_slide` also checks one region against OpenSlide and
    drops this reader for a file whose pixels differ.

    Decoded tiles are kept in a least-recently-used cache of at most ``cache_mb`` MB, keyed by
    (level, tile index), so that neighbouring patches do not decode the tiles they share again.
    A pass in raster order (rows of patches top to bottom, each left to right, as coordinates
    files list them) is done with a tile once a region covers its right and bottom image
    pixels: such tiles go first, and one goes whenever a tile is added, so a pass keeps about
    one row of tiles (those the next row of patches reads again) however large the budget,
    and the cache does not grow into fresh memory, whose page faults cost about a third of a
    decode. A raster pass decodes each tile once when the budget holds that row plus two
    patches' tiles (:data:`DEFAULT_TILE_CACHE_MB`); other orders reuse what the budget holds.
    The cache belongs to this reader, in the process that opened the slide: it starts empty,
    and a process that opens the slide again (a DataLoader worker) has its own. ``cache_mb=0``
    keeps no tile and decodes into one reused buffer.
    """

    # Formats whose pyramid levels are ordinary tiled TIFF pages.
    VENDORS = ("generic-tiff", "aperio", "philips", "ventana", "leica")

    def __init__(self, path: Path, level_dimensions, cache_mb: float = DEFAULT_TILE_CACHE_MB):
        import tifffile

        self.budget_bytes = tile_cache_bytes(cache_mb)
        self.path = Path(path)
        self._tif = tifffile.TiffFile(path)
        self._fd = os.open(path, os.O_RDONLY)
        self._scratch: dict[tuple[int, int], np.ndarray] = {}
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()  # least recent first
        self._done: set[tuple[int, int]] = set()  # cached tiles a raster pass is done with, at the front
        self._cached_bytes = 0
        self.tiles_decoded = 0
        self.tiles_reused = 0
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

    @property
    def counts(self) -> TileCounts:
        return TileCounts(self.tiles_decoded, self.tiles_reused, self._cached_bytes, self.budget_bytes)

    def tile_spans(self, level: int, x: int, y: int, w: int, h: int) -> list[TileSpan]:
        """The tiles of ``level`` under the region (x, y, w, h) in that level's pixels, row by row;
        the part of the region outside the image is covered by none."""
        page = self.pages[level]
        tw, th = page.tilewidth, page.tilelength
        across = (page.imagewidth + tw - 1) // tw
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + w, page.imagewidth), min(y + h, page.imagelength)
        if x1 <= x0 or y1 <= y0:
            return []
        spans = []
        for ty in range(y0 // th, (y1 - 1) // th + 1):
            ay0, ay1 = max(y0, ty * th), min(y1, (ty + 1) * th)
            below = min((ty + 1) * th, page.imagelength) > y1
            for tx in range(x0 // tw, (x1 - 1) // tw + 1):
                ax0, ax1 = max(x0, tx * tw), min(x1, (tx + 1) * tw)
                spans.append(TileSpan(
                    ty * across + tx,
                    slice(ay0 - ty * th, ay1 - ty * th), slice(ax0 - tx * tw, ax1 - tx * tw),
                    slice(ay0 - y, ay1 - y), slice(ax0 - x, ax1 - x),
                    below or min((tx + 1) * tw, page.imagewidth) > x1,
                ))
        return spans

    def tile_data(self, level: int, index: int) -> bytes:
        """The bytes stored for one tile: a JPEG stream, abbreviated (without the tables in the
        page's JPEGTables) in most TIFFs; empty for a tile never written (sparse TIFF)."""
        page = self.pages[level]
        count = page.databytecounts[index]
        return os.pread(self._fd, count, page.dataoffsets[index]) if count else b""

    def decode(self, level: int, index: int, out: np.ndarray | None = None) -> np.ndarray | None:
        """One tile as RGB uint8 [tilelength, tilewidth, 3], decoded now (into ``out`` if given);
        None for a tile never written."""
        import imagecodecs

        data = self.tile_data(level, index)
        if not data:
            return None
        page = self.pages[level]
        # Aperio writes untransformed RGB into JPEG tiles; YCbCr tiles convert as usual.
        options = {"colorspace": "RGB", "outcolorspace": "RGB"} if page.photometric == 2 else {}
        self.tiles_decoded += 1
        return imagecodecs.jpeg8_decode(data, tables=page.jpegtables, out=out, **options)

    def tile(self, level: int, index: int, done: bool = False) -> np.ndarray | None:
        """One tile as read-only RGB uint8 [tilelength, tilewidth, 3] from the cache, decoded and
        cached when missing; None for a tile never written. A tile the caller is ``done`` with
        (:attr:`TileSpan.beyond` false) is the first the cache lets go."""
        key = (level, index)
        tile = self._cache.get(key)
        if tile is not None:
            self.tiles_reused += 1
        else:
            page = self.pages[level]
            shape = (page.tilelength, page.tilewidth, 3)
            nbytes, spare = math.prod(shape), None
            if nbytes <= self.budget_bytes:
                if self._cache and next(iter(self._cache)) in self._done:
                    spare = self._pop_oldest()  # a tile a pass is done with
                while self._cache and self._cached_bytes + nbytes > self.budget_bytes:
                    spare = self._pop_oldest()
            # Decoding into the memory of a tile let go saves the page faults of fresh memory
            # (a third of a decode), when nothing else holds it: no view a caller still has.
            if spare is not None and spare.shape == shape and sys.getrefcount(spare) == 2:
                spare.flags.writeable = True
            else:
                spare = None
            tile = self.decode(level, index, out=spare)
            if tile is None or nbytes > self.budget_bytes:
                return tile
            tile.flags.writeable = False  # callers may get views of it
            self._cache[key] = tile
            self._cached_bytes += tile.nbytes
        if done:
            self._done.add(key)
            self._cache.move_to_end(key, last=False)
        else:
            self._done.discard(key)
            self._cache.move_to_end(key)
        return tile

    def _pop_oldest(self) -> np.ndarray:
        key, tile = self._cache.popitem(last=False)
        self._done.discard(key)
        self._cached_bytes -= tile.nbytes
        return tile

    def read(self, level: int, x: int, y: int, w: int, h: int, background) -> np.ndarray:
        """RGB uint8 [h, w, 3] at ``level``, top-left (x, y) in that level's pixels.

        With a cache, a region inside one tile is a read-only view of the cached tile.
        """
        page = self.pages[level]
        spans = self.tile_spans(level, x, y, w, h)
        inside = 0 <= x and 0 <= y and x + w <= page.imagewidth and y + h <= page.imagelength
        if self.budget_bytes and inside and len(spans) == 1:
            tile = self.tile(level, spans[0].index, done=not spans[0].beyond)
            if tile is not None:
                return tile[spans[0].tile_rows, spans[0].tile_cols]
        out = np.empty((h, w, 3), dtype=np.uint8)
        if not inside:
            out[...] = background  # the region reaches past the image
        if not spans:
            return out
        if self.budget_bytes:
            for span in spans:
                tile = self.tile(level, span.index, done=not span.beyond)
                if tile is None:  # sparse TIFF: tile never written
                    out[span.rows, span.cols] = background
                else:
                    out[span.rows, span.cols] = tile[span.tile_rows, span.tile_cols]
                del tile  # held over the next call, its memory could not take the next tile
            return out
        # Decoding into one reused buffer avoids a fresh allocation (and its page faults) per
        # tile, which costs about as much as decoding a well-compressed tile.
        scratch = self._scratch.get((page.tilelength, page.tilewidth))
        if scratch is None:
            scratch = self._scratch[(page.tilelength, page.tilewidth)] = np.empty(
                (page.tilelength, page.tilewidth, 3), dtype=np.uint8)
        for span in spans:
            tile = self.decode(level, span.index, out=scratch)
            if tile is None:
                out[span.rows, span.cols] = background
            else:
                out[span.rows, span.cols] = tile[span.tile_rows, span.tile_cols]
        return out

    def clear(self) -> None:
        """Drop the cached tiles and zero the counts."""
        self._cache.clear()
        self._done.clear()
        self._cached_bytes = self.tiles_decoded = self.tiles_reused = 0

    def close(self) -> None:
        self.clear()
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
    def tile_reader(self) -> TiffTileReader | None:
        """The direct tile reader in use (:meth:`use_direct_tiles`), or None: OpenSlide reads."""
        return self._tiles

    @property
    def tile_counts(self) -> TileCounts:
        """Tiles decoded and served from the cache since the slide opened, by the direct tile
        reader (reads through OpenSlide are not counted)."""
        return self._tiles.counts if self._tiles is not None else TileCounts(0, 0, 0, 0)

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

    def direct_position(self, x: int, y: int, level: int) -> tuple[int, int] | None:
        """Where the direct tile reader reads ``level`` at level-0 (x, y), in that level's pixels;
        None where OpenSlide reads it (no direct reader or level, or a position off the level's
        pixel grid, where OpenSlide resamples by a sub-pixel shift whose pixels only it gives)."""
        if self._tiles is None or level not in self._tiles.pages:
            return None
        ds = self.level_downsamples[level]
        if not ((x / ds).is_integer() and (y / ds).is_integer()):
            return None
        return int(x / ds), int(y / ds)

    def read_region(self, x: int, y: int, level: int, size: tuple[int, int]) -> np.ndarray:
        """RGB uint8 [h, w, 3] of a region at ``level`` with level-0 top-left (x, y).

        Transparent pixels (outside the scanned area) are filled with the slide's background
        colour. May be read-only: a view of the tile cache.
        """
        position = self.direct_position(x, y, level)
        if position is not None:
            try:
                return self._tiles.read(level, *position, int(size[0]), int(size[1]), self.background)
            except Exception as exc:  # imagecodecs.JpegError, OSError
                raise SlideDataError(
                    f"slide {self.slide_id!r} ({self.path}): tiles fail to decode ({exc}); "
                    "the file is corrupt or truncated: re-export or re-copy it, or remove it from the sheet"
                ) from None
        try:
            rgba = self._osr.read_region((int(x), int(y)), int(level), (int(size[0]), int(size[1])))
        except Exception as exc:  # openslide.OpenSlideError and friends
            raise SlideDataError(
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
        if choice.size % out_size == 0:  # integer shrink: the same box filter, three times faster
            return np.asarray(Image.fromarray(region).reduce(choice.size // out_size))
        bilinear = choice.size < out_size
        patch = resample_exactly(region, out_size, bilinear)
        if patch is not None:
            return patch
        resample = Image.Resampling.BILINEAR if bilinear else Image.Resampling.BOX
        return np.asarray(Image.fromarray(region).resize((out_size, out_size), resample))

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
    def use_direct_tiles(self, tile_cache_mb: float = DEFAULT_TILE_CACHE_MB) -> bool:
        """Read tiled JPEG TIFF levels without OpenSlide when that gives OpenSlide's pixels,
        keeping up to ``tile_cache_mb`` MB of decoded tiles (:class:`TiffTileReader`).

        Returns whether the direct reader is in use. The check decodes one tile-sized region
        of the finest direct level both ways; JPEG decoders may differ by a grey level or so.
        """
        if self.vendor not in TiffTileReader.VENDORS:
            return False
        try:
            reader = TiffTileReader(self.path, self.level_dimensions, tile_cache_mb)
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
        reader.clear()  # a slide opens with an empty cache and zero counts
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


@functools.lru_cache(maxsize=64)
def pil_resample_weights(in_size: int, out_size: int, bilinear: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's fixed-point weights for resizing ``in_size`` px to ``out_size`` along one axis
    with its BOX filter (BILINEAR if ``bilinear``), as ``Image.resize`` computes them.

    Returns ``(first, weights)``: int64 [out_size] and int64 [out_size, taps]; output pixel j is
    ``clip((sum_t weights[j, t] * in[first[j] + t] + 2**21) >> 22, 0, 255)``, weights past a
    window's end being 0. Pillow resizes rows first, rounding to uint8, then columns.
    """
    # Resample.c's precompute_coeffs and normalize_coeffs_8bpc, the same floating-point steps
    # in the same order, so that every weight is Pillow's to the bit.
    scale = float(in_size) / out_size
    filterscale = max(scale, 1.0)
    support = (1.0 if bilinear else 0.5) * filterscale
    taps = int(math.ceil(support)) * 2 + 1
    ss = 1.0 / filterscale
    first = np.zeros(out_size, np.int64)
    weights = np.zeros((out_size, taps), np.int64)
    for j in range(out_size):
        center = (j + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        count = min(int(center + support + 0.5), in_size) - xmin
        w = []
        for x in range(count):
            arg = (x + xmin - center + 0.5) * ss
            w.append(max(0.0, 1.0 - abs(arg)) if bilinear else (1.0 if -0.5 < arg <= 0.5 else 0.0))
        total = 0.0
        for v in w:
            total += v
        for x, v in enumerate(w):
            k = v / total if total != 0.0 else v
            weights[j, x] = int(0.5 + k * (1 << PIL_PRECISION_BITS))  # weights are >= 0
        first[j] = xmin
    first.flags.writeable = weights.flags.writeable = False  # shared by every caller (lru_cache)
    return first, weights


def resample_exactly(region: np.ndarray, out_size: int, bilinear: bool = False) -> np.ndarray | None:
    """``Image.resize`` of a square RGB uint8 region to ``out_size`` px (BOX, or BILINEAR), pixel
    for pixel, when nearly every output row and column is one input row or column (257 px to
    256, as a 20x patch of a 0.499 µm/px slide): those are copied, a few are weighted. None
    otherwise, Pillow being faster then.

    Pillow's resize costs about three JPEG tile decodes for a 257-px patch; this, a few copies.
    """
    plan = _resample_plan(region.shape[0], out_size, bilinear)
    if plan is None:
        return None
    rows = _resample_axis(region, plan, out_size, axis=1)  # Pillow's order: rows first
    return _resample_axis(rows, plan, out_size, axis=0)


@functools.lru_cache(maxsize=64)
def _resample_plan(in_size: int, out_size: int, bilinear: bool) -> list[tuple] | None:
    """Runs of output lines that copy consecutive input lines, ``(j, k, first)``, and lines
    that weigh input lines, ``(j, first, weights)``; None when too many weigh."""
    first, weights = pil_resample_weights(in_size, out_size, bilinear)
    copies = (weights[:, 0] == 1 << PIL_PRECISION_BITS) & (weights[:, 1:] == 0).all(1)
    if out_size - copies.sum() > _ARITHMETIC_LINES:
        return None
    plan, j = [], 0
    while j < out_size:
        if copies[j]:
            k = j + 1
            while k < out_size and copies[k] and first[k] == first[k - 1] + 1:
                k += 1
            plan.append((j, k, int(first[j])))
            j = k
        else:
            taps = int(np.flatnonzero(weights[j]).max()) + 1
            plan.append((j, int(first[j]), weights[j, :taps].astype(np.int32).reshape(taps, 1, 1)))
            j += 1
    return plan


def _resample_axis(src: np.ndarray, plan: list[tuple], out_size: int, axis: int) -> np.ndarray:
    shape = list(src.shape)
    shape[axis] = out_size
    out = np.empty(shape, np.uint8)
    s, o = np.swapaxes(src, 0, axis), np.swapaxes(out, 0, axis)
    for step in plan:
        if isinstance(step[2], int):
            j, k, first = step
            o[j:k] = s[first : first + k - j]
        else:
            j, first, weights = step
            # int32 holds the sum, and no clipping is needed: the weights are >= 0 and sum to
            # 2**22 give or take a few, so the result stays within 0..255
            acc = (s[first : first + len(weights)] * weights).sum(0, dtype=np.int32)
            o[j] = (acc + (1 << (PIL_PRECISION_BITS - 1))) >> PIL_PRECISION_BITS
    return out


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
    path: str | os.PathLike,
    slide_id: str | None = None,
    mpp: float | None = None,
    direct_tiles: bool = True,
    tile_cache_mb: float = DEFAULT_TILE_CACHE_MB,
) -> Slide:
    """Open a whole-slide image.

    Args:
        path: any file OpenSlide opens (svs, ndpi, tiff, mrxs, scn, bif, dicom, ...).
        slide_id: name used in messages (default: the file's stem).
        mpp: level-0 µm/px; overrides the file's value (the sheet's ``mpp`` column).
        direct_tiles: decode tiled JPEG TIFF levels without OpenSlide where that gives the
            same pixels (:class:`TiffTileReader`); False always reads through OpenSlide.
        tile_cache_mb: MB of decoded tiles the direct reader keeps for this slide, in this
            process (:data:`DEFAULT_TILE_CACHE_MB`); 0 keeps none. Pixels are the same either way.

    Raises:
        MsamilError: the file is missing or unopenable, or neither the file nor ``mpp`` gives µm/px.
    """
    import openslide

    path = Path(path)
    slide_id = slide_id or path.stem
    tile_cache_bytes(tile_cache_mb)  # a bad budget fails before any work
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
        slide.use_direct_tiles(tile_cache_mb)
    return slide


class OpenSlides:
    """Open slides for a reader that visits many (end-to-end training, its validation and K
    study): at most ``capacity`` are open at once, and opening one more closes the least recently
    read, so file handles and OpenSlide's caches stay bounded whatever the cohort's size.

    A copy made by pickling (a DataLoader worker's) starts empty and opens its own handles: each
    reading process holds at most ``capacity`` slides. Each open slide keeps up to
    ``tile_cache_mb`` MB of decoded tiles (:func:`open_slide`), so a reading process holds at
    most ``capacity * tile_cache_mb`` MB of them.
    """

    def __init__(self, capacity: int = 8, direct_tiles: bool = True, tile_cache_mb: float = DEFAULT_TILE_CACHE_MB):
        if int(capacity) < 1:
            raise MsamilError(f"open_slides (slides kept open at once) must be at least 1, got {capacity}")
        tile_cache_bytes(tile_cache_mb)
        self.capacity, self.direct_tiles, self.tile_cache_mb = int(capacity), direct_tiles, tile_cache_mb
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
        slide = self._slides[key] = open_slide(path, slide_id, mpp, self.direct_tiles, self.tile_cache_mb)
        return slide

    def __len__(self) -> int:
        return len(self._slides)

    def close(self) -> None:
        while self._slides:
            self._slides.popitem(last=False)[1].close()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_slides": OrderedDict()}
