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
    parser.add_argument("--coords", nargs="+", default=[], metavar="H5", help="coordinates HDF5 files to export as patch squares")
    parser.add_argument("--lesion-class", default="Tumor", help="QuPath class of the lesion annotations (default %(default)s)")
    parser.add_argument("--patch-object-type", choices=["tile", "detection"], default="tile",
                        help="QuPath object type of the patch squares (default %(default)s)")
    parser.add_argument("--single-feature", action="store_true",
                        help="one MultiPolygon annotation per mask instead of one Polygon annotation per region")
    parser.add_argument("--out", required=True, help="GeoJSON file to write")


def run(args: argparse.Namespace) -> None:
    from ..wsi.geojson import export_slide

    export_slide(args.meta, args.out, lesion_mask=args.lesion_mask, tissue_mask=args.tissue_mask, coords=args.coords,
                 lesion_class=args.lesion_class, patch_object_type=args.patch_object_type,
                 single_feature=args.single_feature)
