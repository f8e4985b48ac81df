"""Patches decoded on a torch device: each distinct JPEG tile of a batch decoded once there
(``torchvision.io.decode_jpeg``; nvJPEG on CUDA), then pasted and resized there.

For a slide that :class:`~msamil_core.wsi.slide.TiffTileReader` reads, the tiles' JPEG streams
are read from the file and completed: TIFF tiles are mostly abbreviated streams, so the page's
JPEGTables are spliced in (the tables without their end marker, then the tile without its start
marker), and tiles of photometric RGB (Aperio) get an Adobe APP14 segment with colour transform
0, without which a decoder takes their untransformed R, G, B for Y, Cb, Cr. Whether a decoder
honours that is checked, not assumed: :func:`supports_device_decode` decodes one tile of each
level on the device and compares it with the CPU reader's.

Resizing repeats what :meth:`Slide.read_patch` does on the CPU, in Pillow's integer arithmetic:
``Image.reduce`` for an integer shrink, ``Image.resize`` (box filter when shrinking, bilinear
when enlarging) otherwise. torch's own filters are not Pillow's: ``interpolate``'s area mode
averages whole pixels (257 px to 256 averages neighbours in pairs) and its antialiased bilinear
weighs a triangle twice as wide as the box. On the CPU this module gives ``read_patch``'s pixels
exactly (torchvision's and imagecodecs' libjpeg-turbo decode alike); on CUDA nvJPEG may differ
from libjpeg-turbo by a grey level or so.

Patches this path cannot decode (a level OpenSlide reads, a position off the level's pixel
grid) are read by ``read_patch`` and moved to the device; patches partly outside the image get
the slide's background colour, as on the CPU.
"""

from __future__ import annotations

import weakref

import numpy as np
import torch

from ..errors import MsamilError, SlideDataError
from .slide import PIL_PRECISION_BITS, Slide, TiffTileReader, pil_resample_weights

# An Adobe APP14 segment saying that the three components are not colour-transformed (RGB).
_ADOBE_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"
_SOI, _EOI = b"\xff\xd8", b"\xff\xd9"
# Mean absolute difference (grey levels) a device decode may have from the CPU reader's, the
# tolerance open_slide allows the direct reader against OpenSlide.
DECODE_TOLERANCE = 1.0
# int32 bytes of regions resized at once (a batch of 5x regions is resized in parts)
_RESIZE_BYTES = 1 << 28

# reader -> {device: why it cannot decode there, "" when it can}
_support: weakref.WeakKeyDictionary[TiffTileReader, dict[str, str]] = weakref.WeakKeyDictionary()


class DeviceDecodeUnsupported(MsamilError):
    """A slide whose tiles cannot be decoded on the device: read it with ``Slide.read_patch``."""


def supports_device_decode(slide: Slide, device: str | torch.device = "cuda") -> bool:
    """Whether :func:`read_patches` decodes this slide's tiles on ``device``: the slide is read
    by the direct tile reader, and ``decode_jpeg`` there gives the CPU reader's pixels (within
    :data:`DECODE_TOLERANCE`) for one tile of each of its levels. Checked once per open slide
    and device; False where the device is missing."""
    return not _unsupported(slide, torch.device(device))


