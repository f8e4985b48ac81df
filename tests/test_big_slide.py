"""Huge slides in bounded memory: thumbnail, tissue mask, coordinates and patch reading of a
150,000 x 100,000 px pyramidal TIFF and of a single-level one (smaller here, to stay fast: its
every pixel is decoded for the thumbnail; bench/big_slide.py runs the full size), each step in a
process of its own whose peak RSS is measured. The slides repeat one tile (seconds to write)."""

from __future__ import annotations

import sys

import h5py
import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import big_slide  # noqa: E402

LIMIT_MB = 2000


@pytest.mark.parametrize(
    "kind, size",
    [
        ("pyramid", (150_000, 100_000)),
        # 1.26 Gpx in one level: read whole, as RGBA, it would take 5 GB
        ("single", (40_960, 30_720)),
    ],
)
def test_huge_slide_steps_stay_under_2_gb(tmp_path, kind, size):
    slide = tmp_path / "big.tiff"
    big_slide.write_slide(slide, kind, size)
    steps = big_slide.run_steps(slide, tmp_path)
    assert set(steps) == {"thumbnail", "tissue", "coords", "patches"}
    for step, (seconds, rss_mb) in steps.items():
        assert rss_mb < LIMIT_MB, (kind, step, rss_mb)
    assert big_slide.thumbnail_difference(tmp_path, size) < 2.0
    with h5py.File(tmp_path / "20x.h5") as f:  # half the slide is tissue: a full-size grid came out
        assert len(f["coords"]) > 0.4 * (size[0] // (256 * 2)) * (size[1] // (256 * 2))
