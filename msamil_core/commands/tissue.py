"""Tissue mask on a thumbnail: PNG of the same size, 255 = tissue.

Brightfield slides: saturation above Otsu's threshold (never below --min-saturation), minus pen
marks and dark artefacts, then closing, hole filling and speck removal. Fluorescence slides
(dark background, detected automatically unless --mode says otherwise): local signal density
above Otsu's threshold. A slide with no tissue fails with a message naming it.
"""

from __future__ import annotations

import argparse

HELP = "thumbnail -> tissue_mask.png"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--thumbnail", required=True, help="thumbnail PNG (from `msamil thumbnail`)")
    parser.add_argument("--slide-id", help="slide name used in messages (default: thumbnail's folder name)")
    parser.add_argument("--out", required=True, help="mask PNG to write (0/255)")
    add_tissue_arguments(parser)


def add_tissue_arguments(parser: argparse.ArgumentParser) -> None:
    """The tissue-mask options (the config's `tissue` section), shared with `msamil predict`."""
    from ..tissue import TissueParams

    d = TissueParams()
    parser.add_argument("--mode", choices=["auto", "brightfield", "fluorescence"], default=d.mode,
                        help="tissue detection: auto (dark background = fluorescence), brightfield or fluorescence")
    parser.add_argument("--min-saturation", type=float, default=d.min_saturation, help="floor of the saturation threshold, 0..1")
    parser.add_argument("--no-pen-removal", dest="remove_pen", action="store_false", help="keep blue/green ink")
    parser.add_argument("--dark-threshold", type=float, default=d.dark_threshold, help="brightest channel below this (0..1) is an artefact")
    parser.add_argument("--close-radius", type=int, default=d.close_radius, help="closing radius in thumbnail px")
    parser.add_argument("--min-object-fraction", type=float, default=d.min_object_fraction, help="drop tissue pieces smaller than this fraction of the thumbnail")
    parser.add_argument("--max-hole-fraction", type=float, default=d.max_hole_fraction, help="fill holes up to this fraction of the thumbnail")
    parser.add_argument("--min-tissue-fraction", type=float, default=1e-3, help="fail when less than this fraction of the thumbnail is tissue")


def tissue_params(args: argparse.Namespace):
    """The :class:`~msamil_core.tissue.TissueParams` of the options of :func:`add_tissue_arguments`."""
    from ..tissue import TissueParams

    return TissueParams(
        mode=args.mode,
        min_saturation=args.min_saturation,
        remove_pen=args.remove_pen,
        dark_threshold=args.dark_threshold,
        close_radius=args.close_radius,
        min_object_fraction=args.min_object_fraction,
        max_hole_fraction=args.max_hole_fraction,
    )


def run(args: argparse.Namespace) -> None:
    from pathlib import Path

    import numpy as np
    from PIL import Image

    from ..errors import MsamilError
    from ..tissue import save_mask, slide_tissue_mask

    slide_id = args.slide_id or Path(args.thumbnail).parent.name
    try:  # not segmentation.read_rgb: that module imports torch, seconds for a tissue job
        with Image.open(args.thumbnail) as img:
            rgb = np.asarray(img.convert("RGB"))
    except (OSError, ValueError) as exc:
        raise MsamilError(f"slide {slide_id!r}: cannot read thumbnail {args.thumbnail} ({exc}); rerun its thumbnail step") from None
    save_mask(args.out, slide_tissue_mask(rgb, tissue_params(args), args.min_tissue_fraction, slide_id))
