"""Shared test fixtures: the real slides in ../shared/data and small slides made on the fly."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "rules"))  # rules/workflow_config.py, which tests import as `workflow_config`
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


def write_pyramid_tiff(path: Path, image: np.ndarray, mpp: float = 0.5, levels: int = 3) -> Path:
    """A pyramidal JPEG-tiled TIFF (downsamples 1, 2, 4, ...) that OpenSlide opens as
    generic-tiff with the given µm/px; the demo cohort's writer."""
    from msamil_core.cohort.demo import write_pyramid_tiff as write

    path.parent.mkdir(parents=True, exist_ok=True)
    write(path, image, mpp=mpp, downsamples=tuple(2**i for i in range(levels)))
    return path


@pytest.fixture
def blank_slide(tmp_path) -> Path:
    """A real pyramidal slide of empty glass (no tissue)."""
    rng = np.random.default_rng(0)
    glass = np.clip(242 + rng.normal(0, 2, size=(1024, 1536, 3)), 0, 255).astype(np.uint8)
    return write_pyramid_tiff(tmp_path / "blank.tiff", glass)
