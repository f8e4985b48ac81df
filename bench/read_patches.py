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

    def decode_region(self, page, x: int, y: int, size: int) -> int:
        """Decode every tile of ``page`` that a size x size region at (x, y) touches; returns the count."""
        import imagecodecs

        tw, th = page.tilewidth, page.tilelength
        across = (page.imagewidth + tw - 1) // tw
        n = 0
        for ty in range(y // th, min((y + size - 1) // th, (page.imagelength - 1) // th) + 1):
            for tx in range(x // tw, min((x + size - 1) // tw, across - 1) + 1):
                i = ty * across + tx
                data = os.pread(self._fd, page.databytecounts[i], page.dataoffsets[i])
                imagecodecs.jpeg8_decode(data, tables=page.jpegtables)
                n += 1
        return n

    def close(self):
        os.close(self._fd)
        self._tif.close()


def grid(dims: tuple[int, int], step: int, limit: int, rng: np.random.Generator) -> np.ndarray:
    w, h = dims
    xs, ys = np.meshgrid(np.arange(w // step) * step, np.arange(h // step) * step)
    coords = np.stack([xs.ravel(), ys.ravel()], 1)
    if len(coords) > limit:
        coords = coords[np.sort(rng.choice(len(coords), limit, replace=False))]
    return coords


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slide", type=Path, help="multi-level tiled JPEG TIFF/SVS (default: a demo slide)")
    parser.add_argument("--mpp", type=float, help="level-0 µm/px when the file has none")
    parser.add_argument("--patch-size", type=int, default=512, help="px at each magnification (default 512)")
    parser.add_argument("--max-patches", type=int, default=200, help="patches per scale, sampled from the grid")
    parser.add_argument("--max-naive", type=int, default=40, help="patches per scale for the slow naive reader")
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
    raw.close()
    slide.close()
    via_openslide.close()
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
