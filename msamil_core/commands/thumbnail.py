"""Write a slide's thumbnail (PNG, long side --long-side px, aspect kept) and meta.json.

meta.json holds what later steps need without reopening the slide: level-0 size, level
dimensions and downsamples, µm/px (and whether it came from the file or the sheet), objective
power, vendor, and the thumbnail's size and downsample (level-0 px per thumbnail px).
"""

from __future__ import annotations

import argparse

HELP = "slide -> thumbnail.png + meta.json"


def add_slide_arguments(parser: argparse.ArgumentParser) -> None:
    """--slide, --slide-id and --mpp, shared by every command that opens a slide."""
    parser.add_argument("--slide", required=True, help="slide file (anything OpenSlide opens)")
    parser.add_argument("--slide-id", help="slide name used in messages and outputs (default: file stem)")
    parser.add_argument("--mpp", type=float, help="level-0 µm/px; overrides the file's value (sheet column `mpp`)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_slide_arguments(parser)
    parser.add_argument("--long-side", type=int, default=1024, help="thumbnail long side in px (default 1024)")
    parser.add_argument("--out", required=True, help="thumbnail PNG to write")
    parser.add_argument("--meta", required=True, help="meta.json to write")


def thumbnail_and_meta(slide, long_side: int):
    """(thumbnail RGB uint8 [h, w, 3], meta.json dict) of an open slide."""
    from ..errors import MsamilError

    if long_side < 16:
        raise MsamilError(f"--long-side must be at least 16 px, got {long_side}")
    thumb = slide.read_thumbnail(long_side)
    meta = slide.metadata()
    h, w = thumb.shape[:2]
    meta["thumbnail"] = {
        "width": w,
        "height": h,
        "downsample_x": meta["width"] / w,
        "downsample_y": meta["height"] / h,
    }
    return thumb, meta


def run(args: argparse.Namespace) -> None:
    from ..fileio import write_json
    from ..slide import open_slide
    from ..tissue import save_rgb_png

    with open_slide(args.slide, args.slide_id, args.mpp) as slide:
        thumb, meta = thumbnail_and_meta(slide, args.long_side)
    # meta.json last: it is the rule's marker that the thumbnail is complete too.
    save_rgb_png(args.out, thumb)
    write_json(args.meta, meta)
