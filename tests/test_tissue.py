"""Tissue masks: real H&E and fluorescence thumbnails, ink and artefacts, empty glass."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage as ndi

from msamil_core.cli import main
from msamil_core.wsi.slide import open_slide
from msamil_core.wsi.masks import load_mask, save_mask
from msamil_core.settings import TissueSettings
from msamil_core.wsi.thumbnail import thumbnail_and_meta, thumbnail_mpp
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


def test_cmu_mask_keeps_the_tissue(cmu_slide, tmp_path):
    # Nuclei, keratin and the gaps between collagen bundles are tissue: the mask has no holes to
    # speak of, one outline in QuPath instead of hundreds, and the 20x patches that need them.
    d = tmp_path
    scales = ("20x", "10x", "5x")
    outs = [a for m in scales for a in ("--strategy-out", f"tissue:{m}={d / m}.h5")]
    assert main(["preprocess", "--slide", str(cmu_slide), "--slide-id", "cmu", "--thumbnail", str(d / "thumbnail.png"),
                 "--meta", str(d / "meta.json"), "--tissue-mask", str(d / "tissue_mask.png"), "--patch-size", "256",
                 *outs, "--geojson", str(d / "patches.geojson")]) == 0
    mask = load_mask(d / "tissue_mask.png")
    holes = ndi.binary_fill_holes(mask) & ~mask
    assert holes.sum() < 0.01 * mask.sum()
    features = json.loads((d / "patches.geojson").read_text())["features"]
    tissue = [f for f in features if f["properties"]["classification"]["name"] == "Tissue"]
    assert 1 <= len(tissue) <= 20
    with h5py.File(d / "20x.h5") as f:
        assert len(f["coords"]) >= 25
    rgb = np.asarray(Image.open(d / "thumbnail.png").convert("RGB"))
    sat = np.asarray(Image.fromarray(rgb).convert("HSV"))[..., 1] / 255.0
    dark_stained = (rgb.max(axis=2) < 64) & (sat > 0.4)  # dense nuclei, keratin
    assert dark_stained.sum() > 5000
    assert mask[dark_stained].mean() > 0.95


def test_holes_are_filled_by_physical_area():
    # 2 µm per thumbnail px: a 5,000 µm² gap (a fat cell) is tissue, a 45,000 µm² lumen is not,
    # whatever the thumbnail's size; dark purple nuclei are tissue, not artefacts.
    rng = np.random.default_rng(2)
    rgb = np.full((600, 600, 3), 240, np.uint8)
    yy, xx = np.mgrid[:600, :600]
    tissue = (yy - 300) ** 2 + (xx - 300) ** 2 < 260**2
    small = (yy - 150) ** 2 + (xx - 300) ** 2 < 20**2  # 1,257 px = 5,000 µm²
    lumen = (yy - 350) ** 2 + (xx - 300) ** 2 < 60**2  # 11,300 px = 45,000 µm²
    nuclei = tissue & ((yy % 12 < 4) & (xx % 12 < 4)) & ~small & ~lumen
    rgb[tissue] = (np.array([205, 120, 180]) + rng.normal(0, 8, (tissue.sum(), 3))).clip(0, 255)
    rgb[nuclei] = (55, 25, 85)
    rgb[small | lumen] = 240
    mask = tissue_mask(rgb, mpp=2.0)
    assert mask[small].all() and mask[nuclei].all()
    assert not mask[lumen].any()
    assert mask[tissue & ~lumen].mean() > 0.99
    assert TissueSettings().min_object_area <= 0.7 * (256 * 0.5) ** 2  # no piece that could hold a 20x patch is dropped


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


def test_fluorescence_mask_covers_the_stroma(ndpi_slide):
    # The DAPI slide's stroma holds few nuclei but glows a few grey levels above the glass
    # (local brightness 6-30 against 2-4): it is tissue, and the glass stays out.
    with open_slide(ndpi_slide) as s:
        rgb, meta = thumbnail_and_meta(s, 1024)
    mask = tissue_mask(rgb, mpp=thumbnail_mpp(meta))
    local = ndi.uniform_filter(rgb.max(axis=2).astype(np.float32), 9)
    stroma = (local > 6) & (local < 30)
    assert stroma.mean() > 0.3
    assert mask[stroma].mean() > 0.95
    assert mask[local < 4].mean() < 0.01
    h, w = mask.shape
    assert mask[int(0.15 * h) : int(0.24 * h), int(0.54 * w) : int(0.72 * w)].mean() > 0.95  # stroma, few nuclei
    assert mask[int(0.97 * h) :].mean() < 0.05  # glass below the section
    assert 0.7 < mask.mean() < 0.9


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


def test_tissue_areas_need_the_thumbnails_own_meta(cmu_slide, tmp_path):
    from msamil_core.errors import MsamilError
    from msamil_core.pipeline import make_tissue_mask

    thumb = tmp_path / "cmu" / "thumbnail.png"
    assert main(["thumbnail", "--slide", str(cmu_slide), "--out", str(thumb), "--meta", str(thumb.with_name("meta.json")),
                 "--long-side", "256"]) == 0
    Image.open(thumb).resize((96, 128)).save(thumb)  # meta.json beside it describes 192 x 256
    with pytest.raises(MsamilError, match="another size.*rerun the thumbnail step"):
        make_tissue_mask(thumb, tmp_path / "mask.png")
    assert not (tmp_path / "mask.png").exists()
