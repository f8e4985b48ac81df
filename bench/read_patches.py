"""Patch reading speed: our reader against a naive level-0 read, and against raw JPEG decoding.

For every 20x, 10x and 5x patch of a grid over a multi-level tiled TIFF (by default a slide of
the synthetic demo cohort), it times

- ours:  ``Slide.read_patch`` (coarsest sufficient pyramid level, tiles decoded directly
         where the file allows, then resize);
- ours via OpenSlide: the same level choice, every read through OpenSlide;
- naive: OpenSlide ``read_region`` of the whole patch at level 0, then the same resize;
- raw:   decoding, straight from the file's bytes with imagecodecs, the JPEG tiles that our
         reader's level needs for the patch: no OpenSlide, no compositing, no resize. This is
         what the CPU must do at the least, the physical limit of the machine.

and prints patches/s for each and the ratios ours/naive (goal >= 4 at 5x) and raw/ours (goal
<= 3). Single process, one thread: the figures are per core. OpenSlide's tile cache is turned
off (0 bytes) so that no reader is helped by tiles decoded for the previous patch.

Then, per scale, a whole pass over the grid in raster order (rows top to bottom, each left to
right: the order of coordinates files), timed three ways, interleaved in rotating order, best
of ``--repeats``:

- ours:      ``Slide.read_patch`` on a freshly opened slide (empty tile cache, default budget);
- no cache:  the same with ``tile_cache_mb=0`` (the reader before the cache);
- tile-once: decoding each distinct tile the pass touches exactly once, straight from the file
             (imagecodecs, a fresh output array per tile as the cache needs): the least work
             a pass can do;

and prints ours/tile-once (goal >= 0.8) with the tiles ours decoded against the distinct tiles.

    python bench/read_patches.py                      # a demo slide, 512-px patches
    python bench/read_patches.py --slide my.tiff --patch-size 256 --max-patches 100
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from msamil_core.wsi.geometry import MAGNIFICATIONS, patch_size_level0
from msamil_core.wsi.slide import open_slide


def demo_slide(out_dir: Path) -> Path:
    """The first slide of the demo cohort, generated into ``out_dir``."""
    from msamil_core.cohort.demo import cohort_table, generate_cohort

    first = cohort_table(n_slides=30, seed=0).iloc[0]["slide_id"]
    table = generate_cohort(out_dir, n_slides=30, seed=0, slide_ids=[first])
    return Path(table.loc[table["slide_id"] == first, "path"].iloc[0])


class RawTiles:
    """Decode a TIFF level's JPEG tiles straight from the file (the lower bound on work)."""

    def __init__(self, path: Path):
        import tifffile

        self._tif = tifffile.TiffFile(path)
        self._fd = os.open(path, os.O_RDONLY)
        self.pages = {}
        for page in self._tif.pages:
            if page.is_tiled and page.compression == 7:  # JPEG
                self.pages[(page.imagewidth, page.imagelength)] = page

    def page_for(self, dims: tuple[int, int]):
        page = self.pages.get(tuple(dims))
        if page is None:
            raise SystemExit(f"no JPEG-tiled TIFF page of size {dims}: raw decoding needs a tiled JPEG TIFF/SVS")
        return page

    def tiles_under(self, page, x: int, y: int, size: int) -> list[int]:
        """Indices of the tiles of ``page`` that a size x size region at (x, y) touches."""
        tw, th = page.tilewidth, page.tilelength
        across = (page.imagewidth + tw - 1) // tw
        return [ty * across + tx
                for ty in range(y // th, min((y + size - 1) // th, (page.imagelength - 1) // th) + 1)
                for tx in range(x // tw, min((x + size - 1) // tw, across - 1) + 1)]

    def decode(self, page, index: int) -> None:
        import imagecodecs

        data = os.pread(self._fd, page.databytecounts[index], page.dataoffsets[index])
        # Aperio's untransformed RGB tiles, as the slide reader decodes them
        options = {"colorspace": "RGB", "outcolorspace": "RGB"} if page.photometric == 2 else {}
        imagecodecs.jpeg8_decode(data, tables=page.jpegtables, **options)

    def decode_region(self, page, x: int, y: int, size: int) -> int:
        """Decode every tile of ``page`` that a size x size region at (x, y) touches; returns the count."""
        tiles = self.tiles_under(page, x, y, size)
        for i in tiles:
            self.decode(page, i)
        return len(tiles)

    def close(self):
        os.close(self._fd)
        self._tif.close()


def grid(dims: tuple[int, int], step: int, limit: int | None = None, rng: np.random.Generator | None = None) -> np.ndarray:
    """Top-left corners of the patches of side ``step`` in raster order; at most ``limit``, drawn by ``rng``."""
    w, h = dims
    xs, ys = np.meshgrid(np.arange(w // step) * step, np.arange(h // step) * step)
    coords = np.stack([xs.ravel(), ys.ravel()], 1)
    if limit is not None and len(coords) > limit:
        coords = coords[np.sort(rng.choice(len(coords), limit, replace=False))]
    return coords


def raster_pass(args, raw: RawTiles, mag: int) -> str:
    """One line of the whole-pass table for ``mag``: ours, ours without cache and tile-once, each
    timed ``args.repeats`` times, interleaved so that a busy spell slows all three alike; the
    best time of each counts."""
    import openslide

    def ours(tile_cache_mb=None):
        # a fresh slide per pass: an empty cache, as a pass over one slide starts
        kwargs = {} if tile_cache_mb is None else {"tile_cache_mb": tile_cache_mb}
        slide = open_slide(args.slide, mpp=args.mpp, **kwargs)
        slide._osr.set_cache(openslide.OpenSlideCache(0))
        t = time.perf_counter()
        for x, y in coords:
            slide.read_patch(int(x), int(y), size0, out)
        seconds = time.perf_counter() - t
        counts = slide.tile_counts
        slide.close()
        return seconds, counts.decoded

    def tile_once():
        t = time.perf_counter()
        for i in distinct:
            raw.decode(page, i)
        return time.perf_counter() - t, len(distinct)

    out = args.patch_size
    with open_slide(args.slide, mpp=args.mpp) as slide:
        size0 = patch_size_level0(out, mag, slide.mpp)
        choice = slide.best_level(size0, out)
        coords = grid(slide.dimensions, size0)
        page = raw.page_for(slide.level_dimensions[choice.level])
    if len(coords) == 0:
        return f"{mag:>4}x  slide smaller than one patch"
    distinct = dict.fromkeys(i for x, y in coords for i in raw.tiles_under(
        page, int(x / choice.downsample), int(y / choice.downsample), choice.size))
    runs = [("ours", ours), ("plain", lambda: ours(0)), ("once", tile_once)]
    best = {}
    for r in range(args.repeats):
        # each reader runs in every place of the order: a run's speed depends on the one
        # before it (the heap it leaves, the caches), by up to a quarter here
        for name, run in runs[r % 3 :] + runs[: r % 3]:
            seconds, decoded = run()
            best[name] = min(best.get(name, (np.inf, 0)), (seconds, decoded))
    rate = {name: len(coords) / seconds for name, (seconds, _) in best.items()}
    return (f"{mag:>4}x {choice.level:>5} {choice.size:>5} {len(coords):>5} {len(distinct):>6} {best['ours'][1]:>7} "
            f"{rate['ours']:>8.1f} {rate['plain']:>9.1f} {rate['once']:>11.1f} {rate['ours'] / rate['once']:>14.2f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slide", type=Path, help="multi-level tiled JPEG TIFF/SVS (default: a demo slide)")
    parser.add_argument("--mpp", type=float, help="level-0 µm/px when the file has none")
    parser.add_argument("--patch-size", type=int, default=512, help="px at each magnification (default 512)")
    parser.add_argument("--max-patches", type=int, default=200, help="patches per scale, sampled from the grid")
    parser.add_argument("--max-naive", type=int, default=40, help="patches per scale for the slow naive reader")
    parser.add_argument("--repeats", type=int, default=6, help="whole passes timed per reader (best kept)")
    args = parser.parse_args(argv)

    import openslide

    tmp = None
    if args.slide is None:
        tmp = tempfile.TemporaryDirectory()
        args.slide = demo_slide(Path(tmp.name))
    rng = np.random.default_rng(0)
    no_cache = openslide.OpenSlideCache(0)
    slide = open_slide(args.slide, mpp=args.mpp)
    via_openslide = open_slide(args.slide, mpp=args.mpp, direct_tiles=False)
    for s in (slide, via_openslide):
        s._osr.set_cache(no_cache)
    raw = RawTiles(args.slide)
    out = args.patch_size
    print(f"slide {args.slide.name}: {slide.dimensions[0]}x{slide.dimensions[1]} px, mpp {slide.mpp:.3f}, "
          f"levels {[round(d, 2) for d in slide.level_downsamples]}; patches of {out} px, 1 thread; "
          f"direct tile decoding: {'yes' if slide._tiles is not None else 'no (OpenSlide only)'}")
    print(f"{'scale':>5} {'level0 px':>9} {'level':>5} {'n':>4} {'ours/s':>8} {'ours-OS/s':>9} {'naive/s':>8} "
          f"{'raw/s':>8} {'tiles/patch':>11} {'ours/naive':>10} {'raw/ours':>8}")
    for mag in MAGNIFICATIONS:
        size0 = patch_size_level0(out, mag, slide.mpp)
        coords = grid(slide.dimensions, size0, args.max_patches, rng)
        if len(coords) == 0:
            print(f"{mag:>4}x  slide smaller than one patch")
            continue
        choice = slide.best_level(size0, out)

        def rate(reader, coords) -> float:
            t = time.perf_counter()
            for x, y in coords:
                reader(int(x), int(y))
            return len(coords) / (time.perf_counter() - t)

        def naive_read(x, y):
            region = np.asarray(via_openslide._osr.read_region((x, y), 0, (size0, size0)).convert("RGB"))
            return np.asarray(Image.fromarray(region).resize((out, out), Image.Resampling.BOX))

        ours = rate(lambda x, y: slide.read_patch(x, y, size0, out), coords)
        ours_os = rate(lambda x, y: via_openslide.read_patch(x, y, size0, out), coords)
        naive = rate(naive_read, coords[: args.max_naive])

        page = raw.page_for(slide.level_dimensions[choice.level])
        tiles = 0
        t = time.perf_counter()
        for x, y in coords:
            lx, ly = int(x / choice.downsample), int(y / choice.downsample)
            tiles += raw.decode_region(page, lx, ly, choice.size)
        raw_rate = len(coords) / (time.perf_counter() - t)
        print(f"{mag:>4}x {size0:>9} {choice.level:>5} {len(coords):>4} {ours:>8.1f} {ours_os:>9.1f} {naive:>8.1f} {raw_rate:>8.1f} "
              f"{tiles / len(coords):>11.1f} {ours / naive:>10.2f} {raw_rate / ours:>8.2f}")
    print(f"\nwhole pass in raster order, best of {args.repeats}; ours/tile-once: goal >= 0.8")
    print(f"{'scale':>5} {'level':>5} {'read':>5} {'n':>5} {'tiles':>6} {'decoded':>7} {'ours/s':>8} "
          f"{'no-cache/s':>9} {'tile-once/s':>11} {'ours/tile-once':>14}")
    for mag in MAGNIFICATIONS:
        print(raster_pass(args, raw, mag))
    raw.close()
    slide.close()
    via_openslide.close()
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