def read_patches(slide: Slide, coords, patch_size_level0, out_size: int,
                 device: str | torch.device = "cuda") -> torch.Tensor:
    """Square patches as RGB uint8 [B, out_size, out_size, 3] on ``device``, as
    :meth:`Slide.read_patch` reads them one by one.

    Args:
        slide: an open slide, read by the direct tile reader (:func:`supports_device_decode`).
        coords: int [B, 2], level-0 top-left (x, y) of each patch.
        patch_size_level0: int or int [B], each patch's side in level-0 px.
        out_size: side of the patches returned, px.
        device: where tiles are decoded and patches made.

    Raises:
        DeviceDecodeUnsupported: the slide's tiles do not decode on ``device``.
    """
    device = torch.device(device)
    reason = _unsupported(slide, device)
    if reason:
        raise DeviceDecodeUnsupported(
            f"slide {slide.slide_id!r} ({slide.path}): {reason}; read its patches with Slide.read_patch"
        )
    reader = slide.tile_reader
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    sizes = np.broadcast_to(np.asarray(patch_size_level0, dtype=np.int64), (len(coords),))
    out = torch.empty((len(coords), out_size, out_size, 3), dtype=torch.uint8, device=device)
    direct = []  # (patch, level, region side, spans)
    for i, ((x, y), size0) in enumerate(zip(coords.tolist(), sizes.tolist())):
        choice = slide.best_level(size0, out_size)
        position = slide.direct_position(x, y, choice.level)
        if position is None:
            patch = slide.read_patch(x, y, size0, out_size)
            out[i] = torch.from_numpy(np.require(patch, np.uint8, ["C_CONTIGUOUS", "WRITEABLE"])).to(device)
            continue
        spans = reader.tile_spans(choice.level, *position, choice.size, choice.size)
        inside = len(spans) > 0 and sum(
            (s.rows.stop - s.rows.start) * (s.cols.stop - s.cols.start) for s in spans) == choice.size**2
        direct.append((i, choice.level, choice.size, spans, inside))
    try:
        tiles = _decode_tiles(reader, {(level, s.index) for _, level, _, spans, _ in direct for s in spans}, device)
    except RuntimeError as exc:  # torchvision's decoders on a corrupt tile
        raise SlideDataError(
            f"slide {slide.slide_id!r} ({slide.path}): tiles fail to decode on {device} ({exc}); "
            "the file is corrupt or truncated: re-export or re-copy it, or remove it from the sheet"
        ) from None
    background = torch.tensor(slide.background, dtype=torch.uint8, device=device).view(3, 1, 1)
    by_size: dict[int, list] = {}
    for i, level, size, spans, inside in direct:
        region = torch.empty((3, size, size), dtype=torch.uint8, device=device)
        if not inside:
            region[:] = background  # the region reaches past the image
        for s in spans:
            tile = tiles.get((level, s.index))
            region[:, s.rows, s.cols] = background if tile is None else tile[:, s.tile_rows, s.tile_cols]
        by_size.setdefault(size, []).append((i, region))
    for size, items in by_size.items():
        step = max(1, _RESIZE_BYTES // (3 * size * size * 4))
        for k in range(0, len(items), step):
            part = items[k : k + step]
            patches = resize_like_pillow(torch.stack([r for _, r in part]), out_size)
            out[[i for i, _ in part]] = patches.permute(0, 2, 3, 1)
    return out


def resize_like_pillow(regions: torch.Tensor, out_size: int) -> torch.Tensor:
    """Square regions uint8 [N, 3, S, S] to [N, 3, out_size, out_size] as ``read_patch`` resizes
    them with Pillow, in Pillow's integer arithmetic: ``Image.reduce`` when ``out_size`` divides
    S, else ``Image.resize`` with its box filter (bilinear when enlarging), rows then columns,
    each pass rounded to uint8."""
    size = regions.shape[-1]
    if size == out_size:
        return regions
    if size % out_size == 0:
        # Reduce.c: ((sum + n/2) * multiplier) >> 24, multiplier computed in float32
        f = size // out_size
        sums = torch.nn.functional.avg_pool2d(regions.float(), f, divisor_override=1)  # exact below 2**24
        multiplier = int(np.float32(2.0**32) / np.float32(256 * f * f))
        return (((sums.long() + f * f // 2) * multiplier) >> 24).to(torch.uint8)
    bilinear = size < out_size
    first, weights = pil_resample_weights(size, out_size, bilinear)
    taps = np.minimum(first[:, None] + np.arange(weights.shape[1]), size - 1)  # weights past a window are 0
    taps = torch.from_numpy(taps).to(regions.device)
    weights = torch.from_numpy(weights.astype(np.int32)).to(regions.device)
    x = regions.to(torch.int32)
    for dim in (-1, -2):  # Pillow's order: along rows, then along columns
        # int32 holds the sums: weights >= 0, summing to about 2**22
        acc = torch.full((), 1 << (PIL_PRECISION_BITS - 1), dtype=torch.int32, device=regions.device)
        for t in range(weights.shape[1]):
            w = weights[:, t] if dim == -1 else weights[:, t, None]
            acc = acc + x.index_select(dim, taps[:, t]) * w
        x = (acc >> PIL_PRECISION_BITS).clamp_(0, 255)
    return x.to(torch.uint8)


def _unsupported(slide: Slide, device: torch.device) -> str:
    """Why ``slide``'s tiles cannot be decoded on ``device``; empty when they can."""
    reader = slide.tile_reader
    if reader is None:
        return "it is read through OpenSlide (no tiled JPEG TIFF levels whose pixels match OpenSlide's)"
    known = _support.setdefault(reader, {})
    if str(device) not in known:
        known[str(device)] = _check_decoder(reader, device)
    return known[str(device)]


def _check_decoder(reader: TiffTileReader, device: torch.device) -> str:
    """Decode one written tile of each level on ``device`` and compare it with the CPU reader's."""
    if device.type == "cuda" and not torch.cuda.is_available():
        return "CUDA is not available here"
    for level, page in reader.pages.items():
        written = np.flatnonzero(np.asarray(page.databytecounts))
        if len(written) == 0:
            continue
        index = int(written[len(written) // 2])
        try:
            ours = _decode_tiles(reader, {(level, index)}, device)[(level, index)]
        except Exception as exc:  # RuntimeError from torchvision's decoders
            return f"decode_jpeg on {device} fails on its tiles ({exc})"
        theirs = torch.from_numpy(reader.decode(level, index)).permute(2, 0, 1)
        diff = (ours.cpu().int() - theirs.int()).abs().float().mean().item()
        if diff > DECODE_TOLERANCE:
            kind = "RGB (Aperio-style, no colour transform)" if page.photometric == 2 else "YCbCr"
            return (f"decode_jpeg on {device} gives other pixels than the file's for its {kind} JPEG tiles "
                    f"(level {level}: {diff:.1f} grey levels apart on average)")
    return ""


def _decode_tiles(reader: TiffTileReader, keys, device: torch.device) -> dict[tuple[int, int], torch.Tensor]:
    """Tiles ``(level, index)`` decoded on ``device`` in one call, as uint8 [3, h, w]; tiles
    never written (sparse TIFF) are left out."""
    from torchvision.io import ImageReadMode, decode_jpeg

    streams = {key: _jpeg_stream(reader, *key) for key in sorted(keys)}
    streams = {key: data for key, data in streams.items() if data}
    if not streams:
        return {}
    data = [torch.frombuffer(bytearray(s), dtype=torch.uint8) for s in streams.values()]
    decoded = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    return dict(zip(streams, decoded))


def _jpeg_stream(reader: TiffTileReader, level: int, index: int) -> bytes:
    """A tile as a complete JPEG stream; empty for a tile never written."""
    data = reader.tile_data(level, index)
    if not data:
        return data
    page = reader.pages[level]
    tables = page.jpegtables
    if tables:
        if not (tables[:2] == _SOI and tables[-2:] == _EOI and data[:2] == _SOI):
            raise SlideDataError(f"{reader.path}: level {level} has JPEG tables or tiles without start/end markers "
                                 "(a corrupt tile); re-export or re-copy the file, or remove it from the sheet")
        data = tables[:-2] + data[2:]
    if page.photometric == 2:  # RGB: say so, right after the start marker
        data = data[:2] + _ADOBE_RGB + data[2:]
    return data
