"""Tissue masks: real H&E and fluorescence thumbnails, ink and artefacts, empty glass."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from msamil_core.wsi.slide import open_slide
from msamil_core.wsi.masks import load_mask, save_mask
from msamil_core.settings import TissueSettings
from msamil_core.wsi.tissue import is_fluorescence, otsu_threshold, tissue_mask


def test_cmu_mask_covers_tissue_not_glass(cmu_slide):
    with open_slide(cmu_slide) as s:
        rgb = s.read_thumbnail(1024)
    mask = tissue_mask(rgb)
    sat = np.asarray(Image.fromarray(rgb).convert("HSV"))[..., 1] / 255.0
    glass = (rgb.min(axis=2) > 225) & (sat < 0.04)
    stained = (sat > 0.3) & (rgb.max(axis=2) > 100)
    assert glass.sum() > 0.3 * rgb[..., 0].size  # the slide is mostly glass
    assert mask[glass].mean() < 0.03
    assert mask[stained].mean() > 0.95
    assert 0.15 < mask.mean() < 0.6


def test_ink_and_dark_artefacts_are_removed():
    rng = np.random.default_rng(1)
    rgb = np.full((300, 400, 3), 240, np.uint8)
    yy, xx = np.mgrid[:300, :400]
    tissue = (yy - 150) ** 2 / 90**2 + (xx - 200) ** 2 / 150**2 < 1
    rgb[tissue] = (np.array([205, 120, 180]) + rng.normal(0, 8, (tissue.sum(), 3))).clip(0, 255)
    blue_ink = (np.abs(yy - 40) < 6) & (xx > 30) & (xx < 370)
    rgb[blue_ink] = (40, 70, 170)
    green_ink = (np.abs(xx - 30) < 5) & (yy > 80) & (yy < 280)
    rgb[green_ink] = (60, 150, 90)
    dust = (yy - 260) ** 2 + (xx - 350) ** 2 < 12**2
    rgb[dust] = (20, 20, 25)
    mask = tissue_mask(rgb)
    assert mask[tissue].mean() > 0.97
    for artefact in (blue_ink, green_ink, dust):
        assert mask[artefact].mean() < 0.05
    kept = tissue_mask(rgb, TissueSettings(remove_pen=False))
    assert kept[blue_ink].mean() > 0.5  # the filter, not the threshold, removed the ink


def test_fluorescence_is_detected_and_masked(ndpi_slide):
    with open_slide(ndpi_slide) as s:
        rgb = s.read_thumbnail(512)
    assert is_fluorescence(rgb)
    mask = tissue_mask(rgb)
    bright = rgb.max(axis=2) > 120
    assert mask[bright].mean() > 0.9
    assert 0.2 < mask.mean() < 0.95


def test_empty_glass_has_no_tissue(blank_slide):
    with open_slide(blank_slide) as s:
        rgb = s.read_thumbnail(256)
    assert not is_fluorescence(rgb)
    assert tissue_mask(rgb).mean() < 1e-3


def test_otsu_separates_two_modes():
    values = np.concatenate([np.full(500, 0.2), np.full(500, 0.7)])
    assert 0.2 < otsu_threshold(values) <= 0.7


def test_mask_png_round_trip(tmp_path):
    mask = np.zeros((20, 30), bool)
    mask[5:15, 3:9] = True
    save_mask(tmp_path / "m.png", mask)
    raw = np.asarray(Image.open(tmp_path / "m.png"))
    assert set(np.unique(raw)) == {0, 255}
    np.testing.assert_array_equal(load_mask(tmp_path / "m.png"), mask)
    assert [p.name for p in tmp_path.iterdir()] == ["m.png"]  # no temporary left behind


def test_unreadable_mask_is_a_clear_error(tmp_path):
    from msamil_core.errors import MsamilError

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(MsamilError, match="bad.png"):
        load_mask(bad)


def test_outputs_get_the_umask_mode_not_mkstemp_s(tmp_path):
    import os
    import stat

    save_mask(tmp_path / "m.png", np.ones((4, 4), bool))
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "m.png").stat().st_mode) == 0o666 & ~umask
