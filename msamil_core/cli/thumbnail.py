"""Write a slide's thumbnail (PNG, long side --long-side px, aspect kept) and meta.json.

meta.json holds what later steps need without reopening the slide: level-0 size, level
dimensions and downsamples, µm/px (and whether it came from the file or the sheet), objective
power, vendor, the thumbnail's size and downsample (level-0 px per thumbnail px), and the slide
file's identity (`source`: resolved path, size, mtime and a digest of its content), which later
steps and `msamil predict` check before they reuse anything made from it.
"""

from __future__ import annotations

import argparse

from .options import add_settings, add_slide_arguments, from_args

HELP = "slide -> thumbnail.png + meta.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_slide_arguments(parser)
    from ..settings import ThumbnailSettings

    add_settings(parser, ThumbnailSettings)
    parser.add_argument("--out", required=True, help="thumbnail PNG to write")
    parser.add_argument("--meta", required=True, help="meta.json to write")


def run(args: argparse.Namespace) -> None:
    from ..pipeline import make_thumbnail
    from ..settings import ThumbnailSettings

    make_thumbnail(args.slide, args.out, args.meta, args.slide_id, args.mpp, from_args(args, ThumbnailSettings))
