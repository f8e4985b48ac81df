"""The direct tile reader's cache of decoded tiles: same pixels, each tile decoded once per pass."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from msamil_core.errors import MsamilError
from msamil_core.wsi.geometry import MAGNIFICATIONS, patch_size_level0
from msamil_core.wsi.slide import OpenSlides, open_slide


def raster_pass(slide, size0: int, out: int) -> tuple[list[np.ndarray], set[int]]:
    """Every patch of the slide's grid, in the order coordinates files list them (rows top to
    bottom, each left to right), and the tiles of the level read that the pass touches."""
    w, h = slide.dimensions
    choice = slide.best_level(size0, out)
    patches, touched = [], set()
    for y in range(0, h - size0 + 1, size0):
        for x in range(0, w - size0 + 1, size0):
            patches.append(slide.read_patch(x, y, size0, out))
            lx, ly = round(x / choice.downsample), round(y / choice.downsample)
            touched.update(s.index for s in slide.tile_reader.tile_spans(choice.level, lx, ly, choice.size, choice.size))
    return patches, touched


def row_mb(slide, level: int = 0) -> float:
    """MB of one row of decoded tiles of ``level``."""
    page = slide.tile_reader.pages[level]
    across = -(-page.imagewidth // page.tilewidth)
    return across * page.tilewidth * page.tilelength * 3 / 2**20


@pytest.mark.parametrize("magnification", MAGNIFICATIONS)
def test_a_raster_pass_decodes_each_tile_once_with_a_budget_of_two_rows(cmu_slide, magnification):
    # CMU-1-Small-Region: one level of 240-px tiles, 10 a row; a 256-px 20x patch spans 257
    # level-0 px, so neighbouring patches share tiles at every scale
    with open_slide(cmu_slide, tile_cache_mb=0) as plain, open_slide(cmu_slide) as probe:
        cached = open_slide(cmu_slide, tile_cache_mb=2 * row_mb(probe))
        size0 = patch_size_level0(256, magnification, plain.mpp)
        expected, _ = raster_pass(plain, size0, 256)
        got, touched = raster_pass(cached, size0, 256)
        assert cached.tile_counts.decoded == len(touched)  # each tile once
        # without a cache every patch decodes all its tiles again
        assert plain.tile_counts.decoded > len(touched) and plain.tile_counts.cached_bytes == 0
        cached.close()
    for a, b in zip(expected, got):
        np.testing.assert_array_equal(a, b)
    assert cached.tile_counts.decoded == 0  # closing drops the cache and its counts


def test_counts_of_a_pass(cmu_slide):
    with open_slide(cmu_slide) as slide:
        assert slide.tile_counts.decoded == slide.tile_counts.reused == 0  # the open check leaves none
        size0 = patch_size_level0(256, 20, slide.mpp)
        patches, touched = raster_pass(slide, size0, 256)
        counts = slide.tile_counts
        assert counts.decoded == len(touched) == 108
        assert counts.decoded + counts.reused == sum(
            len(slide.tile_reader.tile_spans(0, x, y, size0, size0))
            for y in range(0, 2967 - size0 + 1, size0) for x in range(0, 2220 - size0 + 1, size0)
        )
        # the pass keeps about the row of tiles the next row of patches reads again, not all it read
        assert counts.cached_bytes <= 2 * 10 * 240 * 240 * 3 and counts.budget_bytes == 256 * 2**20


def test_a_small_budget_gives_the_same_pixels(cmu_slide, tmp_path):
    """Regions on and off the tile grid, partly outside the image, through a cache of two tiles
    that must let tiles go all the time."""
    from conftest import write_pyramid_tiff

    rng = np.random.default_rng(0)
    image = np.repeat(np.repeat((rng.random((96, 128, 3)) * 255).astype(np.uint8), 8, 0), 8, 1)
    for path in (cmu_slide, write_pyramid_tiff(tmp_path / "p.tiff", image, levels=3)):
        with open_slide(path, tile_cache_mb=0) as plain, open_slide(path, tile_cache_mb=0.4) as cached:
            w, h = plain.dimensions
            for _ in range(40):
                level = int(rng.integers(0, plain.level_count))
                ds = plain.level_downsamples[level]
                x, y = int(rng.integers(-40, w - 50)), int(rng.integers(-40, h - 50))
                x, y = (x, y) if rng.random() < 0.3 else (round(x // ds * ds), round(y // ds * ds))
                size = (int(rng.integers(1, 600)), int(rng.integers(1, 600)))
                np.testing.assert_array_equal(cached.read_region(x, y, level, size), plain.read_region(x, y, level, size))
            assert cached.tile_counts.cached_bytes <= 0.4 * 2**20


def test_cached_tiles_cannot_be_written_through_a_region(cmu_slide):
    with open_slide(cmu_slide) as slide:
        region = slide.read_region(240, 480, 0, (100, 120))  # inside one tile: a view of the cached tile
        assert not region.flags.writeable
        with pytest.raises(ValueError):
            region[0, 0] = 0


def test_a_region_a_caller_holds_keeps_its_pixels_when_its_tile_is_let_go(cmu_slide):
    """The cache decodes new tiles into the memory of tiles it lets go, but never into one a
    caller still holds a view of."""
    with open_slide(cmu_slide, tile_cache_mb=0.4) as slide:  # two tiles
        held = slide.read_region(0, 0, 0, (240, 240))
        expected = held.copy()
        for x in range(240, 2160, 240):  # whole tiles the cache lets go at once
            slide.read_region(x, 0, 0, (240, 240))
        assert slide.tile_counts.decoded == 9
        np.testing.assert_array_equal(held, expected)


def test_each_process_has_its_own_cache(cmu_slide):
    slides = OpenSlides(capacity=2, tile_cache_mb=8)
    slide = slides.get(cmu_slide)
    slide.read_patch(0, 0, 512, 256)
    assert slide.tile_counts.decoded == 9 and slide.tile_counts.budget_bytes == 8 * 2**20
    copy = pickle.loads(pickle.dumps(slides))  # what a DataLoader worker gets
    assert len(copy) == 0 and copy.tile_cache_mb == 8
    assert copy.get(cmu_slide).tile_counts.decoded == 0
    copy.close()
    slides.close()


@pytest.mark.parametrize("budget", [-1, float("nan"), None])
def test_a_bad_budget_fails_before_any_work(cmu_slide, budget):
    with pytest.raises(MsamilError, match="tile_cache_mb"):
        open_slide(cmu_slide, tile_cache_mb=budget)
    with pytest.raises(MsamilError, match="tile_cache_mb"):
        OpenSlides(tile_cache_mb=budget)


@pytest.mark.parametrize("size, out", [(257, 256), (258, 256), (513, 512), (255, 256), (253, 256), (225, 224), (514, 256)])
def test_resizes_without_pillow_give_pillows_pixels(size, out):
    from PIL import Image

    from msamil_core.wsi.slide import resample_exactly

    region = np.random.default_rng(size).integers(0, 256, (size, size, 3), dtype=np.uint8)
    bilinear = size < out
    filt = Image.Resampling.BILINEAR if bilinear else Image.Resampling.BOX
    expected = np.asarray(Image.fromarray(region).resize((out, out), filt))
    got = resample_exactly(region, out, bilinear)
    if size == 514 or bilinear:  # every output pixel weighs several input pixels: left to Pillow
        assert got is None
    else:
        np.testing.assert_array_equal(got, expected)
