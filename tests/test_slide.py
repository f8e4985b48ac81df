"""Slide access on real files: µm/px, errors for bad input, pyramid level choice."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import shared_slide
from msamil_core.errors import MsamilError
from msamil_core.wsi.geometry import MAGNIFICATIONS, magnification_mpp, patch_size_level0, scale_index
from msamil_core.wsi.slide import open_slide


def test_mpp_from_file_and_sheet_override(cmu_slide):
    with open_slide(cmu_slide) as s:
        assert s.mpp == pytest.approx(0.499)
        assert s.mpp_source == "file"
        assert s.vendor == "aperio"
        assert s.dimensions == (2220, 2967)
    with open_slide(cmu_slide, mpp=0.25) as s:
        assert s.mpp == 0.25
        assert s.mpp_source == "sheet"


def test_magnification_is_defined_by_mpp():
    assert [magnification_mpp(m) for m in MAGNIFICATIONS] == [0.5, 1.0, 2.0]
    assert magnification_mpp(20, base_mpp=0.25) == 0.25
    assert [scale_index(s) for s in ("20x", "10x", "5x", 20, 10.0, 5)] == [0, 1, 2, 0, 1, 2]
    with pytest.raises(MsamilError, match="unknown scale"):
        scale_index("40x")


@pytest.mark.parametrize(
    "name, message",
    [
        ("boxes.tiff", r"slide 'boxes'.*`mpp` column"),
        ("unopenable.tiff", r"slide 'unopenable'.*OpenSlide cannot open"),
        ("does-not-exist.svs", r"slide 'does-not-exist'.*file not found.*`path`"),
    ],
)
def test_bad_slides_fail_with_a_message_naming_the_slide_and_the_fix(name, message):
    path = shared_slide("CMU-1-Small-Region.svs").parent / name
    with pytest.raises(MsamilError, match=message) as info:
        open_slide(path)
    assert "\n" not in str(info.value)


def test_slide_without_mpp_opens_with_the_sheet_value():
    with open_slide(shared_slide("boxes.tiff"), mpp=0.5) as s:
        assert s.mpp == 0.5


def test_undecodable_tiles_fail_when_read():
    with open_slide(shared_slide("unreadable.svs")) as s:
        with pytest.raises(MsamilError, match=r"slide 'unreadable'.*fail to decode"):
            s.read_patch(0, 0, 16, 16)


def test_ndpi_patch_sizes_follow_the_file_mpp(ndpi_slide):
    with open_slide(ndpi_slide) as s:
        assert s.mpp == pytest.approx(0.2282, abs=1e-4)
        assert s.level_count == 7
        size20 = patch_size_level0(512, 20, s.mpp)
        assert size20 == round(512 * 0.5 / s.mpp)
        assert patch_size_level0(512, 10, s.mpp) == 2 * size20
        assert patch_size_level0(512, 5, s.mpp) == 4 * size20
        # µm covered by the patch: 512 px at 0.5, 1.0, 2.0 µm/px, up to rounding at 20x
        for mag in MAGNIFICATIONS:
            um = patch_size_level0(512, mag, s.mpp) * s.mpp
            assert um == pytest.approx(512 * magnification_mpp(mag), rel=2e-3)


def test_ndpi_patches_are_read_from_coarse_levels(ndpi_slide):
    with open_slide(ndpi_slide) as s:
        c20 = s.best_level(patch_size_level0(512, 20, s.mpp), 512)
        c10 = s.best_level(patch_size_level0(512, 10, s.mpp), 512)
        c5 = s.best_level(patch_size_level0(512, 5, s.mpp), 512)
        assert c20.downsample >= 2 and c10.downsample >= 4 and c5.downsample >= 8
        # ...and never coarser than the output needs
        for c, mag in ((c20, 20), (c10, 10), (c5, 5)):
            assert c.downsample <= magnification_mpp(mag) / s.mpp
            assert c.size >= 512


def test_read_patch_equals_the_region_of_the_chosen_level_resized(ndpi_slide):
    from PIL import Image

    with open_slide(ndpi_slide) as s:
        size0 = patch_size_level0(256, 5, s.mpp)
        x, y = 1000, 1200
        patch = s.read_patch(x, y, size0, 256)
        assert patch.shape == (256, 256, 3) and patch.dtype == np.uint8
        choice = s.best_level(size0, 256)
        region = s.read_region(x, y, choice.level, (choice.size, choice.size))
        expected = np.asarray(Image.fromarray(region).resize((256, 256), Image.Resampling.BOX))
        np.testing.assert_array_equal(patch, expected)
        # and it shows the same place as a level-0 read of the same area (up to the scanner's
        # own downsampling and JPEG): strongly correlated, and not correlated when shifted
        level0 = np.asarray(Image.fromarray(s.read_region(x, y, 0, (size0, size0))).resize((256, 256), Image.Resampling.BOX))
        corr = np.corrcoef(patch.astype(float).ravel(), level0.astype(float).ravel())[0, 1]
        shifted = np.corrcoef(patch[:, 32:].astype(float).ravel(), level0[:, :-32].astype(float).ravel())[0, 1]
        assert corr > 0.9 and shifted < corr - 0.3


def test_thumbnail_keeps_aspect(cmu_slide, ndpi_slide):
    with open_slide(cmu_slide) as s:
        t = s.read_thumbnail(1024)
        assert t.shape == (1024, round(2220 * 1024 / 2967), 3)
    with open_slide(ndpi_slide) as s:
        t = s.read_thumbnail(512)
        assert max(t.shape[:2]) == 512
        assert t.shape[1] / t.shape[0] == pytest.approx(3968 / 4864, rel=1e-2)


@pytest.mark.parametrize("name", ["cmu", "pyramid"])
def test_direct_tile_reads_equal_openslide(name, cmu_slide, tmp_path):
    from conftest import write_pyramid_tiff

    if name == "cmu":
        path = cmu_slide
    else:
        rng = np.random.default_rng(0)
        small = (rng.random((96, 128, 3)) * 255).astype(np.uint8)
        from PIL import Image

        path = write_pyramid_tiff(tmp_path / "p.tiff", np.asarray(Image.fromarray(small).resize((1024, 768), Image.Resampling.BICUBIC)), levels=3)
    fast, plain = open_slide(path), open_slide(path, direct_tiles=False)
    assert fast._tiles is not None and plain._tiles is None
    rng = np.random.default_rng(1)
    w, h = fast.dimensions
    for _ in range(30):
        level = int(rng.integers(0, fast.level_count))
        x, y = int(rng.integers(-40, w - 50)), int(rng.integers(-40, h - 50))  # on and off the level grid, and outside
        size = (int(rng.integers(1, 300)), int(rng.integers(1, 300)))
        np.testing.assert_array_equal(fast.read_region(x, y, level, size), plain.read_region(x, y, level, size))


def test_formats_without_tiled_jpeg_pages_use_openslide(ndpi_slide):
    with open_slide(ndpi_slide) as s:
        assert s._tiles is None  # NDPI: JPEG strips with restart markers, not TIFF tiles
    with open_slide(shared_slide("boxes.tiff"), mpp=0.5) as s:
        assert s._tiles is None  # deflate-compressed tiles
