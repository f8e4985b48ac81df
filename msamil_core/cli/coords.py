"""Patch coordinates at 20x, 10x and 5x: one TRIDENT-compatible HDF5 file per scale and strategy.

Each scale is a grid of --patch-size px patches at that magnification (512 px = 512, 1024 and
2048 level-0 px on a 0.5 µm/px slide), starting at level-0 (0, 0), so each 5x patch holds
exactly four 10x and sixteen 20x patches. A patch is kept when the selection mask covers at
least --min-fraction of it (0.7 in MsaMIL-Net). The selection mask is the patch-selection
strategy's (MsaMIL-Net Table 1): `lesion` = lesion ∩ tissue (needs --lesion-mask), `tissue` = all
tissue, `random` = --random-n N random tissue patches at 20x (N/4 at 10x, N/16 at 5x).

One strategy: --strategy NAME (default auto: lesion with --lesion-mask, else tissue) and
--out-20x/--out-10x/--out-5x. Several strategies in one call, each file named by
strategy and scale: --strategy-out NAME:SCALE=H5, repeated (the workflow writes every
strategy its experiments use so, one job per slide). --geojson also writes the QuPath export.

Examples:
  msamil coords --meta s1/meta.json --tissue-mask s1/tissue_mask.png --patch-size 512 \
      --out-20x coords/20x/s1.h5 --out-10x coords/10x/s1.h5 --out-5x coords/5x/s1.h5
  msamil coords --meta s1/meta.json --tissue-mask s1/tissue_mask.png --lesion-mask s1/lesion_mask.png \
      --random-n 64 --strategy-out lesion:20x=coords/20x/s1.h5 ... --strategy-out random:5x=coords/random/5x/s1.h5
"""

from __future__ import annotations

import argparse

from .options import add_output_arguments, add_settings, from_args, strategy_files

HELP = "masks -> coords/{20x,10x,5x}/<slide>.h5"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--meta", required=True, help="meta.json of the slide (from `msamil thumbnail`)")
    parser.add_argument("--tissue-mask", required=True, help="tissue mask PNG")
    parser.add_argument("--lesion-mask", help="lesion mask PNG (the lesion strategy selects on lesion ∩ tissue)")
    from ..settings import PatchSettings

    add_settings(parser, PatchSettings)
    parser.add_argument("--out-20x", help="HDF5 to write for 20x")
    parser.add_argument("--out-10x", help="HDF5 to write for 10x")
    parser.add_argument("--out-5x", help="HDF5 to write for 5x")
    add_output_arguments(parser)


def outputs(args: argparse.Namespace) -> dict[str, dict[str, str]]:
    """strategy -> {scale: file} from --out-* or --strategy-out."""
    from ..errors import MsamilError

    from ..settings import PatchSettings

    single = {"20x": args.out_20x, "10x": args.out_10x, "5x": args.out_5x}
    if args.strategy_out:
        if any(single.values()):
            raise MsamilError("give either --out-20x/--out-10x/--out-5x (with --strategy) or --strategy-out, not both")
        return strategy_files(args.strategy_out)
    if not all(single.values()):
        raise MsamilError("give --out-20x, --out-10x and --out-5x (or --strategy-out NAME:SCALE=H5 per file)")
    return {from_args(args, PatchSettings).resolved_strategy(bool(args.lesion_mask)): single}


def run(args: argparse.Namespace) -> None:
    from ..pipeline import make_coordinates

    from ..settings import PatchSettings

    make_coordinates(args.meta, args.tissue_mask, outputs(args), from_args(args, PatchSettings), args.lesion_mask,
                     geojson=args.geojson, geojson_strategy=args.geojson_strategy)
