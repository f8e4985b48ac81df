"""Export a slide's lesion mask and patch grids as QuPath GeoJSON (level-0 pixel coordinates).

Writes one FeatureCollection that QuPath opens with File > Import objects from file (or by
dragging the file onto the slide):

* the lesion mask (--lesion-mask) as annotations classified --lesion-class, one Polygon with
  holes per connected lesion region, outlined along the mask's pixel edges;
* optionally the tissue mask (--tissue-mask) as annotations classified "Tissue";
* the kept patches of each coordinates file (--coords, ours or TRIDENT's) as one square per
  patch, objectType "tile" (or --patch-object-type detection), classified "20x", "10x" or "5x",
  with the magnification and patch size as measurements.

The thumbnail-to-level-0 scale comes from the slide's meta.json (from `msamil thumbnail`).

Example:
  msamil export-geojson --meta results/slides/s1/meta.json \\
      --lesion-mask results/slides/s1/lesion_mask.png \\
      --coords results/coords/20x/s1.h5 results/coords/10x/s1.h5 results/coords/5x/s1.h5 \\
      --out results/slides/s1/qupath.geojson
"""

from __future__ import annotations

import argparse

HELP = "lesion mask + patch coords -> QuPath GeoJSON (level-0 px)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--meta", required=True, help="meta.json of the slide (from `msamil thumbnail`)")
    parser.add_argument("--lesion-mask", help="lesion mask PNG (thumbnail size) to export as annotations")
    parser.add_argument("--tissue-mask", help="tissue mask PNG (thumbnail size) to export as annotations")
    parser.add_argument(
        "--coords", nargs="+", default=[], metavar="H5", help="coordinates HDF5 files to export as patch squares"
    )
    parser.add_argument(
        "--lesion-class", default="Tumor", help="QuPath class of the lesion annotations (default %(default)s)"
    )
    parser.add_argument(
        "--patch-object-type",
        choices=["tile", "detection"],
        default="tile",
        help="QuPath object type of the patch squares (default %(default)s)",
    )
    parser.add_argument(
        "--single-feature",
        action="store_true",
        help="one MultiPolygon annotation per mask instead of one Polygon annotation per region",
    )
    parser.add_argument("--out", required=True, help="GeoJSON file to write")


def run(args: argparse.Namespace) -> None:
    import logging

    from ..annotations import load_meta, meta_sizes
    from ..errors import MsamilError
    from ..geojson import TISSUE_COLOUR, coords_features, mask_features, write_geojson
    from ..tissue import load_mask

    log = logging.getLogger("msamil.export_geojson")
    if not (args.lesion_mask or args.tissue_mask or args.coords):
        raise MsamilError("nothing to export: give --lesion-mask, --tissue-mask and/or --coords")
    meta = load_meta(args.meta)
    level0_size, thumb_size = meta_sizes(meta)
    slide_id = meta.get("slide_id", "")
    features = []
    masks = [(args.tissue_mask, "Tissue", "tissue"), (args.lesion_mask, args.lesion_class, "lesion")]
    for path, class_name, what in masks:
        if not path:
            continue
        mask = load_mask(path)
        if mask.shape != (thumb_size[1], thumb_size[0]):
            raise MsamilError(
                f"slide {slide_id!r}: {what} mask {path} is {mask.shape[1]} x {mask.shape[0]} px but the thumbnail in "
                f"{args.meta} is {thumb_size[0]} x {thumb_size[1]}; rerun the {what} step of this slide"
            )
        kwargs = {"color": TISSUE_COLOUR} if what == "tissue" else {}
        found = mask_features(mask, level0_size, class_name, name=what, single_feature=args.single_feature, **kwargs)
        log.info("%s: %d %s region(s)", slide_id, len(found), what)
        features += found
    for path in args.coords:
        found = coords_features(path, object_type=args.patch_object_type)
        log.info("%s: %d patches from %s", slide_id, len(found), path)
        features += found
    write_geojson(args.out, features)
