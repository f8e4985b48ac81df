"""Time and peak memory of the per-slide steps on huge slides.

Writes a single-level and a pyramidal JPEG-tiled TIFF of 150,000 x 100,000 px (default), each
repeating one 1024-px tile (msamil_core.cohort.demo.write_repeated_tile_tiff: seconds and about
250 MB of disk each), then runs, each in its own process, the steps the workflow runs on a
slide: ``msamil thumbnail``, ``msamil tissue``, ``msamil coords`` (20x/10x/5x tissue grids) and
reading patches (``Slide.read_patch`` at 20x, 10x and 5x), and prints wall seconds and the
peak RSS of each process. The thumbnail is compared with a reference downsample of the
repeated tile (mean absolute difference in grey levels; goal < 2). Goal: every step < 2 GB.

    python bench/big_slide.py
    python bench/big_slide.py --size 40960 30720 --kinds single
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TILE = 1024
MPP = 0.25
PYRAMID = (1, 4, 16)
N_PATCHES = 200

READ_PATCHES = """
import sys
import h5py
from msamil_core.wsi.slide import open_slide
slide_path, n = sys.argv[1], int(sys.argv[2])
with open_slide(slide_path, "big", None) as slide:
    for scale in sys.argv[3:]:
        with h5py.File(scale) as f:
            coords = f["coords"][:n]
            size = int(f["coords"].attrs["patch_size_level0"])
        for x, y in coords:
            slide.read_patch(int(x), int(y), size, 256)
"""


def test_tile() -> np.ndarray:
    """A 1024-px tile: background and two tissue-coloured squares, on a 512-px grid so that every
    level down to 1/64 keeps the edges on the 8-px JPEG block grid (no ringing)."""
    tile = np.full((TILE, TILE, 3), 240, np.uint8)
    tile[:512, :512] = (200, 120, 170)
    tile[512:, 512:] = (150, 80, 140)
    return tile


def write_slide(path: Path, kind: str, size: tuple[int, int]) -> None:
    from msamil_core.cohort.demo import write_repeated_tile_tiff

    write_repeated_tile_tiff(path, size, test_tile(), mpp=MPP, downsamples=PYRAMID if kind == "pyramid" else (1,))


def reference_thumbnail(size: tuple[int, int], thumb_size: tuple[int, int]) -> np.ndarray:
    """The box-filtered thumbnail of the repeated tile, computed without reading the slide: each
    thumbnail pixel is the mean of the tiled image over its level-0 footprint (separable, as
    row and column weights folded onto one tile)."""
    w, h = size
    tw, th = thumb_size
    sx, sy = w / tw, h / th
    rows = _band_means(np.arange(th) * sy, np.arange(1, th + 1) * sy)
    cols = _band_means(np.arange(tw) * sx, np.arange(1, tw + 1) * sx)
    by_rows = np.einsum("ir,rck->ick", rows, test_tile().astype(np.float64))
    return np.einsum("jc,ick->ijk", cols, by_rows)


def _band_means(a0: np.ndarray, a1: np.ndarray) -> np.ndarray:
    """[n, TILE] weights: the share of tile row (or column) r in the level-0 interval [a0, a1)
    of the tiled image (areas folded onto one tile), each row summing to 1."""
    weights = np.zeros((len(a0), TILE))
    edges = np.arange(TILE + 1)
    for i, (lo, hi) in enumerate(zip(a0, a1)):
        start, stop = int(np.floor(lo)), int(np.ceil(hi))
        for base in range(start - start % TILE, stop, TILE):
            left = np.clip(edges[:-1] + base, lo, hi)
            right = np.clip(edges[1:] + base, lo, hi)
            weights[i] += right - left
    return weights / weights.sum(1, keepdims=True)


def run_step(argv: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS MB) of one process."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{out[-3000:]}")
    return time.perf_counter() - start, usage.ru_maxrss / 1024


def run_steps(slide: Path, out: Path) -> dict[str, tuple[float, float]]:
    """Each per-slide step in a process of its own: step -> (seconds, peak RSS MB)."""
    msamil = [sys.executable, "-m", "msamil_core"]
    coords = {scale: out / f"{scale}.h5" for scale in ("20x", "10x", "5x")}
    steps = {
        "thumbnail": [*msamil, "thumbnail", "--slide", str(slide), "--slide-id", "big", "--long-side", "1024",
                      "--out", str(out / "thumbnail.png"), "--meta", str(out / "meta.json")],
        "tissue": [*msamil, "tissue", "--thumbnail", str(out / "thumbnail.png"), "--slide-id", "big",
                   "--out", str(out / "tissue_mask.png")],
        "coords": [*msamil, "coords", "--meta", str(out / "meta.json"), "--tissue-mask", str(out / "tissue_mask.png"),
                   "--patch-size", "256", *[a for scale, path in coords.items()
                                            for a in ("--strategy-out", f"tissue:{scale}={path}")]],
        "patches": [sys.executable, "-c", READ_PATCHES, str(slide), str(N_PATCHES), *map(str, coords.values())],
    }
    return {name: run_step(argv) for name, argv in steps.items()}


def thumbnail_difference(out: Path, size: tuple[int, int]) -> float:
    from PIL import Image

    thumb = np.asarray(Image.open(out / "thumbnail.png").convert("RGB")).astype(np.float64)
    ref = reference_thumbnail(size, (thumb.shape[1], thumb.shape[0]))
    return float(np.abs(thumb - ref).mean())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, nargs=2, default=[150_000, 100_000], metavar=("W", "H"))
    parser.add_argument("--kinds", nargs="+", default=["single", "pyramid"], choices=["single", "pyramid"])
    args = parser.parse_args(argv)
    size = tuple(args.size)
    with tempfile.TemporaryDirectory(prefix="msamil-big-") as tmp:
        for kind in args.kinds:
            root = Path(tmp) / kind
            root.mkdir()
            slide = root / "big.tiff"
            start = time.perf_counter()
            write_slide(slide, kind, size)
            print(f"{kind}: {size[0]} x {size[1]} px written in {time.perf_counter() - start:.1f} s "
                  f"({slide.stat().st_size / 1e6:.0f} MB)", flush=True)
            for step, (seconds, rss) in run_steps(slide, root).items():
                print(f"  {step:10s} {seconds:8.1f} s  peak RSS {rss:7.0f} MB", flush=True)
            print(f"  thumbnail vs reference downsample: mean |difference| "
                  f"{thumbnail_difference(root, size):.2f} grey levels", flush=True)
            slide.unlink()


if __name__ == "__main__":
    main()
