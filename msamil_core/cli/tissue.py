"""Tissue mask on a thumbnail: PNG of the same size, 255 = tissue.

Brightfield slides: saturation above Otsu's threshold (never below --min-saturation), minus pen
marks and dark grey artefacts, then closing, filling of the holes up to --max-hole-area µm² and
removal of the pieces under --min-object-area µm² (µm/px from the meta.json). Fluorescence slides
(dark background, detected automatically unless --mode says otherwise): local signal density
above the glass's, dim stroma included. A slide with no tissue fails with a message naming it.
"""

from __future__ import annotations

import argparse

from .options import add_settings, from_args

HELP = "thumbnail -> tissue_mask.png"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--thumbnail", required=True, help="thumbnail PNG (from `msamil thumbnail`)")
    parser.add_argument("--meta", help="the thumbnail's meta.json, for its µm/px (default: meta.json beside the "
                        "thumbnail; without one, tissue areas are fractions of the thumbnail)")
    parser.add_argument("--slide-id", help="slide name used in messages (default: thumbnail's folder name)")
    parser.add_argument("--out", required=True, help="mask PNG to write (0/255)")
    from ..settings import TissueSettings

    add_settings(parser, TissueSettings)


def run(args: argparse.Namespace) -> None:
    from ..pipeline import make_tissue_mask
    from ..settings import TissueSettings

    make_tissue_mask(args.thumbnail, args.out, from_args(args, TissueSettings), args.slide_id, args.meta)
