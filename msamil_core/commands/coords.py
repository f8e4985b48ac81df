"""Patch coordinates at 20x, 10x and 5x: one TRIDENT-compatible HDF5 file per scale.

Each scale is a grid of --patch-size px patches at that magnification (512 px = 512, 1024 and
2048 level-0 px on a 0.5 µm/px slide), starting at level-0 (0, 0), so each 5x patch holds
exactly four 10x and sixteen 20x patches. A patch is kept when the selection mask covers at
least --min-fraction of it (0.7 in MsaMIL-Net). The selection mask is the lesion mask when one
is given (restricted to tissue), else the tissue mask.

Several patch-selection strategies in one call: give --strategy NAME OUT_20X OUT_10X OUT_5X once
per strategy instead of --out-20x/--out-10x/--out-5x. `tissue` keeps every tissue patch,
`lesion` the patches of lesion ∩ tissue (needs --lesion-mask), `random` --random N random tissue
patches. The workflow writes all the strategies its experiments use so, one job per slide.

Examples:
  msamil coords --meta s1/meta.json --tissue-mask s1/tissue_mask.png --patch-size 512 \\
      --out-20x coords/20x/s1.h5 --out-10x coords/10x/s1.h5 --out-5x coords/5x/s1.h5
  msamil coords --meta s1/meta.json --tissue-mask s1/tissue_mask.png --lesion-mask s1/lesion_mask.png \\
      --random 64 --strategy lesion coords/{20x,10x,5x}/s1.h5 \\
      --strategy random coords/random/{20x,10x,5x}/s1.h5
"""

from __future__ import annotations

import argparse

HELP = "masks -> coords/{20x,10x,5x}/<slide>.h5"
STRATEGIES = ("lesion", "tissue", "random")  # --strategy names (MsaMIL-Net Table 1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--meta", required=True, help="meta.json of the slide (from `msamil thumbnail`)")
    parser.add_argument("--tissue-mask", required=True, help="tissue mask PNG")
    parser.add_argument("--lesion-mask", help="lesion mask PNG; when given, patches are selected on lesion ∩ tissue")
    parser.add_argument(
        "--random",
        type=int,
        default=0,
        metavar="N",
        help="the random strategy: keep at most N random 20x patches of the selection (N/4 at 10x, N/16 at 5x); "
        "0 = keep all (default)",
    )
    parser.add_argument("--random-seed", type=int, default=0, help="seed of --random (default 0)")
    parser.add_argument("--patch-size", type=int, default=512, help="patch size in px at each target magnification (default 512)")
    parser.add_argument("--min-fraction", type=float, default=0.7, help="minimum mask fraction of a kept patch (default 0.7)")
    parser.add_argument("--base-mpp", type=float, default=0.5, help="µm/px that defines 20x (default 0.5)")
    parser.add_argument("--out-20x", help="HDF5 to write for 20x")
    parser.add_argument("--out-10x", help="HDF5 to write for 10x")
    parser.add_argument("--out-5x", help="HDF5 to write for 5x")
    parser.add_argument(
        "--strategy",
        nargs=4,
        action="append",
        default=[],
        metavar=("NAME", "OUT_20X", "OUT_10X", "OUT_5X"),
        help="instead of --out-*: one strategy's files (lesion, tissue or random), repeatable",
    )


def run(args: argparse.Namespace) -> None:
    import json
    import logging

    from ..coords import make_grids, sample_grids, write_coords
    from ..errors import MsamilError
    from ..tissue import load_mask

    log = logging.getLogger("msamil.coords")
    try:
        with open(args.meta) as f:
            meta = json.load(f)
    except (OSError, ValueError) as exc:
        raise MsamilError(f"{args.meta}: cannot read slide metadata ({exc}); rerun the thumbnail step") from None
    slide_id = meta["slide_id"]
    if not 0.0 < args.min_fraction <= 1.0:
        raise MsamilError(f"--min-fraction must be in (0, 1], got {args.min_fraction}")
    if args.patch_size < 1:
        raise MsamilError(f"--patch-size must be positive, got {args.patch_size}")
    outputs = [args.out_20x, args.out_10x, args.out_5x]
    if args.strategy and any(outputs):
        raise MsamilError("give either --out-20x/--out-10x/--out-5x or --strategy, not both")
    if not args.strategy and not all(outputs):
        raise MsamilError("give --out-20x, --out-10x and --out-5x (or --strategy NAME OUT_20X OUT_10X OUT_5X)")
    if args.random < 0:
        raise MsamilError(f"--random must be 0 or a positive number of patches, got {args.random}")
    names = [entry[0] for entry in args.strategy]
    for name in names:
        if name not in STRATEGIES:
            raise MsamilError(f"--strategy {name!r}: not one of {', '.join(STRATEGIES)}")
    if len(set(names)) != len(names):
        raise MsamilError(f"--strategy names a strategy twice ({', '.join(names)})")
    if "lesion" in names and not args.lesion_mask:
        raise MsamilError(f"slide {slide_id!r}: --strategy lesion needs --lesion-mask")
    if "random" in names and args.random < 1:
        raise MsamilError("--strategy random needs --random N (patches per slide at 20x)")

    tissue = load_mask(args.tissue_mask)
    lesion = None
    if args.lesion_mask:
        lesion = load_mask(args.lesion_mask)
        if lesion.shape != tissue.shape:
            raise MsamilError(
                f"slide {slide_id!r}: lesion mask {args.lesion_mask} is {lesion.shape[1]}x{lesion.shape[0]} px but the "
                f"tissue mask is {tissue.shape[1]}x{tissue.shape[0]}; both must be at thumbnail size"
            )

    def grids_of(mask):
        return make_grids(
            mask,
            (meta["width"], meta["height"]),
            meta["mpp"],
            patch_size=args.patch_size,
            min_fraction=args.min_fraction,
            base_mpp=args.base_mpp,
            name=slide_id,
        )

    if args.strategy:  # every strategy's grids first, then the files
        tissue_grids = grids_of(tissue) if {"tissue", "random"} & set(names) else None
        selections = []
        for name, *files in args.strategy:
            if name == "lesion":
                grids = grids_of(tissue & lesion)
            elif name == "random":
                grids = sample_grids(tissue_grids, args.random, args.random_seed, slide_id)
            else:
                grids = tissue_grids
            selections.append((name if name != "random" else "random tissue", grids, files))
    else:
        grids = grids_of(tissue if lesion is None else tissue & lesion)
        selection = "lesion" if lesion is not None else "tissue"
        if args.random:
            grids = sample_grids(grids, args.random, args.random_seed, slide_id)
            selection = f"random {selection}"
        selections = [(selection, grids, outputs)]
    for selection, grids, files in selections:
        for (scale, grid), path in zip(grids.items(), files):
            write_coords(path, grid.coords, dict(grid.attrs, selection=selection))
            log.info("%s %s (%s): %d patches of %d level-0 px", slide_id, scale, selection, len(grid.coords),
                     grid.attrs["patch_size_level0"])
