"""Shared test fixtures: the real slides in ../shared/data and small slides made on the fly."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MSAMIL_SHARED_DATA", REPO.parent / "shared" / "data"))
SLIDES = SHARED_DATA / "slides"


def shared_slide(name: str) -> Path:
    path = SLIDES / name
    if not path.exists():
        pytest.fail(f"test data missing: {path} (../shared/data must sit beside the repository)")
    return path


@pytest.fixture
def cmu_slide() -> Path:
    return shared_slide("CMU-1-Small-Region.svs")


@pytest.fixture
def ndpi_slide() -> Path:
    return shared_slide("test3-DAPI-2-(387).ndpi")


def write_pyramid_tiff(path: Path, image: np.ndarray, mpp: float = 0.5, levels: int = 3, tile: int = 256) -> Path:
    """A pyramidal tiled JPEG TIFF that OpenSlide opens as generic-tiff with the given µm/px."""
    import tifffile
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    px_per_cm = 1e4 / mpp
    with tifffile.TiffWriter(path, bigtiff=False) as tif:
        img = image
        for level in range(levels):
            scale = 2**level
            tif.write(
                img,
                tile=(tile, tile),
                compression="jpeg",
                photometric="rgb",
                resolution=(px_per_cm / scale, px_per_cm / scale),
                resolutionunit="CENTIMETER",
                subfiletype=0 if level == 0 else 1,
            )
            h, w = img.shape[:2]
            img = np.asarray(Image.fromarray(img).resize((max(1, w // 2), max(1, h // 2)), Image.Resampling.BOX))
    return path


@pytest.fixture
def blank_slide(tmp_path) -> Path:
    """A real pyramidal slide of empty glass (no tissue)."""
    rng = np.random.default_rng(0)
    glass = np.clip(242 + rng.normal(0, 2, size=(1024, 1536, 3)), 0, 255).astype(np.uint8)
    return write_pyramid_tiff(tmp_path / "blank.tiff", glass)
