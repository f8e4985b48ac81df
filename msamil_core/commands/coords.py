"""Patch coordinates at 20x, 10x and 5x: one TRIDENT-compatible HDF5 file per scale.

Each scale is a grid of --patch-size px patches at that magnification (512 px = 512, 1024 and
2048 level-0 px on a 0.5 µm/px slide), starting at level-0 (0, 0), so each 5x patch holds
exactly four 10x and sixteen 20x patches. A patch is kept when the selection mask covers at
least --min-fraction of it (0.7 in MsaMIL-Net). The selection mask is the lesion mask when one
is given (restricted to tissue), else the tissue mask.
"""

from __future__ import annotations

import argparse

HELP = "masks -> coords/{20x,10x,5x}/<slide>.h5"


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
    parser.add_argument("--out-20x", required=True, help="HDF5 to write for 20x")
    parser.add_argument("--out-10x", required=True, help="HDF5 to write for 10x")
    parser.add_argument("--out-5x", required=True, help="HDF5 to write for 5x")


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
    mask = load_mask(args.tissue_mask)
    if args.lesion_mask:
        lesion = load_mask(args.lesion_mask)
        if lesion.shape != mask.shape:
            raise MsamilError(
                f"slide {slide_id!r}: lesion mask {args.lesion_mask} is {lesion.shape[1]}x{lesion.shape[0]} px but the "
                f"tissue mask is {mask.shape[1]}x{mask.shape[0]}; both must be at thumbnail size"
            )
        mask = mask & lesion
    grids = make_grids(
        mask,
        (meta["width"], meta["height"]),
        meta["mpp"],
        patch_size=args.patch_size,
        min_fraction=args.min_fraction,
        base_mpp=args.base_mpp,
        name=slide_id,
    )
    if args.random < 0:
        raise MsamilError(f"--random must be 0 or a positive number of patches, got {args.random}")
    selection = "lesion" if args.lesion_mask else "tissue"
    if args.random:
        grids = sample_grids(grids, args.random, args.random_seed, slide_id)
        selection = f"random {selection}"
    outputs = {"20x": args.out_20x, "10x": args.out_10x, "5x": args.out_5x}
    for scale, grid in grids.items():
        attrs = dict(grid.attrs, selection=selection)
        write_coords(outputs[scale], grid.coords, attrs)
        log.info("%s %s: %d patches of %d level-0 px", slide_id, scale, len(grid.coords), grid.attrs["patch_size_level0"])
