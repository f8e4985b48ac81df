"""Patches decoded and resized on a torch device against Slide.read_patch.

On the CPU the two give the same pixels: torchvision's decode_jpeg and imagecodecs both run
libjpeg-turbo with its defaults, and the device resize repeats Pillow's integer arithmetic.
The bound both devices must hold is the one open_slide allows the direct tile reader against
OpenSlide, a mean of one grey level (DECODE_TOLERANCE): nvJPEG on CUDA rounds its IDCT and
chroma upsampling differently from libjpeg-turbo.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from msamil_core.wsi import device_decode
from msamil_core.wsi.device_decode import DECODE_TOLERANCE, DeviceDecodeUnsupported, read_patches, supports_device_decode
from msamil_core.wsi.geometry import MAGNIFICATIONS, patch_size_level0
from msamil_core.wsi.slide import open_slide

# torchvision 0.29 deprecates its image codecs in favour of TorchCodec; decode_jpeg is still the
# pinned version's batched (nvJPEG) decoder
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")

# (slide, sheet mpp): CMU-1-Small-Region is one level of 240-px Aperio RGB tiles at 0.499
# µm/px (box filter 257 -> 256, 514 -> 256, 1028 -> 256); at 0.6 its 20x patches are enlarged
# (bilinear 213 -> 256). The demo slide has 256-px YCbCr tiles at downsamples 1, 4, 16 (no
# resize, Image.reduce by 2, or at 0.49 µm/px the box filter from level 0 and level 1).
CASES = [("cmu", None), ("cmu", 0.6), ("demo", None), ("demo", 0.49)]


@pytest.fixture(scope="module")
def demo_slide(tmp_path_factory) -> Path:
    """The first slide of the demo cohort, small (64-px nests: 2048 x 1536 px, 3 levels)."""
    from msamil_core.cohort.demo import cohort_table, generate_cohort

    first = cohort_table(n_slides=30, seed=0).iloc[0]["slide_id"]
    table = generate_cohort(tmp_path_factory.mktemp("demo"), n_slides=30, seed=0, patch_size=64, slide_ids=[first])
    return Path(table["path"].iloc[0])


def batch(slide, size0: int, n: int, rng) -> np.ndarray:
    """Patch corners: on the grid inside the slide, partly outside it, and off the grid of a
    coarse level (where read_patch asks OpenSlide)."""
    w, h = slide.dimensions
    on_grid = np.stack([rng.integers(0, w // size0, n), rng.integers(0, h // size0, n)], 1) * size0
    outside = np.array([[-size0 // 3, -size0 // 2], [w - size0 // 2, h - size0 // 4]])
    off_grid = on_grid[:1] + [[3, 1]]
    return np.concatenate([on_grid, outside, off_grid])


def compare(path: Path, mpp, device: str) -> None:
    rng = np.random.default_rng(0)
    with open_slide(path, mpp=mpp) as slide:
        for mag in MAGNIFICATIONS:
            size0 = patch_size_level0(256, mag, slide.mpp)
            coords = batch(slide, size0, 1 if mag == 5 else 3, rng)
            got = read_patches(slide, coords, size0, 256, device)
            assert got.shape == (len(coords), 256, 256, 3) and got.dtype == torch.uint8 and got.device.type == device
            expected = np.stack([slide.read_patch(int(x), int(y), size0, 256) for x, y in coords])
            diff = np.abs(got.cpu().numpy().astype(np.int16) - expected)
            assert diff.mean() <= DECODE_TOLERANCE, (mag, diff.mean())
            if device == "cpu":
                # the same decoder and Pillow's arithmetic: the same pixels
                np.testing.assert_array_equal(got.numpy(), expected)


@pytest.mark.parametrize("name, mpp", CASES)
def test_device_patches_are_read_patch_s_on_the_cpu(name, mpp, cmu_slide, demo_slide):
    path = cmu_slide if name == "cmu" else demo_slide
    with open_slide(path) as slide:
        assert supports_device_decode(slide, "cpu")
    compare(path, mpp, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("name, mpp", CASES)
def test_device_patches_are_read_patch_s_on_cuda(name, mpp, cmu_slide, demo_slide):
    path = cmu_slide if name == "cmu" else demo_slide
    with open_slide(path) as slide:
        supported = supports_device_decode(slide, "cuda")
    if name == "cmu" and not supported:
        # nvJPEG ignoring the Adobe segment of Aperio RGB tiles is refused, not decoded wrong
        with open_slide(path) as slide, pytest.raises(DeviceDecodeUnsupported, match="RGB"):
            read_patches(slide, [[0, 0]], 256, 256, "cuda")
        return
    assert supported
    compare(path, mpp, "cuda")


def test_each_distinct_tile_of_a_batch_is_decoded_once(cmu_slide, monkeypatch):
    import torchvision.io

    decoded = []
    real = torchvision.io.decode_jpeg

    def counting(data, **kwargs):
        decoded.extend(data)
        return real(data, **kwargs)

    with open_slide(cmu_slide) as slide:
        supports_device_decode(slide, "cpu")  # its check decodes a tile of its own
        monkeypatch.setattr(torchvision.io, "decode_jpeg", counting)
        # four 257-px patches in a square: 16 tile reads, 9 distinct tiles
        coords = [[257, 514], [514, 514], [257, 771], [514, 771]]
        read_patches(slide, coords, 257, 256, "cpu")
        assert len(decoded) == 9
        assert sum(len(slide.tile_reader.tile_spans(0, x, y, 257, 257)) for x, y in coords) == 16


def test_aperio_rgb_tiles_decode_wrong_without_the_adobe_segment_and_are_refused(cmu_slide, monkeypatch):
    """decode_jpeg takes the untransformed R, G, B of Aperio's tiles for Y, Cb, Cr unless an
    Adobe APP14 segment says otherwise; a decoder that still does is caught and refused."""
    monkeypatch.setattr(device_decode, "_ADOBE_RGB", b"")
    with open_slide(cmu_slide) as slide:
        assert not supports_device_decode(slide, "cpu")
        with pytest.raises(DeviceDecodeUnsupported, match=r"slide 'CMU-1-Small-Region'.*RGB.*read_patch"):
            read_patches(slide, [[0, 0]], 256, 256, "cpu")


def test_slides_openslide_reads_are_refused(ndpi_slide, cmu_slide):
    with open_slide(ndpi_slide) as slide:
        assert not supports_device_decode(slide, "cpu")
        with pytest.raises(DeviceDecodeUnsupported, match="OpenSlide"):
            read_patches(slide, [[0, 0]], 512, 256, "cpu")
    if not torch.cuda.is_available():
        with open_slide(cmu_slide) as slide:
            assert not supports_device_decode(slide)  # CUDA by default
