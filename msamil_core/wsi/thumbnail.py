"""A slide's thumbnail and meta.json, and the identity of the slide file they were made from.

meta.json holds what later steps need without reopening the slide: level-0 size, level
dimensions and downsamples, µm/px and its source, objective power, vendor, the thumbnail's size
and downsample (level-0 px per thumbnail px), and ``source``: the identity of the slide file
(:func:`file_identity`). Per-slide files are reused for a slide only when its file has the
identity recorded there (:func:`same_file`), so a slide listed under the id of another one never
gets that one's thumbnail, masks, coordinates or features.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from ..errors import MsamilError

_HEAD_TAIL = 1 << 20  # bytes read at each end of the file
_SAMPLES, _SAMPLE = 16, 1 << 16  # blocks read evenly spaced in between


def file_identity(path: str | os.PathLike) -> dict:
    """Who a slide file is: resolved path, size, mtime and ``digest``, the SHA-256 of its size,
    first and last MiB and 16 blocks of 64 KiB spread evenly in between (about 3 MiB read
    whatever the slide's size, so a cohort of thousands costs seconds, not hours)."""
    path = Path(path)
    stat = path.stat()
    size = stat.st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        offsets = [0, max(0, size - _HEAD_TAIL)]
        lengths = [_HEAD_TAIL, _HEAD_TAIL]
        if size > 2 * _HEAD_TAIL:
            step = (size - 2 * _HEAD_TAIL) // (_SAMPLES + 1)
            offsets[1:1] = [_HEAD_TAIL + step * (i + 1) for i in range(_SAMPLES)]
            lengths[1:1] = [_SAMPLE] * _SAMPLES
        for offset, length in zip(offsets, lengths):
            f.seek(offset)
            digest.update(f.read(length))
    return {"path": str(path.resolve()), "size": size, "mtime": stat.st_mtime, "digest": digest.hexdigest()}


def same_file(recorded: dict | None, current: dict) -> bool:
    """Whether the file identity ``recorded`` (a meta.json's ``source``) is that of the file whose
    :func:`file_identity` is ``current``: size and digest equal. Path and mtime are not compared,
    so a moved or copied slide is still itself."""
    return bool(recorded) and current["size"] == recorded.get("size") and current["digest"] == recorded.get("digest")


def thumbnail_and_meta(slide, long_side: int) -> tuple[np.ndarray, dict]:
    """(thumbnail RGB uint8 [h, w, 3] with its long side ``long_side`` px, meta.json dict) of an
    open :class:`~msamil_core.wsi.slide.Slide`."""
    if long_side < 16:
        raise MsamilError(f"thumbnail long side must be at least 16 px, got {long_side}")
    thumb = slide.read_thumbnail(long_side)
    meta = slide.metadata()
    h, w = thumb.shape[:2]
    meta["thumbnail"] = {"width": w, "height": h, "downsample_x": meta["width"] / w, "downsample_y": meta["height"] / h}
    meta["source"] = file_identity(slide.path)
    return thumb, meta


def load_meta(path: str | os.PathLike) -> dict:
    """A slide's meta.json (from ``msamil thumbnail``), checked for the sizes used here."""
    try:
        with open(path) as f:
            meta = json.load(f)
        level0 = (int(meta["width"]), int(meta["height"]))
        thumb = (int(meta["thumbnail"]["width"]), int(meta["thumbnail"]["height"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise MsamilError(f"{path}: cannot read slide metadata ({exc}); rerun `msamil thumbnail` for this slide") from None
    if min(level0) < 1 or min(thumb) < 1:
        raise MsamilError(f"{path}: slide or thumbnail size is empty; rerun `msamil thumbnail` for this slide")
    return meta


def thumbnail_mpp(meta: dict) -> float | None:
    """µm per thumbnail px of a meta.json dict (the slide's µm/px times the thumbnail's mean
    downsample), None when the slide's µm/px is not recorded."""
    if not meta.get("mpp"):
        return None
    (width, height), (w, h) = meta_sizes(meta)
    return float(meta["mpp"]) * (width / w + height / h) / 2


def meta_sizes(meta: dict) -> tuple[tuple[int, int], tuple[int, int]]:
    """((W, H) level-0 px, (w, h) thumbnail px) of a meta.json dict."""
    return (int(meta["width"]), int(meta["height"])), (int(meta["thumbnail"]["width"]), int(meta["thumbnail"]["height"]))
