"""Patch grids: exact mask fractions, nesting of 20x/10x/5x, the HDF5 layout."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from msamil_core.wsi.coords import make_grid, make_grids, read_coords, write_coords
from msamil_core.wsi.geometry import area_fractions
from msamil_core.wsi.slide import open_slide
from msamil_core.wsi.tissue import tissue_mask


def test_area_fractions_match_brute_force():
    rng = np.random.default_rng(0)
    mask = rng.random((37, 53)) > 0.6
    fine = np.kron(mask, np.ones((8, 8), bool))  # 1/8-px supersampling of the same mask
    boxes = []
    for _ in range(200):
        x0, y0 = rng.integers(0, 50 * 8), rng.integers(0, 34 * 8)
        w, h = rng.integers(1, 24), rng.integers(1, 24)
        boxes.append((x0, y0, min(x0 + w, 53 * 8), min(y0 + h, 37 * 8)))
    boxes = np.array(boxes)
    expected = np.array([fine[y0:y1, x0:x1].mean() for x0, y0, x1, y1 in boxes])
    got = area_fractions(mask, boxes / 8.0)
    np.testing.assert_allclose(got, expected, atol=1e-9)


def test_grids_nest_and_cover_whole_slide():
    mask = np.ones((300, 400), bool)
    grids = make_grids(mask, (4000, 3000), mpp=0.5, patch_size=256)
    c20, c10, c5 = (grids[s].coords for s in ("20x", "10x", "5x"))
    assert [grids[s].attrs["patch_size_level0"] for s in ("20x", "10x", "5x")] == [256, 512, 1024]
    assert len(c20) == (4000 // 256) * (3000 // 256)
    assert len(c5) == (4000 // 1024) * (3000 // 1024)
    set20, set10 = {tuple(c) for c in c20}, {tuple(c) for c in c10}
    for x, y in c5:
        inside20 = [(x + i * 256, y + j * 256) for i in range(4) for j in range(4)]
        inside10 = [(x + i * 512, y + j * 512) for i in range(2) for j in range(2)]
        assert all(p in set20 for p in inside20)
        assert all(p in set10 for p in inside10)
    # every patch lies wholly inside the slide
    for s, step in (("20x", 256), ("10x", 512), ("5x", 1024)):
        c = grids[s].coords
        assert (c >= 0).all() and (c[:, 0] + step <= 4000).all() and (c[:, 1] + step <= 3000).all()


def test_threshold_keeps_exactly_the_covered_patches():
    mask = np.zeros((100, 100), bool)
    mask[:, :35] = True  # left 35 % of a 1000-px slide
    grid = make_grid(mask, (1000, 1000), mpp=0.5, magnification=20, patch_size=100, min_fraction=0.7)
    # columns 0..2 are fully covered, column 3 (300-400) is half covered: 0.5 < 0.7
    assert sorted({int(x) for x in grid.coords[:, 0]}) == [0, 100, 200]
    grid = make_grid(mask, (1000, 1000), mpp=0.5, magnification=20, patch_size=100, min_fraction=0.5)
    assert sorted({int(x) for x in grid.coords[:, 0]}) == [0, 100, 200, 300]
    assert np.all(grid.fractions >= 0.5)


def test_hdf5_layout_round_trip_and_empty(tmp_path):
    mask = np.zeros((50, 50), bool)
    grid = make_grid(mask, (2000, 2000), mpp=0.25, magnification=10, patch_size=512, name="s 1")
    assert grid.coords.shape == (0, 2)
    write_coords(tmp_path / "e.h5", grid.coords, grid.attrs)
    with h5py.File(tmp_path / "e.h5") as f:
        assert f["coords"].shape == (0, 2) and f["coords"].dtype == np.int64
        for key in (
            "patch_size",
            "patch_size_level0",
            "level0_magnification",
            "target_magnification",
            "overlap",
            "level0_width",
            "level0_height",
            "name",
        ):
            assert key in f["coords"].attrs
    coords, attrs = read_coords(tmp_path / "e.h5")
    assert coords.shape == (0, 2)
    assert attrs["patch_size_level0"] == 2048 and attrs["target_magnification"] == 10
    assert attrs["level0_magnification"] == pytest.approx(40.0)
    assert attrs["name"] == "s 1"


def test_cmu_coordinates_at_all_three_scales(cmu_slide, tmp_path):
    with open_slide(cmu_slide) as s:
        mask = tissue_mask(s.read_thumbnail(1024))
        # the tissue is a narrow strip: at 0.7 no 1026-px 5x patch is covered enough
        strict = make_grids(mask, s.dimensions, s.mpp, patch_size=256, min_fraction=0.7, name="cmu")
        grids = make_grids(mask, s.dimensions, s.mpp, patch_size=256, min_fraction=0.4, name="cmu")
    assert len(strict["20x"].coords) < len(grids["20x"].coords)
    for scale, grid in grids.items():
        assert len(grid.coords) > 0, scale
        write_coords(tmp_path / f"{scale}.h5", grid.coords, grid.attrs)
        coords, attrs = read_coords(tmp_path / f"{scale}.h5")
        np.testing.assert_array_equal(coords, grid.coords)
        assert attrs["patch_size"] == 256
    assert len(grids["20x"].coords) > len(grids["10x"].coords) > len(grids["5x"].coords)
