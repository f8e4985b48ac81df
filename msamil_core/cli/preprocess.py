"""Slide -> thumbnail, meta.json, tissue mask and, with --strategy-out, the 20x/10x/5x patch
coordinates (and with --geojson the QuPath export) in one process: `msamil thumbnail`, `msamil
tissue`, `msamil coords` and (with --geojson) `msamil export-geojson` one after the other, with the
same options.

The workflow's per-slide preprocessing job (rule preprocess_slide) runs this. When the patches are
selected on lesion masks, the coordinates wait for the segmentation: the job then stops at the
tissue mask (no --strategy-out), and `msamil segment` and `msamil coords` follow.

Example:
  msamil preprocess --slide s1.svs --slide-id s1 --thumbnail s1/thumbnail.png --meta s1/meta.json \\
      --tissue-mask s1/tissue_mask.png --patch-size 512 --strategy-out tissue:20x=coords/20x/s1.h5 \\
      --strategy-out tissue:10x=coords/10x/s1.h5 --strategy-out tissue:5x=coords/5x/s1.h5 \\
      --geojson s1/patches.geojson
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .options import add_output_arguments, add_settings, add_slide_arguments, from_args, strategy_files

HELP = "slide -> thumbnail.png + meta.json + tissue_mask.png (+ coords, GeoJSON)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..settings import PatchSettings, ThumbnailSettings, TissueSettings

    add_slide_arguments(parser)
    add_settings(parser, ThumbnailSettings)
    parser.add_argument("--thumbnail", required=True, help="thumbnail PNG to write")
    parser.add_argument("--meta", required=True, help="meta.json to write")
    parser.add_argument("--tissue-mask", required=True, help="tissue mask PNG to write (0/255)")
    add_settings(parser.add_argument_group("tissue mask"), TissueSettings)
    coords = parser.add_argument_group("coordinates (with --strategy-out)")
    add_settings(coords, PatchSettings, exclude=("strategy",))
    add_output_arguments(coords)


def run(args: argparse.Namespace) -> None:
    from ..errors import MsamilError
    from ..pipeline import make_coordinates, make_thumbnail, make_tissue_mask
    from ..settings import PatchSettings, ThumbnailSettings, TissueSettings

    files = strategy_files(args.strategy_out)
    if "lesion" in files:
        raise MsamilError("the lesion strategy selects on a lesion mask, which comes after the tissue mask: "
                          "run `msamil segment` and then `msamil coords --lesion-mask` for it")
    if args.geojson and not files:
        raise MsamilError("--geojson draws the patch grids: give --strategy-out as well")
    slide_id = args.slide_id or Path(args.slide).stem
    outputs = [args.thumbnail, args.meta, args.tissue_mask, *(p for f in files.values() for p in f.values()),
               *([args.geojson] if args.geojson else [])]
    try:
        make_thumbnail(args.slide, args.thumbnail, args.meta, slide_id, args.mpp, from_args(args, ThumbnailSettings))
        make_tissue_mask(args.thumbnail, args.tissue_mask, from_args(args, TissueSettings), slide_id, args.meta)
        if files:
            make_coordinates(args.meta, args.tissue_mask, files, from_args(args, PatchSettings), geojson=args.geojson,
                             geojson_strategy=args.geojson_strategy)
    except BaseException:
        for path in outputs:  # a failed step leaves none of the slide's files (each is written whole)
            Path(path).unlink(missing_ok=True)
        raise
